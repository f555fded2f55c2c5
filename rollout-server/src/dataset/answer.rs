//! Reference answers: split a worked solution from its final answer and tidy the answer.

use super::SkipReason;

/// The bare answer and the worked solution (when there is one) of an answer text.
///
/// A text containing `####` is a GSM8K-style worked solution: the answer is what follows the
/// last `####` and the solution is the whole text. Any other text is a bare answer.
pub(crate) fn split_answer(text: &str) -> Result<(String, Option<String>), SkipReason> {
    let text = text.trim();
    match text.rfind("####") {
        Some(pos) => {
            let answer = normalise(&text[pos + 4..]);
            if answer.is_empty() {
                return Err(SkipReason::NoFinalAnswer);
            }
            Ok((answer, Some(text.to_string())))
        }
        None => {
            let answer = normalise(text);
            if answer.is_empty() {
                return Err(SkipReason::EmptyAnswer);
            }
            Ok((answer, None))
        }
    }
}

/// Tidies a final answer: trims it, drops one trailing `.`, a leading currency sign before a
/// digit, thousands separators (`1,234` -> `1234`, only when the groups are well formed) and up
/// to two unit words after a number (`18 dollars` -> `18`). Anything else is kept as written
/// (the math reward normalises further when it compares).
pub(crate) fn normalise(text: &str) -> String {
    let mut t = text.trim();
    if let Some(rest) = t.strip_suffix('.') {
        t = rest.trim_end();
    }
    for sign in ['$', '€', '£'] {
        if let Some(rest) = t.strip_prefix(sign) {
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                t = rest;
            }
        }
    }
    let Some((number, rest)) = leading_number(t) else {
        return t.to_string();
    };
    let rest = rest.trim();
    let words: Vec<&str> = rest.split_whitespace().collect();
    let unit_words = !rest.is_empty()
        && words.len() <= 2
        && words
            .iter()
            .all(|w| w.chars().all(|c| c.is_alphabetic()) && !matches!(*w, "and" | "or" | "to"));
    if rest.is_empty() || unit_words {
        number
    } else if let Some(stripped) = t.strip_prefix(number_text(t)) {
        // A number followed by something else (`10%`, `3/4`): only drop the separators.
        format!("{number}{stripped}")
    } else {
        t.to_string()
    }
}

/// The leading text of `t` that [`leading_number`] reads as a number.
fn number_text(t: &str) -> &str {
    let end = t
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == ',' || c == '.' || (i == 0 && c == '-')))
        .map_or(t.len(), |(i, _)| i);
    let s = &t[..end];
    // A trailing `.` or `,` belongs to the text after the number.
    s.trim_end_matches([',', '.'])
}

/// A number at the start of `t` (optional `-`, digits with well-formed thousands separators,
/// optional decimals), without its separators, and the text after it.
fn leading_number(t: &str) -> Option<(String, &str)> {
    let s = number_text(t);
    let (sign, body) = match s.strip_prefix('-') {
        Some(b) => ("-", b),
        None => ("", s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if int.is_empty()
        || frac.is_some_and(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let groups: Vec<&str> = int.split(',').collect();
    let well_formed = groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit()))
        && (groups.len() == 1
            || ((1..=3).contains(&groups[0].len()) && groups[1..].iter().all(|g| g.len() == 3)));
    if !well_formed || groups[0].is_empty() {
        return None;
    }
    let mut out = format!("{sign}{}", groups.concat());
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    Some((out, &t[s.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_give_the_answer_and_keep_the_solution() {
        let (a, s) = split_answer("3 + 4 = 7\n#### 1,234").unwrap();
        assert_eq!(a, "1234");
        assert_eq!(s.as_deref(), Some("3 + 4 = 7\n#### 1,234"));
        // The last `####` counts.
        let (a, _) = split_answer("#### 5 is wrong\nso\n#### 6").unwrap();
        assert_eq!(a, "6");
        assert_eq!(split_answer("work\n####  "), Err(SkipReason::NoFinalAnswer));
        assert_eq!(split_answer("   "), Err(SkipReason::EmptyAnswer));
        assert_eq!(split_answer("42").unwrap(), ("42".to_string(), None));
    }

    #[test]
    fn normalisation() {
        for (raw, want) in [
            ("1,234", "1234"),
            ("12,345,678.50", "12345678.50"),
            ("18.", "18"),
            ("$1,200", "1200"),
            ("18 dollars", "18"),
            ("7 square feet", "7"),
            ("-5", "-5"),
            ("3.5", "3.5"),
            ("10%", "10%"),
            ("1,000%", "1000%"),
            ("3/4", "3/4"),
            ("1,2", "1,2"),
            ("12,34", "12,34"),
            ("5 and 6", "5 and 6"),
            ("\\frac{1}{2}", "\\frac{1}{2}"),
            ("Paris.", "Paris"),
            ("", ""),
        ] {
            assert_eq!(normalise(raw), want, "{raw:?}");
        }
    }
}
