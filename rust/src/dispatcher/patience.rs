//! Capped exponential waiting between attempts at something Redis must do,
//! logging the first failure and the recovery once each (per failing spell).
//! Used by start-up, the outcome writer and the delayed-task mover.

use std::time::Duration;

use log::{info, warn};

/// First wait after a failure.
const FIRST: Duration = Duration::from_millis(100);
/// Longest wait.
const LONGEST: Duration = Duration::from_secs(5);

/// The waiting state of one loop that needs Redis.
pub struct Patience {
    what: &'static str,
    delay: Duration,
    longest: Duration,
    warned: bool,
}

impl Patience {
    /// Patience for `what` (named in the logs).
    #[must_use]
    pub fn new(what: &'static str) -> Self {
        Self::capped(what, LONGEST)
    }

    /// Patience whose waits never exceed `longest` (for work that must
    /// resume as soon as Redis is back).
    #[must_use]
    pub fn capped(what: &'static str, longest: Duration) -> Self {
        Self {
            what,
            delay: FIRST.min(longest),
            longest,
            warned: false,
        }
    }

    /// The next wait after a failure (logged the first time), doubling up
    /// to a cap.
    pub fn next_delay(&mut self, error: &(dyn std::fmt::Display + Sync)) -> Duration {
        if !self.warned {
            warn!(
                "{} failed ({error}); retrying until redis answers",
                self.what
            );
            self.warned = true;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(self.longest);
        delay
    }

    /// Waits after a failure.
    pub async fn wait(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        let delay = self.next_delay(error);
        tokio::time::sleep(delay).await;
    }

    /// It worked: log the recovery (once per failing spell) and start over.
    pub fn done(&mut self) {
        if self.warned {
            info!("{}: redis answers again", self.what);
        }
        self.warned = false;
        self.delay = FIRST.min(self.longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut patience = Patience::new("test");
        let delays: Vec<Duration> = (0..8).map(|_| patience.next_delay(&"boom")).collect();
        assert_eq!(delays[0], FIRST);
        assert_eq!(delays[1], FIRST * 2);
        assert_eq!(delays[7], LONGEST);
        patience.done();
        assert_eq!(patience.next_delay(&"boom"), FIRST);
        let mut eager = Patience::capped("test", Duration::from_millis(250));
        let delays: Vec<Duration> = (0..5).map(|_| eager.next_delay(&"boom")).collect();
        assert_eq!(delays[4], Duration::from_millis(250));
    }
}
