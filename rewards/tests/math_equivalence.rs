//! Answer equivalence and extraction of the built-in `math` reward.

use rewards::{MathConfig, MathReward, Reward, RewardError, Sample};

/// (answer, reference, equivalent) — GSM8K style: integers, money, units, separators.
const GSM8K: &[(&str, &str, bool)] = &[
    ("18", "18", true),
    ("18", "81", false),
    ("1,000", "1000", true),
    ("$1,000", "1000", true),
    ("\\$1,000", "1000", true),
    ("1000.00", "1000", true),
    ("1000 dollars", "1000", true),
    ("$18", "18", true),
    ("18 apples", "18", true),
    ("18 apples.", "18", true),
    ("-5", "-5", true),
    ("−5", "-5", true),
    ("+5", "5", true),
    ("5", "-5", false),
    ("3.50", "3.5", true),
    ("3.5", "7/2", true),
    ("3.05", "3.5", false),
    ("12.0", "12", true),
    ("12.01", "12", false),
    ("007", "7", true),
    ("1,234,567", "1234567", true),
    ("1,234", "1.234", false),
    ("1,000 dollars", "1000", true),
    ("$1,234,567.50 total", "1234567.5", true),
    ("10 hours", "10", true),
    ("10 km/h", "10", true),
    ("5 m^2", "5", true),
    ("50%", "50", true),
    ("50\\%", "50", true),
    ("50 %", "50", true),
    ("50%", "0.5", true),
    ("50%", "5", false),
    ("x = 5", "5", true),
    ("n=42", "42", true),
    ("5 dollars and 50 cents", "5.5", false),
    ("€20", "20", true),
    ("£7.50", "7.5", true),
    ("0", "0", true),
    ("0.0", "0", true),
    ("-0", "0", true),
    ("100", "1000", false),
    ("118,000", "118000", true),
    ("118 000", "118000", false),
    ("9500", "9,500", true),
    ("$9,500.00", "9500", true),
    ("4000 pounds", "4000", true),
    ("2 weeks", "14", false),
    ("3430", "3430", true),
    ("43200 seconds", "43200", true),
    ("14400", "14400.0", true),
    ("20.", "20", true),
    ("**20**", "20", true),
    // Number words in the final answer read as numbers.
    ("twenty", "20", true),
    ("1.5 hours", "1.5", true),
    ("1.5 hours", "90", false),
    ("3 1/2 cups", "3.5", true),
    ("2 1/2", "2.5", true),
    ("2 1/2", "5/2", true),
    ("2 1/2", "3", false),
];

/// MATH style: LaTeX fractions, radicals, intervals, tuples, sets, text answers.
const MATH: &[(&str, &str, bool)] = &[
    ("\\frac{1}{2}", "0.5", true),
    ("\\frac{1}{2}", "1/2", true),
    ("\\dfrac{3}{4}", "\\frac34", true),
    ("\\tfrac{3}{4}", "0.75", true),
    ("\\frac{3}{4}", "0.7", false),
    ("-\\frac{1}{2}", "-0.5", true),
    ("\\frac{-1}{2}", "-1/2", true),
    ("-\\frac{1}{2}", "\\frac{1}{2}", false),
    ("2\\frac{1}{3}", "7/3", true),
    ("2 \\frac{1}{3}", "\\frac{7}{3}", true),
    ("\\frac{2}{4}", "\\frac{1}{2}", true),
    ("\\frac{1}{3}", "0.333", false),
    ("\\frac{10}{4}", "2.5", true),
    ("\\frac{1}{0}", "1", false),
    ("1/3", "2/6", true),
    ("0.1", "1/10", true),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", true),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", true),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", false),
    ("6\\sqrt{2}", "6\\sqrt2", true),
    ("6\\sqrt{2}", "6\\sqrt3", false),
    ("$\\frac{1}{2}$", "0.5", true),
    ("\\(\\frac{1}{2}\\)", "0.5", true),
    ("\\[ 7 \\]", "7", true),
    ("$$7$$", "7", true),
    ("\\text{(B)}", "B", true),
    ("(B)", "B", true),
    ("\\textbf{(C)}", "(C)", true),
    ("(B)", "(C)", false),
    ("\\text{yes}", "Yes", true),
    ("\\text{no}", "yes", false),
    ("10\\text{ cm}", "10", true),
    ("10 \\mbox{cm}", "10", true),
    ("90^\\circ", "90", true),
    ("90^{\\circ}", "90", true),
    ("90°", "90", true),
    ("45^\\circ", "90", false),
    ("\\pi", "\\pi", true),
    ("2\\pi", "\\pi", false),
    ("x^2+1", "x^2 + 1", true),
    ("x^2+1", "x^2-1", false),
    ("\\left( 1, 2 \\right)", "(1,2)", true),
    ("(1, 2)", "(1,2)", true),
    ("(1, 2)", "(2, 1)", false),
    ("(3, -1)", "(3,-1)", true),
    ("(3, -1)", "(3, 1)", false),
    ("(\\frac{1}{2}, 3)", "(0.5, 3)", true),
    ("(1, 2, 3)", "(1, 2)", false),
    ("[1, 2)", "[1,2)", true),
    ("[1, 2)", "(1, 2)", false),
    ("[1, 2]", "[1, 2)", false),
    ("\\left[ -2, 5 \\right)", "[-2,5)", true),
    ("(-\\infty, 3]", "(-inf, 3]", true),
    ("(0, \\infty)", "(0,∞)", true),
    ("(-\\infty, \\infty)", "(-\\infty, 0)", false),
    ("\\{1, 2, 3\\}", "\\{3,2,1\\}", true),
    ("\\{1, 2, 3\\}", "\\{1, 2\\}", false),
    ("1, 2", "2, 1", true),
    ("1, 2", "1, 3", false),
    ("-1, \\frac{1}{2}", "0.5, -1", true),
    ("x = 3", "3", true),
    ("y = -\\frac{2}{3}", "-2/3", true),
    ("k \\approx 1.5", "3/2", true),
    ("1.5e3", "1500", true),
    ("1.5E3", "1500", true),
    ("1.5 \\times 10^{3}", "1500", true),
    ("1.5 \\times 10^3", "1500", true),
    ("2.5 \\cdot 10^{-2}", "0.025", true),
    ("1e-3", "0.001", true),
    ("3 \\times 10^{8}", "300000000", true),
    ("3 \\times 10^{8}", "30000000", false),
    ("1e40", "1e40", true),
    ("1e40", "1.00001e40", false),
    // Beyond i128 numbers are floats: equal within the default relative tolerance 1e-6.
    ("1e40", "1.0000001e40", true),
    ("1e400", "1", false),
    (
        "100000000000000000000001",
        "100000000000000000000000",
        false,
    ),
    ("100000000000000000000000", "1e23", true),
    (
        "12345678901234567890123456789012345678901",
        "12345678901234567890123456789012345678901",
        true,
    ),
    // Both sides are exact rationals, so a rounded decimal is not 22/7.
    ("\\frac{22}{7}", "3.142857142857143", false),
    ("\\frac{22}{7}", "3.14", false),
    ("\\sqrt{2}", "1.41421356", false),
    ("\\left\\{ 1, 2 \\right\\}", "\\{2, 1\\}", true),
    ("\\displaystyle \\frac{1}{4}", "0.25", true),
    ("1\\,000", "1000", true),
    ("1{,}000", "1000", true),
    ("\\!5", "5", true),
    ("", "5", false),
    ("5", "five", true),
    ("5", "six", false),
];

/// SVAMP style: float references, short prose answers.
const SVAMP: &[(&str, &str, bool)] = &[
    ("27", "27.0", true),
    ("27.0", "27", true),
    ("27 apples", "27.0", true),
    ("28", "27.0", false),
    ("4", "4.0", true),
    ("0.5", "0.5", true),
    ("1/2", "0.5", true),
    ("3", "3.0", true),
    ("6 marbles", "6.0", true),
    ("7 more", "7.0", true),
    ("-3", "3.0", false),
    ("15.75", "15.75", true),
    ("15.7", "15.75", false),
    ("12 bags.", "12.0", true),
    ("2.0", "2", true),
    ("100 pages", "100.0", true),
    ("99", "100.0", false),
    ("35 cookies", "35.0", true),
    ("8.25", "33/4", true),
    ("8.5", "33/4", false),
];

fn check(table: &[(&str, &str, bool)], style: &str) {
    let m = MathReward::default();
    let mut failures = Vec::new();
    for &(a, r, want) in table {
        if m.answers_match(a, r) != want {
            failures.push(format!("{a:?} vs {r:?}: expected {want}"));
        }
        // Equivalence is symmetric.
        if m.answers_match(r, a) != want {
            failures.push(format!("{r:?} vs {a:?} (swapped): expected {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{style}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn at_least_150_cases_with_positives_and_negatives() {
    let all: Vec<_> = GSM8K.iter().chain(MATH).chain(SVAMP).collect();
    assert!(all.len() >= 150, "{} cases", all.len());
    let negatives = all.iter().filter(|c| !c.2).count();
    assert!(negatives >= 40, "{negatives} negative cases");
}

#[test]
fn gsm8k_style_equivalence() {
    check(GSM8K, "GSM8K");
}

#[test]
fn math_style_equivalence() {
    check(MATH, "MATH");
}

#[test]
fn svamp_style_equivalence() {
    check(SVAMP, "SVAMP");
}

/// (completion, reference, score, extracted, matched_by)
type ExtractionCase = (
    &'static str,
    &'static str,
    f64,
    Option<&'static str>,
    Option<&'static str>,
);

const EXTRACTION: &[ExtractionCase] = &[
    (
        "so $\\boxed{\\frac{1}{\\sqrt{2}}}$",
        "\\frac{1}{\\sqrt{2}}",
        1.0,
        Some("\\frac{1}{\\sqrt{2}}"),
        Some("boxed"),
    ),
    (
        "first \\boxed{3}, then \\boxed{4}",
        "4",
        1.0,
        Some("4"),
        Some("boxed"),
    ),
    (
        "\\boxed{3} and a broken \\boxed{5",
        "3",
        1.0,
        Some("3"),
        Some("boxed"),
    ),
    ("\\fbox{7}", "7", 1.0, Some("7"), Some("boxed")),
    ("\\boxed 7 done", "7", 1.0, Some("7"), Some("boxed")),
    ("Total: 70.\n#### 72", "72", 1.0, Some("72"), Some("hashes")),
    ("#### 72\n", "72", 1.0, Some("72"), Some("hashes")),
    (
        "The answer is \\boxed{5}. #### 6",
        "5",
        1.0,
        Some("5"),
        Some("boxed"),
    ),
    (
        "The answer is 42.",
        "42",
        1.0,
        Some("42"),
        Some("answer_phrase"),
    ),
    (
        "The answer is 3.5.",
        "3.5",
        1.0,
        Some("3.5"),
        Some("answer_phrase"),
    ),
    (
        "the answer is: 12 apples. Then 13 pears",
        "12",
        1.0,
        Some("12 apples"),
        Some("answer_phrase"),
    ),
    (
        "Final Answer: $1,250",
        "1250",
        1.0,
        Some("$1,250"),
        Some("answer_phrase"),
    ),
    ("**Answer:** 9", "9", 1.0, Some("9"), Some("answer_phrase")),
    (
        "She has 5 left, then buys 12, so 17 remain.",
        "17",
        1.0,
        Some("17"),
        Some("last_number"),
    ),
    (
        "That is 1,500 dollars.",
        "1500",
        1.0,
        Some("1,500"),
        Some("last_number"),
    ),
    (
        "It costs 2.50 now.",
        "2.5",
        1.0,
        Some("2.50"),
        Some("last_number"),
    ),
    (
        "so about 25% of them",
        "25",
        1.0,
        Some("25%"),
        Some("last_number"),
    ),
    (
        "We get 3/4 of the pie.",
        "0.75",
        1.0,
        Some("3/4"),
        Some("last_number"),
    ),
    (
        "the value drops to -4.",
        "-4",
        1.0,
        Some("-4"),
        Some("last_number"),
    ),
    (
        "She has 5 left, then 12, so 17 remain.",
        "18",
        0.0,
        Some("17"),
        Some("last_number"),
    ),
    ("I don't know.", "18", 0.0, None, None),
];

#[test]
fn extraction_rules_and_priority() {
    let m = MathReward::default();
    for &(c, r, want, extracted, by) in EXTRACTION {
        let s = m
            .score(&Sample::new(c, r))
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert_eq!(s.value, want, "{c:?} vs {r:?}");
        assert_eq!(s.extracted.as_deref(), extracted, "{c:?}");
        assert_eq!(s.matched_by.as_deref(), by, "{c:?}");
    }
}

#[test]
fn reference_may_be_a_worked_solution() {
    let m = MathReward::default();
    let reference = "6 * 2 = <<6*2=12>>12 inches.\n#### 12\n";
    assert_eq!(
        m.score(&Sample::new("\\boxed{12}", reference))
            .map(|s| s.value),
        Ok(1.0)
    );
    assert_eq!(
        m.score(&Sample::new("\\boxed{13}", reference))
            .map(|s| s.value),
        Ok(0.0)
    );
    let boxed_ref = "so the area is $\\boxed{\\frac{9}{2}}$";
    assert_eq!(
        m.score(&Sample::new("The answer is 4.5", boxed_ref))
            .map(|s| s.value),
        Ok(1.0)
    );
}

#[test]
fn last_number_fallback_can_be_disabled() {
    let strict = MathReward::new(MathConfig {
        last_number_fallback: false,
        ..MathConfig::default()
    })
    .expect("valid config");
    let s = strict
        .score(&Sample::new("so 17 remain.", "17"))
        .expect("scored");
    assert_eq!((s.value, s.extracted), (0.0, None));
    let s = strict.score(&Sample::new("#### 17", "17")).expect("scored");
    assert_eq!(s.value, 1.0);
}

#[test]
fn relative_tolerance_applies_to_inexact_numbers_only() {
    let loose = MathReward::new(MathConfig {
        rel_tol: 1e-2,
        ..MathConfig::default()
    })
    .expect("valid config");
    // Exact rationals are compared exactly whatever the tolerance.
    assert!(!loose.answers_match("3.14", "3.15"));
    // Numbers beyond i128 fall back to floats and use the tolerance.
    assert!(loose.answers_match("1e40", "1.001e40"));
    assert!(!MathReward::default().answers_match("1e40", "1.001e40"));
}

#[test]
fn bad_references_and_configs_are_errors() {
    let m = MathReward::default();
    assert!(matches!(
        m.score(&Sample::new("5", "   ")),
        Err(RewardError::InvalidSample(_))
    ));
    let long = "a worked solution without a final answer line. ".repeat(50);
    let e = m.score(&Sample::new("5", long)).expect_err("too long");
    assert!(e.to_string().contains("####"), "{e}");
    for bad in [
        MathConfig {
            rel_tol: f64::NAN,
            ..MathConfig::default()
        },
        MathConfig {
            rel_tol: 1.5,
            ..MathConfig::default()
        },
        MathConfig {
            max_answer_bytes: 0,
            ..MathConfig::default()
        },
    ] {
        assert!(MathReward::new(bad).is_err());
    }
}

#[test]
fn multi_megabyte_completions_only_scan_the_tail() {
    let m = MathReward::default();
    // 4 MiB of numbers, answer at the end: found.
    let mut c = "1 ".repeat(2 << 20);
    c.push_str("so \\boxed{7}");
    assert_eq!(m.score(&Sample::new(c, "7")).map(|s| s.value), Ok(1.0));
    // The answer only at the very start of 4 MiB of prose: outside the scanned tail.
    let c = format!("The answer is 7.{}", " blah".repeat(800_000));
    let s = m.score(&Sample::new(c, "7")).expect("scored");
    assert_eq!((s.value, s.extracted), (0.0, None));
    // Unclosed braces everywhere: brace matching is capped, nothing extracted from them.
    let c = format!("\\boxed{{{}", "{".repeat(4 << 20));
    let s = m.score(&Sample::new(c, "7")).expect("scored");
    assert_eq!(s.value, 0.0);
    // An over-long extracted answer is rejected rather than normalised.
    let c = format!("#### {}", "9".repeat(10_000));
    assert_eq!(m.score(&Sample::new(c, "9")).map(|s| s.value), Ok(0.0));
    // Multi-byte characters at the tail boundary do not split a character.
    let c = format!("{}#### 5", "é".repeat(3 << 20));
    assert_eq!(m.score(&Sample::new(c, "5")).map(|s| s.value), Ok(1.0));
}
