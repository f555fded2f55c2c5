//! The one weight bridge between a [`Decoder`] and a shared weight-store slot.
//!
//! Everything derives from [`ModelConfig::parameter_specs`]: the store's [`Manifest`] (names,
//! order, shapes, dtype, offsets), the model hash both processes compare in the control
//! handshake, and both copies: decoder → slot (the learner publishes) and slot → decoder
//! weights (the rollout server loads).

use crate::config::{ModelConfig, ParamSpec};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use candle_core::{DType, Device, Storage, Tensor};
use protocol::Manifest;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Parameter layout of one model in the weight store (f32), and the copies in and out.
#[derive(Debug, Clone)]
pub struct WeightBridge {
    cfg: ModelConfig,
    specs: Vec<ParamSpec>,
    manifest: Manifest,
    model_hash: String,
}

impl WeightBridge {
    /// The bridge of a model with configuration `cfg` and `tokenizer`. The model hash covers
    /// the configuration, the parameter layout and the tokenizer's vocabulary and end tokens,
    /// so two processes that agree on it decode the same ids to the same text.
    pub fn new(cfg: &ModelConfig, tokenizer: &Tokenizer) -> Result<Self> {
        let cfg = cfg.clone().validate()?;
        let specs = cfg.parameter_specs();
        let manifest = Manifest::new(
            specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone(), protocol::DType::F32)),
        )
        .map_err(|e| ModelError::InvalidConfig(format!("weight-store manifest: {e}")))?;
        let mut h = Sha256::new();
        h.update(b"nested-reft model v1\0");
        let cfg_json = serde_json::to_vec(&cfg)
            .map_err(|e| ModelError::InvalidConfig(format!("configuration: {e}")))?;
        h.update((cfg_json.len() as u64).to_le_bytes());
        h.update(&cfg_json);
        h.update(manifest.hash());
        h.update((tokenizer.vocab_size() as u64).to_le_bytes());
        for id in tokenizer.eos_token_ids() {
            h.update(id.to_le_bytes());
        }
        // A few fixed ids pin the vocabulary's content, not only its size.
        for id in [0u32, 1, 2, 100, 1000, 10000] {
            if let Some(tok) = tokenizer.id_to_token(id) {
                h.update(id.to_le_bytes());
                h.update((tok.len() as u64).to_le_bytes());
                h.update(tok.as_bytes());
            }
        }
        let model_hash = hex::encode(&h.finalize()[..16]);
        Ok(Self {
            cfg,
            specs,
            manifest,
            model_hash,
        })
    }

    /// The weight-store layout.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model hash of the control handshake (hex).
    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }

    /// The configuration the bridge was built for.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Copies every parameter of `decoder` into `slot` (`manifest().total_size()` bytes).
    pub fn write(&self, decoder: &Decoder, slot: &mut [u8]) -> Result<()> {
        if slot.len() != self.manifest.total_size() {
            return Err(ModelError::InvalidConfig(format!(
                "weight slot has {} bytes, the manifest needs {}",
                slot.len(),
                self.manifest.total_size()
            )));
        }
        let params = decoder.named_parameters();
        if params.len() != self.specs.len() {
            return Err(ModelError::InvalidConfig(format!(
                "the decoder has {} parameters, the bridge {}",
                params.len(),
                self.specs.len()
            )));
        }
        for ((name, t), spec) in params.iter().zip(self.manifest.tensors()) {
            if *name != spec.name || t.dims() != spec.shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: spec.shape.clone(),
                    found: t.dims().to_vec(),
                });
            }
            let dst = &mut slot[spec.offset..spec.offset + spec.size];
            copy_out(t, dst)?;
        }
        Ok(())
    }

    /// Reads the parameters from `slot` into new tensors on `device` (f32).
    pub fn read(&self, slot: &[u8], device: &Device) -> Result<Weights> {
        if slot.len() != self.manifest.total_size() {
            return Err(ModelError::InvalidConfig(format!(
                "weight slot has {} bytes, the manifest needs {}",
                slot.len(),
                self.manifest.total_size()
            )));
        }
        let mut tensors = HashMap::with_capacity(self.specs.len());
        for spec in self.manifest.tensors() {
            let bytes = &slot[spec.offset..spec.offset + spec.size];
            let data = read_f32(bytes);
            let t = Tensor::from_vec(data, spec.shape.clone(), device)?;
            tensors.insert(spec.name.clone(), t);
        }
        Weights::new(tensors, DType::F32, device)
    }

    /// A checksum of `decoder`'s parameters: the sum, in f64 and manifest order, of each
    /// parameter's element sum. The same weights on the same device give the same value (the
    /// same reductions over the same bits): the GPU check compares the learner's checksum of
    /// a version with the rollout server's of what it loaded from the device slots.
    pub fn checksum(&self, decoder: &Decoder) -> Result<f64> {
        let mut sum = 0.0;
        for (_, t) in decoder.named_parameters() {
            sum += t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(sum)
    }

    /// Reads the parameters from `slot` and builds a (frozen) decoder from them.
    pub fn decoder(&self, slot: &[u8], device: &Device) -> Result<Decoder> {
        Decoder::new(&self.cfg, &self.read(slot, device)?, false)
    }
}

/// Copies tensor `t` (any float dtype, any device) into `dst` as little-endian f32.
fn copy_out(t: &Tensor, dst: &mut [u8]) -> Result<()> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            let src = &cpu.as_slice::<f32>()?[start..end];
            return fill(src, dst);
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    fill(&v, dst)
}

fn fill(src: &[f32], dst: &mut [u8]) -> Result<()> {
    if src.len() * 4 != dst.len() {
        return Err(ModelError::InvalidConfig(format!(
            "{} values for a {}-byte tensor slot",
            src.len(),
            dst.len()
        )));
    }
    if cfg!(target_endian = "little") {
        // SAFETY: f32 is plain data with no padding; `dst` holds exactly `4 · src.len()`
        // bytes (checked above); the regions cannot overlap (`src` is a tensor's storage,
        // `dst` a weight slot or a separate buffer). On a little-endian target the native
        // bytes are the little-endian encoding the store uses.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr().cast::<u8>(), dst.as_mut_ptr(), dst.len())
        };
    } else {
        for (d, s) in dst.chunks_exact_mut(4).zip(src) {
            d.copy_from_slice(&s.to_le_bytes());
        }
    }
    Ok(())
}

/// Little-endian f32 bytes (a multiple of 4) into values.
fn read_f32(bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / 4;
    if cfg!(target_endian = "little") {
        let mut out = vec![0f32; n];
        // SAFETY: `out` holds `n` f32 = `4n` writable bytes, `bytes` at least `4n` readable
        // ones; they do not overlap (fresh allocation); any bit pattern is a valid f32.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), 4 * n)
        };
        out
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}
