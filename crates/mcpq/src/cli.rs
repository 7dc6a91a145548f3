//! The `mcpq` command line. Today: `serve`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(name = "mcpq", version, about = "A prioritized, durable work queue over MCP servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one replica: claim tasks and dispatch them to the configured MCP servers.
    Serve {
        /// The configuration file (TOML); `MCPQ_*` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// This replica's name (overrides `node`).
        #[arg(long)]
        node: Option<String>,
    },
}

/// Parses the arguments, runs the command, and maps failure to exit code 1 (2 for usage).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcpq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, node } => {
            let env: HashMap<String, String> = std::env::vars().collect();
            let mut cfg = Config::load(config.as_deref(), &env)?;
            if let Some(node) = node {
                cfg.node = node;
                cfg.validate()?;
            }
            let addr = cfg.api.addr()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("api.listen: cannot listen on {addr}: {e}"))?;
            crate::serve::run(cfg, listener, crate::serve::shutdown_signal()).await?;
            Ok(())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MCPQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
