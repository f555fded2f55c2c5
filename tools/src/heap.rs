//! The learner's heap: keep what a step frees for the next one.
//!
//! A training step allocates and frees the same large buffers every time (activations, their
//! gradients, the output head's logits chunks: 12–50 MB each for the default model). glibc serves
//! blocks above its mmap threshold (at most 32 MB) with fresh mappings and trims its heap's free
//! top, so each step page-faults its memory in again: about 10 % of a LoRA update's CPU samples
//! were the kernel zeroing pages. [`keep_freed_memory`] makes glibc serve every block from its
//! heap and keep up to 2 GiB of free top, so a step reuses the pages of the previous one. The
//! process's peak memory is unchanged (what it holds between steps is at most that peak).

/// Largest free heap top glibc keeps instead of returning it to the system.
const TRIM_THRESHOLD: i32 = i32::MAX;
/// Extra memory glibc asks for each time the heap grows (fewer, larger `brk` calls).
const TOP_PAD: i32 = 256 << 20;

/// Tunes glibc's allocator for the learner's repeated steps (see the module documentation).
/// Returns whether every setting was accepted; elsewhere than on glibc it does nothing and
/// returns false.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets glibc allocator parameters, under the allocator's own lock;
        // it reads no memory of ours and may be called at any time, from any thread. The
        // values are in the ranges glibc documents (M_MMAP_MAX ≥ 0, thresholds as int).
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings_and_large_blocks_still_allocate() {
        assert!(super::keep_freed_memory());
        // A block above the default mmap ceiling (32 MB), now from the heap: written through,
        // freed, allocated again.
        for _ in 0..2 {
            let mut v = vec![0u8; 64 << 20];
            v[(64 << 20) - 1] = 7;
            assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7);
        }
    }
}
