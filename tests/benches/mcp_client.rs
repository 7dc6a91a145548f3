//! Benchmark of the MCP client: `tools/call echo` at concurrency 1, 16 and 64 against an
//! in-process rmcp server running in a child process (so the CPU this process uses is the
//! client's alone), for the mcpq client and, on the same server, a bare rmcp client. Prints
//! calls/s, p50/p99 latency and client CPU per call, per run and as the median of the runs.
//! `mcpq` probes the era (the stateless 2026-07-28 revision here); `mcpq-s` is pinned to the
//! session revision, the like-for-like comparison if the rmcp client runs a session.
//!
//! `cargo bench -p mcpq-tests --bench mcp_client [-- --calls N --runs N]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcpq_mcp::{CallMeta, McpClient, Outcome, ServerConfig};
use mcpq_tests::bench::{arg, median, own_cpu_s};
use mcpq_tests::mcp::{McpServer, Mode};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::json;

const CONCURRENCY: [usize; 3] = [1, 16, 64];

#[derive(Clone, Copy)]
struct Figures {
    calls_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_call: f64,
}

/// One way of making a call: answers whether it succeeded.
trait Caller: Clone + Send + Sync + 'static {
    fn call(&self) -> impl std::future::Future<Output = bool> + Send;
}

#[derive(Clone)]
struct Mcpq(McpClient);

impl Caller for Mcpq {
    async fn call(&self) -> bool {
        matches!(
            self.0.call_tool("echo", json!({"text": "hi"}), &CallMeta::default()).await,
            Outcome::Executed(Ok(_))
        )
    }
}

#[derive(Clone)]
struct Bare(Arc<rmcp::service::Peer<rmcp::RoleClient>>);

impl Caller for Bare {
    async fn call(&self) -> bool {
        let args = json!({"text": "hi"}).as_object().cloned().unwrap_or_default();
        self.0.call_tool(CallToolRequestParams::new("echo").with_arguments(args)).await.is_ok()
    }
}

async fn measure<C: Caller>(caller: &C, calls: usize, concurrency: usize) -> Result<Figures> {
    let per = calls / concurrency;
    let cpu0 = own_cpu_s()?;
    let t = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let c = caller.clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let s = Instant::now();
                if !c.call().await {
                    return Err(anyhow::anyhow!("a call failed"));
                }
                lat.push(s.elapsed());
            }
            Ok(lat)
        })
    });
    let mut lat: Vec<Duration> = Vec::with_capacity(calls);
    for w in futures_util::future::join_all(workers).await {
        lat.extend(w??);
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = own_cpu_s()? - cpu0;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok(Figures {
        calls_per_s: lat.len() as f64 / wall,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        cpu_us_per_call: cpu * 1e6 / lat.len() as f64,
    })
}

/// Child mode: serve until the parent closes our stdin.
fn serve() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let server = McpServer::start(Mode::Stateless).await?;
        println!("{}", server.url());
        let mut line = String::new();
        // blocks until EOF: the parent is done (or gone)
        let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
        drop(server);
        Ok(())
    })
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--serve") {
        return serve();
    }
    let calls = arg("--calls", 20_000)?;
    let runs = arg("--runs", 3)?.max(1);
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut url = String::new();
    BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut url)?;
    let url = url.trim().to_owned();
    if !url.starts_with("http://127.0.0.1:") {
        bail!("the server child printed {url:?}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        let mcpq = Mcpq(McpClient::new(ServerConfig::new("bench", url.clone()))?);
        let mut pinned = ServerConfig::new("bench", url.clone());
        pinned.protocol_version = Some(mcpq_mcp::SESSION_VERSION.into());
        let session = Mcpq(McpClient::new(pinned)?);
        // the running service must outlive its peer handles: dropping it closes the transport
        let running = ().serve(StreamableHttpClientTransport::from_uri(url.clone())).await?;
        let bare = Bare(Arc::new(running.peer().clone()));
        // warm both (connection pools, era detection)
        let first = mcpq.0.call_tool("echo", json!({"text": "hi"}), &CallMeta::default()).await;
        if !matches!(first, Outcome::Executed(Ok(_))) {
            bail!("the mcpq client's first call: {first:?}");
        }
        let args = json!({"text": "hi"}).as_object().cloned().unwrap_or_default();
        if let Err(e) = bare.0.call_tool(CallToolRequestParams::new("echo").with_arguments(args)).await {
            bail!("the rmcp client's first call: {e}");
        }
        for _ in 0..200 {
            if !mcpq.call().await || !session.call().await || !bare.call().await {
                bail!("warm-up calls failed");
            }
        }
        println!("MCP client benchmark: {calls} tools/call echo per cell, rmcp server (stateless mode) in a child process");
        println!(
            "mcpq: {:?}; mcpq-s: {:?}; rmcp: {:?}",
            mcpq.0.era().await,
            session.0.era().await,
            running.peer_info().map(|i| i.protocol_version.to_string())
        );
        println!("{:>6} {:>5} {:>6} {:>10} {:>10} {:>10} {:>12}", "client", "conc", "run", "calls/s", "p50 µs", "p99 µs", "cpu µs/call");
        let mut table = Vec::new();
        for conc in CONCURRENCY {
            for (name, which) in [("mcpq", 0), ("mcpq-s", 1), ("rmcp", 2)] {
                let mut all = Vec::new();
                for run in 1..=runs {
                    let f = match which {
                        0 => measure(&mcpq, calls, conc).await?,
                        1 => measure(&session, calls, conc).await?,
                        _ => measure(&bare, calls, conc).await?,
                    };
                    println!("{name:>6} {conc:>5} {run:>6} {:>10.0} {:>10.0} {:>10.0} {:>12.1}", f.calls_per_s, f.p50_us, f.p99_us, f.cpu_us_per_call);
                    all.push(f);
                }
                let m = |g: fn(&Figures) -> f64| median(all.iter().map(g).collect());
                table.push((name, conc, m(|f| f.calls_per_s), m(|f| f.p50_us), m(|f| f.p99_us), m(|f| f.cpu_us_per_call)));
            }
        }
        println!("\nmedians of {runs} runs");
        println!("{:>6} {:>5} {:>10} {:>10} {:>10} {:>12} {:>16}", "client", "conc", "calls/s", "p50 µs", "p99 µs", "cpu µs/call", "mcpq vs rmcp");
        for cell in table.chunks(3) {
            let bare = &cell[2];
            for r in cell {
                let vs = if r.0 == "rmcp" { String::new() } else { format!("{:+.1}%", (r.2 / bare.2 - 1.0) * 100.0) };
                println!("{:>6} {:>5} {:>10.0} {:>10.0} {:>10.0} {:>12.1} {:>16}", r.0, r.1, r.2, r.3, r.4, r.5, vs);
            }
        }
        drop(running);
        Ok(())
    });
    drop(child.stdin.take());
    let _ = child.wait();
    result
}
