//! Throughput of the built-in `math` verifier on one thread.
//!
//! `cargo run -p rewards --release --example bench_math [passes]`
//!
//! Corpus: the 100 GSM8K worked solutions and generated completions for each (boxed, "the
//! answer is", units, separators, wrong answers), plus generated arithmetic tasks. The
//! baseline, measured in the same run, is the cheapest conceivable verifier: take the last
//! number with one regex and compare it as `f64` (no LaTeX, no fractions, no units).

#[path = "../tests/common/corpus.rs"]
mod corpus;

use std::hint::black_box;
use std::time::Instant;

use regex::Regex;
use rewards::{MathReward, Reward, Sample};

fn main() {
    let passes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let problems = match corpus::load_gsm8k() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench_math: {e}");
            std::process::exit(2);
        }
    };
    // Eight generated variants per problem (different seeds) and a few arithmetic tasks.
    let samples: Vec<Sample> = (1..=8)
        .flat_map(|seed| corpus::corpus(&problems, 50, seed))
        .map(|(s, _)| s)
        .collect();
    let bytes: usize = samples.iter().map(|s| s.completion.len()).sum();
    let m = MathReward::default();

    let number = Regex::new(r"-?\d+(?:\.\d+)?").unwrap_or_else(|e| unreachable!("{e}"));
    let baseline = |s: &Sample| -> f64 {
        let a = number
            .find_iter(&s.completion)
            .last()
            .and_then(|m| m.as_str().parse::<f64>().ok());
        let r = number
            .find_iter(&s.reference)
            .last()
            .and_then(|m| m.as_str().parse::<f64>().ok());
        f64::from(u8::from(a.is_some() && a == r))
    };

    // Warm up both, then interleave passes so both see the same machine conditions.
    let mut correct = 0.0;
    for s in &samples {
        correct += m.score(s).map(|s| s.value).unwrap_or(0.0);
        black_box(baseline(s));
    }
    let (mut t_math, mut t_base) = (0.0f64, 0.0f64);
    for _ in 0..passes {
        let t = Instant::now();
        for s in &samples {
            black_box(m.score(black_box(s)).map(|s| s.value).unwrap_or(0.0));
        }
        t_math += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for s in &samples {
            black_box(baseline(black_box(s)));
        }
        t_base += t.elapsed().as_secs_f64();
    }
    let n = (samples.len() * passes) as f64;
    let (math_rate, base_rate) = (n / t_math, n / t_base);
    println!(
        "corpus: {} samples, {:.0} bytes/completion on average, {:.1}% correct",
        samples.len(),
        bytes as f64 / samples.len() as f64,
        100.0 * correct / samples.len() as f64
    );
    println!(
        "math verifier: {math_rate:.0} samples/s ({:.1} MB/s of completions), one thread",
        math_rate * bytes as f64 / samples.len() as f64 / 1e6
    );
    println!("baseline (last number, f64 compare): {base_rate:.0} samples/s");
    println!("math / baseline throughput: {:.2}", math_rate / base_rate);

    // Bounded work: a 4 MiB completion costs about as much as a short one.
    let big = Sample::new(
        format!(
            "{}\nThe answer is \\boxed{{7}}.",
            "filler text 12 ".repeat(280_000)
        ),
        "7",
    );
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(m.score(black_box(&big)).map(|s| s.value).unwrap_or(0.0));
    }
    let per_big = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{:.1} MiB completion: {:.1} µs per sample ({:.1}x the corpus mean of {:.1} µs)",
        big.completion.len() as f64 / (1 << 20) as f64,
        per_big * 1e6,
        per_big / (1.0 / math_rate),
        1e6 / math_rate
    );
}
