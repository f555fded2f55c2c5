//! The nested-reft learner: GRPO on the full-depth target with off-policy corrections for
//! completions sampled by a nested behavior model.
//!
//! - [`prepare_batch`]: complete groups of [`protocol::RolloutRecord`]s → group-relative
//!   advantages (groups with equal rewards are counted, not trained on).
//! - [`Learner::step`]: target log-probs with the full plan and differentiable kernels in
//!   micro-batches (completions that share a prompt share its forward pass, and sequences are
//!   packed into rows without padding: [`UpdateConfig::prefix_sharing`],
//!   [`UpdateConfig::packing`], [`LayoutStats`]), the correction of [`Correction`], the loss with its [`Normalizer`],
//!   accumulated backward, global-norm clipping, AdamW with a warmup/decay schedule. A
//!   non-finite loss or gradient skips the step; too many in a row is an error.
//! - [`Learner::save_checkpoint`] / [`Learner::load_checkpoint`]: atomic checkpoints of the
//!   model, the [`AdamW`] moments and the counters; [`latest_checkpoint`] finds the one to
//!   resume from.
//! - The loss is `−Σ c · log π_θ(y_t)` with a stop-gradient coefficient per token
//!   ([`token_loss`]), so the gradient does not depend on the micro-batch size.
//! - Optional nested consistency term (`consistency_beta` in [`UpdateConfig`], off by
//!   default): β · KL(sg(π_full) ‖ π_nested) per completion token, averaged by the
//!   [`Normalizer`], with π_nested the same weights under the batch's behavior plan
//!   ([`PreparedBatch::behavior_plan`]); its mean KL is [`StepStats::consistency_kl`].

mod assembly;
mod batch;
mod checkpoint;
mod config;
mod correction;
mod error;
mod layout;
mod optim;
mod update;

pub use assembly::{AssembledBatch, AssemblyStats, BatchAssembler};
pub use batch::{group_advantages, prepare_batch, PreparedBatch, TrainSequence};
pub use checkpoint::{
    latest_checkpoint, scan_checkpoints, verify_checkpoint, CheckpointScan, CheckpointState,
    WriteFault, CHECKPOINT_FILES,
};
pub use config::{
    AdvantageConfig, Correction, Decay, Normalizer, OptimConfig, TisMode, UpdateConfig,
};
pub use correction::{sequence_weights, token_loss, SequenceWeights, TokenLoss, TokenTerms};
pub use error::{LearnerError, Result};
pub use layout::LayoutStats;
pub use optim::AdamW;
pub use update::{BatchGradient, Learner, StepStats};
