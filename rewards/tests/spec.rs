//! Reward specs (inline, TOML, JSON), composition, the built-in `format` and `length`
//! rewards, closures, and `score_jsonl`.

mod common;

use rewards::{score_jsonl, MathReward, Reward, RewardError, RewardSpec, Sample, Score, SpecError};

fn build(arg: &str) -> Box<dyn Reward> {
    RewardSpec::from_arg(arg)
        .and_then(|s| s.build())
        .unwrap_or_else(|e| panic!("{arg}: {e}"))
}

fn value(r: &dyn Reward, completion: &str, reference: &str) -> f64 {
    r.score(&Sample::new(completion, reference))
        .expect("scored")
        .value
}

#[test]
fn builtins_by_name_and_inline_json() {
    assert_eq!(value(build("math").as_ref(), "#### 5", "5"), 1.0);
    assert_eq!(value(build("format").as_ref(), "no answer form", "5"), 0.0);
    let strict = build(r#"{"kind": "math", "last_number_fallback": false}"#);
    assert_eq!(value(strict.as_ref(), "so 5", "5"), 0.0);
    assert_eq!(
        value(
            build(r#"{"kind":"format","require":"boxed"}"#).as_ref(),
            "#### 5",
            "5"
        ),
        0.0
    );
    assert_eq!(
        value(
            build(r#"{"kind":"format","require":"hashes"}"#).as_ref(),
            "#### 5",
            "5"
        ),
        1.0
    );
    assert_eq!(
        value(
            build(r#"{"kind":"format","pattern":"^<think>"}"#).as_ref(),
            "<think>x",
            "5"
        ),
        1.0
    );
}

#[test]
fn spec_errors_name_the_problem() {
    let err = |arg: &str| {
        RewardSpec::from_arg(arg)
            .and_then(|s| s.build())
            .expect_err(arg)
            .to_string()
    };
    assert!(err("maths").contains("unknown reward \"maths\""));
    assert!(err("length").contains("budget"));
    assert!(err(r#"{"kind":"maths"}"#).contains("unknown variant `maths`"));
    assert!(err(r#"{"kind":"math","rel_tol":"x"}"#).contains("expected f64"));
    assert!(err(r#"{"kind":"math","fallback":true}"#).contains("unknown field `fallback`"));
    assert!(err(r#"{"kind":"external"}"#).contains("missing field `command`"));
    assert!(err(r#"{"kind":"length","budget":0}"#).contains("positive"));
    assert!(err(r#"{"kind":"format","pattern":"("}"#).contains("regular expression"));
    assert!(err(r#"{"kind":"weighted_sum","terms":[]}"#).contains("at least one"));
    assert!(err(r#"{"kind": "math""#).contains("inline spec"));
    assert!(err("missing-config.toml").contains("missing-config.toml"));
}

#[test]
fn toml_and_json_files_with_relative_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A larger config file with a [reward] table; the script path is relative to the file.
    std::fs::copy(common::python_module(), dir.path().join("math_reward.py")).expect("copy");
    let toml_path = dir.path().join("server.toml");
    std::fs::write(
        &toml_path,
        r#"
[server]
group_size = 8

[reward]
kind = "gate"
gate = { kind = "format", require = "any" }
reward = { kind = "external", command = ["python3", "math_reward.py"], timeout_ms = 20000 }
"#,
    )
    .expect("write");
    let r = build(toml_path.to_str().expect("utf-8 path"));
    assert_eq!(value(r.as_ref(), "The answer is 12.", "12"), 1.0);
    assert_eq!(
        value(r.as_ref(), "so 12", "12"),
        0.0,
        "the gate needs an answer form"
    );
    assert_eq!(value(r.as_ref(), "#### 13", "12"), 0.0);
    let json_path = dir.path().join("reward.json");
    std::fs::write(
        &json_path,
        r#"{"kind": "length", "budget": 10, "unit": "words"}"#,
    )
    .expect("write");
    let spec = RewardSpec::from_file(&json_path).expect("parses");
    assert!(matches!(spec, RewardSpec::Length(_)));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[reward]\nkind = \"math\"\nrel_tol = \"high\"\n").expect("write");
    let e = RewardSpec::from_file(&bad).expect_err("bad type");
    assert!(
        matches!(&e, SpecError::Parse { origin, .. } if origin.ends_with("bad.toml")),
        "{e}"
    );
}

#[test]
fn weighted_sum_and_gate_compose() {
    let r = build(
        r#"{"kind":"weighted_sum","terms":[
            {"weight": 1.0, "reward": {"kind":"math"}},
            {"weight": 0.5, "reward": {"kind":"format","require":"boxed"}},
            {"weight": 1.0, "reward": {"kind":"length","budget":20,"penalty_per_unit":0.1,"max_penalty":0.5}}]}"#,
    );
    assert_eq!(value(r.as_ref(), "\\boxed{4}", "4"), 1.5);
    assert_eq!(value(r.as_ref(), "#### 4", "4"), 1.0);
    assert_eq!(value(r.as_ref(), "\\boxed{5}", "4"), 0.5);
    // 29 chars: 9 over the budget -> -0.5 (capped).
    assert_eq!(value(r.as_ref(), "a long preamble...\\boxed{4}", "4"), 1.0);
    let s = r.score(&Sample::new("\\boxed{4}", "4")).expect("scored");
    assert_eq!(s.extracted.as_deref(), Some("4"));
    assert_eq!(s.details["terms"], serde_json::json!([1.0, 1.0, 0.0]));
    // A failing term fails the sample (an empty reference is an error for math).
    assert!(r.score(&Sample::new("\\boxed{4}", "")).is_err());

    let gate = build(
        r#"{"kind":"gate","gate":{"kind":"format","require":"boxed"},"reward":{"kind":"math"},"otherwise":-1}"#,
    );
    let results = gate.score_batch(&[
        Sample::new("\\boxed{4}", "4"),
        Sample::new("4", "4"),
        Sample::new("\\boxed{3}", "4"),
    ]);
    let v: Vec<f64> = results
        .into_iter()
        .map(|r| r.expect("scored").value)
        .collect();
    assert_eq!(v, vec![1.0, -1.0, 0.0]);
}

#[test]
fn length_penalty() {
    let r = build(r#"{"kind":"length","budget":4}"#);
    assert_eq!(value(r.as_ref(), "abcd", ""), 0.0);
    assert_eq!(value(r.as_ref(), "abcdef", ""), -0.5);
    assert_eq!(value(r.as_ref(), &"x".repeat(100), ""), -1.0);
    assert_eq!(value(r.as_ref(), "ééééé", ""), -0.25, "chars, not bytes");
    let words = build(r#"{"kind":"length","budget":2,"unit":"words","penalty_per_unit":0.25}"#);
    assert_eq!(value(words.as_ref(), "one two three  four", ""), -0.5);
}

#[test]
fn closures_are_rewards_and_non_finite_scores_are_errors() {
    let exact = |s: &Sample| {
        Ok(Score::new(if s.completion == s.reference {
            1.0
        } else {
            0.0
        }))
    };
    assert_eq!(value(&exact, "a", "a"), 1.0);
    let nan = |_: &Sample| Ok(Score::new(f64::NAN));
    assert!(matches!(
        nan.score(&Sample::new("a", "b")),
        Err(RewardError::NonFiniteScore(_))
    ));
    let boxed: Box<dyn Reward> = Box::new(exact);
    assert_eq!(
        boxed
            .score_batch(&[Sample::new("a", "a"), Sample::new("a", "b")])
            .len(),
        2
    );
}

#[test]
fn score_jsonl_reports_every_line_in_order() {
    let input = [
        "{\"completion\": \"#### 5\", \"reference\": \"5\", \"prompt\": \"p\", \"metadata\": {\"id\": 1}}",
        "{\"completion\": \"#### 6\", \"reference\": \"5\"}",
        "",
        r#"{"completion": "no reference"}"#,
        "not json",
        r#"{"completion": "x", "reference": ""}"#,
        r#"{"completion": "The answer is \\frac{1}{2}.", "reference": "0.5", "extra": true}"#,
    ]
    .join("\n");
    let mut out = Vec::new();
    let summary = score_jsonl(input.as_bytes(), &mut out, &MathReward::default(), 2).expect("runs");
    assert_eq!((summary.lines, summary.scored, summary.failed), (6, 3, 3));
    assert_eq!(summary.mean(), Some(2.0 / 3.0));
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&out)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let nums: Vec<u64> = lines
        .iter()
        .map(|l| l["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(nums, vec![1, 2, 4, 5, 6, 7]);
    assert_eq!(lines[0]["score"], 1.0);
    assert_eq!(lines[0]["matched_by"], "hashes");
    assert_eq!(lines[1]["score"], 0.0);
    assert!(lines[2]["score"].is_null());
    assert!(lines[2]["error"]
        .as_str()
        .expect("error")
        .contains("missing field `reference`"));
    assert!(lines[3]["error"]
        .as_str()
        .expect("error")
        .contains("invalid input line"));
    assert!(lines[4]["error"].as_str().expect("error").contains("empty"));
    assert_eq!(lines[5]["extracted"], "\\frac{1}{2}");
    // Invalid UTF-8 is reported on its line too.
    let mut out = Vec::new();
    let s = score_jsonl(&b"\xff\xfe\n"[..], &mut out, &MathReward::default(), 8).expect("runs");
    assert_eq!((s.lines, s.failed), (1, 1));
    assert!(String::from_utf8_lossy(&out).contains("not UTF-8"));
}
