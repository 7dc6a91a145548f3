//! Decoding of stored task records (the layout the Lua prelude writes): a fixed big-endian
//! header, the producer's MessagePack spec, and an optional tail of server, error and result.
//! Sizes are checked before anything is decoded, and MessagePack depth is bounded.

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
    let flags = r.u8()?;
    let priority = i32::from_be_bytes(r.array()?);
    let attempt = r.u16()?;
    let max_attempts = r.u16()?;
    let claims = r.u32()?;
    let started = r.u48()?;
    let finished = r.u48()?;
    debug_assert_eq!(r.pos, HEADER_LEN - 4);
    let spec_bytes = r.sized()?;
    let spec: Spec =
        from_msgpack(spec_bytes).map_err(|e| Error::Corrupt(format!("spec of task {id}: {e}")))?;
    let (mut server, mut error, mut result) = (None, None, None);
    if r.pos < raw.len() {
        let text = |b: &[u8]| (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned());
        server = text(r.sized()?);
        error = text(r.sized()?);
        let res = r.sized()?;
        if !res.is_empty() {
            result = Some(
                from_msgpack::<Value>(res)
                    .map_err(|e| Error::Corrupt(format!("result of task {id}: {e}")))?,
            );
        }
    }
    let task = Task {
        id,
        queue: queue.clone(),
        call: spec.call,
        priority,
        route: spec.route,
        max_attempts,
        backoff: spec.backoff,
        timeout: spec.timeout_ms.map(|ms| Duration::from_millis(ms.into())),
        idempotent: flags & FLAG_IDEMPOTENT != 0,
        idempotency_key: spec.idempotency_key,
        expires: spec.expires_ms.map(Duration::from_millis),
        metadata: spec.metadata,
        state,
        attempt,
        server,
        result,
        error,
        created_at_ms: id.created_at_ms(),
        started_at_ms: (started > 0).then_some(started),
        finished_at_ms: (finished > 0).then_some(finished),
    };
    Ok(Record { task, claims })
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
        let spec = t.encode().unwrap().spec;
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
