//! Weight store and manifest in one process.

use std::time::Duration;

use protocol::{DType, Manifest, ManifestError, OpenError, PinError, PublishError, WeightStore};

const T: Duration = Duration::from_secs(5);

fn manifest() -> Manifest {
    Manifest::new([
        ("embed", vec![10, 6], DType::F32),
        ("norm", vec![5], DType::BF16),
        ("head", vec![3, 7], DType::F32),
    ])
    .expect("manifest")
}

#[test]
fn manifest_layout_is_aligned_and_hashed() {
    let m = manifest();
    let offs: Vec<_> = m.tensors().iter().map(|t| (t.offset, t.size)).collect();
    assert_eq!(offs, vec![(0, 240), (256, 10), (320, 84)]);
    assert_eq!(m.total_size(), 448);
    let other = Manifest::new([
        ("embed", vec![10, 6], DType::F32),
        ("norm", vec![5], DType::BF16),
        ("head", vec![7, 3], DType::F32),
    ])
    .expect("manifest");
    assert_ne!(m.hash(), other.hash(), "shape must enter the hash");
    assert_eq!(m.hash(), manifest().hash());
    assert_eq!(
        Manifest::new([("a", vec![1], DType::U8), ("a", vec![1], DType::U8)]),
        Err(ManifestError::DuplicateName("a".into()))
    );
    assert!(matches!(
        Manifest::new([("a", vec![usize::MAX, 2], DType::F32)]),
        Err(ManifestError::Overflow(_))
    ));
}

#[test]
fn publish_and_pin_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let mut w = WeightStore::create(dir.path(), "w", &m, 2).expect("create");
    let mut r = WeightStore::open(dir.path(), "w", &m).expect("open");
    assert!(matches!(r.pin(), Err(PinError::NothingPublished)));
    for v in 1..=5u64 {
        let got = w.publish(T, |b| b.fill(v as u8)).expect("publish");
        assert_eq!(got, v);
        let p = r.pin().expect("pin");
        assert_eq!(p.version(), v);
        assert!(p.bytes().iter().all(|&x| x == v as u8));
        assert_eq!(p.tensor("norm").map(<[u8]>::len), Some(10));
        assert_eq!(p.tensor_f32("head").map(<[f32]>::len), Some(21));
        assert!(p.tensor_f32("norm").is_none());
    }
}

#[test]
fn pinned_slot_is_never_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let mut w = WeightStore::create(dir.path(), "w", &m, 2).expect("create");
    let mut r = WeightStore::open(dir.path(), "w", &m).expect("open");
    w.publish(T, |b| b.fill(1)).expect("v1");
    let pinned = r.pin().expect("pin v1");
    // v2 goes to the other slot; v3 would need v1's slot, which is pinned.
    w.publish(T, |b| b.fill(2)).expect("v2");
    match w.publish(Duration::from_millis(20), |b| b.fill(3)) {
        Err(PublishError::AllSlotsPinned { slots: 1, .. }) => {}
        other => panic!("expected AllSlotsPinned, got {other:?}"),
    }
    assert!(pinned.bytes().iter().all(|&x| x == 1));
    assert_eq!(pinned.version(), 1);
    drop(pinned);
    assert_eq!(w.publish(T, |b| b.fill(3)).expect("v3"), 3);
    assert_eq!(r.pin().expect("pin").version(), 3);
}

#[test]
fn dead_readers_pin_is_reclaimed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let mut w = WeightStore::create(dir.path(), "w", &m, 2).expect("create");
    let mut r = WeightStore::open(dir.path(), "w", &m).expect("open");
    w.publish(T, |b| b.fill(1)).expect("v1");
    let pinned = r.pin().expect("pin");
    // Simulate a reader that dies while pinned: its pin word stays set, its lock goes away.
    std::mem::forget(pinned);
    drop(r);
    w.publish(T, |b| b.fill(2)).expect("v2");
    assert_eq!(
        w.publish(T, |b| b.fill(3))
            .expect("v3 reuses the dead reader's slot"),
        3
    );
    let mut r2 = WeightStore::open(dir.path(), "w", &m).expect("reopen");
    let p = r2.pin().expect("pin");
    assert!(p.bytes().iter().all(|&x| x == 3));
}

#[test]
fn manifest_mismatch_and_writer_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let _w = WeightStore::create(dir.path(), "w", &m, 3).expect("create");
    let other = Manifest::new([("x", vec![4], DType::F32)]).expect("manifest");
    match WeightStore::open(dir.path(), "w", &other) {
        Err(OpenError::ManifestMismatch { expected, found }) => {
            assert_eq!(expected, other.hash_hex());
            assert_eq!(found, m.hash_hex());
        }
        other => panic!("expected manifest mismatch, got {other:?}"),
    }
    assert!(matches!(
        WeightStore::resume(dir.path(), "w", &m),
        Err(OpenError::RoleTaken { role: "writer", .. })
    ));
    assert!(matches!(
        WeightStore::create(dir.path(), "v", &m, 1),
        Err(OpenError::InvalidLayout(_))
    ));
}

#[test]
fn a_store_truncated_while_attached_is_an_error_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let mut w = WeightStore::create(dir.path(), "w", &m, 2).expect("create");
    let mut r = WeightStore::open(dir.path(), "w", &m).expect("open");
    w.publish(T, |b| b.fill(3)).expect("publish");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("w.weights"))
        .expect("open the file");
    {
        let pinned = r.pin().expect("pin");
        assert!(pinned.bytes().iter().all(|&b| b == 3));
        pinned.check_intact().expect("intact");
        file.set_len(0).expect("truncate");
        // Read while pinned: the weights are gone, and the check says so.
        let sum: u64 = pinned.bytes().iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 0, "the mapping reads zeros after the truncation");
        let e = pinned.check_intact().expect_err("truncated");
        assert_eq!(e.found, 0);
    }
    assert!(r.check_intact().is_err() && w.check_intact().is_err());
    assert!(matches!(r.pin(), Err(PinError::Truncated(_))));
    assert!(matches!(
        w.publish(T, |b| b.fill(4)),
        Err(PublishError::Truncated(_))
    ));
}
