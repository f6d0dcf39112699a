//! `hooklog.toml` as the processor sees it: `[kafka]`, `[processor]`,
//! `[redis]`, `[[projection]]`, `[delivery]`, and the `name`/`topic` of each `[[source]]`
//! (the raw topics to consume). Ingest's `[server]` table is ignored.

use hooklog_schemas::kafka::KafkaConfig;
use hooklog_schemas::topics;
use serde::de::IgnoredAny;
use serde::Deserialize;

pub use hooklog_schemas::config::{ConfigError, ConfigFile};

use crate::projection::spec::ProjectionSpec;

/// The whole processor configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka cluster.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Processor settings.
    #[serde(default)]
    pub processor: ProcessorConfig,
    /// Redis.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Sources (only `name` and `topic` are read here).
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceRef>,
    /// Projection definitions.
    #[serde(default, rename = "projection")]
    pub projections: Vec<ProjectionSpec>,
    /// Outbound delivery (`hooklog-processor deliver`).
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default, rename = "server")]
    _server: Option<IgnoredAny>,
}

/// `[processor]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Read API / health / metrics listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Consumer group of the live processors.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Records per Redis pipeline / commit step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Bytes of records (keys, values, headers) per batch: a batch ends at
    /// `batch_size` records or at this many bytes, whichever comes first,
    /// so large records cannot make the batches in flight outgrow memory.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// How long a batch waits to fill before it is processed anyway.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// How long an event id is remembered per projection version. Must
    /// exceed the longest provider retry window (Stripe: 3 days) and any
    /// consumer redelivery; see docs/processor.md.
    #[serde(default = "default_dedup_window_secs")]
    pub dedup_window_secs: u64,
    /// Partitions used by `create-topics`.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Bearer keys of the admin endpoints (`POST
    /// /v1/projections/{name}/rebuild`), as `env:`/`file:` references.
    /// None (the default): those endpoints answer 403; the read API stays
    /// open either way.
    #[serde(default)]
    pub admin_keys: Vec<String>,
}

fn default_listen() -> String {
    "0.0.0.0:8081".into()
}
fn default_group_id() -> String {
    "hooklog-processor".into()
}
const fn default_batch_size() -> usize {
    500
}
const fn default_batch_max_bytes() -> usize {
    crate::batch::DEFAULT_MAX_BYTES
}
const fn default_batch_wait_ms() -> u64 {
    20
}
const fn default_dedup_window_secs() -> u64 {
    30 * 24 * 3600
}
const fn default_partitions() -> i32 {
    6
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            group_id: default_group_id(),
            batch_size: default_batch_size(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_wait_ms: default_batch_wait_ms(),
            dedup_window_secs: default_dedup_window_secs(),
            partitions: default_partitions(),
            admin_keys: Vec::new(),
        }
    }
}

/// `[redis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key Hooklog writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Write a batch first as a `WATCH`ed `MULTI`/`EXEC` (docs/processor.md);
    /// false for Redis-compatible servers or proxies without them, where
    /// every write goes through the commit script.
    #[serde(default = "default_watched_commits")]
    pub watched_commits: bool,
    /// Replicas that must have each apply's writes before its offsets are
    /// committed (`WAIT`); 0 (the default) commits once the primary has
    /// them. Redis replicates asynchronously: with 0, a failover to a
    /// replica that missed the last writes loses their updates for good
    /// (their offsets were committed), until a rebuild.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long an apply waits for those replicas before it counts as
    /// failed and is retried (the processor pauses meanwhile).
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
    /// For a `rediss://` URL whose server certificate is not signed by a
    /// CA the system trusts: the PEM file of the CA that signed it.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_key_prefix() -> String {
    "hooklog:".into()
}
const fn default_watched_commits() -> bool {
    true
}
const fn default_wait_timeout_ms() -> u64 {
    1000
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
            key_prefix: default_key_prefix(),
            watched_commits: default_watched_commits(),
            wait_replicas: 0,
            wait_timeout_ms: default_wait_timeout_ms(),
            tls_ca_file: None,
        }
    }
}

/// `[delivery]`: the subscription API and outbound delivery of
/// `hooklog-processor deliver` (see docs/delivery.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Subscription API / health / metrics listen address.
    #[serde(default = "default_delivery_listen")]
    pub listen: String,
    /// Consumer group of the deliverers (independent of the processors').
    #[serde(default = "default_delivery_group_id")]
    pub group_id: String,
    /// Bearer API keys of the subscription API, as `env:`/`file:` references.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Delay before each retry, in seconds; after the last one the attempt
    /// goes to `hooklog.delivery.dlq`. The default spans about 27 hours.
    #[serde(default = "default_retry_schedule_secs")]
    pub retry_schedule_secs: Vec<u64>,
    /// Per-attempt timeout (connect + response).
    #[serde(default = "default_delivery_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts in flight per subscription (per deliverer replica).
    #[serde(default = "default_endpoint_concurrency")]
    pub endpoint_concurrency: usize,
    /// Attempts in flight in all (per deliverer replica).
    #[serde(default = "default_delivery_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of event bodies in flight in all (per deliverer replica): an
    /// attempt whose body has no room waits, unattempted, so large bodies
    /// cannot make the attempts in flight outgrow memory.
    #[serde(default = "default_delivery_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// An endpoint failing without a single success for this long is
    /// disabled automatically.
    #[serde(default = "default_disable_after_secs")]
    pub disable_after_failing_secs: u64,
    /// How long the previous secret keeps signing after a rotation.
    #[serde(default = "default_rotation_grace_secs")]
    pub rotation_grace_secs: u64,
    /// How long delivery state (and the event body) is kept: the window in
    /// which a redelivered event id is not delivered again. Must exceed the
    /// retry schedule.
    #[serde(default = "default_delivery_retention_secs")]
    pub retention_secs: u64,
    /// Allow `http://` callback URLs (local runs and tests only).
    #[serde(default)]
    pub allow_http: bool,
    /// Allow callbacks resolving to loopback, private, link-local or other
    /// non-public addresses (local runs and tests only).
    #[serde(default)]
    pub allow_private_networks: bool,
}

fn default_delivery_listen() -> String {
    "0.0.0.0:8082".into()
}
fn default_delivery_group_id() -> String {
    "hooklog-delivery".into()
}
fn default_retry_schedule_secs() -> Vec<u64> {
    vec![5, 300, 1800, 7200, 18000, 36000, 36000]
}
const fn default_delivery_timeout_ms() -> u64 {
    10_000
}
const fn default_endpoint_concurrency() -> usize {
    8
}
const fn default_delivery_max_in_flight() -> usize {
    512
}
const fn default_delivery_max_in_flight_bytes() -> usize {
    64 * 1024 * 1024
}
const fn default_disable_after_secs() -> u64 {
    5 * 24 * 3600
}
const fn default_rotation_grace_secs() -> u64 {
    24 * 3600
}
const fn default_delivery_retention_secs() -> u64 {
    7 * 24 * 3600
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            listen: default_delivery_listen(),
            group_id: default_delivery_group_id(),
            api_keys: Vec::new(),
            retry_schedule_secs: default_retry_schedule_secs(),
            timeout_ms: default_delivery_timeout_ms(),
            endpoint_concurrency: default_endpoint_concurrency(),
            max_in_flight: default_delivery_max_in_flight(),
            max_in_flight_bytes: default_delivery_max_in_flight_bytes(),
            disable_after_failing_secs: default_disable_after_secs(),
            rotation_grace_secs: default_rotation_grace_secs(),
            retention_secs: default_delivery_retention_secs(),
            allow_http: false,
            allow_private_networks: false,
        }
    }
}

impl DeliveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(format!("delivery.{m}")));
        if self.timeout_ms == 0 {
            return err("timeout_ms must be > 0");
        }
        if self.endpoint_concurrency == 0
            || self.max_in_flight == 0
            || self.max_in_flight_bytes == 0
        {
            return err("endpoint_concurrency, max_in_flight and max_in_flight_bytes must be > 0");
        }
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_in_flight > most || self.max_in_flight_bytes > most {
            return err("max_in_flight and max_in_flight_bytes are too large");
        }
        let schedule: u64 = self.retry_schedule_secs.iter().sum();
        if self.retention_secs <= schedule {
            return err("retention_secs must exceed the sum of retry_schedule_secs");
        }
        Ok(())
    }
}

/// The part of a `[[source]]` the processor needs.
#[derive(Debug, Deserialize)]
pub struct SourceRef {
    /// Source name.
    pub name: String,
    /// Raw topic; default `webhooks.raw.<name>`.
    #[serde(default)]
    pub topic: Option<String>,
}

impl ConfigFile for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if self.processor.batch_size == 0 {
            return Err(ConfigError("processor.batch_size must be > 0".into()));
        }
        if self.processor.batch_max_bytes == 0 {
            return Err(ConfigError("processor.batch_max_bytes must be > 0".into()));
        }
        if let Some(ca) = &self.redis.tls_ca_file {
            if !self.redis.url.starts_with("rediss://") {
                return Err(ConfigError(
                    "redis.tls_ca_file is set but redis.url is not rediss://".into(),
                ));
            }
            if !std::path::Path::new(ca).is_file() {
                return Err(ConfigError(format!(
                    "redis.tls_ca_file: {ca} is not a readable file"
                )));
            }
        }
        if self.redis.wait_replicas > 0 && self.redis.wait_timeout_ms == 0 {
            return Err(ConfigError(
                "redis.wait_timeout_ms must be > 0 when redis.wait_replicas is set (0 would wait forever)".into(),
            ));
        }
        self.delivery.validate()?;
        let mut names = std::collections::HashSet::new();
        for p in &self.projections {
            p.validate().map_err(ConfigError)?;
            if !names.insert(&p.name) {
                return Err(ConfigError(format!(
                    "projection[{}]: duplicate projection name",
                    p.name
                )));
            }
            for r in &p.rules {
                if let Some(s) = &r.source {
                    if !self.sources.iter().any(|src| &src.name == s) {
                        return Err(ConfigError(format!(
                            "projection[{}].rule.source: unknown source {s:?}",
                            p.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// The raw topics to consume.
    pub fn raw_topics(&self) -> Vec<String> {
        self.topics_of(self.sources.iter())
    }

    /// The raw topics that can hold events `spec` applies: those of the
    /// sources its rules name, or every raw topic when a rule takes any
    /// source. A rebuild of `spec` replays only these.
    pub fn raw_topics_of(&self, spec: &ProjectionSpec) -> Vec<String> {
        if spec.rules.iter().any(|r| r.source.is_none()) {
            return self.raw_topics();
        }
        let named = |s: &&SourceRef| {
            spec.rules
                .iter()
                .any(|r| r.source.as_ref() == Some(&s.name))
        };
        self.topics_of(self.sources.iter().filter(named))
    }

    fn topics_of<'a>(&self, sources: impl Iterator<Item = &'a SourceRef>) -> Vec<String> {
        let mut t: Vec<String> = sources
            .map(|s| {
                s.topic
                    .clone()
                    .unwrap_or_else(|| topics::raw_topic(&s.name))
            })
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// A projection by name.
    pub fn projection(&self, name: &str) -> Option<&ProjectionSpec> {
        self.projections.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_the_file_with_ingest() {
        let cfg = Config::from_toml(
            r#"
            [server]
            listen = "0.0.0.0:8080"
            [[source]]
            name = "stripe"
            scheme = "stripe"
            secrets = ["env:X"]
            [[projection]]
            name = "charges"
            [[projection.rule]]
            source = "stripe"
            event_type = "charge.succeeded"
            key = "/data/object/id"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.raw_topics(), vec!["webhooks.raw.stripe".to_string()]);
        assert_eq!(cfg.processor.batch_size, 500);
        assert_eq!(cfg.processor.batch_max_bytes, 16 * 1024 * 1024);
        assert!(cfg.redis.watched_commits);
        let cfg = Config::from_toml("[redis]\nwatched_commits = false").unwrap();
        assert!(!cfg.redis.watched_commits);
    }

    #[test]
    fn a_projection_replays_only_the_topics_of_the_sources_it_names() {
        let cfg = Config::from_toml(
            r#"
            source = [
                { name = "stripe" },
                { name = "shop", topic = "shared.raw" },
                { name = "shop-eu", topic = "shared.raw" },
                { name = "github" },
            ]
            [[projection]]
            name = "charges"
            rule = [
                { source = "stripe", event_type = "charge.succeeded", key = "/id" },
                { source = "shop-eu", event_type = "order.paid", key = "/id" },
            ]
            [[projection]]
            name = "anything"
            rule = [
                { source = "stripe", event_type = "charge.succeeded", key = "/id" },
                { event_type = "push", key = "/id" },
            ]
            "#,
        )
        .unwrap();
        let all = vec!["shared.raw", "webhooks.raw.github", "webhooks.raw.stripe"];
        assert_eq!(cfg.raw_topics(), all);
        let charges = cfg.projection("charges").unwrap();
        assert_eq!(
            cfg.raw_topics_of(charges),
            vec!["shared.raw", "webhooks.raw.stripe"]
        );
        assert_eq!(cfg.raw_topics_of(cfg.projection("anything").unwrap()), all);
    }

    #[test]
    fn a_tls_ca_file_needs_a_tls_url_and_a_file() {
        let err = Config::from_toml("[redis]\ntls_ca_file = \"/etc/hostname\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not rediss://"), "{err}");
        let err = Config::from_toml(
            "[redis]\nurl = \"rediss://r:6380/\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a readable file"), "{err}");
        let cfg = Config::from_toml("[redis]\nurl = \"rediss://r:6380/\"").unwrap();
        assert_eq!(cfg.redis.tls_ca_file, None);
    }

    #[test]
    fn waits_for_no_replica_unless_asked_and_never_forever() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(
            (cfg.redis.wait_replicas, cfg.redis.wait_timeout_ms),
            (0, 1000)
        );
        let cfg = Config::from_toml("[redis]\nwait_replicas = 1").unwrap();
        assert_eq!(cfg.redis.wait_replicas, 1);
        let err = Config::from_toml("[redis]\nwait_replicas = 1\nwait_timeout_ms = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.wait_timeout_ms"), "{err}");
    }

    #[test]
    fn delivery_bounds_the_bytes_in_flight() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.delivery.max_in_flight_bytes, 64 * 1024 * 1024);
        let err = Config::from_toml("[delivery]\nmax_in_flight_bytes = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_in_flight_bytes must be > 0"), "{err}");
    }

    #[test]
    fn rejects_empty_batches() {
        for key in ["batch_size", "batch_max_bytes"] {
            let err = Config::from_toml(&format!("[processor]\n{key} = 0"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("processor.{key} must be > 0")),
                "{err}"
            );
        }
    }

    #[test]
    fn rejects_unknown_keys_and_sources() {
        assert!(Config::from_toml("[processor]\nbatchsize = 3")
            .unwrap_err()
            .to_string()
            .contains("batchsize"));
        let err = Config::from_toml("[[projection]]\nname='x'\n[[projection.rule]]\nsource='nope'\nevent_type='a'\nkey='/k'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown source"), "{err}");
    }
}
