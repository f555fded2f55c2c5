//! `nested-reft`: the command line of nested-reft.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod assets;
mod lm;
mod modelargs;
mod score;

/// Reinforced fine-tuning with nested (layer-skipping) behavior models.
#[derive(Debug, Parser)]
#[command(name = "nested-reft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate completions for a prompt or a chat message, under any layer plan.
    Generate(lm::GenerateArgs),
    /// Print per-token log-probs of a text (or a prompt + completion) under a layer plan, as JSON.
    Logprobs(lm::LogprobsArgs),
    /// Score completions from a JSON Lines file with a reward (for debugging a reward module).
    Score(score::ScoreArgs),
    /// Fetch the default assets (model and GSM8K problems) into the asset cache.
    Fetch {
        /// What to fetch.
        #[arg(value_parser = ["model", "gsm8k", "all"], default_value = "all")]
        what: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => lm::generate(args),
        Command::Logprobs(args) => lm::logprobs(args),
        Command::Score(args) => score::run(args),
        Command::Fetch { what } => assets::fetch(&what),
    }
}
