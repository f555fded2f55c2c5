//! The one weight bridge between a [`Decoder`] and a shared weight-store slot.
//!
//! Everything derives from [`ModelConfig::parameter_specs`] (or, for a decoder with LoRA
//! adapters, [`adapter_specs`]): the store's [`Manifest`] (names, order, shapes, dtype,
//! offsets), the model hash both processes compare in the control handshake, and both copies:
//! decoder → slot (the learner publishes) and slot → tensors (the rollout server loads them
//! into a decoder, or into its adapters).
//!
//! With LoRA only the adapters travel: each process holds its own copy of the frozen base, so
//! the model hash also covers the adapters' configuration and a fingerprint of the base's
//! values, and two processes with different bases are refused at the handshake.

use crate::config::{ModelConfig, ParamSpec};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::lora::{adapter_specs, LoraConfig};
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
    /// The adapters' configuration when only the adapters are published.
    lora: Option<LoraConfig>,
}

/// Elements of each base tensor, from each end, that the fingerprint of a LoRA bridge hashes.
const FINGERPRINT_ELEMENTS: usize = 256;

impl WeightBridge {
    /// The bridge of a model with configuration `cfg` and `tokenizer`, publishing every
    /// parameter. The model hash covers the configuration, the parameter layout and the
    /// tokenizer's vocabulary and end tokens, so two processes that agree on it decode the
    /// same ids to the same text.
    pub fn new(cfg: &ModelConfig, tokenizer: &Tokenizer) -> Result<Self> {
        Self::build(cfg, tokenizer, None)
    }

    /// The bridge of `decoder`: with LoRA adapters ([`Decoder::with_lora`]) it publishes the
    /// adapters alone, and its model hash also covers their configuration and a fingerprint
    /// of the frozen base (the exact values of the first and last 256 elements of every base
    /// tensor), so a peer whose base differs is refused at the handshake; without, it is
    /// [`WeightBridge::new`] of the decoder's configuration.
    pub fn for_decoder(decoder: &Decoder, tokenizer: &Tokenizer) -> Result<Self> {
        let Some(lora) = decoder.lora() else {
            return Self::new(decoder.config(), tokenizer);
        };
        let mut fp = Sha256::new();
        for (name, t) in decoder.named_parameters() {
            let flat = t.detach().flatten_all()?;
            let n = flat.dim(0)?;
            let k = n.min(FINGERPRINT_ELEMENTS);
            fp.update((name.len() as u64).to_le_bytes());
            fp.update(name.as_bytes());
            for part in [flat.narrow(0, 0, k)?, flat.narrow(0, n - k, k)?] {
                for v in part.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                    fp.update(v.to_le_bytes());
                }
            }
        }
        Self::build(
            decoder.config(),
            tokenizer,
            Some((lora.clone(), fp.finalize().to_vec())),
        )
    }

    fn build(
        cfg: &ModelConfig,
        tokenizer: &Tokenizer,
        lora: Option<(LoraConfig, Vec<u8>)>,
    ) -> Result<Self> {
        let cfg = cfg.clone().validate()?;
        let specs = match &lora {
            Some((l, _)) => adapter_specs(&cfg, l),
            None => cfg.parameter_specs(),
        };
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
        if let Some((l, fingerprint)) = &lora {
            let json = serde_json::to_vec(l)
                .map_err(|e| ModelError::InvalidConfig(format!("LoRA configuration: {e}")))?;
            h.update(b"lora\0");
            h.update((json.len() as u64).to_le_bytes());
            h.update(&json);
            h.update(fingerprint);
        }
        let model_hash = hex::encode(&h.finalize()[..16]);
        Ok(Self {
            cfg,
            specs,
            manifest,
            model_hash,
            lora: lora.map(|(l, _)| l),
        })
    }

    /// The adapters' configuration when the bridge publishes adapters only.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The tensors of `decoder` the bridge publishes, in manifest order: its adapters with
    /// LoRA, else every parameter.
    pub fn published(&self, decoder: &Decoder) -> Result<Vec<(String, Tensor)>> {
        if decoder.lora() != self.lora.as_ref() {
            return Err(ModelError::InvalidConfig(format!(
                "the decoder's adapters ({}) are not the weight bridge's ({})",
                describe(decoder.lora()),
                describe(self.lora.as_ref())
            )));
        }
        let params = match &self.lora {
            Some(_) => decoder.lora_parameters(),
            None => decoder.named_parameters(),
        };
        if params.len() != self.specs.len() {
            return Err(ModelError::InvalidConfig(format!(
                "the decoder has {} published tensors, the bridge {}",
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
        }
        Ok(params)
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

    /// Copies the published tensors of `decoder` ([`WeightBridge::published`]) into `slot`
    /// (`manifest().total_size()` bytes).
    pub fn write(&self, decoder: &Decoder, slot: &mut [u8]) -> Result<()> {
        if slot.len() != self.manifest.total_size() {
            return Err(ModelError::InvalidConfig(format!(
                "weight slot has {} bytes, the manifest needs {}",
                slot.len(),
                self.manifest.total_size()
            )));
        }
        let params = self.published(decoder)?;
        for ((_, t), spec) in params.iter().zip(self.manifest.tensors()) {
            let dst = &mut slot[spec.offset..spec.offset + spec.size];
            copy_out(t, dst)?;
        }
        Ok(())
    }

    /// Reads the published tensors from `slot` into new tensors on `device` (f32), in
    /// manifest order.
    pub fn tensors(&self, slot: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>> {
        if slot.len() != self.manifest.total_size() {
            return Err(ModelError::InvalidConfig(format!(
                "weight slot has {} bytes, the manifest needs {}",
                slot.len(),
                self.manifest.total_size()
            )));
        }
        let mut tensors = Vec::with_capacity(self.specs.len());
        for spec in self.manifest.tensors() {
            let bytes = &slot[spec.offset..spec.offset + spec.size];
            let data = read_f32(bytes);
            let t = Tensor::from_vec(data, spec.shape.clone(), device)?;
            tensors.push((spec.name.clone(), t));
        }
        Ok(tensors)
    }

    /// Reads every parameter from `slot` (a bridge without adapters) into new tensors on
    /// `device` (f32).
    pub fn read(&self, slot: &[u8], device: &Device) -> Result<Weights> {
        self.full_weights(self.tensors(slot, device)?, device)
    }

    fn full_weights(&self, tensors: Vec<(String, Tensor)>, device: &Device) -> Result<Weights> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidConfig(
                "the weight store holds LoRA adapters, not a whole model: apply them to the \
                 base (WeightBridge::apply)"
                    .into(),
            ));
        }
        let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
        Weights::new(tensors, DType::F32, device)
    }

    /// Builds the behavior's decoder from published tensors: for a bridge without adapters, a
    /// new (frozen) decoder of them; with LoRA, sets them as the adapters of `adapted` (the
    /// process's base with adapters of this configuration, changed in place, as is every copy
    /// that shares them, an 8-bit one included) and returns `None`.
    pub fn apply(
        &self,
        tensors: Vec<(String, Tensor)>,
        adapted: Option<&Decoder>,
        device: &Device,
    ) -> Result<Option<Decoder>> {
        if self.lora.is_none() {
            let w = self.full_weights(tensors, device)?;
            return Decoder::new(&self.cfg, &w, false).map(Some);
        }
        let d = adapted.ok_or_else(|| {
            ModelError::InvalidConfig(
                "LoRA adapters arrived, but there is no base to apply them to".into(),
            )
        })?;
        if d.lora() != self.lora.as_ref() {
            return Err(ModelError::InvalidConfig(format!(
                "the base's adapters ({}) are not the weight bridge's ({})",
                describe(d.lora()),
                describe(self.lora.as_ref())
            )));
        }
        d.set_lora_parameters(&tensors)?;
        Ok(None)
    }

    /// A checksum of `decoder`'s published tensors: the sum, in f64 and manifest order, of
    /// each tensor's element sum. The same weights on the same device give the same value
    /// (the same reductions over the same bits): the GPU check compares the learner's checksum
    /// of a version with the rollout server's of what it loaded from the device slots.
    pub fn checksum(&self, decoder: &Decoder) -> Result<f64> {
        let mut sum = 0.0;
        for (_, t) in self.published(decoder)? {
            sum += t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(sum)
    }

    /// Reads every parameter from `slot` (a bridge without adapters) and builds a (frozen)
    /// decoder from them.
    pub fn decoder(&self, slot: &[u8], device: &Device) -> Result<Decoder> {
        Decoder::new(&self.cfg, &self.read(slot, device)?, false)
    }
}

/// The adapters' [`LoraConfig`] display, or `none`, for errors.
fn describe(lora: Option<&LoraConfig>) -> String {
    lora.map_or("none".into(), LoraConfig::to_string)
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
