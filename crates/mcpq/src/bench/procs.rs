//! The processes a benchmark stands up and reads: a `redis-server` on loopback, a child
//! process of in-process MCP echo servers (so this process's CPU is mcpq's alone), a child
//! `mcpq serve`, and this process's own CPU time and memory from `/proc`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mcpq_os::{Stat, threads_named};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::local_server::LocalServer;

/// `/proc` reports CPU time in clock ticks of this many per second on Linux.
const TICKS_PER_S: f64 = 100.0;

/// A `redis-server` on 127.0.0.1, killed on drop.
pub(crate) struct RedisProc {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
    conn: redis::aio::MultiplexedConnection,
}

/// What Redis has done since its counters were reset.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RedisSample {
    /// CPU seconds of the server (every thread).
    pub(crate) cpu_s: f64,
    /// Commands executed, those run inside scripts included.
    pub(crate) commands: u64,
    /// Commands sent by clients: script calls and stream reads (scripts issue neither).
    pub(crate) round_trips: u64,
}

impl RedisSample {
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            cpu_s: self.cpu_s - before.cpu_s,
            commands: self.commands.saturating_sub(before.commands),
            round_trips: self.round_trips.saturating_sub(before.round_trips),
        }
    }
}

impl RedisProc {
    /// Fails, naming what to do, unless `bin --version` runs: checked before a benchmark
    /// starts, so a missing redis-server is reported before minutes of other measures.
    pub(crate) async fn check(bin: &Path) -> Result<()> {
        let status = Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| Self::cannot_start(bin))?;
        ensure!(status.success(), "{}: `--version` ended with {status}", Self::cannot_start(bin));
        Ok(())
    }

    fn cannot_start(bin: &Path) -> String {
        format!(
            "cannot start {}: install redis-server (apt-get install -y redis-server), pass \
             --redis-server PATH, or bench only the embedded store (--stores embedded)",
            bin.display()
        )
    }

    /// Starts an empty server with no snapshots; `aof`: append-only file, fsync every second
    /// (what a fleet should run). Retries on another port if the one picked was taken.
    pub(crate) async fn start(bin: &Path, aof: bool) -> Result<Self> {
        let mut last = None;
        for _ in 0..5 {
            match Self::try_start(bin, aof).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    async fn try_start(bin: &Path, aof: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // a free port now; redis-server binds it a moment later (a race another process
        // rarely wins, and then this start is retried)
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
            .args(["--appendonly", if aof { "yes" } else { "no" }, "--appendfsync", "everysec"])
            .args(["--maxmemory-policy", "noeviction", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| Self::cannot_start(bin))?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
                bail!("redis-server exited ({status}):\n{log}");
            }
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                break c;
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(Self { child, _dir: dir, port, conn })
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Empties the server and resets its counters.
    pub(crate) async fn reset(&mut self) -> Result<()> {
        redis::cmd("FLUSHALL").query_async::<()>(&mut self.conn).await?;
        redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut self.conn).await?;
        Ok(())
    }

    /// The server's CPU and command counters now.
    pub(crate) async fn sample(&mut self) -> Result<RedisSample> {
        let cpu = self.info("cpu").await?;
        let num = |k: &str| -> Result<f64> {
            cpu.get(k).with_context(|| format!("INFO cpu has no {k}"))?.parse().map_err(Into::into)
        };
        let cpu_s = num("used_cpu_user")? + num("used_cpu_sys")?;
        let (mut commands, mut round_trips) = (0, 0);
        for (k, v) in self.info("commandstats").await? {
            let Some(cmd) = k.strip_prefix("cmdstat_") else { continue };
            if cmd == "info" || cmd.starts_with("config") {
                continue;
            }
            let calls: u64 = v
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .context("INFO commandstats: no calls field")?
                .parse()?;
            commands += calls;
            if matches!(cmd, "evalsha" | "eval" | "xread" | "xrange" | "xrevrange" | "ping")
                || cmd.starts_with("script")
            {
                round_trips += calls;
            }
        }
        Ok(RedisSample { cpu_s, commands, round_trips })
    }

    /// Bytes of memory the server uses.
    pub(crate) async fn used_memory(&mut self) -> Result<u64> {
        Ok(self.info("memory").await?.get("used_memory").context("used_memory")?.parse()?)
    }

    async fn info(&mut self, section: &str) -> Result<HashMap<String, String>> {
        let text: String = redis::cmd("INFO").arg(section).query_async(&mut self.conn).await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The child process serving the echo servers; ends when its stdin closes.
pub(crate) struct EchoChild {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Server URLs.
    pub(crate) urls: Vec<String>,
}

impl EchoChild {
    /// Starts `servers` echo servers in a child process (this same binary).
    pub(crate) async fn start(servers: usize) -> Result<Self> {
        let mut child = this_program(&["bench-echo", "--servers", &servers.to_string()], "error")?
            .stdin(Stdio::piped())
            .spawn()
            .context("cannot start the echo servers' process")?;
        let stdin = child.stdin.take().context("echo child stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("echo child stdout")?).lines();
        let mut urls = Vec::new();
        let read = async {
            while let Some(line) = lines.next_line().await? {
                if line == "ready" {
                    return Ok::<_, anyhow::Error>(());
                }
                urls.push(line);
            }
            bail!("the echo servers' process ended before it was ready")
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .context("the echo servers' process did not get ready within 30 s")??;
        if urls.len() != servers {
            bail!("the echo servers' process announced {urls:?}");
        }
        Ok(Self { child, stdin, lines, urls })
    }

    /// Echo calls the servers executed so far.
    pub(crate) async fn executed(&mut self) -> Result<u64> {
        self.stdin.write_all(b"count\n").await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .context("the echo servers' process did not answer")??
            .context("the echo servers' process ended")?;
        line.parse().with_context(|| format!("the echo servers' process answered {line:?}"))
    }

    /// CPU seconds the servers' process has used.
    pub(crate) fn cpu_s(&self) -> Result<f64> {
        cpu_of(&format!("/proc/{}/stat", self.child.id().context("echo child gone")?))
    }
}

/// This program again with `args`, logging at `log`, its stdout piped, killed when dropped.
fn this_program(args: &[&str], log: &str) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find this program to run it again")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).env("MCPQ_LOG", log).stdout(Stdio::piped()).kill_on_drop(true);
    Ok(cmd)
}

/// The child's side: serves `servers` echo servers, prints their URLs and `ready`, answers
/// `count` with the calls executed, and ends when stdin closes.
pub(crate) async fn echo_child(servers: usize) -> Result<()> {
    const NAMES: [&str; 8] = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"];
    let mut running = Vec::new();
    for name in NAMES.iter().take(servers) {
        let s = LocalServer::start(name).await?;
        crate::cli::out(s.url());
        running.push(s);
    }
    crate::cli::out("ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "count" {
            crate::cli::out(running.iter().map(LocalServer::echoes).sum::<u64>());
        }
    }
    Ok(())
}

/// A child `mcpq serve`, stopped with SIGTERM (killed if it lingers) when done.
pub(crate) struct ServeChild {
    child: Child,
    /// Its API's base URL.
    pub(crate) api: String,
}

impl ServeChild {
    /// Starts `mcpq serve --config config` and waits for its ready line.
    pub(crate) async fn start(config: &Path) -> Result<Self> {
        let mut child = this_program(&["serve", "--config"], "warn")?
            .arg(config)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start mcpq serve")?;
        let mut lines = BufReader::new(child.stdout.take().context("serve stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("mcpq serve printed no ready line within 60 s")??
            .context("mcpq serve ended before it was ready")?;
        let api = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("api="))
            .with_context(|| format!("unexpected ready line {ready:?}"))?
            .to_owned();
        Ok(Self { child, api })
    }

    /// Its memory now.
    pub(crate) fn memory(&self) -> Result<Memory> {
        memory_of(&format!("/proc/{}/status", self.child.id().context("serve ended")?))
    }

    /// SIGTERM, then up to 30 s for the drain.
    pub(crate) async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            // the `kill` binary: no signal API without unsafe code here
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("mcpq serve exited with {status}");
                }
                Ok(())
            }
            Err(_) => {
                self.child.start_kill()?;
                bail!("mcpq serve did not stop within 30 s of SIGTERM; killed")
            }
        }
    }
}

/// Resident memory of a process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Memory {
    pub(crate) rss: u64,
    /// The peak since the process started or its peak was last reset.
    pub(crate) peak: u64,
}

fn memory_of(status: &str) -> Result<Memory> {
    let text = std::fs::read_to_string(status).with_context(|| format!("cannot read {status}"))?;
    let kb = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("{status} has no {key}"))?;
        let n: u64 = line.trim().trim_end_matches("kB").trim().parse()?;
        Ok(n * 1024)
    };
    Ok(Memory { rss: kb("VmRSS:")?, peak: kb("VmHWM:")? })
}

/// This process's memory.
pub(crate) fn own_memory() -> Result<Memory> {
    memory_of("/proc/self/status")
}

/// Starts a new peak-memory window for this process (Linux: `clear_refs` 5 resets VmHWM).
pub(crate) fn reset_peak_memory() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        // the figure would then be the whole process's peak: say so rather than mislead
        tracing::warn!(error = %e, "cannot reset the peak RSS; peak figures cover the whole run");
    }
}

/// User + system CPU seconds from a `stat` file of `/proc`.
fn cpu_of(stat: &str) -> Result<f64> {
    let s = Stat::read(stat).with_context(|| format!("cannot read {stat}"))?;
    Ok(s.cpu_ticks as f64 / TICKS_PER_S)
}

/// CPU seconds used so far by this process's threads named `name` (as Linux keeps it: its
/// first 15 bytes) that are still running; `None` when there are none.
pub(crate) fn threads_cpu_s(name: &str) -> Result<Option<f64>> {
    let found = threads_named(name).context("cannot read /proc/self/task")?;
    let ticks = found.iter().map(|s| s.cpu_ticks).sum::<u64>();
    Ok((!found.is_empty()).then(|| ticks as f64 / TICKS_PER_S))
}

/// CPU seconds this process has used: mcpq's (the MCP servers run in another process).
pub(crate) fn own_cpu_s() -> Result<f64> {
    cpu_of("/proc/self/stat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_found_by_the_first_15_bytes_of_their_name() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (up_tx, up) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("bench-probe-thread-x".into())
            .spawn(move || {
                // the thread names itself once it runs
                up_tx.send(()).unwrap();
                rx.recv()
            })
            .unwrap();
        up.recv().unwrap();
        let found = threads_cpu_s("bench-probe-thread-x").unwrap();
        assert!(found.is_some_and(|s| s >= 0.0), "{found:?}");
        assert_eq!(threads_cpu_s("no-such-thread").unwrap(), None);
        tx.send(()).unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        assert!(own_cpu_s().unwrap() >= 0.0);
        let m = own_memory().unwrap();
        assert!(m.rss > 0 && m.peak >= m.rss, "{m:?}");
    }
}
