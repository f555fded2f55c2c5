//! The learner's AdamW through its public surface: gradient scaling folded into the step, the
//! global gradient norm, saved and restored state, rejected gradients, and (ignored) a timing
//! of one step at the default model's size.

#![allow(clippy::unwrap_used)]

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use learner::{AdamW, Result};
use std::collections::HashMap;

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 3e-3,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    }
}

/// Three fresh variables of `dtype` (the same values on every call).
fn vars(dtype: DType) -> Result<Vec<(String, Var)>> {
    let shapes: [&[usize]; 3] = [&[4, 3], &[7], &[2, 2, 5]];
    let mut out = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n)
            .map(|k| ((k as f64 + 1.0) * (i as f64 + 1.7) * 12.9898).sin() * 3.0)
            .collect();
        let t = Tensor::from_vec(data, *shape, &Device::Cpu)?.to_dtype(dtype)?;
        out.push((format!("p{i}"), Var::from_tensor(&t)?));
    }
    Ok(out)
}

/// Copies of `vars` (same names and values, new storage).
fn copy(vars: &[(String, Var)]) -> Result<Vec<(String, Var)>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect()
}

/// The gradient of `step` for every variable but the `skip`th, times `scale`, depending on
/// the step only (the same values for every set of variables).
fn grads(
    vars: &[(String, Var)],
    step: usize,
    skip: Option<usize>,
    scale: f64,
) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        if skip == Some(i) {
            continue;
        }
        let data: Vec<f64> = (0..v.elem_count())
            .map(|k| ((k as f64 + 0.5) * (i as f64 + 2.3) * (step as f64 + 1.1)).cos())
            .collect();
        let g = Tensor::from_vec(data, v.shape(), &Device::Cpu)?.to_dtype(v.dtype())?;
        let g = if scale == 1.0 { g } else { (g * scale)? };
        store.insert(v.as_tensor(), g);
    }
    Ok(store)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Raw bits of every parameter and moment (f32 and f64 alike, widened exactly to f64).
fn all_bits(vars: &[(String, Var)], opt: &AdamW) -> Result<Vec<(String, Vec<u64>)>> {
    let mut out = Vec::new();
    for (n, v) in vars {
        let bits = values(v.as_tensor())?.iter().map(|x| x.to_bits()).collect();
        out.push((n.clone(), bits));
    }
    for (n, t) in opt.state_tensors() {
        out.push((n, values(&t)?.iter().map(|x| x.to_bits()).collect()));
    }
    Ok(out)
}

/// `step_scaled(g, s)` and `step(s·g)` give equal parameters and moments (as values: the
/// tensor product `s·g` adds a zero, which can only flip the sign of a zero).
fn scale_folds(dtype: DType) -> Result<()> {
    let folded_vars = vars(dtype)?;
    let scaled_vars = vars(dtype)?;
    let mut folded = AdamW::new(folded_vars.clone(), params())?;
    let mut scaled = AdamW::new(scaled_vars.clone(), params())?;
    for (step, scale) in [0.25, 1.0, 3.5].into_iter().enumerate() {
        let skip = (step == 2).then_some(0);
        folded.step_scaled(&grads(&folded_vars, step, skip, 1.0)?, scale)?;
        scaled.step(&grads(&scaled_vars, step, skip, scale)?)?;
        let (a, b) = (
            all_bits(&folded_vars, &folded)?,
            all_bits(&scaled_vars, &scaled)?,
        );
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let x: Vec<f64> = x.iter().map(|&b| f64::from_bits(b)).collect();
            let y: Vec<f64> = y.iter().map(|&b| f64::from_bits(b)).collect();
            assert_eq!(x, y, "{dtype:?} step {step}: {name}");
        }
    }
    Ok(())
}

#[test]
fn grad_scale_folds_into_the_step_f32() -> Result<()> {
    scale_folds(DType::F32)
}

#[test]
fn grad_scale_folds_into_the_step_f64() -> Result<()> {
    scale_folds(DType::F64)
}

#[test]
fn non_finite_grad_scale_is_refused() -> Result<()> {
    let vs = vars(DType::F32)?;
    let mut opt = AdamW::new(vs.clone(), params())?;
    let err = opt
        .step_scaled(&grads(&vs, 0, None, 1.0)?, f64::NAN)
        .unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    assert_eq!(opt.step_count(), 0);
    Ok(())
}

#[test]
fn grad_norm_equals_the_tensor_computation() -> Result<()> {
    let dev = Device::Cpu;
    // Several blocks (600×500 > 2^18 elements), a transposed (non-contiguous) view, f64, and
    // bf16 (taken by tensor operations).
    let big = Tensor::randn(0f32, 1.0, (600, 500), &dev)?;
    let transposed = Tensor::randn(0f32, 1.0, (30, 17), &dev)?.t()?;
    assert!(!transposed.is_contiguous());
    let wide = Tensor::randn(0f64, 2.0, (3, 5, 7), &dev)?;
    let half = Tensor::randn(0f32, 1.0, 40, &dev)?.to_dtype(DType::BF16)?;
    let small = Tensor::new(&[3f32, -4.0], &dev)?;
    let all = [&big, &transposed, &wide, &half, &small];

    let mut reference = 0f64;
    for g in all {
        reference += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let reference = reference.sqrt();
    // Summation orders differ: labelled tolerance 1e-12 relative.
    let norm = AdamW::grad_norm(all)?;
    assert!(
        (norm - reference).abs() <= 1e-12 * reference,
        "{norm} vs {reference}"
    );
    // The learner's f32 computation (sqr().sum_all() per tensor) agrees to f32 rounding.
    let mut learner_sq = 0f64;
    for g in [&big, &transposed, &small] {
        learner_sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let ours = AdamW::grad_norm([&big, &transposed, &small])?;
    assert!(
        (ours - learner_sq.sqrt()).abs() <= 1e-5 * ours,
        "{ours} vs {learner_sq}"
    );

    assert_eq!(AdamW::grad_norm([&small])?, 5.0);
    assert_eq!(AdamW::grad_norm([])?, 0.0);
    // Independent of the thread count (blocks are added in a fixed order).
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(
        one.install(|| AdamW::grad_norm(all))?.to_bits(),
        norm.to_bits()
    );
    let nan = Tensor::new(&[1f32, f32::NAN], &dev)?;
    assert!(AdamW::grad_norm([&big, &nan])?.is_nan());
    Ok(())
}

/// A state saved after step 2 and loaded into a fresh optimizer (over copies of the
/// parameters) gives the same step 3, bit for bit.
fn resumes_bit_for_bit(dtype: DType) -> Result<()> {
    let vs = vars(dtype)?;
    let mut opt = AdamW::new(vs.clone(), params())?;
    for step in 0..2 {
        opt.set_learning_rate(1e-2 * (step + 1) as f64);
        opt.step_scaled(&grads(&vs, step, None, 1.0)?, 0.7)?;
    }
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let resumed_vars = copy(&vs)?;
    let mut resumed = AdamW::new(resumed_vars.clone(), params())?;
    resumed.load_state(opt.step_count(), &state)?;

    for (o, v) in [(&mut opt, &vs), (&mut resumed, &resumed_vars)] {
        o.set_learning_rate(5e-3);
        o.step_scaled(&grads(v, 2, Some(1), 1.0)?, 0.9)?;
    }
    assert_eq!(resumed.step_count(), 3);
    assert_eq!(all_bits(&resumed_vars, &resumed)?, all_bits(&vs, &opt)?);
    // The saved tensors are copies: the third step did not change them.
    assert_ne!(
        values(&state["m.p0"])?,
        values(&opt.state_tensors()[0].1)?,
        "state_tensors aliases the live moments"
    );
    Ok(())
}

#[test]
fn state_saved_after_step_2_resumes_bit_for_bit_f32() -> Result<()> {
    resumes_bit_for_bit(DType::F32)
}

#[test]
fn state_saved_after_step_2_resumes_bit_for_bit_f64() -> Result<()> {
    resumes_bit_for_bit(DType::F64)
}

#[test]
fn a_bad_gradient_changes_nothing() -> Result<()> {
    let vs = vars(DType::F32)?;
    let mut opt = AdamW::new(vs.clone(), params())?;
    opt.step(&grads(&vs, 0, None, 1.0)?)?;
    let before = all_bits(&vs, &opt)?;
    // p0 fine, p2 of the wrong shape: p0 must not move either.
    let mut g = grads(&vs, 1, Some(2), 1.0)?;
    g.insert(
        vs[2].1.as_tensor(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let err = opt.step(&g).unwrap_err().to_string();
    assert!(err.contains("p2") && err.contains("shape"), "{err}");
    let mut g = grads(&vs, 1, Some(2), 1.0)?;
    g.insert(
        vs[2].1.as_tensor(),
        Tensor::zeros((2, 2, 5), DType::F64, &Device::Cpu)?,
    );
    let err = opt.step(&g).unwrap_err().to_string();
    assert!(err.contains("p2") && err.contains("dtype"), "{err}");
    assert_eq!(opt.step_count(), 1);
    assert_eq!(all_bits(&vs, &opt)?, before);
    // A non-contiguous gradient is taken (copied contiguous first).
    let mut g = grads(&vs, 1, Some(0), 1.0)?;
    let t = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?.t()?;
    g.insert(vs[0].1.as_tensor(), t);
    opt.step(&g)?;
    assert_eq!(opt.step_count(), 2);
    Ok(())
}

#[test]
fn state_round_trips_and_mismatches_are_named() -> Result<()> {
    let vs = vars(DType::F32)?;
    let mut opt = AdamW::new(vs.clone(), params())?;
    opt.step(&grads(&vs, 0, None, 1.0)?)?;
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    assert_eq!(state.len(), 6);
    assert!(state.contains_key("m.p0") && state.contains_key("v.p2"));

    let mut fresh = AdamW::new(vars(DType::F32)?, params())?;
    fresh.load_state(1, &state)?;
    assert_eq!(fresh.step_count(), 1);
    for ((n1, a), (n2, b)) in fresh.state_tensors().iter().zip(opt.state_tensors().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(values(a)?, values(b)?);
    }

    let mut missing = state.clone();
    missing.remove("v.p1");
    let err = fresh
        .load_state(5, &missing)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("v.p1") && err.contains("missing"), "{err}");
    assert_eq!(fresh.step_count(), 1, "a failed load changes nothing");

    let mut wrong = state.clone();
    wrong.insert("m.p1".into(), Tensor::zeros(8, DType::F32, &Device::Cpu)?);
    let err = fresh
        .load_state(5, &wrong)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("m.p1") && err.contains("shape"), "{err}");

    let mut extra = state;
    extra.insert("m.p9".into(), Tensor::zeros(1, DType::F32, &Device::Cpu)?);
    let err = fresh
        .load_state(5, &extra)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("m.p9"), "{err}");
    Ok(())
}

/// SmolLM2-135M's parameter shapes: 272 tensors, 134,515,008 elements.
fn smollm2_135m_shapes() -> Vec<Vec<usize>> {
    let (h, kv, ff, layers, vocab) = (576, 192, 1536, 30, 49152);
    let mut shapes = vec![vec![vocab, h]];
    for _ in 0..layers {
        shapes.extend([
            vec![h, h],
            vec![kv, h],
            vec![kv, h],
            vec![h, h],
            vec![ff, h],
            vec![ff, h],
            vec![h, ff],
            vec![h],
            vec![h],
        ]);
    }
    shapes.push(vec![h]);
    shapes
}

/// Seconds per call of `f` on a pool of `threads` threads (one warm-up call, then `reps`).
fn seconds_per_call(threads: usize, reps: usize, mut f: impl FnMut() -> Result<()> + Send) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        f().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            f().unwrap();
        }
        t0.elapsed().as_secs_f64() / reps as f64
    })
}

/// One step at the default model's size (≈135M f32 parameters, ≈2.7 GB with gradients and
/// moments, twice for the reference): candle-nn's op-by-op AdamW (the old step, the same
/// operations) against the fused pass, on 1 and 2 rayon threads; and the learner's old
/// clipping (norm by `sqr().sum_all()`, scaled copies) + old step against `grad_norm` +
/// `step_scaled`.
#[test]
#[ignore = "timing; run: cargo test --release -p learner --test optim -- --ignored --nocapture"]
fn time_one_step_at_the_default_model_size() -> Result<()> {
    let shapes = smollm2_135m_shapes();
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let fill = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|k| (((k * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) * 1e-4)
            .collect()
    };
    let mut vars = Vec::new();
    let mut gs = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let n = s.iter().product();
        vars.push((
            format!("p{i}"),
            Var::from_vec(fill(n, i), s.as_slice(), &Device::Cpu)?,
        ));
        gs.push(Tensor::from_vec(
            fill(n, i + 1000),
            s.as_slice(),
            &Device::Cpu,
        )?);
    }
    println!("{} tensors, {total} parameters", vars.len());
    let store = |vars: &[(String, Var)]| {
        let mut store = GradStore::default();
        for ((_, v), g) in vars.iter().zip(&gs) {
            store.insert(v.as_tensor(), g.clone());
        }
        store
    };

    for threads in [1, 2] {
        let reference_vars = copy(&vars)?;
        let list = reference_vars.iter().map(|(_, v)| v.clone()).collect();
        let mut reference = candle_nn::AdamW::new(list, params())?;
        let grads = store(&reference_vars);
        let old = seconds_per_call(threads, 2, || Ok(reference.step(&grads)?));
        let old_apply = seconds_per_call(threads, 1, || {
            let mut sq = 0f64;
            for g in &gs {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            let scale = 1.0 / (sq.sqrt() + 1e-6);
            let mut scaled = GradStore::default();
            for ((_, v), g) in reference_vars.iter().zip(&gs) {
                scaled.insert(v.as_tensor(), (g * scale)?);
            }
            Ok(reference.step(&scaled)?)
        });
        drop((reference, grads, reference_vars));

        let mut fused = AdamW::new(vars.clone(), params())?;
        let grads = store(&vars);
        let new = seconds_per_call(threads, 5, || fused.step(&grads));
        let norm = seconds_per_call(threads, 5, || AdamW::grad_norm(&gs).map(|_| ()));
        let new_apply = seconds_per_call(threads, 5, || {
            let norm = AdamW::grad_norm(&gs)?;
            fused.step_scaled(&grads, 1.0 / (norm + 1e-6))
        });
        println!(
            "{threads} thread(s): step op-by-op {old:.3} s, fused {new:.3} s; \
             clip + step old {old_apply:.3} s, grad_norm {norm:.3} s + step_scaled {new_apply:.3} s"
        );
    }
    Ok(())
}
