//! The benchmark functions behind `nested-reft bench` run end to end with a peer process and
//! report consistent figures (no speed is asserted: speed claims live in the bench output).

use protocol::bench::{llama_like_manifest, ring_throughput, weights_publish, PeerMode};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

#[test]
fn ring_bench_runs_against_a_peer_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let peer = PeerMode::Process {
        program: PEER.into(),
        args: vec!["ring-bench-peer".into()],
    };
    let r = ring_throughput(dir.path(), 4096, 500, 200, &peer)?;
    assert_eq!(r.peer, "process");
    assert!(
        (4096 - 8..=4096).contains(&r.record_bytes),
        "{}",
        r.record_bytes
    );
    assert_eq!((r.records, r.round_trips), (500, 200));
    assert!(r.ring_gbps > 0.0 && r.memcpy_gbps > 0.0);
    assert!(r.rtt_p50 > std::time::Duration::ZERO && r.rtt_p50 <= r.rtt_p99);
    // The segments are removed afterwards.
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
    Ok(())
}

#[test]
fn weights_bench_reads_back_what_it_published() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let m = llama_like_manifest(64, 32, 48, 16, 2)?;
    let expected: usize = m.tensors().iter().map(|t| t.size).sum();
    assert!(m.total_size() >= expected);
    let r = weights_publish(dir.path(), &m, 3)?;
    assert_eq!((r.bytes, r.iterations), (m.total_size(), 3));
    assert!(r.publish_gbps > 0.0 && r.read_gbps > 0.0 && r.memcpy_gbps > 0.0);
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
    Ok(())
}
