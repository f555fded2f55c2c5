//! The GSM8K test problems shipped as assets (fetched by `tools/fetch-assets.sh gsm8k`).

use std::ffi::OsString;
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

/// The asset cache, following the user-cache convention (the one rule every crate, the CLI
/// and `tools/fetch-assets.sh` share):
///
/// 1. `$NESTED_REFT_ASSETS` when set and not empty;
/// 2. else `$XDG_CACHE_HOME/nested-reft` when `XDG_CACHE_HOME` is an absolute path (the XDG
///    base-directory spec says to ignore a relative one);
/// 3. else `$HOME/.cache/nested-reft`.
///
/// Without a `HOME` either, the relative `.cache/nested-reft` (of the working directory).
pub fn assets_dir() -> PathBuf {
    assets_dir_from(|name| std::env::var_os(name))
}

/// [`assets_dir`] with the environment passed in, so the rule is tested without mutating the
/// process environment.
fn assets_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(d) = var("NESTED_REFT_ASSETS") {
        return PathBuf::from(d);
    }
    if let Some(cache) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if cache.is_absolute() {
            return cache.join("nested-reft");
        }
    }
    var("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache")
        .join("nested-reft")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(vars: &[(&str, &str)]) -> PathBuf {
        assets_dir_from(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn asset_dir_follows_the_user_cache_convention() {
        let home = ("HOME", "/home/u");
        assert_eq!(dir(&[home]), Path::new("/home/u/.cache/nested-reft"));
        assert_eq!(
            dir(&[home, ("XDG_CACHE_HOME", "/c")]),
            Path::new("/c/nested-reft")
        );
        // A relative XDG_CACHE_HOME is invalid per the spec and ignored, as is an empty one.
        assert_eq!(
            dir(&[home, ("XDG_CACHE_HOME", "rel")]),
            Path::new("/home/u/.cache/nested-reft")
        );
        assert_eq!(
            dir(&[home, ("XDG_CACHE_HOME", "")]),
            Path::new("/home/u/.cache/nested-reft")
        );
        // The explicit override wins over both.
        assert_eq!(
            dir(&[home, ("XDG_CACHE_HOME", "/c"), ("NESTED_REFT_ASSETS", "/a")]),
            Path::new("/a")
        );
        assert_eq!(
            dir(&[home, ("NESTED_REFT_ASSETS", "")]),
            Path::new("/home/u/.cache/nested-reft")
        );
    }
}
