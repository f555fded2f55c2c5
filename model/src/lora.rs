//! LoRA (low-rank adaptation): the validated configuration, its targets and the PEFT adapter
//! format.
//!
//! A targeted linear layer `y = x Wᵀ (+ b)` becomes `y = x Wᵀ (+ b) + (x Aᵀ) Bᵀ · alpha/r` with
//! A (r × in) and B (out × r); W stays frozen and only A and B train. B starts at zero, so a
//! freshly adapted model computes exactly what the base model computes. The decoder side lives
//! in [`crate::Decoder::with_lora`].

use crate::config::{ModelConfig, ParamSpec};
use crate::error::{ModelError, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// A linear layer of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl LoraTarget {
    /// Every target, in the canonical order (attention q, k, v, o, then MLP gate, up, down).
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name in the checkpoint and in PEFT's `target_modules` (`q_proj`, …).
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.gate_proj`, …).
    pub fn module_path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// Position in [`LoraTarget::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.module_name())
    }
}

impl std::str::FromStr for LoraTarget {
    type Err = LoraError;
    /// `q`, `q_proj`, …, `down`, `down_proj` (case-insensitive).
    fn from_str(s: &str) -> std::result::Result<Self, LoraError> {
        let lower = s.trim().to_ascii_lowercase();
        let short = lower.strip_suffix("_proj").unwrap_or(&lower);
        Ok(match short {
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "gate" => Self::Gate,
            "up" => Self::Up,
            "down" => Self::Down,
            _ => return Err(LoraError::UnknownTarget(s.to_string())),
        })
    }
}

/// What is wrong with a LoRA configuration or its use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The rank is 0.
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    /// alpha is not a positive finite number.
    #[error("LoRA alpha {0} must be a positive finite number")]
    InvalidAlpha(f64),
    /// The target set is empty.
    #[error("LoRA needs at least one target module (q, k, v, o, gate, up, down)")]
    NoTargets,
    /// A target name is none of the seven.
    #[error("unknown LoRA target `{0}` (expected q, k, v, o, gate, up or down)")]
    UnknownTarget(String),
    /// Adapters were added to a decoder that already has them.
    #[error("the decoder already has LoRA adapters")]
    AlreadyAdapted,
    /// Adapters were added to a re-quantized (read-only) decoder.
    #[error("LoRA adapters go on the f32 decoder, not on a {0} copy")]
    Quantized(crate::WeightFormat),
    /// An adapter operation was asked of a decoder without adapters.
    #[error("the decoder has no LoRA adapters")]
    NotAdapted,
}

/// A validated LoRA configuration: rank r, scale numerator alpha (the update is scaled by
/// alpha / r) and the targeted modules of every decoder layer.
///
/// ```
/// use model::{LoraConfig, LoraTarget};
/// let all = LoraConfig::new(8, 16.0)?;
/// assert_eq!(all.targets().len(), 7);
/// assert_eq!(all.scale(), 2.0);
/// let attn = LoraConfig::with_targets(4, 8.0, [LoraTarget::Q, LoraTarget::V])?;
/// assert!(attn.targets().contains(&LoraTarget::V));
/// assert!(LoraConfig::new(0, 16.0).is_err());
/// # Ok::<(), model::LoraError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LoraSection", into = "LoraSection")]
pub struct LoraConfig {
    rank: usize,
    alpha: f64,
    targets: BTreeSet<LoraTarget>,
}

impl std::fmt::Display for LoraConfig {
    /// `LoRA rank 8 alpha 16 on q_proj,k_proj,…`, for messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let modules: Vec<&str> = self.targets.iter().map(|t| t.module_name()).collect();
        write!(
            f,
            "LoRA rank {} alpha {} on {}",
            self.rank,
            self.alpha,
            modules.join(",")
        )
    }
}

/// [`LoraConfig`] as a config file or checkpoint writes it: `rank`, `alpha` (default 2·rank)
/// and `targets` (module names, default all seven); validated on reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraSection {
    rank: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    targets: Option<Vec<String>>,
}

impl TryFrom<LoraSection> for LoraConfig {
    type Error = LoraError;
    fn try_from(s: LoraSection) -> std::result::Result<Self, LoraError> {
        let alpha = s.alpha.unwrap_or(LoraConfig::default_alpha(s.rank));
        match s.targets {
            None => LoraConfig::new(s.rank, alpha),
            Some(names) => {
                let targets = names
                    .iter()
                    .map(|n| n.parse())
                    .collect::<std::result::Result<Vec<LoraTarget>, _>>()?;
                LoraConfig::with_targets(s.rank, alpha, targets)
            }
        }
    }
}

impl From<LoraConfig> for LoraSection {
    fn from(c: LoraConfig) -> Self {
        LoraSection {
            rank: c.rank,
            alpha: Some(c.alpha),
            targets: Some(c.targets.iter().map(|t| t.to_string()).collect()),
        }
    }
}

impl LoraConfig {
    /// Rank `rank` and scale numerator `alpha` on all seven linear layers of every layer.
    pub fn new(rank: usize, alpha: f64) -> std::result::Result<Self, LoraError> {
        Self::with_targets(rank, alpha, LoraTarget::ALL)
    }

    /// Rank `rank` and scale numerator `alpha` on the given modules of every layer.
    pub fn with_targets(
        rank: usize,
        alpha: f64,
        targets: impl IntoIterator<Item = LoraTarget>,
    ) -> std::result::Result<Self, LoraError> {
        if rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(LoraError::InvalidAlpha(alpha));
        }
        let targets: BTreeSet<LoraTarget> = targets.into_iter().collect();
        if targets.is_empty() {
            return Err(LoraError::NoTargets);
        }
        Ok(Self {
            rank,
            alpha,
            targets,
        })
    }

    /// The default alpha of rank `rank`: 2·rank (an update scale alpha/r of 2, whatever the
    /// rank, so that a learning rate carries over between ranks).
    pub fn default_alpha(rank: usize) -> f64 {
        2.0 * rank as f64
    }

    /// Parses a comma-separated target list (`q,k,v,o,gate,up,down`, `q_proj,v_proj`, or `all`).
    pub fn parse_targets(list: &str) -> std::result::Result<BTreeSet<LoraTarget>, LoraError> {
        if list.trim().eq_ignore_ascii_case("all") {
            return Ok(LoraTarget::ALL.into_iter().collect());
        }
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(str::parse)
            .collect()
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale numerator alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The update's scale, alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The targeted modules, in canonical order.
    pub fn targets(&self) -> &BTreeSet<LoraTarget> {
        &self.targets
    }

    /// PEFT's `adapter_config.json` for these adapters on `base_model` (a name or path).
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        // PEFT writes an integral alpha as an integer.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha < 9.0e15 {
            serde_json::json!(self.alpha as u64)
        } else {
            serde_json::json!(self.alpha)
        };
        let modules: Vec<&str> = self.targets.iter().map(|t| t.module_name()).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": alpha,
            "target_modules": modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "modules_to_save": null,
        })
    }
}

/// The adapter tensors of a model with configuration `cfg` under `lora`, in the order of
/// [`crate::Decoder::lora_parameters`] (by layer, then module, A before B), with their shapes:
/// `lora_A` (r, in), `lora_B` (out, r).
pub fn adapter_specs(cfg: &ModelConfig, lora: &LoraConfig) -> Vec<ParamSpec> {
    let shapes: HashMap<String, Vec<usize>> = cfg
        .parameter_specs()
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    let mut out = Vec::new();
    for l in 0..cfg.num_layers {
        for t in LoraTarget::ALL {
            if !lora.targets.contains(&t) {
                continue;
            }
            let base = format!("model.layers.{l}.{}", t.module_path());
            // Every decoder layer has the seven linear layers (parameter_specs lists them).
            let (out_dim, in_dim) = match shapes.get(&format!("{base}.weight")).map(Vec::as_slice) {
                Some(&[o, i]) => (o, i),
                _ => continue,
            };
            out.push(ParamSpec::new(
                format!("{base}.lora_A.weight"),
                vec![lora.rank, in_dim],
            ));
            out.push(ParamSpec::new(
                format!("{base}.lora_B.weight"),
                vec![out_dim, lora.rank],
            ));
        }
    }
    out
}

/// PEFT's key of an adapter tensor: `base_model.model.` + the decoder's name of it
/// (`model.layers.{i}.self_attn.q_proj.lora_A.weight`).
pub fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// Writes a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
/// (keys as [`peft_key`] makes them). `adapters` are the decoder's adapter tensors as
/// [`crate::Decoder::lora_parameters`] names them.
pub(crate) fn write_peft(
    cfg: &LoraConfig,
    adapters: Vec<(String, Tensor)>,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let json = serde_json::to_string_pretty(&cfg.peft_config(base_model))
        .map_err(|e| ModelError::InvalidInput(format!("adapter config: {e}")))?;
    let cfg_path = dir.join("adapter_config.json");
    std::fs::write(&cfg_path, json).map_err(|e| ModelError::io(cfg_path, e))?;
    let tensors: HashMap<String, Tensor> = adapters
        .into_iter()
        .map(|(name, t)| (peft_key(&name), t))
        .collect();
    let st = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| ModelError::malformed("safetensors", &st, e))
}
