//! Differentiable fused ops for the learner's forward and backward pass.
//!
//! candle's fused CPU kernels (`rms_norm`, `softmax_last_dim`, `rope`) have no backward, and the
//! compositions that do are slow: every small op becomes a graph node whose backward allocates a
//! zero gradient and adds into it. Each op here is one graph node: its forward value is computed
//! eagerly by a fast kernel on detached inputs and handed to candle as a custom op, whose `bwd`
//! is written by hand with ordinary tensor ops (on detached tensors, so that no gradient keeps a
//! graph alive).
//!
//! The output head ([`head_logprobs`]) never materialises the whole (rows × vocab) logits: the
//! forward runs in row chunks and keeps each row's expected output embedding, from which the
//! backward has the hidden states' gradient; only a trained head's weight gradient recomputes
//! the logits, in vocabulary chunks.
//!
//! Every op is checked against finite differences in f64 and against the composed form in f32
//! (`model/tests/ops.rs`). On devices other than the CPU the composed forms are used.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

mod lora;
mod segments;

pub use lora::frozen_lora_linear;
pub use segments::{segment_attention, segment_attention_composed, AttnSegment};

/// How [`head_logprobs_chunked`] splits its work: its memory is about
/// `max(rows × vocab, n × vocab_rows)` logits instead of `n × vocab`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadChunks {
    /// Rows whose logits the forward pass computes at once.
    pub rows: usize,
    /// Vocabulary entries whose logits the backward pass recomputes at once (for all rows).
    pub vocab: usize,
}

impl Default for HeadChunks {
    fn default() -> Self {
        Self {
            rows: 256,
            vocab: 4096,
        }
    }
}

/// A forward value computed ahead of the custom op that attaches it to the graph. The op takes
/// it out once, so the graph node does not keep a second copy alive.
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    /// The value as an owned CPU storage with its shape.
    pub(crate) fn take(&self, op: &'static str) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned forward value")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward run twice")))?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("{op}: the forward value is not on the CPU")
        };
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("{op}: the forward value is not contiguous")
        };
        let out = match cpu {
            CpuStorage::F32(v) => CpuStorage::F32(v[o1..o2].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[o1..o2].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[o1..o2].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[o1..o2].to_vec()),
            _ => candle_core::bail!("{op}: unsupported dtype {:?}", value.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// Whether the fused ops apply: CPU tensors (the forward values are CPU storages).
pub(crate) fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu()
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// The composed RMSNorm: `x / sqrt(mean(x²) + eps) * w` with candle's differentiable ops.
///
/// # Shapes
/// `x`: (…, h); `w`: (h) → (…, h).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm_slow(x, w, eps as f32)
}

struct RmsNormOp {
    eps: f64,
    value: Precomputed,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-diff"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // n = x·r with r = (mean(x²) + eps)^-½; y = n·w.
        // dx = r·(g·w − n·mean(g·w·n)); dw = Σ_rows g·n.
        let want_w = w.track_op();
        let (x, w) = (x.detach(), w.detach());
        let r = inv_rms(&x, self.eps)?;
        let n = x.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&w)?;
        let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        // A frozen weight (a LoRA base: neither a variable nor computed from one) needs no
        // gradient; skipping it also keeps it out of the gradient store.
        if !want_w {
            return Ok((Some(dx), None));
        }
        let h = w.dim(0)?;
        let dw = (g * n)?.reshape(((), h))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (mean(x²) + eps)^-½ over the last axis, keeping it.
fn inv_rms(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
}

/// Differentiable RMSNorm as one graph node.
///
/// # Shapes
/// `x`: (…, h); `w`: (h) → (…, h).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !on_cpu(x) {
        return rms_norm_composed(x, w, eps);
    }
    let x = x.contiguous()?;
    let (xd, wd) = (x.detach(), w.detach());
    // candle's fused kernel accumulates in f32: exact for f32 inputs, not for f64 ones.
    let value = if x.dtype() == DType::F32 {
        candle_nn::ops::rms_norm(&xd, &wd, eps as f32)?
    } else {
        xd.broadcast_mul(&inv_rms(&xd, eps)?)?.broadcast_mul(&wd)?
    };
    x.apply_op2(
        w,
        RmsNormOp {
            eps,
            value: Precomputed::new(value),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// A linear layer with a frozen weight

struct FrozenLinearOp {
    /// (out, in), detached.
    w: Tensor,
    value: Precomputed,
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // y = x·Wᵀ: dx = g·W; W is frozen and gets nothing.
        Ok(Some(g.detach().matmul(&self.w)?))
    }
}

/// `x @ wᵀ` for a weight that never trains (a LoRA base): one graph node whose backward
/// computes the input's gradient only, where candle's matmul would also compute the weight's
/// (a GEMM as large as the forward's). `w` is held by the node, not a graph input.
///
/// # Shapes
/// `x`: (rows, in); `w`: (out, in) → (rows, out).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let w = w.detach();
    if !on_cpu(x) {
        return x.matmul(&w.t()?);
    }
    let value = x.detach().matmul(&w.t()?)?;
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(FrozenLinearOp {
        w,
        value: Precomputed::new(value),
    })
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last axis, with an optional additive mask

/// The composed masked softmax.
///
/// # Shapes
/// `att`: (b, g, r·s, l); `mask`: (b or 1, 1, 1, s, l) → (b, g, r·s, l).
pub fn masked_softmax_composed(att: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let att = add_mask(att, mask)?;
    candle_nn::ops::softmax(&att, D::Minus1)
}

fn add_mask(att: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(att.clone());
    };
    let (b, g, rs, l) = att.dims4()?;
    let s = mask.dim(3)?;
    if s == 0 || rs % s != 0 {
        candle_core::bail!("mask rows {s} do not divide attention rows {rs}");
    }
    att.reshape((b, g, rs / s, s, l))?
        .broadcast_add(mask)?
        .reshape((b, g, rs, l))
}

struct SoftmaxOp {
    value: Precomputed,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "masked-softmax-diff"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = y·(g − Σ g·y). The mask is a constant: masked entries have y = 0.
        let y = y.detach();
        let dot = (g * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((g.broadcast_sub(&dot)? * y)?))
    }
}

/// Softmax over the last axis of `att + mask` as one graph node (no gradient reaches the mask).
///
/// # Shapes
/// `att`: (b, g, r·s, l); `mask`: (b or 1, 1, 1, s, l) → (b, g, r·s, l).
pub fn masked_softmax(att: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if !on_cpu(att) {
        return masked_softmax_composed(att, mask);
    }
    let masked = add_mask(&att.detach(), mask)?.contiguous()?;
    let value = candle_nn::ops::softmax_last_dim(&masked)?;
    drop(masked);
    att.apply_op1(SoftmaxOp {
        value: Precomputed::new(value),
    })
}

// ---------------------------------------------------------------------------------------------
// Attention core: softmax(q·kᵀ·scale + mask)·v

/// The composed attention core.
///
/// # Shapes
/// `q`: (b, g, r·s, d); `k`, `v`: (b, g, l, d); `mask`: (b or 1, 1, 1, s, l) → (b, g, r·s, d).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let att = (q * scale)?.matmul(&k.t()?)?;
    masked_softmax_composed(&att, mask)?.matmul(v)
}

struct AttentionOp {
    mask: Option<Tensor>,
    scale: f64,
    value: Precomputed,
}

/// softmax(q·kᵀ·scale + mask) on detached inputs.
pub(crate) fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let att = (q * scale)?.matmul(&k.t()?)?;
    let att = add_mask(&att, mask)?.contiguous()?;
    candle_nn::ops::softmax_last_dim(&att)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention-diff"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The probabilities are recomputed instead of kept: P = softmax(S), S = q·kᵀ·scale + m.
        // dv = Pᵀ·g; dP = g·vᵀ; dS = P·(dP − Σ dP·P); dq = dS·k·scale; dk = dSᵀ·q·scale.
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let p = attention_probs(&q, &k, self.mask.as_ref(), self.scale)?;
        let g = g.detach();
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        let dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (dp.broadcast_sub(&dot)? * p)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// softmax(q·kᵀ·scale + mask)·v as one graph node that keeps no (rows × keys) matrix: the
/// backward recomputes the attention probabilities. No gradient reaches the mask.
///
/// # Shapes
/// `q`: (b, g, r·s, d); `k`, `v`: (b, g, l, d); `mask`: (b or 1, 1, 1, s, l) → (b, g, r·s, d).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if !on_cpu(q) {
        return attention_composed(q, k, v, mask, scale);
    }
    let mask = mask.map(Tensor::detach);
    let p = attention_probs(&q.detach(), &k.detach(), mask.as_ref(), scale)?;
    let value = p.matmul(&v.detach())?;
    drop(p);
    q.apply_op3(
        k,
        v,
        AttentionOp {
            mask,
            scale,
            value: Precomputed::new(value),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (non-interleaved, "rotate half")

/// The composed rotate-half RoPE.
///
/// # Shapes
/// `x`: (b, heads, s, hd); `cos`, `sin`: (s, hd/2) or (b, s, hd/2).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (cos, sin) = (
        Tensor::cat(&[cos, cos], D::Minus1)?,
        Tensor::cat(&[sin, sin], D::Minus1)?,
    );
    // (s, hd) -> (1, 1, s, hd); (b, s, hd) -> (b, 1, s, hd)
    let (cos, sin) = if cos.rank() == 2 {
        (
            cos.unsqueeze(0)?.unsqueeze(0)?,
            sin.unsqueeze(0)?.unsqueeze(0)?,
        )
    } else {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    };
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

struct RopeOp {
    cos: Tensor,
    sin: Tensor,
    value: Precomputed,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope-diff"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by the opposite angle.
        let neg_sin = self.sin.neg()?;
        Ok(Some(candle_nn::rotary_emb::rope(
            &g.contiguous()?,
            &self.cos,
            &neg_sin,
        )?))
    }
}

/// Differentiable rotate-half RoPE as one graph node (candle's fused kernel both ways).
///
/// # Shapes
/// `x`: (b, heads, s, hd); `cos`, `sin`: (s, hd/2) or (b, s, hd/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !on_cpu(x) {
        return rope_composed(x, cos, sin);
    }
    let x = x.contiguous()?;
    let (cos, sin) = (cos.detach().contiguous()?, sin.detach().contiguous()?);
    let value = candle_nn::rotary_emb::rope(&x.detach(), &cos, &sin)?;
    x.apply_op1(RopeOp {
        cos,
        sin,
        value: Precomputed::new(value),
    })
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) · up

/// The composed gated activation `silu(gate) * up`.
pub fn silu_mul_composed(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()? * up
}

struct SiluMulOp {
    value: Precomputed,
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "silu-mul-diff"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // silu(a) = a·σ(a); silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
        let (a, up) = (gate.detach(), up.detach());
        let sig = candle_nn::ops::sigmoid(&a)?;
        let silu = (&a * &sig)?;
        let dsilu = (&sig * ((&a - &silu)? + 1.0)?)?;
        let d_gate = ((g * up)? * dsilu)?;
        let d_up = (g * silu)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// Differentiable `silu(gate) * up` as one graph node.
///
/// # Shapes
/// `gate`, `up`: equal shapes → the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !on_cpu(gate) {
        return silu_mul_composed(gate, up);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let value = (gate.detach().silu()? * up.detach())?;
    gate.apply_op2(
        &up,
        SiluMulOp {
            value: Precomputed::new(value),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Output head: log π(target) without the whole logits matrix

/// The composed output head: full logits, `log_softmax`, `gather`.
///
/// # Shapes
/// `hidden`: (n, h); `weight`: (v, h); `targets`: (n) u32 → (n).
pub fn head_logprobs_composed(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let logits = hidden.matmul(&weight.t()?)?;
    let logits = if temperature == 1.0 {
        logits
    } else {
        (logits / temperature)?
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let n = targets.dim(0)?;
    logp.gather(&targets.reshape((n, 1))?.contiguous()?, 1)?
        .reshape(n)
}

/// Forward of the head in row chunks: (log π(target), logsumexp) per row, both (n), and with
/// `expect` the expected output embedding under π per row, `E_i = Σ_v π_i(v)·W_v`, (n, h).
///
/// `E` is what the backward needs for the hidden states' gradient
/// (`∂ log π_i(t_i)/∂h_i = (W_{t_i} − E_i)/T`); it costs one GEMM here while the chunk's
/// probabilities are at hand, instead of recomputing the logits in the backward.
fn head_forward(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk_rows: usize,
    expect: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = hidden.dim(0)?;
    let wt = weight.t()?;
    let mut picked = Vec::new();
    let mut lses = Vec::new();
    let mut expected = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let logits = hidden.narrow(0, start, len)?.matmul(&wt)?;
        let logits = if temperature == 1.0 {
            logits
        } else {
            (logits / temperature)?
        };
        // The same arithmetic as candle's log_softmax: (x_t − max) − log Σ exp(x − max).
        let max = logits.max_keepdim(D::Minus1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum_exp = exp.sum_keepdim(D::Minus1)?;
        let t = targets.narrow(0, start, len)?.reshape((len, 1))?;
        let x_t = logits.gather(&t.contiguous()?, 1)?;
        let log_sum = sum_exp.log()?;
        picked.push(x_t.broadcast_sub(&max)?.broadcast_sub(&log_sum)?);
        lses.push((max + log_sum)?);
        if expect {
            // (exp · W) / Σ exp: the division on (len, h) rather than on (len, vocab).
            expected.push(exp.matmul(weight)?.broadcast_div(&sum_exp)?);
        }
        start += len;
    }
    let picked = Tensor::cat(&picked, 0)?.reshape(n)?;
    let lse = Tensor::cat(&lses, 0)?.reshape(n)?;
    let expected = if expect {
        Some(Tensor::cat(&expected, 0)?)
    } else {
        None
    };
    Ok((picked, lse, expected))
}

struct HeadOp {
    targets: Tensor,
    chunk_vocab: usize,
    temperature: f64,
    /// log Σ_v exp(logit_v / T) per row, (n).
    lse: Tensor,
    /// Σ_v π(v)·W_v per row, (n, h).
    expected: Tensor,
    value: Precomputed,
}

impl CustomOp2 for HeadOp {
    fn name(&self) -> &'static str {
        "head-logprobs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take(self.name())
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // out_i = z_{i,t_i} − lse_i with z = h·Wᵀ/T, so dL/dz_{i,v} = g_i·(δ_{v,t_i} − p_{i,v})
        // and dL/dh_i = g_i·(W_{t_i} − E_i)/T with E = p·W from the forward. The weight's
        // gradient (not for a frozen head, a LoRA base) needs p itself: it runs in vocabulary
        // chunks (logits recomputed); its one-hot part is a scatter-add of single rows.
        let (h, w) = (hidden.detach(), weight.detach());
        let (n, _) = h.dims2()?;
        let v = w.dim(0)?;
        let inv_t = 1.0 / self.temperature;
        let g = g.detach().reshape((n, 1))?;
        let targets = &self.targets;
        let grad_h = (w.index_select(targets, 0)? - &self.expected)?.broadcast_mul(&g)?;
        let grad_h = if self.temperature == 1.0 {
            grad_h
        } else {
            (grad_h * inv_t)?
        };
        if !weight.track_op() {
            return Ok((Some(grad_h), None));
        }
        let hs = if self.temperature == 1.0 {
            h
        } else {
            (&h * inv_t)?
        };
        let neg_g = g.neg()?;
        let lse = self.lse.reshape((n, 1))?;
        let mut grad_w = Vec::with_capacity(v.div_ceil(self.chunk_vocab));
        let mut start = 0;
        while start < v {
            let len = self.chunk_vocab.min(v - start);
            let w_c = w.narrow(0, start, len)?;
            let p = hs.matmul(&w_c.t()?)?.broadcast_sub(&lse)?.exp()?;
            let d = p.broadcast_mul(&neg_g)?; // −g·p, (n, len)
            grad_w.push(d.t()?.matmul(&hs)?);
            start += len;
        }
        let grad_w = Tensor::cat(&grad_w, 0)?.index_add(targets, &hs.broadcast_mul(&g)?, 0)?;
        Ok((Some(grad_h), Some(grad_w)))
    }
}

/// log π(target_i) = log softmax(hidden_i · Wᵀ / T)\[target_i\] for every row, as one graph node
/// whose memory stays O(chunk × vocab): neither pass holds the whole (n × vocab) logits.
///
/// # Shapes
/// `hidden`: (n, h); `weight`: (v, h); `targets`: (n) u32 → (n).
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    head_logprobs_chunked(hidden, weight, targets, temperature, HeadChunks::default())
}

/// [`head_logprobs`] with explicit chunk sizes.
///
/// # Shapes
/// `hidden`: (n, h); `weight`: (v, h); `targets`: (n) u32 → (n).
pub fn head_logprobs_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunks: HeadChunks,
) -> candle_core::Result<Tensor> {
    if chunks.rows == 0 || chunks.vocab == 0 {
        candle_core::bail!("head chunks must be positive, got {chunks:?}");
    }
    if !on_cpu(hidden) {
        return head_logprobs_composed(hidden, weight, targets, temperature);
    }
    let hidden = hidden.contiguous()?;
    let targets = targets.contiguous()?;
    let backward = hidden.track_op() || weight.track_op();
    let (value, lse, expected) = head_forward(
        &hidden.detach(),
        &weight.detach(),
        &targets,
        temperature,
        chunks.rows,
        backward,
    )?;
    let Some(expected) = expected else {
        return Ok(value);
    };
    hidden.apply_op2(
        weight,
        HeadOp {
            targets,
            chunk_vocab: chunks.vocab,
            temperature,
            lse,
            expected,
            value: Precomputed::new(value),
        },
    )
}
