//! The HTTP API (`/v1`, JSON), built by [`router`] so requests can be tested without TCP.
//! Invariants: bad input is always a 4xx whose body is `{"error": {"code", "message",
//! "field"?}}` naming what was wrong; a 5xx body is generic and its detail goes to the log;
//! with tokens configured every route but `/healthz`, `/readyz` and `/v1/openapi.json` needs
//! `Authorization: Bearer <token>`.

mod events;
mod metrics;
mod openapi;
mod tasks;
pub mod wire;

pub use events::OPEN_EVENT;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mcpq_fleet::{FleetError, FleetHandle};
use mcpq_queue::{QueueConfigs, QueueName, Store};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;
use wire::{ErrorBody, ErrorDetail};

/// What every handler shares.
pub struct ApiState<S> {
    store: S,
    queues: Arc<[QueueName]>,
    queue_cfg: QueueConfigs,
    fleet: Option<FleetHandle>,
    cfg: Arc<ApiConfig>,
    /// Cancelled at shutdown: open event streams and waits end, so the server can stop.
    closing: CancellationToken,
    /// Open event streams and waits: each holds a store connection for its blocking reads.
    streams: Arc<tokio::sync::Semaphore>,
}

impl<S: Clone> Clone for ApiState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            queues: self.queues.clone(),
            queue_cfg: self.queue_cfg.clone(),
            fleet: self.fleet.clone(),
            cfg: self.cfg.clone(),
            closing: self.closing.clone(),
            streams: self.streams.clone(),
        }
    }
}

impl<S: Store> ApiState<S> {
    /// The state of an API over `store`, serving `queues`, with the fleet's servers when a
    /// fleet runs in this process. Cancelling `closing` ends event streams and waits.
    pub fn new(
        store: S,
        queues: Vec<QueueName>,
        queue_cfg: QueueConfigs,
        fleet: Option<FleetHandle>,
        cfg: ApiConfig,
        closing: CancellationToken,
    ) -> Self {
        let streams = Arc::new(tokio::sync::Semaphore::new(cfg.max_streams));
        Self {
            store,
            queues: queues.into(),
            queue_cfg,
            fleet,
            cfg: Arc::new(cfg),
            closing,
            streams,
        }
    }

    /// A slot for a long request (an event stream or a wait), or 503 when all are taken.
    fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "{} event streams and waits are open (api.max_streams); retry shortly",
                    self.cfg.max_streams
                ),
            )
        })
    }

    /// The queue named by `name` (absent: `default`), if this replica serves it.
    fn queue(&self, name: Option<&str>, field: &str) -> Result<QueueName, ApiError> {
        let name = name.unwrap_or("default");
        let q = QueueName::new(name).map_err(|e| ApiError::invalid(field, e.message))?;
        if !self.queues.contains(&q) {
            let known: Vec<&str> = self.queues.iter().map(|q| q.as_str()).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_queue",
                format!("no queue {name:?}; configured: {}", known.join(", ")),
            )
            .field(field));
        }
        Ok(q)
    }

    fn fleet(&self) -> Result<&FleetHandle, ApiError> {
        self.fleet.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_fleet",
                "this process dispatches no work, so it has no servers",
            )
        })
    }
}

/// The whole API.
pub fn router<S: Store>(state: ApiState<S>) -> Router {
    let protected = Router::new()
        .route("/v1/tasks", post(tasks::create::<S>).get(tasks::list::<S>))
        .route("/v1/tasks/batch", post(tasks::create_batch::<S>))
        .route("/v1/tasks/{id}", get(tasks::get_one::<S>).delete(tasks::cancel::<S>))
        .route("/v1/tasks/{id}/wait", get(tasks::wait::<S>))
        .route("/v1/tasks/{id}/retry", post(tasks::retry::<S>))
        .route("/v1/queues", get(tasks::queues::<S>))
        .route("/v1/queues/{queue}", get(tasks::queue_stats::<S>))
        .route("/v1/queues/{queue}/pause", post(tasks::pause::<S>))
        .route("/v1/queues/{queue}/resume", post(tasks::resume::<S>))
        .route("/v1/servers", get(tasks::servers::<S>).post(tasks::add_server::<S>))
        .route("/v1/servers/{name}", axum::routing::delete(tasks::remove_server::<S>))
        .route("/v1/events", get(events::stream::<S>))
        .route("/metrics", get(metrics::render::<S>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/v1/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // the outermost layer, so unknown routes and methods are not told apart without a token
    protected.layer(middleware::from_fn_with_state(state.clone(), auth::<S>)).with_state(state)
}

/// Every route the API serves, with its methods (lowercase), as `/v1/openapi.json` describes
/// them.
pub fn routes() -> &'static [(&'static str, &'static [&'static str])] {
    openapi::ROUTES
}

/// Routes anyone may call: probes and the API's description.
const OPEN: &[&str] = &["/healthz", "/readyz", "/v1/openapi.json"];

async fn auth<S: Store>(State(st): State<ApiState<S>>, req: Request, next: Next) -> Response {
    if st.cfg.tokens.is_empty() || OPEN.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // the scheme is case-insensitive (RFC 9110 §11.1)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // every token is compared, so the time taken does not say which one matched
    let ok = presented.is_some_and(|p| {
        st.cfg.tokens.iter().fold(false, |hit, t| same(t.as_bytes(), p.as_bytes()) | hit)
    });
    if ok {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer <token> with one of the tokens in api.tokens",
    )
    .field("Authorization")
    .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Compares in time independent of where the inputs differ, so a token cannot be guessed
/// byte by byte from response times (its length can be: tokens are 8 to 256 characters).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz<S: Store>(State(st): State<ApiState<S>>) -> Response {
    let q = QueueName::default();
    let probe = tokio::time::timeout(std::time::Duration::from_secs(2), st.store.stats(&q)).await;
    match probe {
        Ok(Ok(_)) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness probe: store unavailable");
            ApiError::unavailable("store unavailable").into_response()
        }
        Err(_) => ApiError::unavailable("store did not answer within 2 s").into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /v1/openapi.json",
    )
}

/// An error answer: status, code, message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail { code: code.to_owned(), message: message.into(), field: None },
        }
    }

    fn field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message).field(field)
    }

    fn unavailable(message: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A store error, with `field_of` renaming the store's field names to the request's.
    fn store(e: mcpq_queue::Error, field_of: impl FnOnce(&str) -> String) -> Self {
        use mcpq_queue::Error as E;
        match e {
            E::Invalid(inv) => Self::invalid(field_of(&inv.field), inv.message),
            E::Conflict { existing } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                format!("the idempotency key is held by task {existing} with a different body"),
            )
            .field(field_of("idempotency_key")),
            E::NotFound(id) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", format!("no task {id}"))
            }
            E::InvalidState { state } => Self::new(
                StatusCode::CONFLICT,
                "invalid_state",
                format!("the task is {state}; that does not apply"),
            ),
            E::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "timed out"),
            other => {
                tracing::error!(error = %other, "store error answering a request");
                Self::unavailable("store unavailable; try again")
            }
        }
    }

    fn fleet(e: FleetError) -> Self {
        match e {
            FleetError::Config(c) => Self::invalid(c.key, c.message),
            FleetError::DuplicateServer(name) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a server named {name:?} exists already"),
            )
            .field("name"),
            FleetError::UnknownServer(name) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", format!("no server named {name:?}"))
            }
            other => {
                tracing::error!(error = %other, "fleet error answering a request");
                Self::unavailable("the fleet is unavailable; try again")
            }
        }
    }
}

/// A store error with the store's field names, which the task routes share.
impl From<mcpq_queue::Error> for ApiError {
    fn from(e: mcpq_queue::Error) -> Self {
        Self::store(e, str::to_owned)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorBody { error: self.detail })).into_response()
    }
}

/// A JSON body read with the configured size limit and decoded with the path of any bad field.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<S: Store, T: DeserializeOwned> FromRequest<ApiState<S>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &ApiState<S>) -> Result<Self, ApiError> {
        let limit = st.cfg.max_body_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than api.max_body_bytes ({limit} bytes)"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE)
            && !ct.to_str().is_ok_and(|c| {
                let media = c.split(';').next().unwrap_or_default().trim();
                media.eq_ignore_ascii_case("application/json")
            })
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )
            .field("Content-Type"));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| too_large())?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// Decodes JSON, naming the field at fault: a syntax error is 400 `invalid_json`; a value of
/// the wrong type or an unknown field is 422 `invalid` with its path (`tasks[2].priority`).
pub(crate) fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read an array as a struct's fields in order, with baffling messages
    if bytes.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'{') {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {inner}"),
            );
        }
        let message = inner.to_string();
        // the path of an unknown field ends with it; a missing one is named only in the
        // message, its path is the parent's
        let missing = message.strip_prefix("missing field `").and_then(|r| r.split_once('`'));
        let field = match (missing, path.as_str()) {
            (Some((name, _)), ".") => name.to_owned(),
            (Some((name, _)), parent) => format!("{parent}.{name}"),
            (None, ".") => "body".to_owned(),
            (None, _) => path,
        };
        let message = match message.split_once(" at line ") {
            Some((m, _)) => m.to_owned(),
            None => message,
        };
        ApiError::invalid(field, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn decode_errors_name_the_field() {
        let e = decode_json::<wire::TaskRequest>(br#"{"call": {"tool": "x"}, "priority": "hi"}"#)
            .unwrap_err();
        assert_eq!(
            (e.status, e.detail.field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("priority"))
        );
        let e =
            decode_json::<wire::TaskRequest>(br#"{"call": {"tool": "x", "argz": 1}}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("call.argz"));
        let e = decode_json::<wire::TaskRequest>(br#"{"cal": {}}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("cal"));
        let e = decode_json::<wire::TaskRequest>(br#"{"priority": 1}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("call"), "{:?}", e.detail);
        let e = decode_json::<wire::TaskRequest>(br#"[1]"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("body"), "{:?}", e.detail);
        let e = decode_json::<wire::BatchRequest>(
            br#"{"tasks": [{"call": {"tool": "x"}}, {"call": {"tool": 3}}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("tasks[1].call.tool"));
        let e = decode_json::<Value>(b"{").unwrap_err();
        assert_eq!((e.status, e.detail.code.as_str()), (StatusCode::BAD_REQUEST, "invalid_json"));
        let e = decode_json::<Value>(b"").unwrap_err();
        assert_eq!((e.status, e.detail.code.as_str()), (StatusCode::BAD_REQUEST, "invalid_json"));
    }

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(same(b"secret-token", b"secret-token"));
        assert!(!same(b"secret-token", b"secret-tokem"));
        assert!(!same(b"secret-token", b"secret-toke"));
        assert!(!same(b"", b"x"));
    }
}
