//! The Streamable HTTP exchange: one POST, its answer read as JSON or SSE within the size cap,
//! the idle limit and the deadline, session-era streams resumed, server requests answered,
//! and what each status and answer means for the outcome.

use super::*;

/// What reading an answer's body gave next.
pub(super) enum Next {
    /// More bytes.
    Chunk(bytes::Bytes),
    /// The body ended.
    End,
    /// The connection broke; the reason says how.
    Cut(String),
    /// Reading must stop with this outcome (time limit or size cap).
    Stop(Outcome<Value>),
}

/// What one POST came to: the outcome, the response headers when there was a response, and
/// the JSON-RPC error a refusing (4xx) response carried.
pub(super) struct Reply {
    pub(super) outcome: Outcome<Value>,
    pub(super) headers: HeaderMap,
    pub(super) refusal: Option<RpcError>,
}

impl Reply {
    fn bare(outcome: Outcome<Value>) -> Self {
        Self { outcome, headers: HeaderMap::new(), refusal: None }
    }
}

/// An SSE answer as read so far, across resumptions.
#[derive(Default)]
pub(super) struct StreamState {
    bytes: usize,
    last_event_id: Option<String>,
    retry: Option<Duration>,
}

impl McpClient {
    pub(super) async fn send(&self, link: &Link, ex: &Exchange<'_>) -> Outcome<Value> {
        self.exchange(link, ex).await.outcome
    }

    /// One POST (sent once more, stateless, when the server refuses the protocol revision yet
    /// lists it as supported).
    pub(super) async fn exchange(&self, link: &Link, ex: &Exchange<'_>) -> Reply {
        let cfg = &self.inner.cfg;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let body = match body_of(ex, id) {
            Ok(b) => bytes::Bytes::from(b),
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
    pub(super) async fn read_refusal(
        &self,
        resp: reqwest::Response,
        deadline: Instant,
    ) -> Option<RpcError> {
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
    pub(super) async fn post(
        &self,
        link: &Link,
        ex: &Exchange<'_>,
        body: bytes::Bytes,
    ) -> Result<(reqwest::RequestBuilder, u64), Outcome<Value>> {
        let http = &self.inner.http;
        let req = match &self.inner.url {
            Some(url) => http.post(url.clone()),
            None => http.post(&self.inner.cfg.url),
        };
        let mut req = req
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
    pub(super) async fn read_answer(
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

    /// The next chunk of an answer, within the idle limit (restarted by every chunk) and the
    /// request deadline, counted in `seen` against the size cap.
    async fn next_chunk<S>(&self, stream: &mut S, deadline: Instant, seen: &mut usize) -> Next
    where
        S: futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    {
        let cfg = &self.inner.cfg;
        let idle = Instant::now() + cfg.idle_timeout();
        match tokio::time::timeout_at(idle.min(deadline), stream.next()).await {
            Err(_) => Next::Stop(Outcome::ambiguous("timed out reading the response")),
            Ok(None) => Next::End,
            Ok(Some(Err(e))) => Next::Cut(format!("response cut: {}", source_text(&e))),
            Ok(Some(Ok(chunk))) => {
                *seen += chunk.len();
                if *seen > cfg.max_response_bytes {
                    let cap = cfg.max_response_bytes;
                    return Next::Stop(Outcome::ambiguous(format!(
                        "response larger than {cap} bytes"
                    )));
                }
                Next::Chunk(chunk)
            }
        }
    }

    pub(super) async fn read_json(
        &self,
        resp: reqwest::Response,
        id: u64,
        deadline: Instant,
    ) -> Outcome<Value> {
        let mut stream = resp.bytes_stream();
        let (mut body, mut seen) = (Vec::new(), 0);
        loop {
            match self.next_chunk(&mut stream, deadline, &mut seen).await {
                Next::Chunk(chunk) => body.extend_from_slice(&chunk),
                Next::End => break,
                Next::Cut(reason) => return Outcome::ambiguous(reason),
                Next::Stop(outcome) => return outcome,
            }
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(mut msg) => answer_to(&mut msg, id)
                .unwrap_or_else(|| Outcome::ambiguous("the response answers another request")),
            Err(e) => Outcome::ambiguous(format!("malformed JSON-RPC response: {e}")),
        }
    }

    /// Reads one SSE response up to the answer to `id`: `Ok` with the outcome, or `Err` with
    /// why the stream stopped before it (it may be resumable). Requests the server sends on
    /// the stream are answered.
    pub(super) async fn read_events(
        &self,
        link: &Link,
        resp: reqwest::Response,
        id: u64,
        deadline: Instant,
        state: &mut StreamState,
    ) -> Result<Outcome<Value>, String> {
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        loop {
            let chunk = match self.next_chunk(&mut stream, deadline, &mut state.bytes).await {
                Next::Chunk(c) => c,
                Next::End => return Err("stream ended before the response".into()),
                Next::Cut(reason) => return Err(reason),
                Next::Stop(outcome) => return Ok(outcome),
            };
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
                let mut msg = match serde_json::from_str::<Value>(&event.data) {
                    Ok(msg) => msg,
                    Err(e) => return Ok(Outcome::ambiguous(format!("malformed event data: {e}"))),
                };
                if let Some(o) = answer_to(&mut msg, id) {
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
    pub(super) async fn resume(
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
    pub(super) fn reply_later(&self, session: &Session, request_id: Value, method: &str) {
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
    pub(super) fn cancel_later(&self, link: &Link, id: u64, notification: bool) {
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

pub(super) const SESSION_EXPIRED: &str = "session expired";
/// The notification that invalidates the tool cache.
pub(crate) const TOOLS_CHANGED: &str = "notifications/tools/list_changed";
pub(super) const UNREACHABLE: &str = "unreachable";

pub(super) fn is_unreachable(reason: &str) -> bool {
    reason.starts_with(UNREACHABLE)
}

/// True when no other era would fare better: the server cannot be reached, or we have no
/// credentials to show it.
pub(super) fn stops_probing(reason: &str) -> bool {
    is_unreachable(reason) || reason.starts_with(NO_CREDENTIALS)
}

/// The JSON-RPC body of `ex` under `id`, serialized from the borrowed params (no copy of
/// them). A tool call asks for progress notifications, with its id as the token: each one
/// restarts the idle limit of a streamed answer.
pub(super) fn body_of(ex: &Exchange<'_>, id: u64) -> serde_json::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        jsonrpc: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        method: &'a str,
        params: WithProgress<'a>,
    }
    let progress = (!ex.notification && ex.method == "tools/call").then_some(id);
    serde_json::to_vec(&Body {
        jsonrpc: "2.0",
        id: (!ex.notification).then_some(id),
        method: ex.method,
        params: WithProgress { params: &ex.params, token: progress },
    })
}

/// Request params with `_meta.progressToken` set to `token` unless they carry one (or a
/// `_meta` that is not an object, or are not an object themselves).
struct WithProgress<'a> {
    params: &'a Value,
    token: Option<u64>,
}

impl serde::Serialize for WithProgress<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (Some(token), Value::Object(params)) = (self.token, self.params) else {
            return self.params.serialize(s);
        };
        let meta = match params.get("_meta") {
            None => None,
            Some(Value::Object(m)) if !m.contains_key("progressToken") => Some(m),
            Some(_) => return self.params.serialize(s),
        };
        let mut out = s.serialize_map(Some(params.len() + usize::from(meta.is_none())))?;
        for (k, v) in params {
            if k != "_meta" {
                out.serialize_entry(k, v)?;
            }
        }
        out.serialize_entry("_meta", &MetaWithToken { meta, token })?;
        out.end()
    }
}

struct MetaWithToken<'a> {
    meta: Option<&'a Map<String, Value>>,
    token: u64,
}

impl serde::Serialize for MetaWithToken<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let n = self.meta.map_or(0, Map::len) + 1;
        let mut out = s.serialize_map(Some(n))?;
        for (k, v) in self.meta.into_iter().flatten() {
            out.serialize_entry(k, v)?;
        }
        out.serialize_entry("progressToken", &self.token)?;
        out.end()
    }
}

/// The full error chain, for reasons people read.
pub(super) fn source_text(e: &dyn std::error::Error) -> String {
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
pub(super) fn with_meta(params: Value, meta: &CallMeta, link: &Link) -> Value {
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
pub(super) fn session_headers(
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

pub(super) fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// True when `refusal` is an `UnsupportedProtocolVersion` error that names the stateless
/// revision among the server's supported ones.
pub(super) fn offers_stateless(refusal: &RpcError) -> bool {
    refusal.code == UNSUPPORTED_VERSION
        && refusal
            .data
            .as_ref()
            .and_then(|d| d.get("supported"))
            .and_then(Value::as_array)
            .is_some_and(|vs| vs.iter().any(|v| v.as_str() == Some(STATELESS_VERSION)))
}

/// The outcome a status alone decides, if it does; `refusal` is the JSON-RPC error of a 4xx.
pub(super) fn classify_status(
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
pub(crate) fn answer_to(msg: &mut Value, id: u64) -> Option<Outcome<Value>> {
    if msg.get("id").and_then(Value::as_u64) != Some(id) || msg.get("method").is_some() {
        return None;
    }
    if let Some(result) = msg.get_mut("result") {
        return Some(Outcome::Executed(Ok(result.take())));
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
            answer_to(&mut json!({"jsonrpc": "2.0", "id": 3, "result": {"x": 1}}), 3),
            Some(Outcome::Executed(Ok(json!({"x": 1}))))
        );
        assert_eq!(answer_to(&mut json!({"jsonrpc": "2.0", "id": 4, "result": {}}), 3), None);
        assert_eq!(
            answer_to(&mut json!({"jsonrpc": "2.0", "method": "notifications/progress"}), 3),
            None
        );
        let err = answer_to(
            &mut json!({"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "no"}}),
            3,
        );
        assert!(matches!(err, Some(Outcome::Executed(Err(RpcError { code: -32601, .. })))));
        assert!(matches!(
            answer_to(&mut json!({"jsonrpc": "2.0", "id": 3}), 3),
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

    #[test]
    fn bodies_ask_tool_calls_for_progress_without_overriding_a_token() {
        let body = |ex: &Exchange<'_>| -> Value {
            serde_json::from_slice(&body_of(ex, 7).unwrap()).unwrap()
        };
        let call = |params| Exchange::request("tools/call", params);
        assert_eq!(
            body(&call(json!({"name": "echo", "arguments": {"a": 1}}))),
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"a": 1}, "_meta": {"progressToken": 7}}})
        );
        let b = body(&call(json!({"name": "echo", "_meta": {"mcpq/task": "t"}})));
        assert_eq!(b["params"]["_meta"], json!({"mcpq/task": "t", "progressToken": 7}));
        let b = body(&call(json!({"name": "echo", "_meta": {"progressToken": "mine"}})));
        assert_eq!(b["params"]["_meta"], json!({"progressToken": "mine"}), "kept");
        let b = body(&call(json!({"name": "echo", "_meta": 3})));
        assert_eq!(b["params"]["_meta"], 3, "a _meta that is no object is left alone");
        let b = body(&Exchange::request("resources/read", json!({"uri": "u"})));
        assert_eq!(b["params"], json!({"uri": "u"}), "only tool calls ask for progress");
        let b = body(&Exchange::notification("notifications/initialized", json!({})));
        assert_eq!(
            b,
            json!({"jsonrpc": "2.0", "method": "notifications/initialized", "params": {}})
        );
    }
}
