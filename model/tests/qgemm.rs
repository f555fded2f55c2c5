//! The batched Q8_0 matmul against its scalar reference and against candle's Q8_0 path.

#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use model::qgemm::{reference_matmul_t, Q8Kernel, Q8Matrix, Q8Rows, BLOCK};
use model::ModelError;

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `x @ w^T` through candle's Q8_0 quantized matmul.
fn candle_q8_matmul_t(w: Vec<f32>, x: Vec<f32>, m: usize, k: usize, n: usize) -> Vec<f32> {
    let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let qm = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap()).unwrap();
    let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
    qm.forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn kernels() -> Vec<Q8Kernel> {
    [Q8Kernel::Avx512Vnni, Q8Kernel::Avx2, Q8Kernel::Scalar]
        .into_iter()
        .filter(|k| k.available())
        .collect()
}

/// Σ_b |d_w · d_x · dot_b| for every output: the scale the rounding error is measured against.
fn magnitudes(w: &Q8Rows, a: &Q8Rows) -> Vec<f32> {
    let (m, n) = (a.rows(), w.rows());
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let (wq, wd) = (w.row_values(c), w.row_scales(c));
            let (aq, ad) = (a.row_values(r), a.row_scales(r));
            let mut s = 0f32;
            for b in 0..wd.len() {
                let dot: i32 = (0..BLOCK)
                    .map(|i| i32::from(wq[b * BLOCK + i]) * i32::from(aq[b * BLOCK + i]))
                    .sum();
                s += (dot as f32 * wd[b] * ad[b]).abs();
            }
            out[r * n + c] = s;
        }
    }
    out
}

/// Every kernel on this CPU against the scalar reference, within 1e-5 of the terms' magnitude.
fn check(m: usize, k: usize, n: usize, x: &[f32], wv: &[f32]) {
    let w = Q8Matrix::quantize(wv, n, k).unwrap();
    let a = Q8Rows::quantize(x, m, k).unwrap();
    let want = reference_matmul_t(w.weight(), &a);
    let mag = magnitudes(w.weight(), &a);
    for kernel in kernels() {
        let got = w.matmul_t_with(x, m, kernel).unwrap();
        assert_eq!(got.len(), m * n);
        for i in 0..m * n {
            let (g, r) = (got[i], want[i]);
            if !r.is_finite() {
                // A lane of an infinite block scale times a zero partial sum is NaN where the
                // reference's whole-block sum gives ±inf (candle's SIMD path does the same).
                assert!(
                    !g.is_finite(),
                    "{kernel:?} {m}x{k}x{n} [{i}]: {g} where the reference is {r}"
                );
                continue;
            }
            assert!(
                (g - r).abs() <= 1e-5 * mag[i] + f32::MIN_POSITIVE,
                "{kernel:?} {m}x{k}x{n} [{i}]: {g} against {r} (magnitude {})",
                mag[i]
            );
        }
    }
}

#[test]
fn every_kernel_equals_the_scalar_reference_on_odd_shapes() {
    assert!(!kernels().is_empty());
    // Rows and columns not multiples of the 4 × 4 tile, odd and even block counts, batch 1
    // and 33, the default model's widths.
    for (i, &(m, k, n)) in [
        (1, 32, 1),
        (1, 576, 576),
        (2, 96, 7),
        (5, 160, 13),
        (33, 96, 9),
        (33, 576, 37),
        (8, 1536, 20),
        (32, 576, 1536),
    ]
    .iter()
    .enumerate()
    {
        let x = values(m * k, 2 * i as u64, 3.0);
        let w = values(n * k, 2 * i as u64 + 1, 0.1);
        check(m, k, n, &x, &w);
    }
}

#[test]
fn zero_and_extreme_rows_stay_exact_or_finite() {
    let (m, k, n) = (6, 96, 11);
    let mut x = values(m * k, 7, 1.0);
    x[..k].fill(0.0); // an all-zero row
                      // Huge, up to the largest block scale f16 holds (amax / 127 <= 65504); a larger one is
                      // an infinite scale, as in candle (see the non-finite test).
    for v in &mut x[k..2 * k] {
        *v *= 8e6;
    }
    for v in &mut x[2 * k..3 * k] {
        *v *= 1e-30; // tiny: the scales underflow to 0 in f16, the outputs are 0
    }
    x[3 * k] = 8e6; // one huge value beside small ones
    let w = values(n * k, 8, 0.05);
    check(m, k, n, &x, &w);
    let q = Q8Matrix::quantize(&w, n, k).unwrap();
    for kernel in kernels() {
        let y = q.matmul_t_with(&x, m, kernel).unwrap();
        assert!(
            y[..n].iter().all(|&v| v == 0.0),
            "{kernel:?}: {:?}",
            &y[..n]
        );
        assert!(y.iter().all(|v| v.is_finite()), "{kernel:?}: {y:?}");
    }
}

#[test]
fn non_finite_inputs_propagate_as_in_candles_path() {
    let (m, k, n) = (4, 64, 8);
    let mut x = values(m * k, 11, 1.0);
    x[5] = f32::NAN; // row 0, block 0: quantizes to 0, the block's other values stay
    x[k + 40] = f32::INFINITY; // row 1, block 1: the scale is infinite
    x[2 * k + 1] = f32::NEG_INFINITY;
    x[3 * k + 2] = 1e30; // finite, but its block's scale overflows f16
    let w = values(n * k, 12, 0.1);
    check(m, k, n, &x, &w);
    let ours = Q8Matrix::quantize(&w, n, k)
        .unwrap()
        .matmul_t(&x, m)
        .unwrap();
    let theirs = candle_q8_matmul_t(w, x, m, k, n);
    for (i, (&o, &t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            o.is_finite(),
            t.is_finite(),
            "[{i}]: {o} against candle's {t}"
        );
        if t.is_finite() {
            assert!(
                (o - t).abs() <= 1e-4 * t.abs().max(1.0),
                "[{i}]: {o} against {t}"
            );
        }
    }
    // Row 0 (a NaN) is finite; rows 1 and 2 (infinities) are NaN; row 3's block scale is
    // infinite, so its outputs are not finite either.
    assert!(ours[..n].iter().all(|v| v.is_finite()));
    assert!(ours[n..3 * n].iter().all(|v| v.is_nan()));
    assert!(ours[3 * n..].iter().all(|v| !v.is_finite()));
}

#[test]
fn the_weights_quantize_to_candles_q8_0_bytes() {
    let (n, k) = (5, 96);
    let w = values(n * k, 21, 0.2);
    let ours = Q8Matrix::quantize(&w, n, k).unwrap();
    let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let data = QTensor::quantize(&wt, GgmlDType::Q8_0)
        .unwrap()
        .data()
        .unwrap()
        .into_owned();
    let blocks = k / BLOCK;
    assert_eq!(data.len(), n * blocks * (2 + BLOCK));
    for c in 0..n {
        for b in 0..blocks {
            let at = (c * blocks + b) * (2 + BLOCK);
            let d = f16::from_le_bytes([data[at], data[at + 1]]).to_f32();
            assert_eq!(
                ours.weight().row_scales(c)[b],
                d,
                "scale of column {c} block {b}"
            );
            let qs: Vec<i8> = data[at + 2..at + 2 + BLOCK]
                .iter()
                .map(|&v| v as i8)
                .collect();
            assert_eq!(
                &ours.weight().row_values(c)[b * BLOCK..(b + 1) * BLOCK],
                &qs[..]
            );
        }
    }
}

#[test]
fn close_to_candles_quantized_matmul_at_the_training_batch() {
    let (m, k, n) = (32, 576, 64);
    let x = values(m * k, 31, 2.0);
    let w = values(n * k, 32, 0.1);
    let ours = Q8Matrix::quantize(&w, n, k)
        .unwrap()
        .matmul_t(&x, m)
        .unwrap();
    let theirs = candle_q8_matmul_t(w, x, m, k, n);
    let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
    for (o, t) in ours.iter().zip(&theirs) {
        assert!((o - t).abs() <= 1e-5 * scale, "{o} against candle's {t}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let e = Q8Matrix::quantize(&[0.0; 40], 1, 40).unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(_)), "{e}");
    let e = Q8Matrix::quantize(&[0.0; 64], 3, 32).unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(_)), "{e}");
    let q = Q8Matrix::quantize(&[0.5; 64], 2, 32).unwrap();
    let e = q.matmul_t(&[1.0; 33], 1).unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(_)), "{e}");
    assert!(q.matmul_t(&[], 0).unwrap().is_empty());
}
