//! Where a model's calibration profile lives and how it is read: the profile is data that
//! the plan flags and the config file read (calibrated and adaptive strategies) and that
//! `nested-reft calibrate` writes. It depends on nothing of this crate above the asset paths.

use anyhow::{bail, Result};
use model::{ModelConfig, PlanChoice, PlanSpec, Profile, Tokenizer, WeightBridge};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the calibrated and adaptive strategies need to find the model's profile.
#[derive(Debug, Clone, Copy)]
pub struct ProfileSource<'a> {
    /// The model's path (the profile lives next to it by default).
    pub model_path: &'a Path,
    /// The model's configuration.
    pub config: &'a ModelConfig,
    /// Its tokenizer (part of the model hash).
    pub tokenizer: &'a Tokenizer,
}

/// The plan spec of `choice` for a loaded model, reading the calibration profile (from
/// `profile`, else next to the model) when the choice needs one.
pub fn resolve_choice(
    choice: &PlanChoice,
    profile: Option<&Path>,
    src: ProfileSource<'_>,
) -> Result<PlanSpec> {
    let profile = if choice.needs_profile() {
        Some(Arc::new(load_profile(
            profile,
            src.model_path,
            src.config,
            src.tokenizer,
        )?))
    } else {
        None
    };
    Ok(choice.resolve(src.config.num_layers, profile)?)
}

/// The default profile path of a model: `<file>.profile.json` next to a model file, or
/// `nested-reft-profile.json` inside a model directory (a Hugging Face directory or a saved
/// checkpoint).
pub fn default_profile_path(model_path: &Path) -> PathBuf {
    if model_path.is_dir() {
        model_path.join("nested-reft-profile.json")
    } else {
        let mut name = model_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".profile.json");
        model_path.with_file_name(name)
    }
}

/// The model hash a profile is keyed by.
pub fn model_hash(cfg: &ModelConfig, tokenizer: &Tokenizer) -> Result<String> {
    Ok(WeightBridge::new(cfg, tokenizer)?.model_hash().to_string())
}

/// Loads the profile for a model (from `path`, else the default path), refusing one measured
/// on another model; a missing profile is an error that says how to make one.
pub fn load_profile(
    path: Option<&Path>,
    model_path: &Path,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<Profile> {
    let file = path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_profile_path(model_path));
    if !file.exists() {
        bail!(
            "no calibration profile at {}: run `nested-reft calibrate{}` first (it takes a few \
             minutes), or give --profile",
            file.display(),
            if path.is_none() && !is_default_model(model_path) {
                format!(" --model {}", model_path.display())
            } else {
                String::new()
            }
        );
    }
    let hash = model_hash(cfg, tokenizer)?;
    let profile = Profile::load(&file, &hash)?;
    profile.check_layers(cfg.num_layers)?;
    Ok(profile)
}

fn is_default_model(path: &Path) -> bool {
    path == protocol::assets::default_model_path()
}
