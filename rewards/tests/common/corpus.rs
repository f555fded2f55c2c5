//! A deterministic scoring corpus: the GSM8K worked solutions plus generated completions in
//! the forms models write (boxed, "the answer is", units, thousands separators, wrong answers,
//! no answer). Shared by the tests and the `bench_math` example.

use rewards::Sample;

/// One GSM8K problem file as written: the question and its worked solution ending in `#### N`.
/// (The datasets load these for training; the scoring tests only need the texts.)
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Problem {
    pub question: String,
    pub answer: String,
}

impl Problem {
    /// The final answer (the text after `####`), if the solution has one.
    pub fn final_answer(&self) -> Option<&str> {
        let pos = self.answer.rfind("####")?;
        let a = self.answer[pos + 4..].trim();
        (!a.is_empty()).then_some(a)
    }
}

/// The GSM8K problems of the asset cache (`protocol::assets::gsm8k_dir`), in file-name order.
pub fn load_gsm8k() -> Result<Vec<Problem>, String> {
    let dir = protocol::assets::gsm8k_dir();
    let missing = || {
        protocol::assets::MissingAsset {
            asset: protocol::assets::Asset::Gsm8k,
            path: dir.clone(),
        }
        .to_string()
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|_| missing())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    if paths.is_empty() {
        return Err(missing());
    }
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

/// A tiny deterministic generator (64-bit LCG), so the corpus needs no RNG crate.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` with thousands separators (`12345` -> `12,345`).
pub fn with_commas(n: &str) -> String {
    let (sign, digits) = n.strip_prefix('-').map_or(("", n), |d| ("-", d));
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return n.to_string();
    }
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// The body of a worked solution without its `#### N` line.
pub fn reasoning(p: &Problem) -> &str {
    p.answer
        .rfind("####")
        .map_or(p.answer.as_str(), |i| &p.answer[..i])
        .trim_end()
}

/// A wrong answer near `a` (integers and decimals).
pub fn perturb(a: &str) -> String {
    if let Ok(n) = a.parse::<i64>() {
        return (n + 1).to_string();
    }
    if let Ok(x) = a.parse::<f64>() {
        return format!("{}", x + 1.0);
    }
    format!("{a}1")
}

/// Generated completions for one problem, each with whether it is correct.
pub fn completions(p: &Problem, rng: &mut Lcg) -> Vec<(String, bool)> {
    let a = p.final_answer().unwrap_or("0");
    let body = reasoning(p);
    let wrong = perturb(a);
    // Trailing zeros: `12` -> `12.00`, `3.5` -> `3.50`.
    let padded = if a.contains('.') {
        format!("{a}0")
    } else {
        format!("{a}.00")
    };
    let templates: [(String, bool); 11] = [
        (p.answer.clone(), true),
        (format!("{body}\nThe answer is {a}."), true),
        (
            format!("{body}\nSo the final answer is $\\boxed{{{a}}}$."),
            true,
        ),
        (
            format!(
                "{body}\nTherefore, the total is {} dollars.",
                with_commas(a)
            ),
            true,
        ),
        (format!("{body}\n**Answer:** ${}", with_commas(a)), true),
        (format!("{body}\nThe answer is \\boxed{{{wrong}}}."), false),
        (format!("{body}\n#### {wrong}"), false),
        (
            format!("{body}\nI think it is {a}, no wait, {wrong}."),
            false,
        ),
        (
            format!("Let me think step by step.\n{body}\nThe answer is: {padded}"),
            true,
        ),
        ("I cannot solve this problem.".to_string(), false),
        (
            format!("{body}\nThe answer is {} dollars.", with_commas(a)),
            true,
        ),
    ];
    let k = 4 + rng.below(3) as usize;
    let start = rng.below(templates.len() as u64) as usize;
    (0..k)
        .map(|i| templates[(start + i) % templates.len()].clone())
        .collect()
}

/// Generated arithmetic problems (a fraction or decimal answer) with their completions.
pub fn arithmetic(n: usize, rng: &mut Lcg) -> Vec<(Sample, bool)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (a, b) = (1 + rng.below(40) as i64, 2 + rng.below(12) as i64);
        let (completion, reference, ok) = match rng.below(5) {
            0 => (
                format!("We divide {a} by {b}: $\\frac{{{a}}}{{{b}}}$, so the answer is $\\boxed{{\\frac{{{a}}}{{{b}}}}}$."),
                format!("{a}/{b}"),
                true,
            ),
            1 => (
                format!("{a} times {b} is {}. The answer is {}.", a * b, a * b),
                format!("{}", a * b),
                true,
            ),
            2 => (
                format!("Half of {a} is {}. #### {}", a as f64 / 2.0, a as f64 / 2.0),
                format!("{}", a as f64 / 2.0),
                true,
            ),
            3 => (
                format!("{a} plus {b} gives {}.", a + b + 1),
                format!("{}", a + b),
                false,
            ),
            _ => (
                format!("The ratio is \\boxed{{{}\\%}}", a * 10),
                format!("{}", a * 10),
                true,
            ),
        };
        let mut s = Sample::new(completion, reference);
        s.prompt = format!("Compute with {a} and {b}.");
        out.push((s, ok));
    }
    out
}

/// The corpus: every GSM8K solution (scored against its own final answer), generated
/// completions for each problem, and `extra` arithmetic samples. Each sample carries whether
/// it is correct.
pub fn corpus(problems: &[Problem], extra: usize, seed: u64) -> Vec<(Sample, bool)> {
    let mut rng = Lcg::new(seed);
    let mut out = Vec::new();
    for p in problems {
        let reference = p.final_answer().unwrap_or("0").to_string();
        for (c, ok) in completions(p, &mut rng) {
            let mut s = Sample::new(c, reference.clone());
            s.prompt = p.question.clone();
            out.push((s, ok));
        }
    }
    out.extend(arithmetic(extra, &mut rng));
    out
}
