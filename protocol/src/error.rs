//! One error enum per operation.

use std::time::Duration;

pub use crate::segment::SegmentError;

/// A record failed validation (writing) or decoding (reading).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Fewer bytes than the fixed header.
    #[error("record truncated: needs at least {needed} bytes, found {found}")]
    Truncated { needed: usize, found: usize },
    /// A count exceeds the ring's declared maximum.
    #[error("record {field} count {count} exceeds the declared maximum {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: u32,
    },
    /// The log-prob array does not match the completion length.
    #[error("{logprobs} log-probs for {completion} completion tokens")]
    LogprobCount { logprobs: usize, completion: usize },
    /// The counts imply a different size than the payload has.
    #[error("record counts imply {declared} bytes but the payload has {found}")]
    LengthMismatch { declared: usize, found: usize },
    /// Unknown finish-reason code.
    #[error("unknown finish reason code {0}")]
    BadFinishReason(u32),
    /// The failed flag is neither 0 nor 1.
    #[error("reward failed flag is {0}, expected 0 or 1")]
    BadFlag(u32),
    /// A text (stop string, reward failure message) is present where it has no meaning.
    #[error("record carries {0}")]
    StrayText(&'static str),
    /// A text field is not valid UTF-8.
    #[error("record {0} is not valid UTF-8")]
    BadText(&'static str),
    /// The group fields are inconsistent (empty group, index out of range, empty batch).
    #[error(
        "bad group fields: index {index} of a group of {size}, batch of {batch_groups} groups"
    )]
    BadGroup {
        /// Declared group size.
        size: u32,
        /// Declared index in the group.
        index: u32,
        /// Declared groups in the batch.
        batch_groups: u32,
    },
    /// A plan entry marks both blocks of its layer skipped (the layer should be absent).
    #[error("plan entry {0:#06x} skips both blocks of its layer")]
    BadPlanEntry(u16),
    /// The reserved header word is not zero.
    #[error("reserved header word is {0}, expected 0")]
    NonZeroReserved(u32),
    /// Size arithmetic overflowed.
    #[error("record size overflows")]
    Overflow,
    /// The padding after the layer plan is not zero.
    #[error("non-zero padding after the layer plan")]
    NonZeroPadding,
    /// The buffer is not 4-byte aligned.
    #[error("record buffer is not 4-byte aligned")]
    Misaligned,
}

/// A segment header was rejected when opening.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Fewer bytes than the header.
    #[error("segment of {found} bytes is smaller than its {needed}-byte header")]
    Truncated { needed: usize, found: usize },
    /// The magic is zero: the creator has not finished initialising it.
    #[error("segment header not initialised yet (magic is zero)")]
    NotInitialised,
    /// The magic is wrong: not a segment of this kind.
    #[error("bad magic: expected {expected:#018x}, found {found:#018x}")]
    BadMagic { expected: u64, found: u64 },
    /// The layout version differs.
    #[error("layout version mismatch: this build speaks {expected}, segment has {found}")]
    BadVersion { expected: u32, found: u32 },
    /// A descriptor field differs from what the opener expects, or is invalid.
    #[error("descriptor field `{field}`: expected {expected}, segment has {found}")]
    Descriptor {
        field: &'static str,
        expected: u64,
        found: u64,
    },
}

/// Creating or opening a ring or weight store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// File-level failure (exists, missing, owner, mode, size, I/O).
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The header does not match.
    #[error("{path}: {source}")]
    Header {
        path: std::path::PathBuf,
        source: HeaderError,
    },
    /// The requested layout is invalid (zero capacity, too large, ...).
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// Another live process already holds this role.
    #[error("the {role} role of {path} is held by another live process")]
    RoleTaken {
        role: &'static str,
        path: std::path::PathBuf,
    },
    /// The manifest hash in the segment differs from the opener's.
    #[error("manifest hash mismatch: expected {expected}, segment has {found}")]
    ManifestMismatch { expected: String, found: String },
    /// Lock syscall failure.
    #[error("locking {path}: {source}")]
    Lock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Pushing a record failed. Nothing was written to the ring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The ring is full (backpressure); retry later.
    #[error("ring full ({capacity} unconsumed records)")]
    Full { capacity: u32 },
    /// Waited `waited` for space.
    #[error("ring stayed full for {waited:?} (consumer alive: {consumer_alive})")]
    Timeout {
        waited: Duration,
        consumer_alive: bool,
    },
    /// The record does not fit the ring's descriptor.
    #[error("record rejected: {0}")]
    Record(#[from] RecordError),
    /// The ring's file was truncated; nothing was committed.
    #[error(transparent)]
    Truncated(#[from] Truncated),
}

/// Popping a record failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PopError {
    /// Nothing committed yet.
    #[error("ring empty")]
    Empty,
    /// Nothing committed within the timeout; the producer is alive.
    #[error("no record within {0:?}")]
    Timeout(Duration),
    /// The ring is empty and no process holds the producer role.
    #[error("producer is dead (last generation {generation}); uncommitted data was discarded")]
    ProducerDead { generation: u64 },
    /// The slot failed its CRC or decoding; it was quarantined (counted, skipped).
    #[error("record {seq} quarantined: {reason}")]
    Corrupt { seq: u64, reason: CorruptReason },
    /// The ring's file was truncated; nothing was delivered.
    #[error(transparent)]
    Truncated(#[from] Truncated),
}

/// Why a committed slot was quarantined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptReason {
    /// CRC32C mismatch.
    #[error("crc32c mismatch: slot says {stored:#010x}, data hashes to {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    /// The stored length exceeds the slot.
    #[error("slot length {len} exceeds the slot payload capacity {max}")]
    Length { len: u64, max: u64 },
    /// CRC passed but the payload does not decode.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Building a manifest failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Two tensors share a name.
    #[error("duplicate tensor name {0:?}")]
    DuplicateName(String),
    /// Size arithmetic overflowed.
    #[error("tensor {0:?} is too large")]
    Overflow(String),
    /// The manifest has no tensors.
    #[error("manifest is empty")]
    Empty,
}

/// Publishing weights failed; readers still see the previous version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// Every inactive slot stayed pinned by live readers for `waited`.
    #[error("all {slots} inactive slots stayed pinned by live readers for {waited:?}")]
    AllSlotsPinned { slots: u32, waited: Duration },
    /// Lock syscall failure while checking reader liveness.
    #[error("checking reader liveness: {0}")]
    Lock(#[from] std::io::Error),
    /// An explicit version outside 1..2^56.
    #[error("version {0} cannot be published (must be in 1..2^56)")]
    BadVersion(u64),
    /// The store's file was truncated; nothing was published.
    #[error(transparent)]
    Truncated(#[from] Truncated),
}

/// [`crate::Writer::try_publish_slot`] failed; readers still see the previous version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishSlotError<E> {
    /// No slot could be taken.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The fill callback failed.
    #[error("filling the slot failed: {0}")]
    Fill(E),
}

/// Pinning the current weights failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The writer has not published any version yet.
    #[error("no weights published yet")]
    NothingPublished,
    /// The control word points at a slot that does not exist (corrupt segment).
    #[error("control word names slot {slot} but the store has {slots}")]
    BadSlot { slot: u64, slots: u32 },
    /// The store's file was truncated; what was read from it is lost.
    #[error(transparent)]
    Truncated(#[from] Truncated),
}

/// The control-channel handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Both sides disagree on a field.
    #[error("handshake mismatch on {field}: local {local}, remote {remote}")]
    Mismatch {
        field: &'static str,
        local: String,
        remote: String,
    },
    /// The peer sent something other than the expected message.
    #[error("unexpected handshake message: {0}")]
    Unexpected(String),
    /// The peer did not connect or reply in time.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// Transport failure.
    #[error("control channel: {0}")]
    Channel(String),
}

/// Sending or receiving a control message failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No message within the timeout.
    #[error("no control message within {0:?}")]
    Timeout(Duration),
    /// The peer closed its end (it exited or crashed).
    #[error("control peer disconnected")]
    Disconnected,
    /// Transport failure.
    #[error("control channel: {0}")]
    Channel(String),
}

/// A segment file shrank while this process had it mapped: a peer or a person truncated it.
/// Its contents can no longer be trusted; the process should stop with this error (a restart
/// creates or opens the segment again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "segment {path} was truncated while mapped: it is {found} bytes, its layout needs \
     {expected}; its contents are lost (did another process or a person shrink the file?)"
)]
pub struct Truncated {
    /// The segment file.
    pub path: std::path::PathBuf,
    /// Its size when mapped.
    pub expected: u64,
    /// Its size now (equal to `expected` when the file was shrunk and grown back).
    pub found: u64,
}
