//! The learner process: pops records, assembles complete batches, trains, publishes weights,
//! checkpoints.

use super::device_slots::LearnerSlots;
use super::{
    nap, ring_descriptor, stopping, unix_now, write_atomic, JsonLines, Notifier, Paths,
    ServiceArgs, Span, Timeline,
};
use crate::probe::{Probe, ProbeCheck, ProbeLedger};
use crate::step;
use crate::train::{CheckpointFailure, TrainFile};
use anyhow::{anyhow, Context, Result};
use clap::Parser;
use learner::{AssembledBatch, AssemblyStats, BatchAssembler, Learner, StepStats};
use model::{LoadOptions, WeightBridge};
use protocol::control::{ControlServer, Hello, IpcHandles, Message};
use protocol::{
    ControlError, HandshakeError, OpenError, PopError, SegmentError, WeightStore, Writer,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Slots of the weight store: with 3, publishing never waits on the one reader, which copies
/// the weights out and unpins at once.
const WEIGHT_SLOTS: u32 = 3;

/// `nested-reft-learner`.
#[derive(Debug, Parser)]
#[command(
    name = "nested-reft-learner",
    version,
    about = "The nested-reft learner service: trains the full-depth target on rollouts from \
             the rollout server's ring and publishes its weights after every step.",
    long_about = None
)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub common: ServiceArgs,
    /// Continue from the latest complete checkpoint in `<state dir>/checkpoints` (a fresh
    /// start when there is none).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many training steps in total (default: the config's `steps`; 0 runs
    /// until stopped).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Checkpoints kept, the newest (default: the config's `keep_checkpoints`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: Option<u64>,
    /// When a checkpoint cannot be written: `stop` with the error or `retry` at the next
    /// interval (default: the config's `checkpoint_failure`).
    #[arg(long, value_enum)]
    pub checkpoint_failure: Option<CheckpointFailure>,
    /// Fault injection for tests, `C:F`: the C-th checkpoint this process writes (from 1)
    /// fails with ENOSPC while writing its file F (0: the model, 1: the optimizer, 2: the
    /// state, 3: the manifest, 4: LATEST).
    #[arg(long, value_name = "C:F", hide = true, value_parser = parse_fault)]
    pub fail_checkpoint_write: Option<(u64, learner::WriteFault)>,
    /// Fault injection for tests: the weights of this policy version are not published (the
    /// server is still told the version was trained, and must refuse to sample on).
    #[arg(long, value_name = "VERSION", hide = true)]
    pub drop_publication: Option<u64>,
}

/// One line of the learner's `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct StepLine<'a> {
    step: u64,
    /// Policy version after the step (= optimizer steps).
    version: u64,
    batch_id: u64,
    wall_s: f64,
    assembly: &'a AssemblyStats,
    update: Option<&'a StepStats>,
    /// Seconds waiting for the batch (idle).
    wait_s: f64,
    /// Seconds publishing the weights.
    publish_s: f64,
    /// Seconds writing a checkpoint (0 when none this step).
    checkpoint_s: f64,
    /// Why this step's checkpoint failed (it was removed; `LATEST` names the previous one).
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_error: Option<String>,
    /// Checkpoints that failed so far.
    checkpoint_failures: u64,
    /// Seconds scoring the weight probe with the published weights.
    probe_s: f64,
    /// With device weight slots: the checksum of the weights published this step (see
    /// `WeightBridge::checksum`), for comparison with the server's of what it loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    weights_sum: Option<f64>,
    /// The rollout server's probes compared with the learner's since the last line: the
    /// behavior it samples from against the learner's weights of the same version.
    probes: Vec<ProbeCheck>,
    /// Records quarantined by the ring so far.
    quarantined_total: u64,
    /// Records of batches already handed on, dropped so far.
    duplicate_records: u64,
    /// Times the rollout server was seen hung so far (see `step::PeerWatch`).
    peer_hangs: u64,
    spans: Vec<Span>,
}

/// What a checkpoint stores beyond the model and optimizer.
#[derive(Debug, Serialize, serde::Deserialize)]
struct CheckpointExtra {
    /// The last batch trained on.
    last_batch_id: Option<u64>,
    /// The learner's view of the ring: the next sequence number it would pop.
    ring_next_seq: u64,
    /// The configuration's seed (plans and sampling derive from it and the batch ids).
    seed: u64,
}

/// What the control thread hands to the main loop.
enum ControlEvent {
    Connected(protocol::control::Connection),
    Failed(HandshakeError),
}

/// The learner's end of the control channel: a thread that listens, writes the listening name
/// to the name file, and listens again whenever the main loop reports the connection lost.
struct ControlLink {
    events: mpsc::Receiver<ControlEvent>,
    relisten: mpsc::Sender<()>,
    conn: Option<protocol::control::Connection>,
    version: Arc<AtomicU64>,
    /// The next batch the learner needs, for the handshake (`u64::MAX`: none received yet).
    needed: Arc<AtomicU64>,
    /// The server's weight probes received and not yet taken: (version, log-probs).
    probes: Vec<(u64, Vec<f32>)>,
    /// The device weight slots' handles, sent after every handshake (learner on a GPU).
    handles: Option<IpcHandles>,
}

impl ControlLink {
    fn spawn(
        paths: &Paths,
        base: Hello,
        version: Arc<AtomicU64>,
        handles: Option<IpcHandles>,
    ) -> Result<Self> {
        let (ev_tx, events) = mpsc::channel();
        let (relisten, relisten_rx) = mpsc::channel::<()>();
        let file = paths.control_file();
        let v = version.clone();
        let needed = Arc::new(AtomicU64::new(base.batch_id.unwrap_or(u64::MAX)));
        let n = needed.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || loop {
                let server = match ControlServer::new() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ev_tx.send(ControlEvent::Failed(e));
                        return;
                    }
                };
                if let Err(e) = write_atomic(&file, server.name().as_bytes()) {
                    let _ = ev_tx.send(ControlEvent::Failed(HandshakeError::Channel(format!(
                        "{e:#}"
                    ))));
                    return;
                }
                let mut hello = base.clone();
                // Relaxed: a progress hint for the peer, not a synchronisation point.
                hello.policy_version = v.load(Ordering::Relaxed);
                // Relaxed: like the version, a hint for the peer read at the handshake.
                hello.batch_id = Some(n.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX);
                // accept has no deadline of its own worth having here: we wait for the peer
                // as long as the process lives.
                let ev = match server.accept(hello, Duration::from_secs(10 * 365 * 86_400)) {
                    Ok(c) => ControlEvent::Connected(c),
                    Err(e) => ControlEvent::Failed(e),
                };
                let failed = matches!(ev, ControlEvent::Failed(_));
                if ev_tx.send(ev).is_err() || failed {
                    return;
                }
                if relisten_rx.recv().is_err() {
                    return;
                }
            })
            .context("while starting the control thread")?;
        Ok(Self {
            events,
            relisten,
            conn: None,
            version,
            needed,
            probes: Vec::new(),
            handles,
        })
    }

    /// Takes new connections, reads messages; returns true when the peer asked to stop.
    fn poll(&mut self) -> Result<bool> {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                ControlEvent::Connected(c) => {
                    let p = c.peer();
                    info!(
                        policy_version = p.policy_version,
                        batch_id = p.batch_id,
                        "handshake with the rollout server succeeded"
                    );
                    self.conn = Some(c);
                    if let Some(h) = self.handles.clone() {
                        self.send(Message::DeviceSlots(h));
                    }
                }
                ControlEvent::Failed(e) => {
                    return Err(anyhow!(e).context("the control handshake failed"));
                }
            }
        }
        let mut shutdown = false;
        if let Some(c) = &self.conn {
            loop {
                match c.recv(Duration::ZERO) {
                    Ok(Message::Shutdown) => shutdown = true,
                    Ok(Message::Probe { version, logprobs }) => {
                        self.probes.push((version, logprobs))
                    }
                    Ok(Message::Error { message }) => warn!("the rollout server failed: {message}"),
                    Ok(_) => {}
                    Err(ControlError::Timeout(_)) => break,
                    Err(e) => {
                        warn!("lost the control channel to the rollout server ({e}); waiting for it to come back");
                        self.lost();
                        break;
                    }
                }
            }
        }
        Ok(shutdown)
    }

    fn lost(&mut self) {
        if self.conn.take().is_some() {
            let _ = self.relisten.send(());
        }
    }

    fn send(&mut self, msg: Message) {
        if let Some(c) = &self.conn {
            if let Err(e) = c.send(msg) {
                warn!("lost the control channel to the rollout server ({e})");
                self.lost();
            }
        }
    }

    /// Records the next batch the learner needs (one past the newest received).
    fn set_needed(&self, batch_id: u64) {
        // Relaxed: see `spawn`.
        self.needed.store(batch_id, Ordering::Relaxed);
    }

    fn set_version(&self, v: u64) {
        // Relaxed: see `spawn`.
        self.version.store(v, Ordering::Relaxed);
    }
}

/// Runs the learner service until its steps are done or it is stopped.
pub fn main(args: LearnerArgs) -> Result<()> {
    let (mut cfg, paths, stop) = args.common.start("learner", |c| c.learner_threads)?;
    if !crate::heap::keep_freed_memory() {
        tracing::debug!("the allocator keeps its defaults (not glibc, or a setting refused)");
    }
    if let Some(k) = args.keep_checkpoints {
        cfg.keep_checkpoints = usize::try_from(k).context("--keep-checkpoints is too large")?;
    }
    if let Some(p) = args.checkpoint_failure {
        cfg.checkpoint_failure = p;
    }
    let steps = args.steps.unwrap_or(cfg.steps);
    run(
        &cfg,
        &paths,
        args.resume,
        steps,
        args.common.peer_timeout()?,
        &stop,
        Faults {
            checkpoint_write: args.fail_checkpoint_write,
            drop_publication: args.drop_publication,
        },
    )
}

/// Faults injected by tests.
struct Faults {
    checkpoint_write: Option<(u64, learner::WriteFault)>,
    drop_publication: Option<u64>,
}

fn run(
    cfg: &TrainFile,
    paths: &Paths,
    resume: bool,
    steps: u64,
    peer_timeout: Duration,
    stop: &AtomicBool,
    faults: Faults,
) -> Result<()> {
    let mut svc = Service::start(cfg, paths)?;
    svc.ckpt.fault = faults.checkpoint_write;
    svc.drop_publication = faults.drop_publication;
    if resume {
        svc.resume()?;
    }
    if steps > 0 && svc.step >= steps {
        info!(
            step = svc.step,
            "already trained {steps} steps; nothing to do"
        );
        return Ok(());
    }
    let mut writer = svc.open_store()?;
    let Some(mut ring) = svc.connect(peer_timeout, stop)? else {
        return Ok(());
    };
    let beating = step::Beating::start(
        ring.heartbeat(),
        step::PeerWatch::new(
            "the rollout server",
            Duration::from_secs_f64(cfg.hang_timeout_s),
        ),
    )?;
    svc.notifier
        .ready(&format!("training from step {}", svc.step));
    info!(
        step = svc.step,
        policy_version = svc.learner.version(),
        "ready"
    );

    let mut metrics = JsonLines::append(&svc.metrics_path)?;
    let mut samples = step::SampleLog::append(&paths.state_dir.join("samples.jsonl"))?;
    let mut timeline = Timeline::default();
    let mut shutdown_asked = false;
    while !(stopping(stop) || shutdown_asked || (steps > 0 && svc.step >= steps)) {
        let wait_start = unix_now();
        let batch = match svc.next_batch(&mut ring, stop)? {
            Next::Batch(b) => b,
            Next::Idle => continue,
            Next::Shutdown => {
                shutdown_asked = true;
                continue;
            }
        };
        let waited = unix_now() - wait_start;
        timeline.push("wait", wait_start, unix_now());
        let batch_id = batch.batch_id;
        let update = svc.train(&batch, &mut timeline)?;
        if update.is_some() {
            samples.write(svc.step, batch_id, &batch.groups, &svc.tokenizer)?;
        }
        let published = svc.publish(&mut writer, &mut timeline)?;
        svc.tell_server(batch_id, update.as_ref());
        let checkpoint_s = if update.is_some() {
            svc.checkpoint_if_due(&ring, &mut timeline)?
        } else {
            0.0
        };
        if let Some(u) = &update {
            info!(
                step = svc.step,
                policy_version = svc.learner.version(),
                batch_id,
                reward = u.reward_mean,
                accuracy = u.accuracy,
                staleness = batch.stats.max_staleness,
                "step done"
            );
            svc.notifier.status(&format!(
                "step {}, policy version {}, reward {:.3}",
                svc.step,
                svc.learner.version(),
                u.reward_mean
            ));
        }
        metrics.write(&StepLine {
            step: svc.step,
            version: svc.learner.version(),
            batch_id,
            wall_s: unix_now(),
            assembly: &batch.stats,
            update: update.as_ref(),
            wait_s: waited,
            publish_s: published.publish_s,
            checkpoint_s,
            checkpoint_error: svc.ckpt.error.take(),
            checkpoint_failures: svc.ckpt.failures,
            probe_s: published.probe_s,
            weights_sum: published.weights_sum,
            probes: std::mem::take(&mut svc.probes.done),
            quarantined_total: ring.quarantined_total(),
            duplicate_records: svc.duplicate_records,
            peer_hangs: beating.hangs(),
            spans: timeline.take(),
        })?;
    }
    svc.notifier.stopping();
    if svc.step != svc.last_checkpoint_step && cfg.checkpoint_every > 0 {
        match svc.checkpoint(&ring) {
            Ok(_) => info!(step = svc.step, "final checkpoint written"),
            Err(e) => {
                let failed = svc.ckpt.failed(cfg.checkpoint_failure, svc.step, e)?;
                metrics.write(&serde_json::json!({
                    "event": "checkpoint_failed",
                    "step": svc.step,
                    "checkpoint_error": failed,
                    "checkpoint_failures": svc.ckpt.failures,
                    "wall_s": unix_now(),
                }))?;
            }
        }
    }
    let finished = steps > 0 && svc.step >= steps;
    if finished {
        info!(
            step = svc.step,
            "trained {steps} steps; telling the rollout server to stop"
        );
        svc.tell_server_to_stop(stop);
    }
    if cfg.save_model && svc.step > 0 {
        let dir = paths.state_dir.join("model");
        let base = crate::train::base_model_name(cfg.model.as_deref());
        crate::train::save_model(&svc.learner, &svc.tokenizer, &dir, &base)?;
        info!("saved the model of step {} to {}", svc.step, dir.display());
        if cfg.lora.is_some() {
            let adapter = crate::train::adapter_dir(&dir);
            info!("saved the LoRA adapter to {}", adapter.display());
        }
    }
    if !finished {
        info!(step = svc.step, "stopped");
    }
    Ok(())
}

/// What the learner's ring gave.
enum Next {
    /// A complete batch to train on.
    Batch(AssembledBatch),
    /// Nothing yet (the ring was empty or the record completed no batch).
    Idle,
    /// The rollout server asked the learner to stop.
    Shutdown,
}

/// What publishing new weights cost (zeros when the step changed no weight).
#[derive(Debug, Default)]
struct Published {
    publish_s: f64,
    probe_s: f64,
    weights_sum: Option<f64>,
}

/// The learner service's state between its stages.
struct Service<'a> {
    cfg: &'a TrainFile,
    paths: &'a Paths,
    notifier: Notifier,
    learner: Learner,
    tokenizer: model::Tokenizer,
    bridge: WeightBridge,
    num_layers: usize,
    format: model::WeightFormat,
    probe: Probe,
    probes: ProbeChecks,
    ckpt_root: PathBuf,
    metrics_path: PathBuf,
    /// Optimizer steps taken.
    step: u64,
    last_checkpoint_step: u64,
    ckpt: CheckpointFailures,
    /// The last batch handed on (trained or dropped): older ids are duplicates.
    last_batch: Option<u64>,
    /// The newest batch received from the ring (or, after a resume, trained before it).
    received: Option<u64>,
    duplicate_records: u64,
    assembler: BatchAssembler,
    /// Batches assembled and not yet trained.
    ready: std::collections::VecDeque<AssembledBatch>,
    device_slots: Option<LearnerSlots>,
    control: Option<ControlLink>,
    last_notice: Instant,
    /// With LoRA: the behavior's copy of the model (base quantized once, adapters shared),
    /// which the learner's probe scores.
    lora_behavior: Option<model::Decoder>,
    /// Test fault: the policy version whose publication is skipped.
    drop_publication: Option<u64>,
}

impl<'a> Service<'a> {
    /// Loads the model (and the reference model for a KL penalty) and sets up the learner.
    fn start(cfg: &'a TrainFile, paths: &'a Paths) -> Result<Self> {
        let model_args = crate::modelargs::ModelArgs::new(cfg.model.clone(), cfg.device);
        let device = model_args.open_device()?;
        let loaded = model::load_model(
            &model_args.existing_path()?,
            &LoadOptions {
                trainable: true,
                device: device.clone(),
                ..LoadOptions::default()
            },
        )
        .context("while loading the model")?;
        let tokenizer = loaded.tokenizer.clone();
        let decoder = step::adapt(loaded.decoder, cfg.lora.as_ref(), cfg.seed)?;
        let bridge = WeightBridge::for_decoder(&decoder, &tokenizer)?;
        let num_layers = decoder.config().num_layers;
        let reference = if cfg.update.kl_coef > 0.0 {
            let opts = LoadOptions {
                device,
                ..LoadOptions::default()
            };
            Some(model::load_model(&model_args.existing_path()?, &opts)?.decoder)
        } else {
            None
        };
        let learner = Learner::new(decoder, reference, cfg.update.clone())
            .context("while setting up the learner")?;
        let format = cfg.plan.weight_format()?;
        let lora_behavior = match cfg.lora {
            Some(_) => Some(step::lora_behavior(learner.model(), format)?),
            None => None,
        };
        if let Some(l) = &cfg.lora {
            info!(
                rank = l.rank(),
                alpha = l.alpha(),
                adapter_tensors = bridge.manifest().tensors().len(),
                adapter_bytes = bridge.manifest().total_size(),
                "training LoRA adapters on a frozen base"
            );
        }
        Ok(Self {
            cfg,
            paths,
            notifier: Notifier,
            learner,
            probe: Probe::new(&tokenizer)?,
            tokenizer,
            bridge,
            num_layers,
            format,
            probes: ProbeChecks::default(),
            ckpt_root: paths.state_dir.join("checkpoints"),
            metrics_path: paths.state_dir.join("metrics.jsonl"),
            step: 0,
            last_checkpoint_step: 0,
            ckpt: CheckpointFailures::default(),
            last_batch: None,
            received: None,
            duplicate_records: 0,
            assembler: BatchAssembler::new(cfg.max_staleness),
            ready: Default::default(),
            device_slots: None,
            control: None,
            last_notice: Instant::now(),
            lora_behavior,
            drop_publication: None,
        })
    }

    /// The learner's side of the weight probe: the probe under its current weights as the
    /// behavior sees them.
    fn own_probe(&self) -> Result<Vec<f32>> {
        match &self.lora_behavior {
            Some(b) => self.probe.score(b),
            None => self
                .probe
                .score_as_behavior(self.learner.model(), self.format),
        }
    }

    /// Continues from the latest complete checkpoint, if any; steps logged after it are
    /// reported as rolled back.
    fn resume(&mut self) -> Result<()> {
        let Some(dir) = learner::latest_checkpoint(&self.ckpt_root)? else {
            info!(
                "no checkpoint in {}: starting fresh",
                self.ckpt_root.display()
            );
            return Ok(());
        };
        let st = self
            .learner
            .load_checkpoint(&dir)
            .with_context(|| format!("while loading the checkpoint {}", dir.display()))?;
        self.step = st.step;
        self.last_checkpoint_step = st.step;
        self.last_batch = serde_json::from_value::<CheckpointExtra>(st.extra.clone())
            .ok()
            .and_then(|e| e.last_batch_id);
        self.received = self.last_batch;
        let rolled_back = steps_after(&self.metrics_path, self.step);
        info!(
            step = self.step,
            policy_version = self.learner.version(),
            "resumed from {}",
            dir.display()
        );
        if !rolled_back.is_empty() {
            warn!(
                step = self.step,
                "steps {:?} ran after this checkpoint and are rolled back", rolled_back
            );
        }
        JsonLines::append(&self.metrics_path)?.write(&serde_json::json!({
            "event": "resumed",
            "step": self.step,
            "version": self.learner.version(),
            "checkpoint": dir,
            "rolled_back_steps": rolled_back,
            "wall_s": unix_now(),
        }))
    }

    /// Creates the weight store (or re-attaches to it after a restart), with the device slots
    /// on a GPU, and publishes the current weights.
    fn open_store(&mut self) -> Result<Writer> {
        let dir = &self.paths.runtime_dir;
        let name = &self.paths.name;
        let manifest = self.bridge.manifest();
        let mut writer = match WeightStore::create(dir, name, manifest, WEIGHT_SLOTS) {
            Ok(w) => w,
            Err(OpenError::Segment(SegmentError::AlreadyExists(_))) => {
                WeightStore::resume(dir, name, manifest).with_context(|| {
                    format!(
                        "while re-attaching to the weight store in {} (if it was left by \
                         another model or version, remove {}/{}.weights)",
                        dir.display(),
                        dir.display(),
                        name
                    )
                })?
            }
            Err(e) => return Err(e).context("while creating the weight store"),
        };
        self.device_slots =
            LearnerSlots::new(self.learner.model().device(), &self.bridge, &writer)?;
        publish(
            &mut writer,
            &self.bridge,
            &self.learner,
            self.device_slots.as_ref(),
        )?;
        info!(
            policy_version = self.learner.version(),
            "published the weights (generation {})",
            writer.generation()
        );
        self.probes
            .learner(self.learner.version(), self.own_probe()?);
        Ok(writer)
    }

    /// Listens on the control channel and waits for the rollout server: its handshake, then
    /// its ring. `None` when stopped first.
    fn connect(
        &mut self,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Option<protocol::Consumer>> {
        let hello = Hello {
            role: "learner".into(),
            layout_version: protocol::PROTOCOL_VERSION,
            model_hash: self.bridge.model_hash().to_string(),
            manifest_hash: self.bridge.manifest().hash_hex(),
            policy_version: self.learner.version(),
            batch_id: self.received.map(|b| b + 1),
        };
        let mut control = ControlLink::spawn(
            self.paths,
            hello,
            Arc::new(AtomicU64::new(self.learner.version())),
            self.device_slots.as_ref().map(|s| s.handles().clone()),
        )?;
        let desc = ring_descriptor(self.cfg, self.num_layers)?;
        let (dir, name) = (&self.paths.runtime_dir, &self.paths.name);
        let probes = &mut self.probes;
        let ring = step::wait_for_peer(
            "the rollout server",
            dir,
            name,
            timeout,
            stop,
            &self.notifier,
            || {
                control.poll()?;
                probes.take_from(&mut control);
                if control.conn.is_none() {
                    return Ok(None);
                }
                match protocol::RolloutRing::open(dir, name, desc) {
                    Ok(c) => Ok(Some(c)),
                    Err(OpenError::Segment(SegmentError::NotFound(_))) => Ok(None),
                    Err(e) => Err(e).context("while opening the rollout ring"),
                }
            },
        )?;
        self.control = Some(control);
        Ok(ring)
    }

    fn control(&mut self) -> Result<&mut ControlLink> {
        self.control
            .as_mut()
            .context("the control channel is not set up")
    }

    /// Reads the control channel, then pops one record into the assembler; returns the oldest
    /// complete batch when there is one.
    fn next_batch(&mut self, ring: &mut protocol::Consumer, stop: &AtomicBool) -> Result<Next> {
        let control = self
            .control
            .as_mut()
            .context("the control channel is not set up")?;
        let shutdown = control.poll()?;
        self.probes.take_from(control);
        self.notifier.alive();
        if shutdown {
            return Ok(Next::Shutdown);
        }
        if let Some(b) = self.ready.pop_front() {
            return Ok(Next::Batch(b));
        }
        // Polled with short naps rather than the ring's spinning wait: while the learner
        // idles, the CPU belongs to the server. The nap costs a step less than a wait on an
        // event could save: `bench overlap` measures the handoff (about 12 ms of a 20 s step).
        match ring.try_pop() {
            // A batch id at or below the last one handed on was trained (or dropped) already:
            // a server that restarted between pushing and saving its state redoes it. Never
            // train a batch twice.
            Ok(rec) if self.last_batch.is_some_and(|b| rec.batch_id <= b) => {
                self.duplicate_records += 1;
            }
            Ok(rec) => {
                if self.received.is_none_or(|b| rec.batch_id > b) {
                    self.received = Some(rec.batch_id);
                    control.set_needed(rec.batch_id + 1);
                }
                let done = self.assembler.push(rec, self.learner.version());
                self.ready.extend(done);
            }
            Err(PopError::Timeout(_)) | Err(PopError::Empty) => {
                // Pops only look for a fault; the size is checked while idle.
                ring.check_intact()
                    .context("while checking the rollout ring")?;
                if self.last_notice.elapsed() > Duration::from_secs(10) {
                    if !ring.producer_alive() {
                        info!(
                            generation = ring.producer_generation(),
                            "waiting for the rollout server (its process is gone; it resumes the ring when it restarts)"
                        );
                    }
                    self.last_notice = Instant::now();
                }
                nap(stop, Duration::from_millis(5));
            }
            Err(PopError::ProducerDead { .. }) => nap(stop, Duration::from_millis(5)),
            Err(PopError::Corrupt { seq, reason }) => {
                warn!("record {seq} quarantined: {reason}; its group will be dropped");
            }
            Err(e) => return Err(e).context("while reading the ring"),
        }
        Ok(match self.ready.pop_front() {
            Some(b) => Next::Batch(b),
            None => Next::Idle,
        })
    }

    /// Updates the target on the batch (none when no group was usable).
    fn train(
        &mut self,
        batch: &AssembledBatch,
        timeline: &mut Timeline,
    ) -> Result<Option<StepStats>> {
        self.last_batch = Some(batch.batch_id);
        if batch.groups.is_empty() {
            warn!(
                batch_id = batch.batch_id,
                "no usable group in this batch ({} incomplete, {} stale, {} rolled back)",
                batch.stats.incomplete_groups,
                batch.stats.stale_groups,
                batch.stats.rolled_back_groups
            );
            return Ok(None);
        }
        let stats = timeline.time("train", || {
            step::update(&mut self.learner, batch.batch_id, &batch.groups)
        })?;
        self.step += 1;
        Ok(Some(stats))
    }

    /// Publishes the weights if the step changed them, and scores the weight probe with them.
    fn publish(&mut self, writer: &mut Writer, timeline: &mut Timeline) -> Result<Published> {
        let mut out = Published::default();
        // Every step, published or not: the store holds the weights a restarted server needs.
        writer
            .check_intact()
            .context("while checking the weight store")?;
        let version = self.learner.version();
        // The store holds policy version v as v + 1.
        if writer.version() == version + 1 {
            return Ok(out);
        }
        if self.drop_publication == Some(version) {
            warn!(
                policy_version = version,
                "fault injection: the weights of this version are not published"
            );
            return Ok(out);
        }
        let t = unix_now();
        publish(
            writer,
            &self.bridge,
            &self.learner,
            self.device_slots.as_ref(),
        )?;
        out.publish_s = unix_now() - t;
        timeline.push("publish", t, unix_now());
        if self.device_slots.is_some() {
            out.weights_sum = Some(self.bridge.checksum(self.learner.model())?);
        }
        let t = unix_now();
        let own = self.own_probe()?;
        self.probes.learner(version, own);
        out.probe_s = unix_now() - t;
        timeline.push("probe", t, unix_now());
        Ok(out)
    }

    /// Tells the server the batch is done, with the KL it measured (for an adaptive plan).
    fn tell_server(&mut self, batch_id: u64, update: Option<&StepStats>) {
        let version = self.learner.version();
        let Ok(control) = self.control() else { return };
        control.set_version(version);
        control.send(Message::Trained {
            batch_id,
            version,
            kl_behavior: step::measured_kl(update),
        });
    }

    /// Writes a checkpoint when the interval says so; its seconds (0 when none).
    fn checkpoint_if_due(
        &mut self,
        ring: &protocol::Consumer,
        timeline: &mut Timeline,
    ) -> Result<f64> {
        let every = self.cfg.checkpoint_every;
        if every == 0 || !self.step.is_multiple_of(every) || self.step == self.last_checkpoint_step
        {
            return Ok(0.0);
        }
        let t = unix_now();
        if let Err(e) = self.checkpoint(ring) {
            let failed = self
                .ckpt
                .failed(self.cfg.checkpoint_failure, self.step, e)?;
            self.ckpt.error = Some(failed);
        }
        timeline.push("checkpoint", t, unix_now());
        Ok(unix_now() - t)
    }

    fn checkpoint(&mut self, ring: &protocol::Consumer) -> Result<PathBuf> {
        let dir = checkpoint(
            &self.learner,
            &self.ckpt_root,
            self.step,
            self.last_batch,
            ring,
            self.cfg,
            self.ckpt.next_fault(),
        )?;
        self.last_checkpoint_step = self.step;
        Ok(dir)
    }

    /// Sends the server the order to stop, giving a server that is restarting right now a
    /// little while to reconnect first (else it would wait for a learner that is done).
    fn tell_server_to_stop(&mut self, stop: &AtomicBool) {
        let Ok(control) = self.control.as_mut().context("no control channel") else {
            return;
        };
        let grace = Instant::now();
        while control.conn.is_none() && grace.elapsed() < Duration::from_secs(30) && !stopping(stop)
        {
            if control.poll().is_err() {
                break;
            }
            self.notifier.alive();
            nap(stop, Duration::from_millis(50));
        }
        if control.conn.is_none() {
            warn!("the rollout server is not connected: it was not told to stop");
        }
        control.send(Message::Shutdown);
    }
}

/// Failed checkpoints: the count, the last error not yet in the metrics, and a fault to inject
/// (into the checkpoint attempt of that number).
#[derive(Default)]
struct CheckpointFailures {
    failures: u64,
    error: Option<String>,
    attempts: u64,
    fault: Option<(u64, learner::WriteFault)>,
}

/// `C:F` of `--fail-checkpoint-write`.
fn parse_fault(s: &str) -> std::result::Result<(u64, learner::WriteFault), String> {
    let bad = || format!("expected CHECKPOINT:FILE (two numbers, e.g. 2:1), got {s:?}");
    let (c, f) = s.split_once(':').ok_or_else(bad)?;
    let c = c.parse().map_err(|_| bad())?;
    let after_files = f.parse().map_err(|_| bad())?;
    Ok((c, learner::WriteFault { after_files }))
}

impl CheckpointFailures {
    /// Counts an attempt; the fault to inject into it, if it is the one.
    fn next_fault(&mut self) -> Option<learner::WriteFault> {
        self.attempts += 1;
        self.fault
            .filter(|(n, _)| *n == self.attempts)
            .map(|(_, f)| f)
    }

    /// Applies the policy to a failed checkpoint (the learner crate removed what it wrote):
    /// `stop` returns the error; `retry` counts and logs it and returns its text.
    fn failed(&mut self, policy: CheckpointFailure, step: u64, e: anyhow::Error) -> Result<String> {
        self.failures += 1;
        match policy {
            CheckpointFailure::Stop => Err(e.context(
                "stopping (checkpoint_failure = \"stop\"); the previous checkpoint is intact \
                 and --resume continues from it",
            )),
            CheckpointFailure::Retry => {
                let text = format!("{e:#}");
                warn!(
                    step,
                    failures = self.failures,
                    "{text}; training goes on and the next checkpoint is tried at the next \
                     interval (LATEST names the previous one)"
                );
                Ok(text)
            }
        }
    }
}

/// The probes of both sides, paired by version; mismatches are logged as they complete.
#[derive(Default)]
struct ProbeChecks {
    ledger: ProbeLedger,
    /// Comparisons completed since the last metrics line.
    done: Vec<ProbeCheck>,
}

impl ProbeChecks {
    fn learner(&mut self, version: u64, logprobs: Vec<f32>) {
        let check = self.ledger.learner(version, logprobs);
        self.completed(check);
    }

    fn take_from(&mut self, control: &mut ControlLink) {
        for (version, logprobs) in std::mem::take(&mut control.probes) {
            let check = self.ledger.behavior(version, logprobs);
            self.completed(check);
        }
    }

    fn completed(&mut self, check: Option<ProbeCheck>) {
        let Some(c) = check else { return };
        if c.matches() {
            tracing::debug!(
                version = c.version,
                max_abs_diff = c.max_abs_diff,
                "weight probe matches"
            );
        } else {
            warn!(
                version = c.version,
                max_abs_diff = c.max_abs_diff,
                "the rollout server's behavior does not match the learner's weights of version {}: \
                 its log-probs of the probe differ by {:.3e} (tolerance {:.0e})",
                c.version,
                c.max_abs_diff,
                crate::probe::PROBE_TOLERANCE
            );
        }
        self.done.push(c);
    }
}

fn publish(
    writer: &mut Writer,
    bridge: &WeightBridge,
    learner: &Learner,
    device_slots: Option<&LearnerSlots>,
) -> Result<()> {
    // The store's version 0 means "nothing published", so policy version v is stored as v + 1.
    if let Some(slots) = device_slots {
        return slots.publish(writer, bridge, learner.model(), learner.version() + 1);
    }
    writer
        .publish_version(
            learner.version() + 1,
            Duration::from_secs(60),
            |slot: &mut [u8]| bridge.write(learner.model(), slot),
        )
        .map_err(|e| anyhow!("{e}"))
        .context("while publishing the weights")?;
    Ok(())
}

fn checkpoint(
    learner: &Learner,
    root: &Path,
    step: u64,
    last_batch: Option<u64>,
    ring: &protocol::Consumer,
    cfg: &TrainFile,
    fault: Option<learner::WriteFault>,
) -> Result<PathBuf> {
    let extra = serde_json::to_value(CheckpointExtra {
        last_batch_id: last_batch,
        ring_next_seq: ring.next_seq(),
        seed: cfg.seed,
    })?;
    std::fs::create_dir_all(root).with_context(|| format!("while creating {}", root.display()))?;
    let dir = learner
        .save_checkpoint_with(root, step, &extra, cfg.keep_checkpoints, fault)
        .with_context(|| format!("while writing the checkpoint of step {step}"))?;
    info!(
        step,
        policy_version = learner.version(),
        "checkpoint {}",
        dir.display()
    );
    Ok(dir)
}

/// Steps recorded in `metrics` after `step` (they are rolled back by a resume).
fn steps_after(metrics: &Path, step: u64) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Vec::new();
    };
    let mut out: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_none())
        .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
        .filter(|&s| s > step)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
