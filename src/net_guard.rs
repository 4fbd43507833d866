//! Server-side request forgery guard: may a URL a user gave be fetched by this server?
//!
//! A URL is refused when its host is, or resolves to, a loopback, link-local (cloud metadata at
//! 169.254.169.254), private, shared (CGNAT), unspecified, multicast or documentation address,
//! unless the operator allowed that host or range (`allowed_private_networks`). Every address a
//! name resolves to is checked, and the caller should connect to the returned addresses only, so a
//! DNS answer that changes between check and use (rebinding) cannot slip through.
//!
//! Model and dataset references cannot name a host at all (`s3://` goes to the configured S3
//! endpoint, `hf://` to the configured Hub); this check is for URLs that do (webhook targets).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use url::Url;

use crate::error::{Error, Result};
use crate::inputs::Rejection;

/// One entry of `allowed_private_networks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedNetwork {
    /// A host name, matched case-insensitively and exactly.
    Host(String),
    /// An address or a CIDR range.
    Network(IpNet),
}

impl AllowedNetwork {
    /// Parses a host name, an IP address or a CIDR range; `None` when it is none of them.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Some(Self::Network(net));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(Self::Network(IpNet::from(ip)));
        }
        let host_like = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        host_like.then(|| Self::Host(text.to_ascii_lowercase()))
    }
}

/// The operator's exceptions to the guard.
#[derive(Clone, Debug, Default)]
pub struct UrlPolicy {
    allowed: Vec<AllowedNetwork>,
}

impl UrlPolicy {
    /// A policy from `allowed_private_networks` (entries that do not parse were refused when the
    /// settings were loaded, and are skipped here).
    pub fn new(allowed: &[String]) -> Self {
        Self {
            allowed: allowed
                .iter()
                .filter_map(|a| AllowedNetwork::parse(a))
                .collect(),
        }
    }

    /// Whether `ip` may be reached: a public address, or one the operator allowed.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        !is_internal(ip)
            || self.allowed.iter().any(|a| match a {
                AllowedNetwork::Network(net) => net.contains(&ip),
                AllowedNetwork::Host(_) => false,
            })
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed
            .iter()
            .any(|a| matches!(a, AllowedNetwork::Host(h) if *h == host))
    }

    /// Checks a user-given `http(s)` URL and resolves its host. Returns the addresses to connect
    /// to (connect to these, not to the name again).
    ///
    /// # Errors
    /// [`Error::Rejected`] with slug `url-not-allowed` naming the reason: not http(s), userinfo
    /// in the URL, no host, a host that does not resolve, or an internal address not allowed.
    pub async fn check_url(&self, url: &str) -> Result<Vec<SocketAddr>> {
        let parsed = parse_http_url(url)?;
        let host = parsed
            .host_str()
            .ok_or_else(|| refused(url, "it has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| refused(url, "its host does not resolve"))?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(refused(url, "its host does not resolve"));
        }
        if self.host_allowed(&host) {
            return Ok(addresses);
        }
        if let Some(bad) = addresses.iter().find(|a| !self.ip_allowed(a.ip())) {
            return Err(refused(
                url,
                &format!(
                    "it reaches {}, a loopback, link-local or private address \
                     (allow it with `allowed_private_networks`)",
                    bad.ip()
                ),
            ));
        }
        Ok(addresses)
    }
}

/// Parses `url` as an absolute `http`/`https` URL without credentials.
///
/// # Errors
/// [`Error::Rejected`] (`url-not-allowed`) naming what is wrong.
pub fn parse_http_url(url: &str) -> Result<Url> {
    let parsed = Url::parse(url).map_err(|e| refused(url, &format!("it is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(refused(url, "only http and https URLs are allowed"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refused(url, "credentials in the URL are not allowed"));
    }
    Ok(parsed)
}

fn refused(url: &str, why: &str) -> Error {
    Error::Rejected(Rejection::new(
        "url-not-allowed",
        format!("{url} is not allowed: {why}"),
    ))
}

/// Whether `ip` is an address inside a host or a private network rather than on the internet.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            // IPv4-mapped and -compatible addresses reach the IPv4 host.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            is_internal_v6(v6)
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0                              // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))   // benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b // NAT64 to any IPv4 host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip} should be internal");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "151.101.1.1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip} should be public");
        }
    }

    #[tokio::test]
    async fn internal_urls_are_refused_unless_allowed() {
        let strict = UrlPolicy::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://localhost/",
            "http://10.0.0.5/",
            "ftp://example.com/",
            "http://user:pw@8.8.8.8/",
            "file:///etc/passwd",
            "not a url",
        ] {
            let error = strict.check_url(url).await.unwrap_err();
            assert!(
                matches!(&error, Error::Rejected(r) if r.slug == "url-not-allowed"),
                "{url}: {error}"
            );
        }
        assert_eq!(
            strict.check_url("https://8.8.8.8/hook").await.unwrap(),
            vec!["8.8.8.8:443".parse().unwrap()]
        );
        let allowed = UrlPolicy::new(&["10.0.0.0/8".into(), "localhost".into()]);
        assert!(allowed.check_url("http://10.0.0.5:9000/").await.is_ok());
        assert!(allowed.check_url("http://localhost:1/").await.is_ok());
        assert!(allowed.check_url("http://192.168.0.1/").await.is_err());
    }

    #[test]
    fn allowed_networks_parse() {
        assert!(matches!(
            AllowedNetwork::parse("10.0.0.0/8"),
            Some(AllowedNetwork::Network(_))
        ));
        assert!(matches!(
            AllowedNetwork::parse("::1"),
            Some(AllowedNetwork::Network(_))
        ));
        assert_eq!(
            AllowedNetwork::parse("MinIO.internal"),
            Some(AllowedNetwork::Host("minio.internal".into()))
        );
        assert_eq!(AllowedNetwork::parse("http://x/"), None);
        assert_eq!(AllowedNetwork::parse(""), None);
    }
}
