//! `hooklog.toml` as the processor sees it: `[kafka]`, `[processor]`,
//! `[redis]`, `[[projection]]`, and the `name`/`topic` of each `[[source]]`
//! (the raw topics to consume). Ingest's `[server]` table is ignored.

use std::path::Path;

use hooklog_schemas::kafka::KafkaConfig;
use hooklog_schemas::topics;
use serde::de::IgnoredAny;
use serde::Deserialize;

pub use hooklog_schemas::config::ConfigError;

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
            batch_wait_ms: default_batch_wait_ms(),
            dedup_window_secs: default_dedup_window_secs(),
            partitions: default_partitions(),
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
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_key_prefix() -> String {
    "hooklog:".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
            key_prefix: default_key_prefix(),
        }
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

impl Config {
    /// Loads `path` plus `HOOKLOG_*` overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        hooklog_schemas::config::load_valid(path)
    }

    /// Parses TOML text and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        hooklog_schemas::config::from_str_valid(text)
    }
}

impl hooklog_schemas::config::Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.processor.batch_size == 0 {
            return Err(ConfigError("processor.batch_size must be > 0".into()));
        }
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
        let mut t: Vec<String> = self
            .sources
            .iter()
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
