//! Layer plans: which decoder layers, and which of their two blocks (attention, MLP), a
//! forward pass runs.
//!
//! The full plan runs `0..L`. A nested plan keeps the first and last layers and drops
//! `k = round(r·L)` of the middle ones, chosen at random (seeded) or as one contiguous block;
//! a calibrated skip set (see [`crate::profile`]) may skip whole layers or single attention /
//! MLP blocks. Which plan a run uses per batch is [`crate::policy`]'s business.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::unit::Unit;
use protocol::{PLAN_LAYER_MASK, PLAN_SKIP_ATTN, PLAN_SKIP_MLP};
use rand::Rng;
use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
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
    fn plan_serde_round_trip_validates() {
        let plan = LayerPlan::skipping(&[3, 7], 10).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), plan);
        let bad = r#"{"layers":[2,1],"num_layers":10}"#;
        assert!(serde_json::from_str::<LayerPlan>(bad).is_err());
    }
}
