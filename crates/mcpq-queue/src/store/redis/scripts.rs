//! The Lua scripts, loaded once, and the one typed wrapper that calls each. Every script is
//! `lua/prelude.lua` followed by its own file; their headers document KEYS, ARGV and replies.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Script, ServerErrorKind, ToRedisArgs, Value};

use super::Keys;
use crate::config::QueueConfig;
use crate::error::{Error, Result};
use crate::record::flags;
use crate::store::{
    ClaimToken, Completion, Disposition, Enqueued, Failure, QueueStats, Release, Settled, millis,
};
use crate::task::{EncodedTask, TaskId, TaskState};

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../../../lua/prelude.lua"),
                include_str!(concat!("../../../lua/", $file))
            ))
        });
    };
}

script!(ENQUEUE, "enqueue.lua");
script!(CLAIM, "claim.lua");
script!(RENEW, "renew.lua");
script!(COMPLETE, "complete.lua");
script!(FAIL, "fail.lua");
script!(RELEASE, "release.lua");
script!(CANCEL, "cancel.lua");
script!(RETRY, "retry.lua");
script!(PROMOTE_DUE, "promote_due.lua");
script!(REAP_EXPIRED, "reap_expired.lua");
script!(TRIM, "trim.lua");
script!(STATS, "stats.lua");

/// Most levels of priority a claim looks at.
const MAX_PRIORITY_LEVELS: usize = 64;

fn corrupt(what: &str, v: &Value) -> Error {
    Error::Corrupt(format!("unexpected {what} reply: {v:?}"))
}

fn array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(corrupt(what, &other)),
    }
}

fn int(v: &Value, what: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(corrupt(what, other)),
    }
}

fn task_id(v: &Value, what: &str) -> Result<TaskId> {
    match v {
        Value::BulkString(b) => TaskId::from_slice(b).ok_or_else(|| corrupt(what, v)),
        other => Err(corrupt(what, other)),
    }
}

/// Reads a flat reply of (code, value) pairs.
fn pairs(v: Value, what: &str) -> Result<Vec<(i64, Value)>> {
    let flat = array(v, what)?;
    if flat.len() % 2 != 0 {
        return Err(Error::Corrupt(format!("odd-length {what} reply")));
    }
    let mut it = flat.into_iter();
    let mut out = Vec::with_capacity(it.len() / 2);
    while let (Some(code), Some(second)) = (it.next(), it.next()) {
        out.push((int(&code, what)?, second));
    }
    Ok(out)
}

fn state(code: i64, what: &str) -> Result<TaskState> {
    u8::try_from(code)
        .ok()
        .and_then(TaskState::from_code)
        .ok_or_else(|| Error::Corrupt(format!("{what}: unknown state code {code}")))
}

/// A settle not applied, from the task's state code (0: no such task).
fn rejected(code: i64, what: &str) -> Result<Settled> {
    Ok(Settled::Rejected(if code == 0 { None } else { Some(state(code, what)?) }))
}

fn settled(v: Value, what: &str) -> Result<Vec<Settled>> {
    pairs(v, what)?
        .into_iter()
        .map(|(applied, st)| {
            let code = int(&st, what)?;
            match applied {
                1 => Ok(Settled::Applied(state(code, what)?)),
                _ => rejected(code, what),
            }
        })
        .collect()
}

/// A script call, built straight into one `EVALSHA` command. redis-rs's `ScriptInvocation`
/// keeps each argument in a `Vec` of its own and copies them all into a command when it runs:
/// with four arguments per completed task, that was four allocations and two copies per task.
/// The keys come first, all at once, as `EVALSHA` counts them before the arguments.
struct Invocation<'a> {
    script: &'a Script,
    cmd: Cmd,
}

impl<'a> Invocation<'a> {
    fn new<K: AsRef<str>>(script: &'a Script, keys: &[K]) -> Self {
        Self::with_capacity(script, keys, 0, 0)
    }

    /// Room for `args` more arguments of `bytes` in all, for a call whose size is known: a
    /// command grown an argument at a time copies itself over and over.
    fn with_capacity<K: AsRef<str>>(
        script: &'a Script,
        keys: &[K],
        args: usize,
        bytes: usize,
    ) -> Self {
        let key_bytes: usize = keys.iter().map(|k| k.as_ref().len()).sum();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args, 64 + key_bytes + bytes);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(k.as_ref());
        }
        Self { script, cmd }
    }

    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }
}

/// Runs a script call; a server that does not know the script (restarted, flushed) is sent it
/// once and asked again.
async fn run<C: ConnectionLike>(inv: &Invocation<'_>, conn: &mut C) -> Result<Value> {
    match inv.cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            inv.script.load_async(conn).await?;
            Ok(inv.cmd.query_async(conn).await?)
        }
        other => Ok(other?),
    }
}

pub(super) async fn enqueue<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    tasks: &[EncodedTask<'_>],
) -> Result<Vec<Enqueued>> {
    // every key before the arguments: the idempotency keys, in the order of their tasks
    let idempotency: Vec<String> = tasks
        .iter()
        .filter_map(|t| t.task.idempotency_key.as_ref())
        .map(|key| k.idempotency(key))
        .collect();
    let mut keys = vec![&k.tasks, &k.ready, &k.prios, &k.scheduled, &k.events];
    keys.extend(&idempotency);
    let mut inv = Invocation::new(&ENQUEUE, &keys);
    inv.arg(cfg.events_max).arg(cfg.idempotency_ttl_ms).arg(tasks.len());
    let mut next_key = 6;
    for t in tasks {
        let key_index = if t.task.idempotency_key.is_some() {
            next_key += 1;
            next_key - 1
        } else {
            0
        };
        inv.arg(t.id.as_bytes().as_slice())
            .arg(t.priority)
            .arg(t.max_attempts)
            .arg(flags(t.task.idempotent))
            .arg(t.delay_ms)
            .arg(key_index)
            .arg(t.spec.as_slice());
    }
    pairs(run(&inv, conn).await?, "enqueue")?
        .into_iter()
        .map(|(code, id)| {
            let id = task_id(&id, "enqueue")?;
            Ok(match code {
                0 => Enqueued::Created(id),
                1 => Enqueued::Existing(id),
                _ => Enqueued::Conflict(id),
            })
        })
        .collect()
}

/// A claimed batch: store time, lease deadline, and (id, record) per task.
pub(super) struct ClaimReply {
    pub(super) deadline_ms: u64,
    pub(super) tasks: Vec<(TaskId, Vec<u8>)>,
}

pub(super) async fn claim<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    max: usize,
    lease: Duration,
) -> Result<ClaimReply> {
    let mut inv =
        Invocation::new(&CLAIM, &[&k.tasks, &k.ready, &k.prios, &k.leases, &k.events, &k.meta]);
    inv.arg(cfg.events_max).arg(max).arg(millis(lease)).arg(cfg.aging_ms).arg(MAX_PRIORITY_LEVELS);
    let reply = array(run(&inv, conn).await?, "claim")?;
    if reply.is_empty() {
        return Ok(ClaimReply { deadline_ms: 0, tasks: Vec::new() });
    }
    let deadline_ms = reply.get(1).map(|v| int(v, "claim")).transpose()?.unwrap_or(0) as u64;
    let mut it = reply.into_iter().skip(2);
    let ids = match it.next() {
        Some(Value::BulkString(ids)) if ids.len() == 16 * it.len() => ids,
        other => return Err(corrupt("claim", &other.unwrap_or(Value::Nil))),
    };
    let mut tasks = Vec::with_capacity(it.len());
    for (id, rec) in ids.chunks_exact(16).zip(it) {
        // 16 bytes each (chunks_exact), which is always a valid id
        let id = TaskId::from_slice(id).ok_or_else(|| Error::Corrupt("claim: bad id".into()))?;
        match rec {
            Value::BulkString(b) => tasks.push((id, b)),
            other => return Err(corrupt("claim", &other)),
        }
    }
    Ok(ClaimReply { deadline_ms, tasks })
}

pub(super) async fn renew<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    leases: &[(TaskId, ClaimToken)],
    lease: Duration,
) -> Result<Vec<bool>> {
    let mut inv = Invocation::new(&RENEW, &[&k.tasks, &k.leases]);
    inv.arg(millis(lease)).arg(leases.len());
    for (id, token) in leases {
        inv.arg(id.as_bytes().as_slice()).arg(token.0);
    }
    let reply = array(run(&inv, conn).await?, "renew")?;
    reply.iter().skip(1).map(|v| Ok(int(v, "renew")? == 1)).collect()
}

pub(super) async fn complete<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    items: &[Completion],
) -> Result<Vec<Settled>> {
    let keys = [&k.tasks, &k.leases, &k.succeeded, &k.events];
    // per item: id, token, server and a result, which for most calls is well under 128 bytes
    let bytes: usize = items.iter().map(|c| 16 + 10 + c.server.len() + 128).sum();
    let mut inv = Invocation::with_capacity(&COMPLETE, &keys, 2 + 4 * items.len(), bytes);
    inv.arg(cfg.events_max).arg(items.len());
    // one buffer for every result: most are small, and each would otherwise grow its own
    let mut result = Vec::with_capacity(256);
    for c in items {
        result.clear();
        c.encode_result(&mut result)?;
        inv.arg(c.id.as_bytes().as_slice()).arg(c.token.0).arg(&c.server).arg(&result[..]);
    }
    // the reply names only the items not applied
    let mut out = vec![Settled::Applied(TaskState::Succeeded); items.len()];
    for (i, st) in pairs(run(&inv, conn).await?, "complete")? {
        let code = int(&st, "complete")?;
        let slot = usize::try_from(i).ok().and_then(|i| out.get_mut(i));
        let Some(slot) = slot else {
            return Err(Error::Corrupt(format!(
                "complete: no item {i} in a batch of {}",
                items.len()
            )));
        };
        *slot = rejected(code, "complete")?;
    }
    Ok(out)
}

pub(super) async fn fail<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    items: &[Failure],
) -> Result<Vec<Settled>> {
    let mut inv = Invocation::new(
        &FAIL,
        &[
            &k.tasks,
            &k.leases,
            &k.ready,
            &k.prios,
            &k.scheduled,
            &k.failed,
            &k.dead,
            &k.review,
            &k.events,
        ],
    );
    inv.arg(cfg.events_max).arg(items.len());
    for f in items {
        let (disposition, delay) = match f.disposition {
            Disposition::Retry { delay } => ("retry", millis(delay)),
            Disposition::Fatal => ("fatal", 0),
            Disposition::Review => ("review", 0),
        };
        inv.arg(f.id.as_bytes().as_slice()).arg(f.token.0).arg(&f.server).arg(&f.error);
        inv.arg(disposition).arg(delay);
    }
    settled(run(&inv, conn).await?, "fail")
}

pub(super) async fn release<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    items: &[Release],
) -> Result<Vec<Settled>> {
    let mut inv = Invocation::new(
        &RELEASE,
        &[&k.tasks, &k.leases, &k.ready, &k.prios, &k.scheduled, &k.events],
    );
    inv.arg(cfg.events_max).arg(items.len());
    for r in items {
        inv.arg(r.id.as_bytes().as_slice()).arg(r.token.0).arg(millis(r.delay)).arg(&r.reason);
    }
    settled(run(&inv, conn).await?, "release")
}

/// `(code, state)`: code 1 done, 0 refused in `state`, -1 no such task.
pub(super) async fn cancel<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    id: TaskId,
) -> Result<(i64, Option<TaskState>)> {
    let mut inv = Invocation::new(
        &CANCEL,
        &[
            &k.tasks,
            &k.ready,
            &k.prios,
            &k.scheduled,
            &k.leases,
            &k.review,
            &k.cancelled,
            &k.events,
        ],
    );
    inv.arg(cfg.events_max).arg(id.as_bytes().as_slice());
    one_pair(run(&inv, conn).await?, "cancel")
}

/// `(code, state)`: code 1 done, 0 refused in `state`, -1 no such task.
pub(super) async fn retry<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    id: TaskId,
) -> Result<(i64, Option<TaskState>)> {
    let mut inv = Invocation::new(
        &RETRY,
        &[&k.tasks, &k.ready, &k.prios, &k.review, &k.dead, &k.failed, &k.cancelled, &k.events],
    );
    inv.arg(cfg.events_max).arg(id.as_bytes().as_slice());
    one_pair(run(&inv, conn).await?, "retry")
}

fn one_pair(v: Value, what: &str) -> Result<(i64, Option<TaskState>)> {
    let p = array(v, what)?;
    match p.as_slice() {
        [code, st] => {
            let code = int(code, what)?;
            let st = int(st, what)?;
            Ok((code, if st == 0 { None } else { Some(state(st, what)?) }))
        }
        _ => Err(Error::Corrupt(format!("short {what} reply"))),
    }
}

pub(super) async fn promote_due<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    max: usize,
) -> Result<u64> {
    let mut inv =
        Invocation::new(&PROMOTE_DUE, &[&k.tasks, &k.ready, &k.prios, &k.scheduled, &k.events]);
    inv.arg(cfg.events_max).arg(max);
    Ok(int(&run(&inv, conn).await?, "promote_due")? as u64)
}

pub(super) async fn reap_expired<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
    max: usize,
) -> Result<u64> {
    let mut inv = Invocation::new(
        &REAP_EXPIRED,
        &[&k.tasks, &k.leases, &k.ready, &k.prios, &k.dead, &k.review, &k.events],
    );
    inv.arg(cfg.events_max).arg(max);
    Ok(int(&run(&inv, conn).await?, "reap_expired")? as u64)
}

/// Most finished tasks one trim call forgets per state.
const TRIM_BATCH: usize = 1000;

pub(super) async fn trim<C: ConnectionLike>(
    conn: &mut C,
    k: &Keys,
    cfg: &QueueConfig,
) -> Result<u64> {
    let mut inv =
        Invocation::new(&TRIM, &[&k.tasks, &k.succeeded, &k.failed, &k.cancelled, &k.dead]);
    inv.arg(cfg.keep_finished).arg(cfg.finished_ttl_ms).arg(TRIM_BATCH);
    Ok(int(&run(&inv, conn).await?, "trim")? as u64)
}

pub(super) async fn stats<C: ConnectionLike>(conn: &mut C, k: &Keys) -> Result<QueueStats> {
    let inv = Invocation::new(
        &STATS,
        &[
            &k.ready,
            &k.prios,
            &k.scheduled,
            &k.leases,
            &k.review,
            &k.succeeded,
            &k.failed,
            &k.dead,
            &k.cancelled,
            &k.meta,
        ],
    );
    let v = array(run(&inv, conn).await?, "stats")?;
    let n: Vec<u64> = v.iter().map(|x| int(x, "stats").map(|i| i as u64)).collect::<Result<_>>()?;
    match n.as_slice() {
        &[queued, scheduled, running, review, succeeded, failed, dead, cancelled, paused] => {
            Ok(QueueStats {
                queued,
                scheduled,
                running,
                review,
                succeeded,
                failed,
                dead,
                cancelled,
                paused: paused == 1,
            })
        }
        _ => Err(Error::Corrupt("short stats reply".into())),
    }
}
