//! Slack: `X-Slack-Signature: v0=<hex>` over `v0:<timestamp>:<body>` with
//! `X-Slack-Request-Timestamp`. A verified `url_verification` request is
//! answered with its challenge and not published.

use secrecy::SecretSlice;
use serde_json::Value;

use super::{
    body_hash_id, check_tolerance, find_key, first_json_text, header, json, json_text,
    parse_timestamp, Request, Verified, Verifier, VerifyError,
};

/// Slack verifier.
pub struct Slack {
    secrets: Vec<SecretSlice<u8>>,
    tolerance_secs: u64,
}

impl Slack {
    /// Secrets are the app's signing secrets' bytes.
    pub fn new(secrets: Vec<SecretSlice<u8>>, tolerance_secs: u64) -> Self {
        Self {
            secrets,
            tolerance_secs,
        }
    }
}

impl Verifier for Slack {
    fn scheme(&self) -> &'static str {
        "slack"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let ts = header(req, "x-slack-request-timestamp")?;
        let value = header(req, "x-slack-signature")?;
        let ts_num = parse_timestamp(ts, "x-slack-request-timestamp")?;
        let given = value
            .strip_prefix("v0=")
            .ok_or(VerifyError::Malformed("x-slack-signature".into()))?;
        let key_id = find_key(
            &self.secrets,
            &[b"v0:", ts.as_bytes(), b":", req.body],
            &[given],
            |mac| hex::encode(mac).into_bytes(),
        )
        .ok_or(VerifyError::BadSignature)?;
        check_tolerance(ts_num, req.now, self.tolerance_secs)?;
        let doc = json(req.body);
        let challenge = match &doc {
            Some(Value::Object(o))
                if o.get("type").and_then(Value::as_str) == Some("url_verification") =>
            {
                o.get("challenge")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }
            _ => None,
        };
        Ok(Verified {
            key_id,
            event_id: json_text(doc.as_ref(), "/event_id")
                .unwrap_or_else(|| body_hash_id(req.body)),
            event_type: first_json_text(doc.as_ref(), &["/event/type", "/type"])
                .unwrap_or_default(),
            timestamp: Some(ts_num),
            challenge,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        [
            "x-slack-signature",
            "x-slack-request-timestamp",
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

    const NOW: i64 = 1_735_689_600;

    #[test]
    fn public_vectors() {
        run_vectors("slack");
    }

    #[test]
    fn rotation_timestamps_and_form_bodies() {
        let body = b"token=x&command=%2Fweather&text=94070";
        let v = Slack::new(secret_list(&["s1", "s2"]), 300);
        let sig = format!(
            "v0={}",
            hex::encode(mac(b"s2", &[&b"v0:1735689600:"[..], body].concat()))
        );
        let h = [
            ("X-Slack-Request-Timestamp", "1735689600"),
            ("X-Slack-Signature", sig.as_str()),
        ];
        let got = v.verify(&req(&h, body, NOW)).unwrap();
        assert_eq!((got.key_id, got.event_type.as_str()), (1, ""));
        assert_eq!(got.event_id, body_hash_id(body));
        assert_eq!(
            v.verify(&req(&h, body, NOW + 301)).unwrap_err(),
            VerifyError::Timestamp
        );
        assert_eq!(
            v.verify(&req(&h[1..], body, NOW)).unwrap_err().reason(),
            "missing_header"
        );
        let bad = [
            ("X-Slack-Request-Timestamp", "1735689600"),
            ("X-Slack-Signature", "v1=00"),
        ];
        assert_eq!(
            v.verify(&req(&bad, body, NOW)).unwrap_err().reason(),
            "malformed"
        );
    }
}
