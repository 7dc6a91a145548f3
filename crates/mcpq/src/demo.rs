//! `mcpq demo`: the whole system on this machine with nothing to set up. An embedded store in a
//! temp dir, three in-process MCP servers (rmcp, Streamable HTTP on 127.0.0.1), the fleet, a
//! burst of tasks of mixed priority; one server is killed mid-run and brought back. Progress
//! bars while it runs, then a summary that accounts for every task, and counts the calls each
//! server executed so duplicates are measured, not guessed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mcpq_fleet::{DispatchConfig, Fleet, FleetConfig, HealthConfig};
use mcpq_mcp::ServerConfig;
use mcpq_queue::{NewTask, Queue, QueueName, Store, TaskState};
use serde::Serialize;
use serde_json::json;

use crate::local_server::{Calls, LocalServer, idempotent};

/// How long the whole demo may take before it gives up and says so.
const LIMIT: Duration = Duration::from_secs(120);
const SERVERS: [&str; 3] = ["alpha", "beta", "gamma"];

/// `mcpq demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tasks to run.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub tasks: u32,
    /// Print the summary as JSON on stdout (progress bars are not drawn).
    #[arg(long)]
    pub json: bool,
}

/// What the demo measured; every task is in exactly one of the state counts.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Tasks enqueued.
    pub tasks: u64,
    /// Per state at the end.
    pub succeeded: u64,
    /// Failed for good.
    pub failed: u64,
    /// Dead after their last attempt.
    pub dead: u64,
    /// Parked for a person: a non-idempotent call whose outcome is unknown.
    pub review: u64,
    /// Not finished (none, unless the demo ran out of time).
    pub unfinished: u64,
    /// Tasks in no state at all (always 0: the point of the exercise).
    pub lost: u64,
    /// Failed attempts retried.
    pub retried: u64,
    /// In-flight tasks moved off the killed server.
    pub redistributed: u64,
    /// Calls the servers executed beyond one per task.
    pub duplicates: u64,
    /// Of those, calls of tasks not marked idempotent (mcpq never repeats those on purpose).
    pub duplicates_non_idempotent: u64,
    /// Calls the servers executed.
    pub executions: u64,
    /// Executions per server.
    pub per_server: HashMap<String, u64>,
    /// Enqueue-to-finish latency of succeeded tasks, ms.
    pub p50_ms: u64,
    /// 99th percentile of the same.
    pub p99_ms: u64,
    /// p50 per priority, ms.
    pub p50_by_priority_ms: Vec<(i32, u64)>,
    /// Wall time, ms.
    pub elapsed_ms: u64,
}

/// Runs the demo on the embedded store in a temp dir.
pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temp dir for the demo's store")?;
    let path = dir.path().to_owned();
    // opening checks the file: blocking work
    let store = tokio::task::spawn_blocking(move || mcpq_queue::EmbeddedStore::open_path(path))
        .await?
        .context("cannot open the embedded store")?;
    let summary = run_on(store, &args).await?;
    if args.json {
        crate::cli::out(serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    if summary.lost > 0 || summary.unfinished > 0 {
        bail!("{} tasks lost, {} unfinished", summary.lost, summary.unfinished);
    }
    Ok(())
}

/// Runs the demo on `store` and answers its summary.
pub async fn run_on<S: Store>(store: S, args: &DemoArgs) -> Result<Summary> {
    let started = Instant::now();
    let mut servers = Vec::new();
    for name in SERVERS {
        servers.push(LocalServer::start(name).await?);
    }
    let cfg = FleetConfig {
        node: "demo".to_owned(),
        queues: vec![QueueName::default()],
        health: HealthConfig {
            interval_ms: 200,
            degraded_after: 1,
            offline_after: 2,
            probe_timeout_ms: 300,
        },
        dispatch: DispatchConfig {
            lease_ms: 5000,
            reap_interval_ms: 200,
            poll_ms: 50,
            wait_ms: 200,
            drain_timeout_ms: 2000,
            ..DispatchConfig::default()
        },
        servers: servers
            .iter()
            .map(|s| {
                let mut c = ServerConfig::new(s.name, s.url());
                c.max_concurrency = 24;
                c
            })
            .collect(),
    };
    let fleet = Fleet::start(store.clone(), cfg).await?;
    let queue = Queue::new(store.clone(), QueueName::default());

    let total = u64::from(args.tasks);
    let tasks: Vec<NewTask> = (0..total)
        .map(|n| {
            let priority = [0, 5, 10][(n % 3) as usize];
            // calls of 5-45 ms, half of them safe to repeat
            NewTask::tool("work", json!({ "n": n, "ms": 5 + (n * 7919) % 41 }))
                .priority(priority)
                .idempotent(idempotent(n))
                .max_attempts(5)
        })
        .collect();
    for chunk in tasks.chunks(1000) {
        queue.enqueue_many(chunk).await?;
    }

    let bars = Bars::new(args.json, total);
    let (mut killed, mut revived) = (false, false);
    let deadline = Instant::now() + LIMIT;
    loop {
        let stats = queue.stats().await?;
        let done = total - (stats.queued + stats.scheduled + stats.running).min(total);
        bars.update(done, &fleet, &servers);
        if !killed && done >= total * 3 / 10 {
            servers[1].stop().await;
            bars.note(format!("killed {} with calls in flight", servers[1].name));
            killed = true;
        }
        if killed && !revived && done >= total * 6 / 10 {
            servers[1].restart().await?;
            bars.note(format!("{} is back", servers[1].name));
            revived = true;
        }
        if done >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bars.finish();
    let fleet_stats = fleet.stats();
    fleet.shutdown().await?;

    let stats = queue.stats().await?;
    let mut latencies: HashMap<i32, Vec<u64>> = HashMap::new();
    let mut all = Vec::new();
    let mut cursor = 0;
    for _ in 0..=(total / 1000 + 1) {
        let page = queue.list(TaskState::Succeeded, cursor, 1000).await?;
        for t in &page.tasks {
            let ms = t.finished_at_ms.unwrap_or(t.created_at_ms).saturating_sub(t.created_at_ms);
            latencies.entry(t.priority).or_default().push(ms);
            all.push(ms);
        }
        match page.next_cursor {
            Some(c) => cursor = c,
            None => break,
        }
    }
    all.sort_unstable();
    let mut by_priority: Vec<(i32, u64)> = latencies
        .into_iter()
        .map(|(p, mut v)| {
            v.sort_unstable();
            (p, percentile(&v, 50))
        })
        .collect();
    by_priority.sort_unstable_by_key(|(p, _)| std::cmp::Reverse(*p));
    let mut per_server = HashMap::new();
    let mut executed: HashMap<String, Calls> = HashMap::new();
    for s in &servers {
        let calls = s.calls();
        per_server.insert(s.name.to_owned(), calls.values().map(|c| c.count).sum());
        for (task, c) in calls {
            let e = executed.entry(task).or_insert(Calls { count: 0, idempotent: c.idempotent });
            e.count += c.count;
        }
        s.stop().await;
    }
    let executions: u64 = executed.values().map(|c| c.count).sum();
    let duplicates_non_idempotent: u64 =
        executed.values().filter(|c| !c.idempotent).map(|c| c.count.saturating_sub(1)).sum();
    let unfinished = stats.queued + stats.scheduled + stats.running;
    let accounted =
        stats.succeeded + stats.failed + stats.dead + stats.review + stats.cancelled + unfinished;
    Ok(Summary {
        tasks: total,
        succeeded: stats.succeeded,
        failed: stats.failed,
        dead: stats.dead,
        review: stats.review,
        unfinished,
        lost: total.saturating_sub(accounted),
        retried: fleet_stats.retried,
        redistributed: fleet_stats.redistributed,
        duplicates: executions - executed.len() as u64,
        duplicates_non_idempotent,
        executions,
        per_server,
        p50_ms: percentile(&all, 50),
        p99_ms: percentile(&all, 99),
        p50_by_priority_ms: by_priority,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn print_summary(s: &Summary) {
    use crate::cli::out;
    out("");
    out(format_args!("mcpq demo: {} tasks in {:.1} s", s.tasks, s.elapsed_ms as f64 / 1000.0));
    out(format_args!("  succeeded      {}", s.succeeded));
    out(format_args!(
        "  review         {}  (non-idempotent calls cut off on the killed server: outcome unknown)",
        s.review
    ));
    out(format_args!("  failed / dead  {} / {}", s.failed, s.dead));
    out(format_args!("  unfinished     {}", s.unfinished));
    out(format_args!("  lost           {}  (every task accounted for)", s.lost));
    out(format_args!("  retried        {}", s.retried));
    out(format_args!(
        "  redistributed  {}  (in flight on the killed server, moved to the others)",
        s.redistributed
    ));
    out(format_args!(
        "  duplicates     {}  (executions beyond one per task; of tasks not idempotent: {})",
        s.duplicates, s.duplicates_non_idempotent
    ));
    let mut per: Vec<_> = s.per_server.iter().collect();
    per.sort();
    let per: Vec<String> = per.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out(format_args!("  executions     {}  ({})", s.executions, per.join(", ")));
    out(format_args!(
        "  latency        p50 {} ms, p99 {} ms (enqueue to finish)",
        s.p50_ms, s.p99_ms
    ));
    let by: Vec<String> =
        s.p50_by_priority_ms.iter().map(|(p, ms)| format!("priority {p}: {ms} ms")).collect();
    out(format_args!("  p50 by priority {}", by.join(", ")));
    out("");
    out(format_args!(
        "Next: run a replica with `mcpq serve --config config/mcpq.toml` and enqueue with"
    ));
    out(format_args!("`mcpq enqueue --tool NAME --args '{{...}}' --wait`."));
}

/// Progress bars: one for tasks, one line per server.
struct Bars {
    multi: MultiProgress,
    tasks: ProgressBar,
    servers: Vec<ProgressBar>,
}

impl Bars {
    fn new(hidden: bool, total: u64) -> Self {
        let target =
            if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
        let multi = MultiProgress::with_draw_target(target);
        let tasks = multi.add(ProgressBar::new(total));
        tasks.set_style(
            ProgressStyle::with_template("tasks   [{bar:40}] {pos}/{len} {per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let servers = SERVERS
            .iter()
            .map(|_| {
                let b = multi.add(ProgressBar::new(1));
                b.set_style(
                    ProgressStyle::with_template("{msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            })
            .collect();
        Self { multi, tasks, servers }
    }

    fn update(&self, done: u64, fleet: &Fleet, servers: &[LocalServer]) {
        self.tasks.set_position(done);
        let status = fleet.servers();
        for (bar, demo) in self.servers.iter().zip(servers) {
            let Some(s) = status.iter().find(|s| s.name == demo.name) else { continue };
            let calls: u64 = demo.calls().values().map(|c| c.count).sum();
            bar.set_message(format!(
                "{:<7} {:<9} in flight {:>2}  executed {:>5}",
                s.name,
                crate::api::wire::health_name(s.health),
                s.in_flight,
                calls
            ));
        }
    }

    fn note(&self, msg: String) {
        self.tasks.set_message(msg.clone());
        if self.multi.is_hidden() {
            tracing::info!("{msg}");
        }
    }

    fn finish(&self) {
        self.tasks.finish();
        for b in &self.servers {
            b.finish();
        }
    }
}
