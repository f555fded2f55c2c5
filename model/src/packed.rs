//! Packed scoring: completions that share a prompt are laid out once (the prompt, then each
//! completion), and several such segments share a row without padding between them.
//!
//! Inside a segment every completion attends to the prompt and to its own earlier tokens only,
//! and its positions (RoPE) restart at the prompt's length, so each completion sees exactly
//! what it would see alone after its prompt: the log-probs, and their gradients, are those of
//! the unshared padded batch ([`crate::completion_logprobs`]). The prompt is computed once
//! per segment and its gradient accumulates from every completion (as "Prefix Grouper",
//! arXiv 2506.05433, does for GRPO).

use crate::decoder::{Decoder, ForwardCtx, Kernels};
use crate::error::{ModelError, Result};
use crate::ops::{self, AttnSegment};
use crate::plan::LayerPlan;
use candle_core::{DType, Tensor};

/// Completions scored after one shared prompt.
#[derive(Debug, Clone)]
pub struct SharedPrompt<'a> {
    /// Context tokens (at least one).
    pub prompt: &'a [u32],
    /// Completions to score after it (at least one; a completion may be empty).
    pub completions: Vec<&'a [u32]>,
}

impl SharedPrompt<'_> {
    /// Tokens the segment occupies in a row: the prompt once plus every completion.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completions.iter().map(|c| c.len()).sum::<usize>()
    }

    /// Whether the segment has no tokens at all (never true for a valid one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the segments of a [`PackedLayout`] are placed in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLayout {
    /// Every segment in one row, back to back: no padding at all.
    Packed,
    /// One segment per row, rows right-padded to the longest.
    RowPerSegment,
}

/// Where one segment sits and how its completions are laid out.
#[derive(Debug, Clone)]
struct Span {
    row: usize,
    start: usize,
    prompt_len: usize,
    completion_lens: Vec<usize>,
}

impl Span {
    fn len(&self) -> usize {
        self.prompt_len + self.completion_lens.iter().sum::<usize>()
    }
}

/// A batch of [`SharedPrompt`] segments laid out in rows, ready to score with
/// [`packed_logprobs`] (or [`PackedLayout::hidden`]).
///
/// Completion `j` of the batch is the `j`-th completion in segment order; its log-probs are
/// the `j`-th entry of [`PackedLogProbs::to_vecs`].
#[derive(Debug, Clone)]
pub struct PackedLayout {
    rows: usize,
    row_len: usize,
    /// (rows · row_len) token ids, 0 at padding.
    tokens: Vec<u32>,
    /// (rows · row_len) RoPE positions, 0 at padding.
    positions: Vec<u32>,
    spans: Vec<Span>,
    /// Flat (row · row_len + position) index of the hidden state predicting each completion
    /// token, completion by completion.
    pick: Vec<u32>,
    /// The completion tokens, in the same order.
    targets: Vec<u32>,
    /// Tokens of each completion.
    lengths: Vec<usize>,
}

impl PackedLayout {
    /// Lays out `segments` in rows. Each needs a non-empty prompt and at least one completion.
    pub fn new(segments: &[SharedPrompt<'_>], rows: RowLayout) -> Result<Self> {
        if segments.is_empty() {
            return Err(ModelError::InvalidInput("no sequences to score".into()));
        }
        for (i, seg) in segments.iter().enumerate() {
            if seg.prompt.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "segment {i} has an empty prompt"
                )));
            }
            if seg.completions.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "segment {i} has no completion"
                )));
            }
        }
        let mut spans = Vec::with_capacity(segments.len());
        let mut row_len = 0;
        let mut at = 0;
        for (i, seg) in segments.iter().enumerate() {
            let (row, start) = match rows {
                RowLayout::Packed => (0, at),
                RowLayout::RowPerSegment => (i, 0),
            };
            let span = Span {
                row,
                start,
                prompt_len: seg.prompt.len(),
                completion_lens: seg.completions.iter().map(|c| c.len()).collect(),
            };
            at = start + span.len();
            row_len = row_len.max(at);
            spans.push(span);
        }
        let n_rows = match rows {
            RowLayout::Packed => 1,
            RowLayout::RowPerSegment => segments.len(),
        };
        let mut tokens = vec![0u32; n_rows * row_len];
        let mut positions = vec![0u32; n_rows * row_len];
        let (mut pick, mut targets, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
        for (seg, span) in segments.iter().zip(&spans) {
            let base = span.row * row_len + span.start;
            let p = span.prompt_len;
            tokens[base..base + p].copy_from_slice(seg.prompt);
            for (i, pos) in positions[base..base + p].iter_mut().enumerate() {
                *pos = i as u32;
            }
            let mut at = base + p;
            for c in &seg.completions {
                tokens[at..at + c.len()].copy_from_slice(c);
                for (t, pos) in positions[at..at + c.len()].iter_mut().enumerate() {
                    *pos = (p + t) as u32;
                }
                // Token 0 is predicted by the prompt's last position, token t by token t − 1.
                for t in 0..c.len() {
                    let from = if t == 0 { base + p - 1 } else { at + t - 1 };
                    pick.push(from as u32);
                }
                targets.extend_from_slice(c);
                lengths.push(c.len());
                at += c.len();
            }
        }
        Ok(Self {
            rows: n_rows,
            row_len,
            tokens,
            positions,
            spans,
            pick,
            targets,
            lengths,
        })
    }

    /// Rows × row length: the positions a forward pass computes, padding included.
    pub fn computed_tokens(&self) -> usize {
        self.rows * self.row_len
    }

    /// Positions that hold a token (prompts counted once per segment).
    pub fn real_tokens(&self) -> usize {
        self.spans.iter().map(Span::len).sum()
    }

    /// Completion tokens scored.
    pub fn completion_tokens(&self) -> usize {
        self.targets.len()
    }

    /// Tokens of each completion, in order.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Rows of the layout.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The longest position any token has, plus one (what must fit the context window).
    fn context_needed(&self) -> usize {
        self.spans
            .iter()
            .map(|s| s.prompt_len + s.completion_lens.iter().copied().max().unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// The attention segments, each with its mask: a prompt position sees the earlier prompt
    /// positions; a completion position sees the whole prompt and its own completion up to
    /// itself.
    fn attn_segments(
        &self,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Vec<AttnSegment>> {
        let mut out = Vec::with_capacity(self.spans.len());
        for span in &self.spans {
            let len = span.len();
            // Which part of the segment each position belongs to: 0 = prompt, c + 1 = completion c.
            let mut part = vec![0u32; span.prompt_len];
            for (c, &n) in span.completion_lens.iter().enumerate() {
                part.extend(std::iter::repeat_n(c as u32 + 1, n));
            }
            let mut mask = vec![0f32; len * len];
            for q in 0..len {
                for (j, m) in mask[q * len..(q + 1) * len].iter_mut().enumerate() {
                    if j > q || (part[j] != 0 && part[j] != part[q]) {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (1, 1, 1, len, len), device)?.to_dtype(dtype)?;
            out.push(AttnSegment {
                row: span.row,
                start: span.start,
                len,
                mask,
            });
        }
        Ok(out)
    }

    /// Final (normed) hidden states at the positions that predict the completion tokens, in
    /// completion order, under `plan`.
    ///
    /// # Shapes
    /// → (completion tokens, hidden).
    pub fn hidden(&self, model: &Decoder, plan: &LayerPlan, kernels: Kernels) -> Result<Tensor> {
        model.check_tokens(&self.tokens)?;
        let max = model.config().max_position_embeddings;
        let needed = self.context_needed();
        if needed > max {
            return Err(ModelError::ContextOverflow { len: needed, max });
        }
        if self.pick.is_empty() {
            return Err(ModelError::InvalidInput(
                "no completion tokens to score".into(),
            ));
        }
        let device = model.device();
        let tokens = Tensor::from_vec(self.tokens.clone(), (self.rows, self.row_len), device)?;
        let positions = Tensor::from_vec(self.positions.clone(), self.rows * self.row_len, device)?;
        let mut ctx = ForwardCtx::new(plan.clone())
            .with_kernels(kernels)
            .with_segments(positions, self.attn_segments(model.dtype(), device)?);
        let hidden = model.forward_hidden(&tokens, &mut ctx)?;
        let hidden = hidden.reshape((self.rows * self.row_len, model.config().hidden_size))?;
        let pick = Tensor::from_vec(self.pick.clone(), self.pick.len(), device)?;
        Ok(hidden.index_select(&pick, 0)?)
    }
}

/// Log-probabilities of the completions of a [`PackedLayout`], flat.
#[derive(Debug, Clone)]
pub struct PackedLogProbs {
    /// (n): log π(y_t | x, y_<t) of every completion token, completion after completion.
    pub values: Tensor,
    /// Tokens of each completion.
    pub lengths: Vec<usize>,
}

impl PackedLogProbs {
    /// The log-probs of each completion.
    pub fn to_vecs(&self) -> Result<Vec<Vec<f32>>> {
        let flat = self.values.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.lengths.len());
        let mut at = 0;
        for &n in &self.lengths {
            out.push(flat[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }
}

/// Log π(y_t | x, y_<t) of every completion token of `layout` under `plan`, logits divided by
/// `temperature`: the values of [`crate::completion_logprobs`] on the same completions, from a
/// layout that computes each segment's prompt once and pads nothing (with
/// [`RowLayout::Packed`]). With [`Kernels::Differentiable`] (or [`Kernels::Composed`]) the
/// result back-propagates to every parameter; a shared prompt's gradient sums over its
/// completions.
///
/// # Shapes
/// → values (n), n = completion tokens.
pub fn packed_logprobs(
    model: &Decoder,
    layout: &PackedLayout,
    plan: &LayerPlan,
    temperature: f64,
    kernels: Kernels,
) -> Result<PackedLogProbs> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(ModelError::InvalidSampling(format!(
            "temperature {temperature} must be a positive number"
        )));
    }
    let hidden = layout.hidden(model, plan, kernels)?;
    let n = layout.targets.len();
    let targets = Tensor::from_vec(layout.targets.clone(), n, model.device())?;
    let values = if model.weight_format().is_quantized() {
        // A re-quantized head: the logits the behavior sampled from, through its own head.
        let logits = (model.project(&hidden)? / temperature)?;
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        logp.gather(&targets.unsqueeze(1)?.contiguous()?, 1)?
            .squeeze(1)?
    } else {
        match kernels {
            // Row chunks of logits only: the (rows × vocab) matrix is never held whole.
            Kernels::Fused | Kernels::Differentiable => {
                ops::head_logprobs(&hidden, model.head_weight(), &targets, temperature)?
            }
            Kernels::Composed => {
                ops::head_logprobs_composed(&hidden, model.head_weight(), &targets, temperature)?
            }
        }
    };
    Ok(PackedLogProbs {
        values,
        lengths: layout.lengths.clone(),
    })
}
