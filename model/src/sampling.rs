//! Sampling from logits, returning the log-probability of the token under the distribution
//! actually sampled from (after temperature and any truncation).

use crate::error::{ModelError, Result};
use protocol::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampling {
    /// Always the most likely token; its recorded log-prob is 0 (a point mass).
    Greedy,
    /// Sample from softmax(logits / temperature), optionally truncated (see
    /// [`SamplingParams`] for the truncation rule and the log-prob recorded under it).
    Sample(SamplingParams),
}

impl Default for Sampling {
    fn default() -> Self {
        Self::Sample(SamplingParams::default())
    }
}

impl Sampling {
    /// Plain temperature sampling (no truncation: importance weights stay unbiased).
    pub fn temperature(temperature: f32) -> Self {
        Self::Sample(SamplingParams::temperature(temperature))
    }

    /// Checks the parameters.
    pub fn validate(self) -> Result<Self> {
        if let Self::Sample(p) = self {
            p.validate()
                .map_err(|e| ModelError::InvalidSampling(e.to_string()))?;
        }
        Ok(self)
    }

    /// Whether the sampled distribution is the full tempered softmax (no top-p / top-k).
    pub fn is_untruncated(&self) -> bool {
        matches!(self, Self::Sample(p) if !p.is_truncated())
    }
}

/// A seeded sampler for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

/// Mixes a run seed with stream indices into an independent per-sequence seed (splitmix64).
pub fn stream_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Sampler {
    /// A sampler with its own RNG stream.
    pub fn new(sampling: Sampling, seed: u64) -> Result<Self> {
        Ok(Self {
            sampling: sampling.validate()?,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// How this sampler chooses tokens.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// Draws one token from `logits` (one row, length vocab) and returns it with its
    /// log-probability under the distribution sampled from.
    pub fn sample(&mut self, logits: &[f32]) -> Result<(u32, f32)> {
        let u = match self.sampling {
            Sampling::Greedy => 0.0,
            Sampling::Sample(_) => self.next_uniform(),
        };
        self.sample_with(logits, u)
    }

    /// The uniform in [0, 1) that the next [`Sampler::sample`] of a tempered draw would use
    /// (advances the stream). A draw made elsewhere (on the model's device) takes its uniform
    /// from here, so that each sequence keeps its own stream wherever its tokens are drawn.
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.random()
    }

    /// As [`Sampler::sample`] with the uniform `u` given (ignored by greedy decoding).
    pub fn sample_with(&self, logits: &[f32], u: f64) -> Result<(u32, f32)> {
        check_logits(logits)?;
        match self.sampling {
            Sampling::Greedy => {
                let (best, _) =
                    logits
                        .iter()
                        .enumerate()
                        .fold((0usize, f32::NEG_INFINITY), |acc, (i, &x)| {
                            if x > acc.1 {
                                (i, x)
                            } else {
                                acc
                            }
                        });
                Ok((best as u32, 0.0))
            }
            Sampling::Sample(p) => {
                let inv_t = 1.0 / f64::from(p.temperature);
                let top_p = f64::from(p.top_p);
                // A cut-off at or above the vocabulary keeps every token (u32 -> usize widens).
                let top_k = p.top_k as usize;
                let scaled = |i: usize| logits[i] as f64 * inv_t;
                let truncated = top_k > 0 && top_k < logits.len() || top_p < 1.0;
                let mut cand: Vec<usize> = if truncated {
                    let mut idx: Vec<usize> = (0..logits.len()).collect();
                    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
                    if top_k > 0 && top_k < idx.len() {
                        idx.select_nth_unstable_by(top_k - 1, desc);
                        idx.truncate(top_k);
                    }
                    idx.sort_unstable_by(desc);
                    idx
                } else {
                    Vec::new()
                };
                if top_p < 1.0 {
                    let max = scaled(cand[0]);
                    let total: f64 = cand.iter().map(|&i| (scaled(i) - max).exp()).sum();
                    let mut acc = 0.0;
                    let mut keep = cand.len();
                    for (n, &i) in cand.iter().enumerate() {
                        acc += (scaled(i) - max).exp() / total;
                        if acc >= top_p {
                            keep = n + 1;
                            break;
                        }
                    }
                    cand.truncate(keep);
                }
                if truncated {
                    draw(cand.iter().copied(), scaled, u)
                } else {
                    draw(0..logits.len(), scaled, u)
                }
            }
        }
    }
}

/// Refuses empty logits and NaN logits.
fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(ModelError::InvalidInput("empty logits".into()));
    }
    if let Some(i) = logits.iter().position(|x| x.is_nan()) {
        return Err(ModelError::InvalidInput(format!("logit {i} is NaN")));
    }
    Ok(())
}

/// Inverse-CDF draw over `support` with weights exp(scaled(i)); `u` is uniform in [0, 1).
fn draw(
    support: impl Iterator<Item = usize> + Clone,
    scaled: impl Fn(usize) -> f64,
    u: f64,
) -> Result<(u32, f32)> {
    let max = support
        .clone()
        .map(&scaled)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return Err(ModelError::InvalidInput("all logits are -inf".into()));
    }
    let total: f64 = support.clone().map(|i| (scaled(i) - max).exp()).sum();
    let lse = max + total.ln();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = None;
    for i in support {
        let p = (scaled(i) - max).exp();
        if p > 0.0 {
            last = Some(i);
        }
        acc += p;
        if acc > target {
            return Ok((i as u32, (scaled(i) - lse) as f32));
        }
    }
    // Rounding can leave the target just above the final sum: take the last token with mass.
    let i = last.ok_or_else(|| ModelError::InvalidInput("no token has probability mass".into()))?;
    Ok((i as u32, (scaled(i) - lse) as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freqs(sampling: Sampling, logits: &[f32], n: usize) -> (Vec<f64>, Vec<f32>) {
        let mut s = Sampler::new(sampling, 3).unwrap();
        let mut counts = vec![0.0; logits.len()];
        let mut lp = vec![f32::NAN; logits.len()];
        for _ in 0..n {
            let (t, l) = s.sample(logits).unwrap();
            counts[t as usize] += 1.0 / n as f64;
            lp[t as usize] = l;
        }
        (counts, lp)
    }

    #[test]
    fn temperature_sampling_matches_softmax_and_reports_its_logprob() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let t = f64::from(0.7f32);
        let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
        let (f, lp) = freqs(Sampling::temperature(t as f32), &logits, 40_000);
        for i in 0..4 {
            let p = (logits[i] as f64 / t).exp() / z;
            assert!((f[i] - p).abs() < 0.01, "token {i}: {} vs {p}", f[i]);
            assert!((lp[i] as f64 - p.ln()).abs() < 1e-5);
        }
    }

    #[test]
    fn top_k_and_top_p_truncate_and_renormalise() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let (f, lp) = freqs(
            Sampling::Sample(SamplingParams {
                top_k: 2,
                ..SamplingParams::default()
            }),
            &logits,
            20_000,
        );
        assert_eq!(f[2] + f[3], 0.0);
        let p0 = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((lp[0] as f64 - p0.ln()).abs() < 1e-5);
        // softmax([3,2,1,0]) = [.644, .237, .087, .032]: top_p 0.85 keeps the first two.
        let (f, _) = freqs(
            Sampling::Sample(SamplingParams {
                top_p: 0.85,
                ..SamplingParams::default()
            }),
            &logits,
            20_000,
        );
        assert_eq!(f[2] + f[3], 0.0);
        assert!(f[1] > 0.2);
    }

    #[test]
    fn greedy_and_bad_parameters() {
        let mut s = Sampler::new(Sampling::Greedy, 0).unwrap();
        assert_eq!(s.sample(&[0.1, 5.0, 2.0]).unwrap(), (1, 0.0));
        assert!(s.sample(&[0.1, f32::NAN]).is_err());
        assert!(Sampler::new(Sampling::temperature(0.0), 0).is_err());
        assert!(Sampler::new(
            Sampling::Sample(SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            }),
            0
        )
        .is_err());
    }
}
