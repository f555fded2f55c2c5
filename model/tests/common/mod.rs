//! Shared fixtures: the real SmolLM2-135M-Instruct weights, loaded once per test binary.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use model::{load_model, LoadOptions, LoadedModel};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of the default GGUF; fails with instructions when it has not been fetched.
pub fn smollm_path() -> PathBuf {
    protocol::assets::cached_default_model().unwrap_or_else(|e| panic!("{e}"))
}

/// SmolLM2 loaded once (f32, CPU, not trainable).
pub fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load_model(&smollm_path(), &LoadOptions::default()).expect("load SmolLM2"))
}

/// Max |a - b| over two equally shaped f32 tensors.
pub fn max_abs_diff(a: &model::candle_core::Tensor, b: &model::candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// candle-transformers' llama (the parity reference) over the same weights, with its config.
pub fn reference_llama(
    cfg: &model::ModelConfig,
    weights: model::Weights,
) -> (
    candle_transformers::models::llama::Llama,
    candle_transformers::models::llama::Config,
) {
    use candle_transformers::models::llama as reference;
    use model::candle_core::{DType, Device};
    let ref_cfg = reference::LlamaConfig {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_layers,
        num_attention_heads: cfg.num_heads,
        num_key_value_heads: Some(cfg.num_kv_heads),
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: Some(cfg.tie_word_embeddings),
    }
    .into_config(false);
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_inner(), DType::F32, &Device::Cpu);
    let llama = reference::Llama::load(vb, &ref_cfg).expect("load the reference llama");
    (llama, ref_cfg)
}

/// A batch of one sequence, (1, n).
pub fn row(ids: &[u32]) -> model::candle_core::Tensor {
    model::candle_core::Tensor::new(ids, &model::candle_core::Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("token row")
}
