//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[path = "corpus.rs"]
pub mod corpus;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use corpus::Problem;

/// The 100 GSM8K problems; fails with instructions when the assets are missing.
pub fn gsm8k() -> Vec<Problem> {
    let problems = corpus::load_gsm8k().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        problems.len(),
        100,
        "expected the 100 GSM8K problems; run `tools/fetch-assets.sh gsm8k`"
    );
    problems
}

/// The Python example module.
pub fn python_module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("modules/python/math_reward.py")
}

/// Paths of the built example modules.
#[derive(Debug)]
pub struct Modules {
    pub rs_process: PathBuf,
    pub cdylib: PathBuf,
}

/// Builds the Rust example modules (once per test binary) into the target directory this test
/// binary lives in, with the same profile, and returns their paths. Set
/// `NESTED_REFT_REWARD_RS_PROCESS` and `NESTED_REFT_REWARD_CDYLIB` to use prebuilt ones.
pub fn modules() -> &'static Modules {
    static M: OnceLock<Modules> = OnceLock::new();
    M.get_or_init(|| {
        if let (Some(p), Some(c)) = (
            std::env::var_os("NESTED_REFT_REWARD_RS_PROCESS"),
            std::env::var_os("NESTED_REFT_REWARD_CDYLIB"),
        ) {
            return Modules {
                rs_process: p.into(),
                cdylib: c.into(),
            };
        }
        // <target>/<profile>/deps/<this test binary>
        let exe = std::env::current_exe().expect("path of the test binary");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "reward-rs-process",
            "-p",
            "reward-cdylib",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd
            .status()
            .expect("running cargo to build the example modules");
        assert!(
            status.success(),
            "building the example reward modules failed: {status}"
        );
        let m = Modules {
            rs_process: profile_dir.join("reward-rs-process"),
            cdylib: profile_dir.join(format!(
                "{}reward_cdylib{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            )),
        };
        assert!(m.rs_process.is_file(), "missing {}", m.rs_process.display());
        assert!(m.cdylib.is_file(), "missing {}", m.cdylib.display());
        m
    })
}
