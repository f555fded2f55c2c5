//! `RewardSpec`: the serde-tagged description of a reward, as written in a config file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compose::{Gate, WeightedSum};
use crate::dylib::{DylibConfig, DylibReward};
use crate::error::SpecError;
use crate::external::{ExternalConfig, ExternalReward};
use crate::math::{MathConfig, MathReward};
use crate::reward::Reward;
use crate::simple::{FormatConfig, FormatReward, LengthConfig, LengthReward};

/// A reward described in a config file, tagged by `kind`.
///
/// TOML:
/// ```toml
/// [reward]
/// kind = "gate"
/// gate = { kind = "format", require = "boxed" }
/// reward = { kind = "math" }
/// ```
/// JSON: `{"kind": "external", "command": ["python3", "math_reward.py"], "timeout_ms": 5000}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RewardSpec {
    /// The built-in math verifier.
    Math(MathConfig),
    /// The built-in answer-form check.
    Format(FormatConfig),
    /// The built-in length penalty.
    Length(LengthConfig),
    /// `Σ weight · reward`.
    WeightedSum {
        /// The terms.
        terms: Vec<WeightedTerm>,
    },
    /// `reward` when `gate ≥ threshold`, else `otherwise`.
    Gate {
        /// The condition (e.g. a `format` reward).
        gate: Box<RewardSpec>,
        /// The reward that counts when the gate passes.
        reward: Box<RewardSpec>,
        /// Gate score needed to pass (default 1).
        #[serde(default = "default_threshold")]
        threshold: f64,
        /// Score of a sample that does not pass (default 0).
        #[serde(default)]
        otherwise: f64,
    },
    /// A process speaking JSON Lines on stdin/stdout.
    External(ExternalConfig),
    /// A dynamic library implementing the C ABI of [`crate::abi`].
    Dylib(DylibConfig),
}

fn default_threshold() -> f64 {
    1.0
}

/// One term of a weighted sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTerm {
    /// Its weight.
    pub weight: f64,
    /// The reward.
    pub reward: RewardSpec,
}

/// The spec inside a parsed document: the document itself, or its `reward` entry when the
/// document has no `kind` (a larger config file with a `[reward]` table).
fn unwrap_document(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(mut m) if !m.contains_key("kind") && m.contains_key("reward") => {
            m.remove("reward").unwrap_or(serde_json::Value::Null)
        }
        other => other,
    }
}

impl RewardSpec {
    /// Parses a command-line style argument: a path to a `.toml`/`.json` config file when such
    /// a file exists, else an inline JSON spec (`{"kind": ...}`), else a built-in name
    /// (`math`, `format`).
    pub fn from_arg(arg: &str) -> Result<Self, SpecError> {
        let path = Path::new(arg);
        if path.is_file() {
            return Self::from_file(path);
        }
        let t = arg.trim();
        if t.starts_with('{') {
            return Self::from_json(t, "inline spec", None);
        }
        match t {
            "math" => Ok(RewardSpec::Math(MathConfig::default())),
            "format" => Ok(RewardSpec::Format(FormatConfig::default())),
            "length" => Err(SpecError::Invalid(
                "the `length` reward needs a budget: {\"kind\":\"length\",\"budget\":N}".into(),
            )),
            _ if t.ends_with(".toml") || t.ends_with(".json") => Err(SpecError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
            _ => Err(SpecError::UnknownName(t.to_string())),
        }
    }

    /// Reads a TOML (`.toml`) or JSON (any other extension) config file. The spec is the whole
    /// document or its `reward` table. Relative paths in it (an external command's program and
    /// working directory, a library path) are resolved against the file's directory, and an
    /// external command runs in that directory unless it sets `cwd`.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let origin = path.display().to_string();
        if path.extension().is_some_and(|e| e == "toml") {
            let parse_err = |message: String| SpecError::Parse {
                origin: origin.clone(),
                message,
            };
            let doc: serde_json::Value =
                toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
            let mut spec: RewardSpec = serde_json::from_value(unwrap_document(doc))
                .map_err(|e| parse_err(e.to_string()))?;
            spec.resolve_paths(&dir);
            Ok(spec)
        } else {
            Self::from_json(&text, &origin, Some(&dir))
        }
    }

    fn from_json(text: &str, origin: &str, dir: Option<&Path>) -> Result<Self, SpecError> {
        let parse_err = |message: String| SpecError::Parse {
            origin: origin.to_string(),
            message,
        };
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut spec: RewardSpec =
            serde_json::from_value(unwrap_document(doc)).map_err(|e| parse_err(e.to_string()))?;
        if let Some(dir) = dir {
            spec.resolve_paths(dir);
        }
        Ok(spec)
    }

    /// Makes relative paths absolute against `dir`.
    fn resolve_paths(&mut self, dir: &Path) {
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        match self {
            RewardSpec::External(c) => {
                if let Some(prog) = c.command.first_mut() {
                    if prog.contains('/') && !Path::new(prog.as_str()).is_absolute() {
                        *prog = dir.join(prog.as_str()).display().to_string();
                    }
                }
                c.cwd = Some(c.cwd.as_deref().map_or_else(|| dir.to_path_buf(), abs));
            }
            RewardSpec::Dylib(c) => c.path = abs(&c.path),
            RewardSpec::WeightedSum { terms } => {
                terms.iter_mut().for_each(|t| t.reward.resolve_paths(dir))
            }
            RewardSpec::Gate { gate, reward, .. } => {
                gate.resolve_paths(dir);
                reward.resolve_paths(dir);
            }
            RewardSpec::Math(_) | RewardSpec::Format(_) | RewardSpec::Length(_) => {}
        }
    }

    /// Builds the reward (starting processes and loading libraries it names).
    pub fn build(&self) -> Result<Box<dyn Reward>, SpecError> {
        Ok(match self {
            RewardSpec::Math(c) => Box::new(MathReward::new(c.clone())?),
            RewardSpec::Format(c) => Box::new(FormatReward::new(c.clone())?),
            RewardSpec::Length(c) => Box::new(LengthReward::new(c.clone())?),
            RewardSpec::WeightedSum { terms } => {
                if terms.is_empty() {
                    return Err(SpecError::Invalid(
                        "weighted_sum needs at least one term".into(),
                    ));
                }
                let mut built = Vec::with_capacity(terms.len());
                for t in terms {
                    if !t.weight.is_finite() {
                        return Err(SpecError::Invalid(format!(
                            "weighted_sum weight must be finite, got {}",
                            t.weight
                        )));
                    }
                    built.push((t.weight, t.reward.build()?));
                }
                Box::new(WeightedSum::new(built))
            }
            RewardSpec::Gate {
                gate,
                reward,
                threshold,
                otherwise,
            } => {
                if !(threshold.is_finite() && otherwise.is_finite()) {
                    return Err(SpecError::Invalid(
                        "gate threshold and otherwise must be finite".into(),
                    ));
                }
                Box::new(Gate::new(
                    gate.build()?,
                    reward.build()?,
                    *threshold,
                    *otherwise,
                ))
            }
            RewardSpec::External(c) => Box::new(ExternalReward::new(c.clone())?),
            RewardSpec::Dylib(c) => Box::new(DylibReward::load(c)?),
        })
    }
}
