//! The rollout server: the generation loop.
