//! Retry delay math: exponential backoff, capped, with jitter.
//!
//! `delay = min(retry_max, retry_base * 2^attempt) * uniform(0.75, 1.0)`:
//! jitter spreads retries of tasks that failed together, and drawing it below
//! the cap keeps `retry_max` a true maximum.

/// Jitter range: the delay is scaled by a factor in `[JITTER_LOW, 1.0]`.
const JITTER_LOW: f64 = 0.75;

/// Retry timing of an engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry, ms.
    pub base_ms: u64,
    /// Largest delay, ms.
    pub max_ms: u64,
}

impl Backoff {
    /// Delay before the retry that follows failed run number `attempt`
    /// (0 = the first run), for a jitter draw `unit` in `[0, 1)`.
    #[must_use]
    pub fn delay_ms(&self, attempt: u32, unit: f64) -> u64 {
        let exponential = (self.base_ms as f64) * 2f64.powi(attempt.min(62) as i32);
        let capped = exponential.min(self.max_ms as f64);
        let factor = JITTER_LOW + (1.0 - JITTER_LOW) * unit.clamp(0.0, 1.0);
        (capped * factor).round() as u64
    }

    /// `delay_ms` with a fresh random draw.
    #[must_use]
    pub fn next_delay_ms(&self, attempt: u32) -> u64 {
        self.delay_ms(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        base_ms: 1000,
        max_ms: 600_000,
    };

    #[test]
    fn doubles_per_attempt_without_jitter() {
        assert_eq!(BACKOFF.delay_ms(0, 1.0), 1000);
        assert_eq!(BACKOFF.delay_ms(1, 1.0), 2000);
        assert_eq!(BACKOFF.delay_ms(5, 1.0), 32_000);
    }

    #[test]
    fn is_capped_at_the_maximum_even_for_huge_attempts() {
        assert_eq!(BACKOFF.delay_ms(10, 1.0), 600_000);
        assert_eq!(BACKOFF.delay_ms(u32::MAX, 1.0), 600_000);
    }

    #[test]
    fn jitter_stays_between_three_quarters_and_the_full_delay() {
        assert_eq!(BACKOFF.delay_ms(2, 0.0), 3000);
        for _ in 0..1000 {
            let delay = BACKOFF.next_delay_ms(3);
            assert!((6000..=8000).contains(&delay), "{delay}");
        }
    }

    #[test]
    fn zero_base_means_retry_at_once() {
        let instant = Backoff {
            base_ms: 0,
            max_ms: 10,
        };
        assert_eq!(instant.next_delay_ms(7), 0);
    }
}
