//! LoRA runs as real processes on the real SmolLM2 weights (tiny batches): the rollout server
//! samples from the adapters the learner published (the weight probe of every version
//! matches), a lost publication stops the server instead of a stale rollout, a resumed run
//! equals an uninterrupted one, and the run exports a PEFT adapter beside the merged model.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use model::candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const LORA: &[&str] = &["--lora-rank", "8"];

/// Every probe comparison of a run's learner metrics: (version, learner log-prob, max diff).
fn probes(metrics: &Path) -> Vec<(u64, f64, f64)> {
    let mut out = Vec::new();
    for l in step_lines(metrics) {
        for p in l["probes"].as_array().unwrap() {
            out.push((
                p["version"].as_u64().unwrap(),
                p["learner_logprob"].as_f64().unwrap(),
                p["max_abs_diff"].as_f64().unwrap(),
            ));
        }
    }
    out.sort_by_key(|p| p.0);
    out
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The exported adapter directory: PEFT's file names, configuration and keys, one A and one B
/// per module of every layer; and the merged `model/` is the base plus B·A·alpha/r.
fn check_export(out: &Path, rank: usize, alpha: f64) {
    let adapter = out.join("adapter");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA", "{cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    assert_eq!(cfg["r"], rank as u64, "{cfg}");
    assert_eq!(cfg["lora_alpha"].as_f64().unwrap(), alpha, "{cfg}");
    let modules = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    assert_eq!(cfg["target_modules"], serde_json::json!(modules), "{cfg}");
    let tensors = model::candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let base = model::load_model(
        &protocol::assets::cached_default_model().unwrap(),
        &model::LoadOptions::default(),
    )
    .unwrap();
    let params: HashMap<String, Tensor> = base.decoder.named_parameters().into_iter().collect();
    let layers = base.decoder.config().num_layers;
    assert_eq!(tensors.len(), 2 * modules.len() * layers);
    for l in 0..layers {
        for m in modules {
            let path = if matches!(m, "gate_proj" | "up_proj" | "down_proj") {
                format!("model.layers.{l}.mlp.{m}")
            } else {
                format!("model.layers.{l}.self_attn.{m}")
            };
            let w = &params[&format!("{path}.weight")];
            let (o, i) = w.dims2().unwrap();
            let a = &tensors[&format!("base_model.model.{path}.lora_A.weight")];
            let b = &tensors[&format!("base_model.model.{path}.lora_B.weight")];
            assert_eq!(a.dims(), [rank, i], "{path}");
            assert_eq!(b.dims(), [o, rank], "{path}");
        }
    }
    // The merged model: W + B·A·alpha/r for an adapted module, the base elsewhere.
    let merged = model::load_model(&out.join("model"), &model::LoadOptions::default()).unwrap();
    let merged: HashMap<String, Tensor> = merged.decoder.named_parameters().into_iter().collect();
    for path in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.29.mlp.down_proj",
    ] {
        let a = &tensors[&format!("base_model.model.{path}.lora_A.weight")];
        let b = &tensors[&format!("base_model.model.{path}.lora_B.weight")];
        let delta = (b.matmul(a).unwrap() * (alpha / rank as f64)).unwrap();
        assert!(
            delta
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{path}: the adapter never moved"
        );
        let want = (&params[&format!("{path}.weight")] + delta).unwrap();
        let d = max_abs_diff(&merged[&format!("{path}.weight")], &want);
        assert!(d < 1e-6, "{path}: merged differs from base + B·A by {d}");
    }
    let norm = "model.layers.3.input_layernorm.weight";
    assert_eq!(max_abs_diff(&merged[norm], &params[norm]), 0.0);
}

#[test]
fn the_server_samples_from_the_published_adapters_and_the_run_exports_them() {
    // After every publication the rollout server sets the adapters into its own base and scores
    // the probe with the behavior it samples from; the learner compares with its own of the
    // same version. The updates move the probe far beyond the tolerance, so a behavior left on
    // older adapters would be caught. The 8-bit behavior keeps its base quantized once and the
    // adapters f32 and shared, and follows them the same way.
    let dir = tempfile::tempdir().unwrap();
    for (mode, weights) in [("async", "f32"), ("sync", "q8_0")] {
        let out = dir.path().join(format!("{mode}-{weights}"));
        let o = train_cmd(&out, mode, "3", "11", ("4", "4", "32"), LORA)
            .args([
                "--temperature",
                "0.7",
                "--lr",
                "1e-3",
                "--checkpoint-every",
                "3",
            ])
            .args(["--behavior-weights", weights])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{mode}: {stderr}");
        let probes = probes(&out.join("metrics.jsonl"));
        let steps = step_lines(&out.join("metrics.jsonl"));
        let last = steps.last().unwrap()["version"].as_u64().unwrap();
        assert!(
            last >= 2,
            "{mode}: only {last} updates; the check would be weak"
        );
        // Every version the server sampled a trained batch with was checked.
        let trained: Vec<u64> = steps
            .iter()
            .map(|l| l["batch_id"].as_u64().unwrap())
            .collect();
        let sampled: Vec<u64> = step_lines(&out.join("rollout-server/metrics.jsonl"))
            .iter()
            .filter(|b| trained.contains(&b["batch_id"].as_u64().unwrap()))
            .map(|b| b["policy_version"].as_u64().unwrap())
            .collect();
        assert!(sampled.len() >= 3, "{mode}: {sampled:?}");
        for v in &sampled {
            assert!(
                probes.iter().any(|p| p.0 == *v),
                "{mode}: version {v} unchecked: {probes:?}"
            );
        }
        for (v, lp, diff) in &probes {
            assert!(lp.is_finite(), "{mode}: version {v}");
            assert!(
                *diff <= 1e-3,
                "{mode}: version {v}: probe differs by {diff}"
            );
        }
        let first = probes.first().unwrap().1;
        let moved = probes
            .iter()
            .map(|p| (p.1 - first).abs())
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-2,
            "{mode}: the updates moved the probe by only {moved}: {probes:?}"
        );
        assert!(!stderr.contains("does not match"), "{mode}: {stderr}");
        // The checkpoint holds the adapters and their moments: megabytes, not the model.
        let ckpt = out
            .join("checkpoints")
            .join(latest(&out.join("checkpoints")).unwrap());
        let size = |f: &str| std::fs::metadata(ckpt.join(f)).unwrap().len();
        assert!(
            size("model.safetensors") < 12_000_000,
            "{}",
            size("model.safetensors")
        );
        assert!(size("optimizer.safetensors") < 24_000_000);
        if mode == "async" {
            check_export(&out, 8, 16.0);
        }
    }
}

#[test]
fn a_lost_publication_stops_the_server_naming_the_version() {
    // The learner trains version 1 but (test hook) does not publish it, and reports it trained
    // as usual. The server must not sample on from version 0's adapters: it stops with an
    // error naming the missing version, and generates nothing after the report.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "mode = \"async\"\nsteps = 8\nseed = 11\nmax_staleness = 1\ncheckpoint_every = 0\n\
         save_model = false\nlearner_threads = 1\nserver_threads = 1\n[generator]\n\
         prompts_per_batch = 4\ngroup_size = 4\nmax_new_tokens = 32\ntemperature = 0.7\n\
         [update]\ntemperature = 0.7\n[update.optim]\nlr = 1e-3\n[lora]\nrank = 4\n",
    )
    .unwrap();
    let runtime = dir.path().join("run");
    let (lstate, sstate) = (dir.path().join("learner"), dir.path().join("server"));
    let mut server = Svc::start(SERVER, &cfg, &runtime, &sstate, &[]);
    let _learner = Svc::start(
        LEARNER,
        &cfg,
        &runtime,
        &lstate,
        &["--drop-publication", "1"],
    );
    let status = server.wait(Duration::from_secs(600));
    let log = server.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("reported policy version 1 trained")
            && log.contains("holds policy version 0")
            && log.contains("stale adapters"),
        "{log}"
    );
    // The learner's step that made version 1, on batch b; the server had pushed at most
    // max_staleness = 1 batch beyond b by then, all with version 0, and nothing after.
    let trained = step_lines(&lstate.join("metrics.jsonl"));
    let b = trained
        .iter()
        .find(|l| l["version"] == 1)
        .unwrap_or_else(|| panic!("version 1 never trained: {trained:?}"))["batch_id"]
        .as_u64()
        .unwrap();
    let batches = step_lines(&sstate.join("metrics.jsonl"));
    assert!(!batches.is_empty(), "{log}");
    for batch in &batches {
        assert_eq!(batch["policy_version"], 0, "{batch}");
        assert!(batch["batch_id"].as_u64().unwrap() <= b + 1, "{batch}");
    }
}

#[test]
fn a_resumed_lora_run_equals_an_uninterrupted_one() {
    check_resumed_sync_run_equals_an_uninterrupted_one(LORA);
}

#[test]
fn lora_flags_are_checked_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, want) in [
        (
            &["--lora-rank", "8", "--lora-targets", "q,x"][..],
            "unknown LoRA target `x`",
        ),
        (&["--lora-alpha", "4"][..], "need --lora-rank"),
        (
            &["--lora-rank", "8", "--lora-alpha", "0"][..],
            "LoRA alpha 0",
        ),
        (
            &["--lora-rank", "0", "--lora-targets", "q"][..],
            "rank above 0",
        ),
    ] {
        let o = std::process::Command::new(CLI)
            .args(["train", "--print-config", "--output-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?}");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let o = std::process::Command::new(CLI)
        .args([
            "train",
            "--print-config",
            "--lora-rank",
            "16",
            "--lora-targets",
            "q,v",
        ])
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        toml.contains("[lora]\nrank = 16\nalpha = 32.0\ntargets = [\"q_proj\", \"v_proj\"]"),
        "{toml}"
    );
}
