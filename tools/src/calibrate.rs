//! `nested-reft calibrate`: measure how far every skippable unit moves the model and build
//! cost-ordered skip sets (see [`model::calibrate`]), stored as a profile next to the model
//! where the calibrated and adaptive plan strategies find it.

use crate::modelargs::ModelArgs;
use crate::train::TrainFile;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::calibrate::{
    calibrate, unit_cost, CalibrateConfig, CalibrateProgress, CalibrationSequence,
};
use model::{
    generate, Decoder, GenerationConfig, LayerPlan, ModelConfig, Profile, Sampling, Tokenizer,
    Unit, WeightBridge,
};
use plotters::prelude::*;
use rollout_server::dataset::{Dataset, DatasetSpec};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `--help` says in full.
pub const LONG_ABOUT: &str = "\
Calibrate the model for the calibrated and adaptive plan strategies.

For every skippable unit (each layer, each attention block, each MLP block) it measures the \
per-token KL(π_full ‖ π_nested) on a calibration set — by default the full model's own greedy \
completions for 32 problems of the training data — and its decode cost (the weights a decoded \
token reads). Then it builds skip sets for a range of cost ratios by greedy search: starting \
from the full model, add the unit with the smallest KL increase per unit of cost saved, the \
increase measured with the set (not summed from single units).

The profile (JSON, keyed by the model hash) is written next to the model — in the asset cache \
for the default model — where `--plan-strategy calibrated|adaptive` finds it, together with a \
plot of KL against the ideal speedup. With no arguments it calibrates the default model.";

/// `nested-reft calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Problems whose greedy completions form the calibration set.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub problems: usize,
    /// The problems: `arithmetic:LEVEL`, `gsm8k` or a JSON Lines file, as `train --dataset`
    /// [default: the training default, arithmetic level 1].
    #[arg(long, value_name = "SPEC")]
    pub dataset: Option<String>,
    /// Token limit of each greedy completion [default: the training default, 64].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Build sets down to this cost ratio (0.6 = an ideal speedup of 1.67x).
    #[arg(long, default_value_t = 0.6, value_name = "RATIO")]
    pub min_cost_ratio: f64,
    /// Which units the search may skip: `all`, `layers` (whole layers only) or `blocks`
    /// (attention and MLP blocks only).
    #[arg(long, default_value = "all", value_parser = ["all", "layers", "blocks"])]
    pub units: String,
    /// Sequences per forward batch.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch: usize,
    /// Where to write the profile [default: next to the model].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The default profile path of a model: `<file>.profile.json` next to a model file, or
/// `nested-reft-profile.json` inside a model directory (a Hugging Face directory or a saved
/// checkpoint).
pub fn default_profile_path(model_path: &Path) -> PathBuf {
    if model_path.is_dir() {
        model_path.join("nested-reft-profile.json")
    } else {
        let mut name = model_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".profile.json");
        model_path.with_file_name(name)
    }
}

/// The model hash a profile is keyed by.
pub fn model_hash(cfg: &ModelConfig, tokenizer: &Tokenizer) -> Result<String> {
    Ok(WeightBridge::new(cfg, tokenizer)?.model_hash().to_string())
}

/// Loads the profile for a model (from `path`, else the default path), refusing one measured
/// on another model; a missing profile is an error that says how to make one.
pub fn load_profile(
    path: Option<&Path>,
    model_path: &Path,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<Profile> {
    let file = path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_profile_path(model_path));
    if !file.exists() {
        bail!(
            "no calibration profile at {}: run `nested-reft calibrate{}` first (it takes a few \
             minutes), or give --profile",
            file.display(),
            if path.is_none() && !is_default_model(model_path) {
                format!(" --model {}", model_path.display())
            } else {
                String::new()
            }
        );
    }
    let hash = model_hash(cfg, tokenizer)?;
    let profile = Profile::load(&file, &hash)?;
    profile.check_layers(cfg.num_layers)?;
    Ok(profile)
}

fn is_default_model(path: &Path) -> bool {
    path == protocol::assets::default_model_path()
}

/// The calibration set: the full model's greedy completions (at most `max_new_tokens` tokens)
/// for the first `n` problems of `dataset`, with prompts made exactly as training makes them.
pub fn calibration_sequences(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    dataset: &DatasetSpec,
    n: usize,
    max_new_tokens: usize,
    bar: Option<&ProgressBar>,
) -> Result<Vec<CalibrationSequence>> {
    let file = TrainFile {
        dataset: dataset.clone(),
        ..TrainFile::default()
    };
    // The default plan needs no profile; the generator only makes the prompts here.
    let generator = file.generator(
        &crate::train::ModelSource {
            path: Path::new(""),
            config: decoder.config(),
        },
        tokenizer.clone(),
        |_| {},
    )?;
    let data = Dataset::open(dataset).context("while loading the calibration problems")?;
    if data.is_empty() {
        bail!("the calibration dataset {dataset} has no problems");
    }
    let problems = &data.problems()[..n.min(data.len())];
    let mut prompts = Vec::with_capacity(problems.len());
    for p in problems {
        prompts.push(tokenizer.encode(&generator.prompt_text(p)?, false)?);
    }
    let cfg = GenerationConfig {
        sampling: Sampling::Greedy,
        max_new_tokens,
        group_size: 1,
        seed: 0,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        stop_strings: Vec::new(),
    };
    let full = LayerPlan::full(decoder.config().num_layers);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(8) {
        let gen = generate(decoder, chunk, &full, &cfg, Some(tokenizer))?;
        for c in gen.completions {
            if !c.tokens.is_empty() {
                out.push(CalibrationSequence {
                    prompt: chunk[c.prompt_index].clone(),
                    completion: c.tokens,
                });
            }
        }
        if let Some(bar) = bar {
            bar.inc(chunk.len() as u64);
        }
    }
    if out.is_empty() {
        bail!("the model wrote no tokens for any calibration problem");
    }
    Ok(out)
}

/// Runs `nested-reft calibrate`.
pub fn run(args: &CalibrateArgs) -> Result<()> {
    if args.problems == 0 {
        bail!("--problems must be at least 1");
    }
    if !(args.min_cost_ratio > 0.0 && args.min_cost_ratio < 1.0) {
        bail!("--min-cost-ratio must lie in (0, 1)");
    }
    let path = args.model.path()?;
    let m = args.model.load()?;
    let cfg = m.decoder.config().clone();
    let defaults = TrainFile::default();
    let dataset: DatasetSpec = match &args.dataset {
        Some(d) => d
            .parse()
            .with_context(|| format!("while reading --dataset {d:?}"))?,
        None => defaults.dataset.clone(),
    };
    let max_new = args
        .max_new_tokens
        .unwrap_or(defaults.generator.max_new_tokens);
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| default_profile_path(&path));

    let style =
        |t: &str| ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar());
    let start = Instant::now();
    let bar = ProgressBar::new(args.problems as u64).with_style(style(
        "{msg:28} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})",
    ));
    bar.set_message("greedy completions");
    let data = calibration_sequences(
        &m.decoder,
        &m.tokenizer,
        &dataset,
        args.problems,
        max_new,
        Some(&bar),
    )?;
    bar.finish_and_clear();
    let tokens: usize = data.iter().map(|s| s.completion.len()).sum();
    eprintln!(
        "calibration set: {} greedy completions of {dataset} ({tokens} tokens)",
        data.len()
    );

    let l = cfg.num_layers;
    let candidates: Vec<Unit> = match args.units.as_str() {
        "layers" => (0..l).map(Unit::Layer).collect(),
        "blocks" => (0..l)
            .map(Unit::Attn)
            .chain((0..l).map(Unit::Mlp))
            .collect(),
        _ => Unit::all(l),
    };
    let n_units = candidates.len() as u64;
    let bar = ProgressBar::new(n_units).with_style(style(
        "{msg:28} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})",
    ));
    bar.set_message("single units");
    let hash = model_hash(&cfg, &m.tokenizer)?;
    let cal = CalibrateConfig {
        min_cost_ratio: args.min_cost_ratio,
        candidates: Some(candidates),
        batch: args.batch,
        source: format!(
            "greedy completions ({} tokens at most) of {} problems of {dataset}",
            max_new,
            data.len()
        ),
    };
    let target_saving = 1.0 - args.min_cost_ratio;
    // Without a terminal the bar is hidden: print a line per set and per 10 units instead.
    let tty = std::io::stderr().is_terminal();
    let profile = calibrate(&m.decoder, &hash, &data, &cal, &mut |p| match p {
        CalibrateProgress::Units { done, total } => {
            bar.set_position(done as u64);
            if !tty && (done % 10 == 0 || done == total) {
                eprintln!(
                    "single units: {done}/{total} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        CalibrateProgress::Set {
            size,
            cost_ratio,
            kl,
            ..
        } => {
            if size == 1 {
                bar.set_style(style(
                    "{msg:28} [{bar:30}] {percent}% of the cost range {elapsed}",
                ));
                bar.set_length(1000);
            }
            bar.set_message(format!("set of {size}: KL {kl:.3}"));
            if !tty {
                eprintln!(
                    "set of {size}: cost ratio {cost_ratio:.3}, KL {kl:.4} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                );
            }
            bar.set_position((((1.0 - cost_ratio) / target_saving).min(1.0) * 1000.0) as u64);
        }
    })?;
    bar.finish_and_clear();
    profile
        .save(&out)
        .with_context(|| format!("while writing the profile {}", out.display()))?;
    let svg = out.with_extension("svg");
    plot_profile(&svg, &profile, &cfg)?;
    print_profile(&profile, &cfg);
    eprintln!(
        "{} evaluations in {:.0} s",
        profile.calibration.evaluations,
        start.elapsed().as_secs_f64()
    );
    eprintln!("profile: {}", out.display());
    eprintln!("plot:    {}", svg.display());
    Ok(())
}

fn print_profile(p: &Profile, cfg: &ModelConfig) {
    let mut singles = p.units.clone();
    singles.sort_by(|a, b| (a.kl / a.cost).total_cmp(&(b.kl / b.cost)));
    println!("cheapest single units (KL per cost saved):");
    for u in singles.iter().take(8) {
        println!(
            "  {:>4}  KL {:.4}  saves {:.1}%",
            u.unit.to_string(),
            u.kl,
            100.0 * unit_cost(cfg, u.unit)
        );
    }
    println!(
        "\n{:>4}  {:>10}  {:>13}  {:>8}  added",
        "size", "cost ratio", "ideal speedup", "KL"
    );
    for (i, s) in p.sets.iter().enumerate() {
        println!(
            "{:>4}  {:>10.3}  {:>12.2}x  {:>8.4}  {}",
            i + 1,
            s.cost_ratio,
            1.0 / s.cost_ratio,
            s.kl,
            s.units.last().map(|u| u.to_string()).unwrap_or_default()
        );
    }
}

/// KL against the ideal speedup along the greedy path.
fn plot_profile(path: &Path, p: &Profile, cfg: &ModelConfig) -> Result<()> {
    let pts: Vec<(f64, f64)> = std::iter::once((1.0, 0.0))
        .chain(p.sets.iter().map(|s| (1.0 / s.cost_ratio, s.kl)))
        .collect();
    let x_max = pts.iter().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let y_max = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "calibrated skip sets · {} layers · KL on {} tokens of {} sequences",
                cfg.num_layers, p.calibration.tokens, p.calibration.sequences
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("ideal speedup (1 / cost ratio)")
        .y_desc("KL(π_full ‖ π_nested), nats per token")
        .draw()?;
    chart.draw_series(LineSeries::new(pts.iter().copied(), &BLUE))?;
    chart.draw_series(
        pts.iter()
            .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
    )?;
    root.present()
        .with_context(|| format!("while writing {}", path.display()))?;
    Ok(())
}
