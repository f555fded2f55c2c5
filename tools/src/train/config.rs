//! `nested-reft train`'s configuration: a TOML file, overridden by flags (and their
//! environment variables), validated once into [`TrainConfig`].

use crate::modelargs::{ModelArgs, PlanArgs};
use crate::profile::{resolve_choice, ProfileSource};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use learner::{Correction, Normalizer, TisMode, UpdateConfig};
use model::{DeviceSpec, PlanChoice, PlanKeys};
use rewards::RewardSpec;
use rollout_server::dataset::DatasetSpec;
use rollout_server::GeneratorConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the generator and the learner are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One process: generate a batch, train on it, repeat.
    Local,
    /// Two processes (rollout server and learner), strictly alternating: the server waits for
    /// the weights trained on its last batch before it generates the next (the baseline).
    Sync,
    /// Two processes, overlapped: the server generates batch k+1 while the learner trains on
    /// batch k, at most `max_staleness` batches ahead.
    #[default]
    Async,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Sync => "sync",
            Self::Async => "async",
        })
    }
}

/// What the learner does when writing a checkpoint fails (a full disk, an I/O error): the
/// failed checkpoint is removed either way and `LATEST` stays on the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointFailure {
    /// Stop the learner with the error (the run can be resumed from the previous checkpoint).
    Stop,
    /// Log the error, count it in the metrics, train on and try again at the next interval
    /// (the default: the weights are safe in memory, and a checkpoint only bounds how much a
    /// crash would cost, so a disk that is full for a while should not end the run).
    #[default]
    Retry,
}

impl std::fmt::Display for CheckpointFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stop => "stop",
            Self::Retry => "retry",
        })
    }
}

/// `--correction` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CorrectionArg {
    /// No correction: treat the nested samples as on-policy (biased; the control).
    None,
    /// Sequence-level importance sampling ∏ρ (unbiased, high variance).
    SeqIs,
    /// Truncated per-token importance sampling min(ρ, C).
    Tis,
    /// Retrace-style trace ∏ λ·min(1, ρ).
    Retrace,
}

/// The plan part of the config file: the plan choice (the same keys as the plan flags, see
/// [`PlanKeys`]), checked when the file is read, and two settings of their own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PlanSection", into = "PlanSection")]
pub struct PlanFile {
    /// Which plans the behavior runs.
    pub choice: PlanChoice,
    /// The calibration profile of the calibrated and adaptive strategies (default: next to the
    /// model).
    pub profile: Option<PathBuf>,
    /// The behavior's linear weights: `f32`, `q8_0` or `q4_0`.
    pub behavior_weights: Option<String>,
}

/// `[plan]` as written: the choice's keys, `profile` and `behavior_weights`; any other key is
/// an error.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct PlanSection {
    #[serde(flatten)]
    keys: PlanKeys,
    profile: Option<PathBuf>,
    behavior_weights: Option<String>,
    /// Keys of no known meaning (refused).
    #[serde(flatten, skip_serializing)]
    unknown: std::collections::BTreeMap<String, toml::Value>,
}

impl TryFrom<PlanSection> for PlanFile {
    type Error = anyhow::Error;
    fn try_from(s: PlanSection) -> Result<Self> {
        if let Some(key) = s.unknown.keys().next() {
            bail!(
                "unknown key `{key}` in [plan] (expected skip_ratio, skip_ratio_max, strategy, \
                 skip_layers, kl_budget, profile or behavior_weights)"
            );
        }
        let file = PlanFile {
            choice: PlanChoice::from_keys(s.keys)?,
            profile: s.profile,
            behavior_weights: s.behavior_weights,
        };
        file.weight_format()?;
        Ok(file)
    }
}

impl From<PlanFile> for PlanSection {
    fn from(f: PlanFile) -> Self {
        PlanSection {
            keys: f.choice.keys(),
            profile: f.profile,
            behavior_weights: f.behavior_weights,
            unknown: Default::default(),
        }
    }
}

/// The config file of `nested-reft train`; every key is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainFile {
    /// How the two halves run.
    pub mode: Mode,
    /// Training steps (one batch each).
    pub steps: u64,
    /// Seed of plans, sampling and the data order.
    pub seed: u64,
    /// Model path (default: the embedded default model).
    pub model: Option<PathBuf>,
    /// Where both processes run the model: `"cpu"`, `"cuda"` or `"cuda:N"`.
    pub device: DeviceSpec,
    /// Output directory (default: `runs/train-<local time>`).
    pub output_dir: Option<PathBuf>,
    /// Save the trained model at the end.
    pub save_model: bool,
    /// The prompts.
    pub dataset: DatasetSpec,
    /// The reward.
    pub reward: RewardSpec,
    /// The behavior's layer plan per batch.
    pub plan: PlanFile,
    /// Generation.
    pub generator: GeneratorConfig,
    /// The update.
    pub update: UpdateConfig,
    /// Two-process modes: how many policy versions a trained sample may lag behind (older
    /// groups are dropped and counted); the server runs at most this many batches ahead.
    /// `sync` forces 0.
    pub max_staleness: u64,
    /// Longest prompt in tokens the ring's slots hold (a longer one is an error).
    pub max_prompt_tokens: u32,
    /// Two-process modes: write a checkpoint every this many steps (0: never).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest); 1 is what resuming needs.
    pub keep_checkpoints: usize,
    /// What a failed checkpoint does: `"stop"` the learner or `"retry"` at the next interval.
    pub checkpoint_failure: CheckpointFailure,
    /// Two-process modes: CPU threads of the learner process (0: half of the machine's).
    pub learner_threads: usize,
    /// Two-process modes: CPU threads of the rollout-server process (0: the other half).
    pub server_threads: usize,
    /// Two-process modes: pin each process to its own cores.
    pub pin_cores: bool,
    /// Two-process modes: seconds without a heartbeat (each process beats once a second)
    /// after which a process that still holds its side of the ring is reported hung, by name
    /// and pid; `nested-reft train` then stops the run.
    pub hang_timeout_s: f64,
    /// LoRA: train low-rank adapters on a frozen base instead of every weight (`[lora]` with
    /// `rank`, `alpha` (default 2·rank) and `targets` (default all seven linear layers));
    /// absent: full fine-tuning.
    pub lora: Option<model::LoraConfig>,
}

/// Defaults of `nested-reft train` with no arguments: the embedded SmolLM2-135M on level-1
/// arithmetic, sized so that the mean reward visibly rises within minutes on two CPU cores.
impl Default for TrainFile {
    fn default() -> Self {
        Self {
            mode: Mode::Async,
            steps: 30,
            seed: 0,
            model: None,
            device: DeviceSpec::Cpu,
            output_dir: None,
            save_model: true,
            dataset: DatasetSpec::Arithmetic {
                level: 1,
                count: 1000,
                seed: 0,
            },
            reward: RewardSpec::Math(rewards::MathConfig::default()),
            plan: PlanFile::default(),
            generator: GeneratorConfig {
                prompts_per_batch: 8,
                group_size: 4,
                max_new_tokens: 64,
                temperature: 0.7,
                ..GeneratorConfig::default()
            },
            update: UpdateConfig {
                temperature: 0.7,
                optim: learner::OptimConfig {
                    lr: 3e-5,
                    ..learner::OptimConfig::default()
                },
                ..UpdateConfig::default()
            },
            max_staleness: 1,
            max_prompt_tokens: 1024,
            checkpoint_every: 10,
            keep_checkpoints: 1,
            checkpoint_failure: CheckpointFailure::Retry,
            learner_threads: 0,
            server_threads: 0,
            pin_cores: false,
            // Three default CPU steps: far beyond any scheduling delay of a beating thread,
            // short enough that a stopped run does not sit for the watchdog's 5 minutes.
            hang_timeout_s: 60.0,
            lora: None,
        }
    }
}

/// The LoRA flags of `nested-reft train` and of both services (which must agree: the
/// handshake refuses a peer with other adapters).
#[derive(Debug, Clone, Default, Args)]
pub struct LoraArgs {
    /// Train LoRA adapters of rank R on a frozen base instead of every weight (0: full
    /// fine-tuning, overriding a config file's `[lora]`). The learner keeps no gradients or
    /// optimizer state for the base, checkpoints and publishes the adapters alone, and the
    /// run's `adapter/` holds them as a PEFT adapter beside the merged `model/`.
    #[arg(long, value_name = "R", env = "NESTED_REFT_LORA_RANK")]
    pub lora_rank: Option<usize>,
    /// LoRA scale numerator: the adapters' update is scaled by alpha / R [default: 2·R].
    #[arg(long, value_name = "ALPHA", env = "NESTED_REFT_LORA_ALPHA")]
    pub lora_alpha: Option<f64>,
    /// The linear layers of every decoder layer that get adapters, comma-separated from q, k,
    /// v, o, gate, up, down (or `all`) [default: all].
    #[arg(long, value_name = "LIST", env = "NESTED_REFT_LORA_TARGETS")]
    pub lora_targets: Option<String>,
}

impl LoraArgs {
    /// Applies the flags to the configuration's `lora`: a rank (re)sets it, alpha and the
    /// targets adjust it (given alone, they need a `[lora]` in the file).
    pub fn apply(&self, lora: &mut Option<model::LoraConfig>) -> Result<()> {
        let targets = match &self.lora_targets {
            Some(list) => Some(
                model::LoraConfig::parse_targets(list)
                    .with_context(|| format!("while reading --lora-targets {list:?}"))?,
            ),
            None => None,
        };
        let rank = match (self.lora_rank, lora.as_ref()) {
            (Some(0), _) => {
                if self.lora_alpha.is_some() || targets.is_some() {
                    bail!("--lora-alpha and --lora-targets need a LoRA rank above 0");
                }
                *lora = None;
                return Ok(());
            }
            (Some(r), _) => r,
            (None, Some(l)) => l.rank(),
            (None, None) => {
                if self.lora_alpha.is_some() || targets.is_some() {
                    bail!("--lora-alpha and --lora-targets need --lora-rank (or a [lora] section)");
                }
                return Ok(());
            }
        };
        // A new rank without its own alpha takes the default for that rank, so that the
        // scale alpha/r stays what the default promises.
        let alpha = match (self.lora_alpha, self.lora_rank, lora.as_ref()) {
            (Some(a), _, _) => a,
            (None, None, Some(l)) => l.alpha(),
            _ => model::LoraConfig::default_alpha(rank),
        };
        let targets = targets
            .or_else(|| lora.as_ref().map(|l| l.targets().clone()))
            .unwrap_or_else(|| model::LoraTarget::ALL.into_iter().collect());
        *lora = Some(
            model::LoraConfig::with_targets(rank, alpha, targets).context("invalid LoRA flags")?,
        );
        Ok(())
    }
}

/// `nested-reft train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A TOML config file (see `nested-reft train --print-config` for every key and its
    /// default). Flags override it.
    #[arg(long, short, value_name = "FILE", env = "NESTED_REFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// How generation and training run: `local` (one process), `sync` (two processes,
    /// alternating) or `async` (two processes, overlapped) [default: async].
    #[arg(long, value_enum, env = "NESTED_REFT_MODE")]
    pub mode: Option<Mode>,
    /// Training steps; each generates one batch and makes one update [default: 30].
    #[arg(long, env = "NESTED_REFT_STEPS")]
    pub steps: Option<u64>,
    /// Where metrics.jsonl, samples.jsonl, reward.svg, config.toml and the trained model go
    /// [default: runs/train-<local time>].
    #[arg(long, short, value_name = "DIR", env = "NESTED_REFT_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    /// Do not save the trained model.
    #[arg(long)]
    pub no_save: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts: `arithmetic` or `arithmetic:LEVEL` (built-in generator, levels 1–5), `gsm8k`
    /// (the 100 fetched GSM8K problems) or a `.jsonl` file with `question` and `answer`
    /// fields [default: arithmetic:1].
    #[arg(long, value_name = "SPEC", env = "NESTED_REFT_DATASET")]
    pub dataset: Option<String>,
    /// A bad dataset line is fatal instead of skipped.
    #[arg(long)]
    pub strict: bool,
    /// The reward: `math`, `format`, an inline JSON spec or a TOML/JSON file [default: math].
    #[arg(long, value_name = "SPEC", env = "NESTED_REFT_REWARD")]
    pub reward: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Off-policy correction of the nested samples [default: tis].
    #[arg(long, value_enum, env = "NESTED_REFT_CORRECTION")]
    pub correction: Option<CorrectionArg>,
    /// Cap C of `tis` [default: 2].
    #[arg(long, value_name = "C")]
    pub tis_cap: Option<f64>,
    /// `tis` masks ratios above C (weight 0) instead of truncating them to C.
    #[arg(long)]
    pub tis_mask: bool,
    /// λ of `retrace` [default: 1].
    #[arg(long, value_name = "λ")]
    pub retrace_lambda: Option<f64>,
    /// Prompts per batch [default: 8].
    #[arg(long, value_name = "N", env = "NESTED_REFT_PROMPTS_PER_BATCH")]
    pub prompts_per_batch: Option<usize>,
    /// Completions per prompt, G [default: 4].
    #[arg(long, short = 'g', value_name = "G", env = "NESTED_REFT_GROUP_SIZE")]
    pub group_size: Option<usize>,
    /// Token limit of a completion [default: 64].
    #[arg(long, value_name = "N", env = "NESTED_REFT_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; the target is scored at the same one [default: 0.7].
    #[arg(long, env = "NESTED_REFT_TEMPERATURE")]
    pub temperature: Option<f32>,
    /// Peak learning rate of AdamW [default: 3e-5].
    #[arg(long, env = "NESTED_REFT_LR")]
    pub lr: Option<f64>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Optimizer steps per batch; above 1 the PPO-clipped decoupled objective applies [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// β of a k3 KL penalty to the initial model (0: none) [default: 0].
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// β of the nested consistency term β·KL(sg(π_full) ‖ π_nested) over the completion
    /// tokens: keeps the sub-network of the batch's behavior plan close to the full model (as
    /// layer dropout does for early-exit models). Costs one extra full-depth forward and one
    /// nested forward + backward per micro-batch (nothing when the plan is full); 0 = off
    /// [default: 0].
    #[arg(long, value_name = "β")]
    pub consistency_beta: Option<f64>,
    /// Loss normaliser [default: token-mean].
    #[arg(long, value_enum)]
    pub normalizer: Option<NormalizerArg>,
    /// Do not divide advantages by the group's standard deviation ("Dr. GRPO").
    #[arg(long)]
    pub no_std: bool,
    /// Positions per learner micro-batch (prompts, completions and padding): bounds memory,
    /// not the result [default: 2048].
    #[arg(long, value_name = "N")]
    pub micro_batch_tokens: Option<usize>,
    /// The learner computes each completion with its own copy of the prompt instead of once
    /// per group (the same gradient up to rounding, more work; config `update.prefix_sharing`).
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// The learner pads one row per sequence (or shared-prompt group) to the micro-batch's
    /// longest instead of packing them back to back (the same gradient, more work; config
    /// `update.packing`). With --no-prefix-sharing this is the plain padded layout.
    #[arg(long)]
    pub no_packing: bool,
    /// `async`: how many policy versions a trained sample may lag [default: 1].
    #[arg(long, value_name = "N")]
    pub max_staleness: Option<u64>,
    /// Two-process modes: checkpoint every N steps (0: never) [default: 10].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Two-process modes: checkpoints kept, the newest (≥ 1; each holds the model and the
    /// optimizer's moments, three times the model's size) [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: Option<u64>,
    /// Two-process modes: when a checkpoint cannot be written, `stop` the learner or `retry`
    /// at the next interval (training goes on) [default: retry].
    #[arg(long, value_enum)]
    pub checkpoint_failure: Option<CheckpointFailure>,
    /// Two-process modes: CPU threads of the learner [default: half of the cores].
    #[arg(long, value_name = "N")]
    pub learner_threads: Option<usize>,
    /// Two-process modes: CPU threads of the rollout server [default: the other half].
    #[arg(long, value_name = "N")]
    pub server_threads: Option<usize>,
    /// Two-process modes: pin each process to its own cores.
    #[arg(long)]
    pub pin_cores: bool,
    /// Two-process modes: continue from the latest checkpoint in the output directory (and
    /// the server's saved data cursor) instead of starting over.
    #[arg(long)]
    pub resume: bool,
    /// Two-process modes: log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Two-process modes: seconds without a heartbeat before a process is reported hung and
    /// the run stops [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub hang_timeout: Option<f64>,
    #[command(flatten)]
    pub lora: LoraArgs,
}

/// `--normalizer` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NormalizerArg {
    /// Mean over all completion tokens of the batch.
    TokenMean,
    /// Mean over each sequence, then over sequences.
    SequenceMean,
}

/// The validated configuration a run uses (saved as `config.toml` in the output directory).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The merged file form (what is saved).
    pub file: TrainFile,
    /// Where the run writes.
    pub output_dir: PathBuf,
}

impl TrainArgs {
    /// Reads the file (if any), applies the flags and validates.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut f = match &self.config {
            Some(path) => read_file(path)?,
            None => TrainFile::default(),
        };
        self.apply(&mut f)?;
        validate(&mut f)?;
        let output_dir = match &f.output_dir {
            Some(d) => d.clone(),
            None => crate::rundir::new_run_dir("train"),
        };
        Ok(TrainConfig {
            file: f,
            output_dir,
        })
    }

    fn apply(&self, f: &mut TrainFile) -> Result<()> {
        macro_rules! set {
            ($flag:expr => $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.mode => f.mode);
        set!(self.steps => f.steps);
        if self.output_dir.is_some() {
            f.output_dir = self.output_dir.clone();
        }
        if self.no_save {
            f.save_model = false;
        }
        if self.model.model.is_some() {
            f.model = self.model.model.clone();
        }
        if let Some(d) = self.model.device {
            f.device = d;
        }
        if let Some(d) = &self.dataset {
            f.dataset = d
                .parse()
                .with_context(|| format!("while reading --dataset {d:?}"))?;
        }
        if self.strict {
            match &mut f.dataset {
                DatasetSpec::Jsonl { strict, .. } => *strict = true,
                _ => bail!("--strict applies to a JSON Lines dataset only"),
            }
        }
        if let Some(r) = &self.reward {
            f.reward =
                RewardSpec::from_arg(r).with_context(|| format!("while reading --reward {r:?}"))?;
        }
        let p = &self.plan;
        // The plan choice (ratio, range, strategy, explicit units) is replaced as a whole;
        // the profile, KL budget and weight format are separate settings, each kept from the
        // file unless its own flag is given.
        if p.keys().chooses() {
            f.plan.choice = p.choice()?;
        } else if let Some(b) = p.kl_budget {
            f.plan.choice = f
                .plan
                .choice
                .clone()
                .with_kl_budget(b)
                .context("--kl-budget")?;
        }
        if let Some(path) = &p.profile {
            f.plan.profile = Some(path.clone());
        }
        if let Some(w) = p.behavior_weights {
            f.plan.behavior_weights = Some(w.to_string());
        }
        set!(p.seed => f.seed);
        let u = &mut f.update;
        if let Some(c) = self.correction {
            u.correction = match c {
                CorrectionArg::None => Correction::None,
                CorrectionArg::SeqIs => Correction::SeqIs,
                CorrectionArg::Tis => Correction::Tis {
                    cap: 2.0,
                    mode: TisMode::Truncate,
                },
                CorrectionArg::Retrace => Correction::Retrace { lambda: 1.0 },
            };
        }
        if self.tis_cap.is_some() || self.tis_mask {
            let Correction::Tis { cap, mode } = &mut u.correction else {
                bail!("--tis-cap and --tis-mask apply to --correction tis only");
            };
            set!(self.tis_cap => *cap);
            if self.tis_mask {
                *mode = TisMode::Mask;
            }
        }
        if let Some(l) = self.retrace_lambda {
            let Correction::Retrace { lambda } = &mut u.correction else {
                bail!("--retrace-lambda applies to --correction retrace only");
            };
            *lambda = l;
        }
        set!(self.lr => u.optim.lr);
        set!(self.warmup_steps => u.optim.warmup_steps);
        set!(self.epochs => u.epochs);
        set!(self.kl_coef => u.kl_coef);
        set!(self.consistency_beta => u.consistency_beta);
        set!(self.micro_batch_tokens => u.micro_batch_tokens);
        set!(self.max_staleness => f.max_staleness);
        set!(self.checkpoint_every => f.checkpoint_every);
        if let Some(k) = self.keep_checkpoints {
            f.keep_checkpoints = usize::try_from(k).context("--keep-checkpoints is too large")?;
        }
        set!(self.checkpoint_failure => f.checkpoint_failure);
        set!(self.learner_threads => f.learner_threads);
        set!(self.server_threads => f.server_threads);
        set!(self.hang_timeout => f.hang_timeout_s);
        if self.pin_cores {
            f.pin_cores = true;
        }
        if let Some(n) = self.normalizer {
            u.normalizer = match n {
                NormalizerArg::TokenMean => Normalizer::TokenMean,
                NormalizerArg::SequenceMean => Normalizer::SequenceMean,
            };
        }
        if self.no_std {
            u.advantage.scale_by_std = false;
        }
        if self.no_prefix_sharing {
            u.prefix_sharing = false;
        }
        if self.no_packing {
            u.packing = false;
        }
        let g = &mut f.generator;
        set!(self.prompts_per_batch => g.prompts_per_batch);
        set!(self.group_size => g.group_size);
        set!(self.max_new_tokens => g.max_new_tokens);
        if let Some(t) = self.temperature {
            g.temperature = t;
            f.update.temperature = t;
        }
        self.lora.apply(&mut f.lora)?;
        Ok(())
    }
}

/// Reads a config file (or the defaults without one) and validates it, as the service
/// binaries do.
pub fn load_config_file(path: Option<&Path>) -> Result<TrainFile> {
    let mut f = match path {
        Some(p) => read_file(p)?,
        None => TrainFile::default(),
    };
    validate(&mut f)?;
    Ok(f)
}

fn read_file(path: &Path) -> Result<TrainFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading the config file {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("while parsing the config file {}", path.display()))
}

/// Checks the merged file once; the run then trusts it.
fn validate(f: &mut TrainFile) -> Result<()> {
    if f.steps == 0 {
        bail!("steps must be at least 1");
    }
    // The plan section was checked when it was read (the profile itself is read when the
    // model is known).
    f.generator.seed = f.seed;
    // Truncated sampling is refused here, at the edge, with the generator's reason.
    f.generator = f
        .generator
        .clone()
        .validate()
        .context("while checking the [generator] section")?;
    let (g, u) = (f.generator.sampling_params(), &f.update);
    for (name, gv, uv) in [
        (
            "temperature",
            g.temperature.to_string(),
            u.temperature.to_string(),
        ),
        ("top_p", g.top_p.to_string(), u.top_p.to_string()),
        ("top_k", g.top_k.to_string(), u.top_k.to_string()),
    ] {
        if gv != uv {
            bail!(
                "generator.{name} ({gv}) and update.{name} ({uv}) differ: the learner must \
                 score the target with the sampling the behavior used"
            );
        }
    }
    if f.update.optim.total_steps == 0 {
        // The schedule counts optimizer steps: `epochs` per training step.
        f.update.optim.total_steps = f.steps.saturating_mul(f.update.epochs as u64);
    }
    if f.mode == Mode::Sync {
        f.max_staleness = 0;
    }
    if f.keep_checkpoints == 0 {
        bail!("keep_checkpoints must be at least 1");
    }
    if !(f.hang_timeout_s.is_finite() && f.hang_timeout_s > 0.0) {
        bail!(
            "hang_timeout_s must be a positive number of seconds, got {}",
            f.hang_timeout_s
        );
    }
    if f.max_prompt_tokens == 0 {
        bail!("max_prompt_tokens must be at least 1");
    }
    f.generator = f.generator.clone().validate()?;
    f.update = f.update.clone().validate()?;
    Ok(())
}

impl TrainFile {
    /// The generator this configuration describes: dataset, reward, plan and sampling, for a
    /// model of `num_layers` layers. `warn` receives each skipped dataset line.
    pub fn generator(
        &self,
        model: &ModelSource<'_>,
        tokenizer: model::Tokenizer,
        warn: impl Fn(&str),
    ) -> Result<rollout_server::Generator> {
        let num_layers = model.config.num_layers;
        let dataset = rollout_server::dataset::Dataset::open(&self.dataset)
            .context("while loading the dataset")?;
        for s in &dataset.stats().skipped {
            warn(&s.to_string());
        }
        let reward = self.reward.build().context("while starting the reward")?;
        let plan = resolve_choice(
            &self.plan.choice,
            self.plan.profile.as_deref(),
            ProfileSource {
                model_path: model.path,
                config: model.config,
                tokenizer: &tokenizer,
            },
        )?;
        rollout_server::Generator::new(
            self.generator.clone(),
            dataset,
            plan,
            num_layers,
            reward,
            tokenizer,
        )
        .context("while setting up generation")
    }
}

/// The model a generator is built for: where it is (its profile lives next to it) and its
/// configuration.
#[derive(Debug, Clone, Copy)]
pub struct ModelSource<'a> {
    /// The model's path.
    pub path: &'a Path,
    /// Its configuration.
    pub config: &'a model::ModelConfig,
}

impl PlanFile {
    /// The behavior's weight format.
    pub fn weight_format(&self) -> Result<model::WeightFormat> {
        Ok(match &self.behavior_weights {
            Some(w) => w.parse().context("in plan.behavior_weights")?,
            None => model::WeightFormat::F32,
        })
    }
}
