//! The rollout server: the generation half of training.
//!
//! - [`dataset`]: problems from JSON Lines, the GSM8K assets or the built-in arithmetic
//!   generator, and a seeded cursor over them.
//! - [`Generator`]: per batch a layer plan, G completions per prompt with the nested behavior,
//!   rewards, and complete groups of [`protocol::RolloutRecord`]s for the learner.

pub mod dataset;
mod generator;

pub use generator::{
    GenerationStats, Generator, GeneratorConfig, GeneratorError, GeneratorState, RolloutBatch,
};
