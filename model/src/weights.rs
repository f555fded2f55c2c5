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
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let mut add = |name: String, shape: Vec<usize>, norm: bool| -> Result<()> {
            let n: usize = shape.iter().product();
            let data: Vec<f64> = (0..n)
                .map(|_| {
                    let u: f64 = rng.random_range(-1.0..1.0);
                    if norm {
                        1.0 + 0.2 * u
                    } else {
                        0.5 * u
                    }
                })
                .collect();
            tensors.insert(
                name,
                Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?,
            );
            Ok(())
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            false,
        )?;
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![h], true)?;
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                true,
            )?;
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![nh * hd, h],
                false,
            )?;
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![nkv * hd, h],
                false,
            )?;
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![nkv * hd, h],
                false,
            )?;
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, nh * hd],
                false,
            )?;
            if cfg.architecture.qkv_bias() {
                add(format!("{p}.self_attn.q_proj.bias"), vec![nh * hd], false)?;
                add(format!("{p}.self_attn.k_proj.bias"), vec![nkv * hd], false)?;
                add(format!("{p}.self_attn.v_proj.bias"), vec![nkv * hd], false)?;
            }
            add(format!("{p}.mlp.gate_proj.weight"), vec![inter, h], false)?;
            add(format!("{p}.mlp.up_proj.weight"), vec![inter, h], false)?;
            add(format!("{p}.mlp.down_proj.weight"), vec![h, inter], false)?;
        }
        add("model.norm.weight".into(), vec![h], true)?;
        if !cfg.tie_word_embeddings {
            add("lm_head.weight".into(), vec![cfg.vocab_size, h], false)?;
        }
        Ok(Self { tensors })
    }
}
