//! Record encoding: round trips and typed rejections.

mod common;

use protocol::{decode_record, encode_record, RecordError};

fn aligned(bytes: &[u8]) -> Vec<u32> {
    let mut v = vec![0u32; bytes.len().div_ceil(4)];
    // SAFETY: v has at least bytes.len() bytes; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len())
    };
    v
}

fn as_bytes(v: &[u32], len: usize) -> &[u8] {
    // SAFETY: v holds at least len initialised bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) }
}

#[test]
fn round_trip_every_field() {
    let limits = common::desc(4).limits;
    for i in 0..200 {
        let rec = common::record(i);
        let bytes = encode_record(&rec.as_view(), &limits).expect("encode");
        let buf = aligned(&bytes);
        let back = decode_record(as_bytes(&buf, bytes.len()), &limits).expect("decode");
        assert_eq!(back.to_owned_record(), rec, "record {i}");
    }
}

#[test]
fn oversized_fields_are_rejected_when_writing() {
    let limits = common::desc(4).limits;
    let mut rec = common::record(3);
    rec.completion = vec![1; 129];
    rec.logprobs = vec![0.0; 129];
    match encode_record(&rec.as_view(), &limits) {
        Err(RecordError::TooMany {
            field: "completion",
            count: 129,
            max: 128,
        }) => {}
        other => panic!("expected TooMany completion, got {other:?}"),
    }
    let mut rec = common::record(3);
    rec.logprobs.pop();
    assert!(matches!(
        encode_record(&rec.as_view(), &limits),
        Err(RecordError::LogprobCount { .. })
    ));
}

#[test]
fn decoding_checks_counts_lengths_and_codes() {
    let limits = common::desc(4).limits;
    let rec = common::record(10);
    let bytes = encode_record(&rec.as_view(), &limits).expect("encode");
    // Truncated.
    let buf = aligned(&bytes);
    assert!(matches!(
        decode_record(as_bytes(&buf, 50), &limits),
        Err(RecordError::Truncated {
            needed: 120,
            found: 50
        })
    ));
    // A prompt count beyond the limit (offset 80 = n_prompt).
    let mut bad = bytes.clone();
    bad[80..84].copy_from_slice(&65u32.to_le_bytes());
    let b = aligned(&bad);
    assert!(matches!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::TooMany {
            field: "prompt",
            count: 65,
            max: 64
        })
    ));
    // A count within limits but inconsistent with the payload size.
    let mut bad = bytes.clone();
    bad[80..84].copy_from_slice(&1u32.to_le_bytes());
    let b = aligned(&bad);
    assert!(matches!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::LengthMismatch { .. })
    ));
    // Unknown finish reason (offset 68).
    let mut bad = bytes.clone();
    bad[68..72].copy_from_slice(&99u32.to_le_bytes());
    let b = aligned(&bad);
    assert_eq!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::BadFinishReason(99))
    );
    // Group index beyond the group size (offset 104 = group_index, 100 = group_size).
    let mut bad = bytes.clone();
    bad[104..108].copy_from_slice(&4u32.to_le_bytes());
    let b = aligned(&bad);
    assert_eq!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::BadGroup {
            size: 4,
            index: 4,
            batch_groups: 4
        })
    );
    // A non-zero reserved word (offsets 112, 116) is refused, so every record has one encoding.
    for at in [112, 116] {
        let mut bad = bytes.clone();
        bad[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        let b = aligned(&bad);
        assert_eq!(
            decode_record(as_bytes(&b, bad.len()), &limits),
            Err(RecordError::NonZeroReserved(1))
        );
    }
    // Writing refuses an inconsistent group too.
    let mut rec0 = common::record(3);
    rec0.group_size = 0;
    assert!(matches!(
        encode_record(&rec0.as_view(), &limits),
        Err(RecordError::BadGroup { size: 0, .. })
    ));
    // Misaligned buffer.
    let b = aligned(&[bytes.as_slice(), &[0u8; 4]].concat());
    let shifted = &as_bytes(&b, bytes.len() + 4)[1..bytes.len() + 1];
    assert_eq!(
        decode_record(shifted, &limits),
        Err(RecordError::Misaligned)
    );
}

#[test]
fn plan_entries_carry_block_flags_and_reject_both() {
    use protocol::{PLAN_SKIP_ATTN, PLAN_SKIP_MLP};
    let limits = common::desc(4).limits;
    let mut rec = common::record(7);
    rec.plan = vec![0, 1 | PLAN_SKIP_ATTN, 2 | PLAN_SKIP_MLP, 5];
    let bytes = encode_record(&rec.as_view(), &limits).expect("encode");
    let buf = aligned(&bytes);
    let back = decode_record(as_bytes(&buf, bytes.len()), &limits).expect("decode");
    assert_eq!(back.view().plan, rec.plan.as_slice());

    // Both flags on one entry: refused when writing and when reading.
    let both = 3 | PLAN_SKIP_ATTN | PLAN_SKIP_MLP;
    rec.plan = vec![0, both];
    assert_eq!(
        encode_record(&rec.as_view(), &limits),
        Err(RecordError::BadPlanEntry(both))
    );
    let mut ok = common::record(7);
    ok.plan = vec![0, 3];
    let mut bytes = encode_record(&ok.as_view(), &limits).expect("encode");
    let at = bytes.len() - 4 + 2; // the second u16 of the (4-byte padded) plan
    bytes[at..at + 2].copy_from_slice(&both.to_le_bytes());
    let buf = aligned(&bytes);
    assert_eq!(
        decode_record(as_bytes(&buf, bytes.len()), &limits).err(),
        Some(RecordError::BadPlanEntry(both))
    );
}

#[test]
fn stop_strings_and_reward_failures_round_trip_and_are_checked() {
    use protocol::{FinishReason, RewardOutcome, MAX_REWARD_MESSAGE_BYTES, MAX_STOP_BYTES};
    let limits = common::desc(4).limits;
    // Record 10 has a failed reward (10 % 5 == 0); give it a stop string too.
    let mut rec = common::record(10);
    rec.finish = FinishReason::Stop("\n\nQ:".into());
    assert!(rec.reward.is_failed());
    let bytes = encode_record(&rec.as_view(), &limits).expect("encode");
    let buf = aligned(&bytes);
    let back = decode_record(as_bytes(&buf, bytes.len()), &limits).expect("decode");
    assert_eq!(back.view().finish, rec.finish);
    assert_eq!(back.view().reward, rec.reward);

    // A message on a computed reward (flag at offset 72 cleared) is refused.
    let mut bad = bytes.clone();
    bad[72..76].copy_from_slice(&0u32.to_le_bytes());
    let b = aligned(&bad);
    assert!(matches!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::StrayText(_))
    ));
    // A stop string under an Eos finish (offset 68) is refused.
    let mut bad = bytes.clone();
    bad[68..72].copy_from_slice(&1u32.to_le_bytes());
    let b = aligned(&bad);
    assert!(matches!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::StrayText(_))
    ));
    // Invalid UTF-8 in the stop string (the first text byte follows the plan).
    let plan_end = 120 + 4 * (rec.prompt.len() + 2 * rec.completion.len()) + 2 * rec.plan.len();
    let mut bad = bytes.clone();
    bad[plan_end] = 0xFF;
    let b = aligned(&bad);
    assert_eq!(
        decode_record(as_bytes(&b, bad.len()), &limits),
        Err(RecordError::BadText("stop string"))
    );

    // Writing: a long message is shortened at a character boundary; a long stop string is
    // refused.
    let long = RewardOutcome::failed("é".repeat(MAX_REWARD_MESSAGE_BYTES));
    let msg = long.failure.as_deref().unwrap_or_default();
    assert_eq!(msg.len(), MAX_REWARD_MESSAGE_BYTES);
    let mut rec = common::record(3);
    rec.reward = long.clone();
    let bytes = encode_record(&rec.as_view(), &limits).expect("encode");
    let buf = aligned(&bytes);
    let back = decode_record(as_bytes(&buf, bytes.len()), &limits).expect("decode");
    assert_eq!(back.view().reward, long);
    assert!(bytes.len() <= limits.max_record_bytes().unwrap_or(0));
    rec.finish = FinishReason::Stop("x".repeat(MAX_STOP_BYTES + 1));
    assert!(matches!(
        encode_record(&rec.as_view(), &limits),
        Err(RecordError::TooMany {
            field: "stop string bytes",
            ..
        })
    ));
}
