//! The built-in `math` reward: extract the final answer, normalise, compare.

mod extract;
mod number;
mod value;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{Result, RewardError, SpecError};
use crate::reward::{Reward, Sample, Score};

pub use extract::Extraction;
pub(crate) use extract::{
    after_answer_phrase, after_hashes, extract, last_boxed, tail, ExtractLimits,
};

/// Settings of the `math` reward (all optional in a spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MathConfig {
    /// When no `\boxed{}`, `####` or "the answer is" is found, use the last number.
    pub last_number_fallback: bool,
    /// Relative tolerance for answers that cannot be compared as exact rationals.
    pub rel_tol: f64,
    /// Only this many bytes at the end of a completion are searched.
    pub scan_tail_bytes: usize,
    /// Longer extracted answers are rejected (bounded normalisation work).
    pub max_answer_bytes: usize,
}

impl Default for MathConfig {
    fn default() -> Self {
        Self {
            last_number_fallback: true,
            rel_tol: 1e-6,
            scan_tail_bytes: 8192,
            max_answer_bytes: 512,
        }
    }
}

/// The `math` reward: 1 when the completion's final answer equals the reference, else 0.
///
/// Extraction, in priority order: the last `\boxed{...}` (nested braces), `#### N`,
/// "the answer is ...", then (configurable) the last number. Normalisation handles thousands
/// separators, currency and unit words, percent, signs, trailing zeros, decimals, fractions
/// (`a/b`, `\frac`, `\dfrac`, `\tfrac`), mixed numbers, scientific notation, `\text{}`,
/// `\left( \right)`, `$…$`, intervals and tuples. Numbers compare exactly as rationals when
/// they fit, else within `rel_tol`. A completion without any answer scores 0 (it is not an
/// error); an empty reference is an error.
#[derive(Debug, Clone, Default)]
pub struct MathReward {
    cfg: MathConfig,
}

impl MathReward {
    /// Builds the reward after validating its settings.
    pub fn new(cfg: MathConfig) -> Result<Self, SpecError> {
        if !(cfg.rel_tol.is_finite() && (0.0..1.0).contains(&cfg.rel_tol)) {
            return Err(SpecError::Invalid(format!(
                "math.rel_tol must be in [0, 1), got {}",
                cfg.rel_tol
            )));
        }
        if cfg.scan_tail_bytes < 16 || cfg.max_answer_bytes == 0 {
            return Err(SpecError::Invalid(
                "math.scan_tail_bytes must be at least 16 and math.max_answer_bytes at least 1"
                    .into(),
            ));
        }
        Ok(Self { cfg })
    }

    fn limits(&self) -> ExtractLimits {
        ExtractLimits {
            scan_tail_bytes: self.cfg.scan_tail_bytes,
            max_answer_bytes: self.cfg.max_answer_bytes,
            last_number_fallback: self.cfg.last_number_fallback,
        }
    }

    /// The final answer the reward would extract from `completion`, and by which rule.
    pub fn extract_answer<'a>(&self, completion: &'a str) -> Option<(&'a str, Extraction)> {
        extract(completion, &self.limits())
    }

    /// True when two answer strings are equivalent under this reward's normalisation.
    pub fn answers_match(&self, a: &str, b: &str) -> bool {
        let m = self.cfg.max_answer_bytes;
        let va = value::parse(&value::clean(a, m));
        let vb = value::parse(&value::clean(b, m));
        value::equivalent(&va, &vb, self.cfg.rel_tol)
    }
}

impl Reward for MathReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        let lim = self.limits();
        let reference = extract::extract_reference(&sample.reference, &lim);
        if reference.is_empty() {
            return Err(RewardError::InvalidSample(
                "the reference answer is empty".into(),
            ));
        }
        if reference.len() > lim.max_answer_bytes {
            return Err(RewardError::InvalidSample(format!(
                "the reference answer is {} bytes long (limit {}); give the bare answer or end a worked solution with `#### answer`",
                reference.len(),
                lim.max_answer_bytes
            )));
        }
        let mut score = Score::new(0.0);
        score
            .details
            .insert("reference".into(), Json::String(reference.to_string()));
        let Some((answer, by)) = extract(&sample.completion, &lim) else {
            return Ok(score);
        };
        if self.answers_match(answer, reference) {
            score.value = 1.0;
        }
        score.extracted = Some(answer.to_string());
        score.matched_by = Some(by.name().to_string());
        Ok(score)
    }
}
