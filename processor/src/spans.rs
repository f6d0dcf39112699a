//! Per-record OpenTelemetry spans for batched work. A batch mixes records of
//! many traces, so each record gets its own `hooklog.consume` span, child of
//! the context ingest put in the record's `traceparent` header, and each
//! phase (`hooklog.apply`, `hooklog.changelog`) a child span of that. The
//! changelog record carries the changelog span's context on to downstream
//! consumers. Rebuild replays start new traces (`hooklog.replay`) that link
//! to the original context instead of extending old traces.
//!
//! Nothing here allocates a span unless trace export is on
//! ([`hooklog_schemas::telemetry::enabled`]).

use hooklog_schemas::{headers, telemetry};
use tracing::Span;

use crate::batch::Record;

/// A batch phase.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// Redis apply.
    Apply,
    /// Changelog publish.
    Changelog,
}

fn header_str<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

/// The consume spans of one batch (empty when export is off).
#[derive(Default)]
pub struct BatchSpans {
    consume: Vec<Span>,
}

impl BatchSpans {
    /// One `hooklog.consume` span per record, continuing its trace.
    pub fn live(batch: &[Record]) -> Self {
        if !telemetry::enabled() {
            return Self::default();
        }
        let consume = batch
            .iter()
            .map(|r| {
                let span = tracing::info_span!(
                    "hooklog.consume",
                    topic = %r.topic,
                    partition = r.partition,
                    offset = r.offset,
                );
                telemetry::set_parent(&span, |k| header_str(r, k));
                span
            })
            .collect();
        Self { consume }
    }

    /// One `hooklog.replay` root span per record, linked to its original trace.
    pub fn replay(batch: &[Record], projection: &str) -> Self {
        if !telemetry::enabled() {
            return Self::default();
        }
        let consume = batch
            .iter()
            .map(|r| {
                let span = tracing::info_span!(
                    parent: None,
                    "hooklog.replay",
                    projection,
                    topic = %r.topic,
                    partition = r.partition,
                    offset = r.offset,
                );
                if let Some(tp) = header_str(r, headers::TRACEPARENT) {
                    telemetry::add_link(&span, tp);
                }
                span
            })
            .collect();
        Self { consume }
    }

    /// Child spans of every record for `phase`; they end when dropped.
    pub fn phase(&self, phase: Phase) -> Vec<Span> {
        self.consume
            .iter()
            .map(|parent| match phase {
                Phase::Apply => tracing::info_span!(parent: parent, "hooklog.apply"),
                Phase::Changelog => tracing::info_span!(parent: parent, "hooklog.changelog"),
            })
            .collect()
    }

    /// The `traceparent` to put on the changelog record of record `idx`:
    /// its changelog span when exported, else the record's own header.
    pub fn traceparent(&self, phase: &[Span], batch: &[Record], idx: usize) -> Option<Vec<u8>> {
        phase
            .get(idx)
            .and_then(telemetry::context_of)
            .map(|tp| tp.header_value().into_bytes())
            .or_else(|| batch[idx].header(headers::TRACEPARENT).map(<[u8]>::to_vec))
    }
}
