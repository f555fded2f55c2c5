//! Finding the final answer in a completion, with bounded work.
//!
//! Only the last `scan_tail_bytes` of a completion are searched (the final answer is at the
//! end), and an answer longer than `max_answer_bytes` is rejected, so a multi-megabyte
//! completion costs no more than a short one.

use std::sync::LazyLock;

use regex::Regex;

/// Which rule found the answer, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extraction {
    /// The last `\boxed{...}` (or `\fbox{...}`), nested braces allowed.
    Boxed,
    /// The rest of the line after the last `####`.
    Hashes,
    /// The text after the last "the answer is" / "answer:".
    AnswerPhrase,
    /// The last number in the text (when enabled).
    LastNumber,
}

impl Extraction {
    /// The name reported in [`Score::matched_by`](crate::Score::matched_by).
    pub fn name(self) -> &'static str {
        match self {
            Extraction::Boxed => "boxed",
            Extraction::Hashes => "hashes",
            Extraction::AnswerPhrase => "answer_phrase",
            Extraction::LastNumber => "last_number",
        }
    }
}

/// Limits and switches of the extractor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtractLimits {
    pub scan_tail_bytes: usize,
    pub max_answer_bytes: usize,
    pub last_number_fallback: bool,
}

/// The last `n` bytes of `s`, moved forward to a character boundary.
pub(crate) fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

static ANSWER_PHRASE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?-u:\b)answer\s*(?:is\s*:?|:|=)")
        .unwrap_or_else(|e| unreachable!("static regex: {e}"))
});

/// A number as it appears in running text: sign, thousands separators, decimals, a fraction,
/// an exponent, a percent sign.
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[-−]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)(?:/[0-9]+)?(?:[eE][-+]?[0-9]+)?(?:\s*%)?",
    )
    .unwrap_or_else(|e| unreachable!("static regex: {e}"))
});

/// Finds the final answer of a completion.
pub(crate) fn extract<'a>(text: &'a str, lim: &ExtractLimits) -> Option<(&'a str, Extraction)> {
    let t = tail(text, lim.scan_tail_bytes);
    if let Some(a) = last_boxed(t, lim.max_answer_bytes) {
        return Some((a, Extraction::Boxed));
    }
    if let Some(a) = after_hashes(t) {
        return (a.len() <= lim.max_answer_bytes).then_some((a, Extraction::Hashes));
    }
    if let Some(a) = after_answer_phrase(t) {
        if a.len() <= lim.max_answer_bytes {
            return Some((a, Extraction::AnswerPhrase));
        }
    }
    if lim.last_number_fallback {
        if let Some(m) = NUMBER.find_iter(t).last() {
            return Some((m.as_str(), Extraction::LastNumber));
        }
    }
    None
}

/// Finds the answer inside a reference: after `####`, else inside `\boxed{}`, else the whole
/// (trimmed) reference.
pub(crate) fn extract_reference<'a>(reference: &'a str, lim: &ExtractLimits) -> &'a str {
    let t = tail(reference, lim.scan_tail_bytes);
    if let Some(a) = after_hashes(t) {
        return a;
    }
    if let Some(a) = last_boxed(t, lim.max_answer_bytes) {
        return a;
    }
    reference.trim()
}

/// The content of the last well-formed `\boxed{...}` / `\fbox{...}` / `\boxed N`.
pub(crate) fn last_boxed(t: &str, max_len: usize) -> Option<&str> {
    let mut end = t.len();
    loop {
        let head = &t[..end];
        let b = head.rfind("\\boxed");
        let f = head.rfind("\\fbox");
        let (pos, kw) = match (b, f) {
            (Some(b), Some(f)) if f > b => (f, 5),
            (Some(b), _) => (b, 6),
            (None, Some(f)) => (f, 5),
            (None, None) => return None,
        };
        let rest = &t[pos + kw..];
        if let Some(inner) = rest.strip_prefix('{') {
            if let Some(close) = matching_brace(inner, max_len) {
                let a = inner[..close].trim();
                if !a.is_empty() {
                    return Some(a);
                }
            }
        } else if let Some(r) = rest.strip_prefix(' ') {
            // `\boxed 5`: one token.
            let tok = r
                .split(|c: char| c.is_whitespace() || c == '$')
                .next()
                .unwrap_or("");
            if !tok.is_empty() && tok.len() <= max_len {
                return Some(tok);
            }
        }
        end = pos;
    }
}

/// Index (in `s`) of the `}` closing an already-opened brace, scanning at most `max_len` bytes.
pub(crate) fn matching_brace(s: &str, max_len: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.bytes().enumerate() {
        if i > max_len {
            return None;
        }
        match c {
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The rest of the line after the last `####`, if non-empty.
pub(crate) fn after_hashes(t: &str) -> Option<&str> {
    let pos = t.rfind("####")?;
    let rest = t[pos + 4..].trim_start_matches('#');
    let line = rest.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let a = line.trim();
    (!a.is_empty()).then_some(a)
}

/// The sentence after the last "answer is" / "answer:".
pub(crate) fn after_answer_phrase(t: &str) -> Option<&str> {
    let m = ANSWER_PHRASE.find_iter(t).last()?;
    let rest = t[m.end()..].trim_start_matches(|c: char| c.is_whitespace() || c == '*');
    let line = rest.lines().next().unwrap_or("");
    // End of sentence: a period followed by whitespace or the end (not a decimal point).
    let bytes = line.as_bytes();
    let mut cut = line.len();
    for (i, &c) in bytes.iter().enumerate() {
        if c == b'.' && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace()) {
            cut = i;
            break;
        }
    }
    let a = line[..cut].trim().trim_end_matches('*').trim();
    (!a.is_empty()).then_some(a)
}
