//! Email tracking and subscription links, served to whoever holds the link: no API key, the
//! signed token in the path is the credential (`tideway_messaging::tracking`: it names the
//! workspace, the sent message and, for a click, the link; a token that does not verify is a
//! 404, never a 5xx).
//!
//! - `GET /t/o/{token}[.gif]`: the open pixel, a 1×1 transparent GIF (`Cache-Control:
//!   no-store`); records `users.messages.email.Open` with the user agent's classification.
//! - `GET /t/c/{token}`: 302 to the link's original URL (kept with the sent message, by link
//!   index); records `users.messages.email.Click` with the URL.
//! - `GET /t/u/{token}[?state=…]`: a small confirmation page (nothing changes on a GET: mail
//!   scanners fetch links) whose form POSTs back; `POST /t/u/{token}` (also the RFC 8058
//!   one-click target, body `List-Unsubscribe=One-Click`) sets the user's `email_subscribe` to
//!   `unsubscribed` (or `subscribed` / `opted_in` with `?state=`) in one unit of work with
//!   `users.messages.email.Unsubscribe` and `users.behaviors.subscription.GlobalStateChange`.
//!   A second click changes nothing and writes nothing.
//!
//! Engagement events carry the campaign, variant, `dispatch_id` (per user for triggered
//! sends, as the send events do) and `send_id` of the message. A failure to record an open
//! still serves the pixel (the reader must never see a broken image for our sake), and is
//! logged.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;
use tideway_core::campaigns::{CampaignDefinition, user_dispatch_id};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{EventId, WorkspaceId};
use tideway_core::message_events::{MessageSource, Origin};
use tideway_core::profile::{StandardField, UserRecord};
use tideway_core::store::{DispatchSource, SentMessage, StoreError, Workspace, run_unit};
use tideway_messaging::tracking::{Action, TrackingToken, classify_user_agent};

use crate::AppState;
use crate::pipeline::now;

/// A 1×1 transparent GIF (GIF89a, 43 bytes).
const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

pub const OPENS_TOTAL: &str = "tideway_email_opens_total";
pub const CLICKS_TOTAL: &str = "tideway_email_clicks_total";
pub const UNSUBSCRIBES_TOTAL: &str = "tideway_email_unsubscribes_total";

fn event_id() -> EventId {
    EventId(uuid::Uuid::new_v4().hyphenated().to_string())
}

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="robots" content="noindex";
                title { (title) }
                style { "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;line-height:1.5}button{font-size:1rem;padding:.5rem 1rem}" }
            }
            body { (body) }
        }
    }
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The 404 every unusable link gets.
fn not_found() -> Response {
    no_store(
        (
            StatusCode::NOT_FOUND,
            page(
                "Link not found",
                html! {
                    h1 { "Link not found" }
                    p { "This link is not valid (it may have been copied incompletely)." }
                },
            ),
        )
            .into_response(),
    )
}

/// How long a verified link waits for its message's settlement to commit.
const SETTLEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A link's token, verified, with the sent message it names.
struct Link {
    token: TrackingToken,
    workspace: Workspace,
    sent: SentMessage,
}

/// Verifies `raw` and loads what it names; `None` for anything unusable (bad signature,
/// unknown message, messaging not running). Store failures are logged and also `None`.
async fn resolve(state: &AppState, raw: &str) -> Option<Link> {
    let api = state.messaging()?;
    let token = TrackingToken::verify(&api.tracking.key, raw)?;
    let ws = WorkspaceId(token.workspace);
    let found = async {
        // The SMTP server accepts a mail a few milliseconds before its settlement commits
        // (settlements are batched); an open or click that fast (a mail client's prefetch)
        // waits for it rather than failing.
        let mut sent = state.store().sent_message(ws, token.send).await?;
        let deadline = tokio::time::Instant::now() + SETTLEMENT_WAIT;
        while sent.is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            sent = state.store().sent_message(ws, token.send).await?;
        }
        let workspace = state
            .store()
            .list_workspaces()
            .await?
            .into_iter()
            .find(|w| w.id == ws);
        Ok::<_, StoreError>(sent.zip(workspace))
    }
    .await;
    match found {
        Ok(Some((sent, workspace))) => Some(Link {
            token,
            workspace,
            sent,
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot load a tracked message");
            None
        }
    }
}

/// What an engagement event says about the message: its campaign and variant (names
/// included), dispatch and send ids.
struct Context {
    user: UserRecord,
    campaign: Option<(String, String)>,
    /// A Canvas Message step's `canvas` object (its ad-hoc dispatch carries it).
    canvas: Option<serde_json::Map<String, Value>>,
    variant: Option<(String, String)>,
    dispatch_id: String,
    send_id: Option<String>,
}

impl Context {
    fn source<'a>(&'a self, workspace: &'a Workspace) -> MessageSource<'a> {
        MessageSource {
            app_group_id: &workspace.app_group_id,
            app_id: None,
            origin: match (&self.campaign, &self.canvas) {
                (Some((id, name)), _) => Origin::Campaign {
                    campaign_id: id,
                    campaign_name: Some(name),
                    message_variation_id: self.variant.as_ref().map(|(id, _)| id.as_str()),
                    message_variation_name: self.variant.as_ref().map(|(_, n)| n.as_str()),
                },
                (None, Some(canvas)) => tideway_messaging::canvas::step_origin(canvas),
                (None, None) => Origin::AdHoc,
            },
            dispatch_id: Some(&self.dispatch_id),
            send_id: self.send_id.as_deref(),
        }
    }

    fn event_user(&self) -> EventUser<'_> {
        EventUser {
            braze_id: &self.user.braze_id,
            external_id: self.user.external_id.as_ref(),
            device_id: None,
            time_zone: self.user.time_zone(),
        }
    }
}

async fn context(state: &AppState, link: &Link) -> Result<Option<Context>, StoreError> {
    let store = state.store();
    let ws = link.workspace.id;
    let Some(user) = store
        .users_by_seq(ws, vec![link.sent.user])
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let dispatch = store.dispatch(ws, &link.sent.dispatch_id).await?;
    let variant_of = |definition: &Value| {
        CampaignDefinition::load(definition).ok().and_then(|d| {
            d.variant(&link.sent.variant)
                .map(|v| (v.id.clone(), v.name.clone()))
        })
    };
    let canvas = dispatch.as_ref().and_then(|d| match &d.source {
        DispatchSource::AdHoc { definition } => {
            definition.get("canvas").and_then(Value::as_object).cloned()
        }
        DispatchSource::Campaign { .. } | DispatchSource::Canvas { .. } => None,
    });
    let (campaign, variant, dispatch_id, send_id) = match &dispatch {
        Some(d) => {
            let (campaign, variant) = match &d.source {
                DispatchSource::Campaign { campaign_id } => {
                    match store.campaign(ws, campaign_id).await? {
                        Some(c) => (
                            Some((c.id.clone(), c.name.clone())),
                            variant_of(&c.definition),
                        ),
                        None => (Some((campaign_id.clone(), String::new())), None),
                    }
                }
                DispatchSource::AdHoc { definition } => (
                    tideway_messaging::sends::credited_campaign(definition)
                        .map(|(id, name)| (id.to_owned(), name.to_owned())),
                    variant_of(definition),
                ),
                DispatchSource::Canvas { .. } => (None, None),
            };
            let dispatch_id = if d.per_user_ids {
                user_dispatch_id(&d.id, user.braze_id.as_str())
            } else {
                d.id.clone()
            };
            (campaign, variant, dispatch_id, d.send_id.clone())
        }
        None => (None, None, link.sent.dispatch_id.clone(), None),
    };
    Ok(Some(Context {
        user,
        campaign,
        canvas,
        variant,
        dispatch_id,
        send_id,
    }))
}

fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

/// Records engagement events built from the link's context; failures are logged.
async fn record(
    state: &AppState,
    link: &Link,
    build: impl FnOnce(&Context, &MessageSource<'_>, Millis) -> CurrentsEvent,
) {
    let outcome = async {
        let Some(ctx) = context(state, link).await? else {
            return Ok(());
        };
        let event = build(&ctx, &ctx.source(&link.workspace), now());
        state
            .store()
            .record_engagement(link.workspace.id, link.sent.user, vec![event])
            .await
    }
    .await;
    if let Err(e) = outcome {
        tracing::warn!(error = %e, workspace = link.workspace.id.0, send = link.sent.id, "cannot record an email engagement");
    }
}

/// `GET /t/o/{token}`: the open pixel.
#[utoipa::path(
    get,
    path = "/t/o/{token}",
    tag = "tracking",
    summary = "Email open pixel (records users.messages.email.Open)",
    params(("token" = String, Path, description = "The signed token from the email (may end in `.gif`)")),
    responses(
        (status = 200, description = "A 1×1 transparent GIF, `Cache-Control: no-store`", content_type = "image/gif"),
        (status = 404, description = "Not a valid link", content_type = "text/html"),
    )
)]
pub async fn open(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let raw = token.strip_suffix(".gif").unwrap_or(&token);
    let Some(link) = resolve(&state, raw).await else {
        return not_found();
    };
    if !matches!(link.token.action, Action::Open) {
        return not_found();
    }
    let ua = user_agent(&headers).map(str::to_owned);
    record(&state, &link, |ctx, source, at| {
        let class = classify_user_agent(ua.as_deref());
        CurrentsEvent::email_open(
            event_id(),
            at,
            &ctx.event_user(),
            source,
            link.sent.address.as_deref().unwrap_or_default(),
            ua.as_deref(),
            &class,
        )
    })
    .await;
    metrics::counter!(OPENS_TOTAL).increment(1);
    no_store(([(header::CONTENT_TYPE, "image/gif")], PIXEL.to_vec()).into_response())
}

/// `GET /t/c/{token}`: the click redirect.
#[utoipa::path(
    get,
    path = "/t/c/{token}",
    tag = "tracking",
    summary = "Tracked link (records users.messages.email.Click)",
    params(("token" = String, Path, description = "The signed token from the email")),
    responses(
        (status = 302, description = "Redirect to the link's original URL"),
        (status = 404, description = "Not a valid link", content_type = "text/html"),
    )
)]
pub async fn click(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(link) = resolve(&state, &token).await else {
        return not_found();
    };
    let Action::Click(index) = link.token.action else {
        return not_found();
    };
    let url = link
        .sent
        .links
        .as_deref()
        .and_then(|text| serde_json::from_str::<Vec<String>>(text).ok())
        .and_then(|links| links.into_iter().nth(index as usize));
    let Some(url) = url else {
        return not_found();
    };
    let Ok(location) = HeaderValue::from_str(&url) else {
        return not_found();
    };
    let ua = user_agent(&headers).map(str::to_owned);
    record(&state, &link, |ctx, source, at| {
        let class = classify_user_agent(ua.as_deref());
        CurrentsEvent::email_click(
            event_id(),
            at,
            &ctx.event_user(),
            source,
            link.sent.address.as_deref().unwrap_or_default(),
            &url,
            &index.to_string(),
            ua.as_deref(),
            &class,
        )
    })
    .await;
    metrics::counter!(CLICKS_TOTAL).increment(1);
    no_store((StatusCode::FOUND, [(header::LOCATION, location)]).into_response())
}

/// The subscription state a link sets: `unsubscribed` unless `?state=` says otherwise.
fn target_state(params: &HashMap<String, String>) -> Option<&'static str> {
    match params.get("state").map(String::as_str) {
        None | Some("unsubscribed") => Some("unsubscribed"),
        Some("subscribed") => Some("subscribed"),
        Some("opted_in") => Some("opted_in"),
        Some(_) => None,
    }
}

/// `GET /t/u/{token}`: the confirmation page (changes nothing).
#[utoipa::path(
    get,
    path = "/t/u/{token}",
    tag = "tracking",
    summary = "Unsubscribe (or resubscribe) confirmation page",
    params(
        ("token" = String, Path, description = "The signed token from the email"),
        ("state" = Option<String>, Query, description = "`unsubscribed` (default), `subscribed` or `opted_in`"),
    ),
    responses(
        (status = 200, description = "An HTML page with a form that POSTs to the same URL", content_type = "text/html"),
        (status = 404, description = "Not a valid link", content_type = "text/html"),
    )
)]
pub async fn unsubscribe_page(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(target) = target_state(&params) else {
        return not_found();
    };
    let Some(link) = resolve(&state, &token).await else {
        return not_found();
    };
    if !matches!(link.token.action, Action::Unsubscribe) {
        return not_found();
    }
    let address = link.sent.address.clone().unwrap_or_default();
    let (title, question, button) = match target {
        "unsubscribed" => ("Unsubscribe", "Stop receiving email at", "Unsubscribe"),
        _ => ("Subscribe", "Receive email again at", "Subscribe"),
    };
    let action = match params.get("state") {
        Some(s) => format!("?state={s}"),
        None => String::new(),
    };
    no_store(
        page(
            title,
            html! {
                h1 { (title) }
                p { (question) " " strong { (address) } "?" }
                form method="post" action=(action) {
                    button type="submit" { (button) }
                }
            },
        )
        .into_response(),
    )
}

/// `POST /t/u/{token}`: sets the subscription state (idempotent).
#[utoipa::path(
    post,
    path = "/t/u/{token}",
    tag = "tracking",
    summary = "Unsubscribe (RFC 8058 one-click target): sets email_subscribe",
    params(
        ("token" = String, Path, description = "The signed token from the email"),
        ("state" = Option<String>, Query, description = "`unsubscribed` (default), `subscribed` or `opted_in`"),
    ),
    request_body(content = String, description = "Ignored (`List-Unsubscribe=One-Click` from mail clients)", content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Done (also when the state was already set: nothing is written twice)", content_type = "text/html"),
        (status = 404, description = "Not a valid link", content_type = "text/html"),
    )
)]
pub async fn unsubscribe(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(target) = target_state(&params) else {
        return not_found();
    };
    let Some(link) = resolve(&state, &token).await else {
        return not_found();
    };
    if !matches!(link.token.action, Action::Unsubscribe) {
        return not_found();
    }
    let ctx = match context(&state, &link).await {
        Ok(Some(ctx)) => ctx,
        Ok(None) => return not_found(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot load a message for an unsubscribe");
            return unavailable();
        }
    };
    let braze_id = ctx.user.braze_id.clone();
    let address = link.sent.address.clone();
    let workspace = link.workspace.clone();
    let written = run_unit(state.store(), &link.workspace, now(), move |tx, wctx| {
        let Some(mut user) = tx.user_by_braze_id(&braze_id)? else {
            return Ok(false);
        };
        let current = user
            .profile
            .standard
            .get(&StandardField::EmailSubscribe)
            .and_then(Value::as_str);
        if current == Some(target) {
            return Ok(false);
        }
        user.profile
            .standard
            .insert(StandardField::EmailSubscribe, Value::from(target));
        user.updated_at = wctx.now;
        let seq = user.seq;
        let event_user = EventUser {
            braze_id: &user.braze_id,
            external_id: user.external_id.as_ref(),
            device_id: None,
            time_zone: user.time_zone(),
        };
        let source = ctx.source(&workspace);
        let email = address
            .as_deref()
            .or(user.email.as_ref().map(|e| e.as_str()))
            .unwrap_or_default();
        let mut events = Vec::new();
        if target == "unsubscribed" {
            events.push(CurrentsEvent::email_unsubscribe(
                wctx.ids.event_id(),
                wctx.now,
                &event_user,
                &source,
                email,
            ));
        }
        events.push(CurrentsEvent::subscription_global_state_change(
            wctx.ids.event_id(),
            wctx.now,
            &event_user,
            &source,
            email,
            target,
        ));
        tx.save_user(user)?;
        for e in events {
            tx.append_event(Some(seq), e)?;
        }
        Ok(true)
    })
    .await;
    match written {
        Ok(changed) => {
            if changed && target == "unsubscribed" {
                metrics::counter!(UNSUBSCRIBES_TOTAL).increment(1);
            }
            let text = if target == "unsubscribed" {
                "You are unsubscribed. You will not receive these emails any more."
            } else {
                "You are subscribed again."
            };
            no_store(page("Done", html! { h1 { "Done" } p { (text) } }).into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record an unsubscribe");
            unavailable()
        }
    }
}

fn unavailable() -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        page(
            "Try again",
            html! { h1 { "Try again" } p { "This did not work just now; please try again in a moment." } },
        ),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    no_store(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pixel_is_a_gif() {
        assert_eq!(&PIXEL[..6], b"GIF89a");
        assert_eq!(PIXEL[PIXEL.len() - 1], 0x3b);
    }

    #[test]
    fn state_defaults_to_unsubscribed() {
        let mut p = HashMap::new();
        assert_eq!(target_state(&p), Some("unsubscribed"));
        p.insert("state".into(), "opted_in".into());
        assert_eq!(target_state(&p), Some("opted_in"));
        p.insert("state".into(), "bogus".into());
        assert_eq!(target_state(&p), None);
    }
}
