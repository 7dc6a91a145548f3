//! Per-server limits as pure state machines over an explicit clock: the circuit breaker
//! (closed → open on a failure rate over a window → half-open probe → closed) and the token
//! bucket of `rate_limit`. The ClientActor owns one of each.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the instant; then one probe decides.
    Open(Instant),
    /// The probe is out; calls are still refused.
    HalfOpen,
}

/// A failure-rate circuit breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    window: VecDeque<bool>,
    failures: u32,
    state: BreakerState,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Self {
            window: VecDeque::with_capacity(cfg.window as usize),
            cfg,
            failures: 0,
            state: BreakerState::Closed,
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Closed with a full window of successes: recording one more changes nothing.
    pub(crate) fn is_quiet(&self) -> bool {
        self.state == BreakerState::Closed
            && self.failures == 0
            && self.window.len() == self.cfg.window as usize
    }

    /// Whether a call may go out now.
    pub(crate) fn allows(&self) -> bool {
        self.state == BreakerState::Closed
    }

    /// Records a call's outcome (`true` = the server worked); answers true when this opened
    /// the breaker.
    pub(crate) fn record(&mut self, ok: bool, now: Instant) -> bool {
        if self.state != BreakerState::Closed {
            return false;
        }
        if self.window.len() == self.cfg.window as usize
            && let Some(old) = self.window.pop_front()
        {
            self.failures -= u32::from(!old);
        }
        self.window.push_back(ok);
        self.failures += u32::from(!ok);
        let n = self.window.len() as u32;
        if n >= self.cfg.min_calls
            && f64::from(self.failures) >= self.cfg.failure_rate * f64::from(n)
        {
            self.open(now);
            return true;
        }
        false
    }

    /// When the open period ends, moves to half-open and answers true: send one probe.
    pub(crate) fn try_half_open(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Open(until) if now >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            _ => false,
        }
    }

    /// The probe's answer: closes (and forgets the window) or opens again.
    pub(crate) fn probed(&mut self, ok: bool, now: Instant) {
        if self.state != BreakerState::HalfOpen {
            return;
        }
        if ok {
            self.state = BreakerState::Closed;
            self.window.clear();
            self.failures = 0;
        } else {
            self.open(now);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open(now + Duration::from_millis(self.cfg.open_ms));
    }

    pub(crate) fn open_for(&self) -> Duration {
        Duration::from_millis(self.cfg.open_ms)
    }
}

/// A token bucket: `rate` tokens per second, bursts up to `rate`. Taking never fails; it
/// answers how long the caller must wait for its token, so calls queue in arrival order.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    interval: Duration,
    burst: Duration,
    /// The instant the next token is free; before now means tokens are stored.
    next_free: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_s: u32, now: Instant) -> Self {
        let interval = Duration::from_secs(1) / rate_per_s.max(1);
        let burst = interval * rate_per_s.max(1);
        // starts full
        Self { interval, burst, next_free: (now + interval).checked_sub(burst).unwrap_or(now) }
    }

    /// Takes a token; answers the wait before it may be used.
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        // stored tokens are capped at one burst
        let floor = (now + self.interval).checked_sub(self.burst).unwrap_or(now);
        let start = self.next_free.max(floor);
        self.next_free = start + self.interval;
        start.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig { window: 4, min_calls: 4, failure_rate: 0.5, open_ms: 100 }
    }

    #[test]
    fn breaker_opens_on_the_failure_rate_and_a_probe_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        assert!(!b.record(false, t0));
        assert!(!b.record(true, t0));
        assert!(!b.record(true, t0), "3 calls are under min_calls");
        assert!(b.allows());
        assert!(b.record(false, t0), "2 of 4 failed: the rate is reached");
        assert!(!b.allows());
        assert!(!b.try_half_open(t0 + Duration::from_millis(50)), "still open");
        assert!(b.try_half_open(t0 + Duration::from_millis(100)));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allows(), "calls wait for the probe");
        b.probed(false, t0 + Duration::from_millis(100));
        assert!(matches!(b.state(), BreakerState::Open(_)));
        assert!(b.try_half_open(t0 + Duration::from_millis(200)));
        b.probed(true, t0 + Duration::from_millis(200));
        assert!(b.allows());
        // the old window is forgotten: one failure does not reopen it
        assert!(!b.record(false, t0));
    }

    #[test]
    fn breaker_window_slides() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for ok in [false, true, true, true, true, true, true] {
            assert!(!b.record(ok, t0));
        }
        assert!(!b.record(false, t0), "1 failure in the last 4");
        assert!(b.record(false, t0), "2 failures in the last 4");
    }

    #[test]
    fn breaker_is_quiet_only_with_a_full_window_of_successes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record(true, t0);
            assert!(!b.is_quiet(), "a window not yet full still counts successes");
        }
        b.record(true, t0);
        assert!(b.is_quiet());
        b.record(false, t0);
        assert!(!b.is_quiet(), "a failure in the window");
        for _ in 0..3 {
            b.record(true, t0);
            assert!(!b.is_quiet(), "the failure is still in the window");
        }
        b.record(true, t0);
        assert!(b.is_quiet(), "the failure slid out");
    }

    #[test]
    fn bucket_allows_a_burst_then_spaces_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut tb = TokenBucket::new(10, t0);
        let waits: Vec<Duration> = (0..12).map(|_| tb.take(t0)).collect();
        assert!(waits[..10].iter().all(Duration::is_zero), "{waits:?}");
        assert_eq!(waits[10], Duration::from_millis(100));
        assert_eq!(waits[11], Duration::from_millis(200));
        // a long idle stores at most one burst
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<Duration> = (0..11).map(|_| tb.take(later)).collect();
        assert!(waits[..10].iter().all(Duration::is_zero), "{waits:?}");
        assert_eq!(waits[10], Duration::from_millis(100));
    }
}
