//! Loom model of the ring's index and commit protocol (`protocol::ring_core`).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p protocol --release --test loom`
//! (as .ci/run does: its own target directory keeps the main build).
//! The payload lives in loom `UnsafeCell`s, so a missing happens-before edge between the
//! producer's payload write and the consumer's read (or the consumer's read and the producer's
//! overwrite after wrap-around) is reported as a causality violation.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use protocol::ring_core::{
    consumer_ready, consumer_release, producer_commit, producer_space_limit,
};

const CAP: usize = 2;

struct Ring {
    head: AtomicU64,
    tail: AtomicU64,
    commits: [AtomicU64; CAP],
    data: [UnsafeCell<u64>; CAP],
}

// SAFETY: the protocol under test is what makes the UnsafeCell accesses exclusive; loom
// checks exactly that.
unsafe impl Sync for Ring {}

fn payload(seq: u64) -> u64 {
    seq * 10 + 7
}

fn run(records: u64) {
    loom::model(move || {
        let ring = Arc::new(Ring {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            commits: [AtomicU64::new(0), AtomicU64::new(0)],
            data: [UnsafeCell::new(0), UnsafeCell::new(0)],
        });
        let producer = {
            let ring = ring.clone();
            loom::thread::spawn(move || {
                // The producer caches the space limit exactly as `Producer` does.
                let mut limit = 0;
                for seq in 0..records {
                    while seq >= limit {
                        limit = producer_space_limit(&ring.tail, CAP as u64);
                        if seq >= limit {
                            loom::thread::yield_now();
                        }
                    }
                    let i = seq as usize % CAP;
                    // SAFETY: loom verifies exclusivity (the point of the model).
                    ring.data[i].with_mut(|p| unsafe { *p = payload(seq) });
                    producer_commit(&ring.commits[i], &ring.head, seq);
                }
            })
        };
        for seq in 0..records {
            let i = seq as usize % CAP;
            while !consumer_ready(&ring.commits[i], seq) {
                loom::thread::yield_now();
            }
            // SAFETY: as above.
            let v = ring.data[i].with(|p| unsafe { *p });
            assert_eq!(v, payload(seq));
            consumer_release(&ring.tail, seq);
        }
        producer.join().expect("producer thread");
    });
}

#[test]
fn spsc_commit_protocol_one_lap() {
    run(2);
}

#[test]
fn spsc_commit_protocol_wraps_around() {
    run(3);
}
