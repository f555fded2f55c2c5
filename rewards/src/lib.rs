//! Reward functions for reinforced fine-tuning, and reward modules that can be swapped
//! without rebuilding the server.
//!
//! * [`Reward`]: a one-method trait (`score` a [`Sample`] into a [`Score`] or a
//!   [`RewardError`]), with a batched variant and a blanket impl for closures.
//! * Built-ins: [`MathReward`] (answer extraction, normalisation, exact comparison),
//!   [`FormatReward`], [`LengthReward`]; composition with [`WeightedSum`] and [`Gate`].
//! * Modules: [`ExternalReward`] (a process speaking JSON Lines, see [`protocol`]) and
//!   [`DylibReward`] (a shared library with the C ABI of [`abi`]).
//! * [`RewardSpec`]: the serde-tagged config that builds any of these; [`ReloadableReward`]
//!   rebuilds it from its file on SIGHUP.
//! * [`score_jsonl`]: score a JSON Lines file (the `nested-reft score` command).

pub mod abi;
mod compose;
mod dylib;
mod error;
mod external;
mod jsonl;
mod math;
pub mod protocol;
mod reload;
mod reward;
mod simple;
mod spec;

pub use compose::{Gate, WeightedSum};
pub use dylib::{DylibConfig, DylibReward};
pub use error::{DylibError, Result, RewardError, ScoreIoError, SpecError};
pub use external::{ExternalConfig, ExternalReward, ModuleStats};
pub use jsonl::{score_jsonl, ScoreSummary};
pub use math::{Extraction, MathConfig, MathReward};
pub use protocol::serve_module;
pub use reload::ReloadableReward;
pub use reward::{Reward, Sample, Score};
pub use simple::{AnswerForm, FormatConfig, FormatReward, LengthConfig, LengthReward, LengthUnit};
pub use spec::{RewardSpec, WeightedTerm};
