//! The two channels against real local servers: the webhook sender against an axum receiver
//! on loopback, the SMTP sender against the crate's own `SmtpSink` (and the sink against a
//! raw TCP client, for the protocol details lettre does not exercise).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method as HttpMethod, StatusCode};
use axum::routing::any;
use tideway_core::egress::EgressPolicy;
use tideway_messaging::email::{
    EmailOutcome, OutgoingEmail, SmtpSecurity, SmtpSender, SmtpUrl, email_retry_delay,
};
use tideway_messaging::smtp_sink::{SinkMode, SinkOptions, SmtpSink};
use tideway_messaging::webhook::{
    AttachmentError, MAX_ATTEMPTS, Method, RESPONSE_EXCERPT_BYTES, WebhookOutcome, WebhookRequest,
    WebhookSender, retry_delay,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    method: HttpMethod,
    headers: HeaderMap,
    body: String,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// `/status/{code}` answers `code` (with a short body); `/big` answers 500 with 5000 bytes;
/// `/slow` answers after 5 s.
async fn receiver() -> (Receiver, String) {
    async fn status(
        State(r): State<Receiver>,
        Path(code): Path<u16>,
        method: HttpMethod,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        r.hits.lock().unwrap().push(Hit {
            method,
            headers,
            body,
        });
        (
            StatusCode::from_u16(code).unwrap(),
            format!("answer {code}"),
        )
    }
    let r = Receiver::default();
    let app = axum::Router::new()
        .route("/status/{code}", any(status))
        .route(
            "/big",
            any(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(5000)) }),
        )
        .route(
            "/slow",
            any(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (r, format!("http://{addr}"))
}

fn request(url: String) -> WebhookRequest {
    WebhookRequest {
        url,
        method: Method::Post,
        headers: vec![("X-Campaign".into(), "spring".into())],
        body: r#"{"user":"u1"}"#.into(),
        idempotency_key: "tw-1-42".into(),
    }
}

fn sender(policy: EgressPolicy) -> WebhookSender {
    WebhookSender::new(policy, Duration::from_secs(5)).expect("webhook client")
}

#[tokio::test]
async fn a_2xx_is_delivered_with_the_idempotency_key() {
    let (r, base) = receiver().await;
    let attempt = sender(EgressPolicy::default())
        .send(&request(format!("{base}/status/200")))
        .await;
    assert_eq!(attempt.outcome, WebhookOutcome::Delivered);
    assert_eq!(attempt.status, Some(200));
    assert_eq!(attempt.raw_response.as_deref(), Some("answer 200"));
    assert_eq!(attempt.content_length, Some(10));
    let hits = r.hits();
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert_eq!(hit.method, HttpMethod::POST);
    assert_eq!(hit.headers["idempotency-key"], "tw-1-42");
    assert_eq!(hit.headers["x-campaign"], "spring");
    assert_eq!(hit.headers["content-type"], "application/json");
    assert_eq!(hit.body, r#"{"user":"u1"}"#);

    // GET sends no body; PUT and DELETE do.
    let s = sender(EgressPolicy::default());
    for (method, expected) in [
        (Method::Get, HttpMethod::GET),
        (Method::Put, HttpMethod::PUT),
        (Method::Delete, HttpMethod::DELETE),
    ] {
        let mut req = request(format!("{base}/status/204"));
        req.method = method;
        assert_eq!(s.send(&req).await.outcome, WebhookOutcome::Delivered);
        let hit = r.hits().pop().unwrap();
        assert_eq!(hit.method, expected);
        assert_eq!(hit.body.is_empty(), method == Method::Get, "{method:?}");
    }
}

#[tokio::test]
async fn statuses_worth_retrying_are_retried_and_the_rest_fail() {
    let (r, base) = receiver().await;
    let s = sender(EgressPolicy::default());
    for code in [408, 429, 500, 503] {
        let attempt = s.send(&request(format!("{base}/status/{code}"))).await;
        assert!(
            matches!(attempt.outcome, WebhookOutcome::Retry { .. }),
            "{code}: {attempt:?}"
        );
        assert_eq!(attempt.status, Some(code));
    }
    for code in [302, 400, 404, 410] {
        let attempt = s.send(&request(format!("{base}/status/{code}"))).await;
        assert!(
            matches!(attempt.outcome, WebhookOutcome::Failed { .. }),
            "{code}: {attempt:?}"
        );
        assert_eq!(attempt.status, Some(code));
    }
    assert_eq!(
        r.hits().len(),
        8,
        "one request each, redirects not followed"
    );
    let big = s.send(&request(format!("{base}/big"))).await;
    assert!(matches!(big.outcome, WebhookOutcome::Retry { .. }));
    assert_eq!(
        big.raw_response.map(|b| b.len()),
        Some(RESPONSE_EXCERPT_BYTES)
    );
    assert_eq!(big.content_length, Some(5000));
}

#[tokio::test]
async fn unreachable_and_slow_receivers_are_retried() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let attempt = sender(EgressPolicy::default())
        .send(&request(format!("http://{closed}/hook")))
        .await;
    assert!(
        matches!(&attempt.outcome, WebhookOutcome::Retry { reason } if reason.contains("refused")),
        "{attempt:?}"
    );
    assert_eq!(attempt.status, None);

    let (_r, base) = receiver().await;
    let quick = WebhookSender::new(EgressPolicy::default(), Duration::from_millis(300)).unwrap();
    let attempt = quick.send(&request(format!("{base}/slow"))).await;
    assert_eq!(
        attempt.outcome,
        WebhookOutcome::Retry {
            reason: "timed out".into()
        }
    );
    assert!(attempt.duration_ms >= 300, "{attempt:?}");
}

#[tokio::test]
async fn urls_the_egress_policy_refuses_are_blocked_before_any_request() {
    let (r, base) = receiver().await;
    let strict = sender(EgressPolicy::DENY_PRIVATE);
    let attempt = strict.send(&request(format!("{base}/status/200"))).await;
    assert!(
        matches!(&attempt.outcome, WebhookOutcome::Blocked { abort_type: "blocked_webhook_url", reason } if reason.contains("loopback")),
        "{attempt:?}"
    );
    // A name is judged by the addresses it resolves to, at connect time.
    let port = base.rsplit(':').next().unwrap();
    let attempt = strict
        .send(&request(format!("http://localhost:{port}/status/200")))
        .await;
    assert!(
        matches!(
            attempt.outcome,
            WebhookOutcome::Blocked {
                abort_type: "blocked_webhook_url",
                ..
            }
        ),
        "{attempt:?}"
    );
    assert!(r.hits().is_empty());

    let open = sender(EgressPolicy::default());
    for (url, code) in [
        (
            "http://169.254.169.254/latest/meta-data",
            "blocked_webhook_url",
        ),
        ("http://metadata.google.internal/", "blocked_webhook_url"),
        ("http://", "missing_hostname"),
        ("ftp://example.com/x", "invalid_webhook_url"),
        ("not a url", "invalid_webhook_url"),
    ] {
        let attempt = open.send(&request(url.to_owned())).await;
        assert!(
            matches!(attempt.outcome, WebhookOutcome::Blocked { abort_type, .. } if abort_type == code),
            "{url}: {attempt:?}"
        );
    }
    let mut bad = request(format!("{base}/status/200"));
    bad.headers
        .push(("X-Evil".into(), "a\r\nInjected: 1".into()));
    assert!(matches!(
        open.send(&bad).await.outcome,
        WebhookOutcome::Blocked {
            abort_type: "invalid_webhook_header",
            ..
        }
    ));
    assert!(r.hits().is_empty());
}

/// An attachment is the file's bytes and type; a 5xx or an unreachable server is worth a
/// retry; a 4xx, a refused address or a file over the limit never will be.
#[tokio::test]
async fn attachments_are_fetched_within_the_limit_and_the_policy() {
    let (_r, base) = receiver().await;
    let s = sender(EgressPolicy::default());
    let (bytes, content_type) = s
        .fetch_attachment(&format!("{base}/status/200"), 1024)
        .await
        .expect("fetched");
    assert_eq!(bytes, b"answer 200");
    assert_eq!(content_type.as_deref(), Some("text/plain; charset=utf-8"));
    for (path, retry) in [
        ("/status/503", true),
        ("/status/404", false),
        ("/big", true),
    ] {
        let err = s
            .fetch_attachment(&format!("{base}{path}"), 1024)
            .await
            .expect_err(path);
        assert_eq!(
            matches!(err, AttachmentError::Unreachable(_)),
            retry,
            "{path}: {err:?}"
        );
    }
    // /status/200 is 10 bytes: over a limit of 5, refused.
    let err = s
        .fetch_attachment(&format!("{base}/status/200"), 5)
        .await
        .expect_err("over the limit");
    assert!(
        matches!(err, AttachmentError::Refused(ref why) if why.contains("over 5 bytes")),
        "{err:?}"
    );
    let strict = sender(EgressPolicy {
        private: tideway_core::egress::PrivateEndpoints::Deny,
    });
    let err = strict
        .fetch_attachment(&format!("{base}/status/200"), 1024)
        .await
        .expect_err("loopback refused");
    assert!(matches!(err, AttachmentError::Refused(_)), "{err:?}");
}

#[test]
fn five_webhook_attempts_fit_in_thirty_minutes_whatever_the_jitter() {
    let timeout = Duration::from_secs(90);
    for step in 0..=100 {
        let jitter = f64::from(step) / 100.0 * 0.999_999;
        let waits: Duration = (1..MAX_ATTEMPTS)
            .map(|retry| retry_delay(retry, jitter))
            .sum();
        let worst = waits + timeout * MAX_ATTEMPTS;
        assert!(
            worst < Duration::from_secs(30 * 60),
            "jitter {jitter}: {worst:?}"
        );
        // Backoff grows.
        for retry in 1..MAX_ATTEMPTS - 1 {
            assert!(retry_delay(retry + 1, jitter) > retry_delay(retry, jitter));
        }
    }
    for retry in 1..10 {
        assert!(email_retry_delay(retry + 1, 0.5) >= email_retry_delay(retry, 0.5));
    }
}

fn email(to: &str) -> OutgoingEmail {
    // Long lines and non-ASCII text: lettre picks quoted-printable or base64 for them.
    let html = format!(
        "<html><body><p>Grüße, Ada — {}</p><a href=\"https://example.com/u?x=1&amp;y=2\">Upgrade</a></body></html>",
        "lorem ipsum ".repeat(20)
    );
    OutgoingEmail {
        from: "Tideway Team <team@tideway.example>".into(),
        to: to.into(),
        reply_to: Some("help@tideway.example".into()),
        subject: "Héllo Ada, your plan".into(),
        text: Some(tideway_messaging::email::html_to_text(&html)),
        html: Some(html),
        headers: vec![("X-Campaign".into(), "spring".into())],
        message_id: "tw-1-42@tideway".into(),
        list_unsubscribe: Some("https://t.example/t/u/abc.def".into()),
        attachments: Vec::new(),
    }
}

async fn sink_and_sender() -> (SmtpSink, SmtpSender) {
    let sink = SmtpSink::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the sink");
    let url = SmtpUrl::parse(&sink.url()).expect("the sink's URL");
    assert_eq!(url.security(), SmtpSecurity::Opportunistic);
    (sink, SmtpSender::new(&url).expect("SMTP client"))
}

#[tokio::test]
async fn email_reaches_the_sink_and_reads_back() {
    let (sink, smtp) = sink_and_sender().await;
    let sent = email("ada@example.com");
    let attempt = smtp.send(&sent).await;
    assert_eq!(attempt.outcome, EmailOutcome::Accepted, "{attempt:?}");
    assert_eq!(attempt.code, Some(250));
    let mails = sink.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "team@tideway.example");
    assert_eq!(mail.to, vec!["ada@example.com".to_owned()]);
    assert_eq!(
        mail.header("Message-ID").as_deref(),
        Some("<tw-1-42@tideway>")
    );
    assert_eq!(
        mail.header("List-Unsubscribe").as_deref(),
        Some("<https://t.example/t/u/abc.def>")
    );
    assert_eq!(
        mail.header("list-unsubscribe-post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    assert_eq!(mail.subject().as_deref(), Some("Héllo Ada, your plan"));
    assert_eq!(
        mail.header("Reply-To").as_deref(),
        Some("help@tideway.example")
    );
    assert_eq!(mail.header("X-Campaign").as_deref(), Some("spring"));
    assert!(
        mail.header("Content-Type")
            .is_some_and(|c| c.starts_with("multipart/alternative")),
        "{}",
        mail.data
    );
    assert_eq!(mail.html(), sent.html);
    assert_eq!(mail.text(), sent.text);
    assert!(
        mail.text()
            .unwrap()
            .contains("Upgrade (https://example.com/u?x=1&y=2)")
    );
}

#[tokio::test]
async fn refusals_are_bounces_or_deferrals() {
    let (sink, smtp) = sink_and_sender().await;
    sink.set_mode(SinkMode::RejectPermanent);
    let attempt = smtp.send(&email("ada@example.com")).await;
    assert_eq!(attempt.outcome, EmailOutcome::Permanent, "{attempt:?}");
    assert_eq!(attempt.code, Some(550));
    assert!(attempt.reply.contains("mailbox unavailable"), "{attempt:?}");

    sink.set_mode(SinkMode::RejectTemporary);
    let attempt = smtp.send(&email("ada@example.com")).await;
    assert_eq!(attempt.outcome, EmailOutcome::Temporary, "{attempt:?}");
    assert_eq!(attempt.code, Some(451));

    sink.set_mode(SinkMode::Accept);
    assert_eq!(
        smtp.send(&email("ada@example.com")).await.outcome,
        EmailOutcome::Accepted
    );
    let mails = sink.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1, "refused messages are not stored");
    assert_eq!(mails[0].seq, 1);
}

#[tokio::test]
async fn unusable_addresses_and_absent_servers() {
    let (sink, smtp) = sink_and_sender().await;
    let attempt = smtp.send(&email("not an address")).await;
    assert_eq!(
        attempt.outcome,
        EmailOutcome::Invalid {
            abort_type: "invalid_email_address"
        }
    );
    let mut bad_from = email("ada@example.com");
    bad_from.from = "Team <nope>".into();
    assert!(matches!(
        smtp.send(&bad_from).await.outcome,
        EmailOutcome::Invalid { .. }
    ));
    assert!(sink.messages().is_empty());

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let nowhere = SmtpSender::new(&SmtpUrl::parse(&format!("smtp://{closed}")).unwrap()).unwrap();
    let attempt = nowhere.send(&email("ada@example.com")).await;
    assert_eq!(attempt.outcome, EmailOutcome::Temporary, "{attempt:?}");
    assert_eq!(attempt.code, None);
}

#[tokio::test]
async fn the_sink_keeps_only_its_latest_messages() {
    let sink = SmtpSink::start_with(
        "127.0.0.1:0".parse().unwrap(),
        SinkOptions {
            capacity: 2,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let smtp = SmtpSender::new(&SmtpUrl::parse(&sink.url()).unwrap()).unwrap();
    for n in 0..3 {
        let mut e = email(&format!("u{n}@example.com"));
        e.message_id = format!("m{n}@tideway");
        assert_eq!(smtp.send(&e).await.outcome, EmailOutcome::Accepted);
    }
    let mails = sink.messages();
    assert_eq!(mails.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(mails[1].to, vec!["u2@example.com".to_owned()]);
    sink.clear();
    assert!(sink.wait_for(1, Duration::from_millis(50)).await.is_empty());
}

/// A raw SMTP client: sends one line, reads one (possibly multi-line) reply.
struct Raw {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> (Raw, String) {
        let (r, w) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        let mut raw = Raw {
            r: BufReader::new(r),
            w,
        };
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).await.unwrap();
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    async fn send(&mut self, line: &str) -> String {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }
}

#[tokio::test]
async fn the_sink_speaks_smtp() {
    let sink = SmtpSink::start_with(
        "127.0.0.1:0".parse().unwrap(),
        SinkOptions {
            capacity: 10,
            max_message_bytes: 100,
        },
    )
    .await
    .unwrap();
    let (mut c, greeting) = Raw::connect(sink.addr()).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = c.send("EHLO client.example").await;
    assert!(
        ehlo.contains("250-8BITMIME") && ehlo.contains("SIZE 100"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(c.send("DATA").await.starts_with("503"));
    assert!(c.send("RCPT TO:<a@b.c>").await.starts_with("503"));
    assert!(
        c.send("MAIL FROM:<s@x.y> SIZE=1000")
            .await
            .starts_with("552")
    );
    assert!(
        c.send("mail from:<s@x.y> BODY=8BITMIME")
            .await
            .starts_with("250")
    );
    assert!(c.send("MAIL FROM:<s@x.y>").await.starts_with("503"));
    assert!(c.send("RCPT TO:<a@b.c>").await.starts_with("250"));
    assert!(c.send("RCPT TO:<d@e.f>").await.starts_with("250"));
    assert!(c.send("DATA").await.starts_with("354"));
    c.w.write_all(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\n")
        .await
        .unwrap();
    let queued = c.reply().await;
    assert!(queued.starts_with("250"), "{queued}");
    // Too large: refused after DATA, and the session goes on.
    assert!(c.send("MAIL FROM:<>").await.starts_with("250"));
    assert!(c.send("RCPT TO:<a@b.c>").await.starts_with("250"));
    assert!(c.send("DATA").await.starts_with("354"));
    c.w.write_all(format!("{}\r\n.\r\n", "x".repeat(200)).as_bytes())
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("552"));
    assert!(c.send("RSET").await.starts_with("250"));
    assert!(c.send("NOOP").await.starts_with("250"));
    assert!(c.send("STARTTLS").await.starts_with("502"));
    assert!(c.send("BOGUS").await.starts_with("500"));
    assert!(c.send("QUIT").await.starts_with("221"));

    let mails = sink.messages();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].from, "s@x.y");
    assert_eq!(mails[0].to, vec!["a@b.c".to_owned(), "d@e.f".to_owned()]);
    assert_eq!(mails[0].data, "Subject: dots\r\n\r\n.leading dot\r\n");
    assert_eq!(mails[0].text().as_deref(), Some(".leading dot"));
}
