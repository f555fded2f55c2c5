//! From groups of rollout records to the sequences one update trains on: checks, rewards
//! statistics and group-relative advantages.

use crate::config::{AdvantageConfig, UpdateConfig};
use crate::error::{LearnerError, Result};
use model::LayerPlan;
use protocol::RolloutRecord;

/// One completion ready for the update.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSequence {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Completion tokens (at least one).
    pub completion: Vec<u32>,
    /// log μ(y_t) of each completion token under the behavior that sampled it.
    pub behavior_logprobs: Vec<f32>,
    /// The advantage A_i of the whole completion.
    pub advantage: f64,
}

impl TrainSequence {
    /// Prompt plus completion tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    /// Never true for a checked sequence (it has a prompt and a completion).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch after advantages: the sequences to train on and what was left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreparedBatch {
    /// Sequences with a non-zero-information advantage (groups whose rewards differ).
    pub sequences: Vec<TrainSequence>,
    /// Groups in the batch.
    pub groups: usize,
    /// Groups whose rewards were all equal: zero advantage, not trained on.
    pub uniform_groups: usize,
    /// Completions with no tokens (nothing to train on; their reward still counts).
    pub empty_completions: usize,
    /// Completions whose reward failed (the record carries the failure and its message).
    pub failed_rewards: usize,
    /// Groups left out because a member's reward failed: a failed reward has no value, and
    /// the group's advantages would compare the others with a made-up one.
    pub failed_reward_groups: usize,
    /// Mean reward over every completion of the groups whose rewards all succeeded (NaN when
    /// there is none).
    pub reward_mean: f64,
    /// Standard deviation of the reward over the same completions.
    pub reward_std: f64,
    /// Fraction of the same completions whose reward reaches the configured threshold.
    pub accuracy: f64,
    /// The layer plan the behavior sampled this batch with, decoded from the first record
    /// (a rollout batch is generated under one plan; should the records disagree, the first
    /// one's plan is used, as the consistency term only needs a plan drawn like the
    /// behavior's). `None` when the records carry no plan, or when the consistency term is
    /// off and the plan does not decode for this model. The consistency term
    /// ([`crate::UpdateConfig::consistency_beta`]) trains π_θ under this plan.
    pub behavior_plan: Option<LayerPlan>,
}

impl PreparedBatch {
    /// Completion tokens that will be trained on.
    pub fn completion_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.completion.len()).sum()
    }
}

/// A_i = (R_i − mean R) / (std R + ε), or without the division ("Dr. GRPO"). The standard
/// deviation is the unbiased one (n − 1), as GRPO implementations use; a group of one has
/// advantage 0.
pub fn group_advantages(rewards: &[f64], cfg: &AdvantageConfig) -> Vec<f64> {
    let n = rewards.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let scale = if cfg.scale_by_std {
        1.0 / (var.sqrt() + cfg.eps)
    } else {
        1.0
    };
    rewards.iter().map(|r| (r - mean) * scale).collect()
}

fn check_record(r: &RolloutRecord, cfg: &UpdateConfig) -> Result<()> {
    if r.prompt.is_empty() {
        return Err(LearnerError::InvalidBatch(format!(
            "record of prompt {} (group {}) has an empty prompt",
            r.prompt_id, r.group_id
        )));
    }
    if r.logprobs.len() != r.completion.len() {
        return Err(LearnerError::InvalidBatch(format!(
            "record of group {} has {} completion tokens but {} behavior log-probs",
            r.group_id,
            r.completion.len(),
            r.logprobs.len()
        )));
    }
    // The importance ratios compare the target's tempered, untruncated softmax with the
    // recorded behavior log-probs: the record must have been sampled with exactly that.
    let (s, t) = (r.sampling, cfg);
    let checks = [
        (
            "temperature",
            s.temperature != t.temperature,
            s.temperature.to_string(),
            t.temperature.to_string(),
        ),
        (
            "top_p",
            s.top_p != t.top_p,
            s.top_p.to_string(),
            t.top_p.to_string(),
        ),
        (
            "top_k",
            s.top_k != t.top_k,
            s.top_k.to_string(),
            t.top_k.to_string(),
        ),
    ];
    if let Some((name, _, record, learner)) = checks.into_iter().find(|c| c.1) {
        return Err(LearnerError::InvalidBatch(format!(
            "record of group {} was sampled with {name} {record}, but the learner scores the \
             target with {name} {learner}: the importance ratios would be wrong",
            r.group_id
        )));
    }
    if !r.reward.value.is_finite() {
        return Err(LearnerError::InvalidBatch(format!(
            "record of group {} has a non-finite reward {}",
            r.group_id, r.reward.value
        )));
    }
    Ok(())
}

/// The behavior plan of a batch: the first record's (see [`PreparedBatch::behavior_plan`]).
/// A plan that does not decode is an error only when the consistency term needs it.
fn batch_plan(
    groups: &[Vec<RolloutRecord>],
    cfg: &UpdateConfig,
    num_layers: usize,
) -> Result<Option<LayerPlan>> {
    let Some(first) = groups.iter().flatten().next() else {
        return Ok(None);
    };
    if first.plan.is_empty() {
        return Ok(None);
    }
    match LayerPlan::from_record(&first.plan, num_layers) {
        Ok(plan) => Ok(Some(plan)),
        Err(e) if cfg.consistency_beta > 0.0 => Err(LearnerError::InvalidBatch(format!(
            "record of group {} carries a layer plan {:?} that does not fit this \
             {num_layers}-layer model: {e}",
            first.group_id, first.plan
        ))),
        Err(_) => Ok(None),
    }
}

/// Checks the groups (each the G completions of one prompt), computes reward statistics and
/// group-relative advantages, and keeps the sequences worth training on. `num_layers` is the
/// depth of the model trained on the batch, to decode the records' behavior plan.
pub fn prepare_batch(
    groups: &[Vec<RolloutRecord>],
    cfg: &UpdateConfig,
    num_layers: usize,
) -> Result<PreparedBatch> {
    if groups.is_empty() {
        return Err(LearnerError::InvalidBatch("no groups".into()));
    }
    let mut out = PreparedBatch {
        groups: groups.len(),
        behavior_plan: batch_plan(groups, cfg, num_layers)?,
        ..PreparedBatch::default()
    };
    let mut all = Vec::new();
    for group in groups {
        let Some(first) = group.first() else {
            return Err(LearnerError::InvalidBatch("an empty group".into()));
        };
        if let Some(other) = group.iter().find(|r| r.group_id != first.group_id) {
            return Err(LearnerError::InvalidBatch(format!(
                "group {} contains a record of group {}",
                first.group_id, other.group_id
            )));
        }
        for r in group {
            check_record(r, cfg)?;
        }
        let failed = group.iter().filter(|r| r.reward.is_failed()).count();
        if failed > 0 {
            out.failed_rewards += failed;
            out.failed_reward_groups += 1;
            continue;
        }
        let rewards: Vec<f64> = group.iter().map(|r| f64::from(r.reward.value)).collect();
        all.extend_from_slice(&rewards);
        if rewards.iter().all(|&r| r == rewards[0]) {
            out.uniform_groups += 1;
            continue;
        }
        let adv = group_advantages(&rewards, &cfg.advantage);
        for (r, a) in group.iter().zip(adv) {
            if r.completion.is_empty() {
                out.empty_completions += 1;
                continue;
            }
            out.sequences.push(TrainSequence {
                prompt: r.prompt.clone(),
                completion: r.completion.clone(),
                behavior_logprobs: r.logprobs.clone(),
                advantage: a,
            });
        }
    }
    if all.is_empty() {
        (out.reward_mean, out.reward_std, out.accuracy) = (f64::NAN, f64::NAN, f64::NAN);
        return Ok(out);
    }
    let n = all.len() as f64;
    out.reward_mean = all.iter().sum::<f64>() / n;
    out.reward_std = (all
        .iter()
        .map(|r| (r - out.reward_mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    out.accuracy = all.iter().filter(|&&r| r >= cfg.correct_threshold).count() as f64 / n;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::{FinishReason, RewardOutcome, SamplingParams, Timings};

    pub(crate) fn record(group: u64, reward: f32, completion: Vec<u32>) -> RolloutRecord {
        RolloutRecord {
            prompt_id: group,
            group_id: group,
            batch_id: 0,
            policy_version: 0,
            group_size: 1,
            group_index: 0,
            batch_groups: 1,
            prompt: vec![1, 2],
            logprobs: vec![-1.0; completion.len()],
            completion,
            plan: vec![0, 1],
            sampling: SamplingParams::default(),
            seed: 0,
            reward: RewardOutcome::scored(reward),
            finish: FinishReason::Eos,
            timings: Timings::default(),
        }
    }

    #[test]
    fn advantages_are_group_normalised() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], &AdvantageConfig::default());
        // mean 0.5, unbiased std sqrt(1/3)
        let s = (1.0f64 / 3.0).sqrt();
        for (x, want) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]) {
            assert!((x - want).abs() < 1e-5, "{a:?}");
        }
        let dr = group_advantages(
            &[1.0, 0.0, 0.0, 1.0],
            &AdvantageConfig {
                scale_by_std: false,
                eps: 0.0,
            },
        );
        assert_eq!(dr, vec![0.5, -0.5, -0.5, 0.5]);
        assert_eq!(
            group_advantages(&[3.0], &AdvantageConfig::default()),
            vec![0.0]
        );
    }

    #[test]
    fn uniform_groups_are_counted_not_trained() {
        let cfg = UpdateConfig::default();
        let groups = vec![
            vec![record(0, 1.0, vec![5, 6]), record(0, 1.0, vec![7])],
            vec![record(1, 0.0, vec![5]), record(1, 1.0, vec![6, 6, 6])],
        ];
        let b = prepare_batch(&groups, &cfg, 2).unwrap();
        assert_eq!(b.groups, 2);
        assert_eq!(b.uniform_groups, 1);
        assert_eq!(b.sequences.len(), 2);
        assert_eq!(b.completion_tokens(), 4);
        assert_eq!(b.accuracy, 0.75);
        assert_eq!(b.reward_mean, 0.75);
        assert_eq!(b.behavior_plan, Some(LayerPlan::full(2)));
    }

    #[test]
    fn behavior_plan_comes_from_the_records() {
        let off = UpdateConfig::default();
        let on = UpdateConfig {
            consistency_beta: 0.1,
            ..UpdateConfig::default()
        };
        let with_plan = |plan: Vec<u16>| {
            let mut a = record(0, 1.0, vec![5]);
            let mut b = record(0, 0.0, vec![6]);
            a.plan = plan.clone();
            b.plan = plan;
            vec![vec![a, b]]
        };
        let b = prepare_batch(&with_plan(vec![0, 2, 3]), &on, 4).unwrap();
        assert_eq!(b.behavior_plan, Some(LayerPlan::skipping(&[1], 4).unwrap()));
        assert_eq!(b.sequences.len(), 2);
        // No plan in the records: none in the batch, whether the term is on or off.
        for cfg in [&off, &on] {
            let b = prepare_batch(&with_plan(Vec::new()), cfg, 4).unwrap();
            assert_eq!(b.behavior_plan, None);
        }
        // A plan for another model: an error only when the consistency term needs it.
        let b = prepare_batch(&with_plan(vec![0, 7]), &off, 4).unwrap();
        assert_eq!(b.behavior_plan, None);
        let err = prepare_batch(&with_plan(vec![0, 7]), &on, 4).unwrap_err();
        assert!(err.to_string().contains("layer plan"), "{err}");
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let cfg = UpdateConfig::default();
        let mut r = record(0, 1.0, vec![5, 6]);
        r.logprobs.pop();
        let err = prepare_batch(&[vec![r, record(0, 0.0, vec![1])]], &cfg, 2).unwrap_err();
        assert!(err.to_string().contains("behavior log-probs"), "{err}");
        let mut hot = record(0, 1.0, vec![5]);
        hot.sampling.temperature = 0.7;
        let err = prepare_batch(&[vec![hot]], &cfg, 2).unwrap_err();
        assert!(
            err.to_string().contains("temperature 0.7")
                && err.to_string().contains("temperature 1"),
            "{err}"
        );
        let err = prepare_batch(
            &[vec![record(0, 1.0, vec![5]), record(1, 0.0, vec![5])]],
            &cfg,
            2,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("contains a record of group 1"),
            "{err}"
        );
        assert!(prepare_batch(&[], &cfg, 2).is_err());
    }

    #[test]
    fn truncated_records_are_refused_naming_both_values() {
        let cfg = UpdateConfig::default();
        let mut r = record(0, 1.0, vec![5]);
        r.sampling.top_p = 0.9;
        let err = prepare_batch(&[vec![r]], &cfg, 2).unwrap_err().to_string();
        assert!(
            err.contains("top_p 0.9") && err.contains("top_p 1:"),
            "{err}"
        );
        let mut r = record(0, 1.0, vec![5]);
        r.sampling.top_k = 40;
        let err = prepare_batch(&[vec![r]], &cfg, 2).unwrap_err().to_string();
        assert!(
            err.contains("top_k 40") && err.contains("top_k 0:"),
            "{err}"
        );
    }

    #[test]
    fn groups_with_a_failed_reward_are_dropped_and_counted() {
        let cfg = UpdateConfig::default();
        let mut failed = record(0, 0.0, vec![5]);
        failed.reward = RewardOutcome::failed("the reward module timed out");
        let groups = vec![
            vec![record(0, 1.0, vec![5, 6]), failed.clone()],
            vec![record(1, 0.0, vec![5]), record(1, 1.0, vec![6, 6])],
        ];
        let b = prepare_batch(&groups, &cfg, 2).unwrap();
        assert_eq!(
            (b.groups, b.failed_reward_groups, b.failed_rewards),
            (2, 1, 1)
        );
        // Only group 1 trains, and the statistics are over its completions alone.
        assert_eq!(b.sequences.len(), 2);
        assert_eq!(b.completion_tokens(), 3);
        assert_eq!(b.reward_mean, 0.5);
        // Every group failed: nothing to train on, nothing measured.
        let b = prepare_batch(&[vec![failed]], &cfg, 2).unwrap();
        assert_eq!((b.failed_reward_groups, b.sequences.len()), (1, 0));
        assert!(b.reward_mean.is_nan());
    }
}
