//! Options every model command shares: which model, and which layer plan.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::{LayerPlan, LoadOptions, LoadedModel, PlanSampler, PlanSpec, PlanStrategy, SkipRatio};
use std::path::PathBuf;
use std::time::Duration;

/// Which model to load.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched into the asset cache on first use.
    #[arg(long, value_name = "PATH", env = "NESTED_REFT_MODEL")]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the model (f32 on CPU) with a spinner.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_with(&LoadOptions::default())
    }

    /// The model's path: the given one, else the default model (fetched when missing).
    pub fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => crate::assets::default_model(),
        }
    }

    /// The model's path without fetching anything (for the services): the given one, else
    /// the default model in the asset cache; a clear error when it is not there.
    pub fn existing_path(&self) -> Result<PathBuf> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => crate::assets::assets_dir().join(crate::assets::DEFAULT_MODEL_FILE),
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

    /// Loads the model with `opts` (e.g. trainable) with a spinner.
    pub fn load_with(&self, opts: &LoadOptions) -> Result<LoadedModel> {
        let path = self.path()?;
        let bar = ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let loaded = model::load_model(&path, opts)
            .with_context(|| format!("while loading the model from {}", path.display()));
        bar.finish_and_clear();
        loaded
    }
}

/// Which decoder layers run: the full model, a nested plan drawn from a skip ratio, or an
/// explicit skip list. Every flag is optional so that a config file can supply the plan.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Fraction r of layers to skip: k = round(r·L) middle layers are dropped (first and last are
    /// always kept). 0 (the default) runs the full model.
    #[arg(long, value_name = "R", env = "NESTED_REFT_SKIP_RATIO")]
    pub skip_ratio: Option<f64>,
    /// Draw r uniformly from [--skip-ratio, --skip-ratio-max] for every batch instead of fixing it.
    #[arg(long, value_name = "R", env = "NESTED_REFT_SKIP_RATIO_MAX")]
    pub skip_ratio_max: Option<f64>,
    /// How the skipped layers are chosen [default: random].
    #[arg(long, value_enum, env = "NESTED_REFT_PLAN_STRATEGY")]
    pub plan_strategy: Option<StrategyArg>,
    /// Explicit layers to skip, e.g. `5,10,15` (overrides --skip-ratio).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "L,L,...",
        env = "NESTED_REFT_SKIP_LAYERS"
    )]
    pub skip_layers: Option<Vec<usize>>,
    /// Seed for the plan draws and for sampling [default: 0].
    #[arg(long, env = "NESTED_REFT_SEED")]
    pub seed: Option<u64>,
}

/// `--plan-strategy` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StrategyArg {
    /// A random subset of the middle layers.
    Random,
    /// One contiguous block of middle layers.
    Contiguous,
}

impl PlanArgs {
    /// Whether any plan flag was given.
    pub fn is_set(&self) -> bool {
        self.skip_ratio.is_some()
            || self.skip_ratio_max.is_some()
            || self.plan_strategy.is_some()
            || self.skip_layers.is_some()
    }

    /// The plan spec these flags describe (the full model when none is given).
    pub fn spec(&self, num_layers: usize) -> Result<PlanSpec> {
        Ok(match &self.skip_layers {
            Some(skip) => {
                if self.skip_ratio.is_some() || self.skip_ratio_max.is_some() {
                    bail!("--skip-layers and --skip-ratio cannot be combined");
                }
                PlanSpec::Explicit(LayerPlan::skipping(skip, num_layers)?)
            }
            None => {
                let min = self.skip_ratio.unwrap_or(0.0);
                PlanSpec::Nested {
                    ratio: match self.skip_ratio_max {
                        Some(max) => SkipRatio::Range { min, max },
                        None => SkipRatio::Fixed(min),
                    },
                    strategy: match self.plan_strategy.unwrap_or(StrategyArg::Random) {
                        StrategyArg::Random => PlanStrategy::Random,
                        StrategyArg::Contiguous => PlanStrategy::Contiguous,
                    },
                }
            }
        })
    }

    /// The seed (0 when not given).
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }

    /// One plan for a model with `num_layers` layers.
    pub fn plan(&self, num_layers: usize) -> Result<LayerPlan> {
        let spec = self.spec(num_layers)?;
        Ok(PlanSampler::new(spec, num_layers, self.seed())?.next_plan()?)
    }
}
