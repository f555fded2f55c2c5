//! `nested-reft eval`: the accuracy of a model or a training checkpoint on the GSM8K problems
//! and the built-in arithmetic levels, under any layer plan, greedy or pass@k.
//!
//! - [`evaluate`] is the scoring loop: a decoder, a plan, a problem list and a reward in, an
//!   [`EvalReport`] (summary and per-problem results) out. It builds every prompt with
//!   [`PromptFormat`] (the rule of [`rollout_server::Generator::prompt_text`]) and scores every
//!   completion with the training reward, so an accuracy here means what the training accuracy
//!   means. A benchmark calls it with its own `&Decoder` and `&LayerPlan`.
//! - [`EvalSet`] is a named problem list; [`EvalSet::gsm8k`] and [`EvalSet::arithmetic`] load
//!   the two built-in sources, separately from the scoring loop.
//! - [`pass_at_k`] is the unbiased pass@k estimator.
//! - [`run`] (in `eval/cli.rs`) is the command: model or checkpoint, plans, sets, the table
//!   and the JSON file.

mod cli;

pub use cli::{run, EvalArgs};

use crate::train::TrainFile;
use anyhow::{bail, ensure, Context, Result};
use model::{
    generate, stream_seed, ChatMessage, Decoder, FinishReason, GenerationConfig, LayerPlan,
    Sampling, Tokenizer,
};
use rewards::{Reward, Sample};
use rollout_server::dataset::{Dataset, DatasetError, DatasetSpec, Gsm8kError, Problem};
use rollout_server::GeneratorConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Problems per arithmetic level when `--count` is not given.
pub const DEFAULT_ARITHMETIC_COUNT: usize = 100;
/// Generator seed of the arithmetic problems when `--problem-seed` is not given. Training draws
/// its arithmetic problems with seed 0, so the default evaluation set is a different draw.
pub const DEFAULT_PROBLEM_SEED: u64 = 1;
/// Token limit of an arithmetic completion (the training default).
pub const ARITHMETIC_MAX_NEW_TOKENS: usize = 64;
/// Token limit of a GSM8K (or JSON Lines) completion.
pub const GSM8K_MAX_NEW_TOKENS: usize = 256;
/// Stream index of the sampling seeds of a batch (see [`stream_seed`]).
const EVAL_STREAM: u64 = u64::MAX - 2;

/// How a problem becomes a prompt: the user message is the question, a blank line and the
/// instruction, after an optional system message, rendered with the model's chat template and
/// an assistant turn opened. The same rule as [`rollout_server::Generator::prompt_text`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptFormat {
    /// Optional system message.
    pub system_prompt: Option<String>,
    /// Appended to every question after a blank line (nothing when empty).
    pub instruction: String,
}

impl PromptFormat {
    /// The format a training generator with `cfg` uses.
    pub fn of_generator(cfg: &GeneratorConfig) -> Self {
        Self {
            system_prompt: cfg.system_prompt.clone(),
            instruction: cfg.instruction.clone(),
        }
    }

    /// The chat-templated prompt text of `question`.
    pub fn text(&self, tokenizer: &Tokenizer, question: &str) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(s) = &self.system_prompt {
            messages.push(ChatMessage::new("system", s.as_str()));
        }
        let user = if self.instruction.is_empty() {
            question.to_string()
        } else {
            format!("{question}\n\n{}", self.instruction)
        };
        messages.push(ChatMessage::new("user", user));
        Ok(tokenizer.apply_chat_template(&messages, true)?)
    }
}

/// The format of `nested-reft train` with its default configuration.
impl Default for PromptFormat {
    fn default() -> Self {
        Self::of_generator(&TrainFile::default().generator)
    }
}

/// How [`evaluate`] generates and scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Greedy, or temperature sampling (needed for `samples > 1`).
    pub sampling: Sampling,
    /// Completions per problem (K of pass@k).
    pub samples: usize,
    /// Token limit of a completion.
    pub max_new_tokens: usize,
    /// Problems per call of the batched generation.
    pub batch_size: usize,
    /// Seed of the sampling streams (batch `b` uses `stream_seed(seed, first problem, ·)`).
    pub seed: u64,
    /// How questions become prompts.
    pub prompt: PromptFormat,
    /// A completion whose reward reaches this is correct (training's `correct_threshold`).
    pub correct_threshold: f64,
}

impl EvalConfig {
    /// Greedy decoding, one completion per problem, batches of 8, the training prompt and
    /// threshold.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            sampling: Sampling::Greedy,
            samples: 1,
            max_new_tokens,
            batch_size: 8,
            seed: 0,
            prompt: PromptFormat::default(),
            correct_threshold: TrainFile::default().update.correct_threshold,
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.samples >= 1, "samples must be at least 1");
        ensure!(
            self.max_new_tokens >= 1,
            "max_new_tokens must be at least 1"
        );
        ensure!(self.batch_size >= 1, "the batch size must be at least 1");
        ensure!(
            self.correct_threshold.is_finite(),
            "correct_threshold must be finite"
        );
        if self.samples > 1 && self.sampling == Sampling::Greedy {
            bail!(
                "{} greedy completions of a problem are all the same: sample at a temperature \
                 above 0 for pass@k",
                self.samples
            );
        }
        self.sampling.validate()?;
        Ok(())
    }
}

/// One completion and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResult {
    /// The decoded text (special tokens dropped), as the reward saw it.
    pub text: String,
    /// Generated tokens (an ending EOS included).
    pub tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// The reward; `None` when the reward failed on this sample.
    pub reward: Option<f64>,
    /// The answer the reward extracted, when it reports one.
    pub extracted: Option<String>,
    /// Whether the reward reached the threshold.
    pub correct: bool,
    /// Why the reward failed (the completion then counts as wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_error: Option<String>,
}

/// One problem and its completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    /// Position in the evaluated list.
    pub index: usize,
    /// The problem's id in its dataset.
    pub id: String,
    /// The question.
    pub question: String,
    /// The reference answer.
    pub expected: String,
    /// Prompt length in tokens (chat template included).
    pub prompt_tokens: usize,
    /// Correct completions among `completions`.
    pub correct: usize,
    /// The K completions.
    pub completions: Vec<CompletionResult>,
}

/// pass@k of one k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PassAtK {
    /// k.
    pub k: usize,
    /// Mean over problems of the unbiased estimate ([`pass_at_k`]).
    pub value: f64,
}

/// The numbers of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Problems evaluated.
    pub problems: usize,
    /// Completions per problem (K).
    pub samples_per_problem: usize,
    /// Completions in all (problems · K).
    pub completions: usize,
    /// Correct completions.
    pub correct: usize,
    /// Problems with at least one correct completion.
    pub solved: usize,
    /// `correct / completions`: the accuracy, which is pass@1.
    pub accuracy: f64,
    /// pass@k for k = 1, 2, 4, … below K, and K (with k = K: the fraction `solved / problems`).
    pub pass_at_k: Vec<PassAtK>,
    /// Mean completion length in tokens.
    pub mean_completion_tokens: f64,
    /// Completions cut at the token limit.
    pub truncated: usize,
    /// Completions whose reward failed (counted as wrong).
    pub reward_failures: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Seconds of generation (prefill and decode).
    pub generation_s: f64,
    /// Generated tokens per second of generation.
    pub tokens_per_s: f64,
    /// Seconds of the whole evaluation (tokenizing, generating, scoring).
    pub wall_s: f64,
}

/// What [`evaluate`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The numbers.
    pub summary: EvalSummary,
    /// One entry per problem, in the order given.
    pub results: Vec<ProblemResult>,
}

/// The unbiased pass@k estimate of one problem from `n` samples of which `c` are correct:
/// 1 − C(n−c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold
/// a correct one. With k = n it is 1 when any sample is correct, else 0. `None` unless
/// 1 ≤ k ≤ n and c ≤ n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    // C(n−c, k) / C(n, k) = ∏_{i = n−c+1}^{n} (1 − k / i): no large binomials.
    let miss: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Some(1.0 - miss)
}

/// The k values reported for K samples: 1, 2, 4, … below K, and K.
fn reported_ks(samples: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2))
        .take_while(|&k| k < samples)
        .collect();
    ks.push(samples.max(1));
    ks
}

/// Evaluates `problems` with `decoder` under `plan`: generates `cfg.samples` completions per
/// problem in batches of `cfg.batch_size` problems, scores each with `reward` (prompt = the
/// question, reference = the answer, as training does) and counts a completion as correct when
/// its reward reaches `cfg.correct_threshold`. A failed reward on one sample counts as wrong
/// and is reported; a reward returning the wrong number of scores is an error.
///
/// `progress` is called after every batch with the number of problems it finished.
pub fn evaluate(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    plan: &LayerPlan,
    problems: &[Problem],
    reward: &dyn Reward,
    cfg: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    cfg.validate()?;
    ensure!(!problems.is_empty(), "there are no problems to evaluate");
    let start = Instant::now();
    let k = cfg.samples;
    let mut results = Vec::with_capacity(problems.len());
    let (mut generated_tokens, mut generation_s) = (0usize, 0.0f64);
    for (b, chunk) in problems.chunks(cfg.batch_size).enumerate() {
        let first = b * cfg.batch_size;
        let mut prompts = Vec::with_capacity(chunk.len());
        for p in chunk {
            let text = cfg.prompt.text(tokenizer, &p.question)?;
            prompts.push(
                tokenizer
                    .encode(&text, false)
                    .with_context(|| format!("while tokenizing the prompt of {}", p.id))?,
            );
        }
        let gen_cfg = GenerationConfig {
            sampling: cfg.sampling,
            max_new_tokens: cfg.max_new_tokens,
            group_size: k,
            seed: stream_seed(cfg.seed, first as u64, EVAL_STREAM),
            eos_token_ids: tokenizer.eos_token_ids().to_vec(),
            stop_strings: Vec::new(),
        };
        let out =
            generate(decoder, &prompts, plan, &gen_cfg, Some(tokenizer)).with_context(|| {
                format!(
                    "while generating for problems {first}..{}",
                    first + chunk.len()
                )
            })?;
        generated_tokens += out.timings.generated_tokens;
        generation_s += (out.timings.prefill + out.timings.decode).as_secs_f64();

        // Completions by (problem, sample), whatever order they come in.
        let mut slots: Vec<Vec<Option<(model::Completion, String)>>> =
            (0..chunk.len()).map(|_| vec![None; k]).collect();
        let mut samples = Vec::with_capacity(out.completions.len());
        let mut order = Vec::with_capacity(out.completions.len());
        for c in out.completions {
            let (p, s) = (c.prompt_index, c.sample_index);
            ensure!(
                p < chunk.len() && s < k,
                "generation returned completion {s} of prompt {p} for {} prompts × {k}",
                chunk.len()
            );
            let text = tokenizer.decode(&c.tokens, true)?;
            samples.push(Sample {
                prompt: chunk[p].question.clone(),
                completion: text.clone(),
                reference: chunk[p].answer.clone(),
                metadata: serde_json::Value::Null,
            });
            order.push((p, s));
            slots[p][s] = Some((c, text));
        }
        let scores = reward.score_batch(&samples);
        ensure!(
            scores.len() == samples.len(),
            "the reward returned {} scores for {} samples",
            scores.len(),
            samples.len()
        );
        let mut scored: Vec<Vec<Option<CompletionResult>>> =
            (0..chunk.len()).map(|_| vec![None; k]).collect();
        for ((p, s), score) in order.into_iter().zip(scores) {
            let Some((c, text)) = slots[p][s].take() else {
                bail!("generation returned completion {s} of prompt {p} twice");
            };
            let (reward, extracted, reward_error) = match score {
                Ok(sc) => (Some(sc.value), sc.extracted, None),
                Err(e) => (None, None, Some(e.to_string())),
            };
            scored[p][s] = Some(CompletionResult {
                text,
                tokens: c.tokens.len(),
                finish: c.finish,
                correct: reward.is_some_and(|r| r >= cfg.correct_threshold),
                reward,
                extracted,
                reward_error,
            });
        }
        for (i, (problem, row)) in chunk.iter().zip(scored).enumerate() {
            let completions = row
                .into_iter()
                .enumerate()
                .map(|(s, c)| {
                    c.with_context(|| {
                        format!("generation returned no completion {s} for {}", problem.id)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            results.push(ProblemResult {
                index: first + i,
                id: problem.id.clone(),
                question: problem.question.clone(),
                expected: problem.answer.clone(),
                prompt_tokens: prompts[i].len(),
                correct: completions.iter().filter(|c| c.correct).count(),
                completions,
            });
        }
        progress(chunk.len());
    }
    let summary = summarize(
        &results,
        k,
        generated_tokens,
        generation_s,
        start.elapsed().as_secs_f64(),
    );
    Ok(EvalReport { summary, results })
}

/// The summary of per-problem results.
fn summarize(
    results: &[ProblemResult],
    samples: usize,
    generated_tokens: usize,
    generation_s: f64,
    wall_s: f64,
) -> EvalSummary {
    let all = || results.iter().flat_map(|r| &r.completions);
    let completions = all().count();
    let correct = all().filter(|c| c.correct).count();
    let problems = results.len();
    let ratio = |a: f64, b: usize| if b > 0 { a / b as f64 } else { 0.0 };
    let pass_at_k = reported_ks(samples)
        .into_iter()
        .map(|k| PassAtK {
            k,
            value: ratio(
                results
                    .iter()
                    .filter_map(|r| pass_at_k(r.completions.len(), r.correct, k))
                    .sum(),
                problems,
            ),
        })
        .collect();
    EvalSummary {
        problems,
        samples_per_problem: samples,
        completions,
        correct,
        solved: results.iter().filter(|r| r.correct > 0).count(),
        accuracy: ratio(correct as f64, completions),
        pass_at_k,
        mean_completion_tokens: ratio(all().map(|c| c.tokens as f64).sum(), completions),
        truncated: all().filter(|c| c.finish == FinishReason::Length).count(),
        reward_failures: all().filter(|c| c.reward_error.is_some()).count(),
        generated_tokens,
        generation_s,
        tokens_per_s: if generation_s > 0.0 {
            generated_tokens as f64 / generation_s
        } else {
            0.0
        },
        wall_s,
    }
}

/// A named list of problems and the token limit its completions get by default.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Short name: `gsm8k`, `arithmetic:3`, or the file.
    pub name: String,
    /// The problems, in source order.
    pub problems: Vec<Problem>,
    /// Token limit unless overridden: [`ARITHMETIC_MAX_NEW_TOKENS`] for arithmetic,
    /// [`GSM8K_MAX_NEW_TOKENS`] otherwise.
    pub max_new_tokens: usize,
}

impl EvalSet {
    /// The GSM8K problems of `dir` (default: `<assets>/gsm8k`); a missing directory says how to
    /// fetch it.
    pub fn gsm8k(dir: Option<PathBuf>) -> Result<Self> {
        let name = match &dir {
            None => "gsm8k".to_string(),
            Some(d) => format!("gsm8k:{}", d.display()),
        };
        let dataset = Dataset::open(&DatasetSpec::Gsm8k { dir }).map_err(|e| match e {
            DatasetError::Gsm8k(Gsm8kError::Missing(d)) => anyhow::anyhow!(
                "no GSM8K problems in {}: fetch them with `nested-reft fetch gsm8k` (or leave \
                 them out, e.g. `--dataset arithmetic`)",
                d.display()
            ),
            other => anyhow::Error::new(other).context("while loading the GSM8K problems"),
        })?;
        Ok(Self::from_dataset(name, dataset, GSM8K_MAX_NEW_TOKENS))
    }

    /// `count` problems of arithmetic level `level` (1 to
    /// [`MAX_ARITHMETIC_LEVEL`](rollout_server::dataset::MAX_ARITHMETIC_LEVEL)) drawn with
    /// `seed`; the first k problems do not depend on `count`.
    pub fn arithmetic(level: u8, count: usize, seed: u64) -> Result<Self> {
        let spec = DatasetSpec::Arithmetic { level, count, seed };
        let dataset = Dataset::open(&spec)
            .with_context(|| format!("while generating arithmetic level {level}"))?;
        Ok(Self::from_dataset(
            format!("arithmetic:{level}"),
            dataset,
            ARITHMETIC_MAX_NEW_TOKENS,
        ))
    }

    /// A JSON Lines file with `question` and `answer` fields (bad lines skipped, with a warning).
    pub fn jsonl(path: &Path) -> Result<Self> {
        let dataset = Dataset::open(&DatasetSpec::jsonl(path))
            .with_context(|| format!("while loading {}", path.display()))?;
        Ok(Self::from_dataset(
            path.display().to_string(),
            dataset,
            GSM8K_MAX_NEW_TOKENS,
        ))
    }

    fn from_dataset(name: String, dataset: Dataset, max_new_tokens: usize) -> Self {
        for s in &dataset.stats().skipped {
            eprintln!("warning: {s}");
        }
        Self {
            name,
            problems: dataset.into_problems(),
            max_new_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn pass_at_k_matches_hand_computed_values() {
        // 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!(close(pass_at_k(5, 2, 2), 0.7));
        // k = 1 is the fraction correct.
        assert!(close(pass_at_k(10, 3, 1), 0.3));
        // 1 − C(5,3)/C(10,3) = 1 − 10/120.
        assert!(close(pass_at_k(10, 5, 3), 1.0 - 10.0 / 120.0));
        // 1 − C(16,4)/C(20,4) = 1 − 1820/4845.
        assert!(close(pass_at_k(20, 4, 4), 1.0 - 1820.0 / 4845.0));
        // k = n: any correct.
        assert!(close(pass_at_k(4, 0, 4), 0.0));
        assert!(close(pass_at_k(4, 1, 4), 1.0));
        // Fewer wrong samples than k: always a correct one among k.
        assert!(close(pass_at_k(5, 4, 2), 1.0));
        assert!(close(pass_at_k(3, 3, 1), 1.0));
        assert!(close(pass_at_k(3, 0, 1), 0.0));
        // Out of range.
        assert_eq!(pass_at_k(3, 1, 0), None);
        assert_eq!(pass_at_k(3, 1, 4), None);
        assert_eq!(pass_at_k(3, 4, 1), None);
    }

    #[test]
    fn reported_ks_are_powers_of_two_and_k() {
        assert_eq!(reported_ks(1), vec![1]);
        assert_eq!(reported_ks(2), vec![1, 2]);
        assert_eq!(reported_ks(5), vec![1, 2, 4, 5]);
        assert_eq!(reported_ks(8), vec![1, 2, 4, 8]);
    }

    fn result(correct: &[bool], tokens: usize) -> ProblemResult {
        ProblemResult {
            index: 0,
            id: "p".into(),
            question: "q".into(),
            expected: "1".into(),
            prompt_tokens: 3,
            correct: correct.iter().filter(|&&c| c).count(),
            completions: correct
                .iter()
                .map(|&c| CompletionResult {
                    text: String::new(),
                    tokens,
                    finish: FinishReason::Eos,
                    reward: Some(if c { 1.0 } else { 0.0 }),
                    extracted: None,
                    correct: c,
                    reward_error: None,
                })
                .collect(),
        }
    }

    #[test]
    fn summary_counts_completions_and_pass_at_k() {
        let results = vec![
            result(&[true, false], 4),
            result(&[false, false], 6),
            result(&[true, true], 2),
        ];
        let s = summarize(&results, 2, 24, 2.0, 3.0);
        assert_eq!(
            (s.problems, s.completions, s.correct, s.solved),
            (3, 6, 3, 2)
        );
        assert!((s.accuracy - 0.5).abs() < 1e-12);
        assert_eq!(s.pass_at_k.len(), 2);
        assert!(
            (s.pass_at_k[0].value - 0.5).abs() < 1e-12,
            "pass@1 = accuracy"
        );
        assert!(
            (s.pass_at_k[1].value - 2.0 / 3.0).abs() < 1e-12,
            "pass@2 = solved"
        );
        assert!((s.mean_completion_tokens - 4.0).abs() < 1e-12);
        assert!((s.tokens_per_s - 12.0).abs() < 1e-12);
    }

    #[test]
    fn greedy_pass_at_k_is_refused() {
        let cfg = EvalConfig {
            samples: 4,
            ..EvalConfig::greedy(8)
        };
        assert!(cfg.validate().is_err());
        assert!(EvalConfig::greedy(8).validate().is_ok());
    }
}
