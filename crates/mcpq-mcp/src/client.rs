//! [`McpClient`]: one MCP server over Streamable HTTP, in the stateless 2026-07-28 era or the
//! session eras (2025-03-26 … 2025-11-25). It owns the HTTP pool, the session and the era, and
//! classifies every request's outcome. Many requests may be in flight at once; the session is
//! opened by one of them while the others wait for it. Session-era SSE answers are resumed
//! (`Last-Event-ID`, after the server's `retry:`) and the server's own requests on them answered;
//! stateless requests carry the SEP-2243 headers and follow multi round-trip input requests.
//! The HTTP exchange itself lives in `client/http.rs`, the legacy handshake in
//! `client/legacy_link.rs`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use crate::auth::{Authenticator, NO_CREDENTIALS};
use crate::config::{ServerConfig, TransportChoice};
use crate::headers::{ParamHeaders, encode_value};
use crate::input;
use crate::legacy::LegacySession;
use crate::outcome::{Outcome, RpcError};

mod http;
mod legacy_link;

use crate::sse::SseParser;
use http::*;
pub(crate) use http::{TOOLS_CHANGED, answer_to};
use legacy_link::LegacyLink;

/// The newest protocol revision, stateless.
pub const STATELESS_VERSION: &str = "2026-07-28";
/// The newest session-based revision; older servers answer `initialize` with theirs.
pub const SESSION_VERSION: &str = "2025-11-25";
/// The revision of the legacy HTTP+SSE transport.
pub const LEGACY_VERSION: &str = "2024-11-05";
const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// JSON-RPC error of a 2026-07-28 server: the HTTP headers do not match the body.
const HEADER_MISMATCH: i64 = -32020;
/// JSON-RPC error of a 2026-07-28 server: it does not speak the requested revision.
const UNSUPPORTED_VERSION: i64 = -32022;
/// How often one answer stream is resumed at most.
const MAX_RESUMES: u32 = 5;
/// The wait before resuming a stream whose server named none (`retry:`).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// The most of a refusal's body read for its JSON-RPC error.
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

/// The wire era a server speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Era {
    /// 2026-07-28: no session; every request carries its version in `_meta`.
    Stateless,
    /// 2025-03-26 … 2025-11-25: `initialize`, then requests under `Mcp-Session-Id`.
    Session {
        /// The revision the server chose.
        version: String,
    },
    /// 2024-11-05: HTTP+SSE, answers on a GET stream.
    Legacy,
}

/// Who is asking: carried in every request's `_meta`, so tools that care can de-duplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallMeta {
    /// The mcpq task id.
    pub task: Option<String>,
    /// The attempt number.
    pub attempt: Option<u32>,
}

/// The session of a session-era server.
#[derive(Clone, Debug)]
struct Session {
    id: Option<String>,
    version: String,
}

#[derive(Clone)]
enum Link {
    Stateless,
    Session(Session),
    Legacy(Arc<LegacyLink>),
}

/// A client for one MCP server. Cheap to clone.
#[derive(Clone)]
pub struct McpClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ServerConfig,
    /// `cfg.url`, parsed once rather than per request (`None` if invalid: requests then fail
    /// the way reqwest fails them).
    url: Option<reqwest::Url>,
    http: reqwest::Client,
    auth: Authenticator,
    next_id: AtomicU64,
    link: RwLock<Option<Link>>,
    // single flight: one request opens the link while the others wait for it
    opening: Mutex<()>,
    /// Stateless era: the `x-mcp-header` annotations of every listed tool, or why it was
    /// rejected. Filled by `list_tools`.
    tools: RwLock<HashMap<String, Result<ParamHeaders, String>>>,
    /// The last full tool list and when it was fetched, for [`McpClient::tools`].
    catalog: RwLock<Option<(Instant, Arc<Vec<Value>>)>>,
    /// Set by a `notifications/tools/list_changed` seen on any stream.
    catalog_stale: Arc<AtomicBool>,
}

impl std::fmt::Debug for McpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClient").field("server", &self.inner.cfg.name).finish()
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for server {server}")]
pub struct BuildError {
    server: String,
    #[source]
    source: reqwest::Error,
}

/// The `initialize` params for `version`.
fn initialize_params(version: &str) -> Value {
    json!({
        "protocolVersion": version,
        "capabilities": {},
        "clientInfo": { "name": "mcpq", "version": env!("CARGO_PKG_VERSION") },
    })
}

/// The parts of one exchange that a caller chooses.
struct Exchange<'a> {
    method: &'a str,
    /// Borrowed where a request may be sent again (it is serialized, never changed).
    params: Cow<'a, Value>,
    /// `Mcp-Name`: the tool, prompt or resource a stateless request is about.
    name: Option<&'a str>,
    /// A notification expects no answer.
    notification: bool,
    /// `Mcp-Param-*` headers mirrored from a tool call's arguments.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl<'a> Exchange<'a> {
    /// A request without headers or a name.
    fn request(method: &'a str, params: Value) -> Self {
        let params = Cow::Owned(params);
        Self { method, params, name: None, notification: false, headers: Vec::new() }
    }

    /// A notification.
    fn notification(method: &'a str, params: Value) -> Self {
        Self { notification: true, ..Self::request(method, params) }
    }
}

/// Requests this process has sent and not yet had answered, over every client.
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// How many requests this process has in flight, over every [`McpClient`]: a gauge, so a
/// caller can see how full it keeps its servers (`mcpq bench` sets a drain beside the direct
/// calls with it).
pub fn requests_in_flight() -> u64 {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// One request counted in [`requests_in_flight`] while it lives.
struct Counted;

impl Counted {
    fn new() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

impl McpClient {
    /// A client for `cfg` (validate it first). Connects lazily, on the first request.
    pub fn new(cfg: ServerConfig) -> Result<Self, BuildError> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|source| BuildError { server: cfg.name.clone(), source })?;
        let auth = Authenticator::new(cfg.auth.clone(), http.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                url: reqwest::Url::parse(&cfg.url).ok(),
                cfg,
                http,
                auth,
                next_id: AtomicU64::new(1),
                link: RwLock::new(None),
                opening: Mutex::new(()),
                tools: RwLock::default(),
                catalog: RwLock::default(),
                catalog_stale: Arc::default(),
            }),
        })
    }

    /// The server's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    /// The era detected so far (`None` before the first successful connection).
    pub async fn era(&self) -> Option<Era> {
        self.inner.link.read().await.as_ref().map(|l| match l {
            Link::Stateless => Era::Stateless,
            Link::Session(s) => Era::Session { version: s.version.clone() },
            Link::Legacy(_) => Era::Legacy,
        })
    }

    /// Forgets the session and the era: the next request probes again (after a reconnect).
    pub async fn reset(&self) {
        *self.inner.link.write().await = None;
        self.inner.tools.write().await.clear();
    }

    /// `tools/call`; the result is the MCP `CallToolResult` object (check its `isError`). On
    /// the stateless era the arguments a listed tool marks with `x-mcp-header` are mirrored into
    /// `Mcp-Param-*` headers; a tool `list_tools` rejected is not called (not delivered).
    pub async fn call_tool(&self, name: &str, arguments: Value, meta: &CallMeta) -> Outcome<Value> {
        let params = json!({ "name": name, "arguments": arguments });
        self.request("tools/call", params, Some(name), meta).await
    }

    /// `resources/read`.
    pub async fn read_resource(&self, uri: &str, meta: &CallMeta) -> Outcome<Value> {
        self.request("resources/read", json!({ "uri": uri }), Some(uri), meta).await
    }

    /// `prompts/get`.
    pub async fn get_prompt(
        &self,
        name: &str,
        arguments: Value,
        meta: &CallMeta,
    ) -> Outcome<Value> {
        let params = json!({ "name": name, "arguments": arguments });
        self.request("prompts/get", params, Some(name), meta).await
    }

    /// The server's tools, from a cache kept for `tools_ttl_ms` and refreshed early when the
    /// server announces `notifications/tools/list_changed`.
    pub async fn tools(&self) -> Outcome<Arc<Vec<Value>>> {
        let ttl = Duration::from_millis(self.inner.cfg.tools_ttl_ms);
        if !self.inner.catalog_stale.load(Ordering::Acquire)
            && let Some((at, tools)) = self.inner.catalog.read().await.as_ref()
            && at.elapsed() < ttl
        {
            return Outcome::Executed(Ok(tools.clone()));
        }
        // cleared before listing: an announcement during the listing marks the new list stale
        self.inner.catalog_stale.store(false, Ordering::Release);
        let listed = self.list_tools().await.map(Arc::new);
        if let Outcome::Executed(Ok(tools)) = &listed {
            *self.inner.catalog.write().await = Some((Instant::now(), tools.clone()));
        }
        listed
    }

    /// `tools/list`, every page. On the stateless era a tool with an invalid `x-mcp-header`
    /// annotation is left out (and logged), and the annotations of the others are kept for
    /// [`McpClient::call_tool`].
    pub async fn list_tools(&self) -> Outcome<Vec<Value>> {
        let tools = match self.list_all("tools/list", "tools").await {
            Outcome::Executed(Ok(tools)) => tools,
            other => return other,
        };
        if !matches!(*self.inner.link.read().await, Some(Link::Stateless)) {
            return Outcome::Executed(Ok(tools));
        }
        let mut catalog = HashMap::new();
        let mut usable = Vec::with_capacity(tools.len());
        for tool in tools {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            match ParamHeaders::of_tool(&tool) {
                Ok(headers) => {
                    catalog.insert(name, Ok(headers));
                    usable.push(tool);
                }
                Err(reason) => {
                    tracing::warn!(server = %self.inner.cfg.name, tool = %name, %reason,
                        "tool rejected: invalid x-mcp-header");
                    catalog.insert(name, Err(reason));
                }
            }
        }
        *self.inner.tools.write().await = catalog;
        Outcome::Executed(Ok(usable))
    }

    /// `resources/list`, every page.
    pub async fn list_resources(&self) -> Outcome<Vec<Value>> {
        self.list_all("resources/list", "resources").await
    }

    /// `prompts/list`, every page.
    pub async fn list_prompts(&self) -> Outcome<Vec<Value>> {
        self.list_all("prompts/list", "prompts").await
    }

    /// Every page of a paginated list method, the items under `key`.
    async fn list_all(&self, method: &str, key: &str) -> Outcome<Vec<Value>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        // bounded: a server that keeps handing out cursors is cut off
        for _ in 0..1000 {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let page = match self.request(method, params, None, &CallMeta::default()).await {
                Outcome::Executed(Ok(v)) => v,
                other => return other.map(|_| Vec::new()),
            };
            match page.get(key) {
                Some(Value::Array(list)) => items.extend(list.iter().cloned()),
                _ => return Outcome::ambiguous(format!("{method} answered without a {key} array")),
            }
            cursor = page.get("nextCursor").and_then(Value::as_str).map(str::to_owned);
            if cursor.is_none() {
                return Outcome::Executed(Ok(items));
            }
        }
        Outcome::ambiguous(format!("{method} paged more than 1000 times"))
    }

    /// A health probe: `server/discover` on the stateless era, `ping` on session eras.
    pub async fn probe(&self) -> Outcome<()> {
        let method = match self.ensure_link().await {
            Ok(Link::Stateless) => "server/discover",
            Ok(Link::Session(_) | Link::Legacy(_)) => "ping",
            Err(o) => return o.map(|_| ()),
        };
        self.request(method, json!({}), None, &CallMeta::default()).await.map(|_| ())
    }

    /// Sends one request and classifies what became of it.
    pub async fn request(
        &self,
        method: &str,
        params: Value,
        name: Option<&str>,
        meta: &CallMeta,
    ) -> Outcome<Value> {
        let _counted = Counted::new();
        let link = match self.ensure_link().await {
            Ok(link) => link,
            Err(o) => return o,
        };
        let params = with_meta(params, meta, &link);
        let outcome = match &link {
            Link::Stateless => self.stateless_request(method, params, name).await,
            Link::Legacy(legacy) => {
                let ex = Exchange { name, ..Exchange::request(method, params) };
                self.legacy_request(legacy, &ex).await
            }
            Link::Session(_) => {
                let ex = Exchange { name, ..Exchange::request(method, params) };
                self.send(&link, &ex).await
            }
        };
        if let Outcome::NotDelivered { reason, .. } = &outcome {
            let mut guard = self.inner.link.write().await;
            match (&link, guard.as_ref()) {
                // the server forgot the session: the request was not processed; open a new one
                // for the next request (unless another request already did)
                (Link::Session(used), Some(Link::Session(cur)))
                    if reason == SESSION_EXPIRED && cur.id == used.id =>
                {
                    *guard = None;
                }
                // the server went away: it may come back speaking another era, so the next
                // request probes again (a legacy stream reconnects by itself)
                (Link::Stateless | Link::Session(_), Some(_)) if is_unreachable(reason) => {
                    *guard = None
                }
                _ => {}
            }
        }
        outcome
    }

    /// A stateless request, sent again (a new id each time) while the server answers with an
    /// `InputRequiredResult`, and once more after a `HeaderMismatch` refusal of a tool call
    /// once the tools were listed again.
    async fn stateless_request(
        &self,
        method: &str,
        params: Value,
        name: Option<&str>,
    ) -> Outcome<Value> {
        let mut current = Cow::Borrowed(&params);
        let mut rounds = 0;
        let mut relisted = false;
        loop {
            let headers = if method == "tools/call" {
                match self.param_headers(&current).await {
                    Ok(h) => h,
                    Err(reason) => return Outcome::not_delivered(reason),
                }
            } else {
                Vec::new()
            };
            let params_now = Cow::Borrowed(current.as_ref());
            let ex = Exchange { method, params: params_now, name, notification: false, headers };
            let reply = self.exchange(&Link::Stateless, &ex).await;
            match reply.outcome {
                Outcome::Executed(Ok(result)) if input::is_input_required(&result) => {
                    rounds += 1;
                    if rounds == input::MAX_INPUT_ROUNDS {
                        return Outcome::Executed(Err(RpcError {
                            code: RpcError::INPUT_REQUIRED,
                            message: format!(
                                "the server still asks for input after {rounds} rounds"
                            ),
                            data: Some(result),
                        }));
                    }
                    current = Cow::Owned(input::retry_params(&params, &result));
                }
                Outcome::NotDelivered { .. }
                    if method == "tools/call"
                        && !relisted
                        && reply.refusal.as_ref().is_some_and(|e| e.code == HEADER_MISMATCH) =>
                {
                    // the tool's schema may have changed or was never listed: list the tools
                    // and send again (the refused request was not processed)
                    relisted = true;
                    // a failed listing leaves the mirrored headers as they were: the resend is
                    // then refused the same way, and that refusal is what the caller gets
                    let _ = Box::pin(self.list_tools()).await;
                }
                // the earlier rounds reached the server: what they did is not known
                Outcome::NotDelivered { reason, .. } if rounds > 0 => {
                    return Outcome::ambiguous(format!(
                        "after the server asked for input: {reason}"
                    ));
                }
                other => return other,
            }
        }
    }

    /// The `Mcp-Param-*` headers of a `tools/call` with `params`, from the tool's listed schema
    /// (none for a tool never listed); an error when the tool was rejected.
    async fn param_headers(
        &self,
        params: &Value,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let Some(tool) = params.get("name").and_then(Value::as_str) else { return Ok(Vec::new()) };
        let arguments = params.get("arguments").unwrap_or(&Value::Null);
        match self.inner.tools.read().await.get(tool) {
            Some(Ok(headers)) => Ok(headers.for_arguments(arguments)),
            Some(Err(why)) => Err(format!("tool {tool} was rejected: {why}")),
            None => Ok(Vec::new()),
        }
    }

    async fn ensure_link(&self) -> Result<Link, Outcome<Value>> {
        if let Some(link) = self.inner.link.read().await.clone() {
            return Ok(link);
        }
        let _one = self.inner.opening.lock().await;
        if let Some(link) = self.inner.link.read().await.clone() {
            return Ok(link);
        }
        let link = self.open().await?;
        *self.inner.link.write().await = Some(link.clone());
        Ok(link)
    }

    /// Probes the era (newest first when the transport is `auto`) and opens a session if the
    /// server needs one.
    async fn open(&self) -> Result<Link, Outcome<Value>> {
        if self.inner.cfg.transport == TransportChoice::Sse {
            return self.open_legacy().await;
        }
        match self.inner.cfg.protocol_version.as_deref() {
            Some(STATELESS_VERSION) => return Ok(Link::Stateless),
            Some(version) => return self.initialize(version).await.map(Link::Session),
            None => {}
        }
        let meta = with_meta(json!({}), &CallMeta::default(), &Link::Stateless);
        let discover = Exchange::request("server/discover", meta);
        match self.send(&Link::Stateless, &discover).await {
            Outcome::Executed(Ok(_)) => return Ok(Link::Stateless),
            // a connection that fails is no answer about the era
            Outcome::NotDelivered { reason, retry_after } if stops_probing(&reason) => {
                return Err(Outcome::NotDelivered { reason, retry_after });
            }
            // anything else (400, 404, 405, a JSON-RPC error, an odd answer) means an older
            // server: fall back to initialize
            _ => {}
        }
        match self.initialize(SESSION_VERSION).await {
            Ok(session) => Ok(Link::Session(session)),
            // refused, not unreachable: perhaps a legacy server, whose URL is its GET stream
            Err(Outcome::NotDelivered { reason, retry_after })
                if self.inner.cfg.transport == TransportChoice::Auto && !stops_probing(&reason) =>
            {
                self.open_legacy().await.map_err(|_| Outcome::NotDelivered { reason, retry_after })
            }
            Err(o) => Err(o),
        }
    }

    async fn initialize(&self, version: &str) -> Result<Session, Outcome<Value>> {
        let params = initialize_params(version);
        let fresh = Session { id: None, version: version.to_owned() };
        let ex = Exchange::request("initialize", params);
        let reply = self.exchange(&Link::Session(fresh), &ex).await;
        let (result, headers) = match reply.outcome {
            Outcome::Executed(Ok(v)) => (v, reply.headers),
            Outcome::Executed(Err(e)) => {
                return Err(Outcome::not_delivered(format!("initialize refused: {e}")));
            }
            other => return Err(other),
        };
        let version =
            result.get("protocolVersion").and_then(Value::as_str).unwrap_or(version).to_owned();
        let id = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let session = Session { id, version };
        let link = Link::Session(session.clone());
        let note = Exchange::notification("notifications/initialized", json!({}));
        match self.send(&link, &note).await {
            Outcome::Executed(_) => Ok(session),
            other => Err(other),
        }
    }
}
