//! `nested-reft bench ring`, `bench weights` and the hidden `bench ring-peer`: thin wrappers
//! over `protocol::bench`, which measures and also times a plain memcpy of the same bytes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use protocol::bench::{self, PeerMode};

/// Rollout-ring throughput and round-trip latency.
#[derive(Debug, clap::Args)]
pub struct BenchRingArgs {
    /// Directory for the shared-memory segments [default: $XDG_RUNTIME_DIR, else /dev/shm].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Record sizes in bytes, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize << 10, 64 << 10, 1 << 20])]
    pub sizes: Vec<usize>,
    /// Bytes streamed per record size for the throughput figure.
    #[arg(long, default_value_t = 2 << 30)]
    pub bytes: u64,
    /// Round trips per record size for the latency percentiles.
    #[arg(long, default_value_t = 2000)]
    pub round_trips: usize,
    /// Run the peer as a thread of this process instead of a second process.
    #[arg(long)]
    pub thread_peer: bool,
}

/// The peer side of `bench ring` (started by it; not for direct use).
#[derive(Debug, clap::Args)]
pub struct BenchRingPeerArgs {
    /// Segment directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Ring name prefix.
    #[arg(long)]
    pub name: String,
    /// Record size in bytes.
    #[arg(long)]
    pub record_bytes: usize,
}

/// Weight-store publish + read of a llama-shaped f32 parameter set (default: SmolLM2-135M
/// shapes, about 540 MB).
#[derive(Debug, clap::Args)]
pub struct BenchWeightsArgs {
    /// Directory for the shared-memory segment [default: $XDG_RUNTIME_DIR, else /dev/shm].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Versions published and read (after two untimed warm-up versions).
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 49152)]
    pub vocab: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 576)]
    pub hidden: usize,
    /// MLP intermediate size.
    #[arg(long, default_value_t = 1536)]
    pub intermediate: usize,
    /// Key/value projection width.
    #[arg(long, default_value_t = 192)]
    pub kv_dim: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 30)]
    pub layers: usize,
}

/// Runs `bench ring`. The peer is this executable re-run as `bench ring-peer`.
pub fn run_ring(args: &BenchRingArgs) -> Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(protocol::default_runtime_dir);
    let peer = if args.thread_peer {
        PeerMode::Thread
    } else {
        let program = std::env::current_exe().context("while locating this executable")?;
        PeerMode::Process {
            program,
            args: vec!["bench".into(), "ring-peer".into()],
        }
    };
    println!(
        "# copy-out: the consumer copies each record out of its slot, verifying CRC32C over \
         the copy; in-place: it verifies CRC32C over the slot and reads the record there. \
         memcpy: one thread copying the same bytes through a ring-sized buffer (best of 3, \
         timed next to the ring runs). Every record is written with its CRC and verified."
    );
    for &size in &args.sizes {
        let records = (args.bytes / size.max(1) as u64).max(100);
        let r = bench::ring_throughput(&dir, size, records, args.round_trips, &peer).with_context(
            || {
                format!(
                    "while benchmarking {size}-byte records in {}",
                    dir.display()
                )
            },
        )?;
        println!(
            "ring record={}B records={} copy-out={:.2}GB/s ({:.1}% of memcpy) \
             in-place={:.2}GB/s ({:.1}% of memcpy) memcpy={:.2}GB/s \
             rtt_p50={:.1}us rtt_p99={:.1}us round_trips={} peer={}",
            r.record_bytes,
            r.records,
            r.ring_gbps,
            100.0 * r.ratio(),
            r.in_place_gbps,
            100.0 * r.in_place_ratio(),
            r.memcpy_gbps,
            r.rtt_p50.as_secs_f64() * 1e6,
            r.rtt_p99.as_secs_f64() * 1e6,
            r.round_trips,
            r.peer,
        );
    }
    Ok(())
}

/// Runs the hidden `bench ring-peer` subcommand.
pub fn run_ring_peer(args: &BenchRingPeerArgs) -> Result<()> {
    bench::run_ring_peer(&args.dir, &args.name, args.record_bytes)
        .with_context(|| format!("while serving ring benchmark peer {}", args.name))
}

/// Runs `bench weights`.
pub fn run_weights(args: &BenchWeightsArgs) -> Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(protocol::default_runtime_dir);
    let manifest = bench::llama_like_manifest(
        args.vocab,
        args.hidden,
        args.intermediate,
        args.kv_dim,
        args.layers,
    )
    .context("while building the parameter manifest")?;
    let r = bench::weights_publish(&dir, &manifest, args.iterations)
        .with_context(|| format!("while benchmarking the weight store in {}", dir.display()))?;
    println!(
        "weights bytes={} iterations={} publish={:.2}GB/s (p50 {:.1}ms) read={:.2}GB/s \
         (p50 {:.1}ms) memcpy={:.2}GB/s publish/memcpy={:.1}% read/memcpy={:.1}%",
        r.bytes,
        r.iterations,
        r.publish_gbps,
        r.publish_p50.as_secs_f64() * 1e3,
        r.read_gbps,
        r.read_p50.as_secs_f64() * 1e3,
        r.memcpy_gbps,
        100.0 * r.publish_gbps / r.memcpy_gbps,
        100.0 * r.read_gbps / r.memcpy_gbps,
    );
    Ok(())
}
