//! Rollout ring across real processes with SIGKILLed peers.

use std::time::Duration;

use protocol::{PopError, PushError, RolloutRing};
use tests::{desc, record, Peer, WATCHDOG};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

#[test]
fn producer_killed_before_commit_is_detected_and_a_restart_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf-8 path");
    // Pushes records 0..3, then writes record 1000 into slot 3 without committing it.
    let mut producer = Peer::spawn(
        PEER,
        &[
            "ring-produce",
            d,
            "r",
            "0",
            "3",
            "--hang-uncommitted",
            "1000",
        ],
    )?;
    producer.expect_line("ready generation=1")?;
    let mut consumer = RolloutRing::open(dir.path(), "r", desc(4))?;
    producer.expect_line("pending")?;
    for i in 0..3 {
        assert_eq!(consumer.pop(WATCHDOG)?, record(i));
    }
    // The payload of record 1000 is in the slot, but it is not committed.
    assert!(matches!(consumer.try_pop(), Err(PopError::Empty)));
    assert!(consumer.producer_alive());
    producer.kill()?;
    match consumer.pop(WATCHDOG) {
        Err(PopError::ProducerDead { generation: 1 }) => {}
        other => panic!("expected ProducerDead, got {other:?}"),
    }
    // A restarted producer resumes the stream with generation 2.
    let mut restarted = Peer::spawn(PEER, &["ring-produce", d, "r", "3", "6", "--resume"])?;
    restarted.expect_line("ready generation=2")?;
    for i in 3..9 {
        let rec = consumer.pop(WATCHDOG)?;
        assert_ne!(rec.prompt_id, 1000, "uncommitted record leaked");
        assert_eq!(rec, record(i));
    }
    assert_eq!(consumer.producer_generation(), 2);
    let (_, ok) = restarted.finish()?;
    assert!(ok, "restarted producer failed");
    Ok(())
}

#[test]
fn consumer_killed_mid_read_gets_the_record_exactly_once_after_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf-8 path");
    let mut producer = RolloutRing::create(dir.path(), "r", desc(4))?;
    for i in 0..4 {
        producer.try_push(&record(i).as_view())?;
    }
    // Acknowledges records 0, 1, 2 and dies while reading record 3.
    let mut consumer = Peer::spawn(PEER, &["ring-consume", d, "r", "100", "--hang-on", "3"])?;
    for i in 0..3 {
        assert_eq!(consumer.expect_line("got")?, format!("got {i}"));
    }
    for i in 4..7 {
        producer.push(&record(i).as_view(), WATCHDOG)?;
    }
    assert_eq!(consumer.expect_line("reading")?, "reading 3");
    consumer.kill()?;
    // Ring holds 3, 4, 5, 6: full. Backpressure, never an overwrite.
    assert!(matches!(
        producer.try_push(&record(7).as_view()),
        Err(PushError::Full { capacity: 4 })
    ));
    match producer.push(&record(7).as_view(), Duration::from_millis(10)) {
        Err(PushError::Timeout {
            consumer_alive: false,
            ..
        }) => {}
        other => panic!("expected timeout with dead consumer, got {other:?}"),
    }
    let restarted = Peer::spawn(PEER, &["ring-consume", d, "r", "5"])?;
    producer.push(&record(7).as_view(), WATCHDOG)?;
    let (lines, ok) = restarted.finish()?;
    assert!(ok, "restarted consumer failed: {lines:?}");
    let got: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("got"))
        .map(String::as_str)
        .collect();
    assert_eq!(got, ["got 3", "got 4", "got 5", "got 6", "got 7"]);
    assert!(producer.is_empty());
    Ok(())
}
