//! An in-process MCP server on the legacy HTTP+SSE transport (2024-11-05), which rmcp no longer
//! serves: `GET /sse` opens a session and names its POST endpoint; `POST /message` answers on
//! that session's stream. Knobs drop every stream (clients reconnect to a new session) or hold
//! answers back, and every tool run is recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Default)]
struct Shared {
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Value>>>,
    next: AtomicU64,
    hold: AtomicBool,
    executions: Mutex<Vec<Value>>,
    streams_opened: AtomicU64,
    extra_tools: Mutex<Vec<String>>,
    lists: AtomicU64,
}

/// A running legacy server on 127.0.0.1.
pub struct LegacyServer {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LegacyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LegacyServer {
    /// Starts a server on a free loopback port.
    pub async fn start() -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/sse", get(open_stream))
            .route("/message", post(message))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The SSE endpoint a client is configured with.
    pub fn url(&self) -> String {
        format!("http://{}/sse", self.addr)
    }

    /// The `arguments` of every `tools/call` run so far, with their `_meta`.
    pub fn executions(&self) -> Vec<Value> {
        self.shared.executions.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// GET streams opened so far (a reconnect opens another).
    pub fn streams_opened(&self) -> u64 {
        self.shared.streams_opened.load(Ordering::Relaxed)
    }

    /// Ends every open stream and forgets its session, as a restarting server would.
    pub fn drop_streams(&self) {
        if let Ok(mut s) = self.shared.sessions.lock() {
            s.clear();
        }
    }

    /// Adds a tool to `tools/list` (it echoes like `echo`); announce it with
    /// [`LegacyServer::announce_tools_changed`].
    pub fn add_tool(&self, name: &str) {
        if let Ok(mut t) = self.shared.extra_tools.lock() {
            t.push(name.to_owned());
        }
    }

    /// Sends `notifications/tools/list_changed` on every open stream.
    pub fn announce_tools_changed(&self) {
        if let Ok(s) = self.shared.sessions.lock() {
            for tx in s.values() {
                let _ = tx.send(
                    json!({ "jsonrpc": "2.0", "method": "notifications/tools/list_changed" }),
                );
            }
        }
    }

    /// `tools/list` requests answered so far.
    pub fn lists(&self) -> u64 {
        self.shared.lists.load(Ordering::Relaxed)
    }

    /// While set, requests are accepted (and tools run) but no answer is sent.
    pub fn hold_answers(&self, hold: bool) {
        self.shared.hold.store(hold, Ordering::Relaxed);
    }
}

async fn open_stream(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let id = shared.next.fetch_add(1, Ordering::Relaxed) + 1;
    shared.streams_opened.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    if let Ok(mut s) = shared.sessions.lock() {
        s.insert(id, tx);
    }
    let endpoint = Event::default().event("endpoint").data(format!("/message?sessionId={id}"));
    // the endpoint first, then each answer, until the session is dropped
    let answers = futures_util::stream::unfold(rx, |mut rx| async move {
        let msg = rx.recv().await?;
        Some((Ok(Event::default().event("message").data(msg.to_string())), rx))
    });
    Sse::new(futures_util::stream::once(async move { Ok(endpoint) }).chain(answers))
}

use futures_util::StreamExt;

async fn message(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::Json<Value>,
) -> StatusCode {
    let Some(id) = q.get("sessionId").and_then(|s| s.parse::<u64>().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    let Some(tx) = shared.sessions.lock().ok().and_then(|s| s.get(&id).cloned()) else {
        return StatusCode::NOT_FOUND;
    };
    let msg = body.0;
    let (Some(req_id), Some(method)) =
        (msg.get("id").cloned(), msg.get("method").and_then(Value::as_str))
    else {
        return StatusCode::ACCEPTED;
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => json!({
            "protocolVersion": "2024-11-05",
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "mcpq-legacy-test", "version": "1" },
        }),
        "ping" => json!({}),
        "tools/list" => {
            shared.lists.fetch_add(1, Ordering::Relaxed);
            let extra = shared.extra_tools.lock().map(|t| t.clone()).unwrap_or_default();
            let tools: Vec<Value> = std::iter::once("echo".to_owned())
                .chain(extra)
                .map(|name| json!({ "name": name, "inputSchema": { "type": "object" } }))
                .collect();
            json!({ "tools": tools })
        }
        "tools/call" => {
            if let Ok(mut e) = shared.executions.lock() {
                e.push(params.clone());
            }
            let text = params["arguments"]["text"].as_str().unwrap_or_default().to_owned();
            json!({ "content": [{ "type": "text", "text": text }] })
        }
        other => {
            let error = json!({ "code": -32601, "message": format!("no method {other}") });
            let _ = tx.send(json!({ "jsonrpc": "2.0", "id": req_id, "error": error }));
            return StatusCode::ACCEPTED;
        }
    };
    if !shared.hold.load(Ordering::Relaxed) || method == "initialize" {
        let _ = tx.send(json!({ "jsonrpc": "2.0", "id": req_id, "result": result }));
    }
    StatusCode::ACCEPTED
}
