//! The task envelope: stream entry fields <-> task, with validation.
//!
//! A stream entry is a flat list of plain fields, readable in `redis-cli`:
//!
//! | field        | value                                            |
//! |--------------|--------------------------------------------------|
//! | `id`         | task id (generated or the caller's business id)  |
//! | `type`       | task type, selects the handler                   |
//! | `payload`    | JSON text                                        |
//! | `attempt`    | runs already failed, 0 on the first delivery     |
//! | `max_retry`  | retries allowed after the first run              |
//! | `timeout`    | seconds (decimal text), 0 = none                 |
//! | `enqueued_at`| ms since the Unix epoch                          |
//! | `deadline`   | optional, ms since the Unix epoch                |
//! | `labels`     | optional, JSON object of strings                 |
//! | `unique_key` | optional                                         |
//! | `error`      | optional, the last failure's text                |
//! | `idempotent` | optional, "1" when `id` is the caller's own      |
//! | `result_ttl` | optional, seconds to keep the outcome (decimal)  |
//! | `retention`  | optional, seconds to keep a summary once it ended (decimal) |
//!
//! Unknown fields are kept as they are.

use std::fmt;

use bytes::Bytes;

/// Field names, in one place.
pub mod field {
    /// Task id.
    pub const ID: &str = "id";
    /// Task type.
    pub const TYPE: &str = "type";
    /// JSON payload text.
    pub const PAYLOAD: &str = "payload";
    /// Failed runs so far.
    pub const ATTEMPT: &str = "attempt";
    /// Retries allowed.
    pub const MAX_RETRY: &str = "max_retry";
    /// Hard timeout in seconds.
    pub const TIMEOUT: &str = "timeout";
    /// Enqueue time, ms.
    pub const ENQUEUED_AT: &str = "enqueued_at";
    /// Deadline, ms.
    pub const DEADLINE: &str = "deadline";
    /// Labels JSON.
    pub const LABELS: &str = "labels";
    /// Uniqueness key.
    pub const UNIQUE_KEY: &str = "unique_key";
    /// Last error text.
    pub const ERROR: &str = "error";
    /// "1" when the id is the caller's (then a done marker guards re-runs).
    pub const IDEMPOTENT: &str = "idempotent";
    /// Seconds the task's outcome is kept once it ended (absent = not kept).
    pub const RESULT_TTL: &str = "result_ttl";
    /// Seconds a summary of the task is kept once it ended.
    pub const RETENTION: &str = "retention";
    /// Dead letters: why the task died (`error`, `timeout`, `poison`, ...).
    pub const REASON: &str = "reason";
    /// Dead letters: the last failure's traceback.
    pub const TRACEBACK: &str = "traceback";
    /// Dead letters: runs made.
    pub const ATTEMPTS: &str = "attempts";
    /// Dead letters: when the task died, ms.
    pub const FAILED_AT: &str = "failed_at";
    /// Dead letters: the task's entry id in its stream.
    pub const ORIGIN_ID: &str = "origin_id";
    /// Dead letters: a delayed member that was not a task, as it was.
    pub const RAW: &str = "raw";
}

/// Longest task id (bytes). Ids travel with every delivery and name keys
/// (done markers), so they are kept short; the client refuses longer ones
/// and a hand-written entry with one is dead-lettered.
pub const MAX_ID_BYTES: usize = 1024;
/// Longest task type (bytes).
pub const MAX_TYPE_BYTES: usize = 1024;

/// Fields a dead letter adds to the task's own; never copied from a task
/// (they are written anew) nor carried into its next run.
pub const DEAD_LETTER_FIELDS: [&str; 7] = [
    field::ERROR,
    field::TRACEBACK,
    field::REASON,
    field::ATTEMPTS,
    field::FAILED_AT,
    field::ORIGIN_ID,
    field::RAW,
];

/// A stream entry as read from Redis: its stream id and raw fields. The
/// bytes are views into the read buffer (no copy per field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// Stream entry id (`<ms>-<seq>`).
    pub entry_id: Bytes,
    /// Field/value pairs in stream order.
    pub fields: Vec<(Bytes, Bytes)>,
}

impl RawEntry {
    /// Value of `name`, if present.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(key, _)| key == name.as_bytes())
            .map(|(_, value)| value.as_ref())
    }

    /// The entry id as text (ids are ASCII `<ms>-<seq>`).
    #[must_use]
    pub fn id_text(&self) -> &str {
        std::str::from_utf8(&self.entry_id).unwrap_or("?")
    }
}

/// Why an entry is not a valid task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError {
    /// The field at fault.
    pub field: &'static str,
    /// What was wrong.
    pub problem: String,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "field '{}': {}", self.field, self.problem)
    }
}

impl std::error::Error for EnvelopeError {}

/// A validated view of a task entry, borrowing from the `RawEntry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef<'a> {
    /// Task id.
    pub id: &'a str,
    /// Task type.
    pub kind: &'a str,
    /// JSON payload bytes (validated by the actor's decoder).
    pub payload: &'a [u8],
    /// Failed runs so far.
    pub attempt: u32,
    /// Retries allowed.
    pub max_retry: u32,
    /// Hard timeout in ms, 0 = none.
    pub timeout_ms: u64,
    /// Enqueue time, ms since the epoch.
    pub enqueued_at_ms: u64,
    /// Deadline, ms since the epoch.
    pub deadline_ms: Option<u64>,
    /// Labels JSON text.
    pub labels: Option<&'a [u8]>,
    /// Uniqueness key.
    pub unique_key: Option<&'a str>,
    /// Whether a done marker guards this id against re-runs.
    pub idempotent: bool,
    /// How long its outcome is kept once it ended, ms (0 = not kept).
    pub result_ttl_ms: u64,
    /// How long a summary of it is kept once it ended, ms (0 = not kept).
    pub retention_ms: u64,
}

fn shown(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    if text.chars().count() > 40 {
        let cut: String = text.chars().take(40).collect();
        format!("'{cut}…'")
    } else {
        format!("'{text}'")
    }
}

/// The fields a task has, found in one pass over the entry.
#[derive(Default)]
struct Found<'a> {
    id: Option<&'a [u8]>,
    kind: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    attempt: Option<&'a [u8]>,
    max_retry: Option<&'a [u8]>,
    timeout: Option<&'a [u8]>,
    enqueued_at: Option<&'a [u8]>,
    deadline: Option<&'a [u8]>,
    labels: Option<&'a [u8]>,
    unique_key: Option<&'a [u8]>,
    idempotent: Option<&'a [u8]>,
    result_ttl: Option<&'a [u8]>,
    retention: Option<&'a [u8]>,
    /// Index of the `type` field in the entry.
    kind_at: usize,
}

impl<'a> Found<'a> {
    fn scan(entry: &'a RawEntry) -> Self {
        let mut found = Self::default();
        for (at, (name, value)) in entry.fields.iter().enumerate() {
            let slot = match name.as_ref() {
                b"id" => &mut found.id,
                b"type" => {
                    if found.kind.is_none() {
                        found.kind_at = at;
                    }
                    &mut found.kind
                }
                b"payload" => &mut found.payload,
                b"attempt" => &mut found.attempt,
                b"max_retry" => &mut found.max_retry,
                b"timeout" => &mut found.timeout,
                b"enqueued_at" => &mut found.enqueued_at,
                b"deadline" => &mut found.deadline,
                b"labels" => &mut found.labels,
                b"unique_key" => &mut found.unique_key,
                b"idempotent" => &mut found.idempotent,
                b"result_ttl" => &mut found.result_ttl,
                b"retention" => &mut found.retention,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.as_ref());
            }
        }
        found
    }
}

fn required<'a>(value: Option<&'a [u8]>, name: &'static str) -> Result<&'a [u8], EnvelopeError> {
    value.ok_or_else(|| EnvelopeError {
        field: name,
        problem: "missing".to_owned(),
    })
}

fn text<'a>(value: &'a [u8], name: &'static str) -> Result<&'a str, EnvelopeError> {
    std::str::from_utf8(value).map_err(|_| EnvelopeError {
        field: name,
        problem: format!("expected UTF-8 text, got {}", shown(value)),
    })
}

fn non_empty<'a>(value: Option<&'a [u8]>, name: &'static str) -> Result<&'a str, EnvelopeError> {
    let value = text(required(value, name)?, name)?;
    if value.is_empty() {
        return Err(EnvelopeError {
            field: name,
            problem: "expected a non-empty string".to_owned(),
        });
    }
    Ok(value)
}

fn bounded<'a>(value: &'a str, name: &'static str, max: usize) -> Result<&'a str, EnvelopeError> {
    if value.len() > max {
        return Err(EnvelopeError {
            field: name,
            problem: format!(
                "longer than {max} bytes ({} bytes, starting {})",
                value.len(),
                shown(value.as_bytes())
            ),
        });
    }
    Ok(value)
}

fn integer<T: std::str::FromStr>(value: &[u8], name: &'static str) -> Result<T, EnvelopeError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<T>().ok())
        .ok_or_else(|| EnvelopeError {
            field: name,
            problem: format!("expected a non-negative integer, got {}", shown(value)),
        })
}

fn optional_integer<T: std::str::FromStr>(
    value: Option<&[u8]>,
    name: &'static str,
    default: T,
) -> Result<T, EnvelopeError> {
    value.map_or(Ok(default), |value| integer(value, name))
}

/// Parses seconds as decimal text ("30", "2.5") into ms.
fn seconds_ms(value: &[u8], name: &'static str) -> Result<u64, EnvelopeError> {
    let seconds = std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .ok_or_else(|| EnvelopeError {
            field: name,
            problem: format!(
                "expected seconds as a non-negative number, got {}",
                shown(value)
            ),
        })?;
    Ok((seconds * 1000.0).round() as u64)
}

/// Formats ms as seconds text, the inverse of the parser above.
#[must_use]
pub fn format_seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
            .trim_end_matches('0')
            .to_owned()
    }
}

/// Validates `entry` as a task, in one pass over its fields.
pub fn parse(entry: &RawEntry) -> Result<TaskRef<'_>, EnvelopeError> {
    parse_indexed(entry).map(|(task, _)| task)
}

/// `parse`, also giving the index of the `type` field in `entry.fields`, so
/// a caller can find the type again without another pass.
pub fn parse_indexed(entry: &RawEntry) -> Result<(TaskRef<'_>, usize), EnvelopeError> {
    let found = Found::scan(entry);
    let id = bounded(non_empty(found.id, field::ID)?, field::ID, MAX_ID_BYTES)?;
    let kind = bounded(
        non_empty(found.kind, field::TYPE)?,
        field::TYPE,
        MAX_TYPE_BYTES,
    )?;
    let payload = required(found.payload, field::PAYLOAD)?;
    let timeout_ms = match found.timeout {
        Some(value) => seconds_ms(value, field::TIMEOUT)?,
        None => 0,
    };
    if let Some(labels) = found.labels {
        if labels.first() != Some(&b'{') {
            return Err(EnvelopeError {
                field: field::LABELS,
                problem: format!("expected a JSON object, got {}", shown(labels)),
            });
        }
    }
    let unique_key = match found.unique_key {
        Some(value) => Some(text(value, field::UNIQUE_KEY)?),
        None => None,
    };
    let task = TaskRef {
        id,
        kind,
        payload,
        attempt: optional_integer(found.attempt, field::ATTEMPT, 0)?,
        max_retry: optional_integer(found.max_retry, field::MAX_RETRY, 0)?,
        timeout_ms,
        enqueued_at_ms: optional_integer(found.enqueued_at, field::ENQUEUED_AT, 0)?,
        deadline_ms: match found.deadline {
            Some(value) => Some(integer(value, field::DEADLINE)?),
            None => None,
        },
        labels: found.labels,
        unique_key,
        idempotent: found.idempotent == Some(b"1"),
        result_ttl_ms: match found.result_ttl {
            Some(value) => seconds_ms(value, field::RESULT_TTL)?,
            None => 0,
        },
        retention_ms: match found.retention {
            Some(value) => seconds_ms(value, field::RETENTION)?,
            None => 0,
        },
    };
    Ok((task, found.kind_at))
}

impl TaskRef<'_> {
    /// The entry's fields, in the order written to the stream. Entries with
    /// the same field names share them in Redis' stream encoding.
    #[must_use]
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut fields = vec![
            (field::ID, self.id.as_bytes().to_vec()),
            (field::TYPE, self.kind.as_bytes().to_vec()),
            (field::PAYLOAD, self.payload.to_vec()),
            (field::ATTEMPT, self.attempt.to_string().into_bytes()),
            (field::MAX_RETRY, self.max_retry.to_string().into_bytes()),
            (field::TIMEOUT, format_seconds(self.timeout_ms).into_bytes()),
            (
                field::ENQUEUED_AT,
                self.enqueued_at_ms.to_string().into_bytes(),
            ),
        ];
        if let Some(deadline) = self.deadline_ms {
            fields.push((field::DEADLINE, deadline.to_string().into_bytes()));
        }
        if let Some(labels) = self.labels {
            fields.push((field::LABELS, labels.to_vec()));
        }
        if let Some(key) = self.unique_key {
            fields.push((field::UNIQUE_KEY, key.as_bytes().to_vec()));
        }
        if self.idempotent {
            fields.push((field::IDEMPOTENT, b"1".to_vec()));
        }
        if self.result_ttl_ms > 0 {
            fields.push((
                field::RESULT_TTL,
                format_seconds(self.result_ttl_ms).into_bytes(),
            ));
        }
        if self.retention_ms > 0 {
            fields.push((
                field::RETENTION,
                format_seconds(self.retention_ms).into_bytes(),
            ));
        }
        fields
    }
}

/// The fields of the next run of `entry`: everything it had, with `attempt`
/// set and `error` holding the last failure (retry state travels with the task).
#[must_use]
pub fn next_run_fields(entry: &RawEntry, attempt: u32, error: &[u8]) -> Vec<(Bytes, Bytes)> {
    let mut fields: Vec<(Bytes, Bytes)> = entry
        .fields
        .iter()
        .filter(|(name, _)| {
            name.as_ref() != field::ATTEMPT.as_bytes()
                && !DEAD_LETTER_FIELDS
                    .iter()
                    .any(|own| own.as_bytes() == name.as_ref())
        })
        .cloned()
        .collect();
    fields.push((
        Bytes::from_static(field::ATTEMPT.as_bytes()),
        Bytes::from(attempt.to_string()),
    ));
    if !error.is_empty() {
        fields.push((
            Bytes::from_static(field::ERROR.as_bytes()),
            Bytes::copy_from_slice(error),
        ));
    }
    fields
}

/// A task's fields as a delayed-ZSET member: a JSON array of strings.
#[must_use]
pub fn delayed_member<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> String {
    let flat: Vec<std::borrow::Cow<'a, str>> = fields
        .into_iter()
        .flat_map(|(name, value)| {
            [
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value),
            ]
        })
        .collect();
    serde_json::to_string(&flat).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            entry_id: Bytes::from_static(b"1-0"),
            fields: fields
                .iter()
                .map(|(key, value)| {
                    (
                        Bytes::copy_from_slice(key.as_bytes()),
                        Bytes::copy_from_slice(value.as_bytes()),
                    )
                })
                .collect(),
        }
    }

    fn round_trip(task: &TaskRef<'_>) -> RawEntry {
        RawEntry {
            entry_id: Bytes::from_static(b"5-0"),
            fields: task
                .to_fields()
                .into_iter()
                .map(|(key, value)| (Bytes::from_static(key.as_bytes()), Bytes::from(value)))
                .collect(),
        }
    }

    #[test]
    fn new_task_fields_parse_back_to_the_same_task() {
        let task = TaskRef {
            id: "abc",
            kind: "email:send",
            payload: br#"{"to":"a@example.com"}"#,
            attempt: 0,
            max_retry: 3,
            timeout_ms: 2500,
            enqueued_at_ms: 1_700_000_000_123,
            deadline_ms: Some(1_700_000_100_000),
            labels: Some(br#"{"tenant":"x"}"#),
            unique_key: Some("u1"),
            idempotent: true,
            result_ttl_ms: 60_500,
            retention_ms: 3_600_000,
        };
        let raw = round_trip(&task);
        assert_eq!(raw.get("result_ttl"), Some(&b"60.5"[..]));
        assert_eq!(raw.get("timeout"), Some(&b"2.5"[..]));
        let parsed = parse(&raw).expect("valid");
        assert_eq!(parsed.id, "abc");
        assert_eq!(parsed.kind, "email:send");
        assert_eq!(parsed.payload, task.payload);
        assert_eq!(parsed.attempt, 0);
        assert_eq!(parsed.max_retry, 3);
        assert_eq!(parsed.timeout_ms, 2500);
        assert_eq!(parsed.enqueued_at_ms, 1_700_000_000_123);
        assert_eq!(parsed.deadline_ms, Some(1_700_000_100_000));
        assert_eq!(parsed.labels, task.labels);
        assert_eq!(parsed.result_ttl_ms, 60_500);
        assert_eq!(parsed.retention_ms, 3_600_000);
        assert_eq!(parsed.unique_key, Some("u1"));
        assert!(parsed.idempotent);
        assert_eq!(parsed, task);
    }

    #[test]
    fn minimal_hand_written_entry_is_valid() {
        let raw = entry(&[("id", "t1"), ("type", "noop"), ("payload", "null")]);
        let parsed = parse(&raw).expect("valid");
        assert_eq!(
            (parsed.attempt, parsed.max_retry, parsed.timeout_ms),
            (0, 0, 0)
        );
    }

    #[test]
    fn errors_name_the_field_and_the_expectation() {
        let cases = [
            (
                entry(&[("type", "noop"), ("payload", "1")]),
                "field 'id': missing",
            ),
            (
                entry(&[("id", "t"), ("type", ""), ("payload", "1")]),
                "field 'type': expected a non-empty string",
            ),
            (
                entry(&[("id", "t"), ("type", "x")]),
                "field 'payload': missing",
            ),
            (
                entry(&[
                    ("id", "t"),
                    ("type", "x"),
                    ("payload", "1"),
                    ("attempt", "-1"),
                ]),
                "field 'attempt': expected a non-negative integer, got '-1'",
            ),
            (
                entry(&[
                    ("id", "t"),
                    ("type", "x"),
                    ("payload", "1"),
                    ("timeout", "soon"),
                ]),
                "field 'timeout': expected seconds as a non-negative number, got 'soon'",
            ),
            (
                entry(&[
                    ("id", "t"),
                    ("type", "x"),
                    ("payload", "1"),
                    ("labels", "[1]"),
                ]),
                "field 'labels': expected a JSON object, got '[1]'",
            ),
        ];
        for (raw, expected) in cases {
            let message = parse(&raw).err().map(|error| error.to_string());
            assert_eq!(message.as_deref(), Some(expected));
        }
    }

    #[test]
    fn ids_and_types_past_their_bound_are_refused() {
        let long = "i".repeat(MAX_ID_BYTES + 1);
        let raw = entry(&[("id", &long), ("type", "x"), ("payload", "1")]);
        let message = parse(&raw).err().map(|error| error.to_string());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m
                    .starts_with("field 'id': longer than 1024 bytes (1025 bytes, starting 'iiii")),
            "{message:?}"
        );
        let raw = entry(&[("id", "t"), ("type", &long), ("payload", "1")]);
        assert_eq!(parse(&raw).err().map(|error| error.field), Some("type"));
        let fits = "i".repeat(MAX_ID_BYTES);
        assert!(parse(&entry(&[("id", &fits), ("type", "x"), ("payload", "1")])).is_ok());
    }

    #[test]
    fn seconds_format_round_trips() {
        for ms in [0, 1, 10, 999, 1000, 1500, 30_000, 123_456] {
            let text = format_seconds(ms);
            assert_eq!(seconds_ms(text.as_bytes(), "timeout"), Ok(ms), "{text}");
        }
        assert_eq!(format_seconds(30_000), "30");
        assert_eq!(format_seconds(1500), "1.5");
    }

    #[test]
    fn next_run_keeps_the_task_and_carries_the_retry_state() {
        let raw = entry(&[
            ("id", "t"),
            ("type", "x"),
            ("payload", "{}"),
            ("attempt", "1"),
            ("error", "old"),
            ("reason", "error"),
            ("custom", "kept"),
        ]);
        let fields = next_run_fields(&raw, 2, b"ValueError: new");
        let next = RawEntry {
            entry_id: Bytes::from_static(b"9-0"),
            fields,
        };
        assert_eq!(next.get("attempt"), Some(&b"2"[..]));
        assert_eq!(next.get("error"), Some(&b"ValueError: new"[..]));
        assert_eq!(next.get("custom"), Some(&b"kept"[..]));
        assert_eq!(next.get("reason"), None);
        assert_eq!(
            next.fields
                .iter()
                .filter(|(name, _)| name == "attempt")
                .count(),
            1
        );
    }

    #[test]
    fn parse_indexed_points_at_the_type_field() {
        let raw = entry(&[("id", "a"), ("payload", "{}"), ("type", "mail")]);
        let (task, at) = parse_indexed(&raw).expect("a valid task");
        assert_eq!(task.kind, "mail");
        assert_eq!(raw.fields[at].1.as_ref(), b"mail");
    }

    #[test]
    fn delayed_member_is_a_json_array_of_the_fields() {
        let member = delayed_member([
            (&b"id"[..], &b"a\"b"[..]),
            (&b"payload"[..], &br#"{"k":[1]}"#[..]),
        ]);
        assert_eq!(member, r#"["id","a\"b","payload","{\"k\":[1]}"]"#);
    }
}
