//! The `Reward` trait and the sample/score types every reward speaks.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Result, RewardError};

/// One completion to score.
///
/// JSON form (also the input of `nested-reft score` and of external modules):
/// `{"prompt": "...", "completion": "...", "reference": "...", "metadata": {...}}`;
/// `prompt` and `metadata` are optional, unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt the completion answers (may be empty).
    #[serde(default)]
    pub prompt: String,
    /// The generated text.
    pub completion: String,
    /// The reference answer (a bare answer or a worked solution ending in `#### N`).
    pub reference: String,
    /// Free-form data passed through to the reward (e.g. a task id); `null` when absent.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
}

impl Sample {
    /// A sample with empty prompt and no metadata.
    pub fn new(completion: impl Into<String>, reference: impl Into<String>) -> Self {
        Self {
            prompt: String::new(),
            completion: completion.into(),
            reference: reference.into(),
            metadata: Value::Null,
        }
    }
}

/// The result of scoring one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The reward; always finite.
    pub value: f64,
    /// The answer the reward extracted from the completion, when it extracts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    /// Which extraction rule matched (e.g. `boxed`, `hashes`, `answer_phrase`, `last_number`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<String>,
    /// Anything else worth showing to a user debugging the reward.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl Score {
    /// A bare score with no extraction details.
    pub fn new(value: f64) -> Self {
        Self {
            value,
            extracted: None,
            matched_by: None,
            details: Map::new(),
        }
    }

    /// Returns the score when its value is finite, else [`RewardError::NonFiniteScore`].
    pub fn checked(self) -> Result<Self> {
        if self.value.is_finite() {
            Ok(self)
        } else {
            Err(RewardError::NonFiniteScore(self.value.to_string()))
        }
    }
}

/// A reward function: score one sample.
///
/// Implementations are shared across threads (`Send + Sync`); the rollout server holds a
/// `Box<dyn Reward>` built from its config. [`score_batch`](Reward::score_batch) has a
/// default (one call per sample); rewards that talk to a process override it to send one
/// request per batch. Any closure `Fn(&Sample) -> Result<Score>` is a reward, so tests can pass
/// a closure where a config would name a module.
///
/// ```
/// use rewards::{MathReward, Reward, RewardError, RewardSpec, Sample, Score};
///
/// // The built-in verifier: the completion's final answer against the reference.
/// let math = MathReward::default();
/// let right = math.score(&Sample::new("6 * 7 = 42, so the answer is \\boxed{42}.", "42"))?;
/// assert_eq!(right.value, 1.0);
/// assert_eq!(right.extracted.as_deref(), Some("42"));
/// assert_eq!(right.matched_by.as_deref(), Some("boxed"));
/// assert_eq!(math.score(&Sample::new("The answer is 41.", "42"))?.value, 0.0);
///
/// // Any closure is a reward; a non-finite score is an error, never a silent value.
/// let short = |s: &Sample| Ok(Score::new(if s.completion.len() <= 10 { 1.0 } else { 0.0 }));
/// assert_eq!(short.score(&Sample::new("42", "42"))?.value, 1.0);
/// let broken = |_: &Sample| Ok(Score::new(f64::NAN));
/// let e = broken.score(&Sample::new("42", "42"));
/// assert!(matches!(e, Err(RewardError::NonFiniteScore(_))));
///
/// // From a config: the verifier, counted only when the answer is boxed.
/// let spec = RewardSpec::from_arg(
///     r#"{"kind": "gate", "gate": {"kind": "format", "require": "boxed"}, "reward": {"kind": "math"}}"#,
/// )?;
/// let gated = spec.build()?;
/// let scores = gated.score_batch(&[
///     Sample::new("\\boxed{42}", "42"),
///     Sample::new("The answer is 42.", "42"),
/// ]);
/// let values: Vec<f64> = scores.into_iter().map(|s| s.map(|s| s.value)).collect::<Result<_, _>>()?;
/// assert_eq!(values, [1.0, 0.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Reward: Send + Sync {
    /// Scores one sample. An `Err` marks the sample as failed (never a silent 0).
    fn score(&self, sample: &Sample) -> Result<Score>;

    /// Scores a batch; the result has one entry per sample, in order.
    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<Score>> {
        samples.iter().map(|s| self.score(s)).collect()
    }
}

impl std::fmt::Debug for dyn Reward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Reward")
    }
}

impl<F> Reward for F
where
    F: Fn(&Sample) -> Result<Score> + Send + Sync,
{
    fn score(&self, sample: &Sample) -> Result<Score> {
        self(sample).and_then(Score::checked)
    }
}
