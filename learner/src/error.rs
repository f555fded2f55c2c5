//! Errors of the learner.

/// Why a configuration or an update failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LearnerError {
    /// A configuration value is out of range.
    #[error("invalid learner configuration: {0}")]
    InvalidConfig(String),
    /// The batch cannot be trained on (empty, inconsistent lengths, mixed group sizes…).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// Too many consecutive steps had a non-finite loss or gradient.
    #[error(
        "{streak} consecutive steps had a non-finite loss or gradient (limit {limit}); \
         the last one: {last}. Lower the learning rate, check the rewards, or raise \
         max_nonfinite_steps"
    )]
    NonFinite {
        /// Consecutive non-finite steps.
        streak: usize,
        /// The configured limit.
        limit: usize,
        /// What was non-finite in the last one.
        last: String,
    },
    /// The model failed (shapes, tokens outside the vocabulary, context overflow).
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The learner's result type.
pub type Result<T> = std::result::Result<T, LearnerError>;
