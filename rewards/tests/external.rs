//! External reward processes: the Python and Rust example modules agree with the built-in
//! `math`, and a misbehaving module never takes the caller down or yields a silent 0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::corpus::corpus;
use rewards::{
    ExternalConfig, ExternalReward, MathReward, Reward, RewardError, RewardSpec, Sample, Score,
};

fn faulty() -> ExternalReward {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/modules/faulty.py");
    let mut cfg = ExternalConfig::new(["python3".to_string(), script.display().to_string()]);
    cfg.timeout_ms = 2_000;
    cfg.restart_backoff_ms = 10;
    cfg.max_backoff_ms = 40;
    ExternalReward::new(cfg).expect("faulty module starts")
}

fn values(results: &[Result<Score, RewardError>]) -> Vec<Option<f64>> {
    results
        .iter()
        .map(|r| r.as_ref().ok().map(|s| s.value))
        .collect()
}

fn batch(texts: &[&str]) -> Vec<Sample> {
    texts.iter().map(|t| Sample::new(*t, "ref")).collect()
}

/// Scores the corpus with `module` and with the built-in `math`; every result must agree.
fn assert_agrees_with_builtin(module: &dyn Reward, what: &str) {
    let problems = common::gsm8k();
    let samples: Vec<Sample> = corpus(&problems, 200, 11)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let builtin = MathReward::default().score_batch(&samples);
    let external = module.score_batch(&samples);
    assert_eq!(external.len(), samples.len());
    let mut diffs = Vec::new();
    for ((s, b), e) in samples.iter().zip(&builtin).zip(&external) {
        let (b, e) = (
            b.as_ref().expect("builtin scores"),
            e.as_ref().unwrap_or_else(|err| panic!("{what}: {err}")),
        );
        if (b.value, &b.extracted, &b.matched_by) != (e.value, &e.extracted, &e.matched_by) {
            diffs.push(format!(
                "{:?} / {:?}: builtin {} {:?} {:?}, {what} {} {:?} {:?}",
                &s.completion[s.completion.len().saturating_sub(60)..],
                s.reference,
                b.value,
                b.extracted,
                b.matched_by,
                e.value,
                e.extracted,
                e.matched_by
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let correct = builtin
        .iter()
        .filter(|r| matches!(r, Ok(s) if s.value == 1.0))
        .count();
    assert!(
        correct > samples.len() / 3 && correct < samples.len(),
        "{correct} of {}",
        samples.len()
    );
}

#[test]
fn python_module_scores_like_builtin_math() {
    let spec = serde_json::json!({
        "kind": "external",
        "command": ["python3", common::python_module().display().to_string()],
        "timeout_ms": 20000,
    });
    let reward = RewardSpec::from_arg(&spec.to_string())
        .and_then(|s| s.build())
        .expect("builds");
    assert_agrees_with_builtin(reward.as_ref(), "python module");
}

#[test]
fn rust_module_scores_like_builtin_math() {
    let exe = &common::modules().rs_process;
    let reward = ExternalReward::new(ExternalConfig::new([
        exe.display().to_string(),
        "math".into(),
    ]))
    .expect("starts");
    assert_agrees_with_builtin(&reward, "rust module");
    let st = reward.stats();
    assert_eq!(
        (st.starts, st.failed_samples, st.timeouts),
        (1, 0, 0),
        "{st:?}"
    );
    assert!(st.requests >= 2, "the corpus is split into batches: {st:?}");
}

#[test]
fn hanging_module_times_out_and_is_restarted() {
    let mut cfg = ExternalConfig::new([
        "python3".to_string(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/modules/faulty.py")
            .display()
            .to_string(),
    ]);
    cfg.timeout_ms = 1_000;
    cfg.restart_backoff_ms = 10;
    let m = ExternalReward::new(cfg).expect("starts");
    let r = m.score_batch(&batch(&["ab", "HANG", "abc"]));
    assert!(
        r.iter().all(
            |x| matches!(x, Err(RewardError::Timeout(d)) if *d == Duration::from_millis(1_000))
        ),
        "{r:?}"
    );
    // The next batch goes to a fresh process.
    assert_eq!(
        values(&m.score_batch(&batch(&["ab", "abcd"]))),
        vec![Some(2.0), Some(4.0)]
    );
    let st = m.stats();
    assert_eq!(
        (st.timeouts, st.failed_samples, st.starts),
        (1, 3, 2),
        "{st:?}"
    );
}

#[test]
fn module_exiting_mid_batch_fails_that_batch_only() {
    let m = faulty();
    let r = m.score_batch(&batch(&["a", "CRASH", "abc"]));
    assert!(
        r.iter()
            .all(|x| matches!(x, Err(RewardError::ModuleExited(_)))),
        "{r:?}"
    );
    assert_eq!(values(&m.score_batch(&batch(&["abc"]))), vec![Some(3.0)]);
    // Crash again: restarted again, with a (short) backoff.
    assert!(m.score(&Sample::new("CRASH", "r")).is_err());
    assert_eq!(m.score(&Sample::new("ab", "r")).map(|s| s.value), Ok(2.0));
    let st = m.stats();
    assert_eq!(
        (st.exits, st.failed_samples, st.starts),
        (2, 4, 3),
        "{st:?}"
    );
}

#[test]
fn garbage_on_stdout_is_a_protocol_error() {
    let m = faulty();
    let r = m.score_batch(&batch(&["GARBAGE", "x"]));
    assert!(
        r.iter()
            .all(|x| matches!(x, Err(RewardError::Protocol(msg)) if msg.contains("Traceback"))),
        "{r:?}"
    );
    assert_eq!(values(&m.score_batch(&batch(&["xyz"]))), vec![Some(3.0)]);
    assert_eq!(m.stats().protocol_errors, 1);
}

#[test]
fn non_finite_scores_fail_only_their_sample() {
    let m = faulty();
    let r = m.score_batch(&batch(&["NAN", "ab", "INF"]));
    assert!(
        matches!(&r[0], Err(RewardError::NonFiniteScore(s)) if s == "NaN"),
        "{r:?}"
    );
    assert_eq!(r[1].as_ref().map(|s| s.value), Ok(2.0));
    assert!(
        matches!(&r[2], Err(RewardError::NonFiniteScore(s)) if s == "Infinity"),
        "{r:?}"
    );
    assert_eq!(
        m.stats().starts,
        1,
        "a non-finite score is not a protocol violation"
    );
}

#[test]
fn malformed_results_are_reported_per_sample_or_per_batch() {
    let m = faulty();
    let r = m.score_batch(&batch(&["MISSING", "STRSCORE", "ERROR", "abcde"]));
    assert!(
        matches!(&r[0], Err(RewardError::Protocol(s)) if s.contains("neither")),
        "{r:?}"
    );
    assert!(
        matches!(&r[1], Err(RewardError::Protocol(s)) if s.contains("must be a number")),
        "{r:?}"
    );
    assert!(
        matches!(&r[2], Err(RewardError::Module(s)) if s.contains("cannot score")),
        "{r:?}"
    );
    assert_eq!(r[3].as_ref().map(|s| s.value), Ok(5.0));
    for bad in ["WRONGCOUNT", "WRONGID"] {
        let r = m.score_batch(&batch(&[bad, "x"]));
        assert!(
            r.iter().all(|x| matches!(x, Err(RewardError::Protocol(_)))),
            "{bad}: {r:?}"
        );
    }
    assert_eq!(values(&m.score_batch(&batch(&["ok"]))), vec![Some(2.0)]);
}

#[test]
fn large_batches_are_split_and_multi_megabyte_samples_pass_through() {
    let mut cfg = ExternalConfig::new([common::modules().rs_process.display().to_string()]);
    cfg.max_batch = 3;
    let m = ExternalReward::new(cfg).expect("starts");
    let mut samples: Vec<Sample> = (0..10)
        .map(|i| Sample::new(format!("#### {i}"), i.to_string()))
        .collect();
    samples.push(Sample::new(
        format!("{}\n#### 7", "word ".repeat(1 << 20)),
        "7",
    ));
    let r = m.score_batch(&samples);
    assert!(
        r.iter().all(|x| matches!(x, Ok(s) if s.value == 1.0)),
        "{r:?}"
    );
    assert_eq!(m.stats().requests, 4);
}

#[test]
fn a_missing_program_is_a_clear_build_error() {
    let e = ExternalReward::new(ExternalConfig::new(["/nonexistent/reward-module"]))
        .expect_err("no such program");
    assert!(e.to_string().contains("/nonexistent/reward-module"), "{e}");
    assert!(ExternalReward::new(ExternalConfig::new(Vec::<String>::new())).is_err());
}
