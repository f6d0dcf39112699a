//! GitHub: `X-Hub-Signature-256: sha256=<lower-case hex>` of the raw body.
//! The legacy SHA-1 `X-Hub-Signature` is never used. Id `X-GitHub-Delivery`,
//! type `X-GitHub-Event`.

use secrecy::SecretSlice;

use super::{
    body_hash_id, find_key, header, optional_header, Request, Verified, Verifier, VerifyError,
};

/// GitHub verifier.
pub struct GitHub {
    secrets: Vec<SecretSlice<u8>>,
}

impl GitHub {
    /// Secrets are the webhook secrets' UTF-8 bytes.
    pub fn new(secrets: Vec<SecretSlice<u8>>) -> Self {
        Self { secrets }
    }
}

impl Verifier for GitHub {
    fn scheme(&self) -> &'static str {
        "github"
    }

    fn verify(&self, req: &Request<'_>) -> Result<Verified, VerifyError> {
        let value = header(req, "x-hub-signature-256")?;
        let given = value
            .strip_prefix("sha256=")
            .filter(|h| h.len() == 64)
            .ok_or(VerifyError::Malformed("x-hub-signature-256".into()))?;
        // GitHub sends lower-case hex; compare the text, so upper case fails.
        let key_id = find_key(&self.secrets, &[req.body], &[given], |mac| {
            hex::encode(mac).into_bytes()
        })
        .ok_or(VerifyError::BadSignature)?;
        Ok(Verified {
            key_id,
            event_id: optional_header(req.headers, "x-github-delivery")
                .map(str::to_owned)
                .unwrap_or_else(|| body_hash_id(req.body)),
            event_type: optional_header(req.headers, "x-github-event")
                .unwrap_or_default()
                .to_owned(),
            timestamp: None,
            challenge: None,
        })
    }

    fn kept_headers(&self) -> Vec<String> {
        [
            "x-hub-signature-256",
            "x-github-delivery",
            "x-github-event",
            "x-github-hook-id",
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
        run_vectors("github");
    }

    #[test]
    fn rotation_case_and_missing() {
        let body = b"{\"zen\":\"x\"}";
        let v = GitHub::new(secret_list(&["old", "new"]));
        let sig = format!("sha256={}", hex::encode(mac(b"old", body)));
        let got = v
            .verify(&req(
                &[
                    ("X-Hub-Signature-256", &sig),
                    ("X-GitHub-Delivery", "d1"),
                    ("X-GitHub-Event", "push"),
                ],
                body,
                0,
            ))
            .unwrap();
        assert_eq!(
            (got.key_id, got.event_id.as_str(), got.event_type.as_str()),
            (0, "d1", "push")
        );
        let upper = format!("sha256={}", hex::encode_upper(mac(b"old", body)));
        assert_eq!(
            v.verify(&req(&[("X-Hub-Signature-256", &upper)], body, 0))
                .unwrap_err(),
            VerifyError::BadSignature
        );
        assert_eq!(
            v.verify(&req(&[], body, 0)).unwrap_err().reason(),
            "missing_header"
        );
        let sha1_only = format!("sha1={}", hex::encode(&mac(b"old", body)[..20]));
        assert_eq!(
            v.verify(&req(&[("X-Hub-Signature", &sha1_only)], body, 0))
                .unwrap_err()
                .reason(),
            "missing_header"
        );
        assert_eq!(
            v.verify(&req(&[("X-Hub-Signature-256", "md5=abc")], body, 0))
                .unwrap_err()
                .reason(),
            "malformed"
        );
        // No delivery header: body-hash id.
        let got = v
            .verify(&req(&[("X-Hub-Signature-256", &sig)], body, 0))
            .unwrap();
        assert_eq!(got.event_id, body_hash_id(body));
    }
}
