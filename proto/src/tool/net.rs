//! Network host grants: `host` or `host:port`, as Deno's `--allow-net` takes them. No schemes,
//! paths or wildcards, so a grant always means exactly what it says.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// One host a tool may connect to, lowercased: `api.example.com`, `127.0.0.1:8080`, `[::1]:80`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetHost(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network host {host:?}: {reason}")]
pub struct InvalidNetHost {
    pub host: String,
    pub reason: &'static str,
}

impl NetHost {
    pub fn parse(s: &str) -> Result<Self, InvalidNetHost> {
        let err = |reason| InvalidNetHost { host: s.to_owned(), reason };
        let lower = s.trim().to_ascii_lowercase();
        if lower.contains("://") || lower.contains('/') {
            return Err(err("give a host or host:port, not a URL"));
        }
        if lower.contains('*') {
            return Err(err("wildcards are not supported; list each host"));
        }
        let (host, port) = split_port(&lower).ok_or_else(|| err("malformed port"))?;
        if let Some(p) = port
            && p == 0
        {
            return Err(err("port must be 1-65535"));
        }
        let valid_host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<Ipv6Addr>().is_ok()
        } else {
            host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host)
        };
        if !valid_host {
            return Err(err("not a valid host name or IP address"));
        }
        Ok(Self(lower))
    }

    /// The host part, without the port (IPv6 keeps its brackets).
    pub fn host(&self) -> &str {
        split_port(&self.0).map_or(self.0.as_str(), |(h, _)| h)
    }

    pub fn port(&self) -> Option<u16> {
        split_port(&self.0).and_then(|(_, p)| p)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this grant is covered by `other`: same host, and `other` has no port or the same.
    pub fn is_within(&self, other: &NetHost) -> bool {
        self.host() == other.host() && (other.port().is_none() || other.port() == self.port())
    }
}

fn split_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            r => r.strip_prefix(':')?.parse().ok().map(|p| (host, Some(p))),
        };
    }
    match s.rsplit_once(':') {
        None => Some((s, None)),
        Some((h, p)) if !h.contains(':') => p.parse().ok().map(|p| (h, Some(p))),
        Some(_) => None,
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl TryFrom<String> for NetHost {
    type Error = InvalidNetHost;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<NetHost> for String {
    fn from(h: NetHost) -> String {
        h.0
    }
}

impl fmt::Display for NetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hosts_ips_and_ports() {
        for ok in ["api.example.com", "API.Example.com:443", "127.0.0.1:8080", "[::1]:80", "[::1]", "localhost"] {
            assert!(NetHost::parse(ok).is_ok(), "{ok} should be accepted");
        }
        assert_eq!(NetHost::parse("API.Example.com:443").unwrap().as_str(), "api.example.com:443");
    }

    #[test]
    fn rejects_urls_wildcards_and_junk() {
        for bad in ["https://x.com", "x.com/path", "*.x.com", "", "x.com:0", "x.com:99999", "-x.com", "a..b", "::1"] {
            assert!(NetHost::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn within_compares_host_and_port() {
        let h = |s| NetHost::parse(s).unwrap();
        assert!(h("a.com:443").is_within(&h("a.com")));
        assert!(h("a.com:443").is_within(&h("a.com:443")));
        assert!(!h("a.com").is_within(&h("a.com:443")));
        assert!(!h("b.com").is_within(&h("a.com")));
    }
}
