//! The generic scheme of the seed articles: hex HMAC-SHA256 of the raw body
//! in `X-Webhook-Signature` (name configurable), optional `sha256=` prefix,
//! hex in either case. Used by our own agents (e.g. the FulfillmentAgent).

use secrecy::SecretSlice;

use super::{
    configured_event_id, find_key, first_json_text, json, Request, Verified, Verifier, VerifyError,
};
use crate::config::EventIdConfig;

/// Generic HMAC-SHA256 verifier.
pub struct HmacSha256 {
    secrets: Vec<SecretSlice<u8>>,
    /// Lower-case header name.
    header: String,
    event_id: EventIdConfig,
}

impl HmacSha256 {
    /// `header` is the signature header name; `event_id` where the id comes from.
    pub fn new(secrets: Vec<SecretSlice<u8>>, header: String, event_id: EventIdConfig) -> Self {
        Self {
            secrets,
            header: header.to_ascii_lowercase(),
            event_id,
        }
    }

    fn malformed(&self) -> VerifyError {
        VerifyError::Malformed(self.header.clone().into())
    }
}

impl Verifier for HmacSha256 {
    fn scheme(&self) -> &'static str {
        "hmac-sha256"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let value = super::optional_header(req.headers, &self.header)
            .ok_or_else(|| VerifyError::MissingHeader(self.header.clone().into()))?;
        let hex_part = value
            .strip_prefix("sha256=")
            .or_else(|| value.strip_prefix("SHA256="))
            .unwrap_or(value);
        if hex_part.len() != 64 {
            return Err(self.malformed());
        }
        let given = hex::decode(hex_part).map_err(|_| self.malformed())?;
        let key_id = find_key(&self.secrets, &[req.body], &[given], |mac| mac.to_vec())
            .ok_or(VerifyError::BadSignature)?;
        let doc = json(req.body);
        Ok(Verified {
            key_id,
            event_id: configured_event_id(&self.event_id, req.headers, doc.as_ref(), req.body),
            event_type: first_json_text(doc.as_ref(), &["/event_type", "/type"])
                .unwrap_or_default(),
            timestamp: None,
            challenge: None,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        vec![self.header.clone(), "content-type".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn verifier(secrets: &[&str]) -> HmacSha256 {
        HmacSha256::new(
            secret_list(secrets),
            "X-Webhook-Signature".into(),
            EventIdConfig::default(),
        )
    }

    #[test]
    fn public_vectors() {
        run_vectors("hmac-sha256");
    }

    #[test]
    fn accepts_bare_upper_case_hex_and_rotation() {
        let body = br#"{"event_id":"e1","event_type":"a.b"}"#;
        let sig = hex::encode_upper(mac(b"new", body));
        let v = verifier(&["old", "new"]);
        let got = v
            .verify(&req(&[("X-Webhook-Signature", &sig)], body, 0))
            .unwrap();
        assert_eq!(
            (got.key_id, got.event_id.as_str(), got.event_type.as_str()),
            (1, "e1", "a.b")
        );
        // The retired secret is gone from the config: fails.
        let v = verifier(&["newer"]);
        let err = v
            .verify(&req(&[("X-Webhook-Signature", &sig)], body, 0))
            .unwrap_err();
        assert_eq!(err, VerifyError::BadSignature);
    }

    #[test]
    fn missing_malformed_and_tampered() {
        let body = b"{}";
        let v = verifier(&["k"]);
        assert_eq!(
            v.verify(&req(&[], body, 0)).unwrap_err().reason(),
            "missing_header"
        );
        assert_eq!(
            v.verify(&req(&[("X-Webhook-Signature", "")], body, 0))
                .unwrap_err()
                .reason(),
            "missing_header"
        );
        assert_eq!(
            v.verify(&req(&[("X-Webhook-Signature", "sha256=zz")], body, 0))
                .unwrap_err()
                .reason(),
            "malformed"
        );
        let sig = format!("sha256={}", hex::encode(mac(b"k", body)));
        assert!(v
            .verify(&req(&[("X-Webhook-Signature", &sig)], b"{} ", 0))
            .is_err());
        assert!(v
            .verify(&req(&[("X-Webhook-Signature", &sig)], body, 0))
            .is_ok());
    }

    #[test]
    fn custom_header_and_event_id_sources() {
        let body = br#"{"event_type":"order.shipped","order_id":"ORD-1"}"#;
        let sig = hex::encode(mac(b"k", body));
        let composite = EventIdConfig {
            pointers: Some(vec!["/event_type".into(), "/order_id".into()]),
            ..Default::default()
        };
        let v = HmacSha256::new(secret_list(&["k"]), "X-Sig".into(), composite);
        let got = v.verify(&req(&[("x-sig", &sig)], body, 0)).unwrap();
        assert_eq!(got.event_id, "order.shipped:ORD-1");

        let by_header = EventIdConfig {
            header: Some("x-event-id".into()),
            ..Default::default()
        };
        let v = HmacSha256::new(secret_list(&["k"]), "X-Sig".into(), by_header);
        let got = v
            .verify(&req(&[("x-sig", &sig), ("X-Event-Id", "abc")], body, 0))
            .unwrap();
        assert_eq!(got.event_id, "abc");
        let got = v.verify(&req(&[("x-sig", &sig)], body, 0)).unwrap();
        assert_eq!(got.event_id, super::super::body_hash_id(body));

        // Errors name the configured header, not a generic one.
        let missing = v.verify(&req(&[], body, 0)).unwrap_err();
        assert_eq!(missing.to_string(), "required header x-sig is missing");
        let malformed = v.verify(&req(&[("x-sig", "zz")], body, 0)).unwrap_err();
        assert_eq!(malformed.to_string(), "header x-sig is malformed");
    }

    #[test]
    fn non_utf8_and_empty_bodies_verify() {
        let v = verifier(&["k"]);
        for body in [&b"\xff\xfe\x00binary"[..], &b""[..]] {
            let sig = hex::encode(mac(b"k", body));
            let got = v
                .verify(&req(&[("X-Webhook-Signature", &sig)], body, 0))
                .unwrap();
            assert_eq!(got.event_id, super::super::body_hash_id(body));
            assert_eq!(got.event_type, "");
        }
    }
}
