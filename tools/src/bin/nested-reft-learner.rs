//! `nested-reft-learner`: the learner service (see `tools::service::learner`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tools::service::learner::main(tools::service::learner::LearnerArgs::parse())
}
