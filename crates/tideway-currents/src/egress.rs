//! HTTP clients that keep the egress policy (`tideway_core::egress`): the one way Tideway
//! builds a client for a URL someone typed in — Currents deliveries, test sends, the Heap
//! forwarder, alert webhooks, and the webhook channel of the messaging crate later.
//!
//! The rule is checked at each place a destination can enter a request:
//! - **the URL**, read by the very parser reqwest uses ([`reqwest::Url`], WHATWG), so
//!   `http://2852039166/`, `http://0251.0376.0251.0376/` or `http://[::ffff:a9fe:a9fe]/` are
//!   judged as the address they are: [`check_url`], before a request is made (an IP literal
//!   never reaches a resolver);
//! - **the resolved addresses**, at connect time: [`PolicyResolver`] resolves a name, drops
//!   every refused address and fails the connection, naming the rule, when none is left. The
//!   client connects to exactly the addresses it returns, so a name that resolves to a public
//!   address when checked and to 169.254.169.254 a moment later (DNS rebinding) gains nothing;
//! - **redirect targets**: [`redirect_policy`] judges every hop like the first URL (a
//!   redirect to an IP literal would not pass through the resolver).
//!
//! [`client_builder`] puts the three together; callers add timeouts and the like, and may
//! only make the redirect policy stricter ([`reqwest::redirect::Policy::none`]). Proxies
//! from the environment (`HTTP_PROXY`, …) are not used: through a proxy, the connection
//! would be to the proxy's address and the destination's could not be judged.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;
use tideway_core::egress::{EgressPolicy, Refusal};

/// Most redirects followed by a client from [`client_builder`].
pub const MAX_REDIRECTS: usize = 5;

/// Why a URL cannot be sent to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The HTTP client cannot read it as a URL.
    #[error("is not a URL the HTTP client can use ({0})")]
    Unparsable(String),
    /// Not `http://` or `https://`, or without a host.
    #[error("must be an http:// or https:// URL with a host")]
    NotHttp,
    /// The egress policy refuses its host.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Judges a parsed URL's host against the policy (a name: only the metadata host names; an
/// address: the whole table).
pub fn check_url(policy: &EgressPolicy, url: &Url) -> Result<(), UrlError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::NotHttp);
    }
    // `host_str` is the parsed host: an IPv4 address in dotted decimal, an IPv6 address in
    // brackets, or a name (never something that reads as an IPv4 address).
    match url.host_str() {
        None | Some("") => Err(UrlError::NotHttp),
        Some(host) => Ok(policy.check_host(host)?),
    }
}

/// Parses `raw` as reqwest will and judges it: the URL to request, or why not.
pub fn parse_url(policy: &EgressPolicy, raw: &str) -> Result<Url, UrlError> {
    let url = Url::parse(raw).map_err(|e| UrlError::Unparsable(e.to_string()))?;
    check_url(policy, &url)?;
    Ok(url)
}

/// A DNS resolver that hands the HTTP client only the addresses the policy allows.
#[derive(Debug, Clone, Copy)]
pub struct PolicyResolver {
    policy: EgressPolicy,
}

impl PolicyResolver {
    pub fn new(policy: EgressPolicy) -> Self {
        PolicyResolver { policy }
    }

    /// Resolves `host` (port 0: the client fills in the URL's) and keeps the allowed
    /// addresses; fails with the first [`Refusal`] when none is allowed.
    pub async fn resolve_allowed(&self, host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        self.policy.check_host(host)?;
        let mut refused = None;
        let allowed: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(ResolveError::Lookup)?
            .filter(|a| match self.policy.check_ip(a.ip()) {
                Ok(()) => true,
                Err(r) => {
                    refused.get_or_insert(r);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), refused) {
            (false, _) => Ok(allowed),
            (true, Some(r)) => Err(ResolveError::Refused(r)),
            (true, None) => Err(ResolveError::Lookup(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ))),
        }
    }
}

/// Why a name could not be turned into addresses to connect to.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("DNS lookup failed: {0}")]
    Lookup(io::Error),
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = *self;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolver.resolve_allowed(&host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Follows at most `max` redirects, each to a target the policy allows; a refused target
/// fails the request with the [`Refusal`].
pub fn redirect_policy(policy: EgressPolicy, max: usize) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        // `previous` holds the first URL too.
        if attempt.previous().len() > max {
            let e = format!("more than {max} redirects");
            return attempt.error(e);
        }
        match check_url(&policy, attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// A client builder that keeps the policy: the [`PolicyResolver`], the checking
/// [`redirect_policy`] ([`MAX_REDIRECTS`]) and no proxy. IP-literal URLs never reach the
/// resolver: check each URL with [`check_url`] / [`parse_url`] before requesting it.
#[allow(clippy::disallowed_methods)] // the one place that may: it applies the policy
pub fn client_builder(policy: EgressPolicy) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(PolicyResolver::new(policy)))
        .redirect(redirect_policy(policy, MAX_REDIRECTS))
        .no_proxy()
}

fn chain(err: &reqwest::Error) -> impl Iterator<Item = &(dyn StdError + 'static)> {
    std::iter::successors(err.source(), |e: &&(dyn StdError + 'static)| (*e).source())
}

/// The policy refusal behind a failed request (at connect time or on a redirect), if that is
/// what failed it.
pub fn refusal(err: &reqwest::Error) -> Option<&Refusal> {
    chain(err).find_map(|e| {
        e.downcast_ref::<Refusal>()
            .or_else(|| match e.downcast_ref::<ResolveError>() {
                Some(ResolveError::Refused(r)) => Some(r),
                _ => None,
            })
            .or_else(|| match e.downcast_ref::<UrlError>() {
                Some(UrlError::Refused(r)) => Some(r),
                _ => None,
            })
    })
}

/// A short reason for a failed request, for people: `"refused by egress policy: …"`,
/// `"timed out"`, `"connection refused"`, `"DNS lookup failed: …"`, … Never the URL.
pub fn reason(err: &reqwest::Error) -> String {
    if let Some(r) = refusal(err) {
        return r.to_string();
    }
    if err.is_timeout() {
        return "timed out".to_owned();
    }
    if let Some(e) = chain(err).find_map(|e| e.downcast_ref::<ResolveError>()) {
        return e.to_string();
    }
    if let Some(io) = chain(err).find_map(|e| e.downcast_ref::<io::Error>()) {
        return match io.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            io::ErrorKind::ConnectionReset => "connection reset by the receiver".to_owned(),
            io::ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                "receiver unreachable".to_owned()
            }
            _ => format!("connection error: {io}"),
        };
    }
    if err.is_redirect() {
        return match chain(err).last() {
            Some(e) => format!("redirect not followed: {e}"),
            None => "redirect not followed".to_owned(),
        };
    }
    match chain(err).last() {
        Some(e) => format!("connection error: {e}"),
        None => "request failed".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_core::egress::Rule;

    fn rule_of(policy: EgressPolicy, raw: &str) -> Option<Rule> {
        match parse_url(&policy, raw) {
            Ok(_) => None,
            Err(UrlError::Refused(r)) => Some(r.rule),
            Err(e) => panic!("{raw}: {e}"),
        }
    }

    #[test]
    fn urls_are_judged_as_the_client_reads_them() {
        let p = EgressPolicy::default();
        // The WHATWG URL parser turns every IPv4 spelling into dotted decimal, so the
        // decimal, octal, hex and short forms are the address they spell.
        for (raw, normal) in [
            ("http://2852039166/", "169.254.169.254"),
            ("http://0251.0376.0251.0376/", "169.254.169.254"),
            ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
            ("http://0xA9FEA9FE/", "169.254.169.254"),
            ("http://169.254.43518/", "169.254.169.254"),
            ("http://169.16689662/", "169.254.169.254"),
            ("http://169.254.169.254./", "169.254.169.254"),
            ("http://%31%36%39.254.169.254/", "169.254.169.254"),
            ("http://１６９．２５４．１６９．２５４/", "169.254.169.254"),
        ] {
            let url = Url::parse(raw).unwrap();
            assert_eq!(url.host_str(), Some(normal), "{raw}");
            assert_eq!(rule_of(p, raw), Some(Rule::Metadata), "{raw}");
        }
        for raw in [
            "http://169.254.1.1:8080/x",
            "https://[fe80::1]/",
            "http://[::ffff:169.254.1.1]/",
            "http://[::ffff:a9fe:0101]/",
            "http://0251.0376.1.1/",
        ] {
            assert_eq!(rule_of(p, raw), Some(Rule::LinkLocal), "{raw}");
        }
        for raw in [
            "http://[fd00:ec2::254]/latest/meta-data",
            "http://[::ffff:169.254.169.254]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.GOOGLE.INTERNAL./",
            "http://Metadata/",
            "http://metadata.azure.com/",
            "http://instance-data/latest/",
            "http://ｍｅｔａｄａｔａ.google.internal/",
        ] {
            assert_eq!(rule_of(p, raw), Some(Rule::Metadata), "{raw}");
        }
        assert_eq!(rule_of(p, "http://[ff02::1]/"), Some(Rule::NotUnicast));
        assert_eq!(
            rule_of(p, "http://255.255.255.255/"),
            Some(Rule::NotUnicast)
        );
    }

    #[test]
    fn private_urls_depend_on_the_setting() {
        let deny = EgressPolicy::DENY_PRIVATE;
        for (raw, rule) in [
            ("http://127.0.0.1:9400/", Rule::Loopback),
            ("http://2130706433/", Rule::Loopback),
            ("http://0x7f.1/", Rule::Loopback),
            ("http://017700000001/", Rule::Loopback),
            ("http://[::1]/", Rule::Loopback),
            ("http://[::ffff:127.0.0.1]/", Rule::Loopback),
            ("http://10.1.2.3/", Rule::Private),
            ("http://012.1.2.3/", Rule::Private),
            ("http://172.20.0.1/", Rule::Private),
            ("http://192.168.1.10/", Rule::Private),
            ("http://100.64.1.1/", Rule::Private),
            ("http://[fd12::1]/", Rule::Private),
            ("http://0.0.0.0:4000/", Rule::Unspecified),
            ("http://0/", Rule::Unspecified),
            ("http://[::]/", Rule::Unspecified),
        ] {
            assert_eq!(rule_of(deny, raw), Some(rule), "{raw}");
            assert_eq!(rule_of(EgressPolicy::default(), raw), None, "{raw}");
        }
        // Names pass here with either setting: they are judged by what they resolve to.
        for raw in ["http://localhost:9400/", "https://heap.example/c?k=1"] {
            assert_eq!(rule_of(deny, raw), None, "{raw}");
        }
    }

    #[test]
    fn non_http_urls_are_refused() {
        let p = EgressPolicy::default();
        assert_eq!(parse_url(&p, "file:///etc/passwd"), Err(UrlError::NotHttp));
        assert!(matches!(
            parse_url(&p, "http://"),
            Err(UrlError::Unparsable(_))
        ));
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let deny = PolicyResolver::new(EgressPolicy::DENY_PRIVATE);
        match deny.resolve_allowed("localhost").await {
            Err(ResolveError::Refused(r)) => assert_eq!(r.rule, Rule::Loopback),
            other => panic!("{other:?}"),
        }
        match deny.resolve_allowed("metadata.google.internal").await {
            Err(ResolveError::Refused(r)) => assert_eq!(r.rule, Rule::Metadata),
            other => panic!("{other:?}"),
        }
        let allow = PolicyResolver::new(EgressPolicy::default());
        let addrs = allow.resolve_allowed("localhost").await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
