//! The JSON shapes of the HTTP API, shared by the server and the CLI: a task request, the task
//! view, list pages, queue and server views, and the error body. Field names are a public
//! contract (DESIGN §7); adding optional fields is compatible, renaming is not.

use std::collections::BTreeMap;
use std::time::Duration;

use mcpq_fleet::{Health, ServerStatus};
use mcpq_queue::{Backoff, Call, NewTask, QueueName, QueueStats, Strategy, Task, TaskState};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The MCP request of a task, as the API spells it: exactly one of `tool`, `resource`,
/// `prompt`, with `arguments` for tools (an object) and prompts (an object of strings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// `tools/call` of this tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// `resources/read` of this URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// `prompts/get` of this prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Arguments of the tool or prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
}

impl CallSpec {
    /// The queue's call, or the field that is wrong and why.
    pub fn to_call(&self) -> Result<Call, (String, String)> {
        let bad = |f: &str, m: &str| Err((f.to_owned(), m.to_owned()));
        match (&self.tool, &self.resource, &self.prompt) {
            (Some(tool), None, None) => {
                let arguments = self.arguments.clone().unwrap_or(Value::Object(Map::new()));
                if !arguments.is_object() {
                    return bad("call.arguments", "must be a JSON object");
                }
                Ok(Call::Tool { name: tool.clone(), arguments })
            }
            (None, Some(uri), None) => {
                if self.arguments.is_some() {
                    return bad("call.arguments", "a resource read takes no arguments");
                }
                Ok(Call::Resource { uri: uri.clone() })
            }
            (None, None, Some(prompt)) => {
                let mut arguments = BTreeMap::new();
                match &self.arguments {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(map)) => {
                        for (k, v) in map {
                            let Value::String(v) = v else {
                                return Err((
                                    format!("call.arguments.{k}"),
                                    "prompt arguments must be strings".to_owned(),
                                ));
                            };
                            arguments.insert(k.clone(), v.clone());
                        }
                    }
                    Some(_) => return bad("call.arguments", "must be a JSON object of strings"),
                }
                Ok(Call::Prompt { name: prompt.clone(), arguments })
            }
            _ => bad("call", "give exactly one of \"tool\", \"resource\" or \"prompt\""),
        }
    }

    /// The API shape of a queue call.
    pub fn from_call(call: &Call) -> Self {
        match call {
            Call::Tool { name, arguments } => Self {
                tool: Some(name.clone()),
                arguments: Some(arguments.clone()),
                ..Self::default()
            },
            Call::Resource { uri } => Self { resource: Some(uri.clone()), ..Self::default() },
            Call::Prompt { name, arguments } => Self {
                prompt: Some(name.clone()),
                arguments: (!arguments.is_empty()).then(|| {
                    Value::Object(
                        arguments
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                            .collect(),
                    )
                }),
                ..Self::default()
            },
        }
    }

    /// The request field that carries the call's target (`call.tool`, …).
    pub fn target_field(call: &Call) -> &'static str {
        match call {
            Call::Tool { .. } => "call.tool",
            Call::Resource { .. } => "call.resource",
            Call::Prompt { .. } => "call.prompt",
        }
    }
}

/// `POST /v1/tasks` (and each item of a batch).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The queue; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The MCP request.
    pub call: CallSpec,
    /// Higher runs first; 0 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Run only on this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Run on a server carrying any of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Overrides the dispatch strategy for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Attempts before the task is dead; the queue's `max_attempts` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u16>,
    /// Retry backoff `{initial_ms, max_ms}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Limit for one attempt, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Safe to run twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Wait this long before the first attempt, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Fail when no attempt could start within this long of creation, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Deduplicates submissions (the `Idempotency-Key` header does the same for one task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Free-form data carried with the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl TaskRequest {
    /// The task to enqueue (without `max_attempts` the store applies the queue's), or the
    /// field that is wrong and why. Range checks happen in the store, which names fields the
    /// same way.
    pub fn to_task(&self) -> Result<NewTask, (String, String)> {
        let mut t = match self.call.to_call()? {
            Call::Tool { name, arguments } => NewTask::tool(name, arguments),
            Call::Resource { uri } => NewTask::resource(uri),
            Call::Prompt { name, arguments } => NewTask::prompt(name, arguments),
        };
        t = t.priority(self.priority.unwrap_or(0));
        t.max_attempts = self.max_attempts;
        if let Some(server) = &self.server {
            t = t.server(server.clone());
        }
        if let Some(tags) = &self.tags {
            t = t.tags(tags.iter().cloned());
        }
        t.route.strategy = self.strategy;
        if let Some(b) = self.backoff {
            t = t.backoff(b);
        }
        if let Some(ms) = self.timeout_ms {
            t = t.timeout(Duration::from_millis(ms));
        }
        if let Some(i) = self.idempotent {
            t = t.idempotent(i);
        }
        if let Some(ms) = self.delay_ms {
            t = t.delay(Duration::from_millis(ms));
        }
        if let Some(ms) = self.expires_ms {
            t = t.expires(Duration::from_millis(ms));
        }
        if let Some(key) = &self.idempotency_key {
            t = t.idempotency_key(key.clone());
        }
        if let Some(m) = &self.metadata {
            t = t.metadata(m.clone());
        }
        Ok(t)
    }
}

/// `POST /v1/tasks/batch`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The tasks, stored in order.
    pub tasks: Vec<TaskRequest>,
}

/// A task as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Its id (UUID v7).
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// `queued, scheduled, running, succeeded, failed, dead, review, cancelled`.
    pub state: String,
    /// Higher runs first.
    pub priority: i32,
    /// Attempts started.
    pub attempt: u16,
    /// Attempts allowed.
    pub max_attempts: u16,
    /// The server of the latest settled attempt.
    pub server: Option<String>,
    /// The MCP request.
    pub call: CallSpec,
    /// The MCP result, once succeeded.
    pub result: Option<Value>,
    /// The latest error or reason.
    pub error: Option<String>,
    /// Creation time, RFC 3339 (UTC).
    pub created_at: String,
    /// Start of the latest attempt.
    pub started_at: Option<String>,
    /// Finish time.
    pub finished_at: Option<String>,
    /// Safe to run twice.
    pub idempotent: bool,
    /// Pinned server, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_server: Option<String>,
    /// Routing tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The idempotency key it was submitted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Free-form data.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

impl TaskView {
    /// The view of a stored task.
    pub fn of(t: &Task) -> Self {
        Self {
            id: t.id.to_string(),
            queue: t.queue.as_str().to_owned(),
            state: t.state.as_str().to_owned(),
            priority: t.priority,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            server: t.server.clone(),
            call: CallSpec::from_call(&t.call),
            result: t.result.clone(),
            error: t.error.clone(),
            created_at: rfc3339(t.created_at_ms),
            started_at: t.started_at_ms.map(rfc3339),
            finished_at: t.finished_at_ms.map(rfc3339),
            idempotent: t.idempotent,
            pinned_server: t.route.server.clone(),
            tags: t.route.tags.clone(),
            idempotency_key: t.idempotency_key.clone(),
            metadata: t.metadata.clone(),
        }
    }

    /// The view of a task just stored from `t` (queued, or scheduled when delayed) in `queue`,
    /// whose tasks get `default_attempts` unless they set their own: the stored task as the
    /// store would answer it, without asking the store.
    pub fn created(queue: &QueueName, t: &NewTask, default_attempts: u16) -> Self {
        let delayed = t.delay.is_some_and(|d| !d.is_zero());
        Self::of(&Task {
            id: t.id,
            queue: queue.clone(),
            call: t.call.clone(),
            priority: t.priority,
            route: t.route.clone(),
            max_attempts: t.max_attempts.unwrap_or(default_attempts),
            backoff: t.backoff,
            timeout: t.timeout,
            idempotent: t.idempotent,
            idempotency_key: t.idempotency_key.clone(),
            expires: t.expires,
            metadata: t.metadata.clone(),
            state: if delayed { TaskState::Scheduled } else { TaskState::Queued },
            attempt: 0,
            server: None,
            result: None,
            error: None,
            created_at_ms: t.id.created_at_ms(),
            started_at_ms: None,
            finished_at_ms: None,
        })
    }

    /// Whether the task is in a final state.
    pub fn is_terminal(&self) -> bool {
        self.state.parse::<TaskState>().is_ok_and(TaskState::is_terminal)
    }
}

/// One item of a batch answer: the task, or why this one was not stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItem {
    /// Stored (or already there with the same body).
    Task(Box<TaskView>),
    /// Not stored: its idempotency key is held by a task with a different body.
    Error {
        /// What went wrong.
        error: ErrorDetail,
    },
}

/// The answer to a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    /// One item per submitted task, in order.
    pub tasks: Vec<BatchItem>,
}

/// One page of `GET /v1/tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    /// The tasks.
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; absent at the end.
    pub next_cursor: Option<String>,
}

/// `GET /v1/queues/{queue}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    /// The queue.
    pub queue: String,
    /// Claims are paused.
    pub paused: bool,
    /// Tasks per state.
    pub counts: BTreeMap<String, u64>,
}

impl QueueView {
    /// The view of a queue's counts.
    pub fn of(queue: &str, s: &QueueStats) -> Self {
        Self {
            queue: queue.to_owned(),
            paused: s.paused,
            counts: TaskState::ALL
                .iter()
                .map(|st| (st.as_str().to_owned(), s.count(*st)))
                .collect(),
        }
    }
}

/// A server as `GET /v1/servers` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    /// Its name.
    pub name: String,
    /// Its endpoint.
    pub url: String,
    /// The protocol revision it speaks, once known.
    pub era: Option<String>,
    /// `online`, `degraded` or `offline`.
    pub health: String,
    /// False while its breaker is open or it asked to be left alone.
    pub available: bool,
    /// Calls in flight from this replica.
    pub in_flight: u32,
    /// Its concurrency limit.
    pub max_concurrency: u32,
    /// Its tools, once listed.
    pub tools: Option<Vec<String>>,
}

impl ServerView {
    /// The view of a server's status.
    pub fn of(s: &ServerStatus) -> Self {
        Self {
            name: s.name.clone(),
            url: s.url.clone(),
            era: s.era.clone(),
            health: health_name(s.health).to_owned(),
            available: s.available && s.client_running,
            in_flight: s.in_flight,
            max_concurrency: s.max_concurrency,
            tools: s.tools.clone(),
        }
    }
}

/// The wire name of a health state.
pub fn health_name(h: Health) -> &'static str {
    match h {
        Health::Online => "online",
        Health::Degraded => "degraded",
        Health::Offline => "offline",
    }
}

/// Every 4xx and 5xx body: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable: `invalid`, `invalid_json`, `not_found`, `conflict`, …
    pub code: String,
    /// For people.
    pub message: String,
    /// The request field (or query parameter, or header) at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds, e.g. `2026-11-22T10:00:00.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn a_call_is_exactly_one_of_tool_resource_prompt() {
        let spec = |v: Value| serde_json::from_value::<CallSpec>(v).unwrap().to_call();
        assert!(matches!(spec(json!({"tool": "echo"})), Ok(Call::Tool { .. })));
        assert!(matches!(spec(json!({"resource": "file:///x"})), Ok(Call::Resource { .. })));
        assert!(matches!(
            spec(json!({"prompt": "p", "arguments": {"a": "b"}})),
            Ok(Call::Prompt { .. })
        ));
        assert_eq!(spec(json!({})).unwrap_err().0, "call");
        assert_eq!(spec(json!({"tool": "a", "prompt": "b"})).unwrap_err().0, "call");
        assert_eq!(spec(json!({"tool": "a", "arguments": [1]})).unwrap_err().0, "call.arguments");
        assert_eq!(
            spec(json!({"prompt": "a", "arguments": {"n": 1}})).unwrap_err().0,
            "call.arguments.n"
        );
        assert_eq!(
            spec(json!({"resource": "r", "arguments": {}})).unwrap_err().0,
            "call.arguments"
        );
        for call in [
            Call::Tool { name: "t".into(), arguments: json!({"x": 1}) },
            Call::Resource { uri: "u".into() },
            Call::Prompt {
                name: "p".into(),
                arguments: BTreeMap::from([("a".into(), "b".into())]),
            },
        ] {
            assert_eq!(CallSpec::from_call(&call).to_call().unwrap(), call);
        }
    }
}
