//! Refusals a careful grader makes after the answer is found: an answer the completion
//! retracts, several different boxed answers offered as alternatives, and a `####` answer
//! followed by an invented new question.

use std::sync::LazyLock;

use regex::Regex;

use super::extract::last_boxed;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| unreachable!("static regex {pattern}: {e}"))
}

/// Phrases that take back what came before.
static RETRACTION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:wait\b|hold on\b|scratch that|oops|(?:that|this|it)(?:'s| is| was) (?:wrong|incorrect|not (?:right|correct))|i made an? (?:mistake|error)|(?:is|was) (?:wrong|incorrect)\b)",
    )
});

/// Phrases that confirm an answer after a pause (`wait, let me check ... yes, correct`).
static CONFIRMATION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)\b(?:correct|confirm(?:s|ed)?|checks out|verified|is right|consistent)\b")
});

/// A new problem after the answer: a label line or a sentence ending in `?`.
static NEW_QUESTION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?im)(?:^\s*(?:question|problem|q|user|human|instruction)\s*\d*\s*[:.]|\?)")
});

/// Words between two boxed answers that make the later one a revision, not an alternative.
static REVISION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:then|so|therefore|thus|hence|final(?:ly)?|actually|instead|wait|correct(?:ed|ion)?|answer|but|no)\b",
    )
});

/// Byte offset of `inner` (a sub-slice of `outer`) in `outer`.
pub(crate) fn offset_in(outer: &str, inner: &str) -> Option<usize> {
    let off = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (off + inner.len() <= outer.len()).then_some(off)
}

/// Where the text after an answer retracts it: the end of the last retraction phrase, when
/// nothing confirms the answer after it.
pub(crate) fn retraction(after: &str) -> Option<usize> {
    // The shortest phrase is `oops`; most answers end the text or a sentence.
    if after.trim().len() < 4 {
        return None;
    }
    let m = RETRACTION.find_iter(after).last()?;
    (!CONFIRMATION.is_match(&after[m.end()..])).then_some(m.end())
}

/// True when text after the first `####` answer line asks a new question.
pub(crate) fn invented_question(t: &str) -> bool {
    let Some(pos) = t.find("####") else {
        return false;
    };
    let rest = &t[pos..];
    let after_line = rest.find('\n').map_or("", |i| &rest[i..]);
    !after_line.trim().is_empty() && NEW_QUESTION.is_match(after_line)
}

/// The boxed answers offered together with the last one (`\boxed{3} or \boxed{4}`), last
/// first; a single element when the last boxed answer stands alone.
pub(crate) fn boxed_alternatives<'a>(t: &'a str, last: &'a str, max_len: usize) -> Vec<&'a str> {
    let mut out = vec![last];
    let Some(mut content_start) = offset_in(t, last) else {
        return out;
    };
    for _ in 0..8 {
        // The command right before the content (`\boxed{`, `\fbox{`, `\boxed `).
        let head = &t[..content_start];
        let Some(cmd) = ["\\boxed{", "\\fbox{", "\\boxed "]
            .iter()
            .find_map(|k| head.strip_suffix(k).map(str::len))
        else {
            break;
        };
        // An alternative closes its box within a few bytes before this one.
        let near = t[..cmd].trim_end_matches([' ', '$', ',', ';', '\\', 'q', 'u', 'a', 'd']);
        let near_start = near.len().saturating_sub(40);
        if !near.is_char_boundary(near_start) || !near[near_start..].contains('}') {
            break;
        }
        let before = &t[..cmd];
        let Some(prev) = last_boxed(before, max_len) else {
            break;
        };
        let Some(prev_start) = offset_in(t, prev) else {
            break;
        };
        let between = &t[prev_start + prev.len()..cmd];
        let between = between.trim_start_matches(['}', '$', ' ']);
        if between.len() > 40 || REVISION.is_match(between) || between.contains('\n') {
            break;
        }
        out.push(prev);
        content_start = prev_start;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retractions_and_confirmations() {
        assert!(retraction(". Wait, that's wrong.").is_some());
        assert!(retraction(". Hmm, I made a mistake above.").is_some());
        assert!(retraction(". Wait, let me verify: 2 + 3 = 5. Yes, correct.").is_none());
        assert!(retraction(".").is_none());
    }

    #[test]
    fn invented_questions_after_hashes() {
        assert!(invented_question("#### 18\n\nQuestion: Tom has 3 apples."));
        assert!(invented_question(
            "#### 18\nTom has 3 apples. How many are left?"
        ));
        assert!(!invented_question("#### 18\n"));
        assert!(!invented_question("Is it 18? Yes.\n#### 18"));
    }

    #[test]
    fn alternatives_are_boxed_answers_side_by_side() {
        let t = "so \\boxed{3} or \\boxed{4}";
        let last = last_boxed(t, 512).expect("boxed");
        assert_eq!(boxed_alternatives(t, last, 512), vec!["4", "3"]);
        let t = "first \\boxed{3}, then \\boxed{4}";
        let last = last_boxed(t, 512).expect("boxed");
        assert_eq!(boxed_alternatives(t, last, 512), vec!["4"]);
    }
}
