//! Task-history events: what an engine records of each task's lifecycle
//! when it runs with `history`, for its history process to write into
//! `PostgreSQL`.
//!
//! Events travel in the queue's events stream (`Keys::events`), one entry
//! per outcome write: fields `n` (how many events) and `events`, a JSON
//! array of objects, readable in redis-cli. Each object has short keys:
//!
//! | key | meaning |
//! |---|---|
//! | `e` | event: `enqueued`, `started`, `succeeded`, `failed`, `retried`, `dead`, `cancelled` |
//! | `id` | task id |
//! | `a` | attempt (failed runs before this one) |
//! | `t` | when, ms since the epoch |
//! | `w` | the engine (consumer name) |
//! | `k`, `p`, `l`, `q`, `m` | type, payload (JSON text), labels (JSON text), enqueued at (ms), max retries |
//! | `d` | run time, ms (from the hand-over to the actor to the outcome) |
//! | `v` | the return value (JSON text) |
//! | `x`, `tb`, `r` | error text, traceback, reason (`error`, `timeout`, `rejected`, ...) |
//! | `u` | when the retry is due, ms |
//! | `c` | the fields cut to `MAX_FIELD_BYTES`, as a list of keys |
//!
//! Texts are JSON strings (a payload that is not valid JSON still makes a
//! valid event), cut to `MAX_FIELD_BYTES` at a character boundary.

use std::borrow::Cow;

use crate::outcome::clip;

/// Longest payload, result, error or traceback an event carries (bytes);
/// a longer one is cut, and the event says so (`c`).
pub const MAX_FIELD_BYTES: usize = crate::outcome::MAX_TEXT_BYTES;

/// The events of one queue, waiting to be written: the inside of a JSON
/// array (objects separated by commas) and how many there are.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Events {
    /// Objects separated by commas, without the brackets.
    pub body: Vec<u8>,
    /// Objects in `body`.
    pub count: u32,
}

impl Events {
    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `other`'s events after these.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "merged like the other outcome fields, which are moved"
    )]
    pub fn merge(&mut self, other: Self) {
        if other.count == 0 {
            return;
        }
        if self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(&other.body);
        self.count += other.count;
    }

    /// The events as a JSON array.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = Vec::with_capacity(self.body.len() + 2);
        json.push(b'[');
        json.extend_from_slice(&self.body);
        json.push(b']');
        json
    }

    /// Starts an event: `{"e":…,"id":…,"a":…,"t":…,"w":…`. Close it with
    /// [`Event::end`].
    pub fn begin<'a>(
        &'a mut self,
        event: &str,
        id: &[u8],
        attempt: u32,
        at_ms: u64,
        worker: &str,
    ) -> Event<'a> {
        if self.count > 0 {
            self.body.push(b',');
        }
        self.count += 1;
        let mut started = Event {
            out: &mut self.body,
            cut: Vec::new(),
        };
        started.out.extend_from_slice(b"{\"e\":\"");
        started.out.extend_from_slice(event.as_bytes());
        started.out.push(b'"');
        started.text("id", id);
        started.number("a", u64::from(attempt));
        started.number("t", at_ms);
        started.text("w", worker.as_bytes());
        started
    }
}

/// `value` as text: borrowed when it is UTF-8 (the common case, checked
/// fast), with invalid sequences replaced otherwise.
fn utf8(value: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(value) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(value),
    }
}

/// One event (or another JSON object, see [`Event::object`]) being written.
pub struct Event<'a> {
    out: &'a mut Vec<u8>,
    cut: Vec<&'static str>,
}

impl<'a> Event<'a> {
    /// Starts a JSON object `{"id":…` in `out` (a completed task's summary
    /// uses the same writer). Close it with [`Event::end`].
    pub fn object(out: &'a mut Vec<u8>, id: &[u8]) -> Self {
        out.extend_from_slice(b"{\"id\":");
        let _ = serde_json::to_writer(&mut *out, utf8(id).as_ref());
        Self {
            out,
            cut: Vec::new(),
        }
    }
}

impl Event<'_> {
    fn key(&mut self, key: &str) {
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A number field.
    pub fn number(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// A text field, as a JSON string (invalid UTF-8 replaced).
    pub fn text(&mut self, key: &str, value: &[u8]) -> &mut Self {
        self.key(key);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, utf8(value).as_ref());
        self
    }

    /// A text field cut to `MAX_FIELD_BYTES` (`tail`: keeping its end), and
    /// named in `c` when it was cut.
    pub fn long_text(&mut self, key: &'static str, value: &[u8], tail: bool) -> &mut Self {
        let text = utf8(value);
        let kept = clip(&text, tail);
        if kept.len() < text.len() {
            self.cut.push(key);
        }
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, kept);
        self
    }

    /// Ends the event.
    pub fn end(&mut self) {
        if !self.cut.is_empty() {
            self.key("c");
            let _ = serde_json::to_writer(&mut *self.out, &self.cut);
        }
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_make_a_json_array_with_texts_escaped_and_long_ones_cut() {
        let mut events = Events::default();
        events
            .begin("started", b"t-1", 0, 1_700, "pod-1")
            .text("k", b"email:send")
            .long_text("p", br#"{"to":"a\"b"}"#, false)
            .end();
        let long = "x".repeat(MAX_FIELD_BYTES + 10);
        let mut more = Events::default();
        more.begin("failed", b"t-1", 0, 1_800, "pod-1")
            .number("d", 100)
            .long_text("tb", long.as_bytes(), true)
            .end();
        events.merge(more);
        assert_eq!(events.count, 2);
        let parsed: serde_json::Value = serde_json::from_slice(&events.to_json()).expect("json");
        assert_eq!(parsed[0]["e"], "started");
        assert_eq!(parsed[0]["p"], r#"{"to":"a\"b"}"#);
        assert_eq!(parsed[0]["t"], 1_700);
        assert_eq!(
            parsed[1]["tb"].as_str().map(str::len),
            Some(MAX_FIELD_BYTES)
        );
        assert_eq!(parsed[1]["c"], serde_json::json!(["tb"]));
        assert!(parsed[0].get("c").is_none());
    }

    #[test]
    fn invalid_utf8_still_makes_valid_json() {
        let mut events = Events::default();
        events
            .begin("dead", b"\xff\xfe", 2, 1, "w")
            .text("x", b"bad \xc3")
            .end();
        let parsed: serde_json::Value = serde_json::from_slice(&events.to_json()).expect("json");
        assert_eq!(parsed[0]["a"], 2);
    }
}
