//! Tests on tiny random configurations: finite differences (f64), Qwen2 parity against
//! candle-transformers, and fused vs differentiable kernels.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use model::candle_core;
use model::*;
use rand::{Rng, SeedableRng};

fn tiny(arch: Architecture, dtype: DType, trainable: bool) -> Decoder {
    let cfg = ModelConfig::tiny(arch, 11, 3);
    let w = Weights::random(&cfg, 5, dtype, &Device::Cpu).unwrap();
    Decoder::new(&cfg, &w, trainable).unwrap()
}

fn loss(m: &Decoder, coeffs: &Tensor) -> Tensor {
    loss_with(m, coeffs, &LayerPlan::full(3), Kernels::Differentiable)
}

fn loss_with(m: &Decoder, coeffs: &Tensor, plan: &LayerPlan, kernels: Kernels) -> Tensor {
    let (p1, c1) = (vec![1u32, 4, 2], vec![7u32, 3, 9, 0]);
    let (p2, c2) = (vec![5u32], vec![2u32, 2]);
    let lp = completion_logprobs(
        m,
        &[
            ScoreRequest {
                prompt: &p1,
                completion: &c1,
            },
            ScoreRequest {
                prompt: &p2,
                completion: &c2,
            },
        ],
        plan,
        0.9,
        kernels,
    )
    .unwrap();
    (lp.values * coeffs).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let m = tiny(arch, DType::F64, true);
        let coeffs = Tensor::new(
            &[[1.0f64, -0.5, 2.0, 0.3], [0.7, -1.2, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = loss(&m, &coeffs);
        let grads = l.backward().unwrap();
        let names: Vec<&str> = m.vars().iter().map(|(n, _)| n.as_str()).collect();
        let params = m.named_parameters();
        let param_names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names, param_names,
            "vars follow the canonical parameter order"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let eps = 1e-5;
        for (name, var) in m.vars() {
            // Directional derivative along a random direction of this tensor.
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let n = var.elem_count();
            let dir: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let dir = Tensor::from_vec(dir, var.shape(), &Device::Cpu).unwrap();
            let analytic = scalar(&(g * &dir).unwrap().sum_all().unwrap());
            let base = var.as_tensor().copy().unwrap();
            let at = |s: f64| {
                var.set(&(&base + (&dir * s).unwrap()).unwrap()).unwrap();
                scalar(&loss(&m, &coeffs))
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&base).unwrap();
            let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-8);
            assert!(analytic.abs() > 1e-8, "{arch:?} {name}: zero gradient");
            assert!(
                rel < 1e-3,
                "{arch:?} {name}: analytic {analytic} vs numeric {numeric} (rel {rel})"
            );
        }
    }
}

#[test]
fn differentiable_kernels_match_the_composed_reference_in_f32() {
    // Values within 1e-5 relative, every parameter's gradient within 1e-4 relative (max |Δ|
    // over max |g|), for both architectures, full and nested plans.
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let m = tiny(arch, DType::F32, true);
        let coeffs = Tensor::new(
            &[[1.0f32, -0.5, 2.0, 0.3], [0.7, -1.2, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        for plan in [LayerPlan::full(3), LayerPlan::skipping(&[1], 3).unwrap()] {
            let new = loss_with(&m, &coeffs, &plan, Kernels::Differentiable);
            let old = loss_with(&m, &coeffs, &plan, Kernels::Composed);
            let (a, b) = (
                new.to_scalar::<f32>().unwrap(),
                old.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{arch:?}: loss {a} vs composed {b}"
            );
            let (ga, gb) = (new.backward().unwrap(), old.backward().unwrap());
            for (name, var) in m.vars() {
                let skipped = name.starts_with("model.layers.1.");
                match (ga.get(var), gb.get(var)) {
                    (Some(x), Some(y)) => {
                        let d = common::max_abs_diff(x, y);
                        let scale = y.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                        let scale = scale.to_scalar::<f32>().unwrap();
                        assert!(
                            d <= 1e-4 * scale,
                            "{arch:?} {name}: gradients differ by {d} (scale {scale})"
                        );
                    }
                    (None, None) if skipped && plan.len() < 3 => {}
                    (x, y) => panic!(
                        "{arch:?} {name}: gradient present {} vs composed {}",
                        x.is_some(),
                        y.is_some()
                    ),
                }
            }
        }
    }
}

#[test]
fn fused_and_differentiable_kernels_agree() {
    let m = tiny(Architecture::Qwen2, DType::F32, false);
    let x = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let plan = LayerPlan::skipping(&[1], 3).unwrap();
    let a = m.forward(&x, &mut ForwardCtx::new(plan.clone())).unwrap();
    let b = m
        .forward(
            &x,
            &mut ForwardCtx::new(plan).with_kernels(Kernels::Differentiable),
        )
        .unwrap();
    let d = common::max_abs_diff(&a, &b);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn qwen2_logits_match_candle_transformers() {
    use candle_transformers::models::qwen2;
    let cfg = ModelConfig {
        max_position_embeddings: 128,
        ..ModelConfig::tiny(Architecture::Qwen2, 50, 4)
    };
    let weights = Weights::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let ours = Decoder::new(&cfg, &weights, false).unwrap();
    let ref_cfg: qwen2::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "sliding_window": 4096,
        "max_window_layers": 4, "tie_word_embeddings": false, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "use_sliding_window": false, "hidden_act": "silu"
    }))
    .unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_inner(), DType::F32, &Device::Cpu);
    let mut reference = qwen2::ModelForCausalLM::new(&ref_cfg, vb).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 50).collect();
    let x = common::row(&ids);
    let expected = reference.forward(&x, 0).unwrap().i((0, 0)).unwrap();
    let got = ours
        .forward(&x, &mut ForwardCtx::new(LayerPlan::full(4)))
        .unwrap()
        .i((0, 19))
        .unwrap();
    let d = common::max_abs_diff(&got, &expected);
    assert!(d < 1e-4, "max |Δ| = {d}");
}

#[test]
fn cached_decoding_equals_full_forward_with_padding() {
    // Left-padded batched prefill + cached steps equals each sequence run alone without cache.
    let m = tiny(Architecture::Llama, DType::F32, false);
    let plan = LayerPlan::skipping(&[1], 3).unwrap();
    let seqs = [vec![3u32, 1, 4, 1, 5, 9], vec![2u32, 7]];
    let steps = [8u32, 6, 10];
    let width = 6;
    let pads: Vec<usize> = seqs.iter().map(|s| width - s.len()).collect();
    let mut padded = Vec::new();
    for s in &seqs {
        padded.extend(std::iter::repeat_n(0u32, width - s.len()));
        padded.extend(s);
    }
    let mut ctx = ForwardCtx::new(plan.clone())
        .with_cache(16)
        .with_left_padding(pads);
    let x = Tensor::from_vec(padded, (2, width), &Device::Cpu).unwrap();
    let mut last = m.forward(&x, &mut ctx).unwrap().i((.., width - 1)).unwrap();
    let mut full: Vec<Vec<u32>> = seqs.to_vec();
    for &t in &steps {
        for (i, s) in full.iter().enumerate() {
            let alone = common::row(s);
            let want = m
                .forward(&alone, &mut ForwardCtx::new(plan.clone()))
                .unwrap()
                .i((0, s.len() - 1))
                .unwrap();
            let got = last.i(i).unwrap();
            let d = common::max_abs_diff(&got, &want);
            assert!(d < 1e-4, "row {i}, len {}: {d}", s.len());
        }
        for s in &mut full {
            s.push(t);
        }
        let x = Tensor::new(&[[t], [t]], &Device::Cpu).unwrap();
        last = m.forward(&x, &mut ctx).unwrap().i((.., 0)).unwrap();
    }
    // Selecting a row outside the batch is an error, not a panic.
    let err = ctx.select_rows(&[0, 2], &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
}

#[test]
fn a_prompt_generates_the_same_alone_or_padded_in_a_batch_with_early_stops() {
    // Rows end at different steps (token 3 is EOS), so finished rows are dropped from the batch
    // mid-generation; prompt 0 is left-padded next to the longer prompt 1. Each completion has
    // its own RNG stream, so prompt 0's completions must not depend on its neighbours.
    let m = tiny(Architecture::Llama, DType::F32, false);
    let plan = LayerPlan::skipping(&[1], 3).unwrap();
    let cfg = GenerationConfig {
        sampling: Sampling::temperature(1.0),
        max_new_tokens: 12,
        group_size: 4,
        seed: 17,
        eos_token_ids: vec![3],
        stop_strings: vec![],
    };
    let a = vec![1u32, 2];
    let b = vec![4u32, 5, 6, 7, 8];
    let together = generate(&m, &[a.clone(), b], &plan, &cfg, None).unwrap();
    let alone = generate(&m, &[a], &plan, &cfg, None).unwrap();
    let lengths: Vec<usize> = together
        .completions
        .iter()
        .map(|c| c.tokens.len())
        .collect();
    assert!(
        lengths.iter().any(|&n| n < 12) && lengths.iter().any(|&n| n > 1),
        "{lengths:?}"
    );
    for (x, y) in together.completions[..4].iter().zip(&alone.completions) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.finish, y.finish);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        if x.finish == FinishReason::Eos {
            assert_eq!(*x.tokens.last().unwrap(), 3);
        } else {
            assert_eq!(x.tokens.len(), 12);
        }
    }
}

#[test]
fn tokens_drawn_on_the_device_equal_the_host_draws() {
    // The device draw (here on CPU tensors, as on a GPU) takes each row's uniform from the
    // row's own stream and applies the host's inverse-CDF rule, so both sites give the same
    // completions (up to a uniform within f32 rounding of a token boundary: none here), with
    // and without early stops and for greedy decoding.
    let m = tiny(Architecture::Llama, DType::F32, false);
    let plan = LayerPlan::full(3);
    let prompts = [vec![1u32, 2], vec![4u32, 5, 6, 7, 8]];
    for sampling in [
        Sampling::temperature(1.0),
        Sampling::temperature(0.6),
        Sampling::Greedy,
    ] {
        let cfg = GenerationConfig {
            sampling,
            max_new_tokens: 16,
            group_size: 4,
            seed: 23,
            eos_token_ids: vec![3],
            stop_strings: vec![],
        };
        let host = generate_drawing_at(&m, &prompts, &plan, &cfg, None, DrawSite::Host).unwrap();
        let device =
            generate_drawing_at(&m, &prompts, &plan, &cfg, None, DrawSite::Device).unwrap();
        let tokens: usize = host.completions.iter().map(|c| c.tokens.len()).sum();
        assert!(tokens > 40, "{sampling:?}: {tokens} tokens");
        for (h, d) in host.completions.iter().zip(&device.completions) {
            assert_eq!(h.tokens, d.tokens, "{sampling:?}");
            assert_eq!(h.finish, d.finish);
            for (p, q) in h.logprobs.iter().zip(&d.logprobs) {
                assert!((p - q).abs() < 1e-5, "{sampling:?}: {p} vs {q}");
            }
        }
    }
}
