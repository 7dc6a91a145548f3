//! In-process MCP servers (rmcp, Streamable HTTP, stateless, JSON answers) on 127.0.0.1 for
//! `mcpq demo` and `mcpq bench`. Tools: `work` (sleeps `ms`, answers `n`; counts the calls it
//! executes per mcpq task, read from `_meta`) and `echo` (answers its `text` at once; counts
//! calls only). A server can be killed (open connections dropped) and brought back on the
//! same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig as Info,
    Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// What a server executed for one task of the `work` tool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Calls {
    pub(crate) count: u64,
    pub(crate) idempotent: bool,
}

/// The demo's rule: `work` calls with an even `n` are safe to repeat.
pub(crate) fn idempotent(n: u64) -> bool {
    n.is_multiple_of(2)
}

/// One in-process MCP server.
pub(crate) struct LocalServer {
    pub(crate) name: &'static str,
    addr: SocketAddr,
    counts: Counts,
    running: Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
}

/// Calls executed, shared by every incarnation of one server.
#[derive(Clone, Default)]
struct Counts {
    work: Arc<Mutex<HashMap<String, Calls>>>,
    echo: Arc<AtomicU64>,
}

impl LocalServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub(crate) async fn start(name: &'static str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let s = Self { name, addr, counts: Counts::default(), running: Mutex::new(None) };
        s.spawn(listener);
        Ok(s)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// `work` calls executed so far, per mcpq task id.
    pub(crate) fn calls(&self) -> HashMap<String, Calls> {
        lock(&self.counts.work).clone()
    }

    /// `echo` calls executed so far.
    pub(crate) fn echoes(&self) -> u64 {
        self.counts.echo.load(Ordering::Relaxed)
    }

    fn spawn(&self, listener: TcpListener) {
        let ct = CancellationToken::new();
        let config = StreamableHttpServerConfig::default()
            .with_cancellation_token(ct.child_token())
            .with_legacy_session_mode(false)
            .with_json_response(true);
        let counts = self.counts.clone();
        let service = StreamableHttpService::new(
            move || Ok(LocalTools { counts: counts.clone() }),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        let router = axum::Router::new().nest_service("/mcp", service);
        *lock(&self.running) = Some((tokio::spawn(serve_connections(listener, router)), ct));
    }

    /// Kills the server: the listener and every open connection are dropped.
    pub(crate) async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some((task, ct)) = running {
            ct.cancel();
            task.abort();
            let _ = task.await;
        }
    }

    /// Brings a killed server back on its port.
    pub(crate) async fn restart(&self) -> Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("cannot bind {} again", self.addr))?;
        self.spawn(listener);
        Ok(())
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some((task, ct)) = lock(&self.running).take() {
            ct.cancel();
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // the data stays consistent: every critical section is a single insert or clone
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `router` on `listener` with every connection owned by this task, so aborting the
/// task drops open connections too — a killed process, not a graceful stop (`axum::serve`
/// would leave them running).
async fn serve_connections(listener: TcpListener, router: axum::Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // out of file descriptors, most likely: let connections finish
                        tracing::warn!(error = %e, "local MCP server cannot accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[derive(Clone)]
struct LocalTools {
    counts: Counts,
}

fn schema(v: Value) -> Arc<JsonObject> {
    Arc::new(match v {
        Value::Object(o) => o,
        _ => JsonObject::new(),
    })
}

impl ServerHandler for LocalTools {
    fn get_info(&self) -> Info {
        Info::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("mcpq-local", env!("CARGO_PKG_VERSION")))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let work = Tool::new(
            "work",
            "Sleeps `ms` milliseconds, then answers `n`.",
            schema(json!({
                "type": "object",
                "properties": { "n": {"type": "integer"}, "ms": {"type": "integer", "minimum": 0} },
            })),
        )
        .with_annotations(ToolAnnotations::new().read_only(false));
        let echo = Tool::new(
            "echo",
            "Answers `text`.",
            schema(json!({ "type": "object", "properties": { "text": {"type": "string"} } })),
        )
        .with_annotations(ToolAnnotations::new().read_only(true));
        Ok(ListToolsResult::with_all_items(vec![work, echo]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        match request.name.as_ref() {
            "echo" => {
                self.counts.echo.fetch_add(1, Ordering::Relaxed);
                let text = args.get("text").and_then(Value::as_str).unwrap_or_default();
                Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
            }
            "work" => {
                let task = context.meta.0.0.get("mcpq/task").and_then(Value::as_str);
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(0);
                lock(&self.counts.work)
                    .entry(task.unwrap_or("-").to_owned())
                    .or_insert(Calls { count: 0, idempotent: idempotent(n) })
                    .count += 1;
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0).min(10_000);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = context.ct.cancelled() => {
                        return Err(ErrorData::internal_error("cancelled", None));
                    }
                }
                Ok(CallToolResult::success(vec![ContentBlock::text(n.to_string())]).into())
            }
            other => Err(ErrorData::invalid_params(format!("unknown tool `{other}`"), None)),
        }
    }
}
