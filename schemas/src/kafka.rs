//! The `[kafka]` config section shared by both binaries and the one place
//! the base librdkafka client config is built.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;

/// `[kafka]` in `hooklog.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,...`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Any librdkafka property, passed through unchanged (e.g.
    /// `"security.protocol" = "SASL_SSL"`). Applied last, so it overrides
    /// Hooklog's own settings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// A client config with the brokers set. Call [`KafkaConfig::finish`]
    /// after adding role-specific keys so user properties win.
    pub fn base(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        cfg
    }

    /// Applies the user's pass-through properties on top of `cfg`.
    pub fn finish(&self, mut cfg: ClientConfig) -> ClientConfig {
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }
}
