//! Fuzzes the segment header parsers and the record decoder with arbitrary bytes.
//! The same checks run over the committed corpus in `protocol/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{decode_record, encode_record, parse_ring_header, parse_weights_header, Limits};

const LIMITS: Limits = Limits {
    max_prompt_tokens: 64,
    max_completion_tokens: 128,
    max_plan_layers: 32,
};

fuzz_target!(|data: &[u8]| {
    let _ = parse_ring_header(data, None);
    let _ = parse_weights_header(data);
    // decode_record needs a 4-byte aligned private copy, as the consumer provides.
    let mut buf = vec![0u32; data.len().div_ceil(4)];
    // SAFETY: buf has at least data.len() bytes; regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr().cast::<u8>(), data.len())
    };
    // SAFETY: buf holds data.len() initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), data.len()) };
    if let Ok(rec) = decode_record(bytes, &LIMITS) {
        let again = encode_record(rec.view(), &LIMITS).expect("a decoded record re-encodes");
        assert_eq!(again, bytes, "decode/encode round trip");
    }
});
