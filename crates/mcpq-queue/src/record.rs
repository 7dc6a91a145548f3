//! The stored task record, one layout for both stores (the Lua prelude writes the same bytes):
//! a fixed big-endian header, the producer's MessagePack spec, and an optional tail of server,
//! error and result. Sizes are checked before anything is decoded, and MessagePack depth is
//! bounded.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;
use crate::task::{QueueName, Spec, Task, TaskId, TaskState};

/// Largest record decoded: spec limit plus a result of up to 16 MiB.
pub(crate) const MAX_RECORD_BYTES: usize = 17 * 1024 * 1024;
/// Nesting limit when decoding MessagePack from the store.
const MAX_DECODE_DEPTH: usize = 64;
const HEADER_LEN: usize = 31;
const FLAG_IDEMPOTENT: u8 = 1;

/// A decoded record and the fencing token of its latest claim.
pub(crate) struct Record {
    pub(crate) task: Task,
    pub(crate) claims: u32,
}

/// Flags byte of a new record.
pub(crate) fn flags(idempotent: bool) -> u8 {
    if idempotent { FLAG_IDEMPOTENT } else { 0 }
}

/// The fixed header of a record: what transitions read and rewrite without touching the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) state: TaskState,
    pub(crate) flags: u8,
    pub(crate) priority: i32,
    pub(crate) attempt: u16,
    pub(crate) max_attempts: u16,
    /// The fencing token of the latest claim.
    pub(crate) claims: u32,
    /// Start of the latest attempt, ms (0: none).
    pub(crate) started: u64,
    /// When it finished, ms (0: not finished).
    pub(crate) finished: u64,
    spec_len: u32,
}

impl Head {
    /// The header of a new record around `spec`.
    pub(crate) fn new(
        state: TaskState,
        flags: u8,
        priority: i32,
        max_attempts: u16,
        spec: &[u8],
    ) -> Result<Self, Error> {
        // specs are capped at MAX_TASK_BYTES long before this; the check keeps the cast honest
        let spec_len = u32::try_from(spec.len())
            .map_err(|_| Error::Corrupt(format!("spec of {} bytes", spec.len())))?;
        Ok(Self {
            state,
            flags,
            priority,
            attempt: 0,
            max_attempts,
            claims: 0,
            started: 0,
            finished: 0,
            spec_len,
        })
    }

    /// Reads the header of the record of `id`, checking that its spec lies within `raw`.
    pub(crate) fn read(id: TaskId, raw: &[u8]) -> Result<Self, Error> {
        if raw.len() > MAX_RECORD_BYTES {
            return Err(Error::Corrupt(format!("record of task {id} is {} bytes", raw.len())));
        }
        let mut r = Reader { buf: raw, pos: 0 };
        let version = r.u8()?;
        if version != 1 {
            return Err(Error::Corrupt(format!("record of task {id} has version {version}")));
        }
        let state_code = r.u8()?;
        let state = TaskState::from_code(state_code)
            .ok_or_else(|| Error::Corrupt(format!("record of task {id} has state {state_code}")))?;
        let head = Self {
            state,
            flags: r.u8()?,
            priority: i32::from_be_bytes(r.array()?),
            attempt: r.u16()?,
            max_attempts: r.u16()?,
            claims: r.u32()?,
            started: r.u48()?,
            finished: r.u48()?,
            spec_len: r.u32()?,
        };
        debug_assert_eq!(r.pos, HEADER_LEN);
        r.take(head.spec_len as usize)?;
        Ok(head)
    }

    /// True when the task may run twice.
    pub(crate) fn idempotent(&self) -> bool {
        self.flags & FLAG_IDEMPOTENT != 0
    }

    fn spec_end(&self) -> usize {
        HEADER_LEN + self.spec_len as usize
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[1, self.state.code(), self.flags]);
        out.extend_from_slice(&self.priority.to_be_bytes());
        out.extend_from_slice(&self.attempt.to_be_bytes());
        out.extend_from_slice(&self.max_attempts.to_be_bytes());
        out.extend_from_slice(&self.claims.to_be_bytes());
        // 48-bit times: the low six bytes
        out.extend_from_slice(&self.started.to_be_bytes()[2..]);
        out.extend_from_slice(&self.finished.to_be_bytes()[2..]);
    }

    /// A new record: this header, `spec` and no tail.
    pub(crate) fn encode(&self, spec: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + spec.len());
        self.put(&mut out);
        out.extend_from_slice(&self.spec_len.to_be_bytes());
        out.extend_from_slice(spec);
        out
    }

    /// `raw` (read with [`Head::read`]) under this header, the rest kept as it was.
    pub(crate) fn rewrite(&self, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw.len());
        self.put(&mut out);
        out.extend_from_slice(&raw[HEADER_LEN - 4..]);
        out
    }

    /// `raw` (read with [`Head::read`]) under this header with a new tail.
    pub(crate) fn rewrite_tail(&self, raw: &[u8], tail: Tail<'_>) -> Vec<u8> {
        let spec = &raw[HEADER_LEN - 4..self.spec_end()];
        let parts = [tail.server, tail.error, tail.result];
        let mut out = Vec::with_capacity(
            HEADER_LEN + spec.len() + parts.iter().map(|p| 4 + p.len()).sum::<usize>(),
        );
        self.put(&mut out);
        out.extend_from_slice(spec);
        for part in parts {
            // each part is far below 4 GiB: results and errors come through capped decoders
            // and requests, and a record over MAX_RECORD_BYTES is refused when read
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// The tail of `raw` (read with [`Head::read`]); empty parts where there is none.
    pub(crate) fn tail<'a>(&self, id: TaskId, raw: &'a [u8]) -> Result<Tail<'a>, Error> {
        let mut r = Reader { buf: raw, pos: self.spec_end() };
        if r.pos >= raw.len() {
            return Ok(Tail::default());
        }
        let mut part = || r.sized().map_err(|e| Error::Corrupt(format!("tail of task {id}: {e}")));
        Ok(Tail { server: part()?, error: part()?, result: part()? })
    }
}

/// The optional end of a record: the server, error and result (MessagePack) of the latest
/// attempt, each empty when unset.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Tail<'a> {
    pub(crate) server: &'a [u8],
    pub(crate) error: &'a [u8],
    pub(crate) result: &'a [u8],
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::Corrupt(format!("record truncated at byte {} (wanted {n} more)", self.pos))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u48(&mut self) -> Result<u64, Error> {
        let b: [u8; 6] = self.array()?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn sized(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Decodes MessagePack from the store with a depth limit.
pub(crate) fn from_msgpack<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DECODE_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes the record stored for `id` in `queue`.
pub(crate) fn decode(queue: &QueueName, id: TaskId, raw: &[u8]) -> Result<Record, Error> {
    let head = Head::read(id, raw)?;
    let spec: Spec = from_msgpack(&raw[HEADER_LEN..head.spec_end()])
        .map_err(|e| Error::Corrupt(format!("spec of task {id}: {e}")))?;
    let tail = head.tail(id, raw)?;
    let text = |b: &[u8]| (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned());
    let result = if tail.result.is_empty() {
        None
    } else {
        Some(
            from_msgpack::<Value>(tail.result)
                .map_err(|e| Error::Corrupt(format!("result of task {id}: {e}")))?,
        )
    };
    let task = Task {
        id,
        queue: queue.clone(),
        call: spec.call,
        priority: head.priority,
        route: spec.route,
        max_attempts: head.max_attempts,
        backoff: spec.backoff,
        timeout: spec.timeout_ms.map(|ms| Duration::from_millis(ms.into())),
        idempotent: head.idempotent(),
        idempotency_key: spec.idempotency_key,
        expires: spec.expires_ms.map(Duration::from_millis),
        metadata: spec.metadata,
        state: head.state,
        attempt: head.attempt,
        server: text(tail.server),
        result,
        error: text(tail.error),
        created_at_ms: id.created_at_ms(),
        started_at_ms: (head.started > 0).then_some(head.started),
        finished_at_ms: (head.finished > 0).then_some(head.finished),
    };
    Ok(Record { task, claims: head.claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::NewTask;

    fn header(state: u8, spec_len: u32) -> Vec<u8> {
        let mut h = vec![1, state, 1];
        h.extend_from_slice(&(-3i32).to_be_bytes());
        h.extend_from_slice(&2u16.to_be_bytes());
        h.extend_from_slice(&5u16.to_be_bytes());
        h.extend_from_slice(&9u32.to_be_bytes());
        h.extend_from_slice(&[0, 0, 1, 0, 0, 0]);
        h.extend_from_slice(&[0; 6]);
        h.extend_from_slice(&spec_len.to_be_bytes());
        assert_eq!(h.len(), HEADER_LEN);
        h
    }

    #[test]
    fn decodes_header_spec_and_tail() {
        let t = NewTask::tool("echo", serde_json::json!({"x": 1}));
        let spec = t.encode(5).unwrap().spec;
        let mut raw = header(4, spec.len() as u32);
        raw.extend_from_slice(&spec);
        let result = rmp_serde::to_vec_named(&serde_json::json!({"ok": true})).unwrap();
        for part in [&b"srv"[..], b"", &result] {
            raw.extend_from_slice(&(part.len() as u32).to_be_bytes());
            raw.extend_from_slice(part);
        }
        let rec = decode(&QueueName::default(), t.id, &raw).unwrap();
        assert_eq!(rec.claims, 9);
        let task = rec.task;
        assert_eq!(
            (task.state, task.priority, task.attempt, task.max_attempts),
            (TaskState::Succeeded, -3, 2, 5)
        );
        assert!(task.idempotent);
        assert_eq!(task.started_at_ms, Some(1 << 24));
        assert_eq!(task.finished_at_ms, None);
        assert_eq!(task.server.as_deref(), Some("srv"));
        assert_eq!(task.error, None);
        assert_eq!(task.result, Some(serde_json::json!({"ok": true})));
        assert_eq!(task.call, t.call);
    }

    #[test]
    fn rewrites_keep_the_spec_and_replace_header_or_tail() {
        let t = NewTask::tool("echo", serde_json::json!({"x": 1})).idempotent(true);
        let spec = t.encode(5).unwrap().spec;
        let new = Head::new(TaskState::Queued, flags(true), 7, 3, &spec).unwrap();
        let raw = new.encode(&spec);
        let mut head = Head::read(t.id, &raw).unwrap();
        assert_eq!(head, new);
        assert!(head.idempotent());
        (head.state, head.attempt, head.claims, head.started) = (TaskState::Running, 1, 1, 1 << 40);
        let running = head.rewrite(&raw);
        assert_eq!(Head::read(t.id, &running).unwrap(), head);
        let result = rmp_serde::to_vec_named(&serde_json::json!({"ok": true})).unwrap();
        let tail = Tail { server: b"s1", error: b"", result: &result };
        head.state = TaskState::Succeeded;
        let done = head.rewrite_tail(&running, tail);
        // a rewrite keeps the tail; a new tail replaces it
        let kept = Head { attempt: 2, ..head }.rewrite(&done);
        assert_eq!(Head::read(t.id, &kept).unwrap().tail(t.id, &kept).unwrap().server, b"s1");
        let task = decode(&QueueName::default(), t.id, &done).unwrap().task;
        assert_eq!((task.state, task.priority, task.attempt), (TaskState::Succeeded, 7, 1));
        assert_eq!(task.started_at_ms, Some(1 << 40));
        assert_eq!((task.server.as_deref(), task.error), (Some("s1"), None));
        assert_eq!(task.result, Some(serde_json::json!({"ok": true})));
        assert_eq!(task.call, t.call);
    }

    #[test]
    fn rejects_truncated_unknown_and_deep_records() {
        let id = TaskId::new();
        let q = QueueName::default();
        assert!(matches!(decode(&q, id, &[]), Err(Error::Corrupt(_))));
        assert!(matches!(decode(&q, id, &header(4, 100)), Err(Error::Corrupt(_))));
        assert!(matches!(decode(&q, id, &header(0, 0)), Err(Error::Corrupt(_))));
        // 200 nested one-element arrays: valid MessagePack, deeper than the limit
        let mut deep = header(1, 200);
        deep.extend(std::iter::repeat_n(0x91u8, 199));
        deep.push(0xc0);
        assert!(matches!(decode(&q, id, &deep), Err(Error::Corrupt(_))));
    }
}
