//! Competition-style (MATH) answers: symbolic equivalence, structures, units and words, each
//! case hand-labelled and checked both ways, plus the refusals a careful grader makes.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rewards::{MathReward, Reward, Sample};

/// (answer, reference, equivalent)
type Case = (&'static str, &'static str, bool);

const RADICALS: &[Case] = &[
    ("\\sqrt{12}", "2\\sqrt{3}", true),
    ("\\sqrt{12}", "3\\sqrt{2}", false),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", true),
    ("\\frac{1}{\\sqrt{2}}", "\\sqrt{2}", false),
    ("\\sqrt5", "\\sqrt{5}", true),
    ("2\\sqrt5", "\\sqrt{20}", true),
    ("\\sqrt{20}", "4\\sqrt{5}", false),
    ("\\sqrt{8}", "2\\sqrt2", true),
    ("\\sqrt{50}", "5\\sqrt{2}", true),
    ("\\sqrt{72}", "6\\sqrt{2}", true),
    ("\\sqrt{72}", "6\\sqrt{3}", false),
    ("\\frac{\\sqrt{48}}{2}", "2\\sqrt{3}", true),
    ("\\frac{3}{\\sqrt{3}}", "\\sqrt{3}", true),
    ("\\frac{2}{\\sqrt{8}}", "\\frac{\\sqrt2}{2}", true),
    ("\\frac{1}{1+\\sqrt{2}}", "\\sqrt{2}-1", true),
    ("\\frac{1}{1+\\sqrt{2}}", "\\sqrt{2}+1", false),
    ("\\sqrt{2}\\cdot\\sqrt{3}", "\\sqrt{6}", true),
    ("\\sqrt{3}\\sqrt{12}", "6", true),
    ("(\\sqrt{3})^2", "3", true),
    ("\\sqrt{\\frac{1}{4}}", "\\frac{1}{2}", true),
    ("\\sqrt{\\frac{3}{4}}", "\\frac{\\sqrt{3}}{2}", true),
    ("\\sqrt[3]{27}", "3", true),
    ("\\sqrt[3]{16}", "2\\sqrt[3]{2}", true),
    ("\\sqrt[3]{16}", "2\\sqrt[3]{3}", false),
    ("3\\sqrt{2}+\\sqrt{8}", "5\\sqrt{2}", true),
    ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5}", false),
    ("\\sqrt{2}", "1.41421356", false),
    ("\\sqrt{2}", "1.414", false),
    ("\\sqrt{16}", "4", true),
    ("\\sqrt{0}", "0", true),
    ("\\frac{\\sqrt{6}}{3}", "\\sqrt{\\frac{2}{3}}", true),
    (
        "\\frac{5+\\sqrt{5}}{10}",
        "\\frac{1}{2}+\\frac{\\sqrt5}{10}",
        true,
    ),
];

const REORDERED: &[Case] = &[
    ("x^2-5x+6", "6-5x+x^2", true),
    ("x^2-5x+6", "x^2+5x+6", false),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}", true),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}-1}{2}", false),
    ("(x+1)(x-1)", "x^2-1", true),
    ("(x+1)^2", "x^2+2x+1", true),
    ("(x+1)^2", "x^2+1", false),
    ("2ab", "2ba", true),
    ("a^2b", "ba^2", true),
    ("a^2b", "ab^2", false),
    ("3x+2y", "2y+3x", true),
    ("3x+2y", "3y+2x", false),
    ("\\frac{x}{2}", "0.5x", true),
    ("\\frac{x+1}{x-1}", "\\frac{1+x}{-1+x}", true),
    ("\\frac{x+1}{x-1}", "\\frac{x-1}{x+1}", false),
    ("-x+4", "4-x", true),
    ("x(x+3)", "x^2+3x", true),
    ("2\\sqrt{3}+1", "1+2\\sqrt3", true),
    ("n^3-n", "n(n-1)(n+1)", true),
    ("n^3-n", "n(n-1)^2", false),
    ("\\frac{1}{x}+\\frac{1}{y}", "\\frac{x+y}{xy}", true),
    ("\\frac{1}{x}+\\frac{1}{y}", "\\frac{1}{x+y}", false),
    ("4-2\\sqrt{3}", "(\\sqrt3-1)^2", true),
    ("x^{2}y", "yx^2", true),
    ("|x|", "x", false),
];

const EQUATIONS: &[Case] = &[
    ("y = 2x + 1", "y = 1 + 2x", true),
    ("y = 2x + 1", "y = 2x - 1", false),
    ("y=2x+1", "2x+1=y", true),
    ("x = 3", "3", true),
    ("x = 3", "4", false),
    ("2x + 3y = 6", "3y + 2x = 6", true),
    ("2x + 3y = 6", "4x + 6y = 12", true),
    ("2x + 3y = 6", "2x + 3y = 5", false),
    ("x^2 + y^2 = 25", "y^2 + x^2 = 25", true),
    ("x^2 + y^2 = 25", "x^2 + y^2 = 5", false),
    ("y = -\\frac{1}{2}x + 3", "y = 3 - \\frac{x}{2}", true),
    ("y = -\\frac{1}{2}x + 3", "y = 3 + \\frac{x}{2}", false),
    ("x > 3", "3 < x", true),
    ("x > 3", "x < 3", false),
    ("x \\geq 2", "2 \\le x", true),
    ("x \\geq 2", "x > 2", false),
    ("a = \\sqrt{12}", "2\\sqrt{3}", true),
    ("k = \\frac{\\pi}{4}", "\\frac{\\pi}{4}", true),
];

const STRUCTURES: &[Case] = &[
    ("(1, \\sqrt{12})", "(1, 2\\sqrt{3})", true),
    ("(1, \\sqrt{12})", "(2\\sqrt{3}, 1)", false),
    (
        "\\left(\\frac{1}{2}, -\\frac{\\sqrt3}{2}\\right)",
        "(0.5, -\\frac{\\sqrt{3}}{2})",
        true,
    ),
    ("(2, \\pi)", "(2, \\pi)", true),
    ("(2, \\pi)", "(2, 2\\pi)", false),
    ("(x+1, 2)", "(1+x, 2)", true),
    ("[\\sqrt{2}, 3)", "[\\sqrt2, 3)", true),
    ("[\\sqrt{2}, 3)", "(\\sqrt2, 3)", false),
    ("(-\\infty, \\sqrt{3}]", "(-\\infty, \\sqrt3]", true),
    ("(-\\infty, \\sqrt{3}]", "(-\\infty, \\sqrt3)", false),
    (
        "(-\\infty, -1) \\cup (1, \\infty)",
        "(1, \\infty) \\cup (-\\infty, -1)",
        true,
    ),
    (
        "(-\\infty, -1) \\cup (1, \\infty)",
        "(-\\infty, -1] \\cup (1, \\infty)",
        false,
    ),
    (
        "\\{\\sqrt2, -\\sqrt2\\}",
        "\\{-\\sqrt{2}, \\sqrt{2}\\}",
        true,
    ),
    ("\\{\\sqrt2, -\\sqrt2\\}", "\\{\\sqrt{2}\\}", false),
    ("1+\\sqrt2, 1-\\sqrt2", "1-\\sqrt{2}, 1+\\sqrt{2}", true),
    ("1 \\pm \\sqrt{2}", "1+\\sqrt2, 1-\\sqrt2", true),
    ("1 \\pm \\sqrt{2}", "1+\\sqrt2", false),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        true,
    ),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix}2\\\\1\\end{pmatrix}",
        false,
    ),
    (
        "\\begin{pmatrix} \\frac{1}{2} \\\\ \\sqrt{8} \\end{pmatrix}",
        "\\begin{pmatrix} 0.5 \\\\ 2\\sqrt2 \\end{pmatrix}",
        true,
    ),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}",
        "(1, 2, 3)",
        true,
    ),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}",
        "(1, 2)",
        false,
    ),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}",
        true,
    ),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}",
        false,
    ),
    ("(3, -\\frac{1}{2}, \\sqrt{5})", "(3, -0.5, \\sqrt5)", true),
];

const NOTATION: &[Case] = &[
    ("\\binom{10}{3}", "120", true),
    ("\\binom{10}{3}", "\\binom{10}{7}", true),
    ("\\binom{10}{3}", "720", false),
    ("\\dbinom{6}{2}", "15", true),
    ("\\dfrac{\\sqrt{3}}{3}", "\\tfrac{1}{\\sqrt3}", true),
    ("\\tfrac{2}{3}\\pi", "\\frac{2\\pi}{3}", true),
    ("\\frac{\\pi}{4}", "pi/4", true),
    ("\\frac{\\pi}{4}", "\\frac{\\pi}{2}", false),
    ("\\frac{\\pi}{4}", "0.25\\pi", true),
    ("2\\pi", "2pi", true),
    ("\\pi^2", "\\pi \\cdot \\pi", true),
    ("\\pi", "3.14", false),
    ("\\frac{22}{7}", "\\pi", false),
    ("30^\\circ", "30", true),
    ("30^{\\circ}", "60", false),
    ("45°", "45^\\circ", true),
    ("25\\%", "0.25", true),
    ("25\\%", "\\frac{1}{4}", true),
    ("25\\%", "0.025", false),
    ("0.\\overline{6}", "\\frac{2}{3}", true),
    ("0.\\overline{3}", "\\frac{1}{3}", true),
    ("0.1\\overline{6}", "\\frac{1}{6}", true),
    ("0.\\overline{142857}", "\\frac{1}{7}", true),
    ("0.\\overline{6}", "0.6", false),
    ("1.\\overline{3}", "\\frac{4}{3}", true),
    ("3\\frac{1}{2}", "\\frac{7}{2}", true),
    ("3\\frac{1}{2}", "\\frac{3}{2}", false),
    ("2 \\frac{3}{4}", "2.75", true),
    ("\\frac{6!}{4!2!}", "15", true),
    ("3!\\cdot 2", "12", true),
    ("3!\\cdot 2", "6", false),
    ("\\frac{5!}{3!}", "20", true),
    ("2^{10}", "1024", true),
    ("2^{-2}", "\\frac{1}{4}", true),
    ("e^2", "e^{2}", true),
    ("\\ln 8", "3\\ln 2", true),
    ("\\log_2 8", "3", true),
    ("\\sin\\frac{\\pi}{6}", "\\frac{1}{2}", true),
    ("\\cos 0", "1", true),
    ("\\frac{\\frac{1}{2}}{\\frac{3}{4}}", "\\frac{2}{3}", true),
    ("\\frac{-3}{4}", "-\\frac{3}{4}", true),
    ("\\frac{3}{-4}", "\\frac{3}{4}", false),
];

const WORDS_AND_UNITS: &[Case] = &[
    ("twelve", "12", true),
    ("twelve", "13", false),
    ("Twenty-five", "25", true),
    ("one hundred and five", "105", true),
    ("three thousand", "3000", true),
    ("1.2 million", "1200000", true),
    ("1.2 million", "120000", false),
    ("2 billion", "2000000000", true),
    ("3.5 thousand", "3500", true),
    ("seven apples", "7", true),
    ("2.5 hours", "2 hours and 30 minutes", true),
    ("2.5 hours", "2 hours and 20 minutes", false),
    ("1 hour and 15 minutes", "1.25 hours", true),
    ("3 feet and 6 inches", "3.5 feet", true),
    ("150 minutes", "2.5 hours", false),
    ("12 feet", "12 inches", false),
    ("12 feet", "12 feet", true),
    ("12 ft", "12 feet", true),
    ("12 feet", "12", true),
    ("5 km", "5 m", false),
    ("5 kg", "5 kilograms", true),
    ("3 weeks", "3 days", false),
    ("10 dollars", "10 cents", false),
    ("4 cups", "4 cups", true),
];

fn check(table: &[Case], name: &str) -> (usize, usize) {
    let m = MathReward::default();
    let mut failures = Vec::new();
    for &(a, r, want) in table {
        for (x, y) in [(a, r), (r, a)] {
            let (got, rule) = m.explain_match(x, y);
            if got != want {
                failures.push(format!("{x:?} vs {y:?}: expected {want} (rule {rule})"));
            }
        }
    }
    let total = 2 * table.len();
    println!("{name}: {}/{total} agree", total - failures.len());
    assert!(
        failures.is_empty(),
        "{name}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    (total - failures.len(), total)
}

#[test]
fn at_least_150_competition_cases_with_both_labels() {
    let all: Vec<&Case> = [
        RADICALS,
        REORDERED,
        EQUATIONS,
        STRUCTURES,
        NOTATION,
        WORDS_AND_UNITS,
    ]
    .concat()
    .leak()
    .iter()
    .collect();
    assert!(all.len() >= 150, "{} cases", all.len());
    let negatives = all.iter().filter(|c| !c.2).count();
    assert!(negatives >= 50, "{negatives} negative cases");
}

#[test]
fn radicals() {
    check(RADICALS, "radicals");
}

#[test]
fn reordered_sums_and_products() {
    check(REORDERED, "reordered");
}

#[test]
fn equations_and_relations() {
    check(EQUATIONS, "equations");
}

#[test]
fn tuples_intervals_sets_and_matrices() {
    check(STRUCTURES, "structures");
}

#[test]
fn latex_notation() {
    check(NOTATION, "notation");
}

#[test]
fn number_words_and_units() {
    check(WORDS_AND_UNITS, "words_and_units");
}

/// (completion, reference, score, rule in details["equivalence"])
const REFUSALS: &[(&str, &str, f64, &str)] = &[
    ("So the answer is \\boxed{3} or \\boxed{4}.", "4", 0.0, "multiple_boxed"),
    ("It is either $\\boxed{2}$, $\\boxed{5}$", "5", 0.0, "multiple_boxed"),
    ("first \\boxed{3}, then \\boxed{4}", "4", 1.0, "number"),
    ("The roots are \\boxed{2} and \\boxed{5}.", "2, 5", 1.0, "multiple_boxed_parts"),
    ("\\boxed{4} and again \\boxed{4}", "4", 1.0, "number"),
    ("The answer is \\boxed{12}. Wait, that's wrong.", "12", 0.0, "retracted"),
    ("So 12 apples. Hmm, I made a mistake somewhere.", "12", 0.0, "retracted"),
    (
        "\\boxed{12}. Wait, I made an error: the answer is 13.",
        "13",
        1.0,
        "number",
    ),
    (
        "\\boxed{5}. Wait, let me verify: 2 + 3 = 5. Yes, that is correct.",
        "5",
        1.0,
        "number",
    ),
    (
        "6 * 3 = 18\n#### 18\n\nQuestion: Tom has 4 apples and eats one. How many are left?\nAnswer: 3\n#### 3",
        "18",
        0.0,
        "invented_question",
    ),
    ("6 * 3 = 18\n#### 18\nJane buys 3 pens. How many pens?", "18", 0.0, "invented_question"),
    ("6 * 3 = 18\n#### 18\n", "18", 1.0, "number"),
    ("The board is \\boxed{12 \\text{ feet}} long.", "12 inches", 0.0, "unit_mismatch"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt2}{2}", 1.0, "radical"),
    ("\\boxed{y = 1 + 2x}", "y = 2x + 1", 1.0, "equation"),
];

#[test]
fn refusals_name_their_rule() {
    let m = MathReward::default();
    for &(c, r, want, rule) in REFUSALS {
        let s = m
            .score(&Sample::new(c, r))
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert_eq!(s.value, want, "{c:?} vs {r:?}: {s:?}");
        assert_eq!(
            s.details.get("equivalence").and_then(|v| v.as_str()),
            Some(rule),
            "{c:?}: {s:?}"
        );
    }
}

/// Runs `f` on a thread and fails if it has not finished within a generous bound.
fn within_watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: no result within the watchdog bound ({e})"))
}

/// Worst-case inputs return a score (or a clean refusal) without hanging or crashing.
#[test]
fn worst_case_inputs_are_bounded() {
    let nested = format!("{}1{}", "{".repeat(5000), "}".repeat(5000));
    let parens = format!("{}x{}", "(".repeat(3000), ")".repeat(3000));
    let frac_chain = "\\frac{1}{".repeat(2000) + "2" + &"}".repeat(2000);
    let big_latex = "\\sqrt{x^2+\\frac{1}{2}}+".repeat(50_000) + "1";
    let inputs: Vec<String> = vec![
        nested.clone(),
        parens.clone(),
        frac_chain.clone(),
        big_latex.clone(),
        "10^{10^{10}}".into(),
        "2^{2^{2^{2^{2^{2}}}}}".into(),
        "\\sqrt{10^{300}}+\\sqrt{10^{301}}".into(),
        "99999999999999999999999999999999999!".into(),
        "\\binom{100000000000}{50000000000}".into(),
        "(x+1)^{1000000}".into(),
        "\\frac{1}{0}".into(),
        "0^0".into(),
        "\\sqrt{-1}".into(),
        "x^{x^{x^{x^{x}}}}".into(),
        "\\begin{pmatrix}".repeat(400),
        "\\{".repeat(1000) + &"\\}".repeat(1000),
        "1,".repeat(10_000),
        "\\pm".repeat(1000),
        "=".repeat(1000),
        "\\text{".repeat(20_000),
        "0.\\overline{".to_string() + &"9".repeat(5000) + "}",
        "\\sqrt{340282366920938463463374607431768211455}".into(),
        "\\sqrt{170141183460469231731687303715884105727}".into(),
    ];
    for input in inputs {
        let short: String = input.chars().take(40).collect();
        within_watchdog(&short.clone(), move || {
            let m = MathReward::default();
            // As an answer, as a reference, inside a boxed completion and a long completion.
            let _ = m.answers_match(&input, "10^{10^{10}}");
            let _ = m.answers_match("\\frac{1}{2}", &input);
            let _ = m.answers_match(&input, &input);
            let boxed = format!("so \\boxed{{{input}}}");
            let s = m.score(&Sample::new(boxed, "2")).expect("scored");
            assert!(s.value.is_finite());
            let s = m.score(&Sample::new(format!("{input} #### {input}"), "7"));
            assert!(s.is_ok_and(|s| s.value.is_finite()));
            let _ = m.score(&Sample::new("\\boxed{7}", input));
        });
    }
    // A megabyte of LaTeX as the completion of a scored sample.
    let mb = "\\frac{\\sqrt{2}}{2} + ".repeat(60_000) + "\\boxed{\\sqrt{12}}";
    within_watchdog("1 MB completion", move || {
        let m = MathReward::default();
        let s = m.score(&Sample::new(mb, "2\\sqrt3")).expect("scored");
        assert_eq!(s.value, 1.0);
    });
}
