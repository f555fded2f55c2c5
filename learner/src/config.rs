//! The update's configuration: validated once, then read by every step.

use crate::error::{LearnerError, Result};
use serde::{Deserialize, Serialize};

/// How a token's gradient is corrected for having been sampled from the behavior μ rather than
/// the target π_θ (ρ_t = π(y_t) / μ(y_t)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Correction {
    /// Weight 1: treats the samples as on-policy (biased when μ ≠ π; the control).
    None,
    /// w_i = ∏_t ρ_t over the whole sequence (log-space, no truncation): unbiased, high variance.
    SeqIs,
    /// Truncated per-token IS: min(ρ_t, C); in `mask` mode a token with ρ_t > C gets weight 0.
    Tis {
        /// The cap C (> 0).
        #[serde(default = "default_tis_cap")]
        cap: f64,
        /// Truncate at C or mask above C.
        #[serde(default)]
        mode: TisMode,
    },
    /// Retrace-style trace: ∏_{s≤t} λ·min(1, ρ_s).
    Retrace {
        /// λ in (0, 1].
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
}

fn default_tis_cap() -> f64 {
    2.0
}

fn default_lambda() -> f64 {
    1.0
}

impl Default for Correction {
    fn default() -> Self {
        Self::Tis {
            cap: default_tis_cap(),
            mode: TisMode::Truncate,
        }
    }
}

impl std::fmt::Display for Correction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::SeqIs => write!(f, "seq-is"),
            Self::Tis { cap, mode } => write!(f, "tis (C = {cap}, {mode:?})"),
            Self::Retrace { lambda } => write!(f, "retrace (λ = {lambda})"),
        }
    }
}

/// What `tis` does with a ratio above its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TisMode {
    /// min(ρ, C).
    #[default]
    Truncate,
    /// ρ if ρ ≤ C, else 0.
    Mask,
}

/// How the summed per-token loss is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalizer {
    /// Divide by the number of completion tokens in the whole batch: every token weighs the
    /// same, so long completions weigh more than short ones.
    #[default]
    TokenMean,
    /// Mean over each sequence's tokens, then mean over sequences (GRPO's original).
    SequenceMean,
}

/// Group-relative advantages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvantageConfig {
    /// Divide by the group's standard deviation (GRPO); `false` is "Dr. GRPO".
    pub scale_by_std: bool,
    /// ε added to the standard deviation.
    pub eps: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            scale_by_std: true,
            eps: 1e-6,
        }
    }
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Constant after warmup.
    #[default]
    Constant,
    /// Cosine from the peak down to `min_lr` at `total_steps`.
    Cosine,
}

/// AdamW, gradient clipping and the learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup from 0 to `lr` over this many optimizer steps.
    pub warmup_steps: u64,
    /// Shape after warmup.
    pub decay: Decay,
    /// Optimizer steps the cosine decay spans (warmup included); 0 lets the training loop set
    /// it to the run's length (steps × epochs).
    pub total_steps: u64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm gradient clipping threshold (`None` disables clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            min_lr: 0.0,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

impl OptimConfig {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.min_lr
                    + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Everything one update needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// The off-policy correction.
    pub correction: Correction,
    /// The loss normaliser.
    pub normalizer: Normalizer,
    /// Advantages.
    pub advantage: AdvantageConfig,
    /// Optimizer steps over each batch. Above 1 the decoupled PPO objective applies: weights
    /// from π_prox / μ (π_prox = the policy at the start of the step), clipped ratio π_θ / π_prox.
    pub epochs: usize,
    /// PPO clip ε of the ratio π_θ / π_prox (used when `epochs > 1`).
    pub clip_eps: f64,
    /// Coefficient β of the k3 KL to a frozen reference model (0 disables it).
    pub kl_coef: f64,
    /// Coefficient β of the nested consistency term β · KL(sg(π_full) ‖ π_nested) over the
    /// completion tokens (0 disables it). π_nested is the same model under the batch's behavior
    /// plan ([`crate::PreparedBatch::behavior_plan`]); the term keeps the nested sub-network
    /// close to the full model, as layer dropout does for early-exit models. It costs one
    /// full-depth forward (no backward) and one nested forward + backward per micro-batch, and
    /// nothing when the batch's plan is full or unknown.
    pub consistency_beta: f64,
    /// Temperature the behavior sampled with: the target's log-probs use the same one, and a
    /// record sampled at another is refused.
    pub temperature: f32,
    /// Top-p of the behavior's sampling; must be 1 (no truncation, see
    /// [`UpdateConfig::validate`]); a record sampled with another is refused.
    pub top_p: f32,
    /// Top-k of the behavior's sampling; must be 0 (off); a record sampled with another is
    /// refused.
    pub top_k: u32,
    /// Positions computed per micro-batch (prompts, completions and any padding): bounds the
    /// activation memory. The gradient does not depend on it.
    pub micro_batch_tokens: usize,
    /// Compute each prompt once for all the completions that share it: they are laid out as
    /// the prompt followed by each completion, every completion attending to the prompt and to
    /// its own earlier tokens, with positions restarting at the prompt's length. The loss and
    /// gradient are those of the unshared batch (up to float rounding).
    pub prefix_sharing: bool,
    /// Pack the micro-batch's sequences (or shared-prompt segments) back to back into one row,
    /// attention staying within each, instead of one right-padded row per sequence.
    pub packing: bool,
    /// A completion whose reward reaches this counts as correct (for the accuracy statistic).
    pub correct_threshold: f64,
    /// Consecutive steps with a non-finite loss or gradient tolerated (each is skipped).
    pub max_nonfinite_steps: usize,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            correction: Correction::default(),
            normalizer: Normalizer::default(),
            advantage: AdvantageConfig::default(),
            epochs: 1,
            clip_eps: 0.2,
            kl_coef: 0.0,
            consistency_beta: 0.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            micro_batch_tokens: 2048,
            prefix_sharing: true,
            packing: true,
            correct_threshold: 1.0,
            max_nonfinite_steps: 3,
            optim: OptimConfig::default(),
        }
    }
}

fn positive(name: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(LearnerError::InvalidConfig(format!(
            "{name} must be a positive number, got {v}"
        )))
    }
}

fn non_negative(name: &str, v: f64) -> Result<()> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(LearnerError::InvalidConfig(format!(
            "{name} must be a non-negative number, got {v}"
        )))
    }
}

impl UpdateConfig {
    /// Checks every value; the learner only accepts a validated configuration.
    pub fn validate(self) -> Result<Self> {
        match self.correction {
            Correction::Tis { cap, .. } => positive("tis cap C", cap)?,
            Correction::Retrace { lambda } => {
                if !(lambda > 0.0 && lambda <= 1.0) {
                    return Err(LearnerError::InvalidConfig(format!(
                        "retrace λ must be in (0, 1], got {lambda}"
                    )));
                }
            }
            Correction::None | Correction::SeqIs => {}
        }
        non_negative("advantage eps", self.advantage.eps)?;
        if self.epochs == 0 {
            return Err(LearnerError::InvalidConfig(
                "epochs must be at least 1".into(),
            ));
        }
        if !(self.clip_eps > 0.0 && self.clip_eps < 1.0) {
            return Err(LearnerError::InvalidConfig(format!(
                "clip_eps must be in (0, 1), got {}",
                self.clip_eps
            )));
        }
        non_negative("kl_coef", self.kl_coef)?;
        non_negative("consistency_beta", self.consistency_beta)?;
        positive("temperature", f64::from(self.temperature))?;
        // The ratio π/μ is taken between full tempered softmaxes. Under top-p / top-k the
        // behavior's support and normaliser depend on the logits of the model that sampled, so
        // the target would need the same truncation of its own logits, which is a different
        // (and biased) objective: truncated sampling is for generation and evaluation only.
        if self.top_p != 1.0 || self.top_k != 0 {
            return Err(LearnerError::InvalidConfig(format!(
                "top_p {} / top_k {}: truncated sampling cannot train (the importance ratios \
                 compare full tempered softmaxes); use top_p = 1 and top_k = 0",
                self.top_p, self.top_k
            )));
        }
        if self.micro_batch_tokens == 0 {
            return Err(LearnerError::InvalidConfig(
                "micro_batch_tokens must be at least 1".into(),
            ));
        }
        if !self.correct_threshold.is_finite() {
            return Err(LearnerError::InvalidConfig(
                "correct_threshold must be finite".into(),
            ));
        }
        let o = &self.optim;
        positive("learning rate", o.lr)?;
        non_negative("min_lr", o.min_lr)?;
        if o.min_lr > o.lr {
            return Err(LearnerError::InvalidConfig(format!(
                "min_lr {} is above the learning rate {}",
                o.min_lr, o.lr
            )));
        }
        for (name, b) in [("beta1", o.beta1), ("beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(LearnerError::InvalidConfig(format!(
                    "AdamW {name} must be in [0, 1), got {b}"
                )));
            }
        }
        positive("AdamW eps", o.eps)?;
        non_negative("weight_decay", o.weight_decay)?;
        if let Some(n) = o.max_grad_norm {
            positive("max_grad_norm", n)?;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let o = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            decay: Decay::Cosine,
            total_steps: 14,
            ..OptimConfig::default()
        };
        assert_eq!(o.lr_at(0), 0.25);
        assert_eq!(o.lr_at(3), 1.0);
        assert_eq!(o.lr_at(4), 1.0);
        assert!((o.lr_at(9) - 0.55).abs() < 1e-12, "{}", o.lr_at(9));
        assert!((o.lr_at(14) - 0.1).abs() < 1e-12);
        assert!((o.lr_at(100) - 0.1).abs() < 1e-12);
        let c = OptimConfig {
            decay: Decay::Constant,
            ..o
        };
        assert_eq!(c.lr_at(50), 1.0);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let bad = [
            (
                UpdateConfig {
                    epochs: 0,
                    ..Default::default()
                },
                "epochs",
            ),
            (
                UpdateConfig {
                    correction: Correction::Tis {
                        cap: 0.0,
                        mode: TisMode::Mask,
                    },
                    ..Default::default()
                },
                "cap",
            ),
            (
                UpdateConfig {
                    correction: Correction::Retrace { lambda: 1.5 },
                    ..Default::default()
                },
                "λ",
            ),
            (
                UpdateConfig {
                    temperature: 0.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                UpdateConfig {
                    top_p: 0.9,
                    ..Default::default()
                },
                "truncated sampling",
            ),
            (
                UpdateConfig {
                    top_k: 20,
                    ..Default::default()
                },
                "truncated sampling",
            ),
            (
                UpdateConfig {
                    consistency_beta: -0.1,
                    ..Default::default()
                },
                "consistency_beta",
            ),
            (
                UpdateConfig {
                    consistency_beta: f64::INFINITY,
                    ..Default::default()
                },
                "consistency_beta",
            ),
            (
                UpdateConfig {
                    micro_batch_tokens: 0,
                    ..Default::default()
                },
                "micro_batch",
            ),
            (
                UpdateConfig {
                    optim: OptimConfig {
                        lr: f64::NAN,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "learning rate",
            ),
        ];
        for (cfg, needle) in bad {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(UpdateConfig::default().validate().is_ok());
    }

    #[test]
    fn correction_parses_from_toml() {
        let c: UpdateConfig = toml_like(r#"{"correction": {"kind": "tis", "mode": "mask"}}"#);
        assert_eq!(
            c.correction,
            Correction::Tis {
                cap: 2.0,
                mode: TisMode::Mask
            }
        );
        let c: UpdateConfig = toml_like(r#"{"correction": {"kind": "seq-is"}}"#);
        assert_eq!(c.correction, Correction::SeqIs);
        assert_eq!(
            c.consistency_beta, 0.0,
            "the consistency term is off by default"
        );
        let c: UpdateConfig = toml_like(r#"{"consistency_beta": 0.25}"#);
        assert_eq!(c.consistency_beta, 0.25);
    }

    fn toml_like(s: &str) -> UpdateConfig {
        serde_json::from_str(s).unwrap()
    }
}
