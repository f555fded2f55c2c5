//! The batched Q8_0 matmul against candle's Q8_0 matmul and candle's f32 matmul, on the default
//! model's layer shapes, at the decode batch sizes, measured in the same run.
//!
//! `cargo bench -p model --bench qgemm`. Env: `QGEMM_ROWS` (default `1,8,32,128`),
//! `QGEMM_REPEATS` (default 20), `RAYON_NUM_THREADS` (the threads of both).

#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use model::candle_core;
use model::qgemm::{Q8Kernel, Q8Matrix};
use std::time::Instant;

/// Median seconds of `repeats` calls of `f`, after one warm-up call.
fn median(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rows: Vec<usize> = std::env::var("QGEMM_ROWS")
        .unwrap_or_else(|_| "1,8,32,128".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let repeats: usize = std::env::var("QGEMM_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, vocabulary 49152.
    let shapes = [
        ("q/o proj", 576, 576),
        ("k/v proj", 192, 576),
        ("gate/up", 1536, 576),
        ("down", 576, 1536),
        ("head", 49152, 576),
    ];
    // Per decode step of the whole model: 30 layers × (q, k, v, o, gate, up, down) + the head.
    let per_step = [
        ("q/o proj", 60),
        ("k/v proj", 60),
        ("gate/up", 60),
        ("down", 30),
        ("head", 1),
    ];
    println!(
        "# kernel {:?}, {} thread(s); median of {repeats}; ms per matmul, ratios against f32 in the same run",
        Q8Kernel::detect(),
        rayon::current_num_threads()
    );
    println!(
        "{:<10} {:>5} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "layer", "rows", "f32 ms", "candle q8", "ours ms", "candle/f32", "ours/f32"
    );
    for &m in &rows {
        let mut step = [0f64; 3];
        for (si, &(name, n, k)) in shapes.iter().enumerate() {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-3)
                .collect();
            let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
            let wtt = wt.t()?;
            let qm = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0)?)?;
            let ours = Q8Matrix::quantize(&w, n, k)?;
            let t_f32 = median(repeats, || {
                xt.matmul(&wtt).unwrap();
            });
            let t_cq = median(repeats, || {
                qm.forward(&xt).unwrap();
            });
            let t_us = median(repeats, || {
                ours.matmul_t(&x, m).unwrap();
            });
            let count = per_step[si].1 as f64;
            step[0] += count * t_f32;
            step[1] += count * t_cq;
            step[2] += count * t_us;
            println!(
                "{name:<10} {m:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.2}x {:>9.2}x",
                1e3 * t_f32,
                1e3 * t_cq,
                1e3 * t_us,
                t_f32 / t_cq,
                t_f32 / t_us
            );
        }
        println!(
            "{:<10} {m:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2}x {:>9.2}x   (all linear layers of one decode step)",
            "model", 1e3 * step[0], 1e3 * step[1], 1e3 * step[2], step[0] / step[1], step[0] / step[2]
        );
    }
    Ok(())
}
