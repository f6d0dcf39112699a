//! Signature verification: one [`Verifier`] per scheme, one file per scheme.
//!
//! Every verifier gets the raw body bytes, the headers and the current time
//! (injected, never read from the system clock here), tries every active
//! secret of the source (rotation) with constant-time comparisons, and fails
//! closed on anything missing, malformed or unknown. On success it reports
//! which secret verified (its index, never the secret) and the event's id and
//! type as DESIGN.md defines them per scheme.

mod github;
mod hmac_sha256;
mod shopify;
mod slack;
mod standard_webhooks;
mod stripe;

use std::borrow::Cow;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ConfigError, EventIdConfig, SourceConfig};

pub use github::GitHub;
pub use hmac_sha256::HmacSha256;
pub use shopify::Shopify;
pub use slack::Slack;
pub use standard_webhooks::{decode_secret as standard_webhooks_key, StandardWebhooks};
pub use stripe::Stripe;

/// Scheme ids accepted in `[[source]].scheme`.
pub const SCHEMES: &[&str] = &[
    "hmac-sha256",
    "standard-webhooks",
    "stripe",
    "github",
    "slack",
    "shopify",
];

/// What a verifier sees of a request.
pub struct Request<'a> {
    /// Request headers (case-insensitive names).
    pub headers: &'a HeaderMap,
    /// The raw body, exactly as received.
    pub body: &'a [u8],
    /// Current Unix time in seconds (injected clock).
    pub now: i64,
}

/// A verified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Index of the configured secret that verified.
    pub key_id: usize,
    /// The event id (record key).
    pub event_id: String,
    /// The event type, `""` when none.
    pub event_type: String,
    /// The signed timestamp of timestamped schemes.
    pub timestamp: Option<i64>,
    /// Slack URL verification: answer with this challenge, publish nothing.
    pub challenge: Option<String>,
}

/// Why a request was rejected. The cause goes to logs and metrics; clients
/// get the status only (plus a generic message), never signature values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent or empty.
    #[error("required header {0} is missing")]
    MissingHeader(Cow<'static, str>),
    /// A header is present but cannot be parsed.
    #[error("header {0} is malformed")]
    Malformed(Cow<'static, str>),
    /// No configured secret produces the signature.
    #[error("signature does not match any active secret")]
    BadSignature,
    /// The signed timestamp is outside the tolerance.
    #[error("timestamp is outside the tolerance")]
    Timestamp,
}

impl VerifyError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Timestamp => "timestamp",
        }
    }
}

/// One signature scheme.
pub trait Verifier: Send + Sync {
    /// The scheme id, e.g. `stripe`.
    fn scheme(&self) -> &'static str;
    /// Verifies the request and extracts its id and type.
    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError>;
    /// Lower-case names of the headers kept in the envelope so downstream
    /// consumers can re-verify.
    fn kept_headers(&self) -> Vec<String>;
}

/// Builds the verifier of a source from its config and resolved secrets.
pub fn build(
    source: &SourceConfig,
    secrets: Vec<SecretSlice<u8>>,
) -> Result<Box<dyn Verifier>, ConfigError> {
    let field = |what: &str| format!("source[{}].{what}", source.name);
    if source.scheme != "hmac-sha256"
        && (source.signature_header.is_some() || source.event_id.is_some())
    {
        return Err(ConfigError(format!(
            "{}: only the hmac-sha256 scheme takes signature_header and event_id",
            field("scheme")
        )));
    }
    let tolerance = source.tolerance_secs;
    Ok(match source.scheme.as_str() {
        "hmac-sha256" => Box::new(HmacSha256::new(
            secrets,
            source
                .signature_header
                .clone()
                .unwrap_or_else(|| "x-webhook-signature".into()),
            source.event_id.clone().unwrap_or_default(),
        )),
        "standard-webhooks" => Box::new(StandardWebhooks::new(secrets, tolerance)),
        "stripe" => Box::new(Stripe::new(secrets, tolerance)),
        "github" => Box::new(GitHub::new(secrets)),
        "slack" => Box::new(Slack::new(secrets, tolerance)),
        "shopify" => Box::new(Shopify::new(secrets)),
        other => {
            return Err(ConfigError(format!(
                "{}: unknown scheme {other:?}; allowed: {}",
                field("scheme"),
                SCHEMES.join(", ")
            )))
        }
    })
}

/// A header's value as text; absent, empty or non-UTF-8 counts as missing.
pub(crate) fn header<'a>(req: &'a Request<'_>, name: &'static str) -> Result<&'a str, VerifyError> {
    optional_header(req.headers, name).ok_or(VerifyError::MissingHeader(name.into()))
}

pub(crate) fn optional_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Index of the first secret whose MAC over `parts`, rendered by `render`,
/// equals one of `candidates` (constant-time per comparison).
pub(crate) fn find_key<T: AsRef<[u8]>>(
    secrets: &[SecretSlice<u8>],
    parts: &[&[u8]],
    candidates: &[T],
    render: impl Fn(&[u8; 32]) -> Vec<u8>,
) -> Option<usize> {
    secrets.iter().position(|secret| {
        let expected = render(&hmac_sha256(secret.expose_secret(), parts));
        candidates.iter().fold(false, |hit, c| {
            hit | bool::from(expected.as_slice().ct_eq(c.as_ref()))
        })
    })
}

/// `|now - ts| <= tolerance`, inclusive, both directions.
pub(crate) fn check_tolerance(ts: i64, now: i64, tolerance_secs: u64) -> Result<(), VerifyError> {
    if now.abs_diff(ts) <= tolerance_secs {
        Ok(())
    } else {
        Err(VerifyError::Timestamp)
    }
}

/// Parses a decimal Unix timestamp header.
pub(crate) fn parse_timestamp(value: &str, name: &'static str) -> Result<i64, VerifyError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::Malformed(name.into()));
    }
    value
        .parse()
        .map_err(|_| VerifyError::Malformed(name.into()))
}

/// The fallback event id: `sha256:` + lower-case hex SHA-256 of the body.
pub fn body_hash_id(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

/// The body parsed as JSON, if it is JSON.
pub(crate) fn json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// A JSON value usable as an id or type: a non-empty string as is, a number
/// as its exact decimal text.
pub(crate) fn json_text(doc: Option<&Value>, pointer: &str) -> Option<String> {
    match doc?.pointer(pointer)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first pointer of `pointers` that yields text.
pub(crate) fn first_json_text(doc: Option<&Value>, pointers: &[&str]) -> Option<String> {
    pointers.iter().find_map(|p| json_text(doc, p))
}

/// Event id per an [`EventIdConfig`] (generic scheme).
pub(crate) fn configured_event_id(
    cfg: &EventIdConfig,
    headers: &HeaderMap,
    doc: Option<&Value>,
    body: &[u8],
) -> String {
    if cfg.body_hash {
        return body_hash_id(body);
    }
    if let Some(h) = &cfg.header {
        return optional_header(headers, h)
            .map(str::to_owned)
            .unwrap_or_else(|| body_hash_id(body));
    }
    if let Some(pointers) = &cfg.pointers {
        let parts: Option<Vec<String>> = pointers.iter().map(|p| json_text(doc, p)).collect();
        return parts
            .map(|p| p.join(":"))
            .unwrap_or_else(|| body_hash_id(body));
    }
    first_json_text(doc, &["/event_id", "/id"]).unwrap_or_else(|| body_hash_id(body))
}

#[cfg(test)]
pub(crate) mod test_support;
