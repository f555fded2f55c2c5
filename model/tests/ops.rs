//! The learner's fused differentiable ops: f64 finite differences, and agreement with the
//! composed candle ops they replace (values and gradients, f32).

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use model::candle_core;
use model::ops;
use rand::{Rng, SeedableRng};

type Op = dyn Fn(&[Tensor]) -> Tensor;

fn random(rng: &mut rand::rngs::StdRng, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Σ op(inputs) · coeffs, with fixed random coefficients shaped like the output.
fn weighted(op: &Op, inputs: &[Tensor], coeffs: &Tensor) -> Tensor {
    (op(inputs) * coeffs).unwrap().sum_all().unwrap()
}

/// Directional derivatives of the op along random directions, analytic vs central
/// differences, for every differentiable input (f64).
fn check_finite_differences(name: &str, op: &Op, inputs: &[Tensor], differentiable: &[bool]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(differentiable)
        .map(|(t, &d)| d.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let current = |vars: &[Option<Var>]| -> Vec<Tensor> {
        vars.iter()
            .zip(inputs)
            .map(|(v, t)| {
                v.as_ref()
                    .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
            })
            .collect()
    };
    let out_shape = op(inputs).dims().to_vec();
    let coeffs = random(&mut rng, &out_shape, 1.0, DType::F64);
    let grads = weighted(op, &current(&vars), &coeffs).backward().unwrap();
    let eps = 1e-6;
    for (i, var) in vars.iter().enumerate() {
        let Some(var) = var else { continue };
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: input {i} has no gradient"));
        for _ in 0..3 {
            let dir = random(&mut rng, var.dims(), 1.0, DType::F64);
            let analytic = scalar(&(g * &dir).unwrap().sum_all().unwrap());
            let base = var.as_tensor().copy().unwrap();
            let at = |s: f64| {
                var.set(&(&base + (&dir * s).unwrap()).unwrap()).unwrap();
                scalar(&weighted(op, &current(&vars), &coeffs))
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&base).unwrap();
            let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-8);
            assert!(analytic.abs() > 1e-8, "{name} input {i}: zero gradient");
            assert!(
                rel < 1e-6,
                "{name} input {i}: analytic {analytic} vs numeric {numeric} (rel {rel})"
            );
        }
    }
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = scalar(
        &(a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap(),
    );
    let m = scalar(&b.abs().unwrap().flatten_all().unwrap().max(0).unwrap());
    d / m.max(1e-30)
}

/// The new op and the composed one agree on values (1e-5 relative) and on the gradients of a
/// weighted sum (1e-4 relative), in f32.
fn check_against_composed(name: &str, new: &Op, old: &Op, inputs: &[Tensor], diff: &[bool]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(diff)
        .map(|(t, &d)| d.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let args: Vec<Tensor> = vars
        .iter()
        .zip(inputs)
        .map(|(v, t)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let (a, b) = (new(&args), old(&args));
    assert_eq!(a.dims(), b.dims(), "{name}: shapes");
    let r = rel_diff(&a, &b);
    assert!(r < 1e-5, "{name}: values differ by {r} relative");
    let coeffs = random(&mut rng, a.dims(), 1.0, DType::F32);
    let ga = (a * &coeffs)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * &coeffs)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, var) in vars.iter().enumerate() {
        let Some(var) = var else { continue };
        let (x, y) = (ga.get(var).unwrap(), gb.get(var).unwrap());
        let r = rel_diff(x, y);
        assert!(
            r < 1e-4,
            "{name} input {i}: gradients differ by {r} relative"
        );
    }
}

fn causal_mask(s: usize, l: usize, dtype: DType) -> Tensor {
    let off = l - s;
    let m: Vec<f32> = (0..s)
        .flat_map(|i| (0..l).map(move |j| if j > off + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (1, 1, 1, s, l), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

struct Case {
    name: &'static str,
    new: Box<Op>,
    old: Box<Op>,
    inputs: fn(&mut rand::rngs::StdRng, DType) -> Vec<Tensor>,
    differentiable: Vec<bool>,
}

/// Segments of a (2, ·, 7, ·) packed batch: row 0 holds a causal segment of 3 and a shared
/// prompt of 2 with two completions of 1 and 1 (positions 3..7); row 1 holds one causal segment
/// at 1..5 between padding.
fn segments(dtype: DType) -> Vec<ops::AttnSegment> {
    let inf = f32::NEG_INFINITY;
    let mask = |len: usize, m: Vec<f32>| {
        Tensor::from_vec(m, (1, 1, 1, len, len), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let tree = vec![
        0.0, inf, inf, inf, //
        0.0, 0.0, inf, inf, //
        0.0, 0.0, 0.0, inf, //
        0.0, 0.0, inf, 0.0,
    ];
    vec![
        ops::AttnSegment {
            row: 0,
            start: 0,
            len: 3,
            mask: causal_mask(3, 3, dtype),
        },
        ops::AttnSegment {
            row: 0,
            start: 3,
            len: 4,
            mask: mask(4, tree),
        },
        ops::AttnSegment {
            row: 1,
            start: 1,
            len: 4,
            mask: causal_mask(4, 4, dtype),
        },
    ]
}

fn cases() -> Vec<Case> {
    let mut out = vec![
        Case {
            name: "rms_norm",
            new: Box::new(|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap()),
            old: Box::new(|t| ops::rms_norm_composed(&t[0], &t[1], 1e-5).unwrap()),
            inputs: |r, d| vec![random(r, &[2, 3, 8], 2.0, d), random(r, &[8], 1.5, d)],
            differentiable: vec![true, true],
        },
        Case {
            name: "masked_softmax (causal mask)",
            new: Box::new(|t| ops::masked_softmax(&t[0], Some(&t[1])).unwrap()),
            old: Box::new(|t| ops::masked_softmax_composed(&t[0], Some(&t[1])).unwrap()),
            inputs: |r, d| vec![random(r, &[2, 3, 2 * 4, 6], 3.0, d), causal_mask(4, 6, d)],
            differentiable: vec![true, false],
        },
        Case {
            name: "masked_softmax (no mask)",
            new: Box::new(|t| ops::masked_softmax(&t[0], None).unwrap()),
            old: Box::new(|t| ops::masked_softmax_composed(&t[0], None).unwrap()),
            inputs: |r, d| vec![random(r, &[1, 2, 3, 5], 3.0, d)],
            differentiable: vec![true],
        },
        Case {
            name: "attention (causal mask, 2 query heads per key head)",
            new: Box::new(|t| ops::attention(&t[0], &t[1], &t[2], Some(&t[3]), 0.4).unwrap()),
            old: Box::new(|t| {
                ops::attention_composed(&t[0], &t[1], &t[2], Some(&t[3]), 0.4).unwrap()
            }),
            inputs: |r, d| {
                vec![
                    random(r, &[2, 3, 2 * 4, 5], 1.5, d),
                    random(r, &[2, 3, 6, 5], 1.5, d),
                    random(r, &[2, 3, 6, 5], 1.5, d),
                    causal_mask(4, 6, d),
                ]
            },
            differentiable: vec![true, true, true, false],
        },
        Case {
            name: "attention (no mask)",
            new: Box::new(|t| ops::attention(&t[0], &t[1], &t[2], None, 0.3).unwrap()),
            old: Box::new(|t| ops::attention_composed(&t[0], &t[1], &t[2], None, 0.3).unwrap()),
            inputs: |r, d| {
                vec![
                    random(r, &[1, 2, 3, 4], 1.5, d),
                    random(r, &[1, 2, 5, 4], 1.5, d),
                    random(r, &[1, 2, 5, 4], 1.5, d),
                ]
            },
            differentiable: vec![true, true, true],
        },
        Case {
            name: "segment attention (3 segments, padding, 2 query heads per key head)",
            new: Box::new(|t| {
                let segs = segments(t[0].dtype());
                ops::segment_attention(&t[0], &t[1], &t[2], &segs, 0.4).unwrap()
            }),
            old: Box::new(|t| {
                let segs = segments(t[0].dtype());
                ops::segment_attention_composed(&t[0], &t[1], &t[2], &segs, 0.4).unwrap()
            }),
            inputs: |r, d| {
                vec![
                    random(r, &[2, 4, 7, 3], 1.5, d),
                    random(r, &[2, 2, 7, 3], 1.5, d),
                    random(r, &[2, 2, 7, 3], 1.5, d),
                ]
            },
            differentiable: vec![true, true, true],
        },
        Case {
            name: "rope (shared positions)",
            new: Box::new(|t| ops::rope(&t[0], &t[1], &t[2]).unwrap()),
            old: Box::new(|t| ops::rope_composed(&t[0], &t[1], &t[2]).unwrap()),
            inputs: |r, d| {
                vec![
                    random(r, &[2, 3, 5, 8], 1.0, d),
                    random(r, &[5, 4], 1.0, d),
                    random(r, &[5, 4], 1.0, d),
                ]
            },
            differentiable: vec![true, false, false],
        },
        Case {
            name: "rope (per-row positions)",
            new: Box::new(|t| ops::rope(&t[0], &t[1], &t[2]).unwrap()),
            old: Box::new(|t| ops::rope_composed(&t[0], &t[1], &t[2]).unwrap()),
            inputs: |r, d| {
                vec![
                    random(r, &[2, 3, 5, 8], 1.0, d),
                    random(r, &[2, 5, 4], 1.0, d),
                    random(r, &[2, 5, 4], 1.0, d),
                ]
            },
            differentiable: vec![true, false, false],
        },
        Case {
            name: "silu_mul",
            new: Box::new(|t| ops::silu_mul(&t[0], &t[1]).unwrap()),
            old: Box::new(|t| ops::silu_mul_composed(&t[0], &t[1]).unwrap()),
            inputs: |r, d| vec![random(r, &[3, 7], 4.0, d), random(r, &[3, 7], 2.0, d)],
            differentiable: vec![true, true],
        },
    ];
    // The LoRA layer: a frozen weight (no gradient) and trained adapters; without the input's
    // gradient too (the first layer, whose input is the frozen embedding).
    for (name, x_trains) in [
        ("frozen_lora_linear", true),
        ("frozen_lora_linear (input not trained)", false),
    ] {
        out.push(Case {
            name,
            new: Box::new(|t| ops::frozen_lora_linear(&t[0], &t[1], &t[2], &t[3], 1.7).unwrap()),
            old: Box::new(|t| {
                let base = t[0].matmul(&t[1].detach().t().unwrap()).unwrap();
                let low = (t[0].matmul(&t[2].t().unwrap()).unwrap() * 1.7).unwrap();
                (base + low.matmul(&t[3].t().unwrap()).unwrap()).unwrap()
            }),
            inputs: |r, d| {
                vec![
                    random(r, &[9, 6], 1.5, d),
                    random(r, &[5, 6], 1.0, d),
                    random(r, &[3, 6], 1.0, d),
                    random(r, &[5, 3], 1.0, d),
                ]
            },
            differentiable: vec![x_trains, false, true, true],
        });
    }
    // The last case: a frozen head (a LoRA base), whose backward computes the hidden states'
    // gradient alone.
    for (temperature, chunks, head_trains) in [
        (1.0, ops::HeadChunks::default(), true),
        (0.7, ops::HeadChunks { rows: 2, vocab: 3 }, true),
        (1.3, ops::HeadChunks { rows: 4, vocab: 16 }, true),
        (0.7, ops::HeadChunks { rows: 3, vocab: 5 }, false),
    ] {
        out.push(Case {
            name: if head_trains {
                "head_logprobs"
            } else {
                "head_logprobs (frozen head)"
            },
            new: Box::new(move |t| {
                ops::head_logprobs_chunked(&t[0], &t[1], &t[2], temperature, chunks).unwrap()
            }),
            old: Box::new(move |t| {
                ops::head_logprobs_composed(&t[0], &t[1], &t[2], temperature).unwrap()
            }),
            inputs: |r, d| {
                // Target 10 twice: the one-hot scatter-add must accumulate.
                let targets = Tensor::new(&[3u32, 0, 10, 7, 10, 1, 2], &Device::Cpu).unwrap();
                vec![
                    random(r, &[7, 6], 1.5, d),
                    random(r, &[11, 6], 1.5, d),
                    targets,
                ]
            },
            differentiable: vec![true, head_trains, false],
        });
    }
    out
}

#[test]
fn fused_ops_match_finite_differences_in_f64() {
    for case in cases() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let inputs = (case.inputs)(&mut rng, DType::F64);
        check_finite_differences(case.name, &*case.new, &inputs, &case.differentiable);
    }
}

#[test]
fn fused_ops_match_the_composed_ops_in_f32() {
    for case in cases() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let inputs = (case.inputs)(&mut rng, DType::F32);
        check_against_composed(
            case.name,
            &*case.new,
            &*case.old,
            &inputs,
            &case.differentiable,
        );
    }
}

#[test]
fn head_logprobs_without_gradient_is_the_plain_value() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let h = random(&mut rng, &[5, 4], 1.0, DType::F32);
    let w = random(&mut rng, &[9, 4], 1.0, DType::F32);
    let t = Tensor::new(&[0u32, 8, 3, 3, 5], &Device::Cpu).unwrap();
    let a = ops::head_logprobs(&h, &w, &t, 0.9).unwrap();
    let b = ops::head_logprobs_composed(&h, &w, &t, 0.9).unwrap();
    assert!(rel_diff(&a, &b) < 1e-6);
    let bad = ops::HeadChunks { rows: 0, vocab: 4 };
    assert!(ops::head_logprobs_chunked(&h, &w, &t, 1.0, bad).is_err());
}

#[test]
fn segment_attention_is_the_plain_attention_of_each_segment() {
    // Each segment alone through the plain (masked) attention, against the packed op.
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let q = random(&mut rng, &[2, 4, 7, 3], 1.5, DType::F64);
    let k = random(&mut rng, &[2, 2, 7, 3], 1.5, DType::F64);
    let v = random(&mut rng, &[2, 2, 7, 3], 1.5, DType::F64);
    let segs = segments(DType::F64);
    let y = ops::segment_attention(&q, &k, &v, &segs, 0.4).unwrap();
    for seg in &segs {
        let part = |t: &Tensor| {
            t.narrow(0, seg.row, 1)
                .unwrap()
                .narrow(2, seg.start, seg.len)
                .unwrap()
        };
        let qs = part(&q)
            .contiguous()
            .unwrap()
            .reshape((1, 2, 2 * seg.len, 3))
            .unwrap();
        let want = ops::attention(&qs, &part(&k), &part(&v), Some(&seg.mask), 0.4)
            .unwrap()
            .reshape((1, 4, seg.len, 3))
            .unwrap();
        assert!(rel_diff(&part(&y), &want) < 1e-14, "{seg:?}");
    }
    // Padding positions (row 1, positions 0, 5, 6) are zero.
    for p in [0, 5, 6] {
        let pad = y.narrow(0, 1, 1).unwrap().narrow(2, p, 1).unwrap();
        assert_eq!(scalar(&pad.abs().unwrap().sum_all().unwrap()), 0.0);
    }
    // Overlapping, unsorted or misfitting segments are refused.
    let mut bad = segments(DType::F64);
    bad.swap(0, 1);
    assert!(ops::segment_attention(&q, &k, &v, &bad, 0.4).is_err());
    let mut bad = segments(DType::F64);
    bad[2].start = 4;
    assert!(ops::segment_attention(&q, &k, &v, &bad, 0.4).is_err());
    let mut bad = segments(DType::F64);
    bad[0].mask = causal_mask(2, 2, DType::F64);
    assert!(ops::segment_attention(&q, &k, &v, &bad, 0.4).is_err());
}
