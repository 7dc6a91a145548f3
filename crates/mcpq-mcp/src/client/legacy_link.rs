//! The legacy (2024-11-05) link: the stream from `legacy.rs`, initialized once per stream
//! session, and POSTs whose answers arrive on that stream.

use super::http::*;
use super::*;

/// A legacy stream and the stream session it last initialized.
pub(super) struct LegacyLink {
    stream: LegacySession,
    initialized: Mutex<u64>,
}

impl McpClient {
    pub(super) async fn open_legacy(&self) -> Result<Link, Outcome<Value>> {
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
    pub(super) async fn legacy_ready(&self, link: &LegacyLink) -> Result<String, Outcome<Value>> {
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

    pub(super) async fn legacy_request(
        &self,
        link: &LegacyLink,
        ex: &Exchange<'_>,
    ) -> Outcome<Value> {
        match self.legacy_ready(link).await {
            Ok(url) => self.legacy_post(link, &url, ex).await,
            Err(o) => o,
        }
    }

    /// One POST to a legacy endpoint; the answer arrives on the stream.
    pub(super) async fn legacy_post(
        &self,
        link: &LegacyLink,
        url: &str,
        ex: &Exchange<'_>,
    ) -> Outcome<Value> {
        let id = link.stream.next_id();
        let body = match body_of(ex, id) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => return Outcome::not_delivered(format!("cannot encode request: {e}")),
        };
        let answer = if ex.notification { None } else { Some(link.stream.expect(id).await) };
        let deadline = Instant::now() + self.inner.cfg.request_timeout();
        let mut refreshed = false;
        let sent = loop {
            let req = self.inner.http.post(url).header(CONTENT_TYPE, "application/json");
            let req = req.body(body.clone());
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
}
