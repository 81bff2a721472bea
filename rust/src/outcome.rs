//! How one delivery of a task ended: the one list of outcomes, shared by the
//! actors (which report some of them in result frames), the dispatcher
//! (which decides the rest), the retry policy and the dead-letter reasons.

/// Longest error text and traceback kept per outcome (bytes): an error
/// text keeps its start, a traceback its end (the line that raised).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Largest return value kept as a task's result (bytes of JSON). It travels
/// through the result ring and into Redis in the ack's transaction, so it is
/// bounded well below both; a larger value ends the task as `BadResult`.
pub const MAX_RESULT_BYTES: usize = 256 * 1024;

/// How one delivery of a task ended. The discriminant is the byte used in
/// result frames; Python gets the same values from `flumeq._core.Outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(
        eq,
        eq_int,
        frozen,
        module = "flumeq._core",
        rename_all = "SCREAMING_SNAKE_CASE"
    )
)]
#[repr(u8)]
pub enum Outcome {
    /// The handler returned.
    Succeeded = 1,
    /// The handler raised an exception: retry with backoff, or dead letter
    /// once the retries are spent.
    Failed = 2,
    /// The handler raised `Retry`: run again after the requested delay.
    Retry = 3,
    /// The handler raised `Reject`: dead letter now, no retry.
    Rejected = 4,
    /// No handler is registered for the task type.
    UnknownType = 5,
    /// The task could not be decoded (payload or labels are not valid JSON,
    /// a field is missing or malformed).
    Invalid = 6,
    /// The actor did not start it (the engine is stopping): hand it back.
    NotStarted = 7,
    /// The run passed its `timeout`.
    TimedOut = 8,
    /// The actor process died while running it.
    Crashed = 9,
    /// Its `deadline` passed before it could run.
    Expired = 10,
    /// It does not fit an actor ring.
    TooLarge = 11,
    /// It was delivered too often without an outcome (it keeps killing
    /// engines).
    Poison = 12,
    /// The handler returned, but its value cannot be kept as the task's
    /// result (not JSON, or larger than `MAX_RESULT_BYTES`). Dead letter,
    /// no retry: the handler's work is done, a rerun would do it again.
    BadResult = 13,
    /// Someone cancelled it (`Client.cancel`): final, acked without retry
    /// or dead letter.
    Cancelled = 14,
}

/// Every outcome, in wire order.
pub const ALL: [Outcome; 14] = [
    Outcome::Succeeded,
    Outcome::Failed,
    Outcome::Retry,
    Outcome::Rejected,
    Outcome::UnknownType,
    Outcome::Invalid,
    Outcome::NotStarted,
    Outcome::TimedOut,
    Outcome::Crashed,
    Outcome::Expired,
    Outcome::TooLarge,
    Outcome::Poison,
    Outcome::BadResult,
    Outcome::Cancelled,
];

/// What happens to a task after an outcome, before its retry budget is
/// looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done: ack it.
    Done,
    /// A failed attempt: retry while retries are left, else dead letter.
    Retryable,
    /// Straight to the dead letters.
    Dead,
    /// Back to the stream unchanged, no attempt counted.
    HandBack,
    /// Cancelled: acked and counted as such, never retried.
    Cancelled,
}

/// `text` cut to at most `MAX_TEXT_BYTES` at a character boundary, keeping
/// its start (`tail`: its end).
#[must_use]
pub fn clip(text: &str, tail: bool) -> &str {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    if tail {
        let mut start = text.len() - MAX_TEXT_BYTES;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        &text[start..]
    } else {
        let mut end = MAX_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
}

impl Outcome {
    /// The outcome for a wire byte.
    #[must_use]
    pub fn from_byte(byte: u8) -> Option<Self> {
        ALL.get(usize::from(byte).checked_sub(1)?).copied()
    }

    /// The name used in dead letters (`reason`), logs and Python.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "error",
            Self::Retry => "retry",
            Self::Rejected => "rejected",
            Self::UnknownType => "unknown_type",
            Self::Invalid => "invalid",
            Self::NotStarted => "not_started",
            Self::TimedOut => "timeout",
            Self::Crashed => "crashed",
            Self::Expired => "expired",
            Self::TooLarge => "too_large",
            Self::Poison => "poison",
            Self::BadResult => "bad_result",
            Self::Cancelled => "cancelled",
        }
    }

    /// What the outcome does to the task.
    #[must_use]
    pub fn disposition(self) -> Disposition {
        match self {
            Self::Succeeded => Disposition::Done,
            Self::Failed | Self::Retry | Self::TimedOut | Self::Crashed => Disposition::Retryable,
            Self::Rejected
            | Self::UnknownType
            | Self::Invalid
            | Self::Expired
            | Self::TooLarge
            | Self::Poison
            | Self::BadResult => Disposition::Dead,
            Self::NotStarted => Disposition::HandBack,
            Self::Cancelled => Disposition::Cancelled,
        }
    }

    /// Whether the handler ran (then the outcome counts as a run in the
    /// statistics, and as an attempt when it is not a success).
    #[must_use]
    pub fn ran(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::Retry
                | Self::Rejected
                | Self::TimedOut
                | Self::Crashed
                | Self::BadResult
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_round_trip_and_unknown_bytes_are_refused() {
        for outcome in ALL {
            assert_eq!(Outcome::from_byte(outcome as u8), Some(outcome));
        }
        assert_eq!(Outcome::from_byte(0), None);
        assert_eq!(Outcome::from_byte(ALL.len() as u8 + 1), None);
    }

    #[test]
    fn names_are_distinct_and_match_the_documented_dead_letter_reasons() {
        let names: std::collections::HashSet<_> = ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), ALL.len());
        assert_eq!(Outcome::TimedOut.name(), "timeout");
        assert_eq!(Outcome::Failed.name(), "error");
    }

    #[test]
    fn texts_are_clipped_at_character_boundaries_keeping_the_right_end() {
        let text = format!("{}é{}", "a".repeat(MAX_TEXT_BYTES - 1), "z".repeat(100));
        let head = clip(&text, false);
        assert_eq!(head.len(), MAX_TEXT_BYTES - 1);
        let tail = clip(&text, true);
        assert!(tail.len() <= MAX_TEXT_BYTES && tail.ends_with('z'));
        assert_eq!(clip("short", true), "short");
    }

    #[test]
    fn only_runs_count_attempts() {
        assert!(Outcome::Crashed.ran());
        assert!(!Outcome::Invalid.ran());
        assert!(!Outcome::NotStarted.ran());
        assert_eq!(Outcome::NotStarted.disposition(), Disposition::HandBack);
        assert_eq!(Outcome::Rejected.disposition(), Disposition::Dead);
    }
}
