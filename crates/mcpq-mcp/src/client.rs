//! [`McpClient`]: one MCP server over Streamable HTTP, in the stateless 2026-07-28 era or the
//! session eras (2025-03-26 … 2025-11-25). It owns the HTTP pool, the session and the era, and
//! classifies every request's outcome. Many requests may be in flight at once; the session is
//! opened by one of them while the others wait for it. Session-era SSE answers are resumed
//! (`Last-Event-ID`, after the server's `retry:`) and the server's own requests on them answered;
//! stateless requests carry the SEP-2243 headers and follow multi round-trip input requests.

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
use crate::sse::SseParser;

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

/// A legacy stream and the stream session it last initialized.
struct LegacyLink {
    stream: LegacySession,
    initialized: Mutex<u64>,
}

/// A client for one MCP server. Cheap to clone.
#[derive(Clone)]
pub struct McpClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ServerConfig,
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
    params: Value,
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
        Self { method, params, name: None, notification: false, headers: Vec::new() }
    }

    /// A notification.
    fn notification(method: &'a str, params: Value) -> Self {
        Self { notification: true, ..Self::request(method, params) }
    }
}

/// What one POST came to: the outcome, the response headers when there was a response, and
/// the JSON-RPC error a refusing (4xx) response carried.
struct Reply {
    outcome: Outcome<Value>,
    headers: HeaderMap,
    refusal: Option<RpcError>,
}

impl Reply {
    fn bare(outcome: Outcome<Value>) -> Self {
        Self { outcome, headers: HeaderMap::new(), refusal: None }
    }
}

/// An SSE answer as read so far, across resumptions.
#[derive(Default)]
struct StreamState {
    bytes: usize,
    last_event_id: Option<String>,
    retry: Option<Duration>,
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
        let mut current = params.clone();
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
            let ex =
                Exchange { method, params: current.clone(), name, notification: false, headers };
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
                    current = input::retry_params(&params, &result);
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

    async fn open_legacy(&self) -> Result<Link, Outcome<Value>> {
        let cfg = &self.inner.cfg;
        let credentials = self
            .inner
            .auth
            .header_pairs(&self.inner.http, &cfg.url)
            .await
            .map_err(Outcome::not_delivered)?;
        let stream = LegacySession::open(
            self.inner.http.clone(),
            &cfg.url,
            &credentials,
            cfg.request_timeout().min(cfg.connect_timeout() * 2),
            cfg.max_response_bytes,
            self.inner.catalog_stale.clone(),
        )
        .await?;
        let link = Arc::new(LegacyLink { stream, initialized: Mutex::new(0) });
        self.legacy_ready(&link).await?;
        Ok(Link::Legacy(link))
    }

    /// The endpoint of the stream's current session, initialized (once per session).
    async fn legacy_ready(&self, link: &LegacyLink) -> Result<String, Outcome<Value>> {
        let mut initialized = link.initialized.lock().await;
        let Some((session, url)) = link.stream.endpoint() else {
            return Err(Outcome::not_delivered("the SSE stream is reconnecting"));
        };
        if *initialized == session {
            return Ok(url);
        }
        let params = initialize_params(LEGACY_VERSION);
        let init = Exchange::request("initialize", params);
        match self.legacy_post(link, &url, &init).await {
            Outcome::Executed(Ok(_)) => {}
            Outcome::Executed(Err(e)) => {
                return Err(Outcome::not_delivered(format!("initialize refused: {e}")));
            }
            other => return Err(other),
        }
        let note = Exchange::notification("notifications/initialized", json!({}));
        match self.legacy_post(link, &url, &note).await {
            Outcome::Executed(_) => {
                *initialized = session;
                Ok(url)
            }
            other => Err(other),
        }
    }

    async fn legacy_request(&self, link: &LegacyLink, ex: &Exchange<'_>) -> Outcome<Value> {
        match self.legacy_ready(link).await {
            Ok(url) => self.legacy_post(link, &url, ex).await,
            Err(o) => o,
        }
    }

    /// One POST to a legacy endpoint; the answer arrives on the stream.
    async fn legacy_post(&self, link: &LegacyLink, url: &str, ex: &Exchange<'_>) -> Outcome<Value> {
        let id = link.stream.next_id();
        let body = body_of(ex, id);
        let answer = if ex.notification { None } else { Some(link.stream.expect(id).await) };
        let deadline = Instant::now() + self.inner.cfg.request_timeout();
        let mut refreshed = false;
        let sent = loop {
            let req =
                self.inner.http.post(url).header(CONTENT_TYPE, "application/json").json(&body);
            let (req, token) = match self.inner.auth.apply(req).await {
                Ok(r) => r,
                Err(reason) => break Outcome::not_delivered(reason),
            };
            break match tokio::time::timeout_at(deadline, req.send()).await {
                Err(_) => Outcome::ambiguous("timed out sending the request"),
                Ok(Err(e)) if e.is_connect() => {
                    Outcome::not_delivered(format!("{UNREACHABLE}: {}", source_text(&e)))
                }
                Ok(Err(e)) => Outcome::ambiguous(format!("request failed: {}", source_text(&e))),
                Ok(Ok(resp))
                    if resp.status() == StatusCode::UNAUTHORIZED
                        && !refreshed
                        && self.inner.auth.can_refresh() =>
                {
                    // a stale token: refresh once and send again (a 401 was not processed)
                    refreshed = true;
                    self.inner.auth.invalidate(token).await;
                    continue;
                }
                Ok(Ok(resp)) => {
                    match classify_status(resp.status(), resp.headers(), &Link::Stateless, None) {
                        Some(o) => o,
                        None => Outcome::Executed(Ok(Value::Null)),
                    }
                }
            };
        };
        let Outcome::Executed(_) = sent else {
            link.stream.forget(id).await;
            return sent;
        };
        let Some(answer) = answer else { return sent };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Outcome::ambiguous("the SSE stream closed before the answer"),
            Err(_) => {
                link.stream.forget(id).await;
                Outcome::ambiguous("timed out waiting for the answer on the SSE stream")
            }
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

    async fn send(&self, link: &Link, ex: &Exchange<'_>) -> Outcome<Value> {
        self.exchange(link, ex).await.outcome
    }

    /// One POST (sent once more, stateless, when the server refuses the protocol revision yet
    /// lists it as supported).
    async fn exchange(&self, link: &Link, ex: &Exchange<'_>) -> Reply {
        let cfg = &self.inner.cfg;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let body = match serde_json::to_vec(&body_of(ex, id)) {
            Ok(b) => b,
            Err(e) => {
                return Reply::bare(Outcome::not_delivered(format!("cannot encode request: {e}")));
            }
        };
        let deadline = Instant::now() + cfg.request_timeout();
        let mut refreshed = false;
        let mut version_retried = false;
        loop {
            let (req, token) = match self.post(link, ex, body.clone()).await {
                Ok(r) => r,
                Err(o) => return Reply::bare(o),
            };
            let sent = tokio::time::timeout_at(deadline, req.send()).await;
            let resp = match sent {
                Err(_) => {
                    self.cancel_later(link, id, ex.notification);
                    return Reply::bare(Outcome::ambiguous("timed out waiting for the response"));
                }
                Ok(Err(e)) if e.is_connect() => {
                    return Reply::bare(Outcome::not_delivered(format!(
                        "{UNREACHABLE}: {}",
                        source_text(&e)
                    )));
                }
                Ok(Err(e)) => {
                    return Reply::bare(Outcome::ambiguous(format!(
                        "request failed: {}",
                        source_text(&e)
                    )));
                }
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            if status == StatusCode::UNAUTHORIZED && !refreshed && self.inner.auth.can_refresh() {
                // a stale token: refresh once and send again (a 401 was not processed)
                refreshed = true;
                self.inner.auth.invalidate(token).await;
                continue;
            }
            if !status.is_success() {
                let refusal = match status.is_client_error() {
                    true => self.read_refusal(resp, deadline).await,
                    false => None,
                };
                if matches!(link, Link::Stateless)
                    && !version_retried
                    && refusal.as_ref().is_some_and(offers_stateless)
                {
                    // refused before processing, by a server that says it speaks our revision
                    // (a fleet mid-upgrade, say): worth one more try
                    version_retried = true;
                    continue;
                }
                let outcome = classify_status(status, &headers, link, refusal.as_ref())
                    .unwrap_or_else(|| Outcome::ambiguous(format!("unexpected status {status}")));
                return Reply { outcome, headers, refusal };
            }
            if ex.notification {
                return Reply {
                    outcome: Outcome::Executed(Ok(Value::Null)),
                    headers,
                    refusal: None,
                };
            }
            let outcome = self.read_answer(link, resp, id, deadline).await;
            if matches!(outcome, Outcome::Ambiguous { .. }) {
                self.cancel_later(link, id, false);
            }
            return Reply { outcome, headers, refusal: None };
        }
    }

    /// The JSON-RPC error in the body of a refusal, if it carries one.
    async fn read_refusal(&self, resp: reqwest::Response, deadline: Instant) -> Option<RpcError> {
        if resp.content_length().is_some_and(|n| n > MAX_REFUSAL_BYTES as u64) {
            return None;
        }
        let until = deadline.min(Instant::now() + self.inner.cfg.idle_timeout());
        let mut stream = resp.bytes_stream();
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout_at(until, stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_REFUSAL_BYTES {
                        return None;
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => return None,
            }
        }
        let msg: Value = serde_json::from_slice(&body).ok()?;
        serde_json::from_value(msg.get("error")?.clone()).ok()
    }

    /// The POST of `ex`, with the generation of the token it carries.
    async fn post(
        &self,
        link: &Link,
        ex: &Exchange<'_>,
        body: Vec<u8>,
    ) -> Result<(reqwest::RequestBuilder, u64), Outcome<Value>> {
        let mut req = self
            .inner
            .http
            .post(&self.inner.cfg.url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .body(body);
        match link {
            Link::Stateless => {
                req = req.header(VERSION_HEADER, STATELESS_VERSION).header("mcp-method", ex.method);
                if let Some(name) = ex.name {
                    req = req.header("mcp-name", encode_value(name));
                }
                for (header, value) in &ex.headers {
                    req = req.header(header, value);
                }
            }
            Link::Legacy(_) => {}
            Link::Session(s) => req = session_headers(req, s, ex.method == "initialize"),
        }
        self.inner.auth.apply(req).await.map_err(Outcome::not_delivered)
    }

    /// Reads a JSON or SSE answer up to the response with `id`, within the size cap, the idle
    /// limit (progress restarts it) and the request deadline. A session-era SSE answer that
    /// ends early is resumed when the server gave it an event id.
    async fn read_answer(
        &self,
        link: &Link,
        resp: reqwest::Response,
        id: u64,
        deadline: Instant,
    ) -> Outcome<Value> {
        let cap = self.inner.cfg.max_response_bytes;
        if resp.content_length().is_some_and(|n| n > cap as u64) {
            return Outcome::ambiguous(format!("response larger than {cap} bytes"));
        }
        if !is_sse(resp.headers()) {
            return self.read_json(resp, id, deadline).await;
        }
        let mut state = StreamState::default();
        let mut resp = resp;
        let mut resumed = 0;
        loop {
            let cut = match self.read_events(link, resp, id, deadline, &mut state).await {
                Ok(outcome) => return outcome,
                Err(cut) => cut,
            };
            // the stream ended or broke before the answer; the 2026-07-28 era has no resumption
            let (Link::Session(session), Some(last)) = (link, state.last_event_id.as_deref())
            else {
                return Outcome::ambiguous(cut);
            };
            if resumed == MAX_RESUMES {
                return Outcome::ambiguous(format!("{cut}, {resumed} times"));
            }
            resumed += 1;
            let wait = state.retry.unwrap_or(DEFAULT_RETRY);
            if Instant::now() + wait >= deadline {
                return Outcome::ambiguous(format!("{cut}; no time left to resume it"));
            }
            // the server asked for this pause (`retry:`) before we come back
            tokio::time::sleep(wait).await;
            resp = match self.resume(session, last, deadline).await {
                Ok(r) => r,
                Err(reason) => return Outcome::ambiguous(format!("{cut}; {reason}")),
            };
        }
    }

    async fn read_json(
        &self,
        resp: reqwest::Response,
        id: u64,
        deadline: Instant,
    ) -> Outcome<Value> {
        let cfg = &self.inner.cfg;
        let cap = cfg.max_response_bytes;
        let mut stream = resp.bytes_stream();
        let mut body = Vec::new();
        loop {
            let idle = Instant::now() + cfg.idle_timeout();
            match tokio::time::timeout_at(idle.min(deadline), stream.next()).await {
                Err(_) => return Outcome::ambiguous("timed out reading the response"),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Outcome::ambiguous(format!("response cut: {}", source_text(&e)));
                }
                Ok(Some(Ok(chunk))) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > cap {
                        return Outcome::ambiguous(format!("response larger than {cap} bytes"));
                    }
                }
            }
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(msg) => answer_to(&msg, id)
                .unwrap_or_else(|| Outcome::ambiguous("the response answers another request")),
            Err(e) => Outcome::ambiguous(format!("malformed JSON-RPC response: {e}")),
        }
    }

    /// Reads one SSE response up to the answer to `id`: `Ok` with the outcome, or `Err` with
    /// why the stream stopped before it (it may be resumable). Requests the server sends on
    /// the stream are answered.
    async fn read_events(
        &self,
        link: &Link,
        resp: reqwest::Response,
        id: u64,
        deadline: Instant,
        state: &mut StreamState,
    ) -> Result<Outcome<Value>, String> {
        let cfg = &self.inner.cfg;
        let cap = cfg.max_response_bytes;
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        loop {
            let idle = Instant::now() + cfg.idle_timeout();
            let chunk = match tokio::time::timeout_at(idle.min(deadline), stream.next()).await {
                Err(_) => return Ok(Outcome::ambiguous("timed out reading the response")),
                Ok(None) => return Err("stream ended before the response".into()),
                Ok(Some(Err(e))) => return Err(format!("response cut: {}", source_text(&e))),
                Ok(Some(Ok(c))) => c,
            };
            state.bytes += chunk.len();
            if state.bytes > cap {
                return Ok(Outcome::ambiguous(format!("response larger than {cap} bytes")));
            }
            for event in parser.push(&chunk) {
                if let Some(event_id) = event.id {
                    state.last_event_id = (!event_id.is_empty()).then_some(event_id);
                }
                if let Some(ms) = event.retry_ms {
                    state.retry = Some(Duration::from_millis(ms));
                }
                if event.data.is_empty() {
                    continue;
                }
                let msg = match serde_json::from_str::<Value>(&event.data) {
                    Ok(msg) => msg,
                    Err(e) => return Ok(Outcome::ambiguous(format!("malformed event data: {e}"))),
                };
                if let Some(o) = answer_to(&msg, id) {
                    return Ok(o);
                }
                let method = msg.get("method").and_then(Value::as_str);
                if method == Some(TOOLS_CHANGED) {
                    self.inner.catalog_stale.store(true, Ordering::Release);
                }
                if let (Link::Session(session), Some(method)) = (link, method)
                    && let Some(request_id) = msg.get("id")
                {
                    self.reply_later(session, request_id.clone(), method);
                }
                // progress and other notifications: keep reading (the idle limit restarts
                // with every chunk)
            }
        }
    }

    /// Reopens a session-era answer stream after `last_event_id` (HTTP GET with
    /// `Last-Event-ID`); the error says why it could not be.
    async fn resume(
        &self,
        session: &Session,
        last_event_id: &str,
        deadline: Instant,
    ) -> Result<reqwest::Response, String> {
        let last = HeaderValue::from_str(last_event_id)
            .map_err(|_| "its last event id cannot be sent back".to_owned())?;
        let req = self
            .inner
            .http
            .get(&self.inner.cfg.url)
            .header(ACCEPT, "text/event-stream")
            .header("last-event-id", last);
        let (req, _) = self.inner.auth.apply(session_headers(req, session, false)).await?;
        match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => Err("timed out resuming it".into()),
            Ok(Err(e)) => Err(format!("resuming it failed: {}", source_text(&e))),
            Ok(Ok(r)) if r.status().is_success() && is_sse(r.headers()) => Ok(r),
            Ok(Ok(r)) => Err(format!("resuming it was refused with {}", r.status())),
        }
    }

    /// Answers a request the server sent on a session-era answer stream, in the background
    /// (the stream is read on meanwhile), best effort.
    fn reply_later(&self, session: &Session, request_id: Value, method: &str) {
        let body = match input::answer(method) {
            Ok(result) => json!({ "jsonrpc": "2.0", "id": request_id, "result": result }),
            Err(error) => json!({ "jsonrpc": "2.0", "id": request_id, "error": error }),
        };
        let (client, session, method) = (self.clone(), session.clone(), method.to_owned());
        tokio::spawn(async move {
            let req = client
                .inner
                .http
                .post(&client.inner.cfg.url)
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json, text/event-stream")
                .json(&body);
            let Ok((req, _)) = client.inner.auth.apply(session_headers(req, &session, false)).await
            else {
                return;
            };
            match tokio::time::timeout(Duration::from_secs(10), req.send()).await {
                Ok(Ok(r)) if r.status().is_success() => {}
                other => tracing::debug!(server = %client.inner.cfg.name, %method,
                    failed = ?other.map(|r| r.map(|r| r.status())), "answer to a server request not taken"),
            }
        });
    }

    /// Tells a session server to stop working on `id`, in the background, best effort.
    fn cancel_later(&self, link: &Link, id: u64, notification: bool) {
        let Link::Session(_) = link else { return };
        if notification {
            return;
        }
        let (client, link) = (self.clone(), link.clone());
        tokio::spawn(async move {
            let ex = Exchange::notification(
                "notifications/cancelled",
                json!({ "requestId": id, "reason": "timed out" }),
            );
            let _ = tokio::time::timeout(Duration::from_secs(5), client.send(&link, &ex)).await;
        });
    }
}

const SESSION_EXPIRED: &str = "session expired";
/// The notification that invalidates the tool cache.
pub(crate) const TOOLS_CHANGED: &str = "notifications/tools/list_changed";
const UNREACHABLE: &str = "unreachable";

fn is_unreachable(reason: &str) -> bool {
    reason.starts_with(UNREACHABLE)
}

/// True when no other era would fare better: the server cannot be reached, or we have no
/// credentials to show it.
fn stops_probing(reason: &str) -> bool {
    is_unreachable(reason) || reason.starts_with(NO_CREDENTIALS)
}

/// The JSON-RPC body of `ex` under `id`. A tool call asks for progress notifications, with its
/// id as the token: each one restarts the idle limit of a streamed answer.
fn body_of(ex: &Exchange<'_>, id: u64) -> Value {
    let mut body = json!({ "jsonrpc": "2.0", "method": ex.method, "params": ex.params });
    if !ex.notification {
        body["id"] = json!(id);
        if ex.method == "tools/call"
            && let Some(params) = body["params"].as_object_mut()
            && let Some(meta) = params.entry("_meta").or_insert_with(|| json!({})).as_object_mut()
        {
            meta.entry("progressToken").or_insert(json!(id));
        }
    }
    body
}

/// The full error chain, for reasons people read.
fn source_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// Adds mcpq's `_meta` (and, on the stateless era, the protocol's) to request params.
fn with_meta(params: Value, meta: &CallMeta, link: &Link) -> Value {
    let mut params = match params {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let mut m = match params.remove("_meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    if let Some(task) = &meta.task {
        m.insert("mcpq/task".into(), json!(task));
    }
    if let Some(attempt) = meta.attempt {
        m.insert("mcpq/attempt".into(), json!(attempt));
    }
    if let Link::Stateless = link {
        m.insert("io.modelcontextprotocol/protocolVersion".into(), json!(STATELESS_VERSION));
        m.insert("io.modelcontextprotocol/clientCapabilities".into(), json!({}));
        m.insert(
            "io.modelcontextprotocol/clientInfo".into(),
            json!({ "name": "mcpq", "version": env!("CARGO_PKG_VERSION") }),
        );
    }
    if !m.is_empty() {
        params.insert("_meta".into(), Value::Object(m));
    }
    Value::Object(params)
}

/// The session headers on a request: the session id, and the negotiated revision (which
/// 2025-03-26 does not send, and no revision sends on `initialize`).
fn session_headers(
    req: reqwest::RequestBuilder,
    s: &Session,
    initialize: bool,
) -> reqwest::RequestBuilder {
    let mut req = req;
    if !initialize && s.version.as_str() > "2025-03-26" {
        req = req.header(VERSION_HEADER, s.version.as_str());
    }
    if let Some(id) = &s.id {
        req = req.header(SESSION_HEADER, id.as_str());
    }
    req
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// True when `refusal` is an `UnsupportedProtocolVersion` error that names the stateless
/// revision among the server's supported ones.
fn offers_stateless(refusal: &RpcError) -> bool {
    refusal.code == UNSUPPORTED_VERSION
        && refusal
            .data
            .as_ref()
            .and_then(|d| d.get("supported"))
            .and_then(Value::as_array)
            .is_some_and(|vs| vs.iter().any(|v| v.as_str() == Some(STATELESS_VERSION)))
}

/// The outcome a status alone decides, if it does; `refusal` is the JSON-RPC error of a 4xx.
fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    link: &Link,
    refusal: Option<&RpcError>,
) -> Option<Outcome<Value>> {
    if status.is_success() {
        return None;
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let code = status.as_u16();
    Some(match code {
        404 if matches!(link, Link::Session(Session { id: Some(_), .. })) => {
            Outcome::not_delivered(SESSION_EXPIRED)
        }
        429 | 503 => Outcome::NotDelivered { reason: format!("server busy ({code})"), retry_after },
        // refused before execution
        400..=499 => match refusal {
            Some(e) => Outcome::not_delivered(format!("rejected with {status}: {e}")),
            None => Outcome::not_delivered(format!("rejected with {status}")),
        },
        // a server or proxy error: the request may have run
        _ => Outcome::ambiguous(format!("server error {status}")),
    })
}

/// The outcome carried by `msg` if it is the response to `id`.
pub(crate) fn answer_to(msg: &Value, id: u64) -> Option<Outcome<Value>> {
    if msg.get("id").and_then(Value::as_u64) != Some(id) || msg.get("method").is_some() {
        return None;
    }
    if let Some(result) = msg.get("result") {
        return Some(Outcome::Executed(Ok(result.clone())));
    }
    match msg.get("error").map(|e| serde_json::from_value::<RpcError>(e.clone())) {
        Some(Ok(e)) => Some(Outcome::Executed(Err(e))),
        _ => Some(Outcome::ambiguous("response with neither result nor error")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let session =
            Link::Session(Session { id: Some("s".into()), version: SESSION_VERSION.into() });
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let c = |code: u16, link: &Link| {
            classify_status(StatusCode::from_u16(code).unwrap(), &h, link, None)
        };
        assert_eq!(c(200, &session), None);
        assert_eq!(c(404, &session), Some(Outcome::not_delivered(SESSION_EXPIRED)));
        assert!(matches!(c(404, &Link::Stateless), Some(Outcome::NotDelivered { .. })));
        assert_eq!(
            c(429, &session),
            Some(Outcome::NotDelivered {
                reason: "server busy (429)".into(),
                retry_after: Some(Duration::from_secs(7))
            })
        );
        assert!(matches!(
            c(503, &session),
            Some(Outcome::NotDelivered { retry_after: Some(_), .. })
        ));
        assert!(matches!(c(400, &session), Some(Outcome::NotDelivered { .. })));
        assert!(matches!(c(500, &session), Some(Outcome::Ambiguous { .. })));
        assert!(matches!(c(502, &session), Some(Outcome::Ambiguous { .. })));
    }

    #[test]
    fn a_refusal_names_its_json_rpc_error_and_an_offered_revision_is_retried() {
        let refusal = RpcError {
            code: UNSUPPORTED_VERSION,
            message: "Unsupported protocol version".into(),
            data: Some(json!({"supported": [STATELESS_VERSION], "requested": "2026-07-28"})),
        };
        let out = classify_status(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            &Link::Stateless,
            Some(&refusal),
        );
        assert_eq!(
            out,
            Some(Outcome::not_delivered(
                "rejected with 400 Bad Request: Unsupported protocol version (-32022)"
            ))
        );
        assert!(offers_stateless(&refusal));
        let elsewhere = RpcError { data: Some(json!({"supported": ["2027-01-01"]})), ..refusal };
        assert!(!offers_stateless(&elsewhere));
        let mismatch = RpcError { code: HEADER_MISMATCH, message: "m".into(), data: None };
        assert!(!offers_stateless(&mismatch));
    }

    #[test]
    fn answers_match_their_request_id() {
        assert_eq!(
            answer_to(&json!({"jsonrpc": "2.0", "id": 3, "result": {"x": 1}}), 3),
            Some(Outcome::Executed(Ok(json!({"x": 1}))))
        );
        assert_eq!(answer_to(&json!({"jsonrpc": "2.0", "id": 4, "result": {}}), 3), None);
        assert_eq!(
            answer_to(&json!({"jsonrpc": "2.0", "method": "notifications/progress"}), 3),
            None
        );
        let err = answer_to(
            &json!({"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "no"}}),
            3,
        );
        assert!(matches!(err, Some(Outcome::Executed(Err(RpcError { code: -32601, .. })))));
        assert!(matches!(
            answer_to(&json!({"jsonrpc": "2.0", "id": 3}), 3),
            Some(Outcome::Ambiguous { .. })
        ));
    }

    #[test]
    fn meta_carries_the_task_and_on_stateless_the_protocol() {
        let meta = CallMeta { task: Some("t1".into()), attempt: Some(2) };
        let p = with_meta(
            json!({"name": "echo", "_meta": {"progressToken": 1}}),
            &meta,
            &Link::Stateless,
        );
        assert_eq!(p["_meta"]["mcpq/task"], "t1");
        assert_eq!(p["_meta"]["mcpq/attempt"], 2);
        assert_eq!(p["_meta"]["progressToken"], 1);
        assert_eq!(p["_meta"]["io.modelcontextprotocol/protocolVersion"], STATELESS_VERSION);
        let s = Link::Session(Session { id: None, version: SESSION_VERSION.into() });
        let p = with_meta(json!({}), &CallMeta::default(), &s);
        assert!(p.get("_meta").is_none());
    }
}
