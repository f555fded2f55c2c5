//! Replays the committed fuzz corpus (`fuzz/corpus/math`) through the checks of the fuzz
//! target: no panic, a finite score, and a result within a generous watchdog bound.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rewards::{MathReward, Reward, Sample};

#[test]
fn math_corpus_replays_without_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/math");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus too small: {}", files.len());
    let (tx, rx) = mpsc::channel();
    let n = files.len();
    thread::spawn(move || {
        let m = MathReward::default();
        for path in &files {
            let data = std::fs::read(path).expect("corpus file");
            let text = String::from_utf8_lossy(&data);
            let (answer, reference) = text.split_once('\0').unwrap_or((&text, "1"));
            let _ = m.answers_match(answer, reference);
            let _ = m.answers_match(reference, answer);
            for completion in [
                format!("so \\boxed{{{answer}}}"),
                format!("{answer}\n#### {answer}"),
            ] {
                if let Ok(s) = m.score(&Sample::new(completion, reference)) {
                    assert!(s.value.is_finite(), "{}", path.display());
                }
            }
            let _ = tx.send(());
        }
    });
    for i in 0..n {
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("corpus file {i} of {n}: no result within the bound ({e})"));
    }
}
