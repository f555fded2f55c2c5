//! Token draws on the model's device: the next token of every row chosen where the logits are,
//! so that only the chosen ids and their log-probs cross to the host (n numbers per step
//! instead of n × vocab logits).
//!
//! The rule is the host [`Sampler`](crate::Sampler)'s inverse-CDF draw over the tempered
//! softmax in token order, with each row's uniform taken from that row's own stream: on the
//! same logits and uniforms both pick the same token, up to float summation order (the device
//! sums in f32, the host in f64, so a uniform that falls within rounding of a boundary between
//! two tokens may pick either neighbour). candle's cumulative sum is a triangular matmul,
//! quadratic in the axis length, so the draw is two-level: the vocabulary is cut into blocks of
//! [`BLOCK`] tokens, a block is chosen from the cumulative block masses, then a token within
//! it. Truncated sampling (top-p, top-k) needs a sort and stays on the host.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};

/// Tokens per block of the two-level draw: 49,152 tokens make 192 blocks, so both cumulative
/// sums are small matmuls (192² and 256²).
pub const BLOCK: usize = 256;

/// One row's draw, or `None` where the row must be drawn on the host: a non-finite log-prob
/// (NaN logits, every logit −inf) or a rounding corner that landed on a token without mass.
/// The host draw then gives the exact answer, or the error the host gives for such logits.
pub type RowDraw = Option<(u32, f32)>;

/// Draws one token per row of `logits` (rows × vocab, any device, any float dtype) from
/// softmax(logits · `inv_t`) with `uniforms[r]` ∈ [0, 1) as row r's uniform, and returns each
/// token with its log-probability under that distribution.
pub fn draw_rows(logits: &Tensor, inv_t: f64, uniforms: &[f64]) -> Result<Vec<RowDraw>> {
    let (n, vocab) = logits.dims2()?;
    if uniforms.len() != n {
        return Err(ModelError::InvalidInput(format!(
            "{} uniforms for {n} rows of logits",
            uniforms.len()
        )));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if vocab == 0 {
        return Err(ModelError::InvalidInput("empty logits".into()));
    }
    let device = logits.device();
    let blocks = vocab.div_ceil(BLOCK);
    let mut scaled = (logits.to_dtype(DType::F32)? * inv_t)?;
    if blocks * BLOCK > vocab {
        // Padding tokens carry no mass: exp(−inf − max) = 0.
        let pad = Tensor::full(f32::NEG_INFINITY, (n, blocks * BLOCK - vocab), device)?;
        scaled = Tensor::cat(&[&scaled, &pad], 1)?;
    }
    let max = scaled.max_keepdim(1)?;
    let mass = scaled.broadcast_sub(&max)?.exp()?;
    let mass3 = mass.reshape((n, blocks, BLOCK))?;
    let block_mass = mass3.sum(2)?;
    let block_cdf = block_mass.cumsum(1)?;
    let total = block_cdf.narrow(1, blocks - 1, 1)?;
    // u < 1 in f64 can round to 1 in f32; keep the target below the total.
    let below_one = 1.0 - f32::EPSILON / 2.0;
    let u: Vec<f32> = uniforms
        .iter()
        .map(|&u| (u as f32).min(below_one))
        .collect();
    let target = Tensor::from_vec(u, (n, 1), device)?.mul(&total)?;
    // The chosen block: the number of blocks whose cumulative mass is at most the target.
    let block = count_le(&block_cdf, &target)?.minimum((blocks - 1) as f64)?;
    let block_idx = block.to_dtype(DType::U32)?;
    let before = block_cdf
        .gather(&block_idx, 1)?
        .sub(&block_mass.gather(&block_idx, 1)?)?;
    let within_idx = block_idx
        .reshape((n, 1, 1))?
        .broadcast_as((n, 1, BLOCK))?
        .contiguous()?;
    let within = mass3.gather(&within_idx, 1)?.reshape((n, BLOCK))?;
    let within_cdf = within.cumsum(1)?.broadcast_add(&before)?;
    let offset = count_le(&within_cdf, &target)?.minimum((BLOCK - 1) as f64)?;
    // Exact in f32: token ids stay far below 2^24.
    let token = ((block * BLOCK as f64)? + offset)?.to_dtype(DType::U32)?;
    let lse = total.log()?.add(&max)?;
    let logprob = scaled.gather(&token, 1)?.sub(&lse)?;
    let token_mass = mass.gather(&token, 1)?;
    let tokens = token.flatten_all()?.to_vec1::<u32>()?;
    let logprobs = logprob.flatten_all()?.to_vec1::<f32>()?;
    let masses = token_mass.flatten_all()?.to_vec1::<f32>()?;
    Ok(tokens
        .into_iter()
        .zip(logprobs)
        .zip(masses)
        .map(|((t, lp), m)| ((t as usize) < vocab && lp.is_finite() && m > 0.0).then_some((t, lp)))
        .collect())
}

/// Per row of `logits` (rows × vocab, any device): the index of the largest logit, the first
/// of equal ones. NaN logits are refused.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let logits = logits.to_dtype(DType::F32)?;
    let nan = logits.ne(&logits)?.to_dtype(DType::F32)?.sum_all()?;
    if nan.to_scalar::<f32>()? > 0.0 {
        return Err(ModelError::InvalidInput("a logit is NaN".into()));
    }
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Per row: how many entries of `cdf` (rows × k) are at most `target` (rows × 1), as f32.
fn count_le(cdf: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(cdf
        .broadcast_le(target)?
        .to_dtype(DType::F32)?
        .sum_keepdim(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Sampler, Sampling};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_logits(rows: usize, vocab: usize, seed: u64) -> (Vec<f32>, Tensor) {
        let mut rng = StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.random_range(-4.0f32..4.0))
            .collect();
        let t = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        (data, t)
    }

    #[test]
    fn device_draws_pick_the_host_samplers_tokens_for_the_same_uniforms() {
        // A vocabulary that is not a multiple of the block (padding in the last block), and
        // the default model's (exact blocks).
        for (vocab, rows) in [(1000usize, 64usize), (49_152, 16), (7, 40)] {
            let (data, logits) = random_logits(rows, vocab, vocab as u64);
            let t = 0.7f32;
            let sampler = Sampler::new(Sampling::temperature(t), 0).unwrap();
            let mut rng = StdRng::seed_from_u64(5);
            let u: Vec<f64> = (0..rows).map(|_| rng.random()).collect();
            let draws = draw_rows(&logits, 1.0 / f64::from(t), &u).unwrap();
            let mut same = 0;
            for (r, d) in draws.iter().enumerate() {
                let (tok, lp) = d.expect("finite logits draw on the device");
                let row = &data[r * vocab..(r + 1) * vocab];
                let (host_tok, host_lp) = sampler.sample_with(row, u[r]).unwrap();
                if tok == host_tok {
                    same += 1;
                    assert!((lp - host_lp).abs() < 1e-4, "row {r}: {lp} vs {host_lp}");
                } else {
                    // Only a rounding tie: neighbours in token order.
                    assert_eq!(tok.abs_diff(host_tok), 1, "row {r}");
                }
            }
            assert!(same + 1 >= rows, "vocab {vocab}: {same}/{rows} equal");
        }
    }

    #[test]
    fn device_draws_follow_the_tempered_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, f32::NEG_INFINITY];
        let t = 0.7;
        let rows = 20_000;
        let data: Vec<f32> = logits.iter().copied().cycle().take(rows * 5).collect();
        let tensor = Tensor::from_vec(data, (rows, 5), &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let u: Vec<f64> = (0..rows).map(|_| rng.random()).collect();
        let draws = draw_rows(&tensor, 1.0 / t, &u).unwrap();
        let z: f64 = logits[..4].iter().map(|&x| (x as f64 / t).exp()).sum();
        let mut counts = [0usize; 5];
        for d in &draws {
            let (tok, lp) = d.unwrap();
            counts[tok as usize] += 1;
            let p = (logits[tok as usize] as f64 / t).exp() / z;
            assert!((lp as f64 - p.ln()).abs() < 1e-5);
        }
        assert_eq!(counts[4], 0, "a −inf logit is never drawn");
        for i in 0..4 {
            let p = (logits[i] as f64 / t).exp() / z;
            let f = counts[i] as f64 / rows as f64;
            assert!((f - p).abs() < 0.01, "token {i}: {f} vs {p}");
        }
    }

    #[test]
    fn rows_without_a_finite_draw_go_to_the_host() {
        let data = vec![
            f32::NAN,
            0.0,
            1.0, // NaN logit
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY, // no mass
            0.0,
            0.0,
            0.0,
        ];
        let t = Tensor::from_vec(data, (3, 3), &Device::Cpu).unwrap();
        let d = draw_rows(&t, 1.0, &[0.5, 0.5, 0.5]).unwrap();
        assert_eq!(d[0], None);
        assert_eq!(d[1], None);
        let (tok, lp) = d[2].unwrap();
        assert_eq!(tok, 1);
        assert!((lp + 3f32.ln()).abs() < 1e-6);
        // The extremes of the uniform stay inside the support.
        let d = draw_rows(&t.narrow(0, 2, 1).unwrap(), 1.0, &[1.0 - 1e-17]).unwrap();
        assert_eq!(d[0].unwrap().0, 2);
        let d = draw_rows(&t.narrow(0, 2, 1).unwrap(), 1.0, &[0.0]).unwrap();
        assert_eq!(d[0].unwrap().0, 0);
        assert!(draw_rows(&t, 1.0, &[0.5]).is_err(), "one uniform per row");
    }

    #[test]
    fn argmax_takes_the_first_largest_and_refuses_nan() {
        let t =
            Tensor::from_vec(vec![0.1f32, 5.0, 5.0, 2.0, 1.0, 0.0], (2, 3), &Device::Cpu).unwrap();
        assert_eq!(argmax_rows(&t).unwrap(), vec![1, 0]);
        let t = Tensor::from_vec(vec![0.1f32, f32::NAN], (1, 2), &Device::Cpu).unwrap();
        assert!(argmax_rows(&t).is_err());
    }
}
