//! Shared-memory rollout ring, weight store and control channel between the rollout server
//! and the learner.
//!
//! - [`RolloutRing`]: SPSC ring of [`RolloutRecord`]s in a shared segment, with per-slot commit
//!   words and CRC32C, explicit backpressure and crash detection.
//! - [`WeightStore`]: multi-slot parameter store with pinning readers, laid out by a
//!   [`Manifest`]; `cuda` (feature `cuda`) does the same over CUDA IPC device buffers.
//! - [`control`]: typed messages and the handshake over `ipc-channel`.
//! - [`mod@bench`]: the ring and weight-store benchmarks behind `nested-reft bench`.
//! - [`assets`]: where the fetched model and data are cached (the one rule every process and
//!   the fetch script share), and fetching them.

mod sync;

#[doc(hidden)]
pub mod ring_core;

#[cfg(not(loom))]
mod crc;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
mod fault;
#[cfg(not(loom))]
mod manifest;
#[cfg(not(loom))]
mod record;
#[cfg(not(loom))]
mod ring;
#[cfg(not(loom))]
mod sampling;
#[cfg(not(loom))]
mod segment;
#[cfg(not(loom))]
mod weights;

#[cfg(not(loom))]
pub mod assets;
#[cfg(not(loom))]
pub mod bench;
#[cfg(not(loom))]
pub mod control;
#[cfg(all(feature = "cuda", not(loom)))]
pub mod cuda;

#[cfg(not(loom))]
pub use error::{
    ControlError, CorruptReason, HandshakeError, HeaderError, ManifestError, OpenError, PinError,
    PopError, PublishError, PublishSlotError, PushError, RecordError, SegmentError, Truncated,
};
#[cfg(not(loom))]
pub use manifest::{DType, Manifest, TensorSpec, TENSOR_ALIGN};
#[cfg(not(loom))]
pub use record::{
    decode_record, encode_record, FinishReason, Limits, RecordRef, RecordView, RewardOutcome,
    RolloutRecord, Timings, MAX_REWARD_MESSAGE_BYTES, MAX_STOP_BYTES, PLAN_LAYER_MASK,
    PLAN_SKIP_ATTN, PLAN_SKIP_MLP,
};
#[cfg(not(loom))]
pub use ring::{
    parse_ring_header, Consumer, Descriptor, Heartbeat, Liveness, Observer, Pending, Producer,
    RolloutRing, RING_LAYOUT_VERSION, RING_MAGIC,
};
#[cfg(not(loom))]
pub use sampling::{SamplingError, SamplingParams};
#[cfg(not(loom))]
pub use segment::default_runtime_dir;
#[cfg(not(loom))]
pub use weights::{
    parse_weights_header, Pinned, Reader, WeightStore, WeightsHeader, Writer, MAX_READERS,
    MAX_SLOTS, WEIGHTS_LAYOUT_VERSION, WEIGHTS_MAGIC,
};

/// The layout version announced in the control handshake: bumps when any wire layout changes.
pub const PROTOCOL_VERSION: u32 = 6;
