//! `mcpq bench`: mcpq end to end on this machine, against the ceiling of its MCP servers. It
//! stands up a `redis-server` on loopback (AOF off, then on), K echo servers (rmcp,
//! Streamable HTTP) in a child process so this process's CPU is mcpq's alone, and the fleet in
//! this process on each store, and reports medians of several runs: drain, steady rates,
//! the ceiling, cost, and scale with depth. Every queued run accounts for each task.

mod measure;
mod procs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use mcpq_mcp::McpClient;
use mcpq_queue::{EmbeddedStore, Queue, QueueConfigs, QueueName, RedisStore, StoreConfig};
use serde::Serialize;

use measure::{Accounting, CeilingRun, DrainRun, Latency, SteadyRun};
use procs::{EchoChild, RedisProc, ServeChild};

pub(crate) use procs::echo_child;

/// A store to bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// Redis without persistence.
    Redis,
    /// Redis with its append-only file, fsync every second.
    RedisAof,
    /// The embedded store (every commit synced to disk).
    Embedded,
    /// The embedded store syncing its commits once a second (`store.sync_ms = 1000`).
    #[value(name = "embedded-1s")]
    #[serde(rename = "embedded-1s")]
    Embedded1s,
}

impl StoreKind {
    fn label(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::RedisAof => "redis+aof",
            Self::Embedded => "embedded",
            Self::Embedded1s => "embedded-1s",
        }
    }

    /// The embedded store's `store.sync_ms`.
    fn sync_ms(self) -> u64 {
        if self == Self::Embedded1s { 1000 } else { 0 }
    }
}

/// A measure to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Measure {
    /// The ceiling (direct calls), drains of queued tasks, and their cost.
    Drain,
    /// Fixed enqueue rates: latency added over direct calls at the same rate.
    Steady,
    /// Claim latency, drain rate and `mcpq serve` memory at each depth.
    Scale,
}

/// `mcpq bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measures to run.
    #[arg(long, value_delimiter = ',', default_values = ["drain", "steady", "scale"])]
    pub only: Vec<Measure>,
    /// Stores to bench.
    #[arg(long, value_delimiter = ',', default_values = ["redis", "redis-aof", "embedded", "embedded-1s"])]
    pub stores: Vec<StoreKind>,
    /// Numbers of echo servers; steady and scale use the largest.
    #[arg(long, value_delimiter = ',', default_values = ["1", "3"],
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub servers: Vec<u8>,
    /// Tasks of each drain (and calls of each ceiling run).
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    pub tasks: u64,
    /// Steady enqueue rates, tasks/s.
    #[arg(long, value_delimiter = ',', default_values = ["500", "2000", "8000"],
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rates: Vec<u32>,
    /// Seconds each steady rate runs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Queue depths of the scale measure.
    #[arg(long, value_delimiter = ',', default_values = ["1000", "1000000"],
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub depths: Vec<u64>,
    /// Tasks drained at each depth (per run).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    pub depth_tasks: u64,
    /// Runs of each measure; the figures are their medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// The redis-server program.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Single claims timed at each depth (fewer when fewer tasks are drained there).
const CLAIMS: u64 = 1000;

/// Tasks a fleet stopped after its n-th may still finish: those it held.
const SLACK: u64 = 2000;

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    machine: Machine,
    command: String,
    ceiling: Vec<CeilingRow>,
    drain: Vec<DrainRow>,
    steady: Vec<SteadyRow>,
    scale: Vec<ScaleRow>,
    /// Tasks in no state at the end of a run, over every run (always 0).
    lost: u64,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    kernel: String,
    release_build: bool,
    date: String,
}

#[derive(Debug, Serialize)]
struct CeilingRow {
    servers: usize,
    concurrency: usize,
    calls_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    client_cpu_us_per_call: f64,
    server_cpu_us_per_call: f64,
    /// Median of the runs' mean calls in flight.
    in_flight: f64,
    runs: Vec<CeilingRun>,
}

#[derive(Debug, Serialize)]
struct DrainRow {
    store: StoreKind,
    servers: usize,
    tasks: u64,
    tasks_per_s: f64,
    /// Median over the runs of a drain's rate over the mean rate of the ceiling runs just
    /// before and just after it.
    of_ceiling: f64,
    /// From starting the fleet until every server is connected: not in the rate.
    startup_ms: f64,
    mcpq_cpu_us_per_task: f64,
    /// Of mcpq's, the embedded store's writer thread (absent for Redis).
    writer_cpu_us_per_task: Option<f64>,
    server_cpu_us_per_task: f64,
    /// Median of mcpq's CPU per task over the servers' in the same run: steadier than either
    /// as the VM's speed drifts.
    mcpq_over_servers: f64,
    /// Median of the servers' CPU per task in the drain over their CPU per call in the
    /// ceiling runs beside it: what the way mcpq sends calls costs the servers.
    servers_over_ceiling: f64,
    redis_cpu_us_per_task: Option<f64>,
    redis_commands_per_task: Option<f64>,
    redis_round_trips_per_task: Option<f64>,
    peak_rss_mib: f64,
    /// Median of the runs' mean calls in flight: how full mcpq kept the slots, against the
    /// ceiling's.
    in_flight: f64,
    runs: Vec<DrainRun>,
}

#[derive(Debug, Serialize)]
struct SteadyRow {
    store: StoreKind,
    servers: usize,
    rate: u32,
    seconds: u64,
    queued: Latency,
    direct: Latency,
    /// Median p50 and p99 of the queued runs over the direct calls', ms.
    added_p50_ms: f64,
    added_p99_ms: f64,
    achieved_per_s: f64,
    /// Every run sustained the rate.
    sustained: bool,
    runs: Vec<SteadyRun>,
}

#[derive(Debug, Serialize)]
struct ScaleRow {
    store: StoreKind,
    depth: u64,
    claim: Latency,
    drain_tasks_per_s: f64,
    /// `mcpq serve` on the same store and depth, draining.
    serve_rss_mib: f64,
    serve_peak_rss_mib: f64,
    redis_used_mib: Option<f64>,
    claim_runs: Vec<Latency>,
    drain_runs: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_of<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

fn median_opt<T>(runs: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = runs.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| median(v))
}

fn median_latency(runs: &[Latency]) -> Latency {
    Latency {
        p50_us: median_of(runs, |l| l.p50_us),
        p99_us: median_of(runs, |l| l.p99_us),
        max_us: median_of(runs, |l| l.max_us),
    }
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> Result<()> {
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build: figures are not representative \
             (cargo run --release -p mcpq -- bench)",
        );
    }
    let report = measure_all(&args).await?;
    if args.json {
        crate::cli::out(serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.lost > 0 {
        bail!("{} tasks were lost", report.lost);
    }
    Ok(())
}

async fn measure_all(args: &BenchArgs) -> Result<Report> {
    let mut report = Report {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ceiling: Vec::new(),
        drain: Vec::new(),
        steady: Vec::new(),
        scale: Vec::new(),
        lost: 0,
    };
    let mut ks: Vec<usize> = args.servers.iter().map(|&k| usize::from(k)).collect();
    ks.sort_unstable();
    ks.dedup();
    let widest = ks.last().copied().context("--servers is empty")?;
    if args.stores.iter().any(|k| matches!(k, StoreKind::Redis | StoreKind::RedisAof)) {
        RedisProc::check(&args.redis_server).await?;
    }
    let wants = |m| args.only.contains(&m);
    let timer = Instant::now();
    for &k in &ks {
        let drain = wants(Measure::Drain);
        let steady = wants(Measure::Steady) && k == widest;
        let scale = wants(Measure::Scale) && k == widest;
        if !(drain || steady || scale) {
            continue;
        }
        let mut echo = EchoChild::start(k).await?;
        let clients = measure::clients(&echo.urls).await?;
        let concurrency = measure::concurrency();
        if drain {
            let mut runs = Vec::new();
            for run in 1..=args.runs {
                progress(format_args!("ceiling, {k} servers, run {run}"));
                runs.push(measure::ceiling(&clients, &echo, args.tasks as usize).await?);
            }
            report.ceiling.push(CeilingRow {
                servers: k,
                concurrency: concurrency * k,
                calls_per_s: median_of(&runs, |r| r.calls_per_s),
                p50_us: median_of(&runs, |r| r.latency.p50_us),
                p99_us: median_of(&runs, |r| r.latency.p99_us),
                client_cpu_us_per_call: median_of(&runs, |r| r.client_cpu_us_per_call),
                server_cpu_us_per_call: median_of(&runs, |r| r.server_cpu_us_per_call),
                in_flight: median_of(&runs, |r| r.in_flight),
                runs,
            });
        }
        let mut direct = Vec::new();
        if steady {
            for &rate in &args.rates {
                let mut runs = Vec::new();
                for run in 1..=args.runs {
                    progress(format_args!("steady, direct calls, {rate}/s, run {run}"));
                    let d = Duration::from_secs(args.seconds);
                    runs.push(measure::steady_direct(&clients, rate, d).await?);
                }
                direct.push(median_latency(&runs));
            }
        }
        for &kind in &args.stores {
            let mut backend = Backend::start(kind, &args.redis_server).await?;
            if drain {
                let row = drain_row(args, &mut backend, &mut echo, &clients).await?;
                report.lost += row.runs.iter().map(|r| r.accounting.lost).sum::<u64>();
                report.drain.push(row);
            }
            if steady {
                for (&rate, direct) in args.rates.iter().zip(&direct) {
                    let row = steady_row(args, &mut backend, &mut echo, k, rate, *direct).await?;
                    report.lost += row.runs.iter().map(|r| r.accounting.lost).sum::<u64>();
                    report.steady.push(row);
                }
            }
            // scale: one store of each kind (claims and depth do not depend on syncs)
            if scale && matches!(kind, StoreKind::Redis | StoreKind::Embedded) {
                for &depth in &args.depths {
                    report.scale.push(scale_row(args, &mut backend, &echo, depth).await?);
                }
            }
        }
    }
    progress(format_args!("done in {:.0} s", timer.elapsed().as_secs_f64()));
    Ok(report)
}

/// A store under test: a Redis server, or a directory for embedded stores.
enum Backend {
    Redis(StoreKind, Box<RedisProc>),
    Embedded(StoreKind, tempfile::TempDir),
}

impl Backend {
    async fn start(kind: StoreKind, redis_server: &Path) -> Result<Self> {
        Ok(match kind {
            StoreKind::Redis | StoreKind::RedisAof => Self::Redis(
                kind,
                Box::new(RedisProc::start(redis_server, kind == StoreKind::RedisAof).await?),
            ),
            StoreKind::Embedded | StoreKind::Embedded1s => {
                Self::Embedded(kind, tempfile::tempdir()?)
            }
        })
    }

    fn kind(&self) -> StoreKind {
        match self {
            Self::Redis(kind, _) | Self::Embedded(kind, _) => *kind,
        }
    }

    fn redis(&mut self) -> Option<&mut RedisProc> {
        match self {
            Self::Redis(_, r) => Some(r),
            Self::Embedded(..) => None,
        }
    }

    /// An empty Redis store.
    async fn fresh_redis(&mut self) -> Result<Option<RedisStore>> {
        let Self::Redis(_, r) = self else { return Ok(None) };
        r.reset().await?;
        let cfg = StoreConfig { redis_url: Some(r.url()), ..Default::default() };
        Ok(Some(RedisStore::open(&cfg, QueueConfigs::default()).await?))
    }

    /// A fresh embedded store's configuration.
    fn fresh_embedded(&self, name: &str) -> Option<StoreConfig> {
        match self {
            Self::Embedded(kind, dir) => Some(StoreConfig {
                path: dir.path().join(name),
                sync_ms: kind.sync_ms(),
                ..Default::default()
            }),
            Self::Redis(..) => None,
        }
    }
}

async fn open_embedded(cfg: StoreConfig) -> Result<EmbeddedStore> {
    // opening checks the file: blocking work
    let open = move || EmbeddedStore::open(&cfg, QueueConfigs::default());
    Ok(tokio::task::spawn_blocking(open).await??)
}

/// Runs `f` on a fresh store of the backend's kind.
macro_rules! on_fresh_store {
    ($backend:expr, $name:expr, |$store:ident| $body:expr) => {
        match $backend.fresh_redis().await? {
            Some($store) => $body,
            None => {
                let cfg = $backend.fresh_embedded($name).context("no directory for the store")?;
                let $store = open_embedded(cfg).await?;
                $body
            }
        }
    };
}

/// Drains, each between two ceiling runs of its own to be set against: the VM's speed drifts
/// within seconds, and the mean of a ceiling before and one after tracks the drain's moment
/// better than either alone.
async fn drain_row(
    args: &BenchArgs,
    backend: &mut Backend,
    echo: &mut EchoChild,
    clients: &[Arc<McpClient>],
) -> Result<DrainRow> {
    let kind = backend.kind();
    let k = clients.len();
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        progress(format_args!("drain, {}, {k} servers, run {run}: ceiling before", kind.label()));
        let before = measure::ceiling(clients, echo, args.tasks as usize).await?;
        progress(format_args!("drain, {}, {k} servers, run {run}", kind.label()));
        let name = format!("drain-{k}-{run}");
        let urls = echo.urls.clone();
        let r = on_fresh_store!(backend, &name, |store| {
            let redis = backend.redis();
            measure::drain(store, &urls, echo, redis, args.tasks).await?
        });
        check(&r.accounting, "drain")?;
        progress(format_args!("drain, {}, {k} servers, run {run}: ceiling after", kind.label()));
        let after = measure::ceiling(clients, echo, args.tasks as usize).await?;
        let top = (before.calls_per_s + after.calls_per_s) / 2.0;
        let servers = (before.server_cpu_us_per_call + after.server_cpu_us_per_call) / 2.0;
        runs.push(DrainRun {
            ceiling_before: before.calls_per_s,
            ceiling_after: after.calls_per_s,
            ceiling_calls_per_s: top,
            of_ceiling: r.tasks_per_s / top,
            ceiling_server_cpu_us_per_call: servers,
            ..r
        });
    }
    Ok(DrainRow {
        store: kind,
        servers: k,
        tasks: args.tasks,
        tasks_per_s: median_of(&runs, |r| r.tasks_per_s),
        of_ceiling: median_of(&runs, |r| r.of_ceiling),
        startup_ms: median_of(&runs, |r| r.startup_ms),
        mcpq_cpu_us_per_task: median_of(&runs, |r| r.mcpq_cpu_us_per_task),
        writer_cpu_us_per_task: median_opt(&runs, |r| r.writer_cpu_us_per_task),
        server_cpu_us_per_task: median_of(&runs, |r| r.server_cpu_us_per_task),
        mcpq_over_servers: median_of(&runs, |r| r.mcpq_cpu_us_per_task / r.server_cpu_us_per_task),
        servers_over_ceiling: median_of(&runs, |r| {
            r.server_cpu_us_per_task / r.ceiling_server_cpu_us_per_call
        }),
        redis_cpu_us_per_task: median_opt(&runs, |r| r.redis_cpu_us_per_task),
        redis_commands_per_task: median_opt(&runs, |r| r.redis_commands_per_task),
        redis_round_trips_per_task: median_opt(&runs, |r| r.redis_round_trips_per_task),
        peak_rss_mib: median_of(&runs, |r| r.peak_rss_mib),
        in_flight: median_of(&runs, |r| r.in_flight),
        runs,
    })
}

/// A run whose tasks did not all succeed exactly once is reported, not hidden.
fn check(a: &Accounting, what: &str) -> Result<()> {
    if !a.clean() {
        progress(format_args!("{what}: not every task succeeded exactly once: {a:?}"));
    }
    if a.lost > 0 {
        bail!("{what}: {} tasks lost: {a:?}", a.lost);
    }
    Ok(())
}

async fn steady_row(
    args: &BenchArgs,
    backend: &mut Backend,
    echo: &mut EchoChild,
    k: usize,
    rate: u32,
    direct: Latency,
) -> Result<SteadyRow> {
    let kind = backend.kind();
    let duration = Duration::from_secs(args.seconds);
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        progress(format_args!("steady, {}, {rate}/s, run {run}", kind.label()));
        let name = format!("steady-{rate}-{run}");
        let urls = echo.urls.clone();
        let r = on_fresh_store!(backend, &name, |store| {
            measure::steady_queued(store, &urls, echo, rate, duration).await?
        });
        check(&r.accounting, "steady")?;
        runs.push(r);
    }
    let queued = median_latency(&runs.iter().map(|r| r.latency).collect::<Vec<_>>());
    Ok(SteadyRow {
        store: kind,
        servers: k,
        rate,
        seconds: args.seconds,
        queued,
        direct,
        added_p50_ms: (queued.p50_us - direct.p50_us) / 1000.0,
        added_p99_ms: (queued.p99_us - direct.p99_us) / 1000.0,
        achieved_per_s: median_of(&runs, |r| r.achieved_per_s),
        sustained: runs.iter().all(|r| r.sustained),
        runs,
    })
}

async fn scale_row(
    args: &BenchArgs,
    backend: &mut Backend,
    echo: &EchoChild,
    depth: u64,
) -> Result<ScaleRow> {
    let kind = backend.kind();
    // a fleet stopped after its n tasks has finished a few more (those in flight, up to a
    // batch per server): room for them, and for the serve run's share, keeps the depth
    let claims = CLAIMS.min(args.depth_tasks);
    let per_drain = args.depth_tasks + SLACK;
    let total = depth + (claims + per_drain) * u64::from(args.runs) + per_drain;
    progress(format_args!("scale, {}, depth {depth}: enqueueing {total} tasks", kind.label()));
    let (mut claim_runs, mut drain_runs) = (Vec::new(), Vec::new());
    let name = format!("scale-{depth}");
    let urls = echo.urls.clone();
    on_fresh_store!(backend, &name, |store| {
        measure::fill(&Queue::new(store.clone(), QueueName::default()), total).await?;
        for run in 1..=args.runs {
            progress(format_args!("scale, {}, depth {depth}, run {run}", kind.label()));
            claim_runs.push(measure::claims(&store, claims as usize).await?);
            drain_runs.push(measure::drain_at_depth(store.clone(), &urls, args.depth_tasks).await?);
        }
    });
    let redis_used_mib = match backend.redis() {
        Some(r) => Some(r.used_memory().await? as f64 / (1 << 20) as f64),
        None => None,
    };
    progress(format_args!("scale, {}, depth {depth}: mcpq serve", kind.label()));
    let (serve_rss, serve_peak) = serve_memory(backend, &name, &urls, args.depth_tasks).await?;
    Ok(ScaleRow {
        store: kind,
        depth,
        claim: median_latency(&claim_runs),
        drain_tasks_per_s: median(drain_runs.clone()),
        serve_rss_mib: serve_rss as f64 / (1 << 20) as f64,
        serve_peak_rss_mib: serve_peak as f64 / (1 << 20) as f64,
        redis_used_mib,
        claim_runs,
        drain_runs,
    })
}

/// Runs `mcpq serve` on the backend's store (as the scale measure left it) until it drained
/// `n` tasks; answers its largest RSS seen and its peak RSS.
async fn serve_memory(
    backend: &mut Backend,
    name: &str,
    urls: &[String],
    n: u64,
) -> Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let mut toml = String::from("node = \"bench-serve\"\n[api]\nlisten = \"127.0.0.1:0\"\n");
    match backend {
        Backend::Redis(_, r) => toml.push_str(&format!("[store]\nredis_url = \"{}\"\n", r.url())),
        Backend::Embedded(kind, d) => {
            let path = d.path().join(name);
            wait_closed(&path).await?;
            let path = path.display().to_string();
            toml.push_str(&format!("[store]\npath = {path:?}\nsync_ms = {}\n", kind.sync_ms()));
        }
    }
    for (i, url) in urls.iter().enumerate() {
        toml.push_str(&format!("[[servers]]\nname = \"s{}\"\nurl = \"{url}\"\n", i + 1));
    }
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, toml)?;
    let serve = ServeChild::start(&config).await?;
    let http = reqwest::Client::new();
    let stats = format!("{}/v1/queues/default", serve.api);
    let succeeded = || async {
        let v: serde_json::Value =
            http.get(&stats).send().await?.error_for_status()?.json().await?;
        v.pointer("/counts/succeeded")
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("unexpected queue view {v}"))
    };
    let start = succeeded().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rss = 0;
    loop {
        rss = rss.max(serve.memory()?.rss);
        if succeeded().await? >= start + n {
            break;
        }
        if Instant::now() > deadline {
            let _ = serve.stop().await;
            bail!("mcpq serve did not drain {n} tasks within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = serve.memory()?.peak;
    serve.stop().await?;
    Ok((rss, peak))
}

/// Until the bench's own handle on the embedded store at `path` is closed (its writer thread
/// ends once the last handle is dropped).
async fn wait_closed(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = path.to_owned();
        match tokio::task::spawn_blocking(move || EmbeddedStore::open_path(p)).await? {
            // opened and dropped at once: free for the child
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the store stayed in use for 10 s");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel,
        release_build: !cfg!(debug_assertions),
        date: crate::api::wire::rfc3339(now_ms),
    }
}

fn print_report(r: &Report) {
    use crate::cli::out;
    let m = &r.machine;
    out(format_args!(
        "mcpq bench — {} CPUs ({}), Linux {}, {} build, {}",
        m.cpus,
        m.cpu_model,
        m.kernel,
        if m.release_build { "release" } else { "DEBUG" },
        m.date
    ));
    out(format_args!("command: {}", r.command));
    if !r.ceiling.is_empty() {
        out("\nceiling: echo servers called directly by the MCP client (medians)");
        out(format_args!(
            "{:>7} {:>6} {:>9} {:>10} {:>8} {:>8} {:>14} {:>14}",
            "servers",
            "conc",
            "in flight",
            "calls/s",
            "p50 ms",
            "p99 ms",
            "client µs/call",
            "server µs/call"
        ));
        for c in &r.ceiling {
            out(format_args!(
                "{:>7} {:>6} {:>9.1} {:>10.0} {:>8.2} {:>8.2} {:>14.1} {:>14.1}",
                c.servers,
                c.concurrency,
                c.in_flight,
                c.calls_per_s,
                c.p50_us / 1e3,
                c.p99_us / 1e3,
                c.client_cpu_us_per_call,
                c.server_cpu_us_per_call
            ));
        }
    }
    if !r.drain.is_empty() {
        out("\ndrain: queued tasks → all finished, and what each task cost (medians)");
        out(format_args!(
            "{:<10} {:>7} {:>8} {:>9} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9}",
            "store",
            "servers",
            "tasks",
            "tasks/s",
            "×ceil",
            "in flight",
            "start ms",
            "mcpq µs",
            "writer µs",
            "server µs",
            "mcpq/srv",
            "srv/ceil",
            "redis µs",
            "cmds",
            "trips",
            "peak MiB"
        ));
        let opt = |v: Option<f64>, p: usize| v.map_or("-".to_owned(), |v| format!("{v:.p$}"));
        for d in &r.drain {
            out(format_args!(
                "{:<10} {:>7} {:>8} {:>9.0} {:>7.2} {:>9.1} {:>8.1} {:>9.1} {:>9} {:>9.1} {:>8.2} {:>8.2} {:>9} {:>8} {:>8} {:>9.1}",
                d.store.label(),
                d.servers,
                d.tasks,
                d.tasks_per_s,
                d.of_ceiling,
                d.in_flight,
                d.startup_ms,
                d.mcpq_cpu_us_per_task,
                opt(d.writer_cpu_us_per_task, 1),
                d.server_cpu_us_per_task,
                d.mcpq_over_servers,
                d.servers_over_ceiling,
                opt(d.redis_cpu_us_per_task, 1),
                opt(d.redis_commands_per_task, 1),
                opt(d.redis_round_trips_per_task, 2),
                d.peak_rss_mib
            ));
        }
        out("  tasks/s: from every server connected (the ceiling's clients are connected before");
        out("  its clock starts too) to the last task finished; start ms: the fleet's start until");
        out("  then, not in the rate;");
        out("  ×ceil: each drain over the mean of ceiling runs just before and after it, the");
        out("  median of those ratios; in flight: mean calls in flight, read every ms (the");
        out("  ceiling keeps every slot busy);");
        out("  µs: CPU per task of mcpq (this process; writer: of that, the embedded store's");
        out("  writer thread), the servers and Redis; mcpq/srv: mcpq's over the servers' in the");
        out("  same run; srv/ceil: the servers' CPU per task over theirs per call in the ceiling");
        out("  runs beside the drain; cmds: Redis commands per task, scripts' included; trips:");
        out("  client round trips per task");
    }
    if !r.steady.is_empty() {
        out("\nsteady: enqueue at a fixed rate → finish seen by an event subscriber (medians)");
        out(format_args!(
            "{:<10} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "store",
            "rate/s",
            "secs",
            "p50 ms",
            "p99 ms",
            "max ms",
            "direct50",
            "direct99",
            "+p50 ms",
            "+p99 ms",
            "sustained"
        ));
        for s in &r.steady {
            out(format_args!(
                "{:<10} {:>7} {:>6} {:>9.2} {:>9.2} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9}",
                s.store.label(),
                s.rate,
                s.seconds,
                s.queued.p50_us / 1e3,
                s.queued.p99_us / 1e3,
                s.queued.max_us / 1e3,
                s.direct.p50_us / 1e3,
                s.direct.p99_us / 1e3,
                s.added_p50_ms,
                s.added_p99_ms,
                if s.sustained { "yes" } else { "NO" }
            ));
        }
    }
    if !r.scale.is_empty() {
        out("\nscale: with this many tasks queued (medians)");
        out(format_args!(
            "{:<10} {:>10} {:>12} {:>12} {:>10} {:>13} {:>13} {:>10}",
            "store",
            "depth",
            "claim p50 µs",
            "claim p99 µs",
            "drain/s",
            "serve RSS MiB",
            "serve peak",
            "redis MiB"
        ));
        for s in &r.scale {
            out(format_args!(
                "{:<10} {:>10} {:>12.0} {:>12.0} {:>10.0} {:>13.1} {:>13.1} {:>10}",
                s.store.label(),
                s.depth,
                s.claim.p50_us,
                s.claim.p99_us,
                s.drain_tasks_per_s,
                s.serve_rss_mib,
                s.serve_peak_rss_mib,
                s.redis_used_mib.map_or("-".to_owned(), |v| format!("{v:.0}"))
            ));
        }
    }
    out(format_args!("\nlost tasks: {}", r.lost));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_take_the_middle_run() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
        assert!(median(Vec::new()).is_nan());
        let runs = [Some(1.0), None, Some(3.0), Some(2.0)];
        assert_eq!(median_opt(&runs, |r| *r), Some(2.0));
        assert_eq!(median_opt(&[None::<f64>], |r| *r), None);
    }
}
