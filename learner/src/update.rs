//! One optimizer step: batch → full-depth target log-probs (micro-batches) → corrections →
//! loss → backward (accumulated) → [nested consistency term] → clip → AdamW.

use crate::batch::{prepare_batch, PreparedBatch, TrainSequence};
use crate::config::{Normalizer, UpdateConfig};
use crate::correction::{sequence_weights, token_loss, SequenceWeights, TokenTerms};
use crate::error::{LearnerError, Result};
use crate::layout::{self, LayoutOptions, LayoutStats, MicroPlan};
use crate::optim::AdamW;
use candle_core::{backprop::GradStore, DType, Tensor, Var, D};
use candle_nn::ParamsAdamW;
use model::{Decoder, Kernels, LayerPlan};
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
    /// Loss of the first epoch (policy gradient plus KL plus consistency), as minimised.
    pub loss: f64,
    /// Its policy-gradient part.
    pub pg_loss: f64,
    /// Its KL-to-reference part (β·mean k3), 0 without a reference.
    pub kl_ref: f64,
    /// Its nested-consistency part: `consistency_beta` × KL(sg(π_full) ‖ π_nested) averaged
    /// with the loss normaliser; 0 when the term is off or the batch's plan is full or unknown.
    pub consistency_loss: f64,
    /// Mean per-token KL(π_full ‖ π_nested) over the completion tokens (plain token mean,
    /// whatever the normaliser) under the batch's behavior plan, measured in the first epoch.
    /// Measured only when the term is on (`consistency_beta > 0`) and the batch has a plan:
    /// exactly 0 for a full plan (nothing is computed); `None` (null in the metrics) otherwise.
    pub consistency_kl: Option<f64>,
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
    /// Completions whose reward failed.
    pub failed_rewards: usize,
    /// Groups left out because a member's reward failed.
    pub failed_reward_groups: usize,
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
    /// What the layout computes per epoch (shared prompts, packing) against the unshared
    /// padded layout.
    #[serde(flatten)]
    pub layout: LayoutStats,
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
    /// Its nested-consistency part (β × normalised KL(sg(π_full) ‖ π_nested)).
    pub consistency_loss: f64,
    /// Mean per-token KL(π_full ‖ π_nested) of the consistency term (see
    /// [`StepStats::consistency_kl`]).
    pub consistency_kl: Option<f64>,
    /// Tokens the PPO clip removed.
    pub clipped_tokens: usize,
    /// Micro-batches the batch was split into.
    pub micro_batches: usize,
    /// What the layout computed.
    pub layout: LayoutStats,
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
    ///
    /// # Example
    ///
    /// One step of the loop on a tiny random model: a nested behavior (layer 1 skipped)
    /// samples a group of completions, a reward scores them (here: how many tokens are 2),
    /// and the full-depth target is updated from the records.
    ///
    /// ```
    /// use learner::{Learner, UpdateConfig};
    /// use model::candle_core::{DType, Device};
    /// use model::{
    ///     generate, Architecture, Decoder, GenerationConfig, LayerPlan, ModelConfig, Sampling,
    ///     Weights,
    /// };
    /// use protocol::{FinishReason, RewardOutcome, RolloutRecord, SamplingParams, Timings};
    ///
    /// let cfg = ModelConfig::tiny(Architecture::Llama, 5, 3);
    /// let weights = Weights::random(&cfg, 3, DType::F32, &Device::Cpu)?;
    /// let target = Decoder::new(&cfg, &weights, true)?; // trainable
    /// let mut learner = Learner::new(target, None, UpdateConfig::default())?;
    ///
    /// let prompt = vec![0u32, 1];
    /// let behavior = LayerPlan::skipping(&[1], 3)?;
    /// let gen = GenerationConfig {
    ///     sampling: Sampling::temperature(1.0), // the learner's temperature (1 by default)
    ///     max_new_tokens: 4,
    ///     group_size: 4,
    ///     seed: 1,
    ///     ..GenerationConfig::default()
    /// };
    /// let prompts = [prompt.clone()];
    /// let out = generate(learner.model(), &prompts, &behavior, &gen, None)?;
    /// let group: Vec<RolloutRecord> = out
    ///     .completions
    ///     .iter()
    ///     .map(|c| {
    ///         let reward = c.tokens.iter().filter(|&&t| t == 2).count() as f32;
    ///         RolloutRecord {
    ///             prompt_id: 0,
    ///             group_id: 0,
    ///             batch_id: 0,
    ///             policy_version: learner.version(),
    ///             group_size: 4,
    ///             group_index: c.sample_index as u32,
    ///             batch_groups: 1,
    ///             prompt: prompt.clone(),
    ///             completion: c.tokens.clone(),
    ///             logprobs: c.logprobs.clone(),
    ///             plan: behavior.to_record(),
    ///             sampling: SamplingParams::temperature(1.0),
    ///             seed: 1,
    ///             reward: RewardOutcome::scored(reward),
    ///             finish: FinishReason::Length,
    ///             timings: Timings::default(),
    ///         }
    ///     })
    ///     .collect();
    ///
    /// let before = learner.model().vars()[0].1.as_tensor().copy()?;
    /// let stats = learner.step(&[group])?;
    /// assert_eq!(learner.version(), 1); // the new policy version, to publish
    /// assert_eq!((stats.groups, stats.sequences, stats.tokens), (1, 4, 16));
    /// assert!(stats.kl_behavior_k3 >= 0.0 && stats.grad_norm > 0.0);
    /// let after = learner.model().vars()[0].1.as_tensor();
    /// let moved = (after - before)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(moved > 0.0, "the step changed the weights");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn step(&mut self, groups: &[Vec<RolloutRecord>]) -> Result<StepStats> {
        let batch = prepare_batch(groups, &self.cfg, self.model.config().num_layers)?;
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
            failed_rewards: batch.failed_rewards,
            failed_reward_groups: batch.failed_reward_groups,
            sequences: batch.sequences.len(),
            tokens: batch.completion_tokens(),
            ..StepStats::default()
        };
        if batch.sequences.is_empty() {
            stats.version = self.version;
            stats.lr = self.cfg.optim.lr_at(self.version);
            stats.skipped = Some(if batch.failed_reward_groups == batch.groups {
                "every group had a failed reward".into()
            } else {
                "no group had distinct rewards".into()
            });
            return Ok(stats);
        }
        let mut cache = StepCache::default();
        let (mut fwd_bwd, mut optim) = (Duration::ZERO, Duration::ZERO);
        let mut clipped = 0usize;
        let micro = self.micro_plan(batch)?;
        for epoch in 0..self.cfg.epochs {
            let start = Instant::now();
            let grad = self.pass(batch, &micro, &mut cache)?;
            fwd_bwd += start.elapsed();
            if epoch == 0 {
                stats.loss = grad.loss;
                stats.pg_loss = grad.pg_loss;
                stats.kl_ref = grad.kl_loss;
                stats.consistency_loss = grad.consistency_loss;
                stats.consistency_kl = grad.consistency_kl;
                fill_ratio_stats(&mut stats, batch, &cache);
                stats.micro_batches = grad.micro_batches;
                stats.layout = grad.layout;
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
        let micro = self.micro_plan(batch)?;
        self.pass(batch, &micro, &mut StepCache::default())
    }

    /// The micro-batches of `batch` under the configured layout and budget.
    fn micro_plan(&self, batch: &PreparedBatch) -> Result<MicroPlan> {
        layout::plan(
            batch,
            LayoutOptions {
                prefix_sharing: self.cfg.prefix_sharing,
                packing: self.cfg.packing,
                budget: self.cfg.micro_batch_tokens,
            },
        )
    }

    /// Clips and applies one accumulated gradient; false when it was skipped as non-finite.
    fn apply(&mut self, grad: BatchGradient, stats: &mut StepStats) -> Result<bool> {
        let norm = AdamW::grad_norm(grad.grads.iter().flatten())?;
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
                store.insert(var.as_tensor(), g);
            }
        }
        self.opt.set_learning_rate(stats.lr);
        // The clipping scale is applied inside the optimizer's one pass over each tensor.
        self.opt.step_scaled(&store, scale)?;
        self.version += 1;
        Ok(true)
    }

    /// One forward + backward over the batch. The first call of a step fills `cache`
    /// (π_prox, the correction weights, π_ref); later epochs read it.
    fn pass(
        &self,
        batch: &PreparedBatch,
        micro: &MicroPlan,
        cache: &mut StepCache,
    ) -> Result<BatchGradient> {
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
            consistency_loss: 0.0,
            consistency_kl: None,
            clipped_tokens: 0,
            micro_batches: 0,
            layout: micro.stats,
        };
        let temperature = f64::from(self.cfg.temperature);
        for m in &micro.micros {
            out.micro_batches += 1;
            let lp = m.logprobs(
                &self.model,
                batch,
                &plan,
                temperature,
                Kernels::Differentiable,
            )?;
            let values = &lp.rows;
            if first {
                let reference = match (&self.reference, self.cfg.kl_coef > 0.0) {
                    (Some(r), true) => {
                        // No gradient: the fused kernels, where candle has them (not f64).
                        let kernels = match r.dtype() {
                            DType::F64 => Kernels::Differentiable,
                            _ => Kernels::Fused,
                        };
                        Some(m.logprobs(r, batch, &plan, temperature, kernels)?.rows)
                    }
                    _ => None,
                };
                for (k, &i) in m.seqs.iter().enumerate() {
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
            let mut coef = vec![0f64; lp.len()];
            for (k, &i) in m.seqs.iter().enumerate() {
                let s = &batch.sequences[i];
                let inv_norm = self.inv_norm(s, n, total_tokens);
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
                    coef[lp.index(k, t)] = l.coef;
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
            let coef = Tensor::from_vec(coef, lp.values.shape(), self.model.device())?
                .to_dtype(lp.values.dtype())?;
            let loss = (lp.values * coef)?.sum_all()?.neg()?;
            let grads = loss.backward()?;
            self.accumulate(&mut out.grads, &grads)?;
        }
        out.loss = out.pg_loss + out.kl_loss;
        if let Some(plan) = self.consistency_plan(batch)? {
            if plan.is_full() {
                // KL(π‖π) = 0: nothing to compute.
                out.consistency_kl = Some(0.0);
            } else {
                self.consistency(batch, micro, plan, &mut out)?;
                out.loss += out.consistency_loss;
            }
        }
        Ok(out)
    }

    /// Adds the gradients `grads` holds for the model's parameters to `acc`.
    fn accumulate(&self, acc: &mut [Option<Tensor>], grads: &GradStore) -> Result<()> {
        for ((_, var), acc) in self.model.vars().iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The plan of the consistency term, when it is on and the batch has one.
    fn consistency_plan<'a>(&self, batch: &'a PreparedBatch) -> Result<Option<&'a LayerPlan>> {
        if self.cfg.consistency_beta == 0.0 {
            return Ok(None);
        }
        let Some(plan) = &batch.behavior_plan else {
            return Ok(None);
        };
        plan.check_for(self.model.config().num_layers)?;
        Ok(Some(plan))
    }

    /// The nested consistency term β · Σ_t w_t · KL(sg(π_full) ‖ π_nested)(t) over every
    /// completion position t, w_t the normaliser's weight of the token (as in the policy
    /// gradient): its gradient is added to `out.grads`, its value to `out.consistency_loss`,
    /// and the plain token mean of the KL goes to `out.consistency_kl`.
    ///
    /// Per micro-batch: one full-depth forward (its hidden states detached: the stop-gradient
    /// target) and one forward + backward under `plan`. The output head and the log-softmax
    /// run in chunks of [`CONSISTENCY_CHUNK_ROWS`] positions, each back-propagated to its own
    /// leaf copy of the nested hidden states, so the (positions × vocab) matrices are never
    /// held whole; the summed hidden-state gradient then goes through the decoder in one
    /// backward pass.
    fn consistency(
        &self,
        batch: &PreparedBatch,
        micro: &MicroPlan,
        plan: &LayerPlan,
        out: &mut BatchGradient,
    ) -> Result<()> {
        let n = batch.sequences.len();
        let total_tokens = batch.completion_tokens() as f64;
        let beta = self.cfg.consistency_beta;
        let full = LayerPlan::full(self.model.config().num_layers);
        let device = self.model.device();
        let dtype = self.model.dtype();
        let (mut loss_sum, mut kl_sum) = (0f64, 0f64);
        for m in &micro.micros {
            let seqs: Vec<&TrainSequence> = m.seqs.iter().map(|&i| &batch.sequences[i]).collect();
            let rows: usize = seqs.iter().map(|s| s.completion.len()).sum();
            if rows == 0 {
                continue;
            }
            let weights: Vec<f64> = seqs
                .iter()
                .flat_map(|s| {
                    let w = self.inv_norm(s, n, total_tokens);
                    std::iter::repeat_n(w, s.completion.len())
                })
                .collect();
            let kernels = Kernels::Differentiable;
            let h_full = m.hidden(&self.model, batch, &full, kernels)?.detach();
            let h_nested = m.hidden(&self.model, batch, plan, kernels)?;
            let h_nested_leaf = h_nested.detach();
            let mut grad_h = Vec::new();
            let mut start = 0;
            while start < rows {
                let len = CONSISTENCY_CHUNK_ROWS.min(rows - start);
                let log_full = self.log_softmax(&h_full.narrow(0, start, len)?)?.detach();
                let leaf = Var::from_tensor(&h_nested_leaf.narrow(0, start, len)?)?;
                let log_nested = self.log_softmax(leaf.as_tensor())?;
                // KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v)) per position, p = π_full detached.
                let kl = (log_full.exp()? * (&log_full - &log_nested)?)?.sum(D::Minus1)?;
                let w = Tensor::from_slice(&weights[start..start + len], len, device)?
                    .to_dtype(dtype)?;
                let loss = ((kl.clone() * w)?.sum_all()? * beta)?;
                loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                kl_sum += kl.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let grads = loss.backward()?;
                // The head's own gradient (the hidden states' goes through the decoder below).
                self.accumulate(&mut out.grads, &grads)?;
                grad_h.push(match grads.get(leaf.as_tensor()) {
                    Some(g) => g.clone(),
                    None => leaf.as_tensor().zeros_like()?,
                });
                start += len;
            }
            // Σ h·sg(∂L/∂h) has the gradient ∂L/∂h·∂h/∂θ: the chain rule through the decoder.
            let grad_h = Tensor::cat(&grad_h, 0)?;
            let surrogate = (h_nested * grad_h)?.sum_all()?;
            let grads = surrogate.backward()?;
            self.accumulate(&mut out.grads, &grads)?;
        }
        out.consistency_loss = loss_sum;
        out.consistency_kl = Some(kl_sum / total_tokens.max(1.0));
        Ok(())
    }

    /// log softmax(h·Wᵀ / T) over the vocabulary, W the model's output head.
    ///
    /// # Shapes
    /// `hidden`: (n, hidden) → (n, vocab).
    fn log_softmax(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.model.project(hidden)?;
        let t = f64::from(self.cfg.temperature);
        let logits = if t == 1.0 { logits } else { (logits / t)? };
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// The normaliser's weight of each token of `s`, in a batch of `n` sequences and
    /// `total_tokens` completion tokens.
    fn inv_norm(&self, s: &TrainSequence, n: usize, total_tokens: f64) -> f64 {
        match self.cfg.normalizer {
            Normalizer::TokenMean => 1.0 / total_tokens,
            Normalizer::SequenceMean => 1.0 / (s.completion.len() * n) as f64,
        }
    }
}

/// Positions of the consistency term's head per chunk: bounds its (rows × vocab) memory.
const CONSISTENCY_CHUNK_ROWS: usize = 128;

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
