//! Kafka record header names. Consumers route on these without decoding the value.

/// W3C trace context of the request that produced the record.
pub const TRACEPARENT: &str = "traceparent";
/// W3C vendor trace state, passed through unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The configured source name.
pub const SOURCE: &str = "hooklog-source";
/// The event type (may be empty).
pub const EVENT_TYPE: &str = "hooklog-event-type";
/// On `hooklog.dlq` records: why the record could not be processed.
pub const DLQ_REASON: &str = "hooklog-dlq-reason";
/// On `hooklog.dlq` records: the topic the record came from.
pub const DLQ_TOPIC: &str = "hooklog-dlq-topic";
/// On `hooklog.dlq` records: `partition/offset` of the original record.
pub const DLQ_POSITION: &str = "hooklog-dlq-position";
/// On changelog records: the projection version that produced the state.
pub const PROJECTION_VERSION: &str = "hooklog-projection-version";
/// On `hooklog.delivery.dlq` records: the subscription id.
pub const DLQ_SUBSCRIPTION: &str = "hooklog-subscription-id";
/// On `hooklog.delivery.dlq` records: attempts made.
pub const DLQ_ATTEMPTS: &str = "hooklog-attempts";
/// On DLQ records: a human-readable detail of the reason.
pub const DLQ_DETAIL: &str = "hooklog-dlq-detail";
