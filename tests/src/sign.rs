//! Signing requests for every scheme, as the providers do.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("key");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Current Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Headers for `scheme` signing `body` with `secret` (at time `ts`);
/// `id` is the provider event id where the scheme carries it in a header.
pub fn headers(
    scheme: &str,
    secret: &str,
    body: &[u8],
    ts: i64,
    id: &str,
) -> Vec<(String, String)> {
    let h = |k: &str, v: String| (k.to_owned(), v);
    match scheme {
        "hmac-sha256" => vec![h(
            "X-Webhook-Signature",
            format!("sha256={}", hex::encode(mac(secret.as_bytes(), &[body]))),
        )],
        "stripe" => {
            let sig = hex::encode(mac(
                secret.as_bytes(),
                &[ts.to_string().as_bytes(), b".", body],
            ));
            vec![h("Stripe-Signature", format!("t={ts},v1={sig}"))]
        }
        "github" => vec![
            h(
                "X-Hub-Signature-256",
                format!("sha256={}", hex::encode(mac(secret.as_bytes(), &[body]))),
            ),
            h("X-GitHub-Delivery", id.to_owned()),
            h("X-GitHub-Event", "push".into()),
        ],
        "slack" => {
            let sig = hex::encode(mac(
                secret.as_bytes(),
                &[b"v0:", ts.to_string().as_bytes(), b":", body],
            ));
            vec![
                h("X-Slack-Request-Timestamp", ts.to_string()),
                h("X-Slack-Signature", format!("v0={sig}")),
            ]
        }
        "shopify" => vec![
            h(
                "X-Shopify-Hmac-Sha256",
                STANDARD.encode(mac(secret.as_bytes(), &[body])),
            ),
            h("X-Shopify-Webhook-Id", id.to_owned()),
            h("X-Shopify-Topic", "orders/create".into()),
        ],
        "standard-webhooks" => {
            let key = STANDARD
                .decode(secret.trim_start_matches("whsec_"))
                .expect("whsec");
            let sig = STANDARD.encode(mac(
                &key,
                &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body],
            ));
            vec![
                h("webhook-id", id.to_owned()),
                h("webhook-timestamp", ts.to_string()),
                h("webhook-signature", format!("v1,{sig}")),
            ]
        }
        other => panic!("unknown scheme {other}"),
    }
}
