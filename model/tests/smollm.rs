//! Acceptance tests on the real SmolLM2-135M-Instruct weights.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, smollm, smollm_path};
use model::candle_core;
use model::*;

fn prompt_ids() -> Vec<u32> {
    let m = smollm();
    let text = m
        .tokenizer
        .apply_chat_template(
            &[ChatMessage::new(
                "user",
                "What is 17 * 23? Think step by step.",
            )],
            true,
        )
        .unwrap();
    m.tokenizer.encode(&text, false).unwrap()
}

fn full(m: &LoadedModel) -> LayerPlan {
    LayerPlan::full(m.decoder.config().num_layers)
}

#[test]
fn config_matches_smollm2() {
    let c = smollm().decoder.config();
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size
        ),
        (30, 576, 9, 3, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.num_parameters(), 134_515_008);
}

#[test]
fn full_plan_logits_match_candle_transformers_llama() {
    use candle_transformers::models::llama as reference;
    let m = smollm();
    let (cfg, weights, _) = load_gguf(&smollm_path(), &LoadOptions::default()).unwrap();
    let (reference, ref_cfg) = common::reference_llama(&cfg, weights);
    let mut cache = reference::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu).unwrap();
    let ids = prompt_ids();
    let x = common::row(&ids);
    let expected = reference.forward(&x, 0, &mut cache).unwrap(); // (1, vocab), last position
    let mut ctx = ForwardCtx::new(full(m));
    let ours = m.decoder.forward(&x, &mut ctx).unwrap();
    let ours = ours.i((.., ids.len() - 1, ..)).unwrap();
    let d = max_abs_diff(&ours, &expected);
    let scale = expected
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()[0][0];
    assert!(
        scale > 5.0,
        "logits of order 20 expected, max |logit| = {scale}"
    );
    eprintln!("parity: max |Δ logits| = {d:e}, max |logit| = {scale}");
    assert!(d <= 1e-3, "max |Δ logits| = {d}");
}

#[test]
fn greedy_with_cache_equals_recompute() {
    let m = smollm();
    let ids = prompt_ids();
    let cfg = GenerationConfig {
        sampling: Sampling::Greedy,
        max_new_tokens: 12,
        ..Default::default()
    };
    let out = generate(&m.decoder, std::slice::from_ref(&ids), &full(m), &cfg, None).unwrap();
    let cached = &out.completions[0].tokens;
    let mut seq = ids.clone();
    for _ in 0..12 {
        let x = common::row(&seq);
        let logits = m
            .decoder
            .forward(&x, &mut ForwardCtx::new(full(m)))
            .unwrap();
        let next = logits
            .i((0, seq.len() - 1))
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(next);
    }
    assert_eq!(cached.as_slice(), &seq[ids.len()..]);
}

#[test]
fn recorded_logprobs_equal_recomputed_and_padding_does_not_change_them() {
    let m = smollm();
    let tok = &m.tokenizer;
    let long = prompt_ids();
    let short = tok.encode("The capital of France is", false).unwrap();
    let plans = [
        full(m),
        LayerPlan::skipping(&[3, 8, 12, 20, 25], 30).unwrap(),
    ];
    for (seed, plan) in (1..).zip(plans) {
        let cfg = GenerationConfig {
            sampling: Sampling::temperature(0.8),
            max_new_tokens: 10,
            group_size: 2,
            seed,
            eos_token_ids: tok.eos_token_ids().to_vec(),
            stop_strings: vec![],
        };
        // Two prompts of different lengths: the short one is left-padded in generation.
        let prompts = vec![long.clone(), short.clone()];
        let out = generate(&m.decoder, &prompts, &plan, &cfg, None).unwrap();
        assert_eq!(out.completions.len(), 4);
        let reqs: Vec<ScoreRequest> = out
            .completions
            .iter()
            .map(|c| ScoreRequest {
                prompt: &prompts[c.prompt_index],
                completion: &c.tokens,
            })
            .collect();
        let batched = completion_logprobs(&m.decoder, &reqs, &plan, 0.8, Kernels::Fused).unwrap();
        let batched = batched.to_vecs().unwrap();
        for (c, lp) in out.completions.iter().zip(&batched) {
            for (a, b) in c.logprobs.iter().zip(lp) {
                assert!((a - b).abs() <= 2e-4, "recorded {a} vs batched {b}");
            }
            // Alone (no padding at all) gives the same numbers.
            let alone = completion_logprobs(
                &m.decoder,
                &[ScoreRequest {
                    prompt: &prompts[c.prompt_index],
                    completion: &c.tokens,
                }],
                &plan,
                0.8,
                Kernels::Differentiable,
            )
            .unwrap()
            .to_vecs()
            .unwrap();
            for (a, b) in alone[0].iter().zip(lp) {
                assert!((a - b).abs() <= 2e-4, "alone {a} vs padded {b}");
            }
        }
    }
}

#[test]
fn nested_plan_runs_fewer_layers_and_changes_logits() {
    let m = smollm();
    let ids = prompt_ids();
    let x = common::row(&ids);
    let mut ctx_full = ForwardCtx::new(full(m));
    let full_logits = m.decoder.forward(&x, &mut ctx_full).unwrap();
    assert_eq!(ctx_full.layers_run(), 30);
    let mut sampler = PlanSampler::new(
        PlanSpec::Nested {
            ratio: SkipRatio::Fixed(0.25),
            strategy: PlanStrategy::Random,
        },
        30,
        3,
    )
    .unwrap();
    let plan = sampler.next_plan().unwrap();
    assert_eq!(plan.len(), 30 - 8);
    let mut ctx = ForwardCtx::new(plan);
    let nested = m.decoder.forward(&x, &mut ctx).unwrap();
    assert_eq!(ctx.layers_run(), 22);
    assert!(max_abs_diff(&nested, &full_logits) > 0.1);

    // Skip ratio 0 is the full plan, bit for bit.
    let mut zero = PlanSampler::new(
        PlanSpec::Nested {
            ratio: SkipRatio::Fixed(0.0),
            strategy: PlanStrategy::Contiguous,
        },
        30,
        9,
    )
    .unwrap();
    let mut ctx0 = ForwardCtx::new(zero.next_plan().unwrap());
    let zero_logits = m.decoder.forward(&x, &mut ctx0).unwrap();
    assert_eq!(max_abs_diff(&zero_logits, &full_logits), 0.0);
}

#[test]
fn tokenizer_round_trips_and_splits_digits() {
    let tok = &smollm().tokenizer;
    let text = "Größe 12345 × 3.5 = ₿ 🎉\n  tabs\tand 日本語, x^2 + 1/3";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5, "digits are split one by one: {digits:?}");
    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(chat[0], 1);
    assert_eq!(*chat.last().unwrap(), 2);
    assert!(tok.eos_token_ids().contains(&2));
}

#[test]
fn chat_template_renders_chatml() {
    let tok = &smollm().tokenizer;
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = tok
        .apply_chat_template(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let m = load_model(
        &smollm_path(),
        &LoadOptions {
            trainable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let prompt = m.tokenizer.encode("Question: 2 + 3 =", false).unwrap();
    let completion = m.tokenizer.encode(" 5. The answer is 5", false).unwrap();
    let lp = completion_logprobs(
        &m.decoder,
        &[ScoreRequest {
            prompt: &prompt,
            completion: &completion,
        }],
        &full(&m),
        1.0,
        Kernels::Differentiable,
    )
    .unwrap();
    let loss = lp.values.sum_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let vars = m.decoder.vars();
    assert_eq!(vars.len(), m.decoder.named_parameters().len());
    assert_eq!(vars.len(), 1 + 30 * 9 + 1);
    for (name, var) in vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(norm.is_finite() && norm > 0.0, "{name}: |grad| = {norm}");
    }
}

#[test]
fn hf_directory_round_trip_gives_identical_logits() {
    let m = smollm();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&m.decoder, &m.tokenizer, dir.path()).unwrap();
    let back = load_model(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(back.decoder.config(), m.decoder.config());
    let text = "Round trip: 42 apples.";
    let ids = back.tokenizer.encode(text, false).unwrap();
    assert_eq!(ids, m.tokenizer.encode(text, false).unwrap());
    assert_eq!(back.tokenizer.chat_template(), m.tokenizer.chat_template());
    let x = common::row(&ids);
    let a = m
        .decoder
        .forward(&x, &mut ForwardCtx::new(full(m)))
        .unwrap();
    let b = back
        .decoder
        .forward(&x, &mut ForwardCtx::new(full(m)))
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bad_input_is_a_clear_error() {
    let m = smollm();
    let plan = full(m);
    // Token id outside the vocabulary.
    let err = generate(
        &m.decoder,
        &[vec![1, 60_000]],
        &plan,
        &GenerationConfig::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenOutOfVocab {
                id: 60_000,
                vocab_size: 49152
            }
        ),
        "{err}"
    );
    // Prompt longer than the context.
    let long = vec![5u32; 8190];
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let err = generate(&m.decoder, &[long], &plan, &cfg, None).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                len: 8200,
                max: 8192
            }
        ),
        "{err}"
    );
    // A plan for another depth.
    let err = generate(&m.decoder, &[vec![1]], &LayerPlan::full(12), &cfg, None).unwrap_err();
    assert!(matches!(err, ModelError::InvalidPlan(_)), "{err}");
    // Missing file.
    let err = load_model(
        std::path::Path::new("/nonexistent/model.gguf"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
    // Not a GGUF file.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf at all").unwrap();
    let err = load_model(&junk, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::Malformed { .. }), "{err}");
}

#[test]
fn hf_directory_errors_name_the_problem() {
    let m = smollm();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&m.decoder, &m.tokenizer, dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();

    // Unsupported architecture.
    std::fs::write(&cfg_path, original.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let err = load_model(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture(ref a) if a == "gpt_neox"),
        "{err}"
    );

    // Shape mismatch: the config claims a wider MLP than the weights have.
    std::fs::write(
        &cfg_path,
        original.replace("\"intermediate_size\": 1536", "\"intermediate_size\": 2048"),
    )
    .unwrap();
    let err = load_model(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::ShapeMismatch { ref expected, ref found, .. } if expected == &[2048, 576] && found == &[1536, 576]),
        "{err}"
    );

    // A weight stored with an integer dtype.
    std::fs::write(&cfg_path, &original).unwrap();
    let st = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let good = tensors["model.norm.weight"].clone();
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::zeros(576, DType::U32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let err = load_model(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedDType { ref name, .. } if name == "model.norm.weight"),
        "{err}"
    );
    tensors.insert("model.norm.weight".into(), good);
    candle_core::safetensors::save(&tensors, &st).unwrap();

    // Missing tokenizer.
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_model(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::Io { ref path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
}

#[test]
fn greedy_answer_is_coherent() {
    // A wrong Q/K un-permutation or RoPE layout still matches a reference fed the same weights,
    // but it does not produce sensible text.
    let m = smollm();
    let text = m
        .tokenizer
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.encode(&text, false).unwrap();
    let cfg = GenerationConfig {
        sampling: Sampling::Greedy,
        max_new_tokens: 16,
        eos_token_ids: m.tokenizer.eos_token_ids().to_vec(),
        stop_strings: vec![".".into()],
        ..Default::default()
    };
    let out = generate(&m.decoder, &[ids], &full(m), &cfg, Some(&m.tokenizer)).unwrap();
    let c = &out.completions[0];
    let answer = m.tokenizer.decode(&c.tokens, true).unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
    assert_eq!(c.finish, FinishReason::Stop(".".into()), "{answer:?}");
    assert!(answer.ends_with('.'), "{answer:?}");
}

#[test]
fn sharded_safetensors_directory_loads() {
    let m = smollm();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&m.decoder, &m.tokenizer, dir.path()).unwrap();
    // Re-split the single file into two shards with an index, as large checkpoints ship.
    let single = dir.path().join("model.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut shards = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let back = load_model(dir.path(), &LoadOptions::default()).unwrap();
    let x = Tensor::new(&[[1u32, 504, 3458]], &Device::Cpu).unwrap();
    let a = m
        .decoder
        .forward(&x, &mut ForwardCtx::new(full(m)))
        .unwrap();
    let b = back
        .decoder
        .forward(&x, &mut ForwardCtx::new(full(m)))
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // A shard listed in the index but absent is a clear error.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_model(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ModelError::Io { ref path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{err}"
    );
}

#[test]
fn weight_bridge_round_trips_the_real_weights_exactly() {
    let m = common::smollm();
    let bridge = WeightBridge::new(m.decoder.config(), &m.tokenizer).unwrap();
    // The manifest follows the decoder's own parameter order, names and shapes.
    let params = m.decoder.named_parameters();
    let specs = bridge.manifest().tensors();
    assert_eq!(params.len(), specs.len());
    for ((name, t), spec) in params.iter().zip(specs) {
        assert_eq!(name, &spec.name);
        assert_eq!(t.dims(), spec.shape.as_slice());
    }
    assert_eq!(
        specs.len(),
        m.decoder.config().parameter_specs().len(),
        "one list of parameters"
    );
    let mut slot = vec![0u8; bridge.manifest().total_size()];
    bridge.write(&m.decoder, &mut slot).unwrap();
    let copy = bridge.decoder(&slot, &Device::Cpu).unwrap();
    for ((name, a), (_, b)) in params.iter().zip(copy.named_parameters()) {
        assert_eq!(
            common::max_abs_diff(a, &b),
            0.0,
            "{name} changed in the round trip"
        );
    }
    // A trainable decoder copies out the same bytes.
    let trainable = Decoder::new(
        m.decoder.config(),
        &Weights::new(params.into_iter().collect(), DType::F32, &Device::Cpu).unwrap(),
        true,
    )
    .unwrap();
    let mut slot2 = vec![1u8; slot.len()];
    bridge.write(&trainable, &mut slot2).unwrap();
    assert!(
        slot == slot2,
        "trainable and frozen decoders publish the same bytes"
    );
    // A different configuration gives a different model hash and manifest.
    let mut cfg = m.decoder.config().clone();
    cfg.rope_theta *= 2.0;
    let other = WeightBridge::new(&cfg, &m.tokenizer).unwrap();
    assert_ne!(other.model_hash(), bridge.model_hash());
    let mut cfg = m.decoder.config().clone();
    cfg.num_layers -= 1;
    let other = WeightBridge::new(&cfg, &m.tokenizer).unwrap();
    assert_ne!(other.manifest().hash(), bridge.manifest().hash());
    // A slot of the wrong size is an error, not a panic.
    assert!(bridge.write(&m.decoder, &mut slot[1..]).is_err());
    assert!(bridge.read(&slot[1..], &Device::Cpu).is_err());
}

/// A fresh f32 copy of the real model (the shared one cannot be adapted: `with_lora` takes it).
fn fresh(m: &LoadedModel) -> Decoder {
    let w = Weights::new(
        m.decoder.named_parameters().into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    Decoder::new(m.decoder.config(), &w, false).unwrap()
}

#[test]
fn a_lora_bridge_publishes_the_adapters_alone_and_applies_them_exactly() {
    let m = common::smollm();
    let lora = LoraConfig::new(8, 16.0).unwrap();
    let learner = fresh(m).with_lora(&lora, 3).unwrap();
    let bridge = WeightBridge::for_decoder(&learner, &m.tokenizer).unwrap();
    assert_eq!(bridge.lora(), Some(&lora));
    // The manifest is the adapters': 2 tensors for each of 7 modules of 30 layers, r = 8.
    let specs = bridge.manifest().tensors();
    assert_eq!(specs.len(), 2 * 7 * m.decoder.config().num_layers);
    assert_eq!(
        specs[0].name,
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(specs[0].shape, [8, 576]);
    assert_eq!(specs[13].name, "model.layers.0.mlp.down_proj.lora_B.weight");
    assert_eq!(specs[13].shape, [576, 8]);
    let whole = WeightBridge::new(m.decoder.config(), &m.tokenizer).unwrap();
    assert!(
        bridge.manifest().total_size() * 50 < whole.manifest().total_size(),
        "{} adapter bytes against {} for the model",
        bridge.manifest().total_size(),
        whole.manifest().total_size()
    );
    assert_ne!(bridge.model_hash(), whole.model_hash());
    // Move the adapters away from their initialisation (B = 0 publishes nothing telling).
    let moved: Vec<(String, Tensor)> = learner
        .lora_parameters()
        .into_iter()
        .enumerate()
        .map(|(i, (n, t))| {
            let noise = Tensor::randn(0f32, 0.02, t.dims(), &Device::Cpu).unwrap();
            let v = if i % 2 == 1 {
                noise
            } else {
                (t + noise).unwrap()
            };
            (n, v)
        })
        .collect();
    learner.set_lora_parameters(&moved).unwrap();
    let mut slot = vec![0u8; bridge.manifest().total_size()];
    bridge.write(&learner, &mut slot).unwrap();
    // The server: its own base, adapted with another seed, then the published adapters.
    let server = fresh(m).with_lora(&lora, 99).unwrap();
    let server_bridge = WeightBridge::for_decoder(&server, &m.tokenizer).unwrap();
    assert_eq!(server_bridge.model_hash(), bridge.model_hash());
    let tensors = server_bridge.tensors(&slot, &Device::Cpu).unwrap();
    let built = server_bridge
        .apply(tensors, Some(&server), &Device::Cpu)
        .unwrap();
    assert!(built.is_none(), "LoRA sets the adapters in place");
    for ((name, a), (_, b)) in learner
        .lora_parameters()
        .iter()
        .zip(server.lora_parameters())
    {
        assert_eq!(common::max_abs_diff(a, &b), 0.0, "{name}");
    }
    // An 8-bit copy made before the publication follows it (it shares the adapters).
    let x = Tensor::new(&[[1u32, 504, 3458, 28, 9]], &Device::Cpu).unwrap();
    let fwd = |d: &Decoder| d.forward(&x, &mut ForwardCtx::new(full(m))).unwrap();
    assert_eq!(max_abs_diff(&fwd(&learner), &fwd(&server)), 0.0);
    let q_before = fresh(m)
        .with_lora(&lora, 99)
        .unwrap()
        .quantized(WeightFormat::Q8_0)
        .unwrap();
    let late = fresh(m).with_lora(&lora, 99).unwrap();
    let q_shared = late.quantized(WeightFormat::Q8_0).unwrap();
    let before = fwd(&q_shared);
    assert_eq!(max_abs_diff(&before, &fwd(&q_before)), 0.0);
    server_bridge
        .apply(
            server_bridge.tensors(&slot, &Device::Cpu).unwrap(),
            Some(&late),
            &Device::Cpu,
        )
        .unwrap();
    let after = fwd(&q_shared);
    assert!(
        max_abs_diff(&before, &after) > 1e-3,
        "the copy did not follow"
    );
    assert_eq!(
        max_abs_diff(
            &after,
            &fwd(&learner.quantized(WeightFormat::Q8_0).unwrap())
        ),
        0.0
    );

    // Another base (one value changed), another rank, alpha or target set: another hash.
    let mut params: std::collections::HashMap<String, Tensor> =
        m.decoder.named_parameters().into_iter().collect();
    let name = "model.layers.29.mlp.down_proj.weight";
    let w = params[name].flatten_all().unwrap();
    let n = w.dim(0).unwrap();
    let bumped = Tensor::cat(
        &[
            w.narrow(0, 0, n - 1).unwrap(),
            (w.narrow(0, n - 1, 1).unwrap() + 1.0).unwrap(),
        ],
        0,
    )
    .unwrap()
    .reshape(params[name].dims())
    .unwrap();
    params.insert(name.into(), bumped);
    let other_base = Decoder::new(
        m.decoder.config(),
        &Weights::new(params, DType::F32, &Device::Cpu).unwrap(),
        false,
    )
    .unwrap()
    .with_lora(&lora, 3)
    .unwrap();
    let hash = |d: &Decoder| {
        WeightBridge::for_decoder(d, &m.tokenizer)
            .unwrap()
            .model_hash()
            .to_string()
    };
    assert_ne!(hash(&other_base), bridge.model_hash(), "another base");
    for other in [
        LoraConfig::new(4, 16.0).unwrap(),
        LoraConfig::new(8, 8.0).unwrap(),
        LoraConfig::with_targets(8, 16.0, [LoraTarget::Q, LoraTarget::V]).unwrap(),
    ] {
        assert_ne!(
            hash(&fresh(m).with_lora(&other, 3).unwrap()),
            bridge.model_hash(),
            "{other:?}"
        );
    }
    // A decoder whose adapters are not the bridge's is refused, and so is a whole-model read.
    let attn = fresh(m)
        .with_lora(
            &LoraConfig::with_targets(8, 16.0, [LoraTarget::Q]).unwrap(),
            3,
        )
        .unwrap();
    assert!(bridge.write(&attn, &mut slot).is_err());
    assert!(bridge.write(&m.decoder, &mut slot).is_err());
    assert!(bridge.read(&slot, &Device::Cpu).is_err());
    assert!(bridge
        .apply(
            bridge.tensors(&slot, &Device::Cpu).unwrap(),
            Some(&attn),
            &Device::Cpu
        )
        .is_err());
    assert!(bridge
        .apply(
            bridge.tensors(&slot, &Device::Cpu).unwrap(),
            None,
            &Device::Cpu
        )
        .is_err());
}

#[test]
fn q8_behavior_logprobs_stay_within_a_tenth_of_a_nat_of_f32() {
    // The 8-bit behavior scores a GSM8K-style solution within 0.1 nats per token of f32 on
    // average (measured: about 0.05; DESIGN §3), and its per-token KL is far smaller than a
    // single well-chosen skipped layer's (about 0.2 nats, DESIGN §3).
    let m = smollm();
    let q = m.decoder.quantized(WeightFormat::Q8_0).unwrap();
    let prompt = prompt_ids();
    let completion = m
        .tokenizer
        .encode(
            "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391. The answer is 391.",
            false,
        )
        .unwrap();
    let req = [ScoreRequest {
        prompt: &prompt,
        completion: &completion,
    }];
    let score = |d: &Decoder| {
        completion_logprobs(d, &req, &full(m), 1.0, Kernels::Fused)
            .unwrap()
            .to_vecs()
            .unwrap()
            .remove(0)
    };
    let (f, g) = (score(&m.decoder), score(&q));
    let mean_abs: f32 = f.iter().zip(&g).map(|(a, b)| (a - b).abs()).sum::<f32>() / f.len() as f32;
    assert!(
        mean_abs > 0.0 && mean_abs < 0.1,
        "mean |Δ log-prob| {mean_abs}"
    );
    let seq = [model::calibrate::CalibrationSequence {
        prompt: prompt.clone(),
        completion: completion.clone(),
    }];
    let mut probe = model::calibrate::KlProbe::new(&m.decoder, &seq, 1).unwrap();
    let kl_q8 = probe.kl_of(&q, &full(m)).unwrap();
    let kl_skip = probe
        .kl(&LayerPlan::skipping(&[25], 30).unwrap(), false)
        .unwrap();
    assert!(
        kl_q8 > 0.0 && kl_q8 < 0.02,
        "KL of the 8-bit behavior {kl_q8}"
    );
    assert!(
        kl_q8 < kl_skip / 4.0,
        "q8 {kl_q8} vs skipping layer 25 {kl_skip}"
    );
}
