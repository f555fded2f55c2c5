//! Symbolic equivalence: answers parsed to structures (tuples, intervals, sets, matrices,
//! relations) of expressions, compared exactly in Q(√) where possible, else by evaluation at
//! a few deterministic pseudo-random points. Every step is bounded (input length, depth,
//! item count, evaluation points).

use super::exact::{normalise, Budget};
use super::expr::{eval, is_constant, parse_expr, Expr, MAX_INPUT};

/// Most items compared in one symbolic collection (bounds the quadratic set match).
const MAX_ITEMS: usize = 16;
/// Deepest nesting of collections.
const MAX_NEST: usize = 6;
/// Most evaluation points tried, and how many must agree.
const MAX_POINTS: usize = 12;
const MIN_AGREE: usize = 4;
/// Absolute and relative tolerance of float evaluation.
const ABS_TOL: f64 = 1e-12;
const REL_TOL: f64 = 1e-9;

/// The outcome of a comparison and the rule that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub equal: bool,
    pub rule: &'static str,
}

impl Verdict {
    pub fn new(equal: bool, rule: &'static str) -> Self {
        Self { equal, rule }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rel {
    Eq,
    Ne,
    Lt,
    Le,
}

#[derive(Debug)]
enum Node {
    Expr(Expr),
    /// `lhs op rhs`, with `>`/`≥` turned around into `<`/`≤`.
    Rel(Expr, Rel, Expr),
    Seq {
        open: char,
        close: char,
        items: Vec<Node>,
    },
    Set(Vec<Node>),
    Matrix {
        cols: usize,
        cells: Vec<Node>,
    },
    Union(Vec<Node>),
}

/// Compares two cleaned answers; `None` when either is not a parsable expression structure.
pub(crate) fn compare(a: &str, b: &str) -> Option<Verdict> {
    if a.len() > MAX_INPUT || b.len() > MAX_INPUT {
        return None;
    }
    let mut names = Vec::new();
    let na = structure(a, &mut names, 0)?;
    let nb = structure(b, &mut names, 0)?;
    node_eq(&na, &nb, names.len())
}

/// Byte offsets of `pat` at bracket depth 0 in `s`.
fn top_level(s: &str, pat: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut depth = 0i64;
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && b[i..].starts_with(pat.as_bytes()) {
            out.push(i);
            if out.len() > MAX_ITEMS {
                break;
            }
        }
    }
    out
}

fn split_at_all<'s>(s: &'s str, cuts: &[usize], width: usize) -> Vec<&'s str> {
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        parts.push(s[start..c].trim());
        start = c + width;
    }
    parts.push(s[start..].trim());
    parts
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i64;
    for c in s.bytes() {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
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

fn items(parts: &[&str], names: &mut Vec<String>, depth: usize) -> Option<Vec<Node>> {
    if parts.len() > MAX_ITEMS {
        return None;
    }
    parts
        .iter()
        .map(|p| structure(p, names, depth + 1))
        .collect()
}

const RELATIONS: &[(&str, Rel, bool)] = &[
    ("\\leq", Rel::Le, false),
    ("\\geq", Rel::Le, true),
    ("\\neq", Rel::Ne, false),
    ("\\le", Rel::Le, false),
    ("\\ge", Rel::Le, true),
    ("\\ne", Rel::Ne, false),
    ("\\lt", Rel::Lt, false),
    ("\\gt", Rel::Lt, true),
    ("<=", Rel::Le, false),
    (">=", Rel::Le, true),
    ("≤", Rel::Le, false),
    ("≥", Rel::Le, true),
    ("≠", Rel::Ne, false),
    ("=", Rel::Eq, false),
    ("<", Rel::Lt, false),
    (">", Rel::Lt, true),
];

fn structure(s: &str, names: &mut Vec<String>, depth: usize) -> Option<Node> {
    if depth > MAX_NEST {
        return None;
    }
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    // Matrices and column vectors.
    for env in ["pmatrix", "bmatrix", "matrix"] {
        let (open, close) = (format!("\\begin{{{env}}}"), format!("\\end{{{env}}}"));
        if let Some(inner) = s.strip_prefix(&open).and_then(|r| r.strip_suffix(&close)) {
            let rows: Vec<&str> = inner
                .split("\\cr")
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .collect();
            let cells: Vec<Vec<&str>> = rows.iter().map(|r| r.split('&').collect()).collect();
            let cols = cells.first()?.len();
            if cells.iter().any(|r| r.len() != cols) {
                return None;
            }
            let flat: Vec<&str> = cells.into_iter().flatten().collect();
            return Some(Node::Matrix {
                cols,
                cells: items(&flat, names, depth)?,
            });
        }
    }
    let cups = top_level(s, "\\cup");
    if !cups.is_empty() {
        let parts = split_at_all(s, &cups, 4);
        return Some(Node::Union(items(&parts, names, depth)?));
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        let cuts = top_level(inner, ",");
        let parts = split_at_all(inner, &cuts, 1);
        return Some(Node::Set(items(&parts, names, depth)?));
    }
    let first = s.chars().next()?;
    let last = s.chars().last()?;
    if let (o @ ('(' | '['), c @ (')' | ']')) = (first, last) {
        let inner = &s[1..s.len() - 1];
        if balanced(inner) {
            let cuts = top_level(inner, ",");
            if !cuts.is_empty() {
                let parts = split_at_all(inner, &cuts, 1);
                return Some(Node::Seq {
                    open: o,
                    close: c,
                    items: items(&parts, names, depth)?,
                });
            }
        }
    }
    let commas = top_level(s, ",");
    if !commas.is_empty() {
        let parts = split_at_all(s, &commas, 1);
        return Some(Node::Set(items(&parts, names, depth)?));
    }
    // `a \pm b` is the set {a + b, a − b}.
    let pm = top_level(s, "\\pm");
    if pm.len() == 1 {
        let (a, b) = (s[..pm[0]].trim(), s[pm[0] + 3..].trim());
        let plus = parse_expr(&format!("{a}+({b})"), names)?;
        let minus = parse_expr(&format!("{a}-({b})"), names)?;
        return Some(Node::Set(vec![Node::Expr(plus), Node::Expr(minus)]));
    }
    for &(pat, rel, flip) in RELATIONS {
        let at = top_level(s, pat);
        if at.is_empty() {
            continue;
        }
        if at.len() > 1 {
            return None;
        }
        let (l, r) = (&s[..at[0]], &s[at[0] + pat.len()..]);
        // `<=` is also matched by `<`: the longer pattern comes first, so a shorter one that
        // cuts a longer operator leaves a stray `=` that fails to parse below.
        let lhs = parse_expr(l, names)?;
        let rhs = parse_expr(r, names)?;
        return Some(if flip {
            Node::Rel(rhs, rel, lhs)
        } else {
            Node::Rel(lhs, rel, rhs)
        });
    }
    parse_expr(s, names).map(Node::Expr)
}

fn all_eq(a: &[Node], b: &[Node], nvars: usize) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| node_eq(x, y, nvars).is_some_and(|v| v.equal))
}

fn multiset_eq(a: &[Node], b: &[Node], nvars: usize) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let hit =
            (0..b.len()).find(|&j| !used[j] && node_eq(x, &b[j], nvars).is_some_and(|v| v.equal));
        hit.map(|j| used[j] = true).is_some()
    })
}

fn is_var(e: &Expr) -> bool {
    matches!(e, Expr::Var(_))
}

fn node_eq(a: &Node, b: &Node, nvars: usize) -> Option<Verdict> {
    match (a, b) {
        (Node::Expr(x), Node::Expr(y)) => expr_eq(x, y, nvars),
        (Node::Rel(l1, r1, m1), Node::Rel(l2, r2, m2)) => {
            if r1 != r2 {
                return Some(Verdict::new(false, "equation"));
            }
            let same = |p: &Expr, q: &Expr| expr_eq(p, q, nvars).is_some_and(|v| v.equal);
            let mut eq = same(l1, l2) && same(m1, m2);
            if !eq && matches!(r1, Rel::Eq | Rel::Ne) {
                eq = (same(l1, m2) && same(m1, l2)) || proportional(l1, m1, l2, m2, nvars);
            }
            Some(Verdict::new(eq, "equation"))
        }
        // `x = 3` against `3`: the value assigned to a variable.
        (Node::Rel(l, Rel::Eq, r), Node::Expr(e)) | (Node::Expr(e), Node::Rel(l, Rel::Eq, r)) => {
            let side = if is_var(l) {
                r
            } else if is_var(r) {
                l
            } else {
                return None;
            };
            expr_eq(side, e, nvars).map(|v| Verdict::new(v.equal, "equation"))
        }
        (
            Node::Seq {
                open: o1,
                close: c1,
                items: i1,
            },
            Node::Seq {
                open: o2,
                close: c2,
                items: i2,
            },
        ) => {
            let interval = i1.len() == 2 && (*o1 != '(' || *c1 != ')' || *o2 != '(' || *c2 != ')');
            let rule = if interval { "interval" } else { "tuple" };
            Some(Verdict::new(
                o1 == o2 && c1 == c2 && all_eq(i1, i2, nvars),
                rule,
            ))
        }
        (Node::Set(s1), Node::Set(s2)) => Some(Verdict::new(multiset_eq(s1, s2, nvars), "set")),
        (Node::Union(u1), Node::Union(u2)) => {
            Some(Verdict::new(multiset_eq(u1, u2, nvars), "interval"))
        }
        (
            Node::Matrix {
                cols: c1,
                cells: x1,
            },
            Node::Matrix {
                cols: c2,
                cells: x2,
            },
        ) => Some(Verdict::new(c1 == c2 && all_eq(x1, x2, nvars), "matrix")),
        // A column (or row) vector against a tuple.
        (Node::Matrix { cols, cells }, Node::Seq { open, items, .. })
        | (Node::Seq { open, items, .. }, Node::Matrix { cols, cells }) => {
            let vector = *cols == 1 || *cols == cells.len();
            Some(Verdict::new(
                vector && *open == '(' && all_eq(cells, items, nvars),
                "vector",
            ))
        }
        _ => None,
    }
}

/// A tiny deterministic generator for evaluation points.
struct Points(u64);

impl Points {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        // Values in ±[0.3, 2.8]: away from 0 and from the integers a wrong answer may hit.
        let v = 0.3 + 2.5 * u;
        if self.0 & (1 << 60) == 0 {
            v
        } else {
            -v
        }
    }

    fn point(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn close(x: f64, y: f64) -> Option<bool> {
    if !(x.is_finite() && y.is_finite()) {
        return None;
    }
    Some((x - y).abs() <= ABS_TOL + REL_TOL * x.abs().max(y.abs()))
}

/// `±∞` written as such (not an overflow).
fn infinity(e: &Expr) -> Option<bool> {
    match e {
        Expr::Inf => Some(false),
        Expr::Neg(a) => infinity(a).map(|n| !n),
        _ => None,
    }
}

fn expr_eq(a: &Expr, b: &Expr, nvars: usize) -> Option<Verdict> {
    match (infinity(a), infinity(b)) {
        (Some(x), Some(y)) => return Some(Verdict::new(x == y, "exact")),
        (Some(_), None) | (None, Some(_)) => return Some(Verdict::new(false, "exact")),
        (None, None) => {}
    }
    if is_constant(a) && is_constant(b) {
        let mut budget = Budget::new();
        if let (Some(x), Some(y)) = (normalise(a, &mut budget), normalise(b, &mut budget)) {
            let rule = if x.has_radical() || y.has_radical() {
                "radical"
            } else {
                "exact"
            };
            return Some(Verdict::new(x == y, rule));
        }
        return close(eval(a, &[]), eval(b, &[])).map(|eq| Verdict::new(eq, "numeric_eval"));
    }
    let mut pts = Points(0x5eed_1234_abcd_0042);
    let mut agree = 0;
    for _ in 0..MAX_POINTS {
        let p = pts.point(nvars);
        match close(eval(a, &p), eval(b, &p)) {
            Some(true) => agree += 1,
            Some(false) => return Some(Verdict::new(false, "symbolic")),
            None => {}
        }
        if agree >= MIN_AGREE {
            return Some(Verdict::new(true, "symbolic"));
        }
    }
    None
}

/// `l1 − r1 = k·(l2 − r2)` for one constant `k ≠ 0` at every point (equivalent equations).
fn proportional(l1: &Expr, r1: &Expr, l2: &Expr, r2: &Expr, nvars: usize) -> bool {
    if nvars == 0 {
        return false;
    }
    let mut pts = Points(0x0eed_4321_dcba_0007);
    let mut k: Option<f64> = None;
    let mut agree = 0;
    for _ in 0..MAX_POINTS {
        let p = pts.point(nvars);
        let d1 = eval(l1, &p) - eval(r1, &p);
        let d2 = eval(l2, &p) - eval(r2, &p);
        if !(d1.is_finite() && d2.is_finite()) || d2.abs() < 1e-9 {
            continue;
        }
        let ratio = d1 / d2;
        match k {
            None if ratio.abs() > 1e-9 => k = Some(ratio),
            None => return false,
            Some(k) if close(ratio, k) != Some(true) => return false,
            Some(_) => {}
        }
        agree += 1;
        if agree >= MIN_AGREE {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::compare;

    fn eq(a: &str, b: &str) -> Option<bool> {
        compare(a, b).map(|v| v.equal)
    }

    #[test]
    fn structures_compare_element_by_element() {
        assert_eq!(eq("x^2-5x+6", "6-5x+x^2"), Some(true));
        assert_eq!(eq("y=2x+1", "y=1+2x"), Some(true));
        assert_eq!(eq("y=2x+1", "2x+1=y"), Some(true));
        assert_eq!(eq("y=2x+1", "y=2x-1"), Some(false));
        assert_eq!(eq("x=3", "3"), Some(true));
        assert_eq!(eq("x>3", "3<x"), Some(true));
        assert_eq!(eq("(1,\\sqrt{12})", "(1,2\\sqrt3)"), Some(true));
        assert_eq!(eq("\\{1,\\sqrt2\\}", "\\{\\sqrt2,1\\}"), Some(true));
        assert_eq!(
            eq("\\begin{pmatrix}1\\cr 2\\end{pmatrix}", "(1,2)"),
            Some(true)
        );
        assert_eq!(eq("1\\pm\\sqrt2", "1+\\sqrt2,1-\\sqrt2"), Some(true));
        assert_eq!(
            eq("(-inf,1)\\cup(2,inf)", "(2,inf)\\cup(-inf,1)"),
            Some(true)
        );
        assert_eq!(eq("hello", "1"), None);
    }
}
