//! Cohorts: every partner cohort of the workspace (partner, name, members, last change), and a
//! cohort's members a page at a time (the store's page by user `seq`, never the whole cohort).

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use maud::{Markup, html};
use tideway_core::cohorts::{CohortId, partner};

use super::layout::{self, Section};
use super::{Ctx, Me, PageError, PathParams, path_param, segment, when, ws_id};
use crate::AppState;

/// Members on one page.
const PAGE: usize = 100;

/// `GET /dashboard/w/{ws}/cohorts`.
pub async fn list(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let mut cohorts = state.store().list_cohorts(ctx.workspace.id).await?;
    cohorts.sort_by_key(|c| c.name.to_lowercase());
    let body = html! {
        @if cohorts.is_empty() {
            p class="muted" { "No cohorts yet. They appear here when a partner (such as Heap) imports one." }
        } @else {
            table id="cohorts" {
                thead { tr { th { "Name" } th { "Partner" } th { "Cohort id" } th { "Members" } th { "Updated" } } }
                tbody {
                    @for c in &cohorts {
                        tr {
                            td { a href=(ctx.url(&["/cohorts/", &segment(&c.partner), "/", &segment(c.cohort_id.as_str())].concat())) { (c.name) } }
                            td { (partner(&c.partner).map_or(c.partner.as_str(), |p| p.display_name)) }
                            td { code { (c.cohort_id.as_str()) } }
                            td class="members" { (c.member_count) }
                            td { (when(c.updated_at)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&ctx, Section::Cohorts, "Cohorts", body))
}

/// `GET /dashboard/w/{ws}/cohorts/{partner}/{cohort}?after=SEQ`: a page of members.
pub async fn members(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let slug = path_param(&path.0, "partner")?;
    let raw_id = path_param(&path.0, "cohort")?;
    let after: u32 = match query.get("after") {
        None => 0,
        Some(a) => a.parse().map_err(|_| {
            PageError::BadRequest(
                "'after' is the last member's position on the previous page.".into(),
            )
        })?,
    };
    let cohort_id = CohortId::parse(raw_id)
        .ok_or_else(|| PageError::BadRequest("That is not a cohort id.".into()))?;
    let store = state.store();
    let summary = store
        .list_cohorts(ctx.workspace.id)
        .await?
        .into_iter()
        .find(|c| c.partner == slug && c.cohort_id == cohort_id)
        .ok_or_else(|| {
            PageError::NotFound(format!("No cohort '{raw_id}' of {slug} in this workspace."))
        })?;
    let page = store
        .cohort_members(ctx.workspace.id, slug, cohort_id, after, PAGE)
        .await?
        .ok_or_else(|| {
            PageError::NotFound(format!("No cohort '{raw_id}' of {slug} in this workspace."))
        })?;
    let next = (page.len() == PAGE)
        .then(|| page.last().map(|m| m.user.0))
        .flatten();
    let base = ctx.url(&["/cohorts/", &segment(slug), "/", &segment(raw_id)].concat());
    let body = html! {
        p {
            (partner(slug).map_or(slug, |p| p.display_name)) " cohort "
            code { (raw_id) } " — " (summary.member_count) (if summary.member_count == 1 { " member, updated " } else { " members, updated " }) (when(summary.updated_at))
        }
        @if page.is_empty() {
            p class="muted" { "No members on this page." }
        } @else {
            table id="members" {
                thead { tr { th { "External id" } th { "Braze id" } th { "Entered" } } }
                tbody {
                    @for m in &page {
                        tr {
                            td { @if let Some(e) = &m.external_id { (e.as_str()) } @else { span class="muted" { "—" } } }
                            td { code { (m.braze_id.as_str()) } }
                            td { (when(m.entered_at)) }
                        }
                    }
                }
            }
        }
        div class="pager" {
            @if after > 0 { a href=(base) { "First page" } }
            @if let Some(next) = next { a href=([base.as_str(), "?after=", &next.to_string()].concat()) rel="next" { "Next page" } }
        }
        p { a href=(ctx.url("/cohorts")) { "All cohorts" } }
    };
    Ok(layout::page(&ctx, Section::Cohorts, &summary.name, body))
}
