//! Shared prompts and packed rows change the work, not the update: the loss and every
//! parameter's gradient equal those of the unshared padded layout (f64, 1e-9 relative) for
//! every correction, two epochs, the KL term and the consistency term; on the real model in f32
//! within 1e-4.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device};
use common::{flatten, flatten_tensors, record, rel_diff};
use learner::{
    prepare_batch, Correction, Learner, Normalizer, PreparedBatch, TisMode, UpdateConfig,
};
use model::{Architecture, Decoder, LayerPlan, ModelConfig, Weights};
use protocol::RolloutRecord;

const VOCAB: usize = 11;
const LAYERS: usize = 4;

fn tiny_f64(arch: Architecture) -> Decoder {
    tiny_f64_seeded(arch, 9)
}

fn tiny_f64_seeded(arch: Architecture, seed: u64) -> Decoder {
    let cfg = ModelConfig::tiny(arch, VOCAB, LAYERS);
    let w = Weights::random(&cfg, seed, DType::F64, &Device::Cpu).unwrap();
    Decoder::new(&cfg, &w, true).unwrap()
}

/// The four layouts: (prefix_sharing, packing). (false, false) is the unshared padded one.
const LAYOUTS: [(bool, bool); 4] = [(false, false), (true, true), (true, false), (false, true)];

/// Three groups of four completions: prompts of 1, 4 and 6 tokens; completions of length 1
/// next to longer ones; rewards that differ within each group; one uniform group that is not
/// trained on. Behavior log-probs away from the target's, so that every correction weight
/// differs from 1.
fn groups(plan: &[u16]) -> Vec<Vec<RolloutRecord>> {
    let prompts: [&[u32]; 4] = [&[3], &[1, 4, 1, 5], &[9, 2, 6, 5, 3, 5], &[7, 7]];
    let lens = [[1usize, 6, 3, 1], [5, 2, 1, 7], [4, 4, 1, 2], [2, 3, 1, 1]];
    let rewards = [
        [1.0f32, 0.0, 0.5, 0.0],
        [0.0, 1.0, 1.0, 0.2],
        [0.3, 0.0, 1.0, 0.0],
        [1.0; 4],
    ];
    prompts
        .iter()
        .enumerate()
        .map(|(g, prompt)| {
            (0..4)
                .map(|i| {
                    let c: Vec<u32> = (0..lens[g][i])
                        .map(|k| ((5 * g + 3 * i + 2 * k + k * k) % VOCAB) as u32)
                        .collect();
                    let mu: Vec<f32> = (0..c.len())
                        .map(|k| -2.1 - 0.3 * ((g + i + k) % 4) as f32)
                        .collect();
                    let mut r = record(g as u64, prompt, &c, &mu, rewards[g][i], 1.0);
                    r.group_size = 4;
                    r.group_index = i as u32;
                    r.plan = plan.to_vec();
                    r
                })
                .collect()
        })
        .collect()
}

fn config(correction: Correction, (prefix_sharing, packing): (bool, bool)) -> UpdateConfig {
    UpdateConfig {
        correction,
        prefix_sharing,
        packing,
        ..UpdateConfig::default()
    }
}

fn corrections() -> [Correction; 4] {
    [
        Correction::None,
        Correction::SeqIs,
        Correction::Tis {
            cap: 1.5,
            mode: TisMode::Mask,
        },
        Correction::Retrace { lambda: 0.9 },
    ]
}

fn prepared(cfg: &UpdateConfig, plan: &[u16]) -> PreparedBatch {
    prepare_batch(&groups(plan), cfg, LAYERS).unwrap()
}

#[test]
fn every_layout_gives_the_padded_loss_and_gradient_in_f64() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for correction in corrections() {
            for normalizer in [Normalizer::TokenMean, Normalizer::SequenceMean] {
                let mut results = Vec::new();
                for layout in LAYOUTS {
                    let cfg = UpdateConfig {
                        normalizer,
                        ..config(correction, layout)
                    };
                    let b = prepared(&cfg, &[]);
                    assert_eq!(b.uniform_groups, 1);
                    assert_eq!(b.sequences.len(), 12);
                    let l = Learner::new(tiny_f64(arch), None, cfg).unwrap();
                    let g = l.gradient(&b).unwrap();
                    results.push((flatten(&l, &g), g.loss, g.layout));
                }
                let (want, want_loss, padded) = &results[0];
                assert!(want.iter().any(|&x| x != 0.0));
                for ((got, loss, stats), layout) in results.iter().zip(LAYOUTS).skip(1) {
                    let what = format!("{arch:?}, {correction}, {normalizer:?}, {layout:?}");
                    let d = rel_diff(got, want);
                    assert!(d < 1e-9, "{what}: gradient off by {d:e} relative");
                    assert!(
                        (loss - want_loss).abs() <= 1e-9 * want_loss.abs(),
                        "{what}: loss {loss} vs {want_loss}"
                    );
                    assert!(
                        stats.computed_tokens < padded.computed_tokens,
                        "{what}: {stats:?}"
                    );
                    assert_eq!(stats.unshared_padded_tokens, padded.computed_tokens);
                }
            }
        }
    }
}

#[test]
fn two_epochs_a_kl_term_and_a_consistency_term_follow_the_padded_layout() {
    let nested = LayerPlan::skipping(&[2], LAYERS).unwrap().to_record();
    let arch = Architecture::Qwen2;
    for correction in [Correction::SeqIs, Correction::default()] {
        let mut runs = Vec::new();
        for layout in LAYOUTS {
            let cfg = UpdateConfig {
                epochs: 2,
                kl_coef: 0.3,
                consistency_beta: 0.5,
                ..config(correction, layout)
            };
            let b = prepared(&cfg, &nested);
            assert!(b.behavior_plan.as_ref().is_some_and(|p| !p.is_full()));
            // A reference other than the model, so that the KL term has a gradient at once.
            let reference = tiny_f64_seeded(arch, 10);
            let mut l = Learner::new(tiny_f64(arch), Some(reference), cfg).unwrap();
            let before = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
            let g = l.gradient(&b).unwrap();
            assert!(g.kl_loss > 0.0 && g.consistency_loss > 0.0);
            let first = (flatten(&l, &g), g.loss, g.consistency_loss);
            let s = l.step_prepared(&b).unwrap();
            assert_eq!(l.version(), 2, "two optimizer steps");
            let after = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
            let moved: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            runs.push((first, moved, s));
        }
        let ((want_g, want_loss, want_cons), want_moved, want_s) = &runs[0];
        for (((g, loss, cons), moved, s), layout) in runs.iter().zip(LAYOUTS).skip(1) {
            let what = format!("{correction}, {layout:?}");
            let d = rel_diff(g, want_g);
            assert!(d < 1e-9, "{what}: first gradient off by {d:e}");
            assert!((loss - want_loss).abs() <= 1e-9 * want_loss.abs(), "{what}");
            assert!((cons - want_cons).abs() <= 1e-9 * want_cons.abs(), "{what}");
            // The second epoch starts from the first update and clips against π_prox: the
            // weights' movement over both steps must agree as well.
            let d = rel_diff(moved, want_moved);
            assert!(d < 1e-9, "{what}: two-epoch update off by {d:e}");
            assert!(
                (s.kl_ref - want_s.kl_ref).abs() <= 1e-9 * want_s.kl_ref,
                "{what}"
            );
            assert_eq!(s.ppo_clip_frac, want_s.ppo_clip_frac, "{what}");
        }
    }
}

#[test]
fn a_group_over_the_budget_is_split_and_says_so() {
    // The second group's prompt (4) and completions (5 + 2 + 1 + 7) exceed a budget of 12.
    let arch = Architecture::Llama;
    let mut grads = Vec::new();
    for (layout, budget) in [((false, false), 1 << 20), ((true, true), 12)] {
        let cfg = UpdateConfig {
            micro_batch_tokens: budget,
            ..config(Correction::SeqIs, layout)
        };
        let b = prepared(&cfg, &[]);
        let l = Learner::new(tiny_f64(arch), None, cfg).unwrap();
        let g = l.gradient(&b).unwrap();
        if layout.0 {
            assert!(g.layout.split_groups >= 1, "{:?}", g.layout);
            assert!(g.micro_batches > 1);
        }
        grads.push(flatten(&l, &g));
    }
    let d = rel_diff(&grads[1], &grads[0]);
    assert!(d < 1e-9, "split groups: gradient off by {d:e}");
}

#[test]
fn a_batch_of_uniform_groups_trains_nothing_in_any_layout() {
    for layout in LAYOUTS {
        let cfg = config(Correction::default(), layout);
        let mut g = groups(&[]);
        for group in &mut g {
            for r in group.iter_mut() {
                r.reward.value = 0.5;
            }
        }
        let mut l = Learner::new(tiny_f64(Architecture::Llama), None, cfg).unwrap();
        let s = l.step(&g).unwrap();
        assert_eq!(s.skipped.as_deref(), Some("no group had distinct rewards"));
        assert_eq!(l.version(), 0);
        assert_eq!(s.layout.computed_tokens, 0);
    }
}

/// The real default model in f32, two groups of four shaped like the default task (a
/// 55-token prompt, completions of 1 to 64 tokens): packed and shared within 1e-4 of the
/// padded layout.
#[test]
fn the_real_model_gives_the_padded_gradient_in_f32() {
    let path = protocol::assets::cached_default_model().unwrap_or_else(|e| panic!("{e}"));
    let opts = model::LoadOptions {
        trainable: true,
        ..model::LoadOptions::default()
    };
    let loaded = model::load_model(&path, &opts).unwrap();
    let vocab = loaded.decoder.config().vocab_size as u64;
    let token = |k: u64| (k.wrapping_mul(2654435761) % vocab) as u32;
    let mut groups = Vec::new();
    for g in 0..2u64 {
        let prompt: Vec<u32> = (0..55 - 4 * g).map(|k| token(1000 * g + k)).collect();
        let group: Vec<RolloutRecord> = [64usize, 1, 23, 40]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let c: Vec<u32> = (0..n as u64)
                    .map(|k| token(7 + 100 * i as u64 + k))
                    .collect();
                let mu = vec![-3.0f32; n];
                let mut r = record(g, &prompt, &c, &mu, (i % 2) as f32, 0.7);
                r.group_size = 4;
                r.group_index = i as u32;
                r
            })
            .collect();
        groups.push(group);
    }
    let weights = loaded.decoder.named_parameters();
    let mut results = Vec::new();
    for layout in [(false, false), (true, true)] {
        let cfg = UpdateConfig {
            temperature: 0.7,
            ..config(Correction::default(), layout)
        };
        let w = Weights::new(weights.iter().cloned().collect(), DType::F32, &Device::Cpu).unwrap();
        let m = Decoder::new(loaded.decoder.config(), &w, true).unwrap();
        let b = prepare_batch(&groups, &cfg, m.config().num_layers).unwrap();
        let l = Learner::new(m, None, cfg).unwrap();
        let g = l.gradient(&b).unwrap();
        results.push((flatten(&l, &g), g.loss, g.layout));
    }
    let d = rel_diff(&results[1].0, &results[0].0);
    assert!(d < 1e-4, "gradient off by {d:e} relative");
    let (a, b) = (results[1].1, results[0].1);
    assert!((a - b).abs() < 1e-4 * b.abs(), "loss {a} vs {b}");
    let (shared, padded) = (results[1].2, results[0].2);
    assert_eq!(shared.prompt_tokens, 55 + 51);
    assert_eq!(shared.padding_tokens, 0);
    assert!(shared.computed_tokens < padded.computed_tokens);
}
