//! Email tracking: signed open, click and unsubscribe URLs, and the HTML rewriting that plants
//! them in a rendered email.
//!
//! A tracking URL is served to whoever holds it, with no API key (`tideway_server`'s
//! `tracking_api`), so the token in its path is the credential: it names the workspace, the
//! sent message and the action (open, click on link *n*, unsubscribe), and carries an
//! HMAC-SHA256 tag under the server's 32-byte signing key. Tokens cannot be guessed or edited
//! (another send id, another link index, an open turned into an unsubscribe): anything that
//! does not verify is refused. Tokens are short (about 35 characters of base64url) because
//! they sit in every link of every email.
//!
//! The original URLs of rewritten links are not in the token; the dispatcher stores them with
//! the sent message (the vector [`rewrite_links`] returns) and the click endpoint redirects to
//! the one at the token's index, so a click URL can never be made to redirect elsewhere.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
pub use tideway_core::message_events::UserAgentInfo;

/// Bytes of the HMAC tag kept in a token: 128 bits, beyond guessing.
const TAG_BYTES: usize = 16;
/// Domain separation: a tag made for something else with the same key never verifies here.
const CONTEXT: &[u8] = b"tideway/tracking/v1\0";
/// The format version, in the token's first byte's high nibble.
const VERSION: u8 = 1;
/// No valid token is longer (1 + 3 varints of at most 10 bytes + the tag, in base64url).
const MAX_TOKEN_CHARS: usize = 80;
/// Links beyond this many in one email are left as they are (the originals are stored with
/// the sent message, so this bounds that row).
pub const MAX_TRACKED_LINKS: usize = 1000;

/// The key tracking tokens are signed with. `Debug` does not show it.
#[derive(Clone)]
pub struct TrackingKey([u8; 32]);

impl TrackingKey {
    pub fn new(secret: [u8; 32]) -> Self {
        TrackingKey(secret)
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts a key of any length"));
        mac.update(CONTEXT);
        mac
    }
}

impl fmt::Debug for TrackingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrackingKey(<redacted>)")
    }
}

/// What following a tracking URL records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// The open pixel was fetched.
    Open,
    /// The link at this index of the sent message's originals was followed.
    Click(u32),
    /// The unsubscribe (or resubscribe, with `?state=`) link.
    Unsubscribe,
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::Open => 0,
            Action::Click(_) => 1,
            Action::Unsubscribe => 2,
        }
    }
}

/// What a tracking URL's token says: a workspace, a send (the sent message's id) and an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrackingToken {
    pub workspace: i64,
    pub send: i64,
    pub action: Action,
}

impl TrackingToken {
    /// The signed token, URL-safe: base64url (no padding) of
    /// `version·action | varint(workspace) | varint(send) [| varint(link)] | tag`.
    pub fn sign(&self, key: &TrackingKey) -> String {
        let mut bytes = Vec::with_capacity(48);
        bytes.push((VERSION << 4) | self.action.code());
        put_varint(&mut bytes, self.workspace as u64);
        put_varint(&mut bytes, self.send as u64);
        if let Action::Click(index) = self.action {
            put_varint(&mut bytes, u64::from(index));
        }
        let mut mac = key.mac();
        mac.update(&bytes);
        let tag = mac.finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token `raw` carries, when its tag verifies under `key` (compared in constant time)
    /// and it is well formed to the last byte; `None` for anything else.
    pub fn verify(key: &TrackingKey, raw: &str) -> Option<TrackingToken> {
        if raw.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        let split = bytes.len().checked_sub(TAG_BYTES)?;
        let (payload, tag) = bytes.split_at(split);
        let mut mac = key.mac();
        mac.update(payload);
        mac.verify_truncated_left(tag).ok()?;
        let (&head, mut rest) = payload.split_first()?;
        if head >> 4 != VERSION {
            return None;
        }
        let workspace = take_varint(&mut rest)? as i64;
        let send = take_varint(&mut rest)? as i64;
        let action = match head & 0x0f {
            0 => Action::Open,
            1 => Action::Click(u32::try_from(take_varint(&mut rest)?).ok()?),
            2 => Action::Unsubscribe,
            _ => return None,
        };
        rest.is_empty().then_some(TrackingToken {
            workspace,
            send,
            action,
        })
    }
}

/// LEB128: small ids (the common case) take a byte or two.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a canonical LEB128 `u64` (no redundant trailing zero groups, at most 10 bytes).
fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        let bits = u64::from(byte & 0x7f);
        if i == 9 && bits > 1 {
            return None;
        }
        n |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return None;
            }
            return Some(n);
        }
    }
    None
}

/// Builds the public tracking URLs: `{public}/t/o/{token}` (open pixel), `/t/c/{token}`
/// (click), `/t/u/{token}` (unsubscribe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingUrls {
    base: String,
}

impl TrackingUrls {
    /// `public_url` is where recipients reach this server (`--public-url`); a trailing `/`
    /// is ignored.
    pub fn new(public_url: &str) -> Self {
        TrackingUrls {
            base: public_url.trim_end_matches('/').to_owned(),
        }
    }

    fn url(
        &self,
        kind: char,
        key: &TrackingKey,
        workspace: i64,
        send: i64,
        action: Action,
    ) -> String {
        let token = TrackingToken {
            workspace,
            send,
            action,
        }
        .sign(key);
        let mut url = String::with_capacity(self.base.len() + 5 + token.len());
        url.push_str(&self.base);
        url.push_str("/t/");
        url.push(kind);
        url.push('/');
        url.push_str(&token);
        url
    }

    pub fn open_pixel(&self, key: &TrackingKey, workspace: i64, send: i64) -> String {
        self.url('o', key, workspace, send, Action::Open)
    }

    pub fn click(&self, key: &TrackingKey, workspace: i64, send: i64, index: u32) -> String {
        self.url('c', key, workspace, send, Action::Click(index))
    }

    pub fn unsubscribe(&self, key: &TrackingKey, workspace: i64, send: i64) -> String {
        self.url('u', key, workspace, send, Action::Unsubscribe)
    }
}

// -- HTML rewriting ---------------------------------------------------------------------------

/// Rewrites the `href` of every `<a>` whose URL is `http://` or `https://` to `tracked(index,
/// original)`, and returns the new HTML with the originals, `originals[index]` being the URL
/// (entities decoded, as a browser would follow it) that `index` stands for.
///
/// Left alone: other schemes (`mailto:`, `tel:`), fragments and relative links; links marked
/// `clicktracking="off"` or `data-msys-clicktrack="0"` (the ESP conventions Braze honours);
/// links that already are Tideway tracking URLs (`…/t/{o,c,u}/{token}`), so the unsubscribe
/// link in a footer goes straight to its page rather than through a click redirect (and is not
/// wrapped twice); links past [`MAX_TRACKED_LINKS`]. Everything else in the HTML, including
/// the other attributes and the quoting of the `href`, is kept byte for byte. Malformed HTML
/// never fails: a tag that does not close is left as it is.
pub fn rewrite_links(
    html: &str,
    mut tracked: impl FnMut(u32, &str) -> String,
) -> (String, Vec<String>) {
    let b = html.as_bytes();
    let mut out = String::with_capacity(html.len() + 256);
    let mut originals: Vec<String> = Vec::new();
    let (mut copied, mut k) = (0, 0);
    while let Some(p) = find_anchor(b, k) {
        let Some(tag) = parse_tag(b, p + 2) else {
            break;
        };
        k = tag.end;
        let Some(href) = tag.href else {
            continue;
        };
        if tag.opted_out || originals.len() >= MAX_TRACKED_LINKS {
            continue;
        }
        let url = decode_entities(&html[href.start..href.end]);
        let url = url.trim();
        if !is_http(url) || is_tracking_url(url) {
            continue;
        }
        let index = originals.len() as u32;
        let replacement = tracked(index, url);
        originals.push(url.to_owned());
        out.push_str(&html[copied..href.start]);
        match href.quote {
            Some(_) => out.push_str(&escape_attribute(&replacement)),
            // An unquoted value ends at whitespace or `>`: quote ours.
            None => {
                out.push('"');
                out.push_str(&escape_attribute(&replacement));
                out.push('"');
            }
        }
        copied = href.end;
    }
    out.push_str(&html[copied..]);
    (out, originals)
}

/// The 1×1 transparent open pixel, placed just before `</body>` (or at the end when there is
/// none), where it is fetched last (an open is counted once the email is shown).
pub fn add_open_pixel(html: &str, pixel_url: &str) -> String {
    let mut img = String::with_capacity(pixel_url.len() + 128);
    img.push_str("<img src=\"");
    img.push_str(&escape_attribute(pixel_url));
    img.push_str(
        "\" width=\"1\" height=\"1\" alt=\"\" style=\"display:block;width:1px;height:1px;border:0\">",
    );
    let at = rfind_ignore_case(html.as_bytes(), b"</body").unwrap_or(html.len());
    let mut out = String::with_capacity(html.len() + img.len());
    out.push_str(&html[..at]);
    out.push_str(&img);
    out.push_str(&html[at..]);
    out
}

/// An `href` value's span (without quotes) and its quote character, if any.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    quote: Option<u8>,
}

/// What matters about one `<a …>` tag.
struct Tag {
    /// Just past the tag's `>`.
    end: usize,
    /// The first `href` (browsers ignore later ones).
    href: Option<Span>,
    opted_out: bool,
}

/// The next `<a` that opens an anchor tag (followed by whitespace, `>` or `/`), from `from`.
fn find_anchor(b: &[u8], from: usize) -> Option<usize> {
    let mut k = from;
    while k + 2 <= b.len() {
        let p = k + b[k..].iter().position(|&c| c == b'<')?;
        if b.get(p + 1).is_some_and(|c| c.eq_ignore_ascii_case(&b'a'))
            && b.get(p + 2)
                .is_none_or(|c| c.is_ascii_whitespace() || *c == b'>' || *c == b'/')
        {
            return Some(p);
        }
        k = p + 1;
    }
    None
}

/// Reads the attributes of a tag whose name ends at `k`, up to its closing `>`; `None` when
/// the tag never closes.
fn parse_tag(b: &[u8], mut k: usize) -> Option<Tag> {
    let mut href = None;
    let mut opted_out = false;
    loop {
        while k < b.len() && (b[k].is_ascii_whitespace() || b[k] == b'/') {
            k += 1;
        }
        match b.get(k)? {
            b'>' => {
                return Some(Tag {
                    end: k + 1,
                    href,
                    opted_out,
                });
            }
            _ => {
                let name_start = k;
                while k < b.len()
                    && !(b[k].is_ascii_whitespace() || matches!(b[k], b'=' | b'>' | b'/'))
                {
                    k += 1;
                }
                let name = &b[name_start..k];
                while k < b.len() && b[k].is_ascii_whitespace() {
                    k += 1;
                }
                if b.get(k) != Some(&b'=') {
                    continue;
                }
                k += 1;
                while k < b.len() && b[k].is_ascii_whitespace() {
                    k += 1;
                }
                let value = match *b.get(k)? {
                    q @ (b'"' | b'\'') => {
                        let end = k + 1 + b[k + 1..].iter().position(|&c| c == q)?;
                        let span = Span {
                            start: k + 1,
                            end,
                            quote: Some(q),
                        };
                        k = end + 1;
                        span
                    }
                    _ => {
                        let start = k;
                        while k < b.len() && !(b[k].is_ascii_whitespace() || b[k] == b'>') {
                            k += 1;
                        }
                        Span {
                            start,
                            end: k,
                            quote: None,
                        }
                    }
                };
                let text = &b[value.start..value.end];
                if name.eq_ignore_ascii_case(b"href") {
                    href.get_or_insert(value);
                } else if (name.eq_ignore_ascii_case(b"clicktracking")
                    && text.eq_ignore_ascii_case(b"off"))
                    || (name.eq_ignore_ascii_case(b"data-msys-clicktrack") && text == b"0")
                {
                    opted_out = true;
                }
            }
        }
    }
}

fn is_http(url: &str) -> bool {
    let lower = |n: usize| url.get(..n).map(str::to_ascii_lowercase);
    lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://")
}

/// `…/t/o/…`, `…/t/c/…` or `…/t/u/…` followed by a plausible token: one of ours (the public
/// URL is not known here; a site of the sender's own with this exact shape is unlikely).
fn is_tracking_url(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let Some(at) = ["/t/o/", "/t/c/", "/t/u/"]
        .iter()
        .filter_map(|p| path.rfind(p))
        .max()
    else {
        return false;
    };
    let token = path[at + 5..].trim_end_matches(".gif");
    (20..=MAX_TOKEN_CHARS).contains(&token.len())
        && token
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// The last occurrence of an ASCII `needle`, case-insensitively.
fn rfind_ignore_case(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// Escapes text for a double- or single-quoted attribute value.
fn escape_attribute(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes the character references that occur in URLs in HTML (`&amp;`, `&quot;`, numeric
/// ones, …), leaving anything unrecognised as written (as browsers do).
fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let end = rest[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '#'))
            .map(|p| p + 1)
            .unwrap_or(rest.len());
        let name = &rest[1..end];
        let decoded = match name {
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "nbsp" => Some('\u{a0}'),
            _ => name.strip_prefix('#').and_then(|num| {
                let code = match num.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => num.parse().ok()?,
                };
                char::from_u32(code)
            }),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end..];
                rest = rest.strip_prefix(';').unwrap_or(rest);
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

// -- user agents ------------------------------------------------------------------------------

/// Classifies the `User-Agent` of an open or click for its Currents event: device class, OS,
/// model and browser when recognisable, the mailbox provider's image proxy (Gmail, Yahoo)
/// when it is one, and whether a machine rather than a person made the request: Apple Mail
/// Privacy Protection's prefetch (a bare `Mozilla/5.0`), link scanners and security
/// gateways, HTTP libraries and bots. A best effort on a header anyone can set; nothing
/// depends on it but the event's fields.
pub fn classify_user_agent(user_agent: Option<&str>) -> UserAgentInfo {
    let Some(ua) = user_agent.map(str::trim).filter(|ua| !ua.is_empty()) else {
        return UserAgentInfo::default();
    };
    let lower = ua.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    let mut info = UserAgentInfo::default();

    // An image proxy's agent describes the proxy (Gmail's claims Windows XP and Firefox 11),
    // not the reader's device: only the provider is worth reporting.
    if has("googleimageproxy") || has("ggpht.com") {
        info.mailbox_provider = Some("Gmail".into());
        return info;
    }
    if has("yahoomailproxy") {
        info.mailbox_provider = Some("Yahoo".into());
        return info;
    }

    const MACHINES: [&str; 22] = [
        "bot",
        "spider",
        "crawl",
        "preview",
        "scanner",
        "barracuda",
        "proofpoint",
        "mimecast",
        "symantec",
        "trendmicro",
        "safelinks",
        "python-requests",
        "python-urllib",
        "curl/",
        "wget",
        "go-http-client",
        "java/",
        "libwww",
        "httpclient",
        "okhttp",
        "headless",
        "facebookexternalhit",
    ];
    info.machine = ua == "Mozilla/5.0" || MACHINES.iter().any(|m| has(m));

    let model = ["iPhone", "iPad", "iPod"]
        .into_iter()
        .find(|m| ua.contains(m));
    info.device_model = model.map(str::to_owned);
    info.device_os = if model.is_some() {
        Some("iOS")
    } else if has("android") {
        Some("Android")
    } else if has("windows") {
        Some("Windows")
    } else if has("cros") {
        Some("ChromeOS")
    } else if has("mac os x") || has("macintosh") {
        Some("macOS")
    } else if has("linux") {
        Some("Linux")
    } else {
        None
    }
    .map(str::to_owned);
    info.device_class =
        if model == Some("iPad") || has("tablet") || (has("android") && !has("mobile")) {
            Some("tablet")
        } else if model.is_some() || has("mobile") || has("android") {
            Some("mobile")
        } else if info.device_os.is_some() {
            Some("desktop")
        } else {
            None
        }
        .map(str::to_owned);
    info.browser = if has("edg/") || has("edge/") {
        Some("Edge")
    } else if has("opr/") || has("opera") {
        Some("Opera")
    } else if has("firefox/") || has("fxios/") {
        Some("Firefox")
    } else if has("chrome/") || has("crios/") {
        Some("Chrome")
    } else if has("outlook") || has("ms-office") || has("microsoft office") {
        Some("Outlook")
    } else if has("thunderbird") {
        Some("Thunderbird")
    } else if has("safari/") && has("version/") {
        Some("Safari")
    } else if has("applewebkit") && !has("safari/") && !info.machine {
        // Apple Mail shows images with WebKit's agent and no `Safari/` token.
        Some("Apple Mail")
    } else {
        None
    }
    .map(str::to_owned);
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> TrackingKey {
        TrackingKey::new([7; 32])
    }

    #[test]
    fn round_trip_and_shape() {
        let urls = TrackingUrls::new("https://mail.example.com/");
        let open = urls.open_pixel(&key(), 3, 42);
        let prefix = "https://mail.example.com/t/o/";
        assert!(open.starts_with(prefix), "{open}");
        let token = &open[prefix.len()..];
        assert!(token.len() <= 40, "{token}");
        assert!(
            token
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(
            TrackingToken::verify(&key(), token),
            Some(TrackingToken {
                workspace: 3,
                send: 42,
                action: Action::Open
            })
        );
        let click = urls.click(&key(), 3, 42, 7);
        let t = click.rsplit('/').next().unwrap();
        assert!(click.contains("/t/c/"));
        assert_eq!(
            TrackingToken::verify(&key(), t).unwrap().action,
            Action::Click(7)
        );
        let unsub = urls.unsubscribe(&key(), 3, 42);
        let t = unsub.rsplit('/').next().unwrap();
        assert!(unsub.contains("/t/u/"));
        assert_eq!(
            TrackingToken::verify(&key(), t).unwrap().action,
            Action::Unsubscribe
        );
        // Another key does not verify; the key is not in Debug output.
        assert_eq!(TrackingToken::verify(&TrackingKey::new([8; 32]), t), None);
        assert_eq!(format!("{:?}", key()), "TrackingKey(<redacted>)");
    }

    #[test]
    fn rejects_garbage() {
        for raw in [
            "",
            "a",
            "!!!!",
            &"A".repeat(200),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(TrackingToken::verify(&key(), raw), None, "{raw}");
        }
        let t = TrackingToken {
            workspace: 1,
            send: 2,
            action: Action::Open,
        }
        .sign(&key());
        // Padding or trailing characters make it another string.
        assert_eq!(TrackingToken::verify(&key(), &format!("{t}=")), None);
        assert_eq!(TrackingToken::verify(&key(), &format!("{t}A")), None);
    }

    #[test]
    fn varints_are_canonical() {
        for n in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut v = Vec::new();
            put_varint(&mut v, n);
            let mut s = v.as_slice();
            assert_eq!(take_varint(&mut s), Some(n));
            assert!(s.is_empty());
        }
        assert_eq!(take_varint(&mut &[0x80, 0x00][..]), None);
        assert_eq!(take_varint(&mut &[0xff; 11][..]), None);
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Open),
            any::<u32>().prop_map(Action::Click),
            Just(Action::Unsubscribe),
        ]
    }

    proptest! {
        #[test]
        fn sign_verify_round_trip(workspace in any::<i64>(), send in any::<i64>(), action in action()) {
            let token = TrackingToken { workspace, send, action };
            let raw = token.sign(&key());
            prop_assert!(raw.len() <= MAX_TOKEN_CHARS);
            prop_assert_eq!(TrackingToken::verify(&key(), &raw), Some(token));
        }

        /// Flipping any bit, truncating or extending a token makes it invalid.
        #[test]
        fn tampering_is_rejected(
            workspace in 0i64..1_000_000,
            send in 0i64..1_000_000_000,
            action in action(),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let raw = TrackingToken { workspace, send, action }.sign(&key());
            let mut bytes = URL_SAFE_NO_PAD.decode(&raw).unwrap();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert_eq!(TrackingToken::verify(&key(), &URL_SAFE_NO_PAD.encode(&bytes)), None);
            let short = &raw[..cut.index(raw.len())];
            prop_assert_eq!(TrackingToken::verify(&key(), short), None);
        }

        #[test]
        fn verify_never_panics(raw in "\\PC{0,100}") {
            let _ = TrackingToken::verify(&key(), &raw);
        }
    }

    fn marker(index: u32, _: &str) -> String {
        format!("T{index}")
    }

    #[test]
    fn rewrites_http_links_and_keeps_everything_else() {
        let html = r##"<p>Hi <a class="x" href="https://example.com/a?b=1&amp;c=2" target=_blank>one</a>
<A HREF='http://example.com/two' style="color:red">two</A>
<a href="mailto:a@b.c">mail</a> <a href="#top">top</a> <a href="/relative">rel</a>
<a href=https://example.com/unquoted>u</a><a>none</a><abbr href="https://no">abbr</abbr></p>"##;
        let (out, originals) = rewrite_links(html, marker);
        assert_eq!(
            originals,
            [
                "https://example.com/a?b=1&c=2",
                "http://example.com/two",
                "https://example.com/unquoted"
            ]
        );
        assert_eq!(
            out,
            r##"<p>Hi <a class="x" href="T0" target=_blank>one</a>
<A HREF='T1' style="color:red">two</A>
<a href="mailto:a@b.c">mail</a> <a href="#top">top</a> <a href="/relative">rel</a>
<a href="T2">u</a><a>none</a><abbr href="https://no">abbr</abbr></p>"##
        );
    }

    #[test]
    fn leaves_opted_out_and_tracking_links() {
        let urls = TrackingUrls::new("https://t.example");
        let unsub = urls.unsubscribe(&key(), 1, 2);
        let html = format!(
            "<a href=\"https://a.example\" clicktracking=\"off\">a</a>\
             <a data-msys-clicktrack=\"0\" href=\"https://b.example\">b</a>\
             <a href=\"{unsub}\">unsubscribe</a><a href=\"{unsub}?state=subscribed\">re</a>\
             <a href=\"https://c.example/t/u/short\">c</a>"
        );
        let (out, originals) = rewrite_links(&html, marker);
        assert_eq!(originals, ["https://c.example/t/u/short"]);
        assert_eq!(out, html.replace("https://c.example/t/u/short", "T0"));
    }

    #[test]
    fn no_links_and_malformed_html() {
        let (out, originals) = rewrite_links("plain <b>text</b>", marker);
        assert_eq!((out.as_str(), originals.len()), ("plain <b>text</b>", 0));
        for html in [
            "<a href=\"https://x",
            "<a href='https://x'",
            "<a",
            "<a href=",
            "<",
        ] {
            let (out, originals) = rewrite_links(html, marker);
            assert_eq!((out.as_str(), originals.len()), (html, 0), "{html}");
        }
        // A tag closed later is still read to its end.
        let (out, _) = rewrite_links("<a\nhref = \"https://x\"\n>", marker);
        assert_eq!(out, "<a\nhref = \"T0\"\n>");
    }

    #[test]
    fn duplicate_href_uses_the_first() {
        let (out, originals) =
            rewrite_links("<a href='https://one' href='https://two'>x</a>", marker);
        assert_eq!(originals, ["https://one"]);
        assert_eq!(out, "<a href='T0' href='https://two'>x</a>");
    }

    #[test]
    fn open_pixel_goes_before_body_end() {
        let with_body = add_open_pixel("<html><body>Hi</BODY></html>", "https://t/o/x&y");
        assert_eq!(
            with_body,
            "<html><body>Hi<img src=\"https://t/o/x&amp;y\" width=\"1\" height=\"1\" alt=\"\" \
             style=\"display:block;width:1px;height:1px;border:0\"></BODY></html>"
        );
        let bare = add_open_pixel("Hi", "u");
        assert!(bare.starts_with("Hi<img src=\"u\""), "{bare}");
    }

    #[test]
    fn user_agents() {
        assert_eq!(classify_user_agent(None), UserAgentInfo::default());
        assert_eq!(classify_user_agent(Some("  ")), UserAgentInfo::default());
        let iphone = classify_user_agent(Some(
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
        ));
        assert_eq!(iphone.device_class.as_deref(), Some("mobile"));
        assert_eq!(iphone.device_os.as_deref(), Some("iOS"));
        assert_eq!(iphone.device_model.as_deref(), Some("iPhone"));
        assert_eq!(iphone.browser.as_deref(), Some("Apple Mail"));
        assert!(!iphone.machine);
        let chrome = classify_user_agent(Some(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        ));
        assert_eq!(
            (
                chrome.device_class.as_deref(),
                chrome.device_os.as_deref(),
                chrome.browser.as_deref()
            ),
            (Some("desktop"), Some("Windows"), Some("Chrome"))
        );
        let tablet = classify_user_agent(Some(
            "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
        ));
        assert_eq!(tablet.device_class.as_deref(), Some("tablet"));
        assert_eq!(tablet.device_os.as_deref(), Some("Android"));
        let gmail = classify_user_agent(Some(
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        ));
        assert_eq!(gmail.mailbox_provider.as_deref(), Some("Gmail"));
        assert_eq!((gmail.browser, gmail.device_os), (None, None));
        assert!(!gmail.machine);
        assert!(classify_user_agent(Some("Mozilla/5.0")).machine);
        assert!(classify_user_agent(Some("python-requests/2.31")).machine);
        assert!(classify_user_agent(Some("Mozilla/5.0 (compatible; Googlebot/2.1)")).machine);
        let outlook = classify_user_agent(Some(
            "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
        ));
        assert_eq!(outlook.browser.as_deref(), Some("Outlook"));
        assert_eq!(outlook.device_os.as_deref(), Some("Windows"));
    }

    fn html_piece() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z <>/=\"'&;#-]{0,12}",
            Just("<a ".to_owned()),
            Just("<A\thref=".to_owned()),
            Just("href=\"https://x.example/p\"".to_owned()),
            Just("href='http://y'".to_owned()),
            Just("href=https://z".to_owned()),
            Just(">".to_owned()),
            Just("</a>".to_owned()),
            Just("clicktracking=off".to_owned()),
            Just("&amp;".to_owned()),
            Just("</body>".to_owned()),
            "\\PC{0,4}",
        ]
    }

    /// A link the generator can check: its URL and how it is written.
    fn link() -> impl Strategy<Value = (String, String)> {
        (
            "[a-z0-9/._~-]{0,12}",
            prop_oneof![Just('"'), Just('\'')],
            any::<bool>(),
        )
            .prop_map(|(path, quote, https)| {
                let url = format!(
                    "{}://example.com/{path}",
                    if https { "https" } else { "http" }
                );
                (
                    format!("<a title=\"t\" href={quote}{url}{quote} id=x>"),
                    url,
                )
            })
    }

    proptest! {
        #[test]
        fn rewriting_never_panics(parts in prop::collection::vec(html_piece(), 0..20)) {
            let html = parts.concat();
            let (out, originals) = rewrite_links(&html, marker);
            prop_assert!(originals.len() <= MAX_TRACKED_LINKS);
            if originals.is_empty() {
                prop_assert_eq!(&out, &html);
            }
            let _ = add_open_pixel(&html, "https://t/o/x");
        }

        /// Text between well-formed links is untouched; each link's URL is collected in order
        /// and replaced by its marker.
        #[test]
        fn links_are_found_in_order(
            pieces in prop::collection::vec(("[a-z .,]{0,10}", link()), 0..8),
            tail in "[a-z .,]{0,10}",
        ) {
            let mut html = String::new();
            let mut expected = String::new();
            let mut urls = Vec::new();
            for (i, (text, (tag, url))) in pieces.iter().enumerate() {
                html.push_str(text);
                html.push_str(tag);
                expected.push_str(text);
                expected.push_str(&tag.replace(url, &format!("T{i}")));
                urls.push(url.clone());
            }
            html.push_str(&tail);
            expected.push_str(&tail);
            let (out, originals) = rewrite_links(&html, marker);
            prop_assert_eq!(out, expected);
            prop_assert_eq!(originals, urls);
        }
    }
}
