//! `nested-reft eval`, run as a user would, on the real default model (a few problems).

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(args)
        .output()
        .expect("start nested-reft")
}

/// The row of `dataset` in the printed table under the plan heading `plan_prefix`, split on
/// whitespace.
fn table_row(stdout: &str, plan_prefix: &str, dataset: &str) -> Vec<String> {
    let mut in_plan = false;
    for line in stdout.lines() {
        if let Some(plan) = line.strip_prefix("plan: ") {
            in_plan = plan.starts_with(plan_prefix);
            continue;
        }
        let cols: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        if in_plan && cols.first().map(String::as_str) == Some(dataset) {
            return cols;
        }
    }
    panic!("no row for {dataset} under plan {plan_prefix} in:\n{stdout}");
}

#[test]
fn accuracy_is_correct_over_total_of_the_written_results() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("eval.json");
    let out = run(&[
        "eval",
        "--dataset",
        "arithmetic:1,gsm8k",
        "--limit",
        "2",
        "--max-new-tokens",
        "24",
        "--output",
        json_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(v["samples"], 1);
    assert_eq!(v["temperature"], 0.0);
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["dataset"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["arithmetic:1", "gsm8k"]);
    for r in runs {
        let name = r["dataset"].as_str().unwrap();
        assert_eq!(r["skipped_layers"], serde_json::json!([]), "{name}");
        let results = r["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{name}: --limit 2");
        let (mut correct, mut total) = (0u64, 0u64);
        for (i, p) in results.iter().enumerate() {
            assert_eq!(p["index"], i as u64);
            assert!(!p["question"].as_str().unwrap().is_empty());
            assert!(!p["expected"].as_str().unwrap().is_empty());
            let completions = p["completions"].as_array().unwrap();
            assert_eq!(completions.len(), 1, "greedy: one completion");
            let mut c_here = 0;
            for c in completions {
                let tokens = c["tokens"].as_u64().unwrap();
                assert!((1..=24).contains(&tokens), "{c}");
                let reward = c["reward"].as_f64().unwrap();
                let ok = c["correct"].as_bool().unwrap();
                assert_eq!(ok, reward >= 1.0, "{c}");
                c_here += u64::from(ok);
            }
            assert_eq!(p["correct"], c_here, "{p}");
            correct += c_here;
            total += completions.len() as u64;
        }
        let s = &r["summary"];
        assert_eq!(s["problems"], 2);
        assert_eq!(s["completions"], total);
        assert_eq!(s["correct"], correct, "{name}");
        let acc = s["accuracy"].as_f64().unwrap();
        assert!(
            (acc - correct as f64 / total as f64).abs() < 1e-12,
            "{name}"
        );
        assert!(s["generated_tokens"].as_u64().unwrap() > 0);

        // The printed table reports the same numbers.
        let row = table_row(&stdout, "full", name);
        assert_eq!(row[1], "2", "{row:?}");
        assert_eq!(row[2], correct.to_string(), "{row:?}");
        assert_eq!(row[3], format!("{:.1}%", 100.0 * acc), "{row:?}");
    }
}

#[test]
fn pass_at_k_under_a_nested_plan_next_to_the_full_one() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("k.json");
    let out = run(&[
        "eval",
        "--dataset",
        "arithmetic:2",
        "--limit",
        "2",
        "--samples",
        "3",
        "--max-new-tokens",
        "12",
        "--skip-layers",
        "25,27",
        "--also-full",
        "--output",
        json_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(
        v["temperature"], 0.7,
        "sampling defaults to 0.7 with --samples"
    );
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["skipped_layers"], serde_json::json!([25, 27]));
    assert_eq!(runs[1]["skipped_layers"], serde_json::json!([]));
    for r in runs {
        let s = &r["summary"];
        assert_eq!(s["completions"], 6);
        let results = r["results"].as_array().unwrap();
        let solved = results
            .iter()
            .filter(|p| p["correct"].as_u64().unwrap() > 0)
            .count();
        let pass = s["pass_at_k"].as_array().unwrap();
        assert_eq!(pass.last().unwrap()["k"], 3);
        let pass_k = pass.last().unwrap()["value"].as_f64().unwrap();
        assert!(
            (pass_k - solved as f64 / 2.0).abs() < 1e-12,
            "pass@K = any correct"
        );
        let pass_1 = pass[0]["value"].as_f64().unwrap();
        assert!((pass_1 - s["accuracy"].as_f64().unwrap()).abs() < 1e-12);
    }
    assert!(stdout.contains("pass@3"), "{stdout}");
    let row = table_row(&stdout, "28/30 layers", "arithmetic:2");
    assert_eq!(row[1], "2", "{row:?}");
    assert_eq!(row[2], "6", "completions: {row:?}");
}

#[test]
fn a_missing_or_empty_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run");
    let out = run(&["eval", "--checkpoint", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = run(&["eval", "--checkpoint", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no complete checkpoint"), "{err}");
    assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_flags_fail_before_loading_anything() {
    for (args, needle) in [
        (vec!["eval", "--levels", "9"], "level 9"),
        (vec!["eval", "--dataset", "nonsense"], "nonsense"),
        (
            vec!["eval", "--samples", "4", "--temperature", "0"],
            "greedy",
        ),
        (
            vec!["eval", "--dataset", "gsm8k:/nonexistent/gsm8k"],
            "nested-reft fetch gsm8k",
        ),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The evaluation prompt is the training prompt, character for character.
#[test]
fn the_prompt_is_the_training_prompt() {
    use model::candle_core::quantized::gguf_file;
    use rollout_server::dataset::{Dataset, Problem};

    let path = protocol::assets::default_model_path();
    let mut file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let tokenizer =
        model::Tokenizer::from_gguf(&gguf_file::Content::read(&mut file).unwrap()).unwrap();
    let problem = Problem {
        id: "p".into(),
        question: "Tom has 3 apples and buys 5 more. How many apples does Tom have now?".into(),
        answer: "8".into(),
        solution: None,
    };
    let train = tools::train::TrainFile::default();
    let generator = rollout_server::Generator::new(
        train.generator.clone(),
        Dataset::from_problems(vec![problem.clone()]).unwrap(),
        model::PlanSpec::full(),
        30,
        train.reward.build().unwrap(),
        tokenizer.clone(),
    )
    .unwrap();
    let ours = tools::eval::PromptFormat::default()
        .text(&tokenizer, &problem.question)
        .unwrap();
    assert_eq!(ours, generator.prompt_text(&problem).unwrap());
    assert!(ours.contains("Answer with the final number."), "{ours}");
}

/// Writes a checkpoint as the learner lays it out (`root/step-00000001/` with the model and
/// optimizer tensors, `state.json` and a `manifest.json` of their sha256 and sizes, named in
/// `root/LATEST`) holding `tensors` as the model.
fn write_checkpoint(
    root: &std::path::Path,
    tensors: &std::collections::HashMap<String, model::candle_core::Tensor>,
) {
    use sha2::{Digest, Sha256};
    let dir = root.join("step-00000001");
    std::fs::create_dir_all(&dir).unwrap();
    model::candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    let moment = model::candle_core::Tensor::zeros(
        2,
        model::candle_core::DType::F32,
        &model::candle_core::Device::Cpu,
    )
    .unwrap();
    let moments: std::collections::HashMap<String, _> = [("m.x".to_string(), moment)].into();
    model::candle_core::safetensors::save(&moments, dir.join("optimizer.safetensors")).unwrap();
    let state = serde_json::json!({
        "step": 1, "version": 1, "optimizer_step_t": 1, "nonfinite_total": 0, "extra": null
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let mut files = serde_json::Map::new();
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        files.insert(
            f.into(),
            serde_json::json!({"sha256": hex::encode(Sha256::digest(&bytes)), "bytes": bytes.len()}),
        );
    }
    let manifest = serde_json::json!({"format": 1, "files": files});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(root.join("LATEST"), "step-00000001\n").unwrap();
}

/// A checkpoint holding the base model's weights evaluates exactly like the base model, found
/// from its root; one with other tensors is refused with a message naming it.
#[test]
fn a_checkpoint_is_loaded_into_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = model::load_model(
        &protocol::assets::default_model_path(),
        &model::LoadOptions::default(),
    )
    .unwrap();
    let root = dir.path().join("checkpoints");
    write_checkpoint(
        &root,
        &base.decoder.named_parameters().into_iter().collect(),
    );
    drop(base);
    let eval = |extra: &[&str], out: &str| -> Value {
        let path = dir.path().join(out);
        let mut args = vec![
            "eval",
            "--dataset",
            "arithmetic:1",
            "--limit",
            "1",
            "--max-new-tokens",
            "6",
            "--output",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    let from_ckpt = eval(&["--checkpoint", dir.path().to_str().unwrap()], "ckpt.json");
    let from_base = eval(&[], "base.json");
    assert_eq!(
        from_ckpt["checkpoint"],
        root.join("step-00000001").to_str().unwrap()
    );
    assert_eq!(from_ckpt["checkpoint_step"], 1);
    assert_eq!(
        from_ckpt["runs"][0]["results"],
        from_base["runs"][0]["results"]
    );

    let wrong = dir.path().join("wrong");
    let t = model::candle_core::Tensor::zeros(
        3,
        model::candle_core::DType::F32,
        &model::candle_core::Device::Cpu,
    )
    .unwrap();
    write_checkpoint(&wrong, &[("model.norm.weight".to_string(), t)].into());
    let out = run(&["eval", "--checkpoint", wrong.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not fit the model"), "{err}");
    assert!(err.contains("step-00000001"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
