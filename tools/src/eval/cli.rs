//! `nested-reft eval` itself: flags, the model or checkpoint, the sets, the table and the JSON
//! file. The scoring is [`super::evaluate`].

use super::{evaluate, EvalConfig, EvalReport, EvalSet, PromptFormat, GSM8K_MAX_NEW_TOKENS};
use super::{DEFAULT_ARITHMETIC_COUNT, DEFAULT_PROBLEM_SEED};
use crate::modelargs::{ModelArgs, PlanArgs};
use crate::train::TrainFile;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::{Decoder, LayerPlan, Sampling, Weights};
use rewards::RewardSpec;
use rollout_server::dataset::{DatasetSpec, MAX_ARITHMETIC_LEVEL};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// `nested-reft eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Evaluate the weights of a training checkpoint: a checkpoint directory (`step-N/`), a
    /// checkpoint root (its `LATEST`, else its newest complete checkpoint) or a run's output
    /// directory (its `checkpoints/`). The run's `config.toml`, when there is one, supplies the
    /// model (unless --model is given), the prompt format, the reward and the correctness
    /// threshold.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// A training config (TOML) whose prompt format (generator.system_prompt,
    /// generator.instruction), reward and update.correct_threshold to use [default: the run's
    /// config.toml next to --checkpoint, else the defaults of `nested-reft train`].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The problem sets, comma-separated or repeated: `gsm8k` (the fetched GSM8K problems),
    /// `gsm8k:DIR`, `arithmetic` (the levels of --levels), `arithmetic:LEVEL` (1-5) or a
    /// `.jsonl` file with `question` and `answer` fields [default: gsm8k,arithmetic].
    #[arg(
        long = "dataset",
        short = 'd',
        value_delimiter = ',',
        value_name = "SPEC"
    )]
    datasets: Vec<String>,
    /// Arithmetic levels that `arithmetic` stands for [default: every level, 1-5].
    #[arg(long, value_delimiter = ',', value_name = "L,L,...")]
    levels: Option<Vec<u8>>,
    /// Problems per arithmetic level.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ARITHMETIC_COUNT)]
    count: usize,
    /// Seed of the arithmetic problems (training draws with seed 0, so the default set is
    /// held out).
    #[arg(long, value_name = "SEED", default_value_t = DEFAULT_PROBLEM_SEED)]
    problem_seed: u64,
    /// Evaluate only the first N problems of each set.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Completions per problem, K. Above 1 the table adds pass@K (unbiased estimator) and the
    /// accuracy is pass@1, the mean over all completions.
    #[arg(long, short = 'k', value_name = "K", default_value_t = 1)]
    samples: usize,
    /// Sampling temperature; 0 is greedy [default: 0 with one sample, 0.7 with --samples > 1].
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Token limit of a completion [default: 64 for arithmetic, 256 for GSM8K and files].
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Problems generated together in one batch (each with its K completions).
    #[arg(long, value_name = "N", default_value_t = 8)]
    batch: usize,
    /// The reward that decides correctness: `math`, `format`, an inline JSON spec or a
    /// TOML/JSON file [default: the training config's, else math].
    #[arg(long, value_name = "SPEC")]
    reward: Option<String>,
    /// Also evaluate the full model, next to the plan of the plan flags. (The plan flags draw
    /// one plan, seeded by --seed, and use it for every problem; without any, the full model.)
    #[arg(long)]
    also_full: bool,
    /// Where to write the summary and every problem's completions and rewards as JSON
    /// (replaced if it exists).
    #[arg(long, short = 'o', value_name = "FILE", default_value = "eval.json")]
    output: PathBuf,
    /// The layer plan: one plan drawn from these flags (seeded by --seed, which also seeds
    /// sampling) serves every problem; without any, the full model.
    #[command(flatten)]
    plan: PlanArgs,
}

/// The `--checkpoint` that was found: its directory and the run directory around it.
struct FoundCheckpoint {
    dir: PathBuf,
    run_dir: Option<PathBuf>,
}

/// Resolves `--checkpoint`: a checkpoint directory, a checkpoint root or a run directory.
fn find_checkpoint(path: &Path) -> Result<FoundCheckpoint> {
    if !path.exists() {
        bail!("the checkpoint {} does not exist", path.display());
    }
    if !path.is_dir() {
        bail!(
            "the checkpoint {} is not a directory (give a checkpoint directory step-N/, a \
             checkpoint root or a training run's output directory)",
            path.display()
        );
    }
    // The learner's layout: root/step-N/manifest.json, and root = <run>/checkpoints.
    let run_of = |root: &Path| -> Option<PathBuf> {
        [Some(root), root.parent()]
            .into_iter()
            .flatten()
            .find(|d| d.join("config.toml").is_file())
            .map(Path::to_path_buf)
    };
    if path.join("manifest.json").is_file() {
        learner::verify_checkpoint(path)
            .with_context(|| format!("the checkpoint {} is broken", path.display()))?;
        return Ok(FoundCheckpoint {
            dir: path.to_path_buf(),
            run_dir: path.parent().and_then(run_of),
        });
    }
    let root = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let scan = learner::scan_checkpoints(&root)
        .with_context(|| format!("while looking for checkpoints in {}", root.display()))?;
    match scan.latest {
        Some(dir) => {
            for (p, why) in &scan.skipped {
                eprintln!("warning: skipped {}: {why}", p.display());
            }
            Ok(FoundCheckpoint {
                dir,
                run_dir: run_of(&root),
            })
        }
        None => {
            let why: Vec<String> = scan
                .skipped
                .iter()
                .map(|(p, e)| format!("\n  {}: {e}", p.display()))
                .collect();
            bail!(
                "no complete checkpoint in {} (expected step-N/ directories with a \
                 manifest.json){}",
                root.display(),
                why.concat()
            )
        }
    }
}

/// The checkpoint's model parameters on `base`'s configuration, device and dtype.
fn load_checkpoint_decoder(base: &Decoder, dir: &Path) -> Result<Decoder> {
    // The learner writes the model's named parameters as `model.safetensors`.
    let file = dir.join("model.safetensors");
    let tensors = model::candle_core::safetensors::load(&file, base.device())
        .with_context(|| format!("while reading {}", file.display()))?;
    let weights = Weights::new(tensors, base.dtype(), base.device())
        .with_context(|| format!("while converting {}", file.display()))?;
    Decoder::new(base.config(), &weights, false).with_context(|| {
        format!(
            "the checkpoint {} does not fit the model (pass the model it was trained from \
             with --model)",
            dir.display()
        )
    })
}

/// The problem sets the flags name, loaded and cut to `--limit`.
fn load_sets(args: &EvalArgs) -> Result<Vec<EvalSet>> {
    let levels = args
        .levels
        .clone()
        .unwrap_or_else(|| (1..=MAX_ARITHMETIC_LEVEL).collect());
    if let Some(bad) = levels
        .iter()
        .find(|l| !(1..=MAX_ARITHMETIC_LEVEL).contains(*l))
    {
        bail!("--levels: level {bad} is out of range 1-{MAX_ARITHMETIC_LEVEL}");
    }
    ensure!(args.count >= 1, "--count must be at least 1");
    ensure!(args.limit != Some(0), "--limit must be at least 1");
    let count = args.limit.map_or(args.count, |l| l.min(args.count));
    let specs = if args.datasets.is_empty() {
        vec!["gsm8k".to_string(), "arithmetic".to_string()]
    } else {
        args.datasets.clone()
    };
    let mut sets: Vec<EvalSet> = Vec::new();
    for raw in &specs {
        let s = raw.trim();
        let new: Vec<EvalSet> = if s == "arithmetic" {
            levels
                .iter()
                .map(|&l| EvalSet::arithmetic(l, count, args.problem_seed))
                .collect::<Result<_>>()?
        } else {
            match s
                .parse::<DatasetSpec>()
                .with_context(|| format!("while reading --dataset {raw:?}"))?
            {
                DatasetSpec::Gsm8k { dir } => vec![EvalSet::gsm8k(dir)?],
                DatasetSpec::Arithmetic { level, .. } => {
                    vec![EvalSet::arithmetic(level, count, args.problem_seed)?]
                }
                DatasetSpec::Jsonl { path, .. } => vec![EvalSet::jsonl(&path)?],
                other => bail!("--dataset {raw:?}: {other} cannot be evaluated"),
            }
        };
        for set in new {
            if !sets.iter().any(|s| s.name == set.name) {
                sets.push(set);
            }
        }
    }
    if let Some(limit) = args.limit {
        for set in &mut sets {
            set.problems.truncate(limit);
        }
    }
    Ok(sets)
}

/// One evaluated (plan, set) pair, as written to the JSON file.
#[derive(Debug, Serialize)]
struct RunOutput {
    dataset: String,
    plan: LayerPlan,
    plan_text: String,
    skipped_layers: Vec<usize>,
    max_new_tokens: usize,
    #[serde(flatten)]
    report: EvalReport,
}

/// The JSON file.
#[derive(Debug, Serialize)]
struct OutputFile {
    model: PathBuf,
    checkpoint: Option<PathBuf>,
    checkpoint_step: Option<u64>,
    checkpoint_version: Option<u64>,
    training_config: Option<PathBuf>,
    reward: RewardSpec,
    temperature: f32,
    samples: usize,
    seed: u64,
    batch: usize,
    problem_seed: u64,
    correct_threshold: f64,
    prompt: PromptFormat,
    runs: Vec<RunOutput>,
}

/// Runs `eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    ensure!(args.samples >= 1, "--samples must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    if let Some(0) = args.max_new_tokens {
        bail!("--max-new-tokens must be at least 1");
    }
    let temperature = args
        .temperature
        .unwrap_or(if args.samples > 1 { 0.7 } else { 0.0 });
    let sampling = if temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::temperature(temperature)
    };

    let checkpoint = args
        .checkpoint
        .as_deref()
        .map(find_checkpoint)
        .transpose()?;
    let config_path = args.config.clone().or_else(|| {
        let run = checkpoint.as_ref()?.run_dir.as_ref()?;
        Some(run.join("config.toml"))
    });
    let train_cfg = match &config_path {
        Some(p) => crate::train::load_config_file(Some(p))
            .with_context(|| format!("while reading the training config {}", p.display()))?,
        None => TrainFile::default(),
    };
    let reward_spec = match &args.reward {
        Some(r) => {
            RewardSpec::from_arg(r).with_context(|| format!("while reading --reward {r:?}"))?
        }
        None => train_cfg.reward.clone(),
    };
    let reward = reward_spec.build().context("while starting the reward")?;
    let sets = load_sets(&args)?;
    let base_cfg = EvalConfig {
        sampling,
        samples: args.samples,
        max_new_tokens: args.max_new_tokens.unwrap_or(GSM8K_MAX_NEW_TOKENS),
        batch_size: args.batch,
        seed: args.plan.seed(),
        prompt: PromptFormat::of_generator(&train_cfg.generator),
        correct_threshold: train_cfg.update.correct_threshold,
    };
    base_cfg.validate()?;

    let model_args = ModelArgs::new(
        args.model.model.clone().or(train_cfg.model.clone()),
        args.model.device.unwrap_or(train_cfg.device),
    );
    let model_path = model_args.path()?;
    let loaded = model_args.load()?;
    let tokenizer = loaded.tokenizer;
    let (decoder, checkpoint_state) = match &checkpoint {
        None => (loaded.decoder, None),
        Some(found) => {
            let d = load_checkpoint_decoder(&loaded.decoder, &found.dir)?;
            // Only for the report: the manifest check already read and verified it.
            let state = std::fs::read(found.dir.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<learner::CheckpointState>(&b).ok());
            (d, state)
        }
    };
    let num_layers = decoder.config().num_layers;
    // The nested plan runs with the behavior's weights; the full plan (--also-full) with f32.
    let format = args.plan.weight_format();
    let (plan, behavior) = args.plan.behavior(&model_path, &decoder, &tokenizer)?;
    let full = LayerPlan::full(num_layers);
    let mut plans = vec![plan.clone()];
    if args.also_full && plan != full {
        plans.push(full);
    }

    match &checkpoint {
        Some(found) => eprintln!(
            "evaluating {} (model {}) {}",
            found.dir.display(),
            model_path.display(),
            describe_decoding(&base_cfg)
        ),
        None => eprintln!(
            "evaluating {} {}",
            model_path.display(),
            describe_decoding(&base_cfg)
        ),
    }
    if let Some(p) = &config_path {
        eprintln!("prompt format, reward and threshold from {}", p.display());
    }
    if format.is_quantized() {
        eprintln!("plan {plan} runs with {format} weights re-quantized from f32");
    }

    let total: usize = sets.iter().map(|s| s.problems.len()).sum::<usize>() * plans.len();
    let bar = progress_bar(total as u64);
    let mut runs = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        for set in &sets {
            let cfg = EvalConfig {
                max_new_tokens: args.max_new_tokens.unwrap_or(set.max_new_tokens),
                ..base_cfg.clone()
            };
            bar.set_message(format!("{} · {}", set.name, plan_label(plan)));
            let model = if i == 0 { &behavior } else { &decoder };
            let report = evaluate(
                model,
                &tokenizer,
                plan,
                &set.problems,
                reward.as_ref(),
                &cfg,
                &mut |n| bar.inc(n as u64),
            )
            .with_context(|| format!("while evaluating {} under plan {plan}", set.name))?;
            let s = &report.summary;
            bar.suspend(|| {
                eprintln!(
                    "{} · {}: {}/{} correct ({:.1}%) in {:.1} s",
                    set.name,
                    plan_label(plan),
                    s.correct,
                    s.completions,
                    100.0 * s.accuracy,
                    s.wall_s
                )
            });
            runs.push(RunOutput {
                dataset: set.name.clone(),
                plan: plan.clone(),
                plan_text: plan.to_string(),
                skipped_layers: plan.skipped(),
                max_new_tokens: cfg.max_new_tokens,
                report,
            });
        }
    }
    bar.finish_and_clear();

    print!("{}", render_table(&runs, args.samples));
    let out = OutputFile {
        model: model_path,
        checkpoint: checkpoint.map(|c| c.dir),
        checkpoint_step: checkpoint_state.as_ref().map(|s| s.step),
        checkpoint_version: checkpoint_state.as_ref().map(|s| s.version),
        training_config: config_path,
        reward: reward_spec,
        temperature,
        samples: args.samples,
        seed: args.plan.seed(),
        batch: args.batch,
        problem_seed: args.problem_seed,
        correct_threshold: base_cfg.correct_threshold,
        prompt: base_cfg.prompt,
        runs,
    };
    write_json(&args.output, &out)?;
    eprintln!("results: {}", args.output.display());
    Ok(())
}

/// "greedy" or "K samples at temperature T", with the batch size.
fn describe_decoding(cfg: &EvalConfig) -> String {
    let how = match cfg.sampling {
        Sampling::Greedy => "greedy".to_string(),
        Sampling::Sample(p) => format!("temperature {}", p.temperature),
    };
    format!(
        "({how}, {} completion(s) per problem, batches of {})",
        cfg.samples, cfg.batch_size
    )
}

/// A short plan name for messages: `full` or `skip 3,5`.
fn plan_label(plan: &LayerPlan) -> String {
    let units = plan.skipped_units();
    if units.is_empty() {
        plan.to_string()
    } else {
        let list: Vec<String> = units.iter().map(|u| u.to_string()).collect();
        format!("skip {}", list.join(","))
    }
}

/// The printed table: one block per plan, one row per set.
fn render_table(runs: &[RunOutput], samples: usize) -> String {
    let mut out = String::new();
    let name_w = runs
        .iter()
        .map(|r| r.dataset.len())
        .max()
        .unwrap_or(0)
        .max("dataset".len());
    let pass_col = format!("pass@{samples}");
    let mut current: Option<&LayerPlan> = None;
    for r in runs {
        if current != Some(&r.plan) {
            current = Some(&r.plan);
            out.push_str(&format!("\nplan: {}\n", r.plan));
            out.push_str(&format!("{:<name_w$}  {:>8}", "dataset", "problems"));
            if samples > 1 {
                out.push_str(&format!("  {:>11}", "completions"));
            }
            out.push_str(&format!("  {:>7}  {:>8}", "correct", "accuracy"));
            if samples > 1 {
                out.push_str(&format!("  {pass_col:>8}"));
            }
            out.push_str(&format!(
                "  {:>11}  {:>8}  {:>9}\n",
                "mean tokens", "tokens/s", "truncated"
            ));
        }
        let s = &r.report.summary;
        out.push_str(&format!("{:<name_w$}  {:>8}", r.dataset, s.problems));
        if samples > 1 {
            out.push_str(&format!("  {:>11}", s.completions));
        }
        out.push_str(&format!("  {:>7}  {:>7.1}%", s.correct, 100.0 * s.accuracy));
        if samples > 1 {
            let v = s.pass_at_k.last().map_or(0.0, |p| p.value);
            out.push_str(&format!("  {:>7.1}%", 100.0 * v));
        }
        out.push_str(&format!(
            "  {:>11.1}  {:>8.1}  {:>9}\n",
            s.mean_completion_tokens, s.tokens_per_s, s.truncated
        ));
    }
    out
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a rename.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--output {} names no file", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer_pretty(&mut f, value)?;
        f.write_all(b"\n")?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().with_context(|| format!("while writing {}", path.display()))
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} problem {pos}/{len} [{bar:25}] {elapsed_precise} ETA {eta} | {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
