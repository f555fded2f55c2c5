//! The rollout-server process: generates batches with the nested behavior from the newest
//! published weights, scores them and pushes the records into the ring, never more than
//! `max_staleness` batches ahead of the learner.

use super::device_slots::ServerSlots;
use super::{
    nap, ring_descriptor, stopping, unix_now, write_atomic, JsonLines, Notifier, Paths,
    ServiceArgs, Span, Timeline,
};
use crate::probe::Probe;
use crate::step;
use crate::train::TrainFile;
use anyhow::{anyhow, Context, Result};
use clap::Parser;
use model::{Decoder, LoadOptions, WeightBridge};
use protocol::control::{connect, Connection, Hello, IpcHandles, Message};
use protocol::{
    ControlError, HandshakeError, OpenError, PinError, Producer, PushError, Reader, RolloutRing,
    SegmentError, WeightStore,
};
use rollout_server::{GenerationStats, GeneratorState};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// `nested-reft-rollout-server`.
#[derive(Debug, Parser)]
#[command(
    name = "nested-reft-rollout-server",
    version,
    about = "The nested-reft rollout server: generates rollouts with the nested behavior from \
             the learner's newest weights, scores them and pushes them into the shared ring. \
             SIGHUP reloads the reward module.",
    long_about = None
)]
pub struct ServerArgs {
    #[command(flatten)]
    pub common: ServiceArgs,
}

/// One line of the server's `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct BatchLine<'a> {
    batch_id: u64,
    policy_version: u64,
    #[serde(flatten)]
    skips: step::Skips,
    wall_s: f64,
    records: usize,
    generation: &'a GenerationStats,
    /// Seconds waiting because the server was `max_staleness` batches ahead (or had no
    /// weights, or no learner).
    wait_s: f64,
    /// Seconds copying new weights out of the store (and re-quantizing them).
    load_s: f64,
    /// Seconds scoring the weight probe after a load.
    probe_s: f64,
    /// With device weight slots: the checksum of the weights loaded for this batch (see
    /// `WeightBridge::checksum`; the learner writes its own for the version).
    #[serde(skip_serializing_if = "Option::is_none")]
    weights_sum: Option<f64>,
    /// Seconds pushing the records.
    push_s: f64,
    /// Batches pushed but not yet trained, after this one.
    in_flight: u64,
    /// Times the learner was seen hung so far (see `step::PeerWatch`).
    peer_hangs: u64,
    spans: Vec<Span>,
}

/// The server's end of the control channel: connects to the name in the learner's name file,
/// and again whenever the connection is lost and the file names a new listener.
struct ControlLink {
    file: std::path::PathBuf,
    conn: Option<Connection>,
    tried: Option<String>,
    hello: Hello,
}

enum Event {
    Connected(Hello),
    Trained {
        batch_id: u64,
        version: u64,
        kl_behavior: f64,
    },
    /// The learner's device weight slots (it runs on a GPU).
    DeviceSlots(IpcHandles),
    Shutdown,
    Lost,
}

impl ControlLink {
    /// Sends a message when connected; a failed send drops the connection (the next `poll`
    /// reconnects when the learner is back).
    fn send(&mut self, msg: Message) {
        if let Some(c) = &self.conn {
            if let Err(e) = c.send(msg) {
                warn!("lost the control channel to the learner ({e})");
                self.conn = None;
            }
        }
    }

    /// Tries to (re)connect when disconnected; returns what happened since the last call.
    fn poll(&mut self, next_batch: u64, policy_version: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        if self.conn.is_none() {
            if let Ok(name) = std::fs::read_to_string(&self.file) {
                if self.tried.as_deref() != Some(name.as_str()) {
                    self.tried = Some(name.clone());
                    let mut hello = self.hello.clone();
                    hello.policy_version = policy_version;
                    hello.batch_id = Some(next_batch);
                    match connect(&name, hello, Duration::from_secs(10)) {
                        Ok(c) => {
                            out.push(Event::Connected(c.peer().clone()));
                            self.conn = Some(c);
                        }
                        Err(e @ HandshakeError::Mismatch { .. }) => {
                            return Err(anyhow!(e).context("the control handshake failed"));
                        }
                        // A name left by a learner that is gone: wait for a new one.
                        Err(_) => {}
                    }
                }
            }
        }
        if let Some(c) = &self.conn {
            loop {
                match c.recv(Duration::ZERO) {
                    Ok(Message::Trained {
                        batch_id,
                        version,
                        kl_behavior,
                    }) => out.push(Event::Trained {
                        batch_id,
                        version,
                        kl_behavior,
                    }),
                    Ok(Message::DeviceSlots(h)) => out.push(Event::DeviceSlots(h)),
                    Ok(Message::Shutdown) => out.push(Event::Shutdown),
                    Ok(Message::Error { message }) => warn!("the learner failed: {message}"),
                    Ok(_) => {}
                    Err(ControlError::Timeout(_)) => break,
                    Err(_) => {
                        self.conn = None;
                        out.push(Event::Lost);
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Runs the rollout server until it is stopped or the learner says it is done.
pub fn main(args: ServerArgs) -> Result<()> {
    let (cfg, paths, stop) = args.common.start("rollout-server", |c| c.server_threads)?;
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .context("while installing the SIGHUP handler")?;
    run(&cfg, &paths, args.common.peer_timeout()?, &stop, &reload)
}

fn run(
    cfg: &TrainFile,
    paths: &Paths,
    peer_timeout: Duration,
    stop: &AtomicBool,
    reload: &AtomicBool,
) -> Result<()> {
    let mut server = Server::start(cfg, paths)?;
    let Some(mut reader) = server.connect(peer_timeout, stop)? else {
        return Ok(());
    };
    server.notifier.ready("generating");
    info!(batch_id = server.generator.state().next_batch_id, "ready");
    let mut metrics = JsonLines::append(&paths.state_dir.join("metrics.jsonl"))?;
    let mut timeline = Timeline::default();
    loop {
        let wait_start = unix_now();
        if !server.wait_turn(&reader, stop)? {
            break;
        }
        let wait_end = unix_now();
        if wait_end - wait_start > 1e-3 {
            timeline.push("wait", wait_start, wait_end);
        }
        if reload.swap(false, Ordering::Relaxed) {
            // Relaxed: a plain flag set by the SIGHUP handler.
            server.reload_reward();
        }
        let Some(load) = server.take_weights(&mut reader, &mut timeline)? else {
            continue; // a restarted learner: wait for its slots' handles
        };
        let before = server.generator.state();
        let t_gen = unix_now();
        let (version, (_, behavior)) = server.behavior.as_ref().context("no behavior")?;
        let version = *version;
        let batch = step::generate(&mut server.generator, behavior, version)?;
        // Generation and scoring ran back to back; split the span at the measured times.
        let gen_end = t_gen + batch.stats.generation_s;
        timeline.push("generate", t_gen, gen_end);
        timeline.push("score", gen_end, gen_end + batch.stats.reward_s);
        let t = unix_now();
        if !server.push(&batch, stop)? {
            // Stopped while the ring was full: the state is not saved, so a restarted server
            // generates this batch again under the same id (the learner merges the copies).
            warn!(
                batch_id = batch.batch_id,
                "stopped while pushing; the batch will be redone"
            );
            break;
        }
        let push_s = unix_now() - t;
        timeline.push("push", t, unix_now());
        server.pending.push_back(before);
        server.save_state()?;
        let records = batch.groups.iter().map(Vec::len).sum::<usize>();
        info!(
            batch_id = batch.batch_id,
            policy_version = version,
            records,
            in_flight = server.in_flight,
            tokens_per_s = batch.stats.behavior_tokens_per_s,
            "batch pushed"
        );
        metrics.write(&BatchLine {
            batch_id: batch.batch_id,
            policy_version: version,
            skips: step::Skips::of(&batch.plan),
            wall_s: unix_now(),
            records,
            generation: &batch.stats,
            wait_s: wait_end - wait_start,
            load_s: load.load_s,
            probe_s: load.probe_s,
            weights_sum: load.weights_sum,
            push_s,
            in_flight: server.in_flight,
            peer_hangs: server.beating.hangs(),
            spans: timeline.take(),
        })?;
        server.notifier.alive();
    }
    server.notifier.stopping();
    info!("stopped");
    Ok(())
}

/// What taking new weights cost (zeros when the behavior was current).
#[derive(Debug, Default)]
struct Load {
    load_s: f64,
    probe_s: f64,
    weights_sum: Option<f64>,
}

/// The rollout server's state between its stages.
struct Server<'a> {
    cfg: &'a TrainFile,
    paths: &'a Paths,
    notifier: Notifier,
    bridge: WeightBridge,
    device: model::candle_core::Device,
    format: model::WeightFormat,
    probe: Probe,
    generator: rollout_server::Generator,
    state_path: std::path::PathBuf,
    /// The generator's state before each batch pushed and not yet reported trained, oldest
    /// first: what a rewind goes back to when the learner has lost batches with the ring.
    pending: std::collections::VecDeque<GeneratorState>,
    ring: Producer,
    control: ControlLink,
    /// The learner's device weight slots, when it runs on a GPU.
    device_slots: Option<ServerSlots>,
    /// The behavior: policy version, and (store generation, its model).
    behavior: Option<(u64, (u64, Decoder))>,
    /// With LoRA: this process's base with adapters, which each publication's adapters are
    /// set into (the behavior is a copy sharing them).
    lora_base: Option<Decoder>,
    /// The newest policy version the learner reported trained (reset when it reconnects):
    /// the store must hold it before the server samples again.
    learner_version: Option<u64>,
    /// Records per batch (the last batch's count once one was pushed).
    per_batch: u64,
    /// Batches pushed and not yet trained.
    in_flight: u64,
    shutdown: bool,
    last_notice: Instant,
    /// This server's heartbeat, and its watch on the learner's.
    beating: step::Beating,
}

impl<'a> Server<'a> {
    /// Loads the model's configuration and tokenizer (the weights come from the learner), the
    /// generator (continuing from its saved state) and creates or resumes the ring.
    fn start(cfg: &'a TrainFile, paths: &'a Paths) -> Result<Self> {
        let model_args = crate::modelargs::ModelArgs::new(cfg.model.clone(), cfg.device);
        let loaded = model::load_model(
            &model_args.existing_path()?,
            &LoadOptions {
                device: model_args.open_device()?,
                ..LoadOptions::default()
            },
        )
        .context("while loading the model")?;
        let device = loaded.decoder.device().clone();
        let model_cfg = loaded.decoder.config().clone();
        // With LoRA only the adapters travel: this process keeps the base (the same file the
        // learner loads; the handshake compares fingerprints). Without, the weights come whole
        // from the learner and the loaded copy goes.
        let lora_base = match &cfg.lora {
            Some(l) => Some(step::adapt(loaded.decoder, Some(l), cfg.seed)?),
            None => {
                drop(loaded.decoder);
                None
            }
        };
        let bridge = match &lora_base {
            Some(d) => WeightBridge::for_decoder(d, &loaded.tokenizer)?,
            None => WeightBridge::new(&model_cfg, &loaded.tokenizer)?,
        };
        let probe = Probe::new(&loaded.tokenizer)?;
        let mut generator = cfg.generator(
            &crate::train::ModelSource {
                path: &model_args.existing_path()?,
                config: &model_cfg,
            },
            loaded.tokenizer,
            |s| warn!("{s}"),
        )?;
        let state_path = paths.state_dir.join("server-state.json");
        let mut pending = std::collections::VecDeque::new();
        if let Ok(text) = std::fs::read_to_string(&state_path) {
            let saved: SavedState = serde_json::from_str(&text)
                .with_context(|| format!("while reading {}", state_path.display()))?;
            let state = saved.current;
            pending = saved.pending.into();
            let (batch_id, cursor) = (state.next_batch_id, state.cursor);
            generator
                .restore(state)
                .with_context(|| format!("while restoring {}", state_path.display()))?;
            info!(
                batch_id,
                "continuing from {} (epoch {}, position {})",
                state_path.display(),
                cursor.epoch,
                cursor.position
            );
        }
        let ring = open_ring(cfg, paths, model_cfg.num_layers)?;
        let control = ControlLink {
            file: paths.control_file(),
            conn: None,
            tried: None,
            hello: Hello {
                role: "rollout-server".into(),
                layout_version: protocol::PROTOCOL_VERSION,
                model_hash: bridge.model_hash().to_string(),
                manifest_hash: bridge.manifest().hash_hex(),
                policy_version: 0,
                batch_id: None,
            },
        };
        let beating = step::Beating::start(
            ring.heartbeat(),
            step::PeerWatch::new("the learner", Duration::from_secs_f64(cfg.hang_timeout_s)),
        )?;
        Ok(Self {
            cfg,
            paths,
            notifier: Notifier,
            bridge,
            device,
            format: cfg.plan.weight_format()?,
            probe,
            generator,
            state_path,
            pending,
            ring,
            control,
            device_slots: None,
            behavior: None,
            lora_base,
            learner_version: None,
            per_batch: records_per_batch(cfg),
            in_flight: 0,
            shutdown: false,
            last_notice: Instant::now(),
            beating,
        })
    }

    /// Waits for the learner: the control handshake, then its weight store. `None` when
    /// stopped first.
    fn connect(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<Option<Reader>> {
        let (dir, name) = (&self.paths.runtime_dir, &self.paths.name);
        let notifier = Notifier;
        let reader =
            step::wait_for_peer("the learner", dir, name, timeout, stop, &notifier, || {
                for ev in self.control.poll(self.generator.state().next_batch_id, 0)? {
                    match ev {
                        Event::Connected(peer) => {
                            info!(
                                policy_version = peer.policy_version,
                                "handshake with the learner succeeded"
                            );
                            self.learner_version = Some(peer.policy_version);
                            self.catch_up(peer.batch_id)?;
                        }
                        Event::DeviceSlots(h) => self.open_slots(&h)?,
                        _ => {}
                    }
                }
                if self.control.conn.is_none() {
                    return Ok(None);
                }
                match WeightStore::open(dir, name, self.bridge.manifest()) {
                    Ok(r) => Ok(Some(r)),
                    Err(OpenError::Segment(SegmentError::NotFound(_))) => Ok(None),
                    Err(e) => Err(e).context("while opening the weight store"),
                }
            })?;
        // Batches already in the ring (from before a restart) count as in flight.
        self.in_flight = self.ring.len().div_ceil(self.per_batch);
        Ok(reader)
    }

    /// Replaces the learner's device slots by the ones `handles` name.
    fn open_slots(&mut self, handles: &IpcHandles) -> Result<()> {
        self.device_slots = None; // close the old handles first
        self.device_slots = Some(ServerSlots::open(&self.device, &self.bridge, handles)?);
        Ok(())
    }

    /// Handles the learner's messages and waits while the server is `max_staleness` batches
    /// ahead of the learner, or there are no weights (or, on a GPU, no handles for them) yet.
    /// False when the server should stop.
    fn wait_turn(&mut self, reader: &Reader, stop: &AtomicBool) -> Result<bool> {
        loop {
            let policy_version = self.behavior.as_ref().map_or(0, |b| b.0);
            for ev in self
                .control
                .poll(self.generator.state().next_batch_id, policy_version)?
            {
                self.on_event(ev)?;
            }
            if self.shutdown || stopping(stop) {
                return Ok(false);
            }
            let ahead = self.in_flight > self.cfg.max_staleness;
            let published = reader.latest_version() > 0;
            // On a GPU the weights travel through the device slots of the learner that
            // published them: wait for its handles.
            let slots_ready = self.device.is_cpu()
                || self
                    .device_slots
                    .as_ref()
                    .is_some_and(|s| s.generation() == reader.writer_generation());
            if !ahead && published && slots_ready {
                return Ok(true);
            }
            if self.last_notice.elapsed() > Duration::from_secs(10) {
                if !reader.writer_alive() || self.control.conn.is_none() {
                    info!(
                        in_flight = self.in_flight,
                        "waiting for the learner (it is not running)"
                    );
                } else {
                    tracing::debug!(
                        in_flight = self.in_flight,
                        "waiting for the learner to catch up"
                    );
                }
                self.last_notice = Instant::now();
            }
            self.notifier.alive();
            nap(stop, Duration::from_millis(20));
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Connected(peer) => {
                self.learner_version = Some(peer.policy_version);
                self.catch_up(peer.batch_id)?;
                self.in_flight = self.ring.len().div_ceil(self.per_batch);
                info!(
                    policy_version = peer.policy_version,
                    in_flight = self.in_flight,
                    "reconnected to the learner"
                );
            }
            Event::Trained {
                batch_id,
                version,
                kl_behavior,
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.learner_version =
                    Some(self.learner_version.map_or(version, |v| v.max(version)));
                // Batches up to this one will never be asked for again.
                self.pending.retain(|s| s.next_batch_id > batch_id);
                tracing::debug!(batch_id, policy_version = version, "trained");
                if let Some(set) = self.generator.observe_kl(batch_id, kl_behavior) {
                    info!(
                        batch_id,
                        kl_behavior, set, "adaptive plan: the learner's KL moved the behavior"
                    );
                }
            }
            Event::DeviceSlots(h) => self.open_slots(&h)?,
            Event::Shutdown => {
                info!("the learner is done; stopping");
                self.shutdown = true;
            }
            Event::Lost => {
                // The handles belong to that learner: a new one sends its own.
                self.device_slots = None;
                // A restarted learner may resume from an older version.
                self.learner_version = None;
                warn!("lost the control channel to the learner; waiting for it to come back")
            }
        }
        Ok(())
    }

    /// Reloads the reward module (SIGHUP), keeping the old one if the new one fails.
    fn reload_reward(&mut self) {
        match self.cfg.reward.build() {
            Ok(r) => {
                self.generator.set_reward(r);
                info!("reloaded the reward module");
            }
            Err(e) => warn!("reloading the reward module failed ({e:#}); keeping the old one"),
        }
    }

    /// Takes the newest published weights when they are newer than the behavior's: copies them
    /// out and unpins at once, builds the behavior and sends the learner its weight probe.
    /// `None` when the weights cannot be taken yet (a restarted learner whose handles have not
    /// arrived, or nothing published).
    fn take_weights(
        &mut self,
        reader: &mut Reader,
        timeline: &mut Timeline,
    ) -> Result<Option<Load>> {
        // Every batch, new weights or not: the words read below live in the store's file, and
        // the ring's size is checked here (pushes only look for a fault).
        reader
            .check_intact()
            .context("while checking the weight store")?;
        self.ring
            .check_intact()
            .context("while checking the rollout ring")?;
        let t = unix_now();
        let generation = reader.writer_generation();
        let latest = reader.latest_version();
        self.check_published(latest)?;
        if self
            .behavior
            .as_ref()
            .is_some_and(|(v, (g, _))| (*g, v + 1) == (generation, latest))
        {
            return Ok(Some(Load::default()));
        }
        if self
            .device_slots
            .as_ref()
            .is_some_and(|s| s.generation() != generation)
        {
            return Ok(None);
        }
        let (version, tensors) = {
            let pinned = match reader.pin() {
                Ok(p) => p,
                Err(PinError::NothingPublished) => return Ok(None),
                Err(e) => return Err(e).context("while pinning the weights"),
            };
            let d = match &self.device_slots {
                Some(slots) => slots.load(&pinned, &self.bridge, &self.device),
                None => self
                    .bridge
                    .tensors(pinned.bytes(), &self.device)
                    .map_err(Into::into),
            }
            .context("while loading the published weights")?;
            // Weights read from a store whose file was truncated meanwhile may be zeros.
            pinned
                .check_intact()
                .context("while loading the published weights")?;
            // The store's version 0 means "nothing published": version v + 1 holds policy v.
            (pinned.version() - 1, d)
        };
        let mut load = Load::default();
        let behavior = match self
            .bridge
            .apply(tensors, self.lora_base.as_ref(), &self.device)
            .context("while loading the published weights")?
        {
            // Whole weights: a new decoder, re-quantized for an 8-bit behavior.
            Some(weights) => {
                if self.device_slots.is_some() {
                    load.weights_sum = Some(self.bridge.checksum(&weights)?);
                }
                match step::behavior_model(&weights, self.format)? {
                    Some(q) => q,
                    None => weights,
                }
            }
            // LoRA: the adapters were set into the base; the behavior shares them.
            None => {
                let base = self.lora_base.as_ref().context("no LoRA base")?;
                if self.device_slots.is_some() {
                    load.weights_sum = Some(self.bridge.checksum(base)?);
                }
                match self.behavior.take() {
                    Some((_, (_, b))) => b,
                    None => step::lora_behavior(base, self.format)?,
                }
            }
        };
        load.load_s = unix_now() - t;
        timeline.push("load", t, unix_now());
        // Proof for the learner that this behavior is its version `version`.
        let t = unix_now();
        let logprobs = self.probe.score(&behavior)?;
        self.control.send(Message::Probe { version, logprobs });
        load.probe_s = unix_now() - t;
        timeline.push("probe", t, unix_now());
        self.behavior = Some((version, (generation, behavior)));
        Ok(Some(load))
    }

    /// Refuses to sample on when the learner reported a policy version trained that the store
    /// (newest version `latest`, which holds policy `latest - 1`) does not hold: the learner
    /// publishes before it reports, so a missing version is a lost publication, and sampling
    /// on would silently use stale weights (with LoRA: stale adapters).
    fn check_published(&self, latest: u64) -> Result<()> {
        let Some(trained) = self.learner_version else {
            return Ok(());
        };
        let held = latest.checked_sub(1);
        if held.is_none_or(|h| h < trained) {
            let held = held.map_or("nothing".to_string(), |h| format!("policy version {h}"));
            anyhow::bail!(
                "the learner reported policy version {trained} trained, but the weight store                  holds {held}: the publication of version {trained} did not arrive; refusing                  to sample from stale {}",
                if self.lora_base.is_some() {
                    "adapters"
                } else {
                    "weights"
                }
            );
        }
        Ok(())
    }

    /// Pushes a batch's records into the ring; false when stopped while the ring was full.
    fn push(&mut self, batch: &rollout_server::RolloutBatch, stop: &AtomicBool) -> Result<bool> {
        let records = batch.groups.iter().map(Vec::len).sum::<usize>();
        for rec in batch.groups.iter().flatten() {
            if !push(&mut self.ring, rec, stop, &self.notifier)? {
                return Ok(false);
            }
        }
        if records > 0 {
            self.per_batch = records as u64;
            self.in_flight += 1;
        }
        Ok(true)
    }

    /// Saves the generator's position (a restarted server continues after the last pushed
    /// batch).
    fn save_state(&self) -> Result<()> {
        let saved = SavedState {
            current: self.generator.state(),
            pending: self.pending.iter().cloned().collect(),
        };
        write_atomic(&self.state_path, serde_json::to_string(&saved)?.as_bytes())
    }

    /// Goes back to batch `needed`, the learner's next, when the batches from it up to this
    /// server's next were pushed but the learner never got them: the ring they were in is
    /// gone (it is empty now: a run resumed in a fresh runtime directory, a reboot). They are
    /// generated again under the same ids (plans and sampling derive from the seed and the
    /// id), so a resumed run sees the data an uninterrupted one would.
    fn catch_up(&mut self, needed: Option<u64>) -> Result<()> {
        let Some(needed) = needed else { return Ok(()) };
        let next = self.generator.state().next_batch_id;
        if needed >= next || !self.ring.is_empty() {
            return Ok(());
        }
        let Some(state) = self
            .pending
            .iter()
            .find(|s| s.next_batch_id == needed)
            .cloned()
        else {
            warn!(
                needed,
                next,
                "the learner needs batch {needed}, but batches {needed}..{} were lost with the \
                 ring and this server kept no state to generate them again; they are skipped",
                next - 1
            );
            return Ok(());
        };
        self.generator
            .restore(state)
            .context("while going back to the learner's next batch")?;
        self.pending.retain(|s| s.next_batch_id < needed);
        self.save_state()?;
        info!(
            needed,
            "batches {needed}..{} were lost with the ring: generating them again",
            next - 1
        );
        Ok(())
    }
}

/// `server-state.json`: where the generator stands, and the states before the batches pushed
/// but not yet trained. A file of an older version holds the current state alone.
#[derive(Debug, Serialize, serde::Deserialize)]
struct SavedState {
    #[serde(flatten)]
    current: GeneratorState,
    #[serde(default)]
    pending: Vec<GeneratorState>,
}

/// The ring: created, or resumed after a restart (records already pushed stay).
fn open_ring(cfg: &TrainFile, paths: &Paths, num_layers: usize) -> Result<Producer> {
    let dir = &paths.runtime_dir;
    let desc = ring_descriptor(cfg, num_layers)?;
    let ring = match RolloutRing::create(dir, &paths.name, desc) {
        Ok(p) => p,
        Err(OpenError::Segment(SegmentError::AlreadyExists(_))) => {
            RolloutRing::resume(dir, &paths.name, desc).with_context(|| {
                format!(
                    "while re-attaching to the ring in {} (if it was left by another \
                     configuration or version, remove {}/{}.ring)",
                    dir.display(),
                    dir.display(),
                    paths.name
                )
            })?
        }
        Err(e) => return Err(e).context("while creating the rollout ring"),
    };
    info!(
        "ring {}/{}.ring generation {}",
        dir.display(),
        paths.name,
        ring.generation()
    );
    Ok(ring)
}

fn records_per_batch(cfg: &TrainFile) -> u64 {
    (cfg.generator.prompts_per_batch * cfg.generator.group_size).max(1) as u64
}

/// Pushes one record, waiting while the ring is full (the learner is behind or restarting);
/// false when stopped meanwhile.
fn push(
    ring: &mut Producer,
    rec: &protocol::RolloutRecord,
    stop: &AtomicBool,
    notifier: &Notifier,
) -> Result<bool> {
    let mut last_notice = Instant::now();
    loop {
        // Short naps rather than the ring's spinning wait: while the server waits, the CPU
        // belongs to the learner.
        match ring.try_push(&rec.as_view()) {
            Ok(_) => return Ok(true),
            Err(PushError::Full { .. }) => {
                if stopping(stop) {
                    return Ok(false);
                }
                if last_notice.elapsed() > Duration::from_secs(10) {
                    info!(
                        consumer_alive = ring.consumer_alive(),
                        "the ring is full; waiting for the learner"
                    );
                    last_notice = Instant::now();
                }
                notifier.alive();
                nap(stop, Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("while pushing a record"),
        }
    }
}
