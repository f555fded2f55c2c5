//! Attention over packed rows: a row holds several independent segments (a prompt and the
//! completions that share it, or one sequence), each attending only within itself under its
//! own mask. Work and memory grow with Σ len² over the segments, not with the row length².

use super::{attention_composed, attention_probs, on_cpu, Precomputed};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, D};

/// One attention segment of a packed batch: positions `start..start + len` of row `row` attend
/// only to each other, under `mask`. Positions of a row outside every segment (padding) get a
/// zero output and pass no gradient.
#[derive(Debug, Clone)]
pub struct AttnSegment {
    /// Batch row.
    pub row: usize,
    /// First position in the row.
    pub start: usize,
    /// Positions in the segment (at least one).
    pub len: usize,
    /// Additive mask (1, 1, 1, len, len): 0 where query i may see key j, −∞ elsewhere. Every
    /// query must see at least one key (itself, in a causal mask).
    pub mask: Tensor,
}

/// Checks that the segments are sorted by (row, start), inside a (b, s) batch, non-empty,
/// non-overlapping and carry a mask of their size.
fn check(segs: &[AttnSegment], b: usize, s: usize) -> candle_core::Result<()> {
    let mut end_of_prev: Option<(usize, usize)> = None;
    for (i, seg) in segs.iter().enumerate() {
        if seg.len == 0 || seg.row >= b || seg.start + seg.len > s {
            candle_core::bail!(
                "attention segment {i} (row {}, positions {}..{}) is empty or outside the \
                 ({b}, {s}) batch",
                seg.row,
                seg.start,
                seg.start + seg.len
            );
        }
        if let Some((row, end)) = end_of_prev {
            if seg.row < row || (seg.row == row && seg.start < end) {
                candle_core::bail!(
                    "attention segment {i} overlaps or precedes the one before it (segments \
                     must be sorted by row and position)"
                );
            }
        }
        if seg.mask.dims() != [1, 1, 1, seg.len, seg.len] {
            candle_core::bail!(
                "attention segment {i} has {} positions but a mask of shape {:?}",
                seg.len,
                seg.mask.dims()
            );
        }
        end_of_prev = Some((seg.row, seg.start + seg.len));
    }
    Ok(())
}

/// The segment's positions of `t` (b, heads, s, d) → (1, heads, len, d), contiguous.
fn slice(t: &Tensor, seg: &AttnSegment) -> candle_core::Result<Tensor> {
    t.narrow(0, seg.row, 1)?
        .narrow(2, seg.start, seg.len)?
        .contiguous()
}

/// (1, nh, len, d) → (1, nkv, rep·len, d): the query heads that share a key head folded into
/// the query axis (head h uses key head h / rep).
fn fold(q: &Tensor, nkv: usize) -> candle_core::Result<Tensor> {
    let (_, nh, len, d) = q.dims4()?;
    q.reshape((1, nkv, (nh / nkv) * len, d))
}

/// Places per-segment pieces (1, heads, len, d) at their rows and positions of a zero
/// (b, heads, s, d) tensor. Differentiable in the pieces.
fn assemble(
    pieces: &[Tensor],
    segs: &[AttnSegment],
    (b, heads, s, d): (usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let zeros = |n: usize| Tensor::zeros((1, heads, n, d), dtype, device);
    let mut rows = Vec::with_capacity(b);
    let mut k = 0;
    for r in 0..b {
        let mut parts = Vec::new();
        let mut at = 0;
        while k < segs.len() && segs[k].row == r {
            if segs[k].start > at {
                parts.push(zeros(segs[k].start - at)?);
            }
            parts.push(pieces[k].clone());
            at = segs[k].start + segs[k].len;
            k += 1;
        }
        if at < s {
            parts.push(zeros(s - at)?);
        }
        rows.push(match parts.len() {
            1 => parts.swap_remove(0),
            _ => Tensor::cat(&parts, 2)?,
        });
    }
    match rows.len() {
        1 => Ok(rows.swap_remove(0)),
        _ => Tensor::cat(&rows, 0),
    }
}

fn dims(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, nh, s, d) = q.dims4()?;
    let (kb, nkv, ks, kd) = k.dims4()?;
    if (kb, ks, kd) != (b, s, d) || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "segment attention: q {:?}, k {:?} and v {:?} do not fit (b, heads, s, d) with \
             query heads a multiple of key heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok((b, nh, nkv, s, d))
}

/// The forward value on detached inputs (no graph): one attention per segment.
fn forward_value(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segs: &[AttnSegment],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, nh, nkv, s, d) = dims(q, k, v)?;
    check(segs, b, s)?;
    let mut pieces = Vec::with_capacity(segs.len());
    for seg in segs {
        let q_s = fold(&slice(q, seg)?, nkv)?;
        let p = attention_probs(&q_s, &slice(k, seg)?, Some(&seg.mask), scale)?;
        pieces.push(p.matmul(&slice(v, seg)?)?.reshape((1, nh, seg.len, d))?);
    }
    assemble(&pieces, segs, (b, nh, s, d), q.dtype(), q.device())
}

/// The composed segment attention: per segment [`attention_composed`] on slices of the inputs,
/// placed back by concatenation (candle's autograd differentiates it).
///
/// # Shapes
/// `q`: (b, nh, s, d); `k`, `v`: (b, nkv, s, d) → (b, nh, s, d).
pub fn segment_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segs: &[AttnSegment],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, nh, nkv, s, d) = dims(q, k, v)?;
    check(segs, b, s)?;
    let mut pieces = Vec::with_capacity(segs.len());
    for seg in segs {
        let q_s = fold(&slice(q, seg)?, nkv)?;
        let y = attention_composed(
            &q_s,
            &slice(k, seg)?,
            &slice(v, seg)?,
            Some(&seg.mask),
            scale,
        )?;
        pieces.push(y.reshape((1, nh, seg.len, d))?);
    }
    assemble(&pieces, segs, (b, nh, s, d), q.dtype(), q.device())
}

struct SegmentAttentionOp {
    segs: Vec<AttnSegment>,
    scale: f64,
    value: Precomputed,
}

impl CustomOp3 for SegmentAttentionOp {
    fn name(&self) -> &'static str {
        "segment-attention-diff"
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
        // Per segment, as the attention op's backward: P recomputed, dv = Pᵀ·g, dP = g·vᵀ,
        // dS = P·(dP − Σ dP·P), dq = dS·k·scale, dk = dSᵀ·q·scale.
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), g.detach());
        let (b, nh, nkv, s, d) = dims(&q, &k, &v)?;
        let n = self.segs.len();
        let (mut dqs, mut dks, mut dvs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for seg in &self.segs {
            let q_s = fold(&slice(&q, seg)?, nkv)?;
            let (k_s, v_s) = (slice(&k, seg)?, slice(&v, seg)?);
            let g_s = fold(&slice(&g, seg)?, nkv)?;
            let p = attention_probs(&q_s, &k_s, Some(&seg.mask), self.scale)?;
            dvs.push(p.t()?.matmul(&g_s)?);
            let dp = g_s.matmul(&v_s.t()?)?;
            let dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = (dp.broadcast_sub(&dot)? * p)?;
            dqs.push((ds.matmul(&k_s)? * self.scale)?.reshape((1, nh, seg.len, d))?);
            dks.push((ds.t()?.matmul(&q_s)? * self.scale)?);
        }
        let (dtype, device) = (q.dtype(), q.device());
        let dq = assemble(&dqs, &self.segs, (b, nh, s, d), dtype, device)?;
        let dk = assemble(&dks, &self.segs, (b, nkv, s, d), dtype, device)?;
        let dv = assemble(&dvs, &self.segs, (b, nkv, s, d), dtype, device)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Attention within each segment of a packed batch as one graph node (on the CPU; the composed
/// form elsewhere), keeping no (positions × keys) matrix: the backward recomputes each
/// segment's probabilities. Positions outside every segment get zeros. No gradient reaches the
/// masks.
///
/// # Shapes
/// `q`: (b, nh, s, d); `k`, `v`: (b, nkv, s, d) → (b, nh, s, d).
pub fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segs: &[AttnSegment],
    scale: f64,
) -> candle_core::Result<Tensor> {
    if !on_cpu(q) {
        return segment_attention_composed(q, k, v, segs, scale);
    }
    let value = forward_value(&q.detach(), &k.detach(), &v.detach(), segs, scale)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(value);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(
        &k,
        &v,
        SegmentAttentionOp {
            segs: segs
                .iter()
                .map(|s| AttnSegment {
                    mask: s.mask.detach(),
                    ..s.clone()
                })
                .collect(),
            scale,
            value: Precomputed::new(value),
        },
    )
}
