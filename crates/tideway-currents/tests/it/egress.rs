//! The egress policy on the wire: names judged by what they resolve to when connecting (DNS
//! rebinding), redirects judged hop by hop, and a delivery that never reaches a refused
//! address. The receivers are real local HTTP servers that count what reaches them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tideway_core::currents_store::CurrentStatus;
use tideway_core::egress::{EgressPolicy, Rule};
use tideway_currents::egress;
use tideway_currents::spec::{check_egress, parse_spec};
use tokio::sync::oneshot;

use crate::{Harness, fast_config, serve_on_loopback, spec};

/// A receiver that answers every request the same way and counts them.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    /// Answers `status`, with `Location: location` when given.
    async fn start(status: u16, location: Option<&str>) -> Receiver {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let location = location.map(|l| HeaderValue::from_str(l).unwrap());
        let app = axum::Router::new().fallback(move || {
            let counted = Arc::clone(&counted);
            let location = location.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut r: Response = (StatusCode::from_u16(status).unwrap(), "{}").into_response();
                if let Some(l) = location {
                    r.headers_mut().insert(header::LOCATION, l);
                }
                r
            }
        });
        let (addr, stop) = serve_on_loopback(app).await;
        Receiver {
            addr,
            hits,
            _stop: stop,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_a_refused_address_is_refused_when_connecting() {
    let receiver = Receiver::start(200, None).await;
    let endpoint = format!("http://localhost:{}/currents", receiver.addr.port());
    // The definition passes: `localhost` is a name, judged by what it resolves to.
    check_egress(
        &parse_spec(&spec(&endpoint)).unwrap(),
        &EgressPolicy::DENY_PRIVATE,
    )
    .unwrap();

    let mut config = fast_config();
    config.egress = EgressPolicy::DENY_PRIVATE;
    let h = Harness::with_config(config).await;
    let c = h.current(spec(&endpoint)).await;
    h.append(3).await;
    let c = h
        .wait(&c, "deliveries refused at connect time", |c| {
            c.counters.retried >= 3 && c.last_error.is_some()
        })
        .await;
    let message = c.last_error.clone().unwrap().message;
    assert!(
        message.contains("refused by egress policy: loopback address"),
        "{message}"
    );
    assert_eq!((c.status, c.counters.delivered), (CurrentStatus::Active, 0));
    let report = h.exporter().send_test(&c).await.unwrap();
    assert!(
        report
            .message
            .starts_with("refused by egress policy: loopback address"),
        "{report:?}"
    );
    assert_eq!((report.status, report.accepted), (None, false));
    assert_eq!(receiver.hits(), 0, "nothing reached the receiver");

    // The same name and receiver with private addresses allowed: delivered, so it was the
    // policy that kept the requests away.
    let h2 = Harness::new().await;
    let c2 = h2.current(spec(&endpoint)).await;
    h2.append(3).await;
    h2.wait(&c2, "delivered by name", |c| c.counters.delivered == 3)
        .await;
    assert!(receiver.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_address_the_policy_refuses_is_never_requested() {
    let receiver = Receiver::start(200, None).await;
    let endpoint = format!("http://127.0.0.1:{}/currents", receiver.addr.port());
    let mut config = fast_config();
    config.egress = EgressPolicy::DENY_PRIVATE;
    let h = Harness::with_config(config).await;
    // Stored before the setting was turned on (the store does not judge URLs).
    let c = h.current(spec(&endpoint)).await;
    h.append(2).await;
    let c = h
        .wait(&c, "the refusal recorded", |c| c.last_error.is_some())
        .await;
    let message = c.last_error.clone().unwrap().message;
    assert!(
        message.contains("refused by egress policy: loopback address 127.0.0.1"),
        "{message}"
    );
    let report = h.exporter().send_test(&c).await.unwrap();
    assert_eq!(report.events, 0);
    assert!(report.message.starts_with("refused by egress policy"));
    assert_eq!(receiver.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_judged_hop_by_hop() {
    let allowed = Receiver::start(204, None).await;
    let client = egress::client_builder(EgressPolicy::default())
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for (target, rule) in [
        ("http://169.254.169.254/latest/meta-data/", Rule::Metadata),
        ("http://2852039166:8080/", Rule::Metadata),
        ("http://0251.0376.0251.0376/", Rule::Metadata),
        ("http://[::ffff:169.254.169.254]/", Rule::Metadata),
        ("http://[fd00:ec2::254]/", Rule::Metadata),
        ("http://169.254.1.1:9/x", Rule::LinkLocal),
        (
            "http://metadata.google.internal./computeMetadata/v1/",
            Rule::Metadata,
        ),
    ] {
        let redirecting = Receiver::start(307, Some(target)).await;
        let err = client
            .post(format!("http://{}/hook", redirecting.addr))
            .body("{}")
            .send()
            .await
            .expect_err(target);
        let refusal = egress::refusal(&err).unwrap_or_else(|| panic!("{target}: {err:?}"));
        assert_eq!(refusal.rule, rule, "{target}");
        assert!(
            egress::reason(&err).starts_with("refused by egress policy"),
            "{target}: {}",
            egress::reason(&err)
        );
        assert_eq!(redirecting.hits(), 1);
    }
    // An allowed target is followed.
    let redirecting = Receiver::start(307, Some(&format!("http://{}/next", allowed.addr))).await;
    let r = client
        .post(format!("http://{}/hook", redirecting.addr))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), allowed.hits()), (204, 1));

    // A Current never follows a redirect, allowed or not: the 307 is its answer (retried).
    let redirecting = Receiver::start(307, Some(&format!("http://{}/next", allowed.addr))).await;
    let h = Harness::new().await;
    let c = h
        .current(spec(&format!("http://{}/c", redirecting.addr)))
        .await;
    h.append(1).await;
    let c = h
        .wait(&c, "a 307 retried", |c| c.counters.retried >= 1)
        .await;
    assert_eq!(c.last_error.unwrap().status, Some(307));
    assert_eq!(allowed.hits(), 1, "the Current's redirect was not followed");
}
