//! The SPSC index and commit protocol of the rollout ring, independent of where its words live
//! (shared memory in production, loom's model heap under `cfg(loom)`).
//!
//! Words: `head` (next sequence the producer writes), `tail` (next sequence the consumer reads),
//! and per slot a `commit` word that holds `seq + 1` once the record with sequence `seq` is
//! completely written. Slot of sequence `seq` is `seq % capacity`.

use crate::sync::{AtomicU64, Ordering};

/// Producer: the first sequence that may NOT be written yet (`tail + capacity`). Every
/// sequence below it may be written; the producer caches the value and reloads it only when
/// it reaches it.
///
/// The Acquire load of `tail` pairs with the Release store in [`consumer_release`]: once we see
/// the consumer moved past a slot, its copy-out of that slot happened before our overwrite.
pub fn producer_space_limit(tail: &AtomicU64, capacity: u64) -> u64 {
    tail.load(Ordering::Acquire).wrapping_add(capacity)
}

/// Producer: publish the fully written record `seq`.
///
/// The Release store of the commit word pairs with the Acquire load in [`consumer_ready`]: the
/// payload, length and CRC written before it are visible to a consumer that sees `seq + 1`.
/// The Release store of `head` pairs with the Acquire load in [`committed_len`] and in a
/// restarted producer's recovery; it is informational (the consumer relies on commit words).
pub fn producer_commit(commit: &AtomicU64, head: &AtomicU64, seq: u64) {
    commit.store(seq.wrapping_add(1), Ordering::Release);
    head.store(seq.wrapping_add(1), Ordering::Release);
}

/// Consumer: is record `seq` committed? Acquire pairs with the Release in [`producer_commit`].
pub fn consumer_ready(commit: &AtomicU64, seq: u64) -> bool {
    commit.load(Ordering::Acquire) == seq.wrapping_add(1)
}

/// Consumer: record `seq` has been copied out; its slot may be reused.
///
/// Release pairs with the Acquire load of `tail` in [`producer_space_limit`].
pub fn consumer_release(tail: &AtomicU64, seq: u64) {
    tail.store(seq.wrapping_add(1), Ordering::Release);
}

/// Records committed and not yet released (may be momentarily stale).
///
/// Acquire loads pair with the Release stores in [`producer_commit`] and [`consumer_release`].
pub fn committed_len(head: &AtomicU64, tail: &AtomicU64) -> u64 {
    let t = tail.load(Ordering::Acquire);
    head.load(Ordering::Acquire).saturating_sub(t)
}
