//! Signing in and out: the sign-in page, password checks against the stored argon2id hash,
//! sessions in the store, and the limit on failed sign-ins.
//!
//! The sign-in form has no session yet, so its CSRF token is a double submit: a random value
//! in a short-lived cookie (`tideway_login`, `HttpOnly; SameSite=Strict`) that the form's
//! hidden field must repeat; the `Sec-Fetch-Site` check applies too. Failed sign-ins are
//! counted in the store per (username, client address): after [`MAX_FAILURES`] within
//! [`FAILURE_WINDOW`] that pair is refused with 429 until the window has passed, before any
//! password is checked. An unknown username costs the same hash check as a known one, so the
//! answer time does not tell which usernames exist.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, html};
use tideway_core::clock::Millis;
use tideway_core::dashboard::{PasswordHash, Username};
use tideway_core::keys::Secret;
use tideway_core::store::NewSession;

use super::{FormData, MAX_FORM_BYTES, Me, PageError, assets, fetch_site_allowed, tokens_match};
use crate::AppState;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tideway_session";
/// The sign-in form's double-submit cookie.
const LOGIN_COOKIE: &str = "tideway_login";
/// How long a session lasts.
const SESSION_TTL: Millis = Millis(12 * 60 * 60 * 1000);
/// Failed sign-ins allowed per (username, address) within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// The window failed sign-ins are counted in.
pub const FAILURE_WINDOW: Millis = Millis(15 * 60 * 1000);

/// 32 random bytes as hex: session tokens, CSRF tokens.
pub(crate) fn random_token() -> Result<Secret, PageError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        PageError::Store(tideway_core::store::StoreError::Unavailable(format!(
            "no randomness: {e}"
        )))
    })?;
    Ok(Secret::new(hex::encode(bytes)))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The session token of the request's cookie, if it has one of the right shape.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<Secret> {
    cookie(headers, SESSION_COOKIE)
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|t| Secret::new(t.to_owned()))
}

fn set_cookie(
    state: &AppState,
    name: &str,
    value: &str,
    max_age_secs: i64,
    same_site: &str,
) -> HeaderValue {
    let secure = if state.config().dashboard.secure_cookies() {
        "; Secure"
    } else {
        ""
    };
    let text = [
        name,
        "=",
        value,
        "; Path=/dashboard; HttpOnly; SameSite=",
        same_site,
        "; Max-Age=",
        &max_age_secs.to_string(),
        secure,
    ]
    .concat();
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// `GET /dashboard/login`.
pub async fn login_page(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, PageError> {
    let token = match cookie(req.headers(), LOGIN_COOKIE) {
        Some(t) if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) => t.to_owned(),
        _ => random_token()?.expose().to_owned(),
    };
    let next = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "next")
            .map(|(_, v)| v.into_owned())
    });
    Ok(login_form(
        &state,
        &token,
        None,
        axum::http::StatusCode::OK,
        next.as_deref().and_then(return_to),
    ))
}

/// Where to go after signing in: a dashboard page the user was sent away from (`next`), when it
/// is one; never another site (`//host`, `/\host`), never the sign-in or sign-out page.
pub(super) fn return_to(next: &str) -> Option<&str> {
    let path = next.split(['?', '#']).next().unwrap_or_default();
    // Plain segments only: no empty, "." or ".." one (a browser would make `/dashboard/./login`
    // the sign-in page again), and printable ASCII (the request path it came from is).
    let plain = path.strip_prefix("/dashboard/").is_some_and(|rest| {
        let segments: Vec<&str> = rest.split('/').collect();
        let (last, before) = segments.split_last().unwrap_or((&"", &[]));
        before
            .iter()
            .all(|s| !s.is_empty() && *s != "." && *s != "..")
            && *last != "."
            && *last != ".."
    });
    let page = plain
        && !path.to_ascii_lowercase().contains("%2e")
        && next.is_ascii()
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_ascii_control())
        && !path.starts_with("/dashboard/login")
        && !path.starts_with("/dashboard/logout");
    page.then_some(next)
}

fn login_form(
    state: &AppState,
    token: &str,
    error: Option<&str>,
    status: axum::http::StatusCode,
    next: Option<&str>,
) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No icon: without this the browser asks for /favicon.ico, a 404 on every page.
                link rel="icon" href="data:,";
                title { "Sign in — Tideway" }
                link rel="stylesheet" href=(assets::url("app.css"));
            }
            body {
                main class="login" id="main" {
                    h1 { "Sign in to Tideway" }
                    @if let Some(error) = error {
                        p class="notice error" role="alert" { (error) }
                    }
                    form class="card" method="post" action="/dashboard/login" {
                        input type="hidden" name="csrf" value=(token);
                        @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                        label for="username" { "Username" }
                        input type="text" id="username" name="username" autocomplete="username" required autofocus;
                        label for="password" { "Password" }
                        input type="password" id="password" name="password" autocomplete="current-password" required;
                        div class="actions" { button type="submit" { "Sign in" } }
                    }
                }
            }
        }
    };
    let mut response = (status, page).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_COOKIE, token, 3600, "Strict"),
    );
    response
}

/// `POST /dashboard/login`: checks the form's token, the failure limit, then the password;
/// on success stores a session and sets its cookie.
pub async fn login(State(state): State<AppState>, req: Request) -> Result<Response, PageError> {
    if !fetch_site_allowed(req.headers()) {
        return Err(PageError::Forbidden(
            "Refused: this form was sent from another site.",
        ));
    }
    let expected = cookie(req.headers(), LOGIN_COOKIE).unwrap_or("").to_owned();
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    let bytes = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| PageError::TooLarge)?;
    let form = FormData::parse(&bytes);
    if !tokens_match(form.get("csrf").unwrap_or(""), &expected) {
        return Err(PageError::Forbidden(
            "Refused: the sign-in form's security token is missing or out of date. Reload the page and try again.",
        ));
    }
    form.refuse_nul()?;
    let typed = form.get("username").unwrap_or("").trim();
    let password = form.get("password").unwrap_or("");
    let key: String = [
        typed.chars().take(64).collect::<String>().as_str(),
        "|",
        addr.as_str(),
    ]
    .concat();
    let now = state.dashboard_now();
    let since = Millis(now.0 - FAILURE_WINDOW.0);
    let store = state.store();
    // Every attempt counts as a failure before the password is checked, recorded and counted in
    // one step that the store serialises per key, so attempts sent at once cannot all pass the
    // count before any is recorded (a check first, a record after the slow hash, let dozens
    // through); a right password then forgets the key's failures, this one included.
    let attempts = store.record_sign_in_failure(&key, now, since).await?;
    if attempts > MAX_FAILURES {
        return Err(PageError::TooManyAttempts {
            retry_after_secs: u64::try_from(FAILURE_WINDOW.secs()).unwrap_or(900),
        });
    }
    let user = match Username::parse(typed) {
        Ok(name) => store.dashboard_user(&name).await?,
        Err(_) => None,
    };
    let verified = match &user {
        Some(user) => user.password_hash.verify(password),
        None => {
            // The same work as a real check, so timing does not reveal unknown usernames.
            let _ = dummy_hash().verify(password);
            false
        }
    };
    let Some(user) = user.filter(|_| verified) else {
        tracing::info!(failures = attempts, "dashboard: failed sign-in");
        let fresh = random_token()?;
        return Ok(login_form(
            &state,
            fresh.expose(),
            Some("Wrong username or password."),
            axum::http::StatusCode::UNAUTHORIZED,
            form.get("next").and_then(return_to),
        ));
    };
    store.clear_sign_in_failures(&key).await?;
    let token = random_token()?;
    let csrf = random_token()?;
    store
        .create_dashboard_session(NewSession {
            token_hash: token.hash(),
            user_id: user.id,
            csrf,
            created_at: now,
            expires_at: Millis(now.0 + SESSION_TTL.0),
        })
        .await?;
    tracing::info!(user = %user.username, "dashboard: signed in");
    let back = form
        .get("next")
        .and_then(return_to)
        .unwrap_or("/dashboard/");
    let mut response = Redirect::to(back).into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(
            &state,
            SESSION_COOKIE,
            token.expose(),
            SESSION_TTL.secs(),
            "Lax",
        ),
    );
    headers.append(
        header::SET_COOKIE,
        set_cookie(&state, LOGIN_COOKIE, "", 0, "Strict"),
    );
    Ok(response)
}

/// `POST /dashboard/logout`: deletes the session and its cookie.
pub async fn logout(
    State(state): State<AppState>,
    axum::Extension(me): axum::Extension<Me>,
) -> Result<Response, PageError> {
    state
        .store()
        .delete_dashboard_session(me.token_hash)
        .await?;
    let mut response = Redirect::to("/dashboard/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, "", 0, "Lax"),
    );
    Ok(response)
}

/// A hash of a password no one knows, for checks against unknown usernames.
fn dummy_hash() -> &'static PasswordHash {
    static DUMMY: OnceLock<PasswordHash> = OnceLock::new();
    DUMMY.get_or_init(|| {
        PasswordHash::new("no user has this password", [0x5a; 16])
            .unwrap_or_else(|_| PasswordHash::from_stored(String::new()))
    })
}

#[cfg(test)]
mod tests {
    use super::return_to;

    #[test]
    fn only_plain_dashboard_pages_are_returned_to() {
        for page in [
            "/dashboard/w/1/",
            "/dashboard/w/1/segments/new",
            "/dashboard/w/1/users?q=ada",
        ] {
            assert_eq!(return_to(page), Some(page));
        }
        for not_one in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "/dashboard/login",
            "/dashboard/login?next=/dashboard/",
            "/dashboard/logout",
            "/dashboard//login",
            "/dashboard/./login",
            "/dashboard/w/../login",
            "/dashboard/%2e/login",
            "/dashboard/é",
            "/dashboard/w/1/\r\nX: y",
            "/elsewhere",
        ] {
            assert_eq!(return_to(not_one), None, "{not_one}");
        }
    }
}
