//! `hooklog-processor` entry point: args, config, logging, signals, then the
//! chosen command of [`hooklog_processor`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hooklog_processor::config::{Config, ConfigFile};
use hooklog_processor::{metrics::Metrics, rebuild, topics};
use tokio_util::sync::CancellationToken;

// The apply path allocates many small strings per event (entity fields,
// keys, Redis replies); glibc malloc spent about a third of the processor's
// CPU on them in the benchmark profile (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps agent state projections from the raw webhook log.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of hooklog.toml.
    #[arg(
        long,
        env = "HOOKLOG_CONFIG",
        default_value = "hooklog.toml",
        global = true
    )]
    config: PathBuf,
    /// Log format: json (default when stdout is not a terminal) or pretty.
    #[arg(long, env = "HOOKLOG_LOG_FORMAT", global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and serve (the default).
    Run,
    /// Run the subscription API and deliver events to subscribers.
    Deliver,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Create every topic the config implies and wait until they are visible.
    CreateTopics {
        /// Partitions per topic (default: processor.partitions).
        #[arg(long)]
        partitions: Option<i32>,
    },
    /// Replay the raw topics into a new version and switch readers to it.
    Rebuild {
        /// Projection name.
        #[arg(long)]
        projection: String,
        /// Seconds to keep the old version for in-flight readers before deleting it.
        #[arg(long, default_value_t = 30)]
        grace_secs: u64,
        /// Throttle the replay to this many records per second.
        #[arg(long)]
        max_records_per_sec: Option<u64>,
        /// Seconds the `building` pointer outlives this command if it is
        /// killed (live processors dual-write until then).
        #[arg(long, default_value_t = 30)]
        lease_secs: u64,
    },
    /// Delete the versions interrupted rebuilds left (a rebuild does this
    /// first anyway).
    Prune {
        /// Projection name.
        #[arg(long)]
        projection: String,
    },
    /// Rebuild into a scratch version and compare it with the live one;
    /// exits 1 on any difference.
    Verify {
        /// Projection name.
        #[arg(long)]
        projection: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry =
        hooklog_schemas::telemetry::init("hooklog-processor", args.log_format.as_deref());
    let config = Config::load(&args.config)?;
    match args.command.unwrap_or(Command::Run) {
        Command::Run => {
            let listen = config.processor.listen.clone();
            serve(&listen, "hooklog-processor", |l, stop| {
                hooklog_processor::run(config, l, stop)
            })
            .await
        }
        Command::Deliver => {
            let listen = config.delivery.listen.clone();
            serve(&listen, "hooklog-processor deliver", |l, stop| {
                hooklog_processor::delivery::run(config, l, stop)
            })
            .await
        }
        Command::CheckConfig => {
            println!(
                "configuration OK: {} projection(s), topics {:?}",
                config.projections.len(),
                config.raw_topics()
            );
            Ok(())
        }
        Command::CreateTopics { partitions } => {
            let n = partitions.unwrap_or(config.processor.partitions);
            let names = topics::create(&config, n, Duration::from_secs(30)).await?;
            println!("topics ready: {}", names.join(", "));
            Ok(())
        }
        Command::Rebuild {
            projection,
            grace_secs,
            max_records_per_sec,
            lease_secs,
        } => {
            let (store, spec) = prepare(&config, &projection).await?;
            let metrics = Arc::new(Metrics::default());
            let r = rebuild::run(
                &config,
                &store,
                &spec,
                rebuild::Mode::Switch,
                &metrics,
                rebuild::Options {
                    progress: true,
                    max_records_per_sec,
                    grace: Duration::from_secs(grace_secs),
                    lease: Duration::from_secs(lease_secs.max(1)),
                },
            )
            .await?;
            let secs = r.replay_time.as_secs_f64();
            println!(
                "rebuilt {projection}: version {} is current (was {}), {} records replayed in {secs:.1} s ({:.0} records/s)",
                r.version,
                r.previous,
                r.records,
                r.records as f64 / secs.max(0.001)
            );
            if grace_secs > 0 {
                eprintln!(
                    "keeping version {} for {grace_secs}s for in-flight readers",
                    r.previous
                );
                tokio::time::sleep(Duration::from_secs(grace_secs)).await;
            }
            let n = rebuild::delete_version(&store, &projection, r.previous).await?;
            println!("deleted version {} ({n} keys)", r.previous);
            Ok(())
        }
        Command::Prune { projection } => {
            let (store, _) = prepare(&config, &projection).await?;
            let removed = rebuild::prune(&store, &projection).await?;
            match removed.as_slice() {
                [] => println!("{projection}: nothing to delete"),
                versions => println!("{projection}: deleted versions {versions:?}"),
            }
            Ok(())
        }
        Command::Verify { projection } => {
            let (store, spec) = prepare(&config, &projection).await?;
            let metrics = Arc::new(Metrics::default());
            let r = rebuild::run(
                &config,
                &store,
                &spec,
                rebuild::Mode::Verify,
                &metrics,
                rebuild::Options {
                    progress: true,
                    ..Default::default()
                },
            )
            .await?;
            for (key, diff) in &r.differences {
                println!("DIFF {projection}/{key}: {diff}");
            }
            println!(
                "verified {projection}: {} entities compared, {} differences ({} records replayed)",
                r.compared,
                r.differences.len(),
                r.records
            );
            if !r.differences.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Binds `listen`, runs `service` until SIGINT/SIGTERM, and exits anyway
/// 20 s after the signal: a consumer close can hang while the broker is
/// gone, and offsets not committed are handled again, idempotently.
async fn serve<F, Fut>(listen: &str, name: &str, service: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(hooklog_schemas::process::cancel_on_signal(shutdown.clone()));
    let deadline = shutdown.clone();
    tokio::select! {
        r = service(listener, shutdown) => r,
        _ = async { deadline.cancelled().await; tokio::time::sleep(Duration::from_secs(20)).await } => {
            eprintln!("{name}: shutdown took over 20 s; exiting");
            std::process::exit(0);
        }
    }
}

async fn prepare(
    config: &Config,
    projection: &str,
) -> anyhow::Result<(
    hooklog_processor::projection::store::Store,
    hooklog_processor::projection::spec::ProjectionSpec,
)> {
    let spec = config
        .projection(projection)
        .with_context(|| format!("unknown projection {projection:?}"))?
        .clone();
    let store = hooklog_processor::open_store(config)
        .await
        .context("connecting to Redis")?;
    Ok((store, spec))
}
