//! An external reward process speaking the JSON Lines protocol of [`crate::protocol`].
//!
//! The process is started on first use and kept alive. Each request has a timeout; a module
//! that hangs is killed, one that exits or writes garbage is discarded, and the next request
//! starts a fresh process after an exponential backoff. Samples of a failed request are
//! returned as errors (counted in [`ModuleStats`] and logged to stderr), never as zeros.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Result, RewardError, SpecError};
use crate::protocol::{sanitize_non_finite, RequestRef, Response};
use crate::reward::{Reward, Sample, Score};

/// Settings of an external reward process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Program and arguments, e.g. `["python3", "math_reward.py"]`.
    pub command: Vec<String>,
    /// Working directory (default: the config file's directory).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per-request timeout in milliseconds (default 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Larger batches are split into requests of at most this many samples (default 64).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// First restart delay in milliseconds, doubled after each failure (default 100).
    #[serde(default = "default_backoff_ms")]
    pub restart_backoff_ms: u64,
    /// Largest restart delay in milliseconds (default 5000).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Longest accepted response line in bytes (default 64 MiB).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_batch() -> usize {
    64
}
fn default_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    5_000
}
fn default_max_response_bytes() -> usize {
    64 << 20
}

impl ExternalConfig {
    /// A config with default settings for `command`.
    pub fn new<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        Self {
            command: command.into_iter().map(Into::into).collect(),
            cwd: None,
            env: BTreeMap::new(),
            timeout_ms: default_timeout_ms(),
            max_batch: default_max_batch(),
            restart_backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

/// Counters of an external module (for logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModuleStats {
    /// Requests sent.
    pub requests: u64,
    /// Samples returned as errors because their request failed (timeout, exit, garbage).
    pub failed_samples: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Times the process exited or closed its stdout unexpectedly.
    pub exits: u64,
    /// Responses that broke the protocol.
    pub protocol_errors: u64,
    /// Processes started, including the first.
    pub starts: u64,
}

/// What the stdout reader thread reports.
enum ReadEvent {
    Line(Vec<u8>),
    TooLong,
    /// The stream ended in the middle of a line of this many bytes.
    PartialEof(usize),
    Eof,
    Failed(String),
}

/// A running module process.
struct Proc {
    child: Child,
    requests: Sender<Vec<u8>>,
    responses: Receiver<ReadEvent>,
}

impl Proc {
    fn kill(mut self) -> String {
        // The process leads its own process group (see `spawn`); killing the group also ends
        // helpers it started (e.g. a shell wrapper's child) that could hold the pipes open.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions; `-pid` names the group created
        // for this child, which is still unreaped (we reap it just below), so the id cannot
        // have been reused by an unrelated process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown status ({e})"),
        }
    }
}

struct State {
    proc: Option<Proc>,
    next_id: u64,
    backoff: Duration,
    not_before: Option<Instant>,
    stats: ModuleStats,
}

/// A reward computed by an external process (see the module docs).
pub struct ExternalReward {
    cfg: ExternalConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for ExternalReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalReward")
            .field("command", &self.cfg.command)
            .finish()
    }
}

impl ExternalReward {
    /// Validates the config and starts the process.
    pub fn new(cfg: ExternalConfig) -> Result<Self, SpecError> {
        if cfg.command.is_empty() || cfg.command[0].is_empty() {
            return Err(SpecError::Invalid(
                "external.command must name a program".into(),
            ));
        }
        if cfg.timeout_ms == 0 || cfg.max_batch == 0 || cfg.max_response_bytes == 0 {
            return Err(SpecError::Invalid(
                "external.timeout_ms, max_batch and max_response_bytes must be positive".into(),
            ));
        }
        let backoff = Duration::from_millis(cfg.restart_backoff_ms);
        let this = Self {
            cfg,
            state: Mutex::new(State {
                proc: None,
                next_id: 0,
                backoff,
                not_before: None,
                stats: ModuleStats::default(),
            }),
        };
        {
            let mut st = this.lock();
            let proc = this
                .spawn(&mut st)
                .map_err(|e| SpecError::Invalid(format!("cannot start the reward module: {e}")))?;
            st.proc = Some(proc);
        }
        Ok(this)
    }

    /// The module's counters so far.
    pub fn stats(&self) -> ModuleStats {
        self.lock().stats
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state (at worst a dead process
        // that the next request replaces), so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> String {
        self.cfg.command.join(" ")
    }

    fn spawn(&self, st: &mut State) -> std::result::Result<Proc, String> {
        let mut cmd = Command::new(&self.cfg.command[0]);
        cmd.args(&self.cfg.command[1..])
            .envs(&self.cfg.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        if let Some(dir) = &self.cfg.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| format!("`{}`: {e}", self.name()))?;
        st.stats.starts += 1;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the module's stdin/stdout were not captured".into());
        };
        let (req_tx, req_rx) = mpsc::channel::<Vec<u8>>();
        let (resp_tx, resp_rx) = mpsc::channel::<ReadEvent>();
        std::thread::Builder::new()
            .name("reward-module-writer".into())
            .spawn(move || writer_loop(stdin, req_rx))
            .map_err(|e| format!("cannot start a writer thread: {e}"))?;
        let max = self.cfg.max_response_bytes;
        std::thread::Builder::new()
            .name("reward-module-reader".into())
            .spawn(move || reader_loop(stdout, resp_tx, max))
            .map_err(|e| format!("cannot start a reader thread: {e}"))?;
        Ok(Proc {
            child,
            requests: req_tx,
            responses: resp_rx,
        })
    }

    /// Records a failed request: kill the process, schedule the restart, log.
    fn fail(&self, st: &mut State, n: usize, err: RewardError) -> RewardError {
        let status = st.proc.take().map(Proc::kill);
        st.stats.failed_samples += n as u64;
        st.not_before = Some(Instant::now() + st.backoff);
        eprintln!(
            "reward module `{}`: {err}; {n} sample(s) marked failed; process {}; restarting in {:?}",
            self.name(),
            status.map_or_else(|| "not running".to_string(), |s| format!("ended ({s})")),
            st.backoff
        );
        st.backoff = (st.backoff * 2).min(Duration::from_millis(self.cfg.max_backoff_ms));
        err
    }

    /// One request/response exchange for at most `max_batch` samples.
    fn request(&self, samples: &[Sample]) -> Result<Vec<Result<Score>>> {
        let mut st = self.lock();
        let n = samples.len();
        if st.proc.is_none() {
            if let Some(t) = st.not_before.take() {
                std::thread::sleep(t.saturating_duration_since(Instant::now()));
            }
            match self.spawn(&mut st) {
                Ok(p) => st.proc = Some(p),
                Err(e) => return Err(self.fail(&mut st, n, RewardError::Unavailable(e))),
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.stats.requests += 1;
        let mut line = serde_json::to_vec(&RequestRef { id, samples })
            .map_err(|e| RewardError::InvalidSample(format!("cannot encode the batch: {e}")))?;
        line.push(b'\n');
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let deadline = Instant::now() + timeout;
        let Some(proc) = st.proc.as_ref() else {
            return Err(RewardError::Unavailable("no process".into()));
        };
        if proc.requests.send(line).is_err() {
            st.stats.exits += 1;
            let e = RewardError::ModuleExited("its stdin is closed".into());
            return Err(self.fail(&mut st, n, e));
        }
        let event = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match proc.responses.recv_timeout(left) {
                Ok(ReadEvent::Line(l)) if l.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(ev) => break Ok(ev),
                Err(RecvTimeoutError::Timeout) => break Err(true),
                Err(RecvTimeoutError::Disconnected) => break Err(false),
            }
        };
        let err = match event {
            Ok(ReadEvent::Line(l)) => match parse_response(&l, id, n) {
                Ok(results) => {
                    st.backoff = Duration::from_millis(self.cfg.restart_backoff_ms);
                    return Ok(results);
                }
                Err(msg) => {
                    st.stats.protocol_errors += 1;
                    RewardError::Protocol(msg)
                }
            },
            Ok(ReadEvent::TooLong) => {
                st.stats.protocol_errors += 1;
                RewardError::Protocol(format!(
                    "response line longer than {} bytes",
                    self.cfg.max_response_bytes
                ))
            }
            Ok(ReadEvent::PartialEof(n)) => {
                st.stats.exits += 1;
                RewardError::ModuleExited(format!(
                    "its stdout closed in the middle of a response ({n} bytes)"
                ))
            }
            Ok(ReadEvent::Eof) | Err(false) => {
                st.stats.exits += 1;
                RewardError::ModuleExited("its stdout closed".into())
            }
            Ok(ReadEvent::Failed(e)) => {
                st.stats.exits += 1;
                RewardError::ModuleExited(format!("reading its stdout failed: {e}"))
            }
            Err(true) => {
                st.stats.timeouts += 1;
                RewardError::Timeout(timeout)
            }
        };
        Err(self.fail(&mut st, n, err))
    }
}

/// Decodes a response line and checks that it answers request `id` with `n` results.
fn parse_response(
    line: &[u8],
    id: u64,
    n: usize,
) -> std::result::Result<Vec<Result<Score>>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the response is not UTF-8".to_string())?;
    let resp: Response = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => match sanitize_non_finite(text).map(|t| serde_json::from_str(&t)) {
            Some(Ok(r)) => r,
            _ => {
                let shown: String = text.chars().take(120).collect();
                return Err(format!("invalid response line ({e}): {shown:?}"));
            }
        },
    };
    if resp.id != id {
        return Err(format!(
            "response id {} does not match request id {id}",
            resp.id
        ));
    }
    if resp.results.len() != n {
        return Err(format!(
            "{} results for a batch of {n} samples",
            resp.results.len()
        ));
    }
    Ok(resp.results.into_iter().map(|r| r.into_result()).collect())
}

fn writer_loop(mut stdin: ChildStdin, requests: Receiver<Vec<u8>>) {
    for line in requests {
        if stdin.write_all(&line).and_then(|()| stdin.flush()).is_err() {
            return;
        }
    }
}

fn reader_loop(stdout: ChildStdout, events: Sender<ReadEvent>, max: usize) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut buf = Vec::new();
        let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
        let ev = match (&mut reader).take(limit).read_until(b'\n', &mut buf) {
            Ok(0) => ReadEvent::Eof,
            Ok(_) if buf.last() != Some(&b'\n') && buf.len() > max => ReadEvent::TooLong,
            Ok(n) if buf.last() != Some(&b'\n') => ReadEvent::PartialEof(n),
            Ok(_) => ReadEvent::Line(buf),
            Err(e) => ReadEvent::Failed(e.to_string()),
        };
        let stop = !matches!(ev, ReadEvent::Line(_));
        if events.send(ev).is_err() || stop {
            return;
        }
    }
}

impl Reward for ExternalReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        self.score_batch(std::slice::from_ref(sample))
            .pop()
            .unwrap_or_else(|| Err(RewardError::Protocol("no result".into())))
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<Score>> {
        let mut out = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(self.cfg.max_batch) {
            match self.request(chunk) {
                Ok(results) => out.extend(results),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
            }
        }
        out
    }
}

impl Drop for ExternalReward {
    fn drop(&mut self) {
        if let Some(p) = self.lock().proc.take() {
            p.kill();
        }
    }
}
