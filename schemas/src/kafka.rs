//! The `[kafka]` config section shared by both binaries and the one place
//! the base librdkafka client config is built.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
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
    /// Hooklog's own settings. The credentials in [`SECRET_PROPERTIES`]
    /// are references (`env:NAME`, `file:PATH`), resolved when a client is
    /// made.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// librdkafka properties that hold credentials: in `hooklog.toml` they
/// must be references, like every other secret, so that the file (a
/// ConfigMap) holds none.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
];

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

    /// Applies the user's pass-through properties on top of `cfg`, with
    /// the credentials' references resolved ([`KafkaConfig::validate`]
    /// checked them at start).
    pub fn finish(&self, mut cfg: ClientConfig) -> ClientConfig {
        for (k, v) in &self.properties {
            match SECRET_PROPERTIES.contains(&k.as_str()) {
                true => cfg.set(k, crate::secret_ref::resolve(v).unwrap_or_default()),
                false => cfg.set(k, v),
            };
        }
        cfg
    }

    /// Checks that every credential in `properties` is a reference that
    /// resolves. Errors name the property, never its value.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        for (k, v) in &self.properties {
            if SECRET_PROPERTIES.contains(&k.as_str()) {
                crate::secret_ref::resolve(v).map_err(|why| {
                    crate::config::ConfigError(format!("kafka.properties.\"{k}\": {why}"))
                })?;
            }
        }
        Ok(())
    }
}

/// A `FutureProducer` that can be replaced after a delivery failure.
///
/// Dropping the old producer purges its queued and in-flight records, so it
/// never retries them; a fresh producer id starts clean. Callers reset only
/// after they stopped waiting for those records (they answered 503 or will
/// retry the whole batch), so nothing acknowledged is lost. Why: Tansu 0.6.0
/// panics on an idempotent producer's retry after a request timeout and then
/// stops serving; on Apache Kafka a reset only costs a new producer id.
#[derive(Clone)]
pub struct ResettableProducer {
    producer: Arc<RwLock<FutureProducer>>,
    config: Arc<ClientConfig>,
    last_reset: Arc<Mutex<Instant>>,
    min_interval: Duration,
}

impl ResettableProducer {
    /// Creates the producer; resets happen at most once per `min_interval`.
    pub fn new(config: ClientConfig, min_interval: Duration) -> Result<Self, KafkaError> {
        let producer: FutureProducer = config.create()?;
        Ok(Self {
            producer: Arc::new(RwLock::new(producer)),
            config: Arc::new(config),
            last_reset: Arc::new(Mutex::new(Instant::now())),
            min_interval,
        })
    }

    /// The producer to send with now.
    pub fn current(&self) -> FutureProducer {
        self.producer.read().expect("producer lock").clone()
    }

    /// Replaces the producer (rate-limited). The old one is dropped on a
    /// plain thread, since its purge and short flush may block.
    pub fn reset(&self) {
        {
            let mut last = self.last_reset.lock().expect("reset lock");
            if last.elapsed() < self.min_interval {
                return;
            }
            *last = Instant::now();
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                let old =
                    std::mem::replace(&mut *self.producer.write().expect("producer lock"), fresh);
                tracing::warn!("Kafka producer replaced after a delivery failure.");
                std::thread::spawn(move || drop(old));
            }
            Err(e) => tracing::error!(error = %e, "Could not recreate the Kafka producer."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Managed Kafka (MSK, Confluent Cloud, Redpanda Cloud, Aiven) speaks
    /// TLS, most with SASL PLAIN or SCRAM: the librdkafka linked here must
    /// have them, or `security.protocol` is refused at start.
    #[test]
    fn librdkafka_speaks_tls_and_sasl() {
        let native = ClientConfig::new().create_native_config().unwrap();
        let features = native.get("builtin.features").unwrap();
        for f in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer"] {
            assert!(
                features.split(',').any(|x| x == f),
                "{f} missing: {features}"
            );
        }
        let mut cfg = KafkaConfig::default();
        cfg.properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        cfg.properties
            .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        std::env::set_var("HOOKLOG_KAFKA_UNIT_SCRAM", "p");
        cfg.properties.insert("sasl.username".into(), "u".into());
        cfg.properties.insert(
            "sasl.password".into(),
            "env:HOOKLOG_KAFKA_UNIT_SCRAM".into(),
        );
        cfg.validate().unwrap();
        let producer: Result<FutureProducer, _> = cfg.finish(cfg.base()).create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn credentials_are_references_resolved_when_a_client_is_made() {
        let mut cfg = KafkaConfig::default();
        cfg.properties
            .insert("sasl.username".into(), "plain-is-fine".into());
        cfg.properties
            .insert("sasl.password".into(), "hunter2-inline".into());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("sasl.password"), "{err}");
        assert!(!err.contains("hunter2"), "the value is never echoed: {err}");

        std::env::set_var("HOOKLOG_KAFKA_UNIT_PASSWORD", "s3cret\n");
        cfg.properties.insert(
            "sasl.password".into(),
            "env:HOOKLOG_KAFKA_UNIT_PASSWORD".into(),
        );
        cfg.validate().unwrap();
        let client = cfg.finish(cfg.base());
        assert_eq!(client.get("sasl.password"), Some("s3cret"));
        assert_eq!(client.get("sasl.username"), Some("plain-is-fine"));
    }
}
