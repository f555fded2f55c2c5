//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or sampling from a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file the model needs is missing or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what was expected.
    #[error("malformed {what} in {path}: {detail}")]
    Malformed {
        /// What kind of content was being parsed (e.g. "config.json").
        what: &'static str,
        /// The file being parsed.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The checkpoint declares an architecture this crate does not implement.
    #[error("unsupported architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// A weight has the wrong shape, or is missing.
    #[error("weight `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Canonical (Hugging Face) tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape found in the checkpoint.
        found: Vec<usize>,
    },
    /// A weight is stored in a dtype that cannot be converted.
    #[error("weight `{name}` has unsupported dtype {dtype}")]
    UnsupportedDType {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A weight the architecture requires is not in the checkpoint.
    #[error("weight `{0}` is missing from the checkpoint")]
    MissingWeight(String),
    /// A token id is not below the vocabulary size.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfVocab {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A sequence does not fit in the model's context window.
    #[error("sequence of {len} tokens exceeds the context window of {max} tokens")]
    ContextOverflow {
        /// Tokens requested (prompt plus what is to be generated or scored).
        len: usize,
        /// The model's maximum.
        max: usize,
    },
    /// A calibration profile was measured on another model.
    #[error(
        "the calibration profile {path} is for model {profile}, not this model ({model}): run \
         `nested-reft calibrate` for this model"
    )]
    ProfileMismatch {
        /// The profile file.
        path: String,
        /// The model hash in the profile.
        profile: String,
        /// The model hash of the loaded model.
        model: String,
    },
    /// A layer plan is not valid for this model.
    #[error("invalid layer plan: {0}")]
    InvalidPlan(String),
    /// Sampling or generation parameters are invalid.
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    /// An input batch is empty or inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The device named cannot be used (unknown name, no CUDA in this build, no driver or
    /// no such GPU).
    #[error("{0}")]
    Device(String),
    /// A LoRA configuration is invalid, or adapters were used where they cannot be.
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(
        what: &'static str,
        path: impl Into<PathBuf>,
        detail: impl std::fmt::Display,
    ) -> Self {
        Self::Malformed {
            what,
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}
