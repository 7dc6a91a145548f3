//! Events: one per task state transition, appended to the queue's stream in the same atomic
//! step as the transition. A transition applied to a batch of tasks is one stream entry; the
//! event of the i-th task in it has the id `<entry id>.<i>`, so a subscriber resumes after the
//! last id it saw and misses nothing still retained.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::record;
use crate::task::{QueueName, TaskId};

/// The position of an event in its queue's stream, `<ms>-<seq>.<index>`: the stream entry's
/// id and the event's place in that entry. Ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// Store time of the append, in ms.
    pub ms: u64,
    /// Sequence within that millisecond.
    pub seq: u64,
    /// Place within the entry.
    pub index: u32,
}

impl EventId {
    /// The stream entry id, `<ms>-<seq>`.
    pub(crate) fn entry(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}.{}", self.ms, self.seq, self.index)
    }
}

impl FromStr for EventId {
    type Err = InvalidInput;

    /// Also takes a bare stream entry id `<ms>-<seq>`, which stands after all its events.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            InvalidInput::new(
                "event_id",
                "must look like <ms>-<seq>.<index>, e.g. 1700000000000-0.3",
            )
        };
        let (entry, index) = match s.split_once('.') {
            Some((entry, index)) => (entry, index.parse().map_err(|_| bad())?),
            None => (s, u32::MAX),
        };
        let (ms, seq) = entry.split_once('-').ok_or_else(bad)?;
        Ok(Self { ms: ms.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())?, index })
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest retained event.
    Beginning,
    /// Only events appended after the subscription starts.
    Now,
    /// The events after this one (resuming).
    After(EventId),
}

macro_rules! event_kinds {
    ($($variant:ident = $code:literal, $name:literal, $doc:literal;)*) => {
        /// What happened. The wire name (`task.succeeded`) is the SSE event name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $(#[doc = $doc] $variant,)*
        }

        impl EventKind {
            /// Every kind.
            pub const ALL: &[EventKind] = &[$(EventKind::$variant,)*];

            /// The public name, e.g. `task.succeeded`.
            pub fn as_str(self) -> &'static str {
                match self { $(EventKind::$variant => $name,)* }
            }

            /// The short code the stream stores.
            pub(crate) fn code(self) -> &'static str {
                match self { $(EventKind::$variant => $code,)* }
            }

            pub(crate) fn from_code(code: &[u8]) -> Option<Self> {
                match code { $(c if c == $code.as_bytes() => Some(EventKind::$variant),)* _ => None }
            }
        }
    };
}

event_kinds! {
    TaskEnqueued = "enq", "task.enqueued", "A task was stored (queued, or scheduled when delayed).";
    TaskStarted = "run", "task.started", "A dispatcher claimed the task for an attempt.";
    TaskSucceeded = "ok", "task.succeeded", "The call returned a result.";
    TaskFailed = "fail", "task.failed", "The task failed for good.";
    TaskRetrying = "retry", "task.retrying", "An attempt failed; another will follow.";
    TaskDead = "dead", "task.dead", "Every attempt failed.";
    TaskReview = "review", "task.review", "An attempt's outcome is unknown; the task waits for a person.";
    TaskCancelled = "cancel", "task.cancelled", "The task was cancelled.";
    TaskReleased = "release", "task.released", "A dispatcher handed the task back without spending an attempt.";
    TaskPromoted = "promote", "task.promoted", "A scheduled task's time came; it is queued.";
    TaskRetried = "retried", "task.retried", "A person sent a finished task back to the queue.";
    ServerDegraded = "sdeg", "server.degraded", "A server failed health checks and is degraded.";
    ServerOffline = "soff", "server.offline", "A server is offline; its tasks were redistributed.";
    ServerRecovered = "srec", "server.recovered", "A server answers again.";
}

impl EventKind {
    /// A server's health change rather than a task's transition.
    pub fn is_server(self) -> bool {
        matches!(self, Self::ServerDegraded | Self::ServerOffline | Self::ServerRecovered)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One transition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Its position in the queue's stream.
    pub id: EventId,
    /// The queue it happened in.
    pub queue: QueueName,
    /// What happened.
    pub kind: EventKind,
    /// The task it concerns, for task events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
    /// The attempt number, where one applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u16>,
    /// The server involved, where one applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The error or reason, where one applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One stream entry as both stores keep it: its id, the kind's code, and optional fields: `t`
/// the task ids (16 bytes each; absent for server events, which name no task), and MessagePack
/// arrays with one item per task of `a` attempts, `s` servers and `e` errors.
pub(crate) struct RawEntry<'a> {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
    pub(crate) kind: &'a [u8],
    pub(crate) tasks: Option<&'a [u8]>,
    pub(crate) attempts: Option<&'a [u8]>,
    pub(crate) servers: Option<&'a [u8]>,
    pub(crate) errors: Option<&'a [u8]>,
}

impl RawEntry<'_> {
    /// The entry's events, one per task it names; the i-th has index i.
    pub(crate) fn events(&self, queue: &QueueName) -> Result<Vec<Event>, Error> {
        let corrupt =
            |what: &str| Error::Corrupt(format!("event entry {}-{}: {what}", self.ms, self.seq));
        let list =
            |field: Option<&[u8]>, name: &str| -> Result<Option<Vec<serde_json::Value>>, Error> {
                field.map(|b| record::from_msgpack(b).map_err(|_| corrupt(name))).transpose()
            };
        let kind = EventKind::from_code(self.kind).ok_or_else(|| corrupt("unknown kind"))?;
        let ids: Vec<Option<TaskId>> = match self.tasks {
            Some(t) if t.len() % 16 == 0 => t.chunks(16).map(TaskId::from_slice).collect(),
            Some(_) => return Err(corrupt("task ids")),
            None => vec![None],
        };
        let (attempts, servers, errors) =
            (list(self.attempts, "a")?, list(self.servers, "s")?, list(self.errors, "e")?);
        fn pick(l: &Option<Vec<serde_json::Value>>, i: usize) -> Option<&serde_json::Value> {
            l.as_ref().and_then(|l| l.get(i))
        }
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        Ok(ids
            .into_iter()
            .enumerate()
            .map(|(i, task)| Event {
                // an entry holds at most a batch of tasks, far below u32::MAX
                id: EventId { ms: self.ms, seq: self.seq, index: i as u32 },
                queue: queue.clone(),
                kind,
                task,
                attempt: pick(&attempts, i)
                    .and_then(|v| v.as_u64())
                    .and_then(|a| u16::try_from(a).ok())
                    .filter(|a| *a > 0),
                server: text(pick(&servers, i)),
                error: text(pick(&errors, i)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_parse_order_and_print() {
        let a: EventId = "1700000000000-0.5".parse().unwrap();
        let b: EventId = "1700000000000-12.0".parse().unwrap();
        let whole: EventId = "1700000000000-0".parse().unwrap();
        assert!(a < whole && whole < b, "a bare entry id stands after all its events");
        assert_eq!(b.to_string(), "1700000000000-12.0");
        assert_eq!(b.entry(), "1700000000000-12");
        for bad in ["", "17", "a-b", "1-", "-1", "1-2-3", "1-2.x", "1-2.-1"] {
            assert_eq!(bad.parse::<EventId>().unwrap_err().field, "event_id", "{bad:?}");
        }
    }

    #[test]
    fn kind_codes_are_distinct_and_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_code(k.code().as_bytes()), Some(*k));
        }
        let mut names: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EventKind::ALL.len());
    }
}
