//! `nested-reft bench rollout`: what a behavior — the model that generates rollouts, a layer
//! plan × a weight format — buys in decode speed and costs in drift and accuracy, against the
//! full-depth f32 model, on one model.
//!
//! Per behavior: decode tokens/s at each batch size (greedy, a fixed number of new tokens, no
//! early stop), measured round-robin with the full-depth f32 baseline in the same run so that
//! machine noise hits both; the speedup over the baseline next to the ideal one
//! (1 / [`LayerPlan::cost_ratio`]); the mean per-token KL(π_full,f32 ‖ π_behavior) on the full
//! model's own greedy completions ([`model::calibrate::KlProbe`]); and greedy accuracy through
//! [`crate::eval::evaluate`]. Writes `rollout.json` and the KL-against-speedup picture
//! `frontier.svg`.
//!
//! [`behavior`] reads the behavior list and resolves each plan through the model's own plan
//! choice ([`model::PlanChoice`]); [`measure`] times, measures drift and accuracy; [`report`]
//! writes the table, the JSON and the plot. [`run`] is those steps in order.

pub mod behavior;
pub mod measure;
pub mod report;

pub use behavior::{parse_behaviors, Behavior, DEFAULT_BEHAVIORS};
pub use measure::{median, speedup, SetAccuracy, Throughput};
pub use report::{frontier_plot, render_table, write_report, BehaviorResult, RolloutReport};

use crate::eval::{EvalSet, PromptFormat, DEFAULT_PROBLEM_SEED};
use crate::modelargs::ModelArgs;
use crate::profile::{default_profile_path, load_profile, model_hash};
use crate::train::TrainFile;
use anyhow::{bail, ensure, Context, Result};
use behavior::Resolved;
use clap::Args;
use measure::{Decoders, Entry, SpeedRun};
use model::{Decoder, LayerPlan, PlanChoice, Profile, Tokenizer, Unit, WeightFormat};
use rewards::Reward;
use rollout_server::dataset::Dataset;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
layers), `calibrated:R` (a skip set of the calibration profile whose cost ratio is within 0.03 of \
1 - R, drawn with --seed as training's calibrated strategy draws one per batch, else the \
nearest set; needs `nested-reft calibrate`), `layers:U,U,...` (explicit units: 12 = layer 12, a12 its \
attention block, m12 its MLP block), and FORMAT f32 (default), q8_0 or q4_0 (the linear layers \
re-quantized). The default set: full@q8_0, and at skip ratios 0.09, 0.2, 0.33 (ideal speedups \
of about 1.1x, 1.25x, 1.5x) random, contiguous and calibrated in f32 and calibrated in q8_0; \
without a profile the calibrated ones are left out with a note.

Threads: the machine's default (RAYON_NUM_THREADS if set) unless --threads; the table header \
says how many. Output: a table on stdout, rollout.json (every number, every repeat) and \
frontier.svg (KL against the measured speedup, one panel per batch size, one series per \
behavior family, the ideal speedups as hollow points) in --out-dir.";

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
    /// Seed of the random, contiguous and calibrated plan draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where `rollout.json` and `frontier.svg` go (created if missing).
    #[arg(long, short = 'o', value_name = "DIR", default_value = "bench-rollout")]
    pub out_dir: PathBuf,
}

/// Checks the settings that need no model, parses the behaviors (the default list when none
/// is given) and sets the thread count.
fn checked_behaviors(args: &BenchRolloutArgs) -> Result<Vec<Behavior>> {
    let behaviors = if args.behaviors.is_empty() {
        parse_behaviors(DEFAULT_BEHAVIORS)?
    } else {
        parse_behaviors(&args.behaviors.join(",")).context("while reading --behaviors")?
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
    Ok(behaviors)
}

/// What the accuracy is measured with: the training reward and the problem sets.
struct AccuracySets {
    reward: Box<dyn Reward>,
    sets: Vec<EvalSet>,
}

/// The training reward and the accuracy sets (none with `--no-eval`), loaded before the long
/// measurements so that a missing set fails at once.
fn accuracy_sets(args: &BenchRolloutArgs, defaults: &TrainFile) -> Result<Option<AccuracySets>> {
    if args.no_eval {
        return Ok(None);
    }
    let reward = defaults
        .reward
        .build()
        .context("while starting the training reward")?;
    let mut gsm8k = EvalSet::gsm8k(None)?;
    gsm8k.problems.truncate(args.eval_limit);
    let sets = vec![
        EvalSet::arithmetic(1, args.eval_limit, DEFAULT_PROBLEM_SEED)?,
        gsm8k,
    ];
    Ok(Some(AccuracySets { reward, sets }))
}

/// Whether the behaviors need the calibration profile, and where it is.
struct ProfileNeed {
    /// A behavior is calibrated.
    wanted: bool,
    /// The user asked for it (by --profile or by naming a calibrated behavior): it must exist.
    required: bool,
    /// --profile, else the default path next to the model.
    path: PathBuf,
}

impl ProfileNeed {
    /// Checked before the model loads: a required profile must exist.
    fn of(args: &BenchRolloutArgs, behaviors: &[Behavior], model_path: &Path) -> Result<Self> {
        let wanted = behaviors.iter().any(|b| b.plan.needs_profile());
        let path = args
            .profile
            .clone()
            .unwrap_or_else(|| default_profile_path(model_path));
        let required = wanted && (!args.behaviors.is_empty() || args.profile.is_some());
        if required && !path.exists() {
            bail!(
                "no calibration profile at {}: the calibrated behaviors need one (run \
                 `nested-reft calibrate` first, or give --profile)",
                path.display()
            );
        }
        Ok(Self {
            wanted,
            required,
            path,
        })
    }

    /// The profile, when a behavior wants it and it is there (a note when it was measured on
    /// other weights of the model).
    fn load(
        &self,
        args: &BenchRolloutArgs,
        model_path: &Path,
        base: &Decoder,
        tokenizer: &Tokenizer,
        notes: &mut Vec<String>,
    ) -> Result<Option<Arc<Profile>>> {
        if !self.wanted || !(self.required || self.path.exists()) {
            return Ok(None);
        }
        let p = load_profile(
            args.profile.as_deref(),
            model_path,
            base.config(),
            tokenizer,
        )
        .context("the calibrated behaviors need the calibration profile")?;
        let here = model::calibrate::weights_fingerprint(base)?;
        if p.weights_fingerprint != here {
            note(
                notes,
                format!(
                    "the profile {} was measured on other weights of this model (fingerprint \
                     {}, these are {here})",
                    self.path.display(),
                    p.weights_fingerprint
                ),
            );
        }
        Ok(Some(Arc::new(p)))
    }

    /// The behaviors without the calibrated ones when the profile is missing (with a note).
    fn keep_measurable(
        &self,
        behaviors: Vec<Behavior>,
        profile: Option<&Arc<Profile>>,
        notes: &mut Vec<String>,
    ) -> Vec<Behavior> {
        if !self.wanted || profile.is_some() {
            return behaviors;
        }
        note(
            notes,
            format!(
                "no calibration profile at {}: the calibrated behaviors are left out (run \
                 `nested-reft calibrate` to include them)",
                self.path.display()
            ),
        );
        behaviors
            .into_iter()
            .filter(|b| !b.plan.needs_profile())
            .collect()
    }
}

/// Prints a note and keeps it for the report.
fn note(notes: &mut Vec<String>, note: String) {
    eprintln!("note: {note}");
    notes.push(note);
}

/// Prompts of the speed runs: the first `n` problems of the training data, made as training
/// makes them.
fn speed_prompts(tokenizer: &Tokenizer, defaults: &TrainFile, n: usize) -> Result<Vec<Vec<u32>>> {
    let data = Dataset::open(&defaults.dataset).context("while loading the training problems")?;
    ensure!(
        data.len() >= n,
        "the training data has {} problems, fewer than the batch size {n}",
        data.len()
    );
    let format = PromptFormat::default();
    data.problems()[..n]
        .iter()
        .map(|p| {
            tokenizer
                .encode(&format.text(tokenizer, &p.question)?, false)
                .with_context(|| format!("while tokenizing the prompt of {}", p.id))
        })
        .collect()
}

/// The result of one entry.
fn result(
    b: &Behavior,
    plan: &LayerPlan,
    cfg: &model::ModelConfig,
    (throughput, kl, accuracy): (Vec<Throughput>, f64, Vec<SetAccuracy>),
    profile_kl: Option<f64>,
) -> BehaviorResult {
    let cost = plan.cost_ratio(cfg);
    BehaviorResult {
        behavior: b.label(),
        family: b.family(),
        weights: b.format,
        plan: plan.clone(),
        plan_text: plan.to_string(),
        skipped_units: plan.skipped_units().iter().map(Unit::to_string).collect(),
        cost_ratio: cost,
        ideal_speedup: 1.0 / cost,
        throughput,
        kl,
        profile_kl,
        accuracy,
    }
}

/// Prints the table and writes `rollout.json` and `frontier.svg` into `out_dir`.
fn write_outputs(out_dir: &Path, report: &RolloutReport) -> Result<()> {
    print!("{}", render_table(report));
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("while creating {}", out_dir.display()))?;
    let json = out_dir.join("rollout.json");
    write_report(&json, report)?;
    let svg = out_dir.join("frontier.svg");
    frontier_plot(&svg, report)?;
    eprintln!("results: {}", json.display());
    eprintln!("plot:    {}", svg.display());
    Ok(())
}

/// Runs `bench rollout`: check the settings, load the model and the profile, resolve the
/// behaviors, measure speed, drift and accuracy, write the results.
pub fn run(args: BenchRolloutArgs) -> Result<()> {
    let behaviors = checked_behaviors(&args)?;
    let threads = model::candle_core::utils::get_num_threads();
    let defaults = TrainFile::default();
    let accuracy_sets = accuracy_sets(&args, &defaults)?;
    let model_path = args.model.path()?;
    let need = ProfileNeed::of(&args, &behaviors, &model_path)?;

    let loaded = args.model.load()?;
    let (tokenizer, base) = (loaded.tokenizer, loaded.decoder);
    let cfg = base.config().clone();
    let hash = model_hash(&cfg, &tokenizer)?;
    let mut notes = Vec::new();
    let profile = need.load(&args, &model_path, &base, &tokenizer, &mut notes)?;
    let resolved = need
        .keep_measurable(behaviors, profile.as_ref(), &mut notes)
        .into_iter()
        .map(|b| {
            let label = b.label();
            behavior::resolve(b, cfg.num_layers, profile.as_ref(), args.seed, &mut notes)
                .with_context(|| format!("behavior {label}"))
        })
        .collect::<Result<Vec<Resolved>>>()?;
    let decoders = Decoders::for_behaviors(base, &resolved)?;

    // The baseline is entry 0, then the behaviors.
    let baseline = Behavior {
        plan: PlanChoice::Full,
        format: WeightFormat::F32,
    };
    let full_plan = LayerPlan::full(cfg.num_layers);
    let labels: Vec<String> = std::iter::once(baseline.label())
        .chain(resolved.iter().map(|r| r.behavior.label()))
        .collect();
    let entries: Vec<Entry<'_>> = std::iter::once((&baseline, &full_plan))
        .chain(resolved.iter().map(|r| (&r.behavior, &r.plan)))
        .zip(&labels)
        .map(|((b, plan), label)| Entry {
            label,
            format: b.format,
            plan,
        })
        .collect();
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let prompts = speed_prompts(&tokenizer, &defaults, max_batch)?;
    eprintln!(
        "bench rollout: {} behaviors + the full f32 baseline, {threads} threads, batches {:?}, \
         {} new tokens, {} repeats",
        resolved.len(),
        args.batches,
        args.new_tokens,
        args.repeats
    );

    let speed = SpeedRun {
        batches: &args.batches,
        new_tokens: args.new_tokens,
        repeats: args.repeats,
    };
    let throughput = measure::measure_speed(&decoders, &entries, &prompts, speed)?;
    let drift = measure::measure_drift(
        &decoders,
        &tokenizer,
        &defaults.dataset,
        (
            args.kl_problems,
            defaults.generator.max_new_tokens,
            args.kl_batch,
        ),
        &resolved,
    )?;
    let accuracy = match &accuracy_sets {
        Some(a) => {
            measure::measure_accuracy(&decoders, &tokenizer, &entries, &a.sets, a.reward.as_ref())?
        }
        None => vec![Vec::new(); entries.len()],
    };

    let mut measured = throughput
        .into_iter()
        .zip(std::iter::once(0.0).chain(drift.kls.iter().copied()))
        .zip(accuracy)
        .map(|((t, kl), a)| (t, kl, a));
    let mut next = || measured.next().unwrap_or_default();
    let baseline = result(&baseline, &full_plan, &cfg, next(), None);
    let behaviors = resolved
        .iter()
        .map(|r| result(&r.behavior, &r.plan, &cfg, next(), r.profile_kl))
        .collect();
    let report = RolloutReport {
        model: model_path,
        model_hash: hash,
        threads,
        new_tokens: args.new_tokens,
        repeats: args.repeats,
        batches: args.batches.clone(),
        seed: args.seed,
        kl_sequences: drift.sequences,
        kl_tokens: drift.tokens,
        kl_source: drift.source,
        profile: profile.as_ref().map(|_| need.path),
        eval_limit: (!args.no_eval).then_some(args.eval_limit),
        baseline,
        behaviors,
        notes,
    };
    write_outputs(&args.out_dir, &report)
}
