//! The email channel: one SMTP hand-off of one email message, classified.
//!
//! [`SmtpSender::send`] builds a `multipart/alternative` message (text and HTML; inside a
//! `multipart/mixed` after which the attachments come, when there are some) from an
//! [`OutgoingEmail`], hands it to the configured SMTP server ([`SmtpUrl`]) and answers an
//! [`EmailAttempt`]; the dispatcher settles it, retries it after [`email_retry_delay`] or gives
//! up. The classification follows the SMTP reply (`reference/braze-messaging.md` §8):
//!
//! | answer | outcome | Currents |
//! |---|---|---|
//! | 2xx after `DATA` | [`EmailOutcome::Accepted`] | `Send`, `Delivery` |
//! | 5xx (any command) | [`EmailOutcome::Permanent`] | `Bounce` |
//! | 4xx, timeout, connection or TLS error | [`EmailOutcome::Temporary`] | `SoftBounce` / `Deferral` |
//! | a `From`, `To` or `Reply-To` that is not an address | [`EmailOutcome::Invalid`] | `Abort` |
//!
//! Headers the sender writes: `From`, `To`, `Reply-To`, `Subject`, `Date`, `Message-ID`
//! (from the send's idempotency key, so a re-sent message after a crash has the same id and
//! a receiving system can drop the copy), `List-Unsubscribe` with `List-Unsubscribe-Post:
//! List-Unsubscribe=One-Click` (RFC 8058) when an unsubscribe URL is given, and the MIME
//! headers. The message's custom headers come after them, with two rules so a template
//! cannot break the message:
//! - a name that is not an RFC 5322 field name (printable ASCII without `:`, at most 76
//!   characters) is skipped;
//! - a name the sender writes itself (`From`, `To`, `Cc`, `Bcc`, `Subject`, `Message-ID`,
//!   the MIME headers, … see [`RESERVED_HEADERS`]) is skipped: a custom header cannot
//!   re-address or re-frame the message.
//!
//! Values are written with line breaks turned into spaces (no header injection) and
//! non-ASCII text encoded (RFC 2047).
//!
//! Connections: lettre's pool keeps SMTP sessions open and reuses them (a session per message
//! would cost a handshake, and TLS, per email); every command waits at most [`SMTP_TIMEOUT`].
//! The pool starts a task when the sender is built, so build it inside the runtime.

use std::fmt;
use std::time::Duration;

use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tracing::debug;

/// How long one SMTP command (connecting included) may take.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Header names (lowercase) the sender writes itself; custom headers by these names are
/// skipped.
pub const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "return-path",
    "received",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "dkim-signature",
];

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Never encrypted (`smtp://…?tls=none`): loopback test sinks and trusted relays.
    None,
    /// STARTTLS when the server offers it, plain otherwise (`smtp://`, the default): works
    /// with any server, but an attacker on the path can suppress the offer.
    Opportunistic,
    /// STARTTLS or fail (`smtp://…?tls=required`).
    Required,
    /// TLS from the first byte (`smtps://`, port 465).
    Implicit,
}

/// A parsed `smtp-url`: where and how to hand email over. `Debug` and `Display` show the
/// password as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpUrl {
    security: SmtpSecurity,
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
}

/// Why an `smtp-url` cannot be used. Never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmtpUrlError {
    #[error("is not a URL ({0})")]
    Unparsable(String),
    #[error("must start with smtp:// or smtps://, not {0}://")]
    Scheme(String),
    #[error("has no host")]
    MissingHost,
    #[error("has a user name but no password (write USER:PASSWORD@)")]
    UserWithoutPassword,
    #[error("has a path; write smtp://HOST:PORT")]
    Path,
    #[error("has an unknown parameter {0:?} (only tls=none|opportunistic|required)")]
    UnknownParameter(String),
    #[error("has tls={0:?}; use tls=none, tls=opportunistic or tls=required")]
    TlsMode(String),
    #[error("is smtps:// (TLS from the start): a tls= parameter does not apply")]
    TlsWithSmtps,
}

impl SmtpUrl {
    /// Reads `smtp://[USER:PASSWORD@]HOST[:PORT][?tls=none|opportunistic|required]` (port
    /// 587 by default; STARTTLS when offered unless `tls` says otherwise) or
    /// `smtps://[USER:PASSWORD@]HOST[:PORT]` (TLS from the start; port 465 by default). The
    /// user name and password are percent-decoded.
    pub fn parse(raw: &str) -> Result<SmtpUrl, SmtpUrlError> {
        let url =
            reqwest::Url::parse(raw.trim()).map_err(|e| SmtpUrlError::Unparsable(e.to_string()))?;
        let implicit = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => return Err(SmtpUrlError::Scheme(other.to_owned())),
        };
        let host = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty())
            .ok_or(SmtpUrlError::MissingHost)?
            .to_owned();
        if !matches!(url.path(), "" | "/") || url.fragment().is_some() {
            return Err(SmtpUrlError::Path);
        }
        let mut security = if implicit {
            SmtpSecurity::Implicit
        } else {
            SmtpSecurity::Opportunistic
        };
        for (key, value) in url.query_pairs() {
            if key != "tls" {
                return Err(SmtpUrlError::UnknownParameter(key.into_owned()));
            }
            if implicit {
                return Err(SmtpUrlError::TlsWithSmtps);
            }
            security = match value.as_ref() {
                "none" => SmtpSecurity::None,
                "opportunistic" => SmtpSecurity::Opportunistic,
                "required" => SmtpSecurity::Required,
                other => return Err(SmtpUrlError::TlsMode(other.to_owned())),
            };
        }
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (_, None) => return Err(SmtpUrlError::UserWithoutPassword),
            (user, Some(password)) => Some((percent_decode(user), percent_decode(password))),
        };
        Ok(SmtpUrl {
            security,
            host,
            port: url.port().unwrap_or(if implicit { 465 } else { 587 }),
            credentials,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn security(&self) -> SmtpSecurity {
        self.security
    }

    /// The user name, if the URL has credentials.
    pub fn user(&self) -> Option<&str> {
        self.credentials.as_ref().map(|(u, _)| u.as_str())
    }
}

impl fmt::Display for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.security {
            SmtpSecurity::Implicit => "smtps",
            _ => "smtp",
        };
        write!(f, "{scheme}://")?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:***@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        match self.security {
            SmtpSecurity::None => f.write_str("?tls=none"),
            SmtpSecurity::Required => f.write_str("?tls=required"),
            SmtpSecurity::Opportunistic | SmtpSecurity::Implicit => Ok(()),
        }
    }
}

impl fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SmtpUrl({self})")
    }
}

/// Decodes `%XX` escapes (the URL parser keeps them in user names and passwords).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why an [`SmtpSender`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// The TLS client for the server's name could not be set up.
    #[error("cannot set up TLS for {host}: {message}")]
    Tls { host: String, message: String },
}

/// One email message, rendered and ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    /// `"Name <a@b>"` or `"a@b"`.
    pub from: String,
    pub to: String,
    pub reply_to: Option<String>,
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
    /// Custom headers (see the module documentation for the ones skipped).
    pub headers: Vec<(String, String)>,
    /// Without angle brackets (`tw-1-42@tideway`); written as `Message-ID: <…>`.
    pub message_id: String,
    /// The one-click unsubscribe URL, written as `List-Unsubscribe: <url>`.
    pub list_unsubscribe: Option<String>,
    /// Files attached after the text and HTML (`multipart/mixed`).
    pub attachments: Vec<AttachedFile>,
}

/// A file attached to an email: its name, its MIME type and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedFile {
    pub file_name: String,
    /// As the server that gave the file said it (`application/pdf`); `None`: octet stream.
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// What one hand-off came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailOutcome {
    /// The server took the message (2xx after `DATA`).
    Accepted,
    /// The server refused it for good (5xx): a bounce.
    Permanent,
    /// Refused for now (4xx) or not reached (timeout, connection, TLS): worth retrying.
    Temporary,
    /// Not sent, and never will be: the message cannot be built. `abort_type` is the
    /// `users.messages.email.Abort` code (`invalid_email_address`).
    Invalid { abort_type: &'static str },
}

/// One hand-off, with the SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAttempt {
    pub outcome: EmailOutcome,
    /// The reply code, when the server answered (250, 451, 550, …).
    pub code: Option<u16>,
    /// The reply's text, or what went wrong when there was no reply.
    pub reply: String,
}

/// Sends email through one SMTP server. Cheap to clone.
#[derive(Clone)]
pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    url: SmtpUrl,
}

impl fmt::Debug for SmtpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpSender")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SmtpSender {
    /// A sender for `url`. Nothing is connected yet: an unreachable server shows in the
    /// first send's [`EmailOutcome::Temporary`].
    pub fn new(url: &SmtpUrl) -> Result<SmtpSender, SmtpError> {
        let tls_error = |e: lettre::transport::smtp::Error| SmtpError::Tls {
            host: url.host.clone(),
            message: e.to_string(),
        };
        let tls = match url.security {
            SmtpSecurity::None => Tls::None,
            SmtpSecurity::Opportunistic => {
                Tls::Opportunistic(TlsParameters::new(url.host.clone()).map_err(tls_error)?)
            }
            SmtpSecurity::Required => {
                Tls::Required(TlsParameters::new(url.host.clone()).map_err(tls_error)?)
            }
            SmtpSecurity::Implicit => {
                Tls::Wrapper(TlsParameters::new(url.host.clone()).map_err(tls_error)?)
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&url.host)
            .port(url.port)
            .tls(tls)
            .timeout(Some(SMTP_TIMEOUT));
        if let Some((user, password)) = &url.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(SmtpSender {
            transport: builder.build(),
            url: url.clone(),
        })
    }

    /// The server this sender hands mail to (password redacted in its `Display`).
    pub fn url(&self) -> &SmtpUrl {
        &self.url
    }

    /// Hands one message over. Never fails: whatever happens is in the answer.
    pub async fn send(&self, email: &OutgoingEmail) -> EmailAttempt {
        let message = match build_message(email) {
            Ok(m) => m,
            Err(reason) => {
                return EmailAttempt {
                    outcome: EmailOutcome::Invalid {
                        abort_type: "invalid_email_address",
                    },
                    code: None,
                    reply: reason,
                };
            }
        };
        match self.transport.send(message).await {
            Ok(response) => EmailAttempt {
                outcome: EmailOutcome::Accepted,
                code: Some(u16::from(response.code())),
                reply: response.message().collect::<Vec<_>>().join(" "),
            },
            Err(e) => classify_error(&e),
        }
    }
}

fn classify_error(e: &lettre::transport::smtp::Error) -> EmailAttempt {
    let code = e.status().map(u16::from);
    let outcome = if e.is_permanent() {
        EmailOutcome::Permanent
    } else {
        EmailOutcome::Temporary
    };
    // For a negative reply the source is the server's text; otherwise say what failed.
    let reply = match (code, std::error::Error::source(e)) {
        (Some(_), Some(text)) => text.to_string(),
        _ if e.is_timeout() => "timed out".to_owned(),
        _ => e.to_string(),
    };
    EmailAttempt {
        outcome,
        code,
        reply,
    }
}

fn mailbox(field: &str, raw: &str) -> Result<Mailbox, String> {
    raw.trim()
        .parse::<Mailbox>()
        .map_err(|e| format!("{field} {raw:?} is not an email address ({e})"))
}

/// One line: line breaks in a rendered value become spaces.
fn one_line(value: &str) -> String {
    value
        .split(['\r', '\n'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        // Other control characters (a NUL a personalised value brought in) have no place in a
        // header either; a tab is a header's own whitespace.
        .filter(|c| !c.is_control() || *c == '\t')
        .collect::<String>()
        .trim()
        .to_owned()
}

/// A body part without NUL characters, which SMTP forbids in a message (RFC 5321 §4.5.2); a
/// personalised value may bring one in.
fn without_nul(part: &str) -> String {
    part.replace('\0', "")
}

/// Whether `name` is an RFC 5322 field name (printable ASCII but `:`) lettre can write.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

fn header(name: &str, value: String) -> Option<HeaderValue> {
    HeaderName::new_from_ascii(name.to_owned())
        .ok()
        .map(|name| HeaderValue::new(name, value))
}

/// The MIME type to write for an attachment, from what its server said: the bare
/// `type/subtype` when it is a plain token pair (with its `charset` for `text/*`, so a UTF-8
/// file reads as UTF-8), else `application/octet-stream`. A container type (`multipart/*`,
/// `message/*`) is octet-stream too: a fetched file must not add parts of its own to the
/// message.
fn attachment_type(given: Option<&str>) -> String {
    const FALLBACK: &str = "application/octet-stream";
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let mut parts = given.unwrap_or_default().split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    let Some((top, sub)) = essence.split_once('/') else {
        return FALLBACK.to_owned();
    };
    if !token(top)
        || !token(sub)
        || top.eq_ignore_ascii_case("multipart")
        || top.eq_ignore_ascii_case("message")
    {
        return FALLBACK.to_owned();
    }
    let charset = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| token(v));
    match charset {
        Some(charset) if top.eq_ignore_ascii_case("text") => {
            format!("{essence}; charset={charset}")
        }
        _ => essence.to_owned(),
    }
}

/// The message, or why its addresses cannot be used.
fn build_message(email: &OutgoingEmail) -> Result<Message, String> {
    let mut builder = Message::builder()
        .from(mailbox("from", &email.from)?)
        .to(mailbox("to", &email.to)?)
        .subject(one_line(&email.subject))
        .message_id(Some(format!(
            "<{}>",
            email
                .message_id
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
        )));
    if let Some(reply_to) = &email.reply_to {
        builder = builder.reply_to(mailbox("reply_to", reply_to)?);
    }
    if let Some(url) = &email.list_unsubscribe {
        let url = one_line(url);
        if let Some(h) = header("List-Unsubscribe", format!("<{url}>")) {
            builder = builder.raw_header(h);
        }
        if let Some(h) = header(
            "List-Unsubscribe-Post",
            "List-Unsubscribe=One-Click".to_owned(),
        ) {
            builder = builder.raw_header(h);
        }
    }
    for (name, value) in &email.headers {
        let name = name.trim();
        if !valid_header_name(name) {
            debug!(name, "custom email header skipped: not a header name");
            continue;
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            debug!(name, "custom email header skipped: the sender writes it");
            continue;
        }
        if let Some(h) = header(name, one_line(value)) {
            builder = builder.raw_header(h);
        }
    }
    let built = if email.attachments.is_empty() {
        match (&email.text, &email.html) {
            (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
                without_nul(text),
                without_nul(html),
            )),
            (None, Some(html)) => builder.singlepart(SinglePart::html(without_nul(html))),
            (Some(text), None) => builder.singlepart(SinglePart::plain(without_nul(text))),
            (None, None) => builder.singlepart(SinglePart::plain(String::new())),
        }
    } else {
        // The readable part first, then each file: what mail clients show as attachments.
        let readable = MultiPart::alternative_plain_html(
            without_nul(email.text.as_deref().unwrap_or_default()),
            without_nul(email.html.as_deref().unwrap_or_default()),
        );
        let mut mixed = MultiPart::mixed().multipart(readable);
        for file in &email.attachments {
            let content_type =
                ContentType::parse(&attachment_type(file.content_type.as_deref()))
                    .map_err(|e| format!("an attachment's type cannot be written ({e})"))?;
            // Base64 always: the file's bytes as they are, which no line of them (a bare LF, a
            // lone ".") can turn into the end of the message or the start of another.
            let body = Body::new_with_encoding(file.bytes.clone(), ContentTransferEncoding::Base64)
                .map_err(|_| "an attachment cannot be encoded".to_owned())?;
            mixed = mixed
                .singlepart(Attachment::new(one_line(&file.file_name)).body(body, content_type));
        }
        builder.multipart(mixed)
    };
    built.map_err(|e| format!("the message cannot be built ({e})"))
}

/// How long to wait before retry number `retry` (1 = the first retry) of an email that was
/// deferred (4xx, or the server not reached), given a jitter in [0, 1).
///
/// Greylisting servers accept a retry after a few minutes; a server that is down needs
/// longer. The schedule, each with up to 25 % added by the jitter:
///
/// | retry | delay |
/// |---|---|
/// | 1 | 1 min |
/// | 2 | 5 min |
/// | 3 | 30 min |
/// | 4 | 2 h |
/// | 5 and later | 4 h |
///
/// With the dispatcher's five attempts, a soft bounce is final after about 2 h 36 min (at
/// most 3 h 15 min).
pub fn email_retry_delay(retry: u32, jitter01: f64) -> Duration {
    let base_secs: u64 = match retry {
        0 | 1 => 60,
        2 => 5 * 60,
        3 => 30 * 60,
        4 => 2 * 3600,
        _ => 4 * 3600,
    };
    Duration::from_secs(base_secs).mul_f64(1.0 + 0.25 * jitter01.clamp(0.0, 1.0))
}

/// A plain-text rendering of an HTML body, for the `text/plain` part when the message has
/// none: tags dropped (`<script>`, `<style>` and `<head>` with their content), block
/// elements and `<br>` as line breaks, list items as `- `, links as `text (URL)`, the
/// common entities decoded, runs of white space collapsed and at most one empty line in a
/// row. Not a layout engine: enough for a readable alternative part.
pub fn html_to_text(html: &str) -> String {
    let mut w = TextWriter::default();
    let mut rest = html;
    let mut skip_until: Option<&'static str> = None;
    let mut links: Vec<(usize, Option<String>)> = Vec::new();
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if skip_until.is_none() {
                w.text(&decode_entities(rest));
            }
            break;
        };
        if skip_until.is_none() {
            w.text(&decode_entities(&rest[..lt]));
        }
        rest = &rest[lt..];
        if let Some(comment) = rest.strip_prefix("<!--") {
            rest = comment.find("-->").map_or("", |end| &comment[end + 3..]);
            continue;
        }
        let Some((tag, after)) = read_tag(rest) else {
            // A lone `<`: text.
            if skip_until.is_none() {
                w.text("<");
            }
            rest = &rest[1..];
            continue;
        };
        rest = after;
        if let Some(closing) = skip_until {
            if tag.closing && tag.name == closing {
                skip_until = None;
            }
            continue;
        }
        match (tag.name.as_str(), tag.closing) {
            ("script" | "style" | "head" | "title", false) if !tag.self_closing => {
                skip_until = Some(match tag.name.as_str() {
                    "script" => "script",
                    "style" => "style",
                    "head" => "head",
                    _ => "title",
                });
            }
            ("br", _) => w.line_break(),
            ("li", false) => {
                w.block(1);
                w.raw("- ");
            }
            ("a", false) => {
                let href = tag
                    .attr("href")
                    .map(|h| decode_entities(h).trim().to_owned())
                    .filter(|h| !h.is_empty() && !h.starts_with('#'))
                    .filter(|h| !h.to_ascii_lowercase().starts_with("javascript:"));
                links.push((w.out.len(), href));
            }
            ("a", true) => {
                if let Some((start, Some(href))) = links.pop() {
                    let label = w.out.get(start..).unwrap_or("").trim();
                    let shown = href.strip_prefix("mailto:").unwrap_or(&href);
                    if label.is_empty() {
                        w.text(shown);
                    } else if label != shown && label != href {
                        w.text(&format!(" ({shown})"));
                    }
                }
            }
            (
                "p" | "div" | "table" | "ul" | "ol" | "blockquote" | "pre" | "hr" | "h1" | "h2"
                | "h3" | "h4" | "h5" | "h6",
                _,
            ) => w.block(2),
            ("tr" | "li" | "dt" | "dd" | "section" | "article" | "header" | "footer", _) => {
                w.block(1)
            }
            ("td" | "th", true) => w.text(" "),
            _ => {}
        }
    }
    w.finish()
}

/// A tag as [`html_to_text`] needs it.
struct Tag<'a> {
    name: String,
    closing: bool,
    self_closing: bool,
    attrs: &'a str,
}

impl Tag<'_> {
    /// The value of attribute `name` (quoted or not), not entity-decoded.
    fn attr(&self, name: &str) -> Option<&str> {
        let mut rest = self.attrs;
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
            if rest.is_empty() {
                return None;
            }
            let key_end = rest
                .find(|c: char| c.is_whitespace() || c == '=' || c == '/')
                .unwrap_or(rest.len());
            let key = &rest[..key_end];
            rest = rest[key_end..].trim_start();
            let value = if let Some(v) = rest.strip_prefix('=') {
                let v = v.trim_start();
                let (value, after) = match v.chars().next() {
                    Some(q @ ('"' | '\'')) => {
                        let body = &v[1..];
                        let end = body.find(q).unwrap_or(body.len());
                        (&body[..end], body.get(end + 1..).unwrap_or(""))
                    }
                    _ => {
                        let end = v.find(char::is_whitespace).unwrap_or(v.len());
                        (&v[..end], &v[end..])
                    }
                };
                rest = after;
                Some(value)
            } else {
                None
            };
            if key.eq_ignore_ascii_case(name) {
                return Some(value.unwrap_or(""));
            }
        }
    }
}

/// Reads the tag at the start of `s` (which starts with `<`): the tag and what follows it.
/// `None` when `s` does not start a tag (`<` followed by something else than a name, `/` or
/// `!`), so the `<` is text.
fn read_tag(s: &str) -> Option<(Tag<'_>, &str)> {
    let inner = &s[1..];
    let first = inner.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '/' || first == '!' || first == '?') {
        return None;
    }
    // The end of the tag: the first `>` outside quotes.
    let mut quote = None;
    let mut end = None;
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.unwrap_or(inner.len());
    let body = &inner[..end];
    let after = inner.get(end + 1..).unwrap_or("");
    let closing = body.starts_with('/');
    let body = body.trim_start_matches('/');
    let name_end = body
        .find(|c: char| c.is_whitespace() || c == '/')
        .unwrap_or(body.len());
    Some((
        Tag {
            name: body[..name_end].to_ascii_lowercase(),
            closing,
            self_closing: body.ends_with('/'),
            attrs: &body[name_end..],
        },
        after,
    ))
}

/// Decodes the named entities mail HTML commonly uses and numeric references; anything else
/// is kept as written.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest[1..].find(';').filter(|&n| n <= 10).and_then(|n| {
            let name = &rest[1..=n];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                "copy" => Some('©'),
                "reg" => Some('®'),
                "hellip" => Some('…'),
                "mdash" => Some('—'),
                "ndash" => Some('–'),
                "rsquo" => Some('’'),
                "lsquo" => Some('‘'),
                "rdquo" => Some('”'),
                "ldquo" => Some('“'),
                _ => name.strip_prefix('#').and_then(|num| {
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => num.parse().ok(),
                    };
                    code.and_then(char::from_u32)
                }),
            };
            c.map(|c| (c, n + 2))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
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

/// Collects text with collapsed white space and bounded blank lines.
#[derive(Default)]
struct TextWriter {
    out: String,
    /// White space seen since the last character written.
    space: bool,
    /// Line breaks wanted before the next character.
    breaks: usize,
}

impl TextWriter {
    fn text(&mut self, s: &str) {
        for c in s.chars() {
            if c.is_whitespace() && c != '\u{a0}' {
                self.space = true;
            } else {
                self.put(if c == '\u{a0}' { ' ' } else { c });
            }
        }
    }

    /// Writes `s` as is (a list marker), after any pending break.
    fn raw(&mut self, s: &str) {
        for c in s.chars() {
            self.put(c);
        }
        self.space = false;
    }

    fn put(&mut self, c: char) {
        if !self.out.is_empty() {
            if self.breaks > 0 {
                for _ in 0..self.breaks.min(2) {
                    self.out.push('\n');
                }
            } else if self.space && c != ' ' && !self.out.ends_with([' ', '\n']) {
                self.out.push(' ');
            }
        }
        self.breaks = 0;
        self.space = false;
        if c == ' ' && self.out.ends_with([' ', '\n']) {
            return;
        }
        self.out.push(c);
    }

    /// A block boundary: `n` = 1 starts a new line, 2 leaves an empty line.
    fn block(&mut self, n: usize) {
        self.breaks = self.breaks.max(n);
    }

    /// `<br>`: one more line break (two in a row leave an empty line).
    fn line_break(&mut self) {
        self.breaks = (self.breaks + 1).min(2);
    }

    fn finish(self) -> String {
        self.out
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_defaults() {
        let u = SmtpUrl::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.security(), u.user()),
            ("127.0.0.1", 2525, SmtpSecurity::Opportunistic, None)
        );
        let u = SmtpUrl::parse("smtps://me%40x.io:p%3Ass@mail.example.com").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.security(), u.user()),
            (
                "mail.example.com",
                465,
                SmtpSecurity::Implicit,
                Some("me@x.io")
            )
        );
        assert_eq!(u.credentials.as_ref().unwrap().1, "p:ss");
        let u = SmtpUrl::parse("smtp://u:p@relay.example?tls=required").unwrap();
        assert_eq!((u.port(), u.security()), (587, SmtpSecurity::Required));
        let u = SmtpUrl::parse("smtp://[::1]:25?tls=none").unwrap();
        assert_eq!((u.host(), u.security()), ("::1", SmtpSecurity::None));
        assert_eq!(u.to_string(), "smtp://[::1]:25?tls=none");
    }

    #[test]
    fn attachment_types_are_bare_and_never_containers() {
        for (given, written) in [
            (Some("application/pdf"), "application/pdf"),
            (
                Some("text/plain; charset=utf-8"),
                "text/plain; charset=utf-8",
            ),
            (
                Some("text/csv; header=present; charset=\"UTF-8\""),
                "text/csv; charset=UTF-8",
            ),
            (Some("application/pdf; charset=utf-8"), "application/pdf"),
            (Some("text/plain; charset=\"a b\""), "text/plain"),
            (
                Some("multipart/mixed; boundary=ZZ"),
                "application/octet-stream",
            ),
            (Some("message/rfc822"), "application/octet-stream"),
            (Some("text/html\r\nX-Evil: 1"), "application/octet-stream"),
            (Some("garbage"), "application/octet-stream"),
            (None, "application/octet-stream"),
        ] {
            assert_eq!(attachment_type(given), written, "{given:?}");
        }
    }

    /// A text file whose lines could end the SMTP data (a bare LF, a lone ".") is written in
    /// base64, so its bytes cannot be read as anything but the file.
    #[test]
    fn attachments_are_base64_whatever_their_bytes() {
        let mut e = email();
        e.attachments = vec![AttachedFile {
            file_name: "invoice.txt".into(),
            content_type: Some("text/plain".into()),
            bytes: b"x\n.\r\nMAIL FROM:<evil@attacker.example>\r\n".to_vec(),
        }];
        let raw = String::from_utf8(build_message(&e).unwrap().formatted()).unwrap();
        assert!(raw.contains("Content-Transfer-Encoding: base64"), "{raw}");
        assert!(!raw.contains("MAIL FROM"), "{raw}");
    }

    #[test]
    fn bad_urls_are_refused_naming_the_problem() {
        let err = |s: &str| SmtpUrl::parse(s).unwrap_err();
        assert_eq!(err("http://h:25"), SmtpUrlError::Scheme("http".into()));
        assert_eq!(err("smtp://u@h:25"), SmtpUrlError::UserWithoutPassword);
        assert_eq!(err("smtp://h:25/x"), SmtpUrlError::Path);
        assert_eq!(
            err("smtp://h?x=1"),
            SmtpUrlError::UnknownParameter("x".into())
        );
        assert_eq!(
            err("smtp://h?tls=maybe"),
            SmtpUrlError::TlsMode("maybe".into())
        );
        assert_eq!(err("smtps://h?tls=none"), SmtpUrlError::TlsWithSmtps);
        assert!(matches!(err("not a url"), SmtpUrlError::Unparsable(_)));
        assert!(
            matches!(err("smtp://u:hunter2@h:99999"), SmtpUrlError::Unparsable(m) if !m.contains("hunter2"))
        );
    }

    // A runtime: the sender's connection pool starts a task when it is built.
    #[tokio::test]
    async fn the_password_is_never_shown() {
        let u = SmtpUrl::parse("smtps://user:hunter2@mail.example.com:465").unwrap();
        assert_eq!(u.to_string(), "smtps://user:***@mail.example.com:465");
        assert!(!format!("{u:?}").contains("hunter2"));
        let sender = SmtpSender::new(&u).unwrap();
        assert!(!format!("{sender:?}").contains("hunter2"));
    }

    fn email() -> OutgoingEmail {
        OutgoingEmail {
            from: "Team <team@tideway.example>".into(),
            to: "ada@example.com".into(),
            reply_to: None,
            subject: "Hi\r\nBcc: evil@example.com".into(),
            html: Some("<p>Hi</p>".into()),
            text: Some("Hi".into()),
            headers: vec![
                (
                    "X-Campaign".into(),
                    "spring\r\nBcc: evil@example.com".into(),
                ),
                ("Bcc".into(), "evil@example.com".into()),
                ("bad name".into(), "x".into()),
                ("X-Bad\r\nTo".into(), "x".into()),
            ],
            message_id: "<tw-1-2@tideway>".into(),
            list_unsubscribe: Some("https://t.example/u/abc".into()),
            attachments: Vec::new(),
        }
    }

    #[test]
    fn messages_keep_their_headers_in_one_piece() {
        let m = build_message(&email()).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        let head = &raw[..raw.find("\r\n\r\n").unwrap()];
        assert!(head.contains("Message-ID: <tw-1-2@tideway>"), "{head}");
        assert!(
            head.contains("List-Unsubscribe: <https://t.example/u/abc>"),
            "{head}"
        );
        assert!(
            head.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
            "{head}"
        );
        assert!(
            head.contains("X-Campaign: spring Bcc: evil@example.com"),
            "{head}"
        );
        assert!(head.contains("Subject: Hi Bcc: evil@example.com"), "{head}");
        assert!(!head.contains("\nBcc:"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("bad name"), "{head}");
        assert_eq!(m.envelope().to().len(), 1);
        assert!(head.contains("multipart/alternative"), "{head}");
    }

    /// A NUL (which a personalised value can bring in) never reaches the wire: SMTP forbids it
    /// in a message.
    #[test]
    fn nul_characters_are_left_out_of_headers_and_bodies() {
        let mut e = email();
        e.subject = "Hi\u{0} there".into();
        e.html = Some("<p>a\u{0}b</p>".into());
        e.text = Some("a\u{0}b".into());
        e.headers = vec![("X-Tag".into(), "x\u{0}y".into())];
        let raw = build_message(&e).unwrap().formatted();
        assert!(!raw.contains(&0), "{}", String::from_utf8_lossy(&raw));
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.contains("Subject: Hi there"), "{raw}");
        assert!(raw.contains("X-Tag: xy"), "{raw}");
        assert!(raw.contains("<p>ab</p>"), "{raw}");
    }

    #[test]
    fn unusable_addresses_are_invalid() {
        let mut e = email();
        e.to = "not an address".into();
        assert!(build_message(&e).unwrap_err().contains("to"));
        let mut e = email();
        e.reply_to = Some("@@".into());
        assert!(build_message(&e).is_err());
    }

    #[test]
    fn html_becomes_readable_text() {
        let html = r#"<html><head><title>T</title><style>p{color:red}</style></head>
            <body><h1>Hello&nbsp;Ada</h1><p>Your   plan:
            <b>pro</b> &amp; more.</p><p>See <a href="https://x.example/a?b=1&amp;c=2">the offer</a>
            or <a href="https://x.example/raw">https://x.example/raw</a>.<br>Bye<br/>Team</p>
            <ul><li>one</li><li>two</li></ul><script>alert(1)</script><img src="https://t/p.gif">
            <!-- a comment --> 3 &lt; 4 &#8364; &#x263A; &bogus; a < b</body></html>"#;
        assert_eq!(
            html_to_text(html),
            "Hello Ada\n\nYour plan: pro & more.\n\nSee the offer (https://x.example/a?b=1&c=2) or \
             https://x.example/raw.\nBye\nTeam\n\n- one\n- two\n\n3 < 4 € ☺ &bogus; a < b"
        );
        assert_eq!(html_to_text("plain"), "plain");
        assert_eq!(html_to_text(""), "");
        assert_eq!(
            html_to_text(
                r#"<a href="mailto:a@b.c">write</a> <a href='#top'>top</a> <a href="https://e"></a>"#
            ),
            "write (a@b.c) top https://e"
        );
    }

    #[test]
    fn email_retries_back_off() {
        assert_eq!(email_retry_delay(1, 0.0), Duration::from_secs(60));
        assert_eq!(email_retry_delay(2, 0.0), Duration::from_secs(300));
        assert_eq!(email_retry_delay(4, 0.0), Duration::from_secs(7200));
        assert_eq!(email_retry_delay(9, 0.0), Duration::from_secs(4 * 3600));
        assert_eq!(
            email_retry_delay(1, 0.999_999),
            Duration::from_secs(60).mul_f64(1.249_999_75)
        );
    }
}
