//! Decode throughput: our decoder under full and nested plans, next to candle-transformers'
//! llama on the same dequantised SmolLM2 weights, measured in the same run.
//!
//! `cargo bench -p model --bench decode` (needs `tools/fetch-assets.sh model`).
//! Env: `DECODE_TOKENS` (default 64) tokens per sequence, `DECODE_REPEATS` (default 3).

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, IndexOp, Tensor};
use model::candle_core;
use model::*;

#[path = "../tests/common/mod.rs"]
mod common;

mod util;
use util::{best, env_usize};

fn main() -> anyhow::Result<()> {
    use candle_transformers::models::llama as reference;
    let path = common::smollm_path();
    let n_tok = env_usize("DECODE_TOKENS", 64);
    let repeats = env_usize("DECODE_REPEATS", 3);

    let (cfg, weights, tokenizer) = load_gguf(&path, &LoadOptions::default())?;
    let ours = Decoder::new(&cfg, &weights, false)?;
    let (reference, ref_cfg) = common::reference_llama(&cfg, weights);

    let text = tokenizer.apply_chat_template(
        &[ChatMessage::new(
            "user",
            "Write a short poem about the sea.",
        )],
        true,
    )?;
    let prompt = tokenizer.encode(&text, false)?;
    let l = cfg.num_layers;
    let per_layer = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size - cfg.hidden_size) / l;
    let head = cfg.vocab_size * cfg.hidden_size; // lm_head matmul per token (embedding lookup ~free)

    println!(
        "decode: {n_tok} new tokens per sequence, prompt {} tokens, best of {repeats}",
        prompt.len()
    );
    println!("| batch | model | layers | tokens/s | vs candle-transformers | speedup vs full | ideal | of ideal |");
    println!("|---|---|---|---|---|---|---|---|");
    for batch in [1usize, 8] {
        // candle-transformers' llama, greedy, batch of identical prompts.
        let secs = best(repeats, || {
            let mut cache = reference::Cache::new(true, DType::F32, &ref_cfg, &Device::Cpu)?;
            let rows: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
            let mut x = Tensor::from_vec(rows, (batch, prompt.len()), &Device::Cpu)?;
            let mut pos = 0;
            for _ in 0..n_tok {
                let len = x.dim(1)?;
                let logits = reference.forward(&x, pos, &mut cache)?;
                pos += len;
                let next = logits.argmax(1)?.to_vec1::<u32>()?;
                x = Tensor::from_vec(next, (batch, 1), &Device::Cpu)?;
            }
            Ok(())
        })?;
        let ref_tps = (batch * n_tok) as f64 / secs;
        println!("| {batch} | candle-transformers llama | {l} | {ref_tps:.1} | 1.00 | | | |");

        let mut full_tps = 0.0;
        for ratio in [0.0, 0.25, 0.5] {
            let k = PlanSampler::skip_count(l, ratio);
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
            let plan = LayerPlan::nested(l, k, PlanStrategy::Random, &mut rng)?;
            let gen = GenerationConfig {
                sampling: Sampling::Greedy,
                max_new_tokens: n_tok,
                group_size: batch,
                ..Default::default()
            };
            let secs = best(repeats, || {
                let out = generate(&ours, std::slice::from_ref(&prompt), &plan, &gen, None)?;
                anyhow::ensure!(out.timings.generated_tokens == batch * n_tok);
                Ok(())
            })?;
            let tps = (batch * n_tok) as f64 / secs;
            if ratio == 0.0 {
                full_tps = tps;
            }
            let ideal = (l * per_layer + head) as f64 / ((l - k) * per_layer + head) as f64;
            let speedup = tps / full_tps;
            println!(
                "| {batch} | ours, skip {ratio} | {} | {tps:.1} | {:.2} | {speedup:.2} | {ideal:.2} | {:.0} % |",
                l - k,
                tps / ref_tps,
                100.0 * speedup / ideal
            );
        }
    }
    // Keep the reference's last-position semantics honest: same argmax on the prompt.
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let a = ours
        .forward(&x, &mut ForwardCtx::new(LayerPlan::full(l)))?
        .i((0, prompt.len() - 1))?
        .argmax(0)?;
    let mut cache = reference::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu)?;
    let b = reference.forward(&x, 0, &mut cache)?.i(0)?.argmax(0)?;
    anyhow::ensure!(
        a.to_scalar::<u32>()? == b.to_scalar::<u32>()?,
        "models disagree on the prompt"
    );
    Ok(())
}
