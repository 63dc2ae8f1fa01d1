//! Partner Integrations › Data Export (Currents): the workspace's Currents with status, lag,
//! delivered and dead-lettered counts and the last error; a form to create a Heap Export or
//! Custom Currents Export (name, endpoint, optional bearer token, event types as checkboxes
//! grouped by category with select-all per category; Launch Current or save a draft); launch,
//! pause, resume, enable; send test events; and the dead letters with replay.
//!
//! The form becomes the same JSON definition the management API takes and is parsed by the
//! same `tideway_currents::spec::parse_spec` and judged by the same egress policy, so a
//! Current made here is exactly one made through `/api/v1/currents`. Linked only when the
//! server runs the exporter (`tideway serve` does).

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::{Value, json};
use tideway_core::currents::EventCategory;
use tideway_core::currents_store::{
    Current, CurrentId, CurrentKind, CurrentStatus, DeadLetterPick, StatusChange,
};
use tideway_currents::spec::{check_egress, parse_spec, selected_types};
use tideway_currents::{CurrentsError, catalogue};

use super::home::status_badge;
use super::layout::{self, Section};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::{AppState, CurrentsApi};

/// Dead letters shown on one page.
const DEAD_LETTER_PAGE: usize = 100;

fn api(state: &AppState) -> Result<CurrentsApi, PageError> {
    state
        .currents()
        .cloned()
        .ok_or_else(|| PageError::NotFound("Currents do not run on this server.".into()))
}

fn category_label(category: EventCategory) -> &'static str {
    match category {
        EventCategory::MessageEngagement => "Message engagement events",
        EventCategory::CustomerBehavior => "Customer behavior events",
        EventCategory::User => "User events",
    }
}

/// The Current of the path in this workspace, or 404.
async fn load(api: &CurrentsApi, ctx: &Ctx, params: &PathParams) -> Result<Current, PageError> {
    let raw = path_param(&params.0, "id")?;
    let id: i64 = raw
        .parse()
        .map_err(|_| PageError::BadRequest("A Current id is a number.".into()))?;
    api.store
        .get_current(ctx.workspace.id, CurrentId(id))
        .await?
        .ok_or_else(|| PageError::NotFound(format!("No Current {id} in this workspace.")))
}

/// `GET /dashboard/w/{ws}/currents`.
pub async fn list(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    render_list(&state, &ctx, None).await
}

async fn render_list(
    state: &AppState,
    ctx: &Ctx,
    notice: Option<Markup>,
) -> Result<Markup, PageError> {
    let api = api(state)?;
    let currents = api.store.list_currents(ctx.workspace.id).await?;
    let now = state.dashboard_now();
    let mut rows = Vec::with_capacity(currents.len());
    for c in &currents {
        let lag = api
            .store
            .lag(c.id, selected_types(&c.spec.selection))
            .await?;
        rows.push((c, lag));
    }
    let admin = ctx.me.may_change();
    let action = |c: &Current, action: &str, label: &str| {
        html! {
            form class="inline" method="post" action=(ctx.url(&["/currents/", &c.id.0.to_string(), "/", action].concat())) {
                (ctx.csrf_field())
                button type="submit" class="secondary" aria-label=([label, " ", c.spec.name.as_str()].concat()) { (label) }
            }
        }
    };
    let body = html! {
        @if let Some(notice) = notice { (notice) }
        @if admin {
            p { a class="button" href=(ctx.url("/currents/new")) id="new-current" { "Create New Current" } }
        }
        @if rows.is_empty() {
            p class="muted" { "No Currents yet." }
        } @else {
            table id="currents" {
                thead { tr { th { "Name" } th { "Kind" } th { "Status" } th { "Lag" } th { "Delivered" } th { "Dead-lettered" } th { "Last error" } th { span class="muted" { "Actions" } } } }
                tbody {
                    @for (c, lag) in &rows {
                        tr data-current=(c.spec.name) {
                            td { (c.spec.name) br; code class="muted" { (c.spec.endpoint.as_str()) } }
                            td { (kind_label(c.spec.kind)) }
                            td { (status_badge(c.status, c.failing_since.is_some())) }
                            td {
                                (lag.events) @if !lag.exact { "+" } " events"
                                @if let Some(at) = lag.oldest_logged_at { br; span class="muted" { ((now.0 - at.0).max(0) / 1000) " s behind" } }
                            }
                            td class="delivered" { (c.counters.delivered) }
                            td {
                                a href=(ctx.url(&["/currents/", &c.id.0.to_string(), "/dead-letters"].concat())) { (c.counters.dead_lettered) }
                            }
                            td {
                                @if let Some(e) = &c.last_error { (e.message) br; span class="muted" { (when(e.at)) } }
                                @else { span class="muted" { "—" } }
                            }
                            td {
                                @if admin {
                                    @match c.status {
                                        CurrentStatus::Draft => (action(c, "launch", "Launch Current")),
                                        CurrentStatus::Active => (action(c, "pause", "Pause")),
                                        CurrentStatus::Paused => (action(c, "resume", "Resume")),
                                        CurrentStatus::HaltedCredentials | CurrentStatus::Disabled => (action(c, "enable", "Enable")),
                                    }
                                    " "
                                    (action(c, "test", "Send test events"))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(ctx, Section::Currents, "Currents", body))
}

fn kind_label(kind: CurrentKind) -> &'static str {
    match kind {
        CurrentKind::HeapExport => "Heap Export",
        CurrentKind::CustomHttp => "Custom Currents Export",
        CurrentKind::HeapTrack => "Heap track forwarder",
    }
}

/// `GET /dashboard/w/{ws}/currents/new`.
pub async fn new_form(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    api(&state)?;
    if !ctx.me.may_change() {
        return Err(PageError::Forbidden(
            "Your role is read-only: you can look, not change.",
        ));
    }
    Ok(render_form(&ctx, &FormData::default(), None))
}

fn render_form(ctx: &Ctx, form: &FormData, error: Option<&str>) -> Markup {
    let kind = form.get("kind").unwrap_or("heap_export");
    let ticked = form.all("event_type");
    let body = html! {
        @if let Some(error) = error { p class="notice error" role="alert" { (error) } }
        form class="card" method="post" action=(ctx.url("/currents")) {
            (ctx.csrf_field())
            fieldset {
                legend { "Export type" }
                label class="check" { input type="radio" name="kind" value="heap_export" checked[kind == "heap_export"]; "Heap Export" }
                label class="check" { input type="radio" name="kind" value="custom_http" checked[kind == "custom_http"]; "Custom Currents Export (any HTTP endpoint)" }
            }
            label for="current-name" { "Current name" }
            input type="text" id="current-name" name="name" maxlength="255" required value=(form.get("name").unwrap_or(""));
            label for="current-endpoint" { "Endpoint URL" }
            input type="url" id="current-endpoint" name="endpoint" required placeholder="https://…" value=(form.get("endpoint").unwrap_or(""));
            label for="current-token" { "Bearer token " span class="muted" { "(optional; sent as Authorization: Bearer …)" } }
            input type="password" id="current-token" name="bearer_token" autocomplete="off";
            fieldset {
                legend { "Events to export" }
                @for category in EventCategory::ALL {
                    div class="group" {
                        label class="check" {
                            input type="checkbox" data-select-all=(category.as_str()) id=(["all-", category.as_str()].concat());
                            strong { (category_label(category)) } " — select all"
                        }
                        div class="checks" {
                            @for t in catalogue::all().iter().filter(|t| t.category == category) {
                                label class="check" {
                                    input type="checkbox" name="event_type" value=(t.name) data-group=(category.as_str()) checked[ticked.contains(&t.name.as_str())];
                                    code { (t.name) }
                                }
                            }
                        }
                    }
                }
            }
            div class="actions" {
                button type="submit" name="launch" value="true" id="launch-current" { "Launch Current" }
                button type="submit" name="launch" value="false" class="secondary" { "Save as draft" }
            }
        }
        p { a href=(ctx.url("/currents")) { "All Currents" } }
    };
    layout::page(ctx, Section::Currents, "Create New Current", body)
}

/// `POST /dashboard/w/{ws}/currents`: creates the Current (launched with `launch=true`).
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let api = api(&state)?;
    let types: Vec<&str> = form.all("event_type");
    let body = json!({
        "name": form.get("name").unwrap_or(""),
        "kind": form.get("kind").unwrap_or(""),
        "endpoint": form.get("endpoint").unwrap_or(""),
        "bearer_token": form.get("bearer_token").filter(|t| !t.is_empty()).map_or(Value::Null, |t| json!(t)),
        "event_types": types,
    });
    let refused = |message: String| {
        (
            StatusCode::BAD_REQUEST,
            render_form(&ctx, &form, Some(&message)),
        )
            .into_response()
    };
    if types.is_empty() {
        return Ok(refused("Tick at least one event type.".into()));
    }
    let spec = match parse_spec(&body).and_then(|spec| {
        check_egress(&spec, &api.exporter.egress())?;
        Ok(spec)
    }) {
        Ok(spec) => spec,
        Err(CurrentsError::Store(e)) => return Err(e.into()),
        Err(e) => return Ok(refused(e.to_string())),
    };
    let initial = if form.get("launch") == Some("true") {
        CurrentStatus::Active
    } else {
        CurrentStatus::Draft
    };
    api.store
        .create_current(ctx.workspace.id, spec, initial, state.dashboard_now())
        .await?;
    api.exporter.sync().await;
    Ok(see_other(&ctx.url("/currents")))
}

/// `POST /dashboard/w/{ws}/currents/{id}/{action}`: launch, pause, resume, enable, test.
pub async fn action(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let api = api(&state)?;
    let c = load(&api, &ctx, &path).await?;
    let change = match path_param(&path.0, "action")? {
        "launch" => StatusChange::Launch,
        "pause" => StatusChange::Pause,
        "resume" => StatusChange::Resume,
        "enable" => StatusChange::Enable,
        "test" => {
            let report = match api.exporter.send_test(&c).await {
                Ok(report) => report,
                Err(CurrentsError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(PageError::BadRequest(e.to_string())),
            };
            let class = if report.accepted {
                "notice ok"
            } else {
                "notice error"
            };
            let notice = html! {
                p class=(class) role="status" id="test-report" {
                    "Test of '" (c.spec.name) "': " (report.events) " events sent; "
                    @if let Some(status) = report.status { "the receiver answered " (status) "; " }
                    (report.message)
                }
            };
            return Ok(render_list(&state, &ctx, Some(notice))
                .await?
                .into_response());
        }
        other => {
            return Err(PageError::NotFound(format!(
                "No action '{other}' (launch, pause, resume, enable, test)."
            )));
        }
    };
    match api
        .store
        .change_status(c.id, change, None, state.dashboard_now())
        .await
    {
        Ok(_) => {}
        Err(tideway_core::store::StoreError::Conflict(_)) => {
            return Err(PageError::Conflict(format!(
                "The Current is {}; that action does not apply.",
                c.status.as_str()
            )));
        }
        Err(e) => return Err(e.into()),
    }
    api.exporter.sync().await;
    Ok(see_other(&ctx.url("/currents")))
}

/// `GET /dashboard/w/{ws}/currents/{id}/dead-letters`: the first page of dead letters.
pub async fn dead_letters(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let api = api(&state)?;
    let c = load(&api, &ctx, &path).await?;
    let dead = api
        .store
        .list_dead_letters(c.id, 0, DEAD_LETTER_PAGE)
        .await?;
    let body = html! {
        p { "Current " strong { (c.spec.name) } " — " (c.counters.dead_lettered) " dead-lettered in all." }
        @if dead.is_empty() {
            p class="muted" { "No dead letters." }
        } @else {
            @if ctx.me.may_change() {
                form method="post" action=(ctx.url(&["/currents/", &c.id.0.to_string(), "/replay"].concat())) {
                    (ctx.csrf_field())
                    button type="submit" { "Replay all dead letters" }
                }
            }
            table id="dead-letters" {
                thead { tr { th { "Event" } th { "Type" } th { "Reason" } th { "Receiver" } th { "When" } th { "Attempts" } } }
                tbody {
                    @for d in &dead {
                        tr {
                            td { code { (d.event.event_id) } }
                            td { code { (d.event.event_type) } }
                            td { (d.reason.as_str()) ": " (d.detail) }
                            td { @if let Some(s) = d.response_status { (s) } @else { "—" } }
                            td { (when(d.created_at)) }
                            td { (d.attempts) @if d.replay_pending { " (replay pending)" } }
                        }
                    }
                }
            }
        }
        p { a href=(ctx.url("/currents")) { "All Currents" } }
    };
    Ok(layout::page(&ctx, Section::Currents, "Dead letters", body))
}

/// `POST /dashboard/w/{ws}/currents/{id}/replay`: every dead letter queued for re-delivery.
pub async fn replay(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let api = api(&state)?;
    let c = load(&api, &ctx, &path).await?;
    api.store
        .replay_dead_letters(c.id, DeadLetterPick::All)
        .await?;
    api.exporter.poke(c.id).await;
    Ok(see_other(&ctx.url(
        &["/currents/", &c.id.0.to_string(), "/dead-letters"].concat(),
    )))
}
