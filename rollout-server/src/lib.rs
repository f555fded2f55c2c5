//! The rollout server: the generation loop.

pub mod dataset;
