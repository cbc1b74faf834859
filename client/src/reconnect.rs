//! When to try again after the connection is lost.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter for automatic reconnects.
///
/// Attempt `n` (counting from 0) waits `min(initial × multiplier^n, max)`, shortened by a random
/// fraction of up to `jitter` so that many clients cut off together do not return together.
/// Reconnecting stops after `max_attempts` attempts or once `max_elapsed` has passed since the
/// connection was lost, whichever comes first; by default it never stops.
///
/// ```
/// use std::time::Duration;
/// use backplane_client::ReconnectPolicy;
///
/// let policy = ReconnectPolicy::default()
///     .initial(Duration::from_millis(200))
///     .max(Duration::from_secs(10))
///     .max_attempts(20);
/// assert!(policy.delay(0, Duration::ZERO).unwrap() <= Duration::from_millis(200));
/// assert_eq!(policy.delay(20, Duration::ZERO), None);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    max_attempts: Option<u32>,
    max_elapsed: Option<Duration>,
}

impl Default for ReconnectPolicy {
    /// 500 ms, doubling up to 30 s, jitter 0.5, never giving up.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: None,
            max_elapsed: None,
        }
    }
}

impl ReconnectPolicy {
    /// The delay before the first attempt.
    pub fn initial(mut self, delay: Duration) -> Self {
        self.initial = delay;
        self
    }

    /// The longest delay between attempts.
    pub fn max(mut self, delay: Duration) -> Self {
        self.max = delay;
        self
    }

    /// How much each delay grows over the previous one; values below 1 count as 1.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// The largest fraction taken at random off each delay, from 0 (none) to 1.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Gives up after this many attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Gives up once this long has passed since the connection was lost.
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = Some(elapsed);
        self
    }

    /// The delay before attempt `attempt` (from 0), `elapsed` after the connection was lost;
    /// `None` to give up.
    pub fn delay(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max)
            || self.max_elapsed.is_some_and(|max| elapsed >= max)
        {
            return None;
        }
        let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
        let grown = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = grown.min(self.max.as_secs_f64());
        let cut = if self.jitter > 0.0 {
            rand::thread_rng().gen_range(0.0..=self.jitter)
        } else {
            0.0
        };
        Some(Duration::try_from_secs_f64(capped * (1.0 - cut)).unwrap_or(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_jitters_below_it() {
        let policy = ReconnectPolicy::default()
            .initial(Duration::from_millis(100))
            .max(Duration::from_secs(1))
            .jitter(0.0);
        let delays: Vec<_> = (0..6)
            .map(|n| policy.delay(n, Duration::ZERO).unwrap())
            .collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[3], Duration::from_millis(800));
        assert_eq!(delays[4], Duration::from_secs(1));
        assert_eq!(delays[5], Duration::from_secs(1));
        let jittered = policy.jitter(0.5);
        let samples: Vec<_> = (0..200)
            .map(|_| jittered.delay(10, Duration::ZERO).unwrap())
            .collect();
        assert!(samples.iter().all(|d| *d >= Duration::from_millis(500)));
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(
            samples.iter().any(|d| *d != samples[0]),
            "jitter varies the delay"
        );
    }

    #[test]
    fn stops_after_attempts_or_time() {
        let policy = ReconnectPolicy::default()
            .max_attempts(3)
            .max_elapsed(Duration::from_secs(60));
        assert!(policy.delay(2, Duration::from_secs(59)).is_some());
        assert!(policy.delay(3, Duration::ZERO).is_none());
        assert!(policy.delay(0, Duration::from_secs(60)).is_none());
        assert!(
            ReconnectPolicy::default()
                .delay(u32::MAX, Duration::MAX)
                .is_some()
        );
    }

    #[test]
    fn odd_settings_are_tamed() {
        let policy = ReconnectPolicy::default()
            .multiplier(f64::NAN)
            .jitter(7.0)
            .initial(Duration::from_millis(10));
        assert!(policy.delay(50, Duration::ZERO).unwrap() <= Duration::from_millis(10));
    }
}
