//! The decoder: one implementation of the Llama and Qwen2 families whose layers can be skipped
//! per call. `forward(&self, …)` never mutates the model; the KV cache, the positions and the
//! [`LayerPlan`] travel in a [`ForwardCtx`], so one set of weights serves the full-depth learner
//! and every nested behavior plan.
//!
//! Struct and field names follow the checkpoint (`model.layers.N.self_attn.q_proj`).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::LoraConfig;
use crate::ops;
use crate::plan::LayerPlan;
use crate::quant::{Lin, WeightFormat};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, Var};

mod adapters;

/// Which kernels the forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's fused rms_norm / softmax / rope: fastest, but they have no backward pass.
    /// The rollout path uses these.
    #[default]
    Fused,
    /// Differentiable kernels (one graph node per RMSNorm, RoPE, masked softmax and gated
    /// activation, each with a hand-written backward checked against finite differences); the
    /// learner uses these so that a backward pass reaches every parameter.
    Differentiable,
    /// The same maths as compositions of candle's differentiable ops: slow and memory-hungry,
    /// kept as the reference that [`Kernels::Differentiable`] is tested against.
    Composed,
}

impl Kernels {
    /// Whether a backward pass through these kernels reaches every parameter.
    pub fn differentiable(self) -> bool {
        self != Kernels::Fused
    }
}

/// The key/value cache of one sequence batch: one preallocated buffer per layer in the plan.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache that can hold `capacity` positions.
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity,
        }
    }

    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the given batch rows (in that order), e.g. to drop finished sequences or to
    /// repeat a prefilled prompt for several samples.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// Per-call state of a forward pass: the plan, the kernels, an optional KV cache and optional
/// left padding (for batched generation of prompts of different lengths).
#[derive(Debug)]
pub struct ForwardCtx {
    plan: LayerPlan,
    kernels: Kernels,
    cache: Option<KvCache>,
    left_pad: Option<Vec<usize>>,
    layers_run: usize,
    /// Start at this layer from this hidden state instead of the embeddings.
    resume: Option<(usize, Tensor)>,
    /// Keep the hidden state entering every layer (see [`ForwardCtx::record_layer_inputs`]).
    record_inputs: bool,
    inputs: Vec<Option<Tensor>>,
    /// A packed layout (see [`ForwardCtx::with_segments`]).
    segments: Option<Segments>,
}

/// A packed layout: RoPE positions per token and the attention segments of the rows.
#[derive(Debug, Clone)]
struct Segments {
    /// (b·s) u32 position of every token.
    positions: Tensor,
    spans: Vec<ops::AttnSegment>,
}

impl ForwardCtx {
    /// A context without cache that runs `plan` with fused kernels.
    pub fn new(plan: LayerPlan) -> Self {
        Self {
            plan,
            kernels: Kernels::Fused,
            cache: None,
            left_pad: None,
            layers_run: 0,
            resume: None,
            record_inputs: false,
            inputs: Vec::new(),
            segments: None,
        }
    }

    /// Adds a KV cache able to hold `capacity` positions.
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(KvCache::new(self.plan.num_layers(), capacity));
        self
    }

    /// Chooses the kernels.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Declares `pads[row]` padding tokens at the start of each row: they are masked out as
    /// keys and positions are counted from the first real token.
    pub fn with_left_padding(mut self, pads: Vec<usize>) -> Self {
        self.left_pad = if pads.iter().any(|&p| p > 0) {
            Some(pads)
        } else {
            None
        };
        self
    }

    /// Lays the batch out as packed segments: token `i` of the flattened (b, s) batch has RoPE
    /// position `positions[i]`, and attention runs within each segment only, under its mask
    /// (positions outside every segment are padding). No cache and no left padding.
    pub(crate) fn with_segments(mut self, positions: Tensor, spans: Vec<ops::AttnSegment>) -> Self {
        self.segments = Some(Segments { positions, spans });
        self
    }

    /// Starts the next forward pass at layer `layer` from `hidden`, the (b, s, hidden) state
    /// entering that layer (e.g. recorded by an earlier pass whose plan agrees below `layer`).
    /// The tokens passed to the forward call still give the shape and the padding; no cache.
    pub(crate) fn resume_at(mut self, layer: usize, hidden: Tensor) -> Self {
        self.resume = Some((layer, hidden));
        self
    }

    /// Makes forward passes keep the hidden state entering each layer `0..L` (whether the plan
    /// runs it or not), for [`ForwardCtx::take_layer_inputs`].
    pub(crate) fn record_layer_inputs(mut self) -> Self {
        self.record_inputs = true;
        self
    }

    /// The recorded layer inputs of the last forward pass (index = layer; `None` below the
    /// layer a resumed pass started at).
    pub(crate) fn take_layer_inputs(&mut self) -> Vec<Option<Tensor>> {
        std::mem::take(&mut self.inputs)
    }

    /// The plan this context runs.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Positions already in the cache (0 without a cache).
    pub fn seq_len(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// How many decoder-layer forwards this context has run (summed over calls).
    pub fn layers_run(&self) -> usize {
        self.layers_run
    }

    /// The layers that hold keys and values in the cache (those whose attention block ran).
    pub fn cached_layers(&self) -> Vec<usize> {
        self.cache.as_ref().map_or_else(Vec::new, |c| {
            c.layers
                .iter()
                .enumerate()
                .filter_map(|(l, kv)| kv.as_ref().map(|_| l))
                .collect()
        })
    }

    /// Keeps only the given batch rows of the cache and padding.
    pub fn select_rows(&mut self, rows: &[usize], device: &Device) -> Result<()> {
        if let (Some(pads), Some(&bad)) = (&self.left_pad, rows.iter().max()) {
            if bad >= pads.len() {
                return Err(ModelError::InvalidInput(format!(
                    "row {bad} is outside the batch of {}",
                    pads.len()
                )));
            }
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), device)?;
        if let Some(cache) = &mut self.cache {
            cache.select_rows(&idx)?;
        }
        if let Some(pads) = &self.left_pad {
            let pads: Vec<usize> = rows.iter().map(|&r| pads[r]).collect();
            self.left_pad = Some(pads).filter(|p| p.iter().any(|&x| x > 0));
        }
        Ok(())
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Fused => candle_nn::ops::rms_norm(x, w, eps as f32)?,
        Kernels::Differentiable => ops::rms_norm(x, w, eps)?,
        Kernels::Composed => ops::rms_norm_composed(x, w, eps)?,
    })
}

/// Non-interleaved ("rotate half") RoPE.
///
/// # Shapes
/// `x`: (b, heads, s, hd); `cos`, `sin`: (s, hd/2) or (b, s, hd/2).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
        Kernels::Differentiable => ops::rope(x, cos, sin)?,
        Kernels::Composed => ops::rope_composed(x, cos, sin)?,
    })
}

/// Softmax over the last axis of `att + mask`.
///
/// # Shapes
/// `att`: (b, g, r·s, l); `mask`: (b or 1, 1, 1, s, l) → (b, g, r·s, l).
fn masked_softmax(att: &Tensor, mask: Option<&Tensor>, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Fused => {
            let (b, g, rs, l) = att.dims4()?;
            let att = match mask {
                Some(mask) => {
                    let s = mask.dim(3)?;
                    att.reshape((b, g, rs / s, s, l))?
                        .broadcast_add(mask)?
                        .reshape((b, g, rs, l))?
                }
                None => att.clone(),
            };
            candle_nn::ops::softmax_last_dim(&att)?
        }
        Kernels::Differentiable | Kernels::Composed => ops::masked_softmax_composed(att, mask)?,
    })
}

/// `silu(gate) * up`.
fn silu_mul(gate: &Tensor, up: &Tensor, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Differentiable => ops::silu_mul(gate, up)?,
        Kernels::Fused | Kernels::Composed => ops::silu_mul_composed(gate, up)?,
    })
}

/// `x @ w^T (+ b)` over the last axis of x. The leading axes are folded into one so that the
/// matmul is a plain 2-D GEMM (a broadcast batched matmul is several times slower on CPU).
fn linear(x: &Tensor, w: &Lin, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, k) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let mut out_shape = lead.to_vec();
    out_shape.push(w.out_dim()?);
    let y = w
        .matmul_t(&x.contiguous()?.reshape((rows, k[0]))?)?
        .reshape(out_shape)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A low-rank update of a linear layer: `(x Aᵀ) Bᵀ · scale`.
#[derive(Debug, Clone)]
struct Adapter {
    /// (r, in).
    a: Tensor,
    /// (out, r).
    b: Tensor,
    /// alpha / r.
    scale: f64,
}

/// A linear layer's weight and, with LoRA, its adapter.
#[derive(Debug, Clone)]
struct Proj {
    w: Lin,
    lora: Option<Adapter>,
    /// The weight never trains (the base of a LoRA decoder): the differentiable kernels skip
    /// its gradient.
    frozen: bool,
}

impl Proj {
    fn dense(w: Tensor) -> Self {
        Self {
            w: Lin::Dense(w),
            lora: None,
            frozen: false,
        }
    }

    /// `x Wᵀ (+ b)`, plus `(x Aᵀ · scale) Bᵀ` with an adapter.
    ///
    /// # Shapes
    /// `x`: (…, in) → (…, out).
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, kernels: Kernels) -> Result<Tensor> {
        let y = match &self.w {
            Lin::Dense(w) if self.frozen && kernels == Kernels::Differentiable => {
                if let Some(ad) = &self.lora {
                    return linear_frozen_lora(x, w, ad, bias);
                }
                linear_frozen(x, w, bias)?
            }
            w => linear(x, w, bias)?,
        };
        match &self.lora {
            None => Ok(y),
            Some(ad) => {
                let low = (linear(x, &Lin::Dense(ad.a.clone()), None)? * ad.scale)?;
                Ok((y + linear(&low, &Lin::Dense(ad.b.clone()), None)?)?)
            }
        }
    }
}

/// [`linear`] through [`ops::frozen_linear`]: no gradient for `w`.
fn linear_frozen(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    on_rows(x, w.dim(0)?, b, |x2| ops::frozen_linear(x2, w))
}

/// [`linear_frozen`] with the layer's adapter, as one node ([`ops::frozen_lora_linear`]).
fn linear_frozen_lora(x: &Tensor, w: &Tensor, ad: &Adapter, b: Option<&Tensor>) -> Result<Tensor> {
    on_rows(x, w.dim(0)?, b, |x2| {
        ops::frozen_lora_linear(x2, w, &ad.a, &ad.b, ad.scale)
    })
}

/// `f` over `x`'s leading axes folded into rows ((rows, in) → (rows, out)), unfolded again, plus
/// the bias.
fn on_rows(
    x: &Tensor,
    out: usize,
    b: Option<&Tensor>,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, k) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let mut out_shape = lead.to_vec();
    out_shape.push(out);
    let y = f(&x.contiguous()?.reshape((rows, k[0]))?)?.reshape(out_shape)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

#[derive(Debug, Clone)]
struct SelfAttn {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: Tensor,
    self_attn: SelfAttn,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Per-call inputs shared by every layer of one forward pass.
struct Step<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// Additive mask, (b or 1, 1, 1, s, L), or none when every key is visible.
    mask: Option<&'a Tensor>,
    offset: usize,
    kernels: Kernels,
    /// Attention segments of a packed batch (then `mask` is unused).
    segments: Option<&'a [ops::AttnSegment]>,
}

/// The decoder. Weights are never copied to build a nested model: a plan only selects layers.
#[derive(Debug)]
pub struct Decoder {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// The output head re-quantized, in a decoder built by [`Decoder::quantized`].
    head_q: Option<Lin>,
    /// The storage of the linear layers' weights.
    format: WeightFormat,
    rope_cos: Tensor,
    rope_sin: Tensor,
    params: Vec<(String, Tensor)>,
    /// The trainable variables: every parameter, or with LoRA the adapters only.
    vars: Vec<(String, Var)>,
    /// The adapters' configuration, with LoRA (see [`Decoder::with_lora`]).
    lora: Option<LoraConfig>,
    device: Device,
    dtype: DType,
}

impl Decoder {
    /// Builds the decoder from named weights (Hugging Face names). With `trainable`, every
    /// parameter becomes a [`Var`] (see [`Decoder::vars`]) that an optimiser can update in place.
    pub fn new(cfg: &ModelConfig, weights: &Weights, trainable: bool) -> Result<Self> {
        let cfg = cfg.clone().validate()?;
        // Every parameter comes from the one list, in its order; the fields below take clones
        // of these tensors (shared storage), so `params` and the layers are the same weights.
        let mut params = Vec::new();
        let mut vars = Vec::new();
        for spec in cfg.parameter_specs() {
            let t = weights.get(&spec.name, &spec.shape)?;
            let t = if trainable {
                let var = Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                vars.push((spec.name.clone(), var));
                t
            } else {
                t
            };
            params.push((spec.name, t));
        }
        let by_name: std::collections::HashMap<&str, &Tensor> =
            params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |name: String| -> Result<Tensor> {
            by_name
                .get(name.as_str())
                .map(|t| (*t).clone())
                .ok_or(ModelError::MissingWeight(name))
        };
        let embed_tokens = get("model.embed_tokens.weight".into())?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.architecture.qkv_bias();
            let opt_bias = |name: &str| -> Result<Option<Tensor>> {
                if bias {
                    Ok(Some(get(format!("{p}.self_attn.{name}.bias"))?))
                } else {
                    Ok(None)
                }
            };
            let self_attn = SelfAttn {
                q_proj: Proj::dense(get(format!("{p}.self_attn.q_proj.weight"))?),
                k_proj: Proj::dense(get(format!("{p}.self_attn.k_proj.weight"))?),
                v_proj: Proj::dense(get(format!("{p}.self_attn.v_proj.weight"))?),
                o_proj: Proj::dense(get(format!("{p}.self_attn.o_proj.weight"))?),
                q_bias: opt_bias("q_proj")?,
                k_bias: opt_bias("k_proj")?,
                v_bias: opt_bias("v_proj")?,
            };
            layers.push(Layer {
                input_layernorm: get(format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: get(format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: Proj::dense(get(format!("{p}.mlp.gate_proj.weight"))?),
                    up_proj: Proj::dense(get(format!("{p}.mlp.up_proj.weight"))?),
                    down_proj: Proj::dense(get(format!("{p}.mlp.down_proj.weight"))?),
                },
            });
        }
        let norm = get("model.norm.weight".into())?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight".into())?)
        };
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let (rope_cos, rope_sin) = rope_tables(&cfg, dtype, &device)?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_q: None,
            format: WeightFormat::F32,
            rope_cos,
            rope_sin,
            params,
            vars,
            lora: None,
            device,
            dtype,
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The trainable parameters, in the order of [`Decoder::named_parameters`] (empty unless
    /// built with `trainable`); with LoRA, the adapters only, in the order of
    /// [`Decoder::lora_parameters`], and the base weights are frozen.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Every parameter in the canonical order of [`ModelConfig::parameter_specs`]: the flat
    /// layout the weight store shares. With LoRA these are the frozen base weights (see
    /// [`Decoder::merged_parameters`] for the adapted ones).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.clone()
    }

    /// Checks every id is inside the vocabulary.
    pub fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            Some(&id) => Err(ModelError::TokenOutOfVocab {
                id,
                vocab_size: self.cfg.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// `tokens`: (b, s) u32 → (b, s, vocab).
    pub fn forward(&self, tokens: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let hidden = self.forward_hidden(tokens, ctx)?;
        self.project(&hidden)
    }

    /// The output head's weight, (vocab, hidden): `lm_head`, or the embedding when tied.
    pub(crate) fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Applies the output head to final hidden states.
    ///
    /// # Shapes
    /// `hidden`: (…, hidden) → (…, vocab).
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head_q {
            Some(q) => linear(hidden, q, None),
            None => linear(hidden, &Lin::Dense(self.head_weight().clone()), None),
        }
    }

    /// The storage of the linear layers' weights ([`WeightFormat::F32`] unless built by
    /// [`Decoder::quantized`]).
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// A read-only copy whose linear layers (attention and MLP projections and the output
    /// head) run re-quantized from these weights in `format`: the 8-bit behavior of the
    /// rollout path. Norms, biases and the embedding stay f32; the copy shares them. It has no
    /// trainable variables, and its forward passes use the fused kernels only. A LoRA
    /// decoder's copy keeps its adapters dense over the quantized base, sharing their storage
    /// (updates to the adapters show in the copy); quantize [`Decoder::merged`] instead to
    /// fold them in.
    pub fn quantized(&self, format: WeightFormat) -> Result<Decoder> {
        let mut layers = self.layers.clone();
        for layer in &mut layers {
            let a = &mut layer.self_attn;
            for p in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                p.w = p.w.quantize(format)?;
            }
            let m = &mut layer.mlp;
            for p in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                p.w = p.w.quantize(format)?;
            }
        }
        let head_q = if format.is_quantized() {
            Some(Lin::Dense(self.head_weight().clone()).quantize(format)?)
        } else {
            None
        };
        Ok(Decoder {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            head_q,
            format,
            rope_cos: self.rope_cos.clone(),
            rope_sin: self.rope_sin.clone(),
            params: self.params.clone(),
            vars: Vec::new(),
            lora: self.lora.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
        })
    }

    /// Final (normed) hidden states for every position, running only the plan's layers.
    ///
    /// # Shapes
    /// `tokens`: (b, s) u32 → (b, s, hidden).
    pub fn forward_hidden(&self, tokens: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        ctx.plan.check_for(self.cfg.num_layers)?;
        let (b, s) = tokens.dims2()?;
        if s == 0 || b == 0 {
            return Err(ModelError::InvalidInput("empty token batch".into()));
        }
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        self.check_tokens(&ids)?;
        let offset = ctx.seq_len();
        let total = offset + s;
        // In a packed batch a row holds several sequences: the positions are what must fit.
        let longest = match &ctx.segments {
            Some(seg) => seg.positions.max(0)?.to_scalar::<u32>()? as usize + 1,
            None => total,
        };
        if longest > self.cfg.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                len: longest,
                max: self.cfg.max_position_embeddings,
            });
        }
        if let Some(cache) = &ctx.cache {
            if total > cache.capacity {
                return Err(ModelError::ContextOverflow {
                    len: total,
                    max: cache.capacity,
                });
            }
        }
        if let Some(seg) = &ctx.segments {
            if ctx.cache.is_some() || ctx.left_pad.is_some() {
                return Err(ModelError::InvalidInput(
                    "a packed batch takes no cache and no left padding".into(),
                ));
            }
            if seg.positions.dims() != [b * s] {
                return Err(ModelError::InvalidInput(format!(
                    "{:?} packed positions for a ({b}, {s}) batch",
                    seg.positions.dims()
                )));
            }
        }
        if let Some(pads) = &ctx.left_pad {
            if pads.len() != b {
                return Err(ModelError::InvalidInput(format!(
                    "{} padding entries for a batch of {b}",
                    pads.len()
                )));
            }
        }
        let (cos, sin) = self.rope_for(ctx, b, s, offset)?;
        let mask = self.mask_for(ctx, b, s, offset)?;
        let step = Step {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            offset,
            kernels: ctx.kernels,
            segments: ctx.segments.as_ref().map(|seg| seg.spans.as_slice()),
        };

        let (from, mut x) = match ctx.resume.take() {
            Some((from, x)) => {
                if ctx.cache.is_some() || x.dims() != [b, s, self.cfg.hidden_size] {
                    return Err(ModelError::InvalidInput(
                        "a resumed forward pass takes a (b, s, hidden) state and no cache".into(),
                    ));
                }
                (from, x)
            }
            None => (
                0,
                self.embed_tokens
                    .index_select(&tokens.flatten_all()?, 0)?
                    .reshape((b, s, self.cfg.hidden_size))?,
            ),
        };
        let plan = ctx.plan.layers().to_vec();
        if ctx.record_inputs {
            ctx.inputs = vec![None; self.cfg.num_layers];
        }
        for l in from..self.cfg.num_layers {
            if ctx.record_inputs {
                ctx.inputs[l] = Some(x.clone());
            }
            if plan.binary_search(&l).is_err() {
                continue;
            }
            let (attn, mlp) = (ctx.plan.runs_attn(l), ctx.plan.runs_mlp(l));
            // A layer whose attention block is skipped needs no keys or values.
            let kv = match &mut ctx.cache {
                Some(cache) if attn => Some(self.layer_cache(cache, l, b)?),
                _ => None,
            };
            x = self.layer_forward(&self.layers[l], &x, &step, kv, attn, mlp)?;
            if ctx.kernels == Kernels::Fused {
                // The rollout path never back-propagates: cut the graph at layer boundaries.
                x = x.detach();
            }
            ctx.layers_run += 1;
        }
        if let Some(cache) = &mut ctx.cache {
            cache.len = total;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps, ctx.kernels)
    }

    fn layer_cache<'c>(
        &self,
        cache: &'c mut KvCache,
        l: usize,
        b: usize,
    ) -> Result<&'c (Tensor, Tensor)> {
        if cache.layers[l].is_none() {
            if cache.len > 0 {
                return Err(ModelError::InvalidPlan(format!(
                    "layer {l} has no cached keys: the plan changed in the middle of a sequence"
                )));
            }
            let shape = (b, self.cfg.num_kv_heads, cache.capacity, self.cfg.head_dim);
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            cache.layers[l] = Some((k, v));
        }
        cache.layers[l]
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("cache layer missing".into()))
    }

    fn rope_for(
        &self,
        ctx: &ForwardCtx,
        b: usize,
        s: usize,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        if let Some(seg) = &ctx.segments {
            let cos = self.rope_cos.index_select(&seg.positions, 0)?;
            let sin = self.rope_sin.index_select(&seg.positions, 0)?;
            return Ok((cos.reshape((b, s, half))?, sin.reshape((b, s, half))?));
        }
        match &ctx.left_pad {
            None => Ok((
                self.rope_cos.narrow(0, offset, s)?,
                self.rope_sin.narrow(0, offset, s)?,
            )),
            Some(pads) => {
                let mut pos = Vec::with_capacity(b * s);
                for &pad in pads {
                    pos.extend((0..s).map(|i| (offset + i).saturating_sub(pad) as u32));
                }
                let pos = Tensor::from_vec(pos, b * s, &self.device)?;
                let cos = self.rope_cos.index_select(&pos, 0)?.reshape((b, s, half))?;
                let sin = self.rope_sin.index_select(&pos, 0)?.reshape((b, s, half))?;
                Ok((cos, sin))
            }
        }
    }

    /// The additive attention mask: causal, and left-padding keys hidden (a padding query still
    /// sees itself so that no softmax row is empty).
    fn mask_for(
        &self,
        ctx: &ForwardCtx,
        b: usize,
        s: usize,
        offset: usize,
    ) -> Result<Option<Tensor>> {
        let total = offset + s;
        let pads = ctx.left_pad.as_deref();
        if ctx.segments.is_some() || (s == 1 && pads.is_none()) {
            return Ok(None);
        }
        let rows = if pads.is_some() { b } else { 1 };
        let mut m = vec![0f32; rows * s * total];
        for r in 0..rows {
            let pad = pads.map_or(0, |p| p[r]);
            for i in 0..s {
                let q = offset + i;
                let row = &mut m[(r * s + i) * total..(r * s + i + 1) * total];
                for (j, v) in row.iter_mut().enumerate() {
                    if j > q || (j < pad && j != q) {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask =
            Tensor::from_vec(m, (rows, 1, 1, s, total), &self.device)?.to_dtype(self.dtype)?;
        Ok(Some(mask))
    }

    /// One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`; a skipped block is the
    /// identity (its residual branch is left out).
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        step: &Step,
        kv: Option<&(Tensor, Tensor)>,
        run_attn: bool,
        run_mlp: bool,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let mut x = x.clone();
        if run_attn {
            let h = rms_norm(&x, &layer.input_layernorm, eps, step.kernels)?;
            let h = self.attention(&layer.self_attn, &h, step, kv)?;
            x = (x + h)?;
        }
        if run_mlp {
            let h = rms_norm(&x, &layer.post_attention_layernorm, eps, step.kernels)?;
            let m = &layer.mlp;
            let gate = m.gate_proj.forward(&h, None, step.kernels)?;
            let up = m.up_proj.forward(&h, None, step.kernels)?;
            let h =
                m.down_proj
                    .forward(&silu_mul(&gate, &up, step.kernels)?, None, step.kernels)?;
            x = (x + h)?;
        }
        Ok(x)
    }

    /// Grouped-query attention without materialising repeated keys: the query heads that share
    /// a key/value head are folded into the query-length axis.
    ///
    /// # Shapes
    /// `x`: (b, s, hidden) → (b, s, hidden).
    fn attention(
        &self,
        a: &SelfAttn,
        x: &Tensor,
        step: &Step,
        kv: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(a.q_proj.forward(x, a.q_bias.as_ref(), step.kernels)?, nh)?;
        let k = heads(a.k_proj.forward(x, a.k_bias.as_ref(), step.kernels)?, nkv)?;
        let v = heads(a.v_proj.forward(x, a.v_bias.as_ref(), step.kernels)?, nkv)?;
        let q = rope(&q, step.cos, step.sin, step.kernels)?;
        let k = rope(&k, step.cos, step.sin, step.kernels)?.contiguous()?;
        let (k, v) = match kv {
            Some((kbuf, vbuf)) => {
                kbuf.slice_set(&k, 2, step.offset)?;
                vbuf.slice_set(&v, 2, step.offset)?;
                let len = step.offset + s;
                (kbuf.narrow(2, 0, len)?, vbuf.narrow(2, 0, len)?)
            }
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(segs) = step.segments {
            let y = match step.kernels {
                Kernels::Differentiable => ops::segment_attention(&q, &k, &v, segs, scale)?,
                Kernels::Composed => ops::segment_attention_composed(&q, &k, &v, segs, scale)?,
                // The rollout path never back-propagates: the value alone, no graph node.
                Kernels::Fused => {
                    ops::segment_attention(&q.detach(), &k.detach(), &v.detach(), segs, scale)?
                }
            };
            let y = y.transpose(1, 2)?.reshape((b, s, nh * hd))?;
            return a.o_proj.forward(&y, None, step.kernels);
        }
        let q = q.reshape((b, nkv, rep * s, hd))?;
        let y = match step.kernels {
            // One graph node that recomputes the attention probabilities in its backward.
            Kernels::Differentiable => ops::attention(&q, &k, &v, step.mask, scale)?,
            Kernels::Fused | Kernels::Composed => {
                let att = (q * scale)?.matmul(&k.t()?)?;
                let att = masked_softmax(&att, step.mask, step.kernels)?;
                att.matmul(&v)? // (b, nkv, rep*s, hd)
            }
        };
        let y = y
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        a.o_proj.forward(&y, None, step.kernels)
    }
}

/// cos/sin tables for every position, (max_pos, hd/2), computed in f64 then cast.
fn rope_tables(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let n = cfg.max_position_embeddings;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}
