//! `GET /v1/events`: a queue's events as Server-Sent Events. The SSE event name is the event
//! kind (`task.succeeded`), its id the stream position, so a client that reconnects with
//! `Last-Event-ID` resumes right after the last event it saw and misses nothing retained.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use mcpq_queue::{EventId, Queue, StartAt, Store};

use super::tasks::{Params, QueryResult};
use super::{ApiError, ApiState};

/// Keep-alive comments this often, so proxies do not close an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) async fn stream<S: Store>(
    State(st): State<ApiState<S>>,
    headers: HeaderMap,
    q: QueryResult,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let p = Params::parse(q, &["queue", "from", "after"])?;
    let queue = st.queue(p.get("queue"), "queue")?;
    let parse = |raw: &str, field: &str| {
        raw.trim().parse::<EventId>().map_err(|e| ApiError::invalid(field, e.message))
    };
    let resume = match headers.get("last-event-id") {
        Some(v) => {
            let raw = v
                .to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be printable ASCII"))?;
            Some(parse(raw, "Last-Event-ID")?)
        }
        None => p.get("after").map(|raw| parse(raw, "after")).transpose()?,
    };
    let start = match (resume, p.get("from")) {
        (Some(id), _) => StartAt::After(id),
        (None, None | Some("now")) => StartAt::Now,
        (None, Some("beginning")) => StartAt::Beginning,
        (None, Some(other)) => {
            return Err(ApiError::invalid(
                "from",
                format!("{other:?} is not one of now, beginning (or resume with Last-Event-ID)"),
            ));
        }
    };
    let closing = st.closing.clone();
    let events = Queue::new(st.store.clone(), queue)
        .subscribe(start)
        .filter_map(|item| async move {
            match item {
                Ok(e) => {
                    // cannot fail: an event is strings and numbers
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    Some(Ok(SseEvent::default()
                        .id(e.id.to_string())
                        .event(e.kind.as_str())
                        .data(data)))
                }
                Err(e) => {
                    // the subscription carries on from the same place after a pause
                    tracing::warn!(error = %e, "event stream read failed; retrying");
                    None
                }
            }
        })
        .take_until(async move { closing.cancelled().await });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
