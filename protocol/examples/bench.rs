//! Runs the library benchmarks without the `nested-reft` CLI.
//!
//! ```text
//! cargo run -p protocol --release --example bench -- ring [thread]
//! cargo run -p protocol --release --example bench -- weights
//! ```
//! `ring` re-executes this example as the peer process (`peer --dir D --name N --record-bytes B`).

use protocol::bench::{
    llama_like_manifest, ring_throughput, run_ring_peer, weights_publish, PeerMode,
};
use protocol::default_runtime_dir;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = default_runtime_dir();
    match args.first().map(String::as_str) {
        Some("peer") => {
            let flag = |f: &str| {
                args.iter()
                    .position(|a| a == f)
                    .and_then(|i| args.get(i + 1))
                    .cloned()
            };
            let d = flag("--dir").ok_or("--dir")?;
            let name = flag("--name").ok_or("--name")?;
            let bytes: usize = flag("--record-bytes").ok_or("--record-bytes")?.parse()?;
            run_ring_peer(std::path::Path::new(&d), &name, bytes)?;
        }
        Some("ring") => {
            let peer = if args.get(1).map(String::as_str) == Some("thread") {
                PeerMode::Thread
            } else {
                PeerMode::Process {
                    program: std::env::current_exe()?,
                    args: vec!["peer".into()],
                }
            };
            println!("ring in {} (peer: {:?})", dir.display(), peer);
            for (size, records, rtts) in [
                (1usize << 10, 200_000u64, 20_000usize),
                (64 << 10, 20_000, 5_000),
                (1 << 20, 2_000, 1_000),
            ] {
                let r = ring_throughput(&dir, size, records, rtts, &peer)?;
                println!(
                    "record {:>8} B  ring {:6.2} GB/s  memcpy {:6.2} GB/s  ratio {:5.1}%  rtt p50 {:>9.1?}  p99 {:>9.1?}  ({} records, {} round trips, peer {})",
                    r.record_bytes, r.ring_gbps, r.memcpy_gbps, 100.0 * r.ratio(), r.rtt_p50, r.rtt_p99, r.records, r.round_trips, r.peer
                );
            }
        }
        Some("weights") => {
            // SmolLM2-135M shapes in f32: about 538 MB.
            let m = llama_like_manifest(49152, 576, 1536, 192, 30)?;
            let faults = || -> u64 {
                std::fs::read_to_string("/proc/self/stat")
                    .ok()
                    .and_then(|s| {
                        s.rsplit(')')
                            .next()
                            .and_then(|r| r.split_whitespace().nth(7))
                            .and_then(|v| v.parse().ok())
                    })
                    .unwrap_or(0)
            };
            let f0 = faults();
            let r = weights_publish(&dir, &m, 5)?;
            eprintln!("minor faults during the weights bench: {}", faults() - f0);
            println!(
                "weights {:.1} MB  publish {:.2} GB/s (p50 {:?})  read {:.2} GB/s (p50 {:?})  memcpy {:.2} GB/s  publish/memcpy {:.1}%  read/memcpy {:.1}%",
                r.bytes as f64 / 1e6, r.publish_gbps, r.publish_p50, r.read_gbps, r.read_p50, r.memcpy_gbps,
                100.0 * r.publish_gbps / r.memcpy_gbps, 100.0 * r.read_gbps / r.memcpy_gbps
            );
        }
        _ => return Err("usage: bench ring [thread] | weights".into()),
    }
    Ok(())
}
