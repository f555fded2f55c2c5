//! Model configuration: the serde "file" form (Hugging Face `config.json`) and the validated
//! typed form every other part of the crate uses.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};

/// Decoder family. Both share one implementation; they differ in biases and head tying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama (and SmolLM2): no attention biases, optionally tied embeddings.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k, v projections, usually an untied `lm_head`.
    Qwen2,
}

impl Architecture {
    /// Parses the names used by `config.json` (`model_type`, `architectures`) and GGUF
    /// (`general.architecture`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "mistral" | "mistralforcausallm" => Ok(Self::Llama),
            "qwen2" | "qwen2forcausallm" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// Whether q, k and v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// A validated decoder configuration. Build it with [`ModelConfig::validate`] or from a
/// [`HfConfig`]; every field is then known to be consistent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers, L.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA); divides `num_heads`.
    pub num_kv_heads: usize,
    /// Per-head width; `hidden_size / num_heads` for every supported checkpoint.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Context window.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Checks every invariant the decoder relies on.
    pub fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, hidden_size and intermediate_size must be positive".into());
        }
        if self.num_layers == 0 {
            return bad("num_layers must be positive".into());
        }
        if self.num_layers > protocol::PLAN_LAYER_MASK as usize + 1 {
            return bad(format!("num_layers {} is too large", self.num_layers));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 {
            return bad("num_heads and num_kv_heads must be positive".into());
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        Ok(self)
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = h * self.num_heads * self.head_dim;
        let kv = 2 * h * self.num_kv_heads * self.head_dim;
        let bias = if self.architecture.qkv_bias() {
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        } else {
            0
        };
        let attn = q + kv + bias + self.num_heads * self.head_dim * h;
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }

    /// Parameters one decoded token reads through `unit` (its weights, norms and biases): the
    /// decode cost [`crate::LayerPlan::cost_ratio`] counts.
    pub fn unit_params(&self, unit: crate::unit::Unit) -> usize {
        use crate::unit::Unit;
        let (attn, mlp) = self.block_params();
        match unit {
            Unit::Layer(_) => attn + mlp,
            Unit::Attn(_) => attn,
            Unit::Mlp(_) => mlp,
        }
    }

    /// Parameters of one layer's attention block and of its MLP block (each with its norm).
    fn block_params(&self) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = h * self.num_heads * self.head_dim;
        let kv = 2 * h * self.num_kv_heads * self.head_dim;
        let bias = if self.architecture.qkv_bias() {
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        } else {
            0
        };
        (
            h + q + kv + bias + self.num_heads * self.head_dim * h,
            h + 3 * h * i,
        )
    }

    /// Parameters the full model reads per decoded token: every layer, the final norm and the
    /// output head (the embedding lookup reads one row and is not counted).
    pub fn decode_params(&self) -> usize {
        let (attn, mlp) = self.block_params();
        self.num_layers * (attn + mlp) + self.hidden_size + self.vocab_size * self.hidden_size
    }

    /// Every parameter of the decoder, in the one canonical order: names (Hugging Face
    /// naming) and shapes. This list is the single description of the parameters; the decoder
    /// is built from it, [`crate::Weights::random`] fills it, and the weight bridge
    /// ([`crate::WeightBridge`]) derives the weight-store manifest and both copies from it.
    pub fn parameter_specs(&self) -> Vec<ParamSpec> {
        let (h, hd, inter) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let mut out = vec![ParamSpec::new(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push(ParamSpec::new(
                format!("{p}.input_layernorm.weight"),
                vec![h],
            ));
            for (name, rows) in [
                ("q_proj", nh * hd),
                ("k_proj", nkv * hd),
                ("v_proj", nkv * hd),
            ] {
                out.push(ParamSpec::new(
                    format!("{p}.self_attn.{name}.weight"),
                    vec![rows, h],
                ));
                if self.architecture.qkv_bias() {
                    out.push(ParamSpec::new(
                        format!("{p}.self_attn.{name}.bias"),
                        vec![rows],
                    ));
                }
            }
            out.push(ParamSpec::new(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, nh * hd],
            ));
            out.push(ParamSpec::new(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
            ));
            out.push(ParamSpec::new(
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, h],
            ));
            out.push(ParamSpec::new(
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, h],
            ));
            out.push(ParamSpec::new(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, inter],
            ));
        }
        out.push(ParamSpec::new("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(ParamSpec::new(
                "lm_head.weight".into(),
                vec![self.vocab_size, h],
            ));
        }
        out
    }

    /// A tiny random-weight configuration for tests and examples.
    pub fn tiny(architecture: Architecture, vocab_size: usize, num_layers: usize) -> Self {
        Self {
            architecture,
            vocab_size,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: matches!(architecture, Architecture::Llama),
        }
    }
}

/// The subset of a Hugging Face `config.json` the decoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `model_type`, e.g. `llama` or `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// `architectures`, e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (defaults to `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width (defaults to `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Any RoPE scaling; only `null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Context window.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Tied embeddings.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Activation; only SiLU is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    4096
}

impl HfConfig {
    /// Validates the file form into a [`ModelConfig`].
    pub fn into_config(self) -> Result<ModelConfig> {
        let name = self
            .model_type
            .clone()
            .or_else(|| self.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| {
                ModelError::InvalidConfig("config has neither model_type nor architectures".into())
            })?;
        let architecture = Architecture::parse(&name)?;
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(ModelError::InvalidConfig(format!(
                    "rope_scaling {scaling} is not supported"
                )));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::InvalidConfig(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        if self.num_attention_heads == 0 {
            return Err(ModelError::InvalidConfig("num_attention_heads is 0".into()));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
        }
        .validate()
    }
}

/// One parameter of the decoder: its name and shape (see [`ModelConfig::parameter_specs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub(crate) fn new(name: String, shape: Vec<usize>) -> Self {
        Self { name, shape }
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether this is a normalisation weight (initialised near 1, not near 0).
    pub fn is_norm(&self) -> bool {
        self.name.ends_with("norm.weight")
    }
}
