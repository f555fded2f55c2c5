//! One training forward + backward on SmolLM2: full fine-tuning (every weight a variable)
//! against LoRA adapters (base frozen), with the differentiable kernels the learner uses.
//!
//! `cargo bench -p model --bench lora_step` (needs `tools/fetch-assets.sh model`).
//! Env: `LORA_RANK` (default 8), `LORA_SEQS` (default 8) completions of `LORA_TOKENS`
//! (default 64) tokens after a 32-token prompt, `LORA_REPEATS` (default 3).

#![allow(clippy::unwrap_used)]

use candle_core::DType;
use model::candle_core;
use model::*;

#[path = "../tests/common/mod.rs"]
mod common;

mod util;
use util::{best, env_usize};

/// Σ log π over the batch, then its backward pass; returns the number of gradients kept.
fn step(m: &Decoder, batch: &[ScoreRequest<'_>]) -> anyhow::Result<usize> {
    let plan = LayerPlan::full(m.config().num_layers);
    let lp = completion_logprobs(m, batch, &plan, 1.0, Kernels::Differentiable)?;
    let loss = lp.values.to_dtype(DType::F32)?.sum_all()?;
    let grads = loss.backward()?;
    Ok(m.vars()
        .iter()
        .filter(|(_, v)| grads.get(v).is_some())
        .count())
}

fn main() -> anyhow::Result<()> {
    let rank = env_usize("LORA_RANK", 8);
    let seqs = env_usize("LORA_SEQS", 8);
    let tokens = env_usize("LORA_TOKENS", 64);
    let repeats = env_usize("LORA_REPEATS", 3);
    let (cfg, weights, _) = load_gguf(&common::smollm_path(), &LoadOptions::default())?;
    let prompt: Vec<u32> = (0..32).map(|i| 100 + i * 7).collect();
    let completions: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (0..tokens)
                .map(|t| (200 + s * 31 + t * 13) as u32)
                .collect()
        })
        .collect();
    let batch: Vec<ScoreRequest<'_>> = completions
        .iter()
        .map(|c| ScoreRequest {
            prompt: &prompt,
            completion: c,
        })
        .collect();

    let full = Decoder::new(&cfg, &weights, true)?;
    let lora = Decoder::new(&cfg, &weights, false)?
        .with_lora(&LoraConfig::new(rank, 2.0 * rank as f64)?, 0)?;
    let count = |m: &Decoder| -> usize { m.vars().iter().map(|(_, v)| v.elem_count()).sum() };
    println!("{seqs} completions × {tokens} tokens after a 32-token prompt, best of {repeats}");
    let t_full = best(repeats, || step(&full, &batch).map(|_| ()))?;
    println!(
        "full fine-tuning: {:>11} trainable weights, forward + backward {t_full:.3} s",
        count(&full)
    );
    let t_lora = best(repeats, || step(&lora, &batch).map(|_| ()))?;
    println!(
        "LoRA r = {rank}:      {:>11} trainable weights, forward + backward {t_lora:.3} s ({:.2}x)",
        count(&lora),
        t_full / t_lora
    );
    Ok(())
}
