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
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the model (f32 on CPU) with a spinner.
    pub fn load(&self) -> Result<LoadedModel> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => crate::assets::default_model()?,
        };
        let bar = ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let loaded = model::load_model(&path, &LoadOptions::default())
            .with_context(|| format!("while loading the model from {}", path.display()));
        bar.finish_and_clear();
        loaded
    }
}

/// Which decoder layers run: the full model, a nested plan drawn from a skip ratio, or an
/// explicit skip list.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Fraction r of layers to skip: k = round(r·L) middle layers are dropped (first and last are
    /// always kept). 0 runs the full model.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub skip_ratio: f64,
    /// Draw r uniformly from [--skip-ratio, --skip-ratio-max] instead of fixing it.
    #[arg(long, value_name = "R")]
    pub skip_ratio_max: Option<f64>,
    /// How the skipped layers are chosen.
    #[arg(long, value_enum, default_value_t = StrategyArg::Random)]
    pub plan_strategy: StrategyArg,
    /// Explicit layers to skip, e.g. `5,10,15` (overrides --skip-ratio).
    #[arg(long, value_delimiter = ',', value_name = "L,L,...")]
    pub skip_layers: Option<Vec<usize>>,
    /// Seed for the plan draw and for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    /// The plan for a model with `num_layers` layers.
    pub fn plan(&self, num_layers: usize) -> Result<LayerPlan> {
        let spec = match &self.skip_layers {
            Some(skip) => {
                if self.skip_ratio != 0.0 || self.skip_ratio_max.is_some() {
                    bail!("--skip-layers and --skip-ratio cannot be combined");
                }
                PlanSpec::Explicit(LayerPlan::skipping(skip, num_layers)?)
            }
            None => PlanSpec::Nested {
                ratio: match self.skip_ratio_max {
                    Some(max) => SkipRatio::Range {
                        min: self.skip_ratio,
                        max,
                    },
                    None => SkipRatio::Fixed(self.skip_ratio),
                },
                strategy: match self.plan_strategy {
                    StrategyArg::Random => PlanStrategy::Random,
                    StrategyArg::Contiguous => PlanStrategy::Contiguous,
                },
            },
        };
        Ok(PlanSampler::new(spec, num_layers, self.seed)?.next_plan()?)
    }
}
