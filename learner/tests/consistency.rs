//! The nested consistency term β · KL(sg(π_full) ‖ π_nested) on tiny random models: off by
//! default and then free, its gradient against an autograd reference of the explicit formula,
//! zero for the full plan, and training with it alone pulls the nested sub-network towards the
//! full model.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{flatten, record, rel_diff, tiny};
use learner::{Learner, Normalizer, OptimConfig, PreparedBatch, TrainSequence, UpdateConfig};
use model::{Architecture, Decoder, ForwardCtx, Kernels, LayerPlan, ModelConfig, Weights};

const VOCAB: usize = 11;
const LAYERS: usize = 4;
const SEED: u64 = 5;

/// A tiny random decoder in f64: Llama ties the output head to the embedding, Qwen2 has its
/// own `lm_head` and attention biases, so both ways a head gradient can arrive are covered.
fn tiny_f64(arch: Architecture) -> Decoder {
    match arch {
        Architecture::Llama => tiny(VOCAB, LAYERS, SEED, DType::F64),
        Architecture::Qwen2 => {
            let cfg = ModelConfig::tiny(Architecture::Qwen2, VOCAB, LAYERS);
            let w = Weights::random(&cfg, SEED, DType::F64, &Device::Cpu).unwrap();
            Decoder::new(&cfg, &w, true).unwrap()
        }
    }
}

fn nested_plan() -> LayerPlan {
    LayerPlan::skipping(&[1, 2], LAYERS).unwrap()
}

/// Sequences of varied lengths — 157 completion tokens in all, more than one chunk of the
/// term's output head — with behavior log-probs away from the target's, so that the policy
/// gradient is not trivial either.
fn batch(plan: Option<LayerPlan>) -> PreparedBatch {
    let shapes: [(usize, usize); 8] = [
        (1, 30),
        (3, 2),
        (2, 27),
        (4, 1),
        (1, 25),
        (5, 26),
        (2, 20),
        (6, 26),
    ];
    let sequences = shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, c))| TrainSequence {
            prompt: (0..p).map(|k| ((i + 3 * k) % VOCAB) as u32).collect(),
            completion: (0..c)
                .map(|k| ((5 * i + 2 * k + k * k + 1) % VOCAB) as u32)
                .collect(),
            behavior_logprobs: (0..c).map(|k| -2.0 - 0.3 * ((i + k) % 4) as f32).collect(),
            advantage: [1.2, -0.7, 0.4, -1.5, 0.9, 0.1, -0.4, 0.6][i],
        })
        .collect();
    PreparedBatch {
        sequences,
        behavior_plan: plan,
        ..PreparedBatch::default()
    }
}

fn learner(arch: Architecture, cfg: UpdateConfig) -> Learner {
    Learner::new(tiny_f64(arch), None, cfg).unwrap()
}

/// Per completion position of `s`: log softmax of the logits under `plan`, by the composed
/// (candle-op) kernels, one unpadded sequence at a time.
///
/// # Shapes
/// → (completion length, vocab).
fn reference_log_softmax(model: &Decoder, s: &TrainSequence, plan: &LayerPlan) -> Tensor {
    let tokens: Vec<u32> = s.prompt.iter().chain(&s.completion).copied().collect();
    let len = tokens.len();
    let tokens = Tensor::from_vec(tokens, (1, len), model.device()).unwrap();
    let mut ctx = ForwardCtx::new(plan.clone()).with_kernels(Kernels::Composed);
    let logits = model.forward(&tokens, &mut ctx).unwrap();
    // Position p predicts token p + 1: the completion is predicted from prompt_len − 1 on.
    let logits = logits
        .squeeze(0)
        .unwrap()
        .narrow(0, s.prompt.len() - 1, s.completion.len())
        .unwrap();
    candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap()
}

/// The term written out: β · Σ_i Σ_t w_i · Σ_v p_full(v)·(log p_full(v) − log p_nested(v)),
/// p_full detached, w_i the normaliser's token weight. Returns its value, its gradient by
/// autograd (flattened in the learner's parameter order) and the plain token mean of the KL.
fn reference_term(
    model: &Decoder,
    batch: &PreparedBatch,
    plan: &LayerPlan,
    normalizer: Normalizer,
    beta: f64,
) -> (f64, Vec<f64>, f64) {
    let full = LayerPlan::full(LAYERS);
    let n = batch.sequences.len();
    let tokens = batch.completion_tokens() as f64;
    let mut total: Option<Tensor> = None;
    let mut kl_sum = 0.0;
    for s in &batch.sequences {
        let log_p = reference_log_softmax(model, s, &full).detach();
        let log_q = reference_log_softmax(model, s, plan);
        let kl = (log_p.exp().unwrap() * (&log_p - &log_q).unwrap())
            .unwrap()
            .sum(D::Minus1)
            .unwrap();
        kl_sum += kl.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let w = match normalizer {
            Normalizer::TokenMean => 1.0 / tokens,
            Normalizer::SequenceMean => 1.0 / (s.completion.len() * n) as f64,
        };
        let term = (kl.sum_all().unwrap() * (beta * w)).unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    let total = total.unwrap();
    let grads = total.backward().unwrap();
    let grad = model
        .vars()
        .iter()
        .flat_map(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; v.as_tensor().elem_count()],
        })
        .collect();
    (total.to_scalar::<f64>().unwrap(), grad, kl_sum / tokens)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn off_by_default_and_then_bit_identical() {
    assert_eq!(UpdateConfig::default().consistency_beta, 0.0);
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let l = learner(arch, UpdateConfig::default());
        let plain = l.gradient(&batch(None)).unwrap();
        let with_plan = l.gradient(&batch(Some(nested_plan()))).unwrap();
        assert_eq!(
            flatten(&l, &plain),
            flatten(&l, &with_plan),
            "β = 0: a nested plan in the batch must not change the gradient"
        );
        assert_eq!(plain.loss.to_bits(), with_plan.loss.to_bits());
        assert_eq!(with_plan.consistency_loss, 0.0);
        assert_eq!(with_plan.consistency_kl, None, "not measured when off");
    }
}

#[test]
fn gradient_is_policy_gradient_plus_beta_times_the_reference_kl_gradient() {
    // Everything in f64. The learner and the reference compute the same maths by different
    // routes (padded micro-batches, a chunked head and a two-stage backward through
    // `Kernels::Differentiable`, against one unpadded sequence at a time through candle's
    // composed ops), so they may differ only by rounding: measured at most 1.1e-11 of the
    // largest gradient coordinate (Llama 6.8e-12, Qwen2 1.0e-11), which includes the
    // cancellation in (total − policy gradient). 1e-9 leaves two orders of magnitude over
    // that, while a real error — a lost stop-gradient, a wrong weight or normaliser, a missing
    // head or decoder gradient — is of the order of the term itself (relative error ~1).
    let beta = 0.7;
    let plan = nested_plan();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for normalizer in [Normalizer::TokenMean, Normalizer::SequenceMean] {
            let b = batch(Some(plan.clone()));
            let (want_value, want_grad, want_kl) =
                reference_term(&tiny_f64(arch), &b, &plan, normalizer, beta);
            assert!(
                want_kl > 1e-3,
                "{arch:?}: the plans barely differ ({want_kl:e})"
            );
            // One micro-batch (157 positions: two head chunks), then several.
            for micro_batch_tokens in [2048, 40] {
                let pg_cfg = UpdateConfig {
                    normalizer,
                    micro_batch_tokens,
                    ..UpdateConfig::default()
                };
                let pg_learner = learner(arch, pg_cfg.clone());
                let pg = pg_learner.gradient(&b).unwrap();
                let pg_grad = flatten(&pg_learner, &pg);
                let cfg = UpdateConfig {
                    consistency_beta: beta,
                    ..pg_cfg
                };
                let l = learner(arch, cfg);
                let g = l.gradient(&b).unwrap();
                let what = format!("{arch:?}, {normalizer:?}, {micro_batch_tokens} tokens");
                let got = flatten(&l, &g);
                let term: Vec<f64> = got.iter().zip(&pg_grad).map(|(t, p)| t - p).collect();
                let d = rel_diff(&term, &want_grad);
                assert!(d < 1e-9, "{what}: term gradient off by {d:e} (relative)");
                let sum: Vec<f64> = pg_grad.iter().zip(&want_grad).map(|(p, c)| p + c).collect();
                let d = rel_diff(&got, &sum);
                assert!(d < 1e-9, "{what}: total gradient off by {d:e} (relative)");
                assert!(
                    norm(&want_grad) > 1e-3 * norm(&pg_grad),
                    "{what}: a vacuous term"
                );
                assert!(
                    (g.consistency_loss - want_value).abs() < 1e-9 * want_value.abs(),
                    "{what}: term {} vs reference {want_value}",
                    g.consistency_loss
                );
                let kl = g.consistency_kl.unwrap();
                assert!(
                    (kl - want_kl).abs() < 1e-9 * want_kl,
                    "{what}: KL {kl} vs {want_kl}"
                );
                assert_eq!(pg.pg_loss.to_bits(), g.pg_loss.to_bits());
                assert!((g.loss - (g.pg_loss + g.kl_loss + g.consistency_loss)).abs() < 1e-12);
                // The full model is the stop-gradient target: layers the nested plan skips
                // get no gradient from the term, to the bit.
                for ((name, _), (a, p)) in
                    l.model().vars().iter().zip(g.grads.iter().zip(&pg.grads))
                {
                    if name.contains("layers.1.") || name.contains("layers.2.") {
                        let a = a.as_ref().unwrap().flatten_all().unwrap();
                        let p = p.as_ref().unwrap().flatten_all().unwrap();
                        assert_eq!(
                            a.to_vec1::<f64>().unwrap(),
                            p.to_vec1::<f64>().unwrap(),
                            "{what}: skipped layer parameter {name} got a term gradient"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn full_plan_term_is_zero_and_free() {
    let full = LayerPlan::full(LAYERS);
    let (value, grad, kl) = reference_term(
        &tiny_f64(Architecture::Llama),
        &batch(None),
        &full,
        Normalizer::TokenMean,
        1.0,
    );
    assert_eq!((value, kl), (0.0, 0.0), "KL(π‖π) by the reference formula");
    // Its gradient, q − p through the log-softmax, is 0 up to rounding (the nested plan's
    // is of the order of 1e-2).
    let largest = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
    assert!(largest < 1e-14, "{largest:e}");
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let pg_learner = learner(arch, UpdateConfig::default());
        let pg = pg_learner.gradient(&batch(None)).unwrap();
        let l = learner(
            arch,
            UpdateConfig {
                consistency_beta: 0.7,
                ..UpdateConfig::default()
            },
        );
        let g = l.gradient(&batch(Some(full.clone()))).unwrap();
        assert_eq!(g.consistency_loss, 0.0);
        assert_eq!(g.consistency_kl, Some(0.0));
        assert_eq!(g.loss.to_bits(), pg.loss.to_bits());
        assert_eq!(flatten(&l, &g), flatten(&pg_learner, &pg));
        // No plan at all: nothing measured, nothing added.
        let g = l.gradient(&batch(None)).unwrap();
        assert_eq!(g.consistency_kl, None);
        assert_eq!(flatten(&l, &g), flatten(&pg_learner, &pg));
    }
}

#[test]
fn training_on_the_term_alone_reduces_the_nested_kl() {
    // All advantages 0: no policy-gradient signal, only the consistency term moves the weights.
    let plan = nested_plan();
    let mut b = batch(Some(plan.clone()));
    for s in &mut b.sequences {
        s.advantage = 0.0;
    }
    let cfg = UpdateConfig {
        consistency_beta: 1.0,
        optim: OptimConfig {
            lr: 0.01,
            ..OptimConfig::default()
        },
        ..UpdateConfig::default()
    };
    let mut l = learner(Architecture::Llama, cfg);
    let pg = l.gradient(&b).unwrap();
    assert_eq!(pg.pg_loss, 0.0);
    let measure = |l: &Learner| reference_term(l.model(), &b, &plan, Normalizer::TokenMean, 1.0).2;
    let before = measure(&l);
    let mut curve = Vec::new();
    for _ in 0..10 {
        let s = l.step_prepared(&b).unwrap();
        assert!(s.skipped.is_none(), "{s:?}");
        curve.push(s.consistency_kl.unwrap());
    }
    let after = measure(&l);
    println!("KL(π_full‖π_nested) per step: {curve:.4?}, after: {after:.4}");
    assert!(
        (curve[0] - before).abs() < 1e-9 * before,
        "{} vs {before}",
        curve[0]
    );
    assert!(
        after < 0.5 * before,
        "ten steps on the consistency term alone: KL {before:.4} → {after:.4}"
    );
}

#[test]
fn records_carry_the_plan_into_the_step() {
    // Through `Learner::step`: the plan comes from the records (u16 layer indices).
    let plan = nested_plan();
    let rec = |group: u64, completion: &[u32], reward: f32| {
        let mut r = record(
            group,
            &[1, 2],
            completion,
            &vec![-2.0; completion.len()],
            reward,
            1.0,
        );
        r.plan = plan.layers().iter().map(|&l| l as u16).collect();
        r
    };
    let groups = vec![vec![rec(0, &[3, 4, 5], 1.0), rec(0, &[6, 7], 0.0)]];
    let cfg = UpdateConfig {
        consistency_beta: 0.5,
        ..UpdateConfig::default()
    };
    let mut l = learner(Architecture::Llama, cfg);
    let s = l.step(&groups).unwrap();
    assert!(s.consistency_kl.unwrap() > 0.0, "{s:?}");
    assert!(s.consistency_loss > 0.0);
    assert_eq!(l.version(), 1);
    // Off: nothing measured.
    let mut l = learner(Architecture::Llama, UpdateConfig::default());
    let s = l.step(&groups).unwrap();
    assert_eq!((s.consistency_kl, s.consistency_loss), (None, 0.0));
}
