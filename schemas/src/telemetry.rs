//! Logs and traces for both binaries.
//!
//! Logs: JSON lines on stderr (human-readable on a terminal or with
//! `--log-format pretty`), level from `HOOKLOG_LOG`.
//!
//! Traces: OpenTelemetry spans exported over OTLP/HTTP when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; `OTEL_EXPORTER_OTLP_PROTOCOL` picks `http/protobuf` (default) or
//! `http/json`, and the SDK reads the other `OTEL_*` variables (headers,
//! batch delays, sampler). Without an endpoint no OpenTelemetry layer is
//! installed and [`enabled`] is false, so the per-record spans of the
//! processor are not even created: off by default, with no cost.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::trace::TraceParent;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// True when spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Flushes and stops the exporter when dropped (end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn otlp_endpoint_set() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// Installs logging, and tracing export when configured. `service` is the
/// OpenTelemetry `service.name` (unless `OTEL_SERVICE_NAME` says otherwise).
pub fn init(service: &'static str, format: Option<&str>) -> Telemetry {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOOKLOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let pretty = match format {
        Some(f) => f == "pretty",
        None => std::io::stdout().is_terminal(),
    };
    let fmt = if pretty {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (provider, otel) = match otlp_endpoint_set().then(|| provider(service)) {
        Some(Ok(p)) => {
            let layer = tracing_opentelemetry::layer().with_tracer(p.tracer(service));
            (Some(p), Some(layer))
        }
        Some(Err(e)) => {
            eprintln!("{service}: OpenTelemetry export disabled: {e}");
            (None, None)
        }
        None => (None, None),
    };
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Telemetry { provider }
}

fn provider(service: &'static str) -> Result<SdkTracerProvider, String> {
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => {
            return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (use http/protobuf or http/json)"
        ))
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.into()))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Reads W3C trace context from anything with named values (HTTP or Kafka headers).
struct Lookup<'a, F: Fn(&str) -> Option<&'a str>>(F);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Lookup<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Makes `span` a child of the W3C context in `traceparent`/`tracestate`
/// (as read by `get`); no-op when export is off or the context is absent.
pub fn set_parent<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    if !enabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Lookup(get));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the W3C context in `traceparent` without making it the
/// parent: a replay starts a new trace that points at the original one.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    let get = |k: &str| (k == "traceparent").then_some(traceparent);
    let cx = TraceContextPropagator::new().extract(&Lookup(get));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The W3C context of `span` when it is exported, for the next hop's headers.
pub fn context_of(span: &tracing::Span) -> Option<TraceParent> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_string(),
        span_id: sc.span_id().to_string(),
        flags: sc.trace_flags().to_u8(),
    })
}
