//! The dashboard's security, over plain HTTP (the guide walk in a real browser is the binary's
//! `dashboard` test): sign-in and its limit, CSRF on every form, `Sec-Fetch-Site`, the
//! read-only role, workspace isolation, HTML in user-supplied names, and precise 4xx answers
//! to bad input.

use reqwest::redirect::Policy;
use serde_json::json;
use tideway_core::dashboard::{PasswordHash, Role, Username};
use tideway_core::keys::Secret;
use tideway_core::store::Workspace;

use crate::harness::{NOW, Server};

const PASSWORD: &str = "a long test password";

/// A browser-like client of one user: its session cookie and CSRF token.
struct Browser {
    base: String,
    client: reqwest::Client,
    cookie: String,
    csrf: String,
}

/// What a request answered.
struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

async fn user(s: &Server, name: &str, role: Role) {
    s.store
        .create_dashboard_user(
            &Username::parse(name).unwrap(),
            role,
            &PasswordHash::new(PASSWORD, [9; 16]).unwrap(),
            NOW,
        )
        .await
        .unwrap();
}

/// The `name=value` of a `Set-Cookie` header named `name`.
fn set_cookie(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn hidden_csrf(body: &str) -> String {
    let at = body.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    body[at..at + 64].to_owned()
}

/// Posts the sign-in form as a browser would (its token cookie and field).
async fn sign_in_answer(base: &str, name: &str, password: &str) -> Page {
    let c = client();
    let login = c
        .get(format!("{base}/dashboard/login"))
        .send()
        .await
        .unwrap();
    let token_cookie = set_cookie(login.headers(), "tideway_login").unwrap();
    let token_cookie = token_cookie.split(';').next().unwrap().to_owned();
    let form = hidden_csrf(&login.text().await.unwrap());
    let res = c
        .post(format!("{base}/dashboard/login"))
        .header("cookie", token_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form_urlencoded::Serializer::new(String::new())
                .append_pair("csrf", &form)
                .append_pair("username", name)
                .append_pair("password", password)
                .finish(),
        )
        .send()
        .await
        .unwrap();
    Page {
        status: res.status().as_u16(),
        headers: res.headers().clone(),
        body: res.text().await.unwrap(),
    }
}

async fn sign_in(base: &str, name: &str) -> Browser {
    let page = sign_in_answer(base, name, PASSWORD).await;
    assert_eq!(page.status, 303, "{}", page.body);
    let cookie = set_cookie(&page.headers, "tideway_session").expect("a session cookie");
    let mut b = Browser {
        base: base.to_owned(),
        client: client(),
        cookie: cookie.split(';').next().unwrap().to_owned(),
        csrf: String::new(),
    };
    let home = b.get("/dashboard/").await;
    assert_eq!(home.status, 303);
    let first = home.headers["location"].to_str().unwrap().to_owned();
    let page = b.get(&first).await;
    assert_eq!(page.status, 200, "{}", page.body);
    b.csrf = hidden_csrf(&page.body);
    b
}

impl Browser {
    async fn get(&self, path: &str) -> Page {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        Page {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: res.text().await.unwrap(),
        }
    }

    /// Posts `fields` (the CSRF token added when `with_csrf`), with `Sec-Fetch-Site: site`.
    async fn post_as(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        with_csrf: bool,
        site: Option<&str>,
    ) -> Page {
        let mut form = form_urlencoded::Serializer::new(String::new());
        if with_csrf {
            form.append_pair("csrf", &self.csrf);
        }
        for (k, v) in fields {
            form.append_pair(k, v);
        }
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.finish());
        if let Some(site) = site {
            req = req.header("sec-fetch-site", site);
        }
        let res = req.send().await.unwrap();
        Page {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: res.text().await.unwrap(),
        }
    }

    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.post_as(path, fields, true, Some("same-origin")).await
    }
}

/// Every form of a workspace's pages, as (path, fields).
fn forms(ws: &Workspace) -> Vec<(String, Vec<(&'static str, &'static str)>)> {
    let w = format!("/dashboard/w/{}", ws.id.0);
    vec![
        (format!("{w}/partners/heap/keys"), vec![]),
        (format!("{w}/partners/heap/rotate"), vec![]),
        (format!("{w}/partners/heap/keys/1/invalidate"), vec![]),
        (
            format!("{w}/partners/heap/enabled"),
            vec![("enabled", "false")],
        ),
        (
            format!("{w}/developer/api-keys"),
            vec![("name", "k"), ("permission", "users.track")],
        ),
        (format!("{w}/developer/api-keys/1/revoke"), vec![]),
        (format!("{w}/segments"), segment_form("s", "heap:c1")),
        (
            format!("{w}/segments/preview"),
            segment_form("s", "heap:c1"),
        ),
        (
            format!("{w}/segments/builder"),
            segment_form("s", "heap:c1"),
        ),
        (format!("{w}/segments/x"), segment_form("s", "heap:c1")),
        (format!("{w}/segments/x/delete"), vec![]),
        (
            format!("{w}/currents"),
            vec![("name", "c"), ("kind", "custom_http")],
        ),
        (format!("{w}/currents/1/launch"), vec![]),
        (format!("{w}/currents/1/test"), vec![]),
        (format!("{w}/currents/1/replay"), vec![]),
        (format!("{w}/campaigns"), vec![("name", "c")]),
        (format!("{w}/campaigns/x"), vec![("name", "c")]),
        (format!("{w}/campaigns/x/launch"), vec![]),
        (
            format!("{w}/canvases"),
            vec![("name", "cv"), ("definition", CANVAS_DOC)],
        ),
        (
            format!("{w}/canvases/x"),
            vec![("name", "cv"), ("definition", CANVAS_DOC)],
        ),
        // The Canvas editor's fields (here adding a step: a post-back saves nothing, but is
        // a POST all the same).
        (
            format!("{w}/canvases"),
            vec![("name", "cv"), ("s0_kind", "delay"), ("add", "step")],
        ),
        (format!("{w}/canvases/x/launch"), vec![]),
        (format!("{w}/canvases/x/stop"), vec![]),
        ("/dashboard/logout".to_owned(), vec![]),
    ]
}

/// A Canvas document as the dashboard's form takes it: an API-triggered webhook, a delay, and
/// an email.
const CANVAS_DOC: &str = r#"{"entry": {"type": "api_triggered"}, "steps": [
  {"id": "hook", "name": "Ping", "type": "message", "next": "wait",
   "message": {"channel": "webhook", "url": "http://127.0.0.1:9/hook", "body": "hi {{${user_id}}}"}},
  {"id": "wait", "name": "Two days", "type": "delay", "delay": {"seconds": 172800}, "next": "mail"},
  {"id": "mail", "name": "Reminder", "type": "message",
   "message": {"channel": "email", "from": "T <t@example.com>", "subject": "Hi", "body": "<p>x</p>"}}
]}"#;

/// A Canvas named `name` in `ws`, made through the management API.
async fn api_canvas(s: &Server, ws: &Workspace, name: &str) -> String {
    let key = s.admin_key(ws).await;
    let mut doc: serde_json::Value = serde_json::from_str(CANVAS_DOC).unwrap();
    doc["name"] = json!(name);
    let a = s.post("/api/v1/canvases", &key, doc).await;
    assert_eq!(a.status, 201, "{a:?}");
    a.body["canvas"]["id"].as_str().unwrap().to_owned()
}

/// The builder's form for "cohort includes `cohort`" named `name`.
fn segment_form(name: &'static str, cohort: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("name", name),
        ("combine", "and"),
        ("g0_combine", "and"),
        ("g0r0_kind", "cohort"),
        ("g0r0_cohort_op", "includes"),
        ("g0r0_cohort", cohort),
    ]
}

/// A Heap cohort named `name` in `ws`, imported through the partner API as Heap would.
async fn heap_cohort(s: &Server, ws: &Workspace, id: &str, name: &str) {
    let partner_key = s
        .store
        .partner_api_key("heap", Secret::new("heap-partner-key".into()), NOW)
        .await
        .unwrap();
    let secret = format!("import-{}-{id}", ws.id.0);
    s.store
        .create_import_key(ws.id, "heap", &Secret::new(secret.clone()), NOW)
        .await
        .unwrap();
    let a = s
        .send(
            reqwest::Method::POST,
            "/partners/heap/cohorts",
            crate::harness::Auth::None,
            Some(
                json!({"partner_api_key": partner_key.expose(), "client_secret": secret, "cohort_id": id, "name": name, "created_at": "2025-06-01T10:00:00Z"})
                    .to_string()
                    .into_bytes(),
            ),
            true,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_session_and_sign_in_sets_a_locked_down_cookie() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let anonymous = Browser {
        base: s.base.clone(),
        client: client(),
        cookie: "tideway_session=".to_owned() + &"0".repeat(64),
        csrf: "x".repeat(64),
    };
    let page = anonymous.get(&format!("/dashboard/w/{}/", ws.id.0)).await;
    assert_eq!(page.status, 303);
    let login = page.headers["location"].to_str().unwrap().to_owned();
    assert_eq!(
        login,
        format!("/dashboard/login?next=%2Fdashboard%2Fw%2F{}%2F", ws.id.0)
    );
    // Signing in from there goes back to the page; a `next` that is not a dashboard page
    // (another site, the sign-in page) is ignored.
    for (from, back) in [
        (login.clone(), format!("/dashboard/w/{}/", ws.id.0)),
        (
            "/dashboard/login?next=%2F%2Fevil.example%2F".to_owned(),
            "/dashboard/".to_owned(),
        ),
        (
            "/dashboard/login?next=%2Fdashboard%2Flogin".to_owned(),
            "/dashboard/".to_owned(),
        ),
    ] {
        let c = client();
        let form = c.get(format!("{}{from}", s.base)).send().await.unwrap();
        let token_cookie = set_cookie(form.headers(), "tideway_login").unwrap();
        let token_cookie = token_cookie.split(';').next().unwrap().to_owned();
        let body = form.text().await.unwrap();
        // The form carries `next` only when it is a dashboard page; the sign-in judges it
        // again, so it is sent here whatever the form says.
        let asked: String = form_urlencoded::parse(from.split_once('?').unwrap().1.as_bytes())
            .find(|(k, _)| k == "next")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        assert_eq!(
            body.contains("name=\"next\""),
            back != "/dashboard/",
            "{from}: {body}"
        );
        let mut fields = form_urlencoded::Serializer::new(String::new());
        fields
            .append_pair("csrf", &hidden_csrf(&body))
            .append_pair("username", "admin")
            .append_pair("password", PASSWORD)
            .append_pair("next", &asked);
        let res = c
            .post(format!("{}/dashboard/login", s.base))
            .header("cookie", token_cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(fields.finish())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 303, "{from}");
        assert_eq!(res.headers()["location"], back.as_str(), "{from}");
    }
    let ok = sign_in_answer(&s.base, "admin", PASSWORD).await;
    assert_eq!(ok.headers["location"], "/dashboard/");
    let post = anonymous
        .post(&format!("/dashboard/w/{}/partners/heap/keys", ws.id.0), &[])
        .await;
    assert_eq!(post.status, 401);

    let wrong = sign_in_answer(&s.base, "admin", "not the password").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong username or password."));
    assert!(set_cookie(&wrong.headers, "tideway_session").is_none());
    let unknown = sign_in_answer(&s.base, "nobody", PASSWORD).await;
    assert_eq!(unknown.status, 401);

    let ok = sign_in_answer(&s.base, "admin", PASSWORD).await;
    assert_eq!(ok.status, 303);
    let cookie = set_cookie(&ok.headers, "tideway_session").unwrap();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/dashboard"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    let csp = ok.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // Signing out ends the session in the store.
    let b = sign_in(&s.base, "admin").await;
    assert_eq!(b.post("/dashboard/logout", &[]).await.status, 303);
    assert_eq!(
        b.get(&format!("/dashboard/w/{}/", ws.id.0)).await.status,
        303
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_limited_per_username_and_address() {
    let s = Server::start().await;
    user(&s, "admin", Role::Admin).await;
    user(&s, "other", Role::Admin).await;
    for _ in 0..5 {
        assert_eq!(
            sign_in_answer(&s.base, "admin", "wrong password!")
                .await
                .status,
            401
        );
    }
    let limited = sign_in_answer(&s.base, "admin", PASSWORD).await;
    assert_eq!(limited.status, 429, "even the right password waits");
    assert!(limited.headers.contains_key("retry-after"));
    assert!(limited.body.contains("Too many failed sign-ins"));
    // Another username from the same address is not limited.
    assert_eq!(sign_in_answer(&s.base, "other", PASSWORD).await.status, 303);
}

/// Wrong passwords sent all at once get no more tries than sent one by one: at most
/// `MAX_FAILURES` are checked, the rest are refused before their password is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failed_sign_ins_are_limited_too() {
    let s = Server::start().await;
    user(&s, "admin", Role::Admin).await;
    // Sent together on one task: the requests are in flight at once.
    let statuses: Vec<u16> = futures_util::future::join_all((0..20).map(|i| {
        let base = &s.base;
        async move {
            sign_in_answer(base, "admin", &format!("wrong password {i}"))
                .await
                .status
        }
    }))
    .await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, refused), (5, 15), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_without_the_csrf_token_is_refused() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    for (path, fields) in forms(&ws) {
        let page = b.post_as(&path, &fields, false, Some("same-origin")).await;
        assert_eq!(page.status, 403, "{path} without a token: {}", page.body);
        assert!(page.body.contains("security token"), "{path}");
        let mut wrong = fields.clone();
        let bad = "0".repeat(64);
        wrong.push(("csrf", &bad));
        let page = b.post_as(&path, &wrong, false, Some("same-origin")).await;
        assert_eq!(page.status, 403, "{path} with a wrong token");
    }
    // The sign-in form too: without its token nobody signs in.
    let c = client();
    let res = c
        .post(format!("{}/dashboard/login", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "username=admin&password={}",
            PASSWORD.replace(' ', "+")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403);
    // Nothing changed, and the session still works.
    assert!(
        s.store
            .list_import_keys(ws.id, "heap")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.store.list_api_keys(ws.id).await.unwrap().is_empty());
    assert_eq!(
        b.get(&format!("/dashboard/w/{}/", ws.id.0)).await.status,
        200
    );
    // With the token (and the htmx header form of it), the same forms work.
    let page = b
        .post(&format!("/dashboard/w/{}/partners/heap/keys", ws.id.0), &[])
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let res = b
        .client
        .post(format!(
            "{}/dashboard/w/{}/partners/heap/keys",
            s.base, ws.id.0
        ))
        .header("cookie", &b.cookie)
        .header("x-csrf-token", &b.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        s.store.list_import_keys(ws.id, "heap").await.unwrap().len(),
        2
    );
}

/// A form with a NUL character (`%00`) in any field is a 400 that says so, on every backend
/// alike, and changes nothing; the sign-in form too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_with_a_nul_character_is_refused() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    for (path, mut fields) in forms(&ws) {
        if path == "/dashboard/logout" {
            continue;
        }
        fields.push(("note", "a\u{0}b"));
        let page = b.post(&path, &fields).await;
        assert_eq!(page.status, 400, "{path}: {}", page.body);
        assert!(page.body.contains("NUL character"), "{path}: {}", page.body);
    }
    assert!(s.store.list_api_keys(ws.id).await.unwrap().is_empty());
    assert!(
        s.store
            .list_import_keys(ws.id, "heap")
            .await
            .unwrap()
            .is_empty()
    );
    let page = sign_in_answer(&s.base, "ad\u{0}min", PASSWORD).await;
    assert_eq!(page.status, 400, "{}", page.body);
    // The session still works.
    assert_eq!(
        b.get(&format!("/dashboard/w/{}/", ws.id.0)).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_even_with_the_token() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    for (path, fields) in forms(&ws) {
        for site in ["cross-site", "same-site"] {
            let page = b.post_as(&path, &fields, true, Some(site)).await;
            assert_eq!(page.status, 403, "{path} from {site}");
            assert!(page.body.contains("another site"), "{path}");
        }
    }
    assert!(
        s.store
            .list_import_keys(ws.id, "heap")
            .await
            .unwrap()
            .is_empty()
    );
    // Typed into the address bar (`none`) or from a non-browser client (absent): allowed.
    let path = format!("/dashboard/w/{}/partners/heap/keys", ws.id.0);
    assert_eq!(b.post_as(&path, &[], true, Some("none")).await.status, 200);
    assert_eq!(b.post_as(&path, &[], true, None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_user_sees_every_page_and_changes_nothing() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    heap_cohort(&s, &ws, "c1", "Trial stuck").await;
    let canvas = api_canvas(&s, &ws, "Viewer's Canvas").await;
    user(&s, "viewer", Role::ReadOnly).await;
    let b = sign_in(&s.base, "viewer").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    for page in [
        format!("{w}/"),
        format!("{w}/partners/heap"),
        format!("{w}/cohorts"),
        format!("{w}/cohorts/heap/c1"),
        format!("{w}/segments"),
        format!("{w}/campaigns"),
        format!("{w}/canvases"),
        format!("{w}/canvases/{canvas}"),
        format!("{w}/users?by=external_id&q=nobody-here"),
        format!("{w}/developer/api-keys"),
    ] {
        let p = b.get(&page).await;
        assert!(p.status == 200 || page.contains("nobody-here"), "{page}");
        assert!(p.body.contains("read-only"), "{page} says so");
    }
    // The forms that only create or edit are refused outright.
    for page in [
        format!("{w}/segments/new"),
        format!("{w}/campaigns/new"),
        format!("{w}/canvases/new"),
        format!("{w}/canvases/{canvas}/edit"),
    ] {
        assert_eq!(b.get(&page).await.status, 403, "{page}");
    }
    // The Canvas's buttons are shown disabled, and pressing one anyway changes nothing.
    let list = b.get(&format!("{w}/canvases")).await.body;
    assert!(
        list.contains("disabled aria-label=\"Launch Viewer&#39;s Canvas\"")
            || list.contains("disabled aria-label=\"Launch Viewer's Canvas\""),
        "{list}"
    );
    assert!(!list.contains("id=\"new-canvas\""));
    let launch = b.post(&format!("{w}/canvases/{canvas}/launch"), &[]).await;
    assert_eq!(launch.status, 403);
    assert_eq!(
        s.store
            .canvas(ws.id, &canvas)
            .await
            .unwrap()
            .unwrap()
            .status,
        tideway_core::campaigns::CampaignStatus::Draft
    );
    // No secret is shown to a read-only user, and no change button.
    let heap = b.get(&format!("{w}/partners/heap")).await.body;
    assert!(!heap.contains("heap-partner-key") && !heap.contains("partner-api-key\""));
    assert!(!heap.contains("generate-key"));
    let keys_before = s.store.list_import_keys(ws.id, "heap").await.unwrap();
    for (path, fields) in forms(&ws) {
        if path == "/dashboard/logout" {
            continue;
        }
        let page = b.post(&path, &fields).await;
        assert_eq!(page.status, 403, "{path}");
        assert!(page.body.contains("read-only"), "{path}");
    }
    assert_eq!(
        s.store.list_import_keys(ws.id, "heap").await.unwrap(),
        keys_before
    );
    assert!(s.store.partner_enabled(ws.id, "heap").await.unwrap());
    assert_eq!(s.store.list_api_keys(ws.id).await.unwrap().len(), 1);
    // Signing out is allowed.
    assert_eq!(b.post("/dashboard/logout", &[]).await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_of_one_workspace_shows_another_workspaces_data() {
    let s = Server::start().await;
    let a = s.workspace("alpha").await;
    let b_ws = s.workspace("bravo").await;
    heap_cohort(&s, &a, "ca", "Alpha cohort").await;
    heap_cohort(&s, &b_ws, "cb", "Bravo secret cohort").await;
    let bravo_canvas = api_canvas(&s, &b_ws, "Bravo secret Canvas").await;
    api_canvas(&s, &a, "Alpha Canvas").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let created = b
        .post(
            &format!("/dashboard/w/{}/developer/api-keys", b_ws.id.0),
            &[("name", "bravo-only-key"), ("permission", "users.track")],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let bravo_import = s.store.list_import_keys(b_ws.id, "heap").await.unwrap();
    let w = format!("/dashboard/w/{}", a.id.0);
    for page in [
        format!("{w}/"),
        format!("{w}/partners/heap"),
        format!("{w}/cohorts"),
        format!("{w}/cohorts/heap/ca"),
        format!("{w}/segments"),
        format!("{w}/canvases"),
        format!("{w}/developer/api-keys"),
    ] {
        let p = b.get(&page).await;
        assert_eq!(p.status, 200, "{page}");
        assert!(!p.body.contains("Bravo secret cohort"), "{page}");
        assert!(!p.body.contains("Bravo secret Canvas"), "{page}");
        assert!(!p.body.contains("bravo-only-key"), "{page}");
        assert!(!p.body.contains(&bravo_import[0].prefix), "{page}");
        assert!(!p.body.contains(&b_ws.app_group_id), "{page}");
    }
    // B's user, cohort, key and import key through A's addresses: not found, nothing changed.
    let bravo_key = s.admin_key(&b_ws).await;
    let a = s
        .post(
            "/users/track",
            &bravo_key,
            json!({"attributes": [{"external_id": "bravo-user", "plan": "bravo-plan"}]}),
        )
        .await;
    assert_eq!(a.status, 201);
    let lookup = b
        .get(&format!("{w}/users?by=external_id&q=bravo-user"))
        .await;
    assert_eq!(lookup.status, 404);
    assert!(!lookup.body.contains("bravo-plan"));
    assert_eq!(b.get(&format!("{w}/cohorts/heap/cb")).await.status, 404);
    // B's Canvas through A's addresses: not found, not shown, not changed.
    for page in [
        format!("{w}/canvases/{bravo_canvas}"),
        format!("{w}/canvases/{bravo_canvas}/edit"),
    ] {
        let p = b.get(&page).await;
        assert_eq!(p.status, 404, "{page}");
        assert!(!p.body.contains("Bravo secret Canvas"));
    }
    for action in ["launch", "stop"] {
        let p = b
            .post(&format!("{w}/canvases/{bravo_canvas}/{action}"), &[])
            .await;
        assert_eq!(p.status, 404, "{action}");
    }
    let renamed = b
        .post(
            &format!("{w}/canvases/{bravo_canvas}"),
            &[("name", "taken over"), ("definition", CANVAS_DOC)],
        )
        .await;
    assert_eq!(renamed.status, 404);
    let kept = s
        .store
        .canvas(b_ws.id, &bravo_canvas)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.name, "Bravo secret Canvas");
    assert_eq!(kept.status, tideway_core::campaigns::CampaignStatus::Draft);
    let bravo_key = &s.store.list_api_keys(b_ws.id).await.unwrap()[0];
    let revoke = b
        .post(
            &format!("{w}/developer/api-keys/{}/revoke", bravo_key.id),
            &[],
        )
        .await;
    assert_eq!(revoke.status, 404);
    let invalidate = b
        .post(
            &format!("{w}/partners/heap/keys/{}/invalidate", bravo_import[0].id),
            &[],
        )
        .await;
    assert_eq!(invalidate.status, 404);
    assert!(
        s.store.list_api_keys(b_ws.id).await.unwrap()[0]
            .revoked_at
            .is_none()
    );
    assert!(
        s.store.list_import_keys(b_ws.id, "heap").await.unwrap()[0]
            .invalidated_at
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_in_user_supplied_names_is_shown_as_text() {
    let s = Server::start().await;
    let ws = s.workspace("<i>ws</i>").await;
    let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    heap_cohort(&s, &ws, "\"><script>alert(3)</script>", evil).await;
    let canvas = api_canvas(&s, &ws, evil).await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let created = b
        .post(
            &format!("/dashboard/w/{}/developer/api-keys", ws.id.0),
            &[("name", evil), ("permission", "users.track")],
        )
        .await;
    assert_eq!(created.status, 201);
    let w = format!("/dashboard/w/{}", ws.id.0);
    for page in [
        format!("{w}/"),
        format!("{w}/partners/heap"),
        format!("{w}/cohorts"),
        format!("{w}/canvases"),
        format!("{w}/canvases/{canvas}"),
        format!("{w}/canvases/{canvas}/edit"),
        format!("{w}/developer/api-keys"),
    ] {
        let body = b.get(&page).await.body;
        assert!(!body.contains("<script>alert"), "{page}");
        assert!(!body.contains("<img src=x"), "{page}");
        assert!(!body.contains("<i>ws</i>"), "{page}");
        assert!(
            body.contains("&lt;i&gt;ws&lt;/i&gt;"),
            "{page}: the workspace name as text"
        );
    }
    let cohorts = b.get(&format!("{w}/cohorts")).await.body;
    assert!(cohorts.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    for page in [format!("{w}/canvases"), format!("{w}/canvases/{canvas}")] {
        let body = b.get(&page).await.body;
        assert!(
            body.contains("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x"),
            "{page}: the Canvas name as text"
        );
    }
    // The cohort id is escaped in its link too, and the link leads to the cohort.
    assert!(cohorts.contains("/cohorts/heap/%22%3E%3Cscript%3Ealert%283%29%3C%2Fscript%3E"));
    let members = b
        .get(&format!(
            "{w}/cohorts/heap/%22%3E%3Cscript%3Ealert%283%29%3C%2Fscript%3E"
        ))
        .await;
    assert_eq!(members.status, 200);
    assert!(!members.body.contains("<script>alert"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_4xx() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    assert_eq!(b.get("/dashboard/w/abc/").await.status, 400);
    assert_eq!(b.get("/dashboard/w/999/cohorts").await.status, 404);
    assert_eq!(b.get(&format!("{w}/cohorts/heap/nope")).await.status, 404);
    assert_eq!(
        b.get(&format!("{w}/cohorts/heap/x?after=-1")).await.status,
        400
    );
    assert_eq!(b.get("/dashboard/switch?ws=x").await.status, 400);
    assert_eq!(b.get("/dashboard/switch?ws=999").await.status, 404);
    assert_eq!(b.get("/dashboard/assets/nope.js").await.status, 404);
    assert_eq!(
        b.post(&format!("{w}/partners/heap/keys/abc/invalidate"), &[])
            .await
            .status,
        400
    );
    assert_eq!(
        b.post(&format!("{w}/partners/heap/keys/12345/invalidate"), &[])
            .await
            .status,
        404
    );
    assert_eq!(
        b.post(
            &format!("{w}/partners/heap/enabled"),
            &[("enabled", "maybe")]
        )
        .await
        .status,
        400
    );
    for (fields, says) in [
        (vec![("permission", "users.track")], "name"),
        (vec![("name", "k")], "Tick at least one permission"),
        (
            vec![("name", "k"), ("permission", "users.fly")],
            "unknown permission",
        ),
        (
            vec![
                ("name", "k"),
                ("permission", "users.track"),
                ("allow_ips", "10.0.0.0/99"),
            ],
            "Allowed IP addresses",
        ),
    ] {
        let page = b.post(&format!("{w}/developer/api-keys"), &fields).await;
        assert_eq!(page.status, 400, "{fields:?}");
        assert!(page.body.contains(says), "{fields:?}: {}", page.body);
    }
    // An action's address opened with GET (a reload, a bookmark) leads to its page, not a 405.
    for (action, page) in [
        ("/partners/heap/keys", "/partners/heap"),
        ("/partners/heap/rotate", "/partners/heap"),
        ("/currents/1/test", "/currents"),
        ("/campaigns/abc/stop", "/campaigns/abc"),
        ("/developer/api-keys/3/revoke", "/developer/api-keys"),
    ] {
        let answer = b.get(&format!("{w}{action}")).await;
        assert_eq!(answer.status, 303, "{action}");
        assert_eq!(answer.headers["location"], format!("{w}{page}").as_str());
    }
    // What was typed comes back with the refusal, to be mended rather than typed again.
    let page = b
        .post(
            &format!("{w}/developer/api-keys"),
            &[
                ("name", "Heap <ingest>"),
                ("permission", "users.track"),
                ("allow_ips", "not-an-ip"),
            ],
        )
        .await;
    assert_eq!(page.status, 400);
    for kept in [
        r#"value="Heap &lt;ingest&gt;""#,
        r#"value="users.track" data-group="users" checked"#,
        ">not-an-ip</textarea>",
    ] {
        assert!(page.body.contains(kept), "{kept}: {}", page.body);
    }
    assert!(s.store.list_api_keys(ws.id).await.unwrap().is_empty());
    let big = "x".repeat(70 * 1024);
    let page = b
        .post(&format!("{w}/partners/heap/keys"), &[("pad", &big)])
        .await;
    assert_eq!(page.status, 413);
    let res = b
        .client
        .post(format!("{}{w}/partners/heap/keys", s.base))
        .header("cookie", &b.cookie)
        .header("content-type", "application/json")
        .body(format!("{{\"csrf\": \"{}\"}}", b.csrf))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 415);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_built_sized_saved_listed_exported_and_deleted() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u1", "plan": "pro"}, {"external_id": "u2", "plan": "free"}, {"external_id": "u3", "plan": "pro"}]}),
        )
        .await;
    assert_eq!(a.status, 201);
    heap_cohort(&s, &ws, "c1", "Abandoned checkout").await;
    let partner_key = s
        .store
        .partner_api_key("heap", Secret::new("unused".into()), NOW)
        .await
        .unwrap();
    let secret = format!("import-{}-c1", ws.id.0);
    let a = s
        .send(
            reqwest::Method::POST,
            "/partners/heap/cohorts/users",
            crate::harness::Auth::None,
            Some(
                json!({"partner_api_key": partner_key.expose(), "client_secret": secret, "cohort_id": "c1",
                       "cohort_changes": [{"user_ids": ["u1", "u2"]}]})
                .to_string()
                .into_bytes(),
            ),
            true,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    // The Heap page shows when the data import key was last used.
    let heap = b.get(&format!("{w}/partners/heap")).await.body;
    assert!(heap.contains("<td class=\"last-used\">20"), "{heap}");
    assert!(
        heap.contains("<td class=\"added\">2</td><td class=\"removed\">0</td>"),
        "{heap}"
    );
    let new = b.get(&format!("{w}/segments/new")).await;
    assert_eq!(new.status, 200);
    assert!(
        new.body.contains("Heap Cohorts › Abandoned checkout"),
        "the cohort is picked by name"
    );
    // The live size of the unsaved filter, then with an attribute condition added.
    let mut form = segment_form("Checkout abandoners", "heap:c1");
    let preview = b.post(&format!("{w}/segments/preview"), &form).await;
    assert_eq!(preview.status, 200);
    assert_eq!(preview.body, "2 users");
    form.extend([
        ("g0r1_kind", "attribute"),
        ("g0r1_name", "plan"),
        ("g0r1_op", "equals"),
        ("g0r1_value", "pro"),
        ("g0r1_vtype", "text"),
    ]);
    assert_eq!(
        b.post(&format!("{w}/segments/preview"), &form).await.body,
        "1 user"
    );
    let added = b
        .client
        .post(format!("{}{w}/segments/builder", s.base))
        .header("cookie", &b.cookie)
        .header("x-csrf-token", &b.csrf)
        .header("hx-request", "true")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("combine=and&g0_combine=and&g0r0_kind=cohort&add=g0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        added.contains("g0r1_kind") && !added.contains("<html"),
        "a fragment with a new row"
    );
    // Invalid filters are refused with what to fix; nothing is saved.
    let bad = b
        .post(&format!("{w}/segments"), &segment_form("Bad", "heap:nope"))
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("nope"), "{}", bad.body);
    let saved = b.post(&format!("{w}/segments"), &form).await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let segments = s.store.list_segments(ws.id).await.unwrap();
    assert_eq!(segments.len(), 1);
    let id = segments[0].id.clone();
    let home = b.get(&format!("{w}/")).await.body;
    assert!(
        home.contains("<div class=\"n\">3</div><div class=\"what\">users</div>"),
        "{home}"
    );
    let list = b.get(&format!("{w}/segments")).await.body;
    assert!(
        list.contains("Checkout abandoners") && list.contains("<td class=\"segment-size\">1</td>"),
        "{list}"
    );
    // Deleting asks first (app.js reads `data-confirm`).
    assert!(
        list.contains("data-confirm=\"Delete the segment &#39;Checkout abandoners&#39;?")
            || list.contains("data-confirm=\"Delete the segment 'Checkout abandoners'?"),
        "{list}"
    );
    let members = b.get(&format!("{w}/segments/{id}/members")).await.body;
    assert!(members.contains("u1") && !members.contains("u2"));
    let csv = b.get(&format!("{w}/segments/{id}/export.csv")).await;
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines.len(), 2, "{}", csv.body);
    assert_eq!(lines[0], "braze_id,external_id");
    assert!(lines[1].ends_with(",u1"));
    // User lookup: the profile, cohorts and segments of one user.
    let found = b.get(&format!("{w}/users?by=external_id&q=u1")).await;
    assert_eq!(found.status, 200);
    assert!(found.body.contains("id=\"profile\"") && found.body.contains("pro"));
    assert!(
        found.body.contains("Abandoned checkout") && found.body.contains("Checkout abandoners")
    );
    assert!(found.body.contains("0 messages sent in the last 30 days."));
    let other = b.get(&format!("{w}/users?by=external_id&q=u3")).await.body;
    assert!(other.contains("In no cohort.") && other.contains("In no segment."));
    assert_eq!(
        b.get(&format!("{w}/users?by=external_id&q=nobody"))
            .await
            .status,
        404
    );
    assert_eq!(
        b.get(&format!("{w}/users?by=braze_id&q=not-hex"))
            .await
            .status,
        400
    );
    assert_eq!(
        b.get(&format!("{w}/users?by=alias&q=x&label="))
            .await
            .status,
        400
    );
    assert_eq!(b.get(&format!("{w}/users?by=phone&q=1")).await.status, 400);
    assert_eq!(b.get(&format!("{w}/users")).await.status, 200);
    // Edit: the builder shows the saved conditions; saving changes the filter.
    let edit = b.get(&format!("{w}/segments/{id}")).await.body;
    assert!(edit.contains("value=\"plan\"") && edit.contains("1 user"));
    let renamed = b
        .post(
            &format!("{w}/segments/{id}"),
            &segment_form("Renamed", "heap:c1"),
        )
        .await;
    assert_eq!(renamed.status, 303);
    assert_eq!(
        s.store.segment(ws.id, &id).await.unwrap().unwrap().name,
        "Renamed"
    );
    assert_eq!(
        b.post(&format!("{w}/segments/{id}/delete"), &[])
            .await
            .status,
        303
    );
    assert!(s.store.list_segments(ws.id).await.unwrap().is_empty());
    assert_eq!(b.get(&format!("{w}/segments/{id}")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_are_created_launched_paused_and_stopped() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let page = b.get(&format!("{w}/campaigns/new")).await;
    assert_eq!(page.status, 200);
    let good = [
        ("name", "Welcome <b>"),
        ("v0_channel", "webhook"),
        ("v0_percent", "100"),
        ("v0_url", "http://127.0.0.1:9/hook"),
        (
            "v0_body",
            "Hi {{${first_name}}}, leave: {{${unsubscribe_url}}}",
        ),
        ("delivery", "api_triggered"),
    ];
    for (change, says) in [
        (("name", ""), "name"),
        (("v0_body", "{{ broken"), "messages[0].body"),
        (("delivery", "scheduled"), "ISO 8601"),
        (("delivery", "action_based"), "custom_event.name"),
        (("v0_channel", "sms"), "email or webhook"),
    ] {
        let mut fields: Vec<(&str, &str)> = good
            .iter()
            .copied()
            .filter(|(k, _)| *k != change.0)
            .collect();
        fields.push(change);
        let answer = b.post(&format!("{w}/campaigns"), &fields).await;
        assert_eq!(answer.status, 400, "{change:?}");
        assert!(answer.body.contains(says), "{change:?}: {}", answer.body);
    }
    assert!(s.store.list_campaigns(ws.id).await.unwrap().is_empty());
    assert_eq!(b.post(&format!("{w}/campaigns"), &good).await.status, 303);
    let campaigns = s.store.list_campaigns(ws.id).await.unwrap();
    assert_eq!(campaigns.len(), 1);
    let id = campaigns[0].id.clone();
    let list = b.get(&format!("{w}/campaigns")).await.body;
    assert!(
        list.contains("Welcome &lt;b&gt;") && list.contains("draft") && list.contains("webhook"),
        "{list}"
    );
    assert!(list.contains("data-confirm=\"Stop the campaign"), "{list}");
    // The campaign's page: figures, templates, and the Liquid rendered for a chosen user.
    let key = s.admin_key(&ws).await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "ada", "first_name": "Ada <3"}]}),
        )
        .await;
    assert_eq!(a.status, 201);
    let detail = b.get(&format!("{w}/campaigns/{id}")).await;
    assert_eq!(detail.status, 200);
    // Its own lifecycle buttons and its audience in words.
    assert!(
        detail
            .body
            .contains("aria-label=\"Launch Welcome &lt;b&gt;\"")
            && detail.body.contains("Segments: none (everyone)"),
        "{}",
        detail.body
    );
    assert!(detail.body.contains("id=\"campaign-stats\"") && detail.body.contains("unique_opens"));
    assert!(detail.body.contains("Hi {{${first_name}}}"));
    let preview = b.get(&format!("{w}/campaigns/{id}?preview=ada")).await.body;
    assert!(preview.contains("Hi Ada &lt;3"), "{preview}");
    // A preview has no send to sign a subscription link for: an inert anchor stands in.
    assert!(
        preview.contains("leave: #preview-unsubscribe_url"),
        "{preview}"
    );
    let unknown = b
        .get(&format!("{w}/campaigns/{id}?preview=nobody"))
        .await
        .body;
    assert!(unknown.contains("No user has that external id."));
    assert_eq!(b.get(&format!("{w}/campaigns/nope")).await.status, 404);
    // Edit: the form shows the campaign; saving changes what it names, through the checks.
    let edit = b.get(&format!("{w}/campaigns/{id}/edit")).await;
    assert_eq!(edit.status, 200);
    assert!(
        edit.body.contains("value=\"http://127.0.0.1:9/hook\"")
            && edit.body.contains("Save changes")
    );
    let mut changed: Vec<(&str, &str)> = good
        .iter()
        .copied()
        .filter(|(k, _)| *k != "name" && *k != "delivery")
        .collect();
    let variant_id = s
        .store
        .campaign(ws.id, &id)
        .await
        .unwrap()
        .unwrap()
        .definition["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    changed.extend([
        ("v0_id", variant_id.as_str()),
        ("name", "Welcome, scheduled"),
        ("delivery", "scheduled"),
        ("at", "2030-01-01T09:00:00Z"),
    ]);
    assert_eq!(
        b.post(&format!("{w}/campaigns/{id}"), &changed)
            .await
            .status,
        303
    );
    let saved = s.store.campaign(ws.id, &id).await.unwrap().unwrap();
    assert_eq!(saved.name, "Welcome, scheduled");
    assert_eq!(saved.definition["delivery"]["type"], "scheduled");
    changed.push(("v0_body", "{% if %}"));
    changed.retain(|(k, v)| *k != "v0_body" || *v == "{% if %}");
    let bad = b.post(&format!("{w}/campaigns/{id}"), &changed).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(
        s.store
            .campaign(ws.id, &id)
            .await
            .unwrap()
            .unwrap()
            .definition["messages"][0]["body"],
        "Hi {{${first_name}}}, leave: {{${unsubscribe_url}}}"
    );
    for (action, status, from_its_page) in [
        ("launch", "active", false),
        ("pause", "paused", true),
        ("launch", "active", false),
        ("stop", "stopped", true),
    ] {
        // The buttons on the campaign's own page lead back to it; the list's to the list.
        let fields: &[(&str, &str)] = if from_its_page {
            &[("back", "campaign")]
        } else {
            &[]
        };
        let answer = b
            .post(&format!("{w}/campaigns/{id}/{action}"), fields)
            .await;
        assert_eq!(answer.status, 303, "{action}: {}", answer.body);
        let back = if from_its_page {
            format!("{w}/campaigns/{id}")
        } else {
            format!("{w}/campaigns")
        };
        assert_eq!(answer.headers["location"], back.as_str(), "{action}");
        assert_eq!(
            s.store
                .campaign(ws.id, &id)
                .await
                .unwrap()
                .unwrap()
                .status
                .as_str(),
            status
        );
    }
    let again = b.post(&format!("{w}/campaigns/{id}/launch"), &[]).await;
    assert_eq!(again.status, 409);
    assert!(again.body.contains("stopped"));
    assert_eq!(
        b.post(&format!("{w}/campaigns/{id}/fly"), &[]).await.status,
        404
    );
    assert_eq!(
        b.post(&format!("{w}/campaigns/nope/launch"), &[])
            .await
            .status,
        404
    );
}

/// A campaign whose segment is gone (it was stopped, then the segment deleted) opens for
/// editing with that segment still ticked and named as deleted, so an unchanged save does not
/// quietly widen its audience to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_segment_stays_in_a_campaigns_edit_form() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let a = s
        .post(
            "/api/v1/segments",
            &key,
            json!({"name": "Gone soon", "filter": {"identified": true}}),
        )
        .await;
    let segment = a.body["id"].as_str().unwrap().to_owned();
    let a = s
        .post(
            "/api/v1/campaigns",
            &key,
            json!({"name": "Narrow", "messages": [{"channel": "webhook", "url": "http://127.0.0.1:9/h", "body": "x"}],
                   "audience": {"segment_ids": [segment]}, "delivery": {"type": "api_triggered"}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let campaign = a.body["campaign"]["id"].as_str().unwrap().to_owned();
    let a = s
        .post(
            &format!("/api/v1/campaigns/{campaign}/stop"),
            &key,
            json!({}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = s
        .send(
            reqwest::Method::DELETE,
            &format!("/api/v1/segments/{segment}"),
            crate::harness::Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(a.status, 204, "{a:?}");
    let form = b.get(&format!("{w}/campaigns/{campaign}/edit")).await;
    assert_eq!(form.status, 200);
    assert!(
        form.body.contains(&format!(
            "value=\"{segment}\" checked>Deleted segment <code>{segment}</code>"
        )),
        "{}",
        form.body
    );
    // Its page names the audience by segment names, and says which is gone.
    let page = b.get(&format!("{w}/campaigns/{campaign}")).await;
    assert!(
        page.body
            .contains(&format!("Segments: deleted segment {segment}")),
        "{}",
        page.body
    );
}

/// A server with a running Currents exporter over its own SQLite store, and a receiver that
/// answers 400 to everything (every event is dead-lettered).
struct WithCurrents {
    base: String,
    store: std::sync::Arc<tideway_store::sqlite::SqliteStore>,
    receiver: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn with_currents() -> WithCurrents {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tideway_core::egress::EgressPolicy;
    use tideway_core::store::Store;
    use tideway_currents::{Exporter, ExporterConfig};
    use tideway_server::{CurrentsApi, ServerConfig, app_with_currents, install_metrics_recorder};
    use tideway_store::sqlite::{SqliteOptions, SqliteStore};

    let refuse = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::BAD_REQUEST, "no thanks") });
    let rl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/in", rl.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(rl, refuse).await });

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap(),
    );
    let exporter = Arc::new(Exporter::start(
        store.clone(),
        ExporterConfig {
            owner: "test".into(),
            egress: EgressPolicy::default(),
            ..ExporterConfig::default()
        },
    ));
    let router = app_with_currents(
        store.clone() as Arc<dyn Store>,
        ServerConfig::default(),
        install_metrics_recorder().unwrap(),
        Some(CurrentsApi {
            store: store.clone(),
            exporter,
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .await
    });
    WithCurrents {
        base: format!("http://{addr}"),
        store,
        receiver,
        _dir: dir,
        _stop: stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn currents_are_created_tested_dead_lettered_and_replayed() {
    use tideway_core::store::prelude::*;
    let s = with_currents().await;
    let ws = s.store.create_workspace("w", NOW).await.unwrap();
    s.store
        .create_dashboard_user(
            &Username::parse("admin").unwrap(),
            Role::Admin,
            &PasswordHash::new(PASSWORD, [9; 16]).unwrap(),
            NOW,
        )
        .await
        .unwrap();
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let home = b.get(&format!("{w}/")).await.body;
    assert!(
        home.contains("Data Export › Currents"),
        "linked when the exporter runs"
    );
    let form = b.get(&format!("{w}/currents/new")).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("data-select-all=\"customer_behavior\""));
    assert!(form.body.contains("value=\"users.behaviors.CustomEvent\""));
    let good = [
        ("kind", "custom_http"),
        ("name", "Refuser"),
        ("endpoint", s.receiver.as_str()),
        ("event_type", "users.behaviors.CustomEvent"),
        ("launch", "true"),
    ];
    for (change, says) in [
        (("endpoint", "ftp://x"), "endpoint"),
        (("endpoint", "http://169.254.169.254/"), "endpoint"),
        (("event_type", "users.nope"), "unknown event type"),
        (("kind", "carrier_pigeon"), "kind"),
        (("name", ""), "name"),
    ] {
        let mut fields: Vec<(&str, &str)> = good
            .iter()
            .copied()
            .filter(|(k, _)| *k != change.0)
            .collect();
        fields.push(change);
        let answer = b.post(&format!("{w}/currents"), &fields).await;
        assert_eq!(answer.status, 400, "{change:?}");
        assert!(answer.body.contains(says), "{change:?}: {}", answer.body);
    }
    let none: Vec<(&str, &str)> = good
        .iter()
        .copied()
        .filter(|(k, _)| *k != "event_type")
        .collect();
    assert_eq!(b.post(&format!("{w}/currents"), &none).await.status, 400);
    assert!(s.store.list_currents(ws.id).await.unwrap().is_empty());

    assert_eq!(b.post(&format!("{w}/currents"), &good).await.status, 303);
    let current = s.store.list_currents(ws.id).await.unwrap().remove(0);
    assert_eq!(current.status.as_str(), "active");
    let id = current.id.0;
    // Test events: the receiver's status, never its body.
    let tested = b.post(&format!("{w}/currents/{id}/test"), &[]).await;
    assert_eq!(tested.status, 200);
    assert!(
        tested.body.contains("id=\"test-report\"") && tested.body.contains("400"),
        "{}",
        tested.body
    );
    assert!(!tested.body.contains("no thanks"));
    // An event the receiver refuses is dead-lettered, listed, and can be replayed.
    s.store
        .track(
            &ws,
            tideway_core::track::parse_track(
                json!({"events": [{"external_id": "u1", "name": "e", "time": "2025-06-01T10:00:00Z"}]})
                    .as_object()
                    .unwrap(),
            )
            .unwrap(),
            NOW,
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let page = b.get(&format!("{w}/currents/{id}/dead-letters")).await;
        assert_eq!(page.status, 200);
        if page.body.contains("id=\"dead-letters\"") {
            assert!(
                page.body.contains("users.behaviors.CustomEvent") && page.body.contains("rejected")
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter: {}",
            page.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let list = b.get(&format!("{w}/currents")).await.body;
    assert!(list.contains("Refuser") && list.contains("Custom Currents Export"));
    assert_eq!(
        b.post(&format!("{w}/currents/{id}/replay"), &[])
            .await
            .status,
        303
    );
    // Lifecycle, and refusals.
    assert_eq!(
        b.post(&format!("{w}/currents/{id}/pause"), &[])
            .await
            .status,
        303
    );
    assert_eq!(
        s.store.list_currents(ws.id).await.unwrap()[0]
            .status
            .as_str(),
        "paused"
    );
    assert_eq!(
        b.post(&format!("{w}/currents/{id}/pause"), &[])
            .await
            .status,
        409
    );
    assert_eq!(
        b.post(&format!("{w}/currents/{id}/resume"), &[])
            .await
            .status,
        303
    );
    assert_eq!(
        b.post(&format!("{w}/currents/{id}/fly"), &[]).await.status,
        404
    );
    assert_eq!(
        b.post(&format!("{w}/currents/999/launch"), &[])
            .await
            .status,
        404
    );
    assert_eq!(
        b.post(&format!("{w}/currents/x/launch"), &[]).await.status,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canvases_are_created_shown_as_steps_edited_and_launched() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    // The JSON form ("Advanced: edit as JSON"); the editor's fields have their own test.
    let new = b.get(&format!("{w}/canvases/new?as=json")).await;
    assert_eq!(new.status, 200);
    assert!(new.body.contains("id=\"canvas-definition\""));
    assert!(new.body.contains("id=\"edit-with-fields\""));
    // Refusals: shown beside the field they name, nothing saved.
    let broken_next = CANVAS_DOC.replace("\"next\": \"mail\"", "\"next\": \"nowhere\"");
    for (fields, field_id, says) in [
        (
            vec![("name", ""), ("definition", CANVAS_DOC)],
            "canvas-name-error",
            "name",
        ),
        (
            vec![("name", "T"), ("definition", "{\"steps\": ")],
            "canvas-definition-error",
            "is not JSON",
        ),
        (
            vec![("name", "T"), ("definition", broken_next.as_str())],
            "canvas-definition-error",
            "steps[1]",
        ),
    ] {
        let answer = b.post(&format!("{w}/canvases"), &fields).await;
        assert_eq!(answer.status, 400, "{fields:?}");
        let at = answer
            .body
            .find(&format!("id=\"{field_id}\""))
            .unwrap_or_else(|| panic!("{field_id} in {}", answer.body));
        assert!(answer.body[at..].contains(says), "{says}: {}", answer.body);
    }
    assert!(s.store.list_canvases(ws.id).await.unwrap().is_empty());
    let made = b
        .post(
            &format!("{w}/canvases"),
            &[
                ("name", "Trial <stuck>"),
                ("tags", "trial, onboarding"),
                ("definition", CANVAS_DOC),
            ],
        )
        .await;
    assert_eq!(made.status, 303, "{}", made.body);
    let canvases = s.store.list_canvases(ws.id).await.unwrap();
    assert_eq!(canvases.len(), 1);
    let c = &canvases[0];
    assert_eq!(c.tags, ["trial", "onboarding"]);
    assert_eq!(
        made.headers["location"].to_str().unwrap(),
        format!("{w}/canvases/{}", c.id)
    );
    let list = b.get(&format!("{w}/canvases")).await.body;
    assert!(list.contains("Trial &lt;stuck&gt;") && list.contains("draft"));
    assert!(list.contains("api triggered"));
    let home = b.get(&format!("{w}/")).await.body;
    assert!(home.contains("Canvases") && home.contains("href=\"/dashboard/w/"));
    // The step view: every step with its type, what it does, where it leads, its figures.
    let steps = b.get(&format!("{w}/canvases/{}", c.id)).await.body;
    for expected in [
        "id=\"step-hook\"",
        "id=\"step-wait\"",
        "id=\"step-mail\"",
        "Sends one webhook message",
        "Waits 2 days",
        "href=\"#step-wait\">Two days</a>",
        "href=\"#step-mail\">Reminder</a>",
        "the journey ends",
        "class=\"step-sent\"",
        // The graph above the list.
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"canvas-graph\"",
        "<title id=\"canvas-graph-title\">",
    ] {
        assert!(steps.contains(expected), "{expected}: {steps}");
    }
    // Edit: the form shows the document; a change is a new version; a bad one saves nothing.
    let edit = b.get(&format!("{w}/canvases/{}/edit?as=json", c.id)).await;
    assert_eq!(edit.status, 200);
    assert!(edit.body.contains("Two days") && edit.body.contains("value=\"trial, onboarding\""));
    let longer = CANVAS_DOC.replace("172800", "259200");
    let saved = b
        .post(
            &format!("{w}/canvases/{}", c.id),
            &[("name", "Trial – stuck"), ("definition", longer.as_str())],
        )
        .await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let after = s.store.canvas(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!((after.name.as_str(), after.version), ("Trial – stuck", 2));
    let liquid = CANVAS_DOC.replace("\"subject\": \"Hi\"", "\"subject\": \"{% if %}\"");
    let bad = b
        .post(
            &format!("{w}/canvases/{}", c.id),
            &[("name", "Renamed"), ("definition", liquid.as_str())],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("steps[2].message.subject"),
        "{}",
        bad.body
    );
    let kept = s.store.canvas(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!((kept.name.as_str(), kept.version), ("Trial – stuck", 2));
    // Launch, pause, launch, stop — through the API's lifecycle; stopping is final.
    for (action, status) in [
        ("launch", "active"),
        ("pause", "paused"),
        ("launch", "active"),
        ("stop", "stopped"),
    ] {
        let answer = b
            .post(&format!("{w}/canvases/{}/{action}", c.id), &[])
            .await;
        assert_eq!(answer.status, 303, "{action}: {}", answer.body);
        let now = s.store.canvas(ws.id, &c.id).await.unwrap().unwrap();
        assert_eq!(now.status.as_str(), status);
    }
    let again = b.post(&format!("{w}/canvases/{}/launch", c.id), &[]).await;
    assert_eq!(again.status, 409);
    assert!(again.body.contains("stopped"));
    assert_eq!(
        b.get(&format!("{w}/canvases/{}/edit", c.id)).await.status,
        409
    );
    assert_eq!(
        b.post(&format!("{w}/canvases/{}/fly", c.id), &[])
            .await
            .status,
        404
    );
    assert_eq!(b.get(&format!("{w}/canvases/nope")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_have_several_variants_and_a_control_group() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let two = vec![
        ("name", "A/B"),
        ("v0_channel", "webhook"),
        ("v0_name", "Short"),
        ("v0_percent", "45"),
        ("v0_url", "http://127.0.0.1:9/a"),
        ("v0_body", "short"),
        ("v1_channel", "email"),
        ("v1_name", "Long"),
        ("v1_percent", "45"),
        ("v1_from", "Shop <shop@example.com>"),
        ("v1_subject", "Hi"),
        ("v1_body", "<p>long</p>"),
        ("control", "10"),
        ("delivery", "api_triggered"),
    ];
    // "Add a variant" shows the form again with a third, and saves nothing.
    let mut adding = two.clone();
    adding.push(("add", "variant"));
    let added = b.post(&format!("{w}/campaigns"), &adding).await;
    assert_eq!(added.status, 200);
    assert!(added.body.contains("Variant 3") && added.body.contains("name=\"v2_percent\""));
    assert!(s.store.list_campaigns(ws.id).await.unwrap().is_empty());
    let mut removing = two.clone();
    removing.push(("remove", "v0"));
    let removed = b.post(&format!("{w}/campaigns"), &removing).await;
    assert!(!removed.body.contains("Variant 2") && removed.body.contains("value=\"Long\""));
    // Each refusal beside its field: the API's own checks.
    for (change, field_id, says) in [
        (("v1_percent", "50"), "variants-error", "add up to 100"),
        (("v1_from", "nobody"), "v1-from-error", "messages[1].from"),
        (("v0_percent", "many"), "v0-percent-error", "whole number"),
        (
            ("control", "101"),
            "control-percent-error",
            "control_percent",
        ),
    ] {
        let mut fields: Vec<(&str, &str)> = two
            .iter()
            .copied()
            .filter(|(k, _)| *k != change.0)
            .collect();
        fields.push(change);
        let answer = b.post(&format!("{w}/campaigns"), &fields).await;
        assert_eq!(answer.status, 400, "{change:?}");
        let at = answer
            .body
            .find(&format!("id=\"{field_id}\""))
            .unwrap_or_else(|| panic!("{field_id}: {}", answer.body));
        assert!(
            answer.body[at..].contains(says),
            "{change:?}: {}",
            answer.body
        );
    }
    assert!(s.store.list_campaigns(ws.id).await.unwrap().is_empty());
    assert_eq!(b.post(&format!("{w}/campaigns"), &two).await.status, 303);
    let c = s.store.list_campaigns(ws.id).await.unwrap().remove(0);
    assert_eq!(c.definition["messages"].as_array().unwrap().len(), 2);
    assert_eq!(c.definition["control_percent"], 10);
    let list = b.get(&format!("{w}/campaigns")).await.body;
    assert!(list.contains("email, webhook"), "{list}");
    // The edit form shows both variants (with their ids) and saves a change to one of them,
    // keeping the variant's id.
    let edit = b.get(&format!("{w}/campaigns/{}/edit", c.id)).await;
    assert_eq!(edit.status, 200, "{}", edit.body);
    let long_id = c.definition["messages"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(edit.body.contains(&format!("value=\"{long_id}\"")));
    assert!(edit.body.contains("value=\"Short\"") && edit.body.contains("value=\"Long\""));
    let short_id = c.definition["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut changed: Vec<(&str, &str)> = two
        .iter()
        .copied()
        .filter(|(k, _)| *k != "v1_subject")
        .collect();
    changed.extend([
        ("v0_id", short_id.as_str()),
        ("v1_id", long_id.as_str()),
        ("v1_subject", "Hello again"),
    ]);
    let saved = b.post(&format!("{w}/campaigns/{}", c.id), &changed).await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let after = s.store.campaign(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!(after.definition["messages"][1]["subject"], "Hello again");
    assert_eq!(after.definition["messages"][1]["id"], long_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_lookup_shows_events_purchases_and_recent_messages() {
    use tideway_core::ids::UserSeq;
    use tideway_core::store::{
        DispatchRecord, DispatchSource, Enqueue, NewSend, SendJob, SendState, Settlement,
    };
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let key = s.admin_key(&ws).await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"external_id": "ada"}],
                "events": [
                    {"external_id": "ada", "name": "viewed_pricing", "time": "2025-06-01T10:00:00Z"},
                    {"external_id": "ada", "name": "viewed_pricing", "time": "2025-06-02T10:00:00Z"}
                ],
                "purchases": [{"external_id": "ada", "product_id": "pro_plan", "currency": "USD", "price": 10, "time": "2025-06-03T10:00:00Z"}]
            }),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    // A campaign (through the dashboard) and a Canvas step sent to Ada, as the dispatcher
    // and the Canvas engine write them.
    let made = b
        .post(
            &format!("{w}/campaigns"),
            &[
                ("name", "Pricing follow-up"),
                ("v0_channel", "webhook"),
                ("v0_percent", "100"),
                ("v0_url", "http://127.0.0.1:9/a"),
                ("v0_body", "hi"),
                ("delivery", "api_triggered"),
            ],
        )
        .await;
    assert_eq!(made.status, 303, "{}", made.body);
    let campaign = s.store.list_campaigns(ws.id).await.unwrap().remove(0);
    let ada = s
        .store
        .users_by_seq(ws.id, vec![UserSeq(1)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(ada.external_id.as_ref().unwrap().as_str(), "ada");
    let dispatch = |id: &str, source: DispatchSource| DispatchRecord {
        id: id.to_owned(),
        workspace: ws.id,
        source,
        send_id: None,
        per_user_ids: false,
        properties: None,
        audience: None,
        created_at: NOW,
        expanding_after: None,
        not_before: None,
    };
    let job = |dispatch_id: &str, variant: &str| NewSend {
        user: ada.seq,
        receipt: None,
        job: Some(SendJob {
            dispatch_id: dispatch_id.to_owned(),
            variant: variant.to_owned(),
            due_at: NOW,
            properties: None,
        }),
        events: vec![],
    };
    let variant = campaign.definition["messages"][0]["id"].as_str().unwrap();
    s.store
        .enqueue(
            ws.id,
            Enqueue {
                dispatches: vec![
                    dispatch(
                        "d-campaign",
                        DispatchSource::Campaign {
                            campaign_id: campaign.id.clone(),
                        },
                    ),
                    dispatch(
                        "d-canvas",
                        DispatchSource::AdHoc {
                            definition: json!({"messages": [{"channel": "email"}],
                                "canvas": {"id": "cv-1", "name": "Trial <stuck>", "step_id": "remind", "step_name": "Reminder"}}),
                        },
                    ),
                ],
                items: vec![job("d-campaign", variant), job("d-canvas", "remind")],
                ..Enqueue::default()
            },
        )
        .await
        .unwrap();
    let claimed = s.store.claim_sends("t", NOW, 60_000, 10).await.unwrap();
    let sent = claimed
        .iter()
        .find(|c| c.job.dispatch_id == "d-campaign")
        .unwrap();
    s.store
        .settle_sends(
            "t",
            NOW,
            vec![Settlement {
                send: sent.id,
                workspace: ws.id,
                user: ada.seq,
                state: SendState::Sent {
                    address: None,
                    links: None,
                },
                events: vec![],
            }],
        )
        .await
        .unwrap();
    let page = b.get(&format!("{w}/users?by=external_id&q=ada")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let body = page.body;
    let events = &body[body.find("id=\"user-events\"").expect("the events table")..];
    assert!(
        events.contains("viewed_pricing") && events.contains("<td>2</td>"),
        "{events}"
    );
    assert!(
        events.contains("2025-06-01 10:00:00 UTC") && events.contains("2025-06-02 10:00:00 UTC")
    );
    assert!(events.contains("pro_plan"));
    let messages = &body[body
        .find("id=\"user-recent-messages\"")
        .expect("the messages table")..];
    assert!(
        messages.contains("Campaign Pricing follow-up"),
        "{messages}"
    );
    assert!(messages.contains(&format!("/campaigns/{}", campaign.id)));
    assert!(
        messages.contains("Canvas Trial &lt;stuck&gt; › Reminder"),
        "{messages}"
    );
    assert!(messages.contains("/canvases/cv-1"));
    assert!(messages.contains(">sent<") && messages.contains(">pending<"));
    assert!(messages.contains("webhook") && messages.contains("email"));
    // Newest first: the Canvas send was enqueued after the campaign's.
    assert!(messages.find("Canvas Trial").unwrap() < messages.find("Campaign Pricing").unwrap());
}

/// HTML's escaped characters back (maud escapes `&`, `<`, `>` and `"`).
fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// A tag's attributes (`<input type="text" name="a" checked>`): `(name, value)`, a bare
/// attribute with an empty value.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = tag.split_once(char::is_whitespace).map_or("", |(_, r)| r);
    loop {
        rest = rest.trim_start();
        let end = rest
            .find(|c: char| c == '=' || c.is_whitespace() || c == '>')
            .unwrap_or(rest.len());
        let name = &rest[..end];
        if name.is_empty() || name == "/" {
            return out;
        }
        rest = &rest[end..];
        if let Some(after) = rest.strip_prefix("=\"") {
            let close = after.find('"').expect("a closing quote");
            out.push((name.to_owned(), unescape(&after[..close])));
            rest = &after[close + 1..];
        } else {
            out.push((name.to_owned(), String::new()));
        }
    }
}

/// What a browser submits for the form posting to `action` on `page`, without pressing any
/// named button: text, hidden and number inputs, ticked checkboxes and radios, each select's
/// chosen option (the first without one) and textareas.
fn submitted(page: &str, action: &str) -> Vec<(String, String)> {
    let start = page
        .find(&format!("action=\"{action}\""))
        .unwrap_or_else(|| panic!("no form posting to {action}"));
    let form = &page[start..start + page[start..].find("</form>").unwrap()];
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = form[at..].find('<') {
        let open = at + open;
        let close = open + form[open..].find('>').unwrap();
        let tag = &form[open + 1..close];
        at = close + 1;
        let attrs = attributes(tag);
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let Some(name) = get("name") else { continue };
        if tag.starts_with("input ") {
            let kind = get("type").unwrap_or_default();
            if (kind == "checkbox" || kind == "radio") && get("checked").is_none() {
                continue;
            }
            out.push((name, get("value").unwrap_or_default()));
        } else if tag.starts_with("textarea ") {
            let end = at + form[at..].find("</textarea>").unwrap();
            out.push((name, unescape(&form[at..end])));
        } else if tag.starts_with("select ") {
            let end = at + form[at..].find("</select>").unwrap();
            let options: Vec<Vec<(String, String)>> = form[at..end]
                .split("<option")
                .skip(1)
                .map(|o| attributes(&["option", &o[..o.find('>').unwrap()]].concat()))
                .collect();
            let chosen = options
                .iter()
                .find(|o| o.iter().any(|(n, _)| n == "selected"))
                .or(options.first())
                .expect("a select with options");
            let value = chosen.iter().find(|(n, _)| n == "value").unwrap().1.clone();
            out.push((name, value));
        }
    }
    out
}

#[tokio::test]
async fn campaign_deliveries_the_api_makes_survive_the_form_unchanged() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let key = s.admin_key(&ws).await;
    heap_cohort(&s, &ws, "c1", "Trialists").await;
    let a = s
        .post(
            "/api/v1/segments",
            &key,
            json!({"name": "Pro", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let segment = a.body["id"].as_str().unwrap().to_owned();
    let deliveries = [
        json!({"type": "scheduled", "schedule": {"frequency": "daily", "time": "08:15",
            "in_local_time": true, "end": "2031-01-01T00:00:00Z"}}),
        json!({"type": "scheduled", "schedule": {"frequency": "weekly", "time": "18:00",
            "days": ["friday", "monday"], "start": "2030-02-01T00:00:00Z", "end": "2030-12-01T00:00:00Z"}}),
        json!({"type": "scheduled", "schedule": {"frequency": "once", "at": "2030-05-01T10:00:00Z", "in_local_time": true}}),
        json!({"type": "action_based", "delay_seconds": 300, "start": "2030-01-01T00:00:00Z", "triggers": [
            {"custom_event": {"name": "played <game>", "property_filters": [
                {"property": "level", "comparison": "greater_than", "value": 3},
                {"property": "mode", "comparison": "equals", "value": "solo & \"co\""},
                {"property": "code", "comparison": "not_equal", "value": "42"},
                {"property": "seen", "comparison": "exists"}]}},
            {"purchase": {}},
            {"purchase": {"product_id": "gold"}},
            {"cohort_entry": {"partner": "heap", "cohort_id": "c1"}},
            {"cohort_entry": {"partner": "heap", "cohort_id": "not-imported"}},
            {"segment_entry": {"segment_id": segment}}]}),
        json!({"type": "action_based", "triggers": [{"cohort_entry": {"cohort_id": "c1"}}]}),
    ];
    for delivery in deliveries {
        let a = s
            .post(
                "/api/v1/campaigns",
                &key,
                json!({"name": "Round trip", "delivery": delivery, "control_percent": 10,
                    "audience": {"segment_ids": [segment]}, "reeligibility": {"after_seconds": 3600},
                    "messages": [
                        {"channel": "webhook", "url": "http://127.0.0.1:9/h", "body": "x", "percent": 50,
                         "request_headers": {"X-A": "b"}},
                        {"channel": "email", "from": "T <t@example.com>", "subject": "S", "body": "<p>b</p>",
                         "percent": 40, "plaintext_body": "b"}]}),
            )
            .await;
        assert_eq!(a.status, 201, "{delivery}: {a:?}");
        let id = a.body["campaign"]["id"].as_str().unwrap().to_owned();
        let before = s.store.campaign(ws.id, &id).await.unwrap().unwrap();
        let edit = b.get(&format!("{w}/campaigns/{id}/edit")).await;
        assert_eq!(edit.status, 200, "{delivery}: {}", edit.body);
        let action = format!("{w}/campaigns/{id}");
        let fields = submitted(&edit.body, &action);
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(k, _)| k != "csrf")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let saved = b.post(&action, &fields).await;
        assert_eq!(saved.status, 303, "{delivery}: {}", saved.body);
        let after = s.store.campaign(ws.id, &id).await.unwrap().unwrap();
        assert_eq!(after.name, before.name);
        assert_eq!(after.definition, before.definition, "{delivery}");
    }
}

#[tokio::test]
async fn campaign_form_edits_triggers_and_recurring_schedules_and_refuses_bad_ones() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let base = [
        ("name", "Triggers"),
        ("v0_channel", "webhook"),
        ("v0_percent", "100"),
        ("v0_url", "http://127.0.0.1:9/hook"),
        ("v0_body", "hi"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut f: Vec<(&str, &str)> = base.to_vec();
        f.extend_from_slice(extra);
        f
    };
    // "Add a trigger" and "Add a property filter" show the form again, nothing saved.
    let added = b
        .post(
            &format!("{w}/campaigns"),
            &with(&[
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t0_event", "e"),
                ("add", "trigger"),
            ]),
        )
        .await;
    assert_eq!(added.status, 200);
    assert!(added.body.contains("id=\"t1-kind\"") && added.body.contains("value=\"e\""));
    let filtered = b
        .post(
            &format!("{w}/campaigns"),
            &with(&[
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t1_kind", "purchase"),
                ("add", "filter:t1"),
            ]),
        )
        .await;
    assert!(
        filtered.body.contains("id=\"t1f0-property\"")
            && !filtered.body.contains("id=\"t0f0-property\"")
    );
    let removed = b
        .post(
            &format!("{w}/campaigns"),
            &with(&[
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t0_event", "first"),
                ("t1_kind", "custom_event"),
                ("t1_event", "second"),
                ("remove", "t0"),
            ]),
        )
        .await;
    assert!(removed.body.contains("value=\"second\"") && !removed.body.contains("value=\"first\""));
    assert!(s.store.list_campaigns(ws.id).await.unwrap().is_empty());

    // Bad input: 400 with the message beside its field, nothing saved.
    for (extra, field_id, says) in [
        (
            vec![
                ("delivery", "scheduled"),
                ("frequency", "weekly"),
                ("time", "09:00"),
            ],
            "days-error",
            "weekday",
        ),
        (
            vec![
                ("delivery", "scheduled"),
                ("frequency", "daily"),
                ("time", "9am"),
            ],
            "send-time-error",
            "HH:MM",
        ),
        (
            vec![
                ("delivery", "scheduled"),
                ("frequency", "daily"),
                ("time", "09:00"),
                ("end", "soon"),
            ],
            "delivery-end-error",
            "ISO-8601",
        ),
        (
            vec![("delivery", "scheduled"), ("frequency", "hourly")],
            "frequency-error",
            "once, daily or weekly",
        ),
        (
            vec![
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t0_event", " "),
            ],
            "t0-event-error",
            "must not be empty",
        ),
        (
            vec![
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t0_event", "e"),
                ("t0f0_property", "level"),
                ("t0f0_comparison", "greater_than"),
                ("t0f0_value", "high"),
            ],
            "t0f0-value-error",
            "must be a number",
        ),
        (
            vec![
                ("delivery", "action_based"),
                ("t0_kind", "purchase"),
                ("t1_kind", "segment_entry"),
            ],
            "t1-segment-error",
            "Pick the segment",
        ),
        (
            vec![
                ("delivery", "action_based"),
                ("t0_kind", "segment_entry"),
                ("t0_segment", "nope"),
            ],
            "t0-segment-error",
            "nope",
        ),
        (
            vec![("delivery", "action_based"), ("t0_kind", "cohort_entry")],
            "t0-cohort-error",
            "Pick the cohort",
        ),
        (
            vec![("delivery", "action_based"), ("t0_kind", "teleport")],
            "t0-kind-error",
            "Choose what triggers",
        ),
        (
            vec![
                ("delivery", "action_based"),
                ("t0_kind", "purchase"),
                ("delay", "soon"),
            ],
            "delay-error",
            "whole number",
        ),
    ] {
        let answer = b.post(&format!("{w}/campaigns"), &with(&extra)).await;
        assert_eq!(answer.status, 400, "{extra:?}: {}", answer.body);
        let at = answer
            .body
            .find(&format!("id=\"{field_id}\""))
            .unwrap_or_else(|| panic!("{field_id} for {extra:?} in {}", answer.body));
        assert!(
            answer.body[at..].contains(says),
            "{says}: {}",
            &answer.body[at..]
        );
    }
    assert!(s.store.list_campaigns(ws.id).await.unwrap().is_empty());

    // Saved: two triggers (one with a filter) and then a weekly schedule in local time.
    let created = b
        .post(
            &format!("{w}/campaigns"),
            &with(&[
                ("delivery", "action_based"),
                ("t0_kind", "custom_event"),
                ("t0_event", "played"),
                ("t0f0_property", "level"),
                ("t0f0_comparison", "greater_than"),
                ("t0f0_value", "3"),
                ("t0f1_property", ""),
                ("t0f1_comparison", "equals"),
                ("t0f1_value", ""),
                ("t1_kind", "purchase"),
                ("t1_product", ""),
                ("delay", "60"),
            ]),
        )
        .await;
    assert_eq!(created.status, 303, "{}", created.body);
    let c = s.store.list_campaigns(ws.id).await.unwrap().remove(0);
    assert_eq!(
        c.definition["delivery"],
        json!({"type": "action_based", "delay_seconds": 60, "start": null, "end": null, "triggers": [
            {"custom_event": {"name": "played", "property_filters": [{"property": "level", "comparison": "greater_than", "value": 3}]}},
            {"purchase": {"product_id": null}}]})
    );
    let variant_id = c.definition["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut weekly = with(&[
        ("delivery", "scheduled"),
        ("frequency", "weekly"),
        ("time", "07:30"),
        ("day", "saturday"),
        ("day", "tuesday"),
        ("local_time", "true"),
    ]);
    weekly.push(("v0_id", &variant_id));
    let saved = b.post(&format!("{w}/campaigns/{}", c.id), &weekly).await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let c = s.store.campaign(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!(
        c.definition["delivery"],
        json!({"type": "scheduled", "schedule": {"frequency": "weekly", "time": "07:30",
            "days": ["tuesday", "saturday"], "start": null, "end": null, "in_local_time": true}})
    );
    let page = b.get(&format!("{w}/campaigns/{}/edit", c.id)).await.body;
    assert!(
        page.contains("value=\"weekly\" checked") && page.contains("value=\"saturday\" checked"),
        "{page}"
    );
}

#[tokio::test]
async fn canvas_message_steps_are_previewed_for_a_user_with_entry_properties() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    user(&s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let key = s.admin_key(&ws).await;
    let doc = json!({"name": "Onboarding <1>", "entry": {"type": "api_triggered"}, "steps": [
        {"id": "hook", "name": "Ping", "type": "message", "next": "wait",
         "message": {"channel": "webhook", "url": "http://127.0.0.1:9/{{canvas_entry_properties.${plan}}}",
            "body": "Hi {{${first_name}}} on {{context.${plan}}} from {{canvas.${name}}}, step {{campaign.${name}}}",
            "request_headers": {"X-Plan": "{{context.${plan} | default: 'none'}}"}}},
        {"id": "wait", "name": "Two days", "type": "delay", "delay": {"seconds": 172800}, "next": "mail"},
        {"id": "mail", "name": "Reminder", "type": "message",
         "message": {"channel": "email", "from": "T <t@example.com>",
            "subject": "{% if context.${plan} == 'gold' %}{% abort_message('gold users skip this') %}{% endif %}Hello",
            "body": "<p>{{${first_name}}}</p>",
            "plaintext_body": "{{${first_name}}} saw {{event_properties.${sku} | default: 'nothing'}}"}}]});
    let a = s.post("/api/v1/canvases", &key, doc).await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "ada", "first_name": "Ada <3"}]}),
        )
        .await;
    assert_eq!(a.status, 201);
    let page = |query: &str| {
        let b = &b;
        let url = format!("{w}/canvases/{id}?{query}");
        async move { b.get(&url).await }
    };
    let plain = page("").await;
    assert_eq!(plain.status, 200);
    assert!(plain.body.contains("id=\"preview-entry\"") && !plain.body.contains("preview-result"));

    let entry = form_urlencoded::byte_serialize(br#"{"plan": "silver"}"#).collect::<String>();
    let silver = page(&format!("preview=ada&entry={entry}")).await;
    assert_eq!(silver.status, 200, "{}", silver.body);
    for rendered in [
        "http://127.0.0.1:9/silver",
        "Hi Ada &lt;3 on silver from Onboarding &lt;1&gt;, step Ping",
        "steps[0].message.request_headers.X-Plan",
        "steps[2].message.subject",
        "<pre class=\"card mono\">Hello</pre>",
        "steps[2].message.plaintext_body",
    ] {
        assert!(
            silver.body.contains(rendered),
            "{rendered}: {}",
            silver.body
        );
    }
    assert!(silver.body.contains("saw nothing"), "{}", silver.body);
    // Event properties: what a step after Action Paths sees of the matched action.
    let event = form_urlencoded::byte_serialize(br#"{"sku": "tea <1>"}"#).collect::<String>();
    let with_event = page(&format!("preview=ada&entry={entry}&event={event}")).await;
    assert_eq!(with_event.status, 200, "{}", with_event.body);
    assert!(
        with_event.body.contains("saw tea &lt;1&gt;")
            && with_event.body.contains("id=\"preview-event\""),
        "{}",
        with_event.body
    );
    // Without entry properties, and with ones that make a template abort.
    let none = page("preview=ada").await;
    assert!(
        none.body.contains("http://127.0.0.1:9/<")
            || none.body.contains("http://127.0.0.1:9/</pre>"),
        "{}",
        none.body
    );
    assert!(
        none.body.contains("<pre class=\"card mono\">none</pre>"),
        "{}",
        none.body
    );
    let entry = form_urlencoded::byte_serialize(br#"{"plan": "gold"}"#).collect::<String>();
    let gold = page(&format!("preview=ada&entry={entry}")).await;
    assert_eq!(gold.status, 200);
    assert!(gold.body.contains("gold users skip this"), "{}", gold.body);

    // Bad input: a clear message on the page with a 4xx, never a 500.
    for (query, status, says) in [
        (
            "preview=nobody".to_owned(),
            404,
            "No user has that external id.",
        ),
        (
            format!(
                "preview=ada&entry={}",
                form_urlencoded::byte_serialize(b"[1]").collect::<String>()
            ),
            400,
            "must be a JSON object",
        ),
        (
            format!(
                "preview=ada&entry={}",
                form_urlencoded::byte_serialize(b"{\"plan\":").collect::<String>()
            ),
            400,
            "are not JSON",
        ),
        (
            format!("preview={}", "x".repeat(1000)),
            400,
            "not an external id",
        ),
        (
            format!(
                "preview=ada&event={}",
                form_urlencoded::byte_serialize(b"\"tea\"").collect::<String>()
            ),
            400,
            "Event properties must be a JSON object",
        ),
    ] {
        let answer = page(&query).await;
        assert_eq!(answer.status, status, "{query}: {}", answer.body);
        assert!(answer.body.contains(says), "{query}: {}", answer.body);
        assert!(
            answer.body.contains("id=\"canvas-steps\""),
            "the page is still shown"
        );
    }
}

/// `fields` with `name` set to `value` (it must be one of the form's fields: a test that
/// names a field the page does not have fails here).
fn set(fields: &mut [(String, String)], name: &str, value: &str) {
    let Some(at) = fields.iter().position(|(k, _)| k == name) else {
        panic!("no field {name} in {fields:?}");
    };
    fields[at].1 = value.to_owned();
}

/// `fields` as [`Browser::post`] takes them (its own CSRF token, not the page's).
fn pairs(fields: &[(String, String)]) -> Vec<(&str, &str)> {
    fields
        .iter()
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canvases_are_built_with_fields_and_drawn_as_a_graph() {
    let t = crate::messaging::setup().await;
    let (s, ws) = (&t.s, &t.ws);
    user(s, "admin", Role::Admin).await;
    let b = sign_in(&s.base, "admin").await;
    let w = format!("/dashboard/w/{}", ws.id.0);
    let create = format!("{w}/canvases");
    let new = b.get(&format!("{w}/canvases/new")).await;
    assert_eq!(new.status, 200);
    for expected in ["id=\"add-step\"", "id=\"edit-as-json\"", "id=\"s0-fields\""] {
        assert!(new.body.contains(expected), "{expected}: {}", new.body);
    }
    assert!(!new.body.contains("id=\"canvas-definition\""));

    // Steps are added by posting the form back with the "Add a step" button, of the kind
    // chosen beside it, and removed by a step's "Remove" button; nothing is saved meanwhile.
    let mut page = new.body;
    for kind in [
        "delay",
        "decision_split",
        "message",
        "message",
        "user_update",
    ] {
        let mut fields = submitted(&page, &create);
        set(&mut fields, "new_step_kind", kind);
        fields.push(("add".into(), "step".into()));
        let answer = b.post(&create, &pairs(&fields)).await;
        assert_eq!(answer.status, 200, "{kind}: {}", answer.body);
        page = answer.body;
    }
    assert!(page.contains("id=\"s5-fields\"") && page.contains("User Update"));
    let mut fields = submitted(&page, &create);
    fields.push(("remove".into(), "s5".into()));
    let answer = b.post(&create, &pairs(&fields)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    page = answer.body;
    assert!(page.contains("id=\"s4-fields\"") && !page.contains("id=\"s5-fields\""));
    assert!(s.store.list_canvases(ws.id).await.unwrap().is_empty());

    // The journey: a webhook, two days, on Pro? yes: an email, no: another webhook.
    let mut fields = submitted(&page, &create);
    for (name, value) in [
        ("name", "Trial <form>"),
        ("s0_name", "Ping <one>"),
        ("s0_url", t.hook_url.as_str()),
        ("s0_body", "hi {{${user_id}}}"),
        ("s0_next", "step-1"),
        ("s1_name", "Wait & see"),
        ("s1_wait", "2"),
        ("s1_wait_unit", "days"),
        ("s1_next", "step-2"),
        ("s2_name", "On Pro?"),
        (
            "s2_filter",
            r#"{"attribute": {"name": "plan", "op": "equals", "value": "pro"}}"#,
        ),
        ("s2_yes", "step-3"),
        ("s2_no", "step-4"),
        ("s3_name", "Pro mail"),
        ("s3_channel", "email"),
        ("s3_from", "T <t@example.com>"),
        ("s3_subject", "Hi {{${first_name}}}"),
        ("s3_body", "<p>pro</p>"),
        ("s4_name", "Free hook"),
        ("s4_url", t.hook_url.as_str()),
        ("s4_body", "free"),
    ] {
        set(&mut fields, name, value);
    }
    // A refusal of the API's check is shown beside the field it names; nothing is saved.
    let mut too_long = fields.clone();
    set(&mut too_long, "s1_wait", "99");
    let refused = b.post(&create, &pairs(&too_long)).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let at = refused
        .body
        .find("id=\"s1-wait-error\"")
        .unwrap_or_else(|| panic!("the error beside the delay: {}", refused.body));
    assert!(refused.body[at..].contains("steps[1].delay.seconds"));
    assert!(
        refused.body.contains("value=\"99\""),
        "the form keeps what was written"
    );
    assert!(s.store.list_canvases(ws.id).await.unwrap().is_empty());
    let mut not_json = fields.clone();
    set(&mut not_json, "s2_filter", "{plan: pro");
    let refused = b.post(&create, &pairs(&not_json)).await;
    assert_eq!(refused.status, 400);
    let at = refused.body.find("id=\"s2-filter-error\"").unwrap();
    assert!(refused.body[at..].contains("is not JSON"));
    assert!(s.store.list_canvases(ws.id).await.unwrap().is_empty());

    let made = b.post(&create, &pairs(&fields)).await;
    assert_eq!(made.status, 303, "{}", made.body);
    let canvases = s.store.list_canvases(ws.id).await.unwrap();
    assert_eq!(canvases.len(), 1);
    let c = canvases[0].clone();
    assert_eq!(c.name, "Trial <form>");
    let steps = c.definition["steps"].as_array().unwrap();
    let shape: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        shape,
        [
            ("welcome", "message"),
            ("step-1", "delay"),
            ("step-2", "decision_split"),
            ("step-3", "message"),
            ("step-4", "message")
        ]
    );
    assert_eq!(steps[1]["delay"], json!({"seconds": 172_800}));
    assert_eq!(
        (&steps[2]["yes"], &steps[2]["no"]),
        (&json!("step-3"), &json!("step-4"))
    );
    assert_eq!(steps[3]["message"]["subject"], "Hi {{${first_name}}}");

    // Opened in the editor and saved unchanged, it is the same Canvas (no new version).
    let edit_url = format!("{w}/canvases/{}/edit", c.id);
    let edit = b.get(&edit_url).await;
    assert_eq!(edit.status, 200);
    assert!(
        edit.body.contains("id=\"s4-fields\"") && edit.body.contains("value=\"Wait &amp; see\"")
    );
    let action = format!("{w}/canvases/{}", c.id);
    let saved = b
        .post(&action, &pairs(&submitted(&edit.body, &action)))
        .await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let after = s.store.canvas(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!((&after.definition, after.version), (&c.definition, 1));

    // The JSON alternative still edits it: three days instead of two is version 2.
    let json_form = b.get(&format!("{edit_url}?as=json")).await;
    assert_eq!(json_form.status, 200);
    let mut fields = submitted(&json_form.body, &action);
    let doc = fields
        .iter()
        .find(|(k, _)| k == "definition")
        .unwrap()
        .1
        .clone();
    assert!(doc.contains("172800"));
    set(&mut fields, "definition", &doc.replace("172800", "259200"));
    let saved = b.post(&action, &pairs(&fields)).await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let after = s.store.canvas(ws.id, &c.id).await.unwrap().unwrap();
    assert_eq!(after.version, 2);
    assert_eq!(after.definition["steps"][1]["delay"]["seconds"], 259_200);

    // Without the CSRF token the editor's form is refused, and nothing changes.
    let fields = submitted(&edit.body, &action);
    let refused = b
        .post_as(&action, &pairs(&fields), false, Some("same-origin"))
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        s.store.canvas(ws.id, &c.id).await.unwrap().unwrap().version,
        2
    );

    // Launched, a user enters and waits in the delay: the graph shows them there.
    t.track(json!([{"external_id": "u1", "plan": "free"}]))
        .await;
    let launched = b.post(&format!("{w}/canvases/{}/launch", c.id), &[]).await;
    assert_eq!(launched.status, 303, "{}", launched.body);
    let a = s
        .post(
            "/canvas/trigger/send",
            &t.key,
            json!({"canvas_id": c.id, "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    crate::canvas::until("u1 in the delay", async || {
        let counts = s.store.canvas_step_counts(ws.id, &c.id).await.unwrap();
        counts
            .iter()
            .any(|n| n.step_id == "step-1" && n.in_step == 1)
            .then_some(())
    })
    .await;
    let shown = b.get(&action).await.body;
    let start = shown.find("<svg").expect("the graph");
    let svg = &shown[start..start + shown[start..].find("</svg>").unwrap()];
    for expected in [
        "role=\"img\"",
        "<title id=\"canvas-graph-title\">",
        "<desc id=\"canvas-graph-desc\">",
        "Ping &lt;one&gt;",
        "Wait &amp; see",
        "On Pro?",
        "Pro mail",
        "Free hook",
        ">Yes<",
        ">No<",
    ] {
        assert!(svg.contains(expected), "{expected}: {svg}");
    }
    assert!(!svg.contains("<one>") && !svg.contains("<script"));
    let node = |id: &str| {
        let at = svg.find(&format!("href=\"#step-{id}\"")).unwrap();
        &svg[at..at + svg[at..].find("</a>").unwrap()]
    };
    assert!(
        node("step-1").contains(">1 in step now<"),
        "{}",
        node("step-1")
    );
    assert!(node("welcome").contains(">0 in step now<"));
    // The step list stays, as the text beside the picture.
    assert!(shown.contains("id=\"canvas-steps\""));
}
