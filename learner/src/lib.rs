//! The learner: the training loop.
