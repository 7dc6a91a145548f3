//! Support for fleet fault tests: `mcpq serve` replicas as child processes that a test can
//! SIGKILL, SIGSTOP and SIGCONT, and the accounting every fault test ends with — each task
//! enqueued is succeeded, failed, dead, in review or still queued, never gone, and every
//! execution the MCP servers saw is matched to its task so duplicates are counted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mcpq_queue::{QueueName, Store, Task, TaskId, TaskState};

use crate::mcp::Execution;

/// An `mcpq serve` process.
pub struct Node {
    child: Child,
    log: PathBuf,
    api: String,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `bin serve` (the e2e binary passes `env!("CARGO_BIN_EXE_mcpq-e2e-node")`) with
    /// this configuration and waits for its ready line.
    pub fn start(bin: &str, config_toml: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("mcpq.toml");
        std::fs::write(&cfg, config_toml)?;
        let log = dir.path().join("node.log");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("MCPQ_LOG", "info")
            // several nodes per test: each API on a free port, named in the ready line
            .env("MCPQ_API__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?)
            .spawn()
            .context("cannot start the mcpq node")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let mut line = String::new();
        // the ready line comes once the fleet runs; EOF means the node exited
        BufReader::new(stdout).read_line(&mut line)?;
        let api = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("api="))
            .unwrap_or_default()
            .to_owned();
        let node = Self { child, log, api, _dir: dir };
        if !line.starts_with("mcpq serving") || node.api.is_empty() {
            bail!("the node did not start: {line:?}; log:\n{}", node.log());
        }
        Ok(node)
    }

    /// The base URL of its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) -> Result<()> {
        crate::signal(self.pid(), sig)
    }

    /// SIGKILL, as a crash would, and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGSTOP: the process freezes, its connections stay open.
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    /// SIGTERM, then waits (bounded) for a clean exit; answers whether it exited cleanly.
    pub async fn terminate(&mut self, limit: Duration) -> Result<bool> {
        self.signal("TERM")?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if tokio::time::Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("node did not stop within {limit:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // a stopped process must be continued to die promptly on SIGKILL's reap
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where every enqueued task ended up, and how often its tool ran.
#[derive(Debug, Default)]
pub struct Report {
    /// Tasks enqueued.
    pub enqueued: usize,
    /// Per state.
    pub states: HashMap<TaskState, usize>,
    /// Enqueued tasks the store no longer knows: must be 0.
    pub lost: Vec<TaskId>,
    /// Tasks whose tool ran more than once, with the count.
    pub duplicated: HashMap<TaskId, usize>,
    /// Executions per task.
    pub executions: HashMap<TaskId, usize>,
    /// The tasks themselves, as the store holds them.
    pub tasks: HashMap<TaskId, Task>,
}

impl Report {
    /// Tasks in `state`.
    pub fn count(&self, state: TaskState) -> usize {
        self.states.get(&state).copied().unwrap_or(0)
    }

    /// Tasks not yet terminal.
    pub fn unfinished(&self) -> usize {
        self.tasks.values().filter(|t| !t.state.is_terminal()).count()
    }

    /// One line for the test log.
    pub fn summary(&self) -> String {
        let mut states: Vec<_> =
            self.states.iter().map(|(s, n)| format!("{}={n}", s.as_str())).collect();
        states.sort();
        format!(
            "enqueued={} {} lost={} duplicated={} (extra executions {})",
            self.enqueued,
            states.join(" "),
            self.lost.len(),
            self.duplicated.len(),
            self.duplicated.values().map(|n| n - 1).sum::<usize>()
        )
    }
}

/// Accounts for `ids` in `queue`: their states, and the executions the servers recorded.
pub async fn account<S: Store>(
    store: &S,
    queue: &QueueName,
    ids: &[TaskId],
    executions: &[Execution],
) -> Result<Report> {
    let mut r = Report { enqueued: ids.len(), ..Default::default() };
    for e in executions {
        if let Some(id) =
            e.meta.get("mcpq/task").and_then(|v| v.as_str()).and_then(|s| s.parse().ok())
        {
            *r.executions.entry(id).or_default() += 1;
        }
    }
    for id in ids {
        match store.get(queue, *id).await? {
            Some(t) => {
                *r.states.entry(t.state).or_default() += 1;
                r.tasks.insert(*id, t);
            }
            None => r.lost.push(*id),
        }
    }
    r.duplicated = r.executions.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    Ok(r)
}

/// Waits until every task in `ids` is terminal (bounded), then accounts for them.
pub async fn settle<S: Store>(
    store: &S,
    queue: &QueueName,
    ids: &[TaskId],
    limit: Duration,
    executions: impl Fn() -> Vec<Execution>,
) -> Result<Report> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // the queue-wide count is a cheap first filter; the tasks themselves decide
        let stats = store.stats(queue).await?;
        let terminal = stats.succeeded + stats.failed + stats.dead + stats.review + stats.cancelled;
        let timed_out = tokio::time::Instant::now() > deadline;
        if terminal >= ids.len() as u64 || timed_out {
            let r = account(store, queue, ids, &executions()).await?;
            if r.unfinished() == 0 || timed_out {
                return Ok(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
