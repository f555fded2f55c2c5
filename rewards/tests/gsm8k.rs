//! The 100 real GSM8K test problems: each worked solution scores 1 against its own final
//! answer and 0 once the final number is perturbed.

mod common;

use common::corpus::{corpus, perturb};
use rewards::{MathReward, Reward, Sample};

#[test]
fn every_worked_solution_scores_one_and_a_perturbed_one_zero() {
    let problems = common::gsm8k();
    let m = MathReward::default();
    for (i, p) in problems.iter().enumerate() {
        let answer = p
            .final_answer()
            .unwrap_or_else(|| panic!("problem {i} has no #### line"));
        // The reference is the worked solution itself, the completion is too.
        let own = m
            .score(&Sample::new(p.answer.clone(), p.answer.clone()))
            .expect("scored");
        assert_eq!(own.value, 1.0, "problem {i}: {:?}", own);
        assert_eq!(own.matched_by.as_deref(), Some("hashes"), "problem {i}");
        // Against the bare final answer.
        let bare = m
            .score(&Sample::new(p.answer.clone(), answer))
            .expect("scored");
        assert_eq!(bare.value, 1.0, "problem {i}");
        // Perturb the final number of the solution.
        let pos = p.answer.rfind("####").expect("#### line");
        let wrong = format!("{}#### {}\n", &p.answer[..pos], perturb(answer));
        let s = m.score(&Sample::new(wrong, answer)).expect("scored");
        assert_eq!(
            s.value, 0.0,
            "problem {i}: perturbed answer still scored {:?}",
            s
        );
    }
}

#[test]
fn generated_completions_score_as_labelled() {
    let problems = common::gsm8k();
    let m = MathReward::default();
    let samples = corpus(&problems, 500, 7);
    assert!(samples.len() > 900, "{}", samples.len());
    let mut wrong = Vec::new();
    for (s, ok) in &samples {
        let got = m.score(s).expect("scored").value;
        if got != if *ok { 1.0 } else { 0.0 } {
            wrong.push(format!(
                "{ok}: {:?} vs {:?}",
                tail(&s.completion),
                s.reference
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} mislabelled:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(80);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
