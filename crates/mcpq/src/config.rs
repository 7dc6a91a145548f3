//! The configuration file: TOML, then `MCPQ_*` environment overrides (`MCPQ_STORE__REDIS_URL`
//! sets `store.redis_url`), then checks that name the key, the bad value and what is allowed.
//! Key names are a public contract; `config/mcpq.toml` documents each with its default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use mcpq_fleet::{DispatchConfig, HealthConfig};
use mcpq_mcp::ServerConfig;
use mcpq_queue::{QueueConfig, QueueConfigs, QueueName, StoreConfig};
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or parsed, or a value has the wrong type or an unknown key.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The offending key, e.g. `store.redis_url`.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl From<mcpq_mcp::ConfigError> for Error {
    fn from(e: mcpq_mcp::ConfigError) -> Self {
        Self::Invalid { key: e.key, message: e.message }
    }
}

impl From<mcpq_fleet::ConfigError> for Error {
    fn from(e: mcpq_fleet::ConfigError) -> Self {
        Self::Invalid { key: e.key, message: e.message }
    }
}

impl From<mcpq_queue::InvalidInput> for Error {
    fn from(e: mcpq_queue::InvalidInput) -> Self {
        Self::Invalid { key: e.field, message: e.message }
    }
}

/// `MCPQ_*` variables that are not configuration keys: the log filter, and the CLI's API URL
/// and token (a shell that exports them for the CLI must still be able to run `serve`).
const NOT_KEYS: &[&str] = &["MCPQ_LOG", "MCPQ_API", "MCPQ_TOKEN"];

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This replica's name in logs and events; empty: `<hostname>-<pid>`.
    pub node: String,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[api]`.
    pub api: ApiConfig,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[dispatch]`.
    pub dispatch: DispatchConfig,
    /// `[queues.<name>]`.
    pub queues: HashMap<String, QueueConfig>,
    /// `[[servers]]`.
    pub servers: Vec<ServerConfig>,
}

impl Config {
    /// Loads `path` (if given), applies `MCPQ_*` overrides from `env`, and checks the result.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, Error> {
        let mut b = config::Config::builder();
        if let Some(path) = path {
            if !path.exists() {
                return Err(Error::Parse(format!("{}: no such file", path.display())));
            }
            b = b.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let overrides = config::Environment::with_prefix("MCPQ")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            // MCPQ_API__TOKENS=a,b: several tokens in one variable
            .list_separator(",")
            .with_list_parse_key("api.tokens")
            // the log filter and the CLI's own variables are not configuration keys
            .source(Some(
                env.iter()
                    .filter(|(k, _)| !NOT_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ));
        let cfg: Config = b
            .add_source(overrides)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| Error::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment); for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| Error::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), Error> {
        self.store.validate()?;
        self.api.validate()?;
        self.health.validate()?;
        self.dispatch.validate()?;
        if self.node.len() > 128 || self.node.chars().any(char::is_control) {
            return Err(Error::Invalid {
                key: "node".to_owned(),
                message: "must be at most 128 printable characters".to_owned(),
            });
        }
        for (name, q) in &self.queues {
            QueueName::new(name.as_str()).map_err(|e| Error::Invalid {
                key: format!("queues.{name}"),
                message: e.message,
            })?;
            q.validate(name)?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            server.validate(&format!("servers[{i}]"))?;
            if !names.insert(server.name.as_str()) {
                return Err(Error::Invalid {
                    key: format!("servers[{i}].name"),
                    message: format!("{:?} is used by another server", server.name),
                });
            }
        }
        Ok(())
    }

    /// The queues a replica works: `default` and every `[queues.<name>]`, sorted.
    pub fn served_queues(&self) -> Vec<QueueName> {
        let mut out: Vec<QueueName> = self
            .queues
            .keys()
            .filter_map(|n| QueueName::new(n.as_str()).ok())
            .chain(std::iter::once(QueueName::default()))
            .collect();
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        out.dedup();
        out
    }

    /// The `[queues]` table in the form stores take.
    pub fn queue_configs(&self) -> QueueConfigs {
        QueueConfigs::new(
            self.queues
                .iter()
                .filter_map(|(n, c)| QueueName::new(n.as_str()).ok().map(|n| (n, c.clone())))
                .collect(),
        )
    }
}

/// `[api]`: the HTTP API every replica serves.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on; loopback unless tokens are set.
    pub listen: String,
    /// Bearer tokens, any of which is accepted; empty = no auth (loopback only).
    pub tokens: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most tasks in one `POST /v1/tasks/batch`.
    pub max_batch: usize,
    /// Most event streams and waits open at once (each holds a store connection).
    pub max_streams: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7600".to_owned(),
            tokens: Vec::new(),
            max_body_bytes: 8 * 1024 * 1024,
            max_batch: 10_000,
            max_streams: 256,
        }
    }
}

impl ApiConfig {
    /// The listen address.
    pub fn addr(&self) -> Result<SocketAddr, Error> {
        self.listen.parse().map_err(|_| Error::Invalid {
            key: "api.listen".to_owned(),
            message: format!(
                "{:?} is not an address; expected ip:port, e.g. 127.0.0.1:7600",
                self.listen
            ),
        })
    }

    /// Checks every key of `[api]`.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &str, message: String| Error::Invalid { key: key.to_owned(), message };
        let addr = self.addr()?;
        // an open API beyond this machine would let anyone enqueue calls to the servers
        if !addr.ip().is_loopback() && self.tokens.is_empty() {
            return Err(invalid(
                "api.listen",
                format!(
                    "{addr} is reachable from other machines; set api.tokens (or MCPQ_API__TOKENS) \
                     to require a bearer token, or listen on 127.0.0.1"
                ),
            ));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.len() < 8 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    &format!("api.tokens[{i}]"),
                    "must be 8 to 256 printable ASCII characters without spaces".to_owned(),
                ));
            }
        }
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            return Err(invalid(
                "api.max_body_bytes",
                format!("{} is out of range 1024..=1073741824", self.max_body_bytes),
            ));
        }
        if !(1..=10_000).contains(&self.max_streams) {
            return Err(invalid(
                "api.max_streams",
                format!("{} is out of range 1..=10000", self.max_streams),
            ));
        }
        if !(1..=100_000).contains(&self.max_batch) {
            return Err(invalid(
                "api.max_batch",
                format!("{} is out of range 1..=100000", self.max_batch),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(r: Result<Config, Error>) -> String {
        match r {
            Err(Error::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let cfg = Config::load(None, &HashMap::new()).unwrap();
        assert_eq!(cfg.store, StoreConfig::default());
        assert!(cfg.store.redis_url.is_none(), "the embedded store is the default");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[store]\nredis_url = \"redis://127.0.0.1:1/\"\n").unwrap();
        let env = HashMap::from([
            ("MCPQ_STORE__REDIS_URL".to_owned(), "redis://127.0.0.1:2/".to_owned()),
            ("MCPQ_QUEUES__MAIL__MAX_ATTEMPTS".to_owned(), "9".to_owned()),
            ("MCPQ_STORE__CACHE_MB".to_owned(), "64".to_owned()),
            ("MCPQ_STORE__SYNC_MS".to_owned(), "1000".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
            ("MCPQ_LOG".to_owned(), "debug".to_owned()),
            ("MCPQ_API".to_owned(), "http://127.0.0.1:7601".to_owned()),
            ("MCPQ_TOKEN".to_owned(), "for-the-cli".to_owned()),
        ]);
        let cfg = Config::load(Some(&path), &env).unwrap();
        assert_eq!(cfg.store.redis_url.as_deref(), Some("redis://127.0.0.1:2/"));
        assert_eq!(cfg.queues["mail"].max_attempts, 9);
        assert_eq!(cfg.store.cache_mb, 64);
        assert_eq!(cfg.store.sync_ms, 1000);
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(
            key_of(Config::from_toml("[store]\nredis_url = \"http://x\"")),
            "store.redis_url"
        );
        assert_eq!(key_of(Config::from_toml("[store]\ncache_mb = 0")), "store.cache_mb");
        assert_eq!(key_of(Config::from_toml("[store]\nsync_ms = 60001")), "store.sync_ms");
        assert_eq!(key_of(Config::from_toml("[queues.\"a b\"]\nmax_attempts = 3")), "queues.a b");
        assert_eq!(
            key_of(Config::from_toml("[queues.mail]\nmax_attempts = 0")),
            "queues.mail.max_attempts"
        );
    }

    #[test]
    fn servers_are_checked_and_their_names_unique() {
        let one = "[[servers]]\nname = \"a\"\nurl = \"http://127.0.0.1:8001/mcp\"\n";
        let cfg = Config::from_toml(one).unwrap();
        assert_eq!(cfg.servers[0].max_concurrency, 32);
        assert_eq!(key_of(Config::from_toml(&format!("{one}{one}"))), "servers[1].name");
        let bad = "[[servers]]\nname = \"a\"\nurl = \"nope\"\n";
        assert_eq!(key_of(Config::from_toml(bad)), "servers[0].url");
        let huge = format!("{one}max_response_bytes = 17000000\n");
        assert_eq!(key_of(Config::from_toml(&huge)), "servers[0].max_response_bytes");
        let e = Config::from_toml(
            "[[servers]]\nname = \"a\"\nurl = \"http://h/\"\nmax_concurency = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_concurency"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_name() {
        let e = Config::from_toml("[store]\nredis_ur = \"redis://x\"").unwrap_err().to_string();
        assert!(e.contains("redis_ur"), "{e}");
        let e =
            Config::from_toml("[store]\nconnect_timeout_ms = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("connect_timeout_ms"), "{e}");
        let e = Config::from_toml("[store\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e =
            Config::load(Some(Path::new("/nonexistent/mcpq.toml")), &HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }

    #[test]
    fn every_example_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Config::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 1, "no example files in {}", dir.display());
    }

    #[test]
    fn the_documented_defaults_are_the_real_defaults() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/mcpq.toml"),
        )
        .unwrap();
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(cfg.store, StoreConfig::default());
        assert_eq!(cfg.api, ApiConfig::default());
        assert_eq!(cfg.queues["default"], QueueConfig::default());
        assert_eq!(cfg.health, HealthConfig::default());
        assert_eq!(cfg.dispatch, DispatchConfig::default());
        assert_eq!(cfg.node, "");
    }

    #[test]
    fn api_tokens_come_from_one_variable_and_guard_open_listens() {
        let env = HashMap::from([
            ("MCPQ_API__TOKENS".to_owned(), "token-one,token-two".to_owned()),
            ("MCPQ_API__LISTEN".to_owned(), "0.0.0.0:7600".to_owned()),
        ]);
        let cfg = Config::load(None, &env).unwrap();
        assert_eq!(cfg.api.tokens, ["token-one", "token-two"]);
        assert_eq!(key_of(Config::from_toml("[api]\nlisten = \"0.0.0.0:7600\"")), "api.listen");
        assert_eq!(key_of(Config::from_toml("[api]\nlisten = \"localhost\"")), "api.listen");
        assert_eq!(key_of(Config::from_toml("[api]\ntokens = [\"short\"]")), "api.tokens[0]");
        assert_eq!(key_of(Config::from_toml("[api]\nmax_batch = 0")), "api.max_batch");
    }

    #[test]
    fn fleet_sections_name_their_bad_keys() {
        assert_eq!(
            key_of(Config::from_toml(
                "[health]
degraded_after = 9
offline_after = 3"
            )),
            "health.degraded_after"
        );
        assert_eq!(
            key_of(Config::from_toml(
                "[dispatch]
lease_ms = 1"
            )),
            "dispatch.lease_ms"
        );
        let e = Config::from_toml(
            "[dispatch]
strategy = \"fastest\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fastest") && e.contains("dispatch.strategy"), "{e}");
    }
}
