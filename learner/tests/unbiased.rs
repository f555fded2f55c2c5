//! The judge of the corrections: exact enumeration on a tiny model.
//!
//! Vocabulary 4, completions of exactly 3 tokens (no EOS), so all 64 sequences can be listed.
//! The exact gradient of J(θ) = Σ_y π_θ(y) R(y) comes from autograd over the enumeration. Each
//! estimate is the learner's own gradient on N sequences drawn from the nested behavior μ (a
//! plan that skips two of four layers), with A = R − b for a constant b (GRPO's group
//! normalisation has a small bias of its own, which is not what this test is about). Over M
//! independent estimates, the mean is compared with the exact gradient along the exact
//! gradient's direction and three fixed random directions, in units of the standard error.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Tensor};
use common::{flatten, rel_diff, tiny};
use learner::{
    Correction, Learner, Normalizer, PreparedBatch, TisMode, TrainSequence, UpdateConfig,
};
use model::{completion_logprobs, Kernels, LayerPlan, ScoreRequest};
use rand::distr::weighted::WeightedIndex;
use rand::prelude::*;

const VOCAB: u32 = 4;
const LEN: usize = 3;
const LAYERS: usize = 4;
const PROMPT: [u32; 1] = [0];
const BASELINE: f64 = 0.4;

fn all_sequences() -> Vec<Vec<u32>> {
    let n = (VOCAB as usize).pow(LEN as u32);
    (0..n)
        .map(|mut k| {
            (0..LEN)
                .map(|_| {
                    let t = (k % VOCAB as usize) as u32;
                    k /= VOCAB as usize;
                    t
                })
                .collect()
        })
        .collect()
}

/// A reward that depends on every position and on token interactions.
fn reward(y: &[u32]) -> f64 {
    let twos = y.iter().filter(|&&t| t == 2).count() as f64;
    let echo = if y[0] == y[2] { 0.5 } else { 0.0 };
    0.3 * twos + echo + if y[1] == 1 { 0.4 } else { 0.0 }
}

fn requests(seqs: &[Vec<u32>]) -> Vec<ScoreRequest<'_>> {
    seqs.iter()
        .map(|y| ScoreRequest {
            prompt: &PROMPT,
            completion: y,
        })
        .collect()
}

/// Per-token log-probs of every sequence under `plan`: (64, 3).
fn token_logprobs(learner: &Learner, seqs: &[Vec<u32>], plan: &LayerPlan) -> Vec<Vec<f64>> {
    let lp = completion_logprobs(
        learner.model(),
        &requests(seqs),
        plan,
        1.0,
        Kernels::Differentiable,
    )
    .unwrap();
    lp.values
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

/// ∇J(θ) = ∇ Σ_y π(y) R(y), by autograd over the enumeration.
fn exact_gradient(learner: &Learner, seqs: &[Vec<u32>]) -> Vec<f64> {
    let full = LayerPlan::full(LAYERS);
    let lp = completion_logprobs(
        learner.model(),
        &requests(seqs),
        &full,
        1.0,
        Kernels::Differentiable,
    )
    .unwrap();
    let seq_lp = lp.values.sum(1).unwrap();
    let r: Vec<f64> = seqs.iter().map(|y| reward(y)).collect();
    let r = Tensor::from_vec(r, seqs.len(), learner.model().device()).unwrap();
    let j = (seq_lp.exp().unwrap() * r).unwrap().sum_all().unwrap();
    let grads = j.backward().unwrap();
    let mut out = Vec::new();
    for (_, var) in learner.model().vars() {
        let g = grads.get(var.as_tensor()).unwrap();
        out.extend(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
    }
    out
}

struct Estimates {
    /// Projections of each estimate on each direction: [direction][estimate].
    proj: Vec<Vec<f64>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(v: Vec<f64>) -> Vec<f64> {
    let n = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// M estimates of ∇J from the learner with `correction`, each from N sequences drawn from μ.
fn estimates(
    correction: Correction,
    seqs: &[Vec<u32>],
    mu_tokens: &[Vec<f64>],
    dirs: &[Vec<f64>],
    m: usize,
    n: usize,
    seed: u64,
) -> Estimates {
    let cfg = UpdateConfig {
        correction,
        normalizer: Normalizer::TokenMean,
        ..UpdateConfig::default()
    };
    let learner = Learner::new(tiny(VOCAB as usize, LAYERS, 3, DType::F64), None, cfg).unwrap();
    let mu_seq: Vec<f64> = mu_tokens
        .iter()
        .map(|t| t.iter().sum::<f64>().exp())
        .collect();
    let dist = WeightedIndex::new(&mu_seq).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut proj = vec![Vec::with_capacity(m); dirs.len()];
    for _ in 0..m {
        let sequences = (0..n)
            .map(|_| {
                let k = dist.sample(&mut rng);
                TrainSequence {
                    prompt: PROMPT.to_vec(),
                    completion: seqs[k].clone(),
                    behavior_logprobs: mu_tokens[k].iter().map(|&v| v as f32).collect(),
                    advantage: reward(&seqs[k]) - BASELINE,
                }
            })
            .collect();
        let batch = PreparedBatch {
            sequences,
            ..PreparedBatch::default()
        };
        let g = learner.gradient(&batch).unwrap();
        // loss = −Σ_i Σ_t c·log π / (N·LEN): ∇J is estimated by −LEN·∇loss.
        let est: Vec<f64> = flatten(&learner, &g)
            .iter()
            .map(|x| -(LEN as f64) * x)
            .collect();
        for (d, p) in dirs.iter().zip(proj.iter_mut()) {
            p.push(dot(d, &est));
        }
    }
    Estimates { proj }
}

/// (mean − exact) / standard error, per direction.
fn z_scores(est: &Estimates, exact: &[f64], dirs: &[Vec<f64>]) -> Vec<f64> {
    dirs.iter()
        .zip(&est.proj)
        .map(|(d, p)| {
            let m = p.len() as f64;
            let mean = p.iter().sum::<f64>() / m;
            let var = p.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0);
            (mean - dot(d, exact)) / (var / m).sqrt()
        })
        .collect()
}

#[test]
fn seq_is_is_unbiased_and_none_is_not() {
    let seqs = all_sequences();
    let probe = Learner::new(
        tiny(VOCAB as usize, LAYERS, 3, DType::F64),
        None,
        UpdateConfig::default(),
    )
    .unwrap();
    let exact = exact_gradient(&probe, &seqs);
    let behavior = LayerPlan::skipping(&[1, 2], LAYERS).unwrap();
    let mu = token_logprobs(&probe, &seqs, &behavior);
    let pi = token_logprobs(&probe, &seqs, &LayerPlan::full(LAYERS));
    // How far the behavior is from the target: KL(μ‖π) over whole sequences.
    let kl: f64 = mu
        .iter()
        .zip(&pi)
        .map(|(m, p)| {
            let (lm, lp): (f64, f64) = (m.iter().sum(), p.iter().sum());
            lm.exp() * (lm - lp)
        })
        .sum();
    println!(
        "KL(μ‖π) over sequences: {kl:.4} nats; |∇J| = {:.4}",
        dot(&exact, &exact).sqrt()
    );
    assert!(
        kl > 0.05,
        "the behavior must differ from the target for this test to mean anything"
    );

    let mut rng = StdRng::seed_from_u64(11);
    let mut dirs = vec![unit(exact.clone())];
    for _ in 0..3 {
        dirs.push(unit(
            (0..exact.len())
                .map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal))
                .collect(),
        ));
    }
    let (m, n) = (600, 16);
    let mut report = Vec::new();
    for (name, corr) in [
        ("seq-is", Correction::SeqIs),
        ("none", Correction::None),
        (
            "tis",
            Correction::Tis {
                cap: 2.0,
                mode: TisMode::Truncate,
            },
        ),
        ("retrace", Correction::Retrace { lambda: 1.0 }),
    ] {
        let z = z_scores(&estimates(corr, &seqs, &mu, &dirs, m, n, 5), &exact, &dirs);
        println!("{name:8} standardised bias (exact dir, 3 random dirs): {z:+.2?}");
        report.push((name, z));
    }
    let seq_is = &report[0].1;
    assert!(
        seq_is.iter().all(|z| z.abs() < 4.0),
        "seq-is must agree with the exact gradient within statistical error: {seq_is:?}"
    );
    let none = &report[1].1;
    assert!(
        none.iter().any(|z| z.abs() > 5.0),
        "none must be visibly biased (> 5 standard errors): {none:?}"
    );
}

#[test]
fn on_policy_full_plan_every_correction_is_plain_grpo() {
    // Samples whose behavior log-probs are the target's own: ρ = 1 exactly.
    let seqs = all_sequences();
    let picks = [3usize, 17, 17, 40, 63, 5, 22, 9];
    let probe = tiny(VOCAB as usize, LAYERS, 3, DType::F64);
    let full = LayerPlan::full(LAYERS);
    let chosen: Vec<Vec<u32>> = picks.iter().map(|&k| seqs[k].clone()).collect();
    let lp = completion_logprobs(
        &probe,
        &requests(&chosen),
        &full,
        1.0,
        Kernels::Differentiable,
    )
    .unwrap();
    let own = lp.values.to_vec2::<f64>().unwrap();
    let rewards: Vec<f64> = chosen.iter().map(|y| reward(y)).collect();
    let adv = learner::group_advantages(&rewards, &learner::AdvantageConfig::default());
    let batch = PreparedBatch {
        sequences: chosen
            .iter()
            .zip(&own)
            .zip(&adv)
            .map(|((y, l), &a)| TrainSequence {
                prompt: PROMPT.to_vec(),
                completion: y.clone(),
                behavior_logprobs: l.iter().map(|&v| v as f32).collect(),
                advantage: a,
            })
            .collect(),
        ..PreparedBatch::default()
    };
    // Plain GRPO, written out: −Σ_i A_i Σ_t log π / (N·LEN).
    let reference = tiny(VOCAB as usize, LAYERS, 3, DType::F64);
    let lp = completion_logprobs(
        &reference,
        &requests(&chosen),
        &full,
        1.0,
        Kernels::Differentiable,
    )
    .unwrap();
    let a = Tensor::from_vec(adv.clone(), (adv.len(), 1), reference.device()).unwrap();
    let plain = (lp.values.broadcast_mul(&a).unwrap().sum_all().unwrap()
        / -((chosen.len() * LEN) as f64))
        .unwrap();
    let plain_value = plain.to_scalar::<f64>().unwrap();
    let grads = plain.backward().unwrap();
    let plain_grad: Vec<f64> = reference
        .vars()
        .iter()
        .flat_map(|(_, v)| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect();
    for corr in [
        Correction::None,
        Correction::SeqIs,
        Correction::Tis {
            cap: 2.0,
            mode: TisMode::Truncate,
        },
        Correction::Tis {
            cap: 2.0,
            mode: TisMode::Mask,
        },
        Correction::Retrace { lambda: 1.0 },
    ] {
        for epochs in [1, 2] {
            let cfg = UpdateConfig {
                correction: corr,
                epochs,
                ..UpdateConfig::default()
            };
            let learner =
                Learner::new(tiny(VOCAB as usize, LAYERS, 3, DType::F64), None, cfg).unwrap();
            let g = learner.gradient(&batch).unwrap();
            let d = rel_diff(&flatten(&learner, &g), &plain_grad);
            assert!(
                d < 1e-6,
                "{corr}, epochs {epochs}: gradient differs from plain GRPO by {d:e}"
            );
            assert!(
                (g.loss - plain_value).abs() < 1e-6 * plain_value.abs().max(1.0),
                "{corr}: loss {} vs plain {plain_value}",
                g.loss
            );
        }
    }
}
