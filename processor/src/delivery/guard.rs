//! SSRF guard for callback URLs: `https` only, and never an address on
//! loopback, private, link-local or other non-public ranges, unless the
//! operator allows it (`delivery.allow_http`, `delivery.allow_private_networks`
//! — local runs and tests). Checked when a subscription is created, and
//! again at connect time by [`GuardedResolver`], so a DNS answer that
//! changes later (rebinding) cannot reach an internal address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// What the operator allows.
#[derive(Clone, Copy, Debug, Default)]
pub struct UrlPolicy {
    /// Allow `http://`.
    pub allow_http: bool,
    /// Allow non-public addresses.
    pub allow_private: bool,
}

/// Parses and checks a callback URL without DNS (syntax, scheme, IP literal).
pub fn check_url(raw: &str, policy: UrlPolicy) -> Result<Url, String> {
    if raw.len() > 2048 {
        return Err("callback_url is longer than 2048 characters".into());
    }
    let url = Url::parse(raw).map_err(|e| format!("callback_url is not a valid URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => return Err("callback_url must use https".into()),
        other => {
            return Err(format!(
                "callback_url scheme {other:?} is not allowed; use https"
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("callback_url must not contain credentials".into());
    }
    let host = url
        .host()
        .ok_or_else(|| "callback_url has no host".to_string())?;
    let literal = match host {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(d)
            if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
        {
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = literal {
        if !policy.allow_private && !is_public(ip) {
            return Err(format!(
                "callback_url points at a non-public address ({ip}); private callbacks are not allowed"
            ));
        }
    }
    Ok(url)
}

/// [`check_url`], then resolves a host name and checks every address.
pub async fn check_url_resolving(raw: &str, policy: UrlPolicy) -> Result<Url, String> {
    let url = check_url(raw, policy)?;
    if let Some(url::Host::Domain(domain)) = url.host() {
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs = tokio::net::lookup_host((domain, port))
            .await
            .map_err(|_| format!("callback_url host {domain} does not resolve"))?;
        for a in addrs {
            if !policy.allow_private && !is_public(a.ip()) {
                return Err(format!(
                    "callback_url host {domain} resolves to a non-public address ({}); private callbacks are not allowed",
                    a.ip()
                ));
            }
        }
    }
    Ok(url)
}

/// True for addresses routable on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64 to anywhere
                || v6 == Ipv6Addr::from(1u128)) // ::1 (belt and braces)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18)) // benchmarking 198.18/15
}

/// A DNS resolver for the delivery client that refuses non-public answers.
#[derive(Clone, Copy, Debug)]
pub struct GuardedResolver {
    /// Let private addresses through.
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!("{} resolves to no public address", name.as_str()).into());
            }
            let it: Addrs = Box::new(allowed.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: UrlPolicy = UrlPolicy {
        allow_http: false,
        allow_private: false,
    };

    #[test]
    fn classifies_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn refuses_unsafe_callback_urls_with_a_reason() {
        let cases = [
            ("http://example.com/x", "https"),
            ("ftp://example.com/x", "scheme"),
            ("https://127.0.0.1/x", "non-public"),
            ("https://[::1]:8443/x", "non-public"),
            ("https://localhost/x", "non-public"),
            ("https://169.254.169.254/latest", "non-public"),
            ("https://user:pw@example.com/", "credentials"),
            ("not a url", "valid URL"),
        ];
        for (url, why) in cases {
            let err = check_url(url, STRICT).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        assert!(check_url("https://example.com/hooks", STRICT).is_ok());
        let local = UrlPolicy {
            allow_http: true,
            allow_private: true,
        };
        assert!(check_url("http://127.0.0.1:9/x", local).is_ok());
    }
}
