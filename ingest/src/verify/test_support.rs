//! Test helpers: requests, MACs, and the public signature vectors
//! (`ingest/testdata/vectors.json`, a copy of the shared vectors).

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::SecretSlice;
use serde_json::Value;

use super::{build, Request};
use crate::config::{EventIdConfig, SourceConfig};

pub fn secret_list(secrets: &[&str]) -> Vec<SecretSlice<u8>> {
    secrets
        .iter()
        .map(|s| SecretSlice::from(s.as_bytes().to_vec()))
        .collect()
}

pub fn mac(key: &[u8], body: &[u8]) -> [u8; 32] {
    super::hmac_sha256(key, &[body])
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

pub fn req<'a>(pairs: &[(&str, &str)], body: &'a [u8], now: i64) -> Request<'a> {
    // Leaked so the borrowed Request can outlive this helper; tests only.
    let headers: &'static HeaderMap = Box::leak(Box::new(headers(pairs)));
    Request { headers, body, now }
}

pub fn vectors() -> Vec<Value> {
    let text = include_str!("../../testdata/vectors.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["vectors"].as_array().unwrap().clone()
}

/// Runs every vector of `scheme` through the verifier built from its config.
pub fn run_vectors(scheme: &str) {
    let mut ran = 0;
    for v in vectors().into_iter().filter(|v| v["scheme"] == scheme) {
        let id = v["id"].as_str().unwrap();
        let raw: Vec<String> = v["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        let source = SourceConfig {
            name: "vec".into(),
            scheme: scheme.into(),
            secrets: vec![],
            tolerance_secs: v["tolerance_secs"].as_u64().unwrap(),
            topic: None,
            signature_header: v["options"]["signature_header"].as_str().map(str::to_owned),
            event_id: None::<EventIdConfig>,
        };
        let keys = crate::config::secret_bytes(scheme, &raw).unwrap();
        let verifier = build(&source, keys).unwrap();
        let pairs: Vec<(String, String)> = v["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, val)| (k.clone(), val.as_str().unwrap().to_owned()))
            .collect();
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = STANDARD.decode(v["body_b64"].as_str().unwrap()).unwrap();
        let result = verifier.verify(&req(&pairs, &body, v["now"].as_i64().unwrap()));
        match v["expect"].as_str().unwrap() {
            "accept" => {
                let got = result.unwrap_or_else(|e| panic!("{id}: rejected: {e}"));
                assert_eq!(
                    got.key_id as u64,
                    v["expect_secret_index"].as_u64().unwrap(),
                    "{id}"
                );
                if let Some(challenge) = v.get("expect_challenge") {
                    assert_eq!(got.challenge.as_deref(), challenge.as_str(), "{id}");
                } else {
                    assert_eq!(got.challenge, None, "{id}");
                    assert_eq!(
                        got.event_id,
                        v["expect_event"]["id"].as_str().unwrap(),
                        "{id}"
                    );
                    assert_eq!(
                        got.event_type,
                        v["expect_event"]["type"].as_str().unwrap(),
                        "{id}"
                    );
                }
            }
            _ => {
                let err = result.err().unwrap_or_else(|| panic!("{id}: accepted"));
                assert_eq!(err.reason(), v["reason"].as_str().unwrap(), "{id}");
                let status = crate::error::ApiError::Verify(err).status().as_u16();
                let allowed: Vec<u64> = v["http_status"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_u64().unwrap())
                    .collect();
                assert!(allowed.contains(&(status as u64)), "{id}: status {status}");
            }
        }
        ran += 1;
    }
    assert!(ran > 0, "no vectors for {scheme}");
}
