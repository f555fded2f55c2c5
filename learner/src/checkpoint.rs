//! Atomic learner checkpoints.
//!
//! A checkpoint is a directory `root/step-NNNNNNNN/` holding
//!
//! - `model.safetensors`: the model's trainable parameters (every parameter in full
//!   fine-tuning; the LoRA adapters alone when the model has them: the frozen base is the
//!   model the run started from, and is not copied);
//! - `optimizer.safetensors`: the AdamW moments (`m.<param>`, `v.<param>`);
//! - `state.json`: a [`CheckpointState`] (counters and the caller's `extra`: RNG streams, data
//!   and ring cursors, the validated configuration…);
//! - `manifest.json`: the CRC-32C and byte size of each of the three files above (manifest
//!   format 2; format 1, still read, had their sha256).
//!
//! It is written as `step-N.tmp/` (each file's CRC-32C computed as it is written, every file
//! and the directory fsynced), then `LATEST.tmp` naming it (fsynced); only then is `step-N.tmp/`
//! renamed to `step-N/`, the root fsynced, `LATEST.tmp` renamed to `LATEST` and the root fsynced
//! again. `LATEST` is the commit point: a crash anywhere leaves either the previous checkpoint
//! named there or the new one, never a half-written one. Every byte is written before the first
//! rename, so a write that fails (a full disk) fails before anything is committed: the
//! temporary directory and `LATEST.tmp` are removed and `LATEST` still names the previous
//! checkpoint. Reading ([`latest_checkpoint`]) verifies the manifest and falls back to the
//! newest complete checkpoint when `LATEST` is missing or names a broken one.
//!
//! The checksum is there to catch a torn or corrupted file (a crash, a bad disk, a truncated
//! copy), not tampering: CRC-32C detects every burst error up to 32 bits and any other
//! corruption but for a 2⁻³² chance, and runs at memory speed: computed while writing it costs
//! nothing, and a verification reads 1.6 GB in about 0.2 s where sha256 took 1.5 s (see
//! `examples/checkpoint_cost.rs`).

use crate::error::{LearnerError, Result};
use crate::update::Learner;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
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

/// The manifest layout this code writes: a CRC-32C per file.
const MANIFEST_FORMAT: u32 = 2;
/// The older layout, still read: a sha256 per file.
const MANIFEST_FORMAT_SHA256: u32 = 1;

/// The files a checkpoint writes, in the order written: the three data files, the manifest,
/// and `LATEST`'s temporary file. [`WriteFault::after_files`] counts in this order.
pub const CHECKPOINT_FILES: [&str; 5] = [
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    MANIFEST_FILE,
    "LATEST.tmp",
];

/// A write failure to inject into [`Learner::save_checkpoint_with`]: tests of what a full disk
/// does to a checkpoint and its caller, without filling a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFault {
    /// Files written in full before the failing one ([`CHECKPOINT_FILES`] order). The failing
    /// file takes half of its first write, then every write fails with `ENOSPC`, as on a disk
    /// that fills up. At or beyond the number of files nothing fails.
    pub after_files: usize,
}

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
    /// The adapters' configuration when the model trains LoRA adapters (`model.safetensors`
    /// then holds them alone); absent for full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<model::LoraConfig>,
}

/// One file of the manifest: its size and its checksum (CRC-32C in format 2, sha256 in
/// format 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileEntry {
    /// CRC-32C (Castagnoli) of the file, 8 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32c: Option<String>,
    /// sha256 of the file, hex (format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
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
    /// [`CheckpointState`]) and `manifest.json` (CRC-32C and size of the other three, computed
    /// while writing). It is written as `step-N.tmp/`, each file and the directory fsynced, and
    /// `LATEST.tmp` naming it is written and fsynced; then `step-N.tmp/` is renamed to
    /// `step-N/`, the root fsynced, `LATEST.tmp` renamed to `LATEST` and the root fsynced.
    /// `LATEST` is the commit point: a crash leaves the previous checkpoint or this one named
    /// there, never a half-written one.
    ///
    /// On an error (a full disk: the error names the file and the OS error) `step-N.tmp/` and
    /// `LATEST.tmp` are removed and `LATEST` is left as it was, naming the previous checkpoint.
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
        self.save_checkpoint_with(root, step, extra, keep, None)
    }

    /// [`Learner::save_checkpoint`] with a write failure injected (none with `None`).
    pub fn save_checkpoint_with(
        &self,
        root: &Path,
        step: u64,
        extra: &serde_json::Value,
        keep: usize,
        fault: Option<WriteFault>,
    ) -> Result<PathBuf> {
        if keep == 0 {
            return Err(LearnerError::InvalidConfig(
                "a checkpoint root must keep at least one checkpoint (keep = 0)".into(),
            ));
        }
        fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let name = step_dir_name(step);
        let tmp = root.join(format!("{name}.tmp"));
        let latest_tmp = root.join(format!("{LATEST_FILE}.tmp"));
        let mut files = Files { written: 0, fault };
        let result = self
            .write_checkpoint(&tmp, &latest_tmp, &name, step, extra, &mut files)
            .and_then(|()| commit(root, &name, &tmp, &latest_tmp));
        if let Err(e) = result {
            // Nothing was committed: what this attempt wrote goes (best effort: the error
            // that stopped it is the one to report, and a leftover `step-N.tmp` is never
            // loaded and is removed by the next checkpoint).
            let _ = fs::remove_dir_all(&tmp);
            let _ = fs::remove_file(&latest_tmp);
            return Err(e);
        }
        prune(root, step, keep)?;
        Ok(root.join(&name))
    }

    /// Writes the checkpoint's files into `tmp` (created afresh) and `LATEST.tmp`, all fsynced.
    fn write_checkpoint(
        &self,
        tmp: &Path,
        latest_tmp: &Path,
        name: &str,
        step: u64,
        extra: &serde_json::Value,
        files: &mut Files,
    ) -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(io_err("removing", tmp))?;
        }
        fs::create_dir(tmp).map_err(io_err("creating", tmp))?;
        let mut entries = BTreeMap::new();
        let model: Vec<(String, Tensor)> = self
            .model()
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        entries.insert(
            MODEL_FILE.to_string(),
            files.write(&tmp.join(MODEL_FILE), |w| write_safetensors(model, w))?,
        );
        let moments = self.optimizer().state_tensors();
        entries.insert(
            OPTIMIZER_FILE.to_string(),
            files.write(&tmp.join(OPTIMIZER_FILE), |w| write_safetensors(moments, w))?,
        );
        let state = CheckpointState {
            step,
            version: self.version(),
            optimizer_step_t: self.optimizer().step_count(),
            nonfinite_total: self.nonfinite_steps(),
            extra: extra.clone(),
            lora: self.model().lora().cloned(),
        };
        let json = to_json(&state, tmp)?;
        entries.insert(
            STATE_FILE.to_string(),
            files.write(&tmp.join(STATE_FILE), |w| w.write_all(&json))?,
        );
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            files: entries,
        };
        let json = to_json(&manifest, tmp)?;
        files.write(&tmp.join(MANIFEST_FILE), |w| w.write_all(&json))?;
        fsync_dir(tmp)?;
        files.write(latest_tmp, |w| w.write_all(format!("{name}\n").as_bytes()))?;
        Ok(())
    }

    /// Restores a checkpoint directory written by [`Learner::save_checkpoint`]: verifies its
    /// manifest, checks every tensor's name, shape and dtype against the model and the
    /// optimizer, then sets the parameters, the moments, the optimizer's step count, the policy
    /// version and the non-finite count. On any error the learner is left unchanged.
    ///
    /// Returns the saved state (its `extra` is the caller's).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<CheckpointState> {
        let state = verify(dir)?;
        if state.lora.as_ref() != self.model().lora() {
            let describe = |l: Option<&model::LoraConfig>| {
                l.map_or("full fine-tuning".into(), model::LoraConfig::to_string)
            };
            return Err(LearnerError::Checkpoint {
                path: dir.join(STATE_FILE),
                reason: format!(
                    "it was written by {}, this run is {}: resume with the same LoRA settings",
                    describe(state.lora.as_ref()),
                    describe(self.model().lora())
                ),
            });
        }
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

/// Renames `tmp` to `root/name` (moving an existing one of the same step aside first) and
/// `latest_tmp` to `LATEST`, fsyncing the root after each.
fn commit(root: &Path, name: &str, tmp: &Path, latest_tmp: &Path) -> Result<()> {
    let dir = root.join(name);
    if dir.exists() {
        // A resumed run re-reached this step: move the old one aside first (a directory
        // cannot be renamed over a non-empty one). A crash in between leaves `step-N.old`,
        // which the fallback of `scan_checkpoints` still accepts.
        let old = root.join(format!("{name}.old"));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
        }
        fs::rename(&dir, &old).map_err(io_err("renaming aside", &dir))?;
        if let Err(e) = fs::rename(tmp, &dir) {
            // Put the old one back, so a failure leaves the root as it was.
            let _ = fs::rename(&old, &dir);
            return Err(io_err("renaming", tmp)(e));
        }
        fsync_dir(root)?;
        fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
    } else {
        fs::rename(tmp, &dir).map_err(io_err("renaming", tmp))?;
        fsync_dir(root)?;
    }
    let latest = root.join(LATEST_FILE);
    fs::rename(latest_tmp, &latest).map_err(io_err("renaming", latest_tmp))?;
    fsync_dir(root)
}

/// Writes a checkpoint's files one after another, each through a [`CrcFile`], counting them
/// for an injected [`WriteFault`].
struct Files {
    written: usize,
    fault: Option<WriteFault>,
}

impl Files {
    /// Creates `path`, lets `fill` write it (buffered), flushes and fsyncs it; returns its
    /// manifest entry. An I/O error names `path`.
    fn write(
        &mut self,
        path: &Path,
        fill: impl FnOnce(&mut BufWriter<CrcFile>) -> io::Result<()>,
    ) -> Result<FileEntry> {
        let file = File::create(path).map_err(io_err("creating", path))?;
        let fail = self.fault.is_some_and(|f| f.after_files == self.written);
        let mut w = BufWriter::with_capacity(
            1 << 20,
            CrcFile {
                file,
                crc: 0,
                bytes: 0,
                fail: fail.then_some(None),
            },
        );
        fill(&mut w).map_err(io_err("writing", path))?;
        let f = w
            .into_inner()
            .map_err(|e| io_err("writing", path)(e.into_error()))?;
        f.file.sync_all().map_err(io_err("syncing", path))?;
        self.written += 1;
        Ok(FileEntry {
            crc32c: Some(format!("{:08x}", f.crc)),
            sha256: None,
            bytes: f.bytes,
        })
    }
}

/// A file being written, with the CRC-32C and the count of the bytes it took.
struct CrcFile {
    file: File,
    crc: u32,
    bytes: u64,
    /// An injected failure: `Some(None)` until the first write, then `Some(Some(limit))`: the
    /// bytes the file takes before every write fails with `ENOSPC`.
    fail: Option<Option<u64>>,
}

impl Write for CrcFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let buf = match &mut self.fail {
            None => buf,
            Some(limit) => {
                let limit = *limit.get_or_insert(self.bytes + buf.len() as u64 / 2);
                let room = usize::try_from(limit.saturating_sub(self.bytes)).unwrap_or(usize::MAX);
                if room == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                &buf[..room.min(buf.len())]
            }
        };
        let n = self.file.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes `tensors` in the safetensors layout: the header length (u64, little endian), the
/// JSON header (name → dtype, shape, byte range) padded with spaces to a multiple of 8, then
/// the data, ordered as the safetensors crate orders it (by decreasing dtype alignment, then
/// name). Streams one tensor at a time: no copy of the whole file in memory.
fn write_safetensors(mut tensors: Vec<(String, Tensor)>, w: &mut impl Write) -> io::Result<()> {
    use safetensors::View;
    tensors.sort_by(|(an, a), (bn, b)| View::dtype(&b).cmp(&View::dtype(&a)).then(an.cmp(bn)));
    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (name, t)) in tensors.iter().enumerate() {
        let n = View::data_len(&t);
        let info = safetensors::tensor::TensorInfo {
            dtype: View::dtype(&t),
            shape: t.dims().to_vec(),
            data_offsets: (offset, offset + n),
        };
        offset += n;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name).map_err(io::Error::other)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(io::Error::other)?);
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for (_, t) in &tensors {
        w.write_all(&View::data(&t))?;
    }
    Ok(())
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
    if manifest.format != MANIFEST_FORMAT && manifest.format != MANIFEST_FORMAT_SHA256 {
        return Err(bad(
            &manifest_path,
            format!(
                "manifest format {} (this build reads {MANIFEST_FORMAT_SHA256} and \
                 {MANIFEST_FORMAT})",
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
        let (kind, expected, actual) = if manifest.format == MANIFEST_FORMAT_SHA256 {
            let expected = entry
                .sha256
                .as_deref()
                .ok_or_else(|| bad(&manifest_path, format!("no sha256 for {file} (format 1)")))?;
            ("sha256", expected, sha256_file(&path)?)
        } else {
            let expected = entry
                .crc32c
                .as_deref()
                .ok_or_else(|| bad(&manifest_path, format!("no crc32c for {file}")))?;
            ("crc32c", expected, format!("{:08x}", crc32c_file(&path)?))
        };
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(bad(
                &path,
                format!("{kind} {actual}, the manifest says {expected}"),
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

/// Feeds a file to `f` in 1 MiB pieces.
fn read_through(path: &Path, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut file = File::open(path).map_err(io_err("opening", path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading", path)(e)),
        };
        f(&buf[..n]);
    }
}

/// The CRC-32C of a file.
fn crc32c_file(path: &Path) -> Result<u32> {
    let mut crc = 0u32;
    read_through(path, |b| crc = crc32c::crc32c_append(crc, b))?;
    Ok(crc)
}

/// The sha256 (hex) of a file (manifest format 1).
fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    read_through(path, |b| hasher.update(b))?;
    Ok(hex::encode(hasher.finalize()))
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
