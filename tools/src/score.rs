//! `nested-reft score`: score a JSON Lines file with a reward, for debugging rewards.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `nested-reft score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The reward: a built-in name (`math`, `format`), an inline JSON spec
    /// (`{"kind":"external","command":["python3","math_reward.py"]}`), or a TOML/JSON config
    /// file (the spec itself or its `[reward]` table).
    #[arg(long)]
    pub reward: String,
    /// Input: JSON Lines with `completion` and `reference` (optional `prompt`, `metadata`);
    /// `-` reads stdin.
    pub input: PathBuf,
    /// Write the results here instead of stdout (one JSON object per input line).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Samples per call to the reward (external modules get one request per batch).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

/// Scores every line of the input and prints a summary on stderr.
pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let spec = rewards::RewardSpec::from_arg(&args.reward)
        .with_context(|| format!("while reading the reward spec {:?}", args.reward))?;
    let reward = spec.build().context("while building the reward")?;
    let input: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(io::stdin().lock())
    } else {
        let f = File::open(&args.input)
            .with_context(|| format!("while opening {}", args.input.display()))?;
        Box::new(BufReader::new(f))
    };
    let output: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("while creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(io::stdout().lock())),
    };
    let summary = rewards::score_jsonl(input, output, reward.as_ref(), args.batch_size)
        .context("while scoring")?;
    let mean = summary
        .mean()
        .map_or_else(|| "n/a".to_string(), |m| format!("{m:.4}"));
    eprintln!(
        "{} lines: {} scored (mean {mean}), {} failed",
        summary.lines, summary.scored, summary.failed
    );
    Ok(())
}
