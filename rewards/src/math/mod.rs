//! The built-in `math` reward: extract the final answer, normalise, compare.

mod exact;
mod expr;
mod extract;
mod guard;
mod number;
mod symbolic;
mod units;
mod value;
mod words;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{Result, RewardError, SpecError};
use crate::reward::{Reward, Sample, Score};
use symbolic::Verdict;
use value::Value;

/// Longest answer compared, whatever `max_answer_bytes` says (bounds the clean-up work).
const MAX_COMPARE_BYTES: usize = 4096;

pub use extract::Extraction;
pub(crate) use extract::{
    after_answer_phrase, after_hashes, extract, last_boxed, tail, ExtractLimits,
};

/// Settings of the `math` reward (all optional in a spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MathConfig {
    /// When no `\boxed{}`, `####` or "the answer is" is found, use the last number.
    pub last_number_fallback: bool,
    /// Relative tolerance for answers that cannot be compared as exact rationals.
    pub rel_tol: f64,
    /// Only this many bytes at the end of a completion are searched.
    pub scan_tail_bytes: usize,
    /// Longer extracted answers are rejected (bounded normalisation work).
    pub max_answer_bytes: usize,
}

impl Default for MathConfig {
    fn default() -> Self {
        Self {
            last_number_fallback: true,
            rel_tol: 1e-6,
            scan_tail_bytes: 8192,
            max_answer_bytes: 512,
        }
    }
}

/// The `math` reward: 1 when the completion's final answer equals the reference, else 0.
///
/// Extraction, in priority order: the last `\boxed{...}` (nested braces), `#### N`,
/// "the answer is ...", then (configurable) the last number. Normalisation handles thousands
/// separators, currency and unit words, percent, signs, trailing zeros, decimals, fractions
/// (`a/b`, `\frac`, `\dfrac`, `\tfrac`), mixed numbers, scientific notation, `\text{}`,
/// `\left( \right)`, `$…$`, intervals and tuples. Numbers compare exactly as rationals when
/// they fit, else within `rel_tol`. Other answers are compared symbolically (expressions,
/// radicals, relations, tuples, intervals, sets, matrices; see the crate README), with every
/// step bounded. Retracted answers, side-by-side boxed alternatives, a `####` answer followed
/// by an invented question and a right number in the wrong unit score 0. The deciding rule is
/// in `details["equivalence"]`. A completion without any answer scores 0 (it is not an
/// error); an empty reference is an error.
#[derive(Debug, Clone, Default)]
pub struct MathReward {
    cfg: MathConfig,
}

impl MathReward {
    /// Builds the reward after validating its settings.
    pub fn new(cfg: MathConfig) -> Result<Self, SpecError> {
        if !(cfg.rel_tol.is_finite() && (0.0..1.0).contains(&cfg.rel_tol)) {
            return Err(SpecError::Invalid(format!(
                "math.rel_tol must be in [0, 1), got {}",
                cfg.rel_tol
            )));
        }
        if cfg.scan_tail_bytes < 16 || cfg.max_answer_bytes == 0 {
            return Err(SpecError::Invalid(
                "math.scan_tail_bytes must be at least 16 and math.max_answer_bytes at least 1"
                    .into(),
            ));
        }
        Ok(Self { cfg })
    }

    fn limits(&self) -> ExtractLimits {
        ExtractLimits {
            scan_tail_bytes: self.cfg.scan_tail_bytes,
            max_answer_bytes: self.cfg.max_answer_bytes,
            last_number_fallback: self.cfg.last_number_fallback,
        }
    }

    /// The final answer the reward would extract from `completion`, and by which rule.
    pub fn extract_answer<'a>(&self, completion: &'a str) -> Option<(&'a str, Extraction)> {
        extract(completion, &self.limits())
    }

    /// True when two answer strings are equivalent under this reward's normalisation.
    pub fn answers_match(&self, a: &str, b: &str) -> bool {
        self.compare(a, b).equal
    }

    /// Like [`answers_match`](Self::answers_match), also naming the rule that decided
    /// (`number`, `percent`, `number_words`, `unit_mismatch`, `units`, `text`, `tuple`, `set`,
    /// `exact`, `radical`, `numeric_eval`, `symbolic`, `equation`, `interval`, `matrix`,
    /// `vector`, `too_long`, `no_match`).
    pub fn explain_match(&self, a: &str, b: &str) -> (bool, &'static str) {
        let v = self.compare(a, b);
        (v.equal, v.rule)
    }

    fn compare(&self, a: &str, b: &str) -> Verdict {
        let m = self.cfg.max_answer_bytes.min(MAX_COMPARE_BYTES);
        if a.len() > m || b.len() > m {
            return Verdict::new(false, "too_long");
        }
        let (ca, cb) = (value::clean(a, m), value::clean(b, m));
        let (va, vb) = (value::parse(&ca), value::parse(&cb));
        // Fast path: two numbers decide on their own.
        if let (Value::Number { percent: pa, .. }, Value::Number { percent: pb, .. }) = (&va, &vb) {
            if !value::equivalent(&va, &vb, self.cfg.rel_tol) {
                return Verdict::new(false, "number");
            }
            if has_letter(&ca) && has_letter(&cb) {
                if let (Some(ua), Some(ub)) = (units::leading_unit(&ca), units::leading_unit(&cb)) {
                    if ua != ub {
                        return Verdict::new(false, "unit_mismatch");
                    }
                }
            }
            let rule = if pa != pb {
                "percent"
            } else if starts_with_letter(&ca) || starts_with_letter(&cb) {
                "number_words"
            } else {
                "number"
            };
            return Verdict::new(true, rule);
        }
        if value::equivalent(&va, &vb, self.cfg.rel_tol) {
            let rule = match va {
                Value::Tuple { .. } => "tuple",
                Value::List(_) => "set",
                Value::Text(_) => "text",
                Value::Number { .. } | Value::Infinity(_) => "number",
            };
            return Verdict::new(true, rule);
        }
        if let Some(v) = self
            .compound(&ca, &cb, &vb)
            .or_else(|| self.compound(&cb, &ca, &va))
        {
            return v;
        }
        let (sa, sb) = (
            value::clean_with(a, m, false),
            value::clean_with(b, m, false),
        );
        symbolic::compare(&sa, &sb).unwrap_or(Verdict::new(false, "no_match"))
    }

    /// `2 hours and 30 minutes` against `2.5 hours`: converted to the other side's unit when
    /// the compound starts with it.
    fn compound(&self, compound: &str, other: &str, other_value: &Value) -> Option<Verdict> {
        let Value::Number { value, .. } = other_value else {
            return None;
        };
        let (total, unit) = units::compound(compound)?;
        let other_unit = units::leading_unit(other)?;
        if other_unit != unit {
            return Some(Verdict::new(false, "unit_mismatch"));
        }
        Some(Verdict::new(
            total.equals(*value, self.cfg.rel_tol),
            "units",
        ))
    }
}

fn has_letter(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_alphabetic())
}

fn starts_with_letter(s: &str) -> bool {
    s.trim_start_matches('-')
        .starts_with(|c: char| c.is_ascii_alphabetic())
}

impl Reward for MathReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        let lim = self.limits();
        let reference = extract::extract_reference(&sample.reference, &lim);
        if reference.is_empty() {
            return Err(RewardError::InvalidSample(
                "the reference answer is empty".into(),
            ));
        }
        if reference.len() > lim.max_answer_bytes {
            return Err(RewardError::InvalidSample(format!(
                "the reference answer is {} bytes long (limit {}); give the bare answer or end a worked solution with `#### answer`",
                reference.len(),
                lim.max_answer_bytes
            )));
        }
        let mut score = Score::new(0.0);
        score
            .details
            .insert("reference".into(), Json::String(reference.to_string()));
        let Some((mut answer, mut by)) = extract(&sample.completion, &lim) else {
            return Ok(score);
        };
        let text = tail(&sample.completion, lim.scan_tail_bytes);
        let verdict = 'judge: {
            if by == Extraction::Hashes && guard::invented_question(text) {
                break 'judge Verdict::new(false, "invented_question");
            }
            // An answer taken back later: use a revised answer when one follows, else refuse.
            let after = guard::offset_in(text, answer).map_or("", |o| &text[o + answer.len()..]);
            if let Some(cut) = guard::retraction(after) {
                let revised = &after[cut..];
                let again = last_boxed(revised, lim.max_answer_bytes)
                    .map(|a| (a, Extraction::Boxed))
                    .or_else(|| after_answer_phrase(revised).map(|a| (a, Extraction::AnswerPhrase)))
                    .filter(|(a, _)| a.len() <= lim.max_answer_bytes);
                match again {
                    Some((a, b)) => {
                        (answer, by) = (a, b);
                        score.details.insert("revised".into(), Json::Bool(true));
                    }
                    None => break 'judge Verdict::new(false, "retracted"),
                }
            }
            if by == Extraction::Boxed {
                let alts = guard::boxed_alternatives(text, answer, lim.max_answer_bytes);
                if alts.iter().skip(1).any(|a| !self.answers_match(a, answer)) {
                    // Several answers for a reference with as many parts: compare them together.
                    let joined: Vec<&str> = alts.iter().rev().copied().collect();
                    let joined = joined.join(", ");
                    let v = self.compare(&joined, reference);
                    break 'judge if v.equal {
                        Verdict::new(true, "multiple_boxed_parts")
                    } else {
                        Verdict::new(false, "multiple_boxed")
                    };
                }
            }
            self.compare(answer, reference)
        };
        if verdict.equal {
            score.value = 1.0;
        }
        score
            .details
            .insert("equivalence".into(), Json::String(verdict.rule.to_string()));
        score.extracted = Some(answer.to_string());
        score.matched_by = Some(by.name().to_string());
        Ok(score)
    }
}
