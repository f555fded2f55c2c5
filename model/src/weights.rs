//! Named weights in Hugging Face naming, checked on access.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// A set of named tensors (Hugging Face names) in one dtype on one device.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Converts every tensor to `dtype` on `device`. Integer tensors are refused.
    pub fn new(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let mut out = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            if !t.dtype().is_float() {
                return Err(ModelError::UnsupportedDType {
                    name,
                    dtype: format!("{:?}", t.dtype()),
                });
            }
            let t = t.to_device(device)?.to_dtype(dtype)?;
            out.insert(name, t);
        }
        Ok(Self { tensors: out })
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Names of every tensor (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Consumes the set into its map.
    pub fn into_inner(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    /// Random weights for a configuration (tests, examples): normal(0, 0.5) matrices, norms near 1.
    pub fn random(
        cfg: &crate::ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        // Draw in a fixed order (norms first within a layer, then the attention and MLP
        // matrices, biases after the attention matrices), so a seed gives the same weights it
        // always gave.
        let mut specs = cfg.parameter_specs();
        specs.sort_by_key(|s| random_draw_rank(&s.name));
        for spec in specs {
            let data: Vec<f64> = (0..spec.elements())
                .map(|_| {
                    let u: f64 = rng.random_range(-1.0..1.0);
                    if spec.is_norm() {
                        1.0 + 0.2 * u
                    } else {
                        0.5 * u
                    }
                })
                .collect();
            let t = Tensor::from_vec(data, spec.shape.clone(), device)?.to_dtype(dtype)?;
            tensors.insert(spec.name, t);
        }
        Ok(Self { tensors })
    }
}

/// Position of a parameter in the draw order of [`Weights::random`]: by layer, then norms,
/// q/k/v/o, biases, gate/up/down.
fn random_draw_rank(name: &str) -> (usize, usize) {
    const ORDER: [&str; 12] = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "q_proj.bias",
        "k_proj.bias",
        "v_proj.bias",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ];
    if name == "model.embed_tokens.weight" {
        return (0, 0);
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        // model.norm, then lm_head.
        return (usize::MAX, usize::from(name == "lm_head.weight"));
    };
    let (layer, field) = rest.split_once('.').unwrap_or((rest, ""));
    let layer = layer.parse::<usize>().map_or(usize::MAX - 1, |l| l + 1);
    let pos = ORDER
        .iter()
        .position(|o| field.ends_with(o))
        .unwrap_or(ORDER.len());
    (layer, pos)
}
