//! The contract shared by `hooklog-ingest` and `hooklog-processor`.
//!
//! Everything that crosses the Kafka wire or is read by both binaries lives
//! here, so the two sides can never drift apart:
//!
//! - [`envelope`]: the Avro `WebhookEvent` record and its single-object codec;
//! - [`headers`]: Kafka record header names;
//! - [`topics`]: topic naming;
//! - [`kafka`]: the `[kafka]` config section and the librdkafka client config;
//! - [`config`]: loading `hooklog.toml` with `HOOKLOG_*` env overrides;
//! - [`trace`]: W3C `traceparent` parsing and generation;
//! - [`process`]: logging set-up and the shutdown signal of both binaries;
//! - [`secret_ref`]: `env:`/`file:` secret references;
//! - [`telemetry`]: JSON logs and OpenTelemetry trace export.

pub mod config;
pub mod envelope;
pub mod headers;
pub mod kafka;
pub mod process;
pub mod secret_ref;
pub mod telemetry;
pub mod topics;
pub mod trace;

pub use envelope::{DecodeError, EventView, WebhookEvent};
