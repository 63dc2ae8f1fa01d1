//! The dashboard: server-rendered HTML pages under `/dashboard` for the people who run a
//! workspace — the integration guide's screens (Technology Partners › Heap, Cohorts, Developer
//! Console › REST API keys, …) in a browser.
//!
//! Rules every page keeps:
//! - **Templates are maud** (compile-time checked, auto-escaping): user-supplied text is always
//!   shown as text; no HTML is built with `format!`.
//! - **Sign-in and sessions** (`auth.rs`): a session is a random cookie token whose SHA-256 is
//!   stored with its user, expiry and CSRF token in the store ([`DashboardStore`]), so sessions
//!   hold across nodes. The cookie is `HttpOnly; SameSite=Lax; Path=/dashboard`, and `Secure`
//!   when the public URL is https.
//! - **Every change is a POST behind `guard`**: the `Sec-Fetch-Site` header must be
//!   `same-origin` or `none` (or absent), the session's CSRF token must come back in the form
//!   (`csrf`) or the `X-CSRF-Token` header (htmx), and the user must be an admin — a read-only
//!   user sees every page and is refused every change with 403.
//! - **Handlers call the same services and store traits as the REST API**; no business rule
//!   lives here, and no page reads all users (counts come from the segment index's size, lists
//!   from the store's listings, members a page at a time).
//! - **Content-Security-Policy** without inline scripts: scripts and styles are the files of
//!   `assets.rs`, compiled into the binary.
//!
//! Pages: `home.rs` (counts), `heap.rs` (Technology Partners › Heap), `cohorts.rs`,
//! `lookup.rs` (user lookup: profile, events and purchases, cohorts, segments, recent
//! messages), `campaigns.rs` (list, create and edit with several variants, launch / pause /
//! stop; its form's Delivery fieldset — scheduled once or recurring, action-based with several
//! triggers — in `delivery.rs`), `canvases.rs` (list, a Canvas as its steps with their
//! figures and as a graph — `canvas_graph.rs`, an SVG — create and edit with the editor's
//! fields — `canvas_form.rs` — or as JSON, launch / pause / stop), `segments.rs` (list, builder with live
//! size, members, CSV), `currents.rs` (Data Export: Currents), `api_keys.rs` (Developer
//! Console › REST API keys); `layout.rs` is the frame around them, `forms.rs` what every form
//! shares, `preview.rs` the Liquid preview for a chosen user that the campaign and Canvas
//! pages share.
//!
//! [`DashboardStore`]: tideway_core::store::DashboardStore

mod api_keys;
mod assets;
mod auth;
mod campaigns;
mod canvas_form;
mod canvas_graph;
mod canvases;
mod cohorts;
mod currents;
mod delivery;
mod forms;
mod heap;
mod home;
mod layout;
mod lookup;
mod preview;
mod segments;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use std::collections::HashMap;
use subtle::ConstantTimeEq;
use tideway_core::clock::Millis;
use tideway_core::ids::WorkspaceId;
use tideway_core::keys::KeyHash;
use tideway_core::store::{DashboardSession, StoreError, Workspace};

use crate::AppState;

pub use auth::SESSION_COOKIE;
pub(crate) use forms::FormData;

/// Settings of the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DashboardConfig {
    /// The address people and partners reach this server at (`--public-url`); shown as the
    /// REST endpoint. `None`: the request's own `Host`.
    pub public_url: Option<String>,
}

impl DashboardConfig {
    /// Cookies get `Secure` when the dashboard is served over HTTPS.
    pub fn secure_cookies(&self) -> bool {
        self.public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    }
}

/// Largest form body a dashboard POST may send.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The dashboard's routes, to merge into the app. `state` is the app's own (the guard needs it
/// before the router's state is applied).
pub fn router(state: AppState) -> Router<AppState> {
    let signed_in = Router::new()
        .route("/dashboard", get(root))
        .route("/dashboard/", get(root))
        .route("/dashboard/switch", get(switch))
        .route("/dashboard/logout", post(auth::logout))
        .route("/dashboard/w/{ws}", get(home::page))
        .route("/dashboard/w/{ws}/", get(home::page))
        .route("/dashboard/w/{ws}/partners/heap", get(heap::page))
        .route(
            "/dashboard/w/{ws}/partners/heap/keys",
            get(up_one).post(heap::generate),
        )
        .route(
            "/dashboard/w/{ws}/partners/heap/rotate",
            get(up_one).post(heap::rotate),
        )
        .route(
            "/dashboard/w/{ws}/partners/heap/keys/{id}/invalidate",
            post(heap::invalidate),
        )
        .route(
            "/dashboard/w/{ws}/partners/heap/enabled",
            post(heap::enabled),
        )
        .route("/dashboard/w/{ws}/cohorts", get(cohorts::list))
        .route(
            "/dashboard/w/{ws}/cohorts/{partner}/{cohort}",
            get(cohorts::members),
        )
        .route("/dashboard/w/{ws}/users", get(lookup::page))
        .route(
            "/dashboard/w/{ws}/segments",
            get(segments::list).post(segments::create),
        )
        .route("/dashboard/w/{ws}/segments/new", get(segments::new_page))
        .route(
            "/dashboard/w/{ws}/segments/builder",
            post(segments::builder),
        )
        .route(
            "/dashboard/w/{ws}/segments/preview",
            post(segments::preview),
        )
        .route(
            "/dashboard/w/{ws}/segments/{id}",
            get(segments::edit_page).post(segments::update),
        )
        .route(
            "/dashboard/w/{ws}/segments/{id}/delete",
            get(up_one).post(segments::delete),
        )
        .route(
            "/dashboard/w/{ws}/segments/{id}/members",
            get(segments::members),
        )
        .route(
            "/dashboard/w/{ws}/segments/{id}/export.csv",
            get(segments::export_csv),
        )
        .route(
            "/dashboard/w/{ws}/campaigns",
            get(campaigns::list).post(campaigns::create),
        )
        .route("/dashboard/w/{ws}/campaigns/new", get(campaigns::new_form))
        .route(
            "/dashboard/w/{ws}/campaigns/{id}",
            get(campaigns::detail).post(campaigns::update),
        )
        .route(
            "/dashboard/w/{ws}/campaigns/{id}/edit",
            get(campaigns::edit_form),
        )
        .route(
            "/dashboard/w/{ws}/campaigns/{id}/{action}",
            get(up_one).post(campaigns::action),
        )
        .route(
            "/dashboard/w/{ws}/canvases",
            get(canvases::list).post(canvases::create),
        )
        .route("/dashboard/w/{ws}/canvases/new", get(canvases::new_form))
        .route(
            "/dashboard/w/{ws}/canvases/{id}",
            get(canvases::detail).post(canvases::update),
        )
        .route(
            "/dashboard/w/{ws}/canvases/{id}/edit",
            get(canvases::edit_form),
        )
        .route(
            "/dashboard/w/{ws}/canvases/{id}/{action}",
            get(up_one).post(canvases::action),
        )
        .route(
            "/dashboard/w/{ws}/currents",
            get(currents::list).post(currents::create),
        )
        .route("/dashboard/w/{ws}/currents/new", get(currents::new_form))
        .route(
            "/dashboard/w/{ws}/currents/{id}/dead-letters",
            get(currents::dead_letters),
        )
        .route(
            "/dashboard/w/{ws}/currents/{id}/replay",
            get(up_two).post(currents::replay),
        )
        .route(
            "/dashboard/w/{ws}/currents/{id}/{action}",
            get(up_two).post(currents::action),
        )
        .route(
            "/dashboard/w/{ws}/developer/api-keys",
            get(api_keys::page).post(api_keys::create),
        )
        .route(
            "/dashboard/w/{ws}/developer/api-keys/{id}/revoke",
            get(up_two).post(api_keys::revoke),
        )
        .route_layer(axum::middleware::from_fn_with_state(state, guard));
    Router::new()
        .route("/dashboard/login", get(auth::login_page).post(auth::login))
        .route("/dashboard/assets/{file}", get(assets::serve))
        .merge(signed_in)
        .layer(axum::middleware::map_response(security_headers))
}

/// A `GET` of an action's address (reloading the page an action answered, a bookmark of it):
/// the page the action belongs to, one path segment up, rather than a 405. The action itself
/// runs only on `POST`.
async fn up_one(uri: axum::http::Uri) -> Response {
    up(&uri, 1)
}

/// [`up_one`] for actions two segments below their page (`currents/{id}/test` → `currents`).
async fn up_two(uri: axum::http::Uri) -> Response {
    up(&uri, 2)
}

fn up(uri: &axum::http::Uri, segments: usize) -> Response {
    let mut path = uri.path();
    for _ in 0..segments {
        path = path.rsplit_once('/').map_or(path, |(parent, _)| parent);
    }
    axum::response::Redirect::to(path).into_response()
}

/// Headers on every dashboard response: the Content-Security-Policy (no inline scripts or
/// styles, nothing from elsewhere, no framing), no MIME sniffing, no referrer to other sites,
/// and no caching of pages (assets set their own long cache).
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The signed-in user of a request (put there by [`guard`]).
#[derive(Debug, Clone)]
pub(crate) struct Me {
    pub session: DashboardSession,
    pub token_hash: KeyHash,
}

impl Me {
    pub fn may_change(&self) -> bool {
        self.session.user.role.may_change()
    }
}

/// Why a dashboard request failed: an HTML page with the status.
#[derive(Debug)]
pub(crate) enum PageError {
    /// 400, with what to fix.
    BadRequest(String),
    /// 401: no session (a change sent without signing in).
    Unauthorized,
    /// 403, with why.
    Forbidden(&'static str),
    /// 404, naming what is missing.
    NotFound(String),
    /// 409, with why (a change the thing's state does not allow).
    Conflict(String),
    /// 413.
    TooLarge,
    /// 415.
    UnsupportedForm,
    /// 429, with when to retry.
    TooManyAttempts { retry_after_secs: u64 },
    /// 503 / 500 from the store.
    Store(StoreError),
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        PageError::Store(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            PageError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "Sign in first: your session has ended or you never signed in.".to_owned(),
            ),
            PageError::Forbidden(m) => (StatusCode::FORBIDDEN, (*m).to_owned()),
            PageError::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            PageError::Conflict(why) => (StatusCode::CONFLICT, why.clone()),
            PageError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The form is larger than {MAX_FORM_BYTES} bytes."),
            ),
            PageError::UnsupportedForm => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Send the form as application/x-www-form-urlencoded.".to_owned(),
            ),
            PageError::TooManyAttempts { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Too many failed sign-ins for this username from this address; try again in {} minutes.",
                    retry_after_secs.div_ceil(60)
                ),
            ),
            PageError::Store(StoreError::NotFound(what)) => {
                (StatusCode::NOT_FOUND, format!("{what} not found."))
            }
            PageError::Store(StoreError::Conflict(what)) => {
                (StatusCode::CONFLICT, format!("{what} already exists."))
            }
            PageError::Store(StoreError::Unavailable(why)) => {
                tracing::warn!(error = %why, "dashboard: storage unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Storage is unavailable right now; try again in a moment.".to_owned(),
                )
            }
            PageError::Store(StoreError::Invalid(why)) => (
                StatusCode::BAD_REQUEST,
                format!("This cannot be saved: {why}."),
            ),
            PageError::Store(StoreError::Corrupt(why)) => {
                tracing::error!(error = %why, "dashboard: stored data could not be read");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong; the details are in the server log.".to_owned(),
                )
            }
        };
        let page = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "Tideway — " (status.as_u16()) }
                    link rel="stylesheet" href=(assets::url("app.css"));
                }
                body {
                    main {
                        h1 { (status.canonical_reason().unwrap_or("Error")) }
                        p role="alert" { (message) }
                        p { a href="/dashboard/" { "Back to the dashboard" } }
                    }
                }
            }
        };
        let mut response = (status, page).into_response();
        if let PageError::TooManyAttempts { retry_after_secs } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let PageError::Store(StoreError::Unavailable(_)) = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Whether a state-changing request may come from where it says it comes from: refused when
/// the browser says it was sent by another site (`cross-site`) or another origin of this site
/// (`same-site`: another port of the same host still gets the `SameSite=Lax` cookie).
/// `same-origin`, `none` (typed, bookmarked) and absent (not a browser) pass; the CSRF token is
/// checked besides.
pub(crate) fn fetch_site_allowed(headers: &HeaderMap) -> bool {
    match headers.get("sec-fetch-site").map(HeaderValue::to_str) {
        None => true,
        Some(Ok("same-origin" | "none")) => true,
        Some(_) => false,
    }
}

/// Constant-time comparison of a sent token with the expected one.
pub(crate) fn tokens_match(sent: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(sent.as_bytes().ct_eq(expected.as_bytes()))
}

/// The middleware in front of every signed-in route: finds the session (none: a page is
/// redirected to sign-in, anything else refused), and for every method but GET/HEAD checks
/// `Sec-Fetch-Site`, reads the form (≤ [`MAX_FORM_BYTES`]), checks the CSRF token and the role.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match authorize(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(response) => response,
    }
}

async fn authorize(state: &AppState, req: Request) -> Result<Request, Response> {
    let now = state.dashboard_now();
    let token = auth::session_token(req.headers());
    let found = match &token {
        Some(token) => state
            .store()
            .dashboard_session(token.hash(), now)
            .await
            .map_err(|e| PageError::from(e).into_response())?,
        None => None,
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    let (Some(session), Some(token)) = (found, token) else {
        if safe {
            // Back to this page once signed in.
            let here = req
                .uri()
                .path_and_query()
                .map_or("/dashboard/", |p| p.as_str());
            let login = match auth::return_to(here) {
                Some(here) => {
                    let next: String = form_urlencoded::byte_serialize(here.as_bytes()).collect();
                    ["/dashboard/login?next=", &next].concat()
                }
                None => "/dashboard/login".to_owned(),
            };
            return Err(Redirect::to(&login).into_response());
        }
        return Err(PageError::Unauthorized.into_response());
    };
    let me = Me {
        session,
        token_hash: token.hash(),
    };
    if safe {
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(me);
        return Ok(Request::from_parts(parts, body));
    }
    if !fetch_site_allowed(req.headers()) {
        return Err(
            PageError::Forbidden("Refused: this form was sent from another site.").into_response(),
        );
    }
    let (mut parts, body) = req.into_parts();
    let form_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| PageError::TooLarge.into_response())?;
    match form_type.as_deref() {
        Some("application/x-www-form-urlencoded") => {}
        None if bytes.is_empty() => {}
        _ => return Err(PageError::UnsupportedForm.into_response()),
    }
    let form = FormData::parse(&bytes);
    let sent = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| form.get("csrf"))
        .unwrap_or("");
    if !tokens_match(sent, me.session.csrf.expose()) {
        return Err(PageError::Forbidden(
            "Refused: the form's security token is missing or out of date. Reload the page and try again.",
        )
        .into_response());
    }
    // Signing out is the one change a read-only user may make.
    if !me.may_change() && parts.uri.path() != "/dashboard/logout" {
        return Err(
            PageError::Forbidden("Your role is read-only: you can look, not change.")
                .into_response(),
        );
    }
    form.refuse_nul().map_err(IntoResponse::into_response)?;
    parts.extensions.insert(me);
    parts.extensions.insert(form);
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// What every workspace page renders with: who is signed in, the workspace, and the others
/// (for the switcher).
pub(crate) struct Ctx {
    pub me: Me,
    pub workspace: Workspace,
    pub workspaces: Vec<Workspace>,
    /// Whether this server runs the Currents exporter (else the Currents pages are not linked).
    pub currents: bool,
}

impl Ctx {
    /// The workspace of the path, or 404.
    pub async fn load(state: &AppState, me: Me, ws: i64) -> Result<Ctx, PageError> {
        let workspaces = state.store().list_workspaces().await?;
        let workspace = workspaces
            .iter()
            .find(|w| w.id == WorkspaceId(ws))
            .cloned()
            .ok_or_else(|| PageError::NotFound(format!("No workspace {ws}.")))?;
        Ok(Ctx {
            me,
            workspace,
            workspaces,
            currents: state.currents().is_some(),
        })
    }

    /// `/dashboard/w/<id><rest>`.
    pub fn url(&self, rest: &str) -> String {
        workspace_url(self.workspace.id, rest)
    }

    pub fn csrf(&self) -> &str {
        self.me.session.csrf.expose()
    }

    /// The hidden CSRF field every form carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf()); }
    }
}

pub(crate) fn workspace_url(ws: WorkspaceId, rest: &str) -> String {
    let mut url = String::from("/dashboard/w/");
    url.push_str(&ws.0.to_string());
    url.push_str(rest);
    url
}

/// `/dashboard`: the first workspace's home.
async fn root(
    State(state): State<AppState>,
    axum::Extension(_me): axum::Extension<Me>,
) -> Result<Response, PageError> {
    let workspaces = state.store().list_workspaces().await?;
    match workspaces.first() {
        Some(w) => Ok(Redirect::to(&workspace_url(w.id, "/")).into_response()),
        None => Err(PageError::NotFound(
            "There is no workspace yet; create one with `tideway workspaces create NAME`.".into(),
        )),
    }
}

/// `/dashboard/switch?ws=ID`: the workspace switcher's target (works without a script).
async fn switch(
    State(state): State<AppState>,
    axum::Extension(_me): axum::Extension<Me>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id: i64 = params
        .get("ws")
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| PageError::BadRequest("Choose a workspace.".into()))?;
    let workspaces = state.store().list_workspaces().await?;
    let ws = workspaces
        .iter()
        .find(|w| w.id.0 == id)
        .ok_or_else(|| PageError::NotFound(format!("No workspace {id}.")))?;
    Ok(Redirect::to(&workspace_url(ws.id, "/")).into_response())
}

/// The path's parameters, by name.
pub(crate) type PathParams = Path<HashMap<String, String>>;

/// A path's workspace id, or 400.
pub(crate) fn ws_id(params: &HashMap<String, String>) -> Result<i64, PageError> {
    params
        .get("ws")
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| {
            PageError::BadRequest("The workspace in the address is not a number.".into())
        })
}

/// A path parameter, or 400.
pub(crate) fn path_param<'a>(
    params: &'a HashMap<String, String>,
    name: &str,
) -> Result<&'a str, PageError> {
    params
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| PageError::BadRequest(format!("The address lacks its {name}.")))
}

/// A point in time as pages show it (UTC, to the second).
pub(crate) fn when(at: Millis) -> String {
    let iso = at.to_iso();
    // 2024-01-02T03:04:05.678Z -> 2024-01-02 03:04:05 UTC
    match (iso.get(..10), iso.get(11..19)) {
        (Some(date), Some(time)) => {
            let mut s = String::with_capacity(23);
            s.push_str(date);
            s.push(' ');
            s.push_str(time);
            s.push_str(" UTC");
            s
        }
        _ => iso,
    }
}

/// `raw` percent-encoded as one path segment (everything but RFC 3986's unreserved bytes).
pub(crate) fn segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push_str(&hex::encode_upper([b]));
        }
    }
    out
}

/// 303 See Other back to a page after a change (POST/redirect/GET).
pub(crate) fn see_other(url: &str) -> Response {
    Redirect::to(url).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_secure_exactly_when_served_over_https() {
        let with = |url: Option<&str>| DashboardConfig {
            public_url: url.map(str::to_owned),
        };
        assert!(with(Some("https://tideway.example")).secure_cookies());
        assert!(!with(Some("http://10.0.0.5:4000")).secure_cookies());
        assert!(!with(None).secure_cookies());
    }

    #[test]
    fn only_same_origin_or_direct_requests_may_change_things() {
        let headers = |site: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(site) = site {
                h.insert("sec-fetch-site", HeaderValue::from_str(site).unwrap());
            }
            h
        };
        for ok in [None, Some("same-origin"), Some("none")] {
            assert!(fetch_site_allowed(&headers(ok)), "{ok:?}");
        }
        for refused in ["cross-site", "same-site", "", "Same-Origin"] {
            assert!(!fetch_site_allowed(&headers(Some(refused))), "{refused}");
        }
    }

    #[test]
    fn tokens_compare_whole_and_never_match_an_empty_expectation() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("ab", "abc"));
        assert!(!tokens_match("abcd", "abc"));
        assert!(!tokens_match("", ""));
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(segment("c-1_a.b~"), "c-1_a.b~");
        assert_eq!(segment("a/b c?d#é"), "a%2Fb%20c%3Fd%23%C3%A9");
    }

    #[test]
    fn times_show_to_the_second_in_utc() {
        assert_eq!(when(Millis(1_704_164_645_678)), "2024-01-02 03:04:05 UTC");
    }
}
