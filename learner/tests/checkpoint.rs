//! Learner checkpoints: the optimizer state round-trips (a resumed learner takes the same next
//! step bit for bit), retention, corrupt and partial checkpoints, shape mismatches, a write
//! that fails at each file (a full disk), and checkpoints of the older sha256 manifest.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Tensor};
use common::tiny_learner;
use learner::{
    latest_checkpoint, scan_checkpoints, verify_checkpoint, Decay, Learner, LearnerError,
    OptimConfig, PreparedBatch, TrainSequence, UpdateConfig, WriteFault, CHECKPOINT_FILES,
};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::Path;

/// A batch of short sequences whose contents depend on `salt`, with behavior log-probs away
/// from the target's so every step moves the weights.
fn batch(salt: usize) -> PreparedBatch {
    let shapes: [(usize, usize); 4] = [(2, 3), (1, 4), (3, 2), (2, 5)];
    let sequences = shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, c))| TrainSequence {
            prompt: (0..p).map(|k| ((i + k + salt) % 11) as u32).collect(),
            completion: (0..c)
                .map(|k| ((3 * i + 2 * k + salt + 1) % 11) as u32)
                .collect(),
            behavior_logprobs: (0..c).map(|k| -2.0 - 0.2 * ((i + k) % 3) as f32).collect(),
            advantage: [1.0, -0.5, 0.8, -1.3][i],
        })
        .collect();
    PreparedBatch {
        sequences,
        ..PreparedBatch::default()
    }
}

/// A schedule (warmup) and weight decay, so the restored version and moments both matter.
fn config() -> UpdateConfig {
    UpdateConfig {
        optim: OptimConfig {
            lr: 1e-2,
            warmup_steps: 4,
            decay: Decay::Cosine,
            total_steps: 10,
            weight_decay: 0.05,
            ..OptimConfig::default()
        },
        ..UpdateConfig::default()
    }
}

/// Every parameter's bits, in order.
fn param_bits(l: &Learner) -> Vec<Vec<u32>> {
    l.model()
        .vars()
        .iter()
        .map(|(_, v)| bits(v.as_tensor()))
        .collect()
}

/// Every moment's bits, in order.
fn moment_bits(l: &Learner) -> Vec<(String, Vec<u32>)> {
    l.optimizer()
        .state_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), bits(t)))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn dir_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "LATEST")
        .collect();
    names.sort();
    names
}

#[test]
fn a_resumed_learner_takes_the_same_next_step() {
    let root = tempfile::tempdir().unwrap();
    let mut a = tiny_learner(11, 2, 4, DType::F32, config());
    a.step_prepared(&batch(0)).unwrap();
    a.step_prepared(&batch(1)).unwrap();
    let extra = serde_json::json!({ "data_cursor": 17, "rng": [1, 2, 3] });
    let dir = a.save_checkpoint(root.path(), 2, &extra, 3).unwrap();
    assert_eq!(dir, root.path().join("step-00000002"));
    verify_checkpoint(&dir).unwrap();

    // Another seed: every value must come from the checkpoint.
    let mut b = tiny_learner(11, 2, 99, DType::F32, config());
    assert_ne!(param_bits(&a), param_bits(&b));
    let state = b.load_checkpoint(&dir).unwrap();
    assert_eq!(state.step, 2);
    assert_eq!(state.version, 2);
    assert_eq!(state.optimizer_step_t, 2);
    assert_eq!(state.extra, extra);
    assert_eq!(b.version(), 2);
    assert_eq!(b.optimizer().step_count(), 2);
    assert_eq!(param_bits(&a), param_bits(&b));
    assert_eq!(moment_bits(&a), moment_bits(&b));

    let sa = a.step_prepared(&batch(2)).unwrap();
    let sb = b.step_prepared(&batch(2)).unwrap();
    assert!(sa.skipped.is_none() && sb.skipped.is_none());
    assert_eq!(
        sa.lr.to_bits(),
        sb.lr.to_bits(),
        "the schedule resumes at version 2"
    );
    assert_eq!(a.version(), 3);
    assert_eq!(
        param_bits(&a),
        param_bits(&b),
        "the next step differs after a resume"
    );
    assert_eq!(moment_bits(&a), moment_bits(&b));
}

/// A learner over the tiny model (base weights from `base_seed`) with LoRA adapters (A drawn
/// from `adapter_seed`).
fn lora_learner(base_seed: u64, adapter_seed: u64, lora: &model::LoraConfig) -> Learner {
    let d = common::tiny(11, 2, base_seed, DType::F32)
        .with_lora(lora, adapter_seed)
        .unwrap();
    Learner::new(d, None, config()).unwrap()
}

#[test]
fn a_lora_checkpoint_holds_the_adapters_and_resumes_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let lora = model::LoraConfig::new(2, 4.0).unwrap();
    let mut a = lora_learner(4, 7, &lora);
    a.step_prepared(&batch(0)).unwrap();
    a.step_prepared(&batch(1)).unwrap();
    let dir = a
        .save_checkpoint(root.path(), 2, &serde_json::Value::Null, 1)
        .unwrap();
    // The model file holds the adapters alone; the optimizer file their moments alone.
    let saved =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    let mut want: Vec<String> = a
        .model()
        .lora_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    want.sort();
    assert_eq!(names, want.iter().collect::<Vec<_>>());
    assert_eq!(names.len(), 2 * 7 * 2);
    let moments = candle_core::safetensors::load(
        dir.join("optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(moments.len(), 2 * names.len());
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["lora"]["rank"], 2, "{state}");

    // The same base, other adapter seeds: every adapter value comes from the checkpoint.
    let mut b = lora_learner(4, 99, &lora);
    assert_ne!(param_bits(&a), param_bits(&b));
    b.load_checkpoint(&dir).unwrap();
    assert_eq!(param_bits(&a), param_bits(&b));
    assert_eq!(moment_bits(&a), moment_bits(&b));
    let sa = a.step_prepared(&batch(2)).unwrap();
    let sb = b.step_prepared(&batch(2)).unwrap();
    assert!(sa.skipped.is_none() && sb.skipped.is_none());
    assert_eq!(
        param_bits(&a),
        param_bits(&b),
        "the next step differs after a resume"
    );
    assert_eq!(moment_bits(&a), moment_bits(&b));
    // The base never moved.
    let base = common::tiny(11, 2, 4, DType::F32);
    for ((name, p), (_, q)) in a
        .model()
        .named_parameters()
        .iter()
        .zip(base.named_parameters())
    {
        assert_eq!(bits(p), bits(&q), "{name} moved");
    }

    // A full fine-tuning learner, or other LoRA settings, refuse the checkpoint by name.
    let mut full = tiny_learner(11, 2, 4, DType::F32, config());
    let err = full.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        err.contains("LoRA rank 2") && err.contains("full fine-tuning"),
        "{err}"
    );
    let mut other = lora_learner(4, 7, &model::LoraConfig::new(4, 4.0).unwrap());
    let err = other.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        err.contains("rank 4") && err.contains("same LoRA settings"),
        "{err}"
    );
    let full_dir = tempfile::tempdir().unwrap();
    let d = full
        .save_checkpoint(full_dir.path(), 1, &serde_json::Value::Null, 1)
        .unwrap();
    let err = b.load_checkpoint(&d).unwrap_err().to_string();
    assert!(err.contains("full fine-tuning"), "{err}");
}

#[test]
fn retention_keeps_the_newest_and_latest_names_the_newest() {
    let root = tempfile::tempdir().unwrap();
    let mut l = tiny_learner(11, 2, 4, DType::F32, config());
    for step in 1..=4u64 {
        l.step_prepared(&batch(step as usize)).unwrap();
        l.save_checkpoint(root.path(), step, &serde_json::Value::Null, 2)
            .unwrap();
    }
    assert_eq!(dir_names(root.path()), ["step-00000003", "step-00000004"]);
    let latest = fs::read_to_string(root.path().join("LATEST")).unwrap();
    assert_eq!(latest.trim(), "step-00000004");
    assert_eq!(
        latest_checkpoint(root.path()).unwrap(),
        Some(root.path().join("step-00000004"))
    );

    // A resumed run re-reaching step 4 replaces it in place.
    l.step_prepared(&batch(9)).unwrap();
    l.save_checkpoint(root.path(), 4, &serde_json::json!("again"), 2)
        .unwrap();
    assert_eq!(dir_names(root.path()), ["step-00000003", "step-00000004"]);
    let mut fresh = tiny_learner(11, 2, 5, DType::F32, config());
    let state = fresh
        .load_checkpoint(&root.path().join("step-00000004"))
        .unwrap();
    assert_eq!(state.extra, serde_json::json!("again"));
    assert_eq!(state.version, 5);
    assert_eq!(param_bits(&fresh), param_bits(&l));

    // Resuming from step 3 and saving it drops the abandoned step 4; keep = 0 is refused.
    l.save_checkpoint(root.path(), 3, &serde_json::Value::Null, 2)
        .unwrap();
    assert_eq!(dir_names(root.path()), ["step-00000003"]);
    assert!(matches!(
        l.save_checkpoint(root.path(), 5, &serde_json::Value::Null, 0),
        Err(LearnerError::InvalidConfig(_))
    ));
}

#[test]
fn corrupt_checkpoints_are_refused_and_the_previous_one_is_used() {
    let root = tempfile::tempdir().unwrap();
    assert_eq!(
        latest_checkpoint(&root.path().join("absent")).unwrap(),
        None
    );
    assert_eq!(latest_checkpoint(root.path()).unwrap(), None);

    let mut l = tiny_learner(11, 2, 4, DType::F32, config());
    for step in 1..=3u64 {
        l.step_prepared(&batch(step as usize)).unwrap();
        l.save_checkpoint(root.path(), step, &serde_json::Value::Null, 5)
            .unwrap();
    }
    let step = |n: u64| root.path().join(format!("step-{n:08}"));

    // Step 3: truncated model file. Step 2: one flipped byte, size unchanged.
    let model3 = step(3).join("model.safetensors");
    let bytes = fs::read(&model3).unwrap();
    fs::write(&model3, &bytes[..bytes.len() / 2]).unwrap();
    let model2 = step(2).join("model.safetensors");
    let mut bytes = fs::read(&model2).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&model2, &bytes).unwrap();
    // A leftover of a save that crashed: complete-looking, but never committed.
    let leftover = root.path().join("step-00000004.tmp");
    fs::create_dir(&leftover).unwrap();
    for entry in fs::read_dir(step(1)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), leftover.join(entry.file_name())).unwrap();
    }

    let scan = scan_checkpoints(root.path()).unwrap();
    assert_eq!(scan.latest, Some(step(1)));
    let reasons: Vec<String> = scan.skipped.iter().map(|(_, e)| e.to_string()).collect();
    assert_eq!(scan.skipped.len(), 2, "{reasons:?}");
    assert_eq!(scan.skipped[0].0, step(3), "LATEST is tried first");
    assert!(reasons[0].contains("model.safetensors") && reasons[0].contains("bytes"));
    assert_eq!(scan.skipped[1].0, step(2));
    assert!(reasons[1].contains("crc32c"), "{}", reasons[1]);
    assert_eq!(latest_checkpoint(root.path()).unwrap(), Some(step(1)));

    let before = param_bits(&l);
    let err = l.load_checkpoint(&step(3)).unwrap_err();
    assert!(matches!(err, LearnerError::Checkpoint { .. }), "{err}");
    assert_eq!(param_bits(&l), before, "a refused load changes nothing");

    // Without LATEST the newest complete one is found as well; a LATEST naming nonsense too.
    fs::remove_file(root.path().join("LATEST")).unwrap();
    assert_eq!(latest_checkpoint(root.path()).unwrap(), Some(step(1)));
    fs::write(root.path().join("LATEST"), "../elsewhere\n").unwrap();
    assert_eq!(latest_checkpoint(root.path()).unwrap(), Some(step(1)));

    // A broken manifest.
    fs::write(step(1).join("manifest.json"), b"{").unwrap();
    assert!(verify_checkpoint(&step(1)).is_err());
    assert_eq!(latest_checkpoint(root.path()).unwrap(), None);
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_naming_the_tensor() {
    let root = tempfile::tempdir().unwrap();
    let mut small = tiny_learner(11, 2, 4, DType::F32, config());
    small.step_prepared(&batch(0)).unwrap();
    let dir = small
        .save_checkpoint(root.path(), 1, &serde_json::Value::Null, 1)
        .unwrap();

    // Another vocabulary: the embedding has another shape.
    let mut wide = tiny_learner(13, 2, 4, DType::F32, config());
    let differing: Vec<String> = small
        .model()
        .vars()
        .iter()
        .zip(wide.model().vars())
        .filter(|((_, a), (_, b))| a.dims() != b.dims())
        .map(|((n, _), _)| n.clone())
        .collect();
    assert!(!differing.is_empty());
    let before = param_bits(&wide);
    let err = wide.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        err.contains(&differing[0]) && err.contains("shape"),
        "{err} (expected to name {})",
        differing[0]
    );
    assert_eq!(param_bits(&wide), before);
    assert_eq!(wide.version(), 0);

    // Another depth: the checkpoint lacks a layer the model has.
    let mut deep = tiny_learner(11, 3, 4, DType::F32, config());
    let err = deep.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(err.contains("layers.2") && err.contains("missing"), "{err}");
    // And the other way round: tensors the model does not have.
    let dir3 = deep
        .save_checkpoint(&root.path().join("deep"), 1, &serde_json::Value::Null, 1)
        .unwrap();
    let err = small.load_checkpoint(&dir3).unwrap_err().to_string();
    assert!(
        err.contains("layers.2") && err.contains("unexpected"),
        "{err}"
    );
}

/// Every entry of `root`, `LATEST` included, sorted.
fn all_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_write_that_fails_at_any_file_leaves_no_trace_and_latest_unchanged() {
    let mut l = tiny_learner(11, 2, 4, DType::F32, config());
    l.step_prepared(&batch(0)).unwrap();
    assert_eq!(CHECKPOINT_FILES.len(), 5);
    for (k, file) in CHECKPOINT_FILES.iter().enumerate() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        l.save_checkpoint(root, 1, &serde_json::Value::Null, 2)
            .unwrap();
        let before = all_names(root);
        assert_eq!(before, ["LATEST", "step-00000001"]);

        let fault = Some(WriteFault { after_files: k });
        let err = l
            .save_checkpoint_with(root, 2, &serde_json::Value::Null, 2, fault)
            .unwrap_err();
        // The error names the file and the OS error.
        match &err {
            LearnerError::Io { op, path, source } => {
                assert_eq!(*op, "writing", "file {k}: {err}");
                assert_eq!(
                    path.file_name().unwrap().to_str().unwrap(),
                    *file,
                    "file {k}: {err}"
                );
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "file {k}: {err}");
            }
            other => panic!("file {k}: expected an I/O error, got {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(file) && text.contains("No space left on device"),
            "{text}"
        );
        // No step-2.tmp, no LATEST.tmp, no step-2; LATEST still names step 1, which loads.
        assert_eq!(all_names(root), before, "file {k}");
        assert_eq!(
            fs::read_to_string(root.join("LATEST")).unwrap().trim(),
            "step-00000001"
        );
        assert_eq!(
            latest_checkpoint(root).unwrap(),
            Some(root.join("step-00000001"))
        );

        // A failure while replacing a checkpoint of the same step leaves the old one.
        let err = l.save_checkpoint_with(root, 1, &serde_json::json!("new"), 2, fault);
        assert!(err.is_err(), "file {k}");
        assert_eq!(all_names(root), before, "file {k}");
        let mut fresh = tiny_learner(11, 2, 5, DType::F32, config());
        let state = fresh.load_checkpoint(&root.join("step-00000001")).unwrap();
        assert_eq!(state.extra, serde_json::Value::Null);
        assert_eq!(param_bits(&fresh), param_bits(&l));

        // The next try (the disk has room again) succeeds.
        l.save_checkpoint(root, 2, &serde_json::Value::Null, 2)
            .unwrap();
        assert_eq!(
            all_names(root),
            ["LATEST", "step-00000001", "step-00000002"]
        );
        assert_eq!(
            latest_checkpoint(root).unwrap(),
            Some(root.join("step-00000002"))
        );
    }

    // A fault past the last file injects nothing.
    let root = tempfile::tempdir().unwrap();
    let fault = Some(WriteFault {
        after_files: CHECKPOINT_FILES.len(),
    });
    l.save_checkpoint_with(root.path(), 3, &serde_json::Value::Null, 1, fault)
        .unwrap();
    verify_checkpoint(&root.path().join("step-00000003")).unwrap();
}

#[test]
fn checkpoints_with_a_sha256_manifest_still_load() {
    let root = tempfile::tempdir().unwrap();
    let mut a = tiny_learner(11, 2, 4, DType::F32, config());
    a.step_prepared(&batch(0)).unwrap();
    let dir = a
        .save_checkpoint(root.path(), 1, &serde_json::json!({ "k": 1 }), 1)
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], 2);
    let files = manifest["files"].as_object().unwrap();
    assert_eq!(files.len(), 3);
    for (name, entry) in files {
        // The manifest's CRC-32C is the file's, in 8 hex digits.
        let bytes = fs::read(dir.join(name)).unwrap();
        assert_eq!(
            entry["crc32c"].as_str().unwrap(),
            format!("{:08x}", crc32c::crc32c(&bytes))
        );
        assert_eq!(entry["bytes"].as_u64().unwrap(), bytes.len() as u64);
    }

    // The manifest as format 1 wrote it: a sha256 per file.
    let old: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(name, entry)| {
            let bytes = fs::read(dir.join(name)).unwrap();
            let sha = Sha256::digest(&bytes);
            let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
            (
                name.clone(),
                serde_json::json!({ "sha256": hex, "bytes": entry["bytes"] }),
            )
        })
        .collect();
    let v1 = serde_json::json!({ "format": 1, "files": old });
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&v1).unwrap(),
    )
    .unwrap();
    verify_checkpoint(&dir).unwrap();
    let mut b = tiny_learner(11, 2, 99, DType::F32, config());
    let state = b.load_checkpoint(&dir).unwrap();
    assert_eq!(state.extra, serde_json::json!({ "k": 1 }));
    assert_eq!(param_bits(&a), param_bits(&b));
    assert_eq!(moment_bits(&a), moment_bits(&b));

    // A flipped byte is caught by the sha256 of a format-1 manifest too.
    let model = dir.join("model.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&model, &bytes).unwrap();
    let err = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        err.contains("sha256") && err.contains("model.safetensors"),
        "{err}"
    );

    // An unknown format is refused, naming it.
    let v9 = serde_json::json!({ "format": 9, "files": files });
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&v9).unwrap()).unwrap();
    let err = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(err.contains("manifest format 9"), "{err}");
}
