//! Shared helpers for the cross-process integration tests: deterministic records and a
//! watchdog-guarded child process whose stdout lines can be awaited.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

/// How long any single wait on a peer may take before the test fails (a watchdog, not a
/// performance claim: every wait normally completes in milliseconds).
pub const WATCHDOG: Duration = Duration::from_secs(60);

// The deterministic records and the ring descriptor are the protocol crate's test fixtures.
#[path = "../../protocol/tests/common/mod.rs"]
mod fixtures;
pub use fixtures::{desc, record};

/// A child process; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    /// Spawns `bin` with `args`, capturing stdout line by line.
    pub fn spawn(bin: &str, args: &[&str]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("while spawning {bin} {args:?}"))?;
        let stdout = child
            .stdout
            .take()
            .context("while taking the child's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits (up to [`WATCHDOG`]) for a line starting with `prefix`; returns it.
    pub fn expect_line(&mut self, prefix: &str) -> anyhow::Result<String> {
        loop {
            match self.lines.recv_timeout(WATCHDOG) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    anyhow::bail!(
                        "watchdog: no line {prefix:?} (seen so far: {:?})",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    anyhow::bail!(
                        "peer exited before printing {prefix:?} (seen: {:?})",
                        self.seen
                    )
                }
            }
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        anyhow::ensure!(
            rc == 0,
            "kill({pid}) failed: {}",
            std::io::Error::last_os_error()
        );
        self.child.wait()?;
        Ok(())
    }

    /// Waits (watchdog) for exit; returns all remaining stdout lines and the success flag.
    pub fn finish(mut self) -> anyhow::Result<(Vec<String>, bool)> {
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_timeout(WATCHDOG) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => anyhow::bail!("watchdog: peer did not exit"),
            }
        }
        let status = self.child.wait()?;
        Ok((rest, status.success()))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
