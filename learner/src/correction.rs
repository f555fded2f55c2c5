//! The off-policy corrections and the per-token loss coefficients, computed on the host from
//! detached log-probabilities.
//!
//! Every variant of the loss has the form `loss = −Σ_{i,t} c_{i,t} · log π_θ(y_{i,t})` with a
//! stop-gradient coefficient `c`: the correction weight, the advantage, the PPO ratio and clip
//! mask, the normaliser and the KL-to-reference gradient all fold into `c`. So the autograd
//! graph is one weighted sum of the target log-probs, and micro-batching cannot change the
//! gradient (every normaliser is over the whole batch).

use crate::config::{Correction, TisMode};

/// Correction weights of one sequence's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceWeights {
    /// Weight of each token.
    pub weights: Vec<f64>,
    /// Tokens whose ratio exceeded the `tis` cap (truncated or masked); 0 for other variants.
    pub capped: usize,
    /// log w_i = Σ_t log ρ_t: the sequence-level importance weight (for the ESS statistic).
    pub log_seq_weight: f64,
}

/// Weights of each token of one sequence from its log-ratios log ρ_t = log π(y_t) − log μ(y_t).
pub fn sequence_weights(correction: &Correction, log_ratios: &[f64]) -> SequenceWeights {
    let log_seq_weight: f64 = log_ratios.iter().sum();
    let mut capped = 0;
    let weights = match *correction {
        Correction::None => vec![1.0; log_ratios.len()],
        Correction::SeqIs => vec![log_seq_weight.exp(); log_ratios.len()],
        Correction::Tis { cap, mode } => log_ratios
            .iter()
            .map(|&lr| {
                let rho = lr.exp();
                if rho > cap {
                    capped += 1;
                    match mode {
                        TisMode::Truncate => cap,
                        TisMode::Mask => 0.0,
                    }
                } else {
                    rho
                }
            })
            .collect(),
        Correction::Retrace { lambda } => {
            let mut trace = 1.0;
            log_ratios
                .iter()
                .map(|&lr| {
                    trace *= lambda * lr.exp().min(1.0);
                    trace
                })
                .collect()
        }
    };
    SequenceWeights {
        weights,
        capped,
        log_seq_weight,
    }
}

/// Everything that determines one token's loss coefficient.
#[derive(Debug, Clone, Copy)]
pub struct TokenTerms {
    /// The correction weight w.
    pub weight: f64,
    /// The sequence's advantage A.
    pub advantage: f64,
    /// log π_θ(y_t) now.
    pub logp: f64,
    /// log π_prox(y_t): the policy at the start of the step (= `logp` in the first epoch).
    pub logp_prox: f64,
    /// log π_ref(y_t), when a KL to a reference model is used.
    pub logp_ref: Option<f64>,
    /// 1 / the normaliser of this token.
    pub inv_norm: f64,
}

/// A token's coefficient and its share of the loss value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    /// c in `loss = −Σ c · log π_θ`; its gradient is the objective's.
    pub coef: f64,
    /// The policy-gradient part of the loss value: −w·A·m·r·log π / n.
    pub pg: f64,
    /// The KL part of the loss value: β·k3 / n.
    pub kl: f64,
    /// Whether the PPO clip removed this token's gradient.
    pub clipped: bool,
}

/// The coefficient of one token.
///
/// Policy gradient: the decoupled objective −w·min(r·A, clip(r, 1 − ε, 1 + ε)·A) with
/// r = π_θ / π_prox has the gradient −w·A·m·r·∇log π_θ, where m = 0 when the clip is active
/// (A > 0 and r > 1 + ε, or A < 0 and r < 1 − ε) and 1 otherwise. In the first epoch r = 1
/// exactly, so this is the gradient of −w·A·log π_θ: the plain loss.
///
/// KL: β·k3 with k3 = exp(q) − q − 1, q = log π_ref − log π_θ, has the gradient
/// β·(1 − exp(q))·∇log π_θ.
pub fn token_loss(t: &TokenTerms, clip_eps: f64, kl_coef: f64) -> TokenLoss {
    let r = (t.logp - t.logp_prox).exp();
    let clipped =
        (t.advantage > 0.0 && r > 1.0 + clip_eps) || (t.advantage < 0.0 && r < 1.0 - clip_eps);
    let m = if clipped { 0.0 } else { 1.0 };
    let pg_coef = t.weight * t.advantage * m * r * t.inv_norm;
    let (kl_coef_t, kl) = match t.logp_ref {
        Some(lr) if kl_coef > 0.0 => {
            let q = lr - t.logp;
            (
                -kl_coef * (1.0 - q.exp()) * t.inv_norm,
                kl_coef * (q.exp() - q - 1.0) * t.inv_norm,
            )
        }
        _ => (0.0, 0.0),
    };
    TokenLoss {
        coef: pg_coef + kl_coef_t,
        pg: -pg_coef * t.logp,
        kl,
        clipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_table() {
        let lr = [0.5f64.ln(), 3.0f64.ln(), 1.5f64.ln()];
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        let w = sequence_weights(&Correction::None, &lr);
        assert_eq!(w.weights, vec![1.0; 3]);
        let w = sequence_weights(&Correction::SeqIs, &lr);
        assert!(close(&w.weights, &[2.25; 3]), "{w:?}");
        let w = sequence_weights(
            &Correction::Tis {
                cap: 2.0,
                mode: TisMode::Truncate,
            },
            &lr,
        );
        assert!(
            close(&w.weights, &[0.5, 2.0, 1.5]) && w.capped == 1,
            "{w:?}"
        );
        let w = sequence_weights(
            &Correction::Tis {
                cap: 2.0,
                mode: TisMode::Mask,
            },
            &lr,
        );
        assert!(
            close(&w.weights, &[0.5, 0.0, 1.5]) && w.capped == 1,
            "{w:?}"
        );
        let w = sequence_weights(&Correction::Retrace { lambda: 0.9 }, &lr);
        assert!(close(&w.weights, &[0.45, 0.405, 0.3645]), "{w:?}");
        assert!((w.log_seq_weight - 2.25f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn ppo_clip_and_kl_coefficients() {
        let base = TokenTerms {
            weight: 1.0,
            advantage: 2.0,
            logp: -1.0,
            logp_prox: -1.0,
            logp_ref: None,
            inv_norm: 0.5,
        };
        // First epoch: r = 1, coefficient w·A/n.
        assert_eq!(token_loss(&base, 0.2, 0.0).coef, 1.0);
        // r = e^0.3 > 1.2 with A > 0: clipped.
        let up = TokenTerms { logp: -0.7, ..base };
        assert!(token_loss(&up, 0.2, 0.0).clipped);
        assert_eq!(token_loss(&up, 0.2, 0.0).coef, 0.0);
        // The same ratio with A < 0 is not clipped, and the coefficient carries r.
        let down = TokenTerms {
            advantage: -2.0,
            ..up
        };
        let l = token_loss(&down, 0.2, 0.0);
        assert!(!l.clipped && (l.coef + 0.3f64.exp()).abs() < 1e-12);
        // KL: q = log π_ref − log π; d k3 / d log π = 1 − e^q, and the loss is −c·log π.
        let kl = TokenTerms {
            advantage: 0.0,
            logp_ref: Some(-1.5),
            ..base
        };
        let l = token_loss(&kl, 0.2, 0.1);
        let q: f64 = -0.5;
        assert!((l.coef + 0.1 * (1.0 - q.exp()) * 0.5).abs() < 1e-12);
        assert!((l.kl - 0.1 * (q.exp() - q - 1.0) * 0.5).abs() < 1e-12);
    }
}
