//! Composition: weighted sums and gates.

use serde_json::Value as Json;

use crate::error::Result;
use crate::reward::{Reward, Sample, Score};

/// `Σ weight_i · reward_i`. A sample fails when any term fails on it.
pub struct WeightedSum {
    terms: Vec<(f64, Box<dyn Reward>)>,
}

impl WeightedSum {
    /// A sum of weighted terms (weights are validated by the spec builder).
    pub fn new(terms: Vec<(f64, Box<dyn Reward>)>) -> Self {
        Self { terms }
    }
}

impl std::fmt::Debug for WeightedSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w: Vec<f64> = self.terms.iter().map(|t| t.0).collect();
        f.debug_struct("WeightedSum").field("weights", &w).finish()
    }
}

impl Reward for WeightedSum {
    fn score(&self, sample: &Sample) -> Result<Score> {
        self.score_batch(std::slice::from_ref(sample))
            .pop()
            .unwrap_or_else(|| Ok(Score::new(0.0)))
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<Score>> {
        let mut out: Vec<Result<Score>> = samples.iter().map(|_| Ok(Score::new(0.0))).collect();
        let mut parts: Vec<Vec<Json>> = vec![Vec::with_capacity(self.terms.len()); samples.len()];
        for (weight, reward) in &self.terms {
            let results = reward.score_batch(samples);
            for ((acc, part), r) in out.iter_mut().zip(parts.iter_mut()).zip(results) {
                let Ok(total) = acc else { continue };
                match r {
                    Ok(s) => {
                        total.value += weight * s.value;
                        part.push(Json::from(s.value));
                        if total.extracted.is_none() {
                            total.extracted = s.extracted;
                            total.matched_by = s.matched_by;
                        }
                    }
                    Err(e) => *acc = Err(e),
                }
            }
        }
        for (acc, part) in out.iter_mut().zip(parts) {
            if let Ok(total) = acc {
                total.details.insert("terms".into(), Json::Array(part));
            }
        }
        out.into_iter()
            .map(|r| r.and_then(Score::checked))
            .collect()
    }
}

/// `reward` when `gate` scores at least `threshold`, else `otherwise` (e.g. correctness
/// counts only when the format is right). `reward` is only evaluated on samples that pass.
pub struct Gate {
    gate: Box<dyn Reward>,
    reward: Box<dyn Reward>,
    threshold: f64,
    otherwise: f64,
}

impl Gate {
    /// A gate (values are validated by the spec builder).
    pub fn new(
        gate: Box<dyn Reward>,
        reward: Box<dyn Reward>,
        threshold: f64,
        otherwise: f64,
    ) -> Self {
        Self {
            gate,
            reward,
            threshold,
            otherwise,
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("threshold", &self.threshold)
            .field("otherwise", &self.otherwise)
            .finish()
    }
}

impl Reward for Gate {
    fn score(&self, sample: &Sample) -> Result<Score> {
        self.score_batch(std::slice::from_ref(sample))
            .pop()
            .unwrap_or_else(|| Ok(Score::new(self.otherwise)))
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<Score>> {
        let gates = self.gate.score_batch(samples);
        let passing: Vec<usize> = gates
            .iter()
            .enumerate()
            .filter(|(_, g)| matches!(g, Ok(s) if s.value >= self.threshold))
            .map(|(i, _)| i)
            .collect();
        let subset: Vec<Sample> = passing.iter().map(|&i| samples[i].clone()).collect();
        let mut inner = self.reward.score_batch(&subset).into_iter();
        let mut next_pass = passing.iter().peekable();
        gates
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let g = g?;
                let mut s = if next_pass.peek() == Some(&&i) {
                    next_pass.next();
                    inner.next().unwrap_or_else(|| {
                        Err(crate::RewardError::Module(
                            "the gated reward returned fewer results than samples".into(),
                        ))
                    })?
                } else {
                    Score::new(self.otherwise)
                };
                s.details.insert("gate".into(), Json::from(g.value));
                s.checked()
            })
            .collect()
    }
}
