//! The integration guide, walked in a real browser: headless Chromium driven through
//! chromedriver (`fantoccini`) against the real `tideway serve` and `tideway sink`.
//!
//! Sign in with the first start's `admin` password → generate a data import key on
//! Technology Partners › Heap → Heap imports a cohort through the partner API with it → the
//! cohort is listed in Cohorts → a segment "Heap Cohorts includes <that cohort>" shows its size
//! live and is saved → a Heap Export Current to the local sink is created and launched, and
//! the events arrive there → a REST API key is created on the Developer Console and used → a
//! Canvas is launched from the Canvas list and entered through the API, its step view shows
//! the user waiting in its delay and its message sent → a new Canvas is built in the Canvas
//! editor's fields (a step added by posting the form back and wired after the first), saved
//! and drawn as a graph → the user's lookup page lists the first Canvas's message.
//!
//! A screenshot of each page is saved under the test's temporary directory (and copied to
//! `$TIDEWAY_DASHBOARD_SCREENSHOTS` when set, which is how `docs/` got its pictures).
//! `scripts/test` installs `chromium` and `chromium-driver`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::{Api, Server, Sink, initial_admin_key};

const DEADLINE: Duration = Duration::from_secs(20);

/// chromedriver in its own process group, killed with everything it started (Chromium) when
/// dropped, however the test ends.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

impl Driver {
    async fn start(log: &Path) -> Driver {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let log = std::fs::File::create(log).expect("chromedriver log");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver (apt-get install chromium chromium-driver)");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.get(format!("{}/status", driver.url)).send().await
                && r.status().is_success()
            {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn browser(&self, profile: &Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        // Two rustls crypto providers are linked (fantoccini's, reqwest's): name one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// Saves screenshots in order, named after the page.
struct Shots {
    dir: PathBuf,
    copy_to: Option<PathBuf>,
    n: usize,
}

impl Shots {
    async fn take(&mut self, c: &Client, name: &str) {
        self.n += 1;
        let png = c.screenshot().await.expect("a screenshot");
        let file = format!("{:02}-{name}.png", self.n);
        std::fs::write(self.dir.join(&file), &png).expect("save the screenshot");
        if let Some(dir) = &self.copy_to {
            std::fs::write(dir.join(&file), &png).expect("copy the screenshot");
        }
    }
}

async fn css(c: &Client, selector: &str) -> fantoccini::elements::Element {
    match c
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(selector))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let at = c.current_url().await.map(|u| u.to_string());
            let page = c.source().await.unwrap_or_default();
            panic!("no {selector} on {at:?}: {e}\n{page}")
        }
    }
}

async fn link(c: &Client, text: &str) {
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::LinkText(text))
        .await
        .unwrap_or_else(|e| panic!("no link {text:?}: {e}"))
        .click()
        .await
        .unwrap();
}

/// The text of `selector`, looked up again while the page is being replaced (a click that
/// navigates leaves the old element stale).
async fn text_of(c: &Client, selector: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match css(c, selector).await.text().await {
            Ok(text) => return text,
            Err(e) => assert!(Instant::now() < deadline, "{selector}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the page's heading is `title` (after a click that navigates).
async fn wait_page(c: &Client, title: &str) {
    wait_text(c, "main h1", false, |t| t == title).await;
}

/// Waits until `selector`'s text satisfies `ok`, reloading the page between looks when
/// `reload`; returns the text.
async fn wait_text(c: &Client, selector: &str, reload: bool, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = text_of(c, selector).await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{selector} stayed {text:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reload {
            c.refresh().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sink = Sink::start(&tmp.path().join("sink"), &["--bearer-token", "s3cret"]).await;
    let server = Server::start(&data, &[]).await;
    let password = std::fs::read_to_string(data.join("initial-admin-password"))
        .expect("the first start saved the dashboard password")
        .trim()
        .to_owned();
    assert!(
        server
            .preamble
            .iter()
            .any(|l| l.contains("Dashboard user 'admin'") && l.contains(&password)),
        "{:?}",
        server.preamble
    );
    let api = Api::new(&server.url);
    let admin_key = initial_admin_key(&data);
    let (status, _) = api
        .post_ok(
            "/users/track",
            &admin_key,
            &json!({"attributes": [{"external_id": "u1"}, {"external_id": "u2"}, {"external_id": "u3"}]}),
        )
        .await;
    assert_eq!(status, 201);

    let screens = tmp.path().join("screenshots");
    std::fs::create_dir_all(&screens).unwrap();
    let mut shots = Shots {
        dir: screens,
        copy_to: std::env::var_os("TIDEWAY_DASHBOARD_SCREENSHOTS").map(PathBuf::from),
        n: 0,
    };
    let driver = Driver::start(&tmp.path().join("chromedriver.log")).await;
    let c = driver.browser(&tmp.path().join("chromium-profile")).await;

    // Sign in.
    c.goto(&format!("{}/dashboard/", server.url)).await.unwrap();
    css(&c, "#username").await.send_keys("admin").await.unwrap();
    css(&c, "#password")
        .await
        .send_keys(&password)
        .await
        .unwrap();
    shots.take(&c, "sign-in").await;
    css(&c, "button[type=submit]").await.click().await.unwrap();
    wait_page(&c, "Home").await;
    shots.take(&c, "home").await;

    // Technology Partners › Heap: generate a data import key.
    link(&c, "Technology Partners › Heap").await;
    wait_page(&c, "Technology Partners › Heap").await;
    let endpoint = text_of(&c, "#rest-endpoint").await;
    assert_eq!(endpoint, server.url);
    let partner_key = text_of(&c, "#partner-api-key").await;
    css(&c, "#generate-key").await.click().await.unwrap();
    css(&c, "#new-import-key").await;
    let import_key = text_of(&c, "#new-import-key").await;
    assert_eq!(import_key.len(), 36, "{import_key}");
    assert_eq!(text_of(&c, "#partner-status").await, "enabled");
    shots.take(&c, "heap").await;

    // Heap imports a cohort with them, through the partner API.
    let (status, answer) = api
        .post_ok(
            "/partners/heap/cohorts",
            "",
            &json!({"partner_api_key": partner_key, "client_secret": import_key, "cohort_id": "abandoned",
                    "name": "Abandoned checkout", "created_at": "2025-06-01T10:00:00Z"}),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = api
        .post_ok(
            "/partners/heap/cohorts/users",
            "",
            &json!({"partner_api_key": partner_key, "client_secret": import_key, "cohort_id": "abandoned",
                    "cohort_changes": [{"user_ids": ["u1", "u2"]}]}),
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    // Cohorts lists it.
    link(&c, "Cohorts").await;
    wait_page(&c, "Cohorts").await;
    let cohorts = text_of(&c, "#cohorts").await;
    assert!(
        cohorts.contains("Abandoned checkout") && cohorts.contains("Heap"),
        "{cohorts}"
    );
    assert_eq!(text_of(&c, "#cohorts td.members").await, "2");
    shots.take(&c, "cohorts").await;

    // Segments: "Heap Cohorts includes Abandoned checkout", its size shown live, then saved.
    link(&c, "Segments").await;
    wait_page(&c, "Segments").await;
    css(&c, "#new-segment").await.click().await.unwrap();
    wait_page(&c, "New segment").await;
    css(&c, "#segment-name")
        .await
        .send_keys("Checkout abandoners")
        .await
        .unwrap();
    css(&c, "#g0r0_cohort")
        .await
        .select_by_label("Heap Cohorts › Abandoned checkout")
        .await
        .unwrap();
    let size = wait_text(&c, "#size", false, |t| t == "2 users").await;
    assert_eq!(size, "2 users");
    shots.take(&c, "segment-builder").await;
    // Enter in the name saves (it once pressed the first builder button, "Remove condition").
    css(&c, "#segment-name")
        .await
        .send_keys("\u{E007}")
        .await
        .unwrap();
    wait_page(&c, "Segments").await;
    assert_eq!(text_of(&c, "#segments td.segment-size").await, "2");
    shots.take(&c, "segments").await;

    // Data Export › Currents: a Heap Export to the local sink, launched.
    link(&c, "Data Export › Currents").await;
    wait_page(&c, "Currents").await;
    css(&c, "#new-current").await.click().await.unwrap();
    wait_page(&c, "Create New Current").await;
    css(&c, "#current-name")
        .await
        .send_keys("Heap")
        .await
        .unwrap();
    css(&c, "#current-endpoint")
        .await
        .send_keys(&format!("{}/braze", sink.url))
        .await
        .unwrap();
    css(&c, "#current-token")
        .await
        .send_keys("s3cret")
        .await
        .unwrap();
    css(&c, "#all-customer_behavior")
        .await
        .click()
        .await
        .unwrap();
    let ticked = css(&c, "input[value='users.behaviors.CustomEvent']")
        .await
        .prop("checked")
        .await
        .unwrap();
    assert_eq!(
        ticked.as_deref(),
        Some("true"),
        "select-all ticks the category"
    );
    shots.take(&c, "current-new").await;
    css(&c, "#launch-current").await.click().await.unwrap();
    wait_page(&c, "Currents").await;
    let row = text_of(&c, "#currents").await;
    assert!(
        row.contains("Heap Export") && row.contains("active"),
        "{row}"
    );
    // Events flow: a custom event reaches the sink, and the page counts it delivered.
    let (status, _) = api
        .post_ok(
            "/users/track",
            &admin_key,
            &json!({"events": [{"external_id": "u1", "name": "checkout_started", "time": "2025-06-01T10:00:00Z"}]}),
        )
        .await;
    assert_eq!(status, 201);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let events = sink.events().await;
        if events.iter().any(|e| {
            e["properties"]["name"] == "checkout_started"
                || e["event_type"] == "users.behaviors.CustomEvent"
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event at the sink: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_text(&c, "#currents td.delivered", true, |t| t != "0").await;
    shots.take(&c, "currents").await;

    // Developer Console › REST API keys: create a users.track key and use it.
    link(&c, "Developer Console › REST API keys").await;
    wait_page(&c, "Developer Console › REST API keys").await;
    css(&c, "#key-name")
        .await
        .send_keys("Heap ingest")
        .await
        .unwrap();
    css(&c, "input[value='users.track']")
        .await
        .click()
        .await
        .unwrap();
    css(&c, "#create-key").await.click().await.unwrap();
    css(&c, "#new-api-key").await;
    let new_key = text_of(&c, "#new-api-key").await;
    shots.take(&c, "api-keys").await;
    let (status, answer) = api
        .post_ok(
            "/users/track",
            &new_key,
            &json!({"attributes": [{"external_id": "u4", "plan": "trial"}]}),
        )
        .await;
    assert_eq!(status, 201, "the new key works: {answer}");
    let (status, _) = api
        .post_ok(
            "/users/export/ids",
            &new_key,
            &json!({"external_ids": ["u4"]}),
        )
        .await;
    assert_eq!(status, 403, "and holds only the permission ticked");

    // Canvas: a "Trial – stuck" Canvas (a webhook to the sink, then a delay), launched from the
    // list, entered through the API; its step view shows the user waiting in the delay and
    // the message sent, and the user's lookup page lists that message.
    let (status, answer) = api
        .post_ok(
            "/api/v1/canvases",
            &admin_key,
            &json!({
                "name": "Trial – stuck",
                "entry": {"type": "api_triggered"},
                "steps": [
                    {"id": "ping", "name": "Ping", "type": "message", "next": "wait",
                     "message": {"channel": "webhook", "url": format!("{}/hook", sink.url),
                                 "request_headers": {"Authorization": "Bearer s3cret"},
                                 "body": "{\"user\": \"{{${user_id}}}\"}"}},
                    {"id": "wait", "name": "Three days", "type": "delay", "delay": {"seconds": 259200}, "next": "mail"},
                    {"id": "mail", "name": "Reminder", "type": "message",
                     "message": {"channel": "email", "from": "Trial <trial@example.com>", "subject": "Stuck?", "body": "<p>Hi</p>"}}
                ]
            }),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let canvas_id = answer["canvas"]["id"].as_str().unwrap().to_owned();
    link(&c, "Canvas").await;
    wait_page(&c, "Canvas").await;
    assert!(text_of(&c, "#canvases").await.contains("draft"));
    css(&c, "button[aria-label='Launch Trial – stuck']")
        .await
        .click()
        .await
        .unwrap();
    wait_page(&c, "Trial – stuck").await;
    let (status, answer) = api
        .post_ok(
            "/canvas/trigger/send",
            &admin_key,
            &json!({"canvas_id": canvas_id, "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    link(&c, "All Canvases").await;
    wait_page(&c, "Canvas").await;
    wait_text(&c, "#canvases td.sent", true, |t| t == "1").await;
    assert_eq!(text_of(&c, "#canvases td.in-journey").await, "1");
    shots.take(&c, "canvases").await;
    link(&c, "Trial – stuck").await;
    wait_page(&c, "Trial – stuck").await;
    assert_eq!(text_of(&c, "#step-ping td.step-sent").await, "1");
    assert_eq!(text_of(&c, "#step-wait td.in-step").await, "1");
    let ping = text_of(&c, "#step-ping").await;
    assert!(ping.contains("Next → Three days"), "{ping}");
    shots.take(&c, "canvas-steps").await;

    // The Canvas editor: a new Canvas built with fields — the starter's webhook step, then a
    // Delay added by posting the form back and wired after it — saved as a draft and drawn
    // as a graph.
    link(&c, "All Canvases").await;
    wait_page(&c, "Canvas").await;
    css(&c, "#new-canvas").await.click().await.unwrap();
    wait_page(&c, "Create Canvas").await;
    css(&c, "#canvas-name")
        .await
        .send_keys("Welcome series")
        .await
        .unwrap();
    css(&c, "#new-step-kind option[value='delay']")
        .await
        .click()
        .await
        .unwrap();
    css(&c, "#add-step").await.click().await.unwrap();
    css(&c, "#s1-fields").await;
    css(&c, "#s0-next option[value='step-1']")
        .await
        .click()
        .await
        .unwrap();
    let name = css(&c, "#s1-name").await;
    name.clear().await.unwrap();
    name.send_keys("Wait a day").await.unwrap();
    shots.take(&c, "canvas-editor").await;
    css(&c, "#create-canvas").await.click().await.unwrap();
    wait_page(&c, "Welcome series").await;
    css(&c, "#canvas-graph a.node[href='#step-step-1']").await;
    let page = c.source().await.unwrap();
    assert!(
        page.contains("Wait a day") && page.contains("0 in step now"),
        "{page}"
    );
    shots.take(&c, "canvas-graph").await;

    // User lookup: u1's profile with the Canvas message sent to them.
    link(&c, "User lookup").await;
    wait_page(&c, "User lookup").await;
    css(&c, "#q").await.send_keys("u1").await.unwrap();
    css(&c, "form.card button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    let messages = wait_text(&c, "#user-recent-messages", false, |t| !t.is_empty()).await;
    assert!(
        messages.contains("Canvas Trial – stuck › Ping")
            && messages.contains("webhook")
            && messages.contains("sent"),
        "{messages}"
    );
    shots.take(&c, "user-lookup").await;

    // The browser ran no inline script and loaded nothing refused by the CSP.
    let logs: Value = c
        .execute(
            "return document.querySelectorAll('script:not([src])').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(logs, json!(0));

    // On a phone's width the page fits: no sideways scrolling of the whole page (wide tables
    // scroll inside themselves).
    c.set_window_size(375, 800).await.unwrap();
    link(&c, "Segments").await;
    wait_page(&c, "Segments").await;
    let width: Value = c
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await
        .unwrap();
    assert!(width.as_u64().is_some_and(|w| w <= 375), "{width}");
    shots.take(&c, "segments-narrow").await;
    c.close().await.unwrap();
    drop(driver);
    drop(server);
}

/// Signs in through the sign-in form (its token cookie and field) over plain HTTP; returns
/// the status.
async fn sign_in_status(url: &str, username: &str, password: &str) -> u16 {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client
        .get(format!("{url}/dashboard/login"))
        .send()
        .await
        .unwrap();
    let cookie = page.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let body = page.text().await.unwrap();
    let at = body.find("name=\"csrf\" value=\"").unwrap() + 19;
    let token = &body[at..at + 64];
    client
        .post(format!("{url}/dashboard/login"))
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "csrf={token}&username={username}&password={}",
            password.replace(' ', "+")
        ))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_managed_from_the_command_line() {
    use crate::support::{stderr, tideway, tideway_ok};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dir = data.to_str().unwrap();
    let server = Server::start(&data, &[]).await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("initial-admin-password"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let created = tideway_ok(&[
        "users",
        "create",
        "viewer",
        "--role",
        "read_only",
        "--data-dir",
        dir,
    ])
    .await;
    let password = created.trim().to_owned();
    assert_eq!(password.len(), 24, "{created}");
    let again = tideway(&["users", "create", "viewer", "--data-dir", dir]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("tideway users reset-password viewer"),
        "{}",
        stderr(&again)
    );
    let bad = tideway(&["users", "create", "<b>", "--data-dir", dir]).await;
    assert!(!bad.status.success());
    let listed = tideway_ok(&["users", "list", "--data-dir", dir]).await;
    assert!(
        listed.contains("admin") && listed.contains("viewer") && listed.contains("read_only"),
        "{listed}"
    );
    assert_eq!(sign_in_status(&server.url, "viewer", &password).await, 303);
    let reset = tideway_ok(&["users", "reset-password", "viewer", "--data-dir", dir]).await;
    let new_password = reset.trim();
    assert_ne!(new_password, password);
    assert_eq!(sign_in_status(&server.url, "viewer", &password).await, 401);
    assert_eq!(
        sign_in_status(&server.url, "viewer", new_password).await,
        303
    );
    let missing = tideway(&["users", "reset-password", "nobody", "--data-dir", dir]).await;
    assert!(!missing.status.success());
    // A restart does not make a second admin or print a password again.
    assert!(server.terminate().await);
    let again = Server::start(&data, &[]).await;
    assert!(
        !again.preamble.iter().any(|l| l.contains("Dashboard user")),
        "{:?}",
        again.preamble
    );
}
