//! Handlers of `/v1/tasks`, `/v1/queues` and `/v1/servers`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mcpq_mcp::ServerConfig;
use mcpq_queue::{
    CancelOutcome, Enqueued, Error, NewTask, Queue, QueueName, Store, Task, TaskId, TaskState,
};

use super::wire::{
    BatchItem, BatchRequest, BatchView, CallSpec, ErrorDetail, QueueView, ServerView, TaskPage,
    TaskRequest, TaskView,
};
use super::{ApiError, ApiState, JsonBody};

/// Longest `GET /v1/tasks/{id}/wait`.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 50;

/// Query parameters, checked by name so a misspelt one is an error, not silently ignored.
pub(super) struct Params(HashMap<String, String>);

impl Params {
    pub(super) fn parse(
        q: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
        allowed: &[&str],
    ) -> Result<Self, ApiError> {
        let Query(pairs) = q.map_err(|e| {
            ApiError::invalid("query", format!("the query string is malformed: {e}"))
        })?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::invalid(
                    k.clone(),
                    format!("unknown parameter; allowed: {}", allowed.join(", ")),
                ));
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(ApiError::invalid(k, "given more than once"));
            }
        }
        Ok(Self(map))
    }

    pub(super) fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn number<T>(&self, k: &str, range: std::ops::RangeInclusive<T>) -> Result<Option<T>, ApiError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display,
    {
        let Some(v) = self.get(k) else { return Ok(None) };
        let n: T = v.parse().map_err(|_| ApiError::invalid(k, format!("{v:?} is not a number")))?;
        if !range.contains(&n) {
            return Err(ApiError::invalid(
                k,
                format!("{n} is out of range {}..={}", range.start(), range.end()),
            ));
        }
        Ok(Some(n))
    }
}

pub(super) type QueryResult =
    Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn task_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse().map_err(|_| ApiError::invalid("id", format!("{raw:?} is not a task id (a UUID)")))
}

/// Builds and checks the task of one request; `prefix` is `tasks[i].` in a batch. Errors
/// name the request's fields (`call.tool`, not the store's `call.name`).
fn build<S: Store>(
    st: &ApiState<S>,
    req: &TaskRequest,
    prefix: &str,
) -> Result<(QueueName, NewTask), ApiError> {
    let queue = st.queue(req.queue.as_deref(), &format!("{prefix}queue"))?;
    let task = req.to_task().map_err(|(f, m)| ApiError::invalid(format!("{prefix}{f}"), m))?;
    if let (Some(delay), Some(expires)) = (req.delay_ms, req.expires_ms)
        && expires <= delay
    {
        return Err(ApiError::invalid(
            format!("{prefix}expires_ms"),
            "must be more than delay_ms, or the task expires before it may start",
        ));
    }
    task.validate().map_err(|e| {
        ApiError::store(e, |f| {
            let f = if f == "call.name" { CallSpec::target_field(&task.call) } else { f };
            format!("{prefix}{f}")
        })
    })?;
    Ok((queue, task))
}

pub(super) async fn create<S: Store>(
    State(st): State<ApiState<S>>,
    headers: HeaderMap,
    q: QueryResult,
    JsonBody(req): JsonBody<TaskRequest>,
) -> Result<Response, ApiError> {
    Params::parse(q, &[])?;
    let (queue, mut task) = build(&st, &req, "")?;
    if headers.get_all("idempotency-key").iter().count() > 1 {
        return Err(ApiError::invalid("Idempotency-Key", "given more than once"));
    }
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| ApiError::invalid("Idempotency-Key", "must be printable ASCII"))?;
        if req.idempotency_key.as_deref().is_some_and(|k| k != key) {
            return Err(ApiError::invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header; give one of them",
            ));
        }
        task = task.idempotency_key(key);
    }
    let key_field =
        if headers.contains_key("idempotency-key") { "Idempotency-Key" } else { "idempotency_key" };
    let rename = |f: &str| if f == "idempotency_key" { key_field.to_owned() } else { f.to_owned() };
    let q = Queue::new(st.store.clone(), queue.clone());
    let attempts = st.queue_cfg.get(&queue).max_attempts;
    let outcome = q
        .enqueue_many(std::slice::from_ref(&task))
        .await
        .map_err(|e| ApiError::store(e, rename))?;
    match outcome.first() {
        Some(Enqueued::Created(_)) => {
            Ok((StatusCode::CREATED, Json(TaskView::created(&queue, &task, attempts)))
                .into_response())
        }
        Some(Enqueued::Existing(id)) => match q.get(*id).await {
            Ok(t) => Ok((StatusCode::OK, Json(TaskView::of(&t))).into_response()),
            Err(Error::NotFound(_)) => Err(replay_gone(*id, key_field)),
            Err(e) => Err(ApiError::store(e, rename)),
        },
        Some(Enqueued::Conflict(existing)) => {
            Err(ApiError::store(Error::Conflict { existing: *existing }, rename))
        }
        None => Err(ApiError::store(Error::Corrupt("enqueue answered nothing".into()), rename)),
    }
}

pub(super) async fn create_batch<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
    JsonBody(req): JsonBody<BatchRequest>,
) -> Result<Response, ApiError> {
    Params::parse(q, &[])?;
    if req.tasks.is_empty() || req.tasks.len() > st.cfg.max_batch {
        return Err(ApiError::invalid(
            "tasks",
            format!("must hold 1 to {} tasks (api.max_batch)", st.cfg.max_batch),
        ));
    }
    // every task is checked before any is stored
    let mut by_queue: Vec<(QueueName, Vec<(usize, NewTask)>)> = Vec::new();
    for (i, r) in req.tasks.iter().enumerate() {
        let (queue, task) = build(&st, r, &format!("tasks[{i}]."))?;
        match by_queue.iter_mut().find(|(q, _)| *q == queue) {
            Some((_, v)) => v.push((i, task)),
            None => by_queue.push((queue, vec![(i, task)])),
        }
    }
    let mut items: Vec<Option<BatchItem>> = vec![None; req.tasks.len()];
    for (queue, tasks) in by_queue {
        let q = Queue::new(st.store.clone(), queue.clone());
        let attempts = st.queue_cfg.get(&queue).max_attempts;
        let news: Vec<NewTask> = tasks.iter().map(|(_, t)| t.clone()).collect();
        let outcome = q.enqueue_many(&news).await?;
        for ((i, task), result) in tasks.iter().zip(outcome) {
            items[*i] = Some(match result {
                Enqueued::Created(_) => {
                    BatchItem::Task(Box::new(TaskView::created(&queue, task, attempts)))
                }
                Enqueued::Existing(id) => match q.get(id).await {
                    Ok(t) => BatchItem::Task(Box::new(TaskView::of(&t))),
                    // the rest of the batch is stored: answer per item, never abort here
                    Err(e) => {
                        let field = format!("tasks[{i}].idempotency_key");
                        let err = match e {
                            Error::NotFound(_) => replay_gone(id, &field),
                            other => ApiError::from(other),
                        };
                        BatchItem::Error { error: err.detail }
                    }
                },
                Enqueued::Conflict(existing) => BatchItem::Error {
                    error: ErrorDetail {
                        code: "idempotency_conflict".to_owned(),
                        message: format!(
                            "the idempotency key is held by task {existing} with a different body"
                        ),
                        field: Some(format!("tasks[{i}].idempotency_key")),
                    },
                },
            });
        }
    }
    let tasks = items.into_iter().flatten().collect();
    Ok((StatusCode::CREATED, Json(BatchView { tasks })).into_response())
}

/// The idempotency key matched a task that retention has already removed.
fn replay_gone(id: TaskId, field: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_replay_gone",
        format!("the idempotency key matches task {id}, which retention has already removed"),
    )
    .field(field)
}

/// The query of a `/v1/tasks/{id}…` route: `queue` and `extra`.
fn task_params(q: QueryResult, extra: &[&str]) -> Result<Params, ApiError> {
    let allowed: Vec<&str> = std::iter::once("queue").chain(extra.iter().copied()).collect();
    Params::parse(q, &allowed)
}

/// The task a `/v1/tasks/{id}…` route names, as it is now, and the queue it is in: the one the
/// query names, else the first served queue that has it.
async fn locate<S: Store>(
    st: &ApiState<S>,
    raw_id: &str,
    p: &Params,
) -> Result<(Queue<S>, Task), ApiError> {
    let id = task_id(raw_id)?;
    let candidates: Vec<QueueName> = match p.get("queue") {
        Some(q) => vec![st.queue(Some(q), "queue")?],
        None => st.queues.to_vec(),
    };
    for q in candidates {
        if let Some(task) = st.store.get(&q, id).await? {
            return Ok((Queue::new(st.store.clone(), q), task));
        }
    }
    Err(Error::NotFound(id).into())
}

pub(super) async fn get_one<S: Store>(
    State(st): State<ApiState<S>>,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<TaskView>, ApiError> {
    let (_, task) = locate(&st, &id, &task_params(q, &[])?).await?;
    Ok(Json(TaskView::of(&task)))
}

pub(super) async fn wait<S: Store>(
    State(st): State<ApiState<S>>,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<TaskView>, ApiError> {
    let p = task_params(q, &["timeout_ms"])?;
    let timeout = p
        .number("timeout_ms", 0..=MAX_WAIT.as_millis() as u64)?
        .map_or(DEFAULT_WAIT, Duration::from_millis);
    let (queue, task) = locate(&st, &id, &p).await?;
    let id = task.id;
    let _permit = st.stream_permit()?;
    let waited = tokio::select! {
        r = queue.wait(id, timeout) => r,
        _ = st.closing.cancelled() => Err(Error::Timeout),
    };
    let t = match waited {
        Ok(t) => t,
        // at the timeout the task is answered as it is; its state says it is not done
        Err(Error::Timeout) => queue.get(id).await?,
        Err(e) => return Err(ApiError::from(e)),
    };
    Ok(Json(TaskView::of(&t)))
}

pub(super) async fn cancel<S: Store>(
    State(st): State<ApiState<S>>,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<TaskView>, ApiError> {
    let (queue, task) = locate(&st, &id, &task_params(q, &[])?).await?;
    let id = task.id;
    match queue.cancel(id).await? {
        CancelOutcome::Cancelled { .. } => {}
        CancelOutcome::AlreadyFinished(state) => {
            return Err(Error::InvalidState { state }.into());
        }
    }
    let t = queue.get(id).await?;
    Ok(Json(TaskView::of(&t)))
}

pub(super) async fn retry<S: Store>(
    State(st): State<ApiState<S>>,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<TaskView>, ApiError> {
    let (queue, task) = locate(&st, &id, &task_params(q, &[])?).await?;
    let id = task.id;
    queue.retry(id).await?;
    let t = queue.get(id).await?;
    Ok(Json(TaskView::of(&t)))
}

pub(super) async fn list<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
) -> Result<Json<TaskPage>, ApiError> {
    let p = Params::parse(q, &["queue", "state", "limit", "cursor"])?;
    let queue = st.queue(p.get("queue"), "queue")?;
    let state: TaskState = match p.get("state") {
        Some(s) => s
            .parse()
            .map_err(|e: mcpq_queue::InvalidInput| ApiError::invalid("state", e.message))?,
        None => TaskState::Queued,
    };
    let limit = p.number("limit", 1..=MAX_PAGE)?.unwrap_or(DEFAULT_PAGE);
    let cursor = p.number("cursor", 0..=u64::from(u32::MAX))?.unwrap_or(0);
    let page = Queue::new(st.store.clone(), queue).list(state, cursor, limit).await?;
    Ok(Json(TaskPage {
        tasks: page.tasks.iter().map(TaskView::of).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

async fn queue_view<S: Store>(st: &ApiState<S>, queue: QueueName) -> Result<QueueView, ApiError> {
    let stats = st.store.stats(&queue).await?;
    Ok(QueueView::of(queue.as_str(), &stats))
}

pub(super) async fn queues<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
) -> Result<Json<Vec<QueueView>>, ApiError> {
    Params::parse(q, &[])?;
    let mut out = Vec::with_capacity(st.queues.len());
    for q in st.queues.iter() {
        out.push(queue_view(&st, q.clone()).await?);
    }
    Ok(Json(out))
}

pub(super) async fn queue_stats<S: Store>(
    State(st): State<ApiState<S>>,
    Path(queue): Path<String>,
    q: QueryResult,
) -> Result<Json<QueueView>, ApiError> {
    Params::parse(q, &[])?;
    let q = st.queue(Some(&queue), "queue")?;
    Ok(Json(queue_view(&st, q).await?))
}

async fn set_paused<S: Store>(
    st: ApiState<S>,
    queue: String,
    paused: bool,
) -> Result<Json<QueueView>, ApiError> {
    let q = st.queue(Some(&queue), "queue")?;
    st.store.set_paused(&q, paused).await?;
    Ok(Json(queue_view(&st, q).await?))
}

pub(super) async fn pause<S: Store>(
    State(st): State<ApiState<S>>,
    Path(queue): Path<String>,
    q: QueryResult,
) -> Result<Json<QueueView>, ApiError> {
    Params::parse(q, &[])?;
    set_paused(st, queue, true).await
}

pub(super) async fn resume<S: Store>(
    State(st): State<ApiState<S>>,
    Path(queue): Path<String>,
    q: QueryResult,
) -> Result<Json<QueueView>, ApiError> {
    Params::parse(q, &[])?;
    set_paused(st, queue, false).await
}

pub(super) async fn servers<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
) -> Result<Json<Vec<ServerView>>, ApiError> {
    Params::parse(q, &[])?;
    Ok(Json(st.fleet()?.servers().iter().map(ServerView::of).collect()))
}

pub(super) async fn add_server<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
    JsonBody(cfg): JsonBody<ServerConfig>,
) -> Result<Response, ApiError> {
    Params::parse(q, &[])?;
    let fleet = st.fleet()?;
    cfg.validate("server").map_err(|e| {
        ApiError::invalid(e.key.strip_prefix("server.").unwrap_or(&e.key).to_owned(), e.message)
    })?;
    let name = cfg.name.clone();
    fleet.add_server(cfg).await.map_err(ApiError::fleet)?;
    let view = fleet.servers().iter().find(|s| s.name == name).map(ServerView::of);
    match view {
        Some(v) => Ok((StatusCode::CREATED, Json(v)).into_response()),
        // removed again between the two calls by another request
        None => Err(ApiError::fleet(mcpq_fleet::FleetError::UnknownServer(name))),
    }
}

pub(super) async fn remove_server<S: Store>(
    State(st): State<ApiState<S>>,
    Path(name): Path<String>,
    q: QueryResult,
) -> Result<StatusCode, ApiError> {
    Params::parse(q, &[])?;
    st.fleet()?.remove_server(&name).await.map_err(ApiError::fleet)?;
    Ok(StatusCode::NO_CONTENT)
}
