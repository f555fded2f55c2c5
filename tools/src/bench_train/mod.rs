//! `nested-reft bench train` and its hidden child `bench train-child`: the learner's
//! differentiable forward + backward (`completion_logprobs` with `Kernels::Differentiable`, full
//! plan, then `backward()` of the token-mean log-prob), next to a plain f32 GEMM of the model's
//! largest shape measured in the same process.
//!
//! Each thread count runs in a fresh child process (`RAYON_NUM_THREADS` sizes candle's rayon
//! pool and its GEMM parallelism once per process), which reports one JSON line.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use model::candle_core::{DType, Device, Tensor};
use model::{
    completion_logprobs, Architecture, Decoder, Kernels, LayerPlan, LoadOptions, ModelConfig,
    ScoreRequest, Weights,
};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Shapes and repetitions shared by the parent and its children.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainShape {
    /// A GGUF file or a Hugging Face directory. Default: SmolLM2-135M-Instruct, fetched into
    /// the asset cache on first use.
    #[arg(long, value_name = "PATH")]
    pub model: Option<std::path::PathBuf>,
    /// Use a small random Llama instead of a checkpoint (tests the harness, measures nothing
    /// of interest).
    #[arg(long, conflicts_with = "model")]
    pub random_model: bool,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (prompt + completion).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Prompt tokens per sequence; the remaining tokens are completion tokens whose
    /// log-probs are computed and back-propagated.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Timed forward + backward iterations (after one untimed warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Kernels of the learner pass: `differentiable` (the learner's) or `composed` (the
    /// reference compositions of candle ops).
    #[arg(long, value_parser = ["differentiable", "composed"], default_value = "differentiable")]
    pub kernels: String,
}

/// The long help of `bench train`: what it measures.
pub const LONG_ABOUT: &str =
    "Measures the learner's training pass on CPU: completion_logprobs with \
the differentiable kernels under the full plan (forward), then backward() of the mean \
completion-token log-prob (backward), on a batch of random tokens. Each thread count runs in a \
fresh child process with RAYON_NUM_THREADS set. In the same child it times a plain f32 GEMM of \
the model's largest shape ((batch*seq_len x hidden) @ (hidden x vocab)) as the machine's \
reference rate. Reports forward and backward seconds (best of --iters after a warm-up), tokens/s \
(batch*seq_len / (forward + backward)), achieved GFLOP/s counted as 6 * parameters * tokens, its \
fraction of the GEMM rate, and the child's peak RSS (VmHWM).";

/// Learner forward + backward throughput per thread count, against a plain f32 GEMM.
#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub shape: TrainShape,
    /// Thread counts, comma separated; each runs in its own child process.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub threads: Vec<usize>,
    /// Print JSON (one object with a `runs` array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The child side of `bench train` (started by it; not for direct use).
#[derive(Debug, clap::Args)]
pub struct BenchTrainChildArgs {
    #[command(flatten)]
    pub shape: TrainShape,
    /// The thread count this child was started with (checked against candle's).
    #[arg(long)]
    pub threads: usize,
}

/// What one child measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRun {
    /// Threads candle uses in this process.
    pub threads: usize,
    /// Sequences × tokens per sequence.
    pub tokens: usize,
    /// Completion tokens whose log-probs were scored.
    pub scored_tokens: usize,
    /// Model parameters.
    pub params: usize,
    /// Best forward seconds.
    pub forward_s: f64,
    /// Best backward seconds.
    pub backward_s: f64,
    /// Best forward + backward seconds (of one iteration).
    pub step_s: f64,
    /// tokens / step_s.
    pub tokens_per_s: f64,
    /// 6 · params · tokens / step_s, in GFLOP/s.
    pub train_gflops: f64,
    /// Shape of the reference GEMM: (m, k, n).
    pub gemm_shape: [usize; 3],
    /// Best GFLOP/s of the reference GEMM.
    pub gemm_gflops: f64,
    /// train_gflops / gemm_gflops.
    pub fraction_of_gemm: f64,
    /// Peak resident set size of the child (VmHWM), bytes.
    pub peak_rss_bytes: u64,
}

/// Runs `bench train`: one child per thread count, then a table or JSON.
pub fn run(args: &BenchTrainArgs) -> Result<()> {
    check_shape(&args.shape)?;
    ensure!(
        !args.threads.is_empty() && args.threads.iter().all(|&t| t > 0),
        "--threads needs positive thread counts"
    );
    let exe = std::env::current_exe().context("while locating this executable")?;
    let mut runs = Vec::new();
    for &threads in &args.threads {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "train-child", "--threads", &threads.to_string()])
            .args(shape_args(&args.shape))
            .env("RAYON_NUM_THREADS", threads.to_string());
        let out = cmd
            .output()
            .with_context(|| format!("while starting the {threads}-thread child"))?;
        if !out.status.success() {
            bail!(
                "the {threads}-thread child failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let run: TrainRun = serde_json::from_str(line.trim())
            .with_context(|| format!("while reading the {threads}-thread child's report"))?;
        runs.push(run);
    }
    let s = &args.shape;
    if args.json {
        let report = serde_json::json!({
            "model": model_label(s),
            "batch": s.batch,
            "seq_len": s.seq_len,
            "prompt_len": s.prompt_len,
            "iters": s.iters,
            "kernels": s.kernels,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "# learner forward+backward ({} kernels, full plan), {} x {} tokens ({} prompt), \
         best of {} after a warm-up; model {}",
        s.kernels,
        s.batch,
        s.seq_len,
        s.prompt_len,
        s.iters,
        model_label(s)
    );
    println!(
        "# GFLOP/s = 6 * params * tokens / (forward + backward); GEMM = plain f32 \
         (m x k) @ (k x n) in the same process"
    );
    println!(
        "{:>7} {:>9} {:>10} {:>9} {:>11} {:>11} {:>8} {:>9} {:>22}",
        "threads",
        "forward_s",
        "backward_s",
        "tokens/s",
        "train_GF/s",
        "gemm_GF/s",
        "of_gemm",
        "peak_RSS",
        "gemm (m x k x n)"
    );
    for r in &runs {
        println!(
            "{:>7} {:>9.3} {:>10.3} {:>9.1} {:>11.1} {:>11.1} {:>7.1}% {:>7.2}GB {:>22}",
            r.threads,
            r.forward_s,
            r.backward_s,
            r.tokens_per_s,
            r.train_gflops,
            r.gemm_gflops,
            100.0 * r.fraction_of_gemm,
            r.peak_rss_bytes as f64 / 1e9,
            format!(
                "{} x {} x {}",
                r.gemm_shape[0], r.gemm_shape[1], r.gemm_shape[2]
            ),
        );
    }
    Ok(())
}

fn model_label(s: &TrainShape) -> String {
    match (&s.model, s.random_model) {
        (_, true) => "random tiny llama".into(),
        (Some(p), _) => p.display().to_string(),
        (None, false) => crate::assets::DEFAULT_MODEL_FILE.into(),
    }
}

fn check_shape(s: &TrainShape) -> Result<()> {
    ensure!(s.batch > 0, "--batch must be positive");
    ensure!(s.iters > 0, "--iters must be positive");
    ensure!(
        s.prompt_len > 0 && s.prompt_len < s.seq_len,
        "--prompt-len must be at least 1 and below --seq-len ({} vs {})",
        s.prompt_len,
        s.seq_len
    );
    Ok(())
}

fn shape_args(s: &TrainShape) -> Vec<String> {
    let mut a = vec![
        format!("--batch={}", s.batch),
        format!("--seq-len={}", s.seq_len),
        format!("--prompt-len={}", s.prompt_len),
        format!("--iters={}", s.iters),
        format!("--kernels={}", s.kernels),
    ];
    if let Some(p) = &s.model {
        a.push("--model".into());
        a.push(p.display().to_string());
    }
    if s.random_model {
        a.push("--random-model".into());
    }
    a
}

/// Runs the hidden `bench train-child`: measures, prints one JSON line.
pub fn run_child(args: &BenchTrainChildArgs) -> Result<()> {
    let s = &args.shape;
    check_shape(s)?;
    let threads = model::candle_core::utils::get_num_threads();
    ensure!(
        threads == args.threads,
        "candle uses {threads} threads, expected {} (is RAYON_NUM_THREADS set?)",
        args.threads
    );
    let decoder = load(s)?;
    let cfg = decoder.config().clone();
    let params: usize = decoder
        .named_parameters()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let kernels = match s.kernels.as_str() {
        "composed" => Kernels::Composed,
        _ => Kernels::Differentiable,
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let seqs: Vec<Vec<u32>> = (0..s.batch)
        .map(|_| {
            (0..s.seq_len)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let reqs: Vec<ScoreRequest<'_>> = seqs
        .iter()
        .map(|q| ScoreRequest {
            prompt: &q[..s.prompt_len],
            completion: &q[s.prompt_len..],
        })
        .collect();
    let plan = LayerPlan::full(cfg.num_layers);
    let mut best_fwd = f64::INFINITY;
    let mut best_bwd = f64::INFINITY;
    let mut best_step = f64::INFINITY;
    for i in 0..=s.iters {
        let t0 = Instant::now();
        let lp = completion_logprobs(&decoder, &reqs, &plan, 1.0, kernels)?;
        let loss =
            ((lp.values * &lp.mask)?.sum_all()? / lp.mask.sum_all()?.to_scalar::<f32>()? as f64)?;
        // Reading the loss synchronises the device (a no-op on CPU).
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let (name, var) = decoder
            .vars()
            .first()
            .context("the model has no trainable parameters")?;
        grads
            .get(var)
            .with_context(|| format!("no gradient for {name}"))?
            .sum_all()?
            .to_scalar::<f32>()?;
        let t2 = Instant::now();
        drop(grads);
        if i > 0 {
            let (f, b) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
            best_fwd = best_fwd.min(f);
            best_bwd = best_bwd.min(b);
            best_step = best_step.min(f + b);
        }
    }
    drop(decoder);
    // Peak memory of loading and training, before the reference GEMM allocates its operands.
    let peak_rss_bytes = peak_rss()?;

    let tokens = s.batch * s.seq_len;
    let gemm_shape = [tokens, cfg.hidden_size, cfg.vocab_size];
    let gemm_gflops = gemm_rate(gemm_shape, s.iters)?;
    let train_gflops = 6.0 * params as f64 * tokens as f64 / best_step / 1e9;
    let run = TrainRun {
        threads,
        tokens,
        scored_tokens: s.batch * (s.seq_len - s.prompt_len),
        params,
        forward_s: best_fwd,
        backward_s: best_bwd,
        step_s: best_step,
        tokens_per_s: tokens as f64 / best_step,
        train_gflops,
        gemm_shape,
        gemm_gflops,
        fraction_of_gemm: train_gflops / gemm_gflops,
        peak_rss_bytes,
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

fn load(s: &TrainShape) -> Result<Decoder> {
    if s.random_model {
        let cfg = ModelConfig {
            max_position_embeddings: s.seq_len.max(64),
            ..ModelConfig::tiny(Architecture::Llama, 256, 2)
        };
        let w = Weights::random(&cfg, 3, DType::F32, &Device::Cpu)?;
        return Ok(Decoder::new(&cfg, &w, true)?);
    }
    let path = match &s.model {
        Some(p) => p.clone(),
        None => crate::assets::default_model()?,
    };
    let opts = LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    };
    let loaded = model::load_model(&path, &opts)
        .with_context(|| format!("while loading the model from {}", path.display()))?;
    Ok(loaded.decoder)
}

/// Best GFLOP/s of `(m × k) @ (k × n)` in f32, laid out as the output head is (the right
/// operand is the transpose of a contiguous (n × k) matrix).
fn gemm_rate([m, k, n]: [usize; 3], iters: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let bt = b.t()?;
    let mut best = f64::INFINITY;
    for i in 0..=iters {
        let t = Instant::now();
        let c = a.matmul(&bt)?;
        let secs = t.elapsed().as_secs_f64();
        drop(c);
        if i > 0 {
            best = best.min(secs);
        }
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// VmHWM of this process, in bytes.
fn peak_rss() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("while reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM line")?
        .parse()
        .context("malformed VmHWM value")?;
    Ok(kb * 1024)
}
