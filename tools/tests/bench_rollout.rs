//! `nested-reft bench rollout`, run as a user would: the behavior list is checked before any
//! model work, and a tiny run on the real default model writes the table, `rollout.json` and
//! `frontier.svg` with a KL that orders the behaviors as expected.

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(["bench", "rollout"])
        .args(args)
        .output()
        .expect("start nested-reft")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bad_behavior_lists_fail_before_loading_the_model() {
    for (list, needle) in [
        ("random:1.5", "strictly between 0 and 1"),
        ("full@q3", "unknown weight format"),
        ("layers:4,x9", "not a skip unit"),
        ("nested:0.2", "unknown plan `nested`"),
    ] {
        // A model path that does not exist: the list must be refused before it matters.
        let out = run(&["--behaviors", list, "--model", "/nonexistent/model.gguf"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{list} was accepted");
        assert!(err.contains(needle), "{list}: {err}");
        assert!(
            !err.contains("/nonexistent"),
            "{list}: loaded the model first: {err}"
        );
    }
}

#[test]
fn an_asked_for_calibrated_behavior_without_a_profile_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.profile.json");
    let out = run(&[
        "--behaviors",
        "calibrated:0.2",
        "--profile",
        missing.to_str().unwrap(),
        "--no-eval",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nested-reft calibrate"), "{err}");
    assert!(err.contains("missing.profile.json"), "{err}");
}

#[test]
fn a_tiny_run_on_the_default_model_reports_every_behavior() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "--behaviors",
        "full@q8_0,layers:25",
        "--batches",
        "1",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--kl-problems",
        "2",
        "--no-eval",
        "-o",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for needle in [
        "full (baseline)",
        "layers:25",
        "q8_0",
        "tok/s b1",
        "threads",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }

    let r: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("rollout.json")).unwrap()).unwrap();
    assert!(r["threads"].as_u64().unwrap() >= 1);
    assert_eq!(r["new_tokens"], 4);
    assert_eq!(r["kl_sequences"], 2);
    assert!(r["kl_tokens"].as_u64().unwrap() >= 2);
    assert!(r["eval_limit"].is_null());
    let base = &r["baseline"];
    assert_eq!(base["behavior"], "full@f32");
    assert_eq!(base["kl"], 0.0);
    assert_eq!(base["throughput"][0]["speedup"], 1.0);

    let behaviors = r["behaviors"].as_array().unwrap();
    assert_eq!(behaviors.len(), 2, "one entry per behavior");
    let (q8, l25) = (&behaviors[0], &behaviors[1]);
    assert_eq!(q8["behavior"], "full@q8_0");
    assert_eq!(q8["weights"], "q8_0");
    assert_eq!(q8["cost_ratio"], 1.0);
    assert_eq!(l25["behavior"], "layers:25@f32");
    assert_eq!(l25["skipped_units"], serde_json::json!(["25"]));
    let cost = l25["cost_ratio"].as_f64().unwrap();
    assert!(cost > 0.9 && cost < 1.0, "{cost}");
    assert!((l25["ideal_speedup"].as_f64().unwrap() - 1.0 / cost).abs() < 1e-9);
    for b in behaviors {
        let t = &b["throughput"].as_array().unwrap()[0];
        assert_eq!(t["batch"], 1);
        assert_eq!(t["repeats"].as_array().unwrap().len(), 1);
        assert!(t["tokens_per_s"].as_f64().unwrap() > 0.0, "{b}");
        let ratio = t["tokens_per_s"].as_f64().unwrap()
            / base["throughput"][0]["tokens_per_s"].as_f64().unwrap();
        assert!((t["speedup"].as_f64().unwrap() - ratio).abs() < 1e-9, "{b}");
        assert!(b["accuracy"].as_array().unwrap().is_empty());
    }
    // 8-bit weights drift little (DESIGN §3: about 0.005 nats), one skipped layer more.
    let (kq, kl) = (q8["kl"].as_f64().unwrap(), l25["kl"].as_f64().unwrap());
    assert!(kq > 0.0 && kq < 0.05, "q8_0 KL {kq}");
    assert!(kl > kq, "layers:25 KL {kl} <= q8_0 KL {kq}");

    let svg = std::fs::read_to_string(dir.path().join("frontier.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("layers f32") && svg.contains("full q8_0"));
}
