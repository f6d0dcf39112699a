//! Stripe: `Stripe-Signature: t=<ts>,v1=<hex>[,v1=…]`, hex HMAC-SHA256 of
//! `<t>.<body>` keyed with the whole `whsec_…` string. Only `v1` counts;
//! future timestamps beyond the tolerance are rejected too (Hooklog policy).

use secrecy::SecretSlice;

use super::{
    body_hash_id, check_tolerance, find_key, header, json, json_text, parse_timestamp, Request,
    Verified, Verifier, VerifyError,
};

/// Stripe verifier.
pub struct Stripe {
    secrets: Vec<SecretSlice<u8>>,
    tolerance_secs: u64,
}

impl Stripe {
    /// Secrets are the endpoint secrets' bytes (`whsec_…` included).
    pub fn new(secrets: Vec<SecretSlice<u8>>, tolerance_secs: u64) -> Self {
        Self {
            secrets,
            tolerance_secs,
        }
    }
}

impl Verifier for Stripe {
    fn scheme(&self) -> &'static str {
        "stripe"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let value = header(req, "stripe-signature")?;
        let mut ts = None;
        let mut v1 = Vec::new();
        for element in value.split(',') {
            match element.split_once('=') {
                Some(("t", t)) => ts = Some(t),
                Some(("v1", sig)) => v1.push(sig),
                _ => {}
            }
        }
        let ts = ts.ok_or(VerifyError::Malformed("stripe-signature".into()))?;
        let ts_num = parse_timestamp(ts, "stripe-signature")?;
        if v1.is_empty() {
            return Err(VerifyError::Malformed("stripe-signature".into()));
        }
        // Stripe sends lower-case hex and compares text: so do we.
        let key_id = find_key(
            &self.secrets,
            &[ts.as_bytes(), b".", req.body],
            &v1,
            |mac| hex::encode(mac).into_bytes(),
        )
        .ok_or(VerifyError::BadSignature)?;
        check_tolerance(ts_num, req.now, self.tolerance_secs)?;
        let doc = json(req.body);
        Ok(Verified {
            key_id,
            event_id: json_text(doc.as_ref(), "/id").unwrap_or_else(|| body_hash_id(req.body)),
            event_type: json_text(doc.as_ref(), "/type").unwrap_or_default(),
            timestamp: Some(ts_num),
            challenge: None,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        vec!["stripe-signature".into(), "content-type".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const NOW: i64 = 1_735_689_600;

    fn sig(secret: &str, ts: i64, body: &[u8]) -> String {
        hex::encode(mac(
            secret.as_bytes(),
            &[ts.to_string().as_bytes(), b".", body].concat(),
        ))
    }

    #[test]
    fn public_vectors() {
        run_vectors("stripe");
    }

    #[test]
    fn several_v1_rotation_and_time() {
        let body = br#"{"id":"evt_1","type":"charge.succeeded"}"#;
        let v = Stripe::new(secret_list(&["whsec_old", "whsec_new"]), 300);
        let h = format!(
            "t={NOW},v1={},v1={},v0=00",
            "ab".repeat(32),
            sig("whsec_new", NOW, body)
        );
        let got = v
            .verify(&req(&[("Stripe-Signature", &h)], body, NOW))
            .unwrap();
        assert_eq!(
            (got.key_id, got.event_id.as_str(), got.timestamp),
            (1, "evt_1", Some(NOW))
        );
        assert_eq!(
            v.verify(&req(&[("Stripe-Signature", &h)], body, NOW - 301))
                .unwrap_err(),
            VerifyError::Timestamp
        );
        assert_eq!(
            v.verify(&req(&[("Stripe-Signature", &h)], body, NOW + 301))
                .unwrap_err(),
            VerifyError::Timestamp
        );
        let upper = format!("t={NOW},v1={}", sig("whsec_new", NOW, body).to_uppercase());
        assert_eq!(
            v.verify(&req(&[("Stripe-Signature", &upper)], body, NOW))
                .unwrap_err(),
            VerifyError::BadSignature
        );
        // The timestamp is signed: changing it breaks the signature.
        let moved = format!("t={},v1={}", NOW + 1, sig("whsec_new", NOW, body));
        assert_eq!(
            v.verify(&req(&[("Stripe-Signature", &moved)], body, NOW))
                .unwrap_err(),
            VerifyError::BadSignature
        );
    }

    #[test]
    fn malformed_headers() {
        let v = Stripe::new(secret_list(&["whsec_x"]), 300);
        for h in ["v1=abc", "t=abc,v1=00", "t=1735689600", "garbage"] {
            assert_eq!(
                v.verify(&req(&[("Stripe-Signature", h)], b"{}", NOW))
                    .unwrap_err()
                    .reason(),
                "malformed",
                "{h}"
            );
        }
        assert_eq!(
            v.verify(&req(&[], b"{}", NOW)).unwrap_err().reason(),
            "missing_header"
        );
    }
}
