//! `DatasetSpec`: which problems to load, as written in a config file or on the command line.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DatasetError;

/// The highest level of the built-in arithmetic generator.
pub const MAX_ARITHMETIC_LEVEL: u8 = 5;

/// Where the problems come from, tagged by `kind`.
///
/// TOML:
/// ```toml
/// [dataset]
/// kind = "jsonl"
/// path = "data/train.jsonl"
/// answer_field = "solution"
/// ```
/// JSON: `{"kind": "arithmetic", "level": 3, "count": 500, "seed": 7}`.
/// On the command line see [`FromStr`](#impl-FromStr-for-DatasetSpec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum DatasetSpec {
    /// A JSON Lines file, one object per line.
    ///
    /// The answer field holds a bare answer (a string or a JSON number) or a GSM8K-style
    /// worked solution ending in `#### N`; then the answer is the text after the last `####`
    /// and the solution is the whole text. Answers are tidied: `1,234` -> `1234`, a trailing
    /// `.`, a leading `$` and trailing unit words are dropped. An optional `id` field (string or
    /// number) names the problem, else it is named `<file stem>-<line>`. Blank lines are
    /// skipped silently; a bad line (not JSON, not an object, a missing or mistyped field, an
    /// empty question or answer, `####` with nothing after it) is skipped and listed in the
    /// load stats, or is an error naming `file:line` when `strict`.
    Jsonl {
        /// The file.
        path: PathBuf,
        /// The field holding the question (default `question`).
        #[serde(default = "default_question_field")]
        question_field: String,
        /// The field holding the answer or worked solution (default `answer`).
        #[serde(default = "default_answer_field")]
        answer_field: String,
        /// Fail on the first bad line instead of skipping it (default false).
        #[serde(default)]
        strict: bool,
    },
    /// The 100 GSM8K test problems shipped as assets (`tools/fetch-assets.sh gsm8k`), named
    /// `gsm8k-<file stem>`.
    Gsm8k {
        /// The directory of `*.toml` problems (default `<assets>/gsm8k`, see
        /// [`protocol::assets::gsm8k_dir`]).
        #[serde(default)]
        dir: Option<PathBuf>,
    },
    /// Arithmetic word problems made by a seeded generator; every answer is a non-negative
    /// integer and every problem has a worked solution ending in `#### N`.
    ///
    /// Levels:
    /// 1. One addition of two small numbers (2–20): "Tom has 3 apples and buys 5 more. How many
    ///    apples does Tom have now?"
    /// 2. One subtraction (up to 100), multiplication (2–12 by 2–12) or exact division:
    ///    "Mia shares 42 stickers equally among 6 friends. How many stickers does each friend
    ///    get?"
    /// 3. Two steps mixing the four operations, numbers up to about 50: "Leo has 12 marbles and
    ///    buys 3 bags with 8 marbles in each. How many marbles does Leo have now?"
    /// 4. Three steps, numbers up to about 1,000: "A shop has 420 pencils. It sells 135 and
    ///    then receives 6 boxes of 25 pencils. How many pencils does the shop have now?"
    /// 5. Four or five steps, numbers up to about 10,000, written with thousands separators.
    ///
    /// The same `(level, count, seed)` always gives the same problems, and the first `k`
    /// problems do not depend on `count`.
    Arithmetic {
        /// Difficulty, 1 to [`MAX_ARITHMETIC_LEVEL`] (default 1).
        #[serde(default = "default_level")]
        level: u8,
        /// How many problems (default 1000).
        #[serde(default = "default_count")]
        count: usize,
        /// The generator's seed (default 0).
        #[serde(default)]
        seed: u64,
    },
}

fn default_question_field() -> String {
    "question".into()
}

fn default_answer_field() -> String {
    "answer".into()
}

fn default_level() -> u8 {
    1
}

fn default_count() -> usize {
    1000
}

impl DatasetSpec {
    /// A JSON Lines spec with the default field names, not strict.
    pub fn jsonl(path: impl Into<PathBuf>) -> Self {
        Self::Jsonl {
            path: path.into(),
            question_field: default_question_field(),
            answer_field: default_answer_field(),
            strict: false,
        }
    }

    /// An arithmetic spec with the default count (1000) and seed (0).
    pub fn arithmetic(level: u8) -> Self {
        Self::Arithmetic {
            level,
            count: default_count(),
            seed: 0,
        }
    }

    /// Checks the values a config file can get wrong.
    pub fn validate(&self) -> Result<(), DatasetError> {
        match self {
            Self::Jsonl {
                question_field,
                answer_field,
                ..
            } => {
                if question_field.is_empty() || answer_field.is_empty() {
                    return Err(DatasetError::InvalidSpec(
                        "jsonl question_field and answer_field must not be empty".into(),
                    ));
                }
                if question_field == answer_field {
                    return Err(DatasetError::InvalidSpec(format!(
                        "jsonl question_field and answer_field are both `{question_field}`"
                    )));
                }
            }
            Self::Gsm8k { .. } => {}
            Self::Arithmetic { level, count, .. } => {
                if !(1..=MAX_ARITHMETIC_LEVEL).contains(level) {
                    return Err(DatasetError::InvalidSpec(format!(
                        "arithmetic level {level} is out of range 1-{MAX_ARITHMETIC_LEVEL}"
                    )));
                }
                if *count == 0 {
                    return Err(DatasetError::InvalidSpec(
                        "arithmetic count must be at least 1".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A command-line dataset string that names no dataset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} in dataset `{input}`; expected `arithmetic`, `arithmetic:LEVEL` (LEVEL 1-{max}), `gsm8k`, `gsm8k:DIR`, or a path ending in `.jsonl` or `.json`", max = MAX_ARITHMETIC_LEVEL)]
pub struct ParseSpecError {
    input: String,
    problem: String,
}

impl ParseSpecError {
    fn new(input: &str, problem: impl Into<String>) -> Self {
        Self {
            input: input.to_string(),
            problem: problem.into(),
        }
    }
}

/// Parses a command-line dataset string:
///
/// * `arithmetic`: level 1, 1000 problems, seed 0; `arithmetic:3`: level 3;
/// * `gsm8k`: the GSM8K assets; `gsm8k:DIR`: the GSM8K problems in `DIR`;
/// * a path ending in `.jsonl` or `.json` (e.g. `data/train.jsonl`): a JSON Lines file with
///   the default field names, not strict.
///
/// The caller may change the other fields (count, seed, strict) afterwards.
/// The command-line form (`arithmetic:2`, `gsm8k`, `gsm8k:DIR`, a path), plus the settings that
/// form cannot carry.
impl std::fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jsonl { path, strict, .. } => {
                write!(
                    f,
                    "{}{}",
                    path.display(),
                    if *strict { " (strict)" } else { "" }
                )
            }
            Self::Gsm8k { dir: None } => write!(f, "gsm8k"),
            Self::Gsm8k { dir: Some(d) } => write!(f, "gsm8k:{}", d.display()),
            Self::Arithmetic { level, count, seed } => {
                write!(f, "arithmetic:{level} ({count} problems, seed {seed})")
            }
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = ParseSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t == "arithmetic" {
            return Ok(Self::arithmetic(default_level()));
        }
        if let Some(level) = t.strip_prefix("arithmetic:") {
            let level: u8 = level
                .trim()
                .parse()
                .map_err(|_| ParseSpecError::new(s, format!("`{level}` is not a level")))?;
            if !(1..=MAX_ARITHMETIC_LEVEL).contains(&level) {
                return Err(ParseSpecError::new(
                    s,
                    format!("arithmetic level {level} is out of range"),
                ));
            }
            return Ok(Self::arithmetic(level));
        }
        if t == "gsm8k" {
            return Ok(Self::Gsm8k { dir: None });
        }
        if let Some(dir) = t.strip_prefix("gsm8k:") {
            if dir.is_empty() {
                return Err(ParseSpecError::new(s, "an empty directory"));
            }
            return Ok(Self::Gsm8k {
                dir: Some(PathBuf::from(dir)),
            });
        }
        let is_json = std::path::Path::new(t)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
        if is_json {
            return Ok(Self::jsonl(t));
        }
        Err(ParseSpecError::new(s, "an unknown form"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_form_with_defaults() {
        let spec: DatasetSpec =
            serde_json::from_str(r#"{"kind": "jsonl", "path": "a.jsonl"}"#).expect("a jsonl spec");
        assert_eq!(spec, DatasetSpec::jsonl("a.jsonl"));
        let spec: DatasetSpec = serde_json::from_str(r#"{"kind": "arithmetic", "level": 2}"#)
            .expect("an arithmetic spec");
        assert_eq!(spec, DatasetSpec::arithmetic(2));
        let back: DatasetSpec =
            serde_json::from_str(&serde_json::to_string(&spec).expect("serialises"))
                .expect("round trip");
        assert_eq!(back, spec);
        let unknown = serde_json::from_str::<DatasetSpec>(r#"{"kind": "gsm8k", "dri": "x"}"#);
        assert!(unknown.is_err(), "a misspelt field is refused");
    }

    #[test]
    fn validation() {
        assert!(DatasetSpec::arithmetic(0).validate().is_err());
        assert!(DatasetSpec::arithmetic(MAX_ARITHMETIC_LEVEL + 1)
            .validate()
            .is_err());
        let zero = DatasetSpec::Arithmetic {
            level: 1,
            count: 0,
            seed: 0,
        };
        assert!(zero.validate().is_err());
        let same = DatasetSpec::Jsonl {
            path: "x.jsonl".into(),
            question_field: "q".into(),
            answer_field: "q".into(),
            strict: false,
        };
        assert!(same.validate().is_err());
        assert!(DatasetSpec::jsonl("x.jsonl").validate().is_ok());
    }
}
