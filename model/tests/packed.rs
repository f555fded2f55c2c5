//! Packed scoring against the unshared padded batch: the same log-probs and the same
//! gradients (f64, 1e-9 relative), for every layout, kernel set, plan and architecture.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use model::candle_core;
use model::*;

fn tiny(arch: Architecture, dtype: DType) -> Decoder {
    let cfg = ModelConfig::tiny(arch, 11, 3);
    let w = Weights::random(&cfg, 5, dtype, &Device::Cpu).unwrap();
    Decoder::new(&cfg, &w, true).unwrap()
}

/// Two groups with different prompt lengths, completions of lengths 1 to 6 (one of length 1
/// in each group), and a group of a single completion.
fn groups() -> Vec<(Vec<u32>, Vec<Vec<u32>>)> {
    vec![
        (
            vec![1, 4, 2],
            vec![vec![7, 3, 9, 0], vec![5], vec![2, 2, 8]],
        ),
        (vec![6], vec![vec![3], vec![10, 1, 1, 4, 9, 2]]),
        (vec![9, 9, 1, 3, 0], vec![vec![4, 8]]),
    ]
}

fn segments(groups: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<SharedPrompt<'_>> {
    groups
        .iter()
        .map(|(p, cs)| SharedPrompt {
            prompt: p,
            completions: cs.iter().map(Vec::as_slice).collect(),
        })
        .collect()
}

fn requests(groups: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<ScoreRequest<'_>> {
    groups
        .iter()
        .flat_map(|(p, cs)| {
            cs.iter().map(move |c| ScoreRequest {
                prompt: p,
                completion: c,
            })
        })
        .collect()
}

/// Fixed coefficients per completion token (completion order).
fn coefficients(lengths: &[usize]) -> Vec<Vec<f64>> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|t| ((i * 7 + t * 3) % 5) as f64 * 0.4 - 0.9)
                .collect()
        })
        .collect()
}

/// The loss Σ coef · log π and the gradient of every parameter, from the padded path.
fn padded(m: &Decoder, plan: &LayerPlan, kernels: Kernels) -> (Vec<Vec<f64>>, Vec<Tensor>) {
    let g = groups();
    let reqs = requests(&g);
    let lp = completion_logprobs(m, &reqs, plan, 0.8, kernels).unwrap();
    let lens = lp.lengths.clone();
    let t_max = lp.values.dim(1).unwrap();
    let coef = coefficients(&lens);
    let mut flat = vec![0f64; lens.len() * t_max];
    for (i, c) in coef.iter().enumerate() {
        flat[i * t_max..i * t_max + c.len()].copy_from_slice(c);
    }
    let coef_t = Tensor::from_vec(flat, (lens.len(), t_max), &Device::Cpu).unwrap();
    let values = lp.to_vecs().unwrap();
    let loss = (lp.values.to_dtype(DType::F64).unwrap() * coef_t)
        .unwrap()
        .sum_all()
        .unwrap();
    (
        values
            .iter()
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect(),
        grads(m, &loss),
    )
}

fn packed(
    m: &Decoder,
    plan: &LayerPlan,
    kernels: Kernels,
    rows: RowLayout,
) -> (Vec<Vec<f64>>, Vec<Tensor>) {
    let g = groups();
    let layout = PackedLayout::new(&segments(&g), rows).unwrap();
    let lp = packed_logprobs(m, &layout, plan, 0.8, kernels).unwrap();
    let coef: Vec<f64> = coefficients(&lp.lengths).into_iter().flatten().collect();
    let n = coef.len();
    let coef_t = Tensor::from_vec(coef, n, &Device::Cpu).unwrap();
    let loss = (lp.values.to_dtype(DType::F64).unwrap() * coef_t)
        .unwrap()
        .sum_all()
        .unwrap();
    let values = exact_values(&lp);
    (values, grads(m, &loss))
}

fn exact_values(lp: &PackedLogProbs) -> Vec<Vec<f64>> {
    let flat = lp
        .values
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in &lp.lengths {
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    out
}

/// Every parameter's gradient; a parameter the plan skips has none (NaN marks it, so that
/// both paths must agree on which are missing).
fn grads(m: &Decoder, loss: &Tensor) -> Vec<Tensor> {
    let store = loss.backward().unwrap();
    m.vars()
        .iter()
        .map(|(_, v)| match store.get(v) {
            Some(g) => g.clone(),
            None => Tensor::full(f64::NAN, v.shape(), &Device::Cpu).unwrap(),
        })
        .collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let nan = |v: &[f64]| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
    assert_eq!(nan(a), nan(b), "the same parameters have gradients");
    let (a, b): (Vec<f64>, Vec<f64>) = a
        .iter()
        .zip(b)
        .filter(|(x, _)| !x.is_nan())
        .map(|(x, y)| (*x, *y))
        .unzip();
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

#[test]
fn packed_layouts_equal_the_padded_batch_in_f64() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let m = tiny(arch, DType::F64);
        let nested = LayerPlan::skipping(&[1], 3).unwrap();
        let sublayer = LayerPlan::skipping_units(&[Unit::Attn(2)], 3).unwrap();
        for plan in [LayerPlan::full(3), nested, sublayer] {
            for kernels in [Kernels::Differentiable, Kernels::Composed] {
                let (want_v, want_g) = padded(&m, &plan, kernels);
                for rows in [RowLayout::Packed, RowLayout::RowPerSegment] {
                    let what = format!("{arch:?}, {plan:?}, {kernels:?}, {rows:?}");
                    let (v, g) = packed(&m, &plan, kernels, rows);
                    let (v, want): (Vec<f64>, Vec<f64>) = (
                        v.into_iter().flatten().collect(),
                        want_v.iter().flatten().copied().collect(),
                    );
                    // The padded path reports f32 log-probs; compare the tensors' own values.
                    let d = rel(&v, &want);
                    assert!(d < 1e-6, "{what}: log-probs differ by {d:e}");
                    let d = rel(&flat(&g), &flat(&want_g));
                    assert!(d < 1e-9, "{what}: gradients differ by {d:e} relative");
                }
            }
        }
    }
}

#[test]
fn packed_values_equal_the_padded_values_exactly_in_f64() {
    let m = tiny(Architecture::Llama, DType::F64);
    let plan = LayerPlan::full(3);
    let g = groups();
    let reqs = requests(&g);
    // (candle's fused kernels have no f64 form; the fused path is checked in f32 below.)
    for kernels in [Kernels::Differentiable, Kernels::Composed] {
        let lp = completion_logprobs(&m, &reqs, &plan, 1.0, kernels).unwrap();
        let rows = lp
            .values
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let want: Vec<f64> = rows
            .iter()
            .zip(&lp.lengths)
            .flat_map(|(r, &n)| r[..n].to_vec())
            .collect();
        let layout = PackedLayout::new(&segments(&g), RowLayout::Packed).unwrap();
        let got: Vec<f64> =
            exact_values(&packed_logprobs(&m, &layout, &plan, 1.0, kernels).unwrap())
                .into_iter()
                .flatten()
                .collect();
        let d = rel(&got, &want);
        assert!(d < 1e-12, "{kernels:?}: {d:e}");
    }
}

#[test]
fn fused_packed_values_equal_the_fused_padded_values_in_f32() {
    let m = tiny(Architecture::Qwen2, DType::F32);
    let g = groups();
    for plan in [LayerPlan::full(3), LayerPlan::skipping(&[1], 3).unwrap()] {
        let reqs = requests(&g);
        let want: Vec<f64> = completion_logprobs(&m, &reqs, &plan, 0.7, Kernels::Fused)
            .unwrap()
            .to_vecs()
            .unwrap()
            .into_iter()
            .flatten()
            .map(f64::from)
            .collect();
        let layout = PackedLayout::new(&segments(&g), RowLayout::Packed).unwrap();
        let lp = packed_logprobs(&m, &layout, &plan, 0.7, Kernels::Fused).unwrap();
        let got: Vec<f64> = lp
            .to_vecs()
            .unwrap()
            .into_iter()
            .flatten()
            .map(f64::from)
            .collect();
        let d = rel(&got, &want);
        assert!(d < 1e-5, "{plan:?}: {d:e}");
    }
}

#[test]
fn the_layout_counts_what_it_computes() {
    let g = groups();
    let segs = segments(&g);
    let packed = PackedLayout::new(&segs, RowLayout::Packed).unwrap();
    // 3 + 8 prompt/completions, 1 + 7, 5 + 2.
    assert_eq!(packed.real_tokens(), 11 + 8 + 7);
    assert_eq!(packed.computed_tokens(), 26, "one row, no padding");
    assert_eq!(packed.completion_tokens(), 8 + 7 + 2);
    assert_eq!(packed.lengths(), &[4, 1, 3, 1, 6, 2]);
    assert_eq!(packed.rows(), 1);
    let rows = PackedLayout::new(&segs, RowLayout::RowPerSegment).unwrap();
    assert_eq!(rows.rows(), 3);
    assert_eq!(
        rows.computed_tokens(),
        3 * 11,
        "rows padded to the longest segment"
    );
    assert_eq!(rows.real_tokens(), 26);
}

#[test]
fn bad_layouts_and_overflows_are_errors() {
    let empty: Vec<SharedPrompt<'_>> = Vec::new();
    assert!(PackedLayout::new(&empty, RowLayout::Packed).is_err());
    let no_prompt = [SharedPrompt {
        prompt: &[],
        completions: vec![&[1u32][..]],
    }];
    let e = PackedLayout::new(&no_prompt, RowLayout::Packed).unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let no_completion = [SharedPrompt {
        prompt: &[1u32][..],
        completions: Vec::new(),
    }];
    let e = PackedLayout::new(&no_completion, RowLayout::Packed).unwrap_err();
    assert!(e.to_string().contains("no completion"), "{e}");

    let m = tiny(Architecture::Llama, DType::F32);
    let plan = LayerPlan::full(3);
    // A row longer than the context window is fine when every sequence in it fits (64).
    let long: Vec<u32> = (0..40).map(|i| i % 11).collect();
    let segs: Vec<SharedPrompt<'_>> = (0..3)
        .map(|_| SharedPrompt {
            prompt: &long[..10],
            completions: vec![&long[10..]],
        })
        .collect();
    let layout = PackedLayout::new(&segs, RowLayout::Packed).unwrap();
    assert_eq!(layout.computed_tokens(), 120);
    packed_logprobs(&m, &layout, &plan, 1.0, Kernels::Differentiable).unwrap();
    // One sequence of 70 positions does not.
    let too_long: Vec<u32> = (0..70).map(|i| i % 11).collect();
    let segs = [SharedPrompt {
        prompt: &too_long[..5],
        completions: vec![&too_long[5..]],
    }];
    let layout = PackedLayout::new(&segs, RowLayout::Packed).unwrap();
    let e = packed_logprobs(&m, &layout, &plan, 1.0, Kernels::Differentiable).unwrap_err();
    assert!(
        matches!(e, ModelError::ContextOverflow { len: 70, max: 64 }),
        "{e}"
    );
    // Out-of-vocabulary tokens and bad temperatures.
    let segs = [SharedPrompt {
        prompt: &[1u32][..],
        completions: vec![&[99u32][..]],
    }];
    let layout = PackedLayout::new(&segs, RowLayout::Packed).unwrap();
    let e = packed_logprobs(&m, &layout, &plan, 1.0, Kernels::Fused).unwrap_err();
    assert!(
        matches!(e, ModelError::TokenOutOfVocab { id: 99, .. }),
        "{e}"
    );
    let segs = [SharedPrompt {
        prompt: &[1u32][..],
        completions: vec![&[2u32][..]],
    }];
    let layout = PackedLayout::new(&segs, RowLayout::Packed).unwrap();
    assert!(packed_logprobs(&m, &layout, &plan, 0.0, Kernels::Fused).is_err());
}
