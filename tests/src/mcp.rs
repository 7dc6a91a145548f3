//! In-process MCP servers for end-to-end tests: rmcp's Streamable HTTP service on `127.0.0.1`,
//! behind a fault layer that can reject, stall, cut, garble or bloat the next POSTs. Every
//! `tools/call` that reaches a tool is recorded before it runs; faults are one-shot counters
//! consumed by the next POSTs. An optional [`Gate`] checks credentials before any fault or
//! rmcp sees a request. A server keeps its port, record, gate and faults across
//! [`McpServer::restart`] and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, JsonObject, ListPromptsResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    Prompt, PromptArgument, PromptMessage, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, Resource, ResourceContents, Role, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How the server speaks Streamable HTTP. Every mode also serves the sessionless 2026-07-28
/// revision: rmcp answers `server/discover` and routes any request whose `_meta` names that
/// protocol version (sent with `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`) without a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// rmcp's default: `initialize` opens a session (`Mcp-Session-Id`), replies are SSE streams.
    SessionSse,
    /// Sessions as in [`Mode::SessionSse`], but each reply is one `application/json` body.
    /// rmcp 3.9 applies `json_response` only to stateless servers, so the fault layer
    /// unwraps the SSE stream into the JSON-RPC reply it carries.
    SessionJson,
    /// rmcp's stateless mode (`legacy_session_mode = false`, `json_response = true`): no
    /// sessions, every POST stands alone, replies are `application/json`.
    Stateless,
}

/// Decides whether a request's credentials admit it. A refused request (any method) gets
/// HTTP 401 with `WWW-Authenticate: <challenge>`, consumes no fault and reaches nothing.
pub trait Gate: Send + Sync + 'static {
    /// True when `headers` carry an acceptable credential.
    fn admits(&self, headers: &HeaderMap) -> bool;

    /// The `WWW-Authenticate` value sent with a refusal, e.g. `Bearer realm="mcp"`.
    fn challenge(&self) -> HeaderValue;
}

/// One `tools/call` as the tool saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// The tool's name.
    pub tool: String,
    /// The call's `arguments` (`null` when absent).
    pub arguments: Value,
    /// The request's `_meta` object (`{}` when absent).
    pub meta: Value,
}

/// An MCP server on `127.0.0.1` owned by one test, with tools `echo`, `slow`, `fail` and `add`,
/// resource `mem://greeting` and prompt `greet`.
pub struct McpServer {
    addr: SocketAddr,
    mode: Mode,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

/// A cloneable handle that arms faults on a running server. Each knob applies to the next
/// POSTs (`initialize` and notifications included) and is used up by them; arming a knob again
/// replaces its count. When several are armed, a POST takes the first of reject, stall,
/// malformed, oversize, cut.
#[derive(Clone)]
pub struct Faults {
    shared: Arc<Shared>,
}

struct Running {
    task: JoinHandle<()>,
    ct: CancellationToken,
}

#[derive(Default)]
struct Shared {
    mode_json: bool,
    executions: Mutex<Vec<Execution>>,
    posts: AtomicU64,
    in_flight: AtomicUsize,
    plan: Mutex<Plan>,
    sessions: Mutex<Option<Arc<LocalSessionManager>>>,
    gate: Option<Arc<dyn Gate>>,
}

#[derive(Default)]
struct Plan {
    reject: usize,
    reject_status: u16,
    reject_retry_after: Option<u64>,
    stall: usize,
    malformed: usize,
    oversize: usize,
    oversize_bytes: usize,
    cut: usize,
}

enum Fault {
    Reject(StatusCode, Option<u64>),
    Stall,
    Malformed,
    Oversize(usize),
    Cut,
}

/// Marks a response whose connection must be dropped instead of answered.
#[derive(Debug, Clone, Copy)]
struct CutConnection;

impl std::fmt::Display for CutConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection cut by fault injection")
    }
}

impl std::error::Error for CutConnection {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; keep the data usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl McpServer {
    /// Starts a server in `mode` on `127.0.0.1:0`.
    pub async fn start(mode: Mode) -> Result<Self> {
        Self::start_with(mode, None).await
    }

    /// Starts a server in `mode` on `127.0.0.1:0` that admits only requests `gate` admits.
    pub async fn start_gated(mode: Mode, gate: Arc<dyn Gate>) -> Result<Self> {
        Self::start_with(mode, Some(gate)).await
    }

    async fn start_with(mode: Mode, gate: Option<Arc<dyn Gate>>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared =
            Arc::new(Shared { mode_json: mode == Mode::SessionJson, gate, ..Default::default() });
        let running = spawn(listener, mode, &shared);
        Ok(Self { addr, mode, shared, running: Mutex::new(Some(running)) })
    }

    /// The MCP endpoint, `http://127.0.0.1:PORT/mcp`.
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// The mode the server was started in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A handle to arm faults with.
    pub fn faults(&self) -> Faults {
        Faults { shared: self.shared.clone() }
    }

    /// Every tool call so far, in the order the tools started.
    pub fn executions(&self) -> Vec<Execution> {
        lock(&self.shared.executions).clone()
    }

    /// POSTs seen on the endpoint so far, faulted and refused ones included.
    pub fn posts(&self) -> u64 {
        self.shared.posts.load(Ordering::SeqCst)
    }

    /// Tool calls running now; a cancelled or abandoned `slow` leaves this count.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Kills the server: stops listening, drops open connections (stalled ones included)
    /// and ends all sessions. Connecting afterwards is refused. Idempotent.
    pub async fn stop(&self) {
        let running = lock(&self.running).take();
        *lock(&self.shared.sessions) = None;
        if let Some(r) = running {
            r.ct.cancel();
            r.task.abort();
            let _ = r.task.await;
        }
    }

    /// Stops the server if it runs, then serves again on the same port with no sessions, as
    /// a restarted process would. Executions, counters and armed faults are kept.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("cannot bind {} again", self.addr))?;
        let running = spawn(listener, self.mode, &self.shared);
        *lock(&self.running) = Some(running);
        Ok(())
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            r.ct.cancel();
            r.task.abort();
        }
    }
}

impl Faults {
    /// The next `n` POSTs get `status` (with `Retry-After: secs` when given) and reach nothing.
    /// A `status` that is not a valid HTTP status becomes 503.
    pub fn reject_next(&self, n: usize, status: u16, retry_after_secs: Option<u64>) {
        let mut plan = lock(&self.shared.plan);
        plan.reject = n;
        plan.reject_status = status;
        plan.reject_retry_after = retry_after_secs;
    }

    /// The next `n` POSTs are accepted and never answered, until the client gives up or the
    /// server stops. They reach nothing.
    pub fn stall_next(&self, n: usize) {
        lock(&self.shared.plan).stall = n;
    }

    /// The next `n` POSTs are served in full (tools run and are recorded), then the connection
    /// is closed without a response: the client cannot tell whether the call happened.
    pub fn cut_after_accept_next(&self, n: usize) {
        lock(&self.shared.plan).cut = n;
    }

    /// The next `n` POSTs get `200 application/json` with a body that is not JSON. They reach
    /// nothing.
    pub fn malformed_next(&self, n: usize) {
        lock(&self.shared.plan).malformed = n;
    }

    /// The next `n` POSTs get a well-formed JSON-RPC result (a text block, `id` echoed) of at
    /// least `bytes` bytes. They reach nothing.
    pub fn oversize_next(&self, n: usize, bytes: usize) {
        let mut plan = lock(&self.shared.plan);
        plan.oversize = n;
        plan.oversize_bytes = bytes;
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        *lock(&self.shared.plan) = Plan::default();
    }

    /// Forgets every session, so a request carrying an old `Mcp-Session-Id` gets HTTP 404.
    /// Open streams of those sessions end.
    pub async fn expire_sessions(&self) {
        let manager = lock(&self.shared.sessions).clone();
        let Some(manager) = manager else { return };
        let handles: Vec<_> = manager.sessions.write().await.drain().map(|(_, h)| h).collect();
        for handle in handles {
            let _ = handle.close().await;
        }
    }
}

impl Plan {
    fn take(&mut self) -> Option<Fault> {
        fn arm(n: &mut usize) -> bool {
            let armed = *n > 0;
            *n = n.saturating_sub(1);
            armed
        }
        if arm(&mut self.reject) {
            let status =
                StatusCode::from_u16(self.reject_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            Some(Fault::Reject(status, self.reject_retry_after))
        } else if arm(&mut self.stall) {
            Some(Fault::Stall)
        } else if arm(&mut self.malformed) {
            Some(Fault::Malformed)
        } else if arm(&mut self.oversize) {
            Some(Fault::Oversize(self.oversize_bytes))
        } else if arm(&mut self.cut) {
            Some(Fault::Cut)
        } else {
            None
        }
    }
}

fn spawn(listener: TcpListener, mode: Mode, shared: &Arc<Shared>) -> Running {
    let ct = CancellationToken::new();
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(ct.child_token())
        .with_legacy_session_mode(mode != Mode::Stateless)
        .with_json_response(mode == Mode::Stateless);
    let manager = Arc::new(LocalSessionManager::default());
    *lock(&shared.sessions) = Some(manager.clone());
    let handler_shared = shared.clone();
    let service = StreamableHttpService::new(
        move || Ok(TestServer { shared: handler_shared.clone() }),
        manager,
        config,
    );
    let router = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn_with_state(shared.clone(), fault_layer));
    Running { task: tokio::spawn(serve(listener, router)), ct }
}

// Connections live in a JoinSet owned by this task, so aborting the task drops every open
// connection with it; axum::serve would detach them.
pub(crate) async fn serve(listener: TcpListener, router: axum::Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // SSE replies go out in small writes; Nagle would hold each one ~40 ms.
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let router = router.clone();
                        async move {
                            let response = match router.oneshot(req).await {
                                Ok(r) => r,
                                Err(e) => match e {},
                            };
                            // An error from the service makes hyper close the connection
                            // without writing a response.
                            match response.extensions().get::<CutConnection>() {
                                Some(cut) => Err(*cut),
                                None => Ok(response),
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn fault_layer(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let post = req.method() == Method::POST;
    if post {
        shared.posts.fetch_add(1, Ordering::SeqCst);
    }
    // credentials are checked in front of everything, as an auth proxy would
    if let Some(gate) = &shared.gate
        && !gate.admits(req.headers())
    {
        let mut response = plain(StatusCode::UNAUTHORIZED, "missing or wrong credentials");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, gate.challenge());
        return response;
    }
    if !post {
        return next.run(req).await;
    }
    let fault = lock(&shared.plan).take();
    match fault {
        Some(Fault::Reject(status, retry_after)) => {
            let mut response = plain(status, "rejected by fault injection");
            if let Some(secs) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        Some(Fault::Stall) => std::future::pending().await,
        Some(Fault::Malformed) => json_response(
            StatusCode::OK,
            Bytes::from_static(b"{\"jsonrpc\": \"2.0\", \"id\": this is not json-rpc"),
        ),
        Some(Fault::Oversize(bytes)) => {
            let id = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
                Ok(body) => serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let reply = json!({
                "jsonrpc": "2.0",
                "id": id,
                "result": {"content": [{"type": "text", "text": "x".repeat(bytes)}], "isError": false},
            });
            json_response(StatusCode::OK, Bytes::from(reply.to_string()))
        }
        Some(Fault::Cut) => {
            let response = next.run(req).await;
            // Wait for rmcp's reply so the tool has run before the connection goes.
            let _ = reply_of(response).await;
            let mut response = Response::new(Body::empty());
            response.extensions_mut().insert(CutConnection);
            response
        }
        None => {
            let response = next.run(req).await;
            if shared.mode_json && is_sse(&response) {
                sse_to_json(response).await
            } else {
                response
            }
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn is_sse(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

async fn sse_to_json(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Some(reply) = first_sse_reply(body).await else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "stream ended without a reply");
    };
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL, header::CONTENT_LENGTH] {
        parts.headers.remove(h);
    }
    parts.headers.remove("x-accel-buffering");
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(reply))
}

/// The JSON-RPC reply a response carries: the whole body, or for SSE the first event holding
/// a `result` or `error`. Reads no further than that.
async fn reply_of(response: Response) -> Option<Bytes> {
    if is_sse(&response) {
        first_sse_reply(response.into_body()).await
    } else {
        axum::body::to_bytes(response.into_body(), usize::MAX).await.ok()
    }
}

async fn first_sse_reply(body: Body) -> Option<Bytes> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.ok()?);
        let normalized = String::from_utf8_lossy(&buf).replace("\r\n", "\n");
        let mut events: Vec<&str> = normalized.split("\n\n").collect();
        events.pop(); // the unterminated tail
        for event in events {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            let data = data.join("\n");
            let Ok(message) = serde_json::from_str::<Value>(&data) else { continue };
            if message.get("result").is_some() || message.get("error").is_some() {
                return Some(Bytes::from(data));
            }
        }
    }
    None
}

/// The MCP handler rmcp builds per session (or per request when stateless).
#[derive(Clone)]
struct TestServer {
    shared: Arc<Shared>,
}

/// Counts a running tool until dropped, whether it finished or was cancelled.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(o) => Arc::new(o),
        _ => Arc::new(JsonObject::new()),
    }
}

fn tools() -> Vec<Tool> {
    vec![
        Tool::new(
            "echo",
            "Returns `text`.",
            schema(json!({
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            })),
        ),
        Tool::new(
            "slow",
            "Sleeps `ms` milliseconds, then answers; stops early when cancelled. With `every_ms`, \
             sends a progress notification that often (when the request asked for progress).",
            schema(json!({
                "type": "object",
                "properties": {
                    "ms": {"type": "integer", "minimum": 0},
                    "every_ms": {"type": "integer", "minimum": 1},
                },
                "required": ["ms"],
            })),
        ),
        Tool::new(
            "fail",
            "Always answers with a tool error (`isError: true`).",
            schema(json!({"type": "object", "properties": {}})),
        ),
        Tool::new(
            "add",
            "Returns a + b.",
            schema(json!({
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            })),
        )
        .with_annotations(ToolAnnotations::new().read_only(true).idempotent(true)),
    ]
}

fn arg<'a>(args: &'a Value, name: &str) -> Result<&'a Value, ErrorData> {
    args.get(name).ok_or_else(|| ErrorData::invalid_params(format!("missing `{name}`"), None))
}

fn number(args: &Value, name: &str) -> Result<f64, ErrorData> {
    arg(args, name)?
        .as_f64()
        .ok_or_else(|| ErrorData::invalid_params(format!("`{name}` is not a number"), None))
}

impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_prompts()
                .build(),
        )
        .with_server_info(Implementation::new("mcpq-test-server", "0.1.0"))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.map(Value::Object).unwrap_or(Value::Null);
        lock(&self.shared.executions).push(Execution {
            tool: request.name.to_string(),
            arguments: args.clone(),
            meta: Value::Object(context.meta.0.0.clone()),
        });
        let _in_flight = InFlight::new(&self.shared);
        let result = match request.name.as_ref() {
            "echo" => {
                let text = arg(&args, "text")?
                    .as_str()
                    .ok_or_else(|| ErrorData::invalid_params("`text` is not a string", None))?;
                CallToolResult::success(vec![ContentBlock::text(text)])
            }
            "slow" => {
                let ms = arg(&args, "ms")?
                    .as_u64()
                    .ok_or_else(|| ErrorData::invalid_params("`ms` is not an integer", None))?;
                // with `every_ms` and a progress token, progress is announced while it sleeps
                let every = args.get("every_ms").and_then(Value::as_u64).map(Duration::from_millis);
                let token = context.meta.get_progress_token();
                let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
                let mut step = 0u32;
                while tokio::time::Instant::now() < deadline {
                    let next = match (every, &token) {
                        (Some(e), Some(_)) => (tokio::time::Instant::now() + e).min(deadline),
                        _ => deadline,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        _ = context.ct.cancelled() => {
                            return Err(ErrorData::internal_error("cancelled", None));
                        }
                    }
                    if let Some(t) = &token
                        && every.is_some()
                        && next < deadline
                    {
                        step += 1;
                        let note = ProgressNotificationParam::new(t.clone(), f64::from(step));
                        // a client that went away is what the calling test looks at, not this
                        let _ = context.peer.notify_progress(note).await;
                    }
                }
                CallToolResult::success(vec![ContentBlock::text(format!("slept {ms} ms"))])
            }
            "fail" => CallToolResult::error(vec![ContentBlock::text("failed on purpose")]),
            "add" => {
                let sum = number(&args, "a")? + number(&args, "b")?;
                CallToolResult::success(vec![ContentBlock::text(sum.to_string())])
            }
            other => {
                return Err(ErrorData::invalid_params(format!("unknown tool `{other}`"), None));
            }
        };
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new("mem://greeting", "greeting").with_mime_type("text/plain"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        if request.uri != "mem://greeting" {
            return Err(ErrorData::resource_not_found(
                format!("no resource {}", request.uri),
                None,
            ));
        }
        Ok(ReadResourceResult::new(vec![ResourceContents::text("hello", request.uri)]).into())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            "greet",
            Some("Asks the model to greet someone."),
            Some(vec![PromptArgument::new("name").with_required(true)]),
        )]))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        if request.name != "greet" {
            return Err(ErrorData::invalid_params(format!("no prompt {}", request.name), None));
        }
        let name = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| ErrorData::invalid_params("missing `name`", None))?;
        Ok(GetPromptResult::new(vec![PromptMessage::new_text(
            Role::User,
            format!("Say hello to {name}."),
        )])
        .into())
    }
}
