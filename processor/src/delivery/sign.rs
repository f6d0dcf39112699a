//! Signs an outbound delivery two ways, so receivers can use either recipe:
//!
//! - `X-Webhook-Signature`: hex HMAC-SHA256 of the raw body, keyed with the
//!   subscription secret string as given (the seed's recipe:
//!   `hmac.new(secret.encode(), body, sha256).hexdigest()`). One value,
//!   under the current secret.
//! - Standard Webhooks: `webhook-id`, `webhook-timestamp`, and
//!   `webhook-signature: v1,<base64 HMAC of "id.timestamp.body">` keyed with
//!   the base64-decoded part after `whsec_`; during a rotation's grace
//!   period the header lists one signature per secret, so a receiver
//!   holding either secret verifies.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// The key bytes of a `whsec_<base64>` secret for Standard Webhooks.
fn standard_key(secret: &str) -> Vec<u8> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    B64.decode(b64)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

/// The signature headers of one delivery (names lower-case).
pub fn headers(
    secrets: &[&SecretString],
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let current = secrets.first().expect("a subscription has a secret");
    let hex_sig = hex::encode(mac(current.expose_secret().as_bytes(), &[body]));
    let ts = timestamp.to_string();
    let standard: Vec<String> = secrets
        .iter()
        .map(|s| {
            let sig = mac(
                &standard_key(s.expose_secret()),
                &[webhook_id.as_bytes(), b".", ts.as_bytes(), b".", body],
            );
            format!("v1,{}", B64.encode(sig))
        })
        .collect();
    vec![
        ("x-webhook-signature", hex_sig),
        ("webhook-id", webhook_id.to_owned()),
        ("webhook-timestamp", ts),
        ("webhook-signature", standard.join(" ")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_recipe_and_standard_webhooks_both_verify() {
        let secret = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string());
        let body = br#"{"event_type":"order.shipped"}"#;
        let h = headers(&[&secret], "msg_1", 1_700_000_000, body);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        // The seed's Python recipe keys with the secret string's bytes.
        assert_eq!(
            get("x-webhook-signature"),
            hex::encode(mac(secret.expose_secret().as_bytes(), &[body]))
        );
        let expected = mac(
            &B64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            &[b"msg_1.1700000000.", body],
        );
        assert_eq!(
            get("webhook-signature"),
            format!("v1,{}", B64.encode(expected))
        );
    }

    #[test]
    fn rotation_lists_both_signatures() {
        let new = SecretString::from("whsec_bmV3LXNlY3JldC1rZXk=".to_string());
        let old = SecretString::from("whsec_b2xkLXNlY3JldC1rZXk=".to_string());
        let h = headers(&[&new, &old], "e1", 1, b"x");
        let sigs = &h.iter().find(|(k, _)| *k == "webhook-signature").unwrap().1;
        assert_eq!(sigs.split(' ').count(), 2);
        let old_only = headers(&[&old], "e1", 1, b"x");
        let old_sig = &old_only
            .iter()
            .find(|(k, _)| *k == "webhook-signature")
            .unwrap()
            .1;
        assert!(sigs.split(' ').any(|s| s == old_sig));
    }
}
