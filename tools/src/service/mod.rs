//! The two service processes: [`learner`] and [`server`] (the rollout server).
//!
//! Both read the same TOML configuration as `nested-reft train` and meet in a runtime
//! directory: the server creates the rollout ring `<name>.ring`, the learner creates the weight
//! store `<name>.weights` and listens for the control channel, whose current name it writes to
//! `<name>.control` (replaced atomically after every disconnection). A restarted peer finds the
//! other through these three files; nothing has to be done by hand.
//!
//! Startup: each side loads and validates everything, creates its segment, then waits for the
//! other side's segment and the control handshake (layout version, model hash, manifest hash
//! compared; a mismatch names both values and exits non-zero). Only then does it tell systemd
//! READY. The watchdog is pinged each time the loop goes round: after each step or batch, and
//! every few seconds while it waits for the peer.

mod device_slots;
pub mod learner;
pub mod server;

use anyhow::{bail, Context, Result};
use clap::Args;
use protocol::{Descriptor, Limits};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::train::TrainFile;

/// Options both service binaries share.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The TOML configuration (the keys of `nested-reft train --print-config`); without it,
    /// the defaults of `nested-reft train`.
    #[arg(long, short, value_name = "FILE", env = "NESTED_REFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the shared-memory segments and the control name file [default:
    /// `$RUNTIME_DIRECTORY` under systemd, else `$XDG_RUNTIME_DIR/nested-reft`, else
    /// `/dev/shm/nested-reft-<uid>`].
    #[arg(long, value_name = "DIR", env = "NESTED_REFT_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Name of this training job's segments (two jobs on one node need two names).
    #[arg(long, default_value = "nested-reft", env = "NESTED_REFT_NAME")]
    pub name: String,
    /// Where this process keeps its state (metrics, checkpoints or its data cursor)
    /// [default: `$STATE_DIRECTORY` under systemd, else the config's `output_dir`].
    #[arg(long, value_name = "DIR", env = "NESTED_REFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log as JSON lines instead of readable text.
    #[arg(long, env = "NESTED_REFT_LOG_JSON")]
    pub log_json: bool,
    /// Pin this process to these CPU cores, e.g. `0` or `0,1`.
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    pub cpus: Option<Vec<usize>>,
    /// How long to wait for the other process at startup before giving up, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub peer_timeout: f64,
    /// Override the config's `[lora]` (both services must agree).
    #[command(flatten)]
    pub lora: crate::train::LoraArgs,
}

/// Resolved locations of one service process.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The runtime directory (segments, control name file).
    pub runtime_dir: PathBuf,
    /// The job's segment name.
    pub name: String,
    /// This process's state directory.
    pub state_dir: PathBuf,
}

impl Paths {
    /// The control name file.
    pub fn control_file(&self) -> PathBuf {
        self.runtime_dir.join(format!("{}.control", self.name))
    }
}

impl ServiceArgs {
    /// The common start of both services: logging, the configuration, the directories, CPU
    /// pinning, the thread pools (`threads` picks this role's count) and the stop flag.
    pub fn start(
        &self,
        role: &str,
        threads: impl Fn(&TrainFile) -> usize,
    ) -> Result<(TrainFile, Paths, Arc<AtomicBool>)> {
        init_logging(self.log_json);
        let cfg = self.load_config()?;
        let paths = self.paths(&cfg, role)?;
        if let Some(cpus) = &self.cpus {
            pin_cpus(cpus)?;
        }
        let threads = apply_threads(threads(&cfg));
        tracing::info!(threads, "{role}: CPU threads of this process");
        let stop = stop_flag()?;
        Ok((cfg, paths, stop))
    }

    /// Reads and validates the configuration file.
    pub fn load_config(&self) -> Result<TrainFile> {
        let mut cfg = crate::train::load_config_file(self.config.as_deref())?;
        self.lora.apply(&mut cfg.lora)?;
        Ok(cfg)
    }

    /// Resolves the directories; `role` names the state sub-directory when the state
    /// directory comes from the config's `output_dir`.
    pub fn paths(&self, cfg: &TrainFile, role: &str) -> Result<Paths> {
        let runtime_dir = match &self.runtime_dir {
            Some(d) => d.clone(),
            None => match std::env::var_os("RUNTIME_DIRECTORY") {
                // systemd may list several directories separated by ':'; ours is the first.
                Some(v) => PathBuf::from(
                    v.to_string_lossy()
                        .split(':')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
                None => default_runtime_dir(),
            },
        };
        let state_dir = match (&self.state_dir, std::env::var_os("STATE_DIRECTORY")) {
            (Some(d), _) => d.clone(),
            (None, Some(v)) => PathBuf::from(
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            (None, None) => match &cfg.output_dir {
                Some(d) if role == "learner" => d.clone(),
                Some(d) => d.join(role),
                None => bail!(
                    "no state directory: give --state-dir (or output_dir in the config, or run \
                     under systemd with StateDirectory=)"
                ),
            },
        };
        for d in [&runtime_dir, &state_dir] {
            std::fs::create_dir_all(d)
                .with_context(|| format!("while creating the directory {}", d.display()))?;
        }
        if self.name.is_empty() || self.name.contains('/') {
            bail!(
                "--name {:?} must be non-empty and contain no '/'",
                self.name
            );
        }
        Ok(Paths {
            runtime_dir,
            name: self.name.clone(),
            state_dir,
        })
    }

    /// The startup wait for the peer.
    pub fn peer_timeout(&self) -> Result<Duration> {
        if !(self.peer_timeout.is_finite() && self.peer_timeout > 0.0) {
            bail!(
                "--peer-timeout must be a positive number of seconds, got {}",
                self.peer_timeout
            );
        }
        Ok(Duration::from_secs_f64(self.peer_timeout))
    }
}

/// `$XDG_RUNTIME_DIR/nested-reft`, else `/dev/shm/nested-reft-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
    {
        Some(d) => d.join("nested-reft"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => PathBuf::from(format!("/dev/shm/nested-reft-{}", unsafe {
            libc::getuid()
        })),
    }
}

/// Sets up `tracing` logging to stderr: readable text, or JSON lines with `json`. The level
/// comes from `NESTED_REFT_LOG` (e.g. `debug`), default `info`. Text is coloured only when
/// stderr is a terminal and `NO_COLOR` is unset: a log file (`nested-reft train` sends each
/// service's stderr to one) or the journal gets plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NESTED_REFT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    // A second initialisation (tests) is harmless: the first subscriber stays.
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Whether log text is coloured: on a terminal, unless `NO_COLOR` is set to anything
/// non-empty (the convention of no-color.org).
pub fn use_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Sizes candle's thread pools for this process: `threads` from the config, else half of
/// the machine's cores (the other half is the peer's). `RAYON_NUM_THREADS` set by the caller
/// (e.g. `nested-reft train`) wins. Call before any model work.
pub fn apply_threads(threads: usize) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = if threads > 0 {
        threads
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / 2).max(1)
    };
    // Single-threaded at this point (before any pool starts), so changing the environment
    // races with nothing.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// Pins the calling process to `cpus`.
pub fn pin_cpus(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            bail!("CPU {c} is out of range");
        }
        // SAFETY: `c` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is this process; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!(
            "pinning to CPUs {cpus:?} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// SIGTERM and SIGINT set the returned stop flag (a second SIGINT ends the process at once).
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, stop.clone())
        .context("while installing the signal handlers")?;
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("while installing the signal handlers")?;
    }
    Ok(stop)
}

/// Whether the stop flag is set.
pub fn stopping(stop: &AtomicBool) -> bool {
    // Relaxed: a plain flag; nothing is published through it.
    stop.load(Ordering::Relaxed)
}

/// systemd notifications (no-ops when not run by systemd).
#[derive(Debug, Default)]
pub struct Notifier;

impl Notifier {
    /// READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(status),
            ],
        );
    }

    /// WATCHDOG=1: the loop made progress.
    pub fn alive(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }

    /// STATUS= line.
    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
    }

    /// STOPPING=1.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

/// The ring layout both processes derive from the same configuration.
pub fn ring_descriptor(cfg: &TrainFile, num_layers: usize) -> Result<Descriptor> {
    let g = &cfg.generator;
    let per_batch = g.prompts_per_batch * g.group_size;
    // Room for the batches the server may run ahead, plus the one being written.
    let batches = cfg.max_staleness as usize + 2;
    let capacity = u32::try_from(per_batch * batches)
        .ok()
        .filter(|&c| c <= 1 << 20)
        .context("the ring would need more than 2^20 slots: reduce prompts × group size")?;
    Ok(Descriptor {
        capacity,
        limits: Limits {
            max_prompt_tokens: cfg.max_prompt_tokens,
            max_completion_tokens: u32::try_from(g.max_new_tokens)
                .context("max_new_tokens is too large")?,
            max_plan_layers: u32::try_from(num_layers).context("too many layers")?,
        },
    })
}

/// Seconds since the Unix epoch (the clock both processes' timelines share).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One stage of a process's timeline, in Unix seconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Span {
    /// `generate`, `score`, `push`, `wait`, `load`, `train`, `publish`, `checkpoint`.
    pub stage: String,
    /// Start.
    pub start: f64,
    /// End.
    pub end: f64,
}

/// Records spans as they happen.
#[derive(Debug, Default)]
pub struct Timeline {
    spans: Vec<Span>,
}

impl Timeline {
    /// Runs `f` as stage `stage`.
    pub fn time<T>(&mut self, stage: &str, f: impl FnOnce() -> T) -> T {
        let start = unix_now();
        let out = f();
        self.spans.push(Span {
            stage: stage.into(),
            start,
            end: unix_now(),
        });
        out
    }

    /// Adds a span measured elsewhere.
    pub fn push(&mut self, stage: &str, start: f64, end: f64) {
        self.spans.push(Span {
            stage: stage.into(),
            start,
            end,
        });
    }

    /// Takes the spans recorded so far.
    pub fn take(&mut self) -> Vec<Span> {
        std::mem::take(&mut self.spans)
    }
}

/// Appends JSON lines to a file, flushing each.
#[derive(Debug)]
pub struct JsonLines {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl JsonLines {
    /// Opens `path` for appending (a restarted process continues the same file).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("while opening {}", path.display()))?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
            path: path.to_owned(),
        })
    }

    /// Writes one line.
    pub fn write<T: Serialize>(&mut self, value: &T) -> Result<()> {
        serde_json::to_writer(&mut self.file, value)
            .with_context(|| format!("while writing {}", self.path.display()))?;
        self.file
            .write_all(b"\n")
            .and_then(|()| self.file.flush())
            .with_context(|| format!("while writing {}", self.path.display()))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let ctx = || format!("while writing {}", path.display());
    {
        let mut f = std::fs::File::create(&tmp).with_context(ctx)?;
        f.write_all(bytes).with_context(ctx)?;
        f.sync_all().with_context(ctx)?;
    }
    std::fs::rename(&tmp, path).with_context(ctx)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Sleeps up to `d` in small slices, returning early when `stop` is set.
pub fn nap(stop: &AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stopping(stop) {
        let now = std::time::Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }
}
