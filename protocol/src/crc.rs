//! CRC32C (Castagnoli), the checksum of the ring's slot format, with a single-pass copy+CRC.
//!
//! On x86-64 CPUs with SSE4.2 and PCLMULQDQ a buffer is hashed in chunks of three interleaved
//! streams (4096, then 256, then 32 bytes long) with the `crc32` instruction, whose latency is
//! three cycles, and the streams' registers are combined with one carry-less multiplication
//! each; the last bytes go one word, then one byte, at a time.
//! [`copy_with_crc`] loads each 8-byte word once, stores it to the destination and hashes the
//! same register, in one pass, so the checksum covers exactly the bytes written. Elsewhere both
//! fall back to the `crc32c` crate.
//! Results are identical to `crc32c::crc32c_append` for every input (tested).

/// The CRC32C polynomial without its x^32 term, in normal (not reflected) bit order.
#[cfg(target_arch = "x86_64")]
const POLY: u32 = 0x1EDC_6F41;

/// `x^n mod P` in normal bit order.
#[cfg(target_arch = "x86_64")]
const fn xn_mod_p(n: u32) -> u32 {
    let mut r: u64 = 1;
    let mut i = 0;
    while i < n {
        r <<= 1;
        if r & (1 << 32) != 0 {
            r = (r ^ (1 << 32)) ^ POLY as u64;
        }
        i += 1;
    }
    r as u32
}

/// Extends `crc` (as `crc32c::crc32c_append` does) over `data`.
pub(crate) fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= x86::MIN_LEN && x86::available() {
        // SAFETY: the CPU has the features `fold` is compiled for (checked just above), and
        // `data` is valid for reads of `data.len()` bytes. No destination: `COPY = false`.
        return unsafe { x86::fold::<false>(data.as_ptr(), std::ptr::null_mut(), data.len(), crc) };
    }
    crc32c::crc32c_append(crc, data)
}

/// Bytes per chunk of the portable [`copy_with_crc`]: small enough that the CRC pass reads
/// cache-hot data.
const PORTABLE_CHUNK: usize = 32 << 10;

/// Copies `len` bytes from `src` to `dst` and returns `crc` extended over them. The checksum is
/// computed from the values as written to `dst` (each value is read from `src` once), so it
/// describes the destination even if the source changed meanwhile.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, without overlap, and no
/// other party may write `dst` meanwhile.
pub(crate) unsafe fn copy_with_crc(src: *const u8, dst: *mut u8, len: usize, crc: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if len >= x86::MIN_LEN && x86::available() {
        // SAFETY: the CPU has the required features (checked just above); the caller's
        // contract covers `src`, `dst` and `len`.
        return unsafe { x86::fold::<true>(src, dst, len, crc) };
    }
    let mut crc = crc;
    let mut done = 0;
    while done < len {
        let n = PORTABLE_CHUNK.min(len - done);
        // SAFETY: `done + n <= len`, so both ranges lie inside the caller's regions, which do
        // not overlap; then the chunk of `dst` is initialised and nobody else writes it.
        let chunk = unsafe {
            std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), n);
            std::slice::from_raw_parts(dst.add(done).cast_const(), n)
        };
        crc = crc32c::crc32c_append(crc, chunk);
        done += n;
    }
    crc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        _mm_clmulepi64_si128, _mm_crc32_u64, _mm_crc32_u8, _mm_cvtsi128_si64, _mm_cvtsi64_si128,
    };

    /// Stream lengths, longest first: each pass hashes as many chunks of three interleaved
    /// streams of that length as fit (the `crc32` instruction has a latency of three cycles
    /// and a throughput of one per cycle on current x86 cores); the next pass takes the rest.
    const LONG: usize = 4096;
    const MEDIUM: usize = 256;
    const SHORT: usize = 32;
    /// Shortest input worth this path; shorter ones go to the `crc32c` crate.
    pub(super) const MIN_LEN: usize = 3 * SHORT;

    /// Whether the CPU has what [`fold`] is compiled for (the standard library caches this).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("pclmulqdq") && is_x86_feature_detected!("sse4.2")
    }

    /// The CRC register `reg` advanced over `S` zero bytes: the carry-less product with
    /// x^(8·S−33) mod P is at most 63 bits, and `crc32` over it multiplies by x^33 mod P.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    unsafe fn shift<const S: usize>(reg: u64) -> u64 {
        let k = const { super::xn_mod_p(8 * S as u32 - 33).reverse_bits() as u64 };
        let p = _mm_clmulepi64_si128::<0x00>(
            _mm_cvtsi64_si128(reg as i64),
            _mm_cvtsi64_si128(k as i64),
        );
        _mm_crc32_u64(0, _mm_cvtsi128_si64(p) as u64)
    }

    /// Hashes (and with `COPY` copies) as many chunks of three `S`-byte streams as fit in
    /// `len` bytes, advancing the register `r0`; returns it and the bytes done.
    ///
    /// # Safety
    /// As for [`fold`].
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    unsafe fn streams<const COPY: bool, const S: usize>(
        src: *const u8,
        dst: *mut u8,
        len: usize,
        mut r0: u64,
    ) -> (u64, usize) {
        let chunks = len / (3 * S);
        for c in 0..chunks {
            let base = c * 3 * S;
            let (mut r1, mut r2) = (0u64, 0u64);
            for i in (0..S).step_by(8) {
                let o = base + i;
                // SAFETY: `o + 2 * S + 8 <= base + 3 * S <= len`: every word lies inside both
                // regions; unaligned accesses are allowed by read/write_unaligned.
                let (a, b, d) = unsafe {
                    let a = src.add(o).cast::<u64>().read_unaligned();
                    let b = src.add(o + S).cast::<u64>().read_unaligned();
                    let d = src.add(o + 2 * S).cast::<u64>().read_unaligned();
                    if COPY {
                        dst.add(o).cast::<u64>().write_unaligned(a);
                        dst.add(o + S).cast::<u64>().write_unaligned(b);
                        dst.add(o + 2 * S).cast::<u64>().write_unaligned(d);
                    }
                    (a, b, d)
                };
                r0 = _mm_crc32_u64(r0, a);
                r1 = _mm_crc32_u64(r1, b);
                r2 = _mm_crc32_u64(r2, d);
            }
            // SAFETY: this function's target features are those `shift` needs.
            r0 = unsafe { shift::<S>(shift::<S>(r0) ^ r1) } ^ r2;
        }
        (r0, chunks * 3 * S)
    }

    /// CRC32C of `len` bytes at `src` extended from `crc`; with `COPY`, every word is also
    /// stored to `dst` from the very register that is hashed.
    ///
    /// # Safety
    /// The CPU supports PCLMULQDQ and SSE4.2; `src` is valid for reads of `len` bytes; with
    /// `COPY`, `dst` is valid for writes of `len` bytes, does not overlap `src`, and nobody
    /// else writes it meanwhile (without `COPY`, `dst` is unused).
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    pub(super) unsafe fn fold<const COPY: bool>(
        src: *const u8,
        dst: *mut u8,
        len: usize,
        crc: u32,
    ) -> u32 {
        let r = u64::from(!crc);
        // SAFETY: the caller's contract covers `len` bytes from the start.
        let (r, d1) = unsafe { streams::<COPY, LONG>(src, dst, len, r) };
        // SAFETY: the first pass did `d1 <= len` bytes; this one covers at most the rest.
        let (r, d2) =
            unsafe { streams::<COPY, MEDIUM>(src.add(d1), dst.wrapping_add(d1), len - d1, r) };
        let done = d1 + d2;
        // SAFETY: as above, from `done <= len`.
        let (mut r, d3) =
            unsafe { streams::<COPY, SHORT>(src.add(done), dst.wrapping_add(done), len - done, r) };
        let mut done = done + d3;
        while done + 8 <= len {
            // SAFETY: `done + 8 <= len`: the word lies inside both regions.
            let w = unsafe {
                let w = src.add(done).cast::<u64>().read_unaligned();
                if COPY {
                    dst.add(done).cast::<u64>().write_unaligned(w);
                }
                w
            };
            r = _mm_crc32_u64(r, w);
            done += 8;
        }
        let mut r = r as u32;
        while done < len {
            // SAFETY: `done < len`: the byte lies inside both regions.
            let b = unsafe {
                let b = src.add(done).read();
                if COPY {
                    dst.add(done).write(b);
                }
                b
            };
            r = _mm_crc32_u8(r, b);
            done += 1;
        }
        !r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, salt: u32) -> Vec<u8> {
        let mut s = 0x9E37_79B9u32 ^ salt;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_crc32c_crate_for_every_length_offset_and_seed() {
        let buf = data(40_000 + 64, 7);
        let big = [
            4095, 4096, 12_287, 12_288, 12_289, 24_576, 24_583, 36_864, 40_000,
        ];
        for len in (0..300).chain(big) {
            for off in [0, 1, 3, 8, 13] {
                for seed in [0u32, 1, 0xDEAD_BEEF, u32::MAX] {
                    let part = &buf[off..off + len];
                    let want = crc32c::crc32c_append(seed, part);
                    assert_eq!(crc32c_append(seed, part), want, "len {len} off {off}");
                    let mut dst = vec![0u8; len + 5];
                    // SAFETY: `part` has `len` readable bytes; `dst[5..]` has `len` writable
                    // bytes in a separate allocation.
                    let got =
                        unsafe { copy_with_crc(part.as_ptr(), dst[5..].as_mut_ptr(), len, seed) };
                    assert_eq!(got, want, "copy len {len} off {off}");
                    assert_eq!(&dst[5..], part, "copy len {len} off {off}");
                }
            }
        }
    }

    #[test]
    fn matches_the_crc32c_crate_on_a_large_buffer_and_detects_one_flipped_bit() {
        let mut buf = data((1 << 20) + 77, 99);
        let want = crc32c::crc32c(&buf);
        assert_eq!(crc32c_append(0, &buf), want);
        buf[500_000] ^= 0x10;
        assert_ne!(crc32c_append(0, &buf), want);
        assert_eq!(crc32c_append(0, &buf), crc32c::crc32c(&buf));
    }

    #[test]
    fn appending_in_pieces_equals_one_pass() {
        let buf = data(10_000, 3);
        let whole = crc32c_append(5, &buf);
        let (a, b) = buf.split_at(3_333);
        assert_eq!(crc32c_append(crc32c_append(5, a), b), whole);
    }
}
