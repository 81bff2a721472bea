//! The retry policy: what becomes of a task after an outcome, given its
//! attempts so far and its retry budget. Pure: no Redis, no clock.

use crate::backoff::Backoff;
use crate::outcome::{Disposition, Outcome};

/// What to do with a task after an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ack it: done.
    Done,
    /// Schedule its next run after `delay_ms` (0 = at the end of the
    /// stream now), as attempt + 1.
    Retry {
        /// Delay before the next run, ms.
        delay_ms: u64,
    },
    /// Move it to the dead letters.
    Dead,
    /// Put it back in the stream unchanged, no attempt counted.
    HandBack,
    /// Ack it as cancelled.
    Cancelled,
}

/// The engine's retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delays between runs.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// The decision for `outcome` of a run that was failed run number
    /// `attempt` (0 = first), of a task allowing `max_retry` retries.
    /// `requested_ms` is the delay a handler asked for (`Retry(delay=...)`);
    /// `unit` is a jitter draw in `[0, 1)`.
    #[must_use]
    pub fn decide(
        &self,
        outcome: Outcome,
        attempt: u32,
        max_retry: u32,
        requested_ms: Option<u64>,
        unit: f64,
    ) -> Decision {
        match outcome.disposition() {
            Disposition::Done => Decision::Done,
            Disposition::Dead => Decision::Dead,
            Disposition::HandBack => Decision::HandBack,
            Disposition::Cancelled => Decision::Cancelled,
            Disposition::Retryable if attempt >= max_retry => Decision::Dead,
            Disposition::Retryable => Decision::Retry {
                delay_ms: match (outcome, requested_ms) {
                    (Outcome::Retry, Some(delay)) => delay,
                    _ => self.backoff.delay_ms(attempt, unit),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        backoff: Backoff {
            base_ms: 1000,
            max_ms: 8000,
        },
    };

    #[test]
    fn failed_runs_retry_with_backoff_until_the_budget_is_spent() {
        assert_eq!(
            POLICY.decide(Outcome::Failed, 0, 3, None, 1.0),
            Decision::Retry { delay_ms: 1000 }
        );
        assert_eq!(
            POLICY.decide(Outcome::Crashed, 2, 3, None, 1.0),
            Decision::Retry { delay_ms: 4000 }
        );
        assert_eq!(
            POLICY.decide(Outcome::TimedOut, 3, 3, None, 1.0),
            Decision::Dead
        );
    }

    #[test]
    fn a_requested_delay_wins_over_the_backoff_but_not_over_the_budget() {
        assert_eq!(
            POLICY.decide(Outcome::Retry, 0, 1, Some(0), 0.5),
            Decision::Retry { delay_ms: 0 }
        );
        assert_eq!(
            POLICY.decide(Outcome::Retry, 1, 1, Some(5), 0.5),
            Decision::Dead
        );
    }

    #[test]
    fn final_outcomes_ignore_the_budget() {
        for outcome in [
            Outcome::Rejected,
            Outcome::UnknownType,
            Outcome::Invalid,
            Outcome::Expired,
            Outcome::TooLarge,
            Outcome::Poison,
        ] {
            assert_eq!(POLICY.decide(outcome, 0, 99, None, 0.0), Decision::Dead);
        }
        assert_eq!(
            POLICY.decide(Outcome::NotStarted, 5, 0, None, 0.0),
            Decision::HandBack
        );
        assert_eq!(
            POLICY.decide(Outcome::Succeeded, 5, 0, None, 0.0),
            Decision::Done
        );
    }
}
