//! `nested-reft train`: generate with the nested behavior, score, update the full-depth
//! target, repeat. Mode `local` runs both halves in this process, in turn; `sync` and `async`
//! run them as two processes (see [`procs`]).

mod config;
pub mod plot;
pub mod procs;

pub use config::{
    load_config_file, CheckpointFailure, LoraArgs, Mode, ModelSource, TrainArgs, TrainConfig,
    TrainFile,
};

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
use std::path::{Path, PathBuf};
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
    let decoder = step::adapt(loaded.decoder, f.lora.as_ref(), f.seed)?;
    let mut learner = Learner::new(decoder, reference, f.update.clone())
        .context("while setting up the learner")?;
    // With LoRA the behavior is one copy sharing the trained adapters (its base quantized once).
    let lora_behavior = match f.lora {
        Some(_) => Some(step::lora_behavior(learner.model(), format)?),
        None => None,
    };

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
        // Take weights: the behavior is the learner's model (re-quantized for 8 bits; with
        // LoRA, the copy sharing its adapters).
        let requantized = match &lora_behavior {
            Some(_) => None,
            None => step::behavior_model(learner.model(), format)?,
        };
        let behavior = lora_behavior.as_ref().or(requantized.as_ref());
        // Draw the plan, generate, score, make the records.
        let batch = step::generate(
            &mut generator,
            behavior.unwrap_or(learner.model()),
            learner.version(),
        )?;
        let probes = match behavior {
            Some(b) => vec![check_behavior(&probe, &learner, b, format, &bar)?],
            None => Vec::new(),
        };
        drop(requantized);
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
        let msg = step_message(&stats, &batch.stats);
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
        save_model(
            &learner,
            &tokenizer,
            &dir,
            &base_model_name(f.model.as_deref()),
        )?;
        eprintln!("model:   {}", dir.display());
        if f.lora.is_some() {
            eprintln!("adapter: {}", adapter_dir(&dir).display());
        }
    }
    eprintln!("{}", space_line(out));
    Ok(())
}

/// Local mode's proof that an 8-bit behavior follows the learner: the probe scored with the
/// behavior against the learner's weights re-quantized afresh (a warning when they differ).
fn check_behavior(
    probe: &Probe,
    learner: &Learner,
    behavior: &model::Decoder,
    format: model::WeightFormat,
    bar: &ProgressBar,
) -> Result<ProbeCheck> {
    let check = ProbeCheck::compare(
        learner.version(),
        &probe.score_as_behavior(learner.model(), format)?,
        &probe.score(behavior)?,
    );
    if !check.matches() {
        bar.suspend(|| {
            eprintln!(
                "warning: the behavior does not match the learner's weights of version {}: its \
                 probe log-probs differ by {:.3e}",
                check.version, check.max_abs_diff
            )
        });
    }
    Ok(check)
}

/// The progress line of one local step.
fn step_message(
    stats: &learner::StepStats,
    generation: &rollout_server::GenerationStats,
) -> String {
    format!(
        "reward {:.3} acc {:.2} | gen {:.0} tok/s, learn {:.0} tok/s | KL(μ‖π) {:.3}{}",
        stats.reward_mean,
        stats.accuracy,
        generation.behavior_tokens_per_s,
        stats.learner_tokens_per_s,
        stats.kl_behavior_k3,
        stats
            .skipped
            .as_deref()
            .map(|s| format!(" | skipped: {s}"))
            .unwrap_or_default()
    )
}

/// One line saying where a run directory's disk space goes: its total, the checkpoints (and how
/// many), the saved model and the rest (logs, metrics).
pub(crate) fn space_line(out: &Path) -> String {
    let total = dir_bytes(out);
    let ckpt_dir = out.join("checkpoints");
    let checkpoints = dir_bytes(&ckpt_dir);
    let kept = std::fs::read_dir(&ckpt_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("step-") && !name.contains('.')
                })
                .count()
        })
        .unwrap_or(0);
    let model = dir_bytes(&out.join("model"));
    format!(
        "disk:    {} in {}: checkpoints {} ({kept} kept), model {}, the rest {}",
        human_bytes(total),
        out.display(),
        human_bytes(checkpoints),
        human_bytes(model),
        human_bytes(total.saturating_sub(checkpoints + model))
    )
}

/// The bytes of the files under `path` (0 when it does not exist; unreadable entries count 0).
fn dir_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| dir_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// `1.6 GB`, `515 MB`, `12 kB`, `80 B` (decimal units).
fn human_bytes(b: u64) -> String {
    let x = b as f64;
    if x >= 1e9 {
        format!("{:.1} GB", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.0} MB", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} kB", x / 1e3)
    } else {
        format!("{b} B")
    }
}

fn create(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("while creating {}", path.display()))
}

fn describe_plan(p: &config::PlanFile) -> String {
    match p.behavior_weights.as_deref() {
        Some(w) if w != "f32" => format!("{}, {w} behavior weights", p.choice),
        _ => p.choice.to_string(),
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

/// The name a PEFT adapter gives its base model: the model path of the run, or for the
/// embedded default model the name of the model it was converted from.
pub fn base_model_name(model: Option<&Path>) -> String {
    match model {
        Some(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string(),
        None => "HuggingFaceTB/SmolLM2-135M-Instruct".to_string(),
    }
}

/// Where a run's PEFT adapter goes: `adapter/` beside the model directory `model_dir`.
pub fn adapter_dir(model_dir: &Path) -> PathBuf {
    model_dir.with_file_name("adapter")
}

/// Writes the model to `<dir>.tmp`, then swaps it in with renames, so `dir` is always either
/// the old complete model or the new complete one. A LoRA model is written merged (a plain
/// model computing what the adapted one computes), and its adapters alone as a PEFT adapter
/// directory for `base_model` in [`adapter_dir`]`(dir)`, swapped in the same way.
pub fn save_model(
    learner: &Learner,
    tokenizer: &model::Tokenizer,
    dir: &Path,
    base_model: &str,
) -> Result<()> {
    let model = learner.model();
    if model.lora().is_some() {
        let merged = model
            .merged()
            .context("while merging the adapters into the base")?;
        swap_in(dir, |tmp| {
            model::save_pretrained(&merged, tokenizer, tmp)
                .with_context(|| format!("while saving the model to {}", tmp.display()))
        })?;
        return swap_in(&adapter_dir(dir), |tmp| {
            model
                .save_peft_adapter(tmp, base_model)
                .with_context(|| format!("while saving the adapter to {}", tmp.display()))
        });
    }
    swap_in(dir, |tmp| {
        model::save_pretrained(model, tokenizer, tmp)
            .with_context(|| format!("while saving the model to {}", tmp.display()))
    })
}

/// Writes a directory as `<dir>.tmp` with `write`, then renames it to `dir` (the old one moved
/// aside first and removed last).
fn swap_in(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("while removing {}", tmp.display()))?;
    }
    write(&tmp)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_space_line_splits_checkpoints_model_and_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let step = out.join("checkpoints/step-00000010");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("model.safetensors"), vec![0u8; 3_000_000]).unwrap();
        std::fs::write(out.join("checkpoints/LATEST"), "step-00000010\n").unwrap();
        std::fs::create_dir_all(out.join("model")).unwrap();
        std::fs::write(out.join("model/model.safetensors"), vec![0u8; 1_000_000]).unwrap();
        std::fs::write(out.join("metrics.jsonl"), vec![b'x'; 2_000]).unwrap();
        assert_eq!(dir_bytes(out), 4_002_014);
        let line = space_line(out);
        assert!(
            line.contains("4 MB in")
                && line.contains("checkpoints 3 MB (1 kept)")
                && line.contains("model 1 MB")
                && line.contains("the rest 2 kB"),
            "{line}"
        );
        assert_eq!(human_bytes(1_600_000_000), "1.6 GB");
        assert_eq!(human_bytes(999), "999 B");
    }
}
