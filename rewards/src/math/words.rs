//! Number words (`twelve`, `two hundred and five`) and scale words (`1.2 million`).

use super::number::Num;

const SMALL: &[(&str, i128)] = &[
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
];

/// Multipliers written after a number: `1.2 million`, `three thousand`.
pub(crate) const SCALES: &[(&str, i128)] = &[
    ("thousand", 1_000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("trillion", 1_000_000_000_000),
];

/// Most words read as one number.
const MAX_WORDS: usize = 12;

/// A scale word at the start of `s` (case-insensitive), with the rest after it.
pub(crate) fn scale_prefix(s: &str) -> Option<(i128, &str)> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let word = &s[..end];
    let w = word.to_ascii_lowercase();
    let w = w.strip_suffix('s').unwrap_or(&w);
    SCALES
        .iter()
        .find(|(n, _)| *n == w)
        .map(|&(_, v)| (v, &s[end..]))
}

/// A number written in words at the start of `s`, and the rest of `s` after it.
pub(crate) fn parse_words(s: &str) -> Option<(Num, &str)> {
    let mut total: i128 = 0;
    let mut current: i128 = 0;
    let mut seen = false;
    let mut negative = false;
    let mut rest = s.trim_start();
    let mut consumed = rest;
    for _ in 0..MAX_WORDS {
        let r = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '-');
        let end = r
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(r.len());
        if end == 0 {
            break;
        }
        let w = r[..end].to_ascii_lowercase();
        let after = &r[end..];
        if let Some(&(_, v)) = SMALL.iter().find(|(n, _)| *n == w) {
            current = current.checked_add(v)?;
        } else if w == "hundred" && seen {
            current = current.max(1).checked_mul(100)?;
        } else if let Some(&(_, v)) = SCALES.iter().find(|(n, _)| *n == w).filter(|_| seen) {
            total = total.checked_add(current.max(1).checked_mul(v)?)?;
            current = 0;
        } else if (w == "and" && seen) || (w == "a" && !seen) {
            rest = after;
            continue;
        } else if (w == "minus" || w == "negative") && !seen {
            negative = true;
            rest = after;
            continue;
        } else {
            break;
        }
        seen = true;
        rest = after;
        consumed = after;
    }
    if !seen {
        return None;
    }
    let n = Num::int(total.checked_add(current)?);
    Some((if negative { n.neg() } else { n }, consumed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Option<f64> {
        parse_words(s).map(|(n, _)| n.to_f64())
    }

    #[test]
    fn words_read_as_numbers() {
        assert_eq!(w("twelve"), Some(12.0));
        assert_eq!(w("Twenty-five apples"), Some(25.0));
        assert_eq!(w("two hundred and five"), Some(205.0));
        assert_eq!(w("three thousand four hundred"), Some(3400.0));
        assert_eq!(w("minus three"), Some(-3.0));
        assert_eq!(w("hundred"), None);
        assert_eq!(w("apples"), None);
        assert_eq!(
            scale_prefix(" million dollars").map(|x| x.0),
            Some(1_000_000)
        );
    }
}
