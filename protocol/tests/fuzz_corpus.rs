//! Replays the committed fuzz corpus (`fuzz/corpus/parse`) through the parsers the fuzz target
//! exercises, with the same checks: no panic, typed errors, and decode → encode round trips.

use protocol::{
    decode_record, encode_record, parse_ring_header, parse_weights_header, Limits, RecordError,
};

const LIMITS: Limits = Limits {
    max_prompt_tokens: 64,
    max_completion_tokens: 128,
    max_plan_layers: 32,
};

#[test]
fn corpus_replays_without_panics_and_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "corpus too small: {}", files.len());
    let (mut ring_ok, mut weights_ok, mut records_ok, mut records_err) = (0, 0, 0, 0);
    let mut padding_rejected = false;
    for path in &files {
        let data = std::fs::read(path).expect("corpus file");
        ring_ok += usize::from(parse_ring_header(&data, None).is_ok());
        weights_ok += usize::from(parse_weights_header(&data).is_ok());
        let mut buf = vec![0u32; data.len().div_ceil(4)];
        // SAFETY: buf has at least data.len() bytes; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr().cast::<u8>(), data.len())
        };
        // SAFETY: buf holds data.len() initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), data.len()) };
        match decode_record(bytes, &LIMITS) {
            Ok(rec) => {
                let again =
                    encode_record(rec.view(), &LIMITS).expect("a decoded record re-encodes");
                assert_eq!(again, bytes, "{}: decode/encode round trip", path.display());
                records_ok += 1;
            }
            Err(e) => {
                padding_rejected |= e == RecordError::NonZeroPadding;
                assert!(!e.to_string().is_empty());
                records_err += 1;
            }
        }
    }
    // The corpus must exercise both the accepting and the rejecting paths.
    assert!(
        ring_ok >= 1 && weights_ok >= 1,
        "ring {ring_ok}, weights {weights_ok}"
    );
    assert!(
        records_ok >= 1 && records_err >= 1,
        "records ok {records_ok}, rejected {records_err}"
    );
    assert!(
        padding_rejected,
        "the non-zero padding regression input must be rejected"
    );
}
