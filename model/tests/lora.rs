//! LoRA adapters: a fresh adapter (B = 0) changes nothing, bit for bit; an adapted model
//! computes what the model with merged weights computes and its adapter gradients are the chain
//! rule through the merged weights' gradient (f64, 1e-9 relative); only adapters train; the
//! PEFT export has PEFT's names, keys and shapes.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use model::candle_core;
use model::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const TOL: f64 = 1e-9;

fn weights(arch: Architecture, dtype: DType) -> (ModelConfig, Weights) {
    let cfg = ModelConfig::tiny(arch, 11, 3);
    let w = Weights::random(&cfg, 5, dtype, &Device::Cpu).unwrap();
    (cfg, w)
}

/// Prompts and completions of different lengths, one group of a single completion.
fn groups() -> Vec<(Vec<u32>, Vec<Vec<u32>>)> {
    vec![
        (
            vec![1, 4, 2],
            vec![vec![7, 3, 9, 0], vec![5], vec![2, 2, 8]],
        ),
        (vec![6], vec![vec![3], vec![10, 1, 1, 4, 9, 2]]),
    ]
}

fn requests(g: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<ScoreRequest<'_>> {
    g.iter()
        .flat_map(|(p, cs)| {
            cs.iter().map(move |c| ScoreRequest {
                prompt: p,
                completion: c,
            })
        })
        .collect()
}

fn segments(g: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<SharedPrompt<'_>> {
    g.iter()
        .map(|(p, cs)| SharedPrompt {
            prompt: p,
            completions: cs.iter().map(Vec::as_slice).collect(),
        })
        .collect()
}

fn padded_logprobs(m: &Decoder, kernels: Kernels) -> CompletionLogProbs {
    let g = groups();
    let plan = LayerPlan::full(m.config().num_layers);
    completion_logprobs(m, &requests(&g), &plan, 0.8, kernels).unwrap()
}

fn packed(m: &Decoder, kernels: Kernels) -> PackedLogProbs {
    let g = groups();
    let plan = LayerPlan::full(m.config().num_layers);
    let layout = PackedLayout::new(&segments(&g), RowLayout::Packed).unwrap();
    packed_logprobs(m, &layout, &plan, 0.8, kernels).unwrap()
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Random non-zero values for every adapter (uniform ±0.5), set in place.
fn randomize_adapters(m: &Decoder, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<(String, Tensor)> = m
        .lora_parameters()
        .into_iter()
        .map(|(n, t)| {
            let data: Vec<f64> = (0..t.elem_count())
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            (n, Tensor::from_vec(data, t.dims(), &Device::Cpu).unwrap())
        })
        .collect();
    m.set_lora_parameters(&values).unwrap();
}

#[test]
fn config_is_validated_with_typed_errors() {
    assert_eq!(LoraConfig::new(0, 16.0).unwrap_err(), LoraError::ZeroRank);
    for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            LoraConfig::new(8, alpha).unwrap_err(),
            LoraError::InvalidAlpha(_)
        ));
    }
    assert_eq!(
        LoraConfig::with_targets(8, 16.0, []).unwrap_err(),
        LoraError::NoTargets
    );
    assert_eq!(
        LoraConfig::parse_targets("q,bogus").unwrap_err(),
        LoraError::UnknownTarget("bogus".into())
    );
    let all = LoraConfig::new(8, 16.0).unwrap();
    assert_eq!(
        all.targets().iter().copied().collect::<Vec<_>>(),
        LoraTarget::ALL.to_vec()
    );
    assert_eq!(all.scale(), 2.0);
    let t = LoraConfig::parse_targets("q_proj, V ,down").unwrap();
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down]
    );
    assert_eq!(LoraConfig::parse_targets("all").unwrap().len(), 7);
    // The decoder-level refusals.
    let (cfg, w) = weights(Architecture::Llama, DType::F32);
    let m = Decoder::new(&cfg, &w, false)
        .unwrap()
        .with_lora(&all, 1)
        .unwrap();
    assert!(matches!(
        m.with_lora(&all, 1).unwrap_err(),
        ModelError::Lora(LoraError::AlreadyAdapted)
    ));
    let q = Decoder::new(&cfg, &w, false)
        .unwrap()
        .quantized(WeightFormat::Q8_0)
        .unwrap();
    assert!(matches!(
        q.with_lora(&all, 1).unwrap_err(),
        ModelError::Lora(LoraError::Quantized(WeightFormat::Q8_0))
    ));
    let plain = Decoder::new(&cfg, &w, false).unwrap();
    assert!(matches!(
        plain.save_peft_adapter(std::path::Path::new("unused"), "base"),
        Err(ModelError::Lora(LoraError::NotAdapted))
    ));
}

#[test]
fn fresh_adapters_leave_logprobs_bit_equal() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (cfg, w) = weights(arch, DType::F32);
        let base = Decoder::new(&cfg, &w, true).unwrap();
        let lora = Decoder::new(&cfg, &w, true)
            .unwrap()
            .with_lora(&LoraConfig::new(4, 8.0).unwrap(), 3)
            .unwrap();
        for kernels in [Kernels::Fused, Kernels::Differentiable, Kernels::Composed] {
            let a = padded_logprobs(&base, kernels).to_vecs().unwrap();
            let b = padded_logprobs(&lora, kernels).to_vecs().unwrap();
            let bits = |v: &Vec<Vec<f32>>| -> Vec<u32> {
                v.iter().flatten().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&a), bits(&b), "{arch:?} {kernels:?} padded");
            let a = packed(&base, kernels).values.to_vec1::<f32>().unwrap();
            let b = packed(&lora, kernels).values.to_vec1::<f32>().unwrap();
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{arch:?} {kernels:?} packed"
            );
        }
    }
}

#[test]
fn initialisation_is_peft_like_and_deterministic() {
    let (cfg, w) = weights(Architecture::Qwen2, DType::F32);
    let build = |targets: &[LoraTarget], seed| {
        Decoder::new(&cfg, &w, false)
            .unwrap()
            .with_lora(
                &LoraConfig::with_targets(4, 8.0, targets.iter().copied()).unwrap(),
                seed,
            )
            .unwrap()
            .lora_parameters()
    };
    let all = build(&LoraTarget::ALL, 9);
    assert_eq!(all.len(), cfg.num_layers * 7 * 2);
    for (name, t) in &all {
        let v = flat_f64(t);
        if name.ends_with("lora_B.weight") {
            assert!(v.iter().all(|&x| x == 0.0), "{name} starts at zero");
        } else {
            // Kaiming-uniform with a = sqrt(5): uniform in ±1/sqrt(in).
            let bound = 1.0 / (t.dim(1).unwrap() as f64).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name} within ±{bound}");
            let spread = v.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(spread > 0.5 * bound, "{name} spans its range ({spread})");
        }
    }
    // Same seed, same values; a module's A does not depend on the other targets.
    let again = build(&LoraTarget::ALL, 9);
    for ((n1, a), (n2, b)) in all.iter().zip(&again) {
        assert_eq!(n1, n2);
        assert_eq!(flat_f64(a), flat_f64(b));
    }
    let only_v = build(&[LoraTarget::V], 9);
    assert_eq!(only_v.len(), cfg.num_layers * 2);
    let of = |set: &[(String, Tensor)], name: &str| {
        flat_f64(&set.iter().find(|(n, _)| n == name).unwrap().1)
    };
    let name = "model.layers.1.self_attn.v_proj.lora_A.weight";
    assert_eq!(of(&all, name), of(&only_v, name));
    let other_seed = build(&LoraTarget::ALL, 10);
    assert_ne!(of(&all, name), of(&other_seed, name));
}

#[test]
fn adapted_forward_equals_merged_weights() {
    let subsets: [&[LoraTarget]; 2] = [&LoraTarget::ALL, &[LoraTarget::Q, LoraTarget::Down]];
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for targets in subsets {
            let (cfg, w) = weights(arch, DType::F64);
            let lora = LoraConfig::with_targets(3, 5.0, targets.iter().copied()).unwrap();
            let m = Decoder::new(&cfg, &w, false)
                .unwrap()
                .with_lora(&lora, 1)
                .unwrap();
            randomize_adapters(&m, 2);
            let merged = m.merged().unwrap();
            assert!(merged.lora().is_none() && merged.vars().is_empty());
            // The merge changes exactly the targeted weights.
            let base = m.named_parameters();
            let mp = m.merged_parameters().unwrap();
            let changed: Vec<&str> = base
                .iter()
                .zip(&mp)
                .filter(|((_, a), (_, b))| flat_f64(a) != flat_f64(b))
                .map(|((n, _), _)| n.as_str())
                .collect();
            assert_eq!(changed.len(), cfg.num_layers * targets.len());
            assert!(changed
                .iter()
                .all(|n| targets.iter().any(|t| n.contains(t.module_path()))));
            // (candle's fused kernels have no f64 CPU path: see the f32 check below.)
            for kernels in [Kernels::Differentiable, Kernels::Composed] {
                let a = flat_f64(&padded_logprobs(&m, kernels).values);
                let b = flat_f64(&padded_logprobs(&merged, kernels).values);
                let r = rel(&a, &b);
                assert!(r < TOL, "{arch:?} {targets:?} {kernels:?} padded: {r:e}");
                let a = flat_f64(&packed(&m, kernels).values);
                let b = flat_f64(&packed(&merged, kernels).values);
                let r = rel(&a, &b);
                assert!(r < TOL, "{arch:?} {targets:?} {kernels:?} packed: {r:e}");
            }
            // The adapters make a difference.
            let base_model = Decoder::new(&cfg, &w, false).unwrap();
            let a = flat_f64(&padded_logprobs(&m, Kernels::Differentiable).values);
            let b = flat_f64(&padded_logprobs(&base_model, Kernels::Differentiable).values);
            assert!(rel(&a, &b) > 1e-3);
        }
    }
}

/// The rollout kernels (f32 only): adapted and merged agree to f32 rounding.
#[test]
fn adapted_forward_equals_merged_weights_fused_f32() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (cfg, w) = weights(arch, DType::F32);
        let m = Decoder::new(&cfg, &w, false)
            .unwrap()
            .with_lora(&LoraConfig::new(3, 5.0).unwrap(), 1)
            .unwrap();
        randomize_adapters(&m, 2);
        let merged = m.merged().unwrap();
        let a = flat_f64(&padded_logprobs(&m, Kernels::Fused).values);
        let b = flat_f64(&padded_logprobs(&merged, Kernels::Fused).values);
        let r = rel(&a, &b);
        // f32 rounding of a different summation order: a few ulps of the largest log-prob.
        assert!(r < 1e-5, "{arch:?} fused padded: {r:e}");
        let a = flat_f64(&packed(&m, Kernels::Fused).values);
        let b = flat_f64(&packed(&merged, Kernels::Fused).values);
        let r = rel(&a, &b);
        assert!(r < 1e-5, "{arch:?} fused packed: {r:e}");
    }
}

/// Σ coef · log π over the padded batch, coefficients fixed per position.
fn loss(m: &Decoder, kernels: Kernels, packed_path: bool) -> Tensor {
    let values = if packed_path {
        packed(m, kernels).values
    } else {
        padded_logprobs(m, kernels).values.flatten_all().unwrap()
    };
    let n = values.elem_count();
    let coef: Vec<f64> = (0..n).map(|i| ((i * 7) % 5) as f64 * 0.4 - 0.9).collect();
    (values.to_dtype(DType::F64).unwrap() * Tensor::from_vec(coef, n, &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn adapter_gradients_follow_the_chain_rule_through_merged_weights() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for (kernels, packed_path) in [
            (Kernels::Differentiable, false),
            (Kernels::Differentiable, true),
            (Kernels::Composed, false),
        ] {
            let (cfg, w) = weights(arch, DType::F64);
            let lora = LoraConfig::new(3, 5.0).unwrap();
            let m = Decoder::new(&cfg, &w, false)
                .unwrap()
                .with_lora(&lora, 1)
                .unwrap();
            randomize_adapters(&m, 4);
            let grads = loss(&m, kernels, packed_path).backward().unwrap();
            // The same loss through a trainable model holding the merged weights.
            let merged_w: HashMap<String, Tensor> =
                m.merged_parameters().unwrap().into_iter().collect();
            let merged = Decoder::new(
                &cfg,
                &Weights::new(merged_w, DType::F64, &Device::Cpu).unwrap(),
                true,
            )
            .unwrap();
            let mgrads = loss(&merged, kernels, packed_path).backward().unwrap();
            let gw: HashMap<&str, &Tensor> = merged
                .vars()
                .iter()
                .map(|(n, v)| (n.as_str(), mgrads.get(v).unwrap()))
                .collect();
            let s = lora.scale();
            let vars: HashMap<&str, &candle_core::Var> =
                m.vars().iter().map(|(n, v)| (n.as_str(), v)).collect();
            for l in 0..cfg.num_layers {
                for t in LoraTarget::ALL {
                    let p = format!("model.layers.{l}.{}", t.module_path());
                    let a = vars[format!("{p}.lora_A.weight").as_str()];
                    let b = vars[format!("{p}.lora_B.weight").as_str()];
                    let g = gw[format!("{p}.weight").as_str()];
                    // W' = W + s·B·A: dL/dB = s · dL/dW' · Aᵀ, dL/dA = s · Bᵀ · dL/dW'.
                    let want_b = (g.matmul(&a.as_tensor().t().unwrap()).unwrap() * s).unwrap();
                    let want_a = (b.as_tensor().t().unwrap().matmul(g).unwrap() * s).unwrap();
                    let got_b = grads.get(b).unwrap();
                    let got_a = grads.get(a).unwrap();
                    let rb = rel(&flat_f64(got_b), &flat_f64(&want_b));
                    let ra = rel(&flat_f64(got_a), &flat_f64(&want_a));
                    assert!(rb < TOL, "{arch:?} {kernels:?} {p} dB: {rb:e}");
                    assert!(ra < TOL, "{arch:?} {kernels:?} {p} dA: {ra:e}");
                }
            }
        }
    }
}

#[test]
fn only_adapters_train_and_the_base_stays_frozen() {
    use candle_nn::Optimizer;
    let (cfg, w) = weights(Architecture::Qwen2, DType::F32);
    // Built trainable first: adding adapters must still freeze every base weight.
    let trainable = Decoder::new(&cfg, &w, true).unwrap();
    let base_vars: Vec<candle_core::Var> =
        trainable.vars().iter().map(|(_, v)| v.clone()).collect();
    let m = trainable
        .with_lora(
            &LoraConfig::with_targets(2, 4.0, [LoraTarget::K, LoraTarget::Up]).unwrap(),
            0,
        )
        .unwrap();
    assert_eq!(m.vars().len(), cfg.num_layers * 2 * 2);
    assert!(m
        .vars()
        .iter()
        .all(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B.")));
    let names: Vec<String> = m.lora_parameters().into_iter().map(|(n, _)| n).collect();
    let var_names: Vec<String> = m.vars().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, var_names);
    let grads = loss(&m, Kernels::Differentiable, false).backward().unwrap();
    // Every adapter gets a gradient; the Vars the model was built with get none, and with the
    // differentiable kernels no base weight the forward pass reads gets one computed either
    // (`named_parameters` are those very tensors).
    for (name, v) in m.vars() {
        assert!(grads.get(v).is_some(), "{name} must get a gradient");
    }
    assert!(base_vars.iter().all(|v| grads.get(v).is_none()));
    for (name, t) in m.named_parameters() {
        assert!(grads.get(&t).is_none(), "{name} must get no gradient");
    }
    let before: Vec<Vec<f64>> = m
        .named_parameters()
        .iter()
        .map(|(_, t)| flat_f64(t))
        .collect();
    let before_logp = flat_f64(&padded_logprobs(&m, Kernels::Fused).values);
    let vars: Vec<candle_core::Var> = m.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = candle_nn::AdamW::new_lr(vars, 1e-2).unwrap();
    opt.step(&grads).unwrap();
    let after: Vec<Vec<f64>> = m
        .named_parameters()
        .iter()
        .map(|(_, t)| flat_f64(t))
        .collect();
    assert_eq!(before, after, "base weights unchanged by the step");
    let base_after: Vec<Vec<f64>> = base_vars.iter().map(|v| flat_f64(v.as_tensor())).collect();
    assert_eq!(
        before, base_after,
        "the old Vars are the same (unchanged) storage"
    );
    let b_moved = m
        .lora_parameters()
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .all(|(_, t)| flat_f64(t).iter().any(|&x| x != 0.0));
    assert!(b_moved, "every B left zero after the step");
    let after_logp = flat_f64(&padded_logprobs(&m, Kernels::Fused).values);
    assert!(
        rel(&after_logp, &before_logp) > 1e-6,
        "the forward sees the update"
    );
}

#[test]
fn set_lora_parameters_checks_names_and_shapes() {
    let (cfg, w) = weights(Architecture::Llama, DType::F32);
    let lora = LoraConfig::with_targets(2, 2.0, [LoraTarget::O]).unwrap();
    let src = Decoder::new(&cfg, &w, false)
        .unwrap()
        .with_lora(&lora, 1)
        .unwrap();
    randomize_adapters(&src, 8);
    let dst = Decoder::new(&cfg, &w, false)
        .unwrap()
        .with_lora(&lora, 2)
        .unwrap();
    let values = src.lora_parameters();
    dst.set_lora_parameters(&values).unwrap();
    for ((_, a), (_, b)) in src.lora_parameters().iter().zip(dst.lora_parameters()) {
        assert_eq!(flat_f64(a), flat_f64(&b));
    }
    let mut missing = values.clone();
    missing.pop();
    assert!(matches!(
        dst.set_lora_parameters(&missing).unwrap_err(),
        ModelError::MissingWeight(_)
    ));
    let mut wrong = values.clone();
    wrong[0].1 = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        dst.set_lora_parameters(&wrong).unwrap_err(),
        ModelError::ShapeMismatch { .. }
    ));
    let mut extra = values.clone();
    extra.push((
        "model.layers.0.mlp.up_proj.lora_A.weight".into(),
        values[0].1.clone(),
    ));
    assert!(matches!(
        dst.set_lora_parameters(&extra).unwrap_err(),
        ModelError::InvalidInput(_)
    ));
    // A refused set leaves the adapters as they were.
    for ((_, a), (_, b)) in src.lora_parameters().iter().zip(dst.lora_parameters()) {
        assert_eq!(flat_f64(a), flat_f64(&b));
    }
}

#[test]
fn peft_export_has_peft_names_keys_and_shapes() {
    let (cfg, w) = weights(Architecture::Qwen2, DType::F32);
    let lora = LoraConfig::new(4, 16.0).unwrap();
    let m = Decoder::new(&cfg, &w, false)
        .unwrap()
        .with_lora(&lora, 1)
        .unwrap();
    randomize_adapters(&m, 3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    m.save_peft_adapter(&out, "HuggingFaceTB/SmolLM2-135M-Instruct")
        .unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 16);
    assert_eq!(json["lora_dropout"], 0.0);
    assert_eq!(json["bias"], "none");
    assert_eq!(
        json["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(
        json["target_modules"],
        serde_json::json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );

    let tensors =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(tensors.len(), cfg.num_layers * 7 * 2);
    let (h, i, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let q = cfg.num_heads * cfg.head_dim;
    let ours: HashMap<String, Tensor> = m.lora_parameters().into_iter().collect();
    for l in 0..cfg.num_layers {
        // (module, in, out)
        for (module, inp, out) in [
            ("self_attn.q_proj", h, q),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", q, h),
            ("mlp.gate_proj", h, i),
            ("mlp.up_proj", h, i),
            ("mlp.down_proj", i, h),
        ] {
            let a = format!("base_model.model.model.layers.{l}.{module}.lora_A.weight");
            let b = format!("base_model.model.model.layers.{l}.{module}.lora_B.weight");
            assert_eq!(tensors[&a].dims(), [4, inp], "{a}");
            assert_eq!(tensors[&b].dims(), [out, 4], "{b}");
            let own = format!("model.layers.{l}.{module}.lora_B.weight");
            assert_eq!(flat_f64(&tensors[&b]), flat_f64(&ours[&own]));
        }
    }
}

#[test]
fn frozen_linear_gives_the_matmul_value_and_input_gradient_only() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut rand_t = |shape: (usize, usize)| {
        let data: Vec<f64> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    let x = candle_core::Var::from_tensor(&rand_t((5, 4))).unwrap();
    let w = rand_t((3, 4));
    let c = rand_t((5, 3));
    let frozen = ops::frozen_linear(x.as_tensor(), &w).unwrap();
    let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    assert_eq!(flat_f64(&frozen), flat_f64(&plain));
    let g_frozen = (frozen * &c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_plain = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let r = rel(
        &flat_f64(g_frozen.get(&x).unwrap()),
        &flat_f64(g_plain.get(&x).unwrap()),
    );
    assert!(r < 1e-15, "dx: {r:e}");
    // candle's matmul also computes a gradient for the weight's (transposed) view; the frozen
    // op computes none (both stores also hold x and the coefficients c).
    assert_eq!(g_plain.get_ids().count(), 3);
    assert_eq!(g_frozen.get_ids().count(), 2);
}

#[test]
fn a_quantized_copy_keeps_the_live_adapters() {
    let (cfg, w) = weights(Architecture::Llama, DType::F32);
    let m = Decoder::new(&cfg, &w, false)
        .unwrap()
        .with_lora(&LoraConfig::new(2, 4.0).unwrap(), 1)
        .unwrap();
    let q = m.quantized(WeightFormat::F32).unwrap();
    assert_eq!(q.lora(), m.lora());
    assert!(q.vars().is_empty());
    let before = flat_f64(&padded_logprobs(&q, Kernels::Fused).values);
    randomize_adapters(&m, 5);
    // The copy shares the adapters' storage: it sees the update, and computes what the
    // adapted model computes.
    let after = flat_f64(&padded_logprobs(&q, Kernels::Fused).values);
    let own = flat_f64(&padded_logprobs(&m, Kernels::Fused).values);
    assert!(rel(&after, &before) > 1e-3);
    assert_eq!(after, own);
}
