//! Errors of the learner.

use std::path::PathBuf;

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
    /// The saved optimizer state does not fit the optimizer (a tensor missing, of another
    /// shape or dtype, or unexpected).
    #[error("optimizer state does not match: {0}")]
    OptimizerState(String),
    /// A checkpoint is incomplete, corrupt or does not fit the learner.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint directory (or the file in it) at fault.
        path: PathBuf,
        /// What is wrong, naming the file or tensor.
        reason: String,
    },
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "renaming to", …).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The learner's result type.
pub type Result<T> = std::result::Result<T, LearnerError>;
