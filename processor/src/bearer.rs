//! Bearer keys of the processor's protected endpoints: the subscription API
//! (`delivery.api_keys`) and the admin endpoints (`processor.admin_keys`).
//! Keys are given by reference (`env:NAME`, `file:PATH`) like every secret
//! and compared in constant time.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::api::error;

/// The accepted keys of one API (several at once, for rotation).
pub struct BearerKeys(Vec<SecretString>);

impl BearerKeys {
    /// Resolves `refs`; `field` names the setting in errors (never a key).
    pub fn resolve(field: &str, refs: &[String]) -> anyhow::Result<Self> {
        refs.iter()
            .enumerate()
            .map(|(i, r)| {
                hooklog_schemas::secret_ref::resolve(r)
                    .map(SecretString::from)
                    .map_err(|why| anyhow::anyhow!("invalid configuration: {field}[{i}]: {why}"))
            })
            .collect::<anyhow::Result<_>>()
            .map(Self)
    }

    /// No key configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `Authorization: Bearer <key>` carries one of the keys. Every
    /// key is compared, so the time does not tell which one matched.
    pub fn accept(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return false;
        };
        self.0.iter().fold(false, |hit, key| {
            hit | bool::from(key.expose_secret().as_bytes().ct_eq(presented.as_bytes()))
        })
    }
}

/// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
pub fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid API key is required: Authorization: Bearer <key>",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn accepts_any_configured_key_and_nothing_else() {
        std::env::set_var("HOOKLOG_TEST_BEARER_OLD", "old-key");
        std::env::set_var("HOOKLOG_TEST_BEARER_NEW", "new-key");
        let keys = BearerKeys::resolve(
            "processor.admin_keys",
            &[
                "env:HOOKLOG_TEST_BEARER_OLD".into(),
                "env:HOOKLOG_TEST_BEARER_NEW".into(),
            ],
        )
        .unwrap();
        assert!(keys.accept(&headers("Bearer old-key")));
        assert!(keys.accept(&headers("Bearer new-key")));
        assert!(!keys.accept(&headers("Bearer new-ke")));
        assert!(!keys.accept(&headers("Basic new-key")));
        assert!(!keys.accept(&headers("new-key")));
        assert!(!keys.accept(&HeaderMap::new()));
        assert!(!BearerKeys(Vec::new()).accept(&headers("Bearer ")));
    }

    #[test]
    fn an_unresolvable_key_names_the_setting_not_a_value() {
        let err = BearerKeys::resolve(
            "processor.admin_keys",
            &["env:HOOKLOG_TEST_BEARER_UNSET".into()],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("processor.admin_keys[0]"), "{err}");
        let err = BearerKeys::resolve("processor.admin_keys", &["inline-secret".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("inline-secret"), "{err}");
    }
}
