//! The update on tiny models: micro-batch invariance, both normalisers, non-finite steps and
//! learning a synthetic task with a nested behavior.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::DType;
use common::{flatten, flatten_tensors, record, rel_diff, tiny, tiny_learner};
use learner::{
    Correction, Learner, LearnerError, Normalizer, OptimConfig, PreparedBatch, TisMode,
    TrainSequence, UpdateConfig,
};
use model::{generate, GenerationConfig, LayerPlan, Sampling};
use protocol::RolloutRecord;

/// Sequences of varied prompt and completion lengths, with behavior log-probs away from the
/// target's so that every correction weight differs from 1.
fn varied_batch() -> PreparedBatch {
    let shapes: [(usize, usize); 7] = [(1, 5), (3, 2), (2, 7), (4, 1), (1, 3), (5, 6), (2, 2)];
    let sequences = shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, c))| TrainSequence {
            prompt: (0..p).map(|k| ((i + k) % 11) as u32).collect(),
            completion: (0..c).map(|k| ((3 * i + 2 * k + 1) % 11) as u32).collect(),
            behavior_logprobs: (0..c).map(|k| -2.0 - 0.3 * ((i + k) % 4) as f32).collect(),
            advantage: [1.2, -0.7, 0.4, -1.5, 0.9, 0.1, -0.4][i],
        })
        .collect();
    PreparedBatch {
        sequences,
        ..PreparedBatch::default()
    }
}

#[test]
fn gradient_does_not_depend_on_micro_batch_size() {
    let batch = varied_batch();
    for normalizer in [Normalizer::TokenMean, Normalizer::SequenceMean] {
        let grad_with = |budget: usize| {
            let cfg = UpdateConfig {
                correction: Correction::Tis {
                    cap: 2.0,
                    mode: TisMode::Truncate,
                },
                normalizer,
                micro_batch_tokens: budget,
                ..UpdateConfig::default()
            };
            let l = tiny_learner(11, 3, 9, DType::F32, cfg);
            let g = l.gradient(&batch).unwrap();
            if budget == 1 {
                assert_eq!(
                    g.micro_batches, 7,
                    "a budget below one sequence still packs one each"
                );
            }
            (flatten(&l, &g), g.loss)
        };
        let (whole, loss) = grad_with(1 << 20);
        for budget in [1, 12, 25] {
            let (g, l) = grad_with(budget);
            let d = rel_diff(&g, &whole);
            assert!(
                d < 1e-5,
                "{normalizer:?}, budget {budget}: relative difference {d:e}"
            );
            assert!(
                (l - loss).abs() < 1e-5 * loss.abs().max(1e-3),
                "{l} vs {loss}"
            );
        }
        assert!(whole.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn normalisers_weigh_tokens_as_documented() {
    // Two sequences with advantages +1 and −1 and lengths 1 and 3. Under the token mean each
    // token weighs 1/4; under the sequence mean, 1/2 for the short one and 1/6 for the others.
    // On-policy (ρ = 1), so the loss value is −Σ c·log π with exactly those coefficients.
    let m = tiny(11, 3, 2, DType::F64);
    let seqs = [
        (vec![1u32, 2], vec![4u32], 1.0),
        (vec![3u32], vec![5u32, 6, 7], -1.0),
    ];
    let full = LayerPlan::full(3);
    let reqs: Vec<_> = seqs
        .iter()
        .map(|(p, c, _)| model::ScoreRequest {
            prompt: p,
            completion: c,
        })
        .collect();
    let own = model::completion_logprobs(&m, &reqs, &full, 1.0, model::Kernels::Differentiable)
        .unwrap()
        .to_vecs()
        .unwrap();
    let batch = PreparedBatch {
        sequences: seqs
            .iter()
            .zip(&own)
            .map(|((p, c, a), lp)| TrainSequence {
                prompt: p.clone(),
                completion: c.clone(),
                behavior_logprobs: lp.clone(),
                advantage: *a,
            })
            .collect(),
        ..PreparedBatch::default()
    };
    let lp: Vec<Vec<f64>> = own
        .iter()
        .map(|r| r.iter().map(|&x| f64::from(x)).collect())
        .collect();
    let token_mean = -(lp[0][0] - lp[1].iter().sum::<f64>()) / 4.0;
    let seq_mean = -(lp[0][0] / 2.0 - lp[1].iter().sum::<f64>() / 6.0);
    for (normalizer, want) in [
        (Normalizer::TokenMean, token_mean),
        (Normalizer::SequenceMean, seq_mean),
    ] {
        let cfg = UpdateConfig {
            normalizer,
            ..UpdateConfig::default()
        };
        let l = Learner::new(tiny(11, 3, 2, DType::F64), None, cfg).unwrap();
        let g = l.gradient(&batch).unwrap();
        assert!(
            (g.loss - want).abs() < 1e-9,
            "{normalizer:?}: {} vs {want}",
            g.loss
        );
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let cfg = UpdateConfig {
        max_nonfinite_steps: 2,
        ..UpdateConfig::default()
    };
    let mut l = tiny_learner(11, 3, 4, DType::F32, cfg);
    let before = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
    let mut batch = varied_batch();
    batch.sequences[2].behavior_logprobs[1] = f32::NAN;
    for k in 1..=2 {
        let s = l.step_prepared(&batch).unwrap();
        assert!(
            s.skipped.as_deref().unwrap_or("").contains("non-finite"),
            "{s:?}"
        );
        assert_eq!(l.version(), 0);
        assert_eq!(l.nonfinite_steps(), k);
    }
    let after = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
    assert_eq!(before, after, "a skipped step must not touch the weights");
    let err = l.step_prepared(&batch).unwrap_err();
    assert!(
        matches!(
            err,
            LearnerError::NonFinite {
                streak: 3,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    // A finite step resets the streak.
    let mut l = tiny_learner(
        11,
        3,
        4,
        DType::F32,
        UpdateConfig {
            max_nonfinite_steps: 1,
            ..UpdateConfig::default()
        },
    );
    l.step_prepared(&batch).unwrap();
    let s = l.step_prepared(&varied_batch()).unwrap();
    assert!(s.skipped.is_none() && l.version() == 1, "{s:?}");
    l.step_prepared(&batch).unwrap();
}

#[test]
fn a_step_moves_the_weights_and_reports_statistics() {
    let mut l = tiny_learner(11, 3, 4, DType::F32, UpdateConfig::default());
    let before = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
    let s = l.step_prepared(&varied_batch()).unwrap();
    let after = flatten_tensors(l.model().vars().iter().map(|(_, v)| v.as_tensor()));
    assert_eq!(l.version(), 1);
    assert!(before != after);
    assert_eq!(s.tokens, 26);
    assert_eq!(s.sequences, 7);
    assert_eq!(
        s.micro_batches, 1,
        "seven short sequences fit one default micro-batch"
    );
    assert!(s.ratio_mean > 0.0 && s.ratio_max >= s.ratio_mean);
    assert!(s.kl_behavior_k3 >= 0.0);
    assert!(s.ess_frac > 0.0 && s.ess_frac <= 1.0 + 1e-12);
    assert!(s.grad_norm > 0.0 && s.time_forward_backward_s > 0.0);
}

/// Reward of a completion: the fraction of its tokens equal to `TARGET`.
const TARGET: u32 = 2;

fn fraction_of_target(y: &[u32]) -> f32 {
    y.iter().filter(|&&t| t == TARGET).count() as f32 / y.len().max(1) as f32
}

#[test]
fn learns_a_synthetic_task_with_a_nested_behavior() {
    let (vocab, layers) = (5usize, 4usize);
    let cfg = UpdateConfig {
        correction: Correction::Tis {
            cap: 2.0,
            mode: TisMode::Truncate,
        },
        optim: OptimConfig {
            lr: 0.02,
            ..OptimConfig::default()
        },
        ..UpdateConfig::default()
    };
    let mut l = tiny_learner(vocab, layers, 21, DType::F32, cfg);
    let behavior = LayerPlan::skipping(&[2], layers).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![0, 1], vec![3], vec![4, 4, 1], vec![1]];
    let mut curve = Vec::new();
    for step in 0..30u64 {
        let gen = GenerationConfig {
            sampling: Sampling::temperature(1.0),
            max_new_tokens: 4,
            group_size: 8,
            seed: 100 + step,
            ..GenerationConfig::default()
        };
        let out = generate(l.model(), &prompts, &behavior, &gen, None).unwrap();
        let groups: Vec<Vec<RolloutRecord>> = prompts
            .iter()
            .enumerate()
            .map(|(p, prompt)| {
                out.completions
                    .iter()
                    .filter(|c| c.prompt_index == p)
                    .map(|c| {
                        record(
                            p as u64,
                            prompt,
                            &c.tokens,
                            &c.logprobs,
                            fraction_of_target(&c.tokens),
                            1.0,
                        )
                    })
                    .collect()
            })
            .collect();
        let stats = l.step(&groups).unwrap();
        curve.push(stats.reward_mean);
    }
    let first: f64 = curve[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = curve[curve.len() - 5..].iter().sum::<f64>() / 5.0;
    println!("reward per step: {curve:.2?}");
    assert!(
        last > first + 0.3,
        "mean reward {first:.3} → {last:.3}: did not learn"
    );
}
