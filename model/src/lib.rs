//! The nested-reft model: one Llama/Qwen2 decoder whose layers can be skipped per call.
//!
//! - [`Decoder`] holds the weights; `forward(&self, tokens, &mut ForwardCtx)` runs the layers of
//!   the context's [`LayerPlan`], so the full-depth learner and every nested behavior model share
//!   one copy of the weights.
//! - [`completion_logprobs`] scores completions (batched, padded, differentiable);
//!   [`packed_logprobs`] scores the same from a [`PackedLayout`] that computes a shared prompt
//!   once and packs sequences into rows without padding.
//! - [`generate`] samples G completions per prompt and records the behavior log-probs.
//! - [`load_model`] reads a GGUF file or a Hugging Face directory.
//! - [`Decoder::with_lora`] adds LoRA adapters ([`LoraConfig`]) that become the only trainable
//!   variables; [`Decoder::merged_parameters`] folds them in and
//!   [`Decoder::save_peft_adapter`] exports them in PEFT's format.
//!
//! Layer plans depend one way: the skip unit ([`Unit`]) ← the configuration's cost accounting ←
//! [`LayerPlan`] ← the calibration [`Profile`] (data) ← the per-batch policy ([`PlanChoice`],
//! [`PlanSpec`], [`PlanSampler`], [`AdaptivePolicy`]); [`calibrate`] runs the [`Decoder`] over
//! plans and produces a profile.

mod bridge;
#[cfg(feature = "cuda")]
mod bridge_cuda;
pub mod calibrate;
mod config;
mod decoder;
mod device;
pub mod draw;
mod error;
mod generate;
mod loading;
mod logprobs;
mod lora;
pub mod ops;
mod packed;
mod plan;
mod policy;
mod profile;
pub mod qgemm;
mod quant;
mod sampling;
mod tokenizer;
mod unit;
mod weights;

pub use bridge::WeightBridge;
#[cfg(feature = "cuda")]
pub use bridge_cuda::cuda_stream;
pub use config::{Architecture, HfConfig, ModelConfig, ParamSpec};
pub use decoder::{Decoder, ForwardCtx, Kernels, KvCache};
pub use device::DeviceSpec;
pub use error::{ModelError, Result};
pub use generate::{
    generate, generate_drawing_at, Completion, DrawSite, FinishReason, GenerationConfig,
    GenerationOutput, GenerationTimings,
};
pub use loading::{
    load_gguf, load_hf_dir, load_model, save_pretrained, unpermute_qk, LoadOptions, LoadedModel,
};
pub use logprobs::{completion_logprobs, CompletionLogProbs, ScoreRequest};
pub use lora::{adapter_specs, peft_key, LoraConfig, LoraError, LoraTarget};
pub use packed::{packed_logprobs, PackedLayout, PackedLogProbs, RowLayout, SharedPrompt};
pub use plan::{LayerPlan, PlanStrategy};
pub use policy::{
    AdaptiveConfig, AdaptivePolicy, PlanChoice, PlanKeys, PlanSampler, PlanSpec, SkipRatio,
    CALIBRATED_WINDOW,
};
pub use profile::{CalibrationInfo, Profile, SkipSet, UnitMeasure, PROFILE_FORMAT};
pub use protocol::SamplingParams;
pub use quant::WeightFormat;
pub use sampling::{stream_seed, Sampler, Sampling};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use unit::Unit;
pub use weights::Weights;

/// Re-exported so that users of this crate name the same candle types.
pub use candle_core;
