//! What one learner checkpoint costs on the default model's size: the whole save (tensors
//! written, checksummed, fsynced, committed), a verification (every file read back and
//! checked against the manifest, as a resume does), and the two checksums alone over the
//! checkpoint's files (sha256, the manifest's checksum up to format 1, and CRC-32C, from
//! format 2), read from the page cache. The baseline, measured in the same run: the steps of a
//! format-1 save (each file written by candle's safetensors writer, fsynced, then read back
//! for its sha256), and `dd`'s view of the disk: the same number of bytes written and fsynced.
//!
//! ```text
//! cargo run -p learner --example checkpoint_cost -- [MODEL] [--dir DIR] [--reps N]
//! ```
//!
//! MODEL defaults to the default model in `~/.cache/nested-reft`; with the optimizer's two
//! moments a checkpoint is three times the model's f32 size.
//! DIR (default `target/checkpoint-cost`) should be on the disk the runs use: on a tmpfs an
//! fsync costs nothing.

use candle_core::Tensor;
use learner::{verify_checkpoint, Learner, UpdateConfig};
use model::LoadOptions;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut model_path = None;
    let mut dir = PathBuf::from("target/checkpoint-cost");
    let mut reps = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = PathBuf::from(args.next().ok_or("--dir needs a value")?),
            "--reps" => reps = args.next().ok_or("--reps needs a value")?.parse()?,
            _ => model_path = Some(PathBuf::from(a)),
        }
    }
    let model_path = match model_path {
        Some(p) => p,
        None => PathBuf::from(std::env::var("HOME")?)
            .join(".cache/nested-reft/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    let loaded = model::load_model(
        &model_path,
        &LoadOptions {
            trainable: true,
            ..LoadOptions::default()
        },
    )?;
    // The optimizer holds its moments (zeros until a step) from the start: a checkpoint of it
    // has a real run's size.
    let learner = Learner::new(loaded.decoder, None, UpdateConfig::default())?;
    let params: usize = learner
        .model()
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    println!(
        "model {} ({params} parameters); checkpoints in {}",
        model_path.display(),
        dir.display()
    );

    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let extra = serde_json::json!({ "example": true });
    let mut save = Vec::new();
    let mut verify = Vec::new();
    let mut sha = Vec::new();
    let mut crc = Vec::new();
    let mut old_save = Vec::new();
    let mut raw = Vec::new();
    let mut bytes = 0u64;
    for rep in 0..reps {
        let t = Instant::now();
        let ckpt = learner.save_checkpoint(&dir, rep as u64 + 1, &extra, 1)?;
        save.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        verify_checkpoint(&ckpt)?;
        verify.push(t.elapsed().as_secs_f64());
        let files = checkpoint_files(&ckpt)?;
        let t = Instant::now();
        bytes = 0;
        for f in &files {
            let mut h = Sha256::new();
            bytes += read_through(f, |b| h.update(b))?;
            std::hint::black_box(h.finalize());
        }
        sha.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for f in &files {
            let mut c = 0u32;
            read_through(f, |b| c = crc32c::crc32c_append(c, b))?;
            std::hint::black_box(c);
        }
        crc.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;

        let t = Instant::now();
        format1_save(&learner, &dir.join("format1"))?;
        old_save.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;

        let t = Instant::now();
        write_zeros(&dir, bytes)?;
        raw.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;
    }
    let gb = bytes as f64 / 1e9;
    println!("checkpoint size: {gb:.2} GB in {} files", 3);
    let row = |what: &str, v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        println!(
            "{what:<28} median {:>7.3} s  min {:>7.3} s  ({:.2} GB/s)",
            s[s.len() / 2],
            s[0],
            gb / s[s.len() / 2]
        );
    };
    row("format-1 save (sha256)", &old_save);
    row("save (write+sum+fsync)", &save);
    row("verify (read back + check)", &verify);
    row("sha256 of the files", &sha);
    row("crc32c of the files", &crc);
    row("the bytes alone, fsynced", &raw);
    Ok(())
}

/// The steps of a format-1 save, as it was written: candle's safetensors writer for the
/// tensors, each file fsynced, then each read back for its sha256.
fn format1_save(learner: &Learner, dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    let model: HashMap<String, Tensor> = learner.model().named_parameters().into_iter().collect();
    let moments: HashMap<String, Tensor> =
        learner.optimizer().state_tensors().into_iter().collect();
    let files = [
        dir.join("model.safetensors"),
        dir.join("optimizer.safetensors"),
    ];
    candle_core::safetensors::save(&model, &files[0])?;
    std::fs::File::open(&files[0])?.sync_all()?;
    candle_core::safetensors::save(&moments, &files[1])?;
    std::fs::File::open(&files[1])?.sync_all()?;
    for f in &files {
        let mut h = Sha256::new();
        read_through(f, |b| h.update(b))?;
        std::hint::black_box(h.finalize());
    }
    Ok(())
}

/// `bytes` zeros written to one file in 1 MiB pieces and fsynced: what the disk allows.
fn write_zeros(dir: &Path, bytes: u64) -> Result<(), Error> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::File::create(dir.join("zeros"))?;
    let buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// The checkpoint's data files (the manifest lists them).
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    Ok(["model.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| dir.join(f))
        .collect())
}

/// Feeds a file to `f` in 1 MiB pieces; returns its size.
fn read_through(path: &Path, mut f: impl FnMut(&[u8])) -> Result<u64, Error> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        f(&buf[..n]);
        total += n as u64;
    }
}
