//! LoRA adapters on a [`Decoder`]: adding them (base frozen, adapters trainable), reading and
//! setting them, merging them into the base weights and exporting them in PEFT's format.

use super::{Adapter, Decoder, Layer, Lin, Proj};
use crate::error::{ModelError, Result};
use crate::lora::{write_peft, LoraConfig, LoraError, LoraTarget};
use crate::sampling::stream_seed;
use crate::weights::Weights;
use candle_core::{Tensor, TensorId, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

impl Layer {
    fn proj(&self, t: LoraTarget) -> &Proj {
        match t {
            LoraTarget::Q => &self.self_attn.q_proj,
            LoraTarget::K => &self.self_attn.k_proj,
            LoraTarget::V => &self.self_attn.v_proj,
            LoraTarget::O => &self.self_attn.o_proj,
            LoraTarget::Gate => &self.mlp.gate_proj,
            LoraTarget::Up => &self.mlp.up_proj,
            LoraTarget::Down => &self.mlp.down_proj,
        }
    }

    fn proj_mut(&mut self, t: LoraTarget) -> &mut Proj {
        match t {
            LoraTarget::Q => &mut self.self_attn.q_proj,
            LoraTarget::K => &mut self.self_attn.k_proj,
            LoraTarget::V => &mut self.self_attn.v_proj,
            LoraTarget::O => &mut self.self_attn.o_proj,
            LoraTarget::Gate => &mut self.mlp.gate_proj,
            LoraTarget::Up => &mut self.mlp.up_proj,
            LoraTarget::Down => &mut self.mlp.down_proj,
        }
    }

    /// Replaces every weight of the layer by `frozen(weight)` (its detached twin).
    fn freeze(&mut self, frozen: &impl Fn(&Tensor) -> Tensor) {
        self.input_layernorm = frozen(&self.input_layernorm);
        self.post_attention_layernorm = frozen(&self.post_attention_layernorm);
        let a = &mut self.self_attn;
        for b in [&mut a.q_bias, &mut a.k_bias, &mut a.v_bias]
            .into_iter()
            .flatten()
        {
            *b = frozen(b);
        }
        for t in LoraTarget::ALL {
            let p = self.proj_mut(t);
            if let Lin::Dense(w) = &mut p.w {
                *w = frozen(w);
            }
            p.frozen = true;
        }
    }
}

/// The decoder's name of an adapter tensor: `model.layers.{l}.{module}.lora_{A|B}.weight`.
fn adapter_name(layer: usize, t: LoraTarget, which: char) -> String {
    format!(
        "model.layers.{layer}.{}.lora_{which}.weight",
        t.module_path()
    )
}

impl Decoder {
    /// This decoder with LoRA adapters on the targeted linear layers of every decoder layer.
    ///
    /// Each adapter's A (r × in) is drawn like PEFT's default initialisation, Kaiming-uniform
    /// with a = √5, i.e. uniform in ±1/√in, from a stream fixed by `seed`, the layer and the
    /// module (so a module's A does not depend on which other modules are targeted); B
    /// (out × r) is zero, so the adapted model's outputs equal the base model's exactly until
    /// B is updated. Every base weight is frozen (detached from the autograd graph) and
    /// [`Decoder::vars`] becomes the adapters alone, in the order of
    /// [`Decoder::lora_parameters`]. The forward passes (every kernel set, padded and packed
    /// scoring, generation) add `(x Aᵀ) Bᵀ · alpha/r` to each adapted layer's output. With
    /// [`crate::Kernels::Differentiable`] on the CPU the backward pass computes no gradient for
    /// the frozen linear weights, norms and output head (with the other kernels candle's ops
    /// still compute and drop them).
    ///
    /// ```
    /// use model::candle_core::{DType, Device};
    /// use model::{Architecture, Decoder, LoraConfig, ModelConfig, Weights};
    /// let cfg = ModelConfig::tiny(Architecture::Llama, 11, 2);
    /// let w = Weights::random(&cfg, 5, DType::F32, &Device::Cpu)?;
    /// let model = Decoder::new(&cfg, &w, false)?.with_lora(&LoraConfig::new(4, 8.0)?, 7)?;
    /// // Two tensors (A, B) for each of 7 modules in each of 2 layers.
    /// assert_eq!(model.vars().len(), 2 * 7 * 2);
    /// assert!(model.vars()[0].0.ends_with("self_attn.q_proj.lora_A.weight"));
    /// # Ok::<(), model::ModelError>(())
    /// ```
    pub fn with_lora(mut self, lora: &LoraConfig, seed: u64) -> Result<Decoder> {
        if self.lora.is_some() {
            return Err(LoraError::AlreadyAdapted.into());
        }
        if self.format.is_quantized() {
            return Err(LoraError::Quantized(self.format).into());
        }
        // Freeze the base: every weight becomes a detached twin sharing its storage. The
        // fields are clones of `params` (same tensor ids), so each gets the same twin as its
        // entry in `params`, which stays the list of the tensors the forward pass reads.
        let twins: HashMap<TensorId, Tensor> = self
            .params
            .iter()
            .map(|(_, t)| (t.id(), t.detach()))
            .collect();
        let frozen = |t: &Tensor| twins.get(&t.id()).cloned().unwrap_or_else(|| t.detach());
        self.embed_tokens = frozen(&self.embed_tokens);
        self.norm = frozen(&self.norm);
        self.lm_head = self.lm_head.as_ref().map(frozen);
        for layer in &mut self.layers {
            layer.freeze(&frozen);
        }
        for (_, t) in &mut self.params {
            *t = frozen(t);
        }
        let r = lora.rank();
        let scale = lora.scale();
        let mut vars = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for &t in lora.targets() {
                let proj = layer.proj_mut(t);
                let Lin::Dense(w) = &proj.w else {
                    return Err(LoraError::Quantized(self.format).into());
                };
                let (out, inp) = w.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let mut rng = rand::rngs::StdRng::seed_from_u64(stream_seed(
                    seed,
                    l as u64,
                    t.index() as u64,
                ));
                let a: Vec<f64> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (r, inp), &self.device)?.to_dtype(self.dtype)?;
                let a = Var::from_tensor(&a)?;
                let b = Var::zeros((out, r), self.dtype, &self.device)?;
                proj.lora = Some(Adapter {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                });
                vars.push((adapter_name(l, t, 'A'), a));
                vars.push((adapter_name(l, t, 'B'), b));
            }
        }
        self.vars = vars;
        self.lora = Some(lora.clone());
        Ok(self)
    }

    /// The adapters' configuration (`None` without LoRA).
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The adapter tensors, by layer, then module in [`LoraTarget::ALL`] order, A before B,
    /// named `model.layers.{l}.self_attn.q_proj.lora_A.weight` (PEFT's keys without the
    /// `base_model.model.` prefix). Empty without LoRA.
    ///
    /// # Shapes
    /// `lora_A`: (r, in); `lora_B`: (out, r).
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(ad) = &layer.proj(t).lora {
                    out.push((adapter_name(l, t, 'A'), ad.a.clone()));
                    out.push((adapter_name(l, t, 'B'), ad.b.clone()));
                }
            }
        }
        out
    }

    /// Overwrites the adapters in place from named tensors (names and shapes as
    /// [`Decoder::lora_parameters`] gives them; every adapter must be present), e.g. to apply
    /// adapters published by a learner. Values are converted to the decoder's dtype.
    pub fn set_lora_parameters(&self, values: &[(String, Tensor)]) -> Result<()> {
        if self.lora.is_none() {
            return Err(LoraError::NotAdapted.into());
        }
        let by_name: HashMap<&str, &Tensor> = values.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let ours = self.lora_parameters();
        // Check everything before writing anything, so a bad set leaves the adapters as they were.
        let mut writes = Vec::with_capacity(ours.len());
        for (name, t) in &ours {
            let v = by_name
                .get(name.as_str())
                .ok_or_else(|| ModelError::MissingWeight(name.clone()))?;
            if v.dims() != t.dims() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: t.dims().to_vec(),
                    found: v.dims().to_vec(),
                });
            }
            // A copy, so that setting an adapter from its own current value is allowed.
            writes.push((t, v.to_device(&self.device)?.to_dtype(self.dtype)?.copy()?));
        }
        if let Some(extra) = values
            .iter()
            .find(|(n, _)| !ours.iter().any(|(o, _)| o == n))
        {
            return Err(ModelError::InvalidInput(format!(
                "`{}` is not an adapter of this decoder",
                extra.0
            )));
        }
        for (t, v) in writes {
            // An adapter tensor is its variable's own tensor, so this `Var` shares its storage
            // and `set` writes in place, visible to every clone (a quantized copy included).
            Var::from_tensor(t)?.set(&v)?;
        }
        Ok(())
    }

    /// Every parameter in the order of [`Decoder::named_parameters`], with each adapted
    /// linear weight replaced by `W + B·A · alpha/r`: the weights of the plain model that
    /// computes what this one computes (for export, or for a server that merges). Without
    /// LoRA, the parameters themselves.
    pub fn merged_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.clone();
        if self.lora.is_none() {
            return Ok(out);
        }
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, (n, _)) in out.iter().enumerate() {
            index.insert(n.clone(), i);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                let Some(ad) = &layer.proj(t).lora else {
                    continue;
                };
                let name = format!("model.layers.{l}.{}.weight", t.module_path());
                let i = *index
                    .get(&name)
                    .ok_or_else(|| ModelError::MissingWeight(name.clone()))?;
                let delta = (ad.b.detach().matmul(&ad.a.detach())? * ad.scale)?;
                out[i].1 = (out[i].1.detach() + delta)?;
            }
        }
        Ok(out)
    }

    /// A plain decoder (no adapters, nothing trainable) from [`Decoder::merged_parameters`].
    pub fn merged(&self) -> Result<Decoder> {
        let tensors: HashMap<String, Tensor> = self.merged_parameters()?.into_iter().collect();
        let weights = Weights::new(tensors, self.dtype, &self.device)?;
        Decoder::new(&self.cfg, &weights, false)
    }

    /// Writes the adapters as a PEFT adapter directory: `adapter_config.json` (peft_type LORA,
    /// r, lora_alpha, target_modules, `base_model` as base_model_name_or_path) and
    /// `adapter_model.safetensors` with keys `base_model.model.model.layers.{i}.self_attn.
    /// q_proj.lora_A.weight` etc., in the decoder's dtype.
    pub fn save_peft_adapter(&self, dir: &Path, base_model: &str) -> Result<()> {
        let lora = self.lora.as_ref().ok_or(LoraError::NotAdapted)?;
        let adapters = self
            .lora_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        write_peft(lora, adapters, base_model, dir)
    }
}
