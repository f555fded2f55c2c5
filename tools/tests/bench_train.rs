//! `nested-reft bench train` at tiny sizes on a random model: the harness runs its children
//! and reports positive numbers, as JSON and as a table.

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::Command;

const TINY: [&str; 10] = [
    "--random-model",
    "--batch",
    "2",
    "--seq-len",
    "12",
    "--prompt-len",
    "4",
    "--iters",
    "1",
    "--threads=1,2",
];

fn bench(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(["bench", "train"])
        .args(TINY)
        .args(extra)
        .output()
        .expect("start nested-reft");
    assert!(
        out.status.success(),
        "bench train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bench_train_reports_positive_numbers_as_json() {
    let v: Value = serde_json::from_str(&bench(&["--json"])).expect("JSON on stdout");
    assert_eq!(v["batch"], 2);
    assert_eq!(v["seq_len"], 12);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, threads) in runs.iter().zip([1, 2]) {
        assert_eq!(run["threads"], threads, "{run}");
        assert_eq!(run["tokens"], 24);
        assert_eq!(run["scored_tokens"], 16);
        for key in [
            "forward_s",
            "backward_s",
            "tokens_per_s",
            "train_gflops",
            "gemm_gflops",
            "fraction_of_gemm",
            "peak_rss_bytes",
        ] {
            let x = run[key].as_f64().unwrap_or(-1.0);
            assert!(x > 0.0 && x.is_finite(), "{key} = {x} in {run}");
        }
    }
}

#[test]
fn bench_train_prints_a_table_and_explains_itself() {
    let out = bench(&["--kernels", "composed"]);
    let rows: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows[0].contains("tokens/s") && rows[0].contains("peak_RSS"),
        "{out}"
    );
    for (row, threads) in rows[1..].iter().zip(["1", "2"]) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], threads, "{row}");
        // Rounded for display: tiny timings may print as 0; the JSON test checks positivity.
        for cell in &cells[1..6] {
            let x: f64 = cell.parse().unwrap_or(-1.0);
            assert!(x >= 0.0, "{cell} in {row}");
        }
        assert!(cells[3].parse::<f64>().unwrap() > 0.0, "tokens/s in {row}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(["bench", "train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("GEMM") && help.contains("VmHWM"), "{help}");
}

#[test]
fn bench_train_grpo_compares_layouts_on_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("batch.json");
    let run = |extra: &[&str]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
            .args(["bench", "train", "--grpo", "--random-model", "--iters", "1"])
            .args(["--threads", "1", "--json", "--grpo-batch"])
            .arg(&saved)
            .args(extra)
            .output()
            .expect("start nested-reft");
        assert!(
            out.status.success(),
            "bench train --grpo failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    };
    let v = run(&["--layouts", "padded,shared,packed,shared-packed"]);
    assert!(saved.is_file(), "the generated workload is saved");
    assert_eq!(v["workload"], "grpo");
    assert_eq!(v["groups"], 8);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    let get = |layout: &str, key: &str| -> f64 {
        let r = runs.iter().find(|r| r["layout"] == layout).unwrap();
        r[key].as_f64().unwrap()
    };
    let completion = v["completion_tokens"].as_f64().unwrap();
    for layout in ["padded", "shared", "packed", "shared-packed"] {
        // Every layout trains every completion token.
        assert_eq!(get(layout, "completion_tokens"), completion, "{layout}");
        for key in [
            "step_s",
            "completion_tokens_per_s",
            "peak_rss_bytes",
            "gemm_gflops",
        ] {
            let x = get(layout, key);
            assert!(x > 0.0 && x.is_finite(), "{layout}: {key} = {x}");
        }
        assert_eq!(
            get(layout, "unshared_padded_tokens"),
            get("padded", "computed_tokens"),
            "{layout}"
        );
    }
    // Shared and packed: each prompt once, no padding; fewer positions than any other layout.
    assert_eq!(get("shared-packed", "padding_tokens"), 0.0);
    assert_eq!(get("packed", "padding_tokens"), 0.0);
    assert_eq!(
        get("shared-packed", "prompt_tokens"),
        v["prompt_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        get("shared-packed", "computed_tokens"),
        v["prompt_tokens"].as_f64().unwrap() + completion
    );
    for other in ["padded", "shared", "packed"] {
        assert!(get("shared-packed", "computed_tokens") < get(other, "computed_tokens"));
    }
    // The saved workload replays: the same batch again, here with LoRA beside full
    // fine-tuning. LoRA trains a fraction of the parameters, and its checkpoint holds only
    // them and their moments.
    let again = run(&["--layouts", "shared-packed", "--lora-ranks", "0,2"]);
    assert_eq!(again["completion_tokens"], v["completion_tokens"]);
    assert_eq!(
        again["runs"][0]["computed_tokens"],
        v["runs"][3]["computed_tokens"]
    );
    let (full, lora) = (&again["runs"][0], &again["runs"][1]);
    assert_eq!(
        (full["lora_rank"].as_u64(), lora["lora_rank"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(full["completion_tokens"], lora["completion_tokens"]);
    let n = |r: &Value, k: &str| r[k].as_f64().unwrap();
    assert!(
        n(lora, "trainable_params") * 4.0 < n(full, "trainable_params"),
        "{again}"
    );
    // Parameters + two moments (f32), plus the small state and manifest files.
    for r in [full, lora] {
        let tensors = 3.0 * 4.0 * n(r, "trainable_params");
        assert!(
            n(r, "checkpoint_bytes") > tensors && n(r, "checkpoint_bytes") < tensors + 64e3,
            "{r}"
        );
        assert!(n(r, "checkpoint_s") > 0.0, "{r}");
        // The random model has no tokenizer: no publication is measured.
        assert!(r["publish_bytes"].is_null(), "{r}");
    }
    // A file that is not a workload is refused by name.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(["bench", "train", "--grpo", "--random-model", "--grpo-batch"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("bad.json"),
        "{stderr}"
    );
}
