//! The one place atomics come from, so that the loom model checker can swap them in.
//!
//! Under `cfg(loom)` these are loom's instrumented types; otherwise the standard library's.
//! Atomics that live in shared memory are only ever reached through this module's
//! [`atomic_u64_at`], so the protocol code never names `std::sync::atomic` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

/// Views an 8-byte aligned word of a shared mapping as an `AtomicU64`.
///
/// # Safety
/// `ptr` must be non-null, 8-byte aligned, valid for reads and writes for `'a`, and every
/// access to that word by any process must go through atomic operations.
#[cfg(not(loom))]
pub(crate) unsafe fn atomic_u64_at<'a>(ptr: *mut u64) -> &'a AtomicU64 {
    // SAFETY: forwarded from the caller's contract: aligned, valid for 'a, only accessed
    // atomically (AtomicU64 has the same size and alignment as u64 on 64-bit targets).
    unsafe { AtomicU64::from_ptr(ptr) }
}
