//! `nested-reft bench overlap`: the same training configuration for N steps in `sync` and in
//! `async` mode, each a real two-process run; from the processes' metrics: time per step, the
//! speedup, the ideal bound (Tg + Tt) / max(Tg, Tt) from the stage times measured in the `sync`
//! run, each process's idle fraction, weight publish and load times, and a timeline picture.

use crate::service::Span;
use crate::train::TrainFile;
use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The long help of `bench overlap`.
pub const LONG_ABOUT: &str = "Runs the same training configuration twice as two real processes \
(learner + rollout server): once in `sync` mode (strictly alternating, the baseline) and once in \
`async` mode (the server generates batch k+1 while the learner trains on batch k). Reports the \
time per step of each (steady state: the first step, which includes start-up, is left out), the \
speedup sync/async, and the ideal bound (Tg + Tt) / max(Tg, Tt), where Tg is the server's time \
per batch (load weights, generate, score, push) and Tt the learner's time per step (train, \
publish, checkpoint), both measured in the sync run. Also: each process's idle fraction in the \
async run, weight publish and load times, a timeline picture (`timeline.svg`) of both runs, and \
both runs' reward per step on one chart (`rewards.svg`). On a CPU it states how many threads \
(and cores) each process had.";

/// `nested-reft bench overlap`.
#[derive(Debug, Args)]
pub struct BenchOverlapArgs {
    /// Training steps per mode (the first is start-up and is not timed).
    #[arg(long, default_value_t = 6)]
    pub steps: u64,
    /// A TOML config for both runs (default: the defaults of `nested-reft train`).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Extra flags passed to both `nested-reft train` runs, e.g. `--prompts-per-batch=4`
    /// (repeat the option for several).
    #[arg(long = "train-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub train_args: Vec<String>,
    /// Where both runs, `overlap.json` and `timeline.svg` go [default: runs/bench-overlap-<local time>].
    #[arg(long, short, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Reuse the finished runs in the output directory instead of running them again (to
    /// re-plot or re-compute).
    #[arg(long)]
    pub reuse: bool,
}

/// What one mode measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// `sync` or `async`.
    pub mode: String,
    /// Timed steps (after the first).
    pub timed_steps: usize,
    /// Mean seconds per step (learner step end to step end).
    pub step_s: f64,
    /// Mean seconds per batch the server spends loading, generating, scoring, pushing.
    pub server_busy_s: f64,
    /// Mean seconds per step the learner spends training, publishing, checkpointing.
    pub learner_busy_s: f64,
    /// Fraction of the timed window the server was idle (waiting).
    pub server_idle: f64,
    /// Fraction of the timed window the learner was idle (waiting for a batch).
    pub learner_idle: f64,
    /// Mean seconds to publish the weights (learner).
    pub publish_s: f64,
    /// Mean seconds to load published weights (server).
    pub load_s: f64,
    /// Mean seconds per step between a cue and the waiting side's start: a batch's last
    /// record pushed → the waiting learner starts training on it, and the learner's step done
    /// → the waiting server starts its next batch. What the idle sides' polling (short naps on
    /// the ring and the control channel) costs a step.
    pub handoff_s: f64,
    /// Final mean reward.
    pub last_reward: f64,
}

/// The whole report (written as `overlap.json`).
#[derive(Debug, Serialize)]
pub struct OverlapReport {
    /// Learner threads.
    pub learner_threads: usize,
    /// Server threads.
    pub server_threads: usize,
    /// Cores of the machine.
    pub cores: usize,
    /// The baseline.
    pub sync: ModeResult,
    /// The overlapped run.
    pub r#async: ModeResult,
    /// sync step time / async step time.
    pub speedup: f64,
    /// Tg from the sync run.
    pub tg_s: f64,
    /// Tt from the sync run.
    pub tt_s: f64,
    /// (Tg + Tt) / max(Tg, Tt).
    pub ideal_bound: f64,
    /// speedup / ideal bound.
    pub fraction_of_bound: f64,
}

/// Runs the benchmark.
pub fn run(args: BenchOverlapArgs) -> Result<()> {
    if args.steps < 3 {
        bail!("--steps must be at least 3 (the first step is start-up and is not timed)");
    }
    let out = args
        .output_dir
        .clone()
        .unwrap_or_else(|| crate::rundir::new_run_dir("bench-overlap"));
    std::fs::create_dir_all(&out).with_context(|| format!("while creating {}", out.display()))?;
    let exe = std::env::current_exe().context("while locating nested-reft")?;
    for mode in ["sync", "async"] {
        let dir = out.join(mode);
        if args.reuse && dir.join("metrics.jsonl").is_file() {
            continue;
        }
        eprintln!("bench overlap: {mode} run, {} steps", args.steps);
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .args([
                "--mode",
                mode,
                "--steps",
                &args.steps.to_string(),
                "--no-save",
            ])
            .arg("--output-dir")
            .arg(&dir);
        if let Some(c) = &args.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&args.train_args);
        let status = cmd
            .status()
            .with_context(|| format!("while starting the {mode} run"))?;
        if !status.success() {
            bail!("the {mode} run failed ({status}); see {}", dir.display());
        }
    }
    let cfg: TrainFile = crate::train::load_config_file(Some(&out.join("async/config.toml")))?;
    let split = crate::train::procs::Split::new(cfg.learner_threads, cfg.server_threads);
    let sync = measure(&out.join("sync"), "sync")?;
    let asy = measure(&out.join("async"), "async")?;
    let report = report(&split, sync, asy);
    std::fs::write(
        out.join("overlap.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .with_context(|| format!("while writing {}", out.join("overlap.json").display()))?;
    timeline(&out.join("timeline.svg"), &out)?;
    reward_plot(&out.join("rewards.svg"), &out)?;
    print_report(&report);
    println!("report:   {}", out.join("overlap.json").display());
    println!("timeline: {}", out.join("timeline.svg").display());
    println!("rewards:  {}", out.join("rewards.svg").display());
    Ok(())
}

/// Builds the report from the two modes' measurements.
pub fn report(
    split: &crate::train::procs::Split,
    sync: ModeResult,
    asy: ModeResult,
) -> OverlapReport {
    let tg = sync.server_busy_s;
    let tt = sync.learner_busy_s;
    let bound = if tg.max(tt) > 0.0 {
        (tg + tt) / tg.max(tt)
    } else {
        1.0
    };
    let speedup = sync.step_s / asy.step_s;
    OverlapReport {
        learner_threads: split.learner,
        server_threads: split.server,
        cores: split.cores,
        speedup,
        tg_s: tg,
        tt_s: tt,
        ideal_bound: bound,
        fraction_of_bound: speedup / bound,
        sync,
        r#async: asy,
    }
}

fn print_report(r: &OverlapReport) {
    println!(
        "processes: learner {} thread(s), rollout server {} thread(s), on {} core(s) (CPU)",
        r.learner_threads, r.server_threads, r.cores
    );
    println!(
        "{:<6} {:>9} {:>10} {:>11} {:>9} {:>10} {:>10} {:>9} {:>11}",
        "mode",
        "s/step",
        "server s",
        "learner s",
        "srv idle",
        "lrn idle",
        "publish s",
        "load s",
        "handoff ms"
    );
    for m in [&r.sync, &r.r#async] {
        println!(
            "{:<6} {:>9.2} {:>10.2} {:>11.2} {:>8.0}% {:>9.0}% {:>10.3} {:>9.3} {:>11.1}",
            m.mode,
            m.step_s,
            m.server_busy_s,
            m.learner_busy_s,
            100.0 * m.server_idle,
            100.0 * m.learner_idle,
            m.publish_s,
            m.load_s,
            1e3 * m.handoff_s
        );
    }
    println!(
        "speedup {:.2}x (= {:.2} s / {:.2} s); ideal bound (Tg + Tt) / max(Tg, Tt) = ({:.2} + {:.2}) / {:.2} = {:.2}x; {:.0}% of the bound",
        r.speedup,
        r.sync.step_s,
        r.r#async.step_s,
        r.tg_s,
        r.tt_s,
        r.tg_s.max(r.tt_s),
        r.ideal_bound,
        100.0 * r.fraction_of_bound
    );
}

pub(crate) fn read_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub(crate) fn spans(v: &serde_json::Value) -> Vec<Span> {
    v.get("spans")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default()
}

pub(crate) fn f(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0)
}

/// Reads one run's metrics (learner `metrics.jsonl`, server `rollout-server/metrics.jsonl`).
pub fn measure(dir: &Path, mode: &str) -> Result<ModeResult> {
    let learner: Vec<_> = read_lines(&dir.join("metrics.jsonl"))?
        .into_iter()
        .filter(|v| v.get("update").is_some_and(|u| !u.is_null()))
        .collect();
    let server = read_lines(&dir.join("rollout-server/metrics.jsonl"))?;
    if learner.len() < 3 {
        bail!(
            "{}: only {} training steps recorded; need at least 3",
            dir.display(),
            learner.len()
        );
    }
    // The timed window: from the end of the first step to the end of the last.
    let t0 = f(&learner[0], "wall_s");
    let t1 = f(&learner[learner.len() - 1], "wall_s");
    let timed = learner.len() - 1;
    let step_s = (t1 - t0) / timed as f64;
    let busy = |lines: &[serde_json::Value], stages: &[&str], lo: f64, hi: f64| -> f64 {
        lines
            .iter()
            .flat_map(spans)
            .filter(|s| stages.contains(&s.stage.as_str()))
            .map(|s| (s.end.min(hi) - s.start.max(lo)).max(0.0))
            .sum()
    };
    let window = (t1 - t0).max(1e-9);
    let l_busy = busy(&learner, &["train", "publish", "checkpoint"], t0, t1);
    let s_busy = busy(&server, &["load", "generate", "score", "push"], t0, t1);
    let batches_in_window = server
        .iter()
        .filter(|v| {
            let w = f(v, "wall_s");
            w > t0 && w <= t1
        })
        .count()
        .max(1);
    let mean = |xs: Vec<f64>| {
        if xs.is_empty() {
            0.0
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let handoff_s = handoffs(&learner, &server, t0) / timed as f64;
    Ok(ModeResult {
        mode: mode.into(),
        timed_steps: timed,
        step_s,
        server_busy_s: s_busy / batches_in_window as f64,
        learner_busy_s: l_busy / timed as f64,
        server_idle: (1.0 - s_busy / window).clamp(0.0, 1.0),
        learner_idle: (1.0 - l_busy / window).clamp(0.0, 1.0),
        publish_s: mean(learner.iter().map(|v| f(v, "publish_s")).collect()),
        load_s: mean(
            server
                .iter()
                .map(|v| f(v, "load_s"))
                .filter(|&x| x > 0.0)
                .collect(),
        ),
        handoff_s,
        last_reward: learner
            .last()
            .and_then(|v| v.get("update"))
            .map(|u| f(u, "reward_mean"))
            .unwrap_or(0.0),
    })
}

/// Seconds lost between a cue and the waiting side's start, summed over the steps that end
/// after `t0` (see [`ModeResult::handoff_s`]).
fn handoffs(learner: &[serde_json::Value], server: &[serde_json::Value], t0: f64) -> f64 {
    let batch = |v: &serde_json::Value| v.get("batch_id").and_then(serde_json::Value::as_u64);
    let stage = |v: &serde_json::Value, name: &str| spans(v).into_iter().find(|s| s.stage == name);
    let mut total = 0.0;
    for l in learner.iter().filter(|l| f(l, "wall_s") > t0) {
        let Some(b) = batch(l) else { continue };
        // The ring: the learner waited for this batch when its last record arrived.
        let pushed = server
            .iter()
            .find(|v| batch(v) == Some(b))
            .and_then(|v| stage(v, "push"));
        if let (Some(w), Some(t), Some(p)) = (stage(l, "wait"), stage(l, "train"), pushed) {
            if w.start <= p.end && t.start >= p.end {
                total += t.start - p.end;
            }
        }
        // The control channel: the server waited for this step when the learner finished it.
        let done = spans(l)
            .into_iter()
            .filter(|s| ["train", "publish", "probe"].contains(&s.stage.as_str()))
            .map(|s| s.end)
            .fold(f64::NEG_INFINITY, f64::max);
        let next_wait = server
            .iter()
            .find(|v| batch(v) == Some(b + 1))
            .and_then(|v| stage(v, "wait"));
        if let Some(w) = next_wait {
            if w.start <= done && done <= w.end {
                total += w.end - done;
            }
        }
    }
    total
}

/// Both runs' mean reward per step on one chart (same seed: how staleness changes learning).
pub fn reward_plot(path: &Path, out: &Path) -> Result<()> {
    let mut curves = Vec::new();
    for mode in ["sync", "async"] {
        let points: Vec<(u64, f64)> = read_lines(&out.join(mode).join("metrics.jsonl"))?
            .iter()
            .filter_map(|v| {
                let u = v.get("update").filter(|u| !u.is_null())?;
                Some((v.get("step")?.as_u64()?, u.get("reward_mean")?.as_f64()?))
            })
            .collect();
        curves.push((mode.to_string(), points));
    }
    crate::train::plot::reward_curves(path, "mean reward per step: sync vs async", &curves)
}

const STAGES: [(&str, RGBColor); 8] = [
    ("generate", RGBColor(31, 119, 180)),
    ("score", RGBColor(255, 127, 14)),
    ("push", RGBColor(44, 160, 44)),
    ("load", RGBColor(148, 103, 189)),
    ("train", RGBColor(214, 39, 40)),
    ("publish", RGBColor(140, 86, 75)),
    ("checkpoint", RGBColor(127, 127, 127)),
    ("wait", RGBColor(225, 225, 225)),
];

/// Draws both runs' timelines: one lane per process per mode, a bar per stage.
pub fn timeline(path: &Path, out: &Path) -> Result<()> {
    let mut lanes: Vec<(String, Vec<Span>)> = Vec::new();
    for mode in ["sync", "async"] {
        let dir = out.join(mode);
        let server: Vec<Span> = read_lines(&dir.join("rollout-server/metrics.jsonl"))?
            .iter()
            .flat_map(spans)
            .collect();
        let learner: Vec<Span> = read_lines(&dir.join("metrics.jsonl"))?
            .iter()
            .flat_map(spans)
            .collect();
        // Each mode's clock starts at its first span.
        let t0 = server
            .iter()
            .chain(&learner)
            .map(|s| s.start)
            .fold(f64::INFINITY, f64::min);
        let shift = |v: Vec<Span>| -> Vec<Span> {
            v.into_iter()
                .map(|s| Span {
                    stage: s.stage,
                    start: s.start - t0,
                    end: s.end - t0,
                })
                .collect()
        };
        lanes.push((format!("{mode}: rollout server"), shift(server)));
        lanes.push((format!("{mode}: learner"), shift(learner)));
    }
    let t_max = lanes
        .iter()
        .flat_map(|(_, s)| s.iter().map(|x| x.end))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (1200, 420)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("while drawing the timeline: {e}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = lanes.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "nested-reft: sync vs async, per process over time",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..n)
        .map_err(|e| err(&e))?;
    let names: Vec<String> = lanes.iter().map(|(n, _)| n.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("seconds since the run's first stage")
        .y_labels(lanes.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (n - y - 0.5).round();
            if (n - y - 0.5 - i).abs() < 0.05 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (lane, (_, spans)) in lanes.iter().enumerate() {
        let y1 = n - lane as f64 - 0.1;
        let y0 = n - lane as f64 - 0.9;
        chart
            .draw_series(spans.iter().filter_map(|s| {
                let color = STAGES.iter().find(|(name, _)| *name == s.stage)?.1;
                Some(Rectangle::new(
                    [(s.start, y0), (s.end.max(s.start), y1)],
                    color.filled(),
                ))
            }))
            .map_err(|e| err(&e))?;
    }
    for (name, color) in STAGES {
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// Writes a run whose learner steps end every `period` seconds, the server generating for
    /// `gen` and pushing for 0.1 s per batch, the learner training for `train` per step.
    fn write_run(dir: &Path, period: f64, gen: f64, train: f64, steps: usize) {
        std::fs::create_dir_all(dir.join("rollout-server")).unwrap();
        let mut learner = String::new();
        let mut server = String::new();
        for k in 0..steps {
            let end = 10.0 + period * (k as f64 + 1.0);
            let g0 = end - train - 0.1 - gen;
            server.push_str(
                &json!({"batch_id": k, "wall_s": g0 + gen + 0.1, "load_s": 0.05, "spans": [
                    {"stage": "generate", "start": g0, "end": g0 + gen},
                    {"stage": "push", "start": g0 + gen, "end": g0 + gen + 0.1},
                ]})
                .to_string(),
            );
            server.push('\n');
            learner.push_str(
                &json!({"step": k + 1, "batch_id": k, "wall_s": end, "publish_s": 0.2,
                    "update": {"reward_mean": 0.5}, "spans": [
                    {"stage": "wait", "start": end - period, "end": end - train},
                    {"stage": "train", "start": end - train, "end": end},
                ]})
                .to_string(),
            );
            learner.push('\n');
        }
        std::fs::write(dir.join("metrics.jsonl"), learner).unwrap();
        std::fs::write(dir.join("rollout-server/metrics.jsonl"), server).unwrap();
    }

    #[test]
    fn speedup_is_the_ratio_of_step_times_and_the_bound_comes_from_the_stage_times() {
        let dir = tempfile::tempdir().unwrap();
        // sync: generate 2.0 + push 0.1, then train 0.9: 3.0 s per step.
        write_run(&dir.path().join("sync"), 3.0, 2.0, 0.9, 6);
        // async: the server's 2.1 s per batch is the bottleneck.
        write_run(&dir.path().join("async"), 2.1, 2.0, 0.9, 6);
        let sync = measure(&dir.path().join("sync"), "sync").unwrap();
        let asy = measure(&dir.path().join("async"), "async").unwrap();
        assert!((sync.step_s - 3.0).abs() < 1e-9, "{sync:?}");
        assert!((asy.step_s - 2.1).abs() < 1e-9, "{asy:?}");
        assert_eq!(sync.timed_steps, 5);
        assert!((sync.learner_busy_s - 0.9).abs() < 1e-9, "{sync:?}");
        assert!((sync.server_busy_s - 2.1).abs() < 1e-9, "{sync:?}");
        assert!((sync.publish_s - 0.2).abs() < 1e-12);
        assert!((sync.load_s - 0.05).abs() < 1e-12);
        // The learner starts each batch as its last record lands: no handoff lost.
        assert_eq!(sync.handoff_s, 0.0, "{sync:?}");
        // In sync the learner idles 2.1 of every 3 s.
        assert!((sync.learner_idle - 0.7).abs() < 1e-9, "{sync:?}");
        let split = crate::train::procs::Split {
            learner: 1,
            server: 1,
            cores: 2,
        };
        let r = report(&split, sync, asy);
        assert_eq!(r.speedup, r.sync.step_s / r.r#async.step_s);
        assert_eq!(r.tg_s, r.sync.server_busy_s);
        assert_eq!(r.tt_s, r.sync.learner_busy_s);
        assert!((r.ideal_bound - 3.0 / 2.1).abs() < 1e-9, "{r:?}");
        assert!((r.fraction_of_bound - 1.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn handoffs_count_the_delays_of_the_waiting_side_only() {
        let span =
            |stage: &str, start: f64, end: f64| json!({"stage": stage, "start": start, "end": end});
        // Batch 1: pushed at 10.0, the waiting learner trains from 10.004; the server waits
        // for step 1 from 11.0, the learner is done at 12.0, the server goes at 12.010.
        let server = vec![
            json!({"batch_id": 1, "wall_s": 10.0, "spans": [span("push", 9.9, 10.0)]}),
            json!({"batch_id": 2, "wall_s": 13.0, "spans": [span("wait", 11.0, 12.010)]}),
        ];
        let learner = vec![
            json!({"batch_id": 0, "wall_s": 9.0, "spans": [span("train", 8.0, 9.0)]}),
            json!({"batch_id": 1, "wall_s": 12.0, "spans": [
                span("wait", 9.0, 10.004), span("train", 10.004, 11.9), span("publish", 11.9, 12.0)]}),
        ];
        let h = handoffs(&learner, &server, 9.0);
        assert!((h - 0.014).abs() < 1e-9, "{h}");
        // A learner that was busy when the batch landed lost nothing to the ring.
        let learner = vec![json!({"batch_id": 1, "wall_s": 12.0, "spans": [
            span("wait", 10.5, 10.6), span("train", 10.6, 12.0)]})];
        let h = handoffs(&learner, &server[..1], 9.0);
        assert_eq!(h, 0.0);
    }

    #[test]
    fn the_timeline_is_an_svg_with_a_lane_per_process_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        write_run(&dir.path().join("sync"), 3.0, 2.0, 0.9, 4);
        write_run(&dir.path().join("async"), 2.1, 2.0, 0.9, 4);
        let path = dir.path().join("timeline.svg");
        timeline(&path, dir.path()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for lane in [
            "sync: rollout server",
            "sync: learner",
            "async: rollout server",
            "async: learner",
        ] {
            assert!(svg.contains(lane), "missing lane {lane}");
        }
        for stage in ["generate", "push", "train", "wait"] {
            assert!(svg.contains(stage), "missing legend entry {stage}");
        }
        let rewards = dir.path().join("rewards.svg");
        reward_plot(&rewards, dir.path()).unwrap();
        let svg2 = std::fs::read_to_string(&rewards).unwrap();
        assert!(
            svg2.contains("sync (thick") && svg2.contains("async (thick"),
            "{svg2}"
        );
        // Every span is drawn: 2 modes × 4 steps × (2 server + 2 learner spans), plus the
        // background, the plot area and the legend.
        assert!(svg.matches("<rect").count() >= 2 * 4 * 4, "{svg}");
    }
}
