//! Shopify: `X-Shopify-Hmac-Sha256` = padded standard base64 of the
//! HMAC-SHA256 of the raw body (key = the secret's string bytes). No
//! timestamp. Id `X-Shopify-Webhook-Id`, type `X-Shopify-Topic`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::SecretSlice;

use super::{
    body_hash_id, find_key, header, optional_header, Request, Verified, Verifier, VerifyError,
};

/// Shopify verifier.
pub struct Shopify {
    secrets: Vec<SecretSlice<u8>>,
}

impl Shopify {
    /// Secrets are the app's client secrets' UTF-8 bytes.
    pub fn new(secrets: Vec<SecretSlice<u8>>) -> Self {
        Self { secrets }
    }
}

impl Verifier for Shopify {
    fn scheme(&self) -> &'static str {
        "shopify"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let given = header(req, "x-shopify-hmac-sha256")?;
        // Canonical padded base64 of 32 bytes is always 44 characters.
        if given.len() != 44 || STANDARD.decode(given).is_err() {
            return Err(VerifyError::Malformed("x-shopify-hmac-sha256".into()));
        }
        let key_id = find_key(&self.secrets, &[req.body], &[given], |mac| {
            STANDARD.encode(mac).into_bytes()
        })
        .ok_or(VerifyError::BadSignature)?;
        Ok(Verified {
            key_id,
            event_id: optional_header(req.headers, "x-shopify-webhook-id")
                .map(str::to_owned)
                .unwrap_or_else(|| body_hash_id(req.body)),
            event_type: optional_header(req.headers, "x-shopify-topic")
                .unwrap_or_default()
                .to_owned(),
            timestamp: None,
            challenge: None,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        [
            "x-shopify-hmac-sha256",
            "x-shopify-webhook-id",
            "x-shopify-topic",
            "x-shopify-shop-domain",
            "content-type",
        ]
        .map(String::from)
        .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn public_vectors() {
        run_vectors("shopify");
    }

    #[test]
    fn rotation_and_tamper() {
        let body = b"{\"id\":1}";
        let v = Shopify::new(secret_list(&["a", "b"]));
        let sig = STANDARD.encode(mac(b"b", body));
        let got = v
            .verify(&req(
                &[
                    ("X-Shopify-Hmac-Sha256", &sig),
                    ("X-Shopify-Webhook-Id", "w1"),
                    ("X-Shopify-Topic", "orders/create"),
                ],
                body,
                0,
            ))
            .unwrap();
        assert_eq!(
            (got.key_id, got.event_id.as_str(), got.event_type.as_str()),
            (1, "w1", "orders/create")
        );
        assert_eq!(
            v.verify(&req(&[("X-Shopify-Hmac-Sha256", &sig)], b"{\"id\":2}", 0))
                .unwrap_err(),
            VerifyError::BadSignature
        );
        let unpadded = sig.trim_end_matches('=');
        assert_eq!(
            v.verify(&req(&[("X-Shopify-Hmac-Sha256", unpadded)], body, 0))
                .unwrap_err()
                .reason(),
            "malformed"
        );
        assert_eq!(
            v.verify(&req(&[], body, 0)).unwrap_err().reason(),
            "missing_header"
        );
    }
}
