//! `[[servers]]`: one MCP server mcpq dispatches to. Key names are a public contract; secrets
//! never show in `Debug` output or logs.

use std::time::Duration;

use serde::Deserialize;

/// A secret string: deserializes from text, never prints.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Which wire era to speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// Probe newest to oldest and remember the answer.
    #[default]
    Auto,
    /// Streamable HTTP (2025-03-26 and later, stateless 2026-07-28 included).
    StreamableHttp,
    /// The legacy HTTP+SSE transport (2024-11-05).
    Sse,
}

/// How to authenticate to the server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        token: Secret,
    },
    /// HTTP basic auth.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// A key in a header of the server's choosing.
    ApiKey {
        /// Header name, e.g. `X-Api-Key`.
        header: String,
        /// The key.
        value: Secret,
    },
    /// OAuth2 client credentials: a token fetched from `token_url`, cached, refreshed before it
    /// expires and once more after a 401.
    Oauth2ClientCredentials {
        /// The token endpoint.
        token_url: String,
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
        /// Requested scope, if any.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// Time limits for one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Connecting (TCP and TLS).
    pub connect_ms: u64,
    /// The most one request may take, progress or not.
    pub request_ms: u64,
    /// The most a streamed answer may stay silent; progress notifications restart it.
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect_ms: 5_000, request_ms: 60_000, idle_ms: 30_000 }
    }
}

/// One `[[servers]]` entry.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Unique name, used for pinning tasks and in events.
    pub name: String,
    /// The MCP endpoint (Streamable HTTP) or the SSE endpoint (legacy).
    pub url: String,
    /// Wire era.
    #[serde(default)]
    pub transport: TransportChoice,
    /// Pins a protocol revision instead of probing: `2026-07-28` (stateless) or a session
    /// revision (`2025-11-25`, `2025-06-18`, `2025-03-26`).
    #[serde(default)]
    pub protocol_version: Option<String>,
    /// Credentials.
    #[serde(default)]
    pub auth: Auth,
    /// Tags tasks can route by.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Weight for the `priority` strategy.
    #[serde(default = "one")]
    pub weight: u32,
    /// Calls in flight at once.
    #[serde(default = "thirty_two")]
    pub max_concurrency: u32,
    /// Requests per second (token bucket); 0 = unlimited.
    #[serde(default)]
    pub rate_limit: u32,
    /// Believe the server's tool annotations (`idempotentHint`, `readOnlyHint`).
    #[serde(default)]
    pub trusted: bool,
    /// Time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Largest answer read, in bytes.
    #[serde(default = "four_mib")]
    pub max_response_bytes: usize,
    /// How long a tool list is served from cache (a `list_changed` announcement ends it early).
    #[serde(default = "five_minutes")]
    pub tools_ttl_ms: u64,
}

fn one() -> u32 {
    1
}
fn thirty_two() -> u32 {
    32
}
fn four_mib() -> usize {
    4 * 1024 * 1024
}
fn five_minutes() -> u64 {
    300_000
}

/// The revisions `protocol_version` may pin.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26"];

/// A `[[servers]]` value out of range: the key and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key, e.g. `servers[1].url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Largest answer a server may be allowed (`max_response_bytes`): 16 MiB.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

impl ServerConfig {
    /// A server at `url` with every other key at its default.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            transport: TransportChoice::Auto,
            protocol_version: None,
            auth: Auth::None,
            tags: Vec::new(),
            weight: one(),
            max_concurrency: thirty_two(),
            rate_limit: 0,
            trusted: false,
            timeouts: Timeouts::default(),
            max_response_bytes: four_mib(),
            tools_ttl_ms: five_minutes(),
        }
    }

    /// Checks every key; `at` names the entry, e.g. `servers[1]`.
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let err =
            |key: &str, message: String| Err(ConfigError { key: format!("{at}.{key}"), message });
        if self.name.is_empty()
            || self.name.len() > 128
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return err(
                "name",
                format!("{:?}: use 1 to 128 letters, digits, '_', '-', '.'", self.name),
            );
        }
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return err("url", format!("{:?} is not an http:// or https:// URL", self.url)),
        }
        if let Some(v) = &self.protocol_version
            && !PROTOCOL_VERSIONS.contains(&v.as_str())
        {
            return err("protocol_version", format!("{v:?} is not one of {PROTOCOL_VERSIONS:?}"));
        }
        if self.max_concurrency == 0 || self.max_concurrency > 10_000 {
            return err(
                "max_concurrency",
                format!("{} is out of range 1..=10000", self.max_concurrency),
            );
        }
        if self.weight == 0 {
            return err("weight", "must be at least 1".into());
        }
        for (key, v, max) in [
            ("timeouts.connect_ms", self.timeouts.connect_ms, 600_000),
            ("timeouts.request_ms", self.timeouts.request_ms, 86_400_000),
            ("timeouts.idle_ms", self.timeouts.idle_ms, 86_400_000),
        ] {
            if v == 0 || v > max {
                return err(key, format!("{v} is out of range 1..={max}"));
            }
        }
        // the stores keep a result of up to 16 MiB with its task; a larger one could be
        // written but no longer read back
        if !(1024..=MAX_RESPONSE_BYTES).contains(&self.max_response_bytes) {
            return err(
                "max_response_bytes",
                format!(
                    "{} is out of range 1024..={MAX_RESPONSE_BYTES} (results are stored with their task)",
                    self.max_response_bytes
                ),
            );
        }
        if let Auth::ApiKey { header, .. } = &self.auth
            && reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            return err("auth.header", format!("{header:?} is not a valid header name"));
        }
        if let Auth::Oauth2ClientCredentials { token_url, .. } = &self.auth
            && reqwest::Url::parse(token_url).is_err()
        {
            return err("auth.token_url", format!("{token_url:?} is not a URL"));
        }
        Ok(())
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.connect_ms)
    }

    /// The per-request maximum.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.request_ms)
    }

    /// The idle limit of a streamed answer.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.idle_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let cfg = ServerConfig {
            auth: Auth::Basic { username: "u".into(), password: Secret::new("hunter2") },
            ..ServerConfig::new("a", "http://127.0.0.1:1/mcp")
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn validation_names_the_key() {
        let base = ServerConfig::new("a", "http://127.0.0.1:1/mcp");
        let key = |c: ServerConfig| c.validate("servers[0]").unwrap_err().key;
        assert_eq!(key(ServerConfig { url: "ftp://x".into(), ..base.clone() }), "servers[0].url");
        assert_eq!(key(ServerConfig { name: "a b".into(), ..base.clone() }), "servers[0].name");
        assert_eq!(
            key(ServerConfig { max_concurrency: 0, ..base.clone() }),
            "servers[0].max_concurrency"
        );
        let t = Timeouts { request_ms: 0, ..Timeouts::default() };
        assert_eq!(
            key(ServerConfig { timeouts: t, ..base.clone() }),
            "servers[0].timeouts.request_ms"
        );
        let pinned = ServerConfig { protocol_version: Some("2024-01-01".into()), ..base.clone() };
        assert_eq!(key(pinned), "servers[0].protocol_version");
        let bad = Auth::ApiKey { header: "bad header".into(), value: Secret::new("k") };
        assert_eq!(key(ServerConfig { auth: bad, ..base.clone() }), "servers[0].auth.header");
        base.validate("servers[0]").unwrap();
    }

    #[test]
    fn auth_kinds_parse_from_toml_shapes() {
        let v: Auth =
            serde_json::from_value(serde_json::json!({"kind": "bearer", "token": "t"})).unwrap();
        assert_eq!(v, Auth::Bearer { token: Secret::new("t") });
        let v: Auth = serde_json::from_value(serde_json::json!({
            "kind": "oauth2-client-credentials", "token_url": "http://127.0.0.1/t",
            "client_id": "c", "client_secret": "s"
        }))
        .unwrap();
        assert!(matches!(v, Auth::Oauth2ClientCredentials { scope: None, .. }));
        assert!(serde_json::from_value::<Auth>(serde_json::json!({"kind": "magic"})).is_err());
    }
}
