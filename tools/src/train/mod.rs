//! `nested-reft train`: generate with the nested behavior, score, update the full-depth
//! target, repeat. Mode `local` runs both halves in this process, in turn; `sync` and `async`
//! run them as two processes (see [`procs`]).

mod config;
pub mod plot;
pub mod procs;

pub use config::{load_config_file, Mode, ModelSource, TrainArgs, TrainConfig, TrainFile};

use crate::probe::{Probe, ProbeCheck};
use crate::step;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use learner::{Learner, StepStats};
use model::LoadOptions;
use rollout_server::GenerationStats;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct MetricsLine<'a> {
    step: u64,
    batch_id: u64,
    /// What the behavior skipped in this batch.
    #[serde(flatten)]
    skips: step::Skips,
    /// Seconds since the run started.
    wall_s: f64,
    /// Seconds of this step (generation + scoring + update).
    step_s: f64,
    generation: &'a GenerationStats,
    update: &'a StepStats,
    /// An 8-bit behavior's weight probe against a fresh re-quantization of the learner's
    /// weights of the batch's version (none for an f32 behavior, which is the learner's model).
    probes: Vec<ProbeCheck>,
}

/// Runs `train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&cfg.file).context("while printing the configuration")?
        );
        return Ok(());
    }
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("while creating {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string(&cfg.file)?)
        .with_context(|| format!("while writing {}", out.join("config.toml").display()))?;
    match cfg.file.mode {
        Mode::Local => {
            if args.resume {
                anyhow::bail!("--resume applies to the two-process modes (sync, async) only");
            }
            train(&cfg)
        }
        Mode::Sync | Mode::Async => {
            // The services never fetch: make sure the default model is there first.
            if cfg.file.model.is_none() {
                protocol::assets::default_model()?;
            }
            procs::run(
                &cfg,
                &procs::ProcOptions {
                    resume: args.resume,
                    log_json: args.log_json,
                },
            )
        }
    }
}

fn train(cfg: &TrainConfig) -> Result<()> {
    let f = &cfg.file;
    let out = &cfg.output_dir;

    let model_args = crate::modelargs::ModelArgs::new(f.model.clone(), f.device);
    let loaded = model_args.load_with(&LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    })?;
    let tokenizer = loaded.tokenizer.clone();
    let model_cfg = loaded.decoder.config().clone();
    let mut generator = f.generator(
        &config::ModelSource {
            path: &model_args.path()?,
            config: &model_cfg,
        },
        loaded.tokenizer,
        |s| eprintln!("warning: {s}"),
    )?;
    let format = f.plan.weight_format()?;
    let probe = Probe::new(&tokenizer)?;
    let reference = if f.update.kl_coef > 0.0 {
        Some(model_args.load()?.decoder)
    } else {
        None
    };
    let mut learner = Learner::new(loaded.decoder, reference, f.update.clone())
        .context("while setting up the learner")?;

    let stop = Arc::new(AtomicBool::new(false));
    // A second Ctrl-C while the flag is already set ends the process at once.
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        stop.clone(),
    )
    .context("while installing the Ctrl-C handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("while installing the Ctrl-C handler")?;

    eprintln!(
        "training {} on {} for {} steps: {} prompts × {} completions per batch, correction {}, \
         plan {}; writing to {}",
        model_args.path()?.display(),
        f.dataset,
        f.steps,
        f.generator.prompts_per_batch,
        f.generator.group_size,
        f.update.correction,
        describe_plan(&f.plan),
        out.display()
    );
    let mut metrics = BufWriter::new(create(&out.join("metrics.jsonl"))?);
    let samples_path = out.join("samples.jsonl");
    // A fresh file per run (the two-process learner appends to it when it resumes).
    create(&samples_path)?;
    let mut samples = step::SampleLog::append(&samples_path)?;
    let bar = progress_bar(f.steps);
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut curve = Vec::new();
    for step in 0..f.steps {
        let t0 = Instant::now();
        // Take weights: the behavior is the learner's model (re-quantized for 8 bits).
        let behavior = step::behavior_model(learner.model(), format)?;
        // Draw the plan, generate, score, make the records.
        let batch = step::generate(
            &mut generator,
            behavior.as_ref().unwrap_or(learner.model()),
            learner.version(),
        )?;
        let probes = match &behavior {
            Some(b) => {
                let check = ProbeCheck::compare(
                    learner.version(),
                    &probe.score_as_behavior(learner.model(), format)?,
                    &probe.score(b)?,
                );
                if !check.matches() {
                    bar.suspend(|| {
                        eprintln!(
                            "warning: the behavior does not match the learner's weights of \
                             version {}: its probe log-probs differ by {:.3e}",
                            check.version, check.max_abs_diff
                        )
                    });
                }
                vec![check]
            }
            None => Vec::new(),
        };
        drop(behavior);
        // Update.
        let stats = step::update(&mut learner, batch.batch_id, &batch.groups)?;
        let kl = step::measured_kl(Some(&stats));
        if let Some(set) = generator.observe_kl(batch.batch_id, kl) {
            bar.suspend(|| {
                eprintln!(
                    "adaptive: KL(μ‖π) {:.3} on step {}; next batches use set {set}",
                    kl,
                    step + 1
                )
            });
        }
        let line = MetricsLine {
            step,
            batch_id: batch.batch_id,
            skips: step::Skips::of(&batch.plan),
            wall_s: start.elapsed().as_secs_f64(),
            step_s: t0.elapsed().as_secs_f64(),
            generation: &batch.stats,
            update: &stats,
            probes,
        };
        serde_json::to_writer(&mut metrics, &line)?;
        metrics.write_all(b"\n")?;
        metrics.flush()?;
        samples.write(step + 1, batch.batch_id, &batch.groups, &tokenizer)?;
        curve.push((step, stats.reward_mean, stats.accuracy));
        let msg = format!(
            "reward {:.3} acc {:.2} | gen {:.0} tok/s, learn {:.0} tok/s | KL(μ‖π) {:.3}{}",
            stats.reward_mean,
            stats.accuracy,
            batch.stats.behavior_tokens_per_s,
            stats.learner_tokens_per_s,
            stats.kl_behavior_k3,
            stats
                .skipped
                .as_deref()
                .map(|s| format!(" | skipped: {s}"))
                .unwrap_or_default()
        );
        if tty {
            bar.set_message(msg);
        } else {
            eprintln!(
                "step {}/{}: {msg} ({:.1} s)",
                step + 1,
                f.steps,
                line.step_s
            );
        }
        bar.inc(1);
        if stop.load(Ordering::SeqCst) {
            // `suspend` prints whether or not the bar is drawn (a hidden bar drops `println`).
            bar.suspend(|| eprintln!("interrupted: stopping after step {}", step + 1));
            break;
        }
    }
    bar.finish();
    let title = format!(
        "{} · plan {} · correction {}",
        model_args
            .path()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        describe_plan(&f.plan),
        f.update.correction
    );
    plot::reward_curve(&out.join("reward.svg"), &title, &curve)?;
    eprintln!("metrics: {}", out.join("metrics.jsonl").display());
    eprintln!("plot:    {}", out.join("reward.svg").display());
    if f.save_model {
        let dir = out.join("model");
        save_model(&learner, &tokenizer, &dir)?;
        eprintln!("model:   {}", dir.display());
    }
    Ok(())
}

fn create(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("while creating {}", path.display()))
}

fn describe_plan(p: &config::PlanFile) -> String {
    let strategy = p.strategy.as_deref().unwrap_or("random");
    let plan = match (&p.skip_layers, p.skip_ratio, p.skip_ratio_max) {
        (Some(l), _, _) => {
            let units: Vec<String> = l
                .iter()
                .map(|e| match e {
                    config::SkipEntry::Layer(l) => l.to_string(),
                    config::SkipEntry::Unit(u) => u.clone(),
                })
                .collect();
            format!("skip {}", units.join(","))
        }
        _ if strategy == "adaptive" => format!(
            "adaptive, KL budget {}",
            p.kl_budget
                .unwrap_or(model::AdaptiveConfig::default().kl_budget)
        ),
        (None, Some(r), Some(m)) => format!("{strategy} skip ratio {r}–{m}"),
        (None, Some(r), None) if r > 0.0 => format!("{strategy} skip ratio {r}"),
        _ => "full".into(),
    };
    match p.behavior_weights.as_deref() {
        Some(w) if w != "f32" => format!("{plan}, {w} behavior weights"),
        _ => plan,
    }
}

pub(crate) fn progress_bar(steps: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:25}] {elapsed_precise} ETA {eta} | {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Writes the model to `<dir>.tmp`, then swaps it in with renames, so `dir` is always either
/// the old complete model or the new complete one.
pub fn save_model(learner: &Learner, tokenizer: &model::Tokenizer, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("while removing {}", tmp.display()))?;
    }
    model::save_pretrained(learner.model(), tokenizer, &tmp)
        .with_context(|| format!("while saving the model to {}", tmp.display()))?;
    let old = dir.with_extension("old");
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("while moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("while renaming {} to {}", tmp.display(), dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("while removing {}", old.display()))?;
    }
    Ok(())
}
