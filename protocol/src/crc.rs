//! CRC32C (Castagnoli), the checksum of the ring's slot format, with a single-pass copy+CRC.
//!
//! On x86-64 CPUs with SSE4.2 and PCLMULQDQ the bulk of a buffer is hashed in chunks of three
//! interleaved streams with the `crc32` instruction (whose latency is three cycles), and the
//! streams' registers are combined with one carry-less multiplication each.
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
        _mm_clmulepi64_si128, _mm_crc32_u64, _mm_cvtsi128_si64, _mm_cvtsi64_si128,
    };

    /// Bytes of each of the three interleaved streams per chunk (the `crc32` instruction has a
    /// latency of three cycles and a throughput of one per cycle on current x86 cores).
    const STREAM: usize = 4096;
    /// Bytes per chunk.
    const CHUNK: usize = 3 * STREAM;
    /// Shortest input worth the interleaving; shorter ones go to the `crc32c` crate.
    pub(super) const MIN_LEN: usize = CHUNK;

    /// Multiplier that advances a CRC register over `STREAM` zero bytes (see [`shift`]).
    const K_STREAM: u64 = super::xn_mod_p(8 * STREAM as u32 - 33).reverse_bits() as u64;

    /// Whether the CPU has what [`fold`] is compiled for (the standard library caches this).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("pclmulqdq") && is_x86_feature_detected!("sse4.2")
    }

    /// The CRC register `reg` advanced over `STREAM` zero bytes: the carry-less product with
    /// x^(8·STREAM−33) mod P is at most 63 bits, and `crc32` over it multiplies by x^33 mod P.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    unsafe fn shift(reg: u64) -> u64 {
        let p = _mm_clmulepi64_si128::<0x00>(
            _mm_cvtsi64_si128(reg as i64),
            _mm_cvtsi64_si128(K_STREAM as i64),
        );
        _mm_crc32_u64(0, _mm_cvtsi128_si64(p) as u64)
    }

    /// CRC32C of `len` bytes at `src` extended from `crc`, over three interleaved streams per
    /// chunk; with `COPY`, every 8-byte word is also stored to `dst` from the very register
    /// that is hashed.
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
        let chunks = len / CHUNK;
        let mut r0 = u64::from(!crc);
        for c in 0..chunks {
            let base = c * CHUNK;
            let (mut r1, mut r2) = (0u64, 0u64);
            for i in (0..STREAM).step_by(8) {
                let o = base + i;
                // SAFETY: `o + 2 * STREAM + 8 <= base + CHUNK <= len`: every word lies inside
                // both regions; unaligned accesses are allowed by read/write_unaligned.
                let (a, b, d) = unsafe {
                    let a = src.add(o).cast::<u64>().read_unaligned();
                    let b = src.add(o + STREAM).cast::<u64>().read_unaligned();
                    let d = src.add(o + 2 * STREAM).cast::<u64>().read_unaligned();
                    if COPY {
                        dst.add(o).cast::<u64>().write_unaligned(a);
                        dst.add(o + STREAM).cast::<u64>().write_unaligned(b);
                        dst.add(o + 2 * STREAM).cast::<u64>().write_unaligned(d);
                    }
                    (a, b, d)
                };
                r0 = _mm_crc32_u64(r0, a);
                r1 = _mm_crc32_u64(r1, b);
                r2 = _mm_crc32_u64(r2, d);
            }
            // SAFETY: this function's target features are those `shift` needs.
            r0 = unsafe { shift(shift(r0) ^ r1) } ^ r2;
        }
        let done = chunks * CHUNK;
        let rest = len - done;
        // SAFETY: `done + rest == len`: the tail lies inside both regions, which do not
        // overlap; then nobody else writes the copied tail of `dst`.
        let tail = unsafe {
            if COPY {
                std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), rest);
                std::slice::from_raw_parts(dst.add(done).cast_const(), rest)
            } else {
                std::slice::from_raw_parts(src.add(done), rest)
            }
        };
        crc32c::crc32c_append(!(r0 as u32), tail)
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
