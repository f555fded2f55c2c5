//! `nested-reft-rollout-server`: the rollout-server service (see `tools::service::server`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tools::service::server::main(tools::service::server::ServerArgs::parse())
}
