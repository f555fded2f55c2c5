//! Calibration: how far each skippable unit moves the model, and cost-ordered skip sets found
//! by greedy search, kept in a [`Profile`] (a data type of its own module, which depends on the
//! layer plan only; this module produces it and re-exports it).
//!
//! The measure is the per-token KL(π_full ‖ π_nested) over the vocabulary at temperature 1,
//! averaged over the completion tokens of a calibration set (by default the full model's own
//! greedy completions); the cost is the weights a decoded token reads
//! ([`LayerPlan::cost_ratio`]). The search starts from the full plan and adds, one at a time,
//! the unit with the smallest KL increase per unit of cost saved, the increase measured with
//! the set so far (not summed from single-unit numbers). It evaluates lazily: a candidate's
//! last measured increase is kept, and only the candidate at the top is re-measured against
//! the current set; it is taken when its fresh ratio still beats every other candidate's last
//! one. Each evaluation resumes from the hidden state entering the first layer it changes, so a
//! unit near the output costs a few layers, not a whole forward pass.

use crate::config::ModelConfig;
use crate::decoder::{Decoder, ForwardCtx};
use crate::error::{ModelError, Result};
use crate::plan::LayerPlan;
use crate::unit::Unit;
use candle_core::{DType, Tensor, D};

pub use crate::profile::{CalibrationInfo, Profile, SkipSet, UnitMeasure, PROFILE_FORMAT};

/// A fingerprint of a decoder's weights: a hash over every parameter's name and its first
/// and last values (cheap; tells a checkpoint apart from its base model).
pub fn weights_fingerprint(decoder: &Decoder) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in decoder.named_parameters() {
        h.update(name.as_bytes());
        let flat = t.flatten_all()?.to_dtype(DType::F32)?;
        let n = flat.dim(0)?;
        let k = n.min(256);
        for part in [flat.narrow(0, 0, k)?, flat.narrow(0, n - k, k)?] {
            for v in part.to_vec1::<f32>()? {
                h.update(v.to_le_bytes());
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// One calibration sequence: a prompt and a completion whose tokens the KL is averaged over.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSequence {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Completion tokens (at least one).
    pub completion: Vec<u32>,
}

/// Settings of [`calibrate`].
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateConfig {
    /// Stop adding units once a set's cost ratio is at or below this (e.g. 0.6 = an ideal
    /// speedup of 1.67x).
    pub min_cost_ratio: f64,
    /// The units the search may skip (default: every layer, attention block and MLP block).
    pub candidates: Option<Vec<Unit>>,
    /// Sequences per forward batch.
    pub batch: usize,
    /// A description of the data for the profile.
    pub source: String,
}

impl Default for CalibrateConfig {
    fn default() -> Self {
        Self {
            min_cost_ratio: 0.6,
            candidates: None,
            batch: 8,
            source: String::new(),
        }
    }
}

/// Where [`calibrate`] is, for a progress display.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrateProgress {
    /// Measuring single units: `done` of `total`.
    Units {
        /// Units measured.
        done: usize,
        /// Units to measure.
        total: usize,
    },
    /// The search took a unit: the set now has this cost ratio and KL.
    Set {
        /// Units in the set.
        size: usize,
        /// Its cost ratio.
        cost_ratio: f64,
        /// Its KL.
        kl: f64,
        /// The cost ratio the search stops at.
        target: f64,
    },
}

/// The reference distributions and per-layer states of one batch of calibration sequences.
struct Chunk {
    tokens: Tensor,
    pads: Vec<usize>,
    /// Rows of the flattened (b·s) hidden states that predict a completion token.
    pick: Tensor,
    /// π_full over the vocabulary at those rows, (n, vocab).
    ref_p: Tensor,
    /// Σ_v p log p per row, (n).
    ref_neg_entropy: Tensor,
    /// The hidden state entering each layer under the current base plan.
    inputs: Vec<Option<Tensor>>,
}

/// Measures KL(π_full ‖ π_plan) on a fixed calibration set, resuming each evaluation from the
/// first layer where the plan departs from a base plan whose layer inputs are kept.
pub struct KlProbe<'a> {
    decoder: &'a Decoder,
    chunks: Vec<Chunk>,
    tokens: usize,
    base: LayerPlan,
    evaluations: usize,
    /// The last plan evaluated without rebasing: its KL and layer inputs per chunk.
    last: Option<MeasuredPlan>,
}

type MeasuredPlan = (LayerPlan, f64, Vec<Vec<Option<Tensor>>>);

impl std::fmt::Debug for KlProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlProbe")
            .field("chunks", &self.chunks.len())
            .field("tokens", &self.tokens)
            .field("base", &self.base)
            .finish()
    }
}

impl<'a> KlProbe<'a> {
    /// Runs the full model once over `data` (in batches of `batch`) and keeps its
    /// distributions at every completion position.
    pub fn new(decoder: &'a Decoder, data: &[CalibrationSequence], batch: usize) -> Result<Self> {
        if data.is_empty() {
            return Err(ModelError::InvalidInput(
                "the calibration set is empty".into(),
            ));
        }
        let num_layers = decoder.config().num_layers;
        let full = LayerPlan::full(num_layers);
        let mut chunks = Vec::new();
        let mut tokens = 0;
        for part in data.chunks(batch.max(1)) {
            let chunk = Self::chunk(decoder, part, &full)?;
            tokens += chunk.pick.dim(0)?;
            chunks.push(chunk);
        }
        Ok(Self {
            decoder,
            chunks,
            tokens,
            base: full,
            evaluations: 0,
            last: None,
        })
    }

    fn chunk(decoder: &Decoder, part: &[CalibrationSequence], full: &LayerPlan) -> Result<Chunk> {
        let device = decoder.device();
        let len = part
            .iter()
            .map(|s| s.prompt.len() + s.completion.len())
            .max()
            .unwrap_or(0);
        let b = part.len();
        let mut ids = Vec::with_capacity(b * len);
        let mut pads = Vec::with_capacity(b);
        let mut pick = Vec::new();
        for (i, s) in part.iter().enumerate() {
            if s.prompt.is_empty() || s.completion.is_empty() {
                return Err(ModelError::InvalidInput(
                    "a calibration sequence needs a prompt and a completion".into(),
                ));
            }
            let n = s.prompt.len() + s.completion.len();
            let pad = len - n;
            pads.push(pad);
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(&s.prompt);
            ids.extend_from_slice(&s.completion);
            // The state at position p predicts token p + 1.
            let first = pad + s.prompt.len() - 1;
            pick.extend((first..first + s.completion.len()).map(|p| (i * len + p) as u32));
        }
        let tokens = Tensor::from_vec(ids, (b, len), device)?;
        let n = pick.len();
        let pick = Tensor::from_vec(pick, n, device)?;
        let mut ctx = ForwardCtx::new(full.clone())
            .with_left_padding(pads.clone())
            .record_layer_inputs();
        let hidden = decoder.forward_hidden(&tokens, &mut ctx)?;
        let ref_logp = Self::logp_at(decoder, &hidden, &pick)?;
        let ref_p = ref_logp.exp()?;
        let ref_neg_entropy = (&ref_p * &ref_logp)?.sum(D::Minus1)?;
        Ok(Chunk {
            tokens,
            pads,
            pick,
            ref_p,
            ref_neg_entropy,
            inputs: ctx.take_layer_inputs(),
        })
    }

    fn logp_at(decoder: &Decoder, hidden: &Tensor, pick: &Tensor) -> Result<Tensor> {
        let h = decoder.config().hidden_size;
        let (b, s, _) = hidden.dims3()?;
        let rows = hidden.reshape((b * s, h))?.index_select(pick, 0)?;
        let logits = decoder.project(&rows)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Completion tokens the KL is averaged over.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Forward evaluations run so far.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// The first layer where `plan` differs from the base plan.
    fn first_difference(&self, plan: &LayerPlan) -> usize {
        (0..plan.num_layers())
            .find(|&l| {
                plan.runs_attn(l) != self.base.runs_attn(l)
                    || plan.runs_mlp(l) != self.base.runs_mlp(l)
            })
            .unwrap_or(plan.num_layers())
    }

    /// Mean per-token KL(π_full ‖ π_plan) in nats. With `rebase`, `plan` becomes the base the
    /// next evaluations resume from. The layer inputs of the last evaluated plan are kept, so
    /// rebasing to the plan just measured (the greedy search takes the candidate it has just
    /// re-measured) costs no second evaluation.
    pub fn kl(&mut self, plan: &LayerPlan, rebase: bool) -> Result<f64> {
        plan.check_for(self.decoder.config().num_layers)?;
        let (kl, inputs) = match self.last.take() {
            Some((p, kl, inputs)) if &p == plan => (kl, inputs),
            _ => self.measure(plan)?,
        };
        if rebase {
            for (chunk, inputs) in self.chunks.iter_mut().zip(inputs) {
                chunk.inputs = inputs;
            }
            self.base = plan.clone();
        } else {
            self.last = Some((plan.clone(), kl, inputs));
        }
        Ok(kl)
    }

    /// Evaluates `plan` from the first layer where it departs from the base; returns the KL and
    /// the hidden state entering every layer under `plan`, per chunk.
    fn measure(&mut self, plan: &LayerPlan) -> Result<(f64, Vec<Vec<Option<Tensor>>>)> {
        self.evaluations += 1;
        let from = self.first_difference(plan);
        let mut total = 0f64;
        let mut all_inputs = Vec::with_capacity(self.chunks.len());
        for chunk in &self.chunks {
            let mut ctx = ForwardCtx::new(plan.clone())
                .with_left_padding(chunk.pads.clone())
                .record_layer_inputs();
            if from < plan.num_layers() {
                let x = chunk.inputs[from].clone().ok_or_else(|| {
                    ModelError::InvalidInput("calibration layer inputs are missing".into())
                })?;
                ctx = ctx.resume_at(from, x);
            } else if let Some(x) = chunk.inputs.last().cloned().flatten() {
                // Same plan as the base: resume at the last layer.
                ctx = ctx.resume_at(plan.num_layers() - 1, x);
            }
            let hidden = self.decoder.forward_hidden(&chunk.tokens, &mut ctx)?;
            let logq = Self::logp_at(self.decoder, &hidden, &chunk.pick)?;
            // KL(p‖q) = Σ p log p − Σ p log q, per row.
            let cross = (&chunk.ref_p * &logq)?.sum(D::Minus1)?;
            let kl = (&chunk.ref_neg_entropy - cross)?;
            total += kl.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            // Below the resume point the plan agrees with the base: its inputs are the base's.
            let mut inputs = ctx.take_layer_inputs();
            let below = from.min(inputs.len());
            for (l, slot) in inputs.iter_mut().enumerate().take(below) {
                *slot = chunk.inputs[l].clone();
            }
            all_inputs.push(inputs);
        }
        Ok((total / self.tokens as f64, all_inputs))
    }

    /// Mean per-token KL(π_full ‖ π_other,plan) in nats, where π_full is the decoder this probe
    /// was built with and `other` is another decoder of the same configuration (e.g. its
    /// re-quantized copy, [`Decoder::quantized`]) running `plan`. Every evaluation runs `other`
    /// from the embeddings (the kept layer inputs are those of the probe's decoder, so nothing
    /// is resumed) and leaves the base plan as it is.
    pub fn kl_of(&mut self, other: &Decoder, plan: &LayerPlan) -> Result<f64> {
        if other.config() != self.decoder.config() {
            return Err(ModelError::InvalidInput(
                "the decoder to compare has another configuration than the calibration's".into(),
            ));
        }
        plan.check_for(other.config().num_layers)?;
        self.evaluations += 1;
        let mut total = 0f64;
        for chunk in &self.chunks {
            let mut ctx = ForwardCtx::new(plan.clone()).with_left_padding(chunk.pads.clone());
            let hidden = other.forward_hidden(&chunk.tokens, &mut ctx)?;
            let logq = Self::logp_at(other, &hidden, &chunk.pick)?;
            // KL(p‖q) = Σ p log p − Σ p log q, per row.
            let cross = (&chunk.ref_p * &logq)?.sum(D::Minus1)?;
            let kl = (&chunk.ref_neg_entropy - cross)?;
            total += kl.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(total / self.tokens as f64)
    }
}

/// Runs the calibration: every candidate unit alone, then the greedy path from the full plan
/// down to `cfg.min_cost_ratio`. `progress` is called after each measured unit and each set.
pub fn calibrate(
    decoder: &Decoder,
    model_hash: &str,
    data: &[CalibrationSequence],
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(CalibrateProgress),
) -> Result<Profile> {
    let mc = decoder.config();
    let num_layers = mc.num_layers;
    if !(cfg.min_cost_ratio > 0.0 && cfg.min_cost_ratio < 1.0) {
        return Err(ModelError::InvalidInput(format!(
            "the calibration's smallest cost ratio {} must lie in (0, 1)",
            cfg.min_cost_ratio
        )));
    }
    let candidates = match &cfg.candidates {
        Some(c) => c.clone(),
        None => Unit::all(num_layers),
    };
    for &u in &candidates {
        LayerPlan::skipping_units(&[u], num_layers)?;
    }
    let mut probe = KlProbe::new(decoder, data, cfg.batch)?;
    let cost = |u: Unit| unit_cost(mc, u);

    // Every unit alone (the base stays the full plan).
    let mut units = Vec::with_capacity(candidates.len());
    for (i, &u) in candidates.iter().enumerate() {
        let kl = probe.kl(&LayerPlan::skipping_units(&[u], num_layers)?, false)?;
        units.push(UnitMeasure {
            unit: u,
            kl,
            cost: cost(u),
        });
        progress(CalibrateProgress::Units {
            done: i + 1,
            total: candidates.len(),
        });
    }

    // Lazy greedy: `stale[i]` is candidate i's last measured KL increase and the set size it
    // was measured at.
    let mut stale: Vec<Option<(f64, usize)>> = units.iter().map(|m| Some((m.kl, 0))).collect();
    let mut chosen: Vec<Unit> = Vec::new();
    let mut set_kl = 0.0;
    let mut sets = Vec::new();
    let mut cost_ratio = 1.0;
    while cost_ratio > cfg.min_cost_ratio {
        let best = |stale: &[Option<(f64, usize)>]| {
            stale
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|(inc, at)| (i, inc / cost(candidates[i]), at)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
        };
        let Some((i, _, at)) = best(&stale) else {
            break; // nothing left to skip
        };
        let u = candidates[i];
        let mut trial = chosen.clone();
        trial.push(u);
        let plan = LayerPlan::skipping_units(&trial, num_layers)?;
        if at != chosen.len() {
            let kl = probe.kl(&plan, false)?;
            stale[i] = Some((kl - set_kl, chosen.len()));
            continue; // take it only if it is still the best after the fresh measurement
        }
        // Fresh and best: take it, and make its plan the base of the next measurements.
        set_kl = probe.kl(&plan, true)?;
        chosen = trial;
        cost_ratio = plan.cost_ratio(mc);
        for (j, s) in stale.iter_mut().enumerate() {
            if s.is_some() && conflicts(candidates[j], u) {
                *s = None;
            }
        }
        stale[i] = None;
        sets.push(SkipSet {
            units: chosen.clone(),
            kl: set_kl,
            cost_ratio,
        });
        progress(CalibrateProgress::Set {
            size: chosen.len(),
            cost_ratio,
            kl: set_kl,
            target: cfg.min_cost_ratio,
        });
    }
    Ok(Profile {
        format: PROFILE_FORMAT,
        model_hash: model_hash.to_string(),
        weights_fingerprint: weights_fingerprint(decoder)?,
        num_layers,
        calibration: CalibrationInfo {
            sequences: data.len(),
            tokens: probe.tokens(),
            source: cfg.source.clone(),
            evaluations: probe.evaluations(),
        },
        units,
        sets,
    })
}

/// The share of the full decode cost one unit saves.
pub fn unit_cost(cfg: &ModelConfig, unit: Unit) -> f64 {
    cfg.unit_params(unit) as f64 / cfg.decode_params() as f64
}

/// Whether `candidate` can no longer be added once `taken` is in the set: a unit overlaps a
/// taken one (a block of a skipped layer, the layer of a skipped block).
fn conflicts(candidate: Unit, taken: Unit) -> bool {
    if candidate.layer() != taken.layer() {
        return false;
    }
    matches!(
        (candidate, taken),
        (Unit::Layer(_), _) | (_, Unit::Layer(_))
    ) || candidate == taken
}
