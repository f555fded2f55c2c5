//! One training step, in named stages that every mode runs: `local` calls them in turn in one
//! process, `sync` and `async` split them between the rollout server and the learner.
//!
//! The behavior half: take the newest weights and build the behavior from them
//! ([`behavior_model`]), then draw the batch's plan, generate, score and make the records
//! ([`generate`]; the server then pushes them into the ring). The learner half: assemble
//! complete groups (the learner service's [`learner::BatchAssembler`]; `local` has its batch
//! whole), update ([`update`]), publish and checkpoint (the learner service).
//!
//! The rules the modes share are written here once: what KL a batch measured
//! ([`measured_kl`]), the skip sets a metrics line reports ([`Skips`]), the decoded sample of
//! each trained batch ([`SampleLog`]) and the wait for the other process at startup
//! ([`wait_for_peer`]).

use crate::service::{nap, stopping, Notifier};
use anyhow::{bail, Context, Result};
use learner::{Learner, StepStats};
use model::{Decoder, LayerPlan, LoraConfig, Tokenizer, WeightFormat};
use protocol::RolloutRecord;
use rollout_server::{Generator, RolloutBatch};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// The model as the run trains it: `decoder` itself for full fine-tuning, or with LoRA
/// adapters on a frozen base (the adapters' initial A drawn from `seed`). Every process of a
/// run adapts its own copy of the base the same way.
pub fn adapt(decoder: Decoder, lora: Option<&LoraConfig>, seed: u64) -> Result<Decoder> {
    match lora {
        None => Ok(decoder),
        Some(l) => decoder
            .with_lora(l, seed)
            .context("while adding the LoRA adapters"),
    }
}

/// The behavior of a LoRA model: one copy of `adapted` whose base is re-quantized to `format`
/// (an f32 copy for f32) and whose adapters stay f32 and shared with `adapted`, built once:
/// adapters set on `adapted` later (by an update or a publication) show in the copy, so the
/// base is quantized once per run rather than after every update. The adapters run unmerged,
/// as two thin matmuls beside each base matmul: `cargo bench -p model --bench lora_behavior`
/// measures that at about the cost of merging after every update for the default lengths.
pub fn lora_behavior(adapted: &Decoder, format: WeightFormat) -> Result<Decoder> {
    adapted
        .quantized(format)
        .with_context(|| format!("while building the {format} behavior of the LoRA model"))
}

/// The behavior for weights `weights`: the weights themselves for an f32 behavior (`None`:
/// sample from `weights`), else their re-quantization to `format`, rebuilt from every new set
/// of weights so that the behavior follows the learner.
pub fn behavior_model(weights: &Decoder, format: WeightFormat) -> Result<Option<Decoder>> {
    match format {
        WeightFormat::F32 => Ok(None),
        q => weights
            .quantized(q)
            .map(Some)
            .with_context(|| format!("while quantizing the behavior's weights to {q}")),
    }
}

/// Draws the next batch's plan, generates its completions with `behavior` (weights of policy
/// version `version`), scores them and returns the groups as records. A reward failure is
/// logged the first time its message is seen; after that it is only counted (the learner's
/// `failed_rewards` and `failed_reward_groups` metrics).
pub fn generate(
    generator: &mut Generator,
    behavior: &Decoder,
    version: u64,
) -> Result<RolloutBatch> {
    let batch_id = generator.state().next_batch_id;
    let batch = generator
        .next_batch(behavior, version)
        .with_context(|| format!("while generating batch {batch_id}"))?;
    for message in &batch.stats.new_reward_failures {
        tracing::warn!(
            "batch {batch_id}: the reward failed on a sample: {message} (its group is not \
             trained on; later failures with this message are only counted)"
        );
    }
    Ok(batch)
}

/// One update of the target on a batch's complete groups.
pub fn update(
    learner: &mut Learner,
    batch_id: u64,
    groups: &[Vec<RolloutRecord>],
) -> Result<StepStats> {
    learner
        .step(groups)
        .with_context(|| format!("while training on batch {batch_id}"))
}

/// The KL(μ‖π) a batch measured, for the adaptive plan strategy: NaN when the batch trained no
/// token (no update, or every group had equal rewards), which measured nothing.
pub fn measured_kl(update: Option<&StepStats>) -> f64 {
    update
        .filter(|u| u.tokens > 0)
        .map_or(f64::NAN, |u| u.kl_behavior_k3)
}

/// What a batch's plan skipped, as every metrics line reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skips {
    /// Decoder layers the behavior skipped whole.
    pub skipped_layers: Vec<usize>,
    /// Everything the plan skipped: layers (`12`), attention (`a12`) and MLP blocks (`m12`).
    pub skipped_units: Vec<String>,
}

impl Skips {
    /// The skip sets of `plan`.
    pub fn of(plan: &LayerPlan) -> Self {
        Self {
            skipped_layers: plan.skipped(),
            skipped_units: plan.skipped_units().iter().map(|u| u.to_string()).collect(),
        }
    }
}

/// One line of `samples.jsonl`: the first completion of a trained batch, decoded.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SampleLine {
    /// Training step (the update that used the batch; 1 for the first).
    pub step: u64,
    /// The batch.
    pub batch_id: u64,
    /// Policy version the completion was sampled with.
    pub policy_version: u64,
    /// The prompt as the model saw it (chat template included).
    pub prompt: String,
    /// The completion, special tokens removed.
    pub completion: String,
    /// Its reward.
    pub reward: f32,
}

impl SampleLine {
    /// The first record of `groups`, decoded; `None` for a batch without records.
    pub fn of(
        step: u64,
        batch_id: u64,
        groups: &[Vec<RolloutRecord>],
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>> {
        let Some(rec) = groups.iter().flatten().next() else {
            return Ok(None);
        };
        Ok(Some(Self {
            step,
            batch_id,
            policy_version: rec.policy_version,
            prompt: tokenizer
                .decode(&rec.prompt, false)
                .context("while decoding a sample's prompt")?,
            completion: tokenizer
                .decode(&rec.completion, true)
                .context("while decoding a sample's completion")?,
            reward: rec.reward.value,
        }))
    }
}

/// `samples.jsonl`: one decoded completion per trained batch, written by whichever process
/// trains (so every mode writes the same file in the run directory).
#[derive(Debug)]
pub struct SampleLog {
    lines: crate::service::JsonLines,
}

impl SampleLog {
    /// Appends to `path` (a resumed run continues the file; a fresh run removes it first).
    pub fn append(path: &Path) -> Result<Self> {
        Ok(Self {
            lines: crate::service::JsonLines::append(path)?,
        })
    }

    /// Writes the sample of one trained batch.
    pub fn write(
        &mut self,
        step: u64,
        batch_id: u64,
        groups: &[Vec<RolloutRecord>],
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        match SampleLine::of(step, batch_id, groups, tokenizer)? {
            Some(line) => self.lines.write(&line),
            None => Ok(()),
        }
    }
}

/// Waits at startup until `poll` finds the other process (`peer`, e.g. "the learner") ready,
/// logging once that it waits and pinging the watchdog meanwhile. `Ok(None)` when stopped
/// first; an error naming the runtime directory after `timeout`.
pub fn wait_for_peer<T>(
    peer: &str,
    runtime: &Path,
    name: &str,
    timeout: Duration,
    stop: &AtomicBool,
    notifier: &Notifier,
    mut poll: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let start = Instant::now();
    let mut said = false;
    loop {
        if stopping(stop) {
            tracing::info!("stopped before {peer} came up");
            return Ok(None);
        }
        if let Some(t) = poll()? {
            return Ok(Some(t));
        }
        if start.elapsed() > timeout {
            bail!(
                "{peer} did not come up within {:?} (runtime directory {}, name {})",
                timeout,
                runtime.display(),
                name
            );
        }
        if !said {
            tracing::info!(
                "waiting for {peer} (runtime directory {})",
                runtime.display()
            );
            said = true;
        }
        notifier.alive();
        nap(stop, Duration::from_millis(50));
    }
}

/// Beats one side's ring heartbeat once a second on a thread of its own, until dropped, so
/// that the peer (and `nested-reft train`) tell a process that is working from one that is
/// stopped; and watches the peer's beats the same way, so that a hung peer is reported however
/// busy this side's own loop is.
pub struct Beating {
    stop: std::sync::Arc<AtomicBool>,
    hangs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Beating {
    /// How often the thread beats.
    pub const PERIOD: Duration = Duration::from_secs(1);

    /// Starts beating `heartbeat` and watching its peer with `watch`.
    pub fn start(heartbeat: protocol::Heartbeat, mut watch: PeerWatch) -> Result<Self> {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let hangs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, seen) = (stop.clone(), hangs.clone());
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                // Relaxed: a plain stop flag; the join in `drop` orders the rest.
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    heartbeat.beat();
                    watch.check(heartbeat.peer());
                    // Relaxed: a counter for the metrics.
                    seen.store(watch.hangs(), std::sync::atomic::Ordering::Relaxed);
                    std::thread::park_timeout(Self::PERIOD);
                }
            })
            .context("while starting the heartbeat thread")?;
        Ok(Self {
            stop,
            hangs,
            thread: Some(thread),
        })
    }

    /// The peer's hung episodes seen so far (for the metrics).
    pub fn hangs(&self) -> u64 {
        // Relaxed: see `start`.
        self.hangs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        // Relaxed: see `start`.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Judges the peer's heartbeat: a peer that holds its side of the ring but has not beaten for
/// `timeout` is reported hung (by name and pid, once per episode), and again when it beats.
#[derive(Debug)]
pub struct PeerWatch {
    peer: &'static str,
    timeout: Duration,
    /// The pid of the peer reported hung, while it is.
    hung: Option<Option<u32>>,
    hangs: u64,
}

impl PeerWatch {
    /// Watches `peer` ("the learner", "the rollout server").
    pub fn new(peer: &'static str, timeout: Duration) -> Self {
        Self {
            peer,
            timeout,
            hung: None,
            hangs: 0,
        }
    }

    /// Hung episodes seen so far (for the metrics).
    pub fn hangs(&self) -> u64 {
        self.hangs
    }

    /// Looks at what the ring shows of the peer; true while it is hung.
    pub fn check(&mut self, peer: protocol::Liveness) -> bool {
        let pid = peer.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
        let now_hung = peer.held && peer.silent > self.timeout;
        match (self.hung.is_some(), now_hung) {
            (false, true) => {
                self.hangs += 1;
                self.hung = Some(peer.pid);
                tracing::error!(
                    peer = self.peer,
                    pid = peer.pid,
                    silent_s = peer.silent.as_secs_f64(),
                    hangs = self.hangs,
                    "{} (pid {pid}) is hung: no heartbeat for {:.0} s (hang_timeout_s is {:.0}); \
                     it holds its side of the ring, so it is not dead: is it stopped (SIGSTOP, \
                     a debugger) or starved?",
                    self.peer,
                    peer.silent.as_secs_f64(),
                    self.timeout.as_secs_f64()
                );
            }
            (true, false) => {
                self.hung = None;
                tracing::warn!(
                    peer = self.peer,
                    pid = peer.pid,
                    "{} (pid {pid}) beats again; going on",
                    self.peer
                );
            }
            _ => {}
        }
        now_hung
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_trained_nothing_measured_no_kl() {
        let mut s = StepStats {
            tokens: 0,
            kl_behavior_k3: 0.25,
            ..StepStats::default()
        };
        assert!(measured_kl(Some(&s)).is_nan());
        assert!(measured_kl(None).is_nan());
        s.tokens = 12;
        assert_eq!(measured_kl(Some(&s)), 0.25);
    }

    #[test]
    fn skips_name_layers_and_units() {
        let plan =
            LayerPlan::skipping_units(&[model::Unit::Layer(1), model::Unit::Attn(3)], 4).unwrap();
        let s = Skips::of(&plan);
        assert_eq!(s.skipped_layers, vec![1]);
        assert_eq!(s.skipped_units, vec!["1".to_string(), "a3".to_string()]);
    }

    #[test]
    fn the_peer_wait_ends_on_stop_and_times_out_with_the_directory() {
        let stop = AtomicBool::new(true);
        let got: Option<()> = wait_for_peer(
            "the learner",
            Path::new("/run/x"),
            "job",
            Duration::ZERO,
            &stop,
            &Notifier,
            || Ok(None),
        )
        .unwrap();
        assert!(got.is_none());
        let stop = AtomicBool::new(false);
        let err = wait_for_peer::<()>(
            "the learner",
            Path::new("/run/x"),
            "job",
            Duration::ZERO,
            &stop,
            &Notifier,
            || Ok(None),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("the learner did not come up")
                && msg.contains("/run/x")
                && msg.contains("job"),
            "{msg}"
        );
        let mut n = 0;
        let got = wait_for_peer(
            "the learner",
            Path::new("/run/x"),
            "job",
            Duration::from_secs(5),
            &stop,
            &Notifier,
            || {
                n += 1;
                Ok((n == 2).then_some(7))
            },
        )
        .unwrap();
        assert_eq!(got, Some(7));
    }

    #[test]
    fn a_silent_holder_is_hung_once_per_episode_and_a_dead_one_never() {
        let live = |held, secs| protocol::Liveness {
            held,
            pid: Some(42),
            silent: Duration::from_secs(secs),
        };
        let mut w = PeerWatch::new("the learner", Duration::from_secs(5));
        assert!(!w.check(live(true, 4)));
        assert!(w.check(live(true, 6)));
        assert!(w.check(live(true, 60)));
        assert_eq!(w.hangs(), 1, "one episode, however long");
        assert!(!w.check(live(true, 0)), "it beat again");
        assert!(w.check(live(true, 7)));
        assert_eq!(w.hangs(), 2);
        // A process that let go of its role is gone, not hung: the kernel says so.
        assert!(!w.check(live(false, 600)));
        assert_eq!(w.hangs(), 2);
    }
}
