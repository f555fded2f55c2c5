//! Layer plans: which decoder layers a forward pass runs.
//!
//! The full plan runs `0..L`. A nested plan keeps the first and last layers and drops
//! `k = round(r·L)` of the middle ones, chosen at random (seeded) or as one contiguous block.

use crate::error::{ModelError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The ordered list of decoder layer indices a forward pass runs. Always non-empty, strictly
/// increasing and within `0..num_layers`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawPlan", into = "RawPlan")]
pub struct LayerPlan {
    layers: Vec<usize>,
    num_layers: usize,
}

#[derive(Serialize, Deserialize)]
struct RawPlan {
    layers: Vec<usize>,
    num_layers: usize,
}

impl TryFrom<RawPlan> for LayerPlan {
    type Error = ModelError;
    fn try_from(raw: RawPlan) -> Result<Self> {
        LayerPlan::from_layers(raw.layers, raw.num_layers)
    }
}

impl From<LayerPlan> for RawPlan {
    fn from(plan: LayerPlan) -> Self {
        RawPlan {
            layers: plan.layers,
            num_layers: plan.num_layers,
        }
    }
}

/// How a nested plan chooses the layers it drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStrategy {
    /// A uniformly random subset of the middle layers (seeded).
    #[default]
    Random,
    /// One contiguous block of middle layers at a random offset (seeded).
    Contiguous,
}

impl std::str::FromStr for PlanStrategy {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "contiguous" => Ok(Self::Contiguous),
            other => Err(ModelError::InvalidPlan(format!(
                "unknown plan strategy `{other}` (expected random or contiguous)"
            ))),
        }
    }
}

impl LayerPlan {
    /// Every layer, in order.
    pub fn full(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).collect(),
            num_layers,
        }
    }

    /// A plan from an explicit list of layers to run.
    pub fn from_layers(layers: Vec<usize>, num_layers: usize) -> Result<Self> {
        if layers.is_empty() {
            return Err(ModelError::InvalidPlan(
                "a plan must run at least one layer".into(),
            ));
        }
        for (i, &l) in layers.iter().enumerate() {
            if l >= num_layers {
                return Err(ModelError::InvalidPlan(format!(
                    "layer {l} is out of range (the model has {num_layers} layers)"
                )));
            }
            if i > 0 {
                let prev = layers[i - 1];
                if prev == l {
                    return Err(ModelError::InvalidPlan(format!("layer {l} appears twice")));
                }
                if prev > l {
                    return Err(ModelError::InvalidPlan(format!(
                        "layers must be increasing, but {prev} comes before {l}"
                    )));
                }
            }
        }
        Ok(Self { layers, num_layers })
    }

    /// A plan that runs every layer except the listed ones (any order, no duplicates).
    pub fn skipping(skip: &[usize], num_layers: usize) -> Result<Self> {
        let mut sorted = skip.to_vec();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[0] == w[1] {
                return Err(ModelError::InvalidPlan(format!(
                    "layer {} is listed twice in the skip list",
                    w[0]
                )));
            }
        }
        if let Some(&l) = sorted.iter().find(|&&l| l >= num_layers) {
            return Err(ModelError::InvalidPlan(format!(
                "cannot skip layer {l}: the model has {num_layers} layers"
            )));
        }
        let layers = (0..num_layers)
            .filter(|l| sorted.binary_search(l).is_err())
            .collect();
        Self::from_layers(layers, num_layers)
    }

    /// A nested plan that drops `k` middle layers, keeping the first and last.
    pub fn nested(
        num_layers: usize,
        k: usize,
        strategy: PlanStrategy,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let middle = num_layers.saturating_sub(2);
        if k > middle {
            return Err(ModelError::InvalidPlan(format!(
                "cannot skip {k} layers: only {middle} middle layers exist (first and last are kept)"
            )));
        }
        if k == 0 {
            return Ok(Self::full(num_layers));
        }
        let skipped: Vec<usize> = match strategy {
            PlanStrategy::Random => rand::seq::index::sample(rng, middle, k)
                .into_iter()
                .map(|i| i + 1)
                .collect(),
            PlanStrategy::Contiguous => {
                let start = rng.random_range(1..=middle - k + 1);
                (start..start + k).collect()
            }
        };
        Self::skipping(&skipped, num_layers)
    }

    /// The layers to run, in order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Total layers of the model the plan is for.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Number of layers the plan runs.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Always false: a plan runs at least one layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Whether every layer runs.
    pub fn is_full(&self) -> bool {
        self.layers.len() == self.num_layers
    }

    /// The layers the plan skips, in order.
    pub fn skipped(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|l| self.layers.binary_search(l).is_err())
            .collect()
    }

    /// Checks the plan was made for a model with `num_layers` layers.
    pub fn check_for(&self, num_layers: usize) -> Result<()> {
        if self.num_layers != num_layers {
            return Err(ModelError::InvalidPlan(format!(
                "plan is for a {}-layer model, this model has {num_layers} layers",
                self.num_layers
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for LayerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_full() {
            return write!(f, "full ({} layers)", self.num_layers);
        }
        let skipped: Vec<String> = self.skipped().iter().map(|l| l.to_string()).collect();
        write!(
            f,
            "{}/{} layers, skipping {}",
            self.len(),
            self.num_layers,
            skipped.join(",")
        )
    }
}

/// The skip ratio r of a nested plan: fixed, or drawn uniformly per batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipRatio {
    /// The same r for every batch.
    Fixed(f64),
    /// r drawn uniformly from `[min, max]` for every batch.
    Range {
        /// Lower bound, inclusive.
        min: f64,
        /// Upper bound, inclusive.
        max: f64,
    },
}

impl SkipRatio {
    fn check(r: f64) -> Result<()> {
        if !(0.0..1.0).contains(&r) {
            return Err(ModelError::InvalidPlan(format!(
                "skip ratio {r} must be in [0, 1)"
            )));
        }
        Ok(())
    }

    /// Checks the ratio (or both bounds) lies in `[0, 1)` and `min <= max`.
    pub fn validate(self) -> Result<Self> {
        match self {
            Self::Fixed(r) => Self::check(r)?,
            Self::Range { min, max } => {
                Self::check(min)?;
                Self::check(max)?;
                if min > max {
                    return Err(ModelError::InvalidPlan(format!(
                        "skip ratio range [{min}, {max}] is empty"
                    )));
                }
            }
        }
        Ok(self)
    }
}

/// How plans are produced for a run: an explicit skip list, or nested plans drawn per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PlanSpec {
    /// The same explicit plan every time.
    Explicit(LayerPlan),
    /// Draw `k = round(r·L)` skipped middle layers per batch.
    Nested {
        /// The skip ratio.
        ratio: SkipRatio,
        /// How the skipped layers are chosen.
        strategy: PlanStrategy,
    },
}

impl PlanSpec {
    /// The full plan (skip ratio 0).
    pub fn full() -> Self {
        Self::Nested {
            ratio: SkipRatio::Fixed(0.0),
            strategy: PlanStrategy::Random,
        }
    }
}

/// Draws one plan per batch from a [`PlanSpec`] with a seeded RNG, so runs are reproducible.
#[derive(Debug, Clone)]
pub struct PlanSampler {
    spec: PlanSpec,
    num_layers: usize,
    rng: StdRng,
}

impl PlanSampler {
    /// Validates the spec against the model's depth.
    pub fn new(spec: PlanSpec, num_layers: usize, seed: u64) -> Result<Self> {
        match &spec {
            PlanSpec::Explicit(plan) => plan.check_for(num_layers)?,
            PlanSpec::Nested { ratio, .. } => {
                ratio.validate()?;
            }
        }
        Ok(Self {
            spec,
            num_layers,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The number of layers skipped for ratio `r`: `round(r·L)`, capped to the middle layers.
    pub fn skip_count(num_layers: usize, r: f64) -> usize {
        ((r * num_layers as f64).round() as usize).min(num_layers.saturating_sub(2))
    }

    /// The next plan.
    pub fn next_plan(&mut self) -> Result<LayerPlan> {
        match &self.spec {
            PlanSpec::Explicit(plan) => Ok(plan.clone()),
            PlanSpec::Nested { ratio, strategy } => {
                let r = match *ratio {
                    SkipRatio::Fixed(r) => r,
                    SkipRatio::Range { min, max } if min == max => min,
                    SkipRatio::Range { min, max } => self.rng.random_range(min..=max),
                };
                let k = Self::skip_count(self.num_layers, r);
                LayerPlan::nested(self.num_layers, k, *strategy, &mut self.rng)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_plans_are_errors() {
        for (layers, needle) in [
            (vec![], "at least one"),
            (vec![0, 30], "out of range"),
            (vec![0, 3, 3], "twice"),
            (vec![0, 5, 4], "increasing"),
        ] {
            let err = LayerPlan::from_layers(layers, 30).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(LayerPlan::skipping(&[3, 3], 30).is_err());
        assert!(LayerPlan::skipping(&[30], 30).is_err());
        assert!(
            LayerPlan::skipping(&[0], 1).is_err(),
            "skipping every layer"
        );
    }

    #[test]
    fn nested_plans_keep_ends_and_skip_k() {
        let mut rng = StdRng::seed_from_u64(7);
        for strategy in [PlanStrategy::Random, PlanStrategy::Contiguous] {
            for k in 0..=28 {
                let plan = LayerPlan::nested(30, k, strategy, &mut rng).unwrap();
                assert_eq!(plan.len(), 30 - k);
                assert_eq!(plan.layers()[0], 0);
                assert_eq!(*plan.layers().last().unwrap(), 29);
                if strategy == PlanStrategy::Contiguous && k > 0 {
                    let s = plan.skipped();
                    assert_eq!(s.last().unwrap() - s[0] + 1, k, "{plan}");
                }
            }
        }
        assert!(LayerPlan::nested(30, 29, PlanStrategy::Random, &mut rng).is_err());
    }

    #[test]
    fn sampler_is_seeded_and_draws_new_plans() {
        let spec = PlanSpec::Nested {
            ratio: SkipRatio::Range { min: 0.2, max: 0.5 },
            strategy: PlanStrategy::Random,
        };
        let draw = |seed| {
            let mut s = PlanSampler::new(spec.clone(), 30, seed).unwrap();
            (0..20).map(|_| s.next_plan().unwrap()).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        assert!(a.iter().all(|p| (15..=24).contains(&p.len())));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 15, "a new plan per batch");
        assert_eq!(PlanSampler::skip_count(30, 0.25), 8);
        assert!(SkipRatio::Fixed(1.0).validate().is_err());
        assert!(SkipRatio::Range { min: 0.5, max: 0.2 }.validate().is_err());
    }

    #[test]
    fn plan_serde_round_trip_validates() {
        let plan = LayerPlan::skipping(&[3, 7], 10).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), plan);
        let bad = r#"{"layers":[2,1],"num_layers":10}"#;
        assert!(serde_json::from_str::<LayerPlan>(bad).is_err());
    }
}
