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
