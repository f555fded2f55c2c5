//! Scoring a JSON Lines file (the engine of `nested-reft score`).

use std::io::{BufRead, Write};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{RewardError, ScoreIoError};
use crate::reward::{Reward, Sample, Score};

/// Totals of a [`score_jsonl`] run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ScoreSummary {
    /// Non-blank input lines.
    pub lines: u64,
    /// Lines that got a score.
    pub scored: u64,
    /// Lines that did not (bad input or a failed reward); each has an `error` in the output.
    pub failed: u64,
    /// Sum of the scores.
    pub total: f64,
}

impl ScoreSummary {
    /// Mean score over the scored lines, if any.
    pub fn mean(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.total / self.scored as f64)
    }
}

/// One output line.
#[derive(Serialize)]
struct OutLine<'a> {
    line: u64,
    score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extracted: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    matched_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    details: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Reads samples (one JSON object per line with `completion` and `reference`, optional
/// `prompt` and `metadata`), scores them in batches of `batch_size` and writes one JSON object
/// per non-blank input line, in order: `{"line": N, "score": x, "extracted": ..., "matched_by":
/// ..., "details": {...}}` or `{"line": N, "score": null, "error": "..."}`.
///
/// A malformed line or a failed sample is reported on its output line and counted; only I/O
/// errors on the streams stop the run.
pub fn score_jsonl<R: BufRead, W: Write>(
    mut input: R,
    mut output: W,
    reward: &dyn Reward,
    batch_size: usize,
) -> Result<ScoreSummary, ScoreIoError> {
    let batch_size = batch_size.max(1);
    let mut summary = ScoreSummary::default();
    // Pending lines: (line number, parsed sample or the parse error).
    let mut pending: Vec<(u64, Result<Sample, String>)> = Vec::new();
    let mut n_ok = 0usize;
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        line_no += 1;
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| ScoreIoError::Read {
                line: line_no,
                source,
            })?;
        if n == 0 {
            break;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match std::str::from_utf8(&buf) {
            Ok(text) => {
                serde_json::from_str::<Sample>(text).map_err(|e| format!("invalid input line: {e}"))
            }
            Err(e) => Err(format!("invalid input line: not UTF-8 ({e})")),
        };
        n_ok += usize::from(parsed.is_ok());
        pending.push((line_no, parsed));
        if n_ok >= batch_size {
            flush(&mut pending, reward, &mut output, &mut summary)?;
            n_ok = 0;
        }
    }
    flush(&mut pending, reward, &mut output, &mut summary)?;
    output.flush().map_err(ScoreIoError::Write)?;
    Ok(summary)
}

fn flush<W: Write>(
    pending: &mut Vec<(u64, Result<Sample, String>)>,
    reward: &dyn Reward,
    output: &mut W,
    summary: &mut ScoreSummary,
) -> Result<(), ScoreIoError> {
    let samples: Vec<Sample> = pending
        .iter_mut()
        .filter_map(|(_, p)| p.as_mut().ok().map(std::mem::take))
        .collect();
    let mut results = reward.score_batch(&samples).into_iter();
    let empty = Map::new();
    for (line, parsed) in pending.drain(..) {
        let result: Result<Score, String> = match parsed {
            Err(e) => Err(e),
            Ok(_) => match results.next() {
                Some(r) => r.map_err(|e| e.to_string()),
                None => Err(
                    RewardError::Protocol("the reward returned too few results".into()).to_string(),
                ),
            },
        };
        summary.lines += 1;
        let out = match &result {
            Ok(s) => {
                summary.scored += 1;
                summary.total += s.value;
                OutLine {
                    line,
                    score: Some(s.value),
                    extracted: s.extracted.as_deref(),
                    matched_by: s.matched_by.as_deref(),
                    details: &s.details,
                    error: None,
                }
            }
            Err(e) => {
                summary.failed += 1;
                OutLine {
                    line,
                    score: None,
                    extracted: None,
                    matched_by: None,
                    details: &empty,
                    error: Some(e.clone()),
                }
            }
        };
        serde_json::to_writer(&mut *output, &out).map_err(|e| ScoreIoError::Write(e.into()))?;
        output.write_all(b"\n").map_err(ScoreIoError::Write)?;
    }
    Ok(())
}
