//! A small SMTP server that keeps what it receives in memory: the mailbox of the tests of
//! every crate that sends email, and of `tideway sink --smtp-listen` (a local place to see
//! what campaigns send).
//!
//! It speaks plain SMTP (RFC 5321) as a client such as lettre uses it: `EHLO`/`HELO`,
//! `MAIL FROM`, `RCPT TO`, `DATA` (dot-unstuffed), `RSET`, `NOOP`, `VRFY`, `HELP`, `QUIT`;
//! it advertises `8BITMIME`, `SIZE`, `PIPELINING` and `SMTPUTF8`, and no `STARTTLS` or
//! `AUTH` (so a client on `smtp://` sends in the clear, as a loopback sink wants). Limits:
//! messages over [`SinkOptions::max_message_bytes`] are refused with 552, at most
//! [`MAX_RECIPIENTS`] recipients a message, command lines of at most 4 KiB, and a session
//! idle for [`IDLE_TIMEOUT`] is closed. Only the latest [`SinkOptions::capacity`] messages
//! are kept (a ring buffer), so a long-running `tideway sink` stays bounded.
//!
//! [`SinkMode`] makes it refuse recipients, permanently (550) or for now (451), so tests
//! can exercise bounces and retries against a real server.
//!
//! [`ReceivedMail`] reads its message back: headers (unfolded, RFC 2047 words decoded) and
//! the `text/plain` and `text/html` parts of a MIME message, their quoted-printable or
//! base64 transfer encoding undone.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use time::OffsetDateTime;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Most recipients of one message.
pub const MAX_RECIPIENTS: usize = 100;

/// A session that sends nothing for this long is closed (421).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest command line (RFC 5321 asks servers for at least 512 octets).
const MAX_COMMAND_LINE: usize = 4 * 1024;

/// Longest line inside `DATA` (RFC 5321: 1000 octets; generous for sloppy clients).
const MAX_DATA_LINE: usize = 64 * 1024;

/// The name the sink greets with.
const SERVER_NAME: &str = "tideway-sink";

/// How the sink answers recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkMode {
    /// Take every message (250).
    #[default]
    Accept,
    /// Refuse every recipient with `550 5.1.1` (a bounce).
    RejectPermanent,
    /// Refuse every recipient with `451 4.3.0` (a deferral: try again later).
    RejectTemporary,
}

/// How much the sink keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkOptions {
    /// Messages kept; the oldest is dropped when a new one would exceed it.
    pub capacity: usize,
    /// Largest message (its `DATA`, after dot-unstuffing) accepted; advertised as `SIZE`.
    pub max_message_bytes: usize,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            capacity: 1_000,
            max_message_bytes: 10 * 1024 * 1024,
        }
    }
}

/// One message the sink took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// 1 for the first message the sink took, then one more for each.
    pub seq: u64,
    /// The envelope sender (`MAIL FROM`), without angle brackets; empty for `<>`.
    pub from: String,
    /// The envelope recipients (`RCPT TO`), without angle brackets.
    pub to: Vec<String>,
    /// The message as sent (headers and body, CRLF line ends), dot-unstuffed; lossy UTF-8.
    pub data: String,
    pub received_at: OffsetDateTime,
}

impl ReceivedMail {
    /// The message's header fields in order, unfolded, encoded words (RFC 2047) decoded.
    pub fn headers(&self) -> Vec<(String, String)> {
        parse_headers(split_head(&self.data).0)
            .into_iter()
            .map(|(name, value)| (name, decode_words(&value)))
            .collect()
    }

    /// The first header field named `name` (any letter case), decoded as in [`headers`].
    ///
    /// [`headers`]: ReceivedMail::headers
    pub fn header(&self, name: &str) -> Option<String> {
        parse_headers(split_head(&self.data).0)
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| decode_words(&value))
    }

    pub fn subject(&self) -> Option<String> {
        self.header("Subject")
    }

    /// The first `text/html` part, decoded (line ends as `\n`).
    pub fn html(&self) -> Option<String> {
        find_part(&self.data, "text/html", 0)
    }

    /// The first `text/plain` part, decoded; for a message without `Content-Type`, its body.
    pub fn text(&self) -> Option<String> {
        find_part(&self.data, "text/plain", 0)
    }
}

/// A running sink. Clones share it; it stops (closing its sessions) when the last is dropped.
#[derive(Clone)]
pub struct SmtpSink {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: SinkOptions,
    mode: Mutex<SinkMode>,
    mails: Mutex<VecDeque<ReceivedMail>>,
    /// Messages taken since start: the next one's `seq` is this plus one.
    taken: Mutex<u64>,
    /// The number of messages stored, for [`SmtpSink::wait_for`].
    stored: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SmtpSink {
    /// Listens on `addr` (port 0: any free port) with the default [`SinkOptions`].
    pub async fn start(addr: SocketAddr) -> io::Result<SmtpSink> {
        SmtpSink::start_with(addr, SinkOptions::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: SinkOptions) -> io::Result<SmtpSink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            options,
            mode: Mutex::new(SinkMode::Accept),
            mails: Mutex::new(VecDeque::new()),
            taken: Mutex::new(0),
            stored: watch::Sender::new(0),
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(SmtpSink {
            shared,
            addr,
            _server: Arc::new(AbortOnDrop(server)),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a sender reaches the sink at: `smtp://ADDR` (the sink offers no STARTTLS, so
    /// the session stays plain).
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// The stored messages, oldest first.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        lock(&self.shared.mails).iter().cloned().collect()
    }

    /// Forgets the stored messages.
    pub fn clear(&self) {
        lock(&self.shared.mails).clear();
        self.shared.stored.send_replace(0);
    }

    /// Waits until at least `n` messages are stored or `timeout` passes, then answers the
    /// stored messages (fewer than `n` after a timeout, or when [`SinkOptions::capacity`]
    /// is below `n`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let mut stored = self.shared.stored.subscribe();
        let _ = tokio::time::timeout(timeout, stored.wait_for(|count| *count >= n)).await;
        self.messages()
    }

    /// How recipients are answered from now on (sessions in progress included).
    pub fn set_mode(&self, mode: SinkMode) {
        *lock(&self.shared.mode) = mode;
    }

    pub fn mode(&self) -> SinkMode {
        *lock(&self.shared.mode)
    }
}

impl Shared {
    fn store(&self, from: String, to: Vec<String>, data: Vec<u8>) -> u64 {
        let seq = {
            let mut taken = lock(&self.taken);
            *taken += 1;
            *taken
        };
        let mail = ReceivedMail {
            seq,
            from,
            to,
            data: String::from_utf8_lossy(&data).into_owned(),
            received_at: OffsetDateTime::now_utc(),
        };
        let len = {
            let mut mails = lock(&self.mails);
            mails.push_back(mail);
            while mails.len() > self.options.capacity {
                mails.pop_front();
            }
            mails.len()
        };
        self.stored.send_replace(len);
        seq
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Sessions live in the set: when the sink stops (this task is aborted), they end too.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    sessions.spawn(async move {
                        if let Err(e) = session(stream, &shared).await {
                            tracing::debug!(%peer, error = %e, "SMTP sink session ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "SMTP sink cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// A line read with a length limit.
enum Line {
    /// Without its line end.
    Text(Vec<u8>),
    /// Longer than the limit (read to its end and dropped).
    TooLong,
}

/// Reads one line (ended by LF, an optional CR before it dropped); `None` at the end of the
/// stream (a last line without LF is dropped: the client went away mid-command).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(None);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1),
            None => (available, available.len()),
        };
        let found = done > chunk.len();
        if !too_long {
            line.extend_from_slice(chunk);
            if line.len() > max + 1 {
                too_long = true;
                line = Vec::new();
            }
        }
        r.consume(done);
        if found {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Line::Text(line)))
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await
}

/// The mail transaction in progress.
#[derive(Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
}

/// The address of a `FROM:<a@b> PARAMS` / `TO:<a@b> PARAMS` argument after its keyword, and
/// the parameters.
fn path_and_params(arg: &str) -> Option<(String, &str)> {
    let arg = arg.trim_start();
    if let Some(rest) = arg.strip_prefix('<') {
        let end = rest.find('>')?;
        Some((rest[..end].trim().to_owned(), &rest[end + 1..]))
    } else {
        // Sloppy clients send the address without brackets.
        let end = arg.find(' ').unwrap_or(arg.len());
        Some((arg[..end].to_owned(), &arg[end..]))
    }
}

/// The argument after `keyword` (`FROM:`, `TO:`), any letter case.
fn after_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| &arg[keyword.len()..])
}

async fn session(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let max = shared.options.max_message_bytes;
    reply(&mut w, &format!("220 {SERVER_NAME} ESMTP ready")).await?;
    let mut tx = Transaction::default();
    loop {
        let line =
            match tokio::time::timeout(IDLE_TIMEOUT, read_line(&mut r, MAX_COMMAND_LINE)).await {
                Err(_) => {
                    return reply(&mut w, "421 4.4.2 idle for too long, closing").await;
                }
                Ok(line) => line?,
            };
        let line = match line {
            None => return Ok(()),
            Some(Line::TooLong) => {
                reply(&mut w, "500 5.5.2 line too long").await?;
                continue;
            }
            Some(Line::Text(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (line.trim().to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" => {
                tx = Transaction::default();
                let greeting = format!(
                    "250-{SERVER_NAME} greets {}\r\n250-8BITMIME\r\n250-SIZE {max}\r\n250-PIPELINING\r\n250 SMTPUTF8",
                    if arg.is_empty() { "you" } else { arg }
                );
                reply(&mut w, &greeting).await?;
            }
            "HELO" => {
                tx = Transaction::default();
                reply(&mut w, &format!("250 {SERVER_NAME}")).await?;
            }
            "MAIL" => {
                let Some((from, params)) = after_keyword(arg, "FROM:").and_then(path_and_params)
                else {
                    reply(&mut w, "501 5.5.4 syntax: MAIL FROM:<address>").await?;
                    continue;
                };
                if tx.from.is_some() {
                    reply(&mut w, "503 5.5.1 nested MAIL command").await?;
                    continue;
                }
                let declared = params
                    .split_whitespace()
                    .find_map(|p| after_keyword(p, "SIZE=").and_then(|n| n.parse::<usize>().ok()));
                if declared.is_some_and(|n| n > max) {
                    reply(&mut w, "552 5.3.4 message size exceeds fixed maximum").await?;
                    continue;
                }
                tx.from = Some(from);
                reply(&mut w, "250 2.1.0 OK").await?;
            }
            "RCPT" => {
                let Some((to, _)) = after_keyword(arg, "TO:").and_then(path_and_params) else {
                    reply(&mut w, "501 5.5.4 syntax: RCPT TO:<address>").await?;
                    continue;
                };
                if tx.from.is_none() {
                    reply(&mut w, "503 5.5.1 need MAIL before RCPT").await?;
                    continue;
                }
                if tx.to.len() >= MAX_RECIPIENTS {
                    reply(&mut w, "452 4.5.3 too many recipients").await?;
                    continue;
                }
                let mode = *lock(&shared.mode);
                match mode {
                    SinkMode::Accept => {
                        tx.to.push(to);
                        reply(&mut w, "250 2.1.5 OK").await?;
                    }
                    SinkMode::RejectPermanent => {
                        let text = format!("550 5.1.1 <{to}>: mailbox unavailable (sink refuses)");
                        reply(&mut w, &text).await?;
                    }
                    SinkMode::RejectTemporary => {
                        let text = format!("451 4.3.0 <{to}>: try again later (sink defers)");
                        reply(&mut w, &text).await?;
                    }
                }
            }
            "DATA" => {
                if tx.from.is_none() {
                    reply(&mut w, "503 5.5.1 need MAIL before DATA").await?;
                    continue;
                }
                if tx.to.is_empty() {
                    reply(&mut w, "554 5.5.1 no valid recipients").await?;
                    continue;
                }
                reply(&mut w, "354 end data with <CR><LF>.<CR><LF>").await?;
                let Some(data) = read_data(&mut r, max).await? else {
                    return Ok(());
                };
                let tx = std::mem::take(&mut tx);
                match data {
                    Some(data) => {
                        let seq = shared.store(tx.from.unwrap_or_default(), tx.to, data);
                        reply(&mut w, &format!("250 2.0.0 OK: queued as {seq}")).await?;
                    }
                    None => {
                        reply(&mut w, "552 5.3.4 message size exceeds fixed maximum").await?;
                    }
                }
            }
            "RSET" => {
                tx = Transaction::default();
                reply(&mut w, "250 2.0.0 OK").await?;
            }
            "NOOP" => reply(&mut w, "250 2.0.0 OK").await?,
            "VRFY" => reply(&mut w, "252 2.1.5 cannot verify, send some mail").await?,
            "HELP" => {
                reply(
                    &mut w,
                    "214 2.0.0 EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT",
                )
                .await?
            }
            "QUIT" => return reply(&mut w, "221 2.0.0 bye").await,
            "STARTTLS" | "AUTH" | "BDAT" | "ETRN" => {
                reply(&mut w, "502 5.5.1 not implemented").await?;
            }
            _ => reply(&mut w, "500 5.5.2 command not recognised").await?,
        }
    }
}

/// Reads a message up to the line with a single dot: `None` when the stream ended first,
/// `Some(None)` when it was larger than `max` (read to its end and dropped).
async fn read_data<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut data = Vec::new();
    let mut too_large = false;
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, read_line(r, MAX_DATA_LINE)).await {
            Err(_) => return Ok(None),
            Ok(line) => line?,
        };
        let line = match line {
            None => return Ok(None),
            Some(Line::TooLong) => {
                too_large = true;
                continue;
            }
            Some(Line::Text(line)) => line,
        };
        if line == b"." {
            break;
        }
        // Dot-unstuffing (RFC 5321 §4.5.2): a line the client started with a dot got one more.
        let line = line.strip_prefix(b".").unwrap_or(&line);
        if !too_large {
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
            if data.len() > max {
                too_large = true;
                data = Vec::new();
            }
        }
    }
    Ok(Some((!too_large).then_some(data)))
}

/// The header block and the body of a message or MIME part (split at the first empty line).
fn split_head(data: &str) -> (&str, &str) {
    let mut pos = 0;
    for line in data.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']).is_empty() {
            return (&data[..pos], &data[pos + line.len()..]);
        }
        pos += line.len();
    }
    (data, "")
}

/// Header fields of a header block, unfolded (RFC 5322 §2.2.3), values trimmed.
fn parse_headers(head: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_owned(), value.to_owned()));
        }
    }
    for (_, value) in &mut out {
        *value = value.trim().to_owned();
    }
    out
}

/// A parameter of a structured header value (`boundary` of `multipart/alternative;
/// boundary="x"`).
fn header_param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The first part of MIME type `wanted` in `data` (a message or a part), decoded.
fn find_part(data: &str, wanted: &str, depth: usize) -> Option<String> {
    if depth > 8 {
        return None;
    }
    let (head, body) = split_head(data);
    let headers = parse_headers(head);
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let content_type = get("Content-Type").unwrap_or("text/plain");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("multipart/") {
        let boundary = header_param(content_type, "boundary")?;
        return multipart_parts(body, &boundary)
            .into_iter()
            .find_map(|part| find_part(&part, wanted, depth + 1));
    }
    let attachment = get("Content-Disposition")
        .is_some_and(|d| d.trim().to_ascii_lowercase().starts_with("attachment"));
    if mime != wanted || attachment {
        return None;
    }
    let encoding = get("Content-Transfer-Encoding")
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(body),
        "base64" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .unwrap_or_else(|_| body.as_bytes().to_vec())
        }
        _ => body.as_bytes().to_vec(),
    };
    let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
    Some(text.trim_end_matches('\n').to_owned())
}

/// The parts of a multipart body (RFC 2046 §5.1.1): what lies between the `--boundary`
/// lines, preamble and epilogue left out.
fn multipart_parts(body: &str, boundary: &str) -> Vec<String> {
    let delimiter = format!("--{boundary}");
    let close = format!("{delimiter}--");
    let mut parts = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in body.lines() {
        let trimmed = line.trim_end();
        if trimmed == delimiter || trimmed == close {
            if let Some(lines) = current.take() {
                parts.push(lines.join("\r\n"));
            }
            if trimmed == close {
                break;
            }
            current = Some(Vec::new());
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    parts
}

fn decode_quoted_printable(body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut lines = body.split('\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.trim_end_matches('\r').trim_end_matches([' ', '\t']);
        let (line, soft) = match line.strip_suffix('=') {
            Some(l) => (l, true),
            None => (line, false),
        };
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'='
                && let Some(b) = line
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
        if !soft && lines.peek().is_some() {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Decodes RFC 2047 encoded words (`=?utf-8?b?…?=`, `=?utf-8?q?…?=`) in a header value;
/// white space between two encoded words goes. Words in charsets other than UTF-8, US-ASCII
/// and ISO-8859-1 are kept as written.
fn decode_words(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match decode_word(candidate) {
            Some((text, len)) => {
                if !(after_word && before.chars().all(char::is_whitespace)) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &candidate[len..];
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One encoded word at the start of `s`: its text and length.
fn decode_word(s: &str) -> Option<(String, usize)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, rest) = inner.split_once('?')?;
    let (encoding, rest) = rest.split_once('?')?;
    let end = rest.find("?=")?;
    let text = &rest[..end];
    if text.contains(char::is_whitespace) {
        return None;
    }
    let len = 2 + charset.len() + 1 + encoding.len() + 1 + end + 2;
    let bytes = match encoding {
        "B" | "b" => base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
        "Q" | "q" => {
            let spaced = text.replace('_', " ");
            decode_quoted_printable(&spaced)
        }
        _ => return None,
    };
    // RFC 2231 allows a language after `*`: `utf-8*en`.
    let charset = charset.split('*').next().unwrap_or("").to_ascii_lowercase();
    let text = match charset.as_str() {
        "utf-8" | "utf8" | "us-ascii" => String::from_utf8_lossy(&bytes).into_owned(),
        "iso-8859-1" | "latin1" => bytes.iter().map(|&b| char::from(b)).collect(),
        _ => return None,
    };
    Some((text, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_unfolded_and_decoded() {
        let mail = ReceivedMail {
            seq: 1,
            from: String::new(),
            to: vec![],
            data: "Subject: =?utf-8?b?SGVsbG8gw6k=?=\r\n =?utf-8?q?_and_=C3=A9?= end\r\nX-Long: a\r\n\tb\r\n\r\nbody\r\n".into(),
            received_at: OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(mail.subject().as_deref(), Some("Hello é and é end"));
        assert_eq!(mail.header("x-long").as_deref(), Some("a\tb"));
        assert_eq!(mail.text().as_deref(), Some("body"));
        assert_eq!(mail.html(), None);
        assert_eq!(decode_words("=?koi8-r?b?x?= plain"), "=?koi8-r?b?x?= plain");
    }

    #[test]
    fn multipart_bodies_decode_back() {
        let data = "Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
                    preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\
                    Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 and a very =\r\n\
                    long line\r\nnext\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\
                    Content-Transfer-Encoding: base64\r\n\r\nPHA+aGk8L3A+\r\n--b1--\r\nepilogue\r\n";
        let mail = ReceivedMail {
            seq: 1,
            from: String::new(),
            to: vec![],
            data: data.into(),
            received_at: OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(
            mail.text().as_deref(),
            Some("café and a very long line\nnext")
        );
        assert_eq!(mail.html().as_deref(), Some("<p>hi</p>"));
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let input: &[u8] = b"short\r\nxxxxxxxxxxxxxxxxxxxx\nlast-without-end";
        let mut r = BufReader::new(input);
        assert!(
            matches!(read_line(&mut r, 10).await.unwrap(), Some(Line::Text(l)) if l == b"short")
        );
        assert!(matches!(
            read_line(&mut r, 10).await.unwrap(),
            Some(Line::TooLong)
        ));
        assert!(read_line(&mut r, 10).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn data_is_dot_unstuffed_and_capped() {
        let input: &[u8] = b"a\r\n..b\r\n.\r\nrest";
        let mut r = BufReader::new(input);
        assert_eq!(
            read_data(&mut r, 100).await.unwrap(),
            Some(Some(b"a\r\n.b\r\n".to_vec()))
        );
        let input: &[u8] = b"0123456789\r\n0123456789\r\n.\r\n";
        let mut r = BufReader::new(input);
        assert_eq!(read_data(&mut r, 15).await.unwrap(), Some(None));
    }
}
