//! Error types of the rewards crate.

use std::path::PathBuf;
use std::time::Duration;

/// Why one sample could not be scored.
///
/// A failed sample is never a silent zero: callers count it and decide (the rollout server
/// records it as a failed reward outcome carrying this message and logs each distinct message
/// once; the learner leaves the sample's group out). The enum is `Clone` so that a batch-level failure
/// (a module that timed out) can be reported for every sample of the batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RewardError {
    /// The sample itself is unusable (e.g. an empty reference).
    #[error("invalid sample: {0}")]
    InvalidSample(String),
    /// A module returned NaN or an infinite score.
    #[error("the reward module returned a non-finite score ({0})")]
    NonFiniteScore(String),
    /// A module reported that it could not score this sample.
    #[error("the reward module failed on this sample: {0}")]
    Module(String),
    /// An external module did not answer within its per-request timeout.
    #[error("the reward module did not answer within {0:?} (it was killed and will be restarted)")]
    Timeout(Duration),
    /// An external module exited or closed its output before answering.
    #[error("the reward module exited before answering: {0}")]
    ModuleExited(String),
    /// An external module wrote something that is not a valid response.
    #[error("the reward module broke the protocol: {0}")]
    Protocol(String),
    /// A module could not be started or is waiting out its restart backoff.
    #[error("the reward module is unavailable: {0}")]
    Unavailable(String),
}

/// Convenience alias for results of scoring one sample.
pub type Result<T, E = RewardError> = std::result::Result<T, E>;

/// Why a reward could not be built from its spec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("cannot read the reward config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A TOML document could not be parsed as a reward spec.
    #[error("invalid reward spec in {origin}: {message}")]
    Parse {
        /// Where the spec came from (a path or "inline spec").
        origin: String,
        /// The parser's message (it names the field).
        message: String,
    },
    /// A bare name that is not a built-in reward.
    #[error("unknown reward {0:?}: built-ins chosen by name are `math` and `format`; other kinds need a JSON or TOML spec")]
    UnknownName(String),
    /// A spec that parses but makes no sense (e.g. a negative budget).
    #[error("invalid reward spec: {0}")]
    Invalid(String),
    /// A regular expression in the spec does not compile.
    #[error("invalid regular expression {pattern:?}: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The compiler's message.
        message: String,
    },
    /// A dynamic-library module could not be loaded.
    #[error(transparent)]
    Dylib(#[from] DylibError),
}

/// Why a dynamic-library reward module could not be loaded or initialised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DylibError {
    /// `dlopen` failed.
    #[error("cannot load the reward library {path}: {message}")]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// A required symbol is missing.
    #[error(
        "the reward library {path} does not export `{symbol}` (is it a nested-reft reward module?)"
    )]
    MissingSymbol {
        /// The library.
        path: PathBuf,
        /// The missing symbol.
        symbol: &'static str,
    },
    /// The library implements another version of the C ABI.
    #[error("the reward library {path} implements ABI version {found}, this build supports version {expected}; rebuild the module against this version")]
    AbiVersion {
        /// The library.
        path: PathBuf,
        /// What the library reports.
        found: u32,
        /// What this crate implements.
        expected: u32,
    },
    /// The module's create function refused its configuration.
    #[error("the reward library {path} refused its configuration: {message}")]
    Create {
        /// The library.
        path: PathBuf,
        /// The module's message.
        message: String,
    },
}

/// Why [`score_jsonl`](crate::score_jsonl) stopped. Bad input lines do not stop it (they are
/// reported per line); only I/O on the streams does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScoreIoError {
    /// Reading the input failed.
    #[error("reading the input failed at line {line}: {source}")]
    Read {
        /// 1-based line number.
        line: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing the output failed.
    #[error("writing the output failed: {0}")]
    Write(#[source] std::io::Error),
}
