//! Per-token log-probabilities of given completions: batched, padded and differentiable.

use crate::decoder::{Decoder, ForwardCtx, Kernels};
use crate::error::{ModelError, Result};
use crate::ops;
use crate::plan::LayerPlan;
use candle_core::{DType, Tensor};

/// One sequence to score: the completion's tokens given the prompt's.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRequest<'a> {
    /// Context tokens (at least one).
    pub prompt: &'a [u32],
    /// Tokens whose log-probabilities are wanted.
    pub completion: &'a [u32],
}

/// Log-probabilities of a batch of completions, right-padded to the longest.
#[derive(Debug, Clone)]
pub struct CompletionLogProbs {
    /// (b, T): log π(y_t | x, y_<t) at real positions, 0 at padding.
    pub values: Tensor,
    /// (b, T): 1 at real positions, 0 at padding (same dtype as `values`).
    pub mask: Tensor,
    /// Real completion length of each row.
    pub lengths: Vec<usize>,
}

impl CompletionLogProbs {
    /// The log-probs of each row without padding.
    pub fn to_vecs(&self) -> Result<Vec<Vec<f32>>> {
        let rows = self.values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(rows
            .into_iter()
            .zip(&self.lengths)
            .map(|(r, &n)| r[..n].to_vec())
            .collect())
    }
}

/// Log π(y_t | x, y_<t) of every completion token under `plan`, with logits divided by
/// `temperature`. Sequences are right-padded (causal attention never sees the padding), and the
/// output head runs only at the positions that predict completion tokens. With
/// [`Kernels::Differentiable`] (or [`Kernels::Composed`]) the result back-propagates to every
/// parameter.
///
/// # Shapes
/// → values and mask (b, T), T = longest completion.
///
/// # Example
///
/// Two completions of different lengths on a tiny random model; each value is the log-softmax
/// of the logits at the position before the token, and the values back-propagate to the
/// weights of a trainable decoder.
///
/// ```
/// use model::candle_core::{DType, Device, IndexOp, Tensor};
/// use model::{
///     completion_logprobs, Architecture, Decoder, ForwardCtx, Kernels, LayerPlan, ModelConfig,
///     ScoreRequest, Weights,
/// };
///
/// let cfg = ModelConfig::tiny(Architecture::Llama, 32, 3);
/// let weights = Weights::random(&cfg, 1, DType::F32, &Device::Cpu)?;
/// let decoder = Decoder::new(&cfg, &weights, true)?;
/// let plan = LayerPlan::full(3);
/// let batch = [
///     ScoreRequest { prompt: &[1, 2], completion: &[7, 3, 9] },
///     ScoreRequest { prompt: &[5], completion: &[2] },
/// ];
/// let lp = completion_logprobs(&decoder, &batch, &plan, 1.0, Kernels::Differentiable)?;
/// assert_eq!(lp.values.dims(), &[2, 3]); // right-padded to the longest completion
/// assert_eq!(lp.lengths, vec![3, 1]);
/// assert_eq!(lp.mask.to_vec2::<f32>()?, vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]);
///
/// // The first completion token of row 0 against a plain forward pass: log softmax of the
/// // logits at the last prompt position, at token 7.
/// let tokens = Tensor::new(&[[1u32, 2, 7, 3, 9]], &Device::Cpu)?;
/// let logits = decoder.forward(&tokens, &mut ForwardCtx::new(plan.clone()))?;
/// let row: Vec<f32> = logits.i((0, 1))?.to_vec1()?;
/// let log_norm = row.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
/// let expected = f64::from(row[7]) - log_norm;
/// let got = f64::from(lp.values.i((0, 0))?.to_scalar::<f32>()?);
/// assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
///
/// // Differentiable: the summed log-probs have a gradient for every parameter.
/// let grads = lp.values.sum_all()?.backward()?;
/// assert!(decoder.vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
/// # Ok::<(), model::ModelError>(())
/// ```
pub fn completion_logprobs(
    model: &Decoder,
    batch: &[ScoreRequest<'_>],
    plan: &LayerPlan,
    temperature: f64,
    kernels: Kernels,
) -> Result<CompletionLogProbs> {
    if batch.is_empty() {
        return Err(ModelError::InvalidInput("no sequences to score".into()));
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(ModelError::InvalidSampling(format!(
            "temperature {temperature} must be a positive number"
        )));
    }
    let max_ctx = model.config().max_position_embeddings;
    let mut seq_len = 0;
    for (i, r) in batch.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} has an empty prompt"
            )));
        }
        model.check_tokens(r.prompt)?;
        model.check_tokens(r.completion)?;
        let len = r.prompt.len() + r.completion.len();
        if len > max_ctx {
            return Err(ModelError::ContextOverflow { len, max: max_ctx });
        }
        seq_len = seq_len.max(len);
    }
    let b = batch.len();
    let t_max = batch
        .iter()
        .map(|r| r.completion.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let device = model.device();

    let mut tokens = vec![0u32; b * seq_len];
    let mut pick = Vec::with_capacity(b * t_max);
    let mut targets = Vec::with_capacity(b * t_max);
    let mut mask = Vec::with_capacity(b * t_max);
    for (i, r) in batch.iter().enumerate() {
        let row = &mut tokens[i * seq_len..(i + 1) * seq_len];
        row[..r.prompt.len()].copy_from_slice(r.prompt);
        row[r.prompt.len()..r.prompt.len() + r.completion.len()].copy_from_slice(r.completion);
        for t in 0..t_max {
            let real = t < r.completion.len();
            // The hidden state at position p predicts token p + 1.
            let pos = if real { r.prompt.len() - 1 + t } else { 0 };
            pick.push((i * seq_len + pos) as u32);
            targets.push(if real { r.completion[t] } else { 0 });
            mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    let tokens = Tensor::from_vec(tokens, (b, seq_len), device)?;
    let mut ctx = ForwardCtx::new(plan.clone()).with_kernels(kernels);
    let hidden = model.forward_hidden(&tokens, &mut ctx)?;
    let hidden = hidden.reshape((b * seq_len, model.config().hidden_size))?;
    let hidden = hidden.index_select(&Tensor::from_vec(pick, b * t_max, device)?, 0)?;
    let targets = Tensor::from_vec(targets, b * t_max, device)?;
    let picked = match kernels {
        // A re-quantized head: the logits the behavior sampled from, through its own head.
        _ if model.weight_format().is_quantized() => {
            let logits = (model.project(&hidden)? / temperature)?;
            let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
            logp.gather(&targets.unsqueeze(1)?.contiguous()?, 1)?
                .squeeze(1)?
        }
        // Row chunks of logits only: the (rows × vocab) matrix is never held whole.
        Kernels::Fused | Kernels::Differentiable => {
            ops::head_logprobs(&hidden, model.head_weight(), &targets, temperature)?
        }
        Kernels::Composed => {
            ops::head_logprobs_composed(&hidden, model.head_weight(), &targets, temperature)?
        }
    };
    let picked = picked.reshape((b, t_max))?;
    let mask = Tensor::from_vec(mask, (b, t_max), device)?.to_dtype(picked.dtype())?;
    Ok(CompletionLogProbs {
        values: (picked * &mask)?,
        mask,
        lengths: batch.iter().map(|r| r.completion.len()).collect(),
    })
}
