//! The nested-reft command line and services: `nested-reft` (train, eval, generate, logprobs,
//! score, bench, fetch) and the two service binaries `nested-reft-learner` and
//! `nested-reft-rollout-server`, whose `main`s are thin wrappers around [`service`].
//!
//! The generator (rollout-server crate) and the update (learner crate) know nothing of how they
//! are run; the modes (`local`, `sync`, `async`) are wiring, and that wiring lives here.

// The doc comments of the clap argument structs are also their `--help` text, written for a
// terminal: a `[default: …]` there is not a link, nor `<time>` an HTML tag.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

pub mod bench_behaviors;
pub mod bench_overlap;
pub mod bench_ring;
pub mod bench_rollout;
pub mod bench_train;
pub mod calibrate;
pub mod eval;
pub mod heap;
pub mod lm;
pub mod modelargs;
pub mod probe;
pub mod profile;
pub mod rundir;
pub mod score;
pub mod service;
pub mod step;
pub mod train;
