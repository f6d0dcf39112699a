//! `hooklog-ingest` entry point: args, config, logging, signals, then [`hooklog_ingest::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hooklog_ingest::config::{Config, ConfigFile};
use tokio_util::sync::CancellationToken;

// Each request allocates its body, envelope and record; glibc malloc took
// about a tenth of ingest's CPU under the benchmark load (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Receives webhooks, verifies their signatures and stores them in Kafka.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of hooklog.toml.
    #[arg(long, env = "HOOKLOG_CONFIG", default_value = "hooklog.toml")]
    config: PathBuf,
    /// Validate the configuration (including secret references) and exit.
    #[arg(long)]
    check_config: bool,
    /// Log format: json (default when stdout is not a terminal) or pretty.
    #[arg(long, env = "HOOKLOG_LOG_FORMAT")]
    log_format: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = hooklog_schemas::telemetry::init("hooklog-ingest", args.log_format.as_deref());
    let config = Config::load(&args.config)?;
    if args.check_config {
        hooklog_ingest::build_state(&config, hooklog_ingest::http::system_clock())?;
        println!("configuration OK: {} source(s)", config.sources.len());
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(hooklog_schemas::process::cancel_on_signal(shutdown.clone()));
    hooklog_ingest::run(config, listener, shutdown).await
}
