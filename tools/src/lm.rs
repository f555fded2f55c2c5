//! `generate` and `logprobs`: the model under a layer plan, from the command line.

use crate::modelargs::{ModelArgs, PlanArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use model::{
    completion_logprobs, generate as run_generation, ChatMessage, GenerationConfig, Kernels,
    LayerPlan, LoadedModel, Sampling, SamplingParams, ScoreRequest,
};
use serde_json::json;

/// Where the prompt comes from.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Raw prompt text (no chat template).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template and an assistant turn opened.
    #[arg(long)]
    pub chat: Option<String>,
}

/// `nested-reft generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: PromptArgs,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most, per completion.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass (1 disables it).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 disables it).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Completions to sample for the prompt (one batch).
    #[arg(long, short = 'n', default_value_t = 1)]
    num_samples: usize,
    /// Stop when the completion contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object per completion (tokens, log-probs, finish reason) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    plan: PlanArgs,
}

fn prompt_text(m: &LoadedModel, input: &PromptArgs, system: Option<&str>) -> Result<String> {
    match (&input.prompt, &input.chat) {
        (Some(p), None) => Ok(p.clone()),
        (None, Some(msg)) => {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", msg.as_str()));
            Ok(m.tokenizer.apply_chat_template(&messages, true)?)
        }
        _ => bail!("give exactly one of --prompt and --chat"),
    }
}

/// Runs `generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let m = args.model.load()?;
    let (plan, behavior) = args
        .plan
        .behavior(&args.model.path()?, &m.decoder, &m.tokenizer)?;
    let text = prompt_text(&m, &args.input, args.system.as_deref())?;
    let prompt = m.tokenizer.encode(&text, false)?;
    let sampling = if args.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample(SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
        })
    };
    let cfg = GenerationConfig {
        sampling,
        max_new_tokens: args.max_new_tokens,
        group_size: args.num_samples,
        seed: args.plan.seed(),
        eos_token_ids: m.tokenizer.eos_token_ids().to_vec(),
        stop_strings: args.stop.clone(),
    };
    eprintln!("plan: {plan}, {} weights", behavior.weight_format());
    let out = run_generation(&behavior, &[prompt], &plan, &cfg, Some(&m.tokenizer))
        .context("while generating")?;
    for c in &out.completions {
        let text = m.tokenizer.decode(&c.tokens, true)?;
        if args.json {
            let line = json!({
                "sample": c.sample_index,
                "text": text,
                "tokens": c.tokens,
                "logprobs": c.logprobs,
                "finish": c.finish,
                "plan": plan.layers(),
            });
            println!("{line}");
        } else {
            if args.num_samples > 1 {
                println!("--- sample {} ({:?})", c.sample_index, c.finish);
            }
            println!("{text}");
        }
    }
    let t = out.timings;
    eprintln!(
        "{} tokens in {:.2}s (prefill {:.0} ms): {:.1} tokens/s",
        t.generated_tokens,
        (t.prefill + t.decode).as_secs_f64(),
        t.prefill.as_secs_f64() * 1e3,
        t.tokens_per_second()
    );
    Ok(())
}

/// `nested-reft logprobs`.
#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Score every token of this text given the tokens before it (the first has no log-prob).
    #[arg(long, conflicts_with_all = ["prompt", "chat", "completion"])]
    text: Option<String>,
    /// With --text: apply the tokenizer's special-token post-processing (e.g. a BOS token).
    #[arg(long, requires = "text")]
    add_special_tokens: bool,
    /// Raw prompt; only the --completion tokens are scored.
    #[arg(long, requires = "completion", conflicts_with = "chat")]
    prompt: Option<String>,
    /// User message rendered with the chat template; only the --completion tokens are scored.
    #[arg(long, requires = "completion")]
    chat: Option<String>,
    /// The completion to score after --prompt or --chat.
    #[arg(long)]
    completion: Option<String>,
    /// Temperature the log-probs are computed at.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Also score under the full model and report the per-token difference (nested − full).
    #[arg(long)]
    compare_full: bool,
    #[command(flatten)]
    plan: PlanArgs,
}

/// Runs `logprobs`.
pub fn logprobs(args: LogprobsArgs) -> Result<()> {
    let m = args.model.load()?;
    let num_layers = m.decoder.config().num_layers;
    let (plan, behavior) = args
        .plan
        .behavior(&args.model.path()?, &m.decoder, &m.tokenizer)?;
    let tok = &m.tokenizer;
    let (context, scored, first_unscored) = match (&args.text, &args.completion) {
        (Some(text), None) => {
            let ids = tok.encode(text, args.add_special_tokens)?;
            if ids.is_empty() {
                bail!("--text encodes to no tokens");
            }
            (ids[..1].to_vec(), ids[1..].to_vec(), Some(ids[0]))
        }
        (None, Some(completion)) => {
            let input = crate::lm::PromptArgs {
                prompt: args.prompt.clone(),
                chat: args.chat.clone(),
            };
            let prompt = tok.encode(&prompt_text(&m, &input, None)?, false)?;
            if prompt.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            (prompt, tok.encode(completion, false)?, None)
        }
        _ => bail!("give --text, or --prompt/--chat with --completion"),
    };
    // The nested plan is scored with the behavior's weights; the full model with f32.
    let score = |plan: &LayerPlan, model: &model::Decoder| -> Result<Vec<f32>> {
        let req = ScoreRequest {
            prompt: &context,
            completion: &scored,
        };
        let lp = completion_logprobs(model, &[req], plan, args.temperature, Kernels::Fused)?;
        Ok(lp.to_vecs()?.remove(0))
    };
    let lps = if scored.is_empty() {
        Vec::new()
    } else {
        score(&plan, &behavior)?
    };
    let full = if args.compare_full && !scored.is_empty() {
        Some(score(&LayerPlan::full(num_layers), &m.decoder)?)
    } else {
        None
    };
    let mut tokens = Vec::new();
    if let Some(id) = first_unscored {
        tokens.push(json!({"id": id, "token": tok.decode(&[id], false)?, "logprob": null}));
    }
    for (i, (&id, &lp)) in scored.iter().zip(&lps).enumerate() {
        let mut entry = json!({"id": id, "token": tok.decode(&[id], false)?, "logprob": lp});
        if let Some(full) = &full {
            entry["full_logprob"] = json!(full[i]);
            entry["delta"] = json!(lp - full[i]);
        }
        tokens.push(entry);
    }
    let total: f64 = lps.iter().map(|&x| x as f64).sum();
    let mut out = json!({
        "plan": {"layers": plan.layers(), "skipped": plan.skipped(), "num_layers": num_layers},
        "temperature": args.temperature,
        "tokens": tokens,
        "total_logprob": total,
    });
    if let Some(full) = &full {
        let n = full.len().max(1) as f64;
        let mean_abs: f64 = lps
            .iter()
            .zip(full)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / n;
        out["full_total_logprob"] = json!(full.iter().map(|&x| x as f64).sum::<f64>());
        out["mean_abs_delta"] = json!(mean_abs);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).context("while writing JSON")?
    );
    Ok(())
}
