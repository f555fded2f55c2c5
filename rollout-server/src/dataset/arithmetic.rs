//! The built-in generator of arithmetic word problems (see [`super::DatasetSpec::Arithmetic`]).
//!
//! Every problem is drawn from its own RNG seeded from `(seed, level, index)`, so the first `k`
//! problems of a spec do not depend on `count`. Each template constructs its numbers so that
//! no subtraction goes below zero and every division is exact; the arithmetic it describes is
//! also kept as an expression string that the tests evaluate independently.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::cursor::mix;
use super::Problem;

const NAMES: &[&str] = &[
    "Tom", "Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Lily", "Omar", "Priya", "Jack", "Emma",
    "Noah", "Sofia", "Ravi", "Chloe", "Diego", "Hana", "Ivan", "Grace", "Kofi", "Lucas", "Nina",
    "Yuki",
];

const OBJECTS: &[&str] = &[
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "books",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "beads",
    "crayons",
    "buttons",
    "oranges",
    "toy cars",
    "feathers",
    "candles",
    "postcards",
    "blocks",
    "ribbons",
];

/// (singular, plural)
const CONTAINERS: &[(&str, &str)] = &[
    ("bag", "bags"),
    ("box", "boxes"),
    ("pack", "packs"),
    ("jar", "jars"),
    ("basket", "baskets"),
    ("crate", "crates"),
];

const GAIN_VERBS: &[&str] = &["buys", "finds", "is given", "wins", "collects", "picks up"];

const TIMES: &[(&str, &str)] = &[
    ("in the morning", "in the afternoon"),
    ("on Monday", "on Tuesday"),
    ("before lunch", "after lunch"),
    ("last week", "this week"),
];

const LOSS_VERBS: &[&str] = &["lost", "sold", "gave away", "donated"];

const ITEMS: &[&str] = &[
    "tickets", "shirts", "books", "chairs", "lamps", "plants", "games", "mugs",
];

const GROUPS: &[&str] = &["friends", "cousins", "classmates", "neighbours"];

/// Generates `count` problems of `level` (already validated to be 1..=5).
pub(crate) fn generate(level: u8, count: usize, seed: u64) -> Vec<Problem> {
    (0..count)
        .map(|i| {
            let d = draft(level, seed, i);
            let mut solution = d.steps.join("\n");
            solution.push_str(&format!("\n#### {}", d.answer));
            Problem {
                id: format!("arithmetic-{level}-{seed}-{i}"),
                question: d.question,
                answer: d.answer.to_string(),
                solution: Some(solution),
            }
        })
        .collect()
}

/// One generated problem before it becomes a [`Problem`].
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub question: String,
    /// The worked steps, one sentence each.
    pub steps: Vec<String>,
    /// The arithmetic the question describes, e.g. `12 + 3 * 8` (checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub expression: String,
    pub answer: u64,
    /// Which of the level's templates made it (checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub template: usize,
}

/// Problem `index` of `(level, seed)`.
pub(crate) fn draft(level: u8, seed: u64, index: usize) -> Draft {
    let g = Gen::new(mix(mix(seed, u64::from(level)), index as u64));
    match level {
        0 | 1 => g.level1(),
        2 => g.level2(),
        3 => g.level3(),
        4 => g.level4(),
        _ => g.level5(),
    }
}

/// The random choices of one problem.
struct Gen {
    rng: StdRng,
    name: &'static str,
    other: &'static str,
    obj: &'static str,
    cont: (&'static str, &'static str),
    steps: Vec<String>,
    template: usize,
}

impl Gen {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let name = pick(&mut rng, NAMES);
        let mut other = pick(&mut rng, NAMES);
        while other == name {
            other = pick(&mut rng, NAMES);
        }
        let obj = pick(&mut rng, OBJECTS);
        let cont = *CONTAINERS.choose(&mut rng).unwrap_or(&("box", "boxes"));
        Self {
            rng,
            name,
            other,
            obj,
            cont,
            steps: Vec::new(),
            template: 0,
        }
    }

    /// A uniform integer in `lo..=hi` (`lo` when the range is empty).
    fn n(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    fn template(&mut self, count: usize) -> usize {
        self.template = self.rng.random_range(0..count);
        self.template
    }

    fn word(&mut self, list: &'static [&'static str]) -> &'static str {
        pick(&mut self.rng, list)
    }

    fn step(&mut self, what: &str, a: u64, op: char, b: u64) -> u64 {
        let c = match op {
            '+' => a + b,
            '-' => a.saturating_sub(b),
            '*' => a * b,
            _ => a.checked_div(b).unwrap_or(0),
        };
        let shown = if op == '*' {
            '×'
        } else if op == '/' {
            '÷'
        } else {
            op
        };
        self.steps.push(format!("{what}: {a} {shown} {b} = {c}."));
        c
    }

    fn done(self, question: String, expression: String, answer: u64) -> Draft {
        Draft {
            question,
            steps: self.steps,
            expression,
            answer,
            template: self.template,
        }
    }

    /// One addition of two small numbers.
    fn level1(mut self) -> Draft {
        let (n, m, o) = (self.name, self.other, self.obj);
        let a = self.n(2, 20);
        let b = self.n(2, 20);
        let q = match self.template(5) {
            0 => {
                let verb = self.word(GAIN_VERBS);
                format!("{n} has {a} {o} and {verb} {b} more. How many {o} does {n} have now?")
            }
            1 => {
                let (t1, t2) = *TIMES.choose(&mut self.rng).unwrap_or(&TIMES[0]);
                format!(
                    "{n} collected {a} {o} {t1} and {b} {o} {t2}. How many {o} did {n} collect in all?"
                )
            }
            2 => {
                let c = self.cont.0;
                format!(
                    "There are {a} {o} in a {c} and {b} {o} on the table. How many {o} are there altogether?"
                )
            }
            3 => {
                format!("{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?")
            }
            _ => format!(
                "{n} had {a} {o}. Then {m} gave {n} {b} more {o}. How many {o} does {n} have now?"
            ),
        };
        let c = self.step(&format!("Total {o}"), a, '+', b);
        self.done(q, format!("{a} + {b}"), c)
    }

    /// One subtraction, multiplication or exact division.
    fn level2(mut self) -> Draft {
        let (n, m, o) = (self.name, self.other, self.obj);
        let (cs, cp) = self.cont;
        let t = self.template(8);
        if t < 3 {
            let a = self.n(10, 100);
            let b = self.n(2, a - 1);
            let q = match t {
                0 => format!(
                    "{n} had {a} {o} and gave {b} of them to {m}. How many {o} does {n} have left?"
                ),
                1 => format!(
                    "A {cs} holds {a} {o}. {n} takes out {b}. How many {o} are still in the {cs}?"
                ),
                _ => format!(
                    "{n} has {a} {o} and {m} has {b}. How many more {o} does {n} have than {m}?"
                ),
            };
            let c = self.step("Difference", a, '-', b);
            return self.done(q, format!("{a} - {b}"), c);
        }
        if t < 6 {
            let a = self.n(2, 12);
            let b = self.n(2, 12);
            let q = match t {
                3 => format!(
                    "{n} buys {a} {cp} of {o}. Each {cs} has {b} {o}. How many {o} does {n} buy?"
                ),
                4 => format!(
                    "There are {a} rows of {o} with {b} {o} in each row. How many {o} are there in total?"
                ),
                _ => format!(
                    "{n} collects {b} {o} every day for {a} days. How many {o} does {n} collect?"
                ),
            };
            let c = self.step(&format!("Total {o}"), a, '*', b);
            return self.done(q, format!("{a} * {b}"), c);
        }
        let b = self.n(2, 12);
        let per = self.n(2, 12);
        let a = b * per;
        let q = if t == 6 {
            let group = self.word(GROUPS);
            format!(
                "{n} shares {a} {o} equally among {b} {group}. How many {o} does each of them get?"
            )
        } else {
            format!("{n} packs {a} {o} into {cp} of {b}. How many {cp} does {n} fill?")
        };
        let c = self.step("Each share", a, '/', b);
        self.done(q, format!("{a} / {b}"), c)
    }

    /// Two steps mixing the four operations.
    fn level3(mut self) -> Draft {
        let (n, m, o) = (self.name, self.other, self.obj);
        let (cs, cp) = self.cont;
        match self.template(6) {
            0 => {
                let (a, b, c) = (self.n(2, 50), self.n(2, 9), self.n(2, 12));
                let q = format!(
                    "{n} has {a} {o} and buys {b} {cp} with {c} {o} in each. How many {o} does {n} have now?"
                );
                let bought = self.step("Bought", b, '*', c);
                let r = self.step("Now", a, '+', bought);
                self.done(q, format!("{a} + {b} * {c}"), r)
            }
            1 => {
                let a = self.n(10, 50);
                let b = self.n(2, a - 1);
                let c = self.n(2, 30);
                let verb = self.word(GAIN_VERBS);
                let q = format!(
                    "{n} had {a} {o} and gave {b} to {m}. Then {n} {verb} {c} more. How many {o} does {n} have now?"
                );
                let left = self.step("After giving", a, '-', b);
                let r = self.step("Now", left, '+', c);
                self.done(q, format!("{a} - {b} + {c}"), r)
            }
            2 => {
                let (a, b) = (self.n(2, 9), self.n(2, 12));
                let c = self.n(2, a * b - 1);
                let q = format!(
                    "{n} buys {a} {cp} of {o} with {b} in each {cs} and gives {c} of them away. How many {o} does {n} keep?"
                );
                let all = self.step("Bought", a, '*', b);
                let r = self.step("Kept", all, '-', c);
                self.done(q, format!("{a} * {b} - {c}"), r)
            }
            3 => {
                let c = self.n(2, 9);
                let total = c * self.n(2, 10);
                let a = self.n(2, total - 2);
                let b = total - a;
                let group = self.word(GROUPS);
                let q = format!(
                    "{n} has {a} {o} and {m} has {b}. They put them together and share them equally among {c} {group}. How many {o} does each of them get?"
                );
                let all = self.step("Together", a, '+', b);
                let r = self.step("Each", all, '/', c);
                self.done(q, format!("({a} + {b}) / {c}"), r)
            }
            4 => {
                let (a, b) = (self.n(5, 20), self.n(2, 8));
                let c = self.n(1, a * b - 1);
                let item = self.word(ITEMS);
                let q = format!(
                    "{n} earns ${a} an hour and works for {b} hours. Then {n} spends ${c} on {item}. How many dollars does {n} have left?"
                );
                let earned = self.step("Earned", a, '*', b);
                let r = self.step("Left", earned, '-', c);
                self.done(q, format!("{a} * {b} - {c}"), r)
            }
            _ => {
                let a = self.n(5, 30);
                let b = self.n(2, a - 1);
                let c = self.n(2, 9);
                let q = format!(
                    "Each {cs} holds {a} {o}. {n} takes {b} {o} out of every {cs}. How many {o} are left in {c} {cp}?"
                );
                let per = self.step(&format!("Left in each {cs}"), a, '-', b);
                let r = self.step("Left in all", per, '*', c);
                self.done(q, format!("({a} - {b}) * {c}"), r)
            }
        }
    }

    /// Three steps, numbers up to about 1,000.
    fn level4(mut self) -> Draft {
        let (n, o) = (self.name, self.obj);
        let (cs, cp) = self.cont;
        match self.template(5) {
            0 => {
                let a = self.n(100, 999);
                let b = self.n(10, a - 1);
                let (c, d) = (self.n(2, 12), self.n(10, 50));
                let verb = self.word(LOSS_VERBS);
                let q = format!(
                    "A shop has {a} {o}. It {verb} {b} of them and then receives {c} {cp} with {d} {o} in each {cs}. How many {o} does the shop have now?"
                );
                let left = self.step("After the first change", a, '-', b);
                let got = self.step("Received", c, '*', d);
                let r = self.step("Now", left, '+', got);
                self.done(q, format!("{a} - {b} + {c} * {d}"), r)
            }
            1 => {
                let (a, b, d) = (self.n(5, 50), self.n(4, 20), self.n(2, 6));
                let per = self.n(1, (a * b - 1) / d);
                let c = a * b - d * per;
                let item = self.word(ITEMS);
                let group = self.word(GROUPS);
                let q = format!(
                    "{n} saves ${a} each week for {b} weeks, spends ${c} on {item}, and shares the rest equally among {d} {group}. How many dollars does each of them get?"
                );
                let saved = self.step("Saved", a, '*', b);
                let rest = self.step("Left after shopping", saved, '-', c);
                let r = self.step("Each share", rest, '/', d);
                self.done(q, format!("({a} * {b} - {c}) / {d}"), r)
            }
            2 => {
                let (a, b) = (self.n(5, 30), self.n(5, 30));
                let c = self.n(2, a * b - 1);
                let d = self.n(2, 100);
                let q = format!(
                    "An orchard has {a} rows of {b} trees. {c} trees are cut down and {d} new trees are planted. How many trees are in the orchard now?"
                );
                let all = self.step("Trees at first", a, '*', b);
                let left = self.step("After cutting", all, '-', c);
                let r = self.step("Now", left, '+', d);
                self.done(q, format!("{a} * {b} - {c} + {d}"), r)
            }
            3 => {
                let (a, b, c) = (self.n(5, 40), self.n(2, 10), self.n(2, 50));
                let e = a * b + c + self.n(1, 500);
                let q = format!(
                    "A book has {e} pages. {n} reads {a} pages a day for {b} days and then {c} more pages. How many pages does {n} still have to read?"
                );
                let daily = self.step("Pages in the first days", a, '*', b);
                let read = self.step("Pages read", daily, '+', c);
                let r = self.step("Pages left", e, '-', read);
                self.done(q, format!("{e} - ({a} * {b} + {c})"), r)
            }
            _ => {
                let (a, b, c) = (self.n(5, 30), self.n(5, 30), self.n(2, 9));
                let x = (a + b) * c + self.n(0, 300);
                let q = format!(
                    "A class has {a} boys and {b} girls. The teacher has {x} {o} and gives {c} to each student. How many {o} does the teacher have left?"
                );
                let students = self.step("Students", a, '+', b);
                let given = self.step("Given out", students, '*', c);
                let r = self.step("Left", x, '-', given);
                self.done(q, format!("{x} - ({a} + {b}) * {c}"), r)
            }
        }
    }

    /// Four steps, numbers up to about 10,000, written with thousands separators.
    fn level5(mut self) -> Draft {
        let (n, o) = (self.name, self.obj);
        let (cs, cp) = self.cont;
        match self.template(4) {
            0 => {
                let (c, d, e, b) = (
                    self.n(10, 50),
                    self.n(10, 50),
                    self.n(10, 500),
                    self.n(5, 20),
                );
                let least = (c * d + e).div_ceil(b);
                let a = self.n(least.max(100), least.max(100) + 600);
                let q = format!(
                    "A factory makes {} {o} a day for {b} days. It ships {c} {cp} with {d} {o} in each {cs} and sells {} more on their own. How many {o} are left at the factory?",
                    sep(a),
                    sep(e)
                );
                let made = self.step("Made", a, '*', b);
                let shipped = self.step("Shipped", c, '*', d);
                let left = self.step("After shipping", made, '-', shipped);
                let r = self.step("Left", left, '-', e);
                self.done(q, format!("{a} * {b} - {c} * {d} - {e}"), r)
            }
            1 => {
                let e = self.n(2, 12);
                let (a, c) = (self.n(10, 60), self.n(10, 60));
                let (b, d) = (e * self.n(2, 20), e * self.n(2, 20));
                let q = format!(
                    "A school orders {a} {cp} of {b} {o} and {c} {cp} of {d} {o}. The {o} are shared equally among {e} classes. How many {o} does each class get?"
                );
                let first = self.step("First order", a, '*', b);
                let second = self.step("Second order", c, '*', d);
                let all = self.step("All", first, '+', second);
                let r = self.step("Each class", all, '/', e);
                self.done(q, format!("({a} * {b} + {c} * {d}) / {e}"), r)
            }
            2 => {
                let (b, c, d, e) = (
                    self.n(2, 20),
                    self.n(10, 200),
                    self.n(2, 20),
                    self.n(5, 100),
                );
                let a = b * c + d * e + self.n(0, 3000);
                let f = self.n(100, 2000);
                let mut item1 = self.word(ITEMS);
                let mut item2 = self.word(ITEMS);
                while item2 == item1 {
                    item2 = self.word(ITEMS);
                }
                if item1 > item2 {
                    std::mem::swap(&mut item1, &mut item2);
                }
                let q = format!(
                    "{n} has ${}. {n} buys {b} {item1} at ${c} each and {d} {item2} at ${e} each, and then earns ${}. How many dollars does {n} have now?",
                    sep(a),
                    sep(f)
                );
                let spent1 = self.step(&format!("Cost of the {item1}"), b, '*', c);
                let spent2 = self.step(&format!("Cost of the {item2}"), d, '*', e);
                let after1 = self.step("After the first purchase", a, '-', spent1);
                let after2 = self.step("After the second purchase", after1, '-', spent2);
                let r = self.step("Now", after2, '+', f);
                self.done(q, format!("{a} - {b} * {c} - {d} * {e} + {f}"), r)
            }
            _ => {
                let d = *[6u64, 10, 12, 30].choose(&mut self.rng).unwrap_or(&12);
                let cartons = self.n(20, 300);
                let c = self.n(10, 200);
                let total = cartons * d + c;
                let a = self.n(total / 3, total - total / 3);
                let b = total - a;
                let e = self.n(2, 9);
                let q = format!(
                    "A farm collects {} eggs on Monday and {} eggs on Tuesday. {c} of the eggs break. The rest are packed in cartons of {d}, and each carton sells for ${e}. How many dollars does the farm earn?",
                    sep(a),
                    sep(b)
                );
                let all = self.step("Eggs collected", a, '+', b);
                let good = self.step("Unbroken eggs", all, '-', c);
                let k = self.step("Cartons", good, '/', d);
                let r = self.step("Earned", k, '*', e);
                self.done(q, format!("({a} + {b} - {c}) / {d} * {e}"), r)
            }
        }
    }
}

fn pick(rng: &mut StdRng, list: &'static [&'static str]) -> &'static str {
    list.choose(rng).copied().unwrap_or("")
}

/// `n` with thousands separators (`12345` -> `12,345`).
fn sep(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluates `+ - * / ( )` over integers left to right with the usual precedence; `None`
    /// when a division is inexact or by zero. Independent of the generator's own arithmetic.
    fn eval(expr: &str) -> Option<i128> {
        let toks: Vec<String> = {
            let mut v = Vec::new();
            let mut num = String::new();
            for ch in expr.chars() {
                if ch.is_ascii_digit() {
                    num.push(ch);
                    continue;
                }
                if !num.is_empty() {
                    v.push(std::mem::take(&mut num));
                }
                if !ch.is_whitespace() {
                    v.push(ch.to_string());
                }
            }
            if !num.is_empty() {
                v.push(num);
            }
            v
        };
        fn expr_(t: &[String], i: &mut usize) -> Option<i128> {
            let mut v = term(t, i)?;
            while let Some(op) = t.get(*i).filter(|s| *s == "+" || *s == "-") {
                let plus = op == "+";
                *i += 1;
                let r = term(t, i)?;
                v = if plus { v + r } else { v - r };
            }
            Some(v)
        }
        fn term(t: &[String], i: &mut usize) -> Option<i128> {
            let mut v = atom(t, i)?;
            while let Some(op) = t.get(*i).filter(|s| *s == "*" || *s == "/") {
                let mul = op == "*";
                *i += 1;
                let r = atom(t, i)?;
                if mul {
                    v *= r;
                } else {
                    if r == 0 || v % r != 0 {
                        return None;
                    }
                    v /= r;
                }
            }
            Some(v)
        }
        fn atom(t: &[String], i: &mut usize) -> Option<i128> {
            let tok = t.get(*i)?;
            *i += 1;
            if tok == "(" {
                let v = expr_(t, i)?;
                (t.get(*i)? == ")").then_some(())?;
                *i += 1;
                return Some(v);
            }
            tok.parse().ok()
        }
        let mut i = 0;
        let v = expr_(&toks, &mut i)?;
        (i == toks.len()).then_some(v)
    }

    fn numbers(text: &str) -> Vec<u64> {
        text.replace(',', "")
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    #[test]
    fn the_evaluator_itself() {
        assert_eq!(eval("2 + 3 * 4"), Some(14));
        assert_eq!(eval("(2 + 3) * 4"), Some(20));
        assert_eq!(eval("20 - 5 - 3"), Some(12));
        assert_eq!(eval("(10 + 2 - 0) / 6 * 5"), Some(10));
        assert_eq!(eval("7 / 2"), None);
    }

    #[test]
    fn answers_match_the_described_arithmetic_and_the_question_shows_every_operand() {
        for level in 1..=5u8 {
            for i in 0..500 {
                let d = draft(level, 11, i);
                let want = eval(&d.expression).unwrap_or_else(|| {
                    panic!("level {level} #{i}: inexact or malformed {}", d.expression)
                });
                assert!(want >= 0, "level {level}: {} is negative", d.expression);
                assert_eq!(
                    want,
                    i128::from(d.answer),
                    "level {level}: {}",
                    d.expression
                );
                let shown = numbers(&d.question);
                for x in numbers(&d.expression) {
                    assert!(
                        shown.contains(&x),
                        "level {level}: {x} of {} is not in {:?}",
                        d.expression,
                        d.question
                    );
                }
                // Every intermediate step stays non-negative and integral too.
                for step in &d.steps {
                    let lhs = step
                        .rsplit_once('=')
                        .map(|(l, _)| l.rsplit_once(':').map_or(l, |(_, e)| e))
                        .unwrap_or("")
                        .replace('×', "*")
                        .replace('÷', "/");
                    let rhs: i128 = numbers(step.rsplit_once('=').map_or("", |(_, r)| r))[0].into();
                    assert_eq!(eval(&lhs), Some(rhs), "level {level}: step {step:?}");
                }
            }
        }
    }

    #[test]
    fn levels_grow_in_steps_and_size() {
        let max_steps = |level| (0..200).map(|i| draft(level, 5, i).steps.len()).max();
        let max_answer = |level| (0..200).map(|i| draft(level, 5, i).answer).max();
        assert_eq!(max_steps(1), Some(1));
        assert_eq!(max_steps(2), Some(1));
        assert_eq!(max_steps(3), Some(2));
        assert_eq!(max_steps(4), Some(3));
        assert!(max_steps(5) >= Some(4));
        assert!(max_answer(1) <= Some(40));
        assert!(max_answer(5) > max_answer(3));
    }

    #[test]
    fn every_template_is_used() {
        for (level, templates) in [(1u8, 5), (2, 8), (3, 6), (4, 5), (5, 4)] {
            let used: std::collections::HashSet<usize> =
                (0..300).map(|i| draft(level, 2, i).template).collect();
            assert_eq!(used.len(), templates, "level {level}");
        }
    }

    #[test]
    fn separators() {
        assert_eq!(sep(7), "7");
        assert_eq!(sep(999), "999");
        assert_eq!(sep(1000), "1,000");
        assert_eq!(sep(1234567), "1,234,567");
    }
}
