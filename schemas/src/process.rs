//! Process plumbing both binaries share: logging set-up and the shutdown
//! signal.

use tokio_util::sync::CancellationToken;

/// JSON lines by default (and whenever stdout is not a terminal), human
/// readable with `pretty` or on a terminal. Level from `HOOKLOG_LOG`
/// (default `info`). Logs go to stderr.
pub fn init_logging(format: Option<&str>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOOKLOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let pretty = match format {
        Some(f) => f == "pretty",
        None => std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if pretty {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    token.cancel();
}
