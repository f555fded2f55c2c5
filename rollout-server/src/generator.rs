//! The generation half of a training step: prompts from the dataset → a layer plan for the
//! batch → G completions per prompt with the nested behavior → rewards → groups of records.
//!
//! The generator knows nothing of how it is run: the one-process loop hands the records to the
//! learner directly, the rollout-server process pushes them into the ring.

use crate::dataset::{CursorState, DataCursor, Dataset, Problem};
use model::{
    generate, stream_seed, AdaptivePolicy, ChatMessage, Decoder, FinishReason, GenerationConfig,
    LayerPlan, PlanSampler, PlanSpec, Sampling, Tokenizer,
};
use protocol::{RewardOutcome, RolloutRecord, SamplingParams, Timings};
use rewards::{Reward, Sample};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Why the generator could not produce a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    /// A configuration value is out of range.
    #[error("invalid generator configuration: {0}")]
    InvalidConfig(String),
    /// The model failed (tokenizer, template, generation).
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The dataset cursor does not fit the dataset.
    #[error("dataset cursor: {0}")]
    Cursor(#[from] crate::dataset::CursorError),
    /// The reward failed as a whole (not one sample: those are counted).
    #[error("reward: {0}")]
    Reward(String),
}

/// What to generate per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Prompts per batch.
    pub prompts_per_batch: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Token limit of a completion.
    pub max_new_tokens: usize,
    /// Sampling temperature (> 0; the learner must score at the same one).
    pub temperature: f32,
    /// Nucleus mass; must stay 1 for training (see [`GeneratorConfig::validate`]).
    pub top_p: f32,
    /// Top-k cut-off; must stay 0 (off) for training (see [`GeneratorConfig::validate`]).
    pub top_k: u32,
    /// Optional system message of the chat template.
    pub system_prompt: Option<String>,
    /// Appended to every question (after a blank line) in the user message.
    pub instruction: String,
    /// Seed of the plan draws and of the sampling streams.
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            prompts_per_batch: 8,
            group_size: 4,
            max_new_tokens: 96,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            system_prompt: None,
            instruction: "Answer with the final number.".into(),
            seed: 0,
        }
    }
}

impl GeneratorConfig {
    /// Checks every value. Truncated sampling (`top_p < 1` or `top_k > 0`) is refused: the
    /// learner's importance ratios compare the target's full tempered softmax with the
    /// behavior's, which truncation would make wrong (generation and evaluation outside
    /// training may still truncate).
    pub fn validate(self) -> Result<Self, GeneratorError> {
        let bad = |m: String| Err(GeneratorError::InvalidConfig(m));
        if self.prompts_per_batch == 0 {
            return bad("prompts_per_batch must be at least 1".into());
        }
        if self.group_size < 2 {
            return bad(format!(
                "group_size must be at least 2 (advantages compare completions of one prompt), got {}",
                self.group_size
            ));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        let params = self.sampling_params();
        Sampling::Sample(params).validate()?;
        if params.is_truncated() {
            return bad(format!(
                "top_p {} / top_k {}: truncated sampling cannot train (the importance ratios \
                 compare full tempered softmaxes); use top_p = 1 and top_k = 0",
                self.top_p, self.top_k
            ));
        }
        Ok(self)
    }

    /// The sampling parameters this configuration asks for.
    pub fn sampling_params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
        }
    }
}

/// What one batch's generation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    /// Completions generated.
    pub completions: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Seconds of generation (prefill and decode).
    pub generation_s: f64,
    /// Seconds of reward scoring.
    pub reward_s: f64,
    /// Generated tokens per second.
    pub behavior_tokens_per_s: f64,
    /// Mean completion length in tokens.
    pub mean_completion_tokens: f64,
    /// Fraction of completions cut at `max_new_tokens`.
    pub truncated_frac: f64,
    /// Samples whose reward failed (their records carry the failure; the learner drops their
    /// groups).
    pub reward_failures: usize,
    /// Reward failure messages first seen in this batch (each distinct message is reported
    /// once per generator; later occurrences are only counted).
    #[serde(skip)]
    pub new_reward_failures: Vec<String>,
}

/// One batch of complete groups, generated under one plan.
#[derive(Debug, Clone)]
pub struct RolloutBatch {
    /// Sequential id of the batch.
    pub batch_id: u64,
    /// The plan every completion of the batch was generated with.
    pub plan: LayerPlan,
    /// Complete groups: the G records of one prompt each.
    pub groups: Vec<Vec<RolloutRecord>>,
    /// The first completion of the batch, decoded (for logs).
    pub example: Option<(String, String, f64)>,
    /// Statistics.
    pub stats: GenerationStats,
}

/// Where a generator stands: enough to continue after a restart without repeating a prompt
/// within an epoch. Plans and sampling streams derive from (seed, batch id), so this is all,
/// except for the adaptive strategy, whose state follows the learner's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorState {
    /// The id the next batch gets.
    pub next_batch_id: u64,
    /// The dataset cursor.
    pub cursor: CursorState,
    /// The adaptive plan policy (its KL estimates and the set in use), when it is the strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptivePolicy>,
}

/// Stream index of the per-batch plan draw (sampling uses the batch's other streams).
const PLAN_STREAM: u64 = u64::MAX - 1;

/// The generator: dataset cursor, plan spec, reward and sampling settings.
pub struct Generator {
    cfg: GeneratorConfig,
    dataset: Dataset,
    cursor: DataCursor,
    plan: PlanSpec,
    num_layers: usize,
    reward: Box<dyn Reward>,
    tokenizer: Tokenizer,
    next_batch_id: u64,
    adaptive: Option<AdaptivePolicy>,
    /// The adaptive set each recent batch was generated with, to credit the learner's KL.
    recent_sets: std::collections::VecDeque<(u64, usize)>,
    /// Every reward failure message seen, with how often.
    reward_failures: std::collections::HashMap<String, u64>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("cfg", &self.cfg)
            .field("next_batch_id", &self.next_batch_id)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// A generator over `dataset` for a model with `num_layers` layers.
    pub fn new(
        cfg: GeneratorConfig,
        dataset: Dataset,
        plan: PlanSpec,
        num_layers: usize,
        reward: Box<dyn Reward>,
        tokenizer: Tokenizer,
    ) -> Result<Self, GeneratorError> {
        let cfg = cfg.validate()?;
        // Validates the spec against the model's depth once, up front.
        PlanSampler::new(plan.clone(), num_layers, cfg.seed)?;
        let cursor = DataCursor::for_dataset(&dataset, cfg.seed);
        let adaptive = match &plan {
            PlanSpec::Adaptive { config, profile } => {
                Some(AdaptivePolicy::new(config.clone(), profile.clone())?)
            }
            _ => None,
        };
        Ok(Self {
            cfg,
            dataset,
            cursor,
            plan,
            num_layers,
            reward,
            tokenizer,
            next_batch_id: 0,
            adaptive,
            recent_sets: Default::default(),
            reward_failures: Default::default(),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.cfg
    }

    /// Where the dataset cursor stands (for checkpoints).
    pub fn cursor_state(&self) -> CursorState {
        self.cursor.state()
    }

    /// Replaces the reward (a reloaded reward module).
    pub fn set_reward(&mut self, reward: Box<dyn Reward>) {
        self.reward = reward;
    }

    /// Where the generator stands (save it after each batch handed on).
    pub fn state(&self) -> GeneratorState {
        GeneratorState {
            next_batch_id: self.next_batch_id,
            cursor: self.cursor.state(),
            adaptive: self.adaptive.clone(),
        }
    }

    /// Every distinct reward failure message seen so far, with how often it occurred.
    pub fn reward_failures(&self) -> &std::collections::HashMap<String, u64> {
        &self.reward_failures
    }

    /// The adaptive policy, when the plan strategy is adaptive.
    pub fn adaptive(&self) -> Option<&AdaptivePolicy> {
        self.adaptive.as_ref()
    }

    /// Takes the learner's KL(μ‖π) estimate for batch `batch_id` (the adaptive strategy steers
    /// by it; other strategies ignore it). Returns the adaptive set index now in use when the
    /// report moved it.
    pub fn observe_kl(&mut self, batch_id: u64, kl: f64) -> Option<usize> {
        let policy = self.adaptive.as_mut()?;
        let &(_, set) = self.recent_sets.iter().find(|(b, _)| *b == batch_id)?;
        policy.observe(set, kl).then(|| policy.current())
    }

    /// Continues from a saved state; refused when the cursor does not fit this dataset.
    pub fn restore(&mut self, state: GeneratorState) -> Result<(), GeneratorError> {
        let len = self.cursor.state().len;
        if state.cursor.len != len {
            return Err(GeneratorError::InvalidConfig(format!(
                "the saved data cursor is for a dataset of {} problems, this one has {len}",
                state.cursor.len
            )));
        }
        self.cursor = DataCursor::restore(state.cursor)?;
        self.next_batch_id = state.next_batch_id;
        if let (Some(saved), PlanSpec::Adaptive { profile, .. }) = (state.adaptive, &self.plan) {
            self.adaptive = Some(saved.with_profile(profile.clone())?);
        }
        Ok(())
    }

    /// The plan of batch `batch_id`: a pure function of the seed and the id, so a restarted
    /// server draws the same plans (the adaptive strategy: the set its policy has in use).
    pub fn plan_for(&self, batch_id: u64) -> Result<LayerPlan, GeneratorError> {
        if let Some(policy) = &self.adaptive {
            return Ok(policy.plan_of(policy.set_for_batch(batch_id))?);
        }
        let seed = stream_seed(self.cfg.seed, batch_id, PLAN_STREAM);
        Ok(PlanSampler::new(self.plan.clone(), self.num_layers, seed)?.next_plan()?)
    }

    /// The chat-templated prompt text of a problem.
    pub fn prompt_text(&self, problem: &Problem) -> Result<String, GeneratorError> {
        let mut messages = Vec::new();
        if let Some(s) = &self.cfg.system_prompt {
            messages.push(ChatMessage::new("system", s.as_str()));
        }
        let user = if self.cfg.instruction.is_empty() {
            problem.question.clone()
        } else {
            format!("{}\n\n{}", problem.question, self.cfg.instruction)
        };
        messages.push(ChatMessage::new("user", user));
        Ok(self.tokenizer.apply_chat_template(&messages, true)?)
    }

    /// Generates the next batch with `model` (whose weights are policy version
    /// `policy_version`) under the next plan of the sampler.
    pub fn next_batch(
        &mut self,
        model: &Decoder,
        policy_version: u64,
    ) -> Result<RolloutBatch, GeneratorError> {
        let batch_id = self.next_batch_id;
        let plan = self.plan_for(batch_id)?;
        // Work on a copy of the cursor: a batch that fails leaves the generator where it was.
        let mut cursor = self.cursor.clone();
        let problems = cursor.next_batch(&self.dataset, self.cfg.prompts_per_batch)?;
        let mut prompts = Vec::with_capacity(problems.len());
        for p in &problems {
            prompts.push(self.tokenizer.encode(&self.prompt_text(p)?, false)?);
        }
        let seed = stream_seed(self.cfg.seed, batch_id, u64::MAX);
        let gen_cfg = GenerationConfig {
            sampling: Sampling::Sample(self.cfg.sampling_params()),
            max_new_tokens: self.cfg.max_new_tokens,
            group_size: self.cfg.group_size,
            seed,
            eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
            stop_strings: Vec::new(),
        };
        let out = generate(model, &prompts, &plan, &gen_cfg, Some(&self.tokenizer))?;
        let gen_ns = (out.timings.prefill + out.timings.decode).as_nanos() as u64;

        let start = Instant::now();
        let mut samples = Vec::with_capacity(out.completions.len());
        for c in &out.completions {
            let problem = &problems[c.prompt_index];
            samples.push(Sample {
                prompt: problem.question.clone(),
                completion: self.tokenizer.decode(&c.tokens, true)?,
                reference: problem.answer.clone(),
                metadata: serde_json::Value::Null,
            });
        }
        let scores = self.reward.score_batch(&samples);
        let reward_s = start.elapsed().as_secs_f64();
        if scores.len() != samples.len() {
            return Err(GeneratorError::Reward(format!(
                "the reward returned {} scores for {} samples",
                scores.len(),
                samples.len()
            )));
        }

        let n = out.completions.len().max(1);
        let g = self.cfg.group_size;
        let plan_u16 = plan.to_record();
        let mut stats = GenerationStats {
            completions: out.completions.len(),
            tokens: out.timings.generated_tokens,
            generation_s: gen_ns as f64 / 1e9,
            reward_s,
            behavior_tokens_per_s: out.timings.tokens_per_second(),
            mean_completion_tokens: out.timings.generated_tokens as f64 / n as f64,
            truncated_frac: out
                .completions
                .iter()
                .filter(|c| c.finish == FinishReason::Length)
                .count() as f64
                / n as f64,
            ..GenerationStats::default()
        };
        let example = match (samples.first(), scores.first()) {
            (Some(s), Some(Ok(score))) => {
                Some((s.prompt.clone(), s.completion.clone(), score.value))
            }
            _ => None,
        };
        // A failed reward becomes a failed outcome with its message: the record carries it and
        // the learner leaves the group out (never a silent 0).
        let outcomes: Vec<RewardOutcome> = scores
            .iter()
            .map(|s| match s {
                Ok(score) => RewardOutcome::scored(score.value as f32),
                Err(e) => RewardOutcome::failed(e.to_string()),
            })
            .collect();
        for msg in outcomes.iter().filter_map(|o| o.failure.as_deref()) {
            stats.reward_failures += 1;
            let seen = self.reward_failures.entry(msg.to_owned()).or_insert(0);
            if *seen == 0 {
                stats.new_reward_failures.push(msg.to_owned());
            }
            *seen += 1;
        }
        let batch_groups = problems.len() as u32;
        let mut groups = Vec::with_capacity(problems.len());
        for (p, problem) in problems.iter().enumerate() {
            let members = &out.completions[p * g..(p + 1) * g];
            let member_rewards = &outcomes[p * g..(p + 1) * g];
            let group_id = batch_id * self.cfg.prompts_per_batch as u64 + p as u64;
            let group = members
                .iter()
                .zip(member_rewards)
                .map(|(c, reward)| RolloutRecord {
                    prompt_id: problem_id(problem),
                    group_id,
                    batch_id,
                    policy_version,
                    group_size: g as u32,
                    group_index: c.sample_index as u32,
                    batch_groups,
                    prompt: prompts[p].clone(),
                    completion: c.tokens.clone(),
                    logprobs: c.logprobs.clone(),
                    plan: plan_u16.clone(),
                    sampling: self.cfg.sampling_params(),
                    seed: stream_seed(seed, c.prompt_index as u64, c.sample_index as u64),
                    reward: reward.clone(),
                    finish: c.finish.clone(),
                    timings: Timings {
                        generation_ns: gen_ns / n as u64,
                        reward_ns: (reward_s * 1e9) as u64 / n as u64,
                    },
                })
                .collect();
            groups.push(group);
        }
        self.cursor = cursor;
        self.next_batch_id += 1;
        if let Some(policy) = &self.adaptive {
            self.recent_sets
                .push_back((batch_id, policy.set_for_batch(batch_id)));
            while self.recent_sets.len() > 64 {
                self.recent_sets.pop_front();
            }
        }
        Ok(RolloutBatch {
            batch_id,
            plan,
            groups,
            example,
            stats,
        })
    }
}

/// A stable numeric id of a problem (its id string hashed), for the record's `prompt_id`.
fn problem_id(p: &Problem) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike the std hasher.
    p.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
