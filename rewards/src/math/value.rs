//! Normalising an answer string into a comparable value.

use std::sync::LazyLock;

use regex::Regex;

use super::extract::matching_brace;
use super::number::Num;
use super::words;

/// A parsed answer.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// A number; `percent` when written with `%` (then it also equals `value / 100`).
    Number { value: Num, percent: bool },
    /// `±∞` (`true` = negative).
    Infinity(bool),
    /// A bracketed tuple or interval: `(1, 2]` keeps its brackets.
    Tuple {
        open: char,
        close: char,
        items: Vec<Value>,
    },
    /// An unbracketed list or a set `\{a, b\}`: compared as a multiset.
    List(Vec<Value>),
    /// Anything else, compared as normalised text.
    Text(String),
}

/// Largest number of items compared in a tuple or list (bounds the quadratic multiset match).
const MAX_ITEMS: usize = 64;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| unreachable!("static regex {pattern}: {e}"))
}

static SIZING: LazyLock<Regex> = LazyLock::new(|| re(r"\\(?:left|right|bigg?|Bigg?)([^a-zA-Z]|$)"));
static SPACING: LazyLock<Regex> = LazyLock::new(|| re(r"\\[!,:;> ]|\\q?quad\b|~"));
static DEGREES: LazyLock<Regex> = LazyLock::new(|| re(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b"));
static ASSIGN: LazyLock<Regex> =
    LazyLock::new(|| re(r"^[a-zA-Z][a-zA-Z0-9_]*\s*(?:=|\\approx)\s*"));
static FRAC_SHORT: LazyLock<Regex> = LazyLock::new(|| re(r"\\frac\s*(\d)\s*(\d)"));
static SQRT_SHORT: LazyLock<Regex> = LazyLock::new(|| re(r"\\sqrt\s*(\d)"));
/// Sign, number, optional exponent or `\times 10^{k}`, optional percent.
static SCALAR: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"^([-+])?\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?(?:[eE]([-+]?\d+)|\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?)?(\s*%)?",
    )
});
static REPEATING: LazyLock<Regex> = LazyLock::new(|| re(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}"));
static UNIT_POWER: LazyLock<Regex> = LazyLock::new(|| re(r"\^\s*\{?\d\}?"));

/// Replaces every `\cmd{...}` (for the given commands) by ` ...` (its content).
fn unwrap_commands(s: &str, cmds: &[&str], max_len: usize) -> String {
    let mut out = s.to_string();
    for cmd in cmds {
        let pat = format!("\\{cmd}{{");
        while let Some(pos) = out.find(&pat) {
            let inner_start = pos + pat.len();
            let Some(close) = matching_brace(&out[inner_start..], max_len) else {
                break;
            };
            let inner = out[inner_start..inner_start + close].to_string();
            out.replace_range(pos..inner_start + close + 1, &format!(" {inner} "));
        }
    }
    out
}

/// LaTeX and prose clean-up shared by every answer; a leading `x =` is dropped.
pub(crate) fn clean(raw: &str, max_len: usize) -> String {
    clean_with(raw, max_len, true)
}

/// The clean-up of [`clean`], keeping relations (`y = 2x + 1`) whole when `strip_assign` is
/// false.
pub(crate) fn clean_with(raw: &str, max_len: usize, strip_assign: bool) -> String {
    let raw = raw.trim();
    // Fast path: a plain number needs none of the LaTeX clean-up below.
    if raw
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b',' | b'.' | b'-' | b'+' | b'/' | b'%'))
    {
        return raw.trim_end_matches(['.', ',']).to_string();
    }
    let mut s = raw.to_string();
    // Math delimiters around the whole answer.
    for (open, close) in [("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if let Some(inner) = s.strip_prefix(open).and_then(|r| r.strip_suffix(close)) {
            s = inner.to_string();
        }
    }
    s = s.replace("\\$", "").replace(['$', '€', '£', '¥'], "");
    s = s
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
        .replace("\\%", "%")
        .replace('−', "-")
        .replace("{,}", "")
        .replace("\\infty", "inf")
        .replace('∞', "inf")
        .replace("\\displaystyle", "");
    s = SIZING.replace_all(&s, "$1").into_owned();
    // Matrix row ends (`\\`) become `\cr` so that spacing commands cannot eat them.
    if s.contains("\\\\") {
        s = s.replace("\\\\", " \\cr ");
    }
    s = SPACING.replace_all(&s, "").into_owned();
    s = DEGREES.replace_all(&s, "").into_owned();
    s = unwrap_commands(
        &s,
        &[
            "text",
            "textbf",
            "textit",
            "mathrm",
            "mathbf",
            "mbox",
            "textrm",
            "operatorname",
        ],
        max_len,
    );
    s = FRAC_SHORT.replace_all(&s, "\\frac{$1}{$2}").into_owned();
    s = SQRT_SHORT.replace_all(&s, "\\sqrt{$1}").into_owned();
    let mut t = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.contains("\\overline") {
        t = repeating_decimals(&t);
    }
    if let Some(m) = ASSIGN.find(&t).filter(|_| strip_assign) {
        if m.end() < t.len() {
            t = t[m.end()..].to_string();
        }
    }
    t.trim_start_matches(['*', ':'])
        .trim_end_matches(['.', ',', ';', ':', '*', '!'])
        .trim()
        .to_string()
}

/// `0.1\overline{6}` → `\frac{1}{6}` (at most 30 digits; longer ones are left alone).
fn repeating_decimals(s: &str) -> String {
    REPEATING
        .replace_all(s, |c: &regex::Captures<'_>| {
            let whole = c.get(0).map_or("", |m| m.as_str()).to_string();
            let group = |i: usize| c.get(i).map_or("", |m| m.as_str());
            let (int, fixed, rep) = (group(1), group(2), group(3));
            if int.len() + fixed.len() + rep.len() > 30 {
                return whole;
            }
            let exact = (|| {
                let all: i128 = format!("0{int}{fixed}{rep}").parse().ok()?;
                let head: i128 = format!("0{int}{fixed}").parse().ok()?;
                let nines = 10i128.checked_pow(u32::try_from(rep.len()).ok()?)? - 1;
                let den =
                    nines.checked_mul(10i128.checked_pow(u32::try_from(fixed.len()).ok()?)?)?;
                match Num::ratio(all - head, den)? {
                    Num::Exact { num, den } => Some(format!("\\frac{{{num}}}{{{den}}}")),
                    Num::Approx(_) => None,
                }
            })();
            exact.unwrap_or(whole)
        })
        .into_owned()
}

/// Parses a cleaned answer.
pub(crate) fn parse(s: &str) -> Value {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        return Value::List(split_top(inner).iter().map(|i| parse(i)).collect());
    }
    let first = s.chars().next();
    let last = s.chars().last();
    if let (Some(o @ ('(' | '[')), Some(c @ (')' | ']'))) = (first, last) {
        let inner = &s[1..s.len() - 1];
        if balanced(inner) {
            let parts = split_top(inner);
            if parts.len() >= 2 {
                let items = parts.iter().map(|p| parse(p)).collect();
                return Value::Tuple {
                    open: o,
                    close: c,
                    items,
                };
            }
            if o == '(' && c == ')' {
                return parse(inner);
            }
        }
    }
    // A number first, so that thousands separators (`1,000 dollars`) are not list commas.
    if let Some(v) = parse_scalar(s) {
        return v;
    }
    let parts = split_top(s);
    if parts.len() >= 2 {
        return Value::List(parts.iter().map(|p| parse(p)).collect());
    }
    Value::Text(text_key(s))
}

/// Parentheses, brackets and braces balance (ignoring bracket kinds, as intervals mix them).
fn balanced(s: &str) -> bool {
    let mut depth = 0i64;
    for c in s.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Splits on commas at bracket depth 0 (at most [`MAX_ITEMS`] + 1 parts are kept).
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i64, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
                if parts.len() > MAX_ITEMS {
                    return parts;
                }
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts
}

/// A number, possibly signed, a fraction, a mixed number, in scientific notation, with a
/// percent sign or trailing unit words.
fn parse_scalar(s: &str) -> Option<Value> {
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "inf" | "+inf" | "infinity" => return Some(Value::Infinity(false)),
        "-inf" | "-infinity" => return Some(Value::Infinity(true)),
        _ => {}
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(r) => (true, r.trim_start()),
        None => (false, s.strip_prefix('+').unwrap_or(s).trim_start()),
    };
    if body.starts_with('-') || body.starts_with('+') {
        return None;
    }
    let (value, percent) = match parse_unsigned(body) {
        Some(v) => v,
        None if body.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            let (n, rest) = words::parse_words(body)?;
            (unit_only(rest) || rest.trim().is_empty()).then_some((n, false))?
        }
        None => return None,
    };
    let value = if neg { value.neg() } else { value };
    Some(Value::Number { value, percent })
}

/// `\frac{a}{b}`, `n \frac{a}{b}`, `n a/b`, or a literal followed only by unit words.
fn parse_unsigned(body: &str) -> Option<(Num, bool)> {
    if let Some((v, rest)) = parse_frac(body) {
        return unit_only(rest).then_some(v);
    }
    let caps = SCALAR.captures(body)?;
    let whole = caps.get(0)?;
    let mantissa = caps.get(2)?.as_str();
    let mut value = Num::parse_decimal(mantissa.trim_end_matches('.'))?;
    if let Some(den) = caps.get(3) {
        value = value.div(Num::parse_decimal(den.as_str())?)?;
    }
    if let Some(e) = caps.get(4).or_else(|| caps.get(5)) {
        let e: i32 = e.as_str().trim_start_matches('+').parse().ok()?;
        if e.abs() > 400 {
            return None;
        }
        value = value.mul(Num::pow10(e));
    }
    let percent = caps.get(6).is_some();
    let mut rest = &body[whole.end()..];
    // `2x`, `3y^2`: a letter right after the number is a variable, not a unit.
    let mut letters = rest.chars().take_while(char::is_ascii_alphabetic);
    if letters.next().is_some() && letters.next().is_none() {
        return None;
    }
    // `1.2 million`.
    if !percent && caps.get(4).is_none() && caps.get(5).is_none() {
        if let Some((scale, after)) = words::scale_prefix(rest) {
            value = value.mul(Num::int(scale));
            rest = after;
        }
    }
    // Mixed number: an integer followed by a proper fraction.
    if caps.get(3).is_none() && caps.get(4).is_none() && caps.get(5).is_none() && !percent {
        let r = rest.trim_start();
        if value.is_integer() && r.len() < rest.len() || r.starts_with("\\frac") {
            if let Some((frac, tail_rest)) = parse_frac(r).or_else(|| parse_slash(r)) {
                let (f, fp) = frac;
                if !fp && value.is_integer() && unit_only(tail_rest) {
                    return Some((value.add(f), false));
                }
            }
        }
    }
    unit_only(rest).then_some((value, percent))
}

/// `\frac{a}{b}` at the start of `s` with numeric `a` and `b`; returns the value and the rest.
fn parse_frac(s: &str) -> Option<((Num, bool), &str)> {
    let r = s.strip_prefix("\\frac")?.trim_start();
    let r = r.strip_prefix('{')?;
    let c1 = matching_brace(r, 256)?;
    let a = &r[..c1];
    let r2 = r[c1 + 1..].trim_start().strip_prefix('{')?;
    let c2 = matching_brace(r2, 256)?;
    let b = &r2[..c2];
    let (na, pa) = match parse_scalar(a.trim())? {
        Value::Number { value, percent } => (value, percent),
        _ => return None,
    };
    let nb = match parse_scalar(b.trim())? {
        Value::Number {
            value,
            percent: false,
        } => value,
        _ => return None,
    };
    Some(((na.div(nb)?, pa), &r2[c2 + 1..]))
}

/// `a/b` with integer `a` and `b` at the start of `s`.
fn parse_slash(s: &str) -> Option<((Num, bool), &str)> {
    let (a, r) = s.split_once('/')?;
    let a: i128 = a.trim().parse().ok()?;
    let r = r.trim_start();
    let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
    let b: i128 = r[..end].parse().ok()?;
    if a < 0 || b <= 0 || a >= b {
        return None;
    }
    Some(((Num::ratio(a, b)?, false), &r[end..]))
}

/// True when `rest` is empty or only unit words (`apples`, `km/h`, `m^2`), with no digits.
fn unit_only(rest: &str) -> bool {
    let r = rest.trim();
    if r.is_empty() {
        return true;
    }
    let r = UNIT_POWER.replace_all(r, "");
    r.starts_with(|c: char| c.is_alphabetic() || c == '/' || c == '\\')
        && r.chars().all(|c| {
            c.is_alphabetic() || c.is_whitespace() || matches!(c, '.' | '/' | '\'' | '-' | '\\')
        })
        && !r.contains("\\frac")
        && !r.contains("\\sqrt")
        && !r.contains("\\pi")
}

/// Text comparison key: no spaces, lower case, no wrapping parentheses on a single token.
fn text_key(s: &str) -> String {
    let mut k: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    while k.len() >= 2 && k.starts_with('(') && k.ends_with(')') && balanced(&k[1..k.len() - 1]) {
        k = k[1..k.len() - 1].to_string();
    }
    k
}

/// Answer equivalence.
pub(crate) fn equivalent(a: &Value, b: &Value, rel_tol: f64) -> bool {
    match (a, b) {
        (
            Value::Number {
                value: x,
                percent: px,
            },
            Value::Number {
                value: y,
                percent: py,
            },
        ) => {
            if x.equals(*y, rel_tol) {
                return true;
            }
            // `10%` equals `10` and `0.1`.
            let hundred = Num::int(100);
            (*px && !*py && x.div(hundred).is_some_and(|x| x.equals(*y, rel_tol)))
                || (*py && !*px && y.div(hundred).is_some_and(|y| y.equals(*x, rel_tol)))
        }
        (Value::Infinity(x), Value::Infinity(y)) => x == y,
        (
            Value::Tuple {
                open: o1,
                close: c1,
                items: i1,
            },
            Value::Tuple {
                open: o2,
                close: c2,
                items: i2,
            },
        ) => {
            o1 == o2
                && c1 == c2
                && i1.len() == i2.len()
                && i1.iter().zip(i2).all(|(x, y)| equivalent(x, y, rel_tol))
        }
        (Value::List(l1), Value::List(l2)) => multiset_eq(l1, l2, rel_tol),
        (Value::Text(x), Value::Text(y)) => x == y,
        _ => false,
    }
}

fn multiset_eq(a: &[Value], b: &[Value], rel_tol: f64) -> bool {
    if a.len() != b.len() || a.len() > MAX_ITEMS {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let hit = b
            .iter()
            .enumerate()
            .find(|(j, y)| !used[*j] && equivalent(x, y, rel_tol))
            .map(|(j, _)| j);
        hit.map(|j| used[j] = true).is_some()
    })
}
