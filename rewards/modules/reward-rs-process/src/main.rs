//! Example external reward module in Rust.
//!
//! Speaks the JSON Lines protocol of `rewards::protocol` on stdin/stdout and scores with any
//! built-in reward given as a spec in the first argument (default: `math`), e.g.
//!
//! ```toml
//! [reward]
//! kind = "external"
//! command = ["/path/to/reward-rs-process", "math"]
//! ```
//!
//! To write your own module, replace the reward with any `rewards::Reward` (a closure works).

use std::io::{stdin, stdout, BufWriter};
use std::process::ExitCode;

use rewards::RewardSpec;

fn main() -> ExitCode {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "math".to_string());
    let reward = match RewardSpec::from_arg(&arg).and_then(|s| s.build()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reward-rs-process: {e}");
            return ExitCode::from(2);
        }
    };
    match rewards::serve_module(
        stdin().lock(),
        BufWriter::new(stdout().lock()),
        reward.as_ref(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reward-rs-process: {e}");
            ExitCode::FAILURE
        }
    }
}
