//! Rollout ring in one process (two handles on one real shared segment).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use protocol::{
    parse_ring_header, CorruptReason, Descriptor, HeaderError, OpenError, PopError, PushError,
    RolloutRing, SegmentError, RING_LAYOUT_VERSION, RING_MAGIC,
};

const T: Duration = Duration::from_secs(5);

#[test]
fn records_arrive_in_order_and_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = RolloutRing::create(dir.path(), "r", common::desc(4)).expect("create");
    let mut c = RolloutRing::open(dir.path(), "r", common::desc(4)).expect("open");
    for round in 0..10u64 {
        for i in 0..4 {
            let seq = p
                .try_push(&common::record(round * 4 + i).as_view())
                .expect("push");
            assert_eq!(seq, round * 4 + i);
        }
        assert_eq!(p.len(), 4);
        for i in 0..4 {
            assert_eq!(c.pop(T).expect("pop"), common::record(round * 4 + i));
        }
        assert!(matches!(c.try_pop(), Err(PopError::Empty)));
    }
}

#[test]
fn full_ring_backpressures_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = RolloutRing::create(dir.path(), "r", common::desc(2)).expect("create");
    let mut c = RolloutRing::open(dir.path(), "r", common::desc(2)).expect("open");
    p.try_push(&common::record(0).as_view()).expect("push 0");
    p.try_push(&common::record(1).as_view()).expect("push 1");
    assert!(matches!(
        p.try_push(&common::record(2).as_view()),
        Err(PushError::Full { capacity: 2 })
    ));
    match p.push(&common::record(2).as_view(), Duration::from_millis(20)) {
        Err(PushError::Timeout {
            consumer_alive: true,
            ..
        }) => {}
        other => panic!("expected timeout with live consumer, got {other:?}"),
    }
    assert_eq!(c.pop(T).expect("pop"), common::record(0));
    p.try_push(&common::record(2).as_view())
        .expect("space after one pop");
    assert_eq!(c.pop(T).expect("pop"), common::record(1));
    assert_eq!(c.pop(T).expect("pop"), common::record(2));
}

#[test]
fn uncommitted_record_is_invisible_and_dead_producer_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = RolloutRing::create(dir.path(), "r", common::desc(4)).expect("create");
    let mut c = RolloutRing::open(dir.path(), "r", common::desc(4)).expect("open");
    p.try_push(&common::record(0).as_view()).expect("push");
    let pending = p
        .write_uncommitted(&common::record(1).as_view())
        .expect("write");
    drop(pending);
    assert_eq!(c.pop(T).expect("pop"), common::record(0));
    assert!(matches!(c.try_pop(), Err(PopError::Empty)));
    assert!(c.producer_alive());
    drop(p);
    assert!(!c.producer_alive());
    assert!(matches!(
        c.pop(T),
        Err(PopError::ProducerDead { generation: 1 })
    ));
    let mut p2 = RolloutRing::resume(dir.path(), "r", common::desc(4)).expect("resume");
    assert_eq!(p2.generation(), 2);
    assert_eq!(p2.next_seq(), 1);
    p2.try_push(&common::record(7).as_view())
        .expect("push after resume");
    assert_eq!(c.pop(T).expect("pop"), common::record(7));
    assert_eq!(c.producer_generation(), 2);
}

#[test]
fn roles_are_exclusive_and_creation_is_exclusive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _p = RolloutRing::create(dir.path(), "r", common::desc(4)).expect("create");
    assert!(matches!(
        RolloutRing::create(dir.path(), "r", common::desc(4)),
        Err(OpenError::Segment(SegmentError::AlreadyExists(_)))
    ));
    assert!(matches!(
        RolloutRing::resume(dir.path(), "r", common::desc(4)),
        Err(OpenError::RoleTaken {
            role: "producer",
            ..
        })
    ));
    let _c = RolloutRing::open(dir.path(), "r", common::desc(4)).expect("open");
    assert!(matches!(
        RolloutRing::open(dir.path(), "r", common::desc(4)),
        Err(OpenError::RoleTaken {
            role: "consumer",
            ..
        })
    ));
    let mode = std::fs::metadata(dir.path().join("r.ring")).expect("meta");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}

#[test]
fn descriptor_mismatch_names_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _p = RolloutRing::create(dir.path(), "r", common::desc(4)).expect("create");
    let mut other = common::desc(4);
    other.limits.max_completion_tokens = 256;
    match RolloutRing::open(dir.path(), "r", other) {
        Err(OpenError::Header {
            source:
                HeaderError::Descriptor {
                    field: "max_completion_tokens",
                    expected: 256,
                    found: 128,
                },
            ..
        }) => {}
        other => panic!("expected descriptor error, got {other:?}"),
    }
}

fn corrupt(dir: &std::path::Path, name: &str, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .expect("open file");
    f.write_all_at(bytes, offset).expect("write");
}

#[test]
fn corrupt_magic_version_and_descriptor_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = common::desc(4);
    for (i, (offset, bytes)) in [
        (0u64, 0x1234u64.to_le_bytes().to_vec()),
        (8, vec![9, 0, 0, 0]),
        (16, vec![1, 0, 0, 0]),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("c{i}");
        drop(RolloutRing::create(dir.path(), &name, d).expect("create"));
        corrupt(dir.path(), &format!("{name}.ring"), offset, &bytes);
        let err = RolloutRing::open(dir.path(), &name, d).expect_err("must fail");
        let OpenError::Header { source, .. } = &err else {
            panic!("expected header error, got {err:?}")
        };
        match (i, source) {
            (
                0,
                HeaderError::BadMagic {
                    expected: RING_MAGIC,
                    found: 0x1234,
                },
            ) => {}
            (
                1,
                HeaderError::BadVersion {
                    expected: RING_LAYOUT_VERSION,
                    found: 9,
                },
            ) => {}
            (
                2,
                HeaderError::Descriptor {
                    field: "slot_size", ..
                },
            ) => {}
            _ => panic!("case {i}: unexpected {source:?}"),
        }
        assert!(err.to_string().contains(match i {
            0 => "magic",
            1 => "version",
            _ => "slot_size",
        }));
    }
    assert!(matches!(
        parse_ring_header(&[0u8; 8], None),
        Err(HeaderError::Truncated { .. })
    ));
}

#[test]
fn wrong_size_and_wrong_mode_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = common::desc(4);
    drop(RolloutRing::create(dir.path(), "s", d).expect("create"));
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join("s.ring"))
        .expect("open");
    f.set_len(d.segment_size().expect("size") as u64 + 4096)
        .expect("grow");
    assert!(matches!(
        RolloutRing::open(dir.path(), "s", d),
        Err(OpenError::Segment(SegmentError::WrongSize { .. }))
    ));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dir.path().join("m.ring"));
    drop(f.expect("create 0644"));
    assert!(matches!(
        RolloutRing::open(dir.path(), "m", d),
        Err(OpenError::Segment(SegmentError::WrongMode { .. }))
    ));
    assert!(matches!(
        RolloutRing::open(dir.path(), "../x", d),
        Err(OpenError::Segment(SegmentError::InvalidName(_)))
    ));
}

#[test]
fn flipped_byte_is_quarantined_never_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d: Descriptor = common::desc(4);
    let mut p = RolloutRing::create(dir.path(), "q", d).expect("create");
    let mut c = RolloutRing::open(dir.path(), "q", d).expect("open");
    for i in 0..3 {
        p.try_push(&common::record(i).as_view()).expect("push");
    }
    // Flip one byte inside record 1's token data.
    let off = d.payload_offset(1).expect("offset") + 130;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("q.ring"))
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read");
    f.write_all_at(&[b[0] ^ 0x10], off).expect("write");
    assert_eq!(c.pop(T).expect("pop 0"), common::record(0));
    match c.pop(T) {
        Err(PopError::Corrupt {
            seq: 1,
            reason: CorruptReason::Crc { .. },
        }) => {}
        other => panic!("expected CRC quarantine, got {other:?}"),
    }
    assert_eq!(c.quarantined(), 1);
    assert_eq!(c.quarantined_total(), 1);
    assert_eq!(c.pop(T).expect("pop 2"), common::record(2));
}

#[test]
fn unpublished_magic_and_foreign_owner_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = common::desc(4);
    drop(RolloutRing::create(dir.path(), "z", d).expect("create"));
    corrupt(dir.path(), "z.ring", 0, &[0u8; 8]);
    assert!(matches!(
        RolloutRing::open(dir.path(), "z", d),
        Err(OpenError::Header {
            source: HeaderError::NotInitialised,
            ..
        })
    ));
    drop(RolloutRing::create(dir.path(), "o", d).expect("create"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot hand a segment to another user; owner check not exercised");
        return;
    }
    std::os::unix::fs::chown(dir.path().join("o.ring"), Some(65534), None).expect("chown");
    match RolloutRing::open(dir.path(), "o", d) {
        Err(OpenError::Segment(SegmentError::WrongOwner {
            owner: 65534,
            me: 0,
            ..
        })) => {}
        other => panic!("expected WrongOwner, got {other:?}"),
    }
}

#[test]
fn in_place_pops_deliver_the_same_records_as_copying_pops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d: Descriptor = common::desc(3);
    let mut p = RolloutRing::create(dir.path(), "z", d).expect("create");
    let mut c = RolloutRing::open(dir.path(), "z", d).expect("open");
    for i in 0..20u64 {
        p.try_push(&common::record(i).as_view()).expect("push");
        let got = if i % 2 == 0 {
            c.pop_in_place_with(T, |r| r.to_owned_record())
        } else {
            c.try_pop_in_place_with(|r| r.to_owned_record())
        };
        assert_eq!(got.expect("in-place pop"), common::record(i));
        assert_eq!(c.next_seq(), i + 1);
    }
    assert!(matches!(
        c.try_pop_in_place_with(|_| ()),
        Err(PopError::Empty)
    ));
    // The slot stays reserved while the borrowed record is in use: the ring is full with
    // `capacity` records pushed, including the one being read.
    for i in 0..3 {
        p.try_push(&common::record(i).as_view()).expect("push");
    }
    c.pop_in_place_with(T, |r| {
        assert_eq!(r.to_owned_record(), common::record(0));
        assert!(matches!(
            p.try_push(&common::record(9).as_view()),
            Err(PushError::Full { capacity: 3 })
        ));
    })
    .expect("pop");
    p.try_push(&common::record(3).as_view())
        .expect("space once released");
}

#[test]
fn flipped_byte_is_quarantined_by_the_in_place_pop_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d: Descriptor = common::desc(4);
    let mut p = RolloutRing::create(dir.path(), "y", d).expect("create");
    let mut c = RolloutRing::open(dir.path(), "y", d).expect("open");
    for i in 0..3 {
        p.try_push(&common::record(i).as_view()).expect("push");
    }
    let off = d.payload_offset(1).expect("offset") + 130;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("y.ring"))
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read");
    f.write_all_at(&[b[0] ^ 0x01], off).expect("write");
    let mut delivered = Vec::new();
    for _ in 0..3 {
        match c.pop_in_place_with(T, |r| delivered.push(r.view().prompt_id)) {
            Ok(()) => {}
            Err(PopError::Corrupt {
                seq: 1,
                reason: CorruptReason::Crc { .. },
            }) => {}
            Err(other) => panic!("expected CRC quarantine of seq 1, got {other:?}"),
        }
    }
    assert_eq!(delivered, [0, 2]);
    assert_eq!(c.quarantined(), 1);
}

#[test]
fn an_observer_sees_each_sides_holder_pid_and_silence() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        RolloutRing::observe(dir.path(), "r"),
        Err(OpenError::Segment(SegmentError::NotFound(_)))
    ));
    let p = RolloutRing::create(dir.path(), "r", common::desc(2)).expect("create");
    let o = RolloutRing::observe(dir.path(), "r").expect("observe");
    let me = std::process::id();
    let prod = o.producer();
    assert!(prod.held);
    assert_eq!(prod.pid, Some(me));
    assert!(prod.silent < Duration::from_secs(5), "{prod:?}");
    let c = o.consumer();
    assert!(!c.held && c.pid.is_none(), "no consumer yet: {c:?}");

    let cons = RolloutRing::open(dir.path(), "r", common::desc(2)).expect("open");
    assert!(o.consumer().held);
    assert_eq!(o.consumer().pid, Some(me));
    assert_eq!(cons.producer().pid, Some(me));
    assert!(p.consumer().held);

    // Silence grows until a beat, from any thread holding a heartbeat handle.
    std::thread::sleep(Duration::from_millis(60));
    assert!(o.producer().silent >= Duration::from_millis(50));
    let hb = p.heartbeat();
    assert!(hb.peer().held, "the producer's handle watches the consumer");
    assert_eq!(hb.peer().pid, Some(me));
    std::thread::spawn(move || hb.beat()).join().expect("beat");
    assert!(o.producer().silent < Duration::from_millis(50));
    assert!(cons.producer().silent < Duration::from_millis(50));

    // A holder that lets go is no longer held (dead, not hung); its last pid stays.
    drop(cons);
    let c = o.consumer();
    assert!(!c.held);
    assert_eq!(c.pid, Some(me));
}

fn truncate(path: &std::path::Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .expect("truncate");
}

#[test]
fn a_ring_truncated_while_attached_is_an_error_on_both_sides() {
    for len in [4096 + 100, 0] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = RolloutRing::create(dir.path(), "r", common::desc(4)).expect("create");
        let mut c = RolloutRing::open(dir.path(), "r", common::desc(4)).expect("open");
        let o = RolloutRing::observe(dir.path(), "r").expect("observe");
        p.try_push(&common::record(0).as_view()).expect("push");
        assert_eq!(c.pop(T).expect("pop"), common::record(0));
        p.try_push(&common::record(1).as_view()).expect("push");

        truncate(&dir.path().join("r.ring"), len);
        // The size check sees it on both sides.
        for t in [c.check_intact(), p.check_intact()] {
            let t = t.expect_err("truncated");
            assert_eq!(t.found, len);
            assert!(t.to_string().contains("truncated"), "{t}");
        }
        if len == 0 {
            // Every access runs past the end: each operation reports it.
            assert!(matches!(c.try_pop(), Err(PopError::Truncated(_))));
            assert!(matches!(c.pop(T), Err(PopError::Truncated(_))));
            assert!(matches!(
                p.try_push(&common::record(2).as_view()),
                Err(PushError::Truncated(_))
            ));
        } else {
            // The rest of the last page reads zeros without a fault: no record is delivered,
            // and the consumer's waiting pop reports the truncation.
            assert!(matches!(c.try_pop(), Err(PopError::Empty)));
            assert!(matches!(c.pop(T), Err(PopError::Truncated(_))));
        }
        // Header words past the end (heartbeats, pids, head and tail) read as zeros instead of
        // killing the process.
        let _ = (o.producer(), o.consumer(), p.len(), c.producer());
        p.heartbeat().beat();
        assert_eq!(c.quarantined(), 0, "a truncation is not a corrupt record");
    }
}
