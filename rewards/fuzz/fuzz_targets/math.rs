//! Fuzzes the `math` verifier: the input is split at its first NUL byte into an answer and a
//! reference, compared both ways and scored inside a completion. It must never panic and
//! always give a finite score. The committed corpus is replayed by
//! `rewards/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rewards::{MathReward, Reward, Sample};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (answer, reference) = text.split_once('\0').unwrap_or((&text, "1"));
    let m = MathReward::default();
    let _ = m.answers_match(answer, reference);
    let _ = m.answers_match(reference, answer);
    for completion in [
        format!("so \\boxed{{{answer}}}"),
        format!("{answer}\n#### {answer}"),
    ] {
        if let Ok(s) = m.score(&Sample::new(completion, reference)) {
            assert!(s.value.is_finite());
        }
    }
});
