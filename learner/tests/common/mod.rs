//! Fixtures shared by the learner tests: tiny models, records and flattened gradients.
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use learner::{BatchGradient, Learner, UpdateConfig};
use model::{Architecture, Decoder, ModelConfig, Weights};
use protocol::{FinishReason, RewardOutcome, RolloutRecord, SamplingParams, Timings};

/// A tiny random Llama decoder (`vocab` tokens, `layers` layers) in `dtype`, trainable.
pub fn tiny(vocab: usize, layers: usize, seed: u64, dtype: DType) -> Decoder {
    let cfg = ModelConfig::tiny(Architecture::Llama, vocab, layers);
    let w = Weights::random(&cfg, seed, dtype, &Device::Cpu).unwrap();
    Decoder::new(&cfg, &w, true).unwrap()
}

/// A learner over a fresh tiny model.
pub fn tiny_learner(
    vocab: usize,
    layers: usize,
    seed: u64,
    dtype: DType,
    cfg: UpdateConfig,
) -> Learner {
    Learner::new(tiny(vocab, layers, seed, dtype), None, cfg).unwrap()
}

/// An owned record as the rollout server would write it.
pub fn record(
    group: u64,
    prompt: &[u32],
    completion: &[u32],
    logprobs: &[f32],
    reward: f32,
    temperature: f32,
) -> RolloutRecord {
    RolloutRecord {
        prompt_id: group,
        group_id: group,
        batch_id: 0,
        policy_version: 0,
        group_size: 1,
        group_index: 0,
        batch_groups: 1,
        prompt: prompt.to_vec(),
        completion: completion.to_vec(),
        logprobs: logprobs.to_vec(),
        plan: Vec::new(),
        sampling: SamplingParams::temperature(temperature),
        seed: 0,
        reward: RewardOutcome::scored(reward),
        finish: FinishReason::Length,
        timings: Timings::default(),
    }
}

/// Every gradient tensor flattened into one f64 vector (missing gradients as zeros).
pub fn flatten(learner: &Learner, g: &BatchGradient) -> Vec<f64> {
    let mut out = Vec::new();
    for ((_, var), grad) in learner.model().vars().iter().zip(&g.grads) {
        match grad {
            Some(t) => out.extend(
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            ),
            None => out.extend(std::iter::repeat_n(0.0, var.as_tensor().elem_count())),
        }
    }
    out
}

/// Flattens a list of tensors (e.g. the parameters) into one f64 vector.
pub fn flatten_tensors<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<f64> {
    ts.into_iter()
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

/// max |a − b| / max(max |b|, tiny).
pub fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}
