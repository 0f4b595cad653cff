//! The one backoff computation: exponential waits from a base, capped, with jitter.
//! Callers keep their own policy (what is worth retrying, how many times, whether a
//! server's `retry-after` wins); they ask this module only how long to wait.

use std::time::Duration;

/// How long to wait before each retry: `base · 2^retry`, at most `cap`, jittered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: bool,
}

impl Backoff {
    /// Doubling from `base`, at most `cap` (never less than `base`), with "equal
    /// jitter": each wait is a random point in the upper half of its step, so that
    /// processes that failed together spread out while no wait collapses to zero.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            jitter: true,
        }
    }

    /// The same steps without jitter (one waiter, nobody to spread out from).
    pub const fn without_jitter(self) -> Backoff {
        Backoff {
            jitter: false,
            ..self
        }
    }

    /// The step before retry number `retry` (0-based): `base · 2^retry`, capped.
    pub fn step(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << retry.min(16))
            .min(self.cap.max(self.base))
    }

    /// The wait before retry number `retry` (0-based): [`step`](Self::step), and with
    /// jitter a random point between half of it and all of it.
    pub fn wait(&self, retry: u32) -> Duration {
        let step = self.step(retry);
        if !self.jitter {
            return step;
        }
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_the_upper_half_of_each_capped_step() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for retry in 0..40 {
            let full = Duration::from_millis(100)
                .saturating_mul(1 << retry.min(16))
                .min(Duration::from_secs(30));
            assert_eq!(b.step(retry), full, "retry {retry}");
            for _ in 0..20 {
                let w = b.wait(retry);
                assert!(
                    w >= full / 2 && w <= full,
                    "retry {retry}: {w:?} vs {full:?}"
                );
            }
        }
        assert_eq!(b.step(2), Duration::from_millis(400));
    }

    #[test]
    fn jitter_spreads_and_can_be_turned_off() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let waits: std::collections::BTreeSet<Duration> = (0..50).map(|_| b.wait(3)).collect();
        assert!(waits.len() > 1, "{waits:?}");
        let fixed = b.without_jitter();
        assert_eq!(fixed.wait(0), Duration::from_secs(1));
        assert_eq!(fixed.wait(2), Duration::from_secs(4));
        assert_eq!(fixed.wait(9), Duration::from_secs(10));
    }

    #[test]
    fn the_cap_never_undercuts_the_base_and_zero_stays_zero() {
        let b = Backoff::new(Duration::from_secs(8), Duration::from_secs(5));
        assert_eq!(b.step(0), Duration::from_secs(8));
        assert_eq!(b.step(5), Duration::from_secs(8));
        let z = Backoff::new(Duration::ZERO, Duration::from_secs(5));
        assert_eq!(z.wait(3), Duration::ZERO);
    }
}
