//! The `[store]` and `[queues.<name>]` configuration sections, with their defaults. Key names
//! are a public contract: operators' files depend on them. `config/mcpq.toml` documents each.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::InvalidInput;
use crate::task::{MAX_ATTEMPTS, QueueName};

/// Largest `store.cache_mb`: 64 GiB.
const MAX_CACHE_MB: u64 = 65_536;
/// Largest `store.sync_ms`: a minute.
const MAX_SYNC_MS: u64 = 60_000;

/// `[store]`: where tasks live.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the embedded store (the default backend).
    pub path: PathBuf,
    /// The embedded store's page cache, MiB: the most memory it keeps of its file, whatever
    /// the queues' depth (redb's own default is 1 GiB).
    pub cache_mb: u64,
    /// How far apart the embedded store syncs its commits to disk, ms: 0 syncs each commit
    /// before acknowledging it (the default); N acknowledges commits at once and syncs them at
    /// most N ms later, so a crash loses at most the last N ms of acknowledged writes.
    pub sync_ms: u64,
    /// Redis URL (`redis://`, `rediss://` for TLS, `redis+unix://`); set it to use Redis.
    pub redis_url: Option<String>,
    /// Limit for connecting to the store.
    pub connect_timeout_ms: u64,
    /// Limit for one store command.
    pub response_timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./mcpq-data"),
            cache_mb: 16,
            sync_ms: 0,
            redis_url: None,
            connect_timeout_ms: 5000,
            response_timeout_ms: 5000,
        }
    }
}

impl StoreConfig {
    /// Checks every key; the error names the key, the value and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let Some(url) = &self.redis_url {
            let ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            if !ok || redis::Client::open(url.as_str()).is_err() {
                return Err(InvalidInput::new(
                    "store.redis_url",
                    format!(
                        "{url:?} is not a Redis URL; expected redis://host:port[/db], rediss://… or redis+unix:///path"
                    ),
                ));
            }
        }
        if self.path.as_os_str().is_empty() {
            return Err(InvalidInput::new("store.path", "must not be empty"));
        }
        if !(1..=MAX_CACHE_MB).contains(&self.cache_mb) {
            return Err(InvalidInput::new(
                "store.cache_mb",
                format!("{} is out of range 1..={MAX_CACHE_MB}", self.cache_mb),
            ));
        }
        if self.sync_ms > MAX_SYNC_MS {
            return Err(InvalidInput::new(
                "store.sync_ms",
                format!("{} is out of range 0..={MAX_SYNC_MS}", self.sync_ms),
            ));
        }
        for (key, v) in [
            ("store.connect_timeout_ms", self.connect_timeout_ms),
            ("store.response_timeout_ms", self.response_timeout_ms),
        ] {
            if !(1..=600_000).contains(&v) {
                return Err(InvalidInput::new(key, format!("{v} is out of range 1..=600000")));
            }
        }
        Ok(())
    }

    /// The embedded store's page cache in bytes.
    pub fn cache_bytes(&self) -> usize {
        usize::try_from(self.cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// How long the embedded store may keep acknowledged commits unsynced; `None`: not at all.
    pub fn sync_within(&self) -> Option<Duration> {
        (self.sync_ms > 0).then(|| Duration::from_millis(self.sync_ms))
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The per-command timeout.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
}

/// `[queues.<name>]`: per-queue behaviour (`[queues.default]` applies to unnamed queues too).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Attempts for tasks that do not set their own.
    pub max_attempts: u16,
    /// Aging: each `aging_ms` a task waits counts as one priority step (0 = strict priority).
    pub aging_ms: u64,
    /// Events kept in the queue's stream (approximate, trimmed as it grows).
    pub events_max: u64,
    /// Finished tasks kept per state (succeeded, failed, dead, cancelled).
    pub keep_finished: u64,
    /// Finished tasks older than this are forgotten (0 = no age limit).
    pub finished_ttl_ms: u64,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            aging_ms: 0,
            events_max: 1_000_000,
            keep_finished: 100_000,
            finished_ttl_ms: 7 * 24 * 3600 * 1000,
            idempotency_ttl_ms: 24 * 3600 * 1000,
        }
    }
}

impl QueueConfig {
    /// Checks every key of `[queues.<name>]`.
    pub fn validate(&self, name: &str) -> Result<(), InvalidInput> {
        let key = |k: &str| format!("queues.{name}.{k}");
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(InvalidInput::new(
                key("max_attempts"),
                format!("{} is out of range 1..={MAX_ATTEMPTS}", self.max_attempts),
            ));
        }
        if self.events_max < 1000 {
            return Err(InvalidInput::new(
                key("events_max"),
                format!("{} is too small; at least 1000", self.events_max),
            ));
        }
        if self.idempotency_ttl_ms == 0 {
            return Err(InvalidInput::new(key("idempotency_ttl_ms"), "must be at least 1"));
        }
        if self.aging_ms > 86_400_000 {
            return Err(InvalidInput::new(
                key("aging_ms"),
                format!("{} is out of range 0..=86400000", self.aging_ms),
            ));
        }
        Ok(())
    }
}

/// Queue configurations by name, falling back to the `default` one.
#[derive(Clone, Debug, Default)]
pub struct QueueConfigs {
    default: QueueConfig,
    named: HashMap<QueueName, QueueConfig>,
}

impl QueueConfigs {
    /// From the `[queues]` table; its `default` entry, if any, is the fallback.
    pub fn new(mut named: HashMap<QueueName, QueueConfig>) -> Self {
        let default = named.remove(&QueueName::default()).unwrap_or_default();
        Self { default, named }
    }

    /// The configuration of `queue`.
    pub fn get(&self, queue: &QueueName) -> &QueueConfig {
        self.named.get(queue).unwrap_or(&self.default)
    }

    /// Checks every entry.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        self.default.validate("default")?;
        self.named.iter().try_for_each(|(name, cfg)| cfg.validate(name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_validation_names_the_key() {
        let bad = StoreConfig { redis_url: Some("http://x".into()), ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().field, "store.redis_url");
        let bad = StoreConfig { response_timeout_ms: 0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().field, "store.response_timeout_ms");
        let bad = StoreConfig { cache_mb: 0, ..Default::default() };
        let e = bad.validate().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("store.cache_mb", "0 is out of range 1..=65536")
        );
        let e = StoreConfig { sync_ms: 60_001, ..Default::default() }.validate().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("store.sync_ms", "60001 is out of range 0..=60000")
        );
        assert_eq!(StoreConfig::default().sync_within(), None, "every commit synced by default");
        let lazy = StoreConfig { sync_ms: 1000, ..Default::default() };
        assert_eq!(lazy.sync_within(), Some(Duration::from_secs(1)));
        let ok = StoreConfig {
            redis_url: Some("redis://127.0.0.1:6379/0".into()),
            ..Default::default()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn queue_validation_names_the_queue_and_key() {
        let bad = QueueConfig { max_attempts: 0, ..Default::default() };
        assert_eq!(bad.validate("mail").unwrap_err().field, "queues.mail.max_attempts");
        QueueConfig::default().validate("default").unwrap();
    }

    #[test]
    fn named_queues_fall_back_to_the_default_entry() {
        let mail = QueueName::new("mail").unwrap();
        let custom = QueueConfig { aging_ms: 500, ..Default::default() };
        let default = QueueConfig { max_attempts: 9, ..Default::default() };
        let cfgs = QueueConfigs::new(HashMap::from([
            (mail.clone(), custom.clone()),
            (QueueName::default(), default.clone()),
        ]));
        assert_eq!(cfgs.get(&mail), &custom);
        assert_eq!(cfgs.get(&QueueName::new("other").unwrap()), &default);
    }
}
