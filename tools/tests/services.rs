//! The learner and the rollout server as real processes on the real SmolLM2 weights (tiny
//! batches): restarts, checkpoints, clean stops, startup errors, the handshake, and `sync`
//! against `local`.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_resumed_sync_run_equals_an_uninterrupted_one() {
    check_resumed_sync_run_equals_an_uninterrupted_one(&[]);
}

#[test]
fn either_side_restarts_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), "");
    let runtime = dir.path().join("run");
    let (lstate, sstate) = (dir.path().join("learner"), dir.path().join("server"));
    let metrics = lstate.join("metrics.jsonl");
    let ckpt = lstate.join("checkpoints");
    let mut server = Svc::start(SERVER, &cfg, &runtime, &sstate, &[]);
    let mut learner = Svc::start(LEARNER, &cfg, &runtime, &lstate, &["--resume"]);

    // 3 async steps write checkpoints and metrics. A step's checkpoint is written before its
    // metrics line (the line records how long the checkpoint took), so once the line of step 3
    // (or a later one: steps of the tiny model are quick) is there, so is a checkpoint >= 3.
    let step_of =
        |name: Option<String>| -> Option<u64> { name?.strip_prefix("step-")?.parse().ok() };
    wait_for(
        "the metrics line of step 3",
        Duration::from_secs(600),
        || {
            step_lines(&metrics)
                .iter()
                .any(|v| v["step"].as_u64().is_some_and(|s| s >= 3))
        },
        &[&learner, &server],
    );
    assert!(
        step_of(latest(&ckpt)).is_some_and(|s| s >= 3),
        "{:?}",
        latest(&ckpt)
    );
    // SIGKILL the learner; the checkpoint it resumes from is the one LATEST names then.
    learner.signal(libc::SIGKILL);
    learner.wait(Duration::from_secs(30));
    let resumed_at: u64 = latest(&ckpt).unwrap()["step-".len()..].parse().unwrap();
    let before = step_lines(&metrics);
    let trained_before: Vec<u64> = before
        .iter()
        .filter(|v| v["step"].as_u64().unwrap() <= resumed_at)
        .map(|v| v["batch_id"].as_u64().unwrap())
        .collect();
    let mut learner = Svc::start(LEARNER, &cfg, &runtime, &lstate, &["--resume"]);
    wait_for(
        "a step after the resume",
        Duration::from_secs(600),
        || {
            lines(&metrics)
                .iter()
                .skip_while(|v| v.get("event").is_none_or(|e| e != "resumed"))
                .any(|v| v.get("event").is_none())
        },
        &[&learner, &server],
    );
    let log = learner.log();
    assert!(log.contains("resumed from"), "{log}");
    let all = lines(&metrics);
    let resume = all
        .iter()
        .position(|v| v.get("event").is_some_and(|e| e == "resumed"))
        .unwrap();
    assert_eq!(all[resume]["step"].as_u64().unwrap(), resumed_at);
    // The steps that ran after the checkpoint are reported as rolled back.
    let rolled: Vec<u64> = before
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .filter(|&s| s > resumed_at)
        .collect();
    assert_eq!(all[resume]["rolled_back_steps"], serde_json::json!(rolled));
    // The first step after the resume is step resumed_at + 1, on a batch never trained before.
    let after: Vec<&Value> = all[resume + 1..]
        .iter()
        .filter(|v| v.get("event").is_none())
        .collect();
    assert_eq!(after[0]["step"].as_u64().unwrap(), resumed_at + 1);
    let seen_max = before
        .iter()
        .map(|v| v["batch_id"].as_u64().unwrap())
        .max()
        .unwrap();
    for v in &after {
        let b = v["batch_id"].as_u64().unwrap();
        assert!(
            b > seen_max && !trained_before.contains(&b),
            "batch {b} trained again after the resume: {all:?}"
        );
    }

    // SIGKILL the server mid-batch: the learner waits, says so, and goes on after a restart.
    let pushed = lines(&sstate.join("metrics.jsonl")).len();
    wait_for(
        "the server to be generating",
        Duration::from_secs(300),
        || lines(&sstate.join("metrics.jsonl")).len() > pushed,
        &[&learner, &server],
    );
    std::thread::sleep(Duration::from_millis(500));
    server.signal(libc::SIGKILL);
    server.wait(Duration::from_secs(30));
    wait_for(
        "the learner to say it waits",
        Duration::from_secs(300),
        || learner.log().contains("waiting for the rollout server"),
        &[&learner],
    );
    assert!(learner.alive(), "{}", learner.log());
    let steps_then = step_lines(&metrics).len();
    let server = Svc::start(SERVER, &cfg, &runtime, &sstate, &[]);
    wait_for(
        "a step after the server restart",
        Duration::from_secs(600),
        || step_lines(&metrics).len() > steps_then,
        &[&learner, &server],
    );
    let slog = server.log();
    assert!(slog.contains("continuing from"), "{slog}");
    // Batch ids stay unique among everything trained since the resume.
    let after: Vec<u64> = lines(&metrics)
        .iter()
        .skip(resume + 1)
        .filter(|v| v.get("event").is_none())
        .map(|v| v["batch_id"].as_u64().unwrap())
        .collect();
    let mut uniq = after.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), after.len(), "{after:?}");

    // SIGTERM to the learner: it checkpoints and exits 0; the server stays up and waits.
    let mut server = server;
    learner.signal(libc::SIGTERM);
    let status = learner.wait(Duration::from_secs(300));
    assert!(status.success(), "{status:?}\n{}", learner.log());
    let step_now = step_lines(&metrics).last().unwrap()["step"]
        .as_u64()
        .unwrap();
    assert_eq!(latest(&ckpt).unwrap(), format!("step-{step_now:08}"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        server.alive(),
        "the server must wait for a restarted learner"
    );
    // SIGTERM to the server: a clean exit too.
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(300));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.log().contains("stopped"), "{}", server.log());
}

#[test]
fn sync_mode_gives_the_weights_of_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = Vec::new();
    for mode in ["local", "sync"] {
        let out = dir.path().join(mode);
        // One thread everywhere: the local run's matmuls then sum in the same order.
        let o = train_cmd(&out, mode, "2", "11", ("4", "4", "32"), SMALL_STEPS)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let steps: Vec<Value> = step_lines(&out.join("metrics.jsonl"));
        let version = steps.last().unwrap()["update"]["version"].as_u64().unwrap();
        assert!(
            version >= 1,
            "{mode}: no update was made, the comparison would be empty"
        );
        models.push(out.join("model/model.safetensors"));
    }
    // Every mode writes the same run outputs: one decoded sample per trained batch, here
    // the same samples since the batches are the same.
    let samples: Vec<Vec<Value>> = ["local", "sync"]
        .iter()
        .map(|m| lines(&dir.path().join(m).join("samples.jsonl")))
        .collect();
    assert_eq!(samples[0].len(), 2, "{:?}", samples[0]);
    assert_eq!(samples[0], samples[1]);
    for (i, s) in samples[0].iter().enumerate() {
        assert_eq!(s["step"].as_u64(), Some(i as u64 + 1), "{s}");
        assert!(
            s["completion"].as_str().is_some_and(|c| !c.is_empty()),
            "{s}"
        );
        assert!(
            s["prompt"].as_str().is_some_and(|p| p.contains("user")),
            "{s}"
        );
    }
    let a = model::candle_core::safetensors::load(&models[0], &model::candle_core::Device::Cpu)
        .unwrap();
    let b = model::candle_core::safetensors::load(&models[1], &model::candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (name, ta) in &a {
        let tb = &b[name];
        let d = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    // Same seed, same batches, same f32 arithmetic: the weights agree to f32 rounding. The
    // bound allows for a different summation order in one kernel, nothing more.
    assert!(worst <= 1e-6, "max |Δw| = {worst}");
}

#[test]
fn the_8bit_behavior_follows_the_learners_weights_in_local_and_sync_modes() {
    // After every update the behavior is re-quantized from the new f32 weights: the log-probs of
    // a fixed probe under the behavior that samples equal those of a fresh re-quantization of
    // the learner's weights of the same version (the learner compares them and writes each
    // comparison in its metrics). The updates move the probe by far more than the tolerance, so
    // a behavior left on older weights would be caught.
    let dir = tempfile::tempdir().unwrap();
    for mode in ["local", "sync"] {
        let out = dir.path().join(mode);
        let o = train_cmd(&out, mode, "3", "11", ("4", "4", "32"), SMALL_STEPS)
            .args(["--behavior-weights", "q8_0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{mode}: {stderr}");
        let steps = step_lines(&out.join("metrics.jsonl"));
        let mut probes: Vec<(u64, f64, f64)> = Vec::new();
        for l in &steps {
            for p in l["probes"].as_array().unwrap() {
                let diff = p["max_abs_diff"].as_f64().unwrap();
                let version = p["version"].as_u64().unwrap();
                assert!(
                    diff <= 1e-3,
                    "{mode}: version {version}: probe differs by {diff}: {p}"
                );
                assert!(
                    p["learner_logprob"].as_f64().unwrap().is_finite(),
                    "{mode}: {p}"
                );
                probes.push((version, p["learner_logprob"].as_f64().unwrap(), diff));
            }
        }
        probes.sort_by_key(|p| p.0);
        let versions: Vec<u64> = probes.iter().map(|p| p.0).collect();
        let last = steps.last().unwrap()["update"]["version"].as_u64().unwrap();
        assert!(
            last >= 2,
            "{mode}: only {last} updates; the check would be weak"
        );
        // Every version the behavior sampled with was checked (in sync mode the probe of the
        // version trained last arrives after the last metrics line).
        let want: Vec<u64> = (0..last).collect();
        for v in &want {
            assert!(
                versions.contains(v),
                "{mode}: version {v} unchecked: {versions:?}"
            );
        }
        let first = probes.first().unwrap().1;
        let moved = probes
            .iter()
            .map(|p| (p.1 - first).abs())
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-2,
            "{mode}: the updates moved the probe by only {moved}: {probes:?}"
        );
        if mode == "local" {
            assert!(!stderr.contains("does not match"), "{stderr}");
        }
    }
}

/// Listens on a NOTIFY_SOCKET; returns what was received.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    (sock, path)
}

fn notifications(sock: &UnixDatagram) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
        out.push('\n');
    }
    out
}

/// Runs `bin` to its exit with a NOTIFY_SOCKET; returns (success, stderr, notifications).
fn run_to_exit(bin: &str, dir: &Path, config: &Path, extra: &[&str]) -> (bool, String, String) {
    let (sock, path) = notify_socket(dir);
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--peer-timeout", "5"])
        .args(extra)
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    let got = notifications(&sock);
    let _ = std::fs::remove_file(&path);
    (status.success(), err, got)
}

#[test]
fn startup_errors_are_one_clear_message_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A dataset file with a bad line, a model directory without a tokenizer.
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"question\": \"1+1?\", \"answer\": \"2\"}\nnot json\n",
    )
    .unwrap();
    // A complete model directory but for its tokenizer.
    let no_tok = d.join("no-tokenizer");
    let m = model::load_model(
        &protocol::assets::default_model_path(),
        &model::LoadOptions::default(),
    )
    .unwrap();
    model::save_pretrained(&m.decoder, &m.tokenizer, &no_tok).unwrap();
    drop(m);
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "missing model",
            LEARNER,
            "model = \"/nonexistent/model.gguf\"".into(),
            "/nonexistent/model.gguf",
        ),
        (
            "missing tokenizer",
            SERVER,
            format!("model = {:?}", no_tok.to_str().unwrap()),
            "tokenizer.json",
        ),
        (
            "bad config value",
            LEARNER,
            "steps = 0".into(),
            "steps must be at least 1",
        ),
        (
            "bad dataset line in strict mode",
            SERVER,
            format!(
                "[dataset]\nkind = \"jsonl\"\npath = {:?}\nstrict = true",
                d.join("bad.jsonl").to_str().unwrap()
            ),
            "bad.jsonl:2",
        ),
        (
            "reward module that fails to start",
            SERVER,
            "[reward]\nkind = \"external\"\ncommand = [\"/nonexistent/reward-module\"]".into(),
            "cannot start the reward module",
        ),
    ];
    for (what, bin, toml, needle) in cases {
        let case = d.join(what.replace(' ', "-"));
        std::fs::create_dir_all(&case).unwrap();
        let cfg = case.join("config.toml");
        std::fs::write(&cfg, format!("{toml}\n")).unwrap();
        let (ok, err, notes) = run_to_exit(bin, &case, &cfg, &[]);
        assert!(!ok, "{what}: exited 0\n{err}");
        assert!(
            !notes.contains("READY=1"),
            "{what}: READY before the error: {notes}"
        );
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Error")).collect();
        assert_eq!(
            errors.len(),
            1,
            "{what}: one error message expected:\n{err}"
        );
        assert!(
            err.contains(needle),
            "{what}: the message should mention {needle:?}:\n{err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}

#[test]
fn a_model_mismatch_is_refused_at_the_handshake_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The same weights under a different configuration: another model hash.
    let other = d.join("other-model");
    let m = model::load_model(
        &protocol::assets::default_model_path(),
        &model::LoadOptions::default(),
    )
    .unwrap();
    model::save_pretrained(&m.decoder, &m.tokenizer, &other).unwrap();
    let cfg_path = other.join("config.json");
    let mut hf: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    hf["rope_theta"] = serde_json::json!(hf["rope_theta"].as_f64().unwrap() * 2.0);
    std::fs::write(&cfg_path, hf.to_string()).unwrap();
    let learner_cfg = tiny_config(d, "");
    let server_dir = d.join("s");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server_cfg = tiny_config(
        &server_dir,
        &format!("model = {:?}", other.to_str().unwrap()),
    );
    let runtime = d.join("run");
    let mut learner = Svc::start(LEARNER, &learner_cfg, &runtime, &d.join("ls"), &[]);
    let mut server = Svc::start(SERVER, &server_cfg, &runtime, &d.join("ss"), &[]);
    let ls = learner.wait(Duration::from_secs(300));
    let ss = server.wait(Duration::from_secs(300));
    assert!(!ls.success() && !ss.success());
    for (who, log) in [("learner", learner.log()), ("server", server.log())] {
        assert!(
            log.contains("handshake mismatch on model_hash"),
            "{who}: {log}"
        );
        assert!(
            log.contains("(learner)") && log.contains("(rollout-server)"),
            "{who} must name both sides: {log}"
        );
    }
}

/// The pid of `parent`'s child whose command name starts `bin` (the kernel keeps 15 bytes).
fn child_pid(parent: u32, bin: &str) -> i32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the name may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if ppid == Some(parent.to_string().as_str()) && bin.starts_with(comm) {
            return pid;
        }
    }
    panic!("no child {bin} of {parent}");
}

fn wait_for_steps(out: &Path, n: usize, child: &mut Child) {
    let start = Instant::now();
    while trained_steps(out).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "step {n} never came"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "train exited before step {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process stopped (SIGSTOP) beyond `--hang-timeout` is hung, not dead: its peer names it
/// (and its pid) in its log, and `nested-reft train` stops the run with an error naming it.
#[test]
fn a_process_stopped_beyond_the_timeout_stops_the_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, name, peer_log) in [
        ("nested-reft-learner", "learner", "rollout-server.log"),
        (
            "nested-reft-rollout-server",
            "rollout-server",
            "learner.log",
        ),
    ] {
        let out = dir.path().join(name);
        let mut child = tiny_train(&out, "async", "200", &["--hang-timeout", "5"])
            .spawn()
            .unwrap();
        wait_for_steps(&out, 1, &mut child);
        let pid = child_pid(child.id(), bin);
        // SAFETY: kill(2) on a child of the train process, which cannot reap it while the
        // process is stopped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(120) {
                // SAFETY: as above; let the process go before failing.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                let _ = child.kill();
                panic!("train did not stop within 120 s of stopping the {name}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains(&format!("the {name} (pid {pid}) is hung")),
            "train must name the hung {name} and its pid: {err}"
        );
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "stopped before the timeout"
        );
        let log = std::fs::read_to_string(out.join(peer_log)).unwrap();
        assert!(
            log.contains(&format!("(pid {pid}) is hung")),
            "its peer must report it: {log}"
        );
        // The hung process was ended: its pid is gone.
        // SAFETY: signal 0 only checks for existence.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "{name} still exists");
    }
}

/// Either process stopped (SIGSTOP) and continued (SIGCONT) within the timeout: the run goes
/// on, with every batch trained once and none lost, and no hang reported.
#[test]
fn a_process_stopped_within_the_timeout_goes_on_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = tiny_train(&out, "sync", "5", &["--hang-timeout", "30"])
        .spawn()
        .unwrap();
    for (at, bin) in [
        (1, "nested-reft-learner"),
        (3, "nested-reft-rollout-server"),
    ] {
        wait_for_steps(&out, at, &mut child);
        let pid = child_pid(child.id(), bin);
        // SAFETY: kill(2) on a live child of the train process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        std::thread::sleep(Duration::from_secs(4));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let steps = trained_steps(&out);
    let ids: Vec<(u64, u64)> = steps.iter().map(|&(s, b, _)| (s, b)).collect();
    assert_eq!(
        ids,
        (1..=5).map(|s| (s, s - 1)).collect::<Vec<_>>(),
        "every batch once, in order"
    );
    let last = step_lines(&out.join("metrics.jsonl")).pop().unwrap();
    assert_eq!(last["duplicate_records"], 0);
    assert_eq!(last["peer_hangs"], 0, "{last}");
    let server = lines(&out.join("rollout-server").join("metrics.jsonl"));
    assert!(server.iter().all(|l| l["peer_hangs"] == 0));
    for log in ["learner.log", "rollout-server.log"] {
        let text = std::fs::read_to_string(out.join(log)).unwrap();
        assert!(!text.contains("is hung"), "{log}: {text}");
    }
}

/// The ring or the weight store truncated under a running `nested-reft train`: the processes
/// stop with an error that says so, instead of dying of SIGBUS.
#[test]
fn a_segment_truncated_under_a_run_stops_it_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["train.ring", "train.weights"] {
        let runtime = dir.path().join(format!("xdg-{file}"));
        std::fs::create_dir_all(&runtime).unwrap();
        let out = dir.path().join(file);
        let mut child = tiny_train(&out, "async", "200", &[])
            .env("XDG_RUNTIME_DIR", &runtime)
            .spawn()
            .unwrap();
        wait_for_steps(&out, 1, &mut child);
        let jobs: Vec<_> = std::fs::read_dir(runtime.join("nested-reft"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(jobs.len(), 1, "one run directory");
        let path = jobs[0].path().join(file);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(4096))
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("train went on for 120 s after {file} was truncated");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains(&format!("{} was truncated while mapped", path.display())),
            "{file}: {err}"
        );
        assert!(!err.contains("signal"), "a process died of a signal: {err}");
    }
}

#[test]
fn a_failed_checkpoint_is_removed_and_the_policy_is_followed() {
    // Checkpoints at steps 2, 4 and 6; the second (step 4) fails with ENOSPC while writing the
    // optimizer's moments (file 1).
    for policy in ["retry", "stop"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "mode = \"async\"\nsteps = 6\nseed = 5\ncheckpoint_every = 2\nkeep_checkpoints = 1\n\
                 checkpoint_failure = \"{policy}\"\nsave_model = false\nlearner_threads = 1\n\
                 server_threads = 1\n[generator]\nprompts_per_batch = 2\ngroup_size = 2\n\
                 max_new_tokens = 8\ntemperature = 1.0\n[update]\ntemperature = 1.0\n"
            ),
        )
        .unwrap();
        let runtime = dir.path().join("run");
        let (lstate, sstate) = (dir.path().join("learner"), dir.path().join("server"));
        let _server = Svc::start(SERVER, &cfg, &runtime, &sstate, &[]);
        let mut learner = Svc::start(
            LEARNER,
            &cfg,
            &runtime,
            &lstate,
            &["--fail-checkpoint-write", "2:1"],
        );
        let status = learner.wait(Duration::from_secs(900));
        let log = learner.log();
        // A log file gets no colour escapes.
        assert!(!log.contains('\u{1b}'), "{log}");
        let ckpt = lstate.join("checkpoints");
        let mut names: Vec<String> = std::fs::read_dir(&ckpt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let steps = step_lines(&lstate.join("metrics.jsonl"));
        let line = |step: u64| {
            steps
                .iter()
                .find(|v| v["step"].as_u64() == Some(step))
                .unwrap_or_else(|| panic!("{policy}: no line of step {step}: {steps:?}"))
                .clone()
        };
        if policy == "retry" {
            // Training went on and the next checkpoint succeeded; the failure is in the metrics.
            assert!(status.success(), "{status:?}\n{log}");
            assert_eq!(names, ["LATEST", "step-00000006"], "{log}");
            assert_eq!(latest(&ckpt).unwrap(), "step-00000006");
            assert_eq!(line(2)["checkpoint_failures"], 0);
            let failed = line(4);
            assert_eq!(failed["checkpoint_failures"], 1, "{failed}");
            let error = failed["checkpoint_error"].as_str().unwrap();
            assert!(
                error.contains("optimizer.safetensors")
                    && error.contains("No space left on device"),
                "{error}"
            );
            assert_eq!(line(6)["checkpoint_failures"], 1);
            assert!(line(6).get("checkpoint_error").is_none());
            assert!(log.contains("training goes on"), "{log}");
        } else {
            // The learner stopped with the error; LATEST names the checkpoint of step 2.
            assert!(!status.success(), "{log}");
            assert_eq!(names, ["LATEST", "step-00000002"], "{log}");
            assert_eq!(latest(&ckpt).unwrap(), "step-00000002");
            assert!(
                log.contains("optimizer.safetensors")
                    && log.contains("No space left on device")
                    && log.contains("checkpoint_failure"),
                "{log}"
            );
            assert_eq!(steps.last().unwrap()["step"], 3, "{steps:?}");
        }
    }
}
