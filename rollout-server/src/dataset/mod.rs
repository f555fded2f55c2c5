//! Problems to train on: where they come from, and in which order they are drawn.
//!
//! * [`DatasetSpec`]: the config naming a source (a JSON Lines file, the GSM8K test problems,
//!   or the built-in arithmetic generator); it also parses from a command-line string.
//! * [`Dataset::open`]: loads the problems and reports what was skipped in [`LoadStats`].
//! * [`DataCursor`]: draws batches in a seeded order that is reshuffled every epoch; its
//!   [`CursorState`] is saved with a checkpoint so that a resumed run continues identically.
//!
//! Nothing here knows about models or prompt templates: a [`Problem`] holds the plain question
//! and the reference answer that the math reward compares against.
//!
//! ```
//! use rollout_server::dataset::{DataCursor, Dataset, DatasetSpec};
//!
//! // 20 seeded level-2 arithmetic problems (the command-line form is `arithmetic:2`).
//! let spec = DatasetSpec::Arithmetic { level: 2, count: 20, seed: 3 };
//! let dataset = Dataset::open(&spec)?;
//! assert_eq!(dataset.len(), 20);
//! assert!(dataset.problems().iter().all(|p| !p.question.is_empty() && !p.answer.is_empty()));
//!
//! // Batches of 8 in a seeded order: the first epoch (20 problems) holds no repeat.
//! let mut cursor = DataCursor::for_dataset(&dataset, 0);
//! let mut seen: Vec<String> = Vec::new();
//! for _ in 0..2 {
//!     seen.extend(cursor.next_batch(&dataset, 8)?.into_iter().map(|p| p.id));
//! }
//! // A cursor restored from its saved state continues exactly where this one stands.
//! let mut resumed = DataCursor::restore(cursor.state())?;
//! let next = cursor.next_batch(&dataset, 4)?;
//! assert_eq!(resumed.next_batch(&dataset, 4)?, next);
//! seen.extend(next.into_iter().map(|p| p.id));
//! seen.sort();
//! seen.dedup();
//! assert_eq!(seen.len(), 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod answer;
mod arithmetic;
mod cursor;
mod gsm8k;
mod jsonl;
mod spec;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use cursor::{CursorError, CursorState, DataCursor};
pub use gsm8k::Gsm8kError;
pub use spec::{DatasetSpec, ParseSpecError, MAX_ARITHMETIC_LEVEL};

/// One problem: a question and its reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A name for the problem, unique within its dataset (from the source, else derived from
    /// the file and line or the index).
    pub id: String,
    /// The question, as the user would ask it.
    pub question: String,
    /// The bare final answer: the reference handed to the math reward.
    pub answer: String,
    /// The worked solution ending in `#### answer`, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solution: Option<String>,
}

/// A loaded, non-empty set of problems.
#[derive(Debug, Clone)]
pub struct Dataset {
    problems: Vec<Problem>,
    stats: LoadStats,
}

/// What loading a dataset did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    /// Problems loaded.
    pub loaded: usize,
    /// Records left out, in source order. The library prints nothing: callers show these.
    pub skipped: Vec<Skipped>,
}

/// A record that was left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The file (or directory) it came from.
    pub path: PathBuf,
    /// Its 1-based line in a JSON Lines file; its 1-based record number in other sources.
    pub line: usize,
    /// Why it was left out.
    pub reason: SkipReason,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: skipped: {}",
            self.path.display(),
            self.line,
            self.reason
        )
    }
}

/// Why a record is not a usable problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkipReason {
    /// The line is not UTF-8.
    #[error("not valid UTF-8")]
    InvalidUtf8,
    /// The line is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The line is JSON but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A required field is absent (or `null`).
    #[error("missing field `{0}`")]
    MissingField(String),
    /// A field has a type that cannot be used.
    #[error("field `{field}` is {found}, expected {expected}")]
    WrongType {
        /// The field.
        field: String,
        /// The JSON type found.
        found: &'static str,
        /// What the field must be.
        expected: &'static str,
    },
    /// The question is empty or only whitespace.
    #[error("empty question")]
    EmptyQuestion,
    /// The answer is empty or only whitespace.
    #[error("empty answer")]
    EmptyAnswer,
    /// A worked solution whose `####` has nothing after it.
    #[error("nothing after `####` in the answer")]
    NoFinalAnswer,
}

/// Why a dataset could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The spec is not valid (e.g. an arithmetic level out of range).
    #[error("invalid dataset spec: {0}")]
    InvalidSpec(String),
    /// The file could not be read (missing, unreadable).
    #[error("cannot read dataset file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is a JSON array, not JSON Lines.
    #[error("{0} holds a JSON array; expected JSON Lines (one object per line)")]
    JsonArray(PathBuf),
    /// A bad record in strict mode.
    #[error("{path}:{line}: {reason}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: SkipReason,
    },
    /// The GSM8K problems could not be loaded.
    #[error(transparent)]
    Gsm8k(#[from] Gsm8kError),
    /// No problem was left after skipping bad records.
    #[error("dataset {origin} has no usable problems ({skipped} records skipped)")]
    Empty {
        /// Where the problems were to come from (a path or a description).
        origin: String,
        /// How many records were skipped.
        skipped: usize,
    },
}

impl Dataset {
    /// Loads the problems `spec` names, after validating it.
    ///
    /// Bad records are skipped and listed in [`stats`](Self::stats) (or are an error when a
    /// JSON Lines spec is `strict`); a dataset with no problem left is an error.
    pub fn open(spec: &DatasetSpec) -> Result<Self, DatasetError> {
        spec.validate()?;
        match spec {
            DatasetSpec::Jsonl {
                path,
                question_field,
                answer_field,
                strict,
            } => {
                let fields = jsonl::Fields {
                    question: question_field,
                    answer: answer_field,
                    strict: *strict,
                };
                let (problems, skipped) = jsonl::load(path, &fields)?;
                Self::with_stats(problems, skipped, &path.display().to_string())
            }
            DatasetSpec::Gsm8k { dir } => {
                let dir = dir.clone().unwrap_or_else(protocol::assets::gsm8k_dir);
                let (problems, skipped) = gsm8k::load(&dir)?;
                Self::with_stats(problems, skipped, &dir.display().to_string())
            }
            DatasetSpec::Arithmetic { level, count, seed } => {
                let problems = arithmetic::generate(*level, *count, *seed);
                Self::with_stats(problems, Vec::new(), &format!("arithmetic:{level}"))
            }
        }
    }

    /// A dataset of the given problems (e.g. built by a caller); empty is an error.
    pub fn from_problems(problems: Vec<Problem>) -> Result<Self, DatasetError> {
        Self::with_stats(problems, Vec::new(), "(in memory)")
    }

    fn with_stats(
        problems: Vec<Problem>,
        skipped: Vec<Skipped>,
        origin: &str,
    ) -> Result<Self, DatasetError> {
        if problems.is_empty() {
            return Err(DatasetError::Empty {
                origin: origin.to_string(),
                skipped: skipped.len(),
            });
        }
        let stats = LoadStats {
            loaded: problems.len(),
            skipped,
        };
        Ok(Self { problems, stats })
    }

    /// The problems, in source order.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The problem at `index`.
    pub fn get(&self, index: usize) -> Option<&Problem> {
        self.problems.get(index)
    }

    /// The number of problems (never 0).
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// Always false: an empty dataset cannot be built.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// What loading did: problems loaded, records skipped.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Takes the problems out.
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }
}
