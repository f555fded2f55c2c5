//! The GSM8K test problems shipped as assets (`tools/fetch-assets.sh gsm8k`): one TOML file
//! per problem with a `question` and a worked solution `answer` ending in `#### N`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{answer, DatasetError, Problem, SkipReason, Skipped};

/// One problem file as written.
#[derive(Deserialize)]
struct RawProblem {
    question: String,
    answer: String,
}

/// Why the GSM8K problems could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Gsm8kError {
    /// The directory is missing or has no `*.toml` file.
    #[error("no GSM8K problems in {0}: run `tools/fetch-assets.sh gsm8k` (set NESTED_REFT_ASSETS to use another asset directory)")]
    Missing(PathBuf),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a problem.
    #[error("{path} is not a GSM8K problem: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The problems of every `*.toml` file of `dir`, in file-name order, named after their files
/// (`gsm8k-0042` for `0042.toml`). A problem with an empty question or no final answer is
/// skipped (with its 1-based position as the record number); an unreadable or malformed file
/// is an error.
pub(super) fn load(dir: &Path) -> Result<(Vec<Problem>, Vec<Skipped>), DatasetError> {
    let entries = std::fs::read_dir(dir).map_err(|_| Gsm8kError::Missing(dir.to_path_buf()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    if paths.is_empty() {
        return Err(Gsm8kError::Missing(dir.to_path_buf()).into());
    }
    paths.sort();
    let mut problems = Vec::with_capacity(paths.len());
    let mut skipped = Vec::new();
    for (i, path) in paths.into_iter().enumerate() {
        let text = std::fs::read_to_string(&path).map_err(|source| Gsm8kError::Read {
            path: path.clone(),
            source,
        })?;
        let raw: RawProblem = toml::from_str(&text).map_err(|e| Gsm8kError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let question = raw.question.trim();
        let parsed = if question.is_empty() {
            Err(SkipReason::EmptyQuestion)
        } else {
            answer::split_answer(&raw.answer)
        };
        match parsed {
            Ok((answer, solution)) => {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("{i:04}"));
                problems.push(Problem {
                    id: format!("gsm8k-{name}"),
                    question: question.to_string(),
                    answer,
                    solution,
                });
            }
            Err(reason) => skipped.push(Skipped {
                path,
                line: i + 1,
                reason,
            }),
        }
    }
    Ok((problems, skipped))
}
