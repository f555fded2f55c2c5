//! The adapted frozen linear layer of LoRA training as one graph node:
//! `y = x Wᵀ + s·(x Aᵀ) Bᵀ`, W frozen, A and B trained.
//!
//! Composed of candle ops, the adapter costs far more than its FLOPs: its output is added to
//! the base's in a separate (rows × out) pass, and in the backward pass each of those tensors
//! and the layer's input receive their gradients through fresh buffers that are zeroed and
//! summed, several single-threaded passes over (rows × out) and (rows × in) per layer, for a
//! low-rank product whose GEMMs are a few percent of the base's. Here the forward pass is two
//! GEMMs into one buffer (the second accumulating), and the backward pass computes
//! `dx = g W + s·(g B) A` the same way; the adapter's own gradients are small GEMMs:
//! `dA = s·(g B)ᵀ x`, `dB = s·gᵀ (x Aᵀ)`.

use super::{on_cpu, Precomputed};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};

/// The float types the node computes in (the learner's f32, and f64 for the exact tests).
trait Elem: WithDType {
    fn data(s: &CpuStorage) -> Option<&[Self]>;
}

impl Elem for f32 {
    fn data(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    fn data(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The data of a contiguous CPU tensor of type `T`, read under its storage lock, passed to `f`.
fn with_slice<T: Elem, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("frozen-lora-linear: {what} is not on the CPU");
    };
    let Some(v) = T::data(cpu) else {
        candle_core::bail!(
            "frozen-lora-linear: {what} is {:?}, not {:?}",
            t.dtype(),
            T::DTYPE
        );
    };
    let Some((o1, o2)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen-lora-linear: {what} is not contiguous");
    };
    f(&v[o1..o2])
}

/// `dst (m × n, row-major) = [dst +] lhs (m × k) · rhs`, where `rhs` is read as (k × n) with
/// the strides given (so a row-major (n × k) matrix passes as its transpose). The slices'
/// lengths are checked against the shapes before the GEMM touches them.
fn gemm_into<T: Elem>(
    dst: &mut [T],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) -> candle_core::Result<()> {
    let rhs_needed = if k == 0 || n == 0 {
        0
    } else {
        (k - 1) * rhs_rs + (n - 1) * rhs_cs + 1
    };
    if dst.len() != m * n || lhs.len() != m * k || rhs.len() < rhs_needed {
        candle_core::bail!(
            "frozen-lora-linear: GEMM ({m} × {k}) · ({k} × {n}) over buffers of {}, {} and {} values",
            lhs.len(),
            rhs.len(),
            dst.len()
        );
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `dst` holds m·n values written at row stride n, column stride 1; `lhs` holds m·k
    // read at row stride k, column stride 1; `rhs` holds at least (k−1)·rhs_rs + (n−1)·rhs_cs
    // + 1 values (all checked above), so every offset the GEMM forms is in bounds. `dst` is a
    // unique borrow and the inputs shared ones, so nothing else reads or writes `dst` while
    // the GEMM runs, and it does not overlap the inputs. With `read_dst` false the GEMM writes
    // every element of `dst` without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            parallelism,
        )
    };
    Ok(())
}

struct FrozenLoraOp {
    /// (out, in), detached.
    w: Tensor,
    /// `s·(x Aᵀ)`, (rows, r), detached: the forward's, kept for `dB`.
    u: Tensor,
    scale: f64,
    value: Precomputed,
}

impl CustomOp3 for FrozenLoraOp {
    fn name(&self) -> &'static str {
        "frozen-lora-linear"
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
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_tracked = x.track_op();
        let g = g.detach().contiguous()?;
        let (x, a, b) = (x.detach(), a.detach().contiguous()?, b.detach());
        let (rows, out) = g.dims2()?;
        let (r, inp) = a.dims2()?;
        // s·(g B): (rows, r), small.
        let gbs = (g.matmul(&b)? * self.scale)?.contiguous()?;
        // dA = s·(g B)ᵀ x: (r, in); dB = gᵀ · s·(x Aᵀ): (out, r). Small GEMMs.
        let da = gbs.t()?.matmul(&x)?;
        let db = g.t()?.matmul(&self.u)?;
        // The first layer's input comes from the frozen embedding: it needs no gradient.
        if !x_tracked {
            return Ok((None, Some(da), Some(db)));
        }
        let dx = match g.dtype() {
            DType::F32 => input_grad::<f32>(&g, &self.w, &gbs, &a, (rows, inp, out, r))?,
            _ => input_grad::<f64>(&g, &self.w, &gbs, &a, (rows, inp, out, r))?,
        };
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `dx = g W + s·(g B) A` in one buffer, `gbs` = s·(g B).
fn input_grad<T: Elem>(
    g: &Tensor,
    w: &Tensor,
    gbs: &Tensor,
    a: &Tensor,
    (rows, inp, out, r): (usize, usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let mut dx = vec![T::from_f64(0.0); rows * inp];
    with_slice::<T, _>(g, "the gradient", |gs| {
        with_slice(w, "the weight", |ws| {
            // W (out × in) row-major is the (k = out) × (n = in) operand as it lies.
            gemm_into(&mut dx, false, (rows, inp, out), gs, ws, (inp, 1))
        })
    })?;
    with_slice::<T, _>(gbs, "s·(g B)", |gb| {
        with_slice(a, "A", |as_| {
            gemm_into(&mut dx, true, (rows, inp, r), gb, as_, (inp, 1))
        })
    })?;
    Tensor::from_vec(dx, (rows, inp), g.device())
}

/// `y = x Wᵀ + u Bᵀ` in one buffer, `u` = s·(x Aᵀ).
fn output<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    u: &Tensor,
    b: &Tensor,
    (rows, inp, out, r): (usize, usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let mut y = vec![T::from_f64(0.0); rows * out];
    with_slice::<T, _>(x, "the input", |xs| {
        // Wᵀ: element (i, o) of the (in × out) operand is W[o, i]: row stride 1, column
        // stride in.
        with_slice(w, "the weight", |ws| {
            gemm_into(&mut y, false, (rows, out, inp), xs, ws, (1, inp))
        })
    })?;
    with_slice::<T, _>(u, "s·(x Aᵀ)", |us| {
        with_slice(b, "B", |bs| {
            gemm_into(&mut y, true, (rows, out, r), us, bs, (1, r))
        })
    })?;
    Tensor::from_vec(y, (rows, out), x.device())
}

/// `x Wᵀ + scale·(x Aᵀ) Bᵀ` for a frozen `w` and trained adapters `a`, `b`, as one graph node
/// (see the module's documentation), in f32 or f64. Off the CPU, or for other dtypes, the
/// composed ops.
///
/// # Shapes
/// `x`: (rows, in); `w`: (out, in); `a`: (r, in); `b`: (out, r) → (rows, out).
pub fn frozen_lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let w = w.detach();
    let dtype = x.dtype();
    let fused = matches!(dtype, DType::F32 | DType::F64)
        && [x, &w, a, b]
            .iter()
            .all(|t| on_cpu(t) && t.dtype() == dtype);
    if !fused {
        let base = x.matmul(&w.t()?)?;
        let low = (x.matmul(&a.t()?)? * scale)?;
        return base + low.matmul(&b.t()?)?;
    }
    let x = x.contiguous()?;
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if (w_in, a_in, b_out, b_r) != (inp, inp, out, r) {
        candle_core::bail!(
            "frozen-lora-linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        );
    }
    let w = w.contiguous()?;
    let (ad, bd) = (a.detach().contiguous()?, b.detach().contiguous()?);
    let u = (x.detach().matmul(&ad.t()?)? * scale)?.contiguous()?;
    let dims = (rows, inp, out, r);
    let value = match dtype {
        DType::F32 => output::<f32>(&x, &w, &u, &bd, dims)?,
        _ => output::<f64>(&x, &w, &u, &bd, dims)?,
    };
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(value);
    }
    x.apply_op3(
        a,
        b,
        FrozenLoraOp {
            w,
            u,
            scale,
            value: Precomputed::new(value),
        },
    )
}
