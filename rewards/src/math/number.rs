//! Exact rationals with an approximate fallback.

use std::cmp::Ordering;

/// A number: an exact rational when it fits in `i128`, else an `f64`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Num {
    /// `num / den`, reduced, `den > 0`.
    Exact { num: i128, den: i128 },
    /// Too large or too precise for the exact form.
    Approx(f64),
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Num {
    pub fn int(n: i128) -> Self {
        Num::Exact { num: n, den: 1 }
    }

    /// `num / den` reduced; `None` when `den == 0`.
    pub fn ratio(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let (mut n, mut d) = (num / g, den / g);
        if d < 0 {
            match (n.checked_neg(), d.checked_neg()) {
                (Some(a), Some(b)) => (n, d) = (a, b),
                _ => return Some(Num::Approx(num as f64 / den as f64)),
            }
        }
        Some(Num::Exact { num: n, den: d })
    }

    pub fn to_f64(self) -> f64 {
        match self {
            Num::Exact { num, den } => num as f64 / den as f64,
            Num::Approx(x) => x,
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, Num::Exact { den: 1, .. })
    }

    pub fn neg(self) -> Self {
        match self {
            Num::Exact { num, den } => match num.checked_neg() {
                Some(n) => Num::Exact { num: n, den },
                None => Num::Approx(-(num as f64) / den as f64),
            },
            Num::Approx(x) => Num::Approx(-x),
        }
    }

    pub fn add(self, o: Self) -> Self {
        if let (Num::Exact { num: a, den: b }, Num::Exact { num: c, den: d }) = (self, o) {
            let exact = (|| {
                let n = a.checked_mul(d)?.checked_add(c.checked_mul(b)?)?;
                Num::ratio(n, b.checked_mul(d)?)
            })();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Approx(self.to_f64() + o.to_f64())
    }

    pub fn mul(self, o: Self) -> Self {
        if let (Num::Exact { num: a, den: b }, Num::Exact { num: c, den: d }) = (self, o) {
            let exact = (|| Num::ratio(a.checked_mul(c)?, b.checked_mul(d)?))();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Approx(self.to_f64() * o.to_f64())
    }

    /// `self / o`; `None` for division by zero.
    pub fn div(self, o: Self) -> Option<Self> {
        match o {
            Num::Exact { num: 0, .. } => None,
            Num::Exact { num, den } => Some(self.mul(Num::ratio(den, num)?)),
            Num::Approx(x) => (x != 0.0).then(|| Num::Approx(self.to_f64() / x)),
        }
    }

    /// `10^e` exactly when it fits.
    pub fn pow10(e: i32) -> Self {
        let p = 10i128.checked_pow(e.unsigned_abs());
        match (p, e >= 0) {
            (Some(p), true) => Num::int(p),
            (Some(p), false) => Num::Exact { num: 1, den: p },
            (None, _) => Num::Approx(10f64.powi(e)),
        }
    }

    /// Equality: exact when both are exact, else within a relative tolerance.
    pub fn equals(self, o: Self, rel_tol: f64) -> bool {
        match (self, o) {
            (Num::Exact { num: a, den: b }, Num::Exact { num: c, den: d }) => a == c && b == d,
            _ => {
                let (x, y) = (self.to_f64(), o.to_f64());
                if !(x.is_finite() && y.is_finite()) {
                    return false;
                }
                match x.partial_cmp(&y) {
                    Some(Ordering::Equal) => true,
                    _ => (x - y).abs() <= rel_tol * x.abs().max(y.abs()),
                }
            }
        }
    }

    /// Parses an unsigned decimal literal (`123`, `1,234.50`, `.5`, `2.5e-3`) exactly.
    pub fn parse_decimal(s: &str) -> Option<Self> {
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        let int_digits: String = int_part.chars().filter(|&c| c != ',').collect();
        if int_digits.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_digits.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let frac_trim = frac_part.trim_end_matches('0');
        let digits = format!("{int_digits}{frac_trim}");
        let digits = digits.trim_start_matches('0');
        let scale = i32::try_from(frac_trim.len()).ok()?;
        if digits.len() <= 36 && (exp - scale).abs() <= 36 {
            let n: i128 = if digits.is_empty() {
                0
            } else {
                digits.parse().ok()?
            };
            let exact = Num::int(n).mul(Num::pow10(exp - scale));
            if matches!(exact, Num::Exact { .. }) {
                return Some(exact);
            }
        }
        let plain: String = s.chars().filter(|&c| c != ',').collect();
        plain
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map(Num::Approx)
    }
}

#[cfg(test)]
mod tests {
    use super::Num;

    fn exact(n: Num) -> (i128, i128) {
        match n {
            Num::Exact { num, den } => (num, den),
            Num::Approx(x) => panic!("inexact {x}"),
        }
    }

    #[test]
    fn decimals_parse_exactly() {
        let p = |s: &str| Num::parse_decimal(s).expect(s);
        assert_eq!(exact(p("3.50")), (7, 2));
        assert_eq!(exact(p("1,234.5")), (2469, 2));
        assert_eq!(exact(p(".25")), (1, 4));
        assert_eq!(exact(p("2.5e-3")), (1, 400));
        assert_eq!(exact(p("0.000")), (0, 1));
        assert!(matches!(p("1e300"), Num::Approx(x) if x == 1e300));
        assert!(Num::parse_decimal("1.2.3").is_none());
        assert!(Num::parse_decimal("").is_none());
    }

    #[test]
    fn arithmetic_falls_back_to_floats_on_overflow() {
        let big = Num::int(i128::MAX);
        assert!(matches!(big.add(Num::int(1)), Num::Approx(_)));
        assert!(matches!(big.mul(Num::int(2)), Num::Approx(_)));
        assert!(matches!(Num::int(i128::MIN).neg(), Num::Approx(_)));
        assert_eq!(
            exact(Num::int(3).div(Num::int(-6)).expect("non-zero")),
            (-1, 2)
        );
        assert!(Num::int(1).div(Num::int(0)).is_none());
        assert!(Num::Approx(1e40).equals(Num::Approx(1e40 * (1.0 + 1e-9)), 1e-6));
        assert!(!Num::Approx(f64::NAN).equals(Num::Approx(f64::NAN), 1e-6));
    }
}
