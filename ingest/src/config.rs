//! `hooklog.toml` as ingest sees it: `[server]`, `[kafka]`, `[[source]]`.
//!
//! Unknown keys are errors. Tables owned by the processor (`[processor]`,
//! `[redis]`, `[[projection]]`, `[delivery]`) are accepted and ignored, so both binaries
//! can share one file. Secrets are only ever references (`env:NAME`,
//! `file:PATH`), resolved at start into [`SecretSlice`]s that never print.

use std::collections::HashSet;
use std::path::Path;

use hooklog_schemas::kafka::KafkaConfig;
use hooklog_schemas::topics;
use secrecy::SecretSlice;
use serde::de::IgnoredAny;
use serde::Deserialize;

pub use hooklog_schemas::config::{ConfigError, ConfigFile};

/// The whole ingest configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP server settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Kafka cluster and pass-through librdkafka properties.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// One entry per webhook source (`POST /webhooks/<name>`).
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    /// Processor tables, ignored by ingest.
    #[serde(default, rename = "processor")]
    _processor: Option<IgnoredAny>,
    #[serde(default, rename = "redis")]
    _redis: Option<IgnoredAny>,
    #[serde(default, rename = "projection")]
    _projection: Option<IgnoredAny>,
    #[serde(default, rename = "delivery")]
    _delivery: Option<IgnoredAny>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest accepted body, checked while streaming.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests handled at once; beyond it ingest answers 429.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of request bodies handled at once (each counted at its
    /// `Content-Length`, or at `max_body_bytes` without one); beyond it
    /// ingest answers 429. Bounds ingest's memory: `max_in_flight` bodies
    /// of `max_body_bytes` each would be 4 GiB at the defaults.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Longest wait for the broker's ack before answering 503
    /// (librdkafka `message.timeout.ms`). Keep it below the providers'
    /// deadlines (Stripe and GitHub allow ~10 s).
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
    /// `Retry-After` seconds sent with 429 and 503.
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u64,
    /// Longest graceful drain on SIGTERM before exiting anyway.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
const fn default_max_body_bytes() -> usize {
    1024 * 1024
}
const fn default_max_in_flight_bytes() -> usize {
    32 * 1024 * 1024
}
const fn default_max_in_flight() -> usize {
    4096
}
const fn default_publish_timeout_ms() -> u64 {
    5000
}
const fn default_retry_after_secs() -> u64 {
    5
}
const fn default_shutdown_grace_secs() -> u64 {
    25
}
const fn default_tolerance_secs() -> u64 {
    300
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            max_in_flight: default_max_in_flight(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            publish_timeout_ms: default_publish_timeout_ms(),
            retry_after_secs: default_retry_after_secs(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
        }
    }
}

/// `[[source]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Route name: `POST /webhooks/<name>`.
    pub name: String,
    /// Signature scheme id (see `verify::SCHEMES`).
    pub scheme: String,
    /// Secret references, newest last or first as you like; all verify.
    pub secrets: Vec<String>,
    /// Timestamp tolerance of timestamped schemes, both directions.
    #[serde(default = "default_tolerance_secs")]
    pub tolerance_secs: u64,
    /// Raw topic; default `webhooks.raw.<name>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// hmac-sha256 only: signature header name (default `X-Webhook-Signature`).
    #[serde(default)]
    pub signature_header: Option<String>,
    /// hmac-sha256 only: where the event id comes from.
    #[serde(default)]
    pub event_id: Option<EventIdConfig>,
}

impl SourceConfig {
    /// The raw topic this source publishes to.
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| topics::raw_topic(&self.name))
    }
}

/// Where the generic scheme takes the event id from. Set at most one of the
/// fields; with none, `/event_id`, then `/id`, then the body hash. When the
/// chosen source is absent in a request, the body hash is used.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIdConfig {
    /// A request header, e.g. `X-Event-Id`.
    #[serde(default)]
    pub header: Option<String>,
    /// JSON pointers joined with `:`; one pointer is a plain id, several a
    /// composite such as `["/event_type", "/order_id"]`.
    #[serde(default)]
    pub pointers: Option<Vec<String>>,
    /// Always use `sha256:<hex of body>`.
    #[serde(default)]
    pub body_hash: bool,
}

impl ConfigFile for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        let mut names = HashSet::new();
        self.server
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| {
                ConfigError(format!(
                    "server.listen: {:?} is not host:port",
                    self.server.listen
                ))
            })?;
        if self.server.max_in_flight == 0 || self.server.max_body_bytes == 0 {
            return Err(ConfigError(
                "server.max_in_flight and server.max_body_bytes must be > 0".into(),
            ));
        }
        if self.server.max_in_flight_bytes < self.server.max_body_bytes {
            return Err(ConfigError(
                "server.max_in_flight_bytes must be at least server.max_body_bytes (else the largest body allowed could never be taken)".into(),
            ));
        }
        if u32::try_from(self.server.max_body_bytes).is_err() {
            return Err(ConfigError(
                "server.max_body_bytes must be below 4 GiB".into(),
            ));
        }
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if self.server.max_in_flight > most || self.server.max_in_flight_bytes > most {
            return Err(ConfigError(format!(
                "server.max_in_flight and server.max_in_flight_bytes must be at most {most}"
            )));
        }
        for s in &self.sources {
            let valid_name = !s.name.is_empty()
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(ConfigError(format!(
                    "source.name: {:?} must be non-empty [A-Za-z0-9_-]",
                    s.name
                )));
            }
            if !names.insert(&s.name) {
                return Err(ConfigError(format!(
                    "source[{}]: duplicate source name",
                    s.name
                )));
            }
            if s.secrets.is_empty() {
                return Err(ConfigError(format!(
                    "source[{}].secrets: at least one secret reference is required",
                    s.name
                )));
            }
            if let Some(e) = &s.event_id {
                let set = usize::from(e.header.is_some())
                    + usize::from(e.pointers.is_some())
                    + usize::from(e.body_hash);
                if set > 1 {
                    return Err(ConfigError(format!(
                        "source[{}].event_id: set only one of header, pointers, body_hash",
                        s.name
                    )));
                }
                if e.pointers.iter().flatten().any(|p| !p.starts_with('/')) {
                    return Err(ConfigError(format!(
                        "source[{}].event_id.pointers: JSON pointers start with '/'",
                        s.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Resolves `env:NAME` / `file:PATH` references. Errors name the reference
/// kind and the source, never the value.
pub fn resolve_secrets(source: &SourceConfig) -> Result<Vec<SecretSlice<u8>>, ConfigError> {
    let raw = source
        .secrets
        .iter()
        .enumerate()
        .map(|(i, r)| {
            hooklog_schemas::secret_ref::resolve(r)
                .map_err(|why| ConfigError(format!("source[{}].secrets[{i}]: {why}", source.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    secret_bytes(&source.scheme, &raw)
        .map_err(|why| ConfigError(format!("source[{}].secrets: {why}", source.name)))
}

/// Turns resolved secret strings into key bytes for `scheme`.
pub fn secret_bytes(scheme: &str, raw: &[String]) -> Result<Vec<SecretSlice<u8>>, String> {
    raw.iter()
        .enumerate()
        .map(|(i, s)| {
            let bytes = if scheme == "standard-webhooks" {
                crate::verify::standard_webhooks_key(s)
                    .ok_or_else(|| format!("[{i}] is not a whsec_<base64> secret"))?
            } else {
                s.as_bytes().to_vec()
            };
            Ok(SecretSlice::from(bytes))
        })
        .collect()
}

/// Resolves the path of the config file: `--config`, else `HOOKLOG_CONFIG`,
/// else `hooklog.toml`.
pub fn path_or_default(arg: Option<&Path>) -> std::path::PathBuf {
    arg.map(Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("hooklog.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg = Config::from_toml(
            r#"
            [[source]]
            name = "stripe"
            scheme = "stripe"
            secrets = ["env:X"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.server.max_body_bytes, 1_048_576);
        assert_eq!(cfg.sources[0].tolerance_secs, 300);
        assert_eq!(cfg.sources[0].topic(), "webhooks.raw.stripe");

        let err = Config::from_toml("[server]\nlisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = Config::from_toml(
            "[[source]]\nname='a'\nscheme='stripe'\nsecrets=['env:X']\nsecret='x'",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("secret"), "{err}");
    }

    #[test]
    fn in_flight_bytes_hold_the_largest_body() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.server.max_in_flight_bytes, 32 * 1024 * 1024);
        let err = Config::from_toml("[server]\nmax_body_bytes = 2048\nmax_in_flight_bytes = 1024")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_in_flight_bytes must be at least"),
            "{err}"
        );
        assert!(
            Config::from_toml("[server]\nmax_body_bytes = 2048\nmax_in_flight_bytes = 2048")
                .is_ok()
        );
        let err = Config::from_toml("[server]\nmax_in_flight_bytes = 9000000000000000000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn processor_tables_are_ignored() {
        let cfg = Config::from_toml(
            "[redis]\nurl='redis://x'\n[[projection]]\nname='orders'\n[processor]\nlisten='x'",
        )
        .unwrap();
        assert!(cfg.sources.is_empty());
    }

    #[test]
    fn inline_secrets_are_refused_without_echo() {
        let cfg =
            Config::from_toml("[[source]]\nname='a'\nscheme='github'\nsecrets=['hunter2-inline']")
                .unwrap();
        let err = resolve_secrets(&cfg.sources[0]).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("source[a].secrets[0]"), "{err}");
    }

    #[test]
    fn env_and_file_refs() {
        std::env::set_var("HOOKLOG_UNIT_SECRET", "s3cret\n");
        let dir = std::env::temp_dir().join(format!("hooklog-secret-{}", std::process::id()));
        std::fs::write(&dir, "filesecret\n").unwrap();
        let toml = format!(
            "[[source]]\nname='a'\nscheme='github'\nsecrets=['env:HOOKLOG_UNIT_SECRET','file:{}']",
            dir.display()
        );
        let cfg = Config::from_toml(&toml).unwrap();
        let keys = resolve_secrets(&cfg.sources[0]).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(keys[0].expose_secret(), b"s3cret");
        assert_eq!(keys[1].expose_secret(), b"filesecret");
        assert!(!format!("{:?}", keys[0]).contains("s3cret"));
        std::fs::remove_file(dir).unwrap();
    }
}
