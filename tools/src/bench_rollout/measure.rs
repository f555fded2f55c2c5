//! The measurements of `bench rollout`: decode speed (round-robin with the baseline), drift
//! (KL to the full f32 model on its own greedy completions) and greedy accuracy.

use super::behavior::Resolved;
use crate::calibrate::calibration_sequences;
use crate::eval::{evaluate, EvalConfig, EvalSet};
use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use model::calibrate::{CalibrationSequence, KlProbe};
use model::{generate, Decoder, GenerationConfig, LayerPlan, Sampling, Tokenizer, WeightFormat};
use rewards::Reward;
use rollout_server::dataset::DatasetSpec;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;

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

/// The f32 decoder and one re-quantized copy per weight format in use.
pub struct Decoders {
    base: Decoder,
    quantized: Vec<(WeightFormat, Decoder)>,
}

impl Decoders {
    /// Re-quantizes `base` once for every format the behaviors use.
    pub fn for_behaviors(base: Decoder, resolved: &[Resolved]) -> Result<Self> {
        let mut quantized: Vec<(WeightFormat, Decoder)> = Vec::new();
        for r in resolved {
            let f = r.behavior.format;
            if f.is_quantized() && !quantized.iter().any(|(g, _)| *g == f) {
                let d = base
                    .quantized(f)
                    .with_context(|| format!("while re-quantizing the weights to {f}"))?;
                quantized.push((f, d));
            }
        }
        Ok(Self { base, quantized })
    }

    /// The f32 decoder.
    pub fn base(&self) -> &Decoder {
        &self.base
    }

    /// The decoder of weight format `f`: a re-quantized copy, else the f32 one.
    pub fn of(&self, f: WeightFormat) -> &Decoder {
        self.quantized
            .iter()
            .find(|(g, _)| *g == f)
            .map_or(&self.base, |(_, d)| d)
    }

    /// Every decoder: the f32 one, then the copies.
    pub fn all(&self) -> impl Iterator<Item = &Decoder> {
        std::iter::once(&self.base).chain(self.quantized.iter().map(|(_, d)| d))
    }
}

/// One entry of the measurements: a label, the weight format and the plan.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// `PLAN@FORMAT`.
    pub label: &'a str,
    /// The weight format.
    pub format: WeightFormat,
    /// The plan.
    pub plan: &'a LayerPlan,
}

/// Decode and generation tokens/s of one greedy run of `new_tokens` tokens per prompt.
pub fn time_generation(
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

fn progress_bar(len: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Settings of the speed measurement.
#[derive(Debug, Clone, Copy)]
pub struct SpeedRun<'a> {
    /// Batch sizes.
    pub batches: &'a [usize],
    /// Tokens each prompt decodes.
    pub new_tokens: usize,
    /// Timed runs per entry and batch size.
    pub repeats: usize,
}

/// Speed, round-robin: a warm-up run per decoder, then every repeat runs every entry once per
/// batch size, the order rotating by one entry per repeat so that machine noise hits the
/// baseline (entry 0) and the behaviors alike. Returns per entry the throughput per batch size.
pub fn measure_speed(
    decoders: &Decoders,
    entries: &[Entry<'_>],
    prompts: &[Vec<u32>],
    run: SpeedRun<'_>,
) -> Result<Vec<Vec<Throughput>>> {
    // Warm-up: one short untimed run per decoder (first-call allocations, kernel set-up).
    let full = LayerPlan::full(decoders.base().config().num_layers);
    for d in decoders.all() {
        time_generation(d, &prompts[..1], &full, 4).context("while warming up")?;
    }
    let nb = run.batches.len();
    let mut decode: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); nb]; entries.len()];
    let mut whole: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); nb]; entries.len()];
    let bar = progress_bar((run.repeats * nb * entries.len()) as u64);
    for rep in 0..run.repeats {
        for (bi, &batch) in run.batches.iter().enumerate() {
            for k in 0..entries.len() {
                let e = (k + rep) % entries.len();
                let entry = entries[e];
                bar.set_message(format!("speed b{batch} {}", entry.label));
                let (d, g) = time_generation(
                    decoders.of(entry.format),
                    &prompts[..batch],
                    entry.plan,
                    run.new_tokens,
                )
                .with_context(|| format!("while timing {} at batch {batch}", entry.label))?;
                decode[e][bi].push(d);
                whole[e][bi].push(g);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    Ok((0..entries.len())
        .map(|e| {
            (0..nb)
                .map(|bi| {
                    let (d, g) = (median(&decode[e][bi]), median(&whole[e][bi]));
                    Throughput {
                        batch: run.batches[bi],
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
        .collect())
}

/// What the drift was measured on.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    /// Mean per-token KL(π_full,f32 ‖ π_behavior) per behavior, nats.
    pub kls: Vec<f64>,
    /// Sequences of the measurement.
    pub sequences: usize,
    /// Completion tokens the KL is averaged over.
    pub tokens: usize,
    /// What the sequences are.
    pub source: String,
}

/// Drift: the KL of every behavior to the full f32 model on that model's own greedy
/// completions of the first `problems` problems of `dataset` (at most `max_new` tokens each).
pub fn measure_drift(
    decoders: &Decoders,
    tokenizer: &Tokenizer,
    dataset: &DatasetSpec,
    (problems, max_new, batch): (usize, usize, usize),
    resolved: &[Resolved],
) -> Result<Drift> {
    let base = decoders.base();
    let bar = progress_bar(problems as u64);
    bar.set_message("KL: greedy completions");
    let sequences: Vec<CalibrationSequence> =
        calibration_sequences(base, tokenizer, dataset, problems, max_new, Some(&bar))
            .context("while making the KL sequences")?;
    bar.finish_and_clear();
    let source = format!(
        "greedy completions (at most {max_new} tokens) of the full f32 model for {} problems \
         of {dataset}",
        sequences.len(),
    );
    let mut probe = KlProbe::new(base, &sequences, batch)
        .context("while running the full model over the KL sequences")?;
    let bar = progress_bar(resolved.len() as u64);
    let mut kls = Vec::with_capacity(resolved.len());
    for r in resolved {
        let label = r.behavior.label();
        bar.set_message(format!("KL {label}"));
        let kl = if r.behavior.format.is_quantized() {
            probe.kl_of(decoders.of(r.behavior.format), &r.plan)
        } else {
            probe.kl(&r.plan, false)
        }
        .with_context(|| format!("while measuring the KL of {label}"))?;
        kls.push(kl);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Drift {
        kls,
        sequences: sequences.len(),
        tokens: probe.tokens(),
        source,
    })
}

/// Greedy accuracy of every entry on every set, scored by `reward` as evaluation scores.
pub fn measure_accuracy(
    decoders: &Decoders,
    tokenizer: &Tokenizer,
    entries: &[Entry<'_>],
    sets: &[EvalSet],
    reward: &dyn Reward,
) -> Result<Vec<Vec<SetAccuracy>>> {
    let per_entry: usize = sets.iter().map(|s| s.problems.len()).sum();
    let bar = progress_bar((per_entry * entries.len()) as u64);
    let mut accuracy = vec![Vec::new(); entries.len()];
    for (e, entry) in entries.iter().enumerate() {
        for set in sets {
            bar.set_message(format!("accuracy {} {}", set.name, entry.label));
            let report = evaluate(
                decoders.of(entry.format),
                tokenizer,
                entry.plan,
                &set.problems,
                reward,
                &EvalConfig::greedy(set.max_new_tokens),
                &mut |n| bar.inc(n as u64),
            )
            .with_context(|| format!("while evaluating {} on {}", entry.label, set.name))?;
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
    Ok(accuracy)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
