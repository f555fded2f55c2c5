//! The `nested-reft` binary, run as a user would, on the real default model.

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(args)
        .output()
        .expect("start nested-reft");
    out
}

fn ok_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn logprobs_of_a_text_under_a_nested_plan() {
    let v = ok_json(&[
        "logprobs",
        "--text",
        "The sky is blue.",
        "--skip-layers",
        "5,10,15",
        "--compare-full",
    ]);
    assert_eq!(v["plan"]["skipped"], serde_json::json!([5, 10, 15]));
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5, "{tokens:?}"); // The| sky| is| blue|.
    assert!(
        tokens[0]["logprob"].is_null(),
        "the first token has no context"
    );
    assert_eq!(tokens[1]["token"], " sky");
    let mut total = 0.0;
    for t in &tokens[1..] {
        let lp = t["logprob"].as_f64().unwrap();
        let full = t["full_logprob"].as_f64().unwrap();
        assert!(lp < 0.0 && full < 0.0);
        assert!((t["delta"].as_f64().unwrap() - (lp - full)).abs() < 1e-5);
        total += lp;
    }
    assert!((v["total_logprob"].as_f64().unwrap() - total).abs() < 1e-4);
    // The full plan scores its own tokens identically to --skip-ratio 0.
    let full = ok_json(&["logprobs", "--text", "The sky is blue."]);
    for (a, b) in full["tokens"].as_array().unwrap()[1..]
        .iter()
        .zip(&tokens[1..])
    {
        assert!(
            (a["logprob"].as_f64().unwrap() - b["full_logprob"].as_f64().unwrap()).abs() < 1e-5
        );
    }
}

#[test]
fn prompt_completion_pair_scores_only_the_completion() {
    let v = ok_json(&[
        "logprobs",
        "--chat",
        "What is 2+2?",
        "--completion",
        "4",
        "--skip-ratio",
        "0.1",
    ]);
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["token"], "4");
    assert_eq!(v["plan"]["skipped"].as_array().unwrap().len(), 3);
}

#[test]
fn greedy_generation_is_reproducible_and_reports_json() {
    let args = [
        "generate",
        "--chat",
        "Name a color.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--json",
        "--skip-ratio",
        "0.1",
        "--plan-strategy",
        "contiguous",
        "--seed",
        "4",
    ];
    let a = ok_json(&args);
    let b = ok_json(&args);
    assert_eq!(a, b);
    let n = a["tokens"].as_array().unwrap().len();
    assert!((1..=8).contains(&n));
    assert_eq!(a["logprobs"].as_array().unwrap().len(), n);
    assert_eq!(a["plan"].as_array().unwrap().len(), 27);
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    // Truncated sampling cannot train: refused when the config is read, naming the reason.
    let truncated = std::env::temp_dir().join(format!("cli-top-p-{}.toml", std::process::id()));
    std::fs::write(&truncated, "[generator]\ntop_p = 0.9\n").unwrap();
    let truncated = truncated.to_str().unwrap().to_owned();
    for (args, needle) in [
        (
            vec!["train", "--config", truncated.as_str()],
            "truncated sampling cannot train",
        ),
        (
            vec!["generate", "--prompt", "x", "--skip-layers", "5,99"],
            "cannot skip layer 99",
        ),
        (
            vec!["generate", "--prompt", "x", "--skip-ratio", "1.5"],
            "skip ratio 1.5",
        ),
        (
            vec![
                "generate",
                "--prompt",
                "x",
                "--skip-layers",
                "3",
                "--skip-ratio",
                "0.2",
            ],
            "cannot be combined",
        ),
        (
            vec!["generate", "--prompt", "x", "--temperature=-1"],
            "temperature -1",
        ),
        (
            vec!["generate", "--prompt", "x", "--model", "/nonexistent.gguf"],
            "/nonexistent.gguf",
        ),
        (vec!["logprobs", "--prompt", "x"], "--completion"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_file(&truncated);
}

#[test]
fn a_gpu_device_without_cuda_support_is_one_clear_line() {
    // The default build has no CUDA: --device cuda (flag or environment) fails at once with one
    // line naming what is missing; an unknown device is a usage error naming the choices.
    for (args, env) in [
        (vec!["generate", "--prompt", "x", "--device", "cuda"], None),
        (vec!["logprobs", "--text", "x y"], Some("cuda:1")),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nested-reft"));
        // As a user sees it: no backtrace requested.
        cmd.args(&args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(d) = env {
            cmd.env("NESTED_REFT_DEVICE", d);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if cfg!(feature = "cuda") {
            // A CUDA build on a machine with a GPU may succeed; without one it names the count.
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].contains("this build has no CUDA support")
                && lines[0].contains("--features cuda"),
            "{args:?}: {err}"
        );
    }
    let out = run(&["generate", "--prompt", "x", "--device", "tpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn fetch_of_cached_assets_is_quiet_and_succeeds() {
    // The assets are cached by the test set-up, so this only verifies them.
    let out = run(&["fetch", "gsm8k"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("unbound variable"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("100 problems")
            || String::from_utf8_lossy(&out.stdout).contains("cached")
    );
}
