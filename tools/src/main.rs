//! `nested-reft`: the command line of nested-reft.

use anyhow::Result;
use clap::{Parser, Subcommand};
use tools::{
    bench_behaviors, bench_overlap, bench_ring, bench_rollout, bench_train, calibrate, eval, lm,
    score, train,
};

/// Reinforced fine-tuning with nested (layer-skipping) behavior models.
#[derive(Debug, Parser)]
#[command(name = "nested-reft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train with verifiable rewards: generate with the nested behavior, score, update the
    /// full-depth target. With no arguments: the default model on built-in arithmetic.
    Train(Box<train::TrainArgs>),
    /// Accuracy of a model or a training checkpoint on the GSM8K problems and the arithmetic
    /// levels, under a layer plan: greedy, or pass@k with several samples. Prints a table and
    /// writes every completion and its reward to a JSON file.
    Eval(Box<eval::EvalArgs>),
    /// Measure how far each skippable layer or block moves the model, and build the skip sets
    /// of the calibrated and adaptive plan strategies.
    #[command(long_about = calibrate::LONG_ABOUT)]
    Calibrate(Box<calibrate::CalibrateArgs>),
    /// Generate completions for a prompt or a chat message, under any layer plan.
    Generate(lm::GenerateArgs),
    /// Print per-token log-probs of a text (or a prompt + completion) under a layer plan, as JSON.
    Logprobs(lm::LogprobsArgs),
    /// Score completions from a JSON Lines file with a reward (for debugging a reward module).
    Score(score::ScoreArgs),
    /// Benchmarks: the shared-memory transport, the weight store, the learner, the two-process
    /// overlap and the rollout behaviors, each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
    /// Fetch the default assets (model and GSM8K problems) into the asset cache.
    Fetch {
        /// What to fetch.
        #[arg(value_parser = ["model", "gsm8k", "all"], default_value = "all")]
        what: String,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Rollout ring throughput (GB/s) and round-trip latency (p50/p99) with a peer process.
    Ring(bench_ring::BenchRingArgs),
    /// Weight store publish and read of a parameter set (default: SmolLM2-135M's shapes).
    Weights(bench_ring::BenchWeightsArgs),
    /// Two-process training in `sync` and in `async` mode: time per step, the speedup, its
    /// ideal bound, idle fractions and a timeline picture.
    #[command(long_about = bench_overlap::LONG_ABOUT)]
    Overlap(Box<bench_overlap::BenchOverlapArgs>),
    /// Training runs that differ in their behavior (weights, plan, consistency term, seed),
    /// one after another: seconds per step, reward against wall-clock time, KL(μ‖π), skip
    /// sets and the final model's accuracy.
    #[command(long_about = bench_behaviors::LONG_ABOUT)]
    Behaviors(Box<bench_behaviors::BenchBehaviorsArgs>),
    /// Behaviors (a layer plan × a weight format) against the full-depth f32 model: decode
    /// tokens/s and speedup at batch 1, 8 and 32 (measured in the same run as the baseline), the
    /// ideal speedup, the KL to the full model and greedy accuracy, with a KL-vs-speedup plot.
    #[command(long_about = bench_rollout::LONG_ABOUT)]
    Rollout(Box<bench_rollout::BenchRolloutArgs>),
    /// Learner forward + backward throughput and peak memory, against a plain f32 GEMM.
    #[command(long_about = bench_train::LONG_ABOUT)]
    Train(bench_train::BenchTrainArgs),
    /// The child process `bench train` starts per thread count (not for direct use).
    #[command(hide = true)]
    TrainChild(bench_train::BenchTrainChildArgs),
    /// The peer process `bench ring` starts (not for direct use).
    #[command(hide = true)]
    RingPeer(bench_ring::BenchRingPeerArgs),
}

fn main() -> Result<()> {
    // Invoked under a service's name (a link to this binary), it is that service: a bundle
    // for another machine carries one binary instead of three (see tools/gpu-bundle.sh).
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match invoked_as.as_deref() {
        Some("nested-reft-learner") => {
            return tools::service::learner::main(tools::service::learner::LearnerArgs::parse());
        }
        Some("nested-reft-rollout-server") => {
            return tools::service::server::main(tools::service::server::ServerArgs::parse());
        }
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(*args),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::Generate(args) => lm::generate(args),
        Command::Logprobs(args) => lm::logprobs(args),
        Command::Score(args) => score::run(args),
        Command::Bench(Bench::Ring(args)) => bench_ring::run_ring(&args),
        Command::Bench(Bench::Weights(args)) => bench_ring::run_weights(&args),
        Command::Bench(Bench::Overlap(args)) => bench_overlap::run(*args),
        Command::Bench(Bench::Behaviors(args)) => bench_behaviors::run(*args),
        Command::Bench(Bench::Rollout(args)) => bench_rollout::run(*args),
        Command::Bench(Bench::RingPeer(args)) => bench_ring::run_ring_peer(&args),
        Command::Bench(Bench::Train(args)) => bench_train::run(&args),
        Command::Bench(Bench::TrainChild(args)) => bench_train::run_child(&args),
        Command::Fetch { what } => Ok(protocol::assets::fetch(what.parse()?)?),
    }
}
