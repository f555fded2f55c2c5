//! The learner's heap: keep what a step frees for the next one.
//!
//! A training step allocates and frees the same large buffers every time (activations, their
//! gradients, the output head's logits chunks: 12–50 MB each for the default model). glibc serves
//! blocks above its mmap threshold (at most 32 MB) with fresh mappings and trims its heap's free
//! top, so each step page-faults its memory in again: about 10 % of a LoRA update's CPU samples
//! were the kernel zeroing pages. [`keep_freed_memory`] makes glibc serve every block from its
//! heap and keep up to 2 GiB of free top, so a step reuses the pages of the previous one. The
//! process's peak memory is unchanged (what it holds between steps is at most that peak).
//! Threads other than the main one allocate from their own arenas, which grow in heaps of at
//! most 64 MB: a larger block there still gets a mapping of its own (the learner's step runs on
//! the main thread; the largest block it allocates, a head logits chunk, is 50 MB).

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
    fn large_blocks_come_from_the_heap_once_set() {
        // Bytes glibc holds in mmapped blocks (all arenas; glibc ≥ 2.33).
        // SAFETY: mallinfo2 only reads the allocator's statistics, under its own lock.
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        assert!(super::keep_freed_memory());
        // A block above glibc's largest mmap threshold (32 MB): a fresh mapping under the
        // default settings. The test runs on a thread of its own, whose arena grows in heaps
        // of at most 64 MB: the block fits one.
        const LEN: usize = 48 << 20;
        let before = mapped();
        let mut v = vec![0u8; LEN];
        v[LEN - 1] = 7;
        let during = mapped();
        assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7);
        drop(v);
        assert!(
            during < before + LEN,
            "a 48 MB block was mmapped: {before} → {during} bytes in mapped blocks"
        );
    }
}
