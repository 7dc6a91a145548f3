//! The legacy HTTP+SSE transport (2024-11-05): a GET stream whose `endpoint` event names the URL
//! to POST requests to; answers come back on the stream. The stream reconnects with exponential
//! backoff (eventsource-client); a reconnect is a new session, so requests still waiting become
//! ambiguous and the session is opened again.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures_util::{Stream, StreamExt};
use launchdarkly_sdk_transport::{ByteStream, HttpTransport, ResponseFuture, TransportError};
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::outcome::Outcome;

/// eventsource-client's GET requests, sent by our reqwest client (one TLS stack, one pool).
/// Public so other SSE readers (the CLI's `watch`) share it.
#[derive(Clone)]
pub struct ReqwestTransport {
    http: reqwest::Client,
}

impl ReqwestTransport {
    /// A transport over `http`.
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }
}

/// A body stream fed by a task: reqwest's own stream is not `Sync`, which the trait requires.
struct ChannelStream(mpsc::Receiver<Result<Bytes, TransportError>>);

impl Stream for ChannelStream {
    type Item = Result<Bytes, TransportError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl HttpTransport for ReqwestTransport {
    fn request(&self, request: http::Request<Option<Bytes>>) -> ResponseFuture {
        let http = self.http.clone();
        // spawned, so the future we hand back is Sync whatever reqwest's is
        let task = tokio::spawn(async move {
            let (parts, body) = request.into_parts();
            let mut req = http.request(parts.method, parts.uri.to_string()).headers(parts.headers);
            if let Some(body) = body {
                req = req.body(body);
            }
            let resp = req.send().await.map_err(|e| TransportError::new(Failed(e.to_string())))?;
            let mut builder = http::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                builder = builder.header(k, v);
            }
            let (tx, rx) = mpsc::channel(16);
            let mut body = resp.bytes_stream();
            tokio::spawn(async move {
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| TransportError::new(Failed(e.to_string())));
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
            });
            let stream: ByteStream = Box::pin(ChannelStream(rx));
            builder.body(stream).map_err(TransportError::new)
        });
        Box::pin(async move { task.await.map_err(|e| TransportError::new(Failed(e.to_string())))? })
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome<Value>>>>>;

/// One legacy session: the stream reader and the requests waiting for their answers.
pub(crate) struct LegacySession {
    /// The POST URL of the current session (`None` between sessions).
    endpoint: watch::Receiver<Option<(u64, String)>>,
    waiters: Waiters,
    reader: JoinHandle<()>,
    next_id: AtomicU64,
}

impl Drop for LegacySession {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl LegacySession {
    /// Opens the GET stream at `url` with `headers` (credentials) and waits up to `wait` for the
    /// first `endpoint` event.
    pub(crate) async fn open(
        http: reqwest::Client,
        url: &str,
        headers: &[(String, String)],
        wait: Duration,
        max_event_bytes: usize,
        tools_changed: Arc<AtomicBool>,
    ) -> Result<Self, Outcome<Value>> {
        let mut builder = ClientBuilder::for_url(url)
            .map_err(|e| Outcome::not_delivered(format!("bad SSE URL: {e}")))?
            .header("Accept", "text/event-stream")
            .map_err(|e| Outcome::not_delivered(e.to_string()))?;
        for (k, v) in headers {
            builder = builder.header(k, v).map_err(|e| Outcome::not_delivered(e.to_string()))?;
        }
        let reconnect = ReconnectOptions::reconnect(true)
            .retry_initial(false)
            .delay(Duration::from_millis(200))
            .backoff_factor(2)
            .delay_max(Duration::from_secs(30))
            .build();
        let client = builder.reconnect(reconnect).build_with_transport(ReqwestTransport { http });
        let base = reqwest::Url::parse(url)
            .map_err(|e| Outcome::not_delivered(format!("bad SSE URL: {e}")))?;
        let (tx, mut rx) = watch::channel(None);
        let waiters: Waiters = Arc::default();
        let reader = tokio::spawn(read_stream(
            client.stream(),
            base,
            tx,
            waiters.clone(),
            max_event_bytes,
            tools_changed,
        ));
        let found =
            tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await.map(|r| r.map(|_| ()));
        match found {
            Ok(Ok(())) => Ok(Self { endpoint: rx, waiters, reader, next_id: AtomicU64::new(1) }),
            Ok(Err(_)) => {
                reader.abort();
                Err(Outcome::not_delivered(
                    "unreachable: the SSE stream closed before naming its endpoint",
                ))
            }
            Err(_) => {
                reader.abort();
                Err(Outcome::not_delivered("unreachable: no endpoint event on the SSE stream"))
            }
        }
    }

    /// The current endpoint and its session number, if the stream has one.
    pub(crate) fn endpoint(&self) -> Option<(u64, String)> {
        self.endpoint.borrow().clone()
    }

    /// A fresh request id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers interest in the answer to `id` before its POST is sent.
    pub(crate) async fn expect(&self, id: u64) -> oneshot::Receiver<Outcome<Value>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().await.insert(id, tx);
        rx
    }

    /// Gives up on `id` (its POST failed or it timed out).
    pub(crate) async fn forget(&self, id: u64) {
        self.waiters.lock().await.remove(&id);
    }
}

async fn read_stream(
    mut stream: eventsource_client::BoxStream<eventsource_client::Result<SSE>>,
    base: reqwest::Url,
    endpoint: watch::Sender<Option<(u64, String)>>,
    waiters: Waiters,
    max_event_bytes: usize,
    tools_changed: Arc<AtomicBool>,
) {
    let mut session = 0u64;
    while let Some(item) = stream.next().await {
        match item {
            Ok(SSE::Connected(_)) => {
                // a new connection is a new session: answers to the old one will never come
                endpoint.send_replace(None);
                fail_all(&waiters, "the SSE stream reconnected; the session was lost").await;
            }
            Ok(SSE::Event(ev)) if ev.event_type == "endpoint" => {
                if let Ok(url) = base.join(ev.data.trim()) {
                    session += 1;
                    endpoint.send_replace(Some((session, url.to_string())));
                }
            }
            Ok(SSE::Event(ev)) if ev.event_type == "message" => {
                if ev.data.len() > max_event_bytes {
                    // we cannot tell whom it answers without reading it; whoever waits will
                    // time out as ambiguous
                    tracing::warn!(bytes = ev.data.len(), "SSE message over the size cap dropped");
                    continue;
                }
                let Ok(mut msg) = serde_json::from_str::<Value>(&ev.data) else { continue };
                if msg.get("method").and_then(Value::as_str) == Some(crate::client::TOOLS_CHANGED) {
                    tools_changed.store(true, Ordering::Release);
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else { continue };
                if msg.get("method").is_some() {
                    continue;
                }
                let outcome = crate::client::answer_to(&mut msg, id)
                    .unwrap_or_else(|| Outcome::ambiguous("unreadable answer"));
                if let Some(tx) = waiters.lock().await.remove(&id) {
                    let _ = tx.send(outcome);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "SSE stream error; eventsource-client reconnects");
                endpoint.send_replace(None);
                fail_all(&waiters, "the SSE stream failed; the session was lost").await;
            }
        }
    }
    endpoint.send_replace(None);
    fail_all(&waiters, "the SSE stream ended; the session was lost").await;
}

async fn fail_all(waiters: &Waiters, reason: &str) {
    for (_, tx) in waiters.lock().await.drain() {
        let _ = tx.send(Outcome::ambiguous(reason));
    }
}
