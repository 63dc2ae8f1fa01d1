//! `tideway sink`: runs `tideway_heap::sink`, a local receiver that behaves like Heap's
//! Currents intake, until SIGINT or SIGTERM. Prints `Tideway sink is listening on http://ADDR`
//! when ready (stdout is an interface, as for `serve`).
//!
//! With `--smtp-listen ADDR` it is a local mailbox too: a `tideway_messaging::smtp_sink`
//! server takes what a Tideway server configured with `--smtp-url smtp://ADDR` sends, so a
//! campaign's emails can be read on one laptop. Then, before the HTTP line, it prints
//! `Tideway SMTP sink is listening on smtp://ADDR`, and serves:
//! - on its page (`GET /`), a section with the latest mails (time, from, to, subject, the
//!   body as text, its links) after the Currents events. The page itself is the Heap sink's
//!   (`tideway_heap::sink`): the section is added to it here, so that crate stays about Heap;
//! - `GET /mail`: the same section alone;
//! - `GET /mails`: the stored mails as JSON (`{"smtp_url", "mails": [{"seq", "received_at",
//!   "from", "to", "subject", "message_id", "headers", "text", "html"}]}`, oldest first).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tideway_heap::sink::{self, Faults, SinkConfig, SinkState};
use tideway_messaging::email::html_to_text;
use tideway_messaging::smtp_sink::{ReceivedMail, SinkMode, SinkOptions, SmtpSink};

/// The prefix of the stdout line that announces the sink.
pub const SINK_LISTENING_LINE: &str = "Tideway sink is listening on ";

/// The prefix of the stdout line that announces the SMTP sink (before [`SINK_LISTENING_LINE`]).
pub const SMTP_LISTENING_LINE: &str = "Tideway SMTP sink is listening on ";

/// Mails shown on the page (all stored ones are in `/mails`).
const MAILS_ON_PAGE: usize = 50;

/// Characters of a mail's text shown on the page.
const TEXT_ON_PAGE: usize = 2_000;

/// The largest page the mail section is added to.
const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

fn rate(raw: &str) -> Result<f64, String> {
    let p: f64 = raw.parse().map_err(|_| "must be a number".to_owned())?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err("must be between 0 and 1".to_owned())
    }
}

/// How the SMTP sink answers recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpModeArg {
    /// Take every message (250)
    Accept,
    /// Refuse every recipient with 550 (Tideway records a bounce)
    RejectPermanent,
    /// Refuse every recipient with 451 (Tideway records a soft bounce and retries)
    RejectTemporary,
}

impl From<SmtpModeArg> for SinkMode {
    fn from(mode: SmtpModeArg) -> SinkMode {
        match mode {
            SmtpModeArg::Accept => SinkMode::Accept,
            SmtpModeArg::RejectPermanent => SinkMode::RejectPermanent,
            SmtpModeArg::RejectTemporary => SinkMode::RejectTemporary,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on
    #[arg(long, env = "TIDEWAY_SINK_LISTEN", default_value = "127.0.0.1:9400")]
    pub listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` (checked before the body is read; 401 otherwise)
    #[arg(long, env = "TIDEWAY_SINK_BEARER_TOKEN")]
    pub bearer_token: Option<String>,
    /// Directory for sink.sqlite (created if missing)
    #[arg(
        long,
        env = "TIDEWAY_SINK_DATA_DIR",
        default_value = "./tideway-sink-data"
    )]
    pub data_dir: PathBuf,
    /// Answer the first N authorised requests with 500
    #[arg(long, default_value_t = 0)]
    pub fail_first: u64,
    /// Answer each authorised request with 500 with this probability (0..=1)
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub fail_rate: f64,
    /// Answer every authorised request with this status code
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=599))]
    pub status: Option<u16>,
    /// Wait this many milliseconds before answering each request
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Answer 400 to a batch holding an event of this type (a "malformed" event)
    #[arg(long)]
    pub reject_event_type: Option<String>,
    /// Answer 413 to a batch of more than N events
    #[arg(long)]
    pub max_events: Option<usize>,
    /// Largest request body accepted (413 above)
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Also receive email: an SMTP server (plain, no STARTTLS) on this address, for a Tideway
    /// server run with --smtp-url smtp://ADDR; mails are kept in memory and shown on the page,
    /// and as JSON at /mails [default: off]
    #[arg(long, env = "TIDEWAY_SINK_SMTP_LISTEN", value_name = "ADDR")]
    pub smtp_listen: Option<SocketAddr>,
    /// Mails the SMTP sink keeps (the oldest are dropped first)
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub smtp_keep: u64,
    /// How the SMTP sink answers recipients
    #[arg(long, value_enum, default_value_t = SmtpModeArg::Accept)]
    pub smtp_mode: SmtpModeArg,
}

pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let config = SinkConfig {
        listen: args.listen,
        bearer_token: args.bearer_token,
        data_dir: args.data_dir.clone(),
        max_body_bytes: args.max_body_bytes,
        faults: Faults {
            fail_first: args.fail_first,
            fail_rate: args.fail_rate,
            status: args.status,
            delay_ms: args.delay_ms,
            reject_event_type: args.reject_event_type,
            max_events: args.max_events,
        },
    };
    let smtp = match args.smtp_listen {
        None => None,
        Some(addr) => {
            let options = SinkOptions {
                capacity: usize::try_from(args.smtp_keep).unwrap_or(usize::MAX),
                ..SinkOptions::default()
            };
            let smtp = SmtpSink::start_with(addr, options)
                .await
                .with_context(|| format!("cannot listen for SMTP on {addr}"))?;
            smtp.set_mode(args.smtp_mode.into());
            Some(smtp)
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr().context("the listening address")?;
    let state = SinkState::open(config).context("cannot open the sink's storage")?;
    let mut app = sink::router(state);
    if let Some(smtp) = &smtp {
        app = app
            .merge(mail_routes(smtp.clone()))
            .layer(middleware::from_fn_with_state(
                smtp.clone(),
                add_mail_section,
            ));
    }
    {
        let mut out = std::io::stdout().lock();
        if let Some(smtp) = &smtp {
            let _ = writeln!(out, "{SMTP_LISTENING_LINE}{}", smtp.url());
        }
        let _ = writeln!(out, "{SINK_LISTENING_LINE}http://{addr}");
        let _ = out.flush();
    }
    tracing::info!(
        %addr,
        smtp = ?smtp.as_ref().map(SmtpSink::addr),
        data_dir = %args.data_dir.display(),
        "sink ready"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
        .context("the sink failed")?;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn mail_routes(smtp: SmtpSink) -> Router {
    Router::new()
        .route("/mails", get(mails_json))
        .route("/mail", get(mail_page))
        .with_state(smtp)
}

async fn mails_json(State(smtp): State<SmtpSink>) -> Response {
    let mails: Vec<Value> = smtp.messages().iter().map(mail_json).collect();
    let body = json!({ "smtp_url": smtp.url(), "mails": mails });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn mail_json(mail: &ReceivedMail) -> Value {
    json!({
        "seq": mail.seq,
        "received_at": rfc3339(mail),
        "from": mail.from,
        "to": mail.to,
        "subject": mail.subject(),
        "message_id": mail.header("Message-ID"),
        "headers": mail.headers(),
        "text": mail.text(),
        "html": mail.html(),
    })
}

fn rfc3339(mail: &ReceivedMail) -> String {
    mail.received_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The receipt time to the second, as the Heap sink's page shows its events'.
fn when(mail: &ReceivedMail) -> String {
    let t = mail.received_at;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

async fn mail_page(State(smtp): State<SmtpSink>) -> Response {
    let mut page = Html::default();
    page.raw("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tideway sink: mail</title>");
    page.raw(STYLE);
    page.raw("</head><body><h1>tideway sink: mail</h1>");
    mail_section(&mut page, &smtp);
    page.raw("</body></html>");
    html_response(page.0)
}

/// Adds the mail section to the Heap sink's page (`GET /`), before its `</body>`.
async fn add_mail_section(State(smtp): State<SmtpSink>, request: Request, next: Next) -> Response {
    let is_page = request.method() == Method::GET && request.uri().path() == "/";
    let response = next.run(request).await;
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if !is_page || response.status() != StatusCode::OK || !is_html {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_PAGE_BYTES).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the page is too large").into_response();
    };
    let page = String::from_utf8_lossy(&bytes);
    let mut section = Html::default();
    section.raw(STYLE);
    mail_section(&mut section, &smtp);
    let combined = match page.rfind("</body>") {
        Some(at) => format!("{}{}{}", &page[..at], section.0, &page[at..]),
        None => format!("{page}{}", section.0),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(combined))
}

fn html_response(page: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        page,
    )
        .into_response()
}

const STYLE: &str = "<style>.mail td{vertical-align:top}.mail pre{white-space:pre-wrap;max-width:60rem;margin:0}</style>";

/// The mail section: a heading with the SMTP address and counts, then the latest mails,
/// newest first. Every value from a mail is escaped.
fn mail_section(out: &mut Html, smtp: &SmtpSink) {
    let mails = smtp.messages();
    out.raw("<section class=\"mail\"><h2>Mail</h2><p>SMTP sink at <code>");
    out.text(&smtp.url());
    out.raw("</code>: ");
    out.text(&mails.len().to_string());
    out.raw(" stored (JSON at <a href=\"/mails\">/mails</a>).</p>");
    if mails.is_empty() {
        out.raw("</section>");
        return;
    }
    out.raw("<table><tr><th>received</th><th>from</th><th>to</th><th>subject</th><th>body</th><th>links</th></tr>");
    for mail in mails.iter().rev().take(MAILS_ON_PAGE) {
        let html = mail.html();
        let text = mail
            .text()
            .or_else(|| html.as_deref().map(html_to_text))
            .unwrap_or_default();
        out.raw("<tr><td>");
        out.text(&when(mail));
        out.raw("</td><td><code>");
        out.text(&mail.from);
        out.raw("</code></td><td><code>");
        out.text(&mail.to.join(", "));
        out.raw("</code></td><td>");
        out.text(&mail.subject().unwrap_or_default());
        out.raw("</td><td><pre>");
        out.text(&text.chars().take(TEXT_ON_PAGE).collect::<String>());
        out.raw("</pre></td><td>");
        for link in html.as_deref().map(links).unwrap_or_default() {
            // Only web links are clickable: a `javascript:` URL from a mail is shown, not run.
            if link.starts_with("http://") || link.starts_with("https://") {
                out.raw("<a href=\"");
                out.text(&link);
                out.raw("\">");
                out.text(&link);
                out.raw("</a><br>");
            } else {
                out.raw("<code>");
                out.text(&link);
                out.raw("</code><br>");
            }
        }
        out.raw("</td></tr>");
    }
    out.raw("</table></section>");
}

/// The `href` and `src` values of an HTML body (links and the open pixel), in order, with
/// `&amp;` decoded.
fn links(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    let lower = html.to_ascii_lowercase();
    for attr in ["href=", "src="] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(attr) {
            let start = from + i + attr.len();
            from = start;
            let rest = &html[start..];
            let value = match rest.chars().next() {
                Some(q @ ('"' | '\'')) => rest[1..].split(q).next(),
                _ => rest.split([' ', '>']).next(),
            };
            if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
                found.push((start, v.replace("&amp;", "&")));
            }
        }
    }
    found.sort_by_key(|(at, _)| *at);
    found.into_iter().map(|(_, v)| v).collect()
}

/// HTML written from fixed markup ([`Html::raw`], only string literals of this file) and
/// escaped text ([`Html::text`], everything that comes from a mail or the network).
#[derive(Default)]
struct Html(String);

impl Html {
    fn raw(&mut self, markup: &'static str) {
        self.0.push_str(markup);
    }

    fn text(&mut self, text: &str) {
        for c in text.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        let mut h = Html::default();
        h.raw("<td>");
        h.text("<script>alert('x')</script> & \"q\"");
        assert_eq!(
            h.0,
            "<td>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn links_are_found_in_order() {
        assert_eq!(
            links(
                "<a HREF=\"https://a/?x=1&amp;y=2\">a</a><img src='https://p/o.gif'><a href=javascript:alert(1)>j</a>"
            ),
            vec![
                "https://a/?x=1&y=2".to_owned(),
                "https://p/o.gif".to_owned(),
                "javascript:alert(1)".to_owned()
            ]
        );
    }
}
