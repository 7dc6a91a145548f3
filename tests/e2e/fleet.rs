//! Fault tests of the actor fleet (issue: dispatch, retry, redistribution): real redis-server,
//! real MCP servers (rmcp, in process) and, for replica faults, `mcpq serve` processes that get
//! SIGKILLed and SIGSTOPped. Each test ends by accounting for every task it enqueued.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mcpq_fleet::{DispatchConfig, Fleet, FleetConfig, Health, HealthConfig, Part};
use mcpq_mcp::ServerConfig;
use mcpq_queue::{
    Backoff, EmbeddedStore, EventKind, NewTask, QueueConfig, QueueName, RedisStore, Store, TaskId,
    TaskState,
};
use mcpq_tests::fleet::{Node, Report, account, settle};
use mcpq_tests::mcp::{Execution, McpServer, Mode};
use mcpq_tests::{RedisServer, eventually};
use serde_json::json;

const NODE_BIN: &str = env!("CARGO_BIN_EXE_mcpq-e2e-node");

fn health() -> HealthConfig {
    HealthConfig { interval_ms: 100, degraded_after: 2, offline_after: 3, probe_timeout_ms: 300 }
}

fn dispatch(lease_ms: u64) -> DispatchConfig {
    let mut d = DispatchConfig {
        lease_ms,
        reap_interval_ms: 100,
        poll_ms: 50,
        wait_ms: 200,
        drain_timeout_ms: 2000,
        timeout_ms: 10_000,
        ..Default::default()
    };
    d.breaker.open_ms = 300;
    d.restart.backoff_initial_ms = 10;
    d
}

fn server(name: &str, s: &McpServer, max_concurrency: u32) -> ServerConfig {
    let mut c = ServerConfig::new(name, s.url());
    c.max_concurrency = max_concurrency;
    c
}

fn fleet_config(servers: Vec<ServerConfig>, health: HealthConfig, lease_ms: u64) -> FleetConfig {
    FleetConfig {
        node: "test".to_owned(),
        queues: vec![QueueName::default()],
        health,
        dispatch: dispatch(lease_ms),
        servers,
    }
}

fn fast_backoff() -> Backoff {
    Backoff { initial_ms: 20, max_ms: 200 }
}

fn slow(ms: u64, idempotent: bool) -> NewTask {
    NewTask::tool("slow", json!({"ms": ms}))
        .idempotent(idempotent)
        .backoff(fast_backoff())
        .max_attempts(5)
}

async fn enqueue(store: &RedisStore, tasks: &[NewTask]) -> Result<Vec<TaskId>> {
    let q = QueueName::default();
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(500) {
        ids.extend(store.enqueue(&q, chunk).await?.into_iter().map(|e| e.id()));
    }
    Ok(ids)
}

async fn succeeded(store: &RedisStore) -> Result<u64> {
    Ok(store.stats(&QueueName::default()).await?.succeeded)
}

async fn wait_succeeded(store: &RedisStore, n: u64, what: &str) -> Result<()> {
    eventually(Duration::from_secs(30), what, || async {
        Ok((succeeded(store).await? >= n).then_some(()))
    })
    .await
}

fn executions_of(servers: &[&McpServer]) -> Vec<Execution> {
    servers.iter().flat_map(|s| s.executions()).collect()
}

fn task_ids(executions: &[Execution]) -> HashSet<TaskId> {
    executions.iter().filter_map(|e| e.meta.get("mcpq/task")?.as_str()?.parse().ok()).collect()
}

/// The checks every fault test ends with.
fn assert_accounted(r: &Report, idempotent: &HashSet<TaskId>) {
    println!("accounting: {}", r.summary());
    assert!(r.lost.is_empty(), "lost tasks: {:?}", r.lost);
    assert_eq!(r.unfinished(), 0, "tasks stuck after the deadline: {}", r.summary());
    for (id, t) in &r.tasks {
        if idempotent.contains(id) {
            assert_eq!(t.state, TaskState::Succeeded, "idempotent {id}: {:?}", t.error);
        } else {
            assert!(
                matches!(t.state, TaskState::Succeeded | TaskState::Review),
                "non-idempotent {id} is {:?}: {:?}",
                t.state,
                t.error
            );
            if t.state == TaskState::Review {
                let e = t.error.as_deref().unwrap_or_default();
                assert!(
                    e.contains("outcome unknown") || e.contains("lease expired"),
                    "review without its reason: {e}"
                );
            }
            assert!(
                !r.duplicated.contains_key(id),
                "non-idempotent {id} ran {} times",
                r.duplicated[id]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_s_tasks_are_redistributed_and_none_is_lost() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let a = McpServer::start(Mode::SessionSse).await?;
    let b = McpServer::start(Mode::SessionJson).await?;
    let c = McpServer::start(Mode::Stateless).await?;
    let servers = vec![server("a", &a, 16), server("b", &b, 16), server("c", &c, 16)];
    // a lease far beyond the test's deadline: only health can hand b's tasks back in time
    let fleet = Fleet::start(store.clone(), fleet_config(servers, health(), 120_000)).await?;
    let mut events = fleet.subscribe();

    let tasks: Vec<NewTask> = (0..2000).map(|i| slow(20, i % 10 != 0)).collect();
    let idempotent: HashSet<TaskId> = tasks.iter().filter(|t| t.idempotent).map(|t| t.id).collect();
    let ids = enqueue(&store, &tasks).await?;

    wait_succeeded(&store, 400, "400 tasks done before the kill").await?;
    let b_before_kill = task_ids(&b.executions());
    let killed = Instant::now();
    b.stop().await;
    let offline = loop {
        let e = tokio::time::timeout(Duration::from_secs(20), events.recv()).await??;
        if e.server == "b" && e.health == Health::Offline {
            break killed.elapsed();
        }
    };
    println!("b offline {offline:?} after the kill (offline_after × interval = 300 ms)");
    wait_succeeded(&store, 1200, "1200 tasks done while b is away").await?;
    b.restart().await?;
    let recovered = loop {
        let e = tokio::time::timeout(Duration::from_secs(20), events.recv()).await??;
        if e.server == "b" && e.health == Health::Online {
            break killed.elapsed();
        }
    };
    println!("b recovered {recovered:?} after the kill");

    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(60), || {
        executions_of(&[&a, &b, &c])
    })
    .await?;
    println!("fleet stats: {:?}", fleet.stats());
    assert_accounted(&r, &idempotent);
    // a repeat is only possible for what b was running when it died
    let ran_on_b = task_ids(&b.executions());
    for id in r.duplicated.keys() {
        assert!(b_before_kill.contains(id) || ran_on_b.contains(id), "{id}");
    }
    assert!(has_event(&store, EventKind::ServerOffline).await?, "server.offline is in the stream");
    assert!(has_event(&store, EventKind::ServerRecovered).await?);
    fleet.shutdown().await?;
    Ok(())
}

/// Whether any retained event of the default queue has `kind`.
async fn has_event(store: &RedisStore, kind: EventKind) -> Result<bool> {
    Ok(all_events(store).await?.iter().any(|e| e.kind == kind))
}

/// Every event of the default queue, oldest first.
async fn all_events(store: &RedisStore) -> Result<Vec<mcpq_queue::Event>> {
    let q = QueueName::default();
    let (mut out, mut after) = (Vec::new(), None);
    for _ in 0..10_000 {
        let page = store.read_events(&q, after, 1000, None).await?;
        let Some(last) = page.last() else { return Ok(out) };
        after = Some(last.id);
        out.extend(page);
    }
    bail!("event stream longer than expected")
}

fn node_toml(
    node: &str,
    redis: &RedisServer,
    servers: &[(&str, &McpServer)],
    lease_ms: u64,
) -> String {
    let mut t = format!(
        "node = \"{node}\"\n[store]\nredis_url = \"{}\"\n\
         [health]\ninterval_ms = 100\ndegraded_after = 2\noffline_after = 3\nprobe_timeout_ms = 300\n\
         [dispatch]\nlease_ms = {lease_ms}\nreap_interval_ms = 100\npoll_ms = 50\nwait_ms = 200\n\
         drain_timeout_ms = 2000\n",
        redis.url()
    );
    for (name, s) in servers {
        t.push_str(&format!(
            "[[servers]]\nname = \"{name}\"\nurl = \"{}\"\nmax_concurrency = 8\n",
            s.url()
        ));
    }
    t
}

/// A Redis, two MCP servers (`a` stateless, `b` in `b_mode`) and two replicas, `one` and
/// `two`, on them with leases of `lease_ms`.
struct TwoReplicas {
    _redis: RedisServer,
    store: RedisStore,
    a: McpServer,
    b: McpServer,
    one: Node,
    two: Node,
}

async fn two_replicas(b_mode: Mode, lease_ms: u64) -> Result<TwoReplicas> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let a = McpServer::start(Mode::Stateless).await?;
    let b = McpServer::start(b_mode).await?;
    let servers = [("a", &a), ("b", &b)];
    let one = Node::start(NODE_BIN, &node_toml("one", &redis, &servers, lease_ms))?;
    let two = Node::start(NODE_BIN, &node_toml("two", &redis, &servers, lease_ms))?;
    Ok(TwoReplicas { _redis: redis, store, a, b, one, two })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_replica_s_tasks_are_recovered_by_the_other() -> Result<()> {
    let TwoReplicas { _redis, store, a, b, mut one, mut two } =
        two_replicas(Mode::SessionSse, 1000).await?;

    let tasks: Vec<NewTask> = (0..600).map(|i| slow(30, i % 5 != 0)).collect();
    let idempotent: HashSet<TaskId> = tasks.iter().filter(|t| t.idempotent).map(|t| t.id).collect();
    let ids = enqueue(&store, &tasks).await?;
    wait_succeeded(&store, 150, "150 tasks done before the kill").await?;
    let running = store.stats(&QueueName::default()).await?.running;
    one.kill()?;
    let killed = Instant::now();
    println!("replica one SIGKILLed with {running} tasks running fleet-wide");

    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(60), || {
        executions_of(&[&a, &b])
    })
    .await?;
    println!("all terminal {:?} after the kill", killed.elapsed());
    assert_accounted(&r, &idempotent);
    // one replica holds at most 2 servers × 8 slots
    assert!(r.count(TaskState::Review) <= 16, "{}", r.summary());
    assert!(two.terminate(Duration::from_secs(10)).await?, "replica two exits cleanly");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_cannot_commit_stale_results() -> Result<()> {
    let TwoReplicas { _redis, store, a, b, mut one, mut two } =
        two_replicas(Mode::SessionJson, 600).await?;

    let tasks: Vec<NewTask> = (0..300).map(|_| slow(100, true)).collect();
    let idempotent: HashSet<TaskId> = tasks.iter().map(|t| t.id).collect();
    let ids = enqueue(&store, &tasks).await?;
    wait_succeeded(&store, 60, "60 tasks done before the pause").await?;
    one.pause()?;
    // replica two reaps one's leases and finishes everything while one is frozen
    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(60), || {
        executions_of(&[&a, &b])
    })
    .await?;
    assert_eq!(r.unfinished(), 0, "two finished the work: {}", r.summary());
    let events_before = all_events(&store).await?.len();
    one.resume()?;
    eventually(Duration::from_secs(15), "one notices it lost its claims", || async {
        let log = one.log();
        Ok((log.contains("fenced") || log.contains("lease lost")).then_some(()))
    })
    .await?;
    assert!(one.terminate(Duration::from_secs(10)).await?, "one exits cleanly");
    assert!(two.terminate(Duration::from_secs(10)).await?, "two exits cleanly");

    let r = account(&store, &QueueName::default(), &ids, &executions_of(&[&a, &b])).await?;
    assert_accounted(&r, &idempotent);
    let events = all_events(&store).await?;
    let mut succeeded: HashMap<TaskId, usize> = HashMap::new();
    for e in &events {
        if e.kind == EventKind::TaskSucceeded
            && let Some(t) = e.task
        {
            *succeeded.entry(t).or_default() += 1;
        }
    }
    assert!(ids.iter().all(|id| succeeded.get(id) == Some(&1)), "one success event per task");
    let late: Vec<_> = events[events_before..].iter().filter(|e| e.task.is_some()).collect();
    assert!(late.is_empty(), "the resumed replica published {late:?}");
    println!(
        "duplicated executions (expected: the paused replica's calls): {}",
        r.duplicated.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_erring_overloaded_and_cutting_servers_are_classified() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let slow_s = McpServer::start(Mode::Stateless).await?;
    let erring = McpServer::start(Mode::SessionSse).await?;
    let busy = McpServer::start(Mode::SessionJson).await?;
    let cutting = McpServer::start(Mode::SessionSse).await?;
    let servers = vec![
        server("slow", &slow_s, 8),
        server("erring", &erring, 8),
        server("busy", &busy, 8),
        server("cutting", &cutting, 8),
    ];
    // probes would eat the armed faults: none during this test. Nor may the slow server go
    // offline: with no probe to bring it back, its pinned retries would wait for ever. Its four
    // timeouts are consecutive whenever the 300 ms success lands before them, which is a race.
    let quiet =
        HealthConfig { interval_ms: 600_000, degraded_after: 100, offline_after: 100, ..health() };
    let fleet = Fleet::start(store.clone(), fleet_config(servers, quiet, 10_000)).await?;
    eventually(Duration::from_secs(10), "every tool list", || async {
        Ok(fleet.servers().iter().all(|s| s.tools.is_some()).then_some(()))
    })
    .await?;
    let q = QueueName::default();
    let pinned = |t: NewTask, s: &str| t.server(s).max_attempts(3).backoff(fast_backoff());
    let echo = || NewTask::tool("echo", json!({"text": "hi"}));
    let until = |id: TaskId, state: TaskState| {
        let store = store.clone();
        let q = q.clone();
        async move {
            eventually(Duration::from_secs(20), &format!("{id} {state:?}"), || async {
                let t = store.get(&q, id).await?;
                Ok(t.filter(|t| t.state == state))
            })
            .await
        }
    };
    let runs = |s: &McpServer, id: TaskId| {
        s.executions().iter().filter(|e| e.meta["mcpq/task"] == id.to_string()).count()
    };

    // slow within its limit: succeeds; past its limit: unknown outcome
    let ok =
        pinned(NewTask::tool("slow", json!({"ms": 300})).timeout(Duration::from_secs(5)), "slow");
    let late = pinned(NewTask::tool("slow", json!({"ms": 3000})), "slow")
        .timeout(Duration::from_millis(300));
    let late_idem = late.clone().idempotent(true);
    let late_idem = NewTask { id: TaskId::new(), ..late_idem };
    let ids = enqueue(&store, &[ok, late, late_idem]).await?;
    until(ids[0], TaskState::Succeeded).await?;
    let t = until(ids[1], TaskState::Review).await?;
    assert!(t.error.as_deref().unwrap_or_default().contains("timed out"), "{:?}", t.error);
    let t = until(ids[2], TaskState::Dead).await?;
    assert_eq!((t.attempt, runs(&slow_s, ids[2])), (3, 3), "retried to its last attempt");
    assert_eq!(runs(&slow_s, ids[1]), 1, "not repeated");

    // isError: failed at once, never repeated, idempotent or not
    let ids2 = enqueue(
        &store,
        &[
            pinned(NewTask::tool("fail", json!({})), "erring"),
            pinned(NewTask::tool("fail", json!({})).idempotent(true), "erring"),
        ],
    )
    .await?;
    for id in &ids2 {
        let t = until(*id, TaskState::Failed).await?;
        assert!(t.error.as_deref().unwrap_or_default().contains("failed on purpose"));
        assert_eq!((t.attempt, runs(&erring, *id)), (1, 1));
    }

    // 503 + Retry-After: not delivered, handed back without spending an attempt, then done
    busy.faults().reject_next(2, 503, Some(1));
    let started = Instant::now();
    let id = enqueue(&store, &[pinned(echo(), "busy")]).await?[0];
    let t = until(id, TaskState::Succeeded).await?;
    println!("503 twice with Retry-After: 1 → done after {:?}", started.elapsed());
    assert_eq!((t.attempt, runs(&busy, id)), (1, 1), "no attempt spent on refusals");
    assert!(started.elapsed() >= Duration::from_millis(1900), "Retry-After honoured");
    let released = all_events(&store)
        .await?
        .iter()
        .filter(|e| e.kind == EventKind::TaskReleased && e.task == Some(id))
        .count();
    assert!(released >= 2, "released {released} times");

    // cut after acceptance: a non-idempotent task goes to review, an idempotent one is retried
    cutting.faults().cut_after_accept_next(1);
    let id = enqueue(&store, &[pinned(echo(), "cutting")]).await?[0];
    until(id, TaskState::Review).await?;
    assert_eq!(runs(&cutting, id), 1);
    cutting.faults().cut_after_accept_next(1);
    let id = enqueue(&store, &[pinned(echo().idempotent(true), "cutting")]).await?[0];
    let t = until(id, TaskState::Succeeded).await?;
    assert_eq!((t.attempt, runs(&cutting, id)), (2, 2), "ran twice: a counted duplicate");

    let all: Vec<TaskId> = ids.iter().chain(&ids2).copied().collect();
    let r = account(&store, &q, &all, &executions_of(&[&slow_s, &erring])).await?;
    println!("accounting: {}", r.summary());
    assert!(r.lost.is_empty());
    fleet.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_tasks_enqueued_later_start_first() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let s = McpServer::start(Mode::Stateless).await?;
    let fleet =
        Fleet::start(store.clone(), fleet_config(vec![server("s", &s, 2)], health(), 10_000))
            .await?;
    let low: Vec<NewTask> = (0..40).map(|_| slow(30, true).priority(0)).collect();
    let mut ids = enqueue(&store, &low).await?;
    eventually(Duration::from_secs(10), "the busy server started", || async {
        Ok((s.executions().len() >= 2).then_some(()))
    })
    .await?;
    let high: Vec<NewTask> = (0..10).map(|_| slow(30, true).priority(10)).collect();
    let high_ids: HashSet<TaskId> = high.iter().map(|t| t.id).collect();
    ids.extend(enqueue(&store, &high).await?);
    let started_before = s.executions().len();

    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(30), || s.executions())
        .await?;
    assert_accounted(&r, &ids.iter().copied().collect());
    let order: Vec<TaskId> = s.executions()[started_before..]
        .iter()
        .filter_map(|e| e.meta["mcpq/task"].as_str()?.parse().ok())
        .collect();
    let last_high = order.iter().rposition(|id| high_ids.contains(id)).unwrap_or(0);
    let inversions = order[..last_high].iter().filter(|id| !high_ids.contains(id)).count();
    println!("priority inversions after the high batch: {inversions} (in-flight window 2)");
    assert!(inversions <= 2, "low tasks started before high ones: {inversions}");
    fleet.shutdown().await?;
    Ok(())
}

/// An idle fleet watches the event stream for work; woken by a burst, it stops watching while
/// its claims come back full, though its idle time left it several wake-ups to do so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_woken_by_a_burst_stops_watching_the_event_stream() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let s = McpServer::start(Mode::Stateless).await?;
    let q = QueueName::default();
    let burst: Vec<NewTask> =
        (0..2000).map(|_| NewTask::tool("echo", json!({"text": "hi"})).idempotent(true)).collect();
    let mut ids = enqueue(&store, &burst[1..]).await?;
    store.set_paused(&q, true).await?;
    let fleet =
        Fleet::start(store.clone(), fleet_config(vec![server("s", &s, 32)], health(), 10_000))
            .await?;
    // paused, every claim falls short: the doorbell is armed, and armed again by each
    let (reads, scripts) = (redis.calls("xrange")?, redis.calls("evalsha")?);
    eventually(Duration::from_secs(10), "short claims while the doorbell waits", || async {
        let more = redis.calls("xrange")? > reads + 1;
        Ok((more && redis.calls("evalsha")? >= scripts + 10).then_some(()))
    })
    .await?;
    let reads = redis.calls("xrange")?;
    store.set_paused(&q, false).await?;
    ids.extend(enqueue(&store, &burst[..1]).await?);
    // the first half, while every claim comes back full (the tail's claims fall short, and
    // rightly arm the doorbell again)
    eventually(Duration::from_secs(60), "half the burst done", || async {
        Ok((store.stats(&q).await?.succeeded >= 1000).then_some(()))
    })
    .await?;
    let during = redis.calls("xrange")? - reads;
    let r = settle(&store, &q, &ids, Duration::from_secs(60), || s.executions()).await?;
    assert_accounted(&r, &ids.iter().copied().collect());
    println!("event stream reads during the first half of a {}-task drain: {during}", ids.len());
    assert!(during <= 5, "the doorbell read the stream {during} times while claims were full");
    fleet.shutdown().await?;
    Ok(())
}

/// One server with 4 slots, and ten seconds of its work claimed ahead: far more than
/// `max_batch`, which caps it.
fn claiming_ahead(s: &McpServer, lease_ms: u64, max_batch: usize) -> FleetConfig {
    let mut cfg = fleet_config(vec![server("s", s, 4)], health(), lease_ms);
    cfg.dispatch.prefetch_ms = 10_000;
    cfg.dispatch.max_batch = max_batch;
    cfg
}

/// Work claimed ahead (`prefetch_ms`) waits parked for a free slot: no more of it than
/// `max_batch`, and each task still runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_claimed_ahead_is_capped_and_each_task_runs_once() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let s = McpServer::start(Mode::Stateless).await?;
    let cfg = claiming_ahead(&s, 10_000, 16);
    let fleet = Fleet::start(store.clone(), cfg).await?;
    let tasks: Vec<NewTask> = (0..400).map(|_| slow(5, true)).collect();
    let ids = enqueue(&store, &tasks).await?;
    let most = std::cell::Cell::new(0);
    eventually(Duration::from_secs(60), "every task succeeded", || async {
        most.set(most.get().max(fleet.held()));
        Ok((succeeded(&store).await? >= tasks.len() as u64).then_some(()))
    })
    .await?;

    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(10), || s.executions())
        .await?;
    assert_accounted(&r, &ids.iter().copied().collect());
    assert!(r.duplicated.is_empty(), "tasks ran twice: {:?}", r.duplicated);
    // held: four running, up to 16 parked ahead, and up to four finished since the last round
    let most = most.get();
    println!("most tasks held at once: {most} (4 slots, 16 ahead)");
    assert!(most > 4 + 4, "nothing was claimed ahead of the free slots");
    assert!(most <= 4 + 16 + 4, "{most} tasks held: more than the slots and the cap");
    assert_eq!(fleet.stats().released, 0, "tasks claimed ahead were handed back");
    fleet.shutdown().await?;
    Ok(())
}

/// Calls that finish while the store does not answer free slots, and work claimed ahead takes
/// them at once: the WorkQueue does not wait for the store's answer to refill them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_freed_while_the_store_stalls_take_the_work_claimed_ahead() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let s = McpServer::start(Mode::Stateless).await?;
    let mut cfg = claiming_ahead(&s, 30_000, 32);
    // parked tasks wait out the stall rather than go back to the store
    cfg.dispatch.wait_ms = 10_000;
    let fleet = Fleet::start(store.clone(), cfg).await?;
    let tasks: Vec<NewTask> = (0..300).map(|_| slow(20, true)).collect();
    let ids = enqueue(&store, &tasks).await?;
    // four calls run and, once the pace is known, up to 32 tasks wait parked ahead of them
    eventually(Duration::from_secs(30), "work claimed ahead", || async {
        Ok((fleet.held() >= 28).then_some(()))
    })
    .await?;
    redis.pause()?;
    let before = s.executions().len();
    // the round that starts once the running calls finish fills their four slots, then waits
    // for redis with its claim, as the sweeps (every 100 ms here) wait for it with theirs;
    // every call past those starts from a slot freed meanwhile
    let most = std::cell::Cell::new(0);
    let started =
        eventually(Duration::from_secs(5), "calls started while redis is stopped", || {
            most.set(s.executions().len() - before);
            let n = most.get();
            async move { Ok((n >= 16).then_some(n)) }
        })
        .await;
    redis.resume()?;
    println!("calls started while redis was stopped: {}", most.get());
    started?;
    wait_succeeded(&store, tasks.len() as u64, "every task succeeded").await?;

    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(10), || s.executions())
        .await?;
    assert_accounted(&r, &ids.iter().copied().collect());
    assert!(r.duplicated.is_empty(), "tasks ran twice: {:?}", r.duplicated);
    assert_eq!(fleet.stats().released, 0, "tasks claimed ahead were handed back");
    fleet.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_actors_are_restarted_and_no_task_is_lost() -> Result<()> {
    mcpq_tests::init_logs();
    let redis = RedisServer::start()?;
    let store = redis.store(&[("default", QueueConfig::default())]).await?;
    let a = McpServer::start(Mode::SessionSse).await?;
    let b = McpServer::start(Mode::Stateless).await?;
    let mut cfg = fleet_config(vec![server("a", &a, 8), server("b", &b, 8)], health(), 5000);
    cfg.dispatch.restart.max_restarts = 2;
    let fleet = Fleet::start(store.clone(), cfg).await?;

    // not idempotent: a crash must neither lose a task nor make its outcome unknown
    let tasks: Vec<NewTask> = (0..600).map(|_| slow(10, false)).collect();
    let ids = enqueue(&store, &tasks).await?;
    for (at, part) in
        [(100, Part::WorkQueue), (250, Part::HealthMonitor), (400, Part::Client("a".into()))]
    {
        wait_succeeded(&store, at, "progress before the crash").await?;
        let before = fleet.stats().restarts;
        fleet.inject_crash(part.clone());
        eventually(Duration::from_secs(10), &format!("{part:?} restarted"), || async {
            Ok((fleet.stats().restarts > before).then_some(()))
        })
        .await?;
    }
    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(60), || {
        executions_of(&[&a, &b])
    })
    .await?;
    assert_accounted(&r, &ids.iter().copied().collect());
    assert!(r.duplicated.is_empty(), "{}", r.summary());

    // a client that keeps crashing spends its budget and stays down; work goes to the other
    let b_running = || fleet.servers().iter().any(|s| s.name == "b" && s.client_running);
    for _ in 0..2 {
        let before = fleet.stats().restarts;
        fleet.inject_crash(Part::Client("b".into()));
        eventually(Duration::from_secs(10), "b restarted", || async {
            Ok((fleet.stats().restarts > before && b_running()).then_some(()))
        })
        .await?;
    }
    fleet.inject_crash(Part::Client("b".into()));
    eventually(Duration::from_secs(10), "b left stopped", || async {
        Ok((!b_running()).then_some(()))
    })
    .await?;
    let restarts = fleet.stats().restarts;
    assert_eq!(restarts, 3 + 2, "two restarts of b within the budget, then none");
    let b_runs = b.executions().len();
    let more = enqueue(&store, &(0..50).map(|_| slow(5, false)).collect::<Vec<_>>()).await?;
    let r = settle(&store, &QueueName::default(), &more, Duration::from_secs(30), || {
        executions_of(&[&a, &b])
    })
    .await?;
    if r.unfinished() > 0 {
        println!("servers {:?}\nheld {} stats {:?}", fleet.servers(), fleet.held(), fleet.stats());
        for t in r.tasks.values().filter(|t| !t.state.is_terminal()) {
            println!("stuck: {t:?}");
        }
    }
    assert_accounted(&r, &HashSet::new());
    assert_eq!(r.count(TaskState::Succeeded), 50);
    assert_eq!(b.executions().len(), b_runs, "the stopped client gets no work");
    fleet.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_come_and_go_at_run_time_and_unplaceable_tasks_wait_or_expire() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let a = McpServer::start(Mode::Stateless).await?;
    let gpu = McpServer::start(Mode::SessionSse).await?;
    let fleet =
        Fleet::start(store.clone(), fleet_config(vec![server("a", &a, 8)], health(), 10_000))
            .await?;
    let q = QueueName::default();
    let state = |id: TaskId| {
        let (store, q) = (store.clone(), q.clone());
        async move { Ok::<_, anyhow::Error>(store.get(&q, id).await?.map(|t| t.state)) }
    };

    // until a server's tool list is known, a tool call may be sent there to find out
    eventually(Duration::from_secs(10), "a's tool list", || async {
        Ok(fleet.servers().iter().all(|s| s.tools.is_some()).then_some(()))
    })
    .await?;
    // no server carries the tag: the task waits (never failed) until one that does is added
    let tagged = enqueue(&store, &[slow(5, false).tags(["gpu"])]).await?[0];
    let unknown_tool = NewTask::tool("no-such-tool", json!({})).expires(Duration::from_millis(400));
    let doomed = enqueue(&store, &[unknown_tool]).await?[0];
    let t = eventually(Duration::from_secs(10), "the tool-less task expires", || async {
        Ok(store.get(&q, doomed).await?.filter(|t| t.state == TaskState::Failed))
    })
    .await?;
    assert!(t.error.as_deref().unwrap_or_default().contains("expired"), "{:?}", t.error);
    let waiting = state(tagged).await?;
    assert!(waiting.is_some_and(|s| !s.is_terminal()), "the tagged task still waits: {waiting:?}");
    let mut g = server("g", &gpu, 4);
    g.tags = vec!["gpu".into()];
    fleet.add_server(g.clone()).await?;
    assert!(matches!(fleet.add_server(g).await, Err(mcpq_fleet::FleetError::DuplicateServer(_))));
    eventually(Duration::from_secs(10), "the tagged task ran on the new server", || async {
        Ok((state(tagged).await? == Some(TaskState::Succeeded)).then_some(()))
    })
    .await?;
    assert_eq!(task_ids(&gpu.executions()), HashSet::from([tagged]));

    // removing a server hands its running tasks to the others
    let long: Vec<NewTask> = (0..4).map(|_| slow(400, true).server("a")).collect();
    let pinned_ids = enqueue(&store, &long).await?;
    eventually(Duration::from_secs(10), "a runs the pinned tasks", || async {
        Ok((a.in_flight() == 4).then_some(()))
    })
    .await?;
    fleet.remove_server("a").await?;
    assert!(fleet.servers().iter().all(|s| s.name != "a"));
    let runs_on_a = a.executions().len();
    let spare: Vec<NewTask> = (0..4).map(|_| slow(5, true)).collect();
    let spare_ids = enqueue(&store, &spare).await?;
    let r = settle(&store, &q, &spare_ids, Duration::from_secs(20), || gpu.executions()).await?;
    assert_eq!(r.count(TaskState::Succeeded), 4, "{}", r.summary());
    assert_eq!(a.executions().len(), runs_on_a, "a removed server gets no calls");
    for id in &pinned_ids {
        // pinned to a server that is gone: they wait for it, handed back again and again
        eventually(Duration::from_secs(10), "the pinned task waits for its server", || async {
            let t = store.get(&q, *id).await?;
            Ok(t.filter(|t| t.error.as_deref().is_some_and(|e| e.contains("pinned server a"))))
        })
        .await?;
    }

    // shutdown: short calls finish within the drain time, long ones are handed back
    let quick = enqueue(&store, &(0..2).map(|_| slow(100, true)).collect::<Vec<_>>()).await?;
    let stuck = enqueue(&store, &(0..2).map(|_| slow(10_000, true)).collect::<Vec<_>>()).await?;
    eventually(Duration::from_secs(10), "all four running", || async {
        Ok((gpu.in_flight() == 4).then_some(()))
    })
    .await?;
    let report = fleet.shutdown().await?;
    println!("drain: {report:?}");
    assert_eq!(report.handed_back, 2, "{report:?}");
    for id in quick {
        assert_eq!(state(id).await?, Some(TaskState::Succeeded));
    }
    for id in stuck {
        let s = state(id).await?;
        assert!(matches!(s, Some(TaskState::Queued | TaskState::Scheduled)), "{s:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_goes_offline_and_its_calls_move_before_any_timeout() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store(&[]).await?;
    let a = McpServer::start(Mode::Stateless).await?;
    let b = McpServer::start(Mode::Stateless).await?;
    // a and b limited to 20 calls a second, so the run lasts long enough to hang b mid-way
    let mut sa = server("a", &a, 4);
    sa.rate_limit = 20;
    let fleet =
        Fleet::start(store.clone(), fleet_config(vec![sa, server("b", &b, 4)], health(), 120_000))
            .await?;
    let tasks: Vec<NewTask> = (0..60).map(|_| slow(5, true)).collect();
    let idempotent: HashSet<TaskId> = tasks.iter().map(|t| t.id).collect();
    // b accepts every request from now on and never answers: no reset tells the client
    b.faults().stall_next(100_000);
    let started = Instant::now();
    let ids = enqueue(&store, &tasks).await?;
    // calls time out after 10 s (dispatch.timeout_ms) and leases after 120 s: finishing well
    // before either shows the health monitor moved b's calls
    let r = settle(&store, &QueueName::default(), &ids, Duration::from_secs(8), || {
        executions_of(&[&a, &b])
    })
    .await?;
    let took = started.elapsed();
    println!("all done in {took:?}; fleet stats {:?}", fleet.stats());
    assert_accounted(&r, &idempotent);
    assert!(fleet.stats().redistributed > 0, "b's calls were handed back");
    assert!(fleet.servers().iter().any(|s| s.name == "b" && s.health == Health::Offline));
    // a's rate limit: 20 a second with a burst of 20, so 60 tasks take at least 2 s
    assert!(took >= Duration::from_millis(1900), "rate limit held: {took:?}");
    fleet.shutdown().await?;
    Ok(())
}

/// On the embedded store an idle fleet's claims wait in the store, which hands each one what
/// an enqueue brings before that enqueue's sync. Neither a WorkQueue that crashes while its
/// claim waits nor a shutdown leaves a waiting claim behind to take tasks nobody runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_fleet_s_waiting_claims_lose_nothing_to_a_crash_or_a_shutdown() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open_path(dir.path().join("data"))?;
    let q = QueueName::default();
    let a = McpServer::start(Mode::Stateless).await?;
    let cfg = fleet_config(vec![server("a", &a, 8)], health(), 10_000);
    let fleet = Fleet::start(store.clone(), cfg).await?;
    let mut ids: Vec<TaskId> = Vec::new();
    let burst = async |ids: &mut Vec<TaskId>| -> Result<()> {
        // not idempotent: a task taken for a WorkQueue that is gone must not run twice
        let tasks: Vec<NewTask> = (0..20).map(|_| slow(1, false)).collect();
        ids.extend(store.enqueue(&q, &tasks).await?.into_iter().map(|e| e.id()));
        let n = ids.len() as u64;
        eventually(Duration::from_secs(10), "the burst ran", || async {
            Ok((store.stats(&q).await?.succeeded >= n).then_some(()))
        })
        .await
    };
    for _ in 0..3 {
        burst(&mut ids).await?;
    }
    for _ in 0..2 {
        let before = fleet.stats().restarts;
        fleet.inject_crash(Part::WorkQueue);
        eventually(Duration::from_secs(10), "the WorkQueue restarted", || async {
            Ok((fleet.stats().restarts > before).then_some(()))
        })
        .await?;
        burst(&mut ids).await?;
    }
    let r = settle(&store, &q, &ids, Duration::from_secs(30), || executions_of(&[&a])).await?;
    assert_accounted(&r, &HashSet::new());
    assert_eq!(r.count(TaskState::Succeeded), ids.len(), "none waited for a lease to run out");
    assert!(r.duplicated.is_empty(), "{}", r.summary());
    tokio::time::timeout(Duration::from_secs(10), fleet.shutdown()).await??;
    // a claim still waiting would take it in the step that enqueues it
    let after = store.enqueue(&q, &[slow(1, false)]).await?[0].id();
    let state = store.get(&q, after).await?.map(|t| t.state);
    assert_eq!(state, Some(TaskState::Queued), "a claim outlived its fleet");
    Ok(())
}
