//! The rollout-server process: generates batches with the nested behavior from the newest
//! published weights, scores them and pushes the records into the ring, never more than
//! `max_staleness` batches ahead of the learner.

use super::device_slots::ServerSlots;
use super::{
    nap, ring_descriptor, stopping, unix_now, write_atomic, JsonLines, Notifier, Paths,
    ServiceArgs, Span, Timeline,
};
use crate::probe::Probe;
use crate::train::TrainFile;
use anyhow::{anyhow, bail, Context, Result};
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
    skipped_layers: Vec<usize>,
    /// Everything the plan skipped: layers (`12`), attention (`a12`) and MLP blocks (`m12`).
    skipped_units: Vec<String>,
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
    let notifier = Notifier;
    let model_args = crate::modelargs::ModelArgs::new(cfg.model.clone(), cfg.device);
    // The weights come from the learner; the file gives the configuration and tokenizer.
    let loaded = model::load_model(
        &model_args.existing_path()?,
        &LoadOptions {
            device: model_args.open_device()?,
            ..LoadOptions::default()
        },
    )
    .context("while loading the model")?;
    let bridge = WeightBridge::new(loaded.decoder.config(), &loaded.tokenizer)?;
    let device = loaded.decoder.device().clone();
    let model_cfg = loaded.decoder.config().clone();
    let num_layers = model_cfg.num_layers;
    drop(loaded.decoder);
    let format = cfg.plan.weight_format()?;
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
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        let state: GeneratorState = serde_json::from_str(&text)
            .with_context(|| format!("while reading {}", state_path.display()))?;
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

    // The ring: created, or resumed after a restart (records already pushed stay).
    let dir = &paths.runtime_dir;
    let desc = ring_descriptor(cfg, num_layers)?;
    let mut ring = match RolloutRing::create(dir, &paths.name, desc) {
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

    let mut control = ControlLink {
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
    // Wait for the learner: the handshake, then its weight store.
    let start = Instant::now();
    let mut said = false;
    let mut reader: Option<Reader> = None;
    // The learner's device weight slots, when it runs on a GPU.
    let mut device_slots: Option<ServerSlots> = None;
    loop {
        if stopping(stop) {
            info!("stopped before the learner connected");
            return Ok(());
        }
        for ev in control.poll(generator.state().next_batch_id, 0)? {
            match ev {
                Event::Connected(peer) => info!(
                    policy_version = peer.policy_version,
                    "handshake with the learner succeeded"
                ),
                Event::DeviceSlots(h) => {
                    drop(device_slots.take()); // close the old handles first
                    device_slots = Some(ServerSlots::open(&device, &bridge, &h)?);
                }
                _ => {}
            }
        }
        if control.conn.is_some() && reader.is_none() {
            match WeightStore::open(dir, &paths.name, bridge.manifest()) {
                Ok(r) => reader = Some(r),
                Err(OpenError::Segment(SegmentError::NotFound(_))) => {}
                Err(e) => return Err(e).context("while opening the weight store"),
            }
        }
        if reader.is_some() {
            break;
        }
        if start.elapsed() > peer_timeout {
            bail!(
                "the learner did not come up within {:?} (runtime directory {}, name {})",
                peer_timeout,
                dir.display(),
                paths.name
            );
        }
        if !said {
            info!(
                "waiting for the learner (runtime directory {})",
                dir.display()
            );
            said = true;
        }
        notifier.alive();
        nap(stop, Duration::from_millis(50));
    }
    let mut reader = reader.context("no weight store")?;
    // Batches already in the ring (from before a restart) count as in flight.
    let mut per_batch = records_per_batch(cfg);
    let mut in_flight = ring.len().div_ceil(per_batch);
    notifier.ready("generating");
    info!(batch_id = generator.state().next_batch_id, "ready");

    let mut metrics = JsonLines::append(&paths.state_dir.join("metrics.jsonl"))?;
    let mut model: Option<(u64, u64, Decoder)> = None;
    let mut timeline = Timeline::default();
    let mut shutdown = false;
    let mut last_notice = Instant::now();
    while !(stopping(stop) || shutdown) {
        // Wait while too far ahead of the learner, or while there are no weights.
        let wait_start = unix_now();
        loop {
            let policy_version = model.as_ref().map(|m| m.1).unwrap_or(0);
            for ev in control.poll(generator.state().next_batch_id, policy_version)? {
                match ev {
                    Event::Connected(peer) => {
                        in_flight = ring.len().div_ceil(per_batch);
                        info!(
                            policy_version = peer.policy_version,
                            in_flight, "reconnected to the learner"
                        );
                    }
                    Event::Trained {
                        batch_id,
                        version,
                        kl_behavior,
                    } => {
                        in_flight = in_flight.saturating_sub(1);
                        tracing::debug!(batch_id, policy_version = version, "trained");
                        if let Some(set) = generator.observe_kl(batch_id, kl_behavior) {
                            info!(
                                batch_id,
                                kl_behavior,
                                set,
                                "adaptive plan: the learner's KL moved the behavior"
                            );
                        }
                    }
                    Event::DeviceSlots(h) => {
                        drop(device_slots.take()); // close the old handles first
                        device_slots = Some(ServerSlots::open(&device, &bridge, &h)?);
                    }
                    Event::Shutdown => {
                        info!("the learner is done; stopping");
                        shutdown = true;
                    }
                    Event::Lost => {
                        // The handles belong to that learner: a new one sends its own.
                        device_slots = None;
                        warn!(
                            "lost the control channel to the learner; waiting for it to come back"
                        )
                    }
                }
            }
            if shutdown || stopping(stop) {
                break;
            }
            let ahead = in_flight > cfg.max_staleness;
            let published = reader.latest_version() > 0;
            // On a GPU the weights travel through the device slots of the learner that
            // published them: wait for its handles.
            let slots_ready = device.is_cpu()
                || device_slots
                    .as_ref()
                    .is_some_and(|s| s.generation() == reader.writer_generation());
            if !ahead && published && slots_ready {
                break;
            }
            if last_notice.elapsed() > Duration::from_secs(10) {
                if !reader.writer_alive() || control.conn.is_none() {
                    info!(in_flight, "waiting for the learner (it is not running)");
                } else {
                    tracing::debug!(in_flight, "waiting for the learner to catch up");
                }
                last_notice = Instant::now();
            }
            notifier.alive();
            nap(stop, Duration::from_millis(20));
        }
        if shutdown || stopping(stop) {
            break;
        }
        let wait_end = unix_now();
        if wait_end - wait_start > 1e-3 {
            timeline.push("wait", wait_start, wait_end);
        }
        if reload.swap(false, Ordering::Relaxed) {
            // Relaxed: a plain flag set by the SIGHUP handler.
            match cfg.reward.build() {
                Ok(r) => {
                    generator.set_reward(r);
                    info!("reloaded the reward module");
                }
                Err(e) => warn!("reloading the reward module failed ({e:#}); keeping the old one"),
            }
        }
        // Newest weights: copy them out and unpin at once.
        let t = unix_now();
        let generation = reader.writer_generation();
        let latest = reader.latest_version();
        let mut load_s = 0.0;
        let mut probe_s = 0.0;
        let mut weights_sum = None;
        if model
            .as_ref()
            .is_none_or(|m| (m.0, m.1 + 1) != (generation, latest))
        {
            if device_slots
                .as_ref()
                .is_some_and(|s| s.generation() != generation)
            {
                // A restarted learner: wait for its slots' handles.
                continue;
            }
            let (version, decoder) = {
                let pinned = match reader.pin() {
                    Ok(p) => p,
                    Err(PinError::NothingPublished) => continue,
                    Err(e) => return Err(e).context("while pinning the weights"),
                };
                let d = match &device_slots {
                    Some(slots) => slots.load(&pinned, &bridge, &device),
                    None => bridge.decoder(pinned.bytes(), &device).map_err(Into::into),
                }
                .context("while loading the published weights")?;
                (pinned.version() - 1, d)
            };
            if device_slots.is_some() {
                weights_sum = Some(bridge.checksum(&decoder)?);
            }
            // An 8-bit behavior is re-quantized from every new set of weights.
            let decoder = match format {
                model::WeightFormat::F32 => decoder,
                q => decoder
                    .quantized(q)
                    .context("while quantizing the behavior's weights")?,
            };
            load_s = unix_now() - t;
            timeline.push("load", t, unix_now());
            // Proof for the learner that this behavior is its version `version`.
            let t = unix_now();
            let logprobs = probe.score(&decoder)?;
            control.send(Message::Probe { version, logprobs });
            probe_s = unix_now() - t;
            timeline.push("probe", t, unix_now());
            model = Some((generation, version, decoder));
        }
        let Some((_, policy_version, decoder)) = model.as_ref() else {
            continue;
        };
        let policy_version = *policy_version;
        let t_gen = unix_now();
        let batch = generator
            .next_batch(decoder, policy_version)
            .context("while generating a batch")?;
        // Generation and scoring ran back to back; split the span at the measured times.
        let gen_end = t_gen + batch.stats.generation_s;
        timeline.push("generate", t_gen, gen_end);
        timeline.push("score", gen_end, gen_end + batch.stats.reward_s);
        let t = unix_now();
        let records = batch.groups.iter().map(Vec::len).sum::<usize>();
        let mut pushed_all = true;
        for rec in batch.groups.iter().flatten() {
            if !push(&mut ring, rec, stop, &notifier)? {
                pushed_all = false;
                break;
            }
        }
        if !pushed_all {
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
        if records > 0 {
            per_batch = records as u64;
            in_flight += 1;
        }
        let state = generator.state();
        write_atomic(&state_path, serde_json::to_string(&state)?.as_bytes())?;
        info!(
            batch_id = batch.batch_id,
            policy_version,
            records,
            in_flight,
            tokens_per_s = batch.stats.behavior_tokens_per_s,
            "batch pushed"
        );
        metrics.write(&BatchLine {
            batch_id: batch.batch_id,
            policy_version,
            skipped_layers: batch.plan.skipped(),
            skipped_units: batch
                .plan
                .skipped_units()
                .iter()
                .map(|u| u.to_string())
                .collect(),
            wall_s: unix_now(),
            records,
            generation: &batch.stats,
            wait_s: wait_end - wait_start,
            load_s,
            probe_s,
            weights_sum,
            push_s,
            in_flight,
            spans: timeline.take(),
        })?;
        notifier.alive();
    }
    notifier.stopping();
    info!("stopped");
    Ok(())
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
