//! Layer plans: which decoder layers, and which of their two blocks (attention, MLP), a
//! forward pass runs.
//!
//! The full plan runs `0..L`. A nested plan keeps the first and last layers and drops
//! `k = round(r·L)` of the middle ones, chosen at random (seeded) or as one contiguous block, or
//! takes a calibrated skip set (see [`crate::calibrate`]) whose units may be whole layers or
//! single attention / MLP blocks.

use crate::calibrate::Profile;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use protocol::{PLAN_LAYER_MASK, PLAN_SKIP_ATTN, PLAN_SKIP_MLP};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One skippable unit of the decoder: a whole layer, or one of its two residual blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// The whole layer `l` (both blocks).
    Layer(usize),
    /// The attention block of layer `l` (its input norm, q/k/v/o projections and KV cache).
    Attn(usize),
    /// The MLP block of layer `l` (its post-attention norm, gate/up/down projections).
    Mlp(usize),
}

impl Unit {
    /// The layer the unit belongs to.
    pub fn layer(self) -> usize {
        match self {
            Unit::Layer(l) | Unit::Attn(l) | Unit::Mlp(l) => l,
        }
    }

    /// Every unit of a model with `num_layers` layers: the layers, then the attention blocks,
    /// then the MLP blocks.
    pub fn all(num_layers: usize) -> Vec<Unit> {
        (0..num_layers)
            .map(Unit::Layer)
            .chain((0..num_layers).map(Unit::Attn))
            .chain((0..num_layers).map(Unit::Mlp))
            .collect()
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Layer(l) => write!(f, "{l}"),
            Unit::Attn(l) => write!(f, "a{l}"),
            Unit::Mlp(l) => write!(f, "m{l}"),
        }
    }
}

impl std::str::FromStr for Unit {
    type Err = ModelError;
    /// `12` is layer 12, `a12` its attention block, `m12` its MLP block.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            ModelError::InvalidPlan(format!(
                "`{s}` is not a skip unit (expected a layer number like 12, a12 for its attention \
                 block or m12 for its MLP block)"
            ))
        };
        let (make, digits): (fn(usize) -> Unit, &str) = match s.as_bytes().first() {
            Some(b'a') => (Unit::Attn, &s[1..]),
            Some(b'm') => (Unit::Mlp, &s[1..]),
            _ => (Unit::Layer, s),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        digits.parse().map(make).map_err(|_| bad())
    }
}

/// What a forward pass runs: the ordered decoder layers with at least one block running, and
/// for those, which block (attention or MLP) is skipped. Always non-empty, strictly increasing
/// and within `0..num_layers`; a layer with both blocks skipped is simply absent.
///
/// The plan travels in the [`ForwardCtx`](crate::ForwardCtx), so one [`Decoder`](crate::Decoder)
/// serves the full-depth learner and every nested behavior:
///
/// ```
/// use model::candle_core::{DType, Device, Tensor};
/// use model::{
///     Architecture, Decoder, ForwardCtx, LayerPlan, ModelConfig, PlanStrategy, Unit, Weights,
/// };
/// use rand::SeedableRng;
///
/// // Skip layers 2 and 3 whole, and the MLP block of layer 5, of an 8-layer model.
/// let plan = LayerPlan::skipping_units(&[Unit::Layer(2), Unit::Layer(3), Unit::Mlp(5)], 8)?;
/// assert_eq!(plan.layers(), &[0, 1, 4, 5, 6, 7]);
/// assert_eq!(plan.skipped(), vec![2, 3]);
/// assert!(plan.runs_attn(5) && !plan.runs_mlp(5));
/// assert_eq!(plan.to_string(), "6/8 layers, skipping 2,3; MLP skipped in 5");
///
/// // A nested plan as drawn per batch: 3 random middle layers dropped, first and last kept.
/// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
/// let nested = LayerPlan::nested(8, 3, PlanStrategy::Random, &mut rng)?;
/// assert_eq!(nested.len(), 5);
/// assert_eq!((nested.layers()[0], nested.layers()[4]), (0, 7));
///
/// // A plan is checked against the model: there is no layer 8 to skip.
/// assert!(LayerPlan::skipping(&[8], 8).is_err());
///
/// // One set of (here tiny, random) weights runs either plan.
/// let cfg = ModelConfig::tiny(Architecture::Llama, 32, 8);
/// let decoder = Decoder::new(&cfg, &Weights::random(&cfg, 0, DType::F32, &Device::Cpu)?, false)?;
/// let tokens = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
/// let full = decoder.forward(&tokens, &mut ForwardCtx::new(LayerPlan::full(8)))?;
/// let skipped = decoder.forward(&tokens, &mut ForwardCtx::new(plan))?;
/// assert_eq!(full.dims(), &[1, 3, 32]); // (batch, positions, vocabulary)
/// let diff = (full - skipped)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff > 0.0, "skipping layers changes the logits");
/// # Ok::<(), model::ModelError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawPlan", into = "RawPlan")]
pub struct LayerPlan {
    layers: Vec<usize>,
    /// Layers of `layers` whose attention block is skipped (sorted).
    no_attn: Vec<usize>,
    /// Layers of `layers` whose MLP block is skipped (sorted).
    no_mlp: Vec<usize>,
    num_layers: usize,
}

#[derive(Serialize, Deserialize)]
struct RawPlan {
    layers: Vec<usize>,
    num_layers: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    skip_attn: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    skip_mlp: Vec<usize>,
}

impl TryFrom<RawPlan> for LayerPlan {
    type Error = ModelError;
    fn try_from(raw: RawPlan) -> Result<Self> {
        LayerPlan::from_parts(raw.layers, raw.skip_attn, raw.skip_mlp, raw.num_layers)
    }
}

impl From<LayerPlan> for RawPlan {
    fn from(plan: LayerPlan) -> Self {
        RawPlan {
            layers: plan.layers,
            num_layers: plan.num_layers,
            skip_attn: plan.no_attn,
            skip_mlp: plan.no_mlp,
        }
    }
}

/// How a nested plan chooses what it drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStrategy {
    /// A uniformly random subset of the middle layers (seeded).
    #[default]
    Random,
    /// One contiguous block of middle layers at a random offset (seeded).
    Contiguous,
    /// A skip set from the model's calibration profile at the requested cost, drawn per batch
    /// among the sets near that cost.
    Calibrated,
    /// Per batch, the cheapest profile set whose KL(μ‖π), as the learner measures it on recent
    /// batches, stays under a budget.
    Adaptive,
}

impl PlanStrategy {
    /// Whether the strategy needs a calibration profile.
    pub fn needs_profile(self) -> bool {
        matches!(self, Self::Calibrated | Self::Adaptive)
    }
}

impl std::fmt::Display for PlanStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Random => "random",
            Self::Contiguous => "contiguous",
            Self::Calibrated => "calibrated",
            Self::Adaptive => "adaptive",
        })
    }
}

impl std::str::FromStr for PlanStrategy {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "contiguous" => Ok(Self::Contiguous),
            "calibrated" => Ok(Self::Calibrated),
            "adaptive" => Ok(Self::Adaptive),
            other => Err(ModelError::InvalidPlan(format!(
                "unknown plan strategy `{other}` (expected random, contiguous, calibrated or \
                 adaptive)"
            ))),
        }
    }
}

impl LayerPlan {
    /// Every layer, in order.
    pub fn full(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).collect(),
            no_attn: Vec::new(),
            no_mlp: Vec::new(),
            num_layers,
        }
    }

    /// A plan from an explicit list of layers to run (both blocks of each).
    pub fn from_layers(layers: Vec<usize>, num_layers: usize) -> Result<Self> {
        Self::from_parts(layers, Vec::new(), Vec::new(), num_layers)
    }

    /// A plan from the layers to run and, among them, those whose attention or MLP block is
    /// skipped.
    pub fn from_parts(
        layers: Vec<usize>,
        skip_attn: Vec<usize>,
        skip_mlp: Vec<usize>,
        num_layers: usize,
    ) -> Result<Self> {
        if layers.is_empty() {
            return Err(ModelError::InvalidPlan(
                "a plan must run at least one layer".into(),
            ));
        }
        check_increasing(&layers, num_layers, "layers")?;
        for (list, what) in [(&skip_attn, "attention"), (&skip_mlp, "MLP")] {
            check_increasing(list, num_layers, what)?;
            if let Some(l) = list.iter().find(|l| layers.binary_search(l).is_err()) {
                return Err(ModelError::InvalidPlan(format!(
                    "the {what} block of layer {l} is marked skipped, but layer {l} does not run"
                )));
            }
        }
        if let Some(l) = skip_attn.iter().find(|l| skip_mlp.binary_search(l).is_ok()) {
            return Err(ModelError::InvalidPlan(format!(
                "layer {l} skips both blocks: leave it out of the layers instead"
            )));
        }
        Ok(Self {
            layers,
            no_attn: skip_attn,
            no_mlp: skip_mlp,
            num_layers,
        })
    }

    /// A plan that runs every layer except the listed ones (any order, no duplicates).
    pub fn skipping(skip: &[usize], num_layers: usize) -> Result<Self> {
        let units: Vec<Unit> = skip.iter().map(|&l| Unit::Layer(l)).collect();
        Self::skipping_units(&units, num_layers)
    }

    /// A plan that runs everything except the listed units (any order). Skipping both blocks of
    /// a layer is the same as skipping the layer; listing a unit twice, or a block of a layer
    /// that is skipped whole, is an error.
    pub fn skipping_units(skip: &[Unit], num_layers: usize) -> Result<Self> {
        let mut attn = vec![false; num_layers];
        let mut mlp = vec![false; num_layers];
        for &u in skip {
            let l = u.layer();
            if l >= num_layers {
                return Err(ModelError::InvalidPlan(format!(
                    "cannot skip {}: the model has {num_layers} layers",
                    describe_unit(u)
                )));
            }
            let (a, m) = match u {
                Unit::Layer(_) => (true, true),
                Unit::Attn(_) => (true, false),
                Unit::Mlp(_) => (false, true),
            };
            if (a && attn[l]) || (m && mlp[l]) {
                return Err(ModelError::InvalidPlan(format!(
                    "{} is listed twice in the skip list",
                    describe_unit(u)
                )));
            }
            attn[l] |= a;
            mlp[l] |= m;
        }
        let layers: Vec<usize> = (0..num_layers).filter(|&l| !(attn[l] && mlp[l])).collect();
        let skip_attn = layers.iter().copied().filter(|&l| attn[l]).collect();
        let skip_mlp = layers.iter().copied().filter(|&l| mlp[l]).collect();
        Self::from_parts(layers, skip_attn, skip_mlp, num_layers)
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
            PlanStrategy::Calibrated | PlanStrategy::Adaptive => {
                return Err(ModelError::InvalidPlan(format!(
                    "the {strategy} strategy takes its skip sets from a calibration profile, \
                     not from a layer count"
                )))
            }
        };
        Self::skipping(&skipped, num_layers)
    }

    /// The layers that run at least one block, in order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Total layers of the model the plan is for.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Number of layers the plan runs (at least partly).
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Always false: a plan runs at least one layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Whether every block of every layer runs.
    pub fn is_full(&self) -> bool {
        self.layers.len() == self.num_layers && self.no_attn.is_empty() && self.no_mlp.is_empty()
    }

    /// Whether layer `l` runs its attention block.
    pub fn runs_attn(&self, l: usize) -> bool {
        self.layers.binary_search(&l).is_ok() && self.no_attn.binary_search(&l).is_err()
    }

    /// Whether layer `l` runs its MLP block.
    pub fn runs_mlp(&self, l: usize) -> bool {
        self.layers.binary_search(&l).is_ok() && self.no_mlp.binary_search(&l).is_err()
    }

    /// The layers skipped whole, in order.
    pub fn skipped(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|l| self.layers.binary_search(l).is_err())
            .collect()
    }

    /// Layers that run but skip their attention block.
    pub fn skipped_attn(&self) -> &[usize] {
        &self.no_attn
    }

    /// Layers that run but skip their MLP block.
    pub fn skipped_mlp(&self) -> &[usize] {
        &self.no_mlp
    }

    /// Everything the plan skips, as units: whole layers, then single blocks, each in order.
    pub fn skipped_units(&self) -> Vec<Unit> {
        let mut out: Vec<Unit> = self.skipped().into_iter().map(Unit::Layer).collect();
        out.extend(self.no_attn.iter().map(|&l| Unit::Attn(l)));
        out.extend(self.no_mlp.iter().map(|&l| Unit::Mlp(l)));
        out
    }

    /// Whether the plan skips a single block somewhere (a sublayer plan).
    pub fn skips_blocks(&self) -> bool {
        !(self.no_attn.is_empty() && self.no_mlp.is_empty())
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

    /// The plan as rollout records carry it: one entry per layer that runs, the layer index
    /// with [`PLAN_SKIP_ATTN`] or [`PLAN_SKIP_MLP`] set when one of its blocks is skipped.
    pub fn to_record(&self) -> Vec<u16> {
        self.layers
            .iter()
            .map(|&l| {
                // `ModelConfig::validate` caps the depth at PLAN_LAYER_MASK + 1 layers.
                let mut e = (l & PLAN_LAYER_MASK as usize) as u16;
                if self.no_attn.binary_search(&l).is_ok() {
                    e |= PLAN_SKIP_ATTN;
                }
                if self.no_mlp.binary_search(&l).is_ok() {
                    e |= PLAN_SKIP_MLP;
                }
                e
            })
            .collect()
    }

    /// The plan a rollout record carries (see [`LayerPlan::to_record`]).
    pub fn from_record(entries: &[u16], num_layers: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(entries.len());
        let (mut skip_attn, mut skip_mlp) = (Vec::new(), Vec::new());
        for &e in entries {
            let l = (e & PLAN_LAYER_MASK) as usize;
            layers.push(l);
            if e & PLAN_SKIP_ATTN != 0 {
                skip_attn.push(l);
            }
            if e & PLAN_SKIP_MLP != 0 {
                skip_mlp.push(l);
            }
        }
        Self::from_parts(layers, skip_attn, skip_mlp, num_layers)
    }

    /// The fraction of the full model's decode cost this plan pays, counted as the weights
    /// one decoded token reads: the blocks that run, the final norm and the output head (see
    /// [`ModelConfig::unit_params`]). 1 for the full plan; its inverse is the ideal speedup.
    pub fn cost_ratio(&self, cfg: &ModelConfig) -> f64 {
        let full = cfg.decode_params() as f64;
        let saved: usize = self
            .skipped_units()
            .iter()
            .map(|&u| cfg.unit_params(u))
            .sum();
        (full - saved as f64) / full
    }
}

fn describe_unit(u: Unit) -> String {
    match u {
        Unit::Layer(l) => format!("layer {l}"),
        Unit::Attn(l) => format!("the attention block of layer {l}"),
        Unit::Mlp(l) => format!("the MLP block of layer {l}"),
    }
}

fn check_increasing(list: &[usize], num_layers: usize, what: &str) -> Result<()> {
    for (i, &l) in list.iter().enumerate() {
        if l >= num_layers {
            return Err(ModelError::InvalidPlan(format!(
                "layer {l} is out of range (the model has {num_layers} layers)"
            )));
        }
        if i > 0 {
            let prev = list[i - 1];
            if prev == l {
                return Err(ModelError::InvalidPlan(format!(
                    "layer {l} appears twice in the {what} list"
                )));
            }
            if prev > l {
                return Err(ModelError::InvalidPlan(format!(
                    "{what} must be increasing, but {prev} comes before {l}"
                )));
            }
        }
    }
    Ok(())
}

impl std::fmt::Display for LayerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_full() {
            return write!(f, "full ({} layers)", self.num_layers);
        }
        let list = |v: &[usize]| {
            v.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "{}/{} layers", self.len(), self.num_layers)?;
        let skipped = self.skipped();
        if !skipped.is_empty() {
            write!(f, ", skipping {}", list(&skipped))?;
        }
        if !self.no_attn.is_empty() {
            write!(f, "; attention skipped in {}", list(&self.no_attn))?;
        }
        if !self.no_mlp.is_empty() {
            write!(f, "; MLP skipped in {}", list(&self.no_mlp))?;
        }
        Ok(())
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
/// an [`AdaptivePolicy`], and this sampler returns the policy's starting set for it.
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
                config.validate()?;
                profile.check_layers(num_layers)?;
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
            PlanSpec::Adaptive { config, profile } => {
                AdaptivePolicy::new(config.clone(), profile.clone())?.plan()
            }
        }
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
