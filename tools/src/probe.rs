//! The weight probe: proof that rollouts come from the weights the learner published.
//!
//! After it loads a version of the weights (and re-quantizes them for an 8-bit behavior), the
//! rollout server scores one fixed completion with the model it will sample from and sends the
//! log-probs to the learner with the version. The learner scores the same completion with its
//! own weights of that version, built the same way, and reports the largest difference in its
//! metrics. Equal up to float noise: the behavior follows the learner. Anything larger (a
//! publication that did not arrive, a stale or wrongly re-quantized behavior) is reported as a
//! mismatch naming the version.

use std::collections::VecDeque;

use anyhow::{Context, Result};
use model::{
    completion_logprobs, Decoder, Kernels, LayerPlan, ScoreRequest, Tokenizer, WeightFormat,
};
use serde::Serialize;

/// The text scored: a question of the default task and its worked answer. Fixed, so that both
/// processes score the same tokens and runs compare with each other.
const PROBE_PROMPT: &str = "Question: What is 17 + 25?\nAnswer:";
const PROBE_COMPLETION: &str = " 17 + 25 = 42. The answer is 42.";

/// Largest |Δ log-prob| per token that counts as float noise: both sides run the same kernels
/// on the same weights, but with different thread counts (so different summation orders).
pub const PROBE_TOLERANCE: f32 = 1e-3;

/// How many of its own probes the learner keeps while it waits for the server's.
const KEPT_VERSIONS: usize = 16;

/// The fixed probe completion, tokenized for one model.
#[derive(Debug, Clone)]
pub struct Probe {
    prompt: Vec<u32>,
    completion: Vec<u32>,
}

impl Probe {
    /// Tokenizes the probe text.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let prompt = tokenizer
            .encode(PROBE_PROMPT, false)
            .context("while tokenizing the probe prompt")?;
        let completion = tokenizer
            .encode(PROBE_COMPLETION, false)
            .context("while tokenizing the probe completion")?;
        anyhow::ensure!(
            !prompt.is_empty() && !completion.is_empty(),
            "the tokenizer gives no tokens for the probe text"
        );
        Ok(Self { prompt, completion })
    }

    /// Log-probs of the probe completion under `model` at full depth, temperature 1, with the
    /// rollout path's kernels.
    pub fn score(&self, model: &Decoder) -> Result<Vec<f32>> {
        let req = ScoreRequest {
            prompt: &self.prompt,
            completion: &self.completion,
        };
        let lp = completion_logprobs(
            model,
            &[req],
            &LayerPlan::full(model.config().num_layers),
            1.0,
            Kernels::Fused,
        )
        .context("while scoring the weight probe")?;
        lp.to_vecs()?
            .pop()
            .context("the probe scoring returned no row")
    }

    /// The learner's side: the probe under its weights as the behavior sees them (re-quantized
    /// to `format` for an 8-bit behavior).
    pub fn score_as_behavior(&self, model: &Decoder, format: WeightFormat) -> Result<Vec<f32>> {
        match format {
            WeightFormat::F32 => self.score(model),
            q => self.score(
                &model
                    .quantized(q)
                    .context("while quantizing for the probe")?,
            ),
        }
    }
}

/// One comparison of the behavior's probe with the learner's, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProbeCheck {
    /// The weight version both scored.
    pub version: u64,
    /// Sum of the learner's log-probs over the probe completion.
    pub learner_logprob: f64,
    /// Sum of the behavior's.
    pub behavior_logprob: f64,
    /// Largest per-token |difference|.
    pub max_abs_diff: f64,
}

impl ProbeCheck {
    /// Compares two probe results of the same version.
    pub fn compare(version: u64, learner: &[f32], behavior: &[f32]) -> Self {
        let max_abs_diff = if learner.len() == behavior.len() {
            learner
                .iter()
                .zip(behavior)
                .map(|(a, b)| f64::from((a - b).abs()))
                // NaN anywhere makes the check fail rather than vanish in `max`.
                .fold(0.0, |m: f64, d| {
                    if d.is_nan() || m.is_nan() {
                        f64::NAN
                    } else {
                        m.max(d)
                    }
                })
        } else {
            f64::INFINITY
        };
        Self {
            version,
            learner_logprob: learner.iter().map(|&x| f64::from(x)).sum(),
            behavior_logprob: behavior.iter().map(|&x| f64::from(x)).sum(),
            max_abs_diff,
        }
    }

    /// Whether the difference is float noise.
    pub fn matches(&self) -> bool {
        self.max_abs_diff <= f64::from(PROBE_TOLERANCE)
    }
}

/// The learner's record of the probes of both sides, by version, until each has its pair (the
/// server's may arrive before the learner has scored its own).
#[derive(Debug, Default)]
pub struct ProbeLedger {
    own: VecDeque<(u64, Vec<f32>)>,
    behavior: VecDeque<(u64, Vec<f32>)>,
}

fn keep(list: &mut VecDeque<(u64, Vec<f32>)>, version: u64, logprobs: Vec<f32>) {
    list.retain(|(v, _)| *v != version);
    list.push_back((version, logprobs));
    while list.len() > KEPT_VERSIONS {
        list.pop_front();
    }
}

fn find(list: &VecDeque<(u64, Vec<f32>)>, version: u64) -> Option<&[f32]> {
    list.iter()
        .find(|(v, _)| *v == version)
        .map(|(_, lp)| lp.as_slice())
}

impl ProbeLedger {
    /// Records the learner's probe of `version`; the comparison when the behavior's is there.
    pub fn learner(&mut self, version: u64, logprobs: Vec<f32>) -> Option<ProbeCheck> {
        let check =
            find(&self.behavior, version).map(|b| ProbeCheck::compare(version, &logprobs, b));
        keep(&mut self.own, version, logprobs);
        check
    }

    /// Records the behavior's probe of `version`; the comparison when the learner's is there.
    pub fn behavior(&mut self, version: u64, logprobs: Vec<f32>) -> Option<ProbeCheck> {
        let check =
            find(&self.own, version).map(|own| ProbeCheck::compare(version, own, &logprobs));
        keep(&mut self.behavior, version, logprobs);
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_the_largest_difference_and_fails_on_nan_or_length() {
        let c = ProbeCheck::compare(3, &[-1.0, -2.0, -0.5], &[-1.0, -2.25, -0.5]);
        assert_eq!(c.version, 3);
        assert_eq!(c.max_abs_diff, 0.25);
        assert_eq!(c.learner_logprob, -3.5);
        assert_eq!(c.behavior_logprob, -3.75);
        assert!(!c.matches());
        assert!(ProbeCheck::compare(1, &[-1.0], &[-1.0]).matches());
        assert!(!ProbeCheck::compare(1, &[-1.0, f32::NAN], &[-1.0, -1.0]).matches());
        assert!(!ProbeCheck::compare(1, &[f32::NAN, -1.0], &[-1.0, -1.0]).matches());
        assert!(!ProbeCheck::compare(1, &[-1.0], &[-1.0, -1.0]).matches());
    }

    #[test]
    fn ledger_pairs_the_two_sides_in_either_order_and_keeps_the_newest() {
        let mut l = ProbeLedger::default();
        for v in 0..40 {
            assert_eq!(l.learner(v, vec![-(v as f32)]), None);
        }
        assert!(l.behavior(39, vec![-39.0]).is_some_and(|c| c.matches()));
        assert!(l.behavior(24, vec![-24.0]).is_some());
        assert!(l.behavior(23, vec![-23.0]).is_none());
        // The behavior's probe first, then the learner's.
        assert_eq!(l.behavior(40, vec![-2.0]), None);
        let c = l.learner(40, vec![-1.0]).unwrap();
        assert_eq!((c.version, c.max_abs_diff), (40, 1.0));
        // A version recorded again replaces the old probe.
        assert!(l.learner(39, vec![-1.0]).is_some_and(|c| !c.matches()));
    }
}
