//! The workspace's home page: how many users, cohorts, segments, campaigns, Canvases and
//! Currents it has, and how the Currents are doing. Users are counted by the segment index
//! (its size, not a scan of the users table), when the workspace has one; everything else is a
//! listing of a few rows.

use axum::Extension;
use axum::extract::State;
use maud::{Markup, html};
use tideway_core::currents_store::CurrentStatus;
use tideway_core::store::StoreError;

use super::layout::{self, Section};
use super::{Ctx, Me, PageError, PathParams, ws_id};
use crate::AppState;

/// `GET /dashboard/w/{ws}/`.
pub async fn page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let ws = ctx.workspace.id;
    let store = state.store();
    let cohorts = store.list_cohorts(ws).await?.len();
    let segments = store.list_segments(ws).await?.len();
    // The user count is the segment index's size. A workspace without segments has no index,
    // and the page does not start one (a first load reads every profile).
    let users = if segments > 0 || state.segments().has_index(ws) {
        match state.segments().with_fresh(ws, |live| live.len()).await {
            Ok(n) => Some(n),
            // Still loading after a start: say so rather than fail the page.
            Err(StoreError::Unavailable(_)) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let campaigns = store.list_campaigns(ws).await?.len();
    let canvases = store.list_canvases(ws).await?.len();
    let currents = store.list_currents(ws).await?;
    let healthy = currents
        .iter()
        .filter(|c| c.status == CurrentStatus::Active && c.failing_since.is_none())
        .count();
    let failing = currents
        .iter()
        .filter(|c| {
            matches!(
                c.status,
                CurrentStatus::HaltedCredentials | CurrentStatus::Disabled
            ) || c.failing_since.is_some()
        })
        .count();
    let card = |n: String, what: &str, href: Option<String>| {
        html! {
            div class="card" {
                div class="n" { (n) }
                div class="what" {
                    @if let Some(href) = href { a href=(href) { (what) } } @else { (what) }
                }
            }
        }
    };
    let body = html! {
        p class="muted" { "app_group_id " code { (ctx.workspace.app_group_id) } }
        section class="counts" aria-label="Counts" {
            (card(users.map_or_else(|| "…".to_owned(), |n| n.to_string()), "users", None))
            (card(cohorts.to_string(), "cohorts", Some(ctx.url("/cohorts"))))
            (card(segments.to_string(), "segments", Some(ctx.url("/segments"))))
            (card(campaigns.to_string(), "campaigns", Some(ctx.url("/campaigns"))))
            (card(canvases.to_string(), "Canvases", Some(ctx.url("/canvases"))))
            (card(currents.len().to_string(), "Currents", ctx.currents.then(|| ctx.url("/currents"))))
            (card(healthy.to_string(), "Currents delivering", None))
            (card(failing.to_string(), "Currents failing or halted", None))
        }
        @if users.is_none() {
            p class="muted" { "Users are counted by the segment index, which starts with the workspace's first segment (and may still be loading)." }
        }
        h2 { "Currents" }
        @if currents.is_empty() {
            p class="muted" { "No Currents in this workspace." }
        } @else {
            table {
                thead { tr { th { "Name" } th { "Kind" } th { "Status" } th { "Delivered" } th { "Dead-lettered" } th { "Last error" } } }
                tbody {
                    @for c in &currents {
                        tr {
                            td { (c.spec.name) }
                            td { (c.spec.kind.as_str()) }
                            td { (status_badge(c.status, c.failing_since.is_some())) }
                            td { (c.counters.delivered) }
                            td { (c.counters.dead_lettered) }
                            td { @if let Some(e) = &c.last_error { (e.message) } @else { span class="muted" { "—" } } }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&ctx, Section::Home, "Home", body))
}

/// A Current's status as a badge: green when delivering, amber when failing, red when halted.
pub fn status_badge(status: CurrentStatus, failing: bool) -> Markup {
    let class = match status {
        CurrentStatus::Active if failing => "badge warn",
        CurrentStatus::Active => "badge ok",
        CurrentStatus::HaltedCredentials | CurrentStatus::Disabled => "badge bad",
        CurrentStatus::Draft | CurrentStatus::Paused => "badge",
    };
    html! { span class=(class) { (status.as_str()) @if failing { " (failing)" } } }
}
