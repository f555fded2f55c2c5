//! Sublayer plans (attention or MLP blocks skipped on their own), re-quantized behavior
//! weights and calibration, on tiny random models.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, Tensor};
use model::calibrate::{calibrate, CalibrateConfig, CalibrateProgress, CalibrationSequence};
use model::candle_core;
use model::*;

fn tiny_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    Weights::random(cfg, seed, DType::F32, &Device::Cpu).unwrap()
}

/// The same weights with one tensor replaced by zeros.
fn zeroed(cfg: &ModelConfig, w: &Weights, name: &str) -> Decoder {
    let mut named: Vec<(String, Tensor)> = Decoder::new(cfg, w, false).unwrap().named_parameters();
    let t = named.iter_mut().find(|(n, _)| n == name).unwrap();
    t.1 = t.1.zeros_like().unwrap();
    Decoder::new(
        cfg,
        &Weights::new(named.into_iter().collect(), DType::F32, &Device::Cpu).unwrap(),
        false,
    )
    .unwrap()
}

fn logits(m: &Decoder, plan: &LayerPlan, ids: &[u32]) -> Tensor {
    m.forward(&common::row(ids), &mut ForwardCtx::new(plan.clone()))
        .unwrap()
}

const IDS: [u32; 7] = [3, 1, 4, 1, 5, 9, 2];

#[test]
fn skipping_nothing_is_the_full_plan_exactly() {
    let cfg = ModelConfig::tiny(Architecture::Llama, 11, 3);
    let m = Decoder::new(&cfg, &tiny_weights(&cfg, 5), false).unwrap();
    let none = LayerPlan::skipping_units(&[], 3).unwrap();
    assert_eq!(none, LayerPlan::full(3));
    assert!(none.is_full());
    let a = logits(&m, &none, &IDS);
    let b = logits(&m, &LayerPlan::full(3), &IDS);
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn a_skipped_block_equals_the_model_with_that_block_zeroed() {
    // Skipping a block removes its residual branch; zeroing the block's output projection makes
    // the branch add exactly 0, so the two must agree to the last bit (x + 0 = x).
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let cfg = ModelConfig::tiny(arch, 11, 3);
        let w = tiny_weights(&cfg, 9);
        let m = Decoder::new(&cfg, &w, false).unwrap();
        for (unit, name) in [
            (Unit::Attn(1), "model.layers.1.self_attn.o_proj.weight"),
            (Unit::Mlp(1), "model.layers.1.mlp.down_proj.weight"),
            (Unit::Attn(0), "model.layers.0.self_attn.o_proj.weight"),
        ] {
            let plan = LayerPlan::skipping_units(&[unit], 3).unwrap();
            assert!(plan.skips_blocks() && !plan.is_full(), "{plan}");
            let got = logits(&m, &plan, &IDS);
            let want = logits(&zeroed(&cfg, &w, name), &LayerPlan::full(3), &IDS);
            assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{arch:?} {unit}");
            let full = logits(&m, &LayerPlan::full(3), &IDS);
            assert!(
                common::max_abs_diff(&got, &full) > 1e-4,
                "the block mattered"
            );
        }
        // Both blocks of a layer skipped is the layer skipped.
        let both = LayerPlan::skipping_units(&[Unit::Attn(1), Unit::Mlp(1)], 3).unwrap();
        assert_eq!(both, LayerPlan::skipping(&[1], 3).unwrap());
    }
}

#[test]
fn cached_decoding_with_a_skipped_attention_block_keeps_no_cache_for_it() {
    let cfg = ModelConfig::tiny(Architecture::Llama, 11, 3);
    let m = Decoder::new(&cfg, &tiny_weights(&cfg, 5), false).unwrap();
    let plan = LayerPlan::skipping_units(&[Unit::Attn(1), Unit::Mlp(2)], 3).unwrap();
    let mut ctx = ForwardCtx::new(plan.clone()).with_cache(16);
    let mut last = m.forward(&common::row(&IDS[..4]), &mut ctx).unwrap();
    for (i, &t) in IDS[4..].iter().enumerate() {
        last = m.forward(&common::row(&[t]), &mut ctx).unwrap();
        let want = logits(&m, &plan, &IDS[..5 + i]);
        let want = want.narrow(1, 4 + i, 1).unwrap();
        assert!(common::max_abs_diff(&last, &want) < 1e-4);
    }
    assert_eq!(last.dims(), [1, 1, 11]);
    assert_eq!(ctx.cached_layers(), vec![0, 2], "layer 1 runs no attention");
}

#[test]
fn behavior_logprobs_match_a_recomputation_under_the_same_sublayer_plan() {
    let cfg = ModelConfig::tiny(Architecture::Qwen2, 11, 4);
    let m = Decoder::new(&cfg, &tiny_weights(&cfg, 21), false).unwrap();
    let plan =
        LayerPlan::skipping_units(&[Unit::Attn(1), Unit::Mlp(2), Unit::Layer(3)], 4).unwrap();
    let gen = GenerationConfig {
        sampling: Sampling::temperature(0.8),
        max_new_tokens: 9,
        group_size: 3,
        seed: 4,
        eos_token_ids: vec![3],
        stop_strings: vec![],
    };
    let prompts = [vec![1u32, 2], vec![4u32, 5, 6, 7, 8]];
    let out = generate(&m, &prompts, &plan, &gen, None).unwrap();
    let reqs: Vec<ScoreRequest> = out
        .completions
        .iter()
        .filter(|c| !c.tokens.is_empty())
        .map(|c| ScoreRequest {
            prompt: &prompts[c.prompt_index],
            completion: &c.tokens,
        })
        .collect();
    let recorded: Vec<&Completion> = out
        .completions
        .iter()
        .filter(|c| !c.tokens.is_empty())
        .collect();
    // Padded: all completions scored in one batch; alone: one at a time.
    let batch = completion_logprobs(&m, &reqs, &plan, 0.8, Kernels::Fused).unwrap();
    let values = batch.values.to_vec2::<f32>().unwrap();
    for (i, (c, req)) in recorded.iter().zip(&reqs).enumerate() {
        let alone = completion_logprobs(&m, std::slice::from_ref(req), &plan, 0.8, Kernels::Fused)
            .unwrap()
            .values
            .to_vec2::<f32>()
            .unwrap();
        for (t, &lp) in c.logprobs.iter().enumerate() {
            assert!((lp - values[i][t]).abs() < 2e-4, "padded {i},{t}");
            assert!((lp - alone[0][t]).abs() < 2e-4, "alone {i},{t}");
        }
    }
}

#[test]
fn a_record_carries_the_sublayer_plan_exactly() {
    let plan =
        LayerPlan::skipping_units(&[Unit::Attn(2), Unit::Layer(4), Unit::Mlp(7)], 9).unwrap();
    let entries = plan.to_record();
    assert_eq!(
        entries,
        vec![
            0,
            1,
            2 | protocol::PLAN_SKIP_ATTN,
            3,
            5,
            6,
            7 | protocol::PLAN_SKIP_MLP,
            8
        ]
    );
    assert_eq!(LayerPlan::from_record(&entries, 9).unwrap(), plan);
    assert_eq!(
        plan.skipped_units(),
        vec![Unit::Layer(4), Unit::Attn(2), Unit::Mlp(7)]
    );
    // Layer plans keep their old encoding: plain indices.
    let old = LayerPlan::skipping(&[3], 5).unwrap();
    assert_eq!(old.to_record(), vec![0, 1, 2, 4]);
    // Serde keeps the blocks; an inconsistent plan is refused.
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), plan);
    let bad = r#"{"layers":[0,1],"num_layers":3,"skip_attn":[2]}"#;
    assert!(serde_json::from_str::<LayerPlan>(bad).is_err());
    // Unit syntax of the command line.
    let units: Vec<Unit> = ["4", "a12", "m0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(units, vec![Unit::Layer(4), Unit::Attn(12), Unit::Mlp(0)]);
    for bad in ["x3", "a", "m-1", ""] {
        assert!(bad.parse::<Unit>().is_err(), "{bad}");
    }
    assert!(LayerPlan::skipping_units(&[Unit::Layer(2), Unit::Attn(2)], 5).is_err());
    assert!(LayerPlan::skipping_units(&[Unit::Mlp(5)], 5).is_err());
}

#[test]
fn cost_ratio_counts_the_weights_a_token_reads() {
    let cfg = ModelConfig::tiny(Architecture::Llama, 11, 3);
    let (h, i, v) = (16usize, 24usize, 11usize);
    let attn = h + 4 * 4 * h + 2 * 2 * 4 * h + 4 * 4 * h;
    let mlp = h + 3 * h * i;
    let full = (3 * (attn + mlp) + h + v * h) as f64;
    assert_eq!(LayerPlan::full(3).cost_ratio(&cfg), 1.0);
    let p = LayerPlan::skipping_units(&[Unit::Attn(0), Unit::Layer(2)], 3).unwrap();
    let want = (full - (attn + attn + mlp) as f64) / full;
    assert!((p.cost_ratio(&cfg) - want).abs() < 1e-12);
}

/// A tiny model whose widths are multiples of the quantization block (32).
fn quantizable() -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        ..ModelConfig::tiny(Architecture::Llama, 64, 3)
    }
}

#[test]
fn requantized_weights_stay_close_and_follow_an_update() {
    let cfg = quantizable();
    let w = tiny_weights(&cfg, 3);
    let m = Decoder::new(&cfg, &w, false).unwrap();
    let q = m.quantized(WeightFormat::Q8_0).unwrap();
    assert_eq!(q.weight_format(), WeightFormat::Q8_0);
    let plan = LayerPlan::full(3);
    let (f, g) = (logits(&m, &plan, &IDS), logits(&q, &plan, &IDS));
    // Q8_0 rounds weights and activations to 8 bits per block of 32: the logits move by a
    // small fraction of their range. Random weights (random norm gains too) amplify the
    // rounding through the layers: measured 0.46 for logits up to 8.1 here. The bound on real
    // weights is in `smollm.rs` (q8_behavior_logprobs_…).
    let drift = common::max_abs_diff(&f, &g);
    let range = f
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        drift > 0.0 && drift < 0.1 * range,
        "q8 drift {drift} for logits up to {range}"
    );

    // An update: a new MLP weight. The rebuilt 8-bit behavior follows it.
    let mut named = m.named_parameters();
    let down = named
        .iter_mut()
        .find(|(n, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    down.1 = (&down.1 * 3.0).unwrap();
    let m2 = Decoder::new(
        &cfg,
        &Weights::new(named.into_iter().collect(), DType::F32, &Device::Cpu).unwrap(),
        false,
    )
    .unwrap();
    let q2 = m2.quantized(WeightFormat::Q8_0).unwrap();
    let (f2, g2) = (logits(&m2, &plan, &IDS), logits(&q2, &plan, &IDS));
    let moved = common::max_abs_diff(&g, &g2);
    let follow = common::max_abs_diff(&f2, &g2);
    // Measured: moved 4.7, follow 0.38 (the rounding drift of the new weights).
    assert!(
        moved > 5.0 * follow,
        "the update moved the 8-bit logits by {moved}, they track f32 within {follow}"
    );
    // Its scored log-probs are those of the sampled distribution (its own head).
    let lp = completion_logprobs(
        &q2,
        &[ScoreRequest {
            prompt: &IDS[..3],
            completion: &IDS[3..],
        }],
        &plan,
        1.0,
        Kernels::Fused,
    )
    .unwrap()
    .values
    .to_vec2::<f32>()
    .unwrap();
    let direct = candle_nn_log_softmax(&g2);
    for (t, &tok) in IDS[3..].iter().enumerate() {
        let want = direct[2 + t][tok as usize];
        assert!(
            (lp[0][t] - want).abs() < 1e-4,
            "{t}: {} vs {want}",
            lp[0][t]
        );
    }
}

fn candle_nn_log_softmax(logits: &Tensor) -> Vec<Vec<f32>> {
    let l = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    l.into_iter()
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter().map(|x| x - m - z.ln()).collect()
        })
        .collect()
}

#[test]
fn calibration_finds_a_planted_cheap_unit_first_and_the_profile_round_trips() {
    let cfg = ModelConfig::tiny(Architecture::Llama, 11, 4);
    let w = tiny_weights(&cfg, 13);
    // Layer 2's attention adds nothing: skipping it costs exactly 0 nats.
    let m = zeroed(&cfg, &w, "model.layers.2.self_attn.o_proj.weight");
    let data: Vec<CalibrationSequence> = (0..5u32)
        .map(|i| CalibrationSequence {
            prompt: vec![1 + i, 2, 3 + i % 3],
            completion: (0..4 + i).map(|t| (t * 7 + i) % 11).collect(),
        })
        .collect();
    let mut seen = Vec::new();
    let cal = CalibrateConfig {
        min_cost_ratio: 0.5,
        batch: 2,
        source: "test".into(),
        ..CalibrateConfig::default()
    };
    let profile = calibrate(&m, "hash-a", &data, &cal, &mut |p| seen.push(p)).unwrap();
    assert_eq!(profile.sets[0].units, vec![Unit::Attn(2)]);
    assert!(profile.sets[0].kl.abs() < 1e-6, "{}", profile.sets[0].kl);
    let single = profile
        .units
        .iter()
        .find(|u| u.unit == Unit::Attn(2))
        .unwrap();
    assert!(single.kl.abs() < 1e-6);
    assert!(profile
        .units
        .iter()
        .filter(|u| u.unit != Unit::Attn(2))
        .all(|u| u.kl > 1e-6));
    // Each set adds one unit; costs fall to the target.
    for pair in profile.sets.windows(2) {
        assert_eq!(pair[1].units[..pair[0].units.len()], pair[0].units[..]);
        assert!(pair[1].cost_ratio < pair[0].cost_ratio);
    }
    let last = profile.sets.last().unwrap();
    assert!(last.cost_ratio <= 0.5 + 1e-12);
    // A set's KL is what a direct evaluation of its plan gives.
    let mut probe = model::calibrate::KlProbe::new(&m, &data, 5).unwrap();
    let direct = probe.kl(&profile.plan(last).unwrap(), false).unwrap();
    assert!(
        (direct - last.kl).abs() < 1e-4 * (1.0 + direct),
        "{direct} vs {}",
        last.kl
    );
    assert_eq!(
        seen.iter()
            .filter(|p| matches!(p, CalibrateProgress::Units { .. }))
            .count(),
        12
    );
    assert_eq!(profile.calibration.tokens, (4..9).sum::<usize>());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    profile.save(&path).unwrap();
    // JSON keeps every field; floats to within the last bit of their shortest printing.
    let back = Profile::load(&path, "hash-a").unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + a.abs());
    assert_eq!(back.sets.len(), profile.sets.len());
    for (a, b) in back.sets.iter().zip(&profile.sets) {
        assert_eq!(a.units, b.units);
        assert!(close(a.kl, b.kl) && close(a.cost_ratio, b.cost_ratio));
    }
    for (a, b) in back.units.iter().zip(&profile.units) {
        assert!(a.unit == b.unit && close(a.kl, b.kl) && close(a.cost, b.cost));
    }
    assert_eq!(
        (&back.model_hash, &back.weights_fingerprint, back.num_layers),
        (
            &profile.model_hash,
            &profile.weights_fingerprint,
            profile.num_layers
        )
    );
    assert_eq!(back.calibration, profile.calibration);
    let err = Profile::load(&path, "hash-b").unwrap_err();
    assert!(matches!(err, ModelError::ProfileMismatch { .. }), "{err}");
    assert!(err.to_string().contains("nested-reft calibrate"), "{err}");
}

#[test]
fn calibrated_plans_are_drawn_near_the_requested_cost_and_change_per_batch() {
    let sets: Vec<SkipSet> = (1..=10)
        .map(|k| SkipSet {
            units: (1..=k).map(Unit::Mlp).collect(),
            kl: 0.01 * k as f64,
            cost_ratio: 1.0 - 0.02 * k as f64,
        })
        .collect();
    let profile = std::sync::Arc::new(Profile {
        format: model::calibrate::PROFILE_FORMAT,
        model_hash: "h".into(),
        num_layers: 12,
        sets,
        ..Profile::default()
    });
    let spec = PlanSpec::Calibrated {
        ratio: SkipRatio::Fixed(0.1),
        profile: profile.clone(),
    };
    let mut s = PlanSampler::new(spec, 12, 3).unwrap();
    let plans: Vec<LayerPlan> = (0..40).map(|_| s.next_plan().unwrap()).collect();
    let cfg_cost = |p: &LayerPlan| p.skipped_mlp().len();
    assert!(
        plans.iter().all(|p| (4..=6).contains(&cfg_cost(p))),
        "near 0.9"
    );
    let distinct: std::collections::HashSet<_> = plans.iter().collect();
    assert_eq!(distinct.len(), 3, "plans change from batch to batch");
    assert!(PlanSampler::new(
        PlanSpec::Calibrated {
            ratio: SkipRatio::Fixed(0.1),
            profile,
        },
        13,
        0
    )
    .is_err());
}

#[test]
fn adaptive_moves_cheaper_when_kl_falls_and_back_when_it_rises() {
    let sets: Vec<SkipSet> = (1..=4)
        .map(|k| SkipSet {
            units: (1..=k).map(Unit::Layer).collect(),
            kl: 0.05 * k as f64,
            cost_ratio: 1.0 - 0.1 * k as f64,
        })
        .collect();
    let profile = std::sync::Arc::new(Profile {
        format: model::calibrate::PROFILE_FORMAT,
        model_hash: "h".into(),
        num_layers: 8,
        sets,
        ..Profile::default()
    });
    let cfg = AdaptiveConfig {
        kl_budget: 0.12,
        smoothing: 1.0,
        headroom: 0.8,
        refresh_every: 5,
    };
    let mut p = AdaptivePolicy::new(cfg, profile).unwrap();
    // Calibrated KLs 0.05, 0.10, 0.15, 0.20: the cheapest under 0.12 is set 2.
    assert_eq!(p.current(), 2);
    assert_eq!(p.plan().unwrap().skipped(), vec![1, 2]);
    // The learner reports a high KL for set 2: back to set 1.
    assert!(p.observe(2, 0.3));
    assert_eq!(p.current(), 1);
    // Set 1 measures low, but set 2's estimate (0.3) is over budget: stay.
    assert!(!p.observe(1, 0.02));
    assert_eq!(p.current(), 1);
    // A late report on a batch of set 2 (generated before the move) says training brought it
    // down: forward to set 2 again.
    assert!(p.observe(2, 0.05));
    assert_eq!(p.current(), 2);
    // Low again, and set 3's calibrated 0.15 is over budget: stay at 2.
    assert!(!p.observe(2, 0.01));
    // A KL just under budget but above the headroom does not move it.
    assert!(!p.observe(2, 0.11));
    assert_eq!(p.current(), 2);
    // Non-finite reports are ignored.
    assert!(!p.observe(2, f64::NAN));
    assert_eq!(p.index_of(&p.plan().unwrap()), Some(2));
    assert_eq!(p.index_of(&LayerPlan::full(8)), Some(0));
    // Every 5th batch refreshes the next cheaper set's estimate.
    let sets: Vec<usize> = (0..10).map(|b| p.set_for_batch(b)).collect();
    assert_eq!(sets, vec![2, 2, 2, 2, 3, 2, 2, 2, 2, 3]);
    // A fresh low measurement of set 3 (training moved the weights) makes it usable.
    p.observe(3, 0.04);
    assert!(p.observe(2, 0.01));
    assert_eq!(p.current(), 3);
}
