//! Shared-memory segments: files in a runtime directory, created `O_EXCL` with mode 0600 and
//! mapped with `memmap2`, plus open-file-description (OFD) byte locks used as liveness tokens.
//!
//! A process takes a role (producer, consumer, writer, reader N) by holding an OFD write lock on
//! one byte of the segment file. The kernel drops the lock when the process dies, so a peer can
//! tell "alive" from "crashed" without trusting a heartbeat alone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

#[cfg(not(target_endian = "little"))]
compile_error!("the shared-memory layouts are defined for little-endian hosts only");

/// Marker for the fixed headers stored at the start of a segment.
///
/// # Safety
/// Implementors are `#[repr(C)]` and hold only integers and arrays of integers: no pointers,
/// references, `bool`s, enums or other types with invalid bit patterns. So every byte pattern
/// of `size_of::<Self>()` bytes, written by any process, is a valid value.
pub(crate) unsafe trait SegmentHeader: Copy {
    /// The header's magic and layout version.
    fn magic_and_version(&self) -> (u64, u32);
}

/// Reads the fixed header `H` from the start of `bytes` and checks its magic (0 means its
/// creator has not published it yet) and its layout version.
pub(crate) fn read_header<H: SegmentHeader>(
    bytes: &[u8],
    magic: u64,
    version: u32,
) -> Result<H, crate::HeaderError> {
    use crate::HeaderError;
    let needed = std::mem::size_of::<H>();
    if bytes.len() < needed {
        return Err(HeaderError::Truncated {
            needed,
            found: bytes.len(),
        });
    }
    // SAFETY: `needed` bytes are readable; read_unaligned has no alignment requirement; and
    // `SegmentHeader` guarantees every bit pattern is a valid `H`.
    let h: H = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let (found_magic, found_version) = h.magic_and_version();
    if found_magic == 0 {
        return Err(HeaderError::NotInitialised);
    }
    if found_magic != magic {
        return Err(HeaderError::BadMagic {
            expected: magic,
            found: found_magic,
        });
    }
    if found_version != version {
        return Err(HeaderError::BadVersion {
            expected: version,
            found: found_version,
        });
    }
    Ok(h)
}

/// The directory segments live in when none is given: `$XDG_RUNTIME_DIR`, else `/dev/shm`.
pub fn default_runtime_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// Why a segment could not be created or opened at the file level.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The segment name is empty or contains a path separator.
    #[error("invalid segment name {0:?}: use a non-empty name without '/' or NUL")]
    InvalidName(String),
    /// Creating with `O_EXCL` found an existing file.
    #[error("segment {0} already exists")]
    AlreadyExists(PathBuf),
    /// The segment file does not exist.
    #[error("segment {0} does not exist")]
    NotFound(PathBuf),
    /// The file is owned by another user.
    #[error("segment {path} is owned by uid {owner}, not by this process's uid {me}")]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
    /// The file is readable or writable by group or others.
    #[error("segment {path} has mode {mode:o}; only 0600 is accepted")]
    WrongMode { path: PathBuf, mode: u32 },
    /// The file's size differs from what its layout needs.
    #[error("segment {path} is {found} bytes, its layout needs {expected}")]
    WrongSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A mapped segment file. The mapping stays valid for the value's lifetime; a truncation of
/// the file while mapped is reported by [`Segment::check_intact`] instead of killing the
/// process (see `crate::fault`).
pub(crate) struct Segment {
    /// Dropped first: the mapping leaves the fault table before it is unmapped.
    guard: crate::fault::Guard,
    file: File,
    map: MmapRaw,
    path: PathBuf,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

fn segment_path(dir: &Path, name: &str, ext: &str) -> Result<PathBuf, SegmentError> {
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(SegmentError::InvalidName(name.to_owned()));
    }
    Ok(dir.join(format!("{name}.{ext}")))
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SegmentError + 'p {
    move |source| SegmentError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Segment {
    /// Copies the first `N` bytes of a published header: the segment must be at least
    /// `min_len` bytes long and its magic word (the first 8 bytes, stored last by the creator)
    /// non-zero. `N` must not exceed `min_len`.
    pub(crate) fn published_prefix<const N: usize>(
        &self,
        min_len: usize,
    ) -> Result<[u8; N], crate::HeaderError> {
        use crate::sync::{atomic_u64_at, Ordering};
        let min_len = min_len.max(N).max(8);
        if self.len() < min_len {
            return Err(crate::HeaderError::Truncated {
                needed: min_len,
                found: self.len(),
            });
        }
        // SAFETY: the mapping is at least 8 bytes and page aligned; creators and openers only
        // access the magic word atomically.
        let magic = unsafe { atomic_u64_at(self.ptr().cast()) };
        // Acquire pairs with the Release store of the magic in the creator's `create`.
        if magic.load(Ordering::Acquire) == 0 {
            return Err(crate::HeaderError::NotInitialised);
        }
        let mut fixed = [0u8; N];
        // SAFETY: `N <= len` bytes are readable, and the fixed prefix is immutable once the
        // magic is published (seen above); `fixed` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), fixed.as_mut_ptr(), N) };
        Ok(fixed)
    }

    /// Takes the process-lifetime lock on `byte` that marks `role` (producer, consumer,
    /// writer, …) as held; the kernel releases it when the holder dies.
    pub(crate) fn take_role(&self, byte: u64, role: &'static str) -> Result<(), crate::OpenError> {
        match self.try_lock_byte(byte) {
            Ok(true) => Ok(()),
            Ok(false) => Err(crate::OpenError::RoleTaken {
                role,
                path: self.path().to_owned(),
            }),
            Err(source) => Err(crate::OpenError::Lock {
                path: self.path().to_owned(),
                source,
            }),
        }
    }

    /// Creates `dir/name.ext` with `O_CREAT | O_EXCL`, mode 0600, zero-filled, of `len` bytes.
    pub(crate) fn create(
        dir: &Path,
        name: &str,
        ext: &str,
        len: u64,
    ) -> Result<Self, SegmentError> {
        let path = segment_path(dir, name, ext)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    SegmentError::AlreadyExists(path.clone())
                } else {
                    SegmentError::Io {
                        what: "creating",
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
        file.set_len(len).map_err(io_err("sizing", &path))?;
        Self::mapped(file, path)
    }

    /// Maps `file` and registers the mapping with the fault guard.
    fn mapped(file: File, path: PathBuf) -> Result<Self, SegmentError> {
        let map = MmapRaw::map_raw(&file).map_err(io_err("mapping", &path))?;
        let guard = crate::fault::Guard::register(map.as_mut_ptr(), map.len());
        Ok(Self {
            guard,
            file,
            map,
            path,
        })
    }

    /// Fails when the file has shrunk below the mapping, or an access already ran past its
    /// end (the fault was absorbed: the mapping reads zeros now). One fstat: for the operations
    /// that wait or publish weights; the others check [`Self::check_unfaulted`].
    pub(crate) fn check_intact(&self) -> Result<(), crate::Truncated> {
        let expected = self.map.len() as u64;
        // An fstat failure on an open fd cannot come from a truncation: trust the mapping.
        let found = self.file.metadata().map_or(expected, |m| m.len());
        if found < expected || self.guard.faulted() {
            return Err(crate::Truncated {
                path: self.path.clone(),
                expected,
                found,
            });
        }
        Ok(())
    }

    /// Whether an access ran past the file's end (one atomic load, no system call). A
    /// truncation that no access ran into left what was read valid.
    pub(crate) fn check_unfaulted(&self) -> Result<(), crate::Truncated> {
        if self.guard.faulted() {
            return self.check_intact();
        }
        Ok(())
    }

    /// Opens an existing segment after checking owner, mode and (when given) size.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        ext: &str,
        expected_len: Option<u64>,
    ) -> Result<Self, SegmentError> {
        let path = segment_path(dir, name, ext)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    SegmentError::NotFound(path.clone())
                } else {
                    SegmentError::Io {
                        what: "opening",
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
        let meta = file.metadata().map_err(io_err("inspecting", &path))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(SegmentError::WrongOwner {
                path,
                owner: meta.uid(),
                me,
            });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(SegmentError::WrongMode {
                path,
                mode: meta.mode() & 0o7777,
            });
        }
        if let Some(expected) = expected_len {
            if meta.len() != expected {
                return Err(SegmentError::WrongSize {
                    path,
                    expected,
                    found: meta.len(),
                });
            }
        }
        Self::mapped(file, path)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the OFD write lock on byte `index` without waiting. `Ok(false)`: someone holds it.
    pub(crate) fn try_lock_byte(&self, index: u64) -> io::Result<bool> {
        let mut fl = flock_for(libc::F_WRLCK, index);
        // SAFETY: the fd is open for the lifetime of `self.file`; `fl` is a valid, initialised
        // flock struct with l_pid = 0 as F_OFD_SETLK requires.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(err),
        }
    }

    /// Whether another open file description (any process) holds the lock on byte `index`.
    pub(crate) fn byte_locked_by_other(&self, index: u64) -> io::Result<bool> {
        let mut fl = flock_for(libc::F_WRLCK, index);
        // SAFETY: as in try_lock_byte; F_OFD_GETLK only writes into `fl`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }
}

fn flock_for(kind: i32, index: u64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = index as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Nanoseconds on `CLOCK_MONOTONIC`, which all processes on the host share.
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime only writes to it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Back-off for waits: spin briefly, then yield the CPU for up to a millisecond, then sleep in
/// short steps. Latency-sensitive peers stay responsive; idle ones stop burning a core.
pub(crate) struct Backoff {
    step: u32,
    start: Option<std::time::Instant>,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            step: 0,
            start: None,
        }
    }

    /// Waits a little; returns true when the caller should run its slow checks (liveness,
    /// timeout): on every sleep and every 64th yield.
    pub(crate) fn snooze(&mut self) -> bool {
        self.step = self.step.wrapping_add(1);
        if self.step < 256 {
            std::hint::spin_loop();
            return false;
        }
        let start = *self.start.get_or_insert_with(std::time::Instant::now);
        if start.elapsed() < std::time::Duration::from_millis(1) {
            std::thread::yield_now();
            self.step % 64 == 0
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize(path: &Path, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len))
            .expect("resize");
    }

    #[test]
    fn an_access_past_a_truncated_end_reads_zeros_and_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = Segment::create(dir.path(), "t", "seg", 3 * 4096).expect("create");
        // SAFETY: offset 5000 lies inside the 3-page mapping.
        unsafe { seg.ptr().add(5000).write_volatile(7) };
        assert!(seg.check_intact().is_ok());

        resize(seg.path(), 4096);
        let e = seg
            .check_intact()
            .expect_err("the size check sees the truncation");
        assert_eq!((e.expected, e.found), (3 * 4096, 4096));
        assert!(
            seg.check_unfaulted().is_ok(),
            "no access has run past the end yet"
        );
        // An access that raced past that check: the fault is absorbed instead of killing the
        // process, and reads zeros.
        // SAFETY: offset 5000 is inside the mapping, whose file now ends at 4096: exactly the
        // access the fault guard exists for.
        let v = unsafe { seg.ptr().add(5000).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: as above, a write past the end.
        unsafe { seg.ptr().add(9000).write_volatile(1) };
        assert!(seg.check_unfaulted().is_err(), "the absorbed fault is seen");

        // Grown back to its size, the file alone looks intact; the absorbed fault still tells.
        resize(seg.path(), 3 * 4096);
        let e = seg
            .check_intact()
            .expect_err("the absorbed fault is remembered");
        assert_eq!(e.found, 3 * 4096);
    }
}
