//! Dynamic-library reward modules: the example cdylib agrees with the built-in `math`; C
//! modules exercise the ABI's error paths (wrong version, missing symbol, refused config,
//! failed sample, non-finite score, unknown status).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::corpus::corpus;
use rewards::{
    DylibConfig, DylibError, DylibReward, MathReward, Reward, RewardError, RewardSpec, Sample,
};

/// Compiles `tests/modules/test_module.c` with extra flags into a temporary directory.
fn c_module(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("lib{name}.so"));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(root.join("include"))
        .args(flags)
        .arg(root.join("tests/modules/test_module.c"))
        .arg("-lm")
        .status()
        .expect("a C compiler (cc) is needed for the dynamic-library tests");
    assert!(status.success(), "compiling the C test module failed");
    out
}

fn load(path: &Path, config: serde_json::Value) -> Result<DylibReward, DylibError> {
    DylibReward::load(&DylibConfig {
        path: path.to_path_buf(),
        config,
    })
}

#[test]
fn example_cdylib_scores_like_builtin_math() {
    let spec = serde_json::json!({"kind": "dylib", "path": common::modules().cdylib, "config": {"kind": "math"}});
    let reward = RewardSpec::from_arg(&spec.to_string())
        .and_then(|s| s.build())
        .expect("loads");
    let problems = common::gsm8k();
    let samples: Vec<Sample> = corpus(&problems, 200, 5)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let builtin = MathReward::default().score_batch(&samples);
    let lib = reward.score_batch(&samples);
    for ((s, b), l) in samples.iter().zip(builtin).zip(lib) {
        let (b, l) = (b.expect("builtin"), l.expect("library"));
        assert_eq!(
            (b.value, &b.extracted),
            (l.value, &l.extracted),
            "{:?}",
            s.completion
        );
    }
    // The module's own errors come back as failed samples.
    let e = reward
        .score(&Sample::new("5", ""))
        .expect_err("empty reference");
    assert!(
        matches!(&e, RewardError::Module(m) if m.contains("reference")),
        "{e}"
    );
}

#[test]
fn example_cdylib_rejects_a_bad_config() {
    let e = load(
        &common::modules().cdylib,
        serde_json::json!({"kind": "nope"}),
    )
    .expect_err("bad config");
    assert!(
        matches!(&e, DylibError::Create { message, .. } if message.contains("nope")),
        "{e}"
    );
}

#[test]
fn c_module_round_trip_and_error_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = c_module(dir.path(), "lenreward", &[]);
    let m = load(&path, serde_json::json!(2)).expect("loads");
    assert_eq!(m.score(&Sample::new("abcd", "x")).map(|s| s.value), Ok(8.0));
    let mut with_meta = Sample::new("ab", "x");
    with_meta.metadata = serde_json::json!({"task": 3});
    let s = m.score(&with_meta).expect("scores");
    assert_eq!(
        (s.value, s.extracted.as_deref()),
        (4.0, Some("with-metadata"))
    );
    assert!(matches!(
        m.score(&Sample::new("NAN", "x")),
        Err(RewardError::NonFiniteScore(_))
    ));
    assert!(
        matches!(m.score(&Sample::new("FAIL", "x")), Err(RewardError::Module(s)) if s == "refusing this sample")
    );
    assert!(
        matches!(m.score(&Sample::new("BADRC", "x")), Err(RewardError::Protocol(s)) if s.contains('7'))
    );
    // Still usable after the errors; concurrent callers are serialised.
    std::thread::scope(|sc| {
        for i in 0..4 {
            let m = &m;
            sc.spawn(move || {
                for _ in 0..200 {
                    let c = "z".repeat(i + 1);
                    assert_eq!(
                        m.score(&Sample::new(c, "x")).map(|s| s.value),
                        Ok(2.0 * (i + 1) as f64)
                    );
                }
            });
        }
    });
    let e = load(&path, serde_json::json!("refuse")).expect_err("refused");
    assert!(
        matches!(&e, DylibError::Create { message, .. } if message == "this config is refused"),
        "{e}"
    );
}

#[test]
fn wrong_abi_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = c_module(dir.path(), "v2", &["-DABI_VERSION_OVERRIDE=2"]);
    let e = load(&path, serde_json::Value::Null).expect_err("wrong ABI");
    assert!(
        matches!(
            e,
            DylibError::AbiVersion {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("rebuild"), "{e}");
}

#[test]
fn missing_symbol_and_non_library_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = c_module(dir.path(), "noscore", &["-DNO_SCORE"]);
    let e = load(&path, serde_json::Value::Null).expect_err("missing symbol");
    assert!(
        matches!(
            e,
            DylibError::MissingSymbol {
                symbol: "nested_reft_reward_score",
                ..
            }
        ),
        "{e}"
    );
    let text = dir.path().join("libnot.so");
    std::fs::write(&text, "not a library").expect("write");
    assert!(matches!(
        load(&text, serde_json::Value::Null),
        Err(DylibError::Load { .. })
    ));
    assert!(matches!(
        load(&dir.path().join("absent.so"), serde_json::Value::Null),
        Err(DylibError::Load { .. })
    ));
}
