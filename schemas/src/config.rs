//! Loads `hooklog.toml` with `HOOKLOG_*` environment overrides.
//!
//! Layering: serde defaults, then the file, then env. An env var maps to a key
//! by dropping the prefix and splitting on `__`: `HOOKLOG_KAFKA__BROKERS`
//! sets `kafka.brokers`, `HOOKLOG_SERVER__LISTEN` sets `server.listen`. Only
//! variables whose first segment names a table (`server`, `kafka`,
//! `processor`, `redis`, `delivery`) are read, so unrelated `HOOKLOG_*` variables such as
//! `HOOKLOG_CONFIG` or `HOOKLOG_LOG` are not mistaken for config keys.

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

/// Tables that `HOOKLOG_<TABLE>__<KEY>` variables may override.
pub const ENV_TABLES: &[&str] = &["server", "kafka", "processor", "redis", "delivery"];

/// Why the configuration could not be loaded. The message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// A binary's view of `hooklog.toml`: how it is loaded (file, then
/// `HOOKLOG_*` overrides) and what it checks that serde cannot (ranges,
/// cross-references). Each binary implements `validate`; `load` and
/// `from_toml` are shared.
pub trait ConfigFile: DeserializeOwned {
    /// Errors name the field.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Loads `path` plus `HOOKLOG_*` overrides ([`load`]), then validates.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = load(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text ([`from_str`]), then validates.
    fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Loads and deserializes the config file at `path` plus env overrides.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    if !path.exists() {
        return Err(ConfigError(format!(
            "config file {} does not exist",
            path.display()
        )));
    }
    Figment::new()
        .merge(Toml::file(path))
        .merge(env_overrides())
        .extract()
        .map_err(|e| ConfigError(describe(e)))
}

/// Deserializes from TOML text (tests, `--check-config` of inline configs).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    Figment::new()
        .merge(Toml::string(text))
        .extract()
        .map_err(|e| ConfigError(describe(e)))
}

fn env_overrides() -> Env {
    Env::prefixed("HOOKLOG_").split("__").filter(|key| {
        let first = key.as_str().split('.').next().unwrap_or_default();
        ENV_TABLES.iter().any(|t| first.eq_ignore_ascii_case(t))
    })
}

fn describe(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let path = e.path.join(".");
            if path.is_empty() {
                e.kind.to_string()
            } else {
                format!("{path}: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        kafka: Kafka,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        brokers: String,
    }

    #[test]
    fn env_overrides_the_file_and_unrelated_vars_are_ignored() {
        let path = std::env::temp_dir().join(format!("hooklog-cfg-{}.toml", std::process::id()));
        std::fs::write(&path, "[kafka]\nbrokers = \"file:9092\"\n").unwrap();
        assert_eq!(load::<Cfg>(&path).unwrap().kafka.brokers, "file:9092");
        std::env::set_var("HOOKLOG_KAFKA__BROKERS", "env:9092");
        std::env::set_var("HOOKLOG_CONFIG_UNRELATED", "x");
        let got = load::<Cfg>(&path).unwrap().kafka.brokers;
        std::env::remove_var("HOOKLOG_KAFKA__BROKERS");
        std::env::remove_var("HOOKLOG_CONFIG_UNRELATED");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got, "env:9092");
    }

    #[test]
    fn errors_name_the_key() {
        let err = from_str::<Cfg>("[kafka]\nbrokerz = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("brokerz"), "{err}");
        let err = load::<Cfg>(Path::new("/nonexistent/hooklog.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
