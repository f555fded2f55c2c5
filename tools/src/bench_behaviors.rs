//! `nested-reft bench behaviors`: several training runs that differ in their behavior (weight
//! format, layer plan, consistency term, seed), run one after another as real two-process runs,
//! then compared: seconds per step (generation and learner), reward per step and against
//! wall-clock time, the behavior's KL(μ‖π) per step, the skip sets used, and the final model's
//! accuracy (`nested-reft eval`).

use crate::bench_overlap::{f, read_lines, spans};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The long help of `bench behaviors`.
pub const LONG_ABOUT: &str = "Trains the same task once per --run, one run after another (each \
a real two-process run of `nested-reft train`, `sync` mode by default: there generation is on \
the critical path, so a faster behavior shows in the step time), then evaluates each final model \
with `nested-reft eval` (greedy, --eval-sets, the first --eval-limit problems of each). Reports \
per run: seconds per step (the first step, which includes start-up, left out), the server's \
generation and the learner's training seconds per step, the final reward (mean of the last 5 \
steps), the behavior's KL(μ‖π) per step (k3, from the learner's metrics), the skip sets the \
plan used, and the eval accuracy. Writes behaviors.json and rewards.svg: every run's reward \
against wall-clock time on one chart. A run is `NAME=FLAGS`, the flags passed to `nested-reft \
train` (split on spaces), e.g. `--run 'q8_0 seed 1=--behavior-weights q8_0 --seed 1'`. Without \
--run: f32 and q8_0 behaviors at full depth, seeds 0 and 1.";

/// The runs without `--run`.
const DEFAULT_RUNS: [&str; 4] = [
    "f32 seed 0=--seed 0",
    "f32 seed 1=--seed 1",
    "q8_0 seed 0=--behavior-weights q8_0 --seed 0",
    "q8_0 seed 1=--behavior-weights q8_0 --seed 1",
];

/// Steps at the end whose mean reward is the run's final reward.
const FINAL_WINDOW: usize = 5;

/// `nested-reft bench behaviors`.
#[derive(Debug, Args)]
pub struct BenchBehaviorsArgs {
    /// A run: `NAME=FLAGS`, FLAGS passed to `nested-reft train` (split on spaces). Repeat for
    /// several [default: f32 and q8_0 at full depth, seeds 0 and 1].
    #[arg(long = "run", value_name = "NAME=FLAGS", allow_hyphen_values = true)]
    pub runs: Vec<String>,
    /// Training steps per run.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// The two-process mode of every run: `sync` (generation on the critical path) or `async`.
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    pub mode: String,
    /// Flags passed to every run, e.g. `--train-arg=--prompts-per-batch=4` (repeat for several).
    #[arg(long = "train-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub train_args: Vec<String>,
    /// Problem sets of the final evaluation (`nested-reft eval --dataset`).
    #[arg(long, default_value = "gsm8k,arithmetic:1")]
    pub eval_sets: String,
    /// Problems per evaluation set.
    #[arg(long, default_value_t = 100)]
    pub eval_limit: usize,
    /// Skip the final evaluation.
    #[arg(long)]
    pub no_eval: bool,
    /// Where the runs, `behaviors.json` and `rewards.svg` go [default:
    /// runs/bench-behaviors-<local time>].
    #[arg(long, short, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Reuse the finished runs (and evaluations) in the output directory instead of running
    /// them again.
    #[arg(long)]
    pub reuse: bool,
}

/// One run, as given.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The label in the table and the chart.
    pub name: String,
    /// Its directory name under the output directory.
    pub slug: String,
    /// The flags of `nested-reft train`.
    pub flags: Vec<String>,
}

/// Parses `NAME=FLAGS` specs; names must be unique (their directories would collide).
pub fn parse_runs(specs: &[String]) -> Result<Vec<RunSpec>> {
    let mut out: Vec<RunSpec> = Vec::new();
    for spec in specs {
        let Some((name, flags)) = spec.split_once('=') else {
            bail!("--run `{spec}`: expected NAME=FLAGS, e.g. `q8_0=--behavior-weights q8_0`");
        };
        let name = name.trim();
        ensure!(!name.is_empty(), "--run `{spec}`: the name is empty");
        let slug: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if let Some(other) = out.iter().find(|r| r.slug == slug) {
            bail!(
                "--run `{name}` and `{}` would share the directory `{slug}`: give them distinct names",
                other.name
            );
        }
        out.push(RunSpec {
            name: name.to_string(),
            slug,
            flags: flags.split_whitespace().map(str::to_string).collect(),
        });
    }
    Ok(out)
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The run's label.
    pub name: String,
    /// The flags of `nested-reft train`.
    pub flags: Vec<String>,
    /// Training steps recorded.
    pub steps: usize,
    /// Mean seconds per step (end of the first step to the end of the last).
    pub step_s: f64,
    /// Mean seconds per batch the server spent generating and scoring.
    pub generate_s: f64,
    /// Mean seconds per step the learner spent training.
    pub train_s: f64,
    /// Mean behavior tokens/s of the server.
    pub behavior_tokens_per_s: f64,
    /// Mean reward of the last steps.
    pub final_reward: f64,
    /// Per step: (step, seconds since the first step's start, mean reward).
    pub rewards: Vec<(u64, f64, f64)>,
    /// Per step: KL(μ‖π) as k3 (nan where nothing trained).
    pub kl_behavior: Vec<f64>,
    /// Mean of `kl_behavior` over the trained steps.
    pub kl_behavior_mean: f64,
    /// The skip sets of the trained batches' plans, with how many batches used each (`full`
    /// for none).
    pub skip_sets: BTreeMap<String, usize>,
    /// Eval accuracy per problem set (`nested-reft eval`), when evaluated.
    pub eval: BTreeMap<String, f64>,
}

/// The whole report (`behaviors.json`).
#[derive(Debug, Serialize)]
pub struct BehaviorsReport {
    /// `sync` or `async`.
    pub mode: String,
    /// Steps per run.
    pub steps: u64,
    /// Flags given to every run.
    pub train_args: Vec<String>,
    /// One entry per run, in the order given.
    pub runs: Vec<RunResult>,
}

/// Runs the comparison.
pub fn run(args: BenchBehaviorsArgs) -> Result<()> {
    ensure!(
        args.steps >= 3,
        "--steps must be at least 3 (the first step is start-up and is not timed)"
    );
    ensure!(args.eval_limit >= 1, "--eval-limit must be at least 1");
    let given: Vec<String> = if args.runs.is_empty() {
        DEFAULT_RUNS.iter().map(|s| s.to_string()).collect()
    } else {
        args.runs.clone()
    };
    let specs = parse_runs(&given)?;
    let out = args
        .output_dir
        .clone()
        .unwrap_or_else(|| crate::rundir::new_run_dir("bench-behaviors"));
    std::fs::create_dir_all(&out).with_context(|| format!("while creating {}", out.display()))?;
    let exe = std::env::current_exe().context("while locating nested-reft")?;
    let sets: Vec<String> = args
        .eval_sets
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    ensure!(
        args.no_eval || !sets.is_empty(),
        "--eval-sets names no problem set"
    );
    let mut results = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let dir = out.join(&spec.slug);
        let done = dir.join("metrics.jsonl").is_file() && dir.join("config.toml").is_file();
        if !(args.reuse && done) {
            eprintln!(
                "bench behaviors: run {}/{} `{}`: {} steps, {} mode",
                i + 1,
                specs.len(),
                spec.name,
                args.steps,
                args.mode
            );
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("while clearing {}", dir.display()))?;
            }
            let mut train = Command::new(&exe);
            train
                .arg("train")
                .args(["--mode", &args.mode, "--steps", &args.steps.to_string()])
                .arg("--output-dir")
                .arg(&dir)
                .args(&args.train_args)
                .args(&spec.flags);
            run_child(train, &format!("the run `{}`", spec.name), &dir)?;
        }
        let eval_file = dir.join("eval.json");
        if !(args.no_eval || args.reuse && eval_file.is_file()) {
            eprintln!(
                "bench behaviors: evaluating `{}` on {}",
                spec.name,
                sets.join(", ")
            );
            let mut eval = Command::new(&exe);
            eval.arg("eval")
                .arg("--checkpoint")
                .arg(&dir)
                .args(["--dataset", &sets.join(",")])
                .args(["--limit", &args.eval_limit.to_string()])
                .arg("--output")
                .arg(&eval_file);
            run_child(eval, &format!("the evaluation of `{}`", spec.name), &dir)?;
        }
        let mut r = measure(&dir, spec)?;
        if !args.no_eval {
            r.eval = read_eval(&eval_file)?;
        }
        results.push(r);
    }
    let report = BehaviorsReport {
        mode: args.mode.clone(),
        steps: args.steps,
        train_args: args.train_args.clone(),
        runs: results,
    };
    let json = out.join("behaviors.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("while writing {}", json.display()))?;
    let chart = out.join("rewards.svg");
    reward_plot(&chart, &report)?;
    print!("{}", render_table(&report));
    println!("report:  {}", json.display());
    println!("rewards: {}", chart.display());
    Ok(())
}

/// Runs `cmd` to its end; a failure names `what` and the directory to look in.
fn run_child(mut cmd: Command, what: &str, dir: &Path) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("while starting {what}"))?;
    ensure!(
        status.success(),
        "{what} failed ({status}); see {}",
        dir.display()
    );
    Ok(())
}

/// Reads one finished run's metrics (learner `metrics.jsonl`, server
/// `rollout-server/metrics.jsonl`).
pub fn measure(dir: &Path, spec: &RunSpec) -> Result<RunResult> {
    let steps: Vec<serde_json::Value> = read_lines(&dir.join("metrics.jsonl"))?
        .into_iter()
        .filter(|v| v.get("event").is_none() && v.get("step").is_some())
        .collect();
    // The server may have generated batches ahead that no step trained: only the trained
    // batches count.
    let trained: std::collections::BTreeSet<u64> = steps
        .iter()
        .filter_map(|v| v.get("batch_id")?.as_u64())
        .collect();
    let server: Vec<serde_json::Value> = read_lines(&dir.join("rollout-server/metrics.jsonl"))?
        .into_iter()
        .filter(|v| {
            v.get("batch_id")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|b| trained.contains(&b))
        })
        .collect();
    if steps.len() < 2 {
        bail!(
            "{}: only {} training steps recorded; need at least 2",
            dir.display(),
            steps.len()
        );
    }
    // Time zero: the first stage of either process.
    let t0 = steps
        .iter()
        .chain(&server)
        .flat_map(spans)
        .map(|s| s.start)
        .fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() {
        t0
    } else {
        f(&steps[0], "wall_s")
    };
    let first_end = f(&steps[0], "wall_s");
    let last_end = f(&steps[steps.len() - 1], "wall_s");
    let timed = steps.len() - 1;
    let mean = |xs: &[f64]| {
        let xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let stage_s = |lines: &[serde_json::Value], stages: &[&str]| -> Vec<f64> {
        lines
            .iter()
            .map(|v| {
                spans(v)
                    .iter()
                    .filter(|s| stages.contains(&s.stage.as_str()))
                    .map(|s| (s.end - s.start).max(0.0))
                    .sum()
            })
            .collect()
    };
    // The first batch and step include start-up: left out of the per-step means.
    let generate = stage_s(&server, &["generate", "score"]);
    let train = stage_s(&steps, &["train"]);
    let update = |v: &serde_json::Value| v.get("update").filter(|u| !u.is_null()).cloned();
    let rewards: Vec<(u64, f64, f64)> = steps
        .iter()
        .filter_map(|v| {
            let u = update(v)?;
            Some((
                v.get("step")?.as_u64()?,
                f(v, "wall_s") - t0,
                u.get("reward_mean")?.as_f64()?,
            ))
        })
        .collect();
    let kl_behavior: Vec<f64> = steps
        .iter()
        .map(|v| {
            update(v)
                .filter(|u| u.get("tokens").and_then(serde_json::Value::as_u64) > Some(0))
                .and_then(|u| u.get("kl_behavior_k3").and_then(serde_json::Value::as_f64))
                .unwrap_or(f64::NAN)
        })
        .collect();
    let mut skip_sets = BTreeMap::new();
    for v in &server {
        let units: Vec<String> = v
            .get("skipped_units")
            .and_then(|u| serde_json::from_value(u.clone()).ok())
            .unwrap_or_default();
        let key = if units.is_empty() {
            "full".to_string()
        } else {
            units.join(",")
        };
        *skip_sets.entry(key).or_insert(0) += 1;
    }
    let tail: Vec<f64> = rewards
        .iter()
        .rev()
        .take(FINAL_WINDOW)
        .map(|r| r.2)
        .collect();
    let behavior_tps: Vec<f64> = server
        .iter()
        .filter_map(|v| v.get("generation")?.get("behavior_tokens_per_s")?.as_f64())
        .collect();
    Ok(RunResult {
        name: spec.name.clone(),
        flags: spec.flags.clone(),
        steps: steps.len(),
        step_s: (last_end - first_end) / timed as f64,
        generate_s: mean(generate.get(1..).unwrap_or_default()),
        train_s: mean(train.get(1..).unwrap_or_default()),
        behavior_tokens_per_s: mean(behavior_tps.get(1..).unwrap_or_default()),
        final_reward: mean(&tail),
        kl_behavior_mean: mean(&kl_behavior),
        kl_behavior,
        rewards,
        skip_sets,
        eval: BTreeMap::new(),
    })
}

/// Accuracy per problem set from an `eval.json` of `nested-reft eval`.
pub fn read_eval(path: &Path) -> Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    let runs = v
        .get("runs")
        .and_then(serde_json::Value::as_array)
        .with_context(|| format!("{}: no `runs` list", path.display()))?;
    let mut out = BTreeMap::new();
    for r in runs {
        let (Some(set), Some(acc)) = (
            r.get("dataset").and_then(serde_json::Value::as_str),
            r.get("summary")
                .and_then(|s| s.get("accuracy"))
                .and_then(serde_json::Value::as_f64),
        ) else {
            bail!("{}: a run without dataset or accuracy", path.display());
        };
        out.insert(set.to_string(), acc);
    }
    Ok(out)
}

/// The table printed at the end.
pub fn render_table(r: &BehaviorsReport) -> String {
    let sets: Vec<String> = r
        .runs
        .iter()
        .flat_map(|x| x.eval.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut s = format!(
        "# {} runs of {} steps in {} mode; seconds per step leave out the first step; final reward = mean of the last {FINAL_WINDOW} steps; KL(μ‖π) = mean k3 per token\n",
        r.runs.len(),
        r.steps,
        r.mode
    );
    s.push_str(&format!(
        "{:<24} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9}",
        "run", "s/step", "gen s", "train s", "tok/s", "reward", "KL"
    ));
    for set in &sets {
        s.push_str(&format!(" {:>12}", set));
    }
    s.push('\n');
    for x in &r.runs {
        s.push_str(&format!(
            "{:<24} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>8.3} {:>9.4}",
            x.name,
            x.step_s,
            x.generate_s,
            x.train_s,
            x.behavior_tokens_per_s,
            x.final_reward,
            x.kl_behavior_mean
        ));
        for set in &sets {
            match x.eval.get(set) {
                Some(a) => s.push_str(&format!(" {:>11.1}%", 100.0 * a)),
                None => s.push_str(&format!(" {:>12}", "-")),
            }
        }
        s.push('\n');
    }
    for x in &r.runs {
        if x.skip_sets.len() > 1 || !x.skip_sets.contains_key("full") {
            let used: Vec<String> = x
                .skip_sets
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect();
            s.push_str(&format!("skip sets of {}: {}\n", x.name, used.join("; ")));
        }
    }
    s
}

/// Every run's reward against wall-clock seconds, on one chart.
pub fn reward_plot(path: &Path, r: &BehaviorsReport) -> Result<()> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = r
        .runs
        .iter()
        .map(|x| {
            (
                x.name.clone(),
                x.rewards.iter().map(|&(_, t, rw)| (t, rw)).collect(),
            )
        })
        .collect();
    crate::train::plot::reward_curves_over(
        path,
        &format!("mean reward against wall-clock time ({} mode)", r.mode),
        "seconds since the run's start",
        &curves,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_parse_into_names_slugs_and_flags_and_bad_specs_are_refused() {
        let r = parse_runs(&[
            "q8_0 seed 1=--behavior-weights q8_0  --seed 1".into(),
            "f32=".into(),
        ])
        .unwrap();
        assert_eq!(r[0].name, "q8_0 seed 1");
        assert_eq!(r[0].slug, "q8_0-seed-1");
        assert_eq!(
            r[0].flags,
            vec!["--behavior-weights", "q8_0", "--seed", "1"]
        );
        assert!(r[1].flags.is_empty());
        let e = parse_runs(&["no flags".into()]).unwrap_err().to_string();
        assert!(e.contains("NAME=FLAGS"), "{e}");
        let e = parse_runs(&["=--seed 1".into()]).unwrap_err().to_string();
        assert!(e.contains("name is empty"), "{e}");
        let e = parse_runs(&["a b=--seed 1".into(), "a/b=--seed 2".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("distinct names"), "{e}");
    }

    #[test]
    fn a_run_is_measured_from_both_processes_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("rollout-server")).unwrap();
        let mut learner = String::new();
        let mut server = String::new();
        // Each step: the server generates 3 s (batch k from 10 + 5k), the learner trains 2 s.
        for k in 0..4u64 {
            let g0 = 10.0 + 5.0 * k as f64;
            let units: Vec<&str> = if k % 2 == 0 { vec![] } else { vec!["4", "a7"] };
            server.push_str(
                &json!({"batch_id": k, "wall_s": g0 + 3.0, "skipped_units": units,
                    "generation": {"behavior_tokens_per_s": 10.0 * (k + 1) as f64},
                    "spans": [{"stage": "generate", "start": g0, "end": g0 + 2.5},
                              {"stage": "score", "start": g0 + 2.5, "end": g0 + 3.0}]})
                .to_string(),
            );
            server.push('\n');
            let tokens = if k == 2 { 0 } else { 10 };
            learner.push_str(
                &json!({"step": k + 1, "batch_id": k, "wall_s": g0 + 5.0,
                    "update": {"reward_mean": 0.1 * (k + 1) as f64, "tokens": tokens,
                               "kl_behavior_k3": 0.01 * (k + 1) as f64},
                    "spans": [{"stage": "wait", "start": g0, "end": g0 + 3.0},
                              {"stage": "train", "start": g0 + 3.0, "end": g0 + 5.0}]})
                .to_string(),
            );
            learner.push('\n');
        }
        // The server's fifth batch (generated ahead) was never trained.
        server.push_str(
            &json!({"batch_id": 4, "wall_s": 33.0, "skipped_units": ["9"],
                "generation": {"behavior_tokens_per_s": 1.0},
                "spans": [{"stage": "generate", "start": 30.0, "end": 33.0}]})
            .to_string(),
        );
        server.push('\n');
        learner.push_str("{\"event\":\"resumed\",\"step\":2}\n");
        std::fs::write(d.join("metrics.jsonl"), learner).unwrap();
        std::fs::write(d.join("rollout-server/metrics.jsonl"), server).unwrap();
        let spec = parse_runs(&["x=--seed 3".into()]).unwrap().remove(0);
        let r = measure(d, &spec).unwrap();
        assert_eq!(r.steps, 4);
        assert!((r.step_s - 5.0).abs() < 1e-9, "{r:?}");
        assert!((r.generate_s - 3.0).abs() < 1e-9, "{r:?}");
        assert!((r.train_s - 2.0).abs() < 1e-9, "{r:?}");
        // Batches 2..4 (the first is start-up): 20, 30, 40 tokens/s.
        assert!((r.behavior_tokens_per_s - 30.0).abs() < 1e-9, "{r:?}");
        // Rewards are timed from the first stage (10 s): step 1 ends at 15 s.
        assert_eq!(r.rewards[0], (1, 5.0, 0.1));
        assert!((r.final_reward - 0.25).abs() < 1e-9, "{r:?}");
        // The step that trained no tokens measured no KL.
        assert!(r.kl_behavior[2].is_nan());
        assert!((r.kl_behavior_mean - (0.01 + 0.02 + 0.04) / 3.0).abs() < 1e-12);
        assert_eq!(r.skip_sets.get("full"), Some(&2));
        assert_eq!(r.skip_sets.get("4,a7"), Some(&2));
        assert_eq!(r.skip_sets.len(), 2, "the untrained batch counts: {r:?}");
        let report = BehaviorsReport {
            mode: "sync".into(),
            steps: 4,
            train_args: vec![],
            runs: vec![r],
        };
        let table = render_table(&report);
        assert!(
            table.contains("skip sets of x: 4,a7 ×2; full ×2"),
            "{table}"
        );
        let svg = d.join("rewards.svg");
        reward_plot(&svg, &report).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("seconds since"));
    }

    #[test]
    fn eval_accuracy_is_read_per_set_and_a_malformed_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("eval.json");
        std::fs::write(
            &p,
            json!({"runs": [{"dataset": "gsm8k", "summary": {"accuracy": 0.05}},
                            {"dataset": "arithmetic:1", "summary": {"accuracy": 0.4}}]})
            .to_string(),
        )
        .unwrap();
        let e = read_eval(&p).unwrap();
        assert_eq!(e["gsm8k"], 0.05);
        assert_eq!(e["arithmetic:1"], 0.4);
        std::fs::write(&p, json!({"runs": [{"dataset": "gsm8k"}]}).to_string()).unwrap();
        assert!(read_eval(&p).is_err());
        std::fs::write(&p, "not json").unwrap();
        assert!(read_eval(&p).is_err());
    }
}
