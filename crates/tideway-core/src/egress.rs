//! The egress policy: which addresses and host names Tideway may send an HTTP request to.
//!
//! Every outgoing request Tideway makes goes to a URL a REST key holder typed in (a Current's
//! endpoint, its alert webhook, later webhook messages), so without a rule anyone with
//! `currents.manage` could make the server call its cloud's metadata service or the services
//! on its private network, and read the answers back (server-side request forgery). This
//! module is the rule, and nothing else: a pure function from an IP address or a host name to
//! "allowed" or the [`Rule`] it breaks. The IO around it — parsing URLs the way the HTTP client
//! does, resolving names at connect time, checking redirect targets — lives with the client
//! (`tideway_currents::egress`).
//!
//! | addresses | rule | refused |
//! |---|---|---|
//! | 169.254.169.254, 169.254.170.2, 100.100.100.200, fd00:ec2::254 | metadata service | always |
//! | 169.254.0.0/16, fe80::/10 | link-local | always |
//! | 224.0.0.0/4, 240.0.0.0/4 (255.255.255.255 included), ff00::/8 | not unicast | always |
//! | 127.0.0.0/8, ::1 | loopback | with `deny-private-endpoints` |
//! | 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, fec0::/10 | private | with `deny-private-endpoints` |
//! | 0.0.0.0/8, :: | unspecified (connects to this host) | with `deny-private-endpoints` |
//!
//! An IPv6 address that carries an IPv4 address — IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` — is judged as that IPv4 address.
//! Host names of metadata services (`metadata.google.internal`, `metadata`, …, see
//! [`METADATA_HOSTS`]) are refused always, in any letter case, with or without the trailing
//! dot of a fully qualified name. Any other name is allowed here: what it resolves to is
//! judged when the connection is made.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether loopback, private and unspecified addresses may be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrivateEndpoints {
    /// Allowed (the default: a local receiver such as `tideway sink` is a main use).
    #[default]
    Allow,
    /// Refused (`deny-private-endpoints = true`): for a server others hold keys to.
    Deny,
}

/// The egress policy. `Default` allows private addresses; link-local addresses, metadata
/// services and non-unicast addresses are refused whatever the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub private: PrivateEndpoints,
}

/// The rule an address or host name breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A cloud metadata service (by address or by name).
    Metadata,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Multicast, broadcast and reserved addresses.
    NotUnicast,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, shared address space (100.64.0.0/10), unique local and site-local IPv6.
    Private,
    /// 0.0.0.0/8 and `::`, which reach this very host.
    Unspecified,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Metadata,
        Rule::LinkLocal,
        Rule::NotUnicast,
        Rule::Loopback,
        Rule::Private,
        Rule::Unspecified,
    ];

    /// A stable snake_case code (`"link_local"`), for machine-readable error bodies.
    pub fn code(self) -> &'static str {
        match self {
            Rule::Metadata => "metadata",
            Rule::LinkLocal => "link_local",
            Rule::NotUnicast => "not_unicast",
            Rule::Loopback => "loopback",
            Rule::Private => "private",
            Rule::Unspecified => "unspecified",
        }
    }

    /// What the rule is about, for people (`"link-local address"`).
    pub fn describe(self) -> &'static str {
        match self {
            Rule::Metadata => "cloud metadata service",
            Rule::LinkLocal => "link-local address",
            Rule::NotUnicast => "multicast, broadcast or reserved address",
            Rule::Loopback => "loopback address",
            Rule::Private => "private network address",
            Rule::Unspecified => "unspecified address",
        }
    }

    /// The ranges the rule covers, as written in the documentation.
    pub fn ranges(self) -> &'static str {
        match self {
            Rule::Metadata => {
                "169.254.169.254, 169.254.170.2, 100.100.100.200, fd00:ec2::254 and the metadata host names"
            }
            Rule::LinkLocal => "169.254.0.0/16, fe80::/10",
            Rule::NotUnicast => "224.0.0.0/4, 240.0.0.0/4, ff00::/8",
            Rule::Loopback => "127.0.0.0/8, ::1",
            Rule::Private => {
                "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, fec0::/10"
            }
            Rule::Unspecified => "0.0.0.0/8, ::",
        }
    }

    /// Whether the rule holds whatever the setting (otherwise only with
    /// `deny-private-endpoints`).
    pub fn always(self) -> bool {
        matches!(self, Rule::Metadata | Rule::LinkLocal | Rule::NotUnicast)
    }
}

/// A refused destination: the rule and what broke it (an address or a host name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refusal {
    pub rule: Rule,
    /// The address or host name that was refused.
    pub subject: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.rule.always() {
            "never allowed"
        } else {
            "refused because deny-private-endpoints is on"
        };
        write!(
            f,
            "refused by egress policy: {} {} ({}: {why})",
            self.rule.describe(),
            self.subject,
            self.rule.ranges(),
        )
    }
}

/// Host names of metadata services, lowercase, without the trailing dot. A name is refused
/// when it is one of these or (for the dotted ones) a subdomain of one.
pub const METADATA_HOSTS: &[&str] = &[
    // Google Compute Engine.
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    // Azure.
    "metadata.azure.com",
    "metadata.azure.internal",
    // AWS EC2.
    "instance-data",
    "instance-data.ec2.internal",
];

/// One row of the address table: `bits` under a `prefix`-bit mask.
struct Net<T> {
    bits: T,
    prefix: u32,
    rule: Rule,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u32, rule: Rule) -> Net<u32> {
    Net {
        bits: u32::from_be_bytes([a, b, c, d]),
        prefix,
        rule,
    }
}

/// The IPv4 table, most specific first (the first match wins).
const V4: &[Net<u32>] = &[
    v4(169, 254, 169, 254, 32, Rule::Metadata),
    v4(169, 254, 170, 2, 32, Rule::Metadata),
    v4(100, 100, 100, 200, 32, Rule::Metadata),
    v4(169, 254, 0, 0, 16, Rule::LinkLocal),
    v4(224, 0, 0, 0, 4, Rule::NotUnicast),
    v4(240, 0, 0, 0, 4, Rule::NotUnicast),
    v4(127, 0, 0, 0, 8, Rule::Loopback),
    v4(10, 0, 0, 0, 8, Rule::Private),
    v4(172, 16, 0, 0, 12, Rule::Private),
    v4(192, 168, 0, 0, 16, Rule::Private),
    v4(100, 64, 0, 0, 10, Rule::Private),
    v4(0, 0, 0, 0, 8, Rule::Unspecified),
];

const fn v6(segments: [u16; 8], prefix: u32, rule: Rule) -> Net<u128> {
    let mut bits = 0u128;
    let mut i = 0;
    while i < 8 {
        bits = (bits << 16) | segments[i] as u128;
        i += 1;
    }
    Net { bits, prefix, rule }
}

/// The IPv6 table (addresses carrying an IPv4 address are judged by [`V4`] first).
const V6: &[Net<u128>] = &[
    v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128, Rule::Metadata),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Rule::LinkLocal),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Rule::NotUnicast),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, Rule::Loopback),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, Rule::Unspecified),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Rule::Private),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Rule::Private),
];

fn in_v4(ip: Ipv4Addr, net: &Net<u32>) -> bool {
    let mask = u32::MAX.checked_shl(32 - net.prefix).unwrap_or(0);
    u32::from(ip) & mask == net.bits & mask
}

fn in_v6(ip: Ipv6Addr, net: &Net<u128>) -> bool {
    let mask = u128::MAX.checked_shl(128 - net.prefix).unwrap_or(0);
    u128::from(ip) & mask == net.bits & mask
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible
/// (`::/96` except `::` and `::1`) or NAT64 (`64:ff9b::/96`).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(tail),
        _ => None,
    }
}

/// The rule an address falls under, whatever the setting (`None`: a public unicast address).
pub fn rule_for_ip(ip: IpAddr) -> Option<Rule> {
    match ip {
        IpAddr::V4(ip) => V4.iter().find(|n| in_v4(ip, n)).map(|n| n.rule),
        IpAddr::V6(ip) => match embedded_ipv4(ip) {
            Some(v4) => rule_for_ip(IpAddr::V4(v4)),
            None => V6.iter().find(|n| in_v6(ip, n)).map(|n| n.rule),
        },
    }
}

/// Whether `name` is a metadata service's host name (any case, trailing dot or not).
pub fn is_metadata_host(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    METADATA_HOSTS.iter().any(|m| {
        name == *m
            || (m.contains('.') && name.strip_suffix(m).is_some_and(|head| head.ends_with('.')))
    })
}

impl EgressPolicy {
    /// Loopback, private and unspecified addresses allowed (the default).
    pub const ALLOW_PRIVATE: EgressPolicy = EgressPolicy {
        private: PrivateEndpoints::Allow,
    };
    /// Loopback, private and unspecified addresses refused.
    pub const DENY_PRIVATE: EgressPolicy = EgressPolicy {
        private: PrivateEndpoints::Deny,
    };

    fn refuses(&self, rule: Rule) -> bool {
        rule.always() || self.private == PrivateEndpoints::Deny
    }

    /// Judges an address (a literal in a URL, or what a name resolved to).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        match rule_for_ip(ip) {
            Some(rule) if self.refuses(rule) => Err(Refusal {
                rule,
                subject: ip.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Judges a host as it appears in a URL: an IPv4 literal, a bracketed or bare IPv6
    /// literal, or a name. Names are judged only against [`METADATA_HOSTS`]; the addresses
    /// they resolve to are judged when connecting.
    ///
    /// IPv4 literals are read in the dotted-decimal form only: callers hand in hosts already
    /// parsed by the URL parser the HTTP client uses (WHATWG), which turns `2852039166`,
    /// `0251.0376.0251.0376` or `0xa9.254.43518` into dotted decimal first.
    pub fn check_host(&self, host: &str) -> Result<(), Refusal> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip);
        }
        if is_metadata_host(bare) {
            return Err(Refusal {
                rule: Rule::Metadata,
                subject: bare.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Option<Rule> {
        rule_for_ip(s.parse().unwrap())
    }

    #[test]
    fn every_range_and_its_edges() {
        let table: &[(&str, Option<Rule>)] = &[
            ("169.254.169.254", Some(Rule::Metadata)),
            ("169.254.170.2", Some(Rule::Metadata)),
            ("100.100.100.200", Some(Rule::Metadata)),
            ("fd00:ec2::254", Some(Rule::Metadata)),
            ("169.254.0.0", Some(Rule::LinkLocal)),
            ("169.254.255.255", Some(Rule::LinkLocal)),
            ("169.253.255.255", None),
            ("169.255.0.0", None),
            ("fe80::1", Some(Rule::LinkLocal)),
            ("febf:ffff::1", Some(Rule::LinkLocal)),
            ("fec0::1", Some(Rule::Private)),
            ("224.0.0.1", Some(Rule::NotUnicast)),
            ("239.255.255.255", Some(Rule::NotUnicast)),
            ("240.0.0.1", Some(Rule::NotUnicast)),
            ("255.255.255.255", Some(Rule::NotUnicast)),
            ("ff02::1", Some(Rule::NotUnicast)),
            ("127.0.0.1", Some(Rule::Loopback)),
            ("127.255.255.254", Some(Rule::Loopback)),
            ("::1", Some(Rule::Loopback)),
            ("10.0.0.0", Some(Rule::Private)),
            ("10.255.255.255", Some(Rule::Private)),
            ("11.0.0.0", None),
            ("9.255.255.255", None),
            ("172.16.0.0", Some(Rule::Private)),
            ("172.31.255.255", Some(Rule::Private)),
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("192.168.0.1", Some(Rule::Private)),
            ("192.169.0.1", None),
            ("100.64.0.0", Some(Rule::Private)),
            ("100.127.255.255", Some(Rule::Private)),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("fc00::1", Some(Rule::Private)),
            ("fdff:ffff::1", Some(Rule::Private)),
            ("fd00:ec2::253", Some(Rule::Private)),
            ("fe00::1", None),
            ("0.0.0.0", Some(Rule::Unspecified)),
            ("0.1.2.3", Some(Rule::Unspecified)),
            ("::", Some(Rule::Unspecified)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("223.255.255.255", None),
            ("2606:4700::1111", None),
            ("2001:db8::1", None),
        ];
        for (ip, want) in table {
            assert_eq!(rule(ip), *want, "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_that_carry_an_ipv4_address_are_judged_as_it() {
        for ip in [
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "64:ff9b::169.254.169.254",
            "::169.254.169.254",
        ] {
            assert_eq!(rule(ip), Some(Rule::Metadata), "{ip}");
        }
        assert_eq!(rule("::ffff:169.254.1.1"), Some(Rule::LinkLocal));
        assert_eq!(rule("::ffff:127.0.0.1"), Some(Rule::Loopback));
        assert_eq!(rule("::ffff:10.1.2.3"), Some(Rule::Private));
        assert_eq!(rule("::ffff:0.0.0.0"), Some(Rule::Unspecified));
        assert_eq!(rule("64:ff9b::10.0.0.1"), Some(Rule::Private));
        assert_eq!(rule("::ffff:8.8.8.8"), None);
        assert_eq!(rule("64:ff9b::8.8.8.8"), None);
        // `::` and `::1` are themselves, not IPv4-compatible 0.0.0.0 and 0.0.0.1.
        assert_eq!(embedded_ipv4("::1".parse().unwrap()), None);
        assert_eq!(rule("::1"), Some(Rule::Loopback));
    }

    #[test]
    fn the_setting_decides_only_the_private_group() {
        let allow = EgressPolicy::default();
        let deny = EgressPolicy::DENY_PRIVATE;
        assert_eq!(allow, EgressPolicy::ALLOW_PRIVATE);
        for r in Rule::ALL {
            assert_eq!(
                r.always(),
                matches!(r, Rule::Metadata | Rule::LinkLocal | Rule::NotUnicast)
            );
        }
        for ip in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "ff02::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(allow.check_ip(ip).is_err(), "{ip}");
            assert!(deny.check_ip(ip).is_err(), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "fc00::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "fd00:ec2::253",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(allow.check_ip(ip), Ok(()), "{ip}");
            assert!(deny.check_ip(ip).is_err(), "{ip}");
        }
        for ip in ["1.1.1.1", "2606:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(allow.check_ip(ip), Ok(()));
            assert_eq!(deny.check_ip(ip), Ok(()));
        }
    }

    #[test]
    fn metadata_names_in_any_case_with_or_without_the_trailing_dot() {
        let p = EgressPolicy::default();
        for name in [
            "metadata.google.internal",
            "METADATA.GOOGLE.INTERNAL",
            "metadata.google.internal.",
            "Metadata.Google.Internal.",
            "metadata",
            "METADATA.",
            "metadata.goog",
            "metadata.azure.com",
            "instance-data",
            "instance-data.ec2.internal",
            "x.metadata.google.internal",
        ] {
            let r = p.check_host(name).unwrap_err();
            assert_eq!(r.rule, Rule::Metadata, "{name}");
        }
        for name in [
            "example.com",
            "metadata.example.com",
            "notmetadata.google.internal",
            "metadata.google.internal.example.com",
            "xmetadata",
            "localhost",
            "sink.internal",
        ] {
            assert_eq!(p.check_host(name), Ok(()), "{name}");
            assert_eq!(
                EgressPolicy::DENY_PRIVATE.check_host(name),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn hosts_as_urls_carry_them() {
        let p = EgressPolicy::default();
        assert_eq!(
            p.check_host("[fd00:ec2::254]").unwrap_err().rule,
            Rule::Metadata
        );
        assert_eq!(
            p.check_host("[::ffff:a9fe:a9fe]").unwrap_err().rule,
            Rule::Metadata
        );
        assert_eq!(
            p.check_host("169.254.1.2").unwrap_err().rule,
            Rule::LinkLocal
        );
        assert_eq!(p.check_host("[::1]"), Ok(()));
        assert_eq!(
            EgressPolicy::DENY_PRIVATE
                .check_host("[::1]")
                .unwrap_err()
                .rule,
            Rule::Loopback
        );
    }

    #[test]
    fn refusals_name_the_rule_and_the_setting() {
        let r = EgressPolicy::default()
            .check_host("169.254.1.2")
            .unwrap_err();
        let text = r.to_string();
        assert!(
            text.starts_with("refused by egress policy: link-local address 169.254.1.2"),
            "{text}"
        );
        assert!(text.contains("never allowed"), "{text}");
        let r = EgressPolicy::DENY_PRIVATE
            .check_host("10.0.0.7")
            .unwrap_err();
        let text = r.to_string();
        assert!(text.contains("private network address 10.0.0.7"), "{text}");
        assert!(text.contains("deny-private-endpoints"), "{text}");
        let codes: Vec<&str> = Rule::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(
            codes,
            [
                "metadata",
                "link_local",
                "not_unicast",
                "loopback",
                "private",
                "unspecified"
            ]
        );
    }
}
