//! AdamW whose state can be saved and restored: the same update as candle-nn 0.11.1's
//! `AdamW`, bit for bit, with the moments exposed for checkpoints.

use crate::error::{LearnerError, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::ParamsAdamW;
use std::collections::HashMap;

/// One parameter and its two moment estimates (same shape, dtype and device).
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW with decoupled weight decay over named [`Var`]s.
///
/// The step reproduces candle-nn 0.11.1's `AdamW` exactly (the same formula and the same order
/// of tensor operations), so swapping one for the other changes no bit of the parameters; unlike
/// candle's, the moments and the step count can be read ([`AdamW::state_tensors`]) and restored
/// ([`AdamW::load_state`]).
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step_t: u64,
    params: ParamsAdamW,
}

impl AdamW {
    /// An optimizer over `vars` (name, variable) with zero moments. Like candle's, it skips
    /// variables whose dtype is not a float.
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !var.dtype().is_float() {
                continue;
            }
            let m = Tensor::zeros(var.shape(), var.dtype(), var.device())?;
            let v = Tensor::zeros(var.shape(), var.dtype(), var.device())?;
            slots.push(Slot { name, var, m, v });
        }
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// The learning rate of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate of the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Steps taken so far (the `t` of the bias corrections).
    pub fn step_count(&self) -> u64 {
        self.step_t
    }

    /// One update of every variable that has a gradient in `grads` (the others, and their
    /// moments, are left as they are; the step count advances regardless, as in candle).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        // Operation for operation the body of candle-nn 0.11.1 `impl Optimizer for AdamW`.
        self.step_t += 1;
        let lr = self.params.lr;
        let lambda = self.params.weight_decay;
        let lr_lambda = lr * lambda;
        let beta1 = self.params.beta1;
        let beta2 = self.params.beta2;
        // candle raises to `step_t as i32`; saturate instead of wrapping (2^31 steps is
        // unreachable, and β^t underflowed to 0 long before).
        let t = i32::try_from(self.step_t).unwrap_or(i32::MAX);
        let scale_m = 1f64 / (1f64 - beta1.powi(t));
        let scale_v = 1f64 / (1f64 - beta2.powi(t));
        for slot in &mut self.slots {
            let theta = &slot.var;
            if let Some(g) = grads.get(theta.as_tensor()) {
                let next_m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
                let next_v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted_grad = (m_hat / (v_hat.sqrt()? + self.params.eps)?)?;
                let next_theta = (next_theta - (adjusted_grad * lr)?)?;
                // Detached: the gradient may carry its autograd graph, and a moment that kept
                // it would chain every step's graph to the next (candle copies into a `Var`).
                slot.m = next_m.detach();
                slot.v = next_v.detach();
                theta.set(&next_theta)?;
            }
        }
        Ok(())
    }

    /// The moments, named `m.<param>` (first) and `v.<param>` (second), in parameter order.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("m.{}", s.name), s.m.clone()));
            out.push((format!("v.{}", s.name), s.v.clone()));
        }
        out
    }

    /// Restores the step count and the moments from `tensors` (as [`AdamW::state_tensors`]
    /// names them). Every expected tensor must be present with the parameter's shape and dtype,
    /// and no other may be; on any mismatch nothing changes and the error names the tensor.
    pub fn load_state(&mut self, step_t: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mismatch = |reason: String| LearnerError::OptimizerState(reason);
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut pair = Vec::with_capacity(2);
            for key in [format!("m.{}", s.name), format!("v.{}", s.name)] {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| mismatch(format!("tensor {key} is missing")))?;
                if t.dims() != s.var.dims() {
                    return Err(mismatch(format!(
                        "tensor {key} has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                if t.dtype() != s.var.dtype() {
                    return Err(mismatch(format!(
                        "tensor {key} has dtype {:?}, the parameter has {:?}",
                        t.dtype(),
                        s.var.dtype()
                    )));
                }
                pair.push(t.to_device(s.var.device())?.detach());
            }
            loaded.push(pair);
        }
        if tensors.len() != 2 * self.slots.len() {
            let mut extra: Vec<&str> = tensors
                .keys()
                .filter(|k| {
                    !self.slots.iter().any(|s| {
                        k.strip_prefix("m.").or_else(|| k.strip_prefix("v.")) == Some(&s.name)
                    })
                })
                .map(String::as_str)
                .collect();
            extra.sort_unstable();
            return Err(mismatch(format!(
                "unexpected tensors {extra:?} (the optimizer has {} parameters)",
                self.slots.len()
            )));
        }
        for (s, pair) in self.slots.iter_mut().zip(loaded) {
            let [m, v]: [Tensor; 2] = pair
                .try_into()
                .map_err(|_| mismatch("internal: moment pair".into()))?;
            s.m = m;
            s.v = v;
        }
        self.step_t = step_t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Optimizer;

    fn params() -> ParamsAdamW {
        ParamsAdamW {
            lr: 3e-3,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
        }
    }

    /// Three fresh variables (the same values on every call).
    fn vars() -> Result<Vec<(String, Var)>> {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[4, 3], &[7], &[2, 2, 5]];
        let mut out = Vec::new();
        for (i, shape) in shapes.iter().enumerate() {
            // A fixed pseudo-random fill (no RNG state shared between the two runs).
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|k| ((k as f32 + 1.0) * (i as f32 + 1.7) * 12.9898).sin() * 3.0)
                .collect();
            let t = Tensor::from_vec(data, *shape, &dev)?;
            out.push((format!("p{i}"), Var::from_tensor(&t)?));
        }
        Ok(out)
    }

    #[test]
    fn matches_candle_adamw_bit_for_bit() -> Result<()> {
        let ours_vars = vars()?;
        let theirs_vars = vars()?;
        let mut ours = AdamW::new(ours_vars.clone(), params())?;
        let mut theirs = candle_nn::AdamW::new(
            theirs_vars.iter().map(|(_, v)| v.clone()).collect(),
            params(),
        )?;
        for step in 0..3 {
            let (mut g_ours, mut g_theirs) = (GradStore::default(), GradStore::default());
            for (i, ((_, a), (_, b))) in ours_vars.iter().zip(&theirs_vars).enumerate() {
                if step == 1 && i == 1 {
                    // No gradient for one variable on one step: both must leave it alone.
                    continue;
                }
                let g = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu)?;
                g_ours.insert(a.as_tensor(), g.clone());
                g_theirs.insert(b.as_tensor(), g);
            }
            let lr = 3e-3 * (step + 1) as f64;
            ours.set_learning_rate(lr);
            theirs.set_learning_rate(lr);
            ours.step(&g_ours)?;
            theirs.step(&g_theirs)?;
        }
        assert_eq!(ours.step_count(), 3);
        for ((name, a), (_, b)) in ours_vars.iter().zip(&theirs_vars) {
            let a: Vec<u32> = a
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let b: Vec<u32> = b
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(a, b, "parameter {name} differs from candle's AdamW");
        }
        Ok(())
    }

    #[test]
    fn state_round_trips_and_mismatches_are_named() -> Result<()> {
        let vs = vars()?;
        let mut opt = AdamW::new(vs.clone(), params())?;
        let mut g = GradStore::default();
        for (_, v) in &vs {
            g.insert(
                v.as_tensor(),
                Tensor::ones(v.shape(), DType::F32, &Device::Cpu)?,
            );
        }
        opt.step(&g)?;
        let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        assert_eq!(state.len(), 6);
        assert!(state.contains_key("m.p0") && state.contains_key("v.p2"));

        let mut fresh = AdamW::new(vars()?, params())?;
        fresh.load_state(1, &state)?;
        assert_eq!(fresh.step_count(), 1);
        for ((n1, a), (n2, b)) in fresh.state_tensors().iter().zip(opt.state_tensors().iter()) {
            assert_eq!(n1, n2);
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
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
}
