//! The rollout ring: an SPSC queue of [`RolloutRecord`]s in a shared-memory segment.
//!
//! Segment layout (`name.ring`):
//! - `0..64`: [`RingHeaderFixed`] (magic stored last with Release, layout version, descriptor),
//!   then the generation at 40 and the quarantine counter at 64.
//! - `128`: `head`, the producer heartbeat and the producer's pid on their own 128-byte line;
//!   `256`: `tail`, the consumer heartbeat and the consumer's pid on theirs.
//! - `4096 + i * slot_size`: slot `i`: commit word, length, CRC32C, batch id, policy version,
//!   sequence, then the encoded record at `+64`.
//!
//! Roles are OFD byte locks on the segment file (byte 0 producer, byte 1 consumer), held for
//! the life of the handle: a peer that finds the lock free knows the role's process is gone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crc::{copy_with_crc, crc32c_append};
use crate::error::{CorruptReason, HeaderError, OpenError, PopError, PushError};
use crate::record::{decode_record, Limits, RecordRef, RecordView, RolloutRecord};
use crate::ring_core;
use crate::segment::{monotonic_ns, read_header, Backoff, Segment, SegmentError, SegmentHeader};
use crate::sync::{atomic_u64_at, AtomicU64, Ordering};

/// Magic of a ring segment ("NRFTRING").
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"NRFTRING");
/// Layout version of the ring segment and record encoding.
pub const RING_LAYOUT_VERSION: u32 = 4;

const EXT: &str = "ring";
const OFF_GENERATION: usize = 40;
const OFF_QUARANTINED: usize = 64;
const OFF_HEAD: usize = 128;
// Each heartbeat shares the line its writer already owns (head's or tail's), so the two sides
// never write the same cache line on the hot path.
const OFF_PRODUCER_HEARTBEAT: usize = 136;
const OFF_PRODUCER_PID: usize = 144;
const OFF_TAIL: usize = 256;
const OFF_CONSUMER_HEARTBEAT: usize = 264;
const OFF_CONSUMER_PID: usize = 272;
const SLOTS_OFFSET: usize = 4096;
const SLOT_HEADER: usize = 64;
const SLOT_OFF_LEN: usize = 8;
const SLOT_OFF_CRC: usize = 16;
const SLOT_OFF_BATCH: usize = 24;
const SLOT_OFF_POLICY: usize = 32;
const SLOT_OFF_SEQ: usize = 40;
const PRODUCER_LOCK_BYTE: u64 = 0;
const CONSUMER_LOCK_BYTE: u64 = 1;
const MAX_CAPACITY: u32 = 1 << 20;
const PAGE: usize = 4096;

/// The layout of a ring: capacity and the per-record maxima. Both sides must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Number of slots (records in flight at most).
    pub capacity: u32,
    /// Per-record maxima.
    pub limits: Limits,
}

impl Descriptor {
    /// Bytes per slot (header + largest record, rounded to 64), or `None` on overflow.
    pub fn slot_size(&self) -> Option<usize> {
        let raw = SLOT_HEADER.checked_add(self.limits.max_record_bytes()?)?;
        raw.checked_add(63).map(|v| v / 64 * 64)
    }

    /// Total segment size, or `None` on overflow.
    pub fn segment_size(&self) -> Option<usize> {
        SLOTS_OFFSET.checked_add(self.slot_size()?.checked_mul(self.capacity as usize)?)
    }

    /// File offset of the encoded record in slot `index` (for tooling and fault injection).
    pub fn payload_offset(&self, index: u32) -> Option<u64> {
        let off = SLOTS_OFFSET
            .checked_add(self.slot_size()?.checked_mul(index as usize)?)?
            .checked_add(SLOT_HEADER)?;
        Some(off as u64)
    }

    fn validate(&self) -> Result<usize, OpenError> {
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(OpenError::InvalidLayout(format!(
                "capacity {} outside 1..={MAX_CAPACITY}",
                self.capacity
            )));
        }
        let size = self
            .segment_size()
            .filter(|s| *s <= isize::MAX as usize)
            .ok_or_else(|| OpenError::InvalidLayout("segment size overflows".into()))?;
        Ok(size)
    }
}

/// The immutable prefix of the ring header, as stored.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct RingHeaderFixed {
    magic: u64,
    layout_version: u32,
    _reserved: u32,
    slot_size: u64,
    capacity: u32,
    max_prompt_tokens: u32,
    max_completion_tokens: u32,
    max_plan_layers: u32,
}
const FIXED_BYTES: usize = std::mem::size_of::<RingHeaderFixed>();
const _: () = assert!(FIXED_BYTES == 40);

// SAFETY: `#[repr(C)]` with integer (and integer-array) fields only.
unsafe impl SegmentHeader for RingHeaderFixed {
    fn magic_and_version(&self) -> (u64, u32) {
        (self.magic, self.layout_version)
    }
}

/// Parses and checks a ring header from `bytes` (the start of a segment). With `expected`,
/// every descriptor field must match; the error names the first that does not.
pub fn parse_ring_header(
    bytes: &[u8],
    expected: Option<&Descriptor>,
) -> Result<Descriptor, HeaderError> {
    let h: RingHeaderFixed = read_header(bytes, RING_MAGIC, RING_LAYOUT_VERSION)?;
    let found = Descriptor {
        capacity: h.capacity,
        limits: Limits {
            max_prompt_tokens: h.max_prompt_tokens,
            max_completion_tokens: h.max_completion_tokens,
            max_plan_layers: h.max_plan_layers,
        },
    };
    if let Some(e) = expected {
        let pairs: [(&'static str, u64, u64); 4] = [
            ("capacity", e.capacity.into(), found.capacity.into()),
            (
                "max_prompt_tokens",
                e.limits.max_prompt_tokens.into(),
                h.max_prompt_tokens.into(),
            ),
            (
                "max_completion_tokens",
                e.limits.max_completion_tokens.into(),
                h.max_completion_tokens.into(),
            ),
            (
                "max_plan_layers",
                e.limits.max_plan_layers.into(),
                h.max_plan_layers.into(),
            ),
        ];
        for (field, expected, found) in pairs {
            if expected != found {
                return Err(HeaderError::Descriptor {
                    field,
                    expected,
                    found,
                });
            }
        }
    }
    if found.capacity == 0 || found.capacity > MAX_CAPACITY {
        return Err(HeaderError::Descriptor {
            field: "capacity",
            expected: MAX_CAPACITY.into(),
            found: found.capacity.into(),
        });
    }
    let slot = found.slot_size().unwrap_or(0) as u64;
    if slot == 0 || slot != h.slot_size {
        return Err(HeaderError::Descriptor {
            field: "slot_size",
            expected: slot,
            found: h.slot_size,
        });
    }
    Ok(found)
}

/// Entry points: create (producer), resume (restarted producer), open (consumer).
///
/// The rollout server creates the ring and pushes, the learner opens it and pops; here the two
/// sides are threads of one process, in use they are two processes mapping the same file.
///
/// ```
/// use std::time::Duration;
/// use protocol::{
///     Descriptor, FinishReason, Limits, OpenError, PopError, PushError, RewardOutcome,
///     RolloutRecord, RolloutRing, SamplingParams, Timings,
/// };
///
/// let dir = tempfile::tempdir()?;
/// // Both sides must agree on the layout: 2 slots, and the largest record each holds.
/// let desc = Descriptor {
///     capacity: 2,
///     limits: Limits { max_prompt_tokens: 16, max_completion_tokens: 16, max_plan_layers: 8 },
/// };
/// let record = |i: u64| RolloutRecord {
///     prompt_id: i,
///     group_id: i,
///     batch_id: 0,
///     policy_version: 0,
///     group_size: 1,
///     group_index: 0,
///     batch_groups: 1,
///     prompt: vec![1, 2, 3],
///     completion: vec![7, 8],
///     logprobs: vec![-0.5, -1.25],
///     plan: vec![0, 2, 3],
///     sampling: SamplingParams::temperature(0.7),
///     seed: i,
///     reward: RewardOutcome::scored(1.0),
///     finish: FinishReason::Eos,
///     timings: Timings::default(),
/// };
///
/// let mut producer = RolloutRing::create(dir.path(), "rollouts", desc)?;
/// let mut consumer = RolloutRing::open(dir.path(), "rollouts", desc)?;
/// // A second consumer is refused: each role has one holder.
/// let second = RolloutRing::open(dir.path(), "rollouts", desc);
/// assert!(matches!(second, Err(OpenError::RoleTaken { role: "consumer", .. })));
///
/// // Backpressure: a full ring refuses a push and never overwrites.
/// producer.try_push(&record(0).as_view())?;
/// producer.try_push(&record(1).as_view())?;
/// let refused = producer.try_push(&record(2).as_view());
/// assert!(matches!(refused, Err(PushError::Full { capacity: 2 })));
///
/// // The producer keeps pushing from its own thread, waiting for space as the consumer pops.
/// let pushing = std::thread::spawn(move || -> Result<(), PushError> {
///     for i in 2..10 {
///         producer.push(&record(i).as_view(), Duration::from_secs(10))?;
///     }
///     Ok(())
/// });
/// for i in 0..10 {
///     // Records arrive in order and intact (each slot is checked with its CRC32C).
///     assert_eq!(consumer.pop(Duration::from_secs(10))?, record(i));
/// }
/// pushing.join().map_err(|_| "the producer thread panicked")??;
/// assert!(matches!(consumer.try_pop(), Err(PopError::Empty)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RolloutRing;

impl RolloutRing {
    /// Creates `dir/name.ring` (`O_EXCL`, 0600) and returns the producer handle.
    pub fn create(dir: &Path, name: &str, desc: Descriptor) -> Result<Producer, OpenError> {
        let size = desc.validate()?;
        let seg = Segment::create(dir, name, EXT, size as u64)?;
        Segment::take_role(&seg, PRODUCER_LOCK_BYTE, "producer")?;
        let fixed = RingHeaderFixed {
            magic: 0,
            layout_version: RING_LAYOUT_VERSION,
            _reserved: 0,
            slot_size: desc.slot_size().unwrap_or(0) as u64,
            capacity: desc.capacity,
            max_prompt_tokens: desc.limits.max_prompt_tokens,
            max_completion_tokens: desc.limits.max_completion_tokens,
            max_plan_layers: desc.limits.max_plan_layers,
        };
        // SAFETY: the fresh mapping is at least SLOTS_OFFSET bytes and nobody can use it before
        // the magic is published below (openers reject a zero magic).
        unsafe { std::ptr::write(seg.ptr().cast::<RingHeaderFixed>(), fixed) };
        let ring = Mapped::new(seg, desc);
        ring.word(OFF_GENERATION).store(1, Ordering::Relaxed);
        ring.mark_holder(OFF_PRODUCER_HEARTBEAT, OFF_PRODUCER_PID);
        // Release: publishes the header fields written above; pairs with the Acquire load of
        // the magic in `Mapped::open`.
        ring.word(0).store(RING_MAGIC, Ordering::Release);
        Ok(Producer {
            ring,
            head: 0,
            space_limit: 0,
            generation: 1,
        })
    }

    /// Re-attaches a restarted producer to an existing ring whose producer died. Bumps the
    /// generation and continues after the last committed record; uncommitted data is dropped.
    pub fn resume(dir: &Path, name: &str, desc: Descriptor) -> Result<Producer, OpenError> {
        let ring = Mapped::open(dir, name, Some(&desc))?;
        Segment::take_role(&ring.seg, PRODUCER_LOCK_BYTE, "producer")?;
        // AcqRel: we own the role exclusively now; the consumer reads the generation Relaxed
        // for reporting only.
        let generation = ring.word(OFF_GENERATION).fetch_add(1, Ordering::AcqRel) + 1;
        let mut head = ring.head().load(Ordering::Acquire);
        // A producer killed between its commit store and its head store left one committed
        // record ahead of `head`; never overwrite it.
        while ring_core::consumer_ready(ring.commit(head), head) {
            head += 1;
        }
        ring.head().store(head, Ordering::Release);
        ring.mark_holder(OFF_PRODUCER_HEARTBEAT, OFF_PRODUCER_PID);
        Ok(Producer {
            ring,
            head,
            space_limit: 0,
            generation,
        })
    }

    /// Opens an existing ring as its consumer.
    pub fn open(dir: &Path, name: &str, desc: Descriptor) -> Result<Consumer, OpenError> {
        let ring = Mapped::open(dir, name, Some(&desc))?;
        Segment::take_role(&ring.seg, CONSUMER_LOCK_BYTE, "consumer")?;
        ring.mark_holder(OFF_CONSUMER_HEARTBEAT, OFF_CONSUMER_PID);
        // Acquire pairs with the consumer_release of a previous consumer of this ring.
        let tail = ring.tail().load(Ordering::Acquire);
        // One page of slack lets every copy-out start at the payload's offset within a page
        // (see `Consumer::try_pop_with`).
        let words = (desc.slot_size().unwrap_or(SLOT_HEADER) + PAGE).div_ceil(8);
        Ok(Consumer {
            ring,
            tail,
            buf: vec![0u64; words],
            quarantined: 0,
        })
    }

    /// Opens an existing ring to watch both sides' liveness, taking no role: for a supervisor
    /// of the two processes. The descriptor is read from the ring's header.
    pub fn observe(dir: &Path, name: &str) -> Result<Observer, OpenError> {
        Ok(Observer {
            ring: Mapped::open(dir, name, None)?,
        })
    }

    /// Removes the segment file (mappings stay valid until their handles drop).
    pub fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
        std::fs::remove_file(dir.join(format!("{name}.{EXT}")))
    }
}

/// A mapped, header-checked ring segment.
#[derive(Debug)]
struct Mapped {
    /// Shared with the holder's [`Heartbeat`]s.
    seg: Arc<Segment>,
    desc: Descriptor,
    slot_size: usize,
}

impl Mapped {
    fn new(seg: Segment, desc: Descriptor) -> Self {
        let slot_size = desc.slot_size().unwrap_or(0);
        Self {
            seg: Arc::new(seg),
            desc,
            slot_size,
        }
    }

    /// Opens and checks `dir/name.ring`: against `desc` when given, else against the
    /// descriptor its header holds.
    fn open(dir: &Path, name: &str, desc: Option<&Descriptor>) -> Result<Self, OpenError> {
        if let Some(desc) = desc {
            desc.validate()?;
        }
        let seg = Segment::open(dir, name, EXT, None)?;
        let header_err = |source| OpenError::Header {
            path: seg.path().to_owned(),
            source,
        };
        let fixed: [u8; FIXED_BYTES] = seg.published_prefix(SLOTS_OFFSET).map_err(header_err)?;
        let desc = parse_ring_header(&fixed, desc).map_err(header_err)?;
        let size = desc.validate()?;
        if seg.len() != size {
            return Err(SegmentError::WrongSize {
                path: seg.path().to_owned(),
                expected: size as u64,
                found: seg.len() as u64,
            }
            .into());
        }
        Ok(Self::new(seg, desc))
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= self.seg.len());
        // SAFETY: every caller passes a fixed, 8-aligned offset inside the checked segment
        // (header words or a slot's commit word), and those words are only accessed atomically.
        unsafe { atomic_u64_at(self.seg.ptr().add(offset).cast()) }
    }

    fn head(&self) -> &AtomicU64 {
        self.word(OFF_HEAD)
    }

    fn tail(&self) -> &AtomicU64 {
        self.word(OFF_TAIL)
    }

    fn slot_offset(&self, seq: u64) -> usize {
        SLOTS_OFFSET + (seq % u64::from(self.desc.capacity)) as usize * self.slot_size
    }

    fn commit(&self, seq: u64) -> &AtomicU64 {
        self.word(self.slot_offset(seq))
    }

    fn slot_ptr(&self, seq: u64) -> *mut u8 {
        // SAFETY: slot_offset < SLOTS_OFFSET + capacity * slot_size == segment length.
        unsafe { self.seg.ptr().add(self.slot_offset(seq)) }
    }

    fn alive(&self, byte: u64) -> bool {
        // An error here (should not happen on a valid fd) is treated as "alive": we never
        // report a peer dead without the kernel's word for it.
        self.seg.byte_locked_by_other(byte).unwrap_or(true)
    }

    /// Records this process as the holder of a role that was just taken: its pid, and a first
    /// beat.
    fn mark_holder(&self, heartbeat: usize, pid: usize) {
        // Relaxed: both words are diagnostics for the peer and a supervisor; no data depends
        // on them.
        self.word(pid)
            .store(u64::from(std::process::id()), Ordering::Relaxed);
        self.word(heartbeat)
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// What the ring shows of the role `side`.
    fn liveness(&self, side: Side) -> Liveness {
        liveness(&self.seg, side)
    }

    fn heartbeat(&self, own: Side, peer: Side) -> Heartbeat {
        Heartbeat {
            seg: Arc::clone(&self.seg),
            own,
            peer,
        }
    }
}

/// A role's words in the header: its lock byte, heartbeat and pid.
#[derive(Debug, Clone, Copy)]
struct Side {
    lock: u64,
    heartbeat: usize,
    pid: usize,
}

const PRODUCER: Side = Side {
    lock: PRODUCER_LOCK_BYTE,
    heartbeat: OFF_PRODUCER_HEARTBEAT,
    pid: OFF_PRODUCER_PID,
};
const CONSUMER: Side = Side {
    lock: CONSUMER_LOCK_BYTE,
    heartbeat: OFF_CONSUMER_HEARTBEAT,
    pid: OFF_CONSUMER_PID,
};

/// A header word of `seg` (a fixed, 8-aligned offset inside the first page).
fn header_word(seg: &Segment, offset: usize) -> &AtomicU64 {
    debug_assert!(offset % 8 == 0 && offset + 8 <= SLOTS_OFFSET);
    // SAFETY: every caller passes one of the fixed header offsets above, inside the checked
    // segment that `seg` keeps mapped; those words are only accessed atomically.
    unsafe { atomic_u64_at(seg.ptr().add(offset).cast()) }
}

fn liveness(seg: &Segment, side: Side) -> Liveness {
    // Relaxed: diagnostic words (see `Mapped::mark_holder`).
    let beat = header_word(seg, side.heartbeat).load(Ordering::Relaxed);
    let pid = header_word(seg, side.pid).load(Ordering::Relaxed);
    Liveness {
        // An error here (should not happen on a valid fd) is treated as "held": we never
        // report a peer gone without the kernel's word for it.
        held: seg.byte_locked_by_other(side.lock).unwrap_or(true),
        pid: u32::try_from(pid).ok().filter(|&p| p != 0),
        silent: Duration::from_nanos(monotonic_ns().saturating_sub(beat)),
    }
}

/// What the ring shows of one side: whether a process holds the role (the kernel's word), its
/// pid, and how long since it last beat. A holder whose beats stop while it holds the role is
/// alive but hung (stopped, in a debugger, thrashing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A process holds the role.
    pub held: bool,
    /// The pid the last holder recorded (`None` before any did).
    pub pid: Option<u32>,
    /// Time since the holder's last beat (or commit/release, which also beat).
    pub silent: Duration,
}

/// A handle that beats one side's heartbeat word and watches the other side's, for a thread
/// of its own: the side's work (a generation, a training step) may take longer than the peer's
/// patience, so liveness is beaten and watched apart from progress. A stopped process
/// (SIGSTOP) stops all its threads, and so its beats.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    seg: Arc<Segment>,
    own: Side,
    peer: Side,
}

impl Heartbeat {
    /// Records "alive now".
    pub fn beat(&self) {
        // Relaxed: a diagnostic timestamp; no data depends on it.
        header_word(&self.seg, self.own.heartbeat).store(monotonic_ns(), Ordering::Relaxed);
    }

    /// The other side's liveness.
    pub fn peer(&self) -> Liveness {
        liveness(&self.seg, self.peer)
    }
}

/// A role-less view of a ring for a supervisor: both sides' liveness.
#[derive(Debug)]
pub struct Observer {
    ring: Mapped,
}

impl Observer {
    /// The producer (rollout server).
    pub fn producer(&self) -> Liveness {
        self.ring.liveness(PRODUCER)
    }

    /// The consumer (learner).
    pub fn consumer(&self) -> Liveness {
        self.ring.liveness(CONSUMER)
    }
}

fn slot_meta_crc(len: u64, batch: u64, policy: u64, seq: u64) -> u32 {
    let mut meta = [0u8; 32];
    for (i, v) in [len, batch, policy, seq].into_iter().enumerate() {
        meta[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    crc32c_append(0, &meta)
}

/// The producer handle (one per ring, held by the rollout server).
#[derive(Debug)]
pub struct Producer {
    ring: Mapped,
    head: u64,
    /// Cached `tail + capacity` (see `ring_core::producer_space_limit`).
    space_limit: u64,
    generation: u64,
}

/// A record written into its slot but not yet visible to the consumer.
/// Dropping it abandons the record; the slot is rewritten by the next push.
#[derive(Debug)]
#[must_use = "a pending record is invisible until committed"]
pub struct Pending<'a> {
    producer: &'a mut Producer,
    seq: u64,
}

impl Pending<'_> {
    /// Makes the record visible to the consumer; returns its sequence number.
    pub fn commit(self) -> u64 {
        let p = self.producer;
        ring_core::producer_commit(p.ring.commit(self.seq), p.ring.head(), self.seq);
        // Relaxed: the heartbeat is a diagnostic timestamp; no data depends on it.
        p.ring
            .word(OFF_PRODUCER_HEARTBEAT)
            .store(monotonic_ns(), Ordering::Relaxed);
        p.head = self.seq + 1;
        self.seq
    }
}

impl Producer {
    /// The ring's descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.ring.desc
    }

    /// This producer's generation (1 for the creator, +1 per restart).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.head
    }

    /// Whether a consumer process currently holds the ring.
    pub fn consumer_alive(&self) -> bool {
        self.ring.alive(CONSUMER_LOCK_BYTE)
    }

    /// Fails when the ring's file was truncated while mapped (one fstat; call it now and then,
    /// e.g. once per batch: pushes check only for a fault, see `crate::fault`).
    pub fn check_intact(&self) -> Result<(), crate::Truncated> {
        self.ring.seg.check_intact()
    }

    /// The consumer's liveness: held, pid, time since its last beat.
    pub fn consumer(&self) -> Liveness {
        self.ring.liveness(CONSUMER)
    }

    /// A handle beating this producer's heartbeat from another thread.
    pub fn heartbeat(&self) -> Heartbeat {
        self.ring.heartbeat(PRODUCER, CONSUMER)
    }

    /// Writes the record into the next slot without committing it.
    /// Fails with [`PushError::Full`] when the consumer has not released that slot.
    pub fn write_uncommitted(&mut self, rec: &RecordView<'_>) -> Result<Pending<'_>, PushError> {
        let len = rec.validate(&self.ring.desc.limits)?;
        self.ring.seg.check_unfaulted()?;
        let seq = self.head;
        if seq >= self.space_limit {
            self.space_limit =
                ring_core::producer_space_limit(self.ring.tail(), self.ring.desc.capacity.into());
            if seq >= self.space_limit {
                // The tail just read may be a zero of an absorbed fault.
                self.ring.seg.check_unfaulted()?;
                return Err(PushError::Full {
                    capacity: self.ring.desc.capacity,
                });
            }
        }
        let slot = self.ring.slot_ptr(seq);
        let (len64, batch, policy) = (len as u64, rec.batch_id, rec.policy_version);
        let seed = slot_meta_crc(len64, batch, policy, seq);
        // SAFETY: the slot is ours: the consumer released it (checked above) and no other
        // producer exists (role lock). `validate` bounded `len` by max_record_bytes, which fits
        // in slot_size - SLOT_HEADER. The metadata words are plain data written before the
        // commit's Release store.
        unsafe {
            let crc = rec.write_to(slot.add(SLOT_HEADER), len, seed);
            slot.add(SLOT_OFF_LEN).cast::<u64>().write(len64);
            slot.add(SLOT_OFF_BATCH).cast::<u64>().write(batch);
            slot.add(SLOT_OFF_POLICY).cast::<u64>().write(policy);
            slot.add(SLOT_OFF_SEQ).cast::<u64>().write(seq);
            slot.add(SLOT_OFF_CRC).cast::<u32>().write(crc);
        }
        // A file truncated while we wrote: the record went nowhere the consumer sees.
        self.ring.seg.check_unfaulted()?;
        Ok(Pending {
            producer: self,
            seq,
        })
    }

    /// Writes and commits one record, or fails at once with [`PushError::Full`].
    pub fn try_push(&mut self, rec: &RecordView<'_>) -> Result<u64, PushError> {
        Ok(self.write_uncommitted(rec)?.commit())
    }

    /// Pushes, waiting up to `timeout` for space (backpressure). Never overwrites.
    pub fn push(&mut self, rec: &RecordView<'_>, timeout: Duration) -> Result<u64, PushError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            match self.try_push(rec) {
                Err(PushError::Full { .. }) => {}
                other => return other,
            }
            if backoff.snooze() && start.elapsed() >= timeout {
                return Err(PushError::Timeout {
                    waited: start.elapsed(),
                    consumer_alive: self.consumer_alive(),
                });
            }
        }
    }

    /// Records committed and not yet consumed.
    pub fn len(&self) -> u64 {
        ring_core::committed_len(self.ring.head(), self.ring.tail())
    }

    /// Whether the consumer has caught up.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A committed slot's payload and metadata, length already bounded by the slot size.
struct SlotRead {
    seq: u64,
    payload: *mut u8,
    len: usize,
    stored_crc: u32,
    seed: u32,
}

/// The consumer handle (one per ring, held by the learner).
#[derive(Debug)]
pub struct Consumer {
    ring: Mapped,
    tail: u64,
    buf: Vec<u64>,
    quarantined: u64,
}

impl Consumer {
    /// The ring's descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.ring.desc
    }

    /// Sequence number of the next record to read.
    pub fn next_seq(&self) -> u64 {
        self.tail
    }

    /// Records this consumer quarantined (CRC or decode failures).
    pub fn quarantined(&self) -> u64 {
        self.quarantined
    }

    /// Records quarantined by any consumer of this ring, ever.
    pub fn quarantined_total(&self) -> u64 {
        // Relaxed: a statistics counter.
        self.ring.word(OFF_QUARANTINED).load(Ordering::Relaxed)
    }

    /// The producer generation currently recorded in the header.
    pub fn producer_generation(&self) -> u64 {
        // Relaxed: informational; data visibility is governed by the commit words.
        self.ring.word(OFF_GENERATION).load(Ordering::Relaxed)
    }

    /// Whether a producer process currently holds the ring.
    pub fn producer_alive(&self) -> bool {
        self.ring.alive(PRODUCER_LOCK_BYTE)
    }

    /// Fails when the ring's file was truncated while mapped (one fstat; call it now and then,
    /// e.g. while waiting: pops check only for a fault, see `crate::fault`).
    pub fn check_intact(&self) -> Result<(), crate::Truncated> {
        self.ring.seg.check_intact()
    }

    /// The producer's liveness: held, pid, time since its last beat.
    pub fn producer(&self) -> Liveness {
        self.ring.liveness(PRODUCER)
    }

    /// A handle beating this consumer's heartbeat from another thread.
    pub fn heartbeat(&self) -> Heartbeat {
        self.ring.heartbeat(CONSUMER, PRODUCER)
    }

    /// Time since the producer last beat (a commit, a [`Heartbeat::beat`], or its start).
    pub fn producer_heartbeat_age(&self) -> Duration {
        // Relaxed: diagnostic timestamp.
        let beat = self
            .ring
            .word(OFF_PRODUCER_HEARTBEAT)
            .load(Ordering::Relaxed);
        Duration::from_nanos(monotonic_ns().saturating_sub(beat))
    }

    /// The committed slot `seq` is ready to read: its metadata, with the length bounded by the
    /// slot size (or the slot quarantined).
    fn committed_slot(&mut self) -> Result<SlotRead, PopError> {
        self.ring.seg.check_unfaulted()?;
        let seq = self.tail;
        if !ring_core::consumer_ready(self.ring.commit(seq), seq) {
            // The commit word just read may be a zero of an absorbed fault.
            self.ring.seg.check_unfaulted()?;
            return Err(PopError::Empty);
        }
        let slot = self.ring.slot_ptr(seq);
        let max = (self.ring.slot_size - SLOT_HEADER) as u64;
        // SAFETY: the commit word's Acquire load made the producer's writes of this slot
        // visible, and the producer will not touch the slot until we release it.
        let (len, stored_crc, batch, policy) = unsafe {
            (
                slot.add(SLOT_OFF_LEN).cast::<u64>().read(),
                slot.add(SLOT_OFF_CRC).cast::<u32>().read(),
                slot.add(SLOT_OFF_BATCH).cast::<u64>().read(),
                slot.add(SLOT_OFF_POLICY).cast::<u64>().read(),
            )
        };
        if len > max {
            return Err(self.quarantine(seq, CorruptReason::Length { len, max }));
        }
        Ok(SlotRead {
            seq,
            payload: slot.wrapping_add(SLOT_HEADER),
            len: len as usize,
            stored_crc,
            // The expected sequence (not the stored one) seeds the CRC, so a stale slot fails.
            seed: slot_meta_crc(len, batch, policy, seq),
        })
    }

    /// Checks the CRC and decodes `bytes` (the verified bytes of slot `r.seq`), hands the
    /// record to `f`, then releases the slot; quarantines the record instead on any failure.
    fn deliver<R>(
        &mut self,
        r: &SlotRead,
        computed: u32,
        bytes: &[u8],
        f: impl FnOnce(RecordRef<'_>) -> R,
    ) -> Result<R, PopError> {
        // What was read may be zeros of an absorbed fault rather than the record: a truncated
        // ring is an error, not a corrupt record to quarantine.
        self.ring.seg.check_unfaulted()?;
        if computed != r.stored_crc {
            // Zeros past a truncated end (the last page reads zeros without a fault) are a
            // truncation, not a corrupt record.
            self.ring.seg.check_intact()?;
            let reason = CorruptReason::Crc {
                stored: r.stored_crc,
                computed,
            };
            return Err(self.quarantine(r.seq, reason));
        }
        let rec = match decode_record(bytes, &self.ring.desc.limits) {
            Ok(rec) => rec,
            Err(e) => {
                self.ring.seg.check_intact()?;
                return Err(self.quarantine(r.seq, CorruptReason::Record(e)));
            }
        };
        let out = f(rec);
        // `f` may have read the slot in place: it saw the record only if the ring is intact.
        self.ring.seg.check_unfaulted()?;
        self.release(r.seq);
        Ok(out)
    }

    /// Reads the next record if one is committed: copies it out of the slot into a private
    /// buffer (checking the CRC over the copy), hands the decoded copy to `f`, then releases
    /// the slot. If the process dies inside `f`, the record is delivered again to the next
    /// consumer.
    pub fn try_pop_with<R>(&mut self, f: impl FnOnce(RecordRef<'_>) -> R) -> Result<R, PopError> {
        let r = self.committed_slot()?;
        // Copy into the buffer at the same offset within a page as the source: copies whose
        // destination lies a few bytes above the source modulo 4096 run several times slower
        // on some CPUs (loads falsely wait on earlier stores), while equal offsets run at full
        // speed. The payload is 64-byte aligned, so the destination stays 8-byte aligned.
        let base = self.buf.as_mut_ptr().cast::<u8>();
        let shift = (r.payload as usize).wrapping_sub(base as usize) % PAGE;
        // SAFETY: `shift < PAGE` and `buf` holds slot_size + PAGE bytes, so `base + shift`
        // has room for `len <= slot_size - SLOT_HEADER` bytes (checked in `committed_slot`).
        let dst = unsafe { base.add(shift) };
        // SAFETY: `len` bytes lie inside the slot and fit at `dst` (above); the regions do not
        // overlap (private heap vs shared mapping). The CRC is computed from the values as
        // written to our private copy, which is exactly what gets decoded.
        let computed = unsafe { copy_with_crc(r.payload, dst, r.len, r.seed) };
        // SAFETY: `buf` is a live allocation of at least `shift + len` bytes, initialised
        // above; only this method writes it, and not while `bytes` lives (`deliver` does not
        // touch `buf`, and `buf` is never reallocated).
        let bytes = unsafe { std::slice::from_raw_parts(dst.cast_const(), r.len) };
        self.deliver(&r, computed, bytes, f)
    }

    /// Like [`Self::try_pop_with`], but without the copy: verifies the CRC over the slot
    /// itself and hands `f` a record that borrows the slot. The slot is released only after
    /// `f` returns, so the producer cannot reuse it meanwhile; copy what you keep (e.g. into
    /// tensors) inside `f`. If the process dies inside `f`, the record is delivered again.
    /// The record `f` sees is the one whose CRC was verified as long as the producer follows
    /// the ring protocol (the role lock admits one producer, which never writes an unreleased
    /// slot); [`Self::try_pop_with`] verifies a private copy instead, which no other process
    /// can change at all.
    pub fn try_pop_in_place_with<R>(
        &mut self,
        f: impl FnOnce(RecordRef<'_>) -> R,
    ) -> Result<R, PopError> {
        let r = self.committed_slot()?;
        // SAFETY: the `len` bytes at `payload` lie inside the slot (bounded by
        // `committed_slot`), inside the mapping that `self` keeps alive. Nobody writes them
        // while `bytes` lives: the commit word's Acquire load (in `committed_slot`) ordered
        // the producer's writes before our reads, and under the SPSC protocol the producer
        // writes a slot only after the consumer released it (its Acquire load of `tail` pairs
        // with the Release in `release`), which happens after `deliver` returns and `bytes`
        // is dead; a restarted producer resumes after the last committed record, so it does
        // not write unreleased slots either. The payload is 64-byte aligned, as decoding needs.
        let bytes = unsafe { std::slice::from_raw_parts(r.payload.cast_const(), r.len) };
        let computed = crc32c_append(r.seed, bytes);
        self.deliver(&r, computed, bytes, f)
    }

    fn release(&mut self, seq: u64) {
        ring_core::consumer_release(self.ring.tail(), seq);
        self.tail = seq + 1;
        // Relaxed: diagnostic timestamp.
        self.ring
            .word(OFF_CONSUMER_HEARTBEAT)
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    fn quarantine(&mut self, seq: u64, reason: CorruptReason) -> PopError {
        self.quarantined += 1;
        // Relaxed: a statistics counter.
        self.ring
            .word(OFF_QUARANTINED)
            .fetch_add(1, Ordering::Relaxed);
        self.release(seq);
        PopError::Corrupt { seq, reason }
    }

    /// Waits up to `timeout` until the next record is committed. Reports a dead producer as
    /// [`PopError::ProducerDead`] once the ring is empty.
    fn wait_ready(&self, timeout: Duration) -> Result<(), PopError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let seq = self.tail;
        loop {
            if ring_core::consumer_ready(self.ring.commit(seq), seq) {
                return Ok(());
            }
            if backoff.snooze() {
                self.ring.seg.check_intact()?;
                if !self.producer_alive() {
                    // Re-check: the producer may have committed just before dying.
                    if ring_core::consumer_ready(self.ring.commit(seq), seq) {
                        return Ok(());
                    }
                    return Err(PopError::ProducerDead {
                        generation: self.producer_generation(),
                    });
                }
                if start.elapsed() >= timeout {
                    return Err(PopError::Timeout(start.elapsed()));
                }
            }
        }
    }

    /// Like [`Self::try_pop_with`], waiting up to `timeout`. Reports a dead producer as
    /// [`PopError::ProducerDead`] once the ring is empty.
    pub fn pop_with<R>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(RecordRef<'_>) -> R,
    ) -> Result<R, PopError> {
        self.wait_ready(timeout)?;
        self.try_pop_with(f)
    }

    /// Like [`Self::try_pop_in_place_with`] (no copy: `f` borrows the verified slot), waiting
    /// up to `timeout`. Reports a dead producer as [`PopError::ProducerDead`] once the ring
    /// is empty.
    pub fn pop_in_place_with<R>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(RecordRef<'_>) -> R,
    ) -> Result<R, PopError> {
        self.wait_ready(timeout)?;
        self.try_pop_in_place_with(f)
    }

    /// Pops one owned record, waiting up to `timeout`.
    pub fn pop(&mut self, timeout: Duration) -> Result<RolloutRecord, PopError> {
        self.pop_with(timeout, |r| r.to_owned_record())
    }

    /// Pops one owned record if one is committed.
    pub fn try_pop(&mut self) -> Result<RolloutRecord, PopError> {
        self.try_pop_with(|r| r.to_owned_record())
    }
}
