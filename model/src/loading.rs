//! Loading a model: a Hugging Face directory (config.json, safetensors, tokenizer.json) or a
//! GGUF file (dequantised to f32, llama Q/K rows un-permuted, tokenizer from metadata); and
//! saving one as a Hugging Face directory.

use crate::config::{Architecture, HfConfig, ModelConfig};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device for the weights.
    pub device: Device,
    /// dtype of the weights (f32 on CPU: candle has no fast bf16 CPU kernels).
    pub dtype: DType,
    /// Make every parameter a trainable variable.
    pub trainable: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            trainable: false,
        }
    }
}

/// A loaded model: decoder, tokenizer and where they came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub decoder: Decoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The path it was loaded from.
    pub source: PathBuf,
}

/// Loads a GGUF file or a Hugging Face directory.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let (cfg, weights, tokenizer) = if path.is_dir() {
        load_hf_dir(path, opts)?
    } else if path.is_file() {
        load_gguf(path, opts)?
    } else {
        return Err(ModelError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    };
    let decoder = Decoder::new(&cfg, &weights, opts.trainable)?;
    Ok(LoadedModel {
        decoder,
        tokenizer,
        source: path.to_path_buf(),
    })
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| ModelError::io(path, e))
}

/// Reads a GGUF file: configuration, dequantised weights under Hugging Face names, tokenizer.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<(ModelConfig, Weights, Tokenizer)> {
    let mut file = std::io::BufReader::new(open(path)?);
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| ModelError::malformed("GGUF header", path, e))?;
    let arch_name = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| {
            ModelError::malformed("GGUF metadata", path, "general.architecture is missing")
        })?;
    let architecture = Architecture::parse(&arch_name)?;
    let num = |key: &str| -> Option<u64> {
        let v = ct.metadata.get(&format!("{arch_name}.{key}"))?;
        v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from))
    };
    let float = |key: &str| -> Option<f64> {
        let v = ct.metadata.get(&format!("{arch_name}.{key}"))?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    };
    let need = |key: &str| -> Result<usize> {
        num(key).map(|v| v as usize).ok_or_else(|| {
            ModelError::malformed(
                "GGUF metadata",
                path,
                format!("{arch_name}.{key} is missing"),
            )
        })
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let tokenizer = Tokenizer::from_gguf(&ct)?;
    let embed_dims = ct
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims().to_vec())
        .ok_or_else(|| ModelError::MissingWeight("token_embd.weight".into()))?;
    let cfg = ModelConfig {
        architecture,
        vocab_size: match num("vocab_size") {
            Some(v) => v as usize,
            None => *embed_dims.first().ok_or_else(|| {
                ModelError::malformed("GGUF tensor", path, "token_embd.weight has no dimensions")
            })?,
        },
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_layers: need("block_count")?,
        num_heads: heads,
        num_kv_heads: num("attention.head_count_kv")
            .map(|v| v as usize)
            .unwrap_or(heads),
        head_dim: num("attention.key_length")
            .map(|v| v as usize)
            .unwrap_or(hidden / heads.max(1)),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        max_position_embeddings: need("context_length")?,
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
    }
    .validate()?;

    let mut tensors = HashMap::new();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    for gguf_name in names {
        let Some(hf_name) = hf_name(&gguf_name) else {
            continue;
        };
        let q = ct
            .tensor(&mut file, &gguf_name, &Device::Cpu)
            .map_err(|e| ModelError::malformed("GGUF tensor", path, format!("{gguf_name}: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        // llama.cpp stores llama Q/K rows permuted for its interleaved RoPE; undo it so the
        // weights match the Hugging Face layout and the non-interleaved rotation.
        if architecture == Architecture::Llama {
            let n_head = if gguf_name.ends_with("attn_q.weight") {
                Some(cfg.num_heads)
            } else if gguf_name.ends_with("attn_k.weight") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            if let Some(n_head) = n_head {
                t = unpermute_qk(&t, n_head, cfg.head_dim)?;
            }
        }
        tensors.insert(hf_name, t);
    }
    Ok((
        cfg,
        Weights::new(tensors, opts.dtype, &opts.device)?,
        tokenizer,
    ))
}

/// Undoes llama.cpp's Q/K permutation: `w.reshape(n_head, hd/2, 2, in).transpose(1, 2)`.
///
/// # Shapes
/// `w`: (n_head·hd, in) → (n_head·hd, in).
pub fn unpermute_qk(w: &Tensor, n_head: usize, head_dim: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, head_dim / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// GGUF tensor name → Hugging Face name (`None` for tensors the decoder does not use).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Reads a Hugging Face directory: `config.json`, `model.safetensors` (or the shards listed in
/// `model.safetensors.index.json`), `tokenizer.json` and `tokenizer_config.json`.
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<(ModelConfig, Weights, Tokenizer)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let hf: HfConfig = serde_json::from_str(&text)
        .map_err(|e| ModelError::malformed("config.json", &cfg_path, e))?;
    let cfg = hf.into_config()?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut files = Vec::new();
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::malformed("safetensors index", &index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::malformed("safetensors index", &index, "no weight_map"))?;
        for f in map.values().filter_map(|f| f.as_str()) {
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
    } else {
        files.push(dir.join("model.safetensors"));
    }
    let mut tensors = HashMap::new();
    for f in files {
        if !f.is_file() {
            return Err(ModelError::io(
                &f,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let part = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| ModelError::malformed("safetensors", &f, e))?;
        tensors.extend(part);
    }
    Ok((
        cfg,
        Weights::new(tensors, opts.dtype, &opts.device)?,
        tokenizer,
    ))
}

/// Writes a loadable Hugging Face directory: `config.json`, `model.safetensors`, tokenizer files.
pub fn save_pretrained(decoder: &Decoder, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg = decoder.config();
    let hf = serde_json::json!({
        "model_type": match cfg.architecture { Architecture::Llama => "llama", Architecture::Qwen2 => "qwen2" },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&hf).unwrap_or_default(),
    )
    .map_err(|e| ModelError::io(cfg_path, e))?;
    let tensors: HashMap<String, Tensor> = decoder.named_parameters().into_iter().collect();
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| ModelError::malformed("safetensors", &st, e))?;
    tokenizer.save_dir(dir)
}
