//! One run of each measure: the ceiling (the servers called directly), a drain, a steady
//! rate (queued and direct), and claims and a drain at a given depth. Every run that goes
//! through the queue ends by accounting for each of its tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcpq_fleet::{Fleet, FleetConfig};
use mcpq_mcp::{CallMeta, McpClient, Outcome, ServerConfig, requests_in_flight};
use mcpq_queue::store::embedded::WRITER_THREAD;
use mcpq_queue::{Completion, EventKind, NewTask, Queue, QueueName, Store, TaskId};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::procs::{
    EchoChild, RedisProc, RedisSample, own_cpu_s, own_memory, reset_peak_memory, threads_cpu_s,
};

/// Calls in flight per server: the fleet's default `max_concurrency`, used by the direct
/// calls too so both see the same concurrency.
pub(crate) fn concurrency() -> usize {
    ServerConfig::new("x", "http://127.0.0.1/").max_concurrency as usize
}

/// The task every measure runs: a `tools/call echo` that is safe to repeat.
pub(crate) fn echo_task() -> NewTask {
    NewTask::tool("echo", json!({ "text": "hello" })).idempotent(true)
}

/// The fleet as `mcpq serve` runs it by default, over these servers.
pub(crate) fn fleet_config(urls: &[String]) -> FleetConfig {
    FleetConfig {
        node: "bench".to_owned(),
        queues: vec![QueueName::default()],
        health: Default::default(),
        dispatch: Default::default(),
        servers: urls
            .iter()
            .enumerate()
            .map(|(i, url)| ServerConfig::new(format!("s{}", i + 1), url.clone()))
            .collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Latency figures, µs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Self {
            p50_us: us(percentile(&v, 0.5)),
            p99_us: us(percentile(&v, 0.99)),
            max_us: us(v.last().copied().unwrap_or_default()),
        }
    }
}

/// Clients of the servers, one each, warmed up (era found, connections open).
pub(crate) async fn clients(urls: &[String]) -> Result<Vec<Arc<McpClient>>> {
    let mut out = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let c = Arc::new(McpClient::new(ServerConfig::new(format!("s{}", i + 1), url.clone()))?);
        call(&c).await.with_context(|| format!("the echo server at {url} does not answer"))?;
        out.push(c);
    }
    Ok(out)
}

/// One direct echo call with the metadata the fleet would send.
async fn call(client: &McpClient) -> Result<()> {
    let meta = CallMeta { task: Some(TaskId::new().to_string()), attempt: Some(1) };
    match client.call_tool("echo", json!({ "text": "hello" }), &meta).await {
        Outcome::Executed(Ok(_)) => Ok(()),
        other => bail!("echo call failed: {other:?}"),
    }
}

/// Reads [`requests_in_flight`] every millisecond on a thread of its own until [`Self::mean`]
/// (or until dropped, when a run fails): how full a run kept the servers' slots, moment to
/// moment.
struct InFlight {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl InFlight {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut sum, mut n) = (0, 0);
            // stopped by `mean` or the drop; the count bounds the loop at under three hours
            while !seen.load(Ordering::Relaxed) && n < 10_000_000 {
                std::thread::sleep(Duration::from_millis(1));
                sum += requests_in_flight();
                n += 1;
            }
            (sum, n)
        });
        Self { stop, thread: Some(thread) }
    }

    /// The mean of the readings (0 for a run shorter than one).
    fn mean(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok((sum, n))) if n > 0 => sum as f64 / n as f64,
            _ => 0.0,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The ceiling: `calls` direct calls, [`concurrency`] at a time per server.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct CeilingRun {
    pub(crate) calls_per_s: f64,
    pub(crate) latency: Latency,
    /// Mean calls in flight, read every millisecond.
    pub(crate) in_flight: f64,
    /// CPU of this process (the MCP client) per call.
    pub(crate) client_cpu_us_per_call: f64,
    /// CPU of the servers' process per call.
    pub(crate) server_cpu_us_per_call: f64,
}

pub(crate) async fn ceiling(
    clients: &[Arc<McpClient>],
    echo: &EchoChild,
    calls: usize,
) -> Result<CeilingRun> {
    let workers = clients.len() * concurrency();
    let per = calls.div_ceil(workers);
    let (cpu0, server0) = (own_cpu_s()?, echo.cpu_s()?);
    let in_flight = InFlight::start();
    let t0 = Instant::now();
    let mut running = Vec::new();
    for c in clients {
        for _ in 0..concurrency() {
            let c = c.clone();
            running.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let s = Instant::now();
                    call(&c).await?;
                    lat.push(s.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
    }
    let mut lat = Vec::with_capacity(per * workers);
    for r in running {
        lat.extend(r.await??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let in_flight = in_flight.mean();
    let n = lat.len() as f64;
    Ok(CeilingRun {
        calls_per_s: n / wall,
        latency: Latency::of(lat),
        in_flight,
        client_cpu_us_per_call: (own_cpu_s()? - cpu0) * 1e6 / n,
        server_cpu_us_per_call: (echo.cpu_s()? - server0) * 1e6 / n,
    })
}

/// Where every task of a run ended.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Accounting {
    pub(crate) tasks: u64,
    pub(crate) succeeded: u64,
    /// Failed, dead, in review or cancelled.
    pub(crate) other_finished: u64,
    /// Still queued, scheduled or running.
    pub(crate) unfinished: u64,
    /// In no state at all.
    pub(crate) lost: u64,
    /// Calls the servers executed beyond one per task.
    pub(crate) duplicates: u64,
}

impl Accounting {
    async fn of<S: Store>(queue: &Queue<S>, tasks: u64, executed: u64) -> Result<Self> {
        let s = queue.stats().await?;
        let other = s.failed + s.dead + s.review + s.cancelled;
        let unfinished = s.queued + s.scheduled + s.running;
        Ok(Self {
            tasks,
            succeeded: s.succeeded,
            other_finished: other,
            unfinished,
            lost: tasks.saturating_sub(s.succeeded + other + unfinished),
            duplicates: executed.saturating_sub(s.succeeded + other),
        })
    }

    /// Each task completed exactly once.
    pub(crate) fn clean(&self) -> bool {
        self.succeeded == self.tasks && self.lost == 0 && self.duplicates == 0
    }
}

/// Enqueues `n` echo tasks, a thousand per call.
pub(crate) async fn fill<S: Store>(queue: &Queue<S>, n: u64) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        // each with its own id: copies of one would be one task
        let batch: Vec<NewTask> = (0..k).map(|_| echo_task()).collect();
        queue.enqueue_many(&batch).await?;
        left -= k;
    }
    Ok(())
}

/// A drain: `tasks` queued (the last once every server is connected), timed from then until
/// every task is finished.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct DrainRun {
    pub(crate) tasks_per_s: f64,
    /// From starting the fleet until every server listed its tools (not in the rate).
    pub(crate) startup_ms: f64,
    pub(crate) mcpq_cpu_us_per_task: f64,
    /// Of mcpq's, the embedded store's writer thread (absent for Redis).
    pub(crate) writer_cpu_us_per_task: Option<f64>,
    pub(crate) server_cpu_us_per_task: f64,
    /// Absent for the embedded store.
    pub(crate) redis_cpu_us_per_task: Option<f64>,
    pub(crate) redis_commands_per_task: Option<f64>,
    pub(crate) redis_round_trips_per_task: Option<f64>,
    pub(crate) peak_rss_mib: f64,
    /// Mean calls in flight, read every millisecond.
    pub(crate) in_flight: f64,
    pub(crate) accounting: Accounting,
    /// Calls per second of the ceiling runs just before and just after this drain, their
    /// mean, and the drain's ratio to the mean: the machine's speed drifts (CPU steal), so each
    /// drain is set against its neighbours.
    pub(crate) ceiling_before: f64,
    pub(crate) ceiling_after: f64,
    pub(crate) ceiling_calls_per_s: f64,
    pub(crate) of_ceiling: f64,
    /// The servers' CPU per call in those two ceiling runs, their mean.
    pub(crate) ceiling_server_cpu_us_per_call: f64,
}

pub(crate) async fn drain<S: Store>(
    store: S,
    urls: &[String],
    echo: &mut EchoChild,
    mut redis: Option<&mut RedisProc>,
    tasks: u64,
) -> Result<DrainRun> {
    let queue = Queue::new(store.clone(), QueueName::default());
    // the clock starts once every server's session is up, as the ceiling's clients are
    // connected before its clock starts: the fleet starts on a paused queue, and the last
    // task, enqueued once it is resumed, wakes the fleet as any producer's would
    fill(&queue, tasks.saturating_sub(1)).await?;
    queue.pause().await?;
    let executed0 = echo.executed().await?;
    reset_peak_memory();
    let started = Instant::now();
    let fleet = Fleet::start(store, fleet_config(urls)).await?;
    ready(&fleet).await?;
    let startup_ms = started.elapsed().as_secs_f64() * 1e3;
    let server0 = echo.cpu_s()?;
    let redis0 = match redis.as_deref_mut() {
        Some(r) => Some(r.sample().await?),
        None => None,
    };
    let cpu0 = own_cpu_s()?;
    let writer0 = threads_cpu_s(WRITER_THREAD)?;
    let in_flight = InFlight::start();
    let t0 = Instant::now();
    queue.resume().await?;
    queue.enqueue(echo_task()).await?;
    let limit = Duration::from_secs(120 + tasks / 1000);
    finished(&fleet, tasks, t0 + limit).await;
    let wall = t0.elapsed().as_secs_f64();
    let in_flight = in_flight.mean();
    let cpu = own_cpu_s()? - cpu0;
    let writer = threads_cpu_s(WRITER_THREAD)?.zip(writer0).map(|(after, before)| after - before);
    let peak = own_memory()?.peak;
    let server = echo.cpu_s()? - server0;
    let redis_used = match (redis, redis0) {
        (Some(r), Some(before)) => Some(r.sample().await?.since(before)),
        _ => None,
    };
    fleet.shutdown().await?;
    let executed = echo.executed().await? - executed0;
    let accounting = Accounting::of(&queue, tasks, executed).await?;
    let per = |x: f64| x / accounting.succeeded.max(1) as f64;
    Ok(DrainRun {
        tasks_per_s: accounting.succeeded as f64 / wall,
        startup_ms,
        mcpq_cpu_us_per_task: per(cpu * 1e6),
        writer_cpu_us_per_task: writer.map(|w| per(w * 1e6)),
        server_cpu_us_per_task: per(server * 1e6),
        redis_cpu_us_per_task: redis_used.map(|r: RedisSample| per(r.cpu_s * 1e6)),
        redis_commands_per_task: redis_used.map(|r| per(r.commands as f64)),
        redis_round_trips_per_task: redis_used.map(|r| per(r.round_trips as f64)),
        peak_rss_mib: peak as f64 / (1 << 20) as f64,
        in_flight,
        accounting,
        ceiling_before: f64::NAN,
        ceiling_after: f64::NAN,
        ceiling_calls_per_s: f64::NAN,
        of_ceiling: f64::NAN,
        ceiling_server_cpu_us_per_call: f64::NAN,
    })
}

/// Waits until the fleet finished `n` tasks, or `deadline`.
async fn finished(fleet: &Fleet, n: u64, deadline: Instant) {
    loop {
        let s = fleet.stats();
        if s.succeeded + s.failed + s.dead + s.review >= n || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts `op(at)` n times, the i-th due at `at` = t0 + i / rate (started in 1 ms steps);
/// answers what each one answered. Latencies count from `at`, so a late start is the system's
/// delay too.
async fn open_loop<T, F, Fut>(rate: u32, n: u64, op: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Instant) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let t0 = Instant::now();
    let step = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut started: Vec<JoinHandle<Result<T>>> = Vec::with_capacity(n as usize);
    let mut i = 0u64;
    while i < n {
        let due = ((t0.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1).min(n);
        while i < due {
            started.push(tokio::spawn(op(t0 + step * i as u32)));
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut out = Vec::with_capacity(started.len());
    for s in started {
        out.push(s.await??);
    }
    Ok(out)
}

/// Direct calls at a fixed rate, spread over the servers in turn, at most [`concurrency`] in
/// flight per server as the fleet has (beyond that a call waits for a slot, and the wait counts).
pub(crate) async fn steady_direct(
    clients: &[Arc<McpClient>],
    rate: u32,
    duration: Duration,
) -> Result<Latency> {
    let n = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<Arc<Semaphore>> =
        clients.iter().map(|_| Arc::new(Semaphore::new(concurrency()))).collect();
    let lat = open_loop(rate, n, |at| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % clients.len();
        let (c, slots) = (clients[i].clone(), slots[i].clone());
        async move {
            let _slot = slots.acquire_owned().await?;
            call(&c).await?;
            Ok(at.elapsed())
        }
    })
    .await?;
    Ok(Latency::of(lat))
}

/// Tasks enqueued at a fixed rate: latency from the moment each was due to enqueue until a
/// subscriber of the queue's events saw it finish.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct SteadyRun {
    pub(crate) latency: Latency,
    /// Tasks finished per second, from the first due time to the last finish.
    pub(crate) achieved_per_s: f64,
    /// Every task finished, the last within a second of the last one due.
    pub(crate) sustained: bool,
    pub(crate) accounting: Accounting,
}

pub(crate) async fn steady_queued<S: Store>(
    store: S,
    urls: &[String],
    echo: &mut EchoChild,
    rate: u32,
    duration: Duration,
) -> Result<SteadyRun> {
    let n = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let q = QueueName::default();
    let queue = Queue::new(store.clone(), q.clone());
    let fleet = Fleet::start(store.clone(), fleet_config(urls)).await?;
    ready(&fleet).await?;
    let executed0 = echo.executed().await?;
    let after = store.last_event_id(&q).await?;
    let deadline = Instant::now() + duration + Duration::from_secs(60);
    let watcher = tokio::spawn(watch_finishes(store.clone(), q.clone(), after, n, deadline));
    let t0 = Instant::now();
    let enqueued = open_loop(rate, n, |at| {
        let queue = queue.clone();
        async move { Ok((queue.enqueue(echo_task()).await?, at)) }
    })
    .await?;
    let last_due = t0 + duration;
    let seen = watcher.await??;
    fleet.shutdown().await?;
    let executed = echo.executed().await? - executed0;
    let accounting = Accounting::of(&queue, n, executed).await?;
    let mut lat = Vec::with_capacity(enqueued.len());
    let mut last = t0;
    for (id, at) in &enqueued {
        if let Some(done) = seen.get(id) {
            lat.push(done.saturating_duration_since(*at));
            last = last.max(*done);
        }
    }
    let all = lat.len() as u64 == n;
    Ok(SteadyRun {
        latency: Latency::of(lat),
        achieved_per_s: n as f64 / last.duration_since(t0).as_secs_f64().max(1e-3),
        sustained: all && last.saturating_duration_since(last_due) <= Duration::from_secs(1),
        accounting,
    })
}

/// Until the servers listed their tools (the fleet routes by them).
async fn ready(fleet: &Fleet) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.servers().iter().any(|s| s.tools.is_none()) {
        if Instant::now() > deadline {
            bail!("the echo servers did not list their tools within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Reads the queue's events from `after` and notes when each task finished, until `n` did.
async fn watch_finishes<S: Store>(
    store: S,
    q: QueueName,
    mut after: Option<mcpq_queue::EventId>,
    n: u64,
    deadline: Instant,
) -> Result<HashMap<TaskId, Instant>> {
    let mut seen = HashMap::with_capacity(n as usize);
    while (seen.len() as u64) < n && Instant::now() < deadline {
        let events = store.read_events(&q, after, 1000, Some(Duration::from_millis(200))).await?;
        let now = Instant::now();
        for e in events {
            after = Some(e.id);
            let end = matches!(
                e.kind,
                EventKind::TaskSucceeded
                    | EventKind::TaskFailed
                    | EventKind::TaskDead
                    | EventKind::TaskReview
                    | EventKind::TaskCancelled
            );
            if let (true, Some(id)) = (end, e.task) {
                seen.entry(id).or_insert(now);
            }
        }
    }
    Ok(seen)
}

/// Claim latency at depth: `claims` single-task claims, each completed at once.
pub(crate) async fn claims<S: Store>(store: &S, claims: usize) -> Result<Latency> {
    let q = QueueName::default();
    let lease = Duration::from_secs(30);
    let mut lat = Vec::with_capacity(claims);
    for _ in 0..claims {
        let t = Instant::now();
        let claimed = store.claim(&q, 1, lease).await?;
        lat.push(t.elapsed());
        let c = claimed.into_iter().next().context("the queue ran dry while measuring claims")?;
        let done = Completion {
            id: c.task.id,
            token: c.token,
            server: "bench".to_owned(),
            result: json!({}),
        };
        store.complete(&q, &[done]).await?;
    }
    Ok(Latency::of(lat))
}

/// Drain rate at depth: the fleet started on a deep queue, timed over its first `n` tasks.
pub(crate) async fn drain_at_depth<S: Store>(store: S, urls: &[String], n: u64) -> Result<f64> {
    let t0 = Instant::now();
    let fleet = Fleet::start(store, fleet_config(urls)).await?;
    finished(&fleet, n, t0 + Duration::from_secs(120 + n / 1000)).await;
    let wall = t0.elapsed().as_secs_f64();
    let done = fleet.stats().succeeded;
    fleet.shutdown().await?;
    if done < n {
        bail!("only {done} of {n} tasks finished in time");
    }
    Ok(done as f64 / wall)
}
