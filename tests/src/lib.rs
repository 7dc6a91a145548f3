//! Support for mcpq's end-to-end tests: real `redis-server` processes, one per test, on a unix
//! socket in a temporary directory, killed when dropped (their log is printed if the test
//! failed), and a polling helper for conditions that become true later.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcpq_queue::{QueueConfig, QueueConfigs, QueueName, RedisStore, StoreConfig};

pub mod auth_server;
pub mod bench;
pub mod everything;
pub mod fleet;
pub mod legacy_server;
pub mod mcp;

/// A redis-server owned by one test.
pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts a fresh, empty server (no persistence) and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("redis.sock");
        let log = dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context(
                "cannot start redis-server: install it (apt-get install -y redis-server) \
                 and make sure it is on PATH",
            )?;
        let server = Self { child, dir, socket };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(self.url())?;
        loop {
            if let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer within 10 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A plain synchronous connection for inspecting keys, `INFO` and the like.
    pub fn raw(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(self.url())?.get_connection()?)
    }

    /// Calls of one command so far (`INFO commandstats`; 0 for a command never called).
    pub fn calls(&self, cmd: &str) -> Result<u64> {
        let stats = redis_info(&mut self.raw()?, "commandstats")?;
        let Some(v) = stats.get(&format!("cmdstat_{cmd}")) else { return Ok(0) };
        let calls = v.split(',').find_map(|f| f.strip_prefix("calls="));
        Ok(calls.with_context(|| format!("no calls in {v}"))?.parse()?)
    }

    /// A store on this server with the given per-queue configurations.
    pub async fn store(&self, queues: &[(&str, QueueConfig)]) -> Result<RedisStore> {
        let cfg = StoreConfig { redis_url: Some(self.url()), ..Default::default() };
        let named = queues
            .iter()
            .map(|(n, c)| Ok((QueueName::new(*n)?, c.clone())))
            .collect::<Result<_>>()?;
        Ok(RedisStore::open(&cfg, QueueConfigs::new(named)).await?)
    }

    /// SIGSTOP: the server freezes, its connections stay open and every command waits.
    pub fn pause(&self) -> Result<()> {
        signal(self.child.id(), "STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        signal(self.child.id(), "CONT")
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- redis-server log ({}) ---\n{}", self.socket.display(), self.log());
        }
        self.kill();
    }
}

/// Sends `sig` (a name such as `STOP`) to process `pid`.
pub(crate) fn signal(pid: u32, sig: &str) -> Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()?;
    if !ok.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Sends the code's logs to the test's output (shown for failing tests), filtered by
/// `RUST_LOG` (default `warn`). Safe to call from every test.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Polls `check` every few milliseconds until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not true within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One section of a Redis server's `INFO`, field by field.
pub fn redis_info(conn: &mut redis::Connection, section: &str) -> Result<HashMap<String, String>> {
    let text: String = redis::cmd("INFO").arg(section).query(conn)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}
