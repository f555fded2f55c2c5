//! The GSM8K test problems shipped as assets (fetched by `tools/fetch-assets.sh gsm8k`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One problem: the question and its worked solution ending in `#### N`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Problem {
    /// The question.
    pub question: String,
    /// The worked solution; its last line is `#### N`.
    pub answer: String,
}

impl Problem {
    /// The final answer (the text after `####`), if the solution has one.
    pub fn final_answer(&self) -> Option<&str> {
        let pos = self.answer.rfind("####")?;
        let a = self.answer[pos + 4..].trim();
        (!a.is_empty()).then_some(a)
    }
}

/// Why the problems could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Gsm8kError {
    /// The directory is missing or empty.
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

/// The asset directory: `$NESTED_REFT_ASSETS`, else `<repository>/.assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("NESTED_REFT_ASSETS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".assets"),
    }
}

/// Loads every `*.toml` problem of `dir` (sorted by file name).
pub fn load_dir(dir: &Path) -> Result<Vec<Problem>, Gsm8kError> {
    let entries = std::fs::read_dir(dir).map_err(|_| Gsm8kError::Missing(dir.to_path_buf()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    if paths.is_empty() {
        return Err(Gsm8kError::Missing(dir.to_path_buf()));
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| Gsm8kError::Read {
                path: path.clone(),
                source,
            })?;
            toml::from_str(&text).map_err(|e| Gsm8kError::Parse {
                path,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Loads the problems from `assets_dir()/gsm8k`.
pub fn load_default() -> Result<Vec<Problem>, Gsm8kError> {
    load_dir(&assets_dir().join("gsm8k"))
}
