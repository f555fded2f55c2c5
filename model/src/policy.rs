//! Plan policies: which layer plan each batch's behavior runs. A [`PlanChoice`] is what a
//! user asks for (flags, the config file, the benchmarks), validated once; resolved against a
//! model it is a [`PlanSpec`], which a [`PlanSampler`] draws plans from, per batch. The
//! calibrated and adaptive choices read the model's calibration [`Profile`] (data, see
//! [`crate::profile`]); the adaptive one steers by the learner's KL ([`AdaptivePolicy`]).

use crate::error::{ModelError, Result};
use crate::plan::{LayerPlan, PlanStrategy};
use crate::profile::Profile;
use crate::unit::Unit;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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

/// How plans are produced for a run: an explicit skip list, nested plans drawn per batch, or
/// skip sets from a calibration profile.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanSpec {
    /// The same explicit plan every time.
    Explicit(LayerPlan),
    /// Draw `k = round(r·L)` skipped middle layers per batch.
    Nested {
        /// The skip ratio.
        ratio: SkipRatio,
        /// How the skipped layers are chosen ([`PlanStrategy::Random`] or
        /// [`PlanStrategy::Contiguous`]).
        strategy: PlanStrategy,
    },
    /// A profile set whose decode cost saving (1 − cost ratio) is near r, drawn per batch.
    Calibrated {
        /// The cost saving r (fixed or a range); `r = 0.2` asks for a cost ratio of 0.8.
        ratio: SkipRatio,
        /// The model's calibration profile.
        profile: Arc<Profile>,
    },
    /// The cheapest profile set whose measured KL stays under `budget` (see [`AdaptivePolicy`]).
    Adaptive {
        /// The policy's settings.
        config: AdaptiveConfig,
        /// The model's calibration profile.
        profile: Arc<Profile>,
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

/// How close to the requested cost saving a calibrated set must be to be drawn: within this
/// many points of saving, or else the nearest set alone.
pub const CALIBRATED_WINDOW: f64 = 0.03;

/// Draws one plan per batch from a [`PlanSpec`] with a seeded RNG, so runs are reproducible.
/// [`PlanSpec::Adaptive`] has state that depends on the learner's measurements: it is drawn by
/// an [`AdaptivePolicy`] the sampler makes once and keeps ([`PlanSampler::adaptive_mut`] feeds
/// it measurements); without any, every draw is the policy's starting set.
#[derive(Debug, Clone)]
pub struct PlanSampler {
    spec: PlanSpec,
    num_layers: usize,
    rng: StdRng,
    /// The policy of [`PlanSpec::Adaptive`], made once and kept across draws.
    adaptive: Option<AdaptivePolicy>,
}

impl PlanSampler {
    /// Validates the spec against the model's depth.
    pub fn new(spec: PlanSpec, num_layers: usize, seed: u64) -> Result<Self> {
        let mut adaptive = None;
        match &spec {
            PlanSpec::Explicit(plan) => plan.check_for(num_layers)?,
            PlanSpec::Nested { ratio, strategy } => {
                ratio.validate()?;
                if strategy.needs_profile() {
                    return Err(ModelError::InvalidPlan(format!(
                        "the {strategy} strategy needs a calibration profile"
                    )));
                }
            }
            PlanSpec::Calibrated { ratio, profile } => {
                ratio.validate()?;
                profile.check_layers(num_layers)?;
            }
            PlanSpec::Adaptive { config, profile } => {
                profile.check_layers(num_layers)?;
                adaptive = Some(AdaptivePolicy::new(config.clone(), profile.clone())?);
            }
        }
        Ok(Self {
            spec,
            num_layers,
            rng: StdRng::seed_from_u64(seed),
            adaptive,
        })
    }

    /// The number of layers skipped for ratio `r`: `round(r·L)`, capped to the middle layers.
    pub fn skip_count(num_layers: usize, r: f64) -> usize {
        ((r * num_layers as f64).round() as usize).min(num_layers.saturating_sub(2))
    }

    fn draw_ratio(rng: &mut StdRng, ratio: SkipRatio) -> f64 {
        match ratio {
            SkipRatio::Fixed(r) => r,
            SkipRatio::Range { min, max } if min == max => min,
            SkipRatio::Range { min, max } => rng.random_range(min..=max),
        }
    }

    /// The next plan.
    pub fn next_plan(&mut self) -> Result<LayerPlan> {
        match &self.spec {
            PlanSpec::Explicit(plan) => Ok(plan.clone()),
            PlanSpec::Nested { ratio, strategy } => {
                let r = Self::draw_ratio(&mut self.rng, *ratio);
                let k = Self::skip_count(self.num_layers, r);
                LayerPlan::nested(self.num_layers, k, *strategy, &mut self.rng)
            }
            PlanSpec::Calibrated { ratio, profile } => {
                let r = Self::draw_ratio(&mut self.rng, *ratio);
                let near = profile.sets_near(1.0 - r, CALIBRATED_WINDOW);
                let pick = near[self.rng.random_range(0..near.len())];
                profile.plan(pick)
            }
            PlanSpec::Adaptive { .. } => match &self.adaptive {
                Some(policy) => policy.plan(),
                None => Err(ModelError::InvalidPlan(
                    "the adaptive plan sampler has no policy".into(),
                )),
            },
        }
    }

    /// The adaptive policy, when the spec is [`PlanSpec::Adaptive`].
    pub fn adaptive(&self) -> Option<&AdaptivePolicy> {
        self.adaptive.as_ref()
    }

    /// The adaptive policy, to feed it the learner's measurements
    /// ([`AdaptivePolicy::observe`]); the next draws follow the set it moves to.
    pub fn adaptive_mut(&mut self) -> Option<&mut AdaptivePolicy> {
        self.adaptive.as_mut()
    }
}

/// Settings of the [`PlanStrategy::Adaptive`] policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveConfig {
    /// The largest acceptable per-token KL(μ‖π) in nats, as the learner estimates it.
    pub kl_budget: f64,
    /// Weight of a new measurement in a set's running KL estimate (exponential average).
    pub smoothing: f64,
    /// Move to a cheaper set only while the current set's estimate is below
    /// `headroom · kl_budget`, so that one lucky batch does not trigger a move.
    pub headroom: f64,
    /// Every this many batches, generate one batch with the next cheaper set even when its
    /// estimate is over budget, so that its estimate follows the weights as training moves
    /// them (0: never).
    pub refresh_every: u64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            kl_budget: 0.1,
            smoothing: 0.5,
            headroom: 0.8,
            refresh_every: 10,
        }
    }
}

impl AdaptiveConfig {
    /// Checks the budget is positive and the weights lie in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.kl_budget > 0.0 && self.kl_budget.is_finite()) {
            return Err(ModelError::InvalidPlan(format!(
                "the adaptive KL budget {} must be positive",
                self.kl_budget
            )));
        }
        for (v, what) in [(self.smoothing, "smoothing"), (self.headroom, "headroom")] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ModelError::InvalidPlan(format!(
                    "the adaptive {what} {v} must be in (0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// The [`PlanStrategy::Adaptive`] policy: per batch, the cheapest set of the profile whose
/// running estimate of KL(μ‖π) stays under the budget.
///
/// It walks the profile's cost-ordered sets (each cheaper set contains the previous one, so
/// its KL is larger in expectation). A set's estimate starts at its calibrated KL and follows
/// the learner's measurements on batches generated with it. After each measurement: if the
/// current set's estimate exceeds the budget, move one set back (more expensive); if it is
/// below `headroom · budget` and the next cheaper set's estimate is under the budget, move one
/// set forward. Training moves the weights, so the estimates are measurements, not the
/// calibration's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptivePolicy {
    config: AdaptiveConfig,
    #[serde(skip)]
    profile: Arc<Profile>,
    /// Index into the profile's sets (0 = the full plan).
    current: usize,
    /// Running KL estimate per set (index 0 is the full plan, whose KL is 0).
    estimates: Vec<f64>,
}

impl AdaptivePolicy {
    /// Starts at the cheapest set whose calibrated KL is under the budget.
    pub fn new(config: AdaptiveConfig, profile: Arc<Profile>) -> Result<Self> {
        config.validate()?;
        let mut estimates = vec![0.0];
        estimates.extend(profile.sets.iter().map(|s| s.kl));
        let current = estimates
            .iter()
            .rposition(|&kl| kl <= config.kl_budget)
            .unwrap_or(0);
        Ok(Self {
            config,
            profile,
            current,
            estimates,
        })
    }

    /// Reattaches the profile after deserialising a saved policy state.
    pub fn with_profile(mut self, profile: Arc<Profile>) -> Result<Self> {
        if self.estimates.len() != profile.sets.len() + 1 {
            return Err(ModelError::InvalidPlan(format!(
                "the saved adaptive state has {} sets, the profile {}",
                self.estimates.len(),
                profile.sets.len() + 1
            )));
        }
        self.profile = profile;
        Ok(self)
    }

    /// The index of the set in use (0 = the full plan, i = the profile's set i − 1).
    pub fn current(&self) -> usize {
        self.current
    }

    /// The running KL estimate of every set (index 0 = the full plan).
    pub fn estimates(&self) -> &[f64] {
        &self.estimates
    }

    /// The plan of the set in use.
    pub fn plan(&self) -> Result<LayerPlan> {
        self.plan_of(self.current)
    }

    /// The plan of set `index` (0 = the full plan).
    pub fn plan_of(&self, index: usize) -> Result<LayerPlan> {
        match index {
            0 => Ok(LayerPlan::full(self.profile.num_layers)),
            i => match self.profile.sets.get(i - 1) {
                Some(set) => self.profile.plan(set),
                None => Err(ModelError::InvalidPlan(format!(
                    "the profile has no set {i} (it has {})",
                    self.profile.sets.len()
                ))),
            },
        }
    }

    /// The set batch `batch_id` is generated with: the set in use, except that every
    /// `refresh_every`-th batch tries the next cheaper set to refresh its estimate.
    pub fn set_for_batch(&self, batch_id: u64) -> usize {
        let n = self.config.refresh_every;
        let cheaper = self.current + 1;
        if n > 0 && batch_id % n == n - 1 && cheaper < self.estimates.len() {
            cheaper
        } else {
            self.current
        }
    }

    /// The cost ratio of the set in use.
    pub fn cost_ratio(&self) -> f64 {
        match self.current {
            0 => 1.0,
            i => self.profile.sets[i - 1].cost_ratio,
        }
    }

    /// Takes the learner's KL(μ‖π) measured on a batch generated with set `set` and returns
    /// whether the set in use changed. A non-finite measurement is ignored.
    pub fn observe(&mut self, set: usize, kl: f64) -> bool {
        if !kl.is_finite() || set >= self.estimates.len() || set == 0 {
            return false;
        }
        let a = self.config.smoothing;
        self.estimates[set] = (1.0 - a) * self.estimates[set] + a * kl.max(0.0);
        let before = self.current;
        let budget = self.config.kl_budget;
        if self.estimates[self.current] > budget && self.current > 0 {
            self.current -= 1;
        } else if self.estimates[self.current] < self.config.headroom * budget
            && self.current + 1 < self.estimates.len()
            && self.estimates[self.current + 1] <= budget
        {
            self.current += 1;
        }
        before != self.current
    }

    /// The index of `plan` among the profile's sets (0 for the full plan), if it is one.
    pub fn index_of(&self, plan: &LayerPlan) -> Option<usize> {
        if plan.is_full() {
            return Some(0);
        }
        let units = plan.skipped_units();
        self.profile
            .sets
            .iter()
            .position(|s| {
                let mut su = s.units.clone();
                su.sort_unstable();
                LayerPlan::skipping_units(&su, plan.num_layers())
                    .map(|p| p.skipped_units() == units)
                    .unwrap_or(false)
            })
            .map(|i| i + 1)
    }
}
/// Which plans a run's behavior uses, before the model is known: the one description that the
/// command-line flags, the config file's `[plan]` section and the benchmarks share. Built by
/// [`PlanChoice::from_keys`] (serde goes through it too), so every value has been validated;
/// [`PlanChoice::resolve`] makes it a [`PlanSpec`] for a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "PlanKeys", into = "PlanKeys")]
pub enum PlanChoice {
    /// Every layer, every batch.
    #[default]
    Full,
    /// `k = round(r·L)` middle layers dropped per batch.
    Nested {
        /// The skip ratio r (fixed or a range).
        ratio: SkipRatio,
        /// [`PlanStrategy::Random`] or [`PlanStrategy::Contiguous`].
        strategy: PlanStrategy,
    },
    /// A profile set whose decode cost saving is near r, drawn per batch among the sets within
    /// [`CALIBRATED_WINDOW`] of it ([`Profile::sets_near`]).
    Calibrated {
        /// The cost saving r (fixed or a range).
        ratio: SkipRatio,
    },
    /// The cheapest profile set whose measured KL(μ‖π) stays under the budget
    /// ([`AdaptivePolicy`], other settings at their defaults).
    Adaptive {
        /// Per-token KL budget, nats.
        kl_budget: f64,
    },
    /// The same units skipped every batch.
    Fixed(Vec<Unit>),
}

/// The flat keys a plan choice is written with: the `[plan]` keys of the config file, and the
/// plan flags of the command line (`--skip-ratio`, `--skip-ratio-max`, `--plan-strategy`,
/// `--skip-layers`, `--kl-budget`). Every key is optional; [`PlanChoice::from_keys`] checks
/// they make one choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanKeys {
    /// Skip ratio r (or the lower bound of a range).
    pub skip_ratio: Option<f64>,
    /// Upper bound of r, drawn per batch.
    pub skip_ratio_max: Option<f64>,
    /// `random`, `contiguous`, `calibrated` or `adaptive`.
    pub strategy: Option<PlanStrategy>,
    /// Explicit units to skip: layer numbers, or strings `"a12"` (attention block of layer 12)
    /// and `"m12"` (its MLP block).
    #[serde(with = "unit_list")]
    pub skip_layers: Option<Vec<Unit>>,
    /// adaptive: the KL(μ‖π) budget in nats per token.
    pub kl_budget: Option<f64>,
}

impl PlanKeys {
    /// Whether any key that chooses the plan (all but the KL budget) is set.
    pub fn chooses(&self) -> bool {
        self.skip_ratio.is_some()
            || self.skip_ratio_max.is_some()
            || self.strategy.is_some()
            || self.skip_layers.is_some()
    }
}

/// `skip_layers` as the config file writes it: a layer as a number, a block as a string.
mod unit_list {
    use crate::unit::Unit;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Layer(usize),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<Unit>>, s: S) -> Result<S::Ok, S::Error> {
        let entries = v.as_ref().map(|v| {
            v.iter()
                .map(|&u| match u {
                    Unit::Layer(l) => Entry::Layer(l),
                    other => Entry::Text(other.to_string()),
                })
                .collect::<Vec<_>>()
        });
        entries.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Unit>>, D::Error> {
        let entries: Option<Vec<Entry>> = Option::deserialize(d)?;
        entries
            .map(|v| {
                v.into_iter()
                    .map(|e| match e {
                        Entry::Layer(l) => Ok(Unit::Layer(l)),
                        Entry::Text(s) => s.parse().map_err(D::Error::custom),
                    })
                    .collect()
            })
            .transpose()
    }
}

impl PlanChoice {
    /// The choice the keys describe (the full model when none is set), checked: a skip ratio
    /// in `[0, 1)` (a range not empty), explicit units with neither a ratio nor a strategy, a
    /// KL budget with the adaptive strategy only (and no ratio there), a positive budget.
    pub fn from_keys(keys: PlanKeys) -> Result<Self> {
        let invalid = |m: &str| Err(ModelError::InvalidPlan(m.into()));
        let has_ratio = keys.skip_ratio.is_some() || keys.skip_ratio_max.is_some();
        let strategy = keys.strategy.unwrap_or_default();
        if keys.kl_budget.is_some() && strategy != PlanStrategy::Adaptive {
            return invalid("a KL budget applies to the adaptive plan strategy only");
        }
        if let Some(units) = keys.skip_layers {
            if has_ratio {
                return invalid("explicit skip units and a skip ratio cannot be combined");
            }
            if keys.strategy.is_some() {
                return invalid("explicit skip units take no plan strategy");
            }
            return Ok(Self::Fixed(units));
        }
        let min = keys.skip_ratio.unwrap_or(0.0);
        let ratio = match keys.skip_ratio_max {
            Some(max) => SkipRatio::Range { min, max },
            None => SkipRatio::Fixed(min),
        }
        .validate()?;
        let choice = match strategy {
            PlanStrategy::Adaptive => {
                if has_ratio {
                    return invalid(
                        "the adaptive plan strategy chooses its own cost: give a KL budget \
                         instead of a skip ratio",
                    );
                }
                let kl_budget = keys
                    .kl_budget
                    .unwrap_or(AdaptiveConfig::default().kl_budget);
                AdaptiveConfig {
                    kl_budget,
                    ..AdaptiveConfig::default()
                }
                .validate()?;
                Self::Adaptive { kl_budget }
            }
            PlanStrategy::Calibrated => Self::Calibrated { ratio },
            s if !has_ratio && keys.strategy.is_none() => {
                debug_assert_eq!(s, PlanStrategy::Random);
                Self::Full
            }
            s => Self::Nested { ratio, strategy: s },
        };
        Ok(choice)
    }

    /// The keys that describe this choice ([`PlanChoice::from_keys`] gives it back).
    pub fn keys(&self) -> PlanKeys {
        let ratio_keys = |r: &SkipRatio| match *r {
            SkipRatio::Fixed(r) => (Some(r), None),
            SkipRatio::Range { min, max } => (Some(min), Some(max)),
        };
        match self {
            Self::Full => PlanKeys::default(),
            Self::Nested { ratio, strategy } => {
                let (skip_ratio, skip_ratio_max) = ratio_keys(ratio);
                PlanKeys {
                    skip_ratio,
                    skip_ratio_max,
                    strategy: (*strategy != PlanStrategy::Random).then_some(*strategy),
                    ..PlanKeys::default()
                }
            }
            Self::Calibrated { ratio } => {
                let (skip_ratio, skip_ratio_max) = ratio_keys(ratio);
                PlanKeys {
                    skip_ratio,
                    skip_ratio_max,
                    strategy: Some(PlanStrategy::Calibrated),
                    ..PlanKeys::default()
                }
            }
            Self::Adaptive { kl_budget } => PlanKeys {
                strategy: Some(PlanStrategy::Adaptive),
                kl_budget: Some(*kl_budget),
                ..PlanKeys::default()
            },
            Self::Fixed(units) => PlanKeys {
                skip_layers: Some(units.clone()),
                ..PlanKeys::default()
            },
        }
    }

    /// The same choice with another KL budget; an error unless the choice is adaptive.
    pub fn with_kl_budget(self, kl_budget: f64) -> Result<Self> {
        match self {
            Self::Adaptive { .. } => Self::from_keys(PlanKeys {
                strategy: Some(PlanStrategy::Adaptive),
                kl_budget: Some(kl_budget),
                ..PlanKeys::default()
            }),
            _ => Err(ModelError::InvalidPlan(
                "a KL budget applies to the adaptive plan strategy only".into(),
            )),
        }
    }

    /// The strategy that chooses the plans (`random` for the full model and explicit units,
    /// which draw nothing).
    pub fn strategy(&self) -> PlanStrategy {
        match self {
            Self::Full | Self::Fixed(_) => PlanStrategy::Random,
            Self::Nested { strategy, .. } => *strategy,
            Self::Calibrated { .. } => PlanStrategy::Calibrated,
            Self::Adaptive { .. } => PlanStrategy::Adaptive,
        }
    }

    /// Whether resolving the choice needs the model's calibration profile.
    pub fn needs_profile(&self) -> bool {
        matches!(self, Self::Calibrated { .. } | Self::Adaptive { .. })
    }

    /// The plan spec of this choice for a model with `num_layers` layers. The calibrated and
    /// adaptive choices need the model's `profile` (checked against the depth); the others
    /// ignore it.
    pub fn resolve(&self, num_layers: usize, profile: Option<Arc<Profile>>) -> Result<PlanSpec> {
        let profile = |s: &Self| {
            let p = profile.clone().ok_or_else(|| {
                ModelError::InvalidPlan(format!(
                    "the {} plan strategy needs the model's calibration profile",
                    s.strategy()
                ))
            })?;
            p.check_layers(num_layers)?;
            Ok::<_, ModelError>(p)
        };
        Ok(match self {
            Self::Full => PlanSpec::full(),
            Self::Nested { ratio, strategy } => PlanSpec::Nested {
                ratio: *ratio,
                strategy: *strategy,
            },
            Self::Fixed(units) => PlanSpec::Explicit(LayerPlan::skipping_units(units, num_layers)?),
            Self::Calibrated { ratio } => PlanSpec::Calibrated {
                ratio: *ratio,
                profile: profile(self)?,
            },
            Self::Adaptive { kl_budget } => PlanSpec::Adaptive {
                config: AdaptiveConfig {
                    kl_budget: *kl_budget,
                    ..AdaptiveConfig::default()
                },
                profile: profile(self)?,
            },
        })
    }
}

impl TryFrom<PlanKeys> for PlanChoice {
    type Error = ModelError;
    fn try_from(keys: PlanKeys) -> Result<Self> {
        Self::from_keys(keys)
    }
}

impl From<PlanChoice> for PlanKeys {
    fn from(choice: PlanChoice) -> Self {
        choice.keys()
    }
}

impl std::fmt::Display for PlanChoice {
    /// In words: `full`, `random skip ratio 0.2`, `contiguous skip ratio 0.1–0.3`,
    /// `adaptive, KL budget 0.1`, `skip 4,a7,m27`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratio = |r: &SkipRatio| match r {
            SkipRatio::Fixed(r) => format!("skip ratio {r}"),
            SkipRatio::Range { min, max } => format!("skip ratio {min}–{max}"),
        };
        match self {
            Self::Nested {
                ratio: SkipRatio::Fixed(r),
                ..
            } if *r == 0.0 => f.write_str("full"),
            Self::Full => f.write_str("full"),
            Self::Nested { ratio: r, strategy } => write!(f, "{strategy} {}", ratio(r)),
            Self::Calibrated { ratio: r } => write!(f, "calibrated {}", ratio(r)),
            Self::Adaptive { kl_budget } => write!(f, "adaptive, KL budget {kl_budget}"),
            Self::Fixed(units) => {
                let list: Vec<String> = units.iter().map(Unit::to_string).collect();
                write!(f, "skip {}", list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn keys(skip_ratio: Option<f64>, strategy: Option<PlanStrategy>) -> PlanKeys {
        PlanKeys {
            skip_ratio,
            strategy,
            ..PlanKeys::default()
        }
    }

    #[test]
    fn plan_choices_come_from_keys_and_go_back() {
        use PlanStrategy::*;
        let cases = [
            (PlanKeys::default(), PlanChoice::Full),
            (
                keys(Some(0.2), None),
                PlanChoice::Nested {
                    ratio: SkipRatio::Fixed(0.2),
                    strategy: Random,
                },
            ),
            (
                PlanKeys {
                    skip_ratio_max: Some(0.3),
                    ..keys(Some(0.1), Some(Contiguous))
                },
                PlanChoice::Nested {
                    ratio: SkipRatio::Range { min: 0.1, max: 0.3 },
                    strategy: Contiguous,
                },
            ),
            (
                keys(Some(0.2), Some(Calibrated)),
                PlanChoice::Calibrated {
                    ratio: SkipRatio::Fixed(0.2),
                },
            ),
            (
                keys(None, Some(Adaptive)),
                PlanChoice::Adaptive { kl_budget: 0.1 },
            ),
            (
                PlanKeys {
                    skip_layers: Some(vec![Unit::Layer(4), Unit::Attn(7)]),
                    ..PlanKeys::default()
                },
                PlanChoice::Fixed(vec![Unit::Layer(4), Unit::Attn(7)]),
            ),
        ];
        for (k, want) in cases {
            let choice = PlanChoice::from_keys(k.clone()).unwrap();
            assert_eq!(choice, want, "{k:?}");
            assert_eq!(PlanChoice::from_keys(choice.keys()).unwrap(), choice);
            let json = serde_json::to_string(&choice).unwrap();
            assert_eq!(serde_json::from_str::<PlanChoice>(&json).unwrap(), choice);
        }
        // Units in the file form: a layer as a number, a block as a string.
        let c: PlanChoice = serde_json::from_str(r#"{"skip_layers":[4,"a7","m27"]}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"skip_ratio":null,"skip_ratio_max":null,"strategy":null,"skip_layers":[4,"a7","m27"],"kl_budget":null}"#
        );
    }

    #[test]
    fn bad_plan_keys_are_errors() {
        use PlanStrategy::*;
        let units = Some(vec![Unit::Layer(3)]);
        for (k, needle) in [
            (keys(Some(1.5), None), "skip ratio 1.5"),
            (
                PlanKeys {
                    skip_ratio_max: Some(0.1),
                    ..keys(Some(0.3), None)
                },
                "is empty",
            ),
            (
                PlanKeys {
                    skip_layers: units.clone(),
                    ..keys(Some(0.2), None)
                },
                "cannot be combined",
            ),
            (
                PlanKeys {
                    skip_layers: units,
                    ..keys(None, Some(Contiguous))
                },
                "no plan strategy",
            ),
            (
                PlanKeys {
                    kl_budget: Some(0.2),
                    ..keys(Some(0.2), Some(Calibrated))
                },
                "adaptive plan strategy only",
            ),
            (keys(Some(0.2), Some(Adaptive)), "chooses its own cost"),
            (
                PlanKeys {
                    kl_budget: Some(-1.0),
                    ..keys(None, Some(Adaptive))
                },
                "must be positive",
            ),
        ] {
            let err = PlanChoice::from_keys(k.clone()).unwrap_err().to_string();
            assert!(err.contains(needle), "{k:?}: {err}");
        }
        let err = serde_json::from_str::<PlanChoice>(r#"{"skip_layers":["x7"]}"#).unwrap_err();
        assert!(err.to_string().contains("x7"), "{err}");
        assert!(serde_json::from_str::<PlanChoice>(r#"{"skip_rate":0.2}"#).is_err());
        let adaptive = PlanChoice::Adaptive { kl_budget: 0.1 };
        assert_eq!(
            adaptive.with_kl_budget(0.3).unwrap(),
            PlanChoice::Adaptive { kl_budget: 0.3 }
        );
        assert!(PlanChoice::Full.with_kl_budget(0.3).is_err());
    }

    fn profile() -> Arc<Profile> {
        use crate::profile::SkipSet;
        let sets = (1..=6)
            .map(|k| SkipSet {
                units: (1..=k).map(Unit::Layer).collect(),
                kl: 0.05 * k as f64,
                cost_ratio: 1.0 - 0.1 * k as f64,
            })
            .collect();
        Arc::new(Profile {
            num_layers: 8,
            sets,
            ..Profile::default()
        })
    }

    #[test]
    fn choices_resolve_against_a_model() {
        let p = profile();
        let calibrated = PlanChoice::Calibrated {
            ratio: SkipRatio::Fixed(0.3),
        };
        let err = calibrated.resolve(8, None).unwrap_err().to_string();
        assert!(
            err.contains("needs the model's calibration profile"),
            "{err}"
        );
        assert!(calibrated.resolve(9, Some(p.clone())).is_err(), "depth");
        // The calibrated draw is among the profile's sets near the cost asked for.
        let spec = calibrated.resolve(8, Some(p.clone())).unwrap();
        let mut s = PlanSampler::new(spec, 8, 0).unwrap();
        for _ in 0..10 {
            let plan = s.next_plan().unwrap();
            assert_eq!(plan.skipped(), vec![1, 2, 3]);
        }
        let fixed = PlanChoice::Fixed(vec![Unit::Layer(9)]);
        assert!(fixed.resolve(8, None).is_err());
        assert_eq!(
            PlanChoice::Full.resolve(8, Some(p)).unwrap(),
            PlanSpec::full()
        );
    }

    #[test]
    fn the_sampler_keeps_its_adaptive_policy() {
        let spec = PlanChoice::Adaptive { kl_budget: 0.12 }
            .resolve(8, Some(profile()))
            .unwrap();
        let mut s = PlanSampler::new(spec, 8, 0).unwrap();
        // Starts at the cheapest set whose calibrated KL is under 0.12: set 2.
        assert_eq!(s.next_plan().unwrap().skipped(), vec![1, 2]);
        assert_eq!(s.adaptive().unwrap().current(), 2);
        // A measurement over budget moves it back a set, and the next draws follow.
        assert!(s.adaptive_mut().unwrap().observe(2, 1.0));
        for _ in 0..3 {
            assert_eq!(s.next_plan().unwrap().skipped(), vec![1]);
        }
    }
}
