//! Helpers of the process tests: the binaries, a tiny configuration, a service process with
//! its log, metrics readers and the `nested-reft train` command of the tests.

#![allow(dead_code, clippy::unwrap_used)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const LEARNER: &str = env!("CARGO_BIN_EXE_nested-reft-learner");
pub const SERVER: &str = env!("CARGO_BIN_EXE_nested-reft-rollout-server");
pub const CLI: &str = env!("CARGO_BIN_EXE_nested-reft");

/// A tiny async configuration: 2 prompts × 2 completions of ≤ 8 tokens per batch.
pub fn tiny_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "mode = \"async\"\nsteps = 6\nseed = 5\nmax_staleness = 1\ncheckpoint_every = 3\n\
             keep_checkpoints = 2\nsave_model = false\nlearner_threads = 1\nserver_threads = 1\n\
             {extra}\n[generator]\nprompts_per_batch = 2\ngroup_size = 2\nmax_new_tokens = 8\n\
             temperature = 1.0\n[update]\ntemperature = 1.0\n"
        ),
    )
    .unwrap();
    path
}

pub struct Svc {
    pub child: Child,
    pub log: PathBuf,
}

impl Svc {
    pub fn start(bin: &str, config: &Path, runtime: &Path, state: &Path, extra: &[&str]) -> Self {
        Self::start_env(bin, config, runtime, state, extra, &[])
    }

    pub fn start_env(
        bin: &str,
        config: &Path,
        runtime: &Path,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Self {
        std::fs::create_dir_all(state).unwrap();
        let log = state.join(format!(
            "{}-{}.log",
            Path::new(bin).file_name().unwrap().to_string_lossy(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .arg("--runtime-dir")
            .arg(runtime)
            .arg("--state-dir")
            .arg(state)
            .args(["--peer-timeout", "300"])
            .args(extra)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the exit; panics with the log after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("no exit within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn step_lines(path: &Path) -> Vec<Value> {
    lines(path)
        .into_iter()
        .filter(|v| v.get("event").is_none())
        .collect()
}

/// Polls `cond` every 100 ms for up to `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool, logs: &[&Svc]) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            let all: Vec<String> = logs.iter().map(|s| s.log()).collect();
            panic!(
                "timed out waiting for {what}; logs:\n{}",
                all.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn latest(ckpt: &Path) -> Option<String> {
    std::fs::read_to_string(ckpt.join("LATEST"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The trained steps of a run directory: (step, batch id, reward mean), the last line of each
/// step (a resume rolls back the steps after its checkpoint).
pub fn trained_steps(dir: &Path) -> Vec<(u64, u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for v in step_lines(&dir.join("metrics.jsonl")) {
        let Some(u) = v.get("update").filter(|u| !u.is_null()) else {
            continue;
        };
        by_step.insert(
            v["step"].as_u64().unwrap(),
            (
                v["batch_id"].as_u64().unwrap(),
                u["reward_mean"].as_f64().unwrap(),
            ),
        );
    }
    by_step.into_iter().map(|(s, (b, r))| (s, b, r)).collect()
}

/// The files of a run's newest checkpoint that hold state: the model and the optimizer.
pub fn newest_checkpoint_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let ckpt = dir.join("checkpoints");
    let name = latest(&ckpt).expect("no checkpoint");
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| {
            (
                format!("{name}/{f}"),
                std::fs::read(ckpt.join(&name).join(f)).unwrap(),
            )
        })
        .collect()
}

/// `nested-reft train` on the tiny batches, with `extra` flags.
pub fn tiny_train(out: &Path, mode: &str, steps: &str, extra: &[&str]) -> Command {
    let mut cmd = train_cmd(out, mode, steps, "5", ("2", "2", "8"), extra);
    cmd.args(["--temperature", "1.0", "--checkpoint-every", "0"])
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

/// The update of the runs that compare weights or probes: steps that move the weights.
pub const SMALL_STEPS: &[&str] = &[
    "--temperature",
    "0.7",
    "--lr",
    "1e-4",
    "--checkpoint-every",
    "0",
];

/// `nested-reft train` into `out`: `mode`, `steps`, `seed`, the batch (prompts, completions
/// per prompt, new tokens), one thread for each process, `extra` flags; stderr piped.
pub fn train_cmd(
    out: &Path,
    mode: &str,
    steps: &str,
    seed: &str,
    (prompts, group, tokens): (&str, &str, &str),
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(CLI);
    cmd.args(["train", "--mode", mode, "--steps", steps, "--seed", seed])
        .args(["--prompts-per-batch", prompts, "-g", group])
        .args(["--max-new-tokens", tokens])
        .args(["--learner-threads", "1", "--server-threads", "1"])
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// `sync` mode with `flags`, 2 steps, SIGTERM, `--resume`, 2 more: the same as 4 uninterrupted
/// steps, bit for bit (weights, optimizer moments, the batches and their samples, the
/// rewards). The interrupted run's records of a batch pushed but not trained are lost with the
/// runtime directory; the server generates that batch again at the learner's handshake.
pub fn check_resumed_sync_run_equals_an_uninterrupted_one(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &Path, extra: &[&str]| {
        let mut cmd = train_cmd(out, "sync", "4", "5", ("2", "2", "16"), extra);
        cmd.args(flags);
        cmd.args([
            "--temperature",
            "1.0",
            "--lr",
            "1e-4",
            "--checkpoint-every",
            "2",
        ])
        .env("RAYON_NUM_THREADS", "1");
        cmd
    };
    let whole = dir.path().join("whole");
    let o = train(&whole, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let parts = dir.path().join("parts");
    let mut child = train(&parts, &[]).spawn().unwrap();
    let start = Instant::now();
    while trained_steps(&parts).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "step 2 never came"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "train exited before step 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped_at = trained_steps(&parts).len();
    assert!(
        (2..4).contains(&stopped_at),
        "stopped after {stopped_at} steps"
    );
    let o = train(&parts, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (a, b) = (trained_steps(&whole), trained_steps(&parts));
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!(a, b, "steps (step, batch, reward) differ");
    let samples = |d: &Path| -> Vec<Value> {
        let mut by_step = std::collections::BTreeMap::new();
        for v in lines(&d.join("samples.jsonl")) {
            by_step.insert(v["step"].as_u64().unwrap(), v);
        }
        by_step.into_values().collect()
    };
    assert_eq!(
        samples(&whole),
        samples(&parts),
        "the batches' samples differ"
    );
    let (ca, cb) = (
        newest_checkpoint_bytes(&whole),
        newest_checkpoint_bytes(&parts),
    );
    for ((na, ba), (nb, bb)) in ca.iter().zip(&cb) {
        assert_eq!(na, nb);
        assert!(
            ba == bb,
            "{na} differs between the whole and the resumed run"
        );
    }
}
