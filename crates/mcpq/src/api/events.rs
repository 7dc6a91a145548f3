//! `GET /v1/events`: a queue's events as Server-Sent Events. The SSE event name is the event
//! kind (`task.succeeded`), its id the stream position, so a client that reconnects with
//! `Last-Event-ID` resumes right after the last event it saw and misses nothing retained. The
//! first message, `stream.open`, carries the starting position as its id, so even a client that
//! saw no event yet resumes where it started.

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
/// The name of the first message of every stream; its id is where the stream starts.
pub const OPEN_EVENT: &str = "stream.open";
/// The id that stands before every event.
const BEGINNING: &str = "0-0.0";

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
    // an empty Last-Event-ID is what a client sends before it has seen an event
    let header = match headers.get("last-event-id") {
        Some(v) => {
            let raw = v
                .to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be printable ASCII"))?;
            (!raw.trim().is_empty()).then(|| parse(raw, "Last-Event-ID")).transpose()?
        }
        None => None,
    };
    let after = p.get("after").map(|raw| parse(raw, "after")).transpose()?;
    if after.is_some() && p.get("from").is_some() {
        return Err(ApiError::invalid("from", "give either from or after, not both"));
    }
    let start = match (header.or(after), p.get("from")) {
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
    let permit = st.stream_permit()?;
    // "now" is fixed before the answer starts, so a client that acts on the 200 cannot miss
    // the events its own action causes
    let start = match start {
        StartAt::Now => match st.store.last_event_id(&queue).await {
            Ok(Some(id)) => StartAt::After(id),
            Ok(None) => StartAt::Beginning,
            Err(e) => return Err(ApiError::store(e, str::to_owned)),
        },
        other => other,
    };
    // the first message names where the stream starts, so a client that reconnects before
    // any event arrived resumes from there (with Last-Event-ID) instead of from a new "now"
    let open_id = match start {
        StartAt::After(id) => id.to_string(),
        _ => BEGINNING.to_owned(),
    };
    let open = SseEvent::default()
        .id(open_id)
        .event(OPEN_EVENT)
        .data(serde_json::json!({ "queue": queue.as_str() }).to_string());
    let closing = st.closing.clone();
    let events = Queue::new(st.store.clone(), queue).subscribe(start).filter_map(move |item| {
        // held as long as the stream lives
        let _slot = &permit;
        let out = match item {
            Ok(e) => {
                // cannot fail: an event is strings and numbers
                let data = serde_json::to_string(&e).unwrap_or_default();
                Some(Ok(SseEvent::default().id(e.id.to_string()).event(e.kind.as_str()).data(data)))
            }
            Err(e) => {
                // the subscription carries on from the same place after a pause
                tracing::warn!(error = %e, "event stream read failed; retrying");
                None
            }
        };
        std::future::ready(out)
    });
    let stream = futures_util::stream::once(std::future::ready(Ok(open)))
        .chain(events)
        .take_until(async move { closing.cancelled().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
