//! Exact normal form of constant expressions in Q(√n₁, √n₂, …): a sum of rational multiples
//! of square roots of distinct square-free integers (`2√3 + 1/2`). `√12`, `2√3` and
//! `\sqrt{48}/2` all normalise to `2√3`; `1/√2` to `√2/2`. Anything else (π, variables,
//! nested radicals, large powers) is `None` and left to float evaluation.

use super::expr::Expr;
use super::number::Num;

/// Most terms kept in one normal form.
const MAX_TERMS: usize = 16;
/// Largest integer exponent expanded exactly.
const MAX_EXP: i128 = 64;
/// Trial division bound for extracting square factors.
const TRIAL: u128 = 1 << 16;

/// `Σ coef · √radicand`, sorted by radicand, no zero coefficients; radicand 1 is the rational
/// part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Radical(Vec<(u128, (i128, i128))>);

/// Work budget of one normalisation (square-factor extractions).
pub(crate) struct Budget(u32);

impl Budget {
    pub fn new() -> Self {
        Budget(16)
    }
}

fn exact(n: Num) -> Option<(i128, i128)> {
    match n {
        Num::Exact { num, den } => Some((num, den)),
        Num::Approx(_) => None,
    }
}

fn q(n: i128, d: i128) -> Option<(i128, i128)> {
    Num::ratio(n, d).and_then(exact)
}

fn qadd(a: (i128, i128), b: (i128, i128)) -> Option<(i128, i128)> {
    exact(Num::ratio(a.0, a.1)?.add(Num::ratio(b.0, b.1)?))
}

fn qmul(a: (i128, i128), b: (i128, i128)) -> Option<(i128, i128)> {
    exact(Num::ratio(a.0, a.1)?.mul(Num::ratio(b.0, b.1)?))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn isqrt(n: u128) -> u128 {
    if n < 2 {
        return n;
    }
    let mut x = (n as f64).sqrt() as u128;
    while x.checked_mul(x).is_none_or(|s| s > n) {
        x -= 1;
    }
    while (x + 1).checked_mul(x + 1).is_some_and(|s| s <= n) {
        x += 1;
    }
    x
}

/// `n = out² · inside` with `inside` square-free, by bounded trial division.
fn split_square(mut n: u128, budget: &mut Budget) -> Option<(u128, u128)> {
    if n == 0 {
        return Some((0, 1));
    }
    budget.0 = budget.0.checked_sub(1)?;
    let (mut out, mut inside) = (1u128, 1u128);
    let mut p = 2u128;
    while p * p <= n && p < TRIAL {
        let mut k = 0;
        while n % p == 0 {
            n /= p;
            k += 1;
        }
        for _ in 0..k / 2 {
            out = out.checked_mul(p)?;
        }
        if k % 2 == 1 {
            inside = inside.checked_mul(p)?;
        }
        p += 1;
    }
    // What is left has no factor below `p`.
    if n > 1 {
        let r = isqrt(n);
        if r * r == n {
            out = out.checked_mul(r)?;
        } else if p >= TRIAL && n / TRIAL / TRIAL >= TRIAL {
            // Could still hide a square of a large prime.
            return None;
        } else {
            inside = inside.checked_mul(n)?;
        }
    }
    Some((out, inside))
}

impl Radical {
    fn rational(r: (i128, i128)) -> Self {
        if r.0 == 0 {
            Radical(Vec::new())
        } else {
            Radical(vec![(1, r)])
        }
    }

    /// The rational value when there is no radical part.
    pub fn as_rational(&self) -> Option<(i128, i128)> {
        match self.0.as_slice() {
            [] => Some((0, 1)),
            [(1, r)] => Some(*r),
            _ => None,
        }
    }

    /// True when a square root of a non-square appears.
    pub fn has_radical(&self) -> bool {
        self.0.iter().any(|(n, _)| *n != 1)
    }

    fn push(terms: &mut Vec<(u128, (i128, i128))>, n: u128, c: (i128, i128)) -> Option<()> {
        match terms.binary_search_by_key(&n, |t| t.0) {
            Ok(i) => {
                let s = qadd(terms[i].1, c)?;
                if s.0 == 0 {
                    terms.remove(i);
                } else {
                    terms[i].1 = s;
                }
            }
            Err(i) => {
                if c.0 != 0 {
                    terms.insert(i, (n, c));
                }
            }
        }
        (terms.len() <= MAX_TERMS).then_some(())
    }

    fn add(&self, o: &Self) -> Option<Self> {
        let mut t = self.0.clone();
        for &(n, c) in &o.0 {
            Self::push(&mut t, n, c)?;
        }
        Some(Radical(t))
    }

    fn neg(&self) -> Option<Self> {
        let t = self
            .0
            .iter()
            .map(|&(n, c)| Some((n, (c.0.checked_neg()?, c.1))))
            .collect::<Option<_>>()?;
        Some(Radical(t))
    }

    fn mul(&self, o: &Self) -> Option<Self> {
        let mut t = Vec::new();
        for &(n1, c1) in &self.0 {
            for &(n2, c2) in &o.0 {
                // √a·√b = g·√(a/g · b/g) with g = gcd(a, b), both square-free.
                let g = gcd(n1, n2);
                let inside = (n1 / g).checked_mul(n2 / g)?;
                let c = qmul(qmul(c1, c2)?, (i128::try_from(g).ok()?, 1))?;
                Self::push(&mut t, inside, c)?;
            }
        }
        Some(Radical(t))
    }

    /// `1 / self` for a single term or a rational plus one radical (by the conjugate).
    fn recip(&self) -> Option<Self> {
        match self.0.as_slice() {
            [(n, c)] => {
                // 1/(c√n) = √n / (c·n)
                let den = qmul(*c, (i128::try_from(*n).ok()?, 1))?;
                Some(Radical(vec![(*n, q(den.1, den.0)?)]))
            }
            [(1, a), (n, b)] => {
                // 1/(a + b√n) = (a − b√n) / (a² − b²n)
                let norm = qadd(
                    qmul(*a, *a)?,
                    qmul(qmul(*b, *b)?, (i128::try_from(*n).ok()?.checked_neg()?, 1))?,
                )?;
                if norm.0 == 0 {
                    return None;
                }
                let inv = q(norm.1, norm.0)?;
                let conj = Radical(vec![(1, *a), (*n, (b.0.checked_neg()?, b.1))]);
                conj.mul(&Radical::rational(inv))
            }
            _ => None,
        }
    }

    fn pow(&self, e: i128) -> Option<Self> {
        if e.abs() > MAX_EXP {
            return None;
        }
        let base = if e < 0 { self.recip()? } else { self.clone() };
        let mut acc = Radical::rational((1, 1));
        for _ in 0..e.unsigned_abs() {
            acc = acc.mul(&base)?;
        }
        Some(acc)
    }

    /// `√(p/q)` of a non-negative rational: `√(p·q) / q`.
    fn sqrt_rational(r: (i128, i128), budget: &mut Budget) -> Option<Self> {
        if r.0 < 0 {
            return None;
        }
        let pq = u128::try_from(r.0)
            .ok()?
            .checked_mul(u128::try_from(r.1).ok()?)?;
        let (out, inside) = split_square(pq, budget)?;
        let c = q(i128::try_from(out).ok()?, r.1)?;
        Radical::rational(c).mul(&Radical(vec![(inside, (1, 1))]))
    }
}

/// An integer-valued rational.
fn integer(r: &Radical) -> Option<i128> {
    match r.as_rational()? {
        (n, 1) => Some(n),
        _ => None,
    }
}

/// The exact normal form of a constant expression, when it has one.
pub(crate) fn normalise(e: &Expr, budget: &mut Budget) -> Option<Radical> {
    match e {
        Expr::Num(n) => Some(Radical::rational(exact(*n)?)),
        Expr::Add(ts) => {
            let mut acc = Radical::rational((0, 1));
            for t in ts {
                acc = acc.add(&normalise(t, budget)?)?;
            }
            Some(acc)
        }
        Expr::Mul(fs) => {
            let mut acc = Radical::rational((1, 1));
            for f in fs {
                acc = acc.mul(&normalise(f, budget)?)?;
            }
            Some(acc)
        }
        Expr::Neg(a) => normalise(a, budget)?.neg(),
        Expr::Div(a, b) => {
            let d = normalise(b, budget)?;
            normalise(a, budget)?.mul(&d.recip()?)
        }
        Expr::Pow(a, b) => {
            let base = normalise(a, budget)?;
            let exp = normalise(b, budget)?.as_rational()?;
            match exp {
                (e, 1) => base.pow(e),
                (e, 2) => {
                    // x^(k/2) of a rational x: √(x^k).
                    let x = base.as_rational()?;
                    let xk = Radical::rational(x).pow(e)?.as_rational()?;
                    Radical::sqrt_rational(xk, budget)
                }
                _ => None,
            }
        }
        Expr::Root(n, a) => {
            let n = integer(&normalise(n, budget)?)?;
            let x = normalise(a, budget)?;
            match n {
                2 => Radical::sqrt_rational(x.as_rational()?, budget),
                3 => {
                    let (p, d) = x.as_rational()?;
                    let (cp, cd) = (icbrt(p)?, icbrt(d)?);
                    Some(Radical::rational(q(cp, cd)?))
                }
                _ => None,
            }
        }
        Expr::Fact(a) => {
            let n = integer(&normalise(a, budget)?)?;
            if !(0..=33).contains(&n) {
                return None;
            }
            let f = (1..=n).try_fold(1i128, |acc, k| acc.checked_mul(k))?;
            Some(Radical::rational((f, 1)))
        }
        Expr::Binom(n, k) => {
            let (n, k) = (
                integer(&normalise(n, budget)?)?,
                integer(&normalise(k, budget)?)?,
            );
            if n < 0 || k < 0 || n > 1000 {
                return None;
            }
            if k > n {
                return Some(Radical::rational((0, 1)));
            }
            let k = k.min(n - k);
            let mut c = 1i128;
            for i in 0..k {
                c = c.checked_mul(n - i)? / (i + 1);
            }
            Some(Radical::rational((c, 1)))
        }
        Expr::Abs(a) => {
            let x = normalise(a, budget)?;
            let (p, d) = x.as_rational()?;
            Some(Radical::rational((p.checked_abs()?, d)))
        }
        Expr::Pi | Expr::E | Expr::Inf | Expr::Var(_) | Expr::Func(..) | Expr::Log(..) => None,
    }
}

/// Exact integer cube root.
fn icbrt(n: i128) -> Option<i128> {
    let r = (n as f64).cbrt().round() as i128;
    (r - 1..=r + 1).find(|c| {
        c.checked_mul(*c)
            .and_then(|s| s.checked_mul(*c))
            .is_some_and(|cube| cube == n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::expr::parse_expr;

    fn norm(s: &str) -> Option<Radical> {
        let mut names = Vec::new();
        let e = parse_expr(s, &mut names)?;
        normalise(&e, &mut Budget::new())
    }

    #[test]
    fn radicals_normalise() {
        assert_eq!(norm("\\sqrt{12}"), norm("2\\sqrt{3}"));
        assert_eq!(norm("\\frac{1}{\\sqrt{2}}"), norm("\\frac{\\sqrt{2}}{2}"));
        assert_eq!(norm("\\frac{1+\\sqrt5}{2}"), norm("\\frac{\\sqrt{5}+1}{2}"));
        assert_eq!(norm("\\frac{1}{1+\\sqrt2}"), norm("\\sqrt2-1"));
        assert_eq!(norm("\\sqrt{2}\\sqrt{6}"), norm("2\\sqrt3"));
        assert_eq!(norm("(\\sqrt3)^2"), norm("3"));
        assert_eq!(norm("\\sqrt[3]{27}"), norm("3"));
        assert_eq!(norm("\\binom{10}{3}"), norm("120"));
        assert_ne!(norm("\\sqrt{2}"), norm("1.41421356"));
        assert!(norm("2^{1000}").is_none());
        assert!(norm("\\pi").is_none());
        assert!(norm("\\sqrt{\\sqrt{2}}").is_none());
    }
}
