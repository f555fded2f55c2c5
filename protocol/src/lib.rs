//! Shared-memory rollout ring, weight store and control channel.
