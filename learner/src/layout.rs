//! How a batch's sequences are laid out for the target's forward and backward passes: which
//! micro-batch each goes to, whether completions share their prompt, whether rows are packed
//! or padded. The loss and gradient do not depend on the layout; the work does.

use crate::batch::{PreparedBatch, TrainSequence};
use crate::error::{LearnerError, Result};
use candle_core::Tensor;
use model::{
    completion_logprobs, packed_logprobs, Decoder, ForwardCtx, Kernels, LayerPlan, PackedLayout,
    RowLayout, ScoreRequest, SharedPrompt,
};
use serde::Serialize;
use std::collections::HashMap;

/// What the layout of one epoch computes, against the unshared padded layout (one row per
/// sequence, padded to the micro-batch's longest) of the same batch and budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LayoutStats {
    /// Positions the forward pass computes per epoch (prompts, completions and padding).
    pub computed_tokens: usize,
    /// Of these, padding.
    pub padding_tokens: usize,
    /// Prompt positions computed (each shared prompt once per segment).
    pub prompt_tokens: usize,
    /// Positions the unshared padded layout computes for the same batch.
    pub unshared_padded_tokens: usize,
    /// Prompt positions the unshared layout computes (one prompt per completion).
    pub unshared_prompt_tokens: usize,
    /// Groups of completions that share a prompt but exceed the micro-batch budget together,
    /// so their prompt is repeated in several segments.
    pub split_groups: usize,
}

impl LayoutStats {
    /// Fraction of the computed positions that are padding.
    pub fn padding_frac(&self) -> f64 {
        self.padding_tokens as f64 / self.computed_tokens.max(1) as f64
    }

    /// unshared_padded_tokens / computed_tokens: how much less the layout computes.
    pub fn saving(&self) -> f64 {
        self.unshared_padded_tokens as f64 / self.computed_tokens.max(1) as f64
    }
}

/// One micro-batch: its sequences (indices into the batch) in the order their tokens come out
/// of [`Micro::logprobs`] and [`Micro::hidden`], and how they are laid out.
#[derive(Debug)]
pub(crate) struct Micro {
    pub seqs: Vec<usize>,
    shape: Shape,
}

#[derive(Debug)]
enum Shape {
    /// One right-padded row per sequence, each with its own copy of its prompt.
    Padded,
    /// Shared-prompt segments, packed or one per row.
    Packed(PackedLayout),
}

/// Target log-probs of a micro-batch's completion tokens.
pub(crate) struct Scored {
    /// (b, T) padded, or (n) flat, as [`Scored::index`] addresses it.
    pub values: Tensor,
    /// The log-probs of each sequence (in [`Micro::seqs`] order), as f32.
    pub rows: Vec<Vec<f32>>,
    /// Row width of the padded form; `None` when flat.
    t_max: Option<usize>,
    /// Start of each sequence in the flat form.
    offsets: Vec<usize>,
}

impl Scored {
    /// Number of entries of `values` (padding included).
    pub fn len(&self) -> usize {
        self.values.elem_count()
    }

    /// The entry of `values` that holds token `t` of the `k`-th sequence of the micro-batch.
    pub fn index(&self, k: usize, t: usize) -> usize {
        match self.t_max {
            Some(t_max) => k * t_max + t,
            None => self.offsets[k] + t,
        }
    }
}

impl Micro {
    /// log π(y_t) of every completion token of the micro-batch under `plan`.
    pub fn logprobs(
        &self,
        model: &Decoder,
        batch: &PreparedBatch,
        plan: &LayerPlan,
        temperature: f64,
        kernels: Kernels,
    ) -> Result<Scored> {
        match &self.shape {
            Shape::Padded => {
                let requests: Vec<ScoreRequest<'_>> = self
                    .seqs
                    .iter()
                    .map(|&i| ScoreRequest {
                        prompt: &batch.sequences[i].prompt,
                        completion: &batch.sequences[i].completion,
                    })
                    .collect();
                let lp = completion_logprobs(model, &requests, plan, temperature, kernels)?;
                let rows = lp.to_vecs()?;
                let t_max = lp.values.dim(1)?;
                Ok(Scored {
                    values: lp.values,
                    rows,
                    t_max: Some(t_max),
                    offsets: Vec::new(),
                })
            }
            Shape::Packed(layout) => {
                let lp = packed_logprobs(model, layout, plan, temperature, kernels)?;
                let rows = lp.to_vecs()?;
                let offsets = rows
                    .iter()
                    .scan(0, |at, r| {
                        let start = *at;
                        *at += r.len();
                        Some(start)
                    })
                    .collect();
                Ok(Scored {
                    values: lp.values,
                    rows,
                    t_max: None,
                    offsets,
                })
            }
        }
    }

    /// Final hidden states at the positions that predict the completion tokens, sequence by
    /// sequence (in [`Micro::seqs`] order), under `plan`.
    ///
    /// # Shapes
    /// → (completion tokens, hidden).
    pub fn hidden(
        &self,
        model: &Decoder,
        batch: &PreparedBatch,
        plan: &LayerPlan,
        kernels: Kernels,
    ) -> Result<Tensor> {
        match &self.shape {
            Shape::Packed(layout) => Ok(layout.hidden(model, plan, kernels)?),
            Shape::Padded => {
                let seqs: Vec<&TrainSequence> =
                    self.seqs.iter().map(|&i| &batch.sequences[i]).collect();
                padded_hidden(model, &seqs, plan, kernels)
            }
        }
    }
}

/// The micro-batches of one step and what their layout computes.
#[derive(Debug)]
pub(crate) struct MicroPlan {
    pub micros: Vec<Micro>,
    pub stats: LayoutStats,
}

/// The layout switches and budget of [`plan`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayoutOptions {
    pub prefix_sharing: bool,
    pub packing: bool,
    pub budget: usize,
}

/// Splits the batch into micro-batches of at most `budget` computed positions (a single
/// sequence longer than the budget gets a micro-batch of its own).
///
/// - Neither sharing nor packing: sequences sorted by length, rows × longest ≤ budget.
/// - Sharing: the sequences with the same prompt form one segment (prompt once, then each
///   completion); a segment over the budget is split, its prompt repeated in each part.
///   Without sharing every sequence is a segment of its own.
/// - Packing: segments go back to back into one row per micro-batch (first fit, longest
///   first); without it each segment is a row, padded to the micro-batch's longest.
pub(crate) fn plan(batch: &PreparedBatch, opts: LayoutOptions) -> Result<MicroPlan> {
    let seqs = &batch.sequences;
    let mut stats = LayoutStats {
        unshared_prompt_tokens: seqs.iter().map(|s| s.prompt.len()).sum(),
        ..LayoutStats::default()
    };
    let unshared = padded_micro_batches(seqs, opts.budget);
    stats.unshared_padded_tokens = unshared
        .iter()
        .map(|m| m.len() * m.iter().map(|&i| seqs[i].len()).max().unwrap_or(0))
        .sum();
    if !opts.prefix_sharing && !opts.packing {
        stats.computed_tokens = stats.unshared_padded_tokens;
        stats.prompt_tokens = stats.unshared_prompt_tokens;
        stats.padding_tokens =
            stats.computed_tokens - seqs.iter().map(TrainSequence::len).sum::<usize>();
        let micros = unshared
            .into_iter()
            .map(|seqs| Micro {
                seqs,
                shape: Shape::Padded,
            })
            .collect();
        return Ok(MicroPlan { micros, stats });
    }

    // Segments: sequence indices whose prompt is computed once.
    let mut segments: Vec<Vec<usize>> = Vec::new();
    if opts.prefix_sharing {
        let mut by_prompt: HashMap<&[u32], usize> = HashMap::new();
        for (i, s) in seqs.iter().enumerate() {
            let k = *by_prompt.entry(&s.prompt).or_insert_with(|| {
                segments.push(Vec::new());
                segments.len() - 1
            });
            segments[k].push(i);
        }
        let mut split = Vec::with_capacity(segments.len());
        for group in segments {
            let parts = split_group(seqs, group, opts.budget);
            stats.split_groups += usize::from(parts.len() > 1);
            split.extend(parts);
        }
        segments = split;
    } else {
        segments = (0..seqs.len()).map(|i| vec![i]).collect();
    }
    let seg_len = |seg: &[usize]| -> usize {
        seqs[seg[0]].prompt.len() + seg.iter().map(|&i| seqs[i].completion.len()).sum::<usize>()
    };

    // Micro-batches of segments.
    let groups: Vec<Vec<usize>> = if opts.packing {
        // First fit, longest first: (segments, tokens) per micro-batch.
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(seg_len(&segments[k])));
        let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
        for k in order {
            let len = seg_len(&segments[k]);
            match bins.iter_mut().find(|(_, used)| used + len <= opts.budget) {
                Some((members, used)) => {
                    members.push(k);
                    *used += len;
                }
                None => bins.push((vec![k], len)),
            }
        }
        bins.into_iter().map(|(members, _)| members).collect()
    } else {
        // Rows padded to the longest: sorted ascending, rows × longest ≤ budget.
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&k| seg_len(&segments[k]));
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        for k in order {
            let len = seg_len(&segments[k]);
            if !cur.is_empty() && (cur.len() + 1) * len > opts.budget {
                out.push(std::mem::take(&mut cur));
            }
            cur.push(k);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    };

    let rows = if opts.packing {
        RowLayout::Packed
    } else {
        RowLayout::RowPerSegment
    };
    let mut micros = Vec::with_capacity(groups.len());
    for members in groups {
        let shared: Vec<SharedPrompt<'_>> = members
            .iter()
            .map(|&k| SharedPrompt {
                prompt: &seqs[segments[k][0]].prompt,
                completions: segments[k]
                    .iter()
                    .map(|&i| seqs[i].completion.as_slice())
                    .collect(),
            })
            .collect();
        let layout = PackedLayout::new(&shared, rows)?;
        stats.computed_tokens += layout.computed_tokens();
        stats.padding_tokens += layout.computed_tokens() - layout.real_tokens();
        stats.prompt_tokens += members
            .iter()
            .map(|&k| seqs[segments[k][0]].prompt.len())
            .sum::<usize>();
        micros.push(Micro {
            seqs: members
                .iter()
                .flat_map(|&k| segments[k].iter().copied())
                .collect(),
            shape: Shape::Packed(layout),
        });
    }
    Ok(MicroPlan { micros, stats })
}

/// Splits the sequences of one prompt into segments of at most `budget` positions (the prompt
/// plus as many completions as fit; at least one completion each).
fn split_group(seqs: &[TrainSequence], group: Vec<usize>, budget: usize) -> Vec<Vec<usize>> {
    let prompt = seqs[group[0]].prompt.len();
    let total = prompt
        + group
            .iter()
            .map(|&i| seqs[i].completion.len())
            .sum::<usize>();
    if total <= budget {
        return vec![group];
    }
    let mut out = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut used = prompt;
    for i in group {
        let len = seqs[i].completion.len();
        if !cur.is_empty() && used + len > budget {
            out.push(std::mem::take(&mut cur));
            used = prompt;
        }
        cur.push(i);
        used += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Sequence indices per micro-batch of the unshared padded layout: sorted by length, packed
/// while rows × longest ≤ budget.
fn padded_micro_batches(seqs: &[TrainSequence], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so this sequence is the longest of the micro-batch.
        let len = seqs[i].len();
        if !cur.is_empty() && (cur.len() + 1) * len > budget {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Final hidden states of right-padded rows at the positions that predict the completion
/// tokens, sequence by sequence.
///
/// # Shapes
/// → (completion tokens, hidden).
fn padded_hidden(
    model: &Decoder,
    seqs: &[&TrainSequence],
    plan: &LayerPlan,
    kernels: Kernels,
) -> Result<Tensor> {
    let device = model.device();
    let seq_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut tokens = vec![0u32; seqs.len() * seq_len];
    let mut pick = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let Some(last_prompt) = s.prompt.len().checked_sub(1) else {
            return Err(LearnerError::InvalidBatch(
                "a sequence has an empty prompt".into(),
            ));
        };
        let row = &mut tokens[i * seq_len..(i + 1) * seq_len];
        row[..s.prompt.len()].copy_from_slice(&s.prompt);
        row[s.prompt.len()..s.len()].copy_from_slice(&s.completion);
        // The hidden state at position p predicts token p + 1.
        pick.extend((0..s.completion.len()).map(|t| (i * seq_len + last_prompt + t) as u32));
    }
    let n = pick.len();
    let tokens = Tensor::from_vec(tokens, (seqs.len(), seq_len), device)?;
    let mut ctx = ForwardCtx::new(plan.clone()).with_kernels(kernels);
    let h = model.forward_hidden(&tokens, &mut ctx)?;
    let (b, s, d) = h.dims3()?;
    let pick = Tensor::from_vec(pick, n, device)?;
    Ok(h.reshape((b * s, d))?.index_select(&pick, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(prompt: &[u32], completion_len: usize) -> TrainSequence {
        TrainSequence {
            prompt: prompt.to_vec(),
            completion: vec![1; completion_len],
            behavior_logprobs: vec![-1.0; completion_len],
            advantage: 1.0,
        }
    }

    fn batch(seqs: Vec<TrainSequence>) -> PreparedBatch {
        PreparedBatch {
            sequences: seqs,
            ..PreparedBatch::default()
        }
    }

    fn opts(prefix_sharing: bool, packing: bool, budget: usize) -> LayoutOptions {
        LayoutOptions {
            prefix_sharing,
            packing,
            budget,
        }
    }

    #[test]
    fn shared_prompts_are_computed_once_and_rows_are_not_padded() {
        // Two groups: prompt of 5 with completions 3, 1, 4; prompt of 2 with completions 6, 2.
        let a = [7u32, 7, 7, 7, 7];
        let b = [8u32, 8];
        let bt = batch(vec![
            seq(&a, 3),
            seq(&b, 6),
            seq(&a, 1),
            seq(&a, 4),
            seq(&b, 2),
        ]);
        let p = plan(&bt, opts(true, true, 100)).unwrap();
        assert_eq!(p.micros.len(), 1);
        let s = p.stats;
        assert_eq!(s.computed_tokens, (5 + 8) + (2 + 8));
        assert_eq!(s.padding_tokens, 0);
        assert_eq!(s.prompt_tokens, 7);
        assert_eq!(s.unshared_prompt_tokens, 5 * 3 + 2 * 2);
        // Unshared padded: one micro-batch of 5 rows × the longest (5 + 4).
        assert_eq!(s.unshared_padded_tokens, 5 * 9);
        assert_eq!(s.split_groups, 0);
        let mut seqs = p.micros[0].seqs.clone();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4], "every sequence once");

        // Sharing without packing: one padded row per group.
        let p = plan(&bt, opts(true, false, 100)).unwrap();
        assert_eq!(p.stats.computed_tokens, 2 * 13);
        assert_eq!(p.stats.padding_tokens, 3);
        // Packing without sharing: every sequence with its prompt, back to back.
        let p = plan(&bt, opts(false, true, 100)).unwrap();
        assert_eq!(p.stats.computed_tokens, 8 + 8 + 6 + 9 + 4);
        assert_eq!(p.stats.padding_tokens, 0);
        // Neither: today's layout exactly.
        let p = plan(&bt, opts(false, false, 100)).unwrap();
        assert_eq!(p.stats.computed_tokens, p.stats.unshared_padded_tokens);
        assert!(matches!(p.micros[0].shape, Shape::Padded));
    }

    #[test]
    fn a_group_over_the_budget_is_split_with_its_prompt_repeated() {
        let a = [7u32; 4];
        let bt = batch(vec![seq(&a, 5), seq(&a, 5), seq(&a, 5), seq(&[9], 2)]);
        // 4 + 15 = 19 > 12: parts of the prompt + two completions (14 > 12, so one each)...
        let p = plan(&bt, opts(true, true, 12)).unwrap();
        assert_eq!(p.stats.split_groups, 1);
        assert_eq!(p.stats.prompt_tokens, 3 * 4 + 1);
        for m in &p.micros {
            let Shape::Packed(l) = &m.shape else {
                panic!("packed")
            };
            assert!(l.computed_tokens() <= 12, "{}", l.computed_tokens());
        }
        // ...and with room for two completions, two parts.
        let p = plan(&bt, opts(true, true, 14)).unwrap();
        assert_eq!(p.stats.split_groups, 1);
        assert_eq!(p.stats.prompt_tokens, 2 * 4 + 1);
        // A single sequence over the budget still gets a micro-batch.
        let p = plan(&bt, opts(true, true, 3)).unwrap();
        assert_eq!(p.micros.len(), 4);
    }
}
