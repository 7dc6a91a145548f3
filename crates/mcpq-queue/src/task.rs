//! The task model: what a producer enqueues ([`NewTask`]), what the store keeps ([`Task`]), and
//! the limits every task is checked against before anything is written. Every check names the
//! field it rejects, with the HTTP API's field names.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, InvalidInput};

/// Largest encoded task (call, route, metadata…) accepted, in bytes.
pub const MAX_TASK_BYTES: usize = 512 * 1024;
/// Deepest nesting of JSON accepted in arguments and metadata.
pub const MAX_JSON_DEPTH: usize = 32;
/// Longest timeout a task may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest delay before a task's first attempt.
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most attempts a task may be given.
pub const MAX_ATTEMPTS: u16 = 1000;
/// Longest name: queue, tool, prompt, server or tag.
pub const MAX_NAME_LEN: usize = 128;

/// A task's identity: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh id, stamped with the current time.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as its 16 bytes, as the stores key it.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Reads an id from its 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok().map(Self)
    }

    /// Milliseconds since the Unix epoch at which the id was made (0 for a non-v7 id).
    pub fn created_at_ms(&self) -> u64 {
        self.0.get_timestamp().map_or(0, |ts| {
            let (secs, nanos) = ts.to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        })
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for TaskId {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self).map_err(|_| InvalidInput::new("id", "not a UUID"))
    }
}

/// A queue's name: 1 to 128 of `A-Z a-z 0-9 _ - .`, so it can sit inside a Redis hash tag.
/// Shared, not copied: every task and ledger entry carries its queue's name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Checks and wraps a queue name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidInput> {
        let name = name.into();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(InvalidInput::new(
                "queue",
                format!("must be 1 to {MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.".contains(*c))) {
            return Err(InvalidInput::new(
                "queue",
                format!("{c:?} is not allowed; use letters, digits, '_', '-' and '.'"),
            ));
        }
        Ok(Self(name.into()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for QueueName {
    fn default() -> Self {
        Self("default".into())
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for QueueName {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for QueueName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for QueueName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The MCP request a task makes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// `tools/call`.
    Tool {
        /// Tool name.
        name: String,
        /// Tool arguments: a JSON object.
        #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
        arguments: Value,
    },
    /// `resources/read`.
    Resource {
        /// Resource URI.
        uri: String,
    },
    /// `prompts/get`.
    Prompt {
        /// Prompt name.
        name: String,
        /// Prompt arguments (strings, as MCP requires).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        arguments: BTreeMap<String, String>,
    },
}

impl Call {
    /// The tool or prompt name, or the resource URI: what routing matches on.
    pub fn target(&self) -> &str {
        match self {
            Call::Tool { name, .. } | Call::Prompt { name, .. } => name,
            Call::Resource { uri } => uri,
        }
    }
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}

/// How the dispatcher picks a server among those that can run a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Each server in turn.
    RoundRobin,
    /// The server with the fewest calls in flight.
    LeastLoaded,
    /// Servers by weight, highest first.
    Priority,
    /// Any server, uniformly.
    Random,
}

/// Where a task may run: a pinned server, else servers with any of the tags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Run only on this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Run on a server carrying any of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Overrides the dispatcher's strategy for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

impl Route {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// Delay before retrying a failed attempt: exponential from `initial_ms`, capped at `max_ms`,
/// with equal jitter (half fixed, half random) so retries spread out but always grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay after the first failed attempt, before jitter.
    pub initial_ms: u32,
    /// Upper bound of the delay.
    pub max_ms: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial_ms: 1000, max_ms: 60_000 }
    }
}

impl Backoff {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u16, rng: &mut impl Rng) -> Duration {
        let exp = u32::from(attempt.saturating_sub(1)).min(31);
        let cap = u64::from(self.initial_ms).saturating_mul(1 << exp).min(u64::from(self.max_ms));
        let half = cap / 2;
        Duration::from_millis(half + rng.random_range(0..=cap - half))
    }
}

/// The part of a task that never changes after enqueue, stored as named MessagePack.
/// Priority, attempts and the idempotent flag live in the record header, where scripts read them.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) call: Call,
    #[serde(default, skip_serializing_if = "Route::is_default")]
    pub(crate) route: Route,
    #[serde(default, skip_serializing_if = "Backoff::is_default")]
    pub(crate) backoff: Backoff,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub(crate) metadata: Map<String, Value>,
}

/// A task as a producer submits it. Build one with [`NewTask::tool`], [`NewTask::resource`] or
/// [`NewTask::prompt`] and the chainable setters.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    /// Its id; fresh by default. Re-sending a task with the same id never creates a second one.
    pub id: TaskId,
    /// The MCP request.
    pub call: Call,
    /// Higher runs first.
    pub priority: i32,
    /// Where it may run.
    pub route: Route,
    /// Attempts before it is dead (1 to 1000); `None`: the queue's `max_attempts`.
    pub max_attempts: Option<u16>,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Limit for one attempt; the dispatcher's default when absent.
    pub timeout: Option<Duration>,
    /// Safe to run twice: an attempt with an unknown outcome may be repeated.
    pub idempotent: bool,
    /// Deduplicates submissions: the same key and body give back the first task.
    pub idempotency_key: Option<String>,
    /// Wait this long (by the store's clock) before the first attempt.
    pub delay: Option<Duration>,
    /// Give up when no attempt could start within this long of the task's creation (no
    /// server offered its tool, its pinned server stayed away): the task fails instead of
    /// waiting on. Never cuts an attempt short.
    pub expires: Option<Duration>,
    /// Free-form data carried with the task.
    pub metadata: Map<String, Value>,
}

impl NewTask {
    fn with_call(call: Call) -> Self {
        Self {
            id: TaskId::new(),
            call,
            priority: 0,
            route: Route::default(),
            max_attempts: None,
            backoff: Backoff::default(),
            timeout: None,
            idempotent: false,
            idempotency_key: None,
            delay: None,
            expires: None,
            metadata: Map::new(),
        }
    }

    /// A `tools/call` of `name`; `arguments` must be a JSON object (null means none).
    pub fn tool(name: impl Into<String>, arguments: Value) -> Self {
        let arguments = if arguments.is_null() { empty_object() } else { arguments };
        Self::with_call(Call::Tool { name: name.into(), arguments })
    }

    /// A `resources/read` of `uri`.
    pub fn resource(uri: impl Into<String>) -> Self {
        Self::with_call(Call::Resource { uri: uri.into() })
    }

    /// A `prompts/get` of `name`.
    pub fn prompt(name: impl Into<String>, arguments: BTreeMap<String, String>) -> Self {
        Self::with_call(Call::Prompt { name: name.into(), arguments })
    }

    /// Sets the priority (higher runs first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Pins the task to one server.
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.route.server = Some(server.into());
        self
    }

    /// Restricts the task to servers with any of these tags.
    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tags: I) -> Self {
        self.route.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the number of attempts.
    pub fn max_attempts(mut self, n: u16) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the retry backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Marks the task safe to run more than once.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Delays the first attempt.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Fails the task when no attempt started within `expires` of its creation.
    pub fn expires(mut self, expires: Duration) -> Self {
        self.expires = Some(expires);
        self
    }

    /// Attaches metadata.
    pub fn metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.metadata = metadata;
        self
    }

    /// Checks every field as a store will, naming the field at fault (`call.name`,
    /// `timeout_ms`, …), without storing anything.
    pub fn validate(&self) -> Result<(), Error> {
        self.encode(1).map(|_| ())
    }

    /// Checks and encodes a batch for a queue whose tasks get `default_attempts` unless they
    /// set their own; an error names the offending task's index (`tasks[3].…`) when there are
    /// several. Nothing reaches a store without this.
    pub(crate) fn encode_all(
        tasks: &[NewTask],
        default_attempts: u16,
    ) -> Result<Vec<EncodedTask<'_>>, Error> {
        tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.encode(default_attempts).map_err(|e| match e {
                    Error::Invalid(mut inv) if tasks.len() > 1 => {
                        inv.field = format!("tasks[{i}].{}", inv.field);
                        Error::Invalid(inv)
                    }
                    other => other,
                })
            })
            .collect()
    }

    /// Checks every field and encodes the spec; nothing reaches a store without this.
    pub(crate) fn encode(&self, default_attempts: u16) -> Result<EncodedTask<'_>, Error> {
        check_name("call.name", self.call.target(), matches!(self.call, Call::Resource { .. }))?;
        match &self.call {
            Call::Tool { arguments, .. } => {
                if !arguments.is_object() {
                    return Err(invalid("call.arguments", "must be a JSON object"));
                }
                check_depth("call.arguments", arguments)?;
            }
            Call::Prompt { arguments, .. } => {
                for k in arguments.keys() {
                    check_name("call.arguments", k, false)?;
                }
            }
            Call::Resource { .. } => {}
        }
        for v in self.metadata.values() {
            check_depth("metadata", v)?;
        }
        if let Some(server) = &self.route.server {
            check_name("server", server, false)?;
        }
        for tag in &self.route.tags {
            check_name("tags", tag, false)?;
        }
        let max_attempts = self.max_attempts.unwrap_or(default_attempts);
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS {
            return Err(invalid("max_attempts", format!("must be 1 to {MAX_ATTEMPTS}")));
        }
        if self.backoff.initial_ms == 0 || self.backoff.initial_ms > self.backoff.max_ms {
            return Err(invalid("backoff", "initial_ms must be at least 1 and at most max_ms"));
        }
        if u128::from(self.backoff.max_ms) > MAX_TIMEOUT.as_millis() {
            return Err(invalid("backoff", "max_ms must be at most 24 hours"));
        }
        let timeout_ms = match self.timeout {
            Some(t) if t.is_zero() || t > MAX_TIMEOUT => {
                return Err(invalid("timeout_ms", "must be 1 ms to 24 hours"));
            }
            // cannot truncate: bounded by MAX_TIMEOUT above
            Some(t) => Some(t.as_millis() as u32),
            None => None,
        };
        let delay_ms = match self.delay {
            Some(d) if d > MAX_DELAY => {
                return Err(invalid("delay_ms", "must be at most 365 days"));
            }
            Some(d) => d.as_millis() as u64,
            None => 0,
        };
        let expires_ms = match self.expires {
            Some(e) if e.is_zero() || e > MAX_DELAY => {
                return Err(invalid("expires_ms", "must be 1 ms to 365 days"));
            }
            Some(e) => Some(e.as_millis() as u64),
            None => None,
        };
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 256 || key.chars().any(char::is_control))
        {
            return Err(invalid("idempotency_key", "must be 1 to 256 printable characters"));
        }
        let spec = Spec {
            call: self.call.clone(),
            route: self.route.clone(),
            backoff: self.backoff,
            timeout_ms,
            idempotency_key: self.idempotency_key.clone(),
            expires_ms,
            metadata: self.metadata.clone(),
        };
        let bytes = rmp_serde::to_vec_named(&spec).map_err(|e| invalid("task", e.to_string()))?;
        if bytes.len() > MAX_TASK_BYTES {
            return Err(invalid(
                "task",
                format!("encodes to {} bytes; the limit is {MAX_TASK_BYTES}", bytes.len()),
            ));
        }
        Ok(EncodedTask {
            id: self.id,
            priority: self.priority,
            max_attempts,
            delay_ms,
            spec: bytes,
            task: self,
        })
    }
}

/// A checked task, ready for a store.
pub(crate) struct EncodedTask<'a> {
    pub(crate) id: TaskId,
    pub(crate) priority: i32,
    /// The task's own, or its queue's.
    pub(crate) max_attempts: u16,
    pub(crate) delay_ms: u64,
    pub(crate) spec: Vec<u8>,
    pub(crate) task: &'a NewTask,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid(InvalidInput::new(field, message))
}

fn check_name(field: &'static str, value: &str, uri: bool) -> Result<(), Error> {
    let max = if uri { 4096 } else { MAX_NAME_LEN };
    if value.is_empty() || value.len() > max {
        return Err(invalid(field, format!("must be 1 to {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_depth(field: &'static str, value: &Value) -> Result<(), Error> {
    // iterative, so a hostile value nested far past the limit cannot exhaust the stack
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(_) | Value::Object(_) if d > MAX_JSON_DEPTH => {
                return Err(invalid(field, format!("nests deeper than {MAX_JSON_DEPTH} levels")));
            }
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|c| (c, d + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting in its ready list.
    Queued,
    /// Waiting for its time (delay or retry backoff).
    Scheduled,
    /// Claimed by a dispatcher under a lease.
    Running,
    /// The call returned a result.
    Succeeded,
    /// Failed for good (the tool's error, or an error not worth retrying).
    Failed,
    /// Every attempt failed.
    Dead,
    /// The outcome of an attempt is unknown and repeating it is not safe: a person decides.
    Review,
    /// Cancelled before it finished.
    Cancelled,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 8] = [
        TaskState::Queued,
        TaskState::Scheduled,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Dead,
        TaskState::Review,
        TaskState::Cancelled,
    ];

    /// The state's code in stored records (1..=8).
    pub(crate) fn code(self) -> u8 {
        self as u8 + 1
    }

    /// The state with the given record code.
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// True for states nothing moves a task out of without a person: succeeded, failed, dead,
    /// cancelled (and review, which waits for one).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Dead | Self::Review | Self::Cancelled)
    }

    /// The lowercase name, as in the HTTP API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Review => "review",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            InvalidInput::new("state", format!("{s:?} is not one of queued, scheduled, running, succeeded, failed, dead, review, cancelled"))
        })
    }
}

/// A task as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// Its queue.
    pub queue: QueueName,
    /// The MCP request.
    pub call: Call,
    /// Higher runs first.
    pub priority: i32,
    /// Where it may run.
    pub route: Route,
    /// Attempts allowed.
    pub max_attempts: u16,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Limit for one attempt.
    pub timeout: Option<Duration>,
    /// Safe to run twice.
    pub idempotent: bool,
    /// The idempotency key it was submitted with.
    pub idempotency_key: Option<String>,
    /// How long after creation an attempt may still start.
    pub expires: Option<Duration>,
    /// Free-form data.
    pub metadata: Map<String, Value>,
    /// Where it is now.
    pub state: TaskState,
    /// Attempts started (released attempts do not count).
    pub attempt: u16,
    /// The server of the latest settled attempt.
    pub server: Option<String>,
    /// The call's result (MCP result object), once succeeded.
    pub result: Option<Value>,
    /// The latest error or reason.
    pub error: Option<String>,
    /// When the producer created it (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When its latest attempt started, by the store's clock.
    pub started_at_ms: Option<u64>,
    /// When it finished, by the store's clock.
    pub finished_at_ms: Option<u64>,
}

impl Task {
    /// Whether `now_ms` (ms since the Unix epoch) is past its `expires` limit.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires
            .is_some_and(|e| self.created_at_ms.saturating_add(e.as_millis() as u64) < now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    #[test]
    fn queue_names_reject_hash_tag_and_separator_characters() {
        for bad in ["", "a{b", "a}b", "a:b", "a b", "é", &"x".repeat(129)] {
            let err = QueueName::new(bad).unwrap_err();
            assert_eq!(err.field, "queue", "{bad:?}");
        }
        for good in ["default", "emails.high", "a_b-c", &"x".repeat(128)] {
            assert!(QueueName::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let b = Backoff { initial_ms: 100, max_ms: 1000 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let d1 = b.delay(1, &mut rng).as_millis();
            let d3 = b.delay(3, &mut rng).as_millis();
            let d9 = b.delay(9, &mut rng).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            assert!((200..=400).contains(&d3), "{d3}");
            assert!((500..=1000).contains(&d9), "{d9}");
        }
        assert!(b.delay(u16::MAX, &mut rng) <= Duration::from_millis(1000));
    }

    #[test]
    fn task_ids_sort_by_creation_and_carry_their_time() {
        let a = TaskId::new();
        let b = TaskId::new();
        assert!(a < b);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as u64;
        assert!(now.abs_diff(a.created_at_ms()) < 60_000);
        assert_eq!(a.to_string().parse::<TaskId>().unwrap(), a);
    }

    #[test]
    fn encode_names_the_field_it_rejects() {
        let field = |t: NewTask| match t.encode(5) {
            Err(Error::Invalid(e)) => e.field,
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(field(NewTask::tool("", json!({}))), "call.name");
        assert_eq!(field(NewTask::tool("t", json!({})).max_attempts(0)), "max_attempts");
        assert_eq!(field(NewTask::tool("t", json!({})).timeout(Duration::ZERO)), "timeout_ms");
        assert_eq!(
            field(NewTask::tool("t", json!({})).timeout(Duration::from_secs(90_000))),
            "timeout_ms"
        );
        assert_eq!(
            field(NewTask::tool("t", json!({})).delay(Duration::from_secs(400 * 86_400))),
            "delay_ms"
        );
        assert_eq!(field(NewTask::tool("t", json!({"a": "x".repeat(600_000)}))), "task");
        assert_eq!(field(NewTask::tool("t", json!({})).expires(Duration::ZERO)), "expires_ms");
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        assert_eq!(field(NewTask::tool("t", json!({ "d": deep }))), "call.arguments");
        assert_eq!(field(NewTask::tool("t", json!([1]))), "call.arguments");
        assert_eq!(field(NewTask::tool("t", json!({})).server("")), "server");
        assert_eq!(field(NewTask::tool("t", json!({})).idempotency_key("")), "idempotency_key");
    }

    #[test]
    fn a_plain_tool_call_encodes_small() {
        let t = NewTask::tool("noop", json!({}));
        let enc = t.encode(5).unwrap();
        assert!(enc.spec.len() <= 24, "{} bytes", enc.spec.len());
        let spec: Spec = rmp_serde::from_slice(&enc.spec).unwrap();
        assert_eq!(spec.call, t.call);
    }

    #[test]
    fn state_codes_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::from_code(s.code()), Some(s));
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
        assert_eq!(TaskState::from_code(0), None);
        assert_eq!(TaskState::from_code(9), None);
    }
}
