//! `nested-reft train`, run as a user would, on the real default model (tiny batches).

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(args)
        .output()
        .expect("start nested-reft")
}

#[test]
fn two_local_steps_write_metrics_plot_and_a_model_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = run(&[
        "train",
        "--mode",
        "local",
        "--steps",
        "2",
        "--prompts-per-batch",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--skip-layers",
        "25,27",
        "--correction",
        "tis",
        "--seed",
        "3",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("on arithmetic:1 (1000 problems, seed 0)"),
        "{stderr}"
    );

    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{metrics}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64);
        assert_eq!(l["skipped_layers"], serde_json::json!([25, 27]));
        assert_eq!(l["generation"]["completions"], 4);
        let r = l["update"]["reward_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{l}");
        assert!(l["generation"]["tokens"].as_u64().unwrap() > 0);
    }

    let svg = std::fs::read_to_string(out_dir.join("reward.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("mean reward"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    let config = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    assert!(config.contains("steps = 2"), "{config}");

    // The saved model loads back and generates with the saved tokenizer.
    let model_dir = out_dir.join("model");
    assert!(model_dir.join("model.safetensors").is_file());
    let gen = run(&[
        "generate",
        "--model",
        model_dir.to_str().unwrap(),
        "--prompt",
        "1 + 1 =",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    assert!(!gen.stdout.is_empty());
}

#[test]
fn bad_configuration_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--steps", "0"], "steps must be at least 1"),
        (&["--group-size", "1"], "group_size must be at least 2"),
        (&["--dataset", "nonsense"], "--dataset"),
        (&["--correction", "none", "--tis-cap", "3"], "--tis-cap"),
        (&["--lr=-1"], "learning rate"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["train", "--output-dir", dir.path().to_str().unwrap()];
        all.extend_from_slice(args);
        let out = run(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "stepz = 3\n").unwrap();
    let out = run(&["train", "--config", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("stepz"),
        "{stderr}"
    );
}

#[test]
fn print_config_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "train",
        "--print-config",
        "--correction",
        "retrace",
        "--steps",
        "7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("kind = \"retrace\""), "{text}");
    let file = dir.path().join("cfg.toml");
    std::fs::write(&file, &text).unwrap();
    let again = run(&[
        "train",
        "--print-config",
        "--config",
        file.to_str().unwrap(),
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
    // The learning-rate schedule spans the run's optimizer steps: steps × epochs.
    let out = run(&["train", "--print-config", "--steps", "7", "--epochs", "2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("total_steps = 14"), "{text}");
    // The learner shares prompts and packs rows unless told not to.
    assert!(
        text.contains("prefix_sharing = true") && text.contains("packing = true"),
        "{text}"
    );
    let out = run(&[
        "train",
        "--print-config",
        "--no-prefix-sharing",
        "--no-packing",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("prefix_sharing = false") && text.contains("packing = false"),
        "{text}"
    );
    // A default run keeps the one checkpoint resuming needs and trains on when one fails.
    let out = run(&["train", "--print-config"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("keep_checkpoints = 1") && text.contains("checkpoint_failure = \"retry\""),
        "{text}"
    );
    let out = run(&[
        "train",
        "--print-config",
        "--keep-checkpoints",
        "3",
        "--checkpoint-failure",
        "stop",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("keep_checkpoints = 3") && text.contains("checkpoint_failure = \"stop\""),
        "{text}"
    );
    let out = run(&["train", "--print-config", "--keep-checkpoints", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keep-checkpoints"), "{err}");
}

#[test]
fn behavior_flags_keep_the_plan_of_the_config_file() {
    // --behavior-weights and --kl-budget are settings of their own: they do not replace the
    // file's plan choice; a plan flag does, and units round-trip as strings.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cfg.toml");
    std::fs::write(
        &file,
        "[plan]\nstrategy = \"contiguous\"\nskip_ratio = 0.1\nprofile = \"/p.json\"\n",
    )
    .unwrap();
    let cfg = file.to_str().unwrap();
    let out = run(&[
        "train",
        "--print-config",
        "--config",
        cfg,
        "--behavior-weights",
        "q8_0",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "strategy = \"contiguous\"",
        "skip_ratio = 0.1",
        "profile = \"/p.json\"",
        "behavior_weights = \"q8_0\"",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let out = run(&[
        "train",
        "--print-config",
        "--config",
        cfg,
        "--skip-layers",
        "4,a7,m27",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("skip_layers = [4, \"a7\", \"m27\"]"),
        "{text}"
    );
    assert!(!text.contains("strategy ="), "{text}");
    assert!(text.contains("profile = \"/p.json\""), "{text}");
    // A bad unit is a clear error.
    let out = run(&["train", "--print-config", "--skip-layers", "4,x7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("x7"), "{err}");
}

#[test]
fn ctrl_c_stops_after_the_current_step_and_still_saves() {
    for mode in ["local", "async"] {
        ctrl_c_in_mode(mode);
    }
}

fn ctrl_c_in_mode(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args([
            "train",
            "--mode",
            mode,
            "--steps",
            "200",
            "--prompts-per-batch",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "4",
            "--output-dir",
            out_dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (with a watchdog) until the first step is logged, then interrupt.
    let metrics = out_dir.join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() == 0) {
        assert!(
            start.elapsed().as_secs() < 600,
            "no step finished within 10 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "train exited before its first step"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(if mode == "local" {
            "interrupted: stopping after step"
        } else {
            "interrupted: stopping both processes after their current step"
        }),
        "{mode}: {stderr}"
    );
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!((1..200).contains(&steps), "{mode}: {steps} steps");
    if mode == "async" {
        // Both processes stopped cleanly: the learner checkpointed, the server said so.
        let learner = std::fs::read_to_string(out_dir.join("learner.log")).unwrap();
        let server = std::fs::read_to_string(out_dir.join("rollout-server.log")).unwrap();
        assert!(out_dir.join("checkpoints/LATEST").is_file(), "{learner}");
        assert!(server.contains("stopped"), "{server}");
        // The log files are plain text: no colour escapes.
        assert!(
            !learner.contains('\u{1b}') && !server.contains('\u{1b}'),
            "{learner}"
        );
        assert!(
            stderr.contains("disk:")
                && stderr.contains("checkpoints")
                && stderr.contains("(1 kept)"),
            "{stderr}"
        );
    }
    // The run says where its disk space went.
    assert!(
        stderr.contains("disk:") && stderr.contains("model"),
        "{stderr}"
    );
    assert!(out_dir.join("reward.svg").is_file());
    assert!(out_dir.join("model").join("model.safetensors").is_file());
    assert!(!out_dir.join("model.tmp").exists());
}
