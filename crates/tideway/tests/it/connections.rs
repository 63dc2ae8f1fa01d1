//! The listener under hostile clients, over raw TCP: idle and slowloris connections are
//! closed on time while others keep being served, a stalled body gets 408, the connection cap
//! refuses the extra connection at once and recovers, `Expect: 100-continue` with an oversized
//! `Content-Length` gets 413 before any body is sent, and the client address still reaches
//! key IP allowlists.
//!
//! Timeouts are small (a few hundred milliseconds); every wait is a poll against a generous
//! deadline, so a slow machine makes the tests slower, never wrong.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::support::{Api, Server, initial_admin_key, tideway_ok};

/// Far longer than any timeout under test: reaching it means "never happened".
const DEADLINE: Duration = Duration::from_secs(15);

async fn start(data_dir: &Path, extra: &[&str]) -> (Server, SocketAddr) {
    let server = Server::start(data_dir, extra).await;
    let addr = server
        .url
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a URL with an address: {}", server.url));
    (server, addr)
}

/// Reads until the server closes the connection (EOF or reset); `None` if it is still open at
/// the deadline.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `GET` on a fresh connection that asks to be closed afterwards; the status, if any.
async fn get_once(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: tideway\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let response = read_until_closed(&mut stream, DEADLINE).await?;
    status_of(&response)
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// One keep-alive `GET` on `stream`: reads exactly the response (head and
/// `Content-Length` body) and leaves the connection open; the status and body.
async fn get_keep_alive(stream: &mut TcpStream, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: tideway\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                let status = status_of(&received).expect("a status line");
                let body = String::from_utf8_lossy(&received[end + 4..end + 4 + length]);
                return (status, body.into_owned());
            }
        }
        let n = timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before the whole answer: {received:?}");
        received.extend_from_slice(&buf[..n]);
    }
}

/// SIGTERM drains before the node stops: `/health` answers 503 `draining` for the load
/// balancer, other requests are still served, and a keep-alive connection's next answer says
/// `Connection: close` and closes it, so its client reconnects rather than write into a
/// connection the stopping node closes under it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_keep_alive_connections_before_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (server, addr) = start(&data_dir, &["--shutdown-drain-ms", "4000"]).await;
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_keep_alive(&mut kept, "/health").await.0, 200);
    // A request in progress when the drain begins: its head and half its body now.
    let body = r#"{"attributes": [{"external_id": "u1", "first_name": "Ada"}]}"#;
    let (first_half, second_half) = body.split_at(10);
    let mut in_progress = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /users/track HTTP/1.1\r\nHost: tideway\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{first_half}",
        initial_admin_key(&data_dir),
        body.len()
    );
    in_progress.write_all(head.as_bytes()).await.unwrap();

    server.signal("TERM").await;
    let deadline = Instant::now() + DEADLINE;
    let draining = loop {
        let mut stream = TcpStream::connect(addr).await.expect("still accepting");
        let request = "GET /health HTTP/1.1\r\nHost: tideway\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = read_until_closed(&mut stream, DEADLINE).await.unwrap();
        if status_of(&response) == Some(503) {
            break String::from_utf8_lossy(&response).into_owned();
        }
        assert!(Instant::now() < deadline, "health never said draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(draining.contains(r#""status":"draining""#), "{draining}");

    // The request that was in progress is answered, and told to close its connection too.
    in_progress.write_all(second_half.as_bytes()).await.unwrap();
    let response = read_until_closed(&mut in_progress, DEADLINE)
        .await
        .expect("closed after its answer");
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert_eq!(status_of(&response), Some(201), "{text}");
    assert!(text.contains("connection: close"), "{text}");

    // The kept connection is served once more, told to close, and closed.
    let request = "GET /metrics HTTP/1.1\r\nHost: tideway\r\n\r\n";
    kept.write_all(request.as_bytes()).await.unwrap();
    let response = read_until_closed(&mut kept, DEADLINE)
        .await
        .expect("the server closes the connection after its answer");
    let head = String::from_utf8_lossy(&response).to_lowercase();
    assert_eq!(status_of(&response), Some(200), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(server.wait_exit().await, "exit 0 after the drain");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slowloris_connections_are_closed_while_health_keeps_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, addr) = start(
        &tmp.path().join("data"),
        &["--header-timeout-ms", "300", "--idle-timeout-ms", "500"],
    )
    .await;

    let mut waiting = tokio::task::JoinSet::new();
    // Connections that never send a byte.
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        waiting.spawn(async move { ("idle", read_until_closed(&mut stream, DEADLINE).await) });
    }
    // A keep-alive connection that asked once, then goes quiet.
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get_keep_alive(&mut kept, "/health").await.0, 200);
    waiting.spawn(async move { ("kept alive", read_until_closed(&mut kept, DEADLINE).await) });
    // Half a header, then nothing.
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(b"GET /health HTTP/1.1\r\nHost: tid")
        .await
        .expect("send");
    waiting.spawn(async move {
        (
            "half a header",
            read_until_closed(&mut stalled, DEADLINE).await,
        )
    });
    // A header that never ends, one byte every 100 ms: never idle for 300 ms, yet its head
    // takes longer than the header timeout.
    let trickle = TcpStream::connect(addr).await.expect("connect");
    waiting.spawn(async move {
        let (mut read, mut write) = trickle.into_split();
        let feed = async {
            write
                .write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
                .await
                .ok();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if write.write_all(b"a").await.is_err() {
                    // The server closed the connection.
                    std::future::pending::<()>().await;
                }
            }
        };
        let closed = async {
            let mut buf = [0u8; 1024];
            let deadline = Instant::now() + DEADLINE;
            loop {
                match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
                    Err(_) => return None,
                    Ok(Ok(0) | Err(_)) => return Some(Vec::new()),
                    Ok(Ok(_)) => {}
                }
            }
        };
        tokio::select! {
            () = feed => unreachable!("the feed never ends"),
            result = closed => ("trickling header", result),
        }
    });

    // While they wait to be closed, everyone else is served.
    let mut answered = 0;
    while !waiting.is_empty() {
        assert_eq!(
            get_once(addr, "/health").await,
            Some(200),
            "/health is answered while the idle connections are open"
        );
        answered += 1;
        while let Some(done) = waiting.try_join_next() {
            let (what, result) = done.expect("the waiting task");
            let received = result.unwrap_or_else(|| {
                panic!("the {what} connection is still open {DEADLINE:?} later")
            });
            assert!(
                received.is_empty(),
                "the {what} connection was closed without an answer: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
    }
    assert!(answered > 0);
    assert_eq!(get_once(addr, "/health").await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_gets_408_and_the_connection_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (server, addr) = start(&data_dir, &["--body-timeout-ms", "300"]).await;

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /users/track HTTP/1.1\r\nHost: tideway\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"attributes\": [",
        )
        .await
        .expect("send");
    let response = read_until_closed(&mut stream, DEADLINE)
        .await
        .expect("the stalled request is answered and closed in time");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.to_lowercase().contains("connection: close"), "{text}");
    assert!(text.ends_with(r#"{"message":"Request Timeout"}"#), "{text}");

    // Complete requests are untouched by the body deadline.
    let key = initial_admin_key(&data_dir);
    let (status, body) = Api::new(&server.url)
        .post_ok(
            "/users/track",
            &key,
            &json!({"attributes": [{"external_id": "on-time", "plan": "pro"}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_refuses_the_extra_connection_at_once_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (server, addr) = start(
        &data_dir,
        &["--max-connections", "4", "--idle-timeout-ms", "60000"],
    )
    .await;

    // Four connections, each surely accepted (it has been answered), hold the four slots.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(get_keep_alive(&mut stream, "/health").await.0, 200);
        held.push(stream);
    }
    // The fifth is answered 503 and closed without sending a byte.
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let refused = read_until_closed(&mut extra, DEADLINE)
        .await
        .expect("the extra connection is closed at once, not left waiting");
    let text = String::from_utf8_lossy(&refused);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(
        text.ends_with(r#"{"message":"Service Unavailable"}"#),
        "{text}"
    );
    // The held connections still work.
    assert_eq!(get_keep_alive(&mut held[0], "/health").await.0, 200);

    // Freeing one slot lets a new client in.
    drop(held.pop());
    let deadline = Instant::now() + DEADLINE;
    while get_once(addr, "/health").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "a freed slot never admitted anyone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refusal is counted and the open connections are measured (on a held connection).
    let (status, metrics) = get_keep_alive(&mut held[0], "/metrics").await;
    assert_eq!(status, 200);
    let refused_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tideway_http_connections_refused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no refusal counter in\n{metrics}"));
    assert!(refused_total >= 1.0, "{refused_total}");
    let open = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tideway_http_connections_open "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no open-connections gauge in\n{metrics}"));
    assert!((1.0..=4.0).contains(&open), "{open}");
    // And logged, once, with what to do.
    let log = data_dir.with_extension(format!("log-{}", std::process::id()));
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logs.contains("connection cap reached") && logs.contains("--max-connections"),
        "{logs}"
    );

    // Shutdown does not wait for idle connections (their idle timeout is a minute).
    assert!(server.terminate().await, "exit 0 on SIGTERM");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_continue_with_an_oversized_length_gets_413_before_any_body() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (_server, addr) = start(&data_dir, &["--max-body-bytes", "1000"]).await;

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /users/track HTTP/1.1\r\nHost: tideway\r\nContent-Type: application/json\r\n\
              Content-Length: 1001\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("send");
    let response = read_until_closed(&mut stream, DEADLINE)
        .await
        .expect("answered and closed without the body being sent");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(
        text.ends_with(r#"{"message":"Payload Too Large"}"#),
        "{text}"
    );

    // Within the limit, the client is told to go on and its request is served.
    let key = initial_admin_key(&data_dir);
    let body = json!({"attributes": [{"external_id": "expected", "plan": "pro"}]}).to_string();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /users/track HTTP/1.1\r\nHost: tideway\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut buf = [0u8; 25];
    timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("100 Continue in time")
        .expect("read");
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).await.expect("send");
    let response = read_until_closed(&mut stream, DEADLINE)
        .await
        .expect("answered");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 201 "), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn key_ip_allowlists_see_the_client_address() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (server, _addr) = start(&data_dir, &[]).await;
    let dir = data_dir.to_str().unwrap();
    let key = tideway_ok(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        "--permissions",
        "users.track",
        "--allow-ip",
        "127.0.0.1/32",
    ])
    .await;
    let (status, body) = Api::new(&server.url)
        .post_ok(
            "/users/track",
            key.trim(),
            &json!({"attributes": [{"external_id": "from-loopback"}]}),
        )
        .await;
    assert_eq!(
        status, 201,
        "a loopback client is inside 127.0.0.1/32: {body}"
    );
}
