//! How a rollout behavior should apply LoRA adapters: merged into its weights after every
//! update, or unmerged as two thin matmuls beside each base matmul. For f32 and q8_0 behaviors
//! on SmolLM2, at each rank, measured in the same run:
//!
//! - decode tokens/s of the plain model (what a merged behavior decodes at) and of the
//!   unmerged adapted one, for a group of `LORA_BATCH` completions (default 32: the default
//!   batch of 8 prompts × 4);
//! - what taking new adapters costs per update: merged, the merge `W + B·A·alpha/r` of every
//!   adapted weight (and its re-quantization for q8_0); unmerged, setting the adapters;
//! - the break-even: the extra decode time of one default batch (`LORA_BATCH` × 64 tokens)
//!   unmerged, against the merge;
//! - how far each 8-bit behavior is from the f32 LoRA target: mean per-token KL(μ‖π) over a
//!   prompt and 64 generated tokens, for the 8-bit base with f32 adapters (unmerged) and for
//!   the re-quantized merged weights.
//!
//! The adapters are the PEFT adapter directory `LORA_ADAPTER` (e.g. a run's `adapter/`) when
//! set, else random with B ~ N(0, 0.01²).
//!
//! `cargo bench -p model --bench lora_behavior` (needs `tools/fetch-assets.sh model`).
//! Env: `LORA_RANKS` (default `8,32`), `LORA_BATCH`, `DECODE_TOKENS` (default 64),
//! `DECODE_REPEATS` (default 3), `LORA_ADAPTER`.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, D};
use model::candle_core;
use model::*;
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

mod util;
use util::{best, env_usize};

/// Decode tokens/s of `m` on `batch` completions of `n_tok` tokens after `prompt` (greedy).
fn decode_tps(
    m: &Decoder,
    prompt: &[u32],
    batch: usize,
    n_tok: usize,
    repeats: usize,
) -> anyhow::Result<f64> {
    let plan = LayerPlan::full(m.config().num_layers);
    let gen = GenerationConfig {
        sampling: Sampling::Greedy,
        max_new_tokens: n_tok,
        group_size: batch,
        ..Default::default()
    };
    let secs = best(repeats, || {
        let out = generate(m, std::slice::from_ref(&prompt.to_vec()), &plan, &gen, None)?;
        anyhow::ensure!(out.timings.generated_tokens == batch * n_tok);
        Ok(())
    })?;
    Ok((batch * n_tok) as f64 / secs)
}

/// Mean over positions of KL(μ‖π) from the two models' logits on the same tokens.
fn mean_kl(behavior: &Decoder, target: &Decoder, tokens: &Tensor) -> anyhow::Result<f64> {
    let plan = LayerPlan::full(target.config().num_layers);
    let lp = |m: &Decoder| -> anyhow::Result<Tensor> {
        let logits = m.forward(tokens, &mut ForwardCtx::new(plan.clone()))?;
        Ok(candle_nn::ops::log_softmax(
            &logits.to_dtype(DType::F64)?,
            D::Minus1,
        )?)
    };
    let (mu, pi) = (lp(behavior)?, lp(target)?);
    let kl = (mu.exp()? * (&mu - &pi)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?.to_scalar::<f64>()?)
}

/// The adapters to apply: `LORA_ADAPTER`'s (a PEFT directory of this rank), else random.
fn adapters(m: &Decoder, rank: usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    if let Ok(dir) = std::env::var("LORA_ADAPTER") {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            std::path::Path::new(&dir).join("adapter_config.json"),
        )?)?;
        if cfg["r"].as_u64() == Some(rank as u64) {
            let t = candle_core::safetensors::load(
                std::path::Path::new(&dir).join("adapter_model.safetensors"),
                &Device::Cpu,
            )?;
            return Ok(t
                .into_iter()
                .map(|(k, v)| (k.trim_start_matches("base_model.model.").to_string(), v))
                .collect());
        }
    }
    Ok(m.lora_parameters()
        .into_iter()
        .map(|(n, t)| {
            let v = if n.ends_with("lora_B.weight") {
                Tensor::randn(0f32, 0.01, t.dims(), &Device::Cpu).unwrap()
            } else {
                t
            };
            (n, v)
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let ranks: Vec<usize> = std::env::var("LORA_RANKS")
        .unwrap_or_else(|_| "8,32".into())
        .split(',')
        .map(|r| r.trim().parse())
        .collect::<std::result::Result<_, _>>()?;
    let batch = env_usize("LORA_BATCH", 32);
    let n_tok = env_usize("DECODE_TOKENS", 64);
    let repeats = env_usize("DECODE_REPEATS", 3);
    let (cfg, weights, tokenizer) = load_gguf(&common::smollm_path(), &LoadOptions::default())?;
    let text = tokenizer.apply_chat_template(
        &[ChatMessage::new(
            "user",
            "What is 48 + 27? Answer with a number.",
        )],
        true,
    )?;
    let prompt = tokenizer.encode(&text, false)?;
    let plain = Decoder::new(&cfg, &weights, false)?;
    println!(
        "LoRA behaviors: {batch} completions × {n_tok} tokens, prompt {} tokens, best of {repeats}, {} threads",
        prompt.len(),
        candle_core::utils::get_num_threads()
    );
    println!("| format | rank | plain (= merged) tok/s | unmerged tok/s | unmerged/plain | merge s/update | set s/update | unmerged extra s/batch | KL(μ‖π) unmerged | KL(μ‖π) merged |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let plain_b = plain.quantized(format)?;
        let plain_tps = decode_tps(&plain_b, &prompt, batch, n_tok, repeats)?;
        for &rank in &ranks {
            let target = Decoder::new(&cfg, &weights, false)?
                .with_lora(&LoraConfig::new(rank, 2.0 * rank as f64)?, 0)?;
            let values = adapters(&target, rank)?;
            target.set_lora_parameters(&values)?;
            let unmerged = target.quantized(format)?;
            let lora_tps = decode_tps(&unmerged, &prompt, batch, n_tok, repeats)?;
            // Taking new adapters: merged rebuilds (and re-quantizes) the weights.
            let t = Instant::now();
            let merged = target.merged()?.quantized(format)?;
            let merge_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            target.set_lora_parameters(&values)?;
            let set_s = t.elapsed().as_secs_f64();
            let extra = (batch * n_tok) as f64 * (1.0 / lora_tps - 1.0 / plain_tps);
            // KL of the behavior against the f32 target on the target's own greedy text.
            let gen = GenerationConfig {
                sampling: Sampling::Greedy,
                max_new_tokens: n_tok,
                group_size: 1,
                ..Default::default()
            };
            let out = generate(
                &target,
                std::slice::from_ref(&prompt),
                &LayerPlan::full(cfg.num_layers),
                &gen,
                None,
            )?;
            let mut ids = prompt.clone();
            ids.extend(&out.completions[0].tokens);
            let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let (kl_u, kl_m) = if format.is_quantized() {
                (
                    mean_kl(&unmerged, &target, &tokens)?,
                    mean_kl(&merged, &target, &tokens)?,
                )
            } else {
                (0.0, mean_kl(&merged, &target, &tokens)?)
            };
            println!(
                "| {format} | {rank} | {plain_tps:.1} | {lora_tps:.1} | {:.3} | {merge_s:.3} | {set_s:.4} | {extra:.3} | {kl_u:.2e} | {kl_m:.2e} |",
                lora_tps / plain_tps
            );
        }
    }
    Ok(())
}
