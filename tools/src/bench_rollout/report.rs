//! The results of `bench rollout`: `rollout.json`, the printed table and `frontier.svg`.

use super::measure::{SetAccuracy, Throughput};
use anyhow::{anyhow, Context, Result};
use model::{LayerPlan, WeightFormat};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    use super::super::behavior::Behavior;
    use super::*;

    fn b(s: &str) -> Behavior {
        s.parse().unwrap()
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
