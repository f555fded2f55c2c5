//! `nested-reft bench rollout`: what a behavior — the model that generates rollouts, a layer
//! plan × a weight format — buys in decode speed and costs in drift and accuracy, against the
//! full-depth f32 model, on one model.
//!
//! Per behavior: decode tokens/s at each batch size (greedy, a fixed number of new tokens, no
//! early stop), measured round-robin with the full-depth f32 baseline in the same run so that
//! machine noise hits both; the speedup over the baseline next to the ideal one
//! (1 / [`LayerPlan::cost_ratio`]); the mean per-token KL(π_full,f32 ‖ π_behavior) on the full
//! model's own greedy completions ([`KlProbe`]); and greedy accuracy through
//! [`crate::eval::evaluate`]. Writes `rollout.json` and the KL-against-speedup picture
//! `frontier.svg`.

use crate::calibrate::{calibration_sequences, default_profile_path, load_profile, model_hash};
use crate::eval::{evaluate, EvalConfig, EvalSet, PromptFormat, DEFAULT_PROBLEM_SEED};
use crate::modelargs::ModelArgs;
use crate::train::TrainFile;
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::calibrate::KlProbe;
use model::{
    generate, Decoder, GenerationConfig, LayerPlan, ModelConfig, PlanSampler, PlanSpec,
    PlanStrategy, Profile, Sampling, SkipRatio, Unit, WeightFormat, CALIBRATED_WINDOW,
};
use plotters::prelude::*;
use rollout_server::dataset::Dataset;
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The long help of `bench rollout`: what it measures.
pub const LONG_ABOUT: &str = "Compares behaviors — the model that generates rollouts: a layer \
plan times a weight format — against the full-depth f32 model, on one model (default: \
SmolLM2-135M-Instruct).

Speed: each behavior greedily decodes --new-tokens tokens (no early stop: every behavior decodes \
the same count) for the first B prompts of the arithmetic level-1 training data, for each batch \
size B of --batches, --repeats times. The full-depth f32 baseline is measured in the same run, \
round-robin with the behaviors (every repeat runs the baseline and every behavior once, in a \
rotating order), so that machine noise affects both. Reported: the median decode tokens/s (the \
tokens of the decode steps over their time; the prefill and the first token it yields are left \
out, and are in rollout.json as generation tokens/s), and the speedup = behavior tokens/s / \
baseline tokens/s, next to the ideal speedup 1 / cost ratio, where the cost ratio counts the \
weights a decoded token reads (their number, not their bytes: re-quantizing leaves it as the \
plan's).

Drift: the mean per-token KL(pi_full,f32 || pi_behavior) over the vocabulary at temperature 1, \
on the full f32 model's own greedy completions of --kl-problems problems of the arithmetic \
level-1 training data (the calibration set of `nested-reft calibrate`).

Accuracy: greedy accuracy on arithmetic level 1 (the held-out draw of `nested-reft eval`) and \
on the GSM8K problems, the first --eval-limit problems of each (default 20, since CPU time is \
scarce; the numbers are then coarse: one problem is 5 points), scored exactly as `nested-reft \
eval` and training score. --no-eval skips it.

Behaviors (--behaviors, comma-separated): PLAN[@FORMAT] with PLAN one of `full`, `random:R` \
(k = round(R*L) random middle layers skipped, fixed seed), `contiguous:R` (one block of k \
layers), `calibrated:R` (the calibration profile's skip set whose cost ratio is nearest to \
1 - R; needs `nested-reft calibrate`), `layers:U,U,...` (explicit units: 12 = layer 12, a12 its \
attention block, m12 its MLP block), and FORMAT f32 (default), q8_0 or q4_0 (the linear layers \
re-quantized). The default set: full@q8_0, and at skip ratios 0.09, 0.2, 0.33 (ideal speedups \
of about 1.1x, 1.25x, 1.5x) random, contiguous and calibrated in f32 and calibrated in q8_0; \
without a profile the calibrated ones are left out with a note.

Threads: the machine's default (RAYON_NUM_THREADS if set) unless --threads; the table header \
says how many. Output: a table on stdout, rollout.json (every number, every repeat) and \
frontier.svg (KL against the measured speedup, one panel per batch size, one series per \
behavior family, the ideal speedups as hollow points) in --out-dir.";

/// The behaviors measured when `--behaviors` is not given.
pub const DEFAULT_BEHAVIORS: &str = "full@q8_0,\
random:0.09,random:0.2,random:0.33,\
contiguous:0.09,contiguous:0.2,contiguous:0.33,\
calibrated:0.09,calibrated:0.2,calibrated:0.33,\
calibrated:0.09@q8_0,calibrated:0.2@q8_0,calibrated:0.33@q8_0";

/// `nested-reft bench rollout`.
#[derive(Debug, Args)]
pub struct BenchRolloutArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The behaviors, comma-separated (or the option repeated): PLAN[@FORMAT], PLAN = full,
    /// random:R, contiguous:R, calibrated:R or layers:U,U,... (U = 12, a12, m12); FORMAT = f32
    /// (default), q8_0 or q4_0. E.g. `full@q8_0,random:0.2,layers:25,26@q8_0`
    /// [default: full@q8_0 and random, contiguous, calibrated (f32 and q8_0) at 0.09, 0.2, 0.33].
    #[arg(long, value_name = "LIST")]
    pub behaviors: Vec<String>,
    /// Batch sizes of the speed measurement (prompts decoded together); 32 is the default
    /// training batch (8 prompts × G = 4).
    #[arg(long, value_delimiter = ',', value_name = "B,B,...", default_values_t = [1usize, 8, 32])]
    pub batches: Vec<usize>,
    /// Tokens each prompt decodes in the speed measurement (no early stop).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed runs per behavior and batch size (and of the baseline); the median is reported.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeats: usize,
    /// Training problems whose greedy full-model completions the KL is measured on.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub kl_problems: usize,
    /// Sequences per forward batch of the KL measurement.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub kl_batch: usize,
    /// Problems per accuracy set (arithmetic level 1, GSM8K). Small by default because CPU
    /// time is scarce: at 20, one problem is 5 points of accuracy.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub eval_limit: usize,
    /// Skip the accuracy measurement.
    #[arg(long)]
    pub no_eval: bool,
    /// The calibration profile of the calibrated behaviors [default: next to the model, where
    /// `nested-reft calibrate` writes it].
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// CPU threads (sets RAYON_NUM_THREADS for this process) [default: the machine's default].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seed of the random and contiguous plans.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where `rollout.json` and `frontier.svg` go (created if missing).
    #[arg(long, short = 'o', value_name = "DIR", default_value = "bench-rollout")]
    pub out_dir: PathBuf,
}

/// Which layers a behavior runs.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanKind {
    /// Every layer.
    Full,
    /// k = round(R·L) random middle layers skipped (seeded).
    Random(f64),
    /// One contiguous block of k = round(R·L) middle layers skipped (seeded).
    Contiguous(f64),
    /// The profile's skip set whose cost ratio is nearest to 1 − R.
    Calibrated(f64),
    /// These units skipped.
    Units(Vec<Unit>),
}

impl PlanKind {
    /// The kind's name: `full`, `random`, `contiguous`, `calibrated` or `layers`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Random(_) => "random",
            Self::Contiguous(_) => "contiguous",
            Self::Calibrated(_) => "calibrated",
            Self::Units(_) => "layers",
        }
    }

    /// What follows the colon: the ratio or the unit list (empty for `full`).
    pub fn argument(&self) -> String {
        match self {
            Self::Full => String::new(),
            Self::Random(r) | Self::Contiguous(r) | Self::Calibrated(r) => r.to_string(),
            Self::Units(u) => u.iter().map(Unit::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full => f.write_str("full"),
            other => write!(f, "{}:{}", other.name(), other.argument()),
        }
    }
}

/// One behavior: a plan and the storage of the linear weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    /// Which layers run.
    pub plan: PlanKind,
    /// The weight format.
    pub format: WeightFormat,
}

impl Behavior {
    /// `PLAN@FORMAT`, e.g. `random:0.2@f32`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.plan, self.format)
    }

    /// The series of the plot: plan kind and weight format, e.g. `calibrated q8_0`.
    pub fn family(&self) -> String {
        format!("{} {}", self.plan.name(), self.format)
    }
}

/// The plan kinds a behavior starts with.
const KINDS: [&str; 5] = ["full", "random", "contiguous", "calibrated", "layers"];
/// What a behavior looks like, for error messages.
const BEHAVIOR_FORMS: &str = "full, random:R, contiguous:R, calibrated:R or layers:U,U,... \
(U = 12, a12, m12), optionally followed by @f32, @q8_0 or @q4_0";

impl FromStr for Behavior {
    type Err = anyhow::Error;

    /// `PLAN[@FORMAT]`; the forms are listed in `BEHAVIOR_FORMS`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (plan_text, format) = match s.rsplit_once('@') {
            Some((p, f)) => (
                p.trim(),
                f.trim()
                    .parse::<WeightFormat>()
                    .map_err(|e| anyhow!("behavior `{s}`: {e}"))?,
            ),
            None => (s, WeightFormat::F32),
        };
        let (kind, arg) = match plan_text.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (plan_text, None),
        };
        let ratio = |arg: Option<&str>| -> Result<f64> {
            let a = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
                anyhow!("behavior `{s}`: `{kind}` needs a skip ratio, e.g. `{kind}:0.2`")
            })?;
            let r: f64 = a
                .parse()
                .map_err(|_| anyhow!("behavior `{s}`: the skip ratio `{a}` is not a number"))?;
            ensure!(
                r > 0.0 && r < 1.0,
                "behavior `{s}`: the skip ratio {r} must lie strictly between 0 and 1 (use \
                 `full` for no skipping)"
            );
            Ok(r)
        };
        let plan = match kind {
            "full" => {
                ensure!(arg.is_none(), "behavior `{s}`: `full` takes no argument");
                PlanKind::Full
            }
            "random" => PlanKind::Random(ratio(arg)?),
            "contiguous" => PlanKind::Contiguous(ratio(arg)?),
            "calibrated" => PlanKind::Calibrated(ratio(arg)?),
            "layers" => {
                let a = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
                    anyhow!("behavior `{s}`: `layers` needs the units to skip, e.g. `layers:25,a5`")
                })?;
                let units = a
                    .split(',')
                    .map(str::parse::<Unit>)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| anyhow!("behavior `{s}`: {e}"))?;
                PlanKind::Units(units)
            }
            "" => bail!("behavior `{s}` names no plan (expected {BEHAVIOR_FORMS})"),
            other => bail!("behavior `{s}`: unknown plan `{other}` (expected {BEHAVIOR_FORMS})"),
        };
        Ok(Self { plan, format })
    }
}

/// Parses a comma-separated behavior list. A `layers:` entry takes the following entries that
/// are units (`layers:4,10,a5,m7@q8_0,random:0.2` is two behaviors); its `@FORMAT`, if any,
/// comes after its last unit. A behavior listed twice is an error.
pub fn parse_behaviors(list: &str) -> Result<Vec<Behavior>> {
    let mut items: Vec<String> = Vec::new();
    for raw in list.split(',') {
        let t = raw.trim();
        ensure!(
            !t.is_empty(),
            "the behavior list `{list}` has an empty entry (expected {BEHAVIOR_FORMS})"
        );
        let head = t.split([':', '@']).next().unwrap_or("").trim();
        match items.last_mut() {
            Some(prev)
                if !KINDS.contains(&head) && prev.starts_with("layers:") && !prev.contains('@') =>
            {
                prev.push(',');
                prev.push_str(t);
            }
            _ => items.push(t.to_string()),
        }
    }
    let behaviors = items
        .iter()
        .map(|i| i.parse::<Behavior>())
        .collect::<Result<Vec<_>>>()?;
    for (i, b) in behaviors.iter().enumerate() {
        ensure!(
            !behaviors[..i].contains(b),
            "behavior `{}` is listed twice",
            b.label()
        );
    }
    Ok(behaviors)
}

/// The median of `v` (the mean of the two middle values for an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Speedup of a behavior over the baseline: behavior tokens/s ÷ baseline tokens/s (0 when the
/// baseline measured nothing).
pub fn speedup(behavior_tokens_per_s: f64, baseline_tokens_per_s: f64) -> f64 {
    if baseline_tokens_per_s > 0.0 {
        behavior_tokens_per_s / baseline_tokens_per_s
    } else {
        0.0
    }
}

/// The speed of one behavior at one batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Prompts decoded together.
    pub batch: usize,
    /// Median decode tokens/s: the tokens of the decode steps (all but the first of each
    /// prompt, which the prefill yields) over the decode time.
    pub tokens_per_s: f64,
    /// `tokens_per_s` ÷ the baseline's.
    pub speedup: f64,
    /// Median generated tokens per second of prefill + decode.
    pub generation_tokens_per_s: f64,
    /// `generation_tokens_per_s` ÷ the baseline's.
    pub generation_speedup: f64,
    /// Every repeat's decode tokens/s, in the order run.
    pub repeats: Vec<f64>,
    /// Every repeat's generation tokens/s, in the order run.
    pub generation_repeats: Vec<f64>,
}

/// Greedy accuracy on one problem set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetAccuracy {
    /// The set, e.g. `arithmetic:1` or `gsm8k`.
    pub set: String,
    /// Problems evaluated.
    pub problems: usize,
    /// Problems answered correctly.
    pub correct: usize,
    /// `correct / problems`.
    pub accuracy: f64,
}

/// Everything measured for one behavior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BehaviorResult {
    /// `PLAN@FORMAT`.
    pub behavior: String,
    /// The plot series: plan kind and format.
    pub family: String,
    /// The weight format.
    pub weights: WeightFormat,
    /// The plan that ran.
    pub plan: LayerPlan,
    /// The plan in words.
    pub plan_text: String,
    /// The skipped units (`12`, `a12`, `m12`).
    pub skipped_units: Vec<String>,
    /// Decode cost relative to the full model ([`LayerPlan::cost_ratio`]).
    pub cost_ratio: f64,
    /// 1 / cost ratio.
    pub ideal_speedup: f64,
    /// Speed per batch size.
    pub throughput: Vec<Throughput>,
    /// Mean per-token KL(π_full,f32 ‖ π_behavior), nats.
    pub kl: f64,
    /// For a calibrated behavior: the KL the profile recorded for its set (f32 weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_kl: Option<f64>,
    /// Greedy accuracy per set (empty with `--no-eval`).
    pub accuracy: Vec<SetAccuracy>,
}

/// `rollout.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutReport {
    /// The model file or directory.
    pub model: PathBuf,
    /// Its model hash.
    pub model_hash: String,
    /// CPU threads candle used.
    pub threads: usize,
    /// Tokens decoded per prompt in the speed runs.
    pub new_tokens: usize,
    /// Timed runs per behavior and batch size.
    pub repeats: usize,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Seed of the random and contiguous plans.
    pub seed: u64,
    /// Sequences of the KL measurement.
    pub kl_sequences: usize,
    /// Completion tokens the KL is averaged over.
    pub kl_tokens: usize,
    /// What the KL sequences are.
    pub kl_source: String,
    /// The calibration profile used, if any.
    pub profile: Option<PathBuf>,
    /// Problems per accuracy set (`None` with `--no-eval`).
    pub eval_limit: Option<usize>,
    /// The full-depth f32 model (speedup 1, KL 0).
    pub baseline: BehaviorResult,
    /// One entry per behavior, in the order asked.
    pub behaviors: Vec<BehaviorResult>,
    /// Behaviors left out and other remarks.
    pub notes: Vec<String>,
}

/// A behavior with its plan resolved for the model.
struct Resolved {
    behavior: Behavior,
    plan: LayerPlan,
    profile_kl: Option<f64>,
}

/// The plan of `b` for a model with `cfg`. A calibrated behavior takes the profile's set
/// whose cost ratio is nearest to 1 − R; a remark goes to `notes` when it is far from it.
fn resolve_plan(
    b: &Behavior,
    cfg: &ModelConfig,
    profile: Option<&Profile>,
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<(LayerPlan, Option<f64>)> {
    let l = cfg.num_layers;
    let nested = |r: f64, strategy: PlanStrategy| -> Result<LayerPlan> {
        let spec = PlanSpec::Nested {
            ratio: SkipRatio::Fixed(r),
            strategy,
        };
        Ok(PlanSampler::new(spec, l, seed)?.next_plan()?)
    };
    Ok(match &b.plan {
        PlanKind::Full => (LayerPlan::full(l), None),
        PlanKind::Random(r) => (nested(*r, PlanStrategy::Random)?, None),
        PlanKind::Contiguous(r) => (nested(*r, PlanStrategy::Contiguous)?, None),
        PlanKind::Units(u) => (LayerPlan::skipping_units(u, l)?, None),
        PlanKind::Calibrated(r) => {
            let profile = profile.context("a calibrated behavior needs the calibration profile")?;
            let target = 1.0 - r;
            let set = profile
                .sets
                .iter()
                .min_by(|x, y| {
                    (x.cost_ratio - target)
                        .abs()
                        .total_cmp(&(y.cost_ratio - target).abs())
                })
                .context("the calibration profile has no skip sets")?;
            if (set.cost_ratio - target).abs() > CALIBRATED_WINDOW {
                notes.push(format!(
                    "{}: the profile's nearest set costs {:.3}, not {:.3} (calibrate with a \
                     lower --min-cost-ratio to reach it)",
                    b.label(),
                    set.cost_ratio,
                    target
                ));
            }
            (profile.plan(set)?, Some(set.kl))
        }
    })
}

/// The decoder of weight format `f`: a re-quantized copy, else the f32 one.
fn pick_decoder<'a>(
    base: &'a Decoder,
    quantized: &'a [(WeightFormat, Decoder)],
    f: WeightFormat,
) -> &'a Decoder {
    quantized
        .iter()
        .find(|(g, _)| *g == f)
        .map_or(base, |(_, d)| d)
}

/// Decode and generation tokens/s of one greedy run of `new_tokens` tokens per prompt.
fn time_generation(
    decoder: &Decoder,
    prompts: &[Vec<u32>],
    plan: &LayerPlan,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let cfg = GenerationConfig {
        sampling: Sampling::Greedy,
        max_new_tokens: new_tokens,
        group_size: 1,
        seed: 0,
        // No early stop: every behavior decodes the same number of tokens.
        eos_token_ids: Vec::new(),
        stop_strings: Vec::new(),
    };
    let out = generate(decoder, prompts, plan, &cfg, None)?;
    let t = out.timings;
    let rows = prompts.len();
    ensure!(
        t.generated_tokens == rows * new_tokens,
        "generated {} tokens, expected {}",
        t.generated_tokens,
        rows * new_tokens
    );
    let decode_s = t.decode.as_secs_f64();
    let decode = if decode_s > 0.0 {
        (t.generated_tokens - rows) as f64 / decode_s
    } else {
        0.0
    };
    Ok((decode, t.tokens_per_second()))
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn progress_bar(len: u64, template: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(bar_style(template));
    bar
}

const BAR: &str = "{msg:32} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})";

/// Runs `bench rollout`.
pub fn run(args: BenchRolloutArgs) -> Result<()> {
    // Validate everything that needs no model first.
    let explicit = !args.behaviors.is_empty();
    let behaviors = if explicit {
        parse_behaviors(&args.behaviors.join(",")).context("while reading --behaviors")?
    } else {
        parse_behaviors(DEFAULT_BEHAVIORS)?
    };
    ensure!(
        !args.batches.is_empty(),
        "--batches needs at least one batch size"
    );
    ensure!(
        args.batches.iter().all(|&b| b >= 1),
        "--batches: every batch size must be at least 1"
    );
    ensure!(
        args.new_tokens >= 2,
        "--new-tokens must be at least 2 (the first token comes from the prefill)"
    );
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    ensure!(args.kl_problems >= 1, "--kl-problems must be at least 1");
    ensure!(args.kl_batch >= 1, "--kl-batch must be at least 1");
    ensure!(args.eval_limit >= 1, "--eval-limit must be at least 1");
    if let Some(n) = args.threads {
        ensure!(n >= 1, "--threads must be at least 1");
        // Single-threaded at this point (no pool has started), so changing the environment
        // races with nothing; candle and rayon read it when their pools start.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads = model::candle_core::utils::get_num_threads();

    let defaults = TrainFile::default();
    let reward = if args.no_eval {
        None
    } else {
        Some(
            defaults
                .reward
                .build()
                .context("while starting the training reward")?,
        )
    };
    // Load the problem sets before the long measurements, so a missing set fails at once.
    let eval_sets = if args.no_eval {
        Vec::new()
    } else {
        let mut gsm8k = EvalSet::gsm8k(None)?;
        gsm8k.problems.truncate(args.eval_limit);
        vec![
            EvalSet::arithmetic(1, args.eval_limit, DEFAULT_PROBLEM_SEED)?,
            gsm8k,
        ]
    };

    let model_path = args.model.path()?;
    // The calibration profile: needed only by calibrated behaviors. A profile the user asked
    // for (by --profile or by naming a calibrated behavior) must exist; checked before the
    // model loads.
    let wants_profile = behaviors
        .iter()
        .any(|b| matches!(b.plan, PlanKind::Calibrated(_)));
    let profile_path = args
        .profile
        .clone()
        .unwrap_or_else(|| default_profile_path(&model_path));
    let profile_required = wants_profile && (explicit || args.profile.is_some());
    if profile_required && !profile_path.exists() {
        bail!(
            "no calibration profile at {}: the calibrated behaviors need one (run `nested-reft \
             calibrate` first, or give --profile)",
            profile_path.display()
        );
    }
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer;
    let base = loaded.decoder;
    let cfg = base.config().clone();
    let hash = model_hash(&cfg, &tokenizer)?;
    let mut notes = Vec::new();

    let profile = if !wants_profile {
        None
    } else if profile_required || profile_path.exists() {
        Some(
            load_profile(args.profile.as_deref(), &model_path, &cfg, &tokenizer)
                .context("the calibrated behaviors need the calibration profile")?,
        )
    } else {
        None
    };
    let behaviors: Vec<Behavior> = if wants_profile && profile.is_none() {
        let note = format!(
            "no calibration profile at {}: the calibrated behaviors are left out (run \
             `nested-reft calibrate` to include them)",
            profile_path.display()
        );
        eprintln!("note: {note}");
        notes.push(note);
        behaviors
            .into_iter()
            .filter(|b| !matches!(b.plan, PlanKind::Calibrated(_)))
            .collect()
    } else {
        behaviors
    };
    if let Some(p) = &profile {
        let here = model::calibrate::weights_fingerprint(&base)?;
        if p.weights_fingerprint != here {
            let note = format!(
                "the profile {} was measured on other weights of this model (fingerprint {}, \
                 these are {here})",
                profile_path.display(),
                p.weights_fingerprint
            );
            eprintln!("note: {note}");
            notes.push(note);
        }
    }
    let resolved = behaviors
        .into_iter()
        .map(|b| {
            let (plan, profile_kl) =
                resolve_plan(&b, &cfg, profile.as_ref(), args.seed, &mut notes)
                    .with_context(|| format!("behavior {}", b.label()))?;
            Ok(Resolved {
                behavior: b,
                plan,
                profile_kl,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // One re-quantized copy per format in use.
    let mut quantized: Vec<(WeightFormat, Decoder)> = Vec::new();
    for r in &resolved {
        let f = r.behavior.format;
        if f.is_quantized() && !quantized.iter().any(|(g, _)| *g == f) {
            let d = base
                .quantized(f)
                .with_context(|| format!("while re-quantizing the weights to {f}"))?;
            quantized.push((f, d));
        }
    }
    let decoder_for = |f: WeightFormat| pick_decoder(&base, &quantized, f);

    // The baseline is entry 0, then the behaviors.
    let full_plan = LayerPlan::full(cfg.num_layers);
    let baseline = Behavior {
        plan: PlanKind::Full,
        format: WeightFormat::F32,
    };
    let entries: Vec<(&Behavior, &LayerPlan)> = std::iter::once((&baseline, &full_plan))
        .chain(resolved.iter().map(|r| (&r.behavior, &r.plan)))
        .collect();

    // Prompts of the speed runs: the first problems of the training data, made as training
    // makes them.
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let data = Dataset::open(&defaults.dataset).context("while loading the training problems")?;
    ensure!(
        data.len() >= max_batch,
        "the training data has {} problems, fewer than the batch size {max_batch}",
        data.len()
    );
    let format = PromptFormat::default();
    let prompts = data.problems()[..max_batch]
        .iter()
        .map(|p| {
            tokenizer
                .encode(&format.text(&tokenizer, &p.question)?, false)
                .with_context(|| format!("while tokenizing the prompt of {}", p.id))
        })
        .collect::<Result<Vec<_>>>()?;

    eprintln!(
        "bench rollout: {} behaviors + the full f32 baseline, {threads} threads, batches {:?}, \
         {} new tokens, {} repeats",
        resolved.len(),
        args.batches,
        args.new_tokens,
        args.repeats
    );

    // Warm-up: one short untimed run per decoder (first-call allocations, kernel set-up).
    for d in std::iter::once(&base).chain(quantized.iter().map(|(_, d)| d)) {
        time_generation(d, &prompts[..1], &full_plan, 4).context("while warming up")?;
    }

    // Speed, round-robin: every repeat runs every entry once per batch size, the order
    // rotating by one entry per repeat.
    let nb = args.batches.len();
    let mut decode: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); nb]; entries.len()];
    let mut whole: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); nb]; entries.len()];
    let bar = progress_bar((args.repeats * nb * entries.len()) as u64, BAR);
    for rep in 0..args.repeats {
        for (bi, &batch) in args.batches.iter().enumerate() {
            for k in 0..entries.len() {
                let e = (k + rep) % entries.len();
                let (b, plan) = entries[e];
                bar.set_message(format!("speed b{batch} {}", b.label()));
                let (d, g) = time_generation(
                    decoder_for(b.format),
                    &prompts[..batch],
                    plan,
                    args.new_tokens,
                )
                .with_context(|| format!("while timing {} at batch {batch}", b.label()))?;
                decode[e][bi].push(d);
                whole[e][bi].push(g);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let throughput: Vec<Vec<Throughput>> = (0..entries.len())
        .map(|e| {
            (0..nb)
                .map(|bi| {
                    let (d, g) = (median(&decode[e][bi]), median(&whole[e][bi]));
                    Throughput {
                        batch: args.batches[bi],
                        tokens_per_s: d,
                        speedup: speedup(d, median(&decode[0][bi])),
                        generation_tokens_per_s: g,
                        generation_speedup: speedup(g, median(&whole[0][bi])),
                        repeats: decode[e][bi].clone(),
                        generation_repeats: whole[e][bi].clone(),
                    }
                })
                .collect()
        })
        .collect();

    // Drift: KL to the full f32 model on its own greedy completions.
    let bar = progress_bar(args.kl_problems as u64, BAR);
    bar.set_message("KL: greedy completions");
    let max_new = defaults.generator.max_new_tokens;
    let sequences = calibration_sequences(
        &base,
        &tokenizer,
        &defaults.dataset,
        args.kl_problems,
        max_new,
        Some(&bar),
    )
    .context("while making the KL sequences")?;
    bar.finish_and_clear();
    let kl_source = format!(
        "greedy completions (at most {max_new} tokens) of the full f32 model for {} problems \
         of {}",
        sequences.len(),
        defaults.dataset
    );
    let mut probe = KlProbe::new(&base, &sequences, args.kl_batch)
        .context("while running the full model over the KL sequences")?;
    let bar = progress_bar(resolved.len() as u64, BAR);
    let mut kls = Vec::with_capacity(resolved.len());
    for r in &resolved {
        bar.set_message(format!("KL {}", r.behavior.label()));
        let kl = if r.behavior.format.is_quantized() {
            probe.kl_of(decoder_for(r.behavior.format), &r.plan)
        } else {
            probe.kl(&r.plan, false)
        }
        .with_context(|| format!("while measuring the KL of {}", r.behavior.label()))?;
        kls.push(kl);
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Accuracy.
    let mut accuracy: Vec<Vec<SetAccuracy>> = vec![Vec::new(); entries.len()];
    if let Some(reward) = &reward {
        let per_entry: usize = eval_sets.iter().map(|s| s.problems.len()).sum();
        let bar = progress_bar((per_entry * entries.len()) as u64, BAR);
        for (e, (b, plan)) in entries.iter().enumerate() {
            for set in &eval_sets {
                bar.set_message(format!("accuracy {} {}", set.name, b.label()));
                let report = evaluate(
                    decoder_for(b.format),
                    &tokenizer,
                    plan,
                    &set.problems,
                    reward.as_ref(),
                    &EvalConfig::greedy(set.max_new_tokens),
                    &mut |n| bar.inc(n as u64),
                )
                .with_context(|| format!("while evaluating {} on {}", b.label(), set.name))?;
                let s = &report.summary;
                accuracy[e].push(SetAccuracy {
                    set: set.name.clone(),
                    problems: s.problems,
                    correct: s.correct,
                    accuracy: s.accuracy,
                });
            }
        }
        bar.finish_and_clear();
    }

    let mut throughput = throughput.into_iter();
    let mut accuracy = accuracy.into_iter();
    let mut result = |b: &Behavior, plan: &LayerPlan, kl: f64, profile_kl: Option<f64>| {
        let cost = plan.cost_ratio(&cfg);
        BehaviorResult {
            behavior: b.label(),
            family: b.family(),
            weights: b.format,
            plan: plan.clone(),
            plan_text: plan.to_string(),
            skipped_units: plan.skipped_units().iter().map(Unit::to_string).collect(),
            cost_ratio: cost,
            ideal_speedup: 1.0 / cost,
            throughput: throughput.next().unwrap_or_default(),
            kl,
            profile_kl,
            accuracy: accuracy.next().unwrap_or_default(),
        }
    };
    let baseline = result(&baseline, &full_plan, 0.0, None);
    let behaviors = resolved
        .iter()
        .zip(&kls)
        .map(|(r, &kl)| result(&r.behavior, &r.plan, kl, r.profile_kl))
        .collect();
    let report = RolloutReport {
        model: model_path,
        model_hash: hash,
        threads,
        new_tokens: args.new_tokens,
        repeats: args.repeats,
        batches: args.batches.clone(),
        seed: args.seed,
        kl_sequences: sequences.len(),
        kl_tokens: probe.tokens(),
        kl_source,
        profile: profile.as_ref().map(|_| profile_path),
        eval_limit: (!args.no_eval).then_some(args.eval_limit),
        baseline,
        behaviors,
        notes,
    };

    print!("{}", render_table(&report));
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("while creating {}", args.out_dir.display()))?;
    let json = args.out_dir.join("rollout.json");
    write_report(&json, &report)?;
    let svg = args.out_dir.join("frontier.svg");
    frontier_plot(&svg, &report)?;
    eprintln!("results: {}", json.display());
    eprintln!("plot:    {}", svg.display());
    Ok(())
}

/// A KL for the table: 4 decimals, or scientific below 0.001.
fn fmt_kl(kl: f64) -> String {
    if kl == 0.0 {
        "0".into()
    } else if kl.abs() < 1e-3 {
        format!("{kl:.2e}")
    } else {
        format!("{kl:.4}")
    }
}

/// The printed table: a header with the settings, one row per behavior (the baseline first).
pub fn render_table(r: &RolloutReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\nmodel {} · {} threads · {} new tokens per prompt, greedy, no early stop · median of \
         {} · KL on {} tokens ({} sequences)\n",
        r.model.display(),
        r.threads,
        r.new_tokens,
        r.repeats,
        r.kl_tokens,
        r.kl_sequences
    ));
    let rows: Vec<&BehaviorResult> = std::iter::once(&r.baseline).chain(&r.behaviors).collect();
    let name = |b: &BehaviorResult| {
        if std::ptr::eq(b, &r.baseline) {
            "full (baseline)".to_string()
        } else {
            b.behavior
                .rsplit_once('@')
                .map_or(b.behavior.clone(), |(p, _)| p.to_string())
        }
    };
    let w = rows.iter().map(|b| name(b).len()).max().unwrap_or(0).max(8);
    let sets: Vec<String> = r.baseline.accuracy.iter().map(|a| a.set.clone()).collect();
    let mut header = format!(
        "{:<w$}  {:>7}  {:>5}  {:>6}",
        "behavior", "weights", "cost", "ideal"
    );
    for b in &r.batches {
        header.push_str(&format!(
            "  {:>9}  {:>8}",
            format!("tok/s b{b}"),
            format!("speed b{b}")
        ));
    }
    header.push_str(&format!("  {:>9}", "KL"));
    for s in &sets {
        header.push_str(&format!("  {:>12}", s));
    }
    out.push_str(&header);
    out.push('\n');
    for b in rows {
        let mut line = format!(
            "{:<w$}  {:>7}  {:>5.3}  {:>5.2}x",
            name(b),
            b.weights.to_string(),
            b.cost_ratio,
            b.ideal_speedup
        );
        for t in &b.throughput {
            line.push_str(&format!("  {:>9.1}  {:>7.2}x", t.tokens_per_s, t.speedup));
        }
        line.push_str(&format!("  {:>9}", fmt_kl(b.kl)));
        for a in &b.accuracy {
            line.push_str(&format!(
                "  {:>12}",
                format!("{:.0}% {}/{}", 100.0 * a.accuracy, a.correct, a.problems)
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// Writes the report as pretty JSON through a temporary file and a rename.
pub fn write_report(path: &Path, report: &RolloutReport) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer_pretty(&mut f, report)?;
        f.write_all(b"\n")?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().with_context(|| format!("while writing {}", path.display()))
}

/// Series colours of the frontier plot.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// `frontier.svg`: per batch size one panel of KL (log scale) against the measured speedup,
/// one series per behavior family (colour; filled circle for f32, triangle for q8_0, cross for
/// q4_0), each point labelled with its ratio or units, and its ideal speedup as a hollow point
/// joined to it by a light line. A KL of 0 (which a log axis cannot show) is drawn at the
/// bottom of the axis.
pub fn frontier_plot(path: &Path, report: &RolloutReport) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("while drawing {}: {e}", path.display());
    let mut families: Vec<String> = Vec::new();
    for b in &report.behaviors {
        if !families.contains(&b.family) {
            families.push(b.family.clone());
        }
    }
    let positive = report.behaviors.iter().map(|b| b.kl).filter(|&k| k > 0.0);
    let lo = positive.clone().fold(f64::INFINITY, f64::min);
    let hi = positive.fold(0.0f64, f64::max);
    // Whole decades, so that the log axis has at least two labelled ticks.
    let (y_lo, y_hi) = if lo.is_finite() && hi > 0.0 {
        (
            10f64.powf((lo / 2.0).log10().floor()),
            10f64.powf((hi * 2.0).log10().ceil()),
        )
    } else {
        (1e-3, 10.0)
    };
    let nb = report.batches.len().max(1);
    let root = SVGBackend::new(path, ((620 * nb as u32).max(720), 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!(
                "drift against measured decode speedup · {} · {} threads",
                report.model.file_name().map_or_else(
                    || report.model.display().to_string(),
                    |n| n.to_string_lossy().into()
                ),
                report.threads
            ),
            ("sans-serif", 14),
        )
        .map_err(|e| err(&e))?;
    for (bi, area) in root.split_evenly((1, nb)).iter().enumerate() {
        let batch = report.batches.get(bi).copied().unwrap_or(1);
        let at = |b: &BehaviorResult| b.throughput.get(bi).map_or(0.0, |t| t.speedup);
        let xs = report
            .behaviors
            .iter()
            .flat_map(|b| [at(b), b.ideal_speedup])
            .chain([1.0]);
        let (x_lo, x_hi) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
        let pad = ((x_hi - x_lo) * 0.08).max(0.05);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("batch {batch}"), ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x_lo - pad)..(x_hi + pad), (y_lo..y_hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("measured speedup over full f32 (hollow: ideal)")
            .y_desc("KL(π_full ‖ π_behavior), nats/token")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                [(1.0, y_lo), (1.0, y_hi)],
                BLACK.mix(0.25).stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        for (fi, family) in families.iter().enumerate() {
            let c = COLOURS[fi % COLOURS.len()];
            let members: Vec<&BehaviorResult> = report
                .behaviors
                .iter()
                .filter(|b| &b.family == family)
                .collect();
            let y = |b: &BehaviorResult| b.kl.max(y_lo);
            for b in &members {
                chart
                    .draw_series(LineSeries::new(
                        [(b.ideal_speedup, y(b)), (at(b), y(b))],
                        c.mix(0.3).stroke_width(1),
                    ))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(std::iter::once(Circle::new(
                        (b.ideal_speedup, y(b)),
                        4,
                        c.mix(0.5).stroke_width(1),
                    )))
                    .map_err(|e| err(&e))?;
            }
            let tag = |b: &BehaviorResult| {
                let text = b
                    .behavior
                    .split_once(':')
                    .map_or(String::new(), |(_, rest)| {
                        rest.rsplit_once('@').map_or(rest, |(a, _)| a).to_string()
                    });
                Text::new(text, (6, -12), ("sans-serif", 10).into_font().color(&c))
            };
            let weights = members.first().map(|b| b.weights);
            let drawn = match weights {
                Some(WeightFormat::Q8_0) => chart.draw_series(members.iter().map(|b| {
                    EmptyElement::at((at(b), y(b)))
                        + TriangleMarker::new((0, 0), 5, c.filled())
                        + tag(b)
                })),
                Some(WeightFormat::Q4_0) => chart.draw_series(members.iter().map(|b| {
                    EmptyElement::at((at(b), y(b)))
                        + Cross::new((0, 0), 4, c.stroke_width(2))
                        + tag(b)
                })),
                _ => chart.draw_series(members.iter().map(|b| {
                    EmptyElement::at((at(b), y(b))) + Circle::new((0, 0), 4, c.filled()) + tag(b)
                })),
            }
            .map_err(|e| err(&e))?;
            if bi == 0 {
                let drawn = drawn.label(family.as_str());
                match weights {
                    Some(WeightFormat::Q8_0) => {
                        drawn.legend(move |(x, y)| TriangleMarker::new((x + 10, y), 5, c.filled()))
                    }
                    Some(WeightFormat::Q4_0) => {
                        drawn.legend(move |(x, y)| Cross::new((x + 10, y), 4, c.stroke_width(2)))
                    }
                    _ => drawn.legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled())),
                };
            }
        }
        if bi == 0 && !families.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Behavior {
        s.parse().unwrap()
    }

    #[test]
    fn behaviors_parse_with_formats_and_unit_lists() {
        let list = parse_behaviors("full@q8_0, random:0.2,contiguous:0.33@f32,layers:4,10,a5,m7@q8_0,calibrated:0.09,layers:25")
            .unwrap();
        assert_eq!(
            list,
            vec![
                Behavior {
                    plan: PlanKind::Full,
                    format: WeightFormat::Q8_0
                },
                Behavior {
                    plan: PlanKind::Random(0.2),
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: PlanKind::Contiguous(0.33),
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: PlanKind::Units(vec![
                        Unit::Layer(4),
                        Unit::Layer(10),
                        Unit::Attn(5),
                        Unit::Mlp(7)
                    ]),
                    format: WeightFormat::Q8_0
                },
                Behavior {
                    plan: PlanKind::Calibrated(0.09),
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: PlanKind::Units(vec![Unit::Layer(25)]),
                    format: WeightFormat::F32
                },
            ]
        );
        assert_eq!(list[3].label(), "layers:4,10,a5,m7@q8_0");
        assert_eq!(list[3].family(), "layers q8_0");
        assert_eq!(list[1].label(), "random:0.2@f32");
        // Labels parse back to the same behavior.
        for x in &list {
            assert_eq!(&b(&x.label()), x);
        }
        assert_eq!(b("full@Q8").format, WeightFormat::Q8_0);
        assert_eq!(b("layers:25@q4_0").format, WeightFormat::Q4_0);
    }

    #[test]
    fn the_default_list_parses() {
        let list = parse_behaviors(DEFAULT_BEHAVIORS).unwrap();
        assert_eq!(list.len(), 13);
        assert_eq!(list[0].label(), "full@q8_0");
        let q8_calibrated = list
            .iter()
            .filter(|x| x.family() == "calibrated q8_0")
            .count();
        assert_eq!(q8_calibrated, 3);
    }

    #[test]
    fn bad_behaviors_are_clear_errors() {
        for (list, needle) in [
            ("randm:0.2", "unknown plan `randm`"),
            ("random", "needs a skip ratio"),
            ("random:", "needs a skip ratio"),
            ("random:abc", "`abc` is not a number"),
            ("random:1.5", "strictly between 0 and 1"),
            ("contiguous:0", "strictly between 0 and 1"),
            ("full:3", "takes no argument"),
            ("full@q7", "unknown weight format"),
            ("layers:", "needs the units"),
            ("layers:x5", "not a skip unit"),
            ("full,,random:0.2", "empty entry"),
            ("full,random:0.2,full@f32", "listed twice"),
            ("12", "unknown plan `12`"),
            ("@q8_0", "names no plan"),
            ("layers:4@q8_0,5", "unknown plan `5`"),
        ] {
            let e = format!("{:#}", parse_behaviors(list).unwrap_err());
            assert!(e.contains(needle), "{list}: {e}");
        }
    }

    #[test]
    fn speedup_is_behavior_over_baseline_of_medians() {
        assert!((speedup(150.0, 100.0) - 1.5).abs() < 1e-12);
        assert!((speedup(80.0, 100.0) - 0.8).abs() < 1e-12);
        assert_eq!(speedup(80.0, 0.0), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        // Medians of noisy repeats, then the ratio.
        let behavior = [120.0, 200.0, 110.0];
        let baseline = [100.0, 90.0, 80.0];
        assert!((speedup(median(&behavior), median(&baseline)) - 120.0 / 90.0).abs() < 1e-12);
    }

    fn result(label: &str, kl: f64, speed: f64, cost: f64) -> BehaviorResult {
        let behavior = b(label);
        BehaviorResult {
            behavior: behavior.label(),
            family: behavior.family(),
            weights: behavior.format,
            plan: LayerPlan::full(4),
            plan_text: "full".into(),
            skipped_units: Vec::new(),
            cost_ratio: cost,
            ideal_speedup: 1.0 / cost,
            throughput: vec![Throughput {
                batch: 1,
                tokens_per_s: 100.0 * speed,
                speedup: speed,
                generation_tokens_per_s: 90.0 * speed,
                generation_speedup: speed,
                repeats: vec![100.0 * speed],
                generation_repeats: vec![90.0 * speed],
            }],
            kl,
            profile_kl: None,
            accuracy: vec![SetAccuracy {
                set: "arithmetic:1".into(),
                problems: 20,
                correct: 10,
                accuracy: 0.5,
            }],
        }
    }

    fn report() -> RolloutReport {
        RolloutReport {
            model: "m.gguf".into(),
            model_hash: "abc".into(),
            threads: 2,
            new_tokens: 8,
            repeats: 1,
            batches: vec![1],
            seed: 0,
            kl_sequences: 2,
            kl_tokens: 20,
            kl_source: "test".into(),
            profile: None,
            eval_limit: Some(20),
            baseline: result("full", 0.0, 1.0, 1.0),
            behaviors: vec![
                result("full@q8_0", 0.004, 1.6, 1.0),
                result("random:0.2", 3.5, 1.2, 0.8),
                result("layers:25,a5", 0.3, 1.05, 0.95),
            ],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_json_has_one_entry_per_behavior_and_the_table_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout.json");
        let r = report();
        write_report(&path, &r).unwrap();
        let back: RolloutReport = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["behaviors"].as_array().unwrap().len(), 3);
        assert_eq!(v["behaviors"][0]["weights"], "q8_0");
        let table = render_table(&r);
        assert!(table.contains("full (baseline)"), "{table}");
        assert!(table.contains("layers:25,a5"), "{table}");
        assert!(table.contains("1.60x"), "{table}");
        assert!(table.contains("2 threads"), "{table}");
        assert!(table.contains("note: a note"), "{table}");
        assert_eq!(
            table
                .lines()
                .filter(|l| l.contains("f32") || l.contains("q8_0"))
                .count(),
            4
        );
    }

    #[test]
    fn the_frontier_is_an_svg_with_a_series_per_family() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontier.svg");
        let mut r = report();
        r.batches = vec![1, 8];
        for x in std::iter::once(&mut r.baseline).chain(r.behaviors.iter_mut()) {
            let mut t = x.throughput[0].clone();
            t.batch = 8;
            x.throughput.push(t);
        }
        frontier_plot(&path, &r).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for family in ["full q8_0", "random f32", "layers f32", "batch 8"] {
            assert!(svg.contains(family), "{family} missing");
        }
    }
}
