//! Benchmarks of the rollout ring and the weight store, each next to a plain `memcpy` of the
//! same bytes measured in the same run. `nested-reft bench ring|weights` prints these reports.
//!
//! Ring: the peer runs in a separate process (or, if asked, a thread) that consumes records
//! from a request ring and answers on a response ring it creates. Throughput streams records
//! one way and waits for one small acknowledgement, once with the peer copying each record out
//! of its slot ([`Consumer::pop_with`]) and once with it reading each record in place
//! ([`Consumer::pop_in_place_with`]); both verify every record's CRC32C before delivering it.
//! Round-trip latency sends one record and waits for the peer to echo it back in full (copying
//! pops on both sides). The baseline is a single-threaded `memcpy` of the same number of bytes
//! through a buffer the size of the ring, timed next to each throughput figure; the report
//! keeps the fastest of those timings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::error::{
    ManifestError, OpenError, PinError, PopError, PublishError, PushError, RecordError,
};
use crate::record::{FinishReason, Limits, RecordRef, RecordView, RewardOutcome, Timings};
use crate::ring::{Consumer, Descriptor, Producer, RolloutRing};
use crate::sampling::SamplingParams;
use crate::weights::WeightStore;
use crate::{DType, Manifest};

const OP_SINK: u64 = 0;
const OP_ECHO: u64 = 1;
const OP_ACK: u64 = 2;
const OP_STOP: u64 = 3;
/// Switches the peer to copying pops ([`Consumer::pop_with`]).
const OP_MODE_COPY: u64 = 4;
/// Switches the peer to in-place pops ([`Consumer::pop_in_place_with`]).
const OP_MODE_IN_PLACE: u64 = 5;
const PROMPT_TOKENS: usize = 16;
const PLAN_LAYERS: usize = 16;
const WAIT: Duration = Duration::from_secs(60);

/// A benchmark failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Creating or opening a segment failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Pushing failed.
    #[error(transparent)]
    Push(#[from] PushError),
    /// A benchmark record is invalid for the ring's limits.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Popping failed.
    #[error(transparent)]
    Pop(#[from] PopError),
    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The peer process could not be started or misbehaved.
    #[error("ring peer: {0}")]
    Peer(String),
    /// Invalid benchmark parameters.
    #[error("invalid benchmark parameters: {0}")]
    Invalid(String),
}

/// Where the ring peer runs.
#[derive(Debug, Clone)]
pub enum PeerMode {
    /// A second process: `program args... --dir D --name N --record-bytes B`, which must call
    /// [`run_ring_peer`] with those values.
    Process {
        /// Executable.
        program: PathBuf,
        /// Arguments before the peer flags (e.g. `["bench", "ring-peer"]`).
        args: Vec<String>,
    },
    /// A thread of this process (same shared-memory path, no second address space).
    Thread,
}

/// Result of [`ring_throughput`] for one record size.
#[derive(Debug, Clone)]
pub struct RingReport {
    /// Encoded bytes per record.
    pub record_bytes: usize,
    /// Records streamed for the throughput figure.
    pub records: u64,
    /// Ring throughput with copying pops (producer write + CRC, consumer copy-out + CRC +
    /// decode), GB/s.
    pub ring_gbps: f64,
    /// Ring throughput with in-place pops (producer write + CRC, consumer CRC over the slot +
    /// decode, no copy), GB/s.
    pub in_place_gbps: f64,
    /// Single-threaded `memcpy` of the same bytes through a buffer the size of the ring, GB/s
    /// (the fastest of the runs timed next to each ring figure).
    pub memcpy_gbps: f64,
    /// Round trips measured.
    pub round_trips: usize,
    /// Median round-trip latency (record out, same record echoed back).
    pub rtt_p50: Duration,
    /// 99th percentile round-trip latency.
    pub rtt_p99: Duration,
    /// "process" or "thread".
    pub peer: &'static str,
}

impl RingReport {
    /// Ring throughput with copying pops as a fraction of memcpy.
    pub fn ratio(&self) -> f64 {
        self.ring_gbps / self.memcpy_gbps
    }

    /// Ring throughput with in-place pops as a fraction of memcpy.
    pub fn in_place_ratio(&self) -> f64 {
        self.in_place_gbps / self.memcpy_gbps
    }
}

/// The descriptor the benchmark and its peer use for records of about `record_bytes`:
/// about 8 MiB of slots, at least 8 and at most 1024 of them.
pub fn bench_descriptor(record_bytes: usize) -> Result<Descriptor, BenchError> {
    let capacity = ((8usize << 20) / record_bytes.max(1)).clamp(8, 1024) as u32;
    // The streamed records carry no text (stop string, reward message): header, prompt, plan.
    let fixed = crate::record::RECORD_HEADER_BYTES + 4 * PROMPT_TOKENS + 2 * PLAN_LAYERS;
    if record_bytes < fixed + 8 {
        return Err(BenchError::Invalid(format!(
            "records must be at least {} bytes",
            fixed + 8
        )));
    }
    let completion = u32::try_from((record_bytes - fixed) / 8)
        .map_err(|_| BenchError::Invalid("record too large".into()))?;
    Ok(Descriptor {
        capacity,
        limits: Limits {
            max_prompt_tokens: PROMPT_TOKENS as u32,
            max_completion_tokens: completion,
            max_plan_layers: PLAN_LAYERS as u32,
        },
    })
}

/// What each full streamed record encodes to (the slots also leave room for the text such a
/// record does not carry).
fn streamed_bytes(limits: &Limits) -> usize {
    crate::record::encoded_len(
        PROMPT_TOKENS,
        limits.max_completion_tokens as usize,
        PLAN_LAYERS,
        0,
    )
    .unwrap_or(0)
}

/// `len` values whose first one starts on a page boundary. The benchmark's copies then do not
/// depend on where the allocator happened to put its buffers: copies whose destination lies a
/// few bytes above the source modulo 4096 run several times slower on some CPUs.
struct PageAligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> PageAligned<T> {
    /// `T` must be a plain scalar whose size divides 4096 (u8, u32, f32 here).
    fn new(len: usize, value: impl Fn(usize) -> T) -> Self {
        let size = std::mem::size_of::<T>();
        let mut buf = vec![T::default(); len + 4096 / size];
        // The allocation is aligned to `size`, so the distance to the next page boundary is a
        // whole number of elements.
        let off = (4096 - buf.as_ptr() as usize % 4096) % 4096 / size;
        for (i, v) in buf[off..off + len].iter_mut().enumerate() {
            *v = value(i);
        }
        Self { buf, off, len }
    }

    fn as_slice(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

struct Payload {
    prompt: Vec<u32>,
    completion: PageAligned<u32>,
    logprobs: PageAligned<f32>,
    plan: Vec<u16>,
}

impl Payload {
    fn new(limits: &Limits) -> Self {
        let n = limits.max_completion_tokens as usize;
        Self {
            prompt: (0..PROMPT_TOKENS as u32).collect(),
            completion: PageAligned::new(n, |i| (i as u32).wrapping_mul(2_654_435_761)),
            logprobs: PageAligned::new(n, |i| -(i as f32) * 1e-3),
            plan: (0..PLAN_LAYERS as u16).collect(),
        }
    }

    fn view(&self, op: u64, seq: u64, full: bool) -> RecordView<'_> {
        let n = if full { self.completion.len } else { 1 };
        RecordView {
            prompt_id: seq,
            group_id: 0,
            batch_id: op,
            policy_version: 0,
            group_size: 1,
            group_index: 0,
            batch_groups: 1,
            prompt: &self.prompt,
            completion: &self.completion.as_slice()[..n],
            logprobs: &self.logprobs.as_slice()[..n],
            plan: &self.plan,
            sampling: SamplingParams::default(),
            seed: 0,
            reward: RewardOutcome::default(),
            finish: FinishReason::Length,
            timings: Timings::default(),
        }
    }
}

/// The peer role: consumes `name.req`, creates `name.resp`, sinks, acknowledges or echoes
/// records until told to stop.
pub fn run_ring_peer(dir: &Path, name: &str, record_bytes: usize) -> Result<(), BenchError> {
    let desc = bench_descriptor(record_bytes)?;
    let mut req = open_retry(dir, &format!("{name}.req"), desc)?;
    let mut resp = RolloutRing::create(dir, &format!("{name}.resp"), desc)?;
    let ack = Payload::new(&Limits {
        max_completion_tokens: 1,
        ..desc.limits
    });
    let mut in_place = false;
    loop {
        let serve = |r: RecordRef<'_>| -> Result<u64, PushError> {
            let v = r.view();
            match v.batch_id {
                OP_ECHO => resp.push(v, WAIT).map(|_| OP_ECHO),
                OP_ACK => resp
                    .push(&ack.view(OP_ACK, v.prompt_id, false), WAIT)
                    .map(|_| OP_ACK),
                op => Ok(op),
            }
        };
        let op = if in_place {
            req.pop_in_place_with(WAIT, serve)??
        } else {
            req.pop_with(WAIT, serve)??
        };
        match op {
            OP_STOP => return Ok(()),
            OP_MODE_COPY => in_place = false,
            OP_MODE_IN_PLACE => in_place = true,
            _ => {}
        }
    }
}

fn open_retry(dir: &Path, name: &str, desc: Descriptor) -> Result<Consumer, BenchError> {
    let start = Instant::now();
    loop {
        match RolloutRing::open(dir, name, desc) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > WAIT => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

enum PeerHandle {
    Process(Child),
    Thread(std::thread::JoinHandle<Result<(), BenchError>>),
}

impl PeerHandle {
    fn finish(self) -> Result<(), BenchError> {
        match self {
            Self::Process(mut c) => {
                let st = c.wait().map_err(|e| BenchError::Peer(e.to_string()))?;
                if st.success() {
                    Ok(())
                } else {
                    Err(BenchError::Peer(format!("peer exited with {st}")))
                }
            }
            Self::Thread(h) => h
                .join()
                .map_err(|_| BenchError::Peer("peer thread panicked".into()))?,
        }
    }
}

/// Measures ring throughput and round-trip latency for records of about `record_bytes`.
pub fn ring_throughput(
    dir: &Path,
    record_bytes: usize,
    records: u64,
    round_trips: usize,
    peer: &PeerMode,
) -> Result<RingReport, BenchError> {
    if records == 0 || round_trips == 0 {
        return Err(BenchError::Invalid(
            "records and round trips must be positive".into(),
        ));
    }
    let desc = bench_descriptor(record_bytes)?;
    let name = format!("bench-{}-{record_bytes}", std::process::id());
    let mut req = RolloutRing::create(dir, &format!("{name}.req"), desc)?;
    let handle = match peer {
        PeerMode::Process { program, args } => {
            let child = Command::new(program)
                .args(args)
                .arg("--dir")
                .arg(dir)
                .args(["--name", &name, "--record-bytes", &record_bytes.to_string()])
                .spawn()
                .map_err(|e| BenchError::Peer(format!("spawning {}: {e}", program.display())))?;
            PeerHandle::Process(child)
        }
        PeerMode::Thread => {
            let (dir, name) = (dir.to_owned(), name.clone());
            PeerHandle::Thread(std::thread::spawn(move || {
                run_ring_peer(&dir, &name, record_bytes)
            }))
        }
    };
    let result = drive(dir, &name, desc, &mut req, records, round_trips);
    // Stop the peer even when the measurement failed, then clean up.
    let stop = Payload::new(&Limits {
        max_completion_tokens: 1,
        ..desc.limits
    });
    let _ = req.push(&stop.view(OP_STOP, 0, false), WAIT);
    let peer_result = handle.finish();
    let _ = RolloutRing::remove(dir, &format!("{name}.req"));
    let _ = RolloutRing::remove(dir, &format!("{name}.resp"));
    let (ring_gbps, in_place_gbps, memcpy_gbps, mut rtts) = result?;
    peer_result?;
    let bytes = streamed_bytes(&desc.limits);
    rtts.sort_unstable();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize];
    Ok(RingReport {
        record_bytes: bytes,
        records,
        ring_gbps,
        in_place_gbps,
        memcpy_gbps,
        round_trips,
        rtt_p50: pct(0.50),
        rtt_p99: pct(0.99),
        peer: match peer {
            PeerMode::Process { .. } => "process",
            PeerMode::Thread => "thread",
        },
    })
}

/// Streams `records` full records to the peer (after switching it to `mode`) and waits for
/// the acknowledgement of the last one; returns GB/s.
fn stream(
    req: &mut Producer,
    resp: &mut Consumer,
    payload: &Payload,
    mode: u64,
    records: u64,
) -> Result<f64, BenchError> {
    let bytes = payload
        .view(OP_SINK, 0, true)
        .validate(&req.descriptor().limits)?;
    req.push(&payload.view(mode, 0, false), WAIT)?;
    let start = Instant::now();
    for i in 0..records {
        let op = if i + 1 == records { OP_ACK } else { OP_SINK };
        req.push(&payload.view(op, i, true), WAIT)?;
    }
    resp.pop_with(WAIT, |_| ())?;
    let secs = start.elapsed().as_secs_f64();
    Ok((bytes as f64 * records as f64) / secs / 1e9)
}

type Measured = (f64, f64, f64, Vec<Duration>);

fn drive(
    dir: &Path,
    name: &str,
    desc: Descriptor,
    req: &mut Producer,
    records: u64,
    round_trips: usize,
) -> Result<Measured, BenchError> {
    let mut resp = open_retry(dir, &format!("{name}.resp"), desc)?;
    let payload = Payload::new(&desc.limits);
    let bytes = streamed_bytes(&desc.limits);
    // Warm-up: touch every slot of both rings.
    for i in 0..u64::from(desc.capacity) * 2 {
        req.push(&payload.view(OP_ECHO, i, true), WAIT)?;
        resp.pop_with(WAIT, |_| ())?;
    }
    let slots = desc.capacity as usize;
    let mut memcpy = memcpy_gbps(bytes, slots, records);
    let copy_gbps = stream(req, &mut resp, &payload, OP_MODE_COPY, records)?;
    memcpy = memcpy.max(memcpy_gbps(bytes, slots, records));
    let in_place_gbps = stream(req, &mut resp, &payload, OP_MODE_IN_PLACE, records)?;
    memcpy = memcpy.max(memcpy_gbps(bytes, slots, records));
    req.push(&payload.view(OP_MODE_COPY, 0, false), WAIT)?;
    let mut rtts = Vec::with_capacity(round_trips);
    for i in 0..round_trips as u64 {
        let t0 = Instant::now();
        req.push(&payload.view(OP_ECHO, i, true), WAIT)?;
        let n = resp.pop_with(WAIT, |r| r.view().completion.len())?;
        rtts.push(t0.elapsed());
        if n != payload.completion.len {
            return Err(BenchError::Peer(format!("echo carried {n} tokens")));
        }
    }
    Ok((copy_gbps, in_place_gbps, memcpy, rtts))
}

/// memcpy of `records` × `bytes` through `slots` destination buffers (the ring's footprint),
/// source and destination page aligned (the layout memcpy is fastest with).
fn memcpy_gbps(bytes: usize, slots: usize, records: u64) -> f64 {
    let src = PageAligned::new(bytes, |i| i as u8);
    let src = src.as_slice();
    let mut dst = PageAligned::new(bytes * slots, |_| 0u8);
    let dst = dst.as_mut_slice();
    for (i, chunk) in dst.chunks_exact_mut(bytes).enumerate() {
        chunk.copy_from_slice(src);
        chunk[0] = i as u8;
    }
    let start = Instant::now();
    for i in 0..records as usize {
        let off = (i % slots) * bytes;
        dst[off..off + bytes].copy_from_slice(std::hint::black_box(src));
        std::hint::black_box(&mut *dst);
    }
    (bytes as f64 * records as f64) / start.elapsed().as_secs_f64() / 1e9
}

/// Result of [`weights_publish`].
#[derive(Debug, Clone)]
pub struct WeightsReport {
    /// Parameter bytes per version.
    pub bytes: usize,
    /// Versions timed.
    pub iterations: usize,
    /// Publish (copy the parameters into the inactive slot + make it current), GB/s.
    pub publish_gbps: f64,
    /// Read (pin the current version + copy it out), GB/s.
    pub read_gbps: f64,
    /// `memcpy` of the same bytes, GB/s.
    pub memcpy_gbps: f64,
    /// Median publish time.
    pub publish_p50: Duration,
    /// Median read time.
    pub read_p50: Duration,
}

/// A llama-shaped manifest in f32 (embedding, per-layer attention/MLP/norms, final norm).
pub fn llama_like_manifest(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    kv_dim: usize,
    layers: usize,
) -> Result<Manifest, ManifestError> {
    let mut entries = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![vocab, hidden],
        DType::F32,
    )];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        entries.extend([
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![hidden, hidden],
                DType::F32,
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_dim, hidden],
                DType::F32,
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_dim, hidden],
                DType::F32,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![hidden, hidden],
                DType::F32,
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![intermediate, hidden],
                DType::F32,
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![intermediate, hidden],
                DType::F32,
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![hidden, intermediate],
                DType::F32,
            ),
            (
                format!("{p}.input_layernorm.weight"),
                vec![hidden],
                DType::F32,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![hidden],
                DType::F32,
            ),
        ]);
    }
    entries.push(("model.norm.weight".to_owned(), vec![hidden], DType::F32));
    Manifest::new(entries)
}

/// Publishes and reads `iterations` versions of `manifest`'s parameters through a 2-slot store
/// (writer and reader handles in this process), next to a memcpy of the same bytes.
pub fn weights_publish(
    dir: &Path,
    manifest: &Manifest,
    iterations: usize,
) -> Result<WeightsReport, BenchError> {
    if iterations == 0 {
        return Err(BenchError::Invalid("iterations must be positive".into()));
    }
    let name = format!("bench-weights-{}", std::process::id());
    let mut writer = WeightStore::create(dir, &name, manifest, 2)?;
    let result = (|| {
        let mut reader = WeightStore::open(dir, &name, manifest)?;
        let n = manifest.total_size();
        let src: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        // A page-aligned destination: the slots are page aligned, and large copies between
        // addresses that differ modulo 4096 run several times slower on some CPUs.
        let mut dst_buf = vec![0u8; n + 4096];
        let off = (4096 - dst_buf.as_ptr() as usize % 4096) % 4096;
        let dst = &mut dst_buf[off..off + n];
        let (mut publish, mut read, mut copy) = (Vec::new(), Vec::new(), Vec::new());
        // One untimed round per slot faults in every page.
        for it in 0..iterations + 2 {
            let t = Instant::now();
            writer.publish(WAIT, |slot| slot.copy_from_slice(&src))?;
            let tp = t.elapsed();
            let t = Instant::now();
            {
                let pinned = reader.pin()?;
                dst.copy_from_slice(pinned.bytes());
            }
            let tr = t.elapsed();
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut *dst);
            let tc = t.elapsed();
            if it >= 2 {
                publish.push(tp);
                read.push(tr);
                copy.push(tc);
            }
        }
        if *dst != src[..] {
            return Err(BenchError::Peer(
                "read-back differs from the published bytes".into(),
            ));
        }
        let gbps = |v: &[Duration]| {
            n as f64 * v.len() as f64 / v.iter().sum::<Duration>().as_secs_f64() / 1e9
        };
        let median = |v: &mut Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        Ok(WeightsReport {
            bytes: n,
            iterations,
            publish_gbps: gbps(&publish),
            read_gbps: gbps(&read),
            memcpy_gbps: gbps(&copy),
            publish_p50: median(&mut publish),
            read_p50: median(&mut read),
        })
    })();
    let _ = WeightStore::remove(dir, &name);
    drop(writer);
    result
}
