//! Default run directories: `runs/<kind>-<local time>`, e.g. `runs/train-2026-12-04T13-52-18`,
//! with a `-2`, `-3`… suffix when that name is taken.

use std::path::{Path, PathBuf};

/// Where the commands put a run's outputs unless told otherwise.
pub const RUNS_DIR: &str = "runs";

/// A fresh directory name under `runs/` for a run of `kind` (`train`, `bench-overlap`…) started
/// now: the local time, readable and sortable, with a suffix when it exists already. Not
/// created here.
pub fn new_run_dir(kind: &str) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unused_name(
        Path::new(RUNS_DIR),
        &format!("{kind}-{}", local_timestamp(now)),
    )
}

/// `base/name`, or `base/name-2`, `base/name-3`… whichever is the first that does not exist.
pub fn unused_name(base: &Path, name: &str) -> PathBuf {
    let first = base.join(name);
    if !first.exists() {
        return first;
    }
    (2u64..)
        .map(|n| base.join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// `YYYY-MM-DDTHH-MM-SS` of a Unix time in the local time zone (UTC when the zone cannot be
/// read); dashes instead of colons, so the name is valid on every file system.
pub fn local_timestamp(unix_secs: i64) -> String {
    let t = libc::time_t::from(unix_secs);
    // SAFETY: `tm` is plain data (zeroed is a valid value); localtime_r and gmtime_r only
    // write into the `tm` we pass and read the `time_t` we pass, both live for the calls.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() && libc::gmtime_r(&t, &mut tm).is_null() {
            return format!("{unix_secs}");
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_are_readable_and_taken_names_get_a_suffix() {
        let s = local_timestamp(1_796_392_298);
        // The shape, whatever the zone: 2026-12-04T13-52-18 in UTC+1.
        assert_eq!(s.len(), 19, "{s}");
        let b = s.as_bytes();
        for (i, c) in b.iter().enumerate() {
            match i {
                4 | 7 | 13 | 16 => assert_eq!(*c, b'-', "{s}"),
                10 => assert_eq!(*c, b'T', "{s}"),
                _ => assert!(c.is_ascii_digit(), "{s}"),
            }
        }
        assert!(s.starts_with("2026-12-0"), "{s}");

        let dir = tempfile::tempdir().unwrap();
        let a = unused_name(dir.path(), "train-x");
        assert_eq!(a, dir.path().join("train-x"));
        std::fs::create_dir(&a).unwrap();
        let b = unused_name(dir.path(), "train-x");
        assert_eq!(b, dir.path().join("train-x-2"));
        std::fs::create_dir(&b).unwrap();
        assert_eq!(
            unused_name(dir.path(), "train-x"),
            dir.path().join("train-x-3")
        );
    }
}
