//! Atomic learner checkpoints.
//!
//! A checkpoint is a directory `root/step-NNNNNNNN/` holding
//!
//! - `model.safetensors`: the model's named parameters;
//! - `optimizer.safetensors`: the AdamW moments (`m.<param>`, `v.<param>`);
//! - `state.json`: a [`CheckpointState`] (counters and the caller's `extra`: RNG streams, data
//!   and ring cursors, the validated configuration…);
//! - `manifest.json`: the sha256 and byte size of each of the three files above.
//!
//! It is written as `step-N.tmp/`, every file and the directory fsynced, renamed to `step-N/`,
//! the root fsynced, and only then named in `root/LATEST` (written as `LATEST.tmp`, fsynced,
//! renamed, root fsynced). `LATEST` is the commit point: a crash anywhere leaves either the
//! previous checkpoint named there or the new one, never a half-written one. Reading
//! ([`latest_checkpoint`]) verifies the manifest and falls back to the newest complete
//! checkpoint when `LATEST` is missing or names a broken one.

use crate::error::{LearnerError, Result};
use crate::update::Learner;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The model's parameters.
const MODEL_FILE: &str = "model.safetensors";
/// The optimizer's moments.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The [`CheckpointState`] as JSON.
const STATE_FILE: &str = "state.json";
/// Checksums and sizes of the three files above.
const MANIFEST_FILE: &str = "manifest.json";
/// The file in the root naming the newest committed checkpoint directory.
const LATEST_FILE: &str = "LATEST";

/// The manifest layout this code writes and reads.
const MANIFEST_FORMAT: u32 = 1;

/// The counters saved next to the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The training loop's step the checkpoint was taken after (names the directory).
    pub step: u64,
    /// Optimizer steps applied: the policy version of the saved weights.
    pub version: u64,
    /// The optimizer's own step count (the `t` of its bias corrections).
    pub optimizer_step_t: u64,
    /// Steps skipped for a non-finite loss or gradient, in total.
    pub nonfinite_total: u64,
    /// Whatever else the caller needs to resume (RNG streams, cursors, configuration).
    pub extra: serde_json::Value,
}

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileEntry {
    sha256: String,
    bytes: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    files: BTreeMap<String, FileEntry>,
}

/// What [`scan_checkpoints`] found.
#[derive(Debug, Default)]
pub struct CheckpointScan {
    /// The checkpoint to resume from: the one `LATEST` names if it verifies, else the newest
    /// complete one; `None` when there is none.
    pub latest: Option<PathBuf>,
    /// Checkpoints (or the `LATEST` file) looked at and refused before `latest`, with why.
    pub skipped: Vec<(PathBuf, LearnerError)>,
}

impl Learner {
    /// Saves the model, the optimizer state and the counters as `root/step-{step:08}/` and
    /// names it in `root/LATEST`, atomically.
    ///
    /// The directory holds `model.safetensors` (the model's named parameters),
    /// `optimizer.safetensors` (the moments, `m.<param>` and `v.<param>`), `state.json` (a
    /// [`CheckpointState`]) and `manifest.json` (sha256 and size of the other three). It is
    /// written as `step-N.tmp/`, each file and the directory fsynced, renamed to `step-N/`, the
    /// root fsynced; then `LATEST` is replaced the same way (`LATEST.tmp`, fsync, rename,
    /// fsync). `LATEST` is the commit point: a crash leaves the previous checkpoint or this one
    /// named there, never a half-written one.
    ///
    /// A checkpoint of the same step already there (a resumed run re-reaching it) is replaced:
    /// the old one is renamed aside, the new one renamed in, the old one removed. Then only the
    /// newest `keep` (≥ 1) checkpoints are kept: the new one always, and checkpoints of later
    /// steps are removed (they belong to a run abandoned by resuming from an earlier one, and a
    /// fallback must not jump to them); stale `step-*.tmp` and `step-*.old` directories go too.
    /// An error from this clean-up comes after `LATEST` was committed.
    ///
    /// Returns the checkpoint directory.
    pub fn save_checkpoint(
        &self,
        root: &Path,
        step: u64,
        extra: &serde_json::Value,
        keep: usize,
    ) -> Result<PathBuf> {
        if keep == 0 {
            return Err(LearnerError::InvalidConfig(
                "a checkpoint root must keep at least one checkpoint (keep = 0)".into(),
            ));
        }
        fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let name = step_dir_name(step);
        let tmp = root.join(format!("{name}.tmp"));
        let dir = root.join(&name);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
        }
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;

        let model: HashMap<String, Tensor> = self.model().named_parameters().into_iter().collect();
        save_tensors(&model, &tmp.join(MODEL_FILE))?;
        let moments: HashMap<String, Tensor> =
            self.optimizer().state_tensors().into_iter().collect();
        save_tensors(&moments, &tmp.join(OPTIMIZER_FILE))?;
        let state = CheckpointState {
            step,
            version: self.version(),
            optimizer_step_t: self.optimizer().step_count(),
            nonfinite_total: self.nonfinite_steps(),
            extra: extra.clone(),
        };
        write_synced(&tmp.join(STATE_FILE), &to_json(&state, &tmp)?)?;
        let mut files = BTreeMap::new();
        for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            let (sha256, bytes) = hash_file(&tmp.join(file))?;
            files.insert(file.to_string(), FileEntry { sha256, bytes });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            files,
        };
        write_synced(&tmp.join(MANIFEST_FILE), &to_json(&manifest, &tmp)?)?;
        fsync_dir(&tmp)?;

        if dir.exists() {
            // A resumed run re-reached this step: move the old one aside first (a directory
            // cannot be renamed over a non-empty one). A crash in between leaves `step-N.old`,
            // which the fallback of `scan_checkpoints` still accepts.
            let old = root.join(format!("{name}.old"));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
            }
            fs::rename(&dir, &old).map_err(io_err("renaming aside", &dir))?;
            fs::rename(&tmp, &dir).map_err(io_err("renaming", &tmp))?;
            fsync_dir(root)?;
            fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
        } else {
            fs::rename(&tmp, &dir).map_err(io_err("renaming", &tmp))?;
            fsync_dir(root)?;
        }

        let latest_tmp = root.join(format!("{LATEST_FILE}.tmp"));
        write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
        let latest = root.join(LATEST_FILE);
        fs::rename(&latest_tmp, &latest).map_err(io_err("renaming", &latest_tmp))?;
        fsync_dir(root)?;

        prune(root, step, keep)?;
        Ok(dir)
    }

    /// Restores a checkpoint directory written by [`Learner::save_checkpoint`]: verifies its
    /// manifest, checks every tensor's name, shape and dtype against the model and the
    /// optimizer, then sets the parameters, the moments, the optimizer's step count, the policy
    /// version and the non-finite count. On any error the learner is left unchanged.
    ///
    /// Returns the saved state (its `extra` is the caller's).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<CheckpointState> {
        let state = verify(dir)?;
        let device = self.model().device().clone();
        let model_file = dir.join(MODEL_FILE);
        let tensors = load_tensors(&model_file, &device)?;
        let bad = |reason: String| LearnerError::Checkpoint {
            path: model_file.clone(),
            reason,
        };
        let vars = self.model().vars();
        let mut values = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "tensor {name} has shape {:?}, the model has {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            if t.dtype() != var.dtype() {
                return Err(bad(format!(
                    "tensor {name} has dtype {:?}, the model has {:?}",
                    t.dtype(),
                    var.dtype()
                )));
            }
            values.push(t);
        }
        if tensors.len() != vars.len() {
            let mut extra: Vec<&str> = tensors
                .keys()
                .filter(|k| !vars.iter().any(|(n, _)| n == *k))
                .map(String::as_str)
                .collect();
            extra.sort_unstable();
            return Err(bad(format!(
                "unexpected tensors {extra:?} (the model has {} parameters)",
                vars.len()
            )));
        }

        let opt_file = dir.join(OPTIMIZER_FILE);
        let moments = load_tensors(&opt_file, &device)?;
        // Checks everything before changing anything, so it goes before the parameters.
        self.optimizer_mut()
            .load_state(state.optimizer_step_t, &moments)
            .map_err(|e| LearnerError::Checkpoint {
                path: opt_file.clone(),
                reason: e.to_string(),
            })?;
        for ((_, var), t) in self.model().vars().iter().zip(values) {
            var.set(t)?;
        }
        self.restore_counters(state.version, state.nonfinite_total);
        Ok(state)
    }
}

/// Checks that `dir` is a complete checkpoint: its manifest lists the model, optimizer and
/// state files with the sizes and sha256 they have, and `state.json` parses.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    verify(dir).map(|_| ())
}

/// The checkpoint to resume from under `root` (see [`scan_checkpoints`]); `Ok(None)` when there
/// is none (or no `root`).
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(scan_checkpoints(root)?.latest)
}

/// Finds the checkpoint to resume from: the directory `root/LATEST` names if it verifies
/// ([`verify_checkpoint`]); otherwise the newest `step-N/` that does (a `step-N.old/` left by
/// a crash while replacing `step-N/` counts, after a `step-N/`). `step-N.tmp/` directories are
/// never used. Every refused candidate is listed with the reason.
///
/// Errors only when `root` exists but cannot be listed.
pub fn scan_checkpoints(root: &Path) -> Result<CheckpointScan> {
    let mut scan = CheckpointScan::default();
    if !root.exists() {
        return Ok(scan);
    }
    let latest_file = root.join(LATEST_FILE);
    let mut named = None;
    match fs::read_to_string(&latest_file) {
        Ok(text) => {
            let name = text.trim();
            if matches!(parse_step_dir(name), Some((_, false))) {
                let dir = root.join(name);
                match verify(&dir) {
                    Ok(_) => {
                        scan.latest = Some(dir);
                        return Ok(scan);
                    }
                    Err(e) => {
                        scan.skipped.push((dir.clone(), e));
                        named = Some(dir);
                    }
                }
            } else {
                scan.skipped.push((
                    latest_file.clone(),
                    LearnerError::Checkpoint {
                        path: latest_file.clone(),
                        reason: format!("names {name:?}, not a checkpoint directory"),
                    },
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => scan
            .skipped
            .push((latest_file.clone(), io_err("reading", &latest_file)(e))),
    }
    let mut candidates = list_step_dirs(root)?;
    // Newest step first; at equal steps `step-N` before `step-N.old`.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, _, dir) in candidates {
        if named.as_ref() == Some(&dir) {
            continue;
        }
        match verify(&dir) {
            Ok(_) => {
                scan.latest = Some(dir);
                return Ok(scan);
            }
            Err(e) => scan.skipped.push((dir, e)),
        }
    }
    Ok(scan)
}

/// `step-00000042`.
fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// `step-N` → (N, false), `step-N.old` → (N, true); anything else (`step-N.tmp`) → None.
fn parse_step_dir(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix("step-")?;
    let (digits, old) = match rest.strip_suffix(".old") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, old))
}

/// Every `step-N` and `step-N.old` directory in `root`: (N, is_old, path).
fn list_step_dirs(root: &Path) -> Result<Vec<(u64, bool, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err("listing", root))? {
        let entry = entry.map_err(io_err("listing", root))?;
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspecting", &entry.path()))?
            .is_dir();
        let name = entry.file_name();
        if let (true, Some((n, old))) = (is_dir, name.to_str().and_then(parse_step_dir)) {
            out.push((n, old, entry.path()));
        }
    }
    Ok(out)
}

/// Removes checkpoints of steps after `current`, all but the newest `keep` (the one of
/// `current` among them), and stale `step-*.tmp` / `step-*.old` directories.
fn prune(root: &Path, current: u64, keep: usize) -> Result<()> {
    let mut doomed = Vec::new();
    let mut complete = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err("listing", root))? {
        let entry = entry.map_err(io_err("listing", root))?;
        let path = entry.path();
        if !entry
            .file_type()
            .map_err(io_err("inspecting", &path))?
            .is_dir()
        {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(".tmp") {
            if stem.starts_with("step-") {
                doomed.push(path);
            }
            continue;
        }
        match parse_step_dir(&name) {
            Some((_, true)) => doomed.push(path),
            Some((n, false)) if n > current => doomed.push(path),
            Some((n, false)) => complete.push((n, path)),
            None => {}
        }
    }
    complete.sort_by_key(|c| std::cmp::Reverse(c.0));
    doomed.extend(complete.into_iter().skip(keep).map(|(_, p)| p));
    if doomed.is_empty() {
        return Ok(());
    }
    for path in &doomed {
        fs::remove_dir_all(path).map_err(io_err("removing", path))?;
    }
    fsync_dir(root)
}

/// Verifies the manifest of `dir` and returns its parsed state.
fn verify(dir: &Path) -> Result<CheckpointState> {
    let bad = |path: &Path, reason: String| LearnerError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    if !dir.is_dir() {
        return Err(bad(dir, "not a directory".into()));
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = fs::read(&manifest_path).map_err(io_err("reading", &manifest_path))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| bad(&manifest_path, format!("unreadable manifest: {e}")))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(bad(
            &manifest_path,
            format!(
                "manifest format {} (this build reads {MANIFEST_FORMAT})",
                manifest.format
            ),
        ));
    }
    for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        if !manifest.files.contains_key(file) {
            return Err(bad(
                &manifest_path,
                format!("the manifest does not list {file}"),
            ));
        }
    }
    for (file, entry) in &manifest.files {
        if file.contains(['/', '\\']) || file == ".." {
            return Err(bad(&manifest_path, format!("bad file name {file:?}")));
        }
        let path = dir.join(file);
        let size = fs::metadata(&path)
            .map_err(io_err("inspecting", &path))?
            .len();
        if size != entry.bytes {
            return Err(bad(
                &path,
                format!("{size} bytes, the manifest says {}", entry.bytes),
            ));
        }
        let (sha256, _) = hash_file(&path)?;
        if sha256 != entry.sha256 {
            return Err(bad(
                &path,
                format!("sha256 {sha256}, the manifest says {}", entry.sha256),
            ));
        }
    }
    let state_path = dir.join(STATE_FILE);
    let text = fs::read(&state_path).map_err(io_err("reading", &state_path))?;
    serde_json::from_slice(&text).map_err(|e| bad(&state_path, format!("unreadable state: {e}")))
}

/// Maps an I/O error to [`LearnerError::Io`] on `path`.
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LearnerError {
    let path = path.to_path_buf();
    move |source| LearnerError::Io { op, path, source }
}

/// Pretty JSON of `value` (for a file in `dir`).
fn to_json<T: Serialize>(value: &T, dir: &Path) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| LearnerError::Checkpoint {
        path: dir.to_path_buf(),
        reason: format!("cannot serialise: {e}"),
    })
}

/// Writes `bytes` to a new file at `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err("creating", path))?;
    f.write_all(bytes).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

/// Saves tensors as safetensors at `path` and fsyncs the file.
fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| LearnerError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot write tensors: {e}"),
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", path))
}

/// Loads a safetensors file onto `device`.
fn load_tensors(path: &Path, device: &candle_core::Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| LearnerError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot read tensors: {e}"),
    })
}

/// Fsyncs a directory, so the entries created or renamed in it are durable.
fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// The sha256 (hex) and byte size of a file, read in a stream.
fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut f, &mut hasher).map_err(io_err("reading", path))?;
    Ok((hex::encode(hasher.finalize()), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_directory_names_parse() {
        assert_eq!(step_dir_name(42), "step-00000042");
        assert_eq!(parse_step_dir("step-00000042"), Some((42, false)));
        assert_eq!(parse_step_dir("step-123456789"), Some((123_456_789, false)));
        assert_eq!(parse_step_dir("step-00000042.old"), Some((42, true)));
        for bad in [
            "step-00000042.tmp",
            "step-",
            "step-4a",
            "LATEST",
            "step--1",
            "xstep-1",
        ] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
    }
}
