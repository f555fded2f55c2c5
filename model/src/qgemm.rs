//! A batched Q8_0 matmul for the 8-bit behavior on the CPU.
//!
//! The weights and the activations are quantized exactly as candle's `Q8_0` does it (blocks of
//! 32 values, one `f16` scale `amax / 127` per block, values rounded half away from zero), so
//! a sampled token's log-prob is the one the candle path would record. What differs is the
//! loop: candle runs one int8 dot product per (row, output) and loads every weight block once
//! per row; here a tile of up to 4 rows × 4 outputs loads each weight block and each activation
//! block once and keeps the 16 partial sums in registers, threads split the outputs, and on a
//! CPU with AVX-512 VNNI one `vpdpbusd` multiplies two blocks (64 byte pairs) at once.
//!
//! Kernels, chosen at run time: AVX-512 VNNI, else AVX2 + FMA (`vpmaddubsw` on |w| and the
//! activation carrying w's sign, as llama.cpp's tinyBLAS does), else scalar. All three compute
//! `Σ_blocks d_w · d_x · Σ_i w_i x_i` with exact integer block sums; they differ only in the
//! order of the float additions (the tests hold them to the scalar reference within 1e-5 of the
//! sum of the terms' magnitudes).
//!
//! Non-finite inputs behave as in candle's path: a `NaN` quantizes to 0 in its block (the
//! block's scale comes from the finite values), an infinity makes its block's scale infinite,
//! so the outputs it reaches are `NaN`.

use crate::error::{ModelError, Result};
use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block.
pub const BLOCK: usize = 32;

/// Output columns per thread task, at least (a multiple of the tile width).
const MIN_CHUNK: usize = 16;

/// Multiply-adds per thread task, at least.
const MIN_TASK_MACS: usize = 1 << 20;

/// Rows × columns of a register tile.
const TILE_R: usize = 4;
const TILE_C: usize = 4;

/// Quantizes one block of 32 values as candle's `BlockQ8_0::from_float` does; returns the scale
/// as stored (`f16`, widened back to `f32`).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_to_i8(v * id);
    }
    f16::from_f32(d).to_f32()
}

/// `f32::round(v) as i8` (half away from zero, saturating, NaN to 0) without the libm call
/// that `f32::round` becomes on baseline x86-64: truncate, then step away from zero when the
/// dropped fraction is at least one half (`v - trunc(v)` is exact below 2²³).
#[inline]
fn round_to_i8(v: f32) -> i8 {
    // `as i32` truncates toward zero, saturates, and maps NaN to 0.
    let t = v as i32;
    if t.unsigned_abs() >= 1 << 23 {
        return t.clamp(-128, 127) as i8;
    }
    let frac = v - t as f32;
    let r = if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    };
    r.clamp(-128, 127) as i8
}

/// Rows of values quantized to Q8_0: `q[r * cols + i]`, scales `d[r * blocks + b]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Rows {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    d: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `rows × cols` values (row-major); `cols` must be a multiple of [`BLOCK`].
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(ModelError::InvalidInput(format!(
                "Q8_0 rows need a width that is a positive multiple of {BLOCK}, got {cols}"
            )));
        }
        if x.len() != rows * cols {
            return Err(ModelError::InvalidInput(format!(
                "Q8_0 quantization: {} values for {rows} × {cols}",
                x.len()
            )));
        }
        let blocks = cols / BLOCK;
        let mut q = vec![0i8; rows * cols];
        let mut d = vec![0f32; rows * blocks];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut())
        {
            *db = quantize_block(xb, qb);
        }
        Ok(Self { rows, cols, q, d })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The quantized values of row `r`.
    pub fn row_values(&self, r: usize) -> &[i8] {
        &self.q[r * self.cols..(r + 1) * self.cols]
    }

    /// The block scales of row `r` (as stored: `f16` values widened to `f32`).
    pub fn row_scales(&self, r: usize) -> &[f32] {
        let b = self.cols / BLOCK;
        &self.d[r * b..(r + 1) * b]
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }
}

/// The instruction set a matmul runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Kernel {
    /// AVX-512 (F, BW) with VNNI: two blocks per `vpdpbusd`.
    Avx512Vnni,
    /// AVX2 with FMA: one block per `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// Plain Rust, the reference.
    Scalar,
}

impl Q8Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Self::Avx512Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Scalar => true,
            Self::Avx2 => matches!(Self::detect(), Self::Avx2 | Self::Avx512Vnni),
            Self::Avx512Vnni => Self::detect() == Self::Avx512Vnni,
        }
    }
}

/// A linear layer's weight `(out, in)` in Q8_0, multiplied by batches of activation rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    w: Q8Rows,
}

impl Q8Matrix {
    /// Quantizes a row-major `(out, in)` weight; `in` must be a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        Ok(Self {
            w: Q8Rows::quantize(w, out, inp)?,
        })
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.w.rows
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.w.cols
    }

    /// The quantized weight, one row per output.
    pub fn weight(&self) -> &Q8Rows {
        &self.w
    }

    /// `x @ w^T` for `rows × in` activations (row-major): `rows × out`, on the fastest kernel.
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.matmul_t_with(x, rows, Q8Kernel::detect())
    }

    /// [`Self::matmul_t`] on a given kernel (an error if this CPU lacks it).
    pub fn matmul_t_with(&self, x: &[f32], rows: usize, kernel: Q8Kernel) -> Result<Vec<f32>> {
        if !kernel.available() {
            return Err(ModelError::InvalidInput(format!(
                "this CPU cannot run the {kernel:?} Q8_0 kernel"
            )));
        }
        if x.len() != rows * self.in_dim() {
            return Err(ModelError::InvalidInput(format!(
                "Q8_0 matmul: {} activations for {rows} rows of {}",
                x.len(),
                self.in_dim()
            )));
        }
        let a = Q8Rows::quantize(x, rows, self.in_dim())?;
        Ok(self.matmul_quantized(&a, kernel))
    }

    /// `a @ w^T` for activations already quantized; `a.cols()` must equal the input width.
    fn matmul_quantized(&self, a: &Q8Rows, kernel: Q8Kernel) -> Vec<f32> {
        let (m, n) = (a.rows, self.out_dim());
        if m == 0 || n == 0 {
            return Vec::new();
        }
        // Each task owns a run of output columns for every row and writes them straight into
        // the row-major result.
        // A task is worth a thread hand-off (tens of microseconds) only with enough work: a
        // single task runs on the calling thread.
        let threads = rayon::current_num_threads().max(1);
        let work = m * n * self.in_dim();
        let tasks = (threads * 4).min(work / MIN_TASK_MACS).max(1);
        let chunk = n.div_ceil(tasks).next_multiple_of(TILE_C).max(MIN_CHUNK);
        let mut y = vec![0f32; m * n];
        let out = Out {
            ptr: y.as_mut_ptr(),
            n,
        };
        let run = |i: usize| {
            let c0 = i * chunk;
            columns(kernel, &self.w, a, c0, chunk.min(n - c0), &out);
        };
        let count = n.div_ceil(chunk);
        if threads == 1 || count == 1 {
            (0..count).for_each(run);
        } else {
            (0..count).into_par_iter().for_each(run);
        }
        y
    }
}

/// The row-major `rows × n` result, written by the tasks through a shared pointer.
struct Out {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: the tasks write disjoint elements (each owns a range of columns, every (row, column)
// of which one tile writes exactly once), and the buffer outlives the parallel loop, which
// joins all tasks before `matmul_quantized` returns it.
unsafe impl Sync for Out {}

impl Out {
    /// Writes element (r, c).
    ///
    /// # Safety
    /// `r < rows` and `c < n` of the buffer, and no other task writes (r, c).
    #[inline]
    unsafe fn set(&self, r: usize, c: usize, v: f32) {
        // SAFETY: in bounds and unshared, per the caller.
        unsafe { *self.ptr.add(r * self.n + c) = v };
    }
}

/// The scalar reference: `x @ w^T` with exact integer block sums, the blocks added in order.
pub fn reference_matmul_t(w: &Q8Rows, a: &Q8Rows) -> Vec<f32> {
    let (m, n) = (a.rows, w.rows);
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            y[r * n + c] = dot_scalar(w, c, a, r);
        }
    }
    y
}

fn dot_scalar(w: &Q8Rows, c: usize, a: &Q8Rows, r: usize) -> f32 {
    let (wq, wd) = (w.row_values(c), w.row_scales(c));
    let (aq, ad) = (a.row_values(r), a.row_scales(r));
    let mut sum = 0f32;
    for b in 0..w.blocks() {
        let s = b * BLOCK;
        let dot: i32 = wq[s..s + BLOCK]
            .iter()
            .zip(&aq[s..s + BLOCK])
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
        sum += dot as f32 * wd[b] * ad[b];
    }
    sum
}

/// Output columns `c0..c0 + cn` (`c0 + cn <= w.rows`) for every activation row, into `out`.
fn columns(kernel: Q8Kernel, w: &Q8Rows, a: &Q8Rows, c0: usize, cn: usize, out: &Out) {
    let m = a.rows;
    let mut c = 0;
    while c < cn {
        let cw = TILE_C.min(cn - c);
        let mut r = 0;
        while r < m {
            let rh = TILE_R.min(m - r);
            tile(kernel, w, a, r, rh, c0 + c, cw, out);
            r += rh;
        }
        c += cw;
    }
}

/// One tile of `rh` rows from `r0` and `cw` columns from `c0`.
#[allow(clippy::too_many_arguments)]
fn tile(
    kernel: Q8Kernel,
    w: &Q8Rows,
    a: &Q8Rows,
    r0: usize,
    rh: usize,
    c0: usize,
    cw: usize,
    out: &Out,
) {
    macro_rules! dispatch {
        ($f:ident) => {
            match (rh, cw) {
                (4, 4) => $f::<4, 4>(w, a, r0, c0, out),
                (4, 3) => $f::<4, 3>(w, a, r0, c0, out),
                (4, 2) => $f::<4, 2>(w, a, r0, c0, out),
                (4, 1) => $f::<4, 1>(w, a, r0, c0, out),
                (3, 4) => $f::<3, 4>(w, a, r0, c0, out),
                (3, 3) => $f::<3, 3>(w, a, r0, c0, out),
                (3, 2) => $f::<3, 2>(w, a, r0, c0, out),
                (3, 1) => $f::<3, 1>(w, a, r0, c0, out),
                (2, 4) => $f::<2, 4>(w, a, r0, c0, out),
                (2, 3) => $f::<2, 3>(w, a, r0, c0, out),
                (2, 2) => $f::<2, 2>(w, a, r0, c0, out),
                (2, 1) => $f::<2, 1>(w, a, r0, c0, out),
                (1, 4) => $f::<1, 4>(w, a, r0, c0, out),
                (1, 3) => $f::<1, 3>(w, a, r0, c0, out),
                (1, 2) => $f::<1, 2>(w, a, r0, c0, out),
                _ => $f::<1, 1>(w, a, r0, c0, out),
            }
        };
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Q8Kernel::Avx512Vnni => {
            // SAFETY: `matmul_t_with` admits this kernel only where `Q8Kernel::available`
            // found AVX-512 F, BW and VNNI on this CPU, the features the function enables.
            // The tile's rows and columns are in bounds and owned by this task (`columns`).
            unsafe { dispatch!(tile_vnni) }
        }
        #[cfg(target_arch = "x86_64")]
        Q8Kernel::Avx2 => {
            // SAFETY: admitted only where this CPU has AVX2 and FMA (see above).
            unsafe { dispatch!(tile_avx2) }
        }
        _ => {
            for r in r0..r0 + rh {
                for c in c0..c0 + cw {
                    // SAFETY: r < a.rows and c < w.rows, and this task owns column c.
                    unsafe { out.set(r, c, dot_scalar(w, c, a, r)) };
                }
            }
        }
    }
}

/// Two scales `[d0, d1]` at `p` spread to lanes 0–7 and 8–15.
///
/// # Safety
/// AVX-512 F; `p` and `p + 1` are readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scale2(p: *const f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    // SAFETY: the caller guarantees 8 readable bytes at `p` (unaligned loads are allowed).
    let v = unsafe { _mm_castsi128_ps(_mm_loadl_epi64(p.cast())) };
    _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(v))
}

/// The AVX-512 VNNI tile. `vpdpbusd` multiplies unsigned by signed bytes, so the activations
/// go in offset by 128 (`x ^ 0x80` is `x + 128` as an unsigned byte) and each column's
/// `128 · Σ w` (one `vpdpbusd` of 128s against the weights, shared by the tile's rows) starts
/// the accumulation negated: every lane then holds an exact integer partial sum of its block.
/// A 64-byte register holds two blocks: lanes 0–7 the first, 8–15 the second, and the scale
/// vectors carry each block's scale in its eight lanes. An odd last block is loaded masked
/// (the upper half zero, its scale 0).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `r0 + R <= a.rows`, `c0 + C <= w.rows`,
/// `a.cols == w.cols`, `out` is `a.rows × w.rows` and no other task writes the tile's elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // tile indices name registers: clearer than iterators
unsafe fn tile_vnni<const R: usize, const C: usize>(
    w: &Q8Rows,
    a: &Q8Rows,
    r0: usize,
    c0: usize,
    out: &Out,
) {
    use std::arch::x86_64::*;
    let (k, kb) = (w.cols, w.blocks());
    debug_assert!(r0 + R <= a.rows && c0 + C <= w.rows && a.cols == k);
    let zero = _mm512_setzero_si512();
    let x80 = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let (wq, wd) = (w.q.as_ptr(), w.d.as_ptr());
    let (aq, ad) = (a.q.as_ptr(), a.d.as_ptr());
    // SAFETY: every pointer below is in bounds: column c0 + j < w.rows and row r0 + i < a.rows (the
    // caller's bounds), each row is k = 2·BLOCK·pairs (+ BLOCK) bytes with kb scales, and
    // `off + 64 <= k` for a pair, `off + 32 <= k` for the masked last block, whose masked load
    // reads only its 32 bytes; the scale indices are blocks < kb of those rows.
    unsafe {
        for p in 0..kb / 2 {
            let off = p * 2 * BLOCK;
            let mut wv = [zero; C];
            let mut neg = [zero; C];
            let mut sw = [_mm512_setzero_ps(); C];
            for j in 0..C {
                wv[j] = _mm512_loadu_si512(wq.add((c0 + j) * k + off).cast());
                neg[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, x80, wv[j]));
                sw[j] = scale2(wd.add((c0 + j) * kb + 2 * p));
            }
            for i in 0..R {
                let au =
                    _mm512_xor_si512(_mm512_loadu_si512(aq.add((r0 + i) * k + off).cast()), x80);
                let sa = scale2(ad.add((r0 + i) * kb + 2 * p));
                for j in 0..C {
                    let t = _mm512_dpbusd_epi32(neg[j], au, wv[j]);
                    acc[i][j] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sa, sw[j]), acc[i][j]);
                }
            }
        }
        // The odd last block repeats the pair loop with masked loads and one scale: folding
        // both into one loop with a mask and a scale branch per pair measured 12 % slower.
        if kb % 2 == 1 {
            let off = (kb - 1) * BLOCK;
            let low: __mmask64 = 0xFFFF_FFFF;
            let mut wv = [zero; C];
            let mut neg = [zero; C];
            let mut sw = [_mm512_setzero_ps(); C];
            for j in 0..C {
                wv[j] = _mm512_maskz_loadu_epi8(low, wq.add((c0 + j) * k + off).cast());
                neg[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, x80, wv[j]));
                sw[j] =
                    _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(*wd.add((c0 + j) * kb + kb - 1)));
            }
            for i in 0..R {
                let au = _mm512_xor_si512(
                    _mm512_maskz_loadu_epi8(low, aq.add((r0 + i) * k + off).cast()),
                    x80,
                );
                let sa =
                    _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(*ad.add((r0 + i) * kb + kb - 1)));
                for j in 0..C {
                    // The upper lanes multiply 128 by zero weights: 0, times scale 0.
                    let t = _mm512_dpbusd_epi32(neg[j], au, wv[j]);
                    acc[i][j] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sa, sw[j]), acc[i][j]);
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            // SAFETY: in bounds and owned by this task (the function's contract).
            unsafe { out.set(r0 + i, c0 + j, _mm512_reduce_add_ps(acc[i][j])) };
        }
    }
}

/// The AVX2 tile: per block, `vpmaddubsw(|w|, x · sign(w))` (|w| ≤ 127 and |x| ≤ 127, so the
/// pair sums stay below 2¹⁵ and never saturate), `vpmaddwd` by ones to 8 exact lanes, then
/// one FMA by the product of the two scales.
///
/// # Safety
/// The CPU must have AVX2 and FMA; bounds as for [`tile_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // tile indices name registers: clearer than iterators
unsafe fn tile_avx2<const R: usize, const C: usize>(
    w: &Q8Rows,
    a: &Q8Rows,
    r0: usize,
    c0: usize,
    out: &Out,
) {
    use std::arch::x86_64::*;
    let (k, kb) = (w.cols, w.blocks());
    debug_assert!(r0 + R <= a.rows && c0 + C <= w.rows && a.cols == k);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let (wq, wd) = (w.q.as_ptr(), w.d.as_ptr());
    let (aq, ad) = (a.q.as_ptr(), a.d.as_ptr());
    // SAFETY: every pointer below is in bounds: column c0 + j < w.rows and row r0 + i < a.rows, each row
    // k bytes with kb scales, off + 32 <= k and b < kb.
    unsafe {
        for b in 0..kb {
            let off = b * BLOCK;
            let mut wv = [_mm256_setzero_si256(); C];
            let mut wabs = [_mm256_setzero_si256(); C];
            let mut dw = [0f32; C];
            for j in 0..C {
                wv[j] = _mm256_loadu_si256(wq.add((c0 + j) * k + off).cast());
                wabs[j] = _mm256_sign_epi8(wv[j], wv[j]);
                dw[j] = *wd.add((c0 + j) * kb + b);
            }
            for i in 0..R {
                let av = _mm256_loadu_si256(aq.add((r0 + i) * k + off).cast());
                let da = *ad.add((r0 + i) * kb + b);
                for j in 0..C {
                    let s = _mm256_sign_epi8(av, wv[j]);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[j], s), ones);
                    acc[i][j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dw[j] * da),
                        acc[i][j],
                    );
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            let v = acc[i][j];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            // SAFETY: in bounds and owned by this task (the function's contract).
            unsafe { out.set(r0 + i, c0 + j, _mm_cvtss_f32(s1)) };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rounding_is_f32_round_half_away_from_zero() {
        let mut vs = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            126.5,
            -126.5,
            127.0001,
            -127.0001,
            0.49999997,
            -0.49999997,
            0.50000006,
            1e-30,
            f32::NAN,
            3e9,
            -3e9,
            1e20,
        ];
        vs.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.0127));
        for v in vs {
            assert_eq!(round_to_i8(v), f32::round(v) as i8, "{v}");
        }
    }

    #[test]
    fn a_block_quantizes_as_candle_does() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        let mut q = [0i8; 32];
        let d = quantize_block(&x, &mut q);
        let amax = 15.5 * 0.37f32;
        assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
        assert_eq!(q[0], -127);
        assert_eq!(q[31], 127);
        let zero = quantize_block(&[0.0; 32], &mut q);
        assert_eq!(zero, 0.0);
        assert!(q.iter().all(|&v| v == 0));
    }
}
