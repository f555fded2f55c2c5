//! One optimizer step: batch → full-depth target log-probs (micro-batches) → corrections →
//! loss → backward (accumulated) → clip → AdamW.

use crate::batch::{prepare_batch, PreparedBatch, TrainSequence};
use crate::config::{Normalizer, UpdateConfig};
use crate::correction::{sequence_weights, token_loss, SequenceWeights, TokenTerms};
use crate::error::{LearnerError, Result};
use crate::optim::AdamW;
use candle_core::{backprop::GradStore, Tensor};
use candle_nn::ParamsAdamW;
use model::{completion_logprobs, Decoder, Kernels, LayerPlan, ScoreRequest};
use protocol::RolloutRecord;
use serde::Serialize;
use std::time::{Duration, Instant};

/// What one step did, for the metrics log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepStats {
    /// Optimizer steps applied after this one (the new policy version).
    pub version: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Loss of the first epoch (policy gradient plus KL), as minimised.
    pub loss: f64,
    /// Its policy-gradient part.
    pub pg_loss: f64,
    /// Its KL-to-reference part (β·mean k3), 0 without a reference.
    pub kl_ref: f64,
    /// Mean reward over every completion.
    pub reward_mean: f64,
    /// Standard deviation of the reward.
    pub reward_std: f64,
    /// Fraction of completions whose reward reaches the correctness threshold.
    pub accuracy: f64,
    /// Groups in the batch.
    pub groups: usize,
    /// Groups with equal rewards (zero advantage, not trained on).
    pub uniform_groups: usize,
    /// Completions trained on.
    pub sequences: usize,
    /// Completion tokens trained on.
    pub tokens: usize,
    /// Mean importance ratio ρ_t = π/μ over trained tokens (first epoch).
    pub ratio_mean: f64,
    /// Largest ρ_t.
    pub ratio_max: f64,
    /// Fraction of tokens whose ratio the `tis` cap truncated or masked.
    pub ratio_capped_frac: f64,
    /// KL(μ‖π) estimated from the sampled tokens: mean of log μ − log π.
    pub kl_behavior: f64,
    /// The same with the k3 estimator mean(ρ − 1 − log ρ) (non-negative, lower variance).
    pub kl_behavior_k3: f64,
    /// Effective sample size of the sequence weights ∏ρ, as a fraction of the sequences.
    pub ess_frac: f64,
    /// Fraction of tokens the PPO clip removed (epochs after the first).
    pub ppo_clip_frac: f64,
    /// Global gradient norm before clipping (of the last epoch).
    pub grad_norm: f64,
    /// Why the step applied no update, if it did not.
    pub skipped: Option<String>,
    /// Micro-batches per epoch.
    pub micro_batches: usize,
    /// Seconds of target forward + backward (all epochs).
    pub time_forward_backward_s: f64,
    /// Seconds of clipping and optimizer updates.
    pub time_optimizer_s: f64,
    /// Trained tokens per second of forward + backward (all epochs counted).
    pub learner_tokens_per_s: f64,
}

/// The gradient of the loss over a batch, one tensor per trainable parameter in canonical order
/// (`None` where the parameter received no gradient).
#[derive(Debug)]
pub struct BatchGradient {
    /// Per parameter, the gradient summed over micro-batches.
    pub grads: Vec<Option<Tensor>>,
    /// The loss value.
    pub loss: f64,
    /// Its policy-gradient part.
    pub pg_loss: f64,
    /// Its KL part.
    pub kl_loss: f64,
    /// Tokens the PPO clip removed.
    pub clipped_tokens: usize,
    /// Micro-batches the batch was split into.
    pub micro_batches: usize,
}

/// Per-sequence quantities fixed at the start of a step (first epoch) and reused by later ones.
#[derive(Debug, Default)]
struct StepCache {
    /// log π_prox per token: the policy at the start of the step.
    prox: Vec<Vec<f32>>,
    /// Correction weights from π_prox / μ.
    weights: Vec<SequenceWeights>,
    /// log π_ref per token (only with a KL term).
    reference: Vec<Vec<f32>>,
}

/// The learner: the trainable full-depth target, its optimizer and, optionally, a frozen
/// reference model for the KL term.
pub struct Learner {
    model: Decoder,
    reference: Option<Decoder>,
    opt: AdamW,
    cfg: UpdateConfig,
    version: u64,
    nonfinite_streak: usize,
    nonfinite_total: u64,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("cfg", &self.cfg)
            .field("version", &self.version)
            .field("nonfinite_total", &self.nonfinite_total)
            .finish_non_exhaustive()
    }
}

impl Learner {
    /// A learner over `model`, which must have been built trainable. `reference` (a frozen
    /// copy, any kernels) is needed when `kl_coef > 0`.
    pub fn new(model: Decoder, reference: Option<Decoder>, cfg: UpdateConfig) -> Result<Self> {
        let cfg = cfg.validate()?;
        if model.vars().is_empty() {
            return Err(LearnerError::InvalidConfig(
                "the model has no trainable parameters (load it with trainable = true)".into(),
            ));
        }
        if cfg.kl_coef > 0.0 && reference.is_none() {
            return Err(LearnerError::InvalidConfig(
                "kl_coef > 0 needs a reference model".into(),
            ));
        }
        let o = &cfg.optim;
        let params = ParamsAdamW {
            lr: o.lr_at(0),
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        };
        let opt = AdamW::new(model.vars().to_vec(), params)?;
        Ok(Self {
            model,
            reference,
            opt,
            cfg,
            version: 0,
            nonfinite_streak: 0,
            nonfinite_total: 0,
        })
    }

    /// The target model (its weights change in place at every step).
    pub fn model(&self) -> &Decoder {
        &self.model
    }

    /// The validated configuration.
    pub fn config(&self) -> &UpdateConfig {
        &self.cfg
    }

    /// Optimizer steps applied so far: the policy version of the current weights.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Steps skipped for a non-finite loss or gradient, in total.
    pub fn nonfinite_steps(&self) -> u64 {
        self.nonfinite_total
    }

    /// The optimizer (its moments and step count go into checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The optimizer, mutably (for restoring a checkpoint).
    pub(crate) fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// Restores the counters a checkpoint saved; the non-finite streak starts afresh.
    pub(crate) fn restore_counters(&mut self, version: u64, nonfinite_total: u64) {
        self.version = version;
        self.nonfinite_total = nonfinite_total;
        self.nonfinite_streak = 0;
    }

    /// One update from complete groups (each the G completions of one prompt).
    pub fn step(&mut self, groups: &[Vec<RolloutRecord>]) -> Result<StepStats> {
        let batch = prepare_batch(groups, &self.cfg)?;
        self.step_prepared(&batch)
    }

    /// One update from a prepared batch: `epochs` optimizer steps over it.
    pub fn step_prepared(&mut self, batch: &PreparedBatch) -> Result<StepStats> {
        let mut stats = StepStats {
            reward_mean: batch.reward_mean,
            reward_std: batch.reward_std,
            accuracy: batch.accuracy,
            groups: batch.groups,
            uniform_groups: batch.uniform_groups,
            sequences: batch.sequences.len(),
            tokens: batch.completion_tokens(),
            ..StepStats::default()
        };
        if batch.sequences.is_empty() {
            stats.version = self.version;
            stats.lr = self.cfg.optim.lr_at(self.version);
            stats.skipped = Some("no group had distinct rewards".into());
            return Ok(stats);
        }
        let mut cache = StepCache::default();
        let (mut fwd_bwd, mut optim) = (Duration::ZERO, Duration::ZERO);
        let mut clipped = 0usize;
        for epoch in 0..self.cfg.epochs {
            let start = Instant::now();
            let grad = self.pass(batch, &mut cache)?;
            fwd_bwd += start.elapsed();
            if epoch == 0 {
                stats.loss = grad.loss;
                stats.pg_loss = grad.pg_loss;
                stats.kl_ref = grad.kl_loss;
                fill_ratio_stats(&mut stats, batch, &cache);
                stats.micro_batches = grad.micro_batches;
            } else {
                clipped += grad.clipped_tokens;
            }
            let start = Instant::now();
            let applied = self.apply(grad, &mut stats)?;
            optim += start.elapsed();
            if !applied {
                break;
            }
        }
        if self.cfg.epochs > 1 {
            stats.ppo_clip_frac = clipped as f64 / (stats.tokens * (self.cfg.epochs - 1)) as f64;
        }
        stats.version = self.version;
        stats.time_forward_backward_s = fwd_bwd.as_secs_f64();
        stats.time_optimizer_s = optim.as_secs_f64();
        let trained = stats.tokens * self.cfg.epochs;
        stats.learner_tokens_per_s = trained as f64 / fwd_bwd.as_secs_f64().max(1e-9);
        Ok(stats)
    }

    /// The gradient of the first epoch's loss over `batch` (micro-batched, accumulated),
    /// without updating anything.
    pub fn gradient(&self, batch: &PreparedBatch) -> Result<BatchGradient> {
        self.pass(batch, &mut StepCache::default())
    }

    /// Clips and applies one accumulated gradient; false when it was skipped as non-finite.
    fn apply(&mut self, grad: BatchGradient, stats: &mut StepStats) -> Result<bool> {
        let mut sq = 0f64;
        for g in grad.grads.iter().flatten() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        stats.grad_norm = norm;
        stats.lr = self.cfg.optim.lr_at(self.version);
        if !(norm.is_finite() && grad.loss.is_finite()) {
            let what = format!("loss {}, gradient norm {norm}", grad.loss);
            self.nonfinite_streak += 1;
            self.nonfinite_total += 1;
            if self.nonfinite_streak > self.cfg.max_nonfinite_steps {
                return Err(LearnerError::NonFinite {
                    streak: self.nonfinite_streak,
                    limit: self.cfg.max_nonfinite_steps,
                    last: what,
                });
            }
            stats.skipped = Some(format!("non-finite {what}"));
            return Ok(false);
        }
        self.nonfinite_streak = 0;
        let scale = match self.cfg.optim.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let mut store = GradStore::default();
        for ((_, var), g) in self.model.vars().iter().zip(grad.grads) {
            if let Some(g) = g {
                let g = if scale == 1.0 { g } else { (g * scale)? };
                store.insert(var.as_tensor(), g);
            }
        }
        self.opt.set_learning_rate(stats.lr);
        self.opt.step(&store)?;
        self.version += 1;
        Ok(true)
    }

    /// Sequence indices per micro-batch: sorted by length, packed while rows × longest ≤ budget.
    fn micro_batches(&self, batch: &PreparedBatch) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..batch.sequences.len()).collect();
        order.sort_by_key(|&i| batch.sequences[i].len());
        let budget = self.cfg.micro_batch_tokens;
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        for i in order {
            // Sorted ascending, so this sequence is the longest of the micro-batch.
            let len = batch.sequences[i].len();
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

    /// One forward + backward over the batch. The first call of a step fills `cache`
    /// (π_prox, the correction weights, π_ref); later epochs read it.
    fn pass(&self, batch: &PreparedBatch, cache: &mut StepCache) -> Result<BatchGradient> {
        let n = batch.sequences.len();
        let first = cache.prox.is_empty();
        if first {
            cache.prox = vec![Vec::new(); n];
            cache.weights = vec![sequence_weights(&self.cfg.correction, &[]); n];
            cache.reference = vec![Vec::new(); n];
        }
        let total_tokens = batch.completion_tokens() as f64;
        let plan = LayerPlan::full(self.model.config().num_layers);
        let mut out = BatchGradient {
            grads: vec![None; self.model.vars().len()],
            loss: 0.0,
            pg_loss: 0.0,
            kl_loss: 0.0,
            clipped_tokens: 0,
            micro_batches: 0,
        };
        for micro in self.micro_batches(batch) {
            out.micro_batches += 1;
            let seqs: Vec<&TrainSequence> = micro.iter().map(|&i| &batch.sequences[i]).collect();
            let requests: Vec<ScoreRequest<'_>> = seqs
                .iter()
                .map(|s| ScoreRequest {
                    prompt: &s.prompt,
                    completion: &s.completion,
                })
                .collect();
            let lp = completion_logprobs(
                &self.model,
                &requests,
                &plan,
                self.cfg.temperature,
                Kernels::Differentiable,
            )?;
            let values = lp.to_vecs()?;
            if first {
                let reference = match (&self.reference, self.cfg.kl_coef > 0.0) {
                    (Some(r), true) => Some(
                        completion_logprobs(
                            r,
                            &requests,
                            &plan,
                            self.cfg.temperature,
                            Kernels::Fused,
                        )?
                        .to_vecs()?,
                    ),
                    _ => None,
                };
                for (k, &i) in micro.iter().enumerate() {
                    let s = &batch.sequences[i];
                    let log_ratios: Vec<f64> = values[k]
                        .iter()
                        .zip(&s.behavior_logprobs)
                        .map(|(&p, &m)| f64::from(p) - f64::from(m))
                        .collect();
                    cache.weights[i] = sequence_weights(&self.cfg.correction, &log_ratios);
                    cache.prox[i] = values[k].clone();
                    if let Some(r) = &reference {
                        cache.reference[i] = r[k].clone();
                    }
                }
            }
            let t_max = lp.values.dim(1)?;
            let mut coef = vec![0f64; micro.len() * t_max];
            for (k, &i) in micro.iter().enumerate() {
                let s = &batch.sequences[i];
                let inv_norm = match self.cfg.normalizer {
                    Normalizer::TokenMean => 1.0 / total_tokens,
                    Normalizer::SequenceMean => 1.0 / (s.completion.len() * n) as f64,
                };
                for t in 0..s.completion.len() {
                    let l = token_loss(
                        &TokenTerms {
                            weight: cache.weights[i].weights[t],
                            advantage: s.advantage,
                            logp: f64::from(values[k][t]),
                            logp_prox: f64::from(cache.prox[i][t]),
                            logp_ref: cache.reference[i].get(t).map(|&v| f64::from(v)),
                            inv_norm,
                        },
                        self.cfg.clip_eps,
                        self.cfg.kl_coef,
                    );
                    coef[k * t_max + t] = l.coef;
                    out.pg_loss += l.pg;
                    out.kl_loss += l.kl;
                    out.clipped_tokens += usize::from(l.clipped);
                }
            }
            if !coef.iter().all(|c| c.is_finite()) {
                // A non-finite weight (e.g. an overflowing sequence weight): no backward; the
                // caller sees a non-finite loss and skips the step.
                out.pg_loss = f64::NAN;
                continue;
            }
            let coef = Tensor::from_vec(coef, (micro.len(), t_max), self.model.device())?
                .to_dtype(lp.values.dtype())?;
            let loss = (lp.values * coef)?.sum_all()?.neg()?;
            let grads = loss.backward()?;
            for ((_, var), acc) in self.model.vars().iter().zip(out.grads.iter_mut()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        out.loss = out.pg_loss + out.kl_loss;
        Ok(out)
    }
}

/// Ratio, KL(μ‖π) and ESS statistics of the first epoch.
fn fill_ratio_stats(stats: &mut StepStats, batch: &PreparedBatch, cache: &StepCache) {
    let (mut sum, mut max, mut k1, mut k3, mut n, mut capped) = (0.0, 0f64, 0.0, 0.0, 0usize, 0);
    for (i, s) in batch.sequences.iter().enumerate() {
        capped += cache.weights[i].capped;
        for (&p, &m) in cache.prox[i].iter().zip(&s.behavior_logprobs) {
            let lr = f64::from(p) - f64::from(m);
            let rho = lr.exp();
            sum += rho;
            max = max.max(rho);
            k1 -= lr;
            k3 += rho - 1.0 - lr;
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    stats.ratio_mean = sum / n;
    stats.ratio_max = max;
    stats.ratio_capped_frac = capped as f64 / n;
    stats.kl_behavior = k1 / n;
    stats.kl_behavior_k3 = k3 / n;
    // ESS = (Σw)² / Σw², computed relative to the largest log-weight so nothing overflows.
    let logs: Vec<f64> = cache.weights.iter().map(|w| w.log_seq_weight).collect();
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (s1, s2) = logs.iter().fold((0.0, 0.0), |(a, b), &l| {
        let w = (l - top).exp();
        (a + w, b + w * w)
    });
    stats.ess_frac = if s2 > 0.0 {
        s1 * s1 / s2 / logs.len() as f64
    } else {
        0.0
    };
}
