//! The JSON Lines source.

use std::path::Path;

use serde_json::{Map, Value};

use super::answer::split_answer;
use super::{DatasetError, Problem, SkipReason, Skipped};

/// Which fields to read, and whether a bad line is fatal.
pub(crate) struct Fields<'a> {
    pub question: &'a str,
    pub answer: &'a str,
    pub strict: bool,
}

/// Loads the problems of a JSON Lines file; bad lines are skipped (or fatal when strict).
pub(crate) fn load(
    path: &Path,
    fields: &Fields<'_>,
) -> Result<(Vec<Problem>, Vec<Skipped>), DatasetError> {
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    if bytes.trim_ascii_start().starts_with(b"[") {
        return Err(DatasetError::JsonArray(path.to_path_buf()));
    }
    let stem = path
        .file_stem()
        .map_or_else(|| "line".into(), |s| s.to_string_lossy().into_owned());
    let mut problems = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.trim_ascii();
        if raw.is_empty() {
            continue;
        }
        match parse_line(raw, fields) {
            Ok((id, question, (answer, solution))) => problems.push(Problem {
                id: id.unwrap_or_else(|| format!("{stem}-{line}")),
                question,
                answer,
                solution,
            }),
            Err(reason) if fields.strict => {
                return Err(DatasetError::BadRecord {
                    path: path.to_path_buf(),
                    line,
                    reason,
                })
            }
            Err(reason) => skipped.push(Skipped {
                path: path.to_path_buf(),
                line,
                reason,
            }),
        }
    }
    Ok((problems, skipped))
}

type Parsed = (Option<String>, String, (String, Option<String>));

fn parse_line(raw: &[u8], fields: &Fields<'_>) -> Result<Parsed, SkipReason> {
    let text = std::str::from_utf8(raw).map_err(|_| SkipReason::InvalidUtf8)?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| SkipReason::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(SkipReason::NotAnObject);
    };
    let question = match field(&obj, fields.question)? {
        Value::String(q) => q.trim().to_string(),
        other => {
            return Err(SkipReason::WrongType {
                field: fields.question.to_string(),
                found: type_name(other),
                expected: "a string",
            })
        }
    };
    if question.is_empty() {
        return Err(SkipReason::EmptyQuestion);
    }
    let answer = match field(&obj, fields.answer)? {
        Value::String(a) => split_answer(a)?,
        Value::Number(n) => split_answer(&n.to_string())?,
        other => {
            return Err(SkipReason::WrongType {
                field: fields.answer.to_string(),
                found: type_name(other),
                expected: "a string or a number",
            })
        }
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok((id, question, answer))
}

/// The field `name`; absent and `null` are both missing.
fn field<'v>(obj: &'v Map<String, Value>, name: &str) -> Result<&'v Value, SkipReason> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(SkipReason::MissingField(name.to_string())),
        Some(v) => Ok(v),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
