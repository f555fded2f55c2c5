//! `nested-reft bench behaviors` end to end on the real default model (tiny runs).

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::Command;

#[test]
fn two_behaviors_train_evaluate_and_land_on_one_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("cmp");
    let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args([
            "bench",
            "behaviors",
            "--steps",
            "3",
            "--run",
            "full f32=--seed 3",
            "--run",
            "skip q8_0=--behavior-weights q8_0 --skip-layers 25,a27 --seed 3",
            "--train-arg=--prompts-per-batch=2",
            "--train-arg=--group-size=2",
            "--train-arg=--max-new-tokens=8",
            "--train-arg=--learner-threads=1",
            "--train-arg=--server-threads=1",
            "--eval-sets",
            "arithmetic:1",
            "--eval-limit",
            "2",
            "--output-dir",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("behaviors.json")).unwrap())
            .unwrap();
    assert_eq!(report["mode"], "sync");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["name"], "full f32");
    assert_eq!(runs[1]["name"], "skip q8_0");
    for r in runs {
        assert_eq!(r["steps"], 3, "{r}");
        let step_s = r["step_s"].as_f64().unwrap();
        assert!(step_s > 0.0, "{r}");
        // In sync mode a step is the generation and the training one after the other.
        let parts = r["generate_s"].as_f64().unwrap() + r["train_s"].as_f64().unwrap();
        assert!(parts <= step_s * 1.01 + 0.05, "{r}");
        let rewards = r["rewards"].as_array().unwrap();
        assert_eq!(rewards.len(), 3, "{r}");
        let mut last_t = 0.0;
        for p in rewards {
            let (t, reward) = (p[1].as_f64().unwrap(), p[2].as_f64().unwrap());
            assert!(t > last_t, "wall-clock times must increase: {r}");
            assert!((0.0..=1.0).contains(&reward), "{r}");
            last_t = t;
        }
        let acc = r["eval"]["arithmetic:1"]
            .as_f64()
            .unwrap_or_else(|| panic!("no arithmetic:1 accuracy in {r}"));
        assert!((0.0..=1.0).contains(&acc), "{r}");
        assert!(out_dir
            .join(r["name"].as_str().unwrap().replace(' ', "-"))
            .join("eval.json")
            .is_file());
    }
    // The full-depth run used no skip set; the other its explicit one on every batch.
    assert_eq!(runs[0]["skip_sets"], serde_json::json!({"full": 3}));
    assert_eq!(runs[1]["skip_sets"], serde_json::json!({"25,a27": 3}));
    // The 8-bit nested behavior is a different model: on every step that trained tokens its
    // KL to the target is positive (a step whose groups all tied trains nothing: null).
    for r in runs {
        for kl in r["kl_behavior"].as_array().unwrap() {
            assert!(kl.is_null() || kl.as_f64().unwrap() >= 0.0, "{r}");
        }
    }
    for kl in runs[1]["kl_behavior"].as_array().unwrap() {
        assert!(kl.is_null() || kl.as_f64().unwrap() > 0.0, "{report}");
    }
    let svg = std::fs::read_to_string(out_dir.join("rewards.svg")).unwrap();
    assert!(
        svg.contains("full f32") && svg.contains("skip q8_0"),
        "{svg}"
    );
    assert!(
        stdout.contains("skip sets of skip q8_0: 25,a27 ×3"),
        "{stdout}"
    );
}
