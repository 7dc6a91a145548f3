//! Micro-benchmark of the stores: 50,000 no-op tasks through enqueue (batched), claim and
//! complete (batched), against a local redis-server it starts itself and against the embedded
//! store in a fresh directory. Prints, per run and as the median of the runs: enqueue/s,
//! claim+complete/s, the concurrent enqueue→claim→complete cycle/s, and CPU per task in the
//! cycle; for Redis also commands per task (INFO commandstats, commands inside scripts
//! included), client round trips per task and bytes of Redis memory per queued task; for the
//! embedded store the file's growth per task (every commit of it is synced to disk).
//!
//! `cargo bench -p mcpq-tests --bench queue [-- --store redis|embedded|both --dir PATH
//! --tasks N --runs N --workers N --batch N --enqueue-batch N --verbose]`

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcpq_queue::{Completion, EmbeddedStore, NewTask, QueueName, Store};
use mcpq_tests::RedisServer;
use mcpq_tests::bench::{arg, median, own_cpu_s, text_arg};
use serde_json::{Value, json};

const PRODUCERS: usize = 2;
const LEASE: Duration = Duration::from_secs(60);

#[derive(Default, Clone, Copy)]
struct Figures {
    enqueue_per_s: f64,
    drain_per_s: f64,
    cycle_per_s: f64,
    cycle_client_us: f64,
    cycle_redis_us: f64,
    commands_per_task: f64,
    round_trips_per_task: f64,
    bytes_per_queued: f64,
}

fn info(conn: &mut redis::Connection, section: &str) -> Result<HashMap<String, String>> {
    let text: String = redis::cmd("INFO").arg(section).query(conn)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// (all commands, client round trips) since the last CONFIG RESETSTAT, INFO/CONFIG excluded.
fn commands(conn: &mut redis::Connection) -> Result<(u64, u64)> {
    let stats = info(conn, "commandstats")?;
    let mut all = 0;
    let mut client = 0;
    for (k, v) in stats {
        let Some(cmd) = k.strip_prefix("cmdstat_") else { continue };
        if cmd == "info" || cmd.starts_with("config") {
            continue;
        }
        let calls: u64 =
            v.split(',').find_map(|f| f.strip_prefix("calls=")).context("calls field")?.parse()?;
        all += calls;
        // scripts never call EVALSHA or SCRIPT themselves: those came from the client
        if cmd == "evalsha" || cmd == "eval" || cmd.starts_with("script") {
            client += calls;
        }
    }
    Ok((all, client))
}

/// CPU seconds (user + system) the Redis server has used.
fn redis_cpu_s(conn: &mut redis::Connection) -> Result<f64> {
    let cpu = info(conn, "cpu")?;
    Ok(cpu["used_cpu_user"].parse::<f64>()? + cpu["used_cpu_sys"].parse::<f64>()?)
}

fn used_memory(conn: &mut redis::Connection) -> Result<f64> {
    Ok(info(conn, "memory")?["used_memory"].parse()?)
}

fn noop() -> NewTask {
    NewTask::tool("noop", Value::Null)
}

async fn enqueue_all<S: Store>(store: &S, q: &QueueName, n: usize, shape: Shape) -> Result<()> {
    let producers = PRODUCERS;
    let per = n.div_ceil(producers);
    let mut handles = Vec::new();
    for p in 0..producers {
        let (store, q) = (store.clone(), q.clone());
        let count = per.min(n.saturating_sub(p * per));
        handles.push(tokio::spawn(async move {
            let mut left = count;
            while left > 0 {
                let batch: Vec<_> = (0..left.min(shape.enqueue_batch)).map(|_| noop()).collect();
                left -= batch.len();
                store.enqueue(&q, &batch).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// How the workers claim.
#[derive(Clone, Copy)]
struct Shape {
    workers: usize,
    batch: usize,
    enqueue_batch: usize,
}

/// Claims and completes until `target` tasks are done in total.
async fn drain<S: Store>(store: &S, q: &QueueName, target: usize, shape: Shape) -> Result<()> {
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..shape.workers {
        let (store, q, done) = (store.clone(), q.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while done.load(Ordering::Relaxed) < target {
                if Instant::now() > deadline {
                    bail!("drain did not finish in 300 s");
                }
                let claimed = store.claim(&q, shape.batch, LEASE).await?;
                if claimed.is_empty() {
                    // as a dispatcher would: an empty queue is polled again shortly, not at once
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let completions: Vec<_> = claimed
                    .iter()
                    .map(|c| Completion {
                        id: c.task.id,
                        token: c.token,
                        server: "s".into(),
                        result: json!({}),
                    })
                    .collect();
                store.complete(&q, &completions).await?;
                done.fetch_add(completions.len(), Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// Producers and workers at once on a fresh queue: answers the seconds it took.
async fn cycle<S: Store>(store: &S, n: usize, shape: Shape) -> Result<f64> {
    let q2 = QueueName::new("cycle")?;
    let t = Instant::now();
    let producer = {
        let (store, q2) = (store.clone(), q2.clone());
        tokio::spawn(async move { enqueue_all(&store, &q2, n, shape).await })
    };
    drain(store, &q2, n, shape).await?;
    producer.await??;
    Ok(t.elapsed().as_secs_f64())
}

/// Checks the queue holds `n` queued tasks, or `n` succeeded ones and nothing left.
async fn expect<S: Store>(store: &S, q: &QueueName, n: usize, drained: bool) -> Result<()> {
    let stats = store.stats(q).await?;
    let ok = if drained {
        stats.succeeded == n as u64 && stats.running + stats.queued == 0
    } else {
        stats.queued == n as u64
    };
    if !ok {
        bail!("expected {n} {}, found {stats:?}", if drained { "done" } else { "queued" });
    }
    Ok(())
}

async fn run_redis(n: usize, shape: Shape) -> Result<Figures> {
    let server = RedisServer::start()?;
    let mut raw = server.raw()?;
    let store = server.store(&[]).await?;
    let q = QueueName::default();
    // load the scripts before measuring
    store.enqueue(&QueueName::new("warmup")?, &[noop()]).await?;
    store.claim(&QueueName::new("warmup")?, 1, LEASE).await?;
    store.complete(&QueueName::new("warmup")?, &[]).await?;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut raw)?;
    let mem_before = used_memory(&mut raw)?;

    let t = Instant::now();
    enqueue_all(&store, &q, n, shape).await?;
    let enqueue_s = t.elapsed().as_secs_f64();
    let mem_after = used_memory(&mut raw)?;
    let verbose = std::env::args().any(|a| a == "--verbose");
    if verbose {
        let stats = info(&mut raw, "commandstats")?;
        println!(
            "  enqueue phase: evalsha {}",
            stats.get("cmdstat_evalsha").map_or("", |s| s.as_str())
        );
    }
    expect(&store, &q, n, false).await?;

    let t = Instant::now();
    drain(&store, &q, n, shape).await?;
    let drain_s = t.elapsed().as_secs_f64();
    let (all_cmds, client_rt) = commands(&mut raw)?;
    if verbose {
        let mut lines: Vec<_> = info(&mut raw, "commandstats")?.into_iter().collect();
        lines.sort();
        for (k, v) in lines {
            println!("  {k}: {v}");
        }
        let cpu = info(&mut raw, "cpu")?;
        println!("  redis cpu: user {}s sys {}s", cpu["used_cpu_user"], cpu["used_cpu_sys"]);
    }
    expect(&store, &q, n, true).await?;

    // the full cycle, concurrently: producers and workers at once on a second queue
    let (client0, redis0) = (own_cpu_s()?, redis_cpu_s(&mut raw)?);
    let cycle_s = cycle(&store, n, shape).await?;
    let (client1, redis1) = (own_cpu_s()?, redis_cpu_s(&mut raw)?);

    Ok(Figures {
        enqueue_per_s: n as f64 / enqueue_s,
        drain_per_s: n as f64 / drain_s,
        cycle_per_s: n as f64 / cycle_s,
        cycle_client_us: (client1 - client0) * 1e6 / n as f64,
        cycle_redis_us: (redis1 - redis0) * 1e6 / n as f64,
        commands_per_task: all_cmds as f64 / n as f64,
        round_trips_per_task: client_rt as f64 / n as f64,
        bytes_per_queued: (mem_after - mem_before) / n as f64,
    })
}

/// The embedded store's figures.
#[derive(Default, Clone, Copy)]
struct Local {
    enqueue_per_s: f64,
    drain_per_s: f64,
    cycle_per_s: f64,
    cycle_cpu_us: f64,
    file_bytes_per_task: f64,
}

fn file_size(dir: &std::path::Path) -> Result<f64> {
    Ok(std::fs::metadata(dir.join("mcpq.redb"))?.len() as f64)
}

async fn run_embedded(n: usize, shape: Shape, parent: Option<&str>) -> Result<Local> {
    let tmp = match parent {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    let dir = tmp.path().join("store");
    let store = EmbeddedStore::open_path(&dir)?;
    let q = QueueName::default();
    let size0 = file_size(&dir)?;

    let t = Instant::now();
    enqueue_all(&store, &q, n, shape).await?;
    let enqueue_s = t.elapsed().as_secs_f64();
    expect(&store, &q, n, false).await?;

    let t = Instant::now();
    drain(&store, &q, n, shape).await?;
    let drain_s = t.elapsed().as_secs_f64();
    expect(&store, &q, n, true).await?;

    // this process does all the work here, the writer thread included
    let cpu0 = own_cpu_s()?;
    let cycle_s = cycle(&store, n, shape).await?;
    let cpu1 = own_cpu_s()?;
    let size1 = file_size(&dir)?;
    Ok(Local {
        enqueue_per_s: n as f64 / enqueue_s,
        drain_per_s: n as f64 / drain_s,
        cycle_per_s: n as f64 / cycle_s,
        cycle_cpu_us: (cpu1 - cpu0) * 1e6 / n as f64,
        file_bytes_per_task: (size1 - size0) / (2 * n) as f64,
    })
}

fn print_local(label: &str, f: &Local) {
    println!(
        "{:>6} {:>10.0} {:>16.0} {:>9.0} {:>10.1} {:>15.0}",
        label, f.enqueue_per_s, f.drain_per_s, f.cycle_per_s, f.cycle_cpu_us, f.file_bytes_per_task
    );
}

fn print_row(label: &str, f: &Figures) {
    println!(
        "{:>6} {:>10.0} {:>16.0} {:>9.0} {:>10.1} {:>10.1} {:>9.2} {:>11.4} {:>10.1}",
        label,
        f.enqueue_per_s,
        f.drain_per_s,
        f.cycle_per_s,
        f.cycle_client_us,
        f.cycle_redis_us,
        f.commands_per_task,
        f.round_trips_per_task,
        f.bytes_per_queued
    );
}

fn main() -> Result<()> {
    let n = arg("--tasks", 50_000)?;
    let runs = arg("--runs", 3)?.max(1);
    let shape = Shape {
        workers: arg("--workers", 4)?.max(1),
        batch: arg("--batch", 250)?.clamp(1, 1000),
        enqueue_batch: arg("--enqueue-batch", 1000)?.clamp(1, 1000),
    };
    let which = text_arg("--store").unwrap_or_else(|| "both".to_owned());
    if !["redis", "embedded", "both"].contains(&which.as_str()) {
        bail!("--store takes redis, embedded or both");
    }
    // one client thread: Redis (or the embedded store's writer) keeps the other core
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let setup = format!(
        "{n} no-op tasks, enqueue batch {} x {PRODUCERS} producers, claim/complete batch {} x {} \
         workers",
        shape.enqueue_batch, shape.batch, shape.workers
    );
    if which != "embedded" {
        bench_redis(&rt, &setup, n, runs, shape)?;
    }
    if which != "redis" {
        bench_embedded(&rt, &setup, n, runs, shape)?;
    }
    Ok(())
}

fn bench_redis(
    rt: &tokio::runtime::Runtime,
    setup: &str,
    n: usize,
    runs: usize,
    shape: Shape,
) -> Result<()> {
    println!("mcpq-queue Redis store, {setup}");
    println!(
        "{:>6} {:>10} {:>16} {:>9} {:>10} {:>10} {:>9} {:>11} {:>10}",
        "run",
        "enqueue/s",
        "claim+complete/s",
        "cycle/s",
        "client µs",
        "redis µs",
        "cmds/task",
        "rtrips/task",
        "bytes/task"
    );
    let mut all = Vec::new();
    for i in 1..=runs {
        let f = rt.block_on(run_redis(n, shape))?;
        print_row(&i.to_string(), &f);
        all.push(f);
    }
    let m = |get: fn(&Figures) -> f64| median(all.iter().map(get).collect());
    let med = Figures {
        enqueue_per_s: m(|f| f.enqueue_per_s),
        drain_per_s: m(|f| f.drain_per_s),
        cycle_per_s: m(|f| f.cycle_per_s),
        cycle_client_us: m(|f| f.cycle_client_us),
        cycle_redis_us: m(|f| f.cycle_redis_us),
        commands_per_task: m(|f| f.commands_per_task),
        round_trips_per_task: m(|f| f.round_trips_per_task),
        bytes_per_queued: m(|f| f.bytes_per_queued),
    };
    print_row("median", &med);
    println!("(client µs, redis µs: CPU per task during the cycle)");
    Ok(())
}

fn bench_embedded(
    rt: &tokio::runtime::Runtime,
    setup: &str,
    n: usize,
    runs: usize,
    shape: Shape,
) -> Result<()> {
    let parent = text_arg("--dir");
    println!(
        "mcpq-queue embedded store (durable commits) in {}, {setup}",
        parent.as_deref().unwrap_or("the temporary directory")
    );
    println!(
        "{:>6} {:>10} {:>16} {:>9} {:>10} {:>15}",
        "run", "enqueue/s", "claim+complete/s", "cycle/s", "cpu µs", "file bytes/task"
    );
    let mut all = Vec::new();
    for i in 1..=runs {
        let f = rt.block_on(run_embedded(n, shape, parent.as_deref()))?;
        print_local(&i.to_string(), &f);
        all.push(f);
    }
    let m = |get: fn(&Local) -> f64| median(all.iter().map(get).collect());
    let med = Local {
        enqueue_per_s: m(|f| f.enqueue_per_s),
        drain_per_s: m(|f| f.drain_per_s),
        cycle_per_s: m(|f| f.cycle_per_s),
        cycle_cpu_us: m(|f| f.cycle_cpu_us),
        file_bytes_per_task: m(|f| f.file_bytes_per_task),
    };
    print_local("median", &med);
    println!("(cpu µs: this process's CPU per task during the cycle, writer thread included)");
    Ok(())
}
