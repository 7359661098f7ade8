//! The SSRF guard for RFC 8935 push endpoint URLs.
//!
//! A relying party registers the URL the hub POSTs its SETs to, so without a
//! guard any receiver could make the hub send requests into the hub's own
//! network: loopback admin ports, private services, cloud metadata
//! endpoints. The guard refuses such destinations twice:
//!
//! - at stream create/update ([`PushUrlGuard::check_url`]), so the receiver
//!   gets a clear 400 naming the problem;
//! - at connect time, because DNS answers change (DNS rebinding): the client
//!   from [`PushUrlGuard::client_builder`] resolves names through
//!   [`GuardedResolver`], which drops refused addresses, and the push sender
//!   calls [`PushUrlGuard::check_request_url`] before each send, since reqwest
//!   never consults the resolver for IP-literal hosts.
//!
//! Operators who do want to push into such ranges (tests, on-premises
//! receivers) list them in `CAEP_HUB_PUSH_ALLOW_CIDRS`; an address inside the
//! allowlist is always accepted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How long resolving a push endpoint's host may take, at create/update time
/// and at connect time. A stalled resolver must not hold a management request
/// (or a delivery worker) indefinitely.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP (and TLS) connect timeout of the push client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of the push client: RFC 8935 receivers answer with
/// an empty 202, so anything slower is a stuck receiver, retried later.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle pooled connection is kept for the next SET.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per receiver host; a cascade sends many SETs to one
/// receiver at once, and reusing connections avoids a TLS handshake each.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// The name of the operator allowlist setting, quoted in error messages so an
/// RP developer (or operator) knows where the knob is.
const ALLOW_SETTING: &str = "CAEP_HUB_PUSH_ALLOW_CIDRS";

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    // `new_assert` in a const table panics at compile time on a bad prefix,
    // so no runtime check is needed.
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

#[allow(clippy::too_many_arguments)]
const fn v6(s0: u16, s1: u16, s2: u16, s3: u16, s4: u16, s5: u16, s6: u16, s7: u16, prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(s0, s1, s2, s3, s4, s5, s6, s7), prefix)
}

/// Refused IPv4 ranges with the category named in errors. The first match
/// wins, so the specific cloud-metadata and broadcast addresses come before
/// the ranges that contain them, to name them precisely.
const V4_REFUSED: &[(Ipv4Net, &str)] = &[
    // AWS, GCP, Azure, OpenStack, DigitalOcean... instance metadata.
    (v4(169, 254, 169, 254, 32), "link-local (cloud metadata)"),
    // Alibaba Cloud instance metadata.
    (v4(100, 100, 100, 200, 32), "carrier-grade NAT (cloud metadata)"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    // Linux connects 0.0.0.0 to the local host.
    (v4(0, 0, 0, 0, 8), "this-network (unspecified)"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignment"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

/// Refused IPv6 ranges, first match wins as for [`V4_REFUSED`]. Ranges that
/// embed an IPv4 address (IPv4-mapped, NAT64, 6to4) are not here: their
/// embedded address is checked instead, see [`embedded_v4`].
const V6_REFUSED: &[(Ipv6Net, &str)] = &[
    // AWS instance metadata over IPv6 (Nitro).
    (v6(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254, 128), "unique-local (cloud metadata)"),
    (v6(0, 0, 0, 0, 0, 0, 0, 0, 128), "unspecified"),
    (v6(0, 0, 0, 0, 0, 0, 0, 1, 128), "loopback"),
    // Deprecated IPv4-compatible addresses (::a.b.c.d): nothing legitimate
    // uses them, and how a host routes them varies, so refuse the range.
    (v6(0, 0, 0, 0, 0, 0, 0, 0, 96), "IPv4-compatible (deprecated)"),
    (v6(0x100, 0, 0, 0, 0, 0, 0, 0, 64), "discard-only"),
    (v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0, 32), "documentation"),
    (v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7), "unique-local"),
    (v6(0xfe80, 0, 0, 0, 0, 0, 0, 0, 10), "link-local"),
    (v6(0xfec0, 0, 0, 0, 0, 0, 0, 0, 10), "site-local (deprecated)"),
    (v6(0xff00, 0, 0, 0, 0, 0, 0, 0, 8), "multicast"),
];

const NAT64: Ipv6Net = v6(0x64, 0xff9b, 0, 0, 0, 0, 0, 0, 96);
const SIX_TO_FOUR: Ipv6Net = v6(0x2002, 0, 0, 0, 0, 0, 0, 0, 16);

/// The IPv4 address an IPv6 address forwards to, for the forms whose traffic
/// ends up at that IPv4 address: IPv4-mapped (`::ffff:a.b.c.d`, which the
/// local stack connects over IPv4), NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let o = ip.octets();
    if NAT64.contains(&ip) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if SIX_TO_FOUR.contains(&ip) {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// "a" or "an" before a category name, so messages read naturally.
fn article(category: &str) -> &'static str {
    // "unique-local" is read "you-nique", so it takes "a".
    if category.starts_with("uni") {
        return "a";
    }
    match category.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'I') => "an",
        _ => "a",
    }
}

fn refused_message(host: &str, ip: &IpAddr, category: &str) -> String {
    let what = if host == ip.to_string() {
        format!("push endpoint host {host} is")
    } else {
        format!("push endpoint host {host} resolves to {ip},")
    };
    format!(
        "{what} {} {category} address; the hub refuses it (operators can allow ranges with {ALLOW_SETTING})",
        article(category)
    )
}

/// Why a push endpoint URL (or one of its addresses) is refused. The
/// messages are meant for the relying party's developer: the management API
/// returns them as the 400 description.
#[derive(Debug, thiserror::Error)]
pub enum SsrfError {
    /// The URL does not parse, has no host, or names port 0.
    #[error("push endpoint URL is not valid: {0}")]
    InvalidUrl(String),
    /// The scheme is neither https nor http.
    #[error("push endpoint URL scheme `{0}` is not allowed; use https (or http)")]
    Scheme(String),
    /// The URL carries `user:password@`.
    #[error(
        "push endpoint URL must not carry credentials (user:password@); \
         give them as the stream's authorization_header instead"
    )]
    Credentials,
    /// The host is, or resolves to, an address in a refused range.
    #[error("{}", refused_message(host, ip, category))]
    Refused {
        /// The URL's host as written (after URL normalization).
        host: String,
        /// The refused address.
        ip: IpAddr,
        /// The range it falls in, e.g. "loopback" or "private".
        category: &'static str,
    },
    /// A URL keys are fetched from uses plain http outside the allowlist:
    /// anyone on the path could swap the keys.
    #[error("{0} must use https (plain http only for hosts inside {ALLOW_SETTING}, for local trials)")]
    PlainHttp(String),
    /// The host name did not resolve (error, timeout or no addresses).
    #[error("push endpoint host {host} cannot be resolved: {reason}")]
    Unresolvable {
        /// The host name.
        host: String,
        /// What went wrong.
        reason: String,
    },
}

/// Decides which push destinations the hub may connect to: refuses
/// loopback, private, link-local, unique-local, multicast, carrier-grade NAT,
/// cloud-metadata and other special-purpose addresses unless they are inside
/// the operator allowlist.
#[derive(Debug, Clone)]
pub struct PushUrlGuard {
    allow: Arc<Vec<IpNet>>,
}

impl PushUrlGuard {
    /// A guard admitting, besides public addresses, those inside `allow`
    /// (`CAEP_HUB_PUSH_ALLOW_CIDRS`).
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow: Arc::new(allow) }
    }

    /// The refused-range category of `ip`, or `None` when the hub may
    /// connect to it.
    fn refused_category(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        match ip {
            IpAddr::V4(v4) => V4_REFUSED.iter().find(|(net, _)| net.contains(&v4)).map(|(_, c)| *c),
            IpAddr::V6(v6) => {
                if let Some(v4) = embedded_v4(v6) {
                    // The allowlist is consulted again for the IPv4 form, so
                    // allowing 127.0.0.0/8 also admits ::ffff:127.0.0.1.
                    return self.refused_category(IpAddr::V4(v4));
                }
                V6_REFUSED.iter().find(|(net, _)| net.contains(&v6)).map(|(_, c)| *c)
            }
        }
    }

    /// Whether the hub may connect to `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), SsrfError> {
        match self.refused_category(ip) {
            None => Ok(()),
            Some(category) => Err(SsrfError::Refused { host: ip.to_string(), ip, category }),
        }
    }

    /// The checks that need no DNS: scheme, credentials, host, port, and the
    /// address when the host is an IP literal. Returns the host and port
    /// when the host is a domain name still to be resolved.
    fn check_static<'u>(&self, url: &'u Url) -> Result<Option<(&'u str, u16)>, SsrfError> {
        match url.scheme() {
            // Plain http is accepted because local and test receivers rarely
            // have certificates; the SET is signed either way.
            "https" | "http" => {}
            other => return Err(SsrfError::Scheme(other.to_owned())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SsrfError::Credentials);
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| SsrfError::InvalidUrl("the URL has no host".to_owned()))?;
        let port =
            url.port_or_known_default().ok_or_else(|| SsrfError::InvalidUrl("the URL has no port".to_owned()))?;
        if port == 0 {
            return Err(SsrfError::InvalidUrl("port 0 is not a destination port".to_owned()));
        }
        // The WHATWG parser has already normalized every IPv4 spelling
        // (decimal `2130706433`, hex `0x7f.1`, octal `0177.0.0.1`, trailing
        // dot) to dotted quads and IPv6 literals to bracketed compressed
        // form, so parsing `host_str` catches them all.
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        match literal.parse::<IpAddr>() {
            Ok(ip) => match self.refused_category(ip) {
                None => Ok(None),
                Some(category) => Err(SsrfError::Refused { host: host.to_owned(), ip, category }),
            },
            Err(_) => Ok(Some((host, port))),
        }
    }

    /// Validates a push endpoint URL at stream create/update time: scheme
    /// https or http, no credentials, a host, a non-zero port, and every
    /// address the host resolves to allowed. Returns the parsed URL.
    pub async fn check_url(&self, url: &str) -> Result<Url, SsrfError> {
        let parsed = Url::parse(url).map_err(|e| SsrfError::InvalidUrl(e.to_string()))?;
        if let Some((host, port)) = self.check_static(&parsed)? {
            // Refuse if ANY address is refused: a name with one public and
            // one internal address would otherwise get past this check and
            // only ever work half of the time at delivery.
            let addrs = resolve(host, port).await?;
            for addr in addrs {
                if let Some(category) = self.refused_category(addr.ip()) {
                    tracing::debug!(host, ip = %addr.ip(), category, "push endpoint refused");
                    return Err(SsrfError::Refused { host: host.to_owned(), ip: addr.ip(), category });
                }
            }
        }
        Ok(parsed)
    }

    /// Validates a URL that trust anchors (keys) are fetched from, such as
    /// an IdP's `jwks_uri`: as [`Self::check_url`], and https, unless every
    /// address the host names is inside the operator allowlist.
    pub async fn check_key_url(&self, url: &str) -> Result<Url, SsrfError> {
        let parsed = self.check_url(url).await?;
        if parsed.scheme() == "https" {
            return Ok(parsed);
        }
        let host = parsed.host_str().unwrap_or_default();
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let addresses: Vec<IpAddr> = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => resolve(host, parsed.port_or_known_default().unwrap_or(80))
                .await?
                .into_iter()
                .map(|addr| addr.ip())
                .collect(),
        };
        let allowed = |ip: &IpAddr| {
            let ip = match ip {
                IpAddr::V6(v6) => embedded_v4(*v6).map_or(*ip, IpAddr::V4),
                IpAddr::V4(_) => *ip,
            };
            self.allow.iter().any(|net| net.contains(&ip))
        };
        if addresses.is_empty() || !addresses.iter().all(allowed) {
            return Err(SsrfError::PlainHttp(format!("`{url}`")));
        }
        Ok(parsed)
    }

    /// The connect-time check for IP-literal hosts, which reqwest connects to
    /// without asking the resolver. Domain hosts pass here; the
    /// [`GuardedResolver`] of [`Self::client_builder`] guards them. The push
    /// sender calls this before each send.
    pub fn check_request_url(&self, url: &Url) -> Result<(), SsrfError> {
        self.check_static(url).map(|_| ()).inspect_err(|e| {
            tracing::warn!(url.host = url.host_str().unwrap_or(""), error = %e, "push request refused");
        })
    }

    /// A client builder for push delivery: the guarded resolver, no
    /// redirects (a redirect could point at an internal address, and RFC 8935
    /// success is a plain 202), no proxies, and pool/timeout settings for
    /// many small POSTs.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .dns_resolver(GuardedResolver::new(self.clone()))
            .redirect(reqwest::redirect::Policy::none())
            // With a proxy (including one from HTTP_PROXY/HTTPS_PROXY) the
            // proxy resolves and connects to the receiver, bypassing the
            // resolver, so the guard would only ever see the proxy's address.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .tcp_nodelay(true)
    }
}

/// Resolves `host` with a bound on the time taken; no addresses is an error.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, SsrfError> {
    let unresolvable = |reason: String| SsrfError::Unresolvable { host: host.to_owned(), reason };
    let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| unresolvable(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())))?
        .map_err(|e| unresolvable(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    Ok(addrs)
}

/// A reqwest resolver that resolves with the system resolver and drops the
/// addresses the [`PushUrlGuard`] refuses, so a name that changes its answer
/// after registration (DNS rebinding) cannot reach an internal address.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: PushUrlGuard,
}

impl GuardedResolver {
    /// A resolver filtering through `guard`.
    pub fn new(guard: PushUrlGuard) -> Self {
        Self { guard }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str();
            // Port 0: reqwest substitutes the URL's port.
            let addrs = resolve(host, 0).await?;
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|addr| match guard.refused_category(addr.ip()) {
                    None => true,
                    Some(category) => {
                        tracing::warn!(host, ip = %addr.ip(), category, "push connect: address refused");
                        first_refusal.get_or_insert(SsrfError::Refused {
                            host: host.to_owned(),
                            ip: addr.ip(),
                            category,
                        });
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                // `resolve` never returns an empty list, so a refusal was
                // recorded; the fallback only keeps this free of panics.
                let err = first_refusal.unwrap_or_else(|| SsrfError::Unresolvable {
                    host: host.to_owned(),
                    reason: "no addresses".to_owned(),
                });
                return Err(err.into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn guard() -> PushUrlGuard {
        PushUrlGuard::new(Vec::new())
    }

    fn loopback_allowed() -> PushUrlGuard {
        PushUrlGuard::new(vec!["127.0.0.0/8".parse().expect("cidr")])
    }

    fn category_of(guard: &PushUrlGuard, ip: &str) -> Option<&'static str> {
        match guard.check_ip(ip.parse().expect("ip")) {
            Ok(()) => None,
            Err(SsrfError::Refused { category, .. }) => Some(category),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn every_category_is_refused_with_its_name() {
        let cases = [
            ("0.0.0.0", "this-network (unspecified)"),
            ("0.1.2.3", "this-network (unspecified)"),
            ("10.0.0.5", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.254", "carrier-grade NAT"),
            ("100.100.100.200", "carrier-grade NAT (cloud metadata)"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.1.1", "link-local"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.8", "IETF protocol assignment"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay anycast"),
            ("192.168.1.1", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::7f00:1", "IPv4-compatible (deprecated)"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("64:ff9b::a00:1", "private"),
            ("64:ff9b::127.0.0.1", "loopback"),
            ("100::1", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fd00:ec2::254", "unique-local (cloud metadata)"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("ff02::1", "multicast"),
            ("2002:7f00:1::1", "loopback"),
            ("2002:c0a8:101::", "private"),
        ];
        let g = guard();
        for (ip, expected) in cases {
            assert_eq!(category_of(&g, ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let g = guard();
        for ip in [
            "93.184.215.14",
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
            "2a00:1450:4001:80b::200e",
            "::ffff:93.184.215.14",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(category_of(&g, ip), None, "{ip}");
        }
    }

    #[test]
    fn allowlist_admits_only_its_ranges() {
        let g = loopback_allowed();
        assert!(g.check_ip("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(g.check_ip("::ffff:127.0.0.1".parse().expect("ip")).is_ok());
        assert_eq!(category_of(&g, "10.0.0.1"), Some("private"));
        assert_eq!(category_of(&g, "::1"), Some("loopback"));
    }

    #[test]
    fn refusal_message_names_host_address_category_and_setting() {
        let err = SsrfError::Refused {
            host: "x.example".to_owned(),
            ip: "10.0.0.5".parse().expect("ip"),
            category: "private",
        };
        assert_eq!(
            err.to_string(),
            "push endpoint host x.example resolves to 10.0.0.5, a private address; the hub refuses it \
             (operators can allow ranges with CAEP_HUB_PUSH_ALLOW_CIDRS)"
        );
        let err = guard().check_ip("::1".parse().expect("ip")).expect_err("refused");
        assert!(err.to_string().starts_with("push endpoint host ::1 is a loopback address;"), "{err}");
        let err = guard().check_ip("fc00::1".parse().expect("ip")).expect_err("refused");
        assert!(err.to_string().contains("is a unique-local address"), "{err}");
        let err = guard().check_ip("0.0.0.0".parse().expect("ip")).expect_err("refused");
        assert!(err.to_string().contains("is a this-network (unspecified) address"), "{err}");
        let err = guard().check_ip("::".parse().expect("ip")).expect_err("refused");
        assert!(err.to_string().contains("is an unspecified address"), "{err}");
    }

    async fn refused(g: &PushUrlGuard, url: &str) -> SsrfError {
        match g.check_url(url).await {
            Ok(u) => panic!("{url} accepted as {u}"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn check_url_refuses_internal_and_malformed_urls() {
        let g = guard();
        for (url, category) in [
            ("http://localhost:8080/x", "loopback"),
            ("http://127.0.0.1/", "loopback"),
            ("http://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://169.254.169.254/latest/meta-data", "link-local (cloud metadata)"),
            // WHATWG IPv4 number forms all normalize to 127.0.0.1.
            ("http://2130706433/", "loopback"),
            ("http://0x7f.0.0.1/", "loopback"),
            ("http://0177.0.0.1/", "loopback"),
            ("http://127.1/", "loopback"),
            ("http://127.0.0.1./", "loopback"),
            ("https://0xa000005/", "private"),
            ("http://0/", "this-network (unspecified)"),
        ] {
            match refused(&g, url).await {
                SsrfError::Refused { category: c, .. } => assert_eq!(c, category, "{url}"),
                e => panic!("{url}: unexpected {e}"),
            }
        }
        // The number forms are refused as literals after URL normalization,
        // not because the system resolver happens to accept them too.
        for (url, host) in [
            ("http://2130706433/", "127.0.0.1"),
            ("http://0x7f.0.0.1/", "127.0.0.1"),
            ("http://0177.0.0.1/", "127.0.0.1"),
            ("http://127.1/", "127.0.0.1"),
            ("http://127.0.0.1./", "127.0.0.1"),
            ("http://0/", "0.0.0.0"),
            ("http://[0:0:0:0:0:ffff:7f00:1]/", "[::ffff:7f00:1]"),
        ] {
            match refused(&g, url).await {
                SsrfError::Refused { host: h, .. } => assert_eq!(h, host, "{url}"),
                e => panic!("{url}: unexpected {e}"),
            }
        }
        assert!(matches!(refused(&g, "https://user:pw@example.com/").await, SsrfError::Credentials));
        assert!(matches!(refused(&g, "https://user@example.com/").await, SsrfError::Credentials));
        assert!(matches!(refused(&g, "ftp://x/").await, SsrfError::Scheme(s) if s == "ftp"));
        assert!(matches!(refused(&g, "file:///etc/passwd").await, SsrfError::Scheme(_)));
        assert!(matches!(refused(&g, "not a url").await, SsrfError::InvalidUrl(_)));
        assert!(matches!(refused(&g, "http://203.0.113.1:0/").await, SsrfError::InvalidUrl(_)));
        // A name that cannot resolve: `.invalid` is reserved (RFC 6761) and
        // answered locally or by the resolver without any connection.
        assert!(matches!(refused(&g, "https://no-such-host.invalid/").await, SsrfError::Unresolvable { .. }));
    }

    #[tokio::test]
    async fn check_url_accepts_allowlisted_and_public_literals() {
        let url = loopback_allowed().check_url("http://127.0.0.1:9/").await.expect("allowed");
        assert_eq!(url.as_str(), "http://127.0.0.1:9/");
        // Public IP literals need no resolution.
        guard().check_url("https://93.184.215.14/ssf").await.expect("public");
        guard().check_url("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443/").await.expect("public v6");
    }

    const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    /// A receiver on 127.0.0.1 that answers every request with `answer`.
    async fn receiver(answer: &'static [u8]) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0_u8; 1024];
                    // Read the head; the tests send small bodies that arrive
                    // with it, and the connection is closed after one answer.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = sock.write_all(answer).await;
                });
            }
        });
        port
    }

    fn ssrf_source<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a SsrfError> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(s) = e.downcast_ref::<SsrfError>() {
                return Some(s);
            }
            cur = e.source();
        }
        None
    }

    #[tokio::test]
    async fn resolver_refuses_loopback_name_unless_allowed() {
        let port = receiver(ACCEPTED).await;
        let url = format!("http://localhost:{port}/");

        let client = guard().client_builder().build().expect("client");
        let err = client.post(&url).body("x").send().await.expect_err("refused by the resolver");
        match ssrf_source(&err) {
            Some(SsrfError::Refused { category, .. }) => assert_eq!(*category, "loopback"),
            other => panic!("expected a refusal from the resolver, got {other:?} ({err})"),
        }

        let client = loopback_allowed().client_builder().build().expect("client");
        let resp = client.post(&url).body("x").send().await.expect("allowed");
        assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn check_request_url_guards_ip_literals() {
        let port = receiver(ACCEPTED).await;
        let literal: Url = format!("http://127.0.0.1:{port}/").parse().expect("url");
        assert!(matches!(guard().check_request_url(&literal), Err(SsrfError::Refused { category: "loopback", .. })));
        loopback_allowed().check_request_url(&literal).expect("allowed");
        // Domain names pass here: the resolver guards them.
        let named: Url = format!("http://localhost:{port}/").parse().expect("url");
        guard().check_request_url(&named).expect("domain passes");
        let client = loopback_allowed().client_builder().build().expect("client");
        let resp = client.post(literal).body("x").send().await.expect("sent");
        assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn client_does_not_follow_redirects() {
        // The redirect target stays on loopback so that even a regression
        // sends no traffic off the machine.
        let target = receiver(ACCEPTED).await;
        let answer = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{target}/internal\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        );
        let port = receiver(Box::leak(answer.into_bytes().into_boxed_slice())).await;
        let client = loopback_allowed().client_builder().build().expect("client");
        let resp = client.post(format!("http://127.0.0.1:{port}/")).body("x").send().await.expect("sent");
        assert_eq!(resp.status(), reqwest::StatusCode::TEMPORARY_REDIRECT);
    }

    #[tokio::test]
    async fn key_urls_need_https_outside_the_allowlist() {
        let local = PushUrlGuard::new(vec!["127.0.0.0/8".parse().expect("net")]);
        local.check_key_url("http://127.0.0.1:8080/jwks").await.expect("http inside the allowlist");
        local.check_key_url("https://127.0.0.1/jwks").await.expect("https");
        let refused = guard().check_key_url("http://93.184.215.14/jwks").await;
        assert!(matches!(refused, Err(SsrfError::PlainHttp(_))), "{refused:?}");
        let refused = local.check_key_url("http://[::ffff:10.0.0.1]/jwks").await;
        assert!(matches!(refused, Err(SsrfError::Refused { .. })), "{refused:?}");
    }
}
