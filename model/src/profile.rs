//! Calibration profiles: a model's single-unit measurements and cost-ordered skip sets, as
//! data. [`crate::calibrate`] produces a profile; the calibrated and adaptive plan strategies
//! ([`crate::policy`]) read one. It depends on the layer plan and nothing above it.

use crate::error::{ModelError, Result};
use crate::plan::LayerPlan;
use crate::unit::Unit;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the profile file format.
pub const PROFILE_FORMAT: u32 = 1;

/// One skip set of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkipSet {
    /// The skipped units, in the order the search added them.
    pub units: Vec<Unit>,
    /// Mean per-token KL(π_full ‖ π_nested) on the calibration set, nats.
    pub kl: f64,
    /// Decode cost relative to the full model ([`LayerPlan::cost_ratio`]); 1 / cost is the
    /// ideal speedup.
    pub cost_ratio: f64,
}

/// The calibration of one unit alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitMeasure {
    /// The unit.
    pub unit: Unit,
    /// KL(π_full ‖ π_nested) with only this unit skipped, nats per token.
    pub kl: f64,
    /// The share of the full decode cost the unit saves.
    pub cost: f64,
}

/// What the calibration ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// Sequences in the calibration set.
    pub sequences: usize,
    /// Completion tokens the KL is averaged over.
    pub tokens: usize,
    /// A description of the data (e.g. "greedy completions of 32 arithmetic level-1 problems").
    pub source: String,
    /// Forward evaluations the search ran (single units and sets).
    pub evaluations: usize,
}

/// A model's calibration: single-unit measurements and cost-ordered skip sets, keyed by the
/// model hash (see [`crate::WeightBridge::model_hash`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// [`PROFILE_FORMAT`].
    pub format: u32,
    /// The model hash the profile was measured on.
    pub model_hash: String,
    /// A fingerprint of the weights it was measured on (a checkpoint of the same model has
    /// the same model hash but other weights).
    pub weights_fingerprint: String,
    /// Depth of the model.
    pub num_layers: usize,
    /// What the calibration ran on.
    pub calibration: CalibrationInfo,
    /// Every candidate unit alone.
    pub units: Vec<UnitMeasure>,
    /// The greedy path: each set is the previous one plus one unit, in increasing savings.
    pub sets: Vec<SkipSet>,
}

impl Profile {
    /// Checks the profile is for a model with `num_layers` layers and has sets.
    pub fn check_layers(&self, num_layers: usize) -> Result<()> {
        if self.num_layers != num_layers {
            return Err(ModelError::InvalidPlan(format!(
                "the calibration profile is for a {}-layer model, this model has {num_layers}",
                self.num_layers
            )));
        }
        if self.sets.is_empty() {
            return Err(ModelError::InvalidPlan(
                "the calibration profile has no skip sets".into(),
            ));
        }
        Ok(())
    }

    /// The plan of a set.
    pub fn plan(&self, set: &SkipSet) -> Result<LayerPlan> {
        LayerPlan::skipping_units(&set.units, self.num_layers)
    }

    /// The sets whose cost ratio lies within `window` of `cost_ratio`; when none does, the one
    /// nearest to it. Never empty for a profile with sets.
    pub fn sets_near(&self, cost_ratio: f64, window: f64) -> Vec<&SkipSet> {
        let near: Vec<&SkipSet> = self
            .sets
            .iter()
            .filter(|s| (s.cost_ratio - cost_ratio).abs() <= window)
            .collect();
        if !near.is_empty() {
            return near;
        }
        self.sets
            .iter()
            .min_by(|a, b| {
                (a.cost_ratio - cost_ratio)
                    .abs()
                    .total_cmp(&(b.cost_ratio - cost_ratio).abs())
            })
            .into_iter()
            .collect()
    }

    /// The cheapest set whose KL is at most `kl`, if any.
    pub fn cheapest_under(&self, kl: f64) -> Option<&SkipSet> {
        self.sets
            .iter()
            .filter(|s| s.kl <= kl)
            .min_by(|a, b| a.cost_ratio.total_cmp(&b.cost_ratio))
    }

    /// Writes the profile as JSON (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ModelError::InvalidInput(format!("profile: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))
    }

    /// Reads a profile and refuses one measured on another model (`model_hash`).
    pub fn load(path: &Path, model_hash: &str) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
        let p: Profile = serde_json::from_slice(&bytes).map_err(|e| {
            ModelError::InvalidInput(format!(
                "{} is not a calibration profile: {e}",
                path.display()
            ))
        })?;
        if p.format != PROFILE_FORMAT {
            return Err(ModelError::InvalidInput(format!(
                "{} has profile format {}, this build reads {PROFILE_FORMAT}: calibrate again",
                path.display(),
                p.format
            )));
        }
        if p.model_hash != model_hash {
            return Err(ModelError::ProfileMismatch {
                path: path.display().to_string(),
                profile: p.model_hash,
                model: model_hash.to_string(),
            });
        }
        Ok(p)
    }
}

fn io_error(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}
