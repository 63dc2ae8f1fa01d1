//! Technology Partners › Heap: what a person hands to Heap (the REST endpoint, the partner API
//! key and the workspace's data import key), the data import keys themselves (generate —
//! the secret shown once —, rotate, invalidate, listed by prefix), the partner switch, Heap's
//! segment-sync webhook URL and secret, and the recent cohort syncs (what the newest
//! membership changes added to and removed from each Heap cohort, and when).
//!
//! Secrets (partner API key, webhook secret) are shown to admins only. Data import keys are
//! stored hashed: only a new key's secret can be shown, once, on the page its POST answers.

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use tideway_core::keys::Secret;
use tideway_core::store::ImportKeyInfo;

use super::layout::{self, Section};
use super::{
    Ctx, FormData, Me, PageError, PathParams, path_param, see_other, segment, when, ws_id,
};
use crate::AppState;

const PARTNER: &str = "heap";
/// Heap cohorts listed as recent syncs.
const RECENT_SYNCS: usize = 10;
/// How many of the newest membership changes the recent syncs sum up (read backwards through
/// the change log's index, never the whole history).
const RECENT_CHANGES: usize = 10_000;

/// A fresh data import key, shaped like Braze's (a hyphenated UUID v4), as `tideway partners`
/// mints them.
fn fresh_key() -> Secret {
    Secret::new(uuid::Uuid::new_v4().hyphenated().to_string())
}

/// A fresh webhook secret (two UUIDs' worth of hex), as `tideway partners heap-webhook` does.
fn fresh_webhook_secret() -> Secret {
    Secret::new(
        [
            uuid::Uuid::new_v4().simple().to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
        ]
        .concat(),
    )
}

/// The address partners reach this server at: `--public-url`, else the request's host.
pub(crate) fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config().dashboard.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    ["http://", host].concat()
}

/// `GET /dashboard/w/{ws}/partners/heap`.
pub async fn page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    headers: HeaderMap,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    render(&state, &ctx, &headers, None).await
}

async fn render(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    new_key: Option<(&Secret, &str)>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let ws = ctx.workspace.id;
    let keys = store.list_import_keys(ws, PARTNER).await?;
    let enabled = store.partner_enabled(ws, PARTNER).await?;
    let mut recent: Vec<_> = store
        .recent_cohort_changes(ws, RECENT_CHANGES)
        .await?
        .into_iter()
        .filter(|c| c.partner == PARTNER)
        .collect();
    recent.truncate(RECENT_SYNCS);
    let members: std::collections::HashMap<_, _> = store
        .list_cohorts(ws)
        .await?
        .into_iter()
        .filter(|c| c.partner == PARTNER)
        .map(|c| (c.cohort_id, c.member_count))
        .collect();
    let admin = ctx.me.may_change();
    // Secrets are read (and the webhook secret created on first use) only for admins.
    let (partner_key, webhook) = if admin {
        let key = store
            .partner_api_key(PARTNER, fresh_key(), state.dashboard_now())
            .await?;
        let hook = store.heap_webhook(ws, fresh_webhook_secret(), None).await?;
        (Some(key), Some(hook))
    } else {
        (None, None)
    };
    let base = base_url(state, headers);
    let sync_url = [
        base.as_str(),
        "/partners/heap/segment-sync/",
        ctx.workspace.app_group_id.as_str(),
    ]
    .concat();
    let active: Vec<&ImportKeyInfo> = keys.iter().filter(|k| k.invalidated_at.is_none()).collect();
    let body = html! {
        @if let Some((secret, what)) = new_key {
            div class="notice secret" role="status" {
                p { strong { (what) } " Copy it now: it is shown only once." }
                p { "Data import key: " code id="new-import-key" { (secret.expose()) } }
            }
        }
        section class="card" aria-labelledby="connect" {
            h2 id="connect" { "Connect Heap" }
            p { "Give Heap the REST endpoint, the partner API key and a data import key of this workspace." }
            table {
                tbody {
                    tr { th scope="row" { "REST endpoint" } td { code id="rest-endpoint" { (base) } } }
                    tr {
                        th scope="row" { "Partner API key" }
                        td {
                            @if let Some(key) = &partner_key { code id="partner-api-key" { (key.expose()) } }
                            @else { span class="muted" { "shown to admins" } }
                        }
                    }
                    tr {
                        th scope="row" { "Partner" }
                        td {
                            @if enabled { span class="badge ok" id="partner-status" { "enabled" } }
                            @else { span class="badge bad" id="partner-status" { "disabled" } }
                            @if admin {
                                " "
                                form class="inline" method="post" action=(ctx.url("/partners/heap/enabled")) {
                                    (ctx.csrf_field())
                                    input type="hidden" name="enabled" value=(if enabled { "false" } else { "true" });
                                    button type="submit" class="secondary" { (if enabled { "Disable Heap" } else { "Enable Heap" }) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section class="card" aria-labelledby="keys" {
            h2 id="keys" { "Data import keys" }
            @if keys.is_empty() {
                p class="muted" { "No data import key yet." }
            } @else {
                table {
                    thead { tr { th { "Prefix" } th { "Created" } th { "Last used" } th { "Status" } th { span class="muted" { "Action" } } } }
                    tbody {
                        @for k in &keys {
                            tr {
                                td { code { (k.prefix) "…" } }
                                td { (when(k.created_at)) }
                                td class="last-used" { @if let Some(at) = k.last_used_at { (when(at)) } @else { span class="muted" { "never" } } }
                                td {
                                    @if let Some(at) = k.invalidated_at { span class="badge bad" { "invalidated " (when(at)) } }
                                    @else { span class="badge ok" { "active" } }
                                }
                                td {
                                    @if admin && k.invalidated_at.is_none() {
                                        form class="inline" method="post" action=(ctx.url(&["/partners/heap/keys/", &k.id.to_string(), "/invalidate"].concat())) {
                                            (ctx.csrf_field())
                                            button type="submit" class="danger" aria-label=(["Invalidate key ", k.prefix.as_str()].concat()) { "Invalidate" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if admin {
                div class="actions" {
                    form method="post" action=(ctx.url("/partners/heap/keys")) {
                        (ctx.csrf_field())
                        button type="submit" id="generate-key" { "Generate data import key" }
                    }
                    @if !active.is_empty() {
                        form method="post" action=(ctx.url("/partners/heap/rotate")) {
                            (ctx.csrf_field())
                            button type="submit" class="secondary" { "Rotate (new key, invalidate the others)" }
                        }
                    }
                }
            }
        }
        section class="card" aria-labelledby="sync" {
            h2 id="sync" { "Heap segment sync (webhook)" }
            p { "Or let Heap call Tideway directly: in Heap, add a webhook destination with this URL and signing secret." }
            table {
                tbody {
                    tr { th scope="row" { "URL" } td { code id="segment-sync-url" { (sync_url) } } }
                    tr {
                        th scope="row" { "Signing secret" }
                        td {
                            @if let Some(hook) = &webhook { code id="segment-sync-secret" { (hook.secret.expose()) } }
                            @else { span class="muted" { "shown to admins" } }
                        }
                    }
                }
            }
        }
        section class="card" aria-labelledby="recent" {
            h2 id="recent" { "Recent cohort syncs" }
            p class="muted" { "What the newest " (RECENT_CHANGES) " membership changes of this workspace did to Heap cohorts." }
            @if recent.is_empty() {
                p class="muted" { "Heap has not changed a cohort's members yet." }
            } @else {
                table id="recent-syncs" {
                    thead { tr { th { "Cohort" } th { "Added" } th { "Removed" } th { "From" } th { "To" } th { "Members now" } } }
                    tbody {
                        @for c in &recent {
                            tr {
                                td { a href=(ctx.url(&["/cohorts/heap/", &segment(c.cohort_id.as_str())].concat())) { (c.name) } }
                                td class="added" { (c.entered) }
                                td class="removed" { (c.left) }
                                td { (when(c.first_at)) }
                                td { (when(c.last_at)) }
                                td { (members.get(&c.cohort_id).copied().unwrap_or(0)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(
        ctx,
        Section::Heap,
        "Technology Partners › Heap",
        body,
    ))
}

/// `POST …/partners/heap/keys`: a new data import key (enables the partner), shown once.
pub async fn generate(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    headers: HeaderMap,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let secret = fresh_key();
    state
        .store()
        .create_import_key(ctx.workspace.id, PARTNER, &secret, state.dashboard_now())
        .await?;
    render(
        &state,
        &ctx,
        &headers,
        Some((&secret, "New data import key created.")),
    )
    .await
}

/// `POST …/partners/heap/rotate`: a new key, and every other key of the workspace invalidated.
pub async fn rotate(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    headers: HeaderMap,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let store = state.store();
    let now = state.dashboard_now();
    let old = store.list_import_keys(ctx.workspace.id, PARTNER).await?;
    let secret = fresh_key();
    let new = store
        .create_import_key(ctx.workspace.id, PARTNER, &secret, now)
        .await?;
    for key in old
        .iter()
        .filter(|k| k.invalidated_at.is_none() && k.id != new.id)
    {
        store
            .invalidate_import_key(ctx.workspace.id, PARTNER, &key.id.to_string(), now)
            .await?;
    }
    render(
        &state,
        &ctx,
        &headers,
        Some((
            &secret,
            "Rotated: the new key works now and the others no longer do.",
        )),
    )
    .await
}

/// `POST …/partners/heap/keys/{id}/invalidate`.
pub async fn invalidate(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let id: i64 = path_param(&path.0, "id")?
        .parse()
        .map_err(|_| PageError::BadRequest("A key id is a number.".into()))?;
    let done = state
        .store()
        .invalidate_import_key(
            ctx.workspace.id,
            PARTNER,
            &id.to_string(),
            state.dashboard_now(),
        )
        .await?;
    if !done {
        return Err(PageError::NotFound(format!(
            "No active data import key {id} in this workspace."
        )));
    }
    Ok(see_other(&ctx.url("/partners/heap")))
}

/// `POST …/partners/heap/enabled` with `enabled=true|false`.
pub async fn enabled(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let enabled = match form.get("enabled") {
        Some("true") => true,
        Some("false") => false,
        _ => {
            return Err(PageError::BadRequest(
                "'enabled' must be true or false.".into(),
            ));
        }
    };
    state
        .store()
        .set_partner_enabled(ctx.workspace.id, PARTNER, enabled)
        .await?;
    Ok(see_other(&ctx.url("/partners/heap")).into_response())
}
