//! The npm reference server `@modelcontextprotocol/server-everything`, an MCP server nobody here
//! wrote, as a child process for interop tests. `tests/peers/install.sh` installs it; a preload
//! pins it to 127.0.0.1 and reports the port the kernel chose. It runs in its own process group
//! with an empty environment, its output goes to a log (printed if the test failed), and the
//! whole group is killed on drop.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Where `tests/peers/install.sh` puts the server, its Node runtime and the loopback preload.
pub const PEER_DIR: &str = "/tmp/mcpq-peers/everything";
const ENTRY: &str = "node_modules/@modelcontextprotocol/server-everything/dist/index.js";
const STARTUP: Duration = Duration::from_secs(30);

/// The transport the server speaks; it serves one per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP at `/mcp`, with sessions (2025-03-26 and later).
    StreamableHttp,
    /// The legacy HTTP+SSE transport (2024-11-05): `GET /sse`, then `POST /message`.
    Sse,
}

impl Transport {
    fn arg(self) -> &'static str {
        match self {
            Self::StreamableHttp => "streamableHttp",
            Self::Sse => "sse",
        }
    }
}

/// One server-everything process owned by a test.
pub struct Everything {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    transport: Transport,
}

impl Everything {
    /// Starts the server speaking `transport` on a free port of 127.0.0.1 and waits until it
    /// answers HTTP.
    pub async fn start(transport: Transport) -> Result<Self> {
        let peer = Path::new(PEER_DIR);
        let (node, preload, entry) =
            (peer.join("bin/node"), peer.join("loopback.cjs"), peer.join(ENTRY));
        for p in [&node, &preload, &entry] {
            if !p.exists() {
                bail!(
                    "@modelcontextprotocol/server-everything is not installed ({} is missing): \
                     run tests/peers/install.sh",
                    p.display()
                );
            }
        }
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let port_file = dir.path().join("port");
        let child = Command::new(&node)
            .arg("--require")
            .arg(&preload)
            .arg(&entry)
            .arg(transport.arg())
            .current_dir(dir.path())
            // the server has a tool that prints its environment: give it none of ours
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("PORT", "0")
            .env("MCPQ_PEER_PORT_FILE", &port_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // its own group, so drop can kill anything it spawned along with it
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", node.display()))?;
        let mut server =
            Self { child, dir, addr: SocketAddr::from(([127, 0, 0, 1], 0)), transport };
        server.wait_ready(&port_file).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, port_file: &Path) -> Result<()> {
        let deadline = tokio::time::Instant::now() + STARTUP;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("server-everything exited ({status}) while starting; log:\n{}", self.log());
            }
            if self.addr.port() == 0
                && let Ok(text) = std::fs::read_to_string(port_file)
            {
                self.addr = parse_listening(&text)?;
            }
            // any HTTP answer will do (Express says 404 for `/`): the server is up
            if self.addr.port() != 0
                && http.get(format!("http://{}/", self.addr)).send().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("server-everything did not answer within {STARTUP:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The endpoint a client is configured with: `http://127.0.0.1:PORT/mcp` for Streamable
    /// HTTP, `http://127.0.0.1:PORT/sse` for the legacy transport.
    pub fn url(&self) -> String {
        match self.transport {
            Transport::StreamableHttp => format!("http://{}/mcp", self.addr),
            Transport::Sse => format!("http://{}/sse", self.addr),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

/// Parses the preload's report, `ADDRESS PORT`, and insists on loopback.
fn parse_listening(text: &str) -> Result<SocketAddr> {
    let (ip, port) = text.trim().split_once(' ').context("malformed port file")?;
    let addr = SocketAddr::new(ip.parse()?, port.parse()?);
    if !addr.ip().is_loopback() {
        bail!("server-everything listens on {addr}, not on loopback only");
    }
    Ok(addr)
}

impl Drop for Everything {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server-everything log ({}) ---\n{}", self.url(), self.log());
        }
        // The group is killed before the leader is reaped, so its id cannot have been reused.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
