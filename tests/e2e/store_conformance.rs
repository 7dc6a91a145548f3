//! Store conformance: the behaviours every backend must show, written once and run against
//! each backend: a real redis-server per test, and an embedded store in a temporary directory.

use std::time::Duration;

use anyhow::{Result, ensure};
use mcpq_queue::{
    CancelOutcome, Claimed, Completion, Disposition, EmbeddedStore, Enqueued, Error, EventKind,
    Failure, NewTask, Queue, QueueConfig, QueueConfigs, QueueName, RedisStore, Release, Settled,
    StartAt, Store, StoreConfig, TaskId, TaskState,
};
use mcpq_tests::{RedisServer, eventually};
use serde_json::json;

/// A store under test and what keeps it alive (declared after the store, so it goes last).
pub(crate) struct Harness<S, K> {
    pub(crate) store: S,
    pub(crate) _keep: K,
}

/// A backend the suite runs against.
pub(crate) trait Backend {
    type S: Store;
    /// What the store needs kept alive: its server, its directory.
    type K;
    async fn open(queues: &[(&str, QueueConfig)]) -> Result<Harness<Self::S, Self::K>>;
}

pub(crate) struct Redis;

impl Backend for Redis {
    type S = RedisStore;
    type K = RedisServer;
    async fn open(queues: &[(&str, QueueConfig)]) -> Result<Harness<RedisStore, RedisServer>> {
        let server = RedisServer::start()?;
        let store = server.store(queues).await?;
        Ok(Harness { store, _keep: server })
    }
}

/// The embedded store with `store.sync_ms = SYNC_MS` (0: each commit synced before its answer).
pub(crate) struct Embedded<const SYNC_MS: u64 = 0>;

impl<const SYNC_MS: u64> Backend for Embedded<SYNC_MS> {
    type S = EmbeddedStore;
    type K = tempfile::TempDir;
    async fn open(
        queues: &[(&str, QueueConfig)],
    ) -> Result<Harness<EmbeddedStore, tempfile::TempDir>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store");
        let cfg = StoreConfig { path, sync_ms: SYNC_MS, ..Default::default() };
        let named = queues
            .iter()
            .map(|(n, c)| Ok((QueueName::new(*n)?, c.clone())))
            .collect::<Result<_>>()?;
        let store = EmbeddedStore::open(&cfg, QueueConfigs::new(named))?;
        Ok(Harness { store, _keep: dir })
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name::<super::Redis>().await
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name::<super::Embedded>().await
                }
            )*
        }
        mod embedded_lazy {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    // commits answered before their sync
                    super::$name::<super::Embedded<1000>>().await
                }
            )*
        }
    };
}

conformance!(
    tasks_without_their_own_attempts_take_their_queues,
    claim_orders_by_priority_then_fifo,
    aging_lets_old_low_priority_tasks_overtake,
    delayed_tasks_wait_for_their_time,
    failed_attempts_retry_with_backoff_then_die,
    fatal_failures_and_review_are_final_until_retried,
    cancel_works_in_every_unfinished_state_and_refuses_finished_ones,
    retry_requeues_from_review_dead_failed_and_cancelled_only,
    expired_leases_are_reaped_by_idempotency,
    stale_tokens_cannot_settle_renew_or_publish,
    renew_moves_the_lease_deadline,
    release_returns_tasks_to_the_head_without_spending_an_attempt,
    idempotency_keys_deduplicate_and_detect_conflicts,
    batch_claim_takes_each_task_once,
    pause_stops_claims_until_resume,
    a_waiting_claim_takes_what_is_ready_and_waits_only_in_a_store_that_can,
    retention_trims_finished_tasks_by_count_and_age,
    events_record_each_transition_in_order_and_resume_from_an_id,
    subscribe_streams_events_and_resumes,
    stats_and_list_follow_each_state,
    wait_returns_terminal_tasks_and_times_out_otherwise,
    event_stream_is_trimmed_to_its_retention,
    reading_events_one_at_a_time_walks_every_event,
);

fn q() -> QueueName {
    QueueName::default()
}

fn tool(n: u64) -> NewTask {
    NewTask::tool("echo", json!({ "n": n }))
}

fn n_of(c: &Claimed) -> u64 {
    match &c.task.call {
        mcpq_queue::Call::Tool { arguments, .. } => arguments["n"].as_u64().unwrap_or(u64::MAX),
        _ => u64::MAX,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const LIMIT: Duration = Duration::from_secs(10);

async fn enqueue<S: Store>(s: &S, tasks: &[NewTask]) -> Result<Vec<TaskId>> {
    let out = s.enqueue(&q(), tasks).await?;
    ensure!(out.iter().all(|e| matches!(e, Enqueued::Created(_))), "not all created: {out:?}");
    Ok(out.into_iter().map(Enqueued::id).collect())
}

async fn claim_one<S: Store>(s: &S, lease: Duration) -> Result<Claimed> {
    let mut c = s.claim(&q(), 1, lease).await?;
    ensure!(c.len() == 1, "expected one claimed task, got {}", c.len());
    Ok(c.remove(0))
}

/// The success of a claimed task, as a dispatcher records it.
pub(crate) fn done(c: &Claimed) -> Completion {
    Completion { id: c.task.id, token: c.token, server: "s1".into(), result: json!({"ok": 1}) }
}

fn failure(c: &Claimed, disposition: Disposition) -> Failure {
    Failure {
        id: c.task.id,
        token: c.token,
        server: "s1".into(),
        error: "boom".into(),
        disposition,
    }
}

async fn state<S: Store>(s: &S, id: TaskId) -> Result<TaskState> {
    Ok(s.get(&q(), id).await?.ok_or_else(|| anyhow::anyhow!("task {id} missing"))?.state)
}

async fn events<S: Store>(s: &S) -> Result<Vec<(EventKind, Option<TaskId>)>> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let batch = s.read_events(&q(), after, 100, None).await?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        all.extend(batch.into_iter().map(|e| (e.kind, e.task)));
    }
    Ok(all)
}

async fn claim_orders_by_priority_then_fifo<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let prios = [0, 5, -3, 5, 0, 10, -3, 5];
    let tasks: Vec<_> =
        prios.iter().enumerate().map(|(i, p)| tool(i as u64).priority(*p)).collect();
    enqueue(s, &tasks).await?;
    let claimed = s.claim(&q(), 100, HOUR).await?;
    let order: Vec<u64> = claimed.iter().map(n_of).collect();
    // priority 10, then the 5s in enqueue order, then 0s, then -3s
    assert_eq!(order, vec![5, 1, 3, 7, 0, 4, 2, 6]);
    assert!(claimed.iter().all(|c| c.task.state == TaskState::Running && c.task.attempt == 1));
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty());
    Ok(())
}

/// A fresh id whose creation time is `ago` before now, so aging has something to weigh.
pub(crate) fn id_created_ago(ago: Duration) -> TaskId {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let then = now - ago;
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, then.as_secs(), then.subsec_nanos());
    TaskId::from_slice(uuid::Uuid::new_v7(ts).as_bytes()).expect("16 bytes")
}

async fn aging_lets_old_low_priority_tasks_overtake<B: Backend>() -> Result<()> {
    let aged = QueueConfig { aging_ms: 1000, ..Default::default() };
    let h = B::open(&[("aged", aged)]).await?;
    let s = &h.store;
    let mk = || {
        let mut old = tool(1).priority(0);
        old.id = id_created_ago(Duration::from_secs(60));
        vec![old, tool(2).priority(10)]
    };
    // strict priority: the new high-priority task first
    s.enqueue(&q(), &mk()).await?;
    let strict: Vec<u64> = s.claim(&q(), 2, HOUR).await?.iter().map(n_of).collect();
    assert_eq!(strict, vec![2, 1]);
    // aging 1 s per step: waiting 60 s outweighs 10 priority steps
    let aged_q = QueueName::new("aged")?;
    s.enqueue(&aged_q, &mk()).await?;
    let aged: Vec<u64> = s.claim(&aged_q, 2, HOUR).await?.iter().map(n_of).collect();
    assert_eq!(aged, vec![1, 2]);
    Ok(())
}

async fn delayed_tasks_wait_for_their_time<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [late, soon] =
        enqueue(s, &[tool(1).delay(HOUR), tool(2).delay(Duration::from_millis(30))]).await?[..]
    else {
        unreachable!()
    };
    assert_eq!(state(s, late).await?, TaskState::Scheduled);
    assert_eq!(state(s, soon).await?, TaskState::Scheduled);
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty(), "scheduled tasks are not claimable");
    eventually(LIMIT, "the 30 ms task becomes due", || async {
        Ok((s.promote_due(&q(), 10).await? == 1).then_some(()))
    })
    .await?;
    let c = claim_one(s, HOUR).await?;
    assert_eq!(c.task.id, soon);
    assert_eq!(state(s, late).await?, TaskState::Scheduled);
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty());
    Ok(())
}

async fn tasks_without_their_own_attempts_take_their_queues<B: Backend>() -> Result<()> {
    let two = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
    let h = B::open(&[("default", two)]).await?;
    let s = &h.store;
    let own = tool(1).max_attempts(7);
    let [_, id] = enqueue(s, &[own, tool(2)]).await?[..] else { unreachable!() };
    let mut seen = Vec::new();
    for c in s.claim(&q(), 2, HOUR).await? {
        seen.push((n_of(&c), c.task.max_attempts));
    }
    seen.sort_unstable();
    assert_eq!(seen, [(1, 7), (2, 2)], "a task's own attempts win; others take the queue's");
    let t = s.get(&q(), id).await?.expect("kept");
    assert_eq!(t.max_attempts, 2);
    Ok(())
}

async fn failed_attempts_retry_with_backoff_then_die<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [id] = enqueue(s, &[tool(1).max_attempts(3)]).await?[..] else { unreachable!() };
    // attempt 1 fails with no backoff: straight back to the queue
    let c = claim_one(s, HOUR).await?;
    assert_eq!(c.task.attempt, 1);
    let r = s.fail(&q(), &[failure(&c, Disposition::Retry { delay: Duration::ZERO })]).await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Queued)]);
    // attempt 2 fails with a backoff: scheduled until due
    let c = claim_one(s, HOUR).await?;
    assert_eq!(c.task.attempt, 2);
    assert_eq!(c.task.error.as_deref(), Some("boom"), "the last error is kept");
    let r = s
        .fail(&q(), &[failure(&c, Disposition::Retry { delay: Duration::from_millis(20) })])
        .await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Scheduled)]);
    assert!(s.claim(&q(), 1, HOUR).await?.is_empty());
    eventually(LIMIT, "backoff elapses", || async {
        Ok((s.promote_due(&q(), 10).await? == 1).then_some(()))
    })
    .await?;
    // attempt 3, the last, fails: dead
    let c = claim_one(s, HOUR).await?;
    assert_eq!(c.task.attempt, 3);
    let r = s.fail(&q(), &[failure(&c, Disposition::Retry { delay: Duration::ZERO })]).await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Dead)]);
    let t = s.get(&q(), id).await?.expect("kept");
    assert_eq!((t.state, t.attempt, t.error.as_deref()), (TaskState::Dead, 3, Some("boom")));
    assert!(t.finished_at_ms.is_some());
    let kinds: Vec<EventKind> = events(s).await?.into_iter().map(|e| e.0).collect();
    use EventKind::*;
    assert_eq!(
        kinds,
        vec![
            TaskEnqueued,
            TaskStarted,
            TaskRetrying,
            TaskStarted,
            TaskRetrying,
            TaskPromoted,
            TaskStarted,
            TaskDead
        ]
    );
    Ok(())
}

async fn fatal_failures_and_review_are_final_until_retried<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [a, b] = enqueue(s, &[tool(1), tool(2)]).await?[..] else { unreachable!() };
    let ca = claim_one(s, HOUR).await?;
    let cb = claim_one(s, HOUR).await?;
    let r = s
        .fail(&q(), &[failure(&ca, Disposition::Fatal), failure(&cb, Disposition::Review)])
        .await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Failed), Settled::Applied(TaskState::Review)]);
    assert_eq!(state(s, a).await?, TaskState::Failed);
    assert_eq!(state(s, b).await?, TaskState::Review);
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty());
    let st = s.stats(&q()).await?;
    assert_eq!((st.failed, st.review, st.running, st.queued), (1, 1, 0, 0));
    Ok(())
}

/// Puts one task in each state; answers them with their states.
async fn one_in_each_state<S: Store>(s: &S) -> Result<Vec<(TaskId, TaskState)>> {
    let ids = enqueue(
        s,
        &[
            tool(0).priority(9),                 // running
            tool(1).priority(8),                 // succeeded
            tool(2).priority(7),                 // failed
            tool(3).priority(6).max_attempts(1), // dead
            tool(4).priority(5),                 // review
            tool(5).priority(4),                 // cancelled
            tool(6),                             // queued
            tool(7).delay(HOUR),                 // scheduled
        ],
    )
    .await?;
    let c = s.claim(&q(), 5, HOUR).await?;
    assert_eq!(c.len(), 5);
    s.complete(&q(), &[done(&c[1])]).await?;
    s.fail(
        &q(),
        &[
            failure(&c[2], Disposition::Fatal),
            failure(&c[3], Disposition::Retry { delay: Duration::ZERO }),
            failure(&c[4], Disposition::Review),
        ],
    )
    .await?;
    s.cancel(&q(), ids[5]).await?;
    use TaskState::*;
    let expect = [Running, Succeeded, Failed, Dead, Review, Cancelled, Queued, Scheduled];
    let out: Vec<_> = ids.into_iter().zip(expect).collect();
    for (id, st) in &out {
        assert_eq!(state(s, *id).await?, *st, "setup of {st}");
    }
    Ok(out)
}

async fn cancel_works_in_every_unfinished_state_and_refuses_finished_ones<B: Backend>() -> Result<()>
{
    let h = B::open(&[]).await?;
    let s = &h.store;
    let tasks = one_in_each_state(s).await?;
    let running = s.list(&q(), TaskState::Running, 0, 10).await?.tasks;
    assert_eq!(running.len(), 1);
    for (id, st) in &tasks {
        let out = s.cancel(&q(), *id).await?;
        match st {
            TaskState::Queued | TaskState::Scheduled | TaskState::Running | TaskState::Review => {
                assert_eq!(out, CancelOutcome::Cancelled { was: *st });
                assert_eq!(state(s, *id).await?, TaskState::Cancelled);
            }
            _ => assert_eq!(out, CancelOutcome::AlreadyFinished(*st)),
        }
    }
    let st = s.stats(&q()).await?;
    assert_eq!((st.queued, st.scheduled, st.running, st.review, st.cancelled), (0, 0, 0, 0, 5));
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty(), "cancelled tasks are not claimable");
    assert!(matches!(s.cancel(&q(), TaskId::new()).await, Err(Error::NotFound(_))));
    Ok(())
}

async fn retry_requeues_from_review_dead_failed_and_cancelled_only<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let tasks = one_in_each_state(s).await?;
    let mut requeued = Vec::new();
    for (id, st) in &tasks {
        match s.retry(&q(), *id).await {
            Ok(was) => {
                assert!(matches!(
                    st,
                    TaskState::Review | TaskState::Dead | TaskState::Failed | TaskState::Cancelled
                ));
                assert_eq!(was, *st);
                let t = s.get(&q(), *id).await?.expect("kept");
                assert_eq!((t.state, t.attempt), (TaskState::Queued, 0));
                requeued.push(*id);
            }
            Err(Error::InvalidState { state }) => {
                assert!(matches!(
                    st,
                    TaskState::Queued
                        | TaskState::Scheduled
                        | TaskState::Running
                        | TaskState::Succeeded
                ));
                assert_eq!(state, *st);
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(requeued.len(), 4);
    // the queued one from setup plus the four retried ones
    let claimed = s.claim(&q(), 10, HOUR).await?;
    assert_eq!(claimed.len(), 5);
    assert!(matches!(s.retry(&q(), TaskId::new()).await, Err(Error::NotFound(_))));
    Ok(())
}

async fn expired_leases_are_reaped_by_idempotency<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [safe, unsafe_, spent] = enqueue(
        s,
        &[
            tool(1).priority(3).idempotent(true),
            tool(2).priority(2),
            tool(3).priority(1).idempotent(true).max_attempts(1),
        ],
    )
    .await?[..] else {
        unreachable!()
    };
    let claimed = s.claim(&q(), 3, Duration::from_millis(1)).await?;
    assert_eq!(claimed.len(), 3);
    eventually(LIMIT, "leases expire", || async {
        s.reap_expired(&q(), 100).await?;
        Ok((s.stats(&q()).await?.running == 0).then_some(()))
    })
    .await?;
    let t = s.get(&q(), safe).await?.expect("kept");
    assert_eq!((t.state, t.error.as_deref()), (TaskState::Queued, Some("lease expired")));
    assert_eq!(state(s, unsafe_).await?, TaskState::Review);
    assert_eq!(state(s, spent).await?, TaskState::Dead);
    assert_eq!(s.reap_expired(&q(), 100).await?, 0);
    let again = claim_one(s, HOUR).await?;
    assert_eq!((again.task.id, again.task.attempt), (safe, 2));
    Ok(())
}

async fn stale_tokens_cannot_settle_renew_or_publish<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [id] = enqueue(s, &[tool(1).idempotent(true)]).await?[..] else { unreachable!() };
    let stale = claim_one(s, Duration::from_millis(1)).await?;
    eventually(LIMIT, "lease expires", || async {
        Ok((s.reap_expired(&q(), 10).await? == 1).then_some(()))
    })
    .await?;
    let fresh = claim_one(s, HOUR).await?;
    assert_ne!(stale.token, fresh.token);
    let before = s.last_event_id(&q()).await?;
    let rejected = Settled::Rejected(Some(TaskState::Running));
    assert_eq!(s.complete(&q(), &[done(&stale)]).await?, vec![rejected]);
    assert_eq!(s.fail(&q(), &[failure(&stale, Disposition::Fatal)]).await?, vec![rejected]);
    let rel = Release { id, token: stale.token, delay: Duration::ZERO, reason: "x".into() };
    assert_eq!(s.release(&q(), &[rel]).await?, vec![rejected]);
    assert_eq!(s.renew(&q(), &[(id, stale.token)], HOUR).await?, vec![false]);
    assert_eq!(s.renew(&q(), &[(id, fresh.token)], HOUR).await?, vec![true]);
    assert_eq!(s.last_event_id(&q()).await?, before, "a stale token published an event");
    assert_eq!(state(s, id).await?, TaskState::Running);
    // the current holder settles, once even when a batch names the task twice; afterwards its
    // own token is spent too
    assert_eq!(
        s.complete(&q(), &[done(&fresh), done(&fresh)]).await?,
        vec![Settled::Applied(TaskState::Succeeded), Settled::Rejected(Some(TaskState::Succeeded))]
    );
    assert_eq!(
        s.complete(&q(), &[done(&fresh)]).await?,
        vec![Settled::Rejected(Some(TaskState::Succeeded))]
    );
    let published: Vec<_> = s.read_events(&q(), before, 10, None).await?;
    assert_eq!(
        published.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::TaskSucceeded]
    );
    let t = s.get(&q(), id).await?.expect("kept");
    assert_eq!((t.server.as_deref(), t.result), (Some("s1"), Some(json!({"ok": 1}))));
    let unknown = Completion { id: TaskId::new(), ..done(&fresh) };
    assert_eq!(s.complete(&q(), &[unknown]).await?, vec![Settled::Rejected(None)]);
    Ok(())
}

async fn renew_moves_the_lease_deadline<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    enqueue(s, &[tool(1).idempotent(true), tool(2).idempotent(true)]).await?;
    let c = s.claim(&q(), 2, Duration::from_millis(1)).await?;
    // renewing the first for an hour keeps it; the second's 1 ms lease runs out
    assert_eq!(s.renew(&q(), &[(c[0].task.id, c[0].token)], HOUR).await?, vec![true]);
    eventually(LIMIT, "the unrenewed lease expires", || async {
        Ok((s.reap_expired(&q(), 10).await? == 1).then_some(()))
    })
    .await?;
    assert_eq!(state(s, c[0].task.id).await?, TaskState::Running);
    assert_eq!(state(s, c[1].task.id).await?, TaskState::Queued);
    // and shortening works too: the store's clock decides
    assert_eq!(
        s.renew(&q(), &[(c[0].task.id, c[0].token)], Duration::from_millis(1)).await?,
        vec![true]
    );
    eventually(LIMIT, "the shortened lease expires", || async {
        Ok((s.reap_expired(&q(), 10).await? == 1).then_some(()))
    })
    .await?;
    assert_eq!(s.renew(&q(), &[(c[1].task.id, c[1].token)], HOUR).await?, vec![false]);
    Ok(())
}

async fn release_returns_tasks_to_the_head_without_spending_an_attempt<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    enqueue(s, &[tool(1), tool(2), tool(3), tool(4)]).await?;
    let c = s.claim(&q(), 2, HOUR).await?;
    let rel = |c: &Claimed, delay| Release {
        id: c.task.id,
        token: c.token,
        delay,
        reason: "server offline".into(),
    };
    let r = s.release(&q(), &[rel(&c[0], Duration::ZERO), rel(&c[1], Duration::ZERO)]).await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Queued); 2]);
    let again = s.claim(&q(), 4, HOUR).await?;
    assert_eq!(
        again.iter().map(n_of).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "released tasks first, in order"
    );
    assert_eq!(again[0].task.attempt, 1, "a release does not spend an attempt");
    assert_eq!(again[0].task.error.as_deref(), Some("server offline"));
    let r = s.release(&q(), &[rel(&again[0], HOUR)]).await?;
    assert_eq!(r, vec![Settled::Applied(TaskState::Scheduled)]);
    Ok(())
}

async fn idempotency_keys_deduplicate_and_detect_conflicts<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let first = tool(1).idempotency_key("order-42");
    let out = s.enqueue(&q(), std::slice::from_ref(&first)).await?;
    let Enqueued::Created(id) = out[0] else { panic!("{out:?}") };
    // same key, same body, new id: the first task
    let same = NewTask { id: TaskId::new(), ..first.clone() };
    assert_eq!(s.enqueue(&q(), &[same]).await?, vec![Enqueued::Existing(id)]);
    // same key, different body: conflict, nothing stored
    let other = tool(2).idempotency_key("order-42");
    assert_eq!(s.enqueue(&q(), std::slice::from_ref(&other)).await?, vec![Enqueued::Conflict(id)]);
    assert!(s.get(&q(), other.id).await?.is_none());
    // the same id again (a producer retrying after a lost reply): not a second task
    assert_eq!(s.enqueue(&q(), std::slice::from_ref(&first)).await?, vec![Enqueued::Existing(id)]);
    // twice in one batch
    let dup = tool(3);
    let out = s.enqueue(&q(), &[dup.clone(), dup.clone()]).await?;
    assert_eq!(out, vec![Enqueued::Created(dup.id), Enqueued::Existing(dup.id)]);
    // the producer handle maps a conflict to an error naming the holder
    let queue = Queue::new(s.clone(), q());
    match queue.enqueue(tool(9).idempotency_key("order-42")).await {
        Err(Error::Conflict { existing }) => assert_eq!(existing, id),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(queue.stats().await?.queued, 2);
    Ok(())
}

async fn batch_claim_takes_each_task_once<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let tasks: Vec<_> = (0..25).map(|i| tool(i).priority((i % 3) as i32)).collect();
    enqueue(s, &tasks).await?;
    let mut seen = std::collections::HashSet::new();
    let mut sizes = Vec::new();
    for _ in 0..4 {
        let batch = s.claim(&q(), 10, HOUR).await?;
        sizes.push(batch.len());
        for c in batch {
            assert!(seen.insert(c.task.id), "claimed twice");
        }
    }
    assert_eq!(sizes, vec![10, 10, 5, 0]);
    assert_eq!(s.stats(&q()).await?.running, 25);
    Ok(())
}

async fn pause_stops_claims_until_resume<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    enqueue(s, &[tool(1)]).await?;
    s.set_paused(&q(), true).await?;
    assert!(s.stats(&q()).await?.paused);
    assert!(s.claim(&q(), 10, HOUR).await?.is_empty());
    s.set_paused(&q(), false).await?;
    assert!(!s.stats(&q()).await?.paused);
    assert_eq!(s.claim(&q(), 10, HOUR).await?.len(), 1);
    Ok(())
}

/// A claim that waits up to `wait`, or until `cancel` fires; bounded by [`LIMIT`].
async fn claim_waiting<S: Store>(
    s: &S,
    max: usize,
    wait: Duration,
    cancel: impl std::future::Future<Output = ()> + Send,
) -> Result<Vec<Claimed>> {
    let queue = q();
    let claim = s.claim_waiting(&queue, max, HOUR, wait, cancel);
    Ok(tokio::time::timeout(LIMIT, claim).await??)
}

async fn a_waiting_claim_takes_what_is_ready_and_waits_only_in_a_store_that_can<B: Backend>()
-> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let never = std::future::pending::<()>;
    let ids = enqueue(s, &[tool(1), tool(2)]).await?;
    let first = claim_waiting(s, 1, HOUR, never()).await?;
    assert_eq!(first.iter().map(|c| c.task.id).collect::<Vec<_>>(), ids[..1], "at once, in order");
    assert_eq!(claim_one(s, HOUR).await?.task.id, ids[1]);
    if !s.waits_for_claims() {
        assert!(claim_waiting(s, 1, HOUR, never()).await?.is_empty(), "answered as claim does");
        return Ok(());
    }
    // an empty queue: the claim waits for what the next enqueue brings, all of it up to max
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { claim_waiting(&s, 5, HOUR, never()).await }
    });
    let brought = enqueue(s, &[tool(3), tool(4)]).await?;
    let took = waiting.await??;
    assert_eq!(took.iter().map(|c| c.task.id).collect::<Vec<_>>(), brought);
    for c in &took {
        assert_eq!(state(s, c.task.id).await?, TaskState::Running);
        s.complete(&q(), &[done(c)]).await?;
    }
    // nothing comes in time: answered with nothing
    assert!(claim_waiting(s, 1, Duration::from_millis(20), never()).await?.is_empty());
    // a paused queue: tasks that come wait for the resume, which the claim takes them with
    s.set_paused(&q(), true).await?;
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { claim_waiting(&s, 5, HOUR, never()).await }
    });
    let paused = enqueue(s, &[tool(5)]).await?;
    s.set_paused(&q(), false).await?;
    assert_eq!(waiting.await??.iter().map(|c| c.task.id).collect::<Vec<_>>(), paused);
    // cancelled: answered at once, and what comes after stays queued
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { claim_waiting(&s, 5, HOUR, async move { drop(cancelled.await) }).await }
    });
    drop(cancel);
    assert!(waiting.await??.is_empty());
    let later = enqueue(s, &[tool(6)]).await?;
    assert_eq!(state(s, later[0]).await?, TaskState::Queued);
    // the first two and the paused one, none taken by the cancelled claim
    assert_eq!(s.stats(&q()).await?.running, 3);
    Ok(())
}

async fn retention_trims_finished_tasks_by_count_and_age<B: Backend>() -> Result<()> {
    let by_count = QueueConfig { keep_finished: 3, finished_ttl_ms: 0, ..Default::default() };
    let by_age = QueueConfig { finished_ttl_ms: 1, ..Default::default() };
    let h = B::open(&[("default", by_count), ("aged", by_age)]).await?;
    let s = &h.store;
    let ids = enqueue(s, &(0..5).map(tool).collect::<Vec<_>>()).await?;
    for _ in 0..5 {
        let c = claim_one(s, HOUR).await?;
        s.complete(&q(), &[done(&c)]).await?;
    }
    assert_eq!(s.stats(&q()).await?.succeeded, 5);
    // finished tasks list newest first, page by page
    let mut listed = Vec::new();
    let mut cursor = Some(0);
    while let Some(c) = cursor {
        let page = s.list(&q(), TaskState::Succeeded, c, 2).await?;
        listed.extend(page.tasks.iter().map(|t| t.id));
        cursor = page.next_cursor.filter(|_| listed.len() < 10);
    }
    assert_eq!(listed, ids.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(s.trim(&q()).await?, 2);
    assert_eq!(s.stats(&q()).await?.succeeded, 3);
    assert!(s.get(&q(), ids[0]).await?.is_none() && s.get(&q(), ids[1]).await?.is_none());
    assert!(s.get(&q(), ids[4]).await?.is_some());
    // review is never trimmed; by age, everything finished goes
    let aged = QueueName::new("aged")?;
    s.enqueue(&aged, &[tool(1), tool(2)]).await?;
    let c = s.claim(&aged, 2, HOUR).await?;
    s.complete(&aged, &[done(&c[0])]).await?;
    s.fail(&aged, &[failure(&c[1], Disposition::Review)]).await?;
    eventually(LIMIT, "finished task ages out", || async {
        s.trim(&aged).await?;
        Ok((s.stats(&aged).await?.succeeded == 0).then_some(()))
    })
    .await?;
    let st = s.stats(&aged).await?;
    assert_eq!((st.succeeded, st.review), (0, 1));
    Ok(())
}

async fn events_record_each_transition_in_order_and_resume_from_an_id<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let [a, b] = enqueue(s, &[tool(1).priority(1), tool(2)]).await?[..] else { unreachable!() };
    let ca = claim_one(s, HOUR).await?;
    s.complete(&q(), &[done(&ca)]).await?;
    let cb = claim_one(s, HOUR).await?;
    s.release(
        &q(),
        &[Release { id: b, token: cb.token, delay: Duration::ZERO, reason: "r".into() }],
    )
    .await?;
    s.cancel(&q(), b).await?;
    s.retry(&q(), b).await?;
    use EventKind::*;
    let expect = vec![
        (TaskEnqueued, Some(a)),
        (TaskEnqueued, Some(b)),
        (TaskStarted, Some(a)),
        (TaskSucceeded, Some(a)),
        (TaskStarted, Some(b)),
        (TaskReleased, Some(b)),
        (TaskCancelled, Some(b)),
        (TaskRetried, Some(b)),
    ];
    assert_eq!(events(s).await?, expect);
    // details ride along
    let all = s.read_events(&q(), None, 100, None).await?;
    assert_eq!((all[3].attempt, all[3].server.as_deref()), (Some(1), Some("s1")));
    assert_eq!(all[5].error.as_deref(), Some("r"));
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    // resuming after the 4th event yields exactly the rest
    let rest = s.read_events(&q(), Some(all[3].id), 100, None).await?;
    assert_eq!(rest, all[4..].to_vec());
    // a blocking read after the last event waits, then sees the next one
    let last = all.last().map(|e| e.id);
    let waiter = {
        let s = s.clone();
        tokio::spawn(
            async move { s.read_events(&q(), last, 10, Some(Duration::from_secs(5))).await },
        )
    };
    let c = claim_one(s, HOUR).await?;
    let got = waiter.await??;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].kind, got[0].task), (TaskStarted, Some(c.task.id)));
    Ok(())
}

async fn subscribe_streams_events_and_resumes<B: Backend>() -> Result<()> {
    use futures_util::StreamExt;
    let h = B::open(&[]).await?;
    let queue = Queue::new(h.store.clone(), q());
    let a = queue.enqueue(tool(1)).await?;
    let mut live = Box::pin(queue.subscribe(StartAt::Now));
    let first = tokio::spawn(async move { (live.next().await, live) });
    // the subscriber marks "now" at its first poll, a moment the test cannot observe: keep
    // enqueueing until it reports an event
    eventually(LIMIT, "subscriber sees a new task", || {
        let (queue, seen) = (queue.clone(), first.is_finished());
        async move {
            if !seen {
                queue.enqueue(tool(2)).await?;
            }
            Ok(seen.then_some(()))
        }
    })
    .await?;
    let (e1, mut live) = first.await?;
    let e1 = e1.expect("the stream never ends")?;
    assert_eq!(e1.kind, EventKind::TaskEnqueued);
    assert_ne!(e1.task, Some(a), "StartAt::Now replayed an old event");
    queue.enqueue(tool(3)).await?;
    let e2 = live.next().await.expect("the stream never ends")?;
    assert!(e1.id < e2.id);
    // from the beginning: everything, starting with `a`; resuming after e1 starts at e2
    let mut from_start = std::pin::pin!(queue.subscribe(StartAt::Beginning));
    assert_eq!(from_start.next().await.expect("event")?.task, Some(a));
    let mut resumed = std::pin::pin!(queue.subscribe(StartAt::After(e1.id)));
    assert_eq!(resumed.next().await.expect("event")?.id, e2.id);
    Ok(())
}

async fn stats_and_list_follow_each_state<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    let tasks = one_in_each_state(s).await?;
    let st = s.stats(&q()).await?;
    for (id, state) in &tasks {
        assert_eq!(st.count(*state), 1, "{state}");
        let page = s.list(&q(), *state, 0, 10).await?;
        assert_eq!(page.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), vec![*id], "{state}");
        assert_eq!(page.tasks[0].state, *state);
        assert_eq!(page.next_cursor, None);
    }
    // paging through queued tasks across priority levels, in claim order
    let more: Vec<_> = (10..17).map(|i| tool(i).priority((i % 2) as i32)).collect();
    enqueue(s, &more).await?;
    let mut seen = Vec::new();
    let mut cursor = 0;
    for _ in 0..10 {
        let page = s.list(&q(), TaskState::Queued, cursor, 3).await?;
        seen.extend(page.tasks.iter().map(|t| t.call.clone()));
        match page.next_cursor {
            Some(c) => cursor = c,
            None => break,
        }
    }
    let claim_order: Vec<_> =
        s.claim(&q(), 100, HOUR).await?.into_iter().map(|c| c.task.call).collect();
    assert_eq!(seen, claim_order);
    assert_eq!(seen.len(), 8);
    Ok(())
}

async fn wait_returns_terminal_tasks_and_times_out_otherwise<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let queue = Queue::new(h.store.clone(), q());
    let id = queue.enqueue(tool(1)).await?;
    assert!(matches!(queue.wait(id, Duration::from_millis(50)).await, Err(Error::Timeout)));
    let waiter = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.wait(id, Duration::from_secs(10)).await })
    };
    let c = claim_one(&h.store, HOUR).await?;
    h.store.complete(&q(), &[done(&c)]).await?;
    let t = waiter.await??;
    assert_eq!((t.id, t.state), (id, TaskState::Succeeded));
    // already terminal: at once
    assert_eq!(queue.wait(id, Duration::ZERO).await?.state, TaskState::Succeeded);
    assert!(matches!(queue.wait(TaskId::new(), Duration::ZERO).await, Err(Error::NotFound(_))));
    Ok(())
}

async fn event_stream_is_trimmed_to_its_retention<B: Backend>() -> Result<()> {
    let small = QueueConfig { events_max: 1000, ..Default::default() };
    let h = B::open(&[("default", small)]).await?;
    let s = &h.store;
    // one task per call: one stream entry each (calls in flight together, which a store may
    // commit together, but each stays an entry of its own)
    use futures_util::{StreamExt, TryStreamExt};
    futures_util::stream::iter(0..3000)
        .map(|i| async move { enqueue(s, &[tool(i)]).await })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    // a batch is one entry, whatever its size
    enqueue(s, &(0..500).map(tool).collect::<Vec<_>>()).await?;
    let mut n = 0;
    let mut after = None;
    loop {
        let batch = s.read_events(&q(), after, 1000, None).await?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        n += batch.len();
    }
    // at least the newest 1000 entries are kept: 999 one-task entries and the batch. Trimming
    // may keep more (Redis drops whole stream nodes of 100 entries at once)
    assert!((1499..=1600).contains(&n), "{n} events retained");
    Ok(())
}

async fn reading_events_one_at_a_time_walks_every_event<B: Backend>() -> Result<()> {
    let h = B::open(&[]).await?;
    let s = &h.store;
    // one-task entries and a two-task entry
    enqueue(s, &[tool(1)]).await?;
    enqueue(s, &[tool(2), tool(3)]).await?;
    enqueue(s, &[tool(4)]).await?;
    let all = s.read_events(&q(), None, 100, None).await?;
    assert_eq!(all.len(), 4);
    let mut walked = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let one = s.read_events(&q(), after, 1, None).await?;
        let Some(e) = one.first() else { break };
        assert_eq!(one.len(), 1);
        after = Some(e.id);
        walked.push(e.clone());
    }
    assert_eq!(walked, all, "a read of one event after each one seen");
    Ok(())
}

/// Redis only: a claim leaves its leases in a skiplist-encoded zset (a small zset is a
/// listpack, which every lease added or removed scans end to end), and the member used to
/// convert it never stays behind.
#[tokio::test]
async fn redis_leases_stay_a_skiplist_and_hold_only_running_tasks() -> Result<()> {
    let server = RedisServer::start()?;
    let s = server.store(&[]).await?;
    let mut raw = server.raw()?;
    let leases = "mcpq:{default}:leases";
    enqueue(&s, &(0..10).map(tool).collect::<Vec<_>>()).await?;
    let mut claimed = Vec::new();
    for _ in 0..2 {
        claimed.extend(s.claim(&q(), 3, HOUR).await?);
        let encoding: String =
            ::redis::cmd("OBJECT").arg("ENCODING").arg(leases).query(&mut raw)?;
        assert_eq!(encoding, "skiplist");
        let members: Vec<Vec<u8>> =
            ::redis::cmd("ZRANGE").arg(leases).arg(0).arg(-1).query(&mut raw)?;
        let mut want: Vec<Vec<u8>> =
            claimed.iter().map(|c| c.task.id.as_bytes().to_vec()).collect();
        want.sort();
        let mut got = members;
        got.sort();
        assert_eq!(got, want, "the leases are exactly the claimed tasks");
        assert_eq!(s.stats(&q()).await?.running, claimed.len() as u64);
    }
    let settled = s.complete(&q(), &claimed.iter().map(done).collect::<Vec<_>>()).await?;
    assert!(settled.iter().all(|x| *x == Settled::Applied(TaskState::Succeeded)), "{settled:?}");
    let exists: u64 = ::redis::cmd("EXISTS").arg(leases).query(&mut raw)?;
    assert_eq!(exists, 0, "no lease (nor the converting member) outlives its task");
    Ok(())
}
