//! Options every model command shares: which model, and which layer plan.

use crate::profile::{resolve_choice, ProfileSource};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::{
    Decoder, DeviceSpec, LayerPlan, LoadOptions, LoadedModel, PlanChoice, PlanKeys, PlanSampler,
    PlanSpec, PlanStrategy, Tokenizer, Unit, WeightFormat,
};
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

/// Which model to load.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched into the asset cache on first use.
    #[arg(long, value_name = "PATH", env = "NESTED_REFT_MODEL")]
    pub model: Option<PathBuf>,
    /// Where the model runs: cpu, or cuda / cuda:N (an NVIDIA GPU, in a build with the `cuda`
    /// feature) [default: cpu].
    #[arg(long, value_name = "DEVICE", env = "NESTED_REFT_DEVICE")]
    pub device: Option<DeviceSpec>,
}

impl ModelArgs {
    /// The model at `model` (the default model when `None`) on `device`.
    pub fn new(model: Option<PathBuf>, device: DeviceSpec) -> Self {
        Self {
            model,
            device: Some(device),
        }
    }

    /// The device named, opened (the CPU when none is).
    pub fn open_device(&self) -> Result<model::candle_core::Device> {
        Ok(self.device.unwrap_or_default().open()?)
    }

    /// Loads the model (f32, on the device named) with a spinner.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_with(&LoadOptions::default())
    }

    /// The model's path: the given one, else the default model (fetched when missing).
    pub fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => Ok(protocol::assets::default_model()?),
        }
    }

    /// The model's path without fetching anything (for the services): the given one, else
    /// the default model in the asset cache; a clear error when it is not there.
    pub fn existing_path(&self) -> Result<PathBuf> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => protocol::assets::default_model_path(),
        };
        if !path.exists() {
            bail!(
                "the model {} does not exist{}",
                path.display(),
                if self.model.is_none() {
                    " (fetch the default model with `nested-reft fetch model`, or set \
                     NESTED_REFT_ASSETS to where it is cached)"
                } else {
                    ""
                }
            );
        }
        Ok(path)
    }

    /// Loads the model with `opts` (e.g. trainable) on the device named, with a spinner.
    pub fn load_with(&self, opts: &LoadOptions) -> Result<LoadedModel> {
        let opts = LoadOptions {
            device: self.open_device()?,
            ..opts.clone()
        };
        let path = self.path()?;
        let bar = ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let loaded = model::load_model(&path, &opts)
            .with_context(|| format!("while loading the model from {}", path.display()));
        bar.finish_and_clear();
        loaded
    }
}

/// Which decoder layers run: the full model, a nested plan drawn from a skip ratio, an
/// explicit skip list, or skip sets from the model's calibration profile. Every flag is
/// optional so that a config file can supply the plan.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Fraction r of the model to skip. With random/contiguous: k = round(r·L) middle layers are
    /// dropped (first and last are always kept). With calibrated: a profile skip set that saves
    /// about r of the decode cost (0.2 = cost ratio 0.8, ideal speedup 1.25x). 0 (the default)
    /// runs the full model.
    #[arg(long, value_name = "R", env = "NESTED_REFT_SKIP_RATIO")]
    pub skip_ratio: Option<f64>,
    /// Draw r uniformly from [--skip-ratio, --skip-ratio-max] for every batch instead of fixing it.
    #[arg(long, value_name = "R", env = "NESTED_REFT_SKIP_RATIO_MAX")]
    pub skip_ratio_max: Option<f64>,
    /// How the skipped units are chosen [default: random].
    #[arg(long, value_enum, env = "NESTED_REFT_PLAN_STRATEGY")]
    pub plan_strategy: Option<StrategyArg>,
    /// Explicit units to skip: whole layers (`12`), attention blocks (`a12`) or MLP blocks
    /// (`m12`), e.g. `25,26,a5,m7` (overrides --skip-ratio).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "U,U,...",
        env = "NESTED_REFT_SKIP_LAYERS"
    )]
    pub skip_layers: Option<Vec<Unit>>,
    /// The calibration profile of the calibrated and adaptive strategies [default: next to the
    /// model, written by `nested-reft calibrate`].
    #[arg(long, value_name = "FILE", env = "NESTED_REFT_PROFILE")]
    pub profile: Option<PathBuf>,
    /// adaptive: the largest per-token KL(μ‖π) in nats the behavior may drift [default: 0.1].
    #[arg(long, value_name = "NATS", env = "NESTED_REFT_KL_BUDGET")]
    pub kl_budget: Option<f64>,
    /// Storage of the behavior's linear weights: f32, or re-quantized from the current f32
    /// weights to 8 bits (q8_0) or 4 bits (q4_0) for faster generation. Only generation uses
    /// it; training stays f32 [default: f32].
    #[arg(long, value_name = "FORMAT", env = "NESTED_REFT_BEHAVIOR_WEIGHTS")]
    pub behavior_weights: Option<WeightFormat>,
    /// Seed for the plan draws and for sampling [default: 0].
    #[arg(long, env = "NESTED_REFT_SEED")]
    pub seed: Option<u64>,
}

/// `--plan-strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// A random subset of the middle layers.
    Random,
    /// One contiguous block of middle layers.
    Contiguous,
    /// A skip set of the calibration profile at the cost --skip-ratio asks for, drawn per batch
    /// among the sets near it.
    Calibrated,
    /// Per batch, the cheapest profile set whose KL(μ‖π), as the learner measures it, stays
    /// under --kl-budget.
    Adaptive,
}

impl StrategyArg {
    /// The model crate's strategy.
    pub fn strategy(self) -> PlanStrategy {
        match self {
            Self::Random => PlanStrategy::Random,
            Self::Contiguous => PlanStrategy::Contiguous,
            Self::Calibrated => PlanStrategy::Calibrated,
            Self::Adaptive => PlanStrategy::Adaptive,
        }
    }
}

impl PlanArgs {
    /// The plan keys these flags set.
    pub fn keys(&self) -> PlanKeys {
        PlanKeys {
            skip_ratio: self.skip_ratio,
            skip_ratio_max: self.skip_ratio_max,
            strategy: self.plan_strategy.map(StrategyArg::strategy),
            skip_layers: self.skip_layers.clone(),
            kl_budget: self.kl_budget,
        }
    }

    /// The plan choice these flags describe (the full model when none is given), checked.
    pub fn choice(&self) -> Result<PlanChoice> {
        PlanChoice::from_keys(self.keys()).context("in the plan flags")
    }

    /// The plan spec for a loaded model, loading the calibration profile for the calibrated
    /// and adaptive strategies (from --profile, else next to the model).
    pub fn resolve(&self, src: ProfileSource<'_>) -> Result<PlanSpec> {
        resolve_choice(&self.choice()?, self.profile.as_deref(), src)
    }

    /// The behavior's weight format (f32 unless --behavior-weights).
    pub fn weight_format(&self) -> WeightFormat {
        self.behavior_weights.unwrap_or_default()
    }

    /// The seed (0 when not given).
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }

    /// One plan for a loaded model, any strategy.
    pub fn plan_for(&self, src: ProfileSource<'_>) -> Result<LayerPlan> {
        let spec = self.resolve(src)?;
        Ok(PlanSampler::new(spec, src.config.num_layers, self.seed())?.next_plan()?)
    }

    /// The behavior these flags describe for a loaded model: one plan (any strategy) and the
    /// decoder in the chosen weight format (a re-quantized copy, or the f32 weights shared).
    pub fn behavior(
        &self,
        model_path: &Path,
        decoder: &Decoder,
        tokenizer: &Tokenizer,
    ) -> Result<(LayerPlan, Decoder)> {
        let plan = self.plan_for(ProfileSource {
            model_path,
            config: decoder.config(),
            tokenizer,
        })?;
        let behavior = decoder
            .quantized(self.weight_format())
            .context("while building the behavior's weights")?;
        Ok((plan, behavior))
    }
}
