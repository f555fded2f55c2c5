//! Batched generation: G completions for each of several prompts, with the behavior
//! log-probability of every sampled token.

use crate::decoder::{Decoder, ForwardCtx};
use crate::error::{ModelError, Result};
use crate::plan::LayerPlan;
use crate::sampling::{stream_seed, Sampler, Sampling};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

pub use protocol::FinishReason;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Upper bound on generated tokens per completion.
    pub max_new_tokens: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Seed; completion g of prompt p uses its own stream derived from (seed, p, g).
    pub seed: u64,
    /// Token ids that end a completion.
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a completion once its decoded text contains them.
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            sampling: Sampling::default(),
            max_new_tokens: 256,
            group_size: 1,
            seed: 0,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of its prompt in the request.
    pub prompt_index: usize,
    /// Index within its group, `0..G`.
    pub sample_index: usize,
    /// Generated tokens (the EOS token included when it ended the completion).
    pub tokens: Vec<u32>,
    /// log μ(y_t | ·) of each token under the distribution actually sampled from.
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationTimings {
    /// Prompt processing.
    pub prefill: Duration,
    /// Token-by-token decoding (sampling included).
    pub decode: Duration,
    /// Tokens generated over all completions.
    pub generated_tokens: usize,
}

impl GenerationTimings {
    /// Generated tokens per second of wall time (prefill included).
    pub fn tokens_per_second(&self) -> f64 {
        let secs = (self.prefill + self.decode).as_secs_f64();
        if secs > 0.0 {
            self.generated_tokens as f64 / secs
        } else {
            0.0
        }
    }
}

/// Completions in prompt-major order (all of prompt 0, then prompt 1, …) and timings.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// `prompts.len() · G` completions.
    pub completions: Vec<Completion>,
    /// Timings.
    pub timings: GenerationTimings,
}

struct Row {
    index: usize,
    sampler: Sampler,
}

/// Where each step's tokens are drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawSite {
    /// On the host: the logits are copied over and each row's [`Sampler`] draws.
    Host,
    /// On the model's device ([`crate::draw`]): only the chosen ids and log-probs are copied
    /// to the host. Truncated sampling (top-p, top-k) is drawn on the host all the same.
    Device,
}

impl DrawSite {
    /// The device for a model off the CPU, where copying the logits would cost a transfer per
    /// step; the host on the CPU, where the logits already are.
    pub fn for_model(model: &Decoder) -> Self {
        if model.device().is_cpu() {
            Self::Host
        } else {
            Self::Device
        }
    }
}

/// Generates `cfg.group_size` completions for each prompt with the layers of `plan`.
///
/// Prompts are left-padded and prefilled once; the cache is then repeated for the G samples,
/// and finished rows are dropped from the batch as they end. Stop strings need `tokenizer`.
/// Tokens are drawn where [`DrawSite::for_model`] says.
///
/// Each completion carries the behavior log-prob of every token it sampled: scoring the same
/// tokens with [`completion_logprobs`](crate::completion_logprobs) under the same plan and
/// temperature gives them back.
///
/// ```
/// use model::candle_core::{DType, Device};
/// use model::{
///     completion_logprobs, generate, Architecture, Decoder, GenerationConfig, Kernels,
///     LayerPlan, ModelConfig, Sampling, ScoreRequest, Weights,
/// };
///
/// let cfg = ModelConfig::tiny(Architecture::Llama, 32, 4);
/// let decoder = Decoder::new(&cfg, &Weights::random(&cfg, 0, DType::F32, &Device::Cpu)?, false)?;
/// let behavior = LayerPlan::skipping(&[1], 4)?;
/// let gen = GenerationConfig {
///     sampling: Sampling::temperature(0.8),
///     max_new_tokens: 6,
///     group_size: 3,
///     seed: 11,
///     ..GenerationConfig::default()
/// };
/// let prompts = [vec![1u32, 2, 3], vec![4u32]];
/// let out = generate(&decoder, &prompts, &behavior, &gen, None)?;
/// assert_eq!(out.completions.len(), 2 * 3); // prompt-major: G completions per prompt
/// for c in &out.completions {
///     assert_eq!(c.tokens.len(), 6); // no EOS configured: each runs to max_new_tokens
///     let scored = completion_logprobs(
///         &decoder,
///         &[ScoreRequest { prompt: &prompts[c.prompt_index], completion: &c.tokens }],
///         &behavior,
///         0.8,
///         Kernels::Fused,
///     )?
///     .to_vecs()?;
///     for (recorded, rescored) in c.logprobs.iter().zip(&scored[0]) {
///         assert!((recorded - rescored).abs() < 1e-4, "{recorded} vs {rescored}");
///     }
/// }
/// # Ok::<(), model::ModelError>(())
/// ```
pub fn generate(
    model: &Decoder,
    prompts: &[Vec<u32>],
    plan: &LayerPlan,
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<GenerationOutput> {
    generate_drawing_at(
        model,
        prompts,
        plan,
        cfg,
        tokenizer,
        DrawSite::for_model(model),
    )
}

/// As [`generate`], drawing the tokens at `site`. Each sequence keeps its own random stream
/// at either site, so both draw the same tokens up to float summation order.
pub fn generate_drawing_at(
    model: &Decoder,
    prompts: &[Vec<u32>],
    plan: &LayerPlan,
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    site: DrawSite,
) -> Result<GenerationOutput> {
    cfg.sampling.validate()?;
    if prompts.is_empty() {
        return Err(ModelError::InvalidInput("no prompts".into()));
    }
    if cfg.group_size == 0 {
        return Err(ModelError::InvalidInput(
            "group_size must be at least 1".into(),
        ));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ModelError::InvalidInput(
            "stop strings need a tokenizer".into(),
        ));
    }
    plan.check_for(model.config().num_layers)?;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::InvalidInput(format!("prompt {i} is empty")));
        }
        model.check_tokens(p)?;
    }
    model.check_tokens(&cfg.eos_token_ids)?;
    let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = prompt_len + cfg.max_new_tokens;
    let max_ctx = model.config().max_position_embeddings;
    if capacity > max_ctx {
        return Err(ModelError::ContextOverflow {
            len: capacity,
            max: max_ctx,
        });
    }
    let g = cfg.group_size;
    let n = prompts.len() * g;
    let mut completions: Vec<Completion> = (0..n)
        .map(|i| Completion {
            prompt_index: i / g,
            sample_index: i % g,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    let mut timings = GenerationTimings::default();
    if cfg.max_new_tokens == 0 {
        return Ok(GenerationOutput {
            completions,
            timings,
        });
    }
    let device = model.device();

    // Prefill each distinct prompt once.
    let start = Instant::now();
    let pads: Vec<usize> = prompts.iter().map(|p| prompt_len - p.len()).collect();
    let mut padded = Vec::with_capacity(prompts.len() * prompt_len);
    for (p, &pad) in prompts.iter().zip(&pads) {
        padded.extend(std::iter::repeat_n(0u32, pad));
        padded.extend_from_slice(p);
    }
    let tokens = Tensor::from_vec(padded, (prompts.len(), prompt_len), device)?;
    let mut ctx = ForwardCtx::new(plan.clone())
        .with_cache(capacity)
        .with_left_padding(pads);
    let hidden = model.forward_hidden(&tokens, &mut ctx)?;
    let last = hidden.narrow(1, prompt_len - 1, 1)?;
    let mut logits = model.project(&last)?.squeeze(1)?;
    if g > 1 {
        let rows: Vec<usize> = (0..n).map(|i| i / g).collect();
        ctx.select_rows(&rows, device)?;
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            n,
            device,
        )?;
        logits = logits.index_select(&idx, 0)?;
    }
    timings.prefill = start.elapsed();

    let start = Instant::now();
    let mut active: Vec<Row> = (0..n)
        .map(|i| {
            let seed = stream_seed(cfg.seed, (i / g) as u64, (i % g) as u64);
            Sampler::new(cfg.sampling, seed).map(|sampler| Row { index: i, sampler })
        })
        .collect::<Result<_>>()?;
    let truncated = !matches!(cfg.sampling, Sampling::Greedy) && !cfg.sampling.is_untruncated();
    for step in 0..cfg.max_new_tokens {
        let draws = match site {
            DrawSite::Device if !truncated => draw_on_device(&logits, &mut active)?,
            _ => {
                let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                active
                    .iter_mut()
                    .zip(&rows)
                    .map(|(row, row_logits)| row.sampler.sample(row_logits))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let mut keep = Vec::with_capacity(active.len());
        let mut next = Vec::with_capacity(active.len());
        for (r, (row, (tok, lp))) in active.iter().zip(draws).enumerate() {
            let c = &mut completions[row.index];
            c.tokens.push(tok);
            c.logprobs.push(lp);
            timings.generated_tokens += 1;
            if cfg.eos_token_ids.contains(&tok) {
                c.finish = FinishReason::Eos;
            } else if let Some(s) = stop_hit(&cfg.stop_strings, tokenizer, &c.tokens)? {
                c.finish = FinishReason::Stop(s);
            } else {
                keep.push(r);
                next.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if keep.len() < active.len() {
            ctx.select_rows(&keep, device)?;
            // `keep` is ascending, so a binary search tells which rows survive.
            active = std::mem::take(&mut active)
                .into_iter()
                .enumerate()
                .filter(|(r, _)| keep.binary_search(r).is_ok())
                .map(|(_, row)| row)
                .collect();
        }
        let input = Tensor::from_vec(next, (active.len(), 1), device)?;
        let hidden = model.forward_hidden(&input, &mut ctx)?;
        logits = model.project(&hidden)?.squeeze(1)?;
    }
    timings.decode = start.elapsed();
    Ok(GenerationOutput {
        completions,
        timings,
    })
}

/// One draw per active row on the logits' device (greedy or untruncated sampling): each row's
/// uniform comes from its own stream; a row the device cannot draw is drawn on the host from
/// its copied logits, with the same uniform.
fn draw_on_device(logits: &Tensor, active: &mut [Row]) -> Result<Vec<(u32, f32)>> {
    let Some(first) = active.first() else {
        return Ok(Vec::new());
    };
    let inv_t = match first.sampler.sampling() {
        Sampling::Greedy => {
            let ids = crate::draw::argmax_rows(logits)?;
            return Ok(ids.into_iter().map(|id| (id, 0.0)).collect());
        }
        Sampling::Sample(p) => 1.0 / f64::from(p.temperature),
    };
    let uniforms: Vec<f64> = active
        .iter_mut()
        .map(|r| r.sampler.next_uniform())
        .collect();
    let draws = crate::draw::draw_rows(logits, inv_t, &uniforms)?;
    draws
        .into_iter()
        .enumerate()
        .map(|(r, d)| match d {
            Some(d) => Ok(d),
            None => {
                let row = logits.get(r)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                active[r].sampler.sample_with(&row, uniforms[r])
            }
        })
        .collect()
}

/// The first stop string the decoded completion now contains, if any. Only the tail that the
/// last token can have completed is decoded.
fn stop_hit(
    stops: &[String],
    tokenizer: Option<&Tokenizer>,
    tokens: &[u32],
) -> Result<Option<String>> {
    let Some(tok) = tokenizer else {
        return Ok(None);
    };
    if stops.is_empty() {
        return Ok(None);
    }
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    // Each token decodes to at least one byte, so `longest` tokens (plus slack for partial
    // UTF-8) cover any stop string that ends in the newest token.
    let tail = &tokens[tokens.len().saturating_sub(longest + 4)..];
    let before = &tail[..tail.len() - 1];
    let text = tok.decode(tail, false)?;
    let prev = tok.decode(before, false)?;
    Ok(stops
        .iter()
        .find(|s| text.contains(s.as_str()) && !prev.contains(s.as_str()))
        .cloned())
}
