//! Which web pages may open connections: the `Origin` header of an upgrade
//! checked against `allowed-origins`, against cross-site WebSocket
//! hijacking (a page of another site using a visitor's cookies to connect).
//!
//! A pattern is `scheme://host[:port]`; the host may start with `*.` to
//! match any subdomain (not the domain itself), and `null` matches the
//! opaque origin of sandboxed frames and local files. Hosts compare without
//! case; a pattern without a port matches the scheme's default port only.

/// One `allowed-origins` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginPattern {
    scheme: String,
    /// Lower case, without the `*.` of a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
    null: bool,
}

/// `scheme`, host and port of an origin (`None`: not `scheme://host[:port]`).
fn split(origin: &str) -> Option<(String, String, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    if scheme.is_empty() || rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, Some(p.parse::<u16>().ok()?))
        }
        _ => (rest, None),
    };
    (!host.is_empty()).then(|| (scheme.to_ascii_lowercase(), host.to_ascii_lowercase(), port))
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

impl OriginPattern {
    /// Parses a pattern; `None` if it is not one.
    pub(crate) fn parse(p: &str) -> Option<Self> {
        if p == "null" {
            return Some(Self {
                scheme: String::new(),
                host: String::new(),
                wildcard: false,
                port: None,
                null: true,
            });
        }
        let (scheme, host, port) = split(p)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(h) => (h.to_owned(), true),
            None => (host, false),
        };
        if host.is_empty() || host.contains('*') {
            return None;
        }
        Some(Self {
            scheme,
            host,
            wildcard,
            port,
            null: false,
        })
    }

    /// Whether the `Origin` header value `origin` matches.
    pub(crate) fn matches(&self, origin: &str) -> bool {
        if self.null || origin == "null" {
            return self.null && origin == "null";
        }
        let Some((scheme, host, port)) = split(origin) else {
            return false;
        };
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            host == self.host
        };
        let port_of = |p: Option<u16>, s: &str| p.or_else(|| default_port(s));
        scheme == self.scheme
            && host_ok
            && port_of(port, &scheme) == port_of(self.port, &self.scheme)
    }
}

/// Whether a request with `origin` (its `Origin` header, if any) may
/// connect under `patterns` (empty: everyone).
pub(crate) fn allowed(patterns: &[OriginPattern], origin: Option<&str>) -> bool {
    match origin {
        _ if patterns.is_empty() => true,
        // Not a browser: the header is what CSWSH is about.
        None => true,
        Some(o) => patterns.iter().any(|p| p.matches(o.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(pattern: &str, origin: &str) -> bool {
        OriginPattern::parse(pattern)
            .expect(pattern)
            .matches(origin)
    }

    #[test]
    fn exact_and_wildcard_patterns() {
        assert!(ok("https://app.example.com", "https://app.example.com"));
        assert!(ok("https://app.example.com", "https://APP.example.com"));
        assert!(ok("https://app.example.com", "https://app.example.com:443"));
        assert!(!ok("https://app.example.com", "http://app.example.com"));
        assert!(!ok(
            "https://app.example.com",
            "https://app.example.com:8443"
        ));
        assert!(!ok(
            "https://app.example.com",
            "https://app.example.com.evil.io"
        ));
        assert!(!ok(
            "https://app.example.com",
            "https://evilapp.example.com"
        ));
        assert!(ok("http://localhost:3000", "http://localhost:3000"));
        assert!(!ok("http://localhost:3000", "http://localhost:3001"));
        assert!(ok("https://*.example.com", "https://a.example.com"));
        assert!(ok("https://*.example.com", "https://a.b.example.com"));
        assert!(!ok("https://*.example.com", "https://example.com"));
        assert!(!ok("https://*.example.com", "https://badexample.com"));
        assert!(!ok(
            "https://*.example.com",
            "https://a.example.com.evil.io"
        ));
        assert!(ok("null", "null"));
        assert!(!ok("https://app.example.com", "null"));
        assert!(!ok("https://app.example.com", "garbage"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "app.example.com",
            "https://",
            "https://a/b",
            "https://a.*.com",
            "https://*",
            "https://x:99999",
        ] {
            assert_eq!(OriginPattern::parse(p), None, "{p}");
        }
    }

    #[test]
    fn no_patterns_or_no_header_allow() {
        let p = [OriginPattern::parse("https://a.example").unwrap()];
        assert!(allowed(&[], Some("https://evil.io")));
        assert!(allowed(&p, None));
        assert!(allowed(&p, Some("https://a.example")));
        assert!(!allowed(&p, Some("https://evil.io")));
    }
}
