//! The JSON Lines protocol between the server and an external reward process.
//!
//! One request per line on the module's stdin, one response per line on its stdout:
//!
//! ```text
//! -> {"id": 7, "samples": [{"prompt": "...", "completion": "...", "reference": "...", "metadata": {}}]}
//! <- {"id": 7, "results": [{"score": 1.0, "extracted": "42", "matched_by": "hashes"}, {"error": "why"}]}
//! ```
//!
//! `results` has one entry per sample, in order; an entry is either a finite `score` (with
//! optional `extracted`, `matched_by`, `details`) or an `error` string, which marks that sample
//! failed. The module must flush after each response line and exit when stdin closes. Its stderr
//! is passed through to the server's stderr (use it for logs; stdout is the protocol only).

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::RewardError;
use crate::reward::{Reward, Sample, Score};

/// A request line (module side).
#[derive(Debug, Deserialize)]
struct Request {
    id: u64,
    samples: Vec<Sample>,
}

/// A request line (server side, borrowing the samples).
#[derive(Serialize)]
pub(crate) struct RequestRef<'a> {
    pub id: u64,
    pub samples: &'a [Sample],
}

/// A response line.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    pub id: u64,
    pub results: Vec<WireResult>,
}

/// One result of a response.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WireResult {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub score: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WireResult {
    pub(crate) fn from_result(r: Result<Score, RewardError>) -> Self {
        match r {
            Ok(s) => WireResult {
                score: Value::from(s.value),
                extracted: s.extracted,
                matched_by: s.matched_by,
                details: s.details,
                error: None,
            },
            Err(e) => WireResult {
                error: Some(e.to_string()),
                ..WireResult::default()
            },
        }
    }

    pub(crate) fn into_result(self) -> Result<Score, RewardError> {
        if let Some(e) = self.error {
            return Err(RewardError::Module(e));
        }
        let value = match self.score {
            Value::Number(n) => n.as_f64().ok_or_else(|| {
                RewardError::Protocol(format!("score {n} is not representable as f64"))
            })?,
            // Written by `sanitize_non_finite` for NaN / Infinity tokens.
            Value::String(s) if matches!(s.as_str(), "NaN" | "Infinity" | "-Infinity") => {
                return Err(RewardError::NonFiniteScore(s))
            }
            Value::Null => {
                return Err(RewardError::Protocol(
                    "a result has neither `score` nor `error`".into(),
                ))
            }
            other => {
                return Err(RewardError::Protocol(format!(
                    "`score` must be a number, got {other}"
                )))
            }
        };
        Score {
            value,
            extracted: self.extracted,
            matched_by: self.matched_by,
            details: self.details,
        }
        .checked()
    }
}

/// Rewrites the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings (which some JSON
/// writers emit for non-finite floats) into the strings `"NaN"`, `"Infinity"`, `"-Infinity"`,
/// so that the line parses and the affected samples are reported as non-finite. Returns `None`
/// when there is no such token.
pub(crate) fn sanitize_non_finite(line: &str) -> Option<String> {
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len() + 8);
    let (mut i, mut last, mut in_str) = (0usize, 0usize, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 2,
                b'"' => {
                    in_str = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let tok = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| b[i..].starts_with(t.as_bytes()));
        match tok {
            Some(tok) => {
                // `i` is at an ASCII byte, hence a char boundary.
                out.push_str(&line[last..i]);
                out.push('"');
                out.push_str(tok);
                out.push('"');
                i += tok.len();
                last = i;
            }
            None => i += 1,
        }
    }
    if last == 0 {
        return None;
    }
    out.push_str(&line[last..]);
    Some(out)
}

/// Runs the module side of the protocol: reads requests from `input` until it closes, scores
/// each batch with `reward`, writes one response line per request and flushes it.
///
/// This is all a reward module written in Rust needs (see the `reward-rs-process` example).
/// A request that is not valid JSON is an error: the server never sends one, so the stream
/// cannot be trusted any more.
pub fn serve_module<R: BufRead, W: Write>(
    mut input: R,
    mut output: W,
    reward: &dyn Reward,
) -> io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")))?;
        let results = reward
            .score_batch(&req.samples)
            .into_iter()
            .map(WireResult::from_result)
            .collect();
        let resp = Response {
            id: req.id,
            results,
        };
        serde_json::to_writer(&mut output, &resp).map_err(io::Error::other)?;
        output.write_all(b"\n")?;
        output.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_rewrites_only_bare_tokens() {
        assert_eq!(
            sanitize_non_finite(r#"{"id":1,"results":[{"score":1.0}]}"#),
            None
        );
        let s = sanitize_non_finite(
            r#"{"score": NaN, "x": [Infinity, -Infinity], "t": "NaN Infinity \" NaN"}"#,
        );
        assert_eq!(
            s.as_deref(),
            Some(r#"{"score": "NaN", "x": ["Infinity", "-Infinity"], "t": "NaN Infinity \" NaN"}"#)
        );
    }

    #[test]
    fn serve_module_round_trip() {
        let input =
            b"{\"id\": 3, \"samples\": [{\"completion\": \"ab\", \"reference\": \"r\"}]}\n\n";
        let mut out = Vec::new();
        let len = |s: &Sample| Ok(Score::new(s.completion.len() as f64));
        serve_module(&input[..], &mut out, &len).expect("serves");
        let resp: Response = serde_json::from_slice(&out).expect("one response");
        assert_eq!(resp.id, 3);
        let r: Vec<_> = resp
            .results
            .into_iter()
            .map(WireResult::into_result)
            .collect();
        assert_eq!(r, vec![Ok(Score::new(2.0))]);
        let e = serve_module(&b"garbage\n"[..], &mut Vec::new(), &len).expect_err("bad request");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
