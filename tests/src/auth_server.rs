//! Credentials for the in-process MCP servers: a [`Guard`] makes an [`McpServer`] require one
//! credential (bearer, basic, API key, or a token a [`TokenServer`] issued) and counts what it
//! refused; [`TokenServer`] is an OAuth2 client-credentials token endpoint on `127.0.0.1` that
//! issues opaque tokens, counts requests and can revoke every token it issued. Tokens are
//! honoured only while their issuer holds them. Both stop when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Result;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::mcp::{Gate, McpServer, Mode};

/// The credential a guarded server requires.
#[derive(Clone)]
pub enum Required {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `<header>: <value>`.
    ApiKey {
        /// Header name (matched case-insensitively, as HTTP does).
        header: String,
        /// The key.
        value: String,
    },
    /// `Authorization: Bearer <token>` with a token the [`TokenServer`] behind `Tokens` issued
    /// and still honours.
    Oauth2(Tokens),
}

/// Checks one [`Required`] credential in front of an MCP server. Cheap to clone; clones share
/// their counters.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<GuardInner>,
}

struct GuardInner {
    required: Required,
    refused: AtomicU64,
}

impl Guard {
    /// A guard requiring `required`.
    pub fn new(required: Required) -> Self {
        Self { inner: Arc::new(GuardInner { required, refused: AtomicU64::new(0) }) }
    }

    /// Starts an MCP server in `mode` behind this guard.
    pub async fn start_server(&self, mode: Mode) -> Result<McpServer> {
        McpServer::start_gated(mode, Arc::new(self.clone())).await
    }

    /// Requests answered 401 so far.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }
}

impl Gate for Guard {
    fn admits(&self, headers: &HeaderMap) -> bool {
        let admitted = match &self.inner.required {
            Required::Bearer(token) => bearer(headers).is_some_and(|t| t == token),
            Required::Basic { username, password } => basic(headers)
                .is_some_and(|(u, p)| u == username.as_bytes() && p == password.as_bytes()),
            Required::ApiKey { header, value } => {
                headers.get(header.as_str()).is_some_and(|v| v.as_bytes() == value.as_bytes())
            }
            Required::Oauth2(tokens) => bearer(headers).is_some_and(|t| tokens.honours(t)),
        };
        if !admitted {
            self.inner.refused.fetch_add(1, Ordering::SeqCst);
        }
        admitted
    }

    fn challenge(&self) -> HeaderValue {
        HeaderValue::from_static(match &self.inner.required {
            Required::Bearer(_) => "Bearer realm=\"mcp\"",
            Required::Basic { .. } => "Basic realm=\"mcp\"",
            Required::ApiKey { .. } => "ApiKey realm=\"mcp\"",
            Required::Oauth2(_) => "Bearer realm=\"mcp\", error=\"invalid_token\"",
        })
    }
}

/// The credentials of `Authorization: <scheme> <credentials>` when the scheme is `scheme`
/// (case-insensitive, as RFC 9110 says).
fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (s, rest) = value.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    credentials(headers, "Bearer")
}

fn basic(headers: &HeaderMap) -> Option<(Vec<u8>, Vec<u8>)> {
    let decoded = base64_decode(credentials(headers, "Basic")?)?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// Standard-alphabet base64, padding optional. `None` on any other character.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// An OAuth2 token endpoint (`POST /token`, form-encoded `grant_type=client_credentials`,
/// `client_id`, `client_secret`, optional `scope`) for one client, on `127.0.0.1`.
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<TokenShared>,
    task: JoinHandle<()>,
}

/// What a [`TokenServer`] issued and still honours. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    shared: Arc<TokenShared>,
}

struct TokenShared {
    client_id: String,
    client_secret: String,
    policy: Mutex<Policy>,
    requests: AtomicU64,
    // token → honoured until
    issued: Mutex<HashMap<String, Instant>>,
    issued_total: AtomicU64,
    scopes: Mutex<Vec<Option<String>>>,
}

struct Policy {
    expires_in: u64,
    validity: Option<Duration>,
    delay: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; keep the data usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenServer {
    /// Starts an endpoint that issues tokens to `client_id` / `client_secret`, each stated to
    /// expire in 3600 s and honoured that long.
    pub async fn start(client_id: &str, client_secret: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(TokenShared {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            policy: Mutex::new(Policy { expires_in: 3600, validity: None, delay: Duration::ZERO }),
            requests: AtomicU64::new(0),
            issued: Mutex::new(HashMap::new()),
            issued_total: AtomicU64::new(0),
            scopes: Mutex::new(Vec::new()),
        });
        let router = axum::Router::new()
            .route("/token", axum::routing::post(token))
            .with_state(shared.clone());
        let task = tokio::spawn(crate::mcp::serve(listener, router));
        Ok(Self { addr, shared, task })
    }

    /// The token endpoint, `http://127.0.0.1:PORT/token`.
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Tokens issued from now on say `expires_in: secs`.
    pub fn set_expires_in(&self, secs: u64) {
        lock(&self.shared.policy).expires_in = secs;
    }

    /// Tokens issued from now on are honoured for `validity` (`None`: their `expires_in`).
    pub fn set_validity(&self, validity: Option<Duration>) {
        lock(&self.shared.policy).validity = validity;
    }

    /// Every answer from now on waits `delay` first, so concurrent fetches overlap.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.policy).delay = delay;
    }

    /// Requests to the endpoint so far, refused ones included.
    pub fn token_requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued so far, revoked ones included.
    pub fn issued(&self) -> u64 {
        self.shared.issued_total.load(Ordering::SeqCst)
    }

    /// The `scope` of every request so far, in order.
    pub fn scopes(&self) -> Vec<Option<String>> {
        lock(&self.shared.scopes).clone()
    }

    /// Stops honouring every token issued so far: a server guarded by [`Self::tokens`] answers
    /// 401 to them.
    pub fn revoke_all(&self) {
        lock(&self.shared.issued).clear();
    }

    /// The tokens this endpoint issues, for [`Required::Oauth2`].
    pub fn tokens(&self) -> Tokens {
        Tokens { shared: self.shared.clone() }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        // the serve task owns every connection, so they go with it
        self.task.abort();
    }
}

impl Tokens {
    fn honours(&self, token: &str) -> bool {
        lock(&self.shared.issued).get(token).is_some_and(|until| Instant::now() < *until)
    }
}

async fn token(
    State(shared): State<Arc<TokenShared>>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let (expires_in, validity, delay) = {
        let p = lock(&shared.policy);
        (p.expires_in, p.validity.unwrap_or(Duration::from_secs(p.expires_in)), p.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Ok(Form(form)) = form else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let field = |k: &str| form.get(k).map(String::as_str);
    lock(&shared.scopes).push(form.get("scope").cloned());
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if field("client_id") != Some(shared.client_id.as_str())
        || field("client_secret") != Some(shared.client_secret.as_str())
    {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let access_token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    lock(&shared.issued).insert(access_token.clone(), Instant::now() + validity);
    shared.issued_total.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
    }))
    .into_response()
}

/// An RFC 6749 §5.2 error answer.
fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("dXNlcjpwYXNz").as_deref(), Some(&b"user:pass"[..]));
        assert_eq!(base64_decode("YTpi").as_deref(), Some(&b"a:b"[..]));
        assert_eq!(base64_decode("YTpiYw==").as_deref(), Some(&b"a:bc"[..]));
        assert_eq!(base64_decode("YTpiYw").as_deref(), Some(&b"a:bc"[..]));
        assert_eq!(base64_decode("YT*i"), None);
    }
}
