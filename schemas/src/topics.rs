//! Topic naming. Raw topics are the source of truth (unlimited retention);
//! state topics are compacted changelogs keyed by entity key.

/// Prefix of the raw topic of a source when the config names none.
pub const RAW_PREFIX: &str = "webhooks.raw.";
/// Prefix of a projection's compacted changelog topic.
pub const STATE_PREFIX: &str = "hooklog.state.";
/// Dead-letter topic for records the processor cannot handle.
pub const DLQ: &str = "hooklog.dlq";
/// Dead-letter topic for outbound deliveries that could not be made.
pub const DELIVERY_DLQ: &str = "hooklog.delivery.dlq";

/// The default raw topic of a source: `webhooks.raw.<source>`.
pub fn raw_topic(source: &str) -> String {
    format!("{RAW_PREFIX}{source}")
}

/// The changelog topic of a projection: `hooklog.state.<projection>`.
pub fn state_topic(projection: &str) -> String {
    format!("{STATE_PREFIX}{projection}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(raw_topic("stripe"), "webhooks.raw.stripe");
        assert_eq!(state_topic("orders"), "hooklog.state.orders");
    }
}
