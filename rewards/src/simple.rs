//! The built-in `format` and `length` rewards.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SpecError};
use crate::math::{after_answer_phrase, after_hashes, last_boxed, tail};
use crate::reward::{Reward, Sample, Score};

/// Which answer form the `format` reward requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerForm {
    /// `\boxed{...}`.
    Boxed,
    /// `#### answer`.
    Hashes,
    /// "the answer is ..." / "answer: ...".
    AnswerPhrase,
    /// Any of the above.
    #[default]
    Any,
}

/// Settings of the `format` reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FormatConfig {
    /// The required answer form (ignored when `pattern` is set).
    pub require: AnswerForm,
    /// A regular expression the completion must match instead (linear-time engine).
    pub pattern: Option<String>,
    /// Only this many bytes at the end of a completion are searched for the answer form.
    pub scan_tail_bytes: usize,
}

impl Default for FormatConfig {
    fn default() -> Self {
        Self {
            require: AnswerForm::Any,
            pattern: None,
            scan_tail_bytes: 8192,
        }
    }
}

/// The `format` reward: 1 when the required answer form is present, else 0.
#[derive(Debug, Clone)]
pub struct FormatReward {
    cfg: FormatConfig,
    pattern: Option<Regex>,
}

impl FormatReward {
    /// Builds the reward, compiling its pattern.
    pub fn new(cfg: FormatConfig) -> Result<Self, SpecError> {
        let pattern = match &cfg.pattern {
            Some(p) => Some(Regex::new(p).map_err(|e| SpecError::Regex {
                pattern: p.clone(),
                message: e.to_string(),
            })?),
            None => None,
        };
        Ok(Self { cfg, pattern })
    }
}

impl Reward for FormatReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        let ok = if let Some(re) = &self.pattern {
            re.is_match(&sample.completion)
        } else {
            let t = tail(&sample.completion, self.cfg.scan_tail_bytes);
            let max = self.cfg.scan_tail_bytes;
            match self.cfg.require {
                AnswerForm::Boxed => last_boxed(t, max).is_some(),
                AnswerForm::Hashes => after_hashes(t).is_some(),
                AnswerForm::AnswerPhrase => after_answer_phrase(t).is_some(),
                AnswerForm::Any => {
                    last_boxed(t, max).is_some()
                        || after_hashes(t).is_some()
                        || after_answer_phrase(t).is_some()
                }
            }
        };
        Ok(Score::new(if ok { 1.0 } else { 0.0 }))
    }
}

/// How the `length` reward measures a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// Unicode scalar values.
    #[default]
    Chars,
    /// Whitespace-separated words.
    Words,
    /// UTF-8 bytes.
    Bytes,
}

/// Settings of the `length` reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthConfig {
    /// Length allowed without penalty.
    pub budget: usize,
    /// Unit of `budget`.
    #[serde(default)]
    pub unit: LengthUnit,
    /// Penalty per unit beyond the budget (default `1 / budget`: -1 at twice the budget).
    #[serde(default)]
    pub penalty_per_unit: Option<f64>,
    /// Largest penalty (default 1).
    #[serde(default = "one")]
    pub max_penalty: f64,
}

fn one() -> f64 {
    1.0
}

/// The `length` reward: 0 within the budget, then a linear penalty (negative), capped.
#[derive(Debug, Clone)]
pub struct LengthReward {
    cfg: LengthConfig,
    per_unit: f64,
}

impl LengthReward {
    /// Builds the reward after validating its settings.
    pub fn new(cfg: LengthConfig) -> Result<Self, SpecError> {
        if cfg.budget == 0 {
            return Err(SpecError::Invalid("length.budget must be positive".into()));
        }
        let per_unit = cfg.penalty_per_unit.unwrap_or(1.0 / cfg.budget as f64);
        if !(per_unit.is_finite() && per_unit >= 0.0) {
            return Err(SpecError::Invalid(format!(
                "length.penalty_per_unit must be finite and non-negative, got {per_unit}"
            )));
        }
        if !(cfg.max_penalty.is_finite() && cfg.max_penalty >= 0.0) {
            return Err(SpecError::Invalid(format!(
                "length.max_penalty must be finite and non-negative, got {}",
                cfg.max_penalty
            )));
        }
        Ok(Self { cfg, per_unit })
    }
}

impl Reward for LengthReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        let c = &sample.completion;
        let len = match self.cfg.unit {
            LengthUnit::Chars => c.chars().count(),
            LengthUnit::Words => c.split_whitespace().count(),
            LengthUnit::Bytes => c.len(),
        };
        let over = len.saturating_sub(self.cfg.budget) as f64;
        let penalty = (over * self.per_unit).min(self.cfg.max_penalty);
        let mut s = Score::new(if penalty > 0.0 { -penalty } else { 0.0 });
        s.details.insert("length".into(), len.into());
        Ok(s)
    }
}
