//! The fleet's settings: `[health]` and `[dispatch]` of the configuration file (key names are
//! a public contract), each with its default and a check that names the key it refuses.

use std::time::Duration;

use mcpq_mcp::ServerConfig;
use mcpq_queue::{QueueName, Strategy};
use serde::Deserialize;

/// A setting out of range: the key and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key, e.g. `health.offline_after`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), message: message.into() }
}

fn in_range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(err(key, format!("{v} is out of range; allowed: {lo} to {hi}")))
    }
}

/// `[health]`: how servers are probed and when they change state.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between probes of each server.
    pub interval_ms: u64,
    /// Consecutive failures (probes or calls) before a server is degraded.
    pub degraded_after: u32,
    /// Consecutive failures before a server is offline and its tasks are redistributed.
    pub offline_after: u32,
    /// Limit for one probe.
    pub probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { interval_ms: 2000, degraded_after: 2, offline_after: 5, probe_timeout_ms: 2000 }
    }
}

impl HealthConfig {
    /// Checks ranges and that `degraded_after` ≤ `offline_after`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range("health.interval_ms", self.interval_ms, 10, 3_600_000)?;
        in_range("health.probe_timeout_ms", self.probe_timeout_ms, 10, 600_000)?;
        in_range("health.degraded_after", self.degraded_after.into(), 1, 1000)?;
        in_range("health.offline_after", self.offline_after.into(), 1, 1000)?;
        if self.degraded_after > self.offline_after {
            return Err(err(
                "health.degraded_after",
                format!(
                    "{} exceeds health.offline_after ({})",
                    self.degraded_after, self.offline_after
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// `[dispatch.breaker]`: when a server's calls stop being sent to it for a while.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Outcomes remembered per server.
    pub window: u32,
    /// Fewest outcomes in the window before the breaker may open.
    pub min_calls: u32,
    /// Share of failures in the window (0–1) that opens the breaker.
    pub failure_rate: f64,
    /// Time the breaker stays open before a probe may close it.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { window: 20, min_calls: 10, failure_rate: 0.5, open_ms: 5000 }
    }
}

/// `[dispatch.restart]`: how the supervisor restarts a crashed actor.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// Restarts allowed per actor within `window_ms`; one more and it is left stopped.
    pub max_restarts: u32,
    /// The window the budget counts over.
    pub window_ms: u64,
    /// Delay before the first restart; doubled for each restart in the window.
    pub backoff_initial_ms: u64,
    /// Upper bound of that delay.
    pub backoff_max_ms: u64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self { max_restarts: 5, window_ms: 60_000, backoff_initial_ms: 50, backoff_max_ms: 5000 }
    }
}

impl RestartConfig {
    /// The delay before restart number `n` (1-based) within the window.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(20);
        let ms = self.backoff_initial_ms.saturating_mul(1 << exp).min(self.backoff_max_ms);
        Duration::from_millis(ms)
    }
}

/// `[dispatch]`: claiming, leases, waiting and shutdown.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Lease of a claimed task; renewed every third of it while the call runs.
    pub lease_ms: u64,
    /// How a server is picked when the task names no strategy.
    pub strategy: Strategy,
    /// Most tasks claimed in one round trip.
    pub max_batch: usize,
    /// Work claimed ahead of the free slots, in ms of the rate tasks finish at: a slot that
    /// frees is refilled from what this replica holds, without waiting for a claim, and claims
    /// come in fewer, larger batches. A task enqueued later at a higher priority may start
    /// after this much work already claimed. 0: claim only for free slots.
    pub prefetch_ms: u64,
    /// Time between sweeps that queue due tasks and take back expired leases.
    pub reap_interval_ms: u64,
    /// Time between claim attempts when nothing woke the dispatcher.
    pub poll_ms: u64,
    /// How long a task no server can take now waits before it is looked at again.
    pub wait_ms: u64,
    /// On shutdown, how long running calls may take before the rest is handed back.
    pub drain_timeout_ms: u64,
    /// Limit for one attempt when the task sets none (the server's request limit applies too).
    pub timeout_ms: u64,
    /// Circuit breaker per server.
    pub breaker: BreakerConfig,
    /// Restarts of crashed actors.
    pub restart: RestartConfig,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            strategy: Strategy::LeastLoaded,
            max_batch: 256,
            prefetch_ms: 10,
            reap_interval_ms: 1000,
            poll_ms: 250,
            wait_ms: 1000,
            drain_timeout_ms: 10_000,
            timeout_ms: 300_000,
            breaker: BreakerConfig::default(),
            restart: RestartConfig::default(),
        }
    }
}

impl DispatchConfig {
    /// Checks every range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range("dispatch.lease_ms", self.lease_ms, 100, 3_600_000)?;
        in_range("dispatch.max_batch", self.max_batch as u64, 1, 1000)?;
        in_range("dispatch.prefetch_ms", self.prefetch_ms, 0, 10_000)?;
        in_range("dispatch.reap_interval_ms", self.reap_interval_ms, 10, 600_000)?;
        in_range("dispatch.poll_ms", self.poll_ms, 1, 60_000)?;
        in_range("dispatch.wait_ms", self.wait_ms, 1, 3_600_000)?;
        in_range("dispatch.drain_timeout_ms", self.drain_timeout_ms, 0, 3_600_000)?;
        in_range("dispatch.timeout_ms", self.timeout_ms, 1, 86_400_000)?;
        let b = &self.breaker;
        in_range("dispatch.breaker.window", b.window.into(), 1, 10_000)?;
        in_range("dispatch.breaker.min_calls", b.min_calls.into(), 1, b.window.into())?;
        in_range("dispatch.breaker.open_ms", b.open_ms, 1, 3_600_000)?;
        if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
            return Err(err(
                "dispatch.breaker.failure_rate",
                format!("{} is out of range; allowed: above 0, at most 1", b.failure_rate),
            ));
        }
        let r = &self.restart;
        in_range("dispatch.restart.max_restarts", r.max_restarts.into(), 0, 1000)?;
        in_range("dispatch.restart.window_ms", r.window_ms, 1, 86_400_000)?;
        in_range("dispatch.restart.backoff_initial_ms", r.backoff_initial_ms, 1, 600_000)?;
        in_range(
            "dispatch.restart.backoff_max_ms",
            r.backoff_max_ms,
            r.backoff_initial_ms,
            600_000,
        )?;
        Ok(())
    }

    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// Everything a fleet needs besides its store.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// This replica's name in logs and events.
    pub node: String,
    /// The queues it works.
    pub queues: Vec<QueueName>,
    /// Server health.
    pub health: HealthConfig,
    /// Dispatch.
    pub dispatch: DispatchConfig,
    /// The MCP servers at start (more can be added while it runs).
    pub servers: Vec<ServerConfig>,
}

impl FleetConfig {
    /// Checks the sections and that server names are unique.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.health.validate()?;
        self.dispatch.validate()?;
        if self.queues.is_empty() {
            return Err(err("queues", "a fleet works at least one queue"));
        }
        for (i, s) in self.servers.iter().enumerate() {
            s.validate(&format!("servers[{i}]"))
                .map_err(|e| ConfigError { key: e.key, message: e.message })?;
            if self.servers[..i].iter().any(|o| o.name == s.name) {
                return Err(err(
                    &format!("servers[{i}].name"),
                    format!("{:?} is used twice", s.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_name_their_key() {
        HealthConfig::default().validate().unwrap();
        DispatchConfig::default().validate().unwrap();
        let h = HealthConfig { degraded_after: 6, ..Default::default() };
        assert_eq!(h.validate().unwrap_err().key, "health.degraded_after");
        let d = DispatchConfig { lease_ms: 5, ..Default::default() };
        assert_eq!(d.validate().unwrap_err().key, "dispatch.lease_ms");
        let mut d = DispatchConfig::default();
        d.breaker.failure_rate = 1.5;
        assert_eq!(d.validate().unwrap_err().key, "dispatch.breaker.failure_rate");
    }

    #[test]
    fn restart_backoff_doubles_up_to_its_cap() {
        let r =
            RestartConfig { backoff_initial_ms: 100, backoff_max_ms: 1000, ..Default::default() };
        let ms: Vec<u128> = (1..=6).map(|n| r.backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }
}
