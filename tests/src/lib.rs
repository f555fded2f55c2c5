//! Shared helpers for the cross-process integration tests: deterministic records and a
//! watchdog-guarded child process whose stdout lines can be awaited.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use protocol::{Descriptor, FinishReason, Limits, Rewards, RolloutRecord, Sampling, Timings};

/// How long any single wait on a peer may take before the test fails (a watchdog, not a
/// performance claim: every wait normally completes in milliseconds).
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// The ring descriptor the helpers and tests share.
pub fn desc(capacity: u32) -> Descriptor {
    Descriptor {
        capacity,
        limits: Limits {
            max_prompt_tokens: 64,
            max_completion_tokens: 128,
            max_plan_layers: 32,
        },
    }
}

/// A record whose every field is derived from `i`, so the receiver can check it exactly.
pub fn record(i: u64) -> RolloutRecord {
    let np = (i % 60) as u32 + 1;
    let nc = (i * 7 % 120) as u32 + 1;
    RolloutRecord {
        prompt_id: i,
        group_id: i / 4,
        batch_id: i / 16,
        policy_version: i / 8,
        prompt: (0..np).map(|t| t * 3 + i as u32).collect(),
        completion: (0..nc).map(|t| t ^ (i as u32)).collect(),
        logprobs: (0..nc).map(|t| -(t as f32) * 0.25 - i as f32).collect(),
        plan: (0..(i % 30) as u16).collect(),
        sampling: Sampling {
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            seed: i * 31,
        },
        rewards: Rewards {
            components: [i as f32, 0.5, -1.0, 0.0],
            n_components: 3,
            total: i as f32 * 0.5,
            failed: i % 5 == 0,
        },
        finish: if i % 2 == 0 {
            FinishReason::Eos
        } else {
            FinishReason::Length
        },
        timings: Timings {
            generation_ns: i * 1000,
            reward_ns: i,
        },
    }
}

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
