#![allow(dead_code)]
//! Shared helpers for the protocol tests.

use protocol::{
    Descriptor, FinishReason, Limits, RewardOutcome, RolloutRecord, SamplingParams, Timings,
};

pub fn desc(capacity: u32) -> Descriptor {
    Descriptor {
        capacity,
        limits: Limits {
            max_prompt_tokens: 64,
            max_completion_tokens: 128,
            max_plan_layers: 32,
        },
    }
}

/// A record whose every field is derived from `i`, so a reader can check it exactly.
pub fn record(i: u64) -> RolloutRecord {
    let np = (i % 60) as u32 + 1;
    let nc = (i * 7 % 120) as u32 + 1;
    RolloutRecord {
        prompt_id: i,
        group_id: i / 4,
        batch_id: i / 16,
        policy_version: i / 8,
        group_size: 4,
        group_index: (i % 4) as u32,
        batch_groups: 4,
        prompt: (0..np).map(|t| t * 3 + i as u32).collect(),
        completion: (0..nc).map(|t| t ^ (i as u32)).collect(),
        logprobs: (0..nc).map(|t| -(t as f32) * 0.25 - i as f32).collect(),
        plan: (0..(i % 30) as u16).collect(),
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: if i % 4 == 1 { 0.9 } else { 1.0 },
            top_k: (i % 3) as u32 * 20,
        },
        seed: i * 31,
        reward: if i.is_multiple_of(5) {
            RewardOutcome::failed(format!("sample {i}: the module exited (é)"))
        } else {
            RewardOutcome::scored(i as f32 * 0.5)
        },
        finish: match i % 3 {
            0 => FinishReason::Eos,
            1 => FinishReason::Length,
            _ => FinishReason::Stop(format!("</{i}>")),
        },
        timings: Timings {
            generation_ns: i * 1000,
            reward_ns: i,
        },
    }
}
