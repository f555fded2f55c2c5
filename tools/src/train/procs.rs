//! `sync` and `async` modes: `nested-reft train` starts the learner and the rollout server as
//! two processes, splits the CPU threads between them, shows one progress bar from the
//! learner's metrics, forwards Ctrl-C and stops both cleanly.

use super::config::{Mode, TrainConfig};
use super::plot;
use anyhow::{bail, Context, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The segments' name in the run's own runtime directory.
const JOB_NAME: &str = "train";

/// Options of the two-process run that are not part of the saved configuration.
#[derive(Debug, Clone, Default)]
pub struct ProcOptions {
    /// Continue from the output directory's checkpoint and server state.
    pub resume: bool,
    /// Children log JSON lines.
    pub log_json: bool,
}

/// Threads and cores of each process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Learner threads.
    pub learner: usize,
    /// Server threads.
    pub server: usize,
    /// Cores of the machine.
    pub cores: usize,
}

impl Split {
    /// Half of the cores each unless configured (at least one thread each).
    pub fn new(learner: usize, server: usize) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let l = if learner > 0 {
            learner
        } else {
            (cores / 2).max(1)
        };
        let s = if server > 0 {
            server
        } else {
            cores.saturating_sub(l).max(1)
        };
        Self {
            learner: l,
            server: s,
            cores,
        }
    }

    fn learner_cpus(&self) -> Vec<usize> {
        (0..self.learner).map(|c| c % self.cores).collect()
    }

    fn server_cpus(&self) -> Vec<usize> {
        (self.learner..self.learner + self.server)
            .map(|c| c % self.cores)
            .collect()
    }
}

/// The service binaries installed next to this one.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("while locating nested-reft")?;
    let dir = exe
        .parent()
        .context("nested-reft has no parent directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: the two-process modes run `{name}` from the directory of \
             nested-reft (install all three with `cargo install --locked --path tools`), or \
             use --mode local",
            path.display()
        );
    }
    Ok(path)
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("while checking the {}", self.name))?;
        }
        Ok(self.status)
    }

    fn terminate(&mut self) {
        if self.status.is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory involved.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }

    fn wait(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.poll()? {
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// Ends a process that cannot act on SIGTERM (a stopped one); its state on disk is what
    /// its last checkpoint or saved cursor holds.
    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// The process's error (from its last `Error:` line up to a backtrace) when it wrote one,
    /// else the last 15 lines of its log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if let Some(at) = lines.iter().rposition(|l| l.starts_with("Error: ")) {
            return lines[at..]
                .iter()
                .take_while(|l| !l.starts_with("Stack backtrace:"))
                .take(15)
                .copied()
                .collect::<Vec<_>>()
                .join("\n");
        }
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Runs the two processes until the learner finishes its steps (or Ctrl-C): start both,
/// supervise them (progress, signals, failures, hangs), then report.
pub fn run(cfg: &TrainConfig, opts: &ProcOptions) -> Result<()> {
    let f = &cfg.file;
    let launcher = Launcher::new(cfg, opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("while installing the signal handlers")?;
    }
    let (mut learner, mut server) = launcher.start_both()?;
    let mut progress = Progress::new(f.steps, cfg.output_dir.join("metrics.jsonl"));
    let mut hang = HangWatch::new(&launcher.runtime, Duration::from_secs_f64(f.hang_timeout_s));
    let result = supervise(
        cfg,
        [&mut learner, &mut server],
        &stop,
        &mut progress,
        &mut hang,
    );
    progress.bar.finish();
    let _ = std::fs::remove_dir_all(&launcher.runtime);
    result?;
    progress.update();
    report(cfg, &progress.curve)
}

/// Starts the service binaries of one run: their configuration, runtime directory, threads.
struct Launcher<'a> {
    cfg: &'a TrainConfig,
    opts: &'a ProcOptions,
    config_path: PathBuf,
    runtime: PathBuf,
    split: Split,
    learner_bin: PathBuf,
    server_bin: PathBuf,
}

impl<'a> Launcher<'a> {
    /// Finds the binaries, makes the run's runtime directory, clears a fresh run's outputs and
    /// says how the cores are split.
    fn new(cfg: &'a TrainConfig, opts: &'a ProcOptions) -> Result<Self> {
        let (f, out) = (&cfg.file, &cfg.output_dir);
        let learner_bin = sibling_binary("nested-reft-learner")?;
        let server_bin = sibling_binary("nested-reft-rollout-server")?;
        let split = Split::new(f.learner_threads, f.server_threads);
        let runtime = crate::service::default_runtime_dir().join(format!(
            "train-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&runtime)
            .with_context(|| format!("while creating {}", runtime.display()))?;
        if !opts.resume {
            // A fresh run starts fresh files (a resumed one appends to them).
            let _ = std::fs::remove_file(out.join("metrics.jsonl"));
            let _ = std::fs::remove_file(out.join("samples.jsonl"));
            let _ = std::fs::remove_dir_all(out.join("rollout-server"));
            let _ = std::fs::remove_dir_all(out.join("checkpoints"));
        }
        let on = |cpus: Vec<usize>| {
            if f.pin_cores {
                format!(" on CPUs {cpus:?}")
            } else {
                String::new()
            }
        };
        eprintln!(
            "mode {}: learner {} thread(s){}, rollout server {} thread(s){} of {} core(s); \
             max staleness {}; logs in {}",
            f.mode,
            split.learner,
            on(split.learner_cpus()),
            split.server,
            on(split.server_cpus()),
            split.cores,
            f.max_staleness,
            out.display()
        );
        Ok(Self {
            cfg,
            opts,
            config_path: out.join("config.toml"),
            runtime,
            split,
            learner_bin,
            server_bin,
        })
    }

    /// The learner, then the rollout server (the learner is stopped if the server fails to
    /// start).
    fn start_both(&self) -> Result<(Proc, Proc)> {
        let (f, out) = (&self.cfg.file, &self.cfg.output_dir);
        let mut learner_extra = vec!["--steps".to_string(), f.steps.to_string()];
        if self.opts.resume {
            learner_extra.push("--resume".into());
        }
        let mut learner = self.spawn(
            "learner",
            &self.learner_bin,
            out,
            self.split.learner,
            self.split.learner_cpus(),
            &learner_extra,
        )?;
        match self.spawn(
            "rollout-server",
            &self.server_bin,
            &out.join("rollout-server"),
            self.split.server,
            self.split.server_cpus(),
            &[],
        ) {
            Ok(server) => Ok((learner, server)),
            Err(e) => {
                learner.terminate();
                Err(e)
            }
        }
    }

    fn spawn(
        &self,
        name: &'static str,
        bin: &Path,
        state: &Path,
        threads: usize,
        cpus: Vec<usize>,
        extra: &[String],
    ) -> Result<Proc> {
        std::fs::create_dir_all(state)
            .with_context(|| format!("while creating {}", state.display()))?;
        let log = self.cfg.output_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("while creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .arg("--name")
            .arg(JOB_NAME)
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if self.opts.log_json {
            cmd.arg("--log-json");
        }
        if self.cfg.file.pin_cores {
            let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
            cmd.arg("--cpus").arg(list.join(","));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("while starting {}", bin.display()))?;
        Ok(Proc {
            name,
            child,
            log,
            status: None,
        })
    }
}

/// The progress bar, fed from the learner's metrics, and the reward curve for the plot.
struct Progress {
    bar: indicatif::ProgressBar,
    tty: bool,
    steps: u64,
    metrics: PathBuf,
    seen: usize,
    curve: Vec<(u64, f64, f64)>,
}

impl Progress {
    fn new(steps: u64, metrics: PathBuf) -> Self {
        Self {
            bar: super::progress_bar(steps),
            tty: std::io::stderr().is_terminal(),
            steps,
            metrics,
            seen: 0,
            curve: Vec::new(),
        }
    }

    /// Reads the steps written since the last call.
    fn update(&mut self) {
        for line in new_lines(&self.metrics, &mut self.seen) {
            if let Some(p) = parse_step(&line) {
                self.curve.push((p.step, p.reward, p.accuracy));
                self.bar.set_position(p.step);
                let msg = format!(
                    "reward {:.3} acc {:.2} | batch {} (staleness ≤ {})",
                    p.reward, p.accuracy, p.batch_id, p.staleness
                );
                if self.tty {
                    self.bar.set_message(msg);
                } else if !self.bar.is_finished() {
                    eprintln!("step {}/{}: {msg}", p.step, self.steps);
                }
            }
        }
    }
}

/// Follows both processes until both are done: forwards Ctrl-C, stops the pair when one fails
/// or hangs.
fn supervise(
    cfg: &TrainConfig,
    [learner, server]: [&mut Proc; 2],
    stop: &AtomicBool,
    progress: &mut Progress,
    hang: &mut HangWatch,
) -> Result<()> {
    let mut forwarded = false;
    loop {
        progress.update();
        // Relaxed: a plain flag set by the signal handler.
        if stop.load(Ordering::Relaxed) && !forwarded {
            progress.bar.suspend(|| {
                eprintln!("interrupted: stopping both processes after their current step")
            });
            learner.terminate();
            server.terminate();
            forwarded = true;
        }
        if let Some((side, silent)) = hang.look() {
            let (hung, other) = match side {
                Side::Learner => (learner, server),
                Side::Server => (server, learner),
            };
            return Err(stop_hung(cfg, hung, other, silent));
        }
        match (learner.poll()?, server.poll()?) {
            (Some(ls), _) if !ls.success() => {
                server.terminate();
                let _ = server.wait(Duration::from_secs(60));
                return Err(child_failed(learner, ls));
            }
            (_, Some(ss)) if !ss.success() && !forwarded => {
                learner.terminate();
                let _ = learner.wait(Duration::from_secs(120));
                return Err(child_failed(server, ss));
            }
            (Some(_), Some(_)) => return Ok(()),
            // The learner is done and told the server to stop; give it a moment.
            (Some(_), None) if server.wait(Duration::from_secs(30))?.is_none() => {
                server.terminate();
                server.wait(Duration::from_secs(120))?;
            }
            (None, Some(_)) if forwarded => {
                learner.wait(Duration::from_secs(600))?;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ends the hung process (a stopped one cannot act on SIGTERM), stops the other cleanly, and
/// says what happened.
fn stop_hung(
    cfg: &TrainConfig,
    hung: &mut Proc,
    other: &mut Proc,
    silent: Duration,
) -> anyhow::Error {
    let pid = hung.child.id();
    hung.kill();
    other.terminate();
    let _ = other.wait(Duration::from_secs(120));
    anyhow::anyhow!(
        "the {} (pid {pid}) is hung: no heartbeat for {:.0} s (hang_timeout_s is {}); it was \
         stopped (SIGSTOP, a debugger) or starved, so the run is stopped. Continue it with \
         `nested-reft train --resume --output-dir {}`; the end of {}:\n{}",
        hung.name,
        silent.as_secs_f64(),
        cfg.file.hang_timeout_s,
        cfg.output_dir.display(),
        hung.log.display(),
        hung.log_tail()
    )
}

/// The reward plot and where the run's outputs are.
fn report(cfg: &TrainConfig, curve: &[(u64, f64, f64)]) -> Result<()> {
    let (f, out) = (&cfg.file, &cfg.output_dir);
    let title = format!(
        "{} · mode {} · correction {}",
        f.model
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| protocol::assets::DEFAULT_MODEL_FILE.into()),
        f.mode,
        f.update.correction
    );
    plot::reward_curve(&out.join("reward.svg"), &title, curve)?;
    eprintln!("metrics: {}", out.join("metrics.jsonl").display());
    eprintln!("plot:    {}", out.join("reward.svg").display());
    if f.save_model && out.join("model").is_dir() {
        eprintln!("model:   {}", out.join("model").display());
        if out.join("adapter").is_dir() {
            eprintln!("adapter: {}", out.join("adapter").display());
        }
    }
    if matches!(f.mode, Mode::Sync | Mode::Async) {
        eprintln!("checkpoints: {}", out.join("checkpoints").display());
    }
    eprintln!("{}", super::space_line(out));
    Ok(())
}

/// The two sides of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Learner,
    Server,
}

/// Watches both processes' heartbeats in the ring (each beats once a second from a thread of
/// its own) and names one that holds its side of the ring but has stopped beating.
struct HangWatch {
    runtime: PathBuf,
    timeout: Duration,
    ring: Option<protocol::Observer>,
    last_look: Instant,
}

impl HangWatch {
    /// Beyond the timeout the waiting process reports the hang in its own log first; the run
    /// stops this much later.
    const GRACE: Duration = Duration::from_secs(3);

    fn new(runtime: &Path, timeout: Duration) -> Self {
        Self {
            runtime: runtime.to_owned(),
            timeout,
            ring: None,
            last_look: Instant::now(),
        }
    }

    /// At most once a second: the side that is hung, and for how long it has been silent.
    fn look(&mut self) -> Option<(Side, Duration)> {
        if self.last_look.elapsed() < Duration::from_secs(1) {
            return None;
        }
        self.last_look = Instant::now();
        if self.ring.is_none() {
            // The server creates the ring once it is up; until then there is nothing to watch.
            self.ring = protocol::RolloutRing::observe(&self.runtime, JOB_NAME).ok();
        }
        let ring = self.ring.as_ref()?;
        [
            (Side::Learner, ring.consumer()),
            (Side::Server, ring.producer()),
        ]
        .into_iter()
        .find(|(_, l)| l.held && l.silent > self.timeout + Self::GRACE)
        .map(|(side, l)| (side, l.silent))
    }
}

fn child_failed(p: &Proc, status: ExitStatus) -> anyhow::Error {
    anyhow::anyhow!(
        "the {} failed ({status}); the end of {}:\n{}",
        p.name,
        p.log.display(),
        p.log_tail()
    )
}

/// Lines of `path` after the first `seen` (updates `seen`).
fn new_lines(path: &Path, seen: &mut usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    // Only complete lines: the writer may be mid-line.
    let complete: Vec<String> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end().to_string())
        .collect();
    let out = complete
        .get(*seen..)
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    *seen = complete.len().max(*seen);
    out
}

struct StepPoint {
    step: u64,
    batch_id: u64,
    reward: f64,
    accuracy: f64,
    staleness: u64,
}

fn parse_step(line: &str) -> Option<StepPoint> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let u = v.get("update")?;
    Some(StepPoint {
        step: v.get("step")?.as_u64()?,
        batch_id: v.get("batch_id")?.as_u64()?,
        reward: u.get("reward_mean")?.as_f64()?,
        accuracy: u.get("accuracy")?.as_f64()?,
        staleness: v.get("assembly")?.get("max_staleness")?.as_u64()?,
    })
}
