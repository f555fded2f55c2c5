#![allow(dead_code)]
//! Shared helpers for the protocol tests.

use protocol::{Descriptor, FinishReason, Limits, Rewards, RolloutRecord, Sampling, Timings};

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
        sampling: Sampling {
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            seed: i * 31,
        },
        rewards: Rewards {
            components: [i as f32, 0.5, -1.0, 0.0],
            n_components: 3,
            total: i as f32 * 0.5,
            failed: i % 5 == 0,
        },
        finish: if i % 2 == 0 {
            FinishReason::Eos
        } else {
            FinishReason::Length
        },
        timings: Timings {
            generation_ns: i * 1000,
            reward_ns: i,
        },
    }
}
