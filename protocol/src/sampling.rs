//! The sampling parameters a completion is drawn with, shared by the sampler (model), the
//! rollout generator, the record and the learner's check of it.

use serde::{Deserialize, Serialize};

/// Parameters of a tempered, optionally truncated draw from the next-token distribution.
///
/// Truncation keeps the `top_k` most likely tokens (0: all), then the smallest prefix of
/// them, most likely first, whose mass under the tempered softmax renormalised over the kept
/// tokens reaches `top_p`; the token is drawn from the tempered softmax renormalised over what
/// is left, and its recorded log-probability is the log of that renormalised probability.
///
/// ```
/// use protocol::SamplingParams;
///
/// let plain = SamplingParams::temperature(0.7);
/// assert!(!plain.is_truncated());
/// assert!(SamplingParams { top_k: 40, ..plain }.is_truncated());
/// assert!(SamplingParams { top_p: 0.0, ..plain }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature, > 0.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::temperature(1.0)
    }
}

/// Why sampling parameters were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    /// The temperature is not a positive finite number.
    #[error("temperature {0} must be a positive number (use greedy decoding for 0)")]
    Temperature(f32),
    /// `top_p` is outside (0, 1].
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
}

impl SamplingParams {
    /// Plain temperature sampling: no truncation, so importance ratios against the full
    /// tempered softmax of the target stay exact.
    pub const fn temperature(temperature: f32) -> Self {
        Self {
            temperature,
            top_p: 1.0,
            top_k: 0,
        }
    }

    /// Whether top-p or top-k may cut the distribution (the draw is then not from the full
    /// tempered softmax).
    pub fn is_truncated(&self) -> bool {
        self.top_p < 1.0 || self.top_k > 0
    }

    /// Checks the ranges.
    pub fn validate(self) -> Result<Self, SamplingError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(self)
    }
}
