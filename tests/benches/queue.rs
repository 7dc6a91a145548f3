//! Micro-benchmark of the stores: 50,000 no-op tasks through enqueue (batched), claim and
//! complete (batched), against a local redis-server it starts itself and against the embedded
//! store in a fresh directory. Prints, per run and as the median of the runs: enqueue/s,
//! claim+complete/s, the concurrent enqueue→claim→complete cycle/s, and CPU per task in the
//! cycle; for Redis also commands per task (INFO commandstats, commands inside scripts
//! included), client round trips per task and bytes of Redis memory per queued task; for the
//! embedded store the file's growth per task (every commit of it is synced to disk).
//!
//! `cargo bench -p mcpq-tests --bench queue [-- --store redis|embedded|both --dir PATH
//! --cache-mb N --tasks N --runs N --workers N --batch N --enqueue-batch N --verbose]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcpq_queue::{Completion, EmbeddedStore, NewTask, QueueConfigs, QueueName, Store, StoreConfig};
use mcpq_tests::bench::{arg, median, own_cpu_s, text_arg};
use mcpq_tests::{RedisServer, redis_info as info};
use serde_json::{Value, json};

const PRODUCERS: usize = 2;
const LEASE: Duration = Duration::from_secs(60);

/// A column of a results table: heading, width, decimals.
struct Col(&'static str, usize, usize);

const REDIS_COLS: &[Col] = &[
    Col("enqueue/s", 10, 0),
    Col("claim+complete/s", 16, 0),
    Col("cycle/s", 9, 0),
    Col("client µs", 10, 1),
    Col("redis µs", 10, 1),
    Col("cmds/task", 9, 2),
    Col("rtrips/task", 11, 4),
    Col("bytes/task", 10, 1),
];

const EMBEDDED_COLS: &[Col] = &[
    Col("enqueue/s", 10, 0),
    Col("claim+complete/s", 16, 0),
    Col("cycle/s", 9, 0),
    Col("cpu µs", 10, 1),
    Col("file bytes/task", 15, 0),
];

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

/// One run against a fresh redis-server: the figures of [`REDIS_COLS`].
async fn run_redis(n: usize, shape: Shape) -> Result<Vec<f64>> {
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

    let per_task = |x: f64| x / n as f64;
    Ok(vec![
        n as f64 / enqueue_s,
        n as f64 / drain_s,
        n as f64 / cycle_s,
        per_task((client1 - client0) * 1e6),
        per_task((redis1 - redis0) * 1e6),
        per_task(all_cmds as f64),
        per_task(client_rt as f64),
        per_task(mem_after - mem_before),
    ])
}

/// Where the embedded store lives: its parent directory (the temporary one by default) and its
/// page cache.
struct Place {
    parent: Option<String>,
    cache_mb: u64,
}

fn file_size(dir: &std::path::Path) -> Result<f64> {
    Ok(std::fs::metadata(dir.join("mcpq.redb"))?.len() as f64)
}

/// One run against a fresh embedded store: the figures of [`EMBEDDED_COLS`].
async fn run_embedded(n: usize, shape: Shape, place: &Place) -> Result<Vec<f64>> {
    let tmp = match &place.parent {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    let dir = tmp.path().join("store");
    let cfg = StoreConfig { path: dir.clone(), cache_mb: place.cache_mb, ..Default::default() };
    let store = EmbeddedStore::open(&cfg, QueueConfigs::default())?;
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
    let n = n as f64;
    Ok(vec![
        n / enqueue_s,
        n / drain_s,
        n / cycle_s,
        (cpu1 - cpu0) * 1e6 / n,
        // the main queue's and the cycle's tasks, all retained
        (size1 - size0) / (2.0 * n),
    ])
}

fn print_row(label: &str, cols: &[Col], values: &[f64]) {
    let cells: Vec<String> =
        cols.iter().zip(values).map(|(Col(_, w, d), v)| format!("{v:>w$.d$}")).collect();
    println!("{label:>6} {}", cells.join(" "));
}

/// Runs `run` `runs` times, printing each run's row and then the median of each column.
fn table(
    title: &str,
    cols: &[Col],
    runs: usize,
    note: &str,
    mut run: impl FnMut() -> Result<Vec<f64>>,
) -> Result<()> {
    println!("{title}");
    let heads: Vec<String> = cols.iter().map(|Col(h, w, _)| format!("{h:>w$}")).collect();
    println!("{:>6} {}", "run", heads.join(" "));
    let mut all = Vec::new();
    for i in 1..=runs {
        let row = run()?;
        print_row(&i.to_string(), cols, &row);
        all.push(row);
    }
    let medians: Vec<f64> =
        (0..cols.len()).map(|c| median(all.iter().map(|r| r[c]).collect())).collect();
    print_row("median", cols, &medians);
    println!("({note})");
    Ok(())
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
        table(
            &format!("mcpq-queue Redis store, {setup}"),
            REDIS_COLS,
            runs,
            "client µs, redis µs: CPU per task during the cycle",
            || rt.block_on(run_redis(n, shape)),
        )?;
    }
    if which != "redis" {
        let place = Place {
            parent: text_arg("--dir"),
            cache_mb: arg("--cache-mb", StoreConfig::default().cache_mb as usize)? as u64,
        };
        let dir = place.parent.as_deref().unwrap_or("the temporary directory");
        table(
            &format!(
                "mcpq-queue embedded store (durable commits, {} MiB cache) in {dir}, {setup}",
                place.cache_mb
            ),
            EMBEDDED_COLS,
            runs,
            "cpu µs: this process's CPU per task during the cycle, writer thread included",
            || rt.block_on(run_embedded(n, shape, &place)),
        )?;
    }
    Ok(())
}
