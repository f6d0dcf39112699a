//! Standard Webhooks (Svix, Clerk, Resend, …): base64 HMAC-SHA256 of
//! `<id>.<timestamp>.<body>`, key = base64 after `whsec_`, signature header a
//! space-separated list of `v1,<base64>`. Accepts the `webhook-*` header
//! family or the `svix-*` one, never a mix.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::SecretSlice;

use super::{
    check_tolerance, find_key, first_json_text, json, optional_header, parse_timestamp, Request,
    Verified, Verifier, VerifyError,
};

/// Standard Webhooks verifier.
pub struct StandardWebhooks {
    /// Already base64-decoded keys.
    secrets: Vec<SecretSlice<u8>>,
    tolerance_secs: u64,
}

impl StandardWebhooks {
    /// `secrets` are the decoded key bytes (see [`decode_secret`]).
    pub fn new(secrets: Vec<SecretSlice<u8>>, tolerance_secs: u64) -> Self {
        Self {
            secrets,
            tolerance_secs,
        }
    }
}

/// Decodes a `whsec_<base64>` secret into key bytes.
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()
        .filter(|k| !k.is_empty())
}

const WEBHOOK: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];
const SVIX: [&str; 3] = ["svix-id", "svix-timestamp", "svix-signature"];

impl Verifier for StandardWebhooks {
    fn scheme(&self) -> &'static str {
        "standard-webhooks"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let get = |family: &[&'static str; 3]| -> Option<[&str; 3]> {
            Some([
                optional_header(req.headers, family[0])?,
                optional_header(req.headers, family[1])?,
                optional_header(req.headers, family[2])?,
            ])
        };
        let [id, ts, sigs] =
            get(&WEBHOOK)
                .or_else(|| get(&SVIX))
                .ok_or(VerifyError::MissingHeader(
                    "webhook-id/webhook-timestamp/webhook-signature".into(),
                ))?;
        let ts_num = parse_timestamp(ts, "webhook-timestamp")?;
        let candidates: Vec<&str> = sigs
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .map(|(_, sig)| sig)
            .collect();
        let key_id = find_key(
            &self.secrets,
            &[id.as_bytes(), b".", ts.as_bytes(), b".", req.body],
            &candidates,
            |mac| STANDARD.encode(mac).into_bytes(),
        )
        .ok_or(VerifyError::BadSignature)?;
        check_tolerance(ts_num, req.now, self.tolerance_secs)?;
        Ok(Verified {
            key_id,
            event_id: id.to_owned(),
            event_type: first_json_text(json(req.body).as_ref(), &["/type"]).unwrap_or_default(),
            timestamp: Some(ts_num),
            challenge: None,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        WEBHOOK
            .iter()
            .chain(SVIX.iter())
            .map(|s| s.to_string())
            .chain(["content-type".into()])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const NOW: i64 = 1_735_689_600;

    fn sign(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
        let m = mac(
            key,
            &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body].concat(),
        );
        format!("v1,{}", STANDARD.encode(m))
    }

    fn verifier() -> StandardWebhooks {
        let keys = vec![
            SecretSlice::from(b"old-key".to_vec()),
            SecretSlice::from(b"new-key".to_vec()),
        ];
        StandardWebhooks::new(keys, 300)
    }

    #[test]
    fn public_vectors() {
        run_vectors("standard-webhooks");
    }

    #[test]
    fn several_signatures_rotation_and_tolerance() {
        let body = br#"{"type":"invoice.paid"}"#;
        let v = verifier();
        let good = sign(b"new-key", "msg_1", NOW, body);
        let sigs = format!("v1,AAAA {good} v2,zzz");
        let h = [
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1735689600"),
            ("webhook-signature", sigs.as_str()),
        ];
        let got = v.verify(&req(&h, body, NOW)).unwrap();
        assert_eq!(
            (got.key_id, got.event_id.as_str(), got.event_type.as_str()),
            (1, "msg_1", "invoice.paid")
        );
        // Boundary inclusive, both directions.
        assert!(v.verify(&req(&h, body, NOW + 300)).is_ok());
        assert!(v.verify(&req(&h, body, NOW - 300)).is_ok());
        assert_eq!(
            v.verify(&req(&h, body, NOW + 301)).unwrap_err(),
            VerifyError::Timestamp
        );
        assert_eq!(
            v.verify(&req(&h, body, NOW - 301)).unwrap_err(),
            VerifyError::Timestamp
        );
        // Wrong id in the signed content.
        let h2 = [
            ("webhook-id", "msg_2"),
            ("webhook-timestamp", "1735689600"),
            ("webhook-signature", sigs.as_str()),
        ];
        assert_eq!(
            v.verify(&req(&h2, body, NOW)).unwrap_err(),
            VerifyError::BadSignature
        );
    }

    #[test]
    fn svix_family_and_malformed() {
        let body = b"{}";
        let v = verifier();
        let good = sign(b"old-key", "msg_1", NOW, body);
        let h = [
            ("svix-id", "msg_1"),
            ("svix-timestamp", "1735689600"),
            ("svix-signature", good.as_str()),
        ];
        assert_eq!(v.verify(&req(&h, body, NOW)).unwrap().key_id, 0);
        let mixed = [
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1735689600"),
            ("svix-signature", good.as_str()),
        ];
        assert_eq!(
            v.verify(&req(&mixed, body, NOW)).unwrap_err().reason(),
            "missing_header"
        );
        let bad_ts = [
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "soon"),
            ("webhook-signature", good.as_str()),
        ];
        assert_eq!(
            v.verify(&req(&bad_ts, body, NOW)).unwrap_err().reason(),
            "malformed"
        );
    }

    #[test]
    fn decodes_secrets() {
        assert_eq!(decode_secret("whsec_aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(decode_secret("whsec_!!"), None);
    }
}
