//! Weight store across real processes: concurrent snapshots, killed writer, killed reader.

use std::time::Duration;

use protocol::{DType, Manifest, PublishError, WeightStore};
use tests::{Peer, WATCHDOG};

const PEER: &str = env!("CARGO_BIN_EXE_peer");
/// u32 elements per version (4 MiB): large enough that publishing overlaps reading.
const ELEMS: usize = 1 << 20;

fn manifest(elems: usize) -> Manifest {
    Manifest::new([
        ("a", vec![elems / 2], DType::U32),
        ("b", vec![elems - elems / 2], DType::U32),
    ])
    .expect("manifest")
}

fn assert_uniform(bytes: &[u8], v: u32) {
    let expect = v.to_le_bytes();
    assert!(
        bytes.chunks_exact(4).all(|c| c == expect),
        "snapshot of version {v} is not uniform"
    );
}

#[test]
fn reader_snapshots_are_uniform_while_writer_publishes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf-8 path");
    let elems = ELEMS.to_string();
    // The reader starts first and waits for the store, so it is reading while the writer
    // publishes its 300 versions.
    let reader = Peer::spawn(PEER, &["weights-read", d, "w", &elems, "300"])?;
    let writer = Peer::spawn(PEER, &["weights-write", d, "w", &elems, "1", "300"])?;
    let (lines, ok) = reader.finish()?;
    assert!(ok, "reader saw a torn or stale snapshot: {lines:?}");
    let done = lines
        .iter()
        .find(|l| l.starts_with("done"))
        .expect("reader summary");
    eprintln!("reader: {done}");
    let (_, ok) = writer.finish()?;
    assert!(ok);
    Ok(())
}

#[test]
fn writer_killed_mid_publish_leaves_last_complete_version() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf-8 path");
    let m = manifest(ELEMS);
    let mut writer = Peer::spawn(
        PEER,
        &[
            "weights-write",
            d,
            "w",
            &ELEMS.to_string(),
            "1",
            "3",
            "--hang-mid",
        ],
    )?;
    writer.expect_line("mid")?;
    let mut reader = WeightStore::open(dir.path(), "w", &m)?;
    {
        let p = reader.pin()?;
        assert_eq!(p.version(), 3);
        assert_uniform(p.bytes(), 3);
    }
    writer.kill()?;
    assert!(!reader.writer_alive());
    {
        let p = reader.pin()?;
        assert_eq!(p.version(), 3);
        assert_uniform(p.bytes(), 3);
    }
    // A restarted writer continues at version 4.
    let mut w = WeightStore::resume(dir.path(), "w", &m)?;
    assert_eq!(w.generation(), 2);
    assert_eq!(w.publish(WATCHDOG, |b| b.fill(4))?, 4);
    let p = reader.pin()?;
    assert_eq!(p.version(), 4);
    assert!(p.bytes().iter().all(|&x| x == 4));
    Ok(())
}

#[test]
fn killed_readers_pin_is_reclaimed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf-8 path");
    let m = manifest(1024);
    let mut w = WeightStore::create(dir.path(), "w", &m, 2)?;
    w.publish(WATCHDOG, |b| b.fill(1))?;
    let mut pinner = Peer::spawn(PEER, &["weights-pin-hang", d, "w", "1024"])?;
    assert_eq!(pinner.expect_line("pinned")?, "pinned 1");
    w.publish(WATCHDOG, |b| b.fill(2))?;
    match w.publish(Duration::from_millis(10), |b| b.fill(3)) {
        Err(PublishError::AllSlotsPinned { .. }) => {}
        other => panic!("slot pinned by a live reader was reused: {other:?}"),
    }
    pinner.kill()?;
    assert_eq!(w.publish(WATCHDOG, |b| b.fill(3))?, 3);
    Ok(())
}
