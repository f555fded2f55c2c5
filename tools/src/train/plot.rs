//! The reward and accuracy curve of a run, as SVG.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Steps in the trailing mean of the reward.
const TREND: usize = 5;

/// Plots mean reward and accuracy per step (`(step, reward, accuracy)`) to an SVG file.
pub fn reward_curve(path: &Path, title: &str, points: &[(u64, f64, f64)]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("while drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let last = points.last().map_or(1, |p| p.0.max(1));
    let top = points.iter().map(|p| p.1.max(p.2)).fold(1.0f64, f64::max);
    let bottom = points.iter().map(|p| p.1.min(p.2)).fold(0.0f64, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0u64..last, bottom..top * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("per batch")
        .draw()
        .map_err(|e| err(&e))?;
    // Reward and accuracy coincide for a 0/1 reward: the raw reward is drawn wide and light,
    // accuracy thin on top, and a trailing mean of the reward shows the trend.
    let light = RGBColor(150, 180, 255);
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.1)),
            light.stroke_width(5),
        ))
        .map_err(|e| err(&e))?
        .label("mean reward")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light.stroke_width(5)));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.2)),
            RED.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(1)));
    let rewards: Vec<(u64, f64)> = points.iter().map(|p| (p.0, p.1)).collect();
    chart
        .draw_series(LineSeries::new(
            trailing_mean(&rewards),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(format!("mean reward, last {TREND} steps"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Plots several runs' mean reward per step (`(label, [(step, reward)])`) on one chart: each
/// run's raw reward thin, its trailing mean thick, in the run's colour.
pub fn reward_curves(path: &Path, title: &str, curves: &[(String, Vec<(u64, f64)>)]) -> Result<()> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(label, points)| {
            let points = points.iter().map(|&(s, r)| (s as f64, r)).collect();
            (label.clone(), points)
        })
        .collect();
    reward_curves_over(path, title, "step", &curves)
}

/// Plots several runs' mean reward against `x` (a step, or seconds: `(label, [(x, reward)])`)
/// on one chart: each run's raw reward thin, its trailing mean thick, in the run's colour.
pub fn reward_curves_over(
    path: &Path,
    title: &str,
    x_desc: &str,
    curves: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("while drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let last = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let top = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last, 0.0..top * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("mean reward per batch")
        .draw()
        .map_err(|e| err(&e))?;
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    for (i, (label, points)) in curves.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                c.mix(0.35).stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        let trend = trailing_mean(points);
        chart
            .draw_series(LineSeries::new(trend, c.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label(format!("{label} (thick: mean of the last {TREND} steps)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The mean of each point's last `TREND` values (fewer at the start).
fn trailing_mean<X: Copy>(points: &[(X, f64)]) -> Vec<(X, f64)> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let window = &points[i.saturating_sub(TREND - 1)..=i];
            (
                p.0,
                window.iter().map(|q| q.1).sum::<f64>() / window.len() as f64,
            )
        })
        .collect()
}
