//! Campaigns: the list with status, channel, delivery and sent / pending / failed counts;
//! launch, pause, stop; a campaign's page with its figures (queue and Currents-counted
//! stats), its templates and their Liquid rendering for a chosen user; and a form to create
//! or edit a campaign — one email or webhook message, an audience of segments, and delivery by
//! API trigger, once at a time, or when a user enters a partner cohort (picked by name).
//!
//! The form becomes the management API's JSON and goes through the same checks
//! (`campaigns_api::checked_definition`: shape, Liquid templates, segments) and the same
//! lifecycle function (`campaigns_api::change_status`), so nothing here decides what a
//! campaign may be.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::{Value, json};
use tideway_core::campaigns::{CampaignAction, CampaignStatus};
use tideway_core::clock::parse_datetime;
use tideway_core::cohorts::partner;
use tideway_core::store::CampaignRecord;

use super::layout::{self, Section};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::AppState;
use crate::campaigns_api::{change_status, checked_definition};
use crate::error::ApiError;

/// A failed API call as a page error (4xx kept, the rest as the store's).
fn api_error(e: ApiError) -> PageError {
    match e {
        ApiError::BadRequest { message, .. } => PageError::BadRequest(message),
        ApiError::Missing(what) => PageError::NotFound(what),
        ApiError::Conflict(why) => PageError::Conflict(why),
        other => PageError::Store(tideway_core::store::StoreError::Unavailable(format!(
            "{other:?}"
        ))),
    }
}

fn status_class(status: CampaignStatus) -> &'static str {
    match status {
        CampaignStatus::Active => "badge ok",
        CampaignStatus::Stopped => "badge bad",
        CampaignStatus::Draft | CampaignStatus::Paused => "badge",
    }
}

/// `GET /dashboard/w/{ws}/campaigns`.
pub async fn list(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let store = state.store();
    let campaigns = store.list_campaigns(ctx.workspace.id).await?;
    let mut rows = Vec::with_capacity(campaigns.len());
    for c in campaigns {
        let counts = store.campaign_send_counts(ctx.workspace.id, &c.id).await?;
        rows.push((c, counts));
    }
    let admin = ctx.me.may_change();
    let action = |c: &CampaignRecord, action: &str, label: &str| {
        html! {
            form class="inline" method="post" action=(ctx.url(&["/campaigns/", &super::segment(&c.id), "/", action].concat())) {
                (ctx.csrf_field())
                button type="submit" class="secondary" aria-label=([label, " ", c.name.as_str()].concat()) { (label) }
            }
        }
    };
    let body = html! {
        @if admin { p { a class="button" href=(ctx.url("/campaigns/new")) id="new-campaign" { "Create Campaign" } } }
        @if rows.is_empty() {
            p class="muted" { "No campaigns yet." }
        } @else {
            table id="campaigns" {
                thead { tr { th { "Name" } th { "Status" } th { "Channel" } th { "Delivery" } th { "Sent" } th { "Pending" } th { "Failed" } th { "Launched" } th { span class="muted" { "Actions" } } } }
                tbody {
                    @for (c, counts) in &rows {
                        tr {
                            td { a href=(ctx.url(&["/campaigns/", &super::segment(&c.id)].concat())) { (c.name) } }
                            td { span class=(status_class(c.status)) { (c.status.as_str()) } }
                            td { (c.definition["messages"][0]["channel"].as_str().unwrap_or("—")) }
                            td { (c.definition["delivery"]["type"].as_str().unwrap_or("—").replace('_', " ")) }
                            td class="sent" { (counts.sent) }
                            td { (counts.pending) }
                            td { (counts.failed) }
                            td { @if let Some(at) = c.launched_at { (when(at)) } @else { span class="muted" { "—" } } }
                            td {
                                @if admin {
                                    @match c.status {
                                        CampaignStatus::Draft | CampaignStatus::Paused => (action(c, "launch", "Launch")),
                                        CampaignStatus::Active => (action(c, "pause", "Pause")),
                                        CampaignStatus::Stopped => {},
                                    }
                                    @if c.status != CampaignStatus::Stopped { " " (action(c, "stop", "Stop")) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&ctx, Section::Campaigns, "Campaigns", body))
}

/// `GET /dashboard/w/{ws}/campaigns/new`.
pub async fn new_form(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    if !ctx.me.may_change() {
        return Err(PageError::Forbidden(
            "Your role is read-only: you can look, not change.",
        ));
    }
    form_page(&state, &ctx, &FormData::default(), None, None).await
}

/// The form's fields for a stored campaign, when the form can show it: one message, and
/// delivery by API trigger, once at a time, or on one cohort's entry.
fn form_from(c: &CampaignRecord) -> Option<FormData> {
    let d = &c.definition;
    let messages = d["messages"].as_array().filter(|m| m.len() == 1)?;
    let m = &messages[0];
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut f = vec![
        ("name".to_owned(), c.name.clone()),
        ("channel".to_owned(), text(&m["channel"])),
        ("url".to_owned(), text(&m["url"])),
        ("from".to_owned(), text(&m["from"])),
        ("subject".to_owned(), text(&m["subject"])),
        ("body".to_owned(), text(&m["body"])),
    ];
    match d["delivery"]["type"].as_str()? {
        "api_triggered" => f.push(("delivery".into(), "api_triggered".into())),
        "scheduled" if d["delivery"]["schedule"]["frequency"] == "once" => {
            f.push(("delivery".into(), "scheduled".into()));
            f.push(("at".into(), text(&d["delivery"]["schedule"]["at"])));
        }
        "action_based" => {
            let triggers = d["delivery"]["triggers"]
                .as_array()
                .filter(|t| t.len() == 1)?;
            let entry = triggers[0].get("cohort_entry")?;
            f.push(("delivery".into(), "cohort_entry".into()));
            f.push((
                "cohort".into(),
                [text(&entry["partner"]), text(&entry["cohort_id"])].join(":"),
            ));
        }
        _ => return None,
    }
    for id in d["audience"]["segment_ids"]
        .as_array()
        .into_iter()
        .flatten()
    {
        f.push(("segment".into(), text(id)));
    }
    Some(FormData(f))
}

async fn form_page(
    state: &AppState,
    ctx: &Ctx,
    form: &FormData,
    editing: Option<&CampaignRecord>,
    error: Option<&str>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let segments = store.list_segments(ctx.workspace.id).await?;
    let cohorts = store.list_cohorts(ctx.workspace.id).await?;
    let v = |name: &str| form.get(name).unwrap_or("").to_owned();
    let channel = form.get("channel").unwrap_or("webhook");
    let delivery = form.get("delivery").unwrap_or("api_triggered");
    let picked = form.all("segment");
    let body = html! {
        @if let Some(error) = error { p class="notice error" role="alert" { (error) } }
        form class="card" method="post" action=(match editing {
            Some(c) => ctx.url(&["/campaigns/", &super::segment(&c.id)].concat()),
            None => ctx.url("/campaigns"),
        }) {
            (ctx.csrf_field())
            label for="campaign-name" { "Campaign name" }
            input type="text" id="campaign-name" name="name" required maxlength="255" value=(v("name"));
            fieldset {
                legend { "Message" }
                label class="check" { input type="radio" name="channel" value="webhook" checked[channel == "webhook"]; "Webhook" }
                label class="check" { input type="radio" name="channel" value="email" checked[channel == "email"]; "Email" }
                label for="webhook-url" { "Webhook URL " span class="muted" { "(webhook)" } }
                input type="url" id="webhook-url" name="url" value=(v("url"));
                label for="email-from" { "From " span class="muted" { "(email)" } }
                input type="text" id="email-from" name="from" value=(v("from"));
                label for="email-subject" { "Subject " span class="muted" { "(email; Liquid)" } }
                input type="text" id="email-subject" name="subject" value=(v("subject"));
                label for="message-body" { "Body " span class="muted" { "(Liquid: {{${first_name}}}, {{custom_attribute.${plan}}}, …)" } }
                textarea id="message-body" name="body" rows="5" { (v("body")) }
            }
            fieldset {
                legend { "Audience " span class="muted" { "(users in every ticked segment; none ticked: everyone)" } }
                @if segments.is_empty() { p class="muted" { "No segments yet." } }
                @for s in &segments {
                    label class="check" { input type="checkbox" name="segment" value=(s.id) checked[picked.contains(&s.id.as_str())]; (s.name) }
                }
            }
            fieldset {
                legend { "Delivery" }
                label class="check" { input type="radio" name="delivery" value="api_triggered" checked[delivery == "api_triggered"]; "API-triggered" }
                label class="check" { input type="radio" name="delivery" value="scheduled" checked[delivery == "scheduled"]; "Once, at a time" }
                label for="send-at" { "Send at (UTC, e.g. 2026-12-24T09:00:00Z)" }
                input type="text" id="send-at" name="at" value=(v("at"));
                label class="check" { input type="radio" name="delivery" value="cohort_entry" checked[delivery == "cohort_entry"]; "When a user enters a cohort" }
                label for="entry-cohort" { "Cohort" }
                select id="entry-cohort" name="cohort" {
                    option value="" { "— pick a cohort —" }
                    @for c in &cohorts {
                        @let value = [c.partner.as_str(), ":", c.cohort_id.as_str()].concat();
                        option value=(value) selected[form.get("cohort") == Some(value.as_str())] {
                            (partner(&c.partner).map_or(c.partner.as_str(), |p| p.filter_name)) " › " (c.name)
                        }
                    }
                }
            }
            div class="actions" {
                @if editing.is_some() { button type="submit" id="save-campaign" { "Save changes" } }
                @else { button type="submit" id="create-campaign" { "Save as draft" } }
            }
        }
        p { a href=(ctx.url("/campaigns")) { "All campaigns" } }
    };
    let title = if editing.is_some() {
        "Edit campaign"
    } else {
        "Create Campaign"
    };
    Ok(layout::page(ctx, Section::Campaigns, title, body))
}

/// The management API's JSON for the form, or what to fix.
fn definition(form: &FormData) -> Result<Value, String> {
    let name = form.get("name").unwrap_or("").trim();
    if name.is_empty() {
        return Err("Give the campaign a name.".into());
    }
    let body = form.get("body").unwrap_or("");
    let message = match form.get("channel") {
        Some("email") => json!({"channel": "email", "from": form.get("from").unwrap_or(""),
                                "subject": form.get("subject").unwrap_or(""), "body": body}),
        Some("webhook") => {
            json!({"channel": "webhook", "url": form.get("url").unwrap_or(""), "body": body})
        }
        _ => return Err("Choose the email or webhook channel.".into()),
    };
    let delivery = match form.get("delivery") {
        Some("api_triggered") => json!({"type": "api_triggered"}),
        Some("scheduled") => {
            let at = form.get("at").unwrap_or("").trim();
            let at = parse_datetime(at).ok_or_else(|| {
                "Send at: write an ISO 8601 time such as 2026-12-24T09:00:00Z.".to_owned()
            })?;
            json!({"type": "scheduled", "schedule": {"frequency": "once", "at": at.to_iso()}})
        }
        Some("cohort_entry") => {
            let (partner, cohort_id) = form
                .get("cohort")
                .and_then(|c| c.split_once(':'))
                .ok_or_else(|| "Pick the cohort whose entry triggers the campaign.".to_owned())?;
            json!({"type": "action_based", "triggers": [{"cohort_entry": {"partner": partner, "cohort_id": cohort_id}}]})
        }
        _ => return Err("Choose how the campaign is delivered.".into()),
    };
    let segments = form.all("segment");
    let mut out = json!({"name": name, "messages": [message], "delivery": delivery});
    if !segments.is_empty() {
        out["audience"] = json!({ "segment_ids": segments });
    }
    Ok(out)
}

/// `POST /dashboard/w/{ws}/campaigns`: saves a draft.
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let raw = match definition(&form) {
        Ok(raw) => raw,
        Err(message) => {
            let page = form_page(&state, &ctx, &form, None, Some(&message)).await?;
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let canonical = match checked_definition(&state, &ctx.workspace, &raw).await {
        Ok((_, canonical)) => canonical,
        Err(ApiError::BadRequest { message, .. }) => {
            let page = form_page(&state, &ctx, &form, None, Some(&message)).await?;
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
        Err(e) => return Err(api_error(e)),
    };
    let at = state.dashboard_now();
    state
        .store()
        .create_campaign(
            ctx.workspace.id,
            CampaignRecord {
                id: uuid::Uuid::new_v4().to_string(),
                name: raw["name"].as_str().unwrap_or("").to_owned(),
                description: String::new(),
                tags: Vec::new(),
                status: CampaignStatus::Draft,
                definition: canonical,
                created_at: at,
                updated_at: at,
                launched_at: None,
                next_run: None,
                first_sent: None,
                last_sent: None,
            },
        )
        .await?;
    Ok(see_other(&ctx.url("/campaigns")))
}

/// `POST /dashboard/w/{ws}/campaigns/{id}/{action}`: launch, pause or stop.
pub async fn action(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let id = path_param(&path.0, "id")?;
    let action = match path_param(&path.0, "action")? {
        "launch" => CampaignAction::Launch,
        "pause" => CampaignAction::Pause,
        "stop" => CampaignAction::Stop,
        other => {
            return Err(PageError::NotFound(format!(
                "No campaign action '{other}' (launch, pause or stop)."
            )));
        }
    };
    change_status(&state, &ctx.workspace, id, action)
        .await
        .map_err(api_error)?;
    Ok(see_other(&ctx.url("/campaigns")))
}

/// A rendered template for the preview: `(place, text or why it did not render)`.
type Rendered = Vec<(String, Result<String, String>)>;

/// Every template of the campaign rendered for the user with this external id, as the
/// dispatcher would (the user found through the export's lookup and the segment index's seq,
/// their profile as of every acknowledged write).
async fn preview(
    state: &AppState,
    ctx: &Ctx,
    c: &CampaignRecord,
    def: &tideway_core::campaigns::CampaignDefinition,
    external_id: &str,
) -> Result<Result<Rendered, String>, PageError> {
    use tideway_core::services::Services;
    use tideway_messaging::liquid::Template;
    use tideway_messaging::personalise::{CampaignVars, vars_for};
    let Ok(id) = tideway_core::ids::ExternalId::parse(external_id) else {
        return Ok(Err("That is not an external id.".into()));
    };
    let found = state
        .store()
        .export_ids(
            &ctx.workspace,
            tideway_core::users::ExportRequest {
                external_ids: vec![id],
                fields: vec!["braze_id".into()],
                ..Default::default()
            },
        )
        .await?;
    let Some(braze_id) = found
        .users
        .first()
        .and_then(|u| u.get("braze_id"))
        .and_then(Value::as_str)
        .and_then(|b| tideway_core::ids::BrazeId::parse(b).ok())
    else {
        return Ok(Err("No user has that external id.".into()));
    };
    let seq = state
        .segments()
        .with_fresh(ctx.workspace.id, move |live| live.seq_of(&braze_id))
        .await?;
    let Some(seq) = seq else {
        return Ok(Err(
            "That user is not indexed yet; try again in a moment.".into()
        ));
    };
    let Some(user) = state
        .store()
        .users_by_seq(ctx.workspace.id, vec![seq])
        .await?
        .into_iter()
        .next()
    else {
        return Ok(Err("No user has that external id.".into()));
    };
    let mut out = Vec::new();
    for (i, variant) in def.variants.iter().enumerate() {
        let vars = vars_for(
            &user,
            CampaignVars {
                campaign_id: Some(&c.id),
                campaign_name: Some(&c.name),
                dispatch_id: "preview",
                variant_id: &variant.id,
                variant_name: &variant.name,
            },
            None,
            None,
            false,
            serde_json::Map::new(),
        );
        let prefix = ["messages[", &i.to_string(), "]"].concat();
        for (place, source) in def
            .templates()
            .into_iter()
            .filter(|(p, _)| p.starts_with(&prefix))
        {
            let rendered = Template::parse(source)
                .map_err(|e| e.to_string())
                .and_then(|t| t.render(&vars).map_err(|e| e.to_string()));
            out.push((place, rendered));
        }
    }
    Ok(Ok(out))
}

/// `GET /dashboard/w/{ws}/campaigns/{id}[?preview=EXTERNAL_ID]`: the campaign, its figures,
/// its templates, and their rendering for one user.
pub async fn detail(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let id = path_param(&path.0, "id")?;
    let store = state.store();
    let c = store
        .campaign(ctx.workspace.id, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("No campaign '{id}' in this workspace.")))?;
    let def = tideway_core::campaigns::CampaignDefinition::load(&c.definition)
        .map_err(|e| PageError::Store(tideway_core::store::StoreError::Corrupt(e.to_string())))?;
    let queue = store.campaign_send_counts(ctx.workspace.id, &c.id).await?;
    let stats = store.campaign_stats(ctx.workspace.id, &c.id).await?;
    let wanted = query
        .get("preview")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty());
    let rendered = match wanted {
        Some(external_id) => Some(preview(&state, &ctx, &c, &def, external_id).await?),
        None => None,
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let body = html! {
        p { span class=(status_class(c.status)) { (c.status.as_str()) }
            @if let Some(at) = c.launched_at { " — launched " (when(at)) } }
        h2 { "Figures" }
        table id="campaign-stats" {
            tbody {
                tr { th scope="row" { "pending" } td { (queue.pending) } }
                tr { th scope="row" { "sent" } td { (queue.sent) } }
                tr { th scope="row" { "failed" } td { (queue.failed) } }
                @for (stat, n) in &stats { tr { th scope="row" { (stat.as_str()) } td { (n) } } }
            }
        }
        h2 { "Delivery and audience" }
        pre class="card mono" { (pretty(&c.definition["delivery"])) }
        pre class="card mono" { (pretty(&c.definition["audience"])) }
        h2 { "Messages" }
        @for (place, source) in def.templates() {
            p { code { (place) } }
            pre class="card mono" { (source) }
        }
        h2 { "Preview for a user" }
        form class="card" method="get" action=(ctx.url(&["/campaigns/", &super::segment(&c.id)].concat())) {
            label for="preview" { "External id" }
            input type="text" id="preview" name="preview" value=(wanted.unwrap_or(""));
            div class="actions" { button type="submit" { "Preview" } }
        }
        @match &rendered {
            Some(Err(why)) => { p class="notice error" role="alert" { (why) } }
            Some(Ok(parts)) => {
                div id="preview-result" {
                    @for (place, text) in parts {
                        p { code { (place) } }
                        @match text {
                            Ok(text) => { pre class="card mono" { (text) } }
                            Err(why) => { p class="notice error" { (why) } }
                        }
                    }
                }
            }
            None => {}
        }
        p {
            @if ctx.me.may_change() && form_from(&c).is_some() {
                a href=(ctx.url(&["/campaigns/", &super::segment(&c.id), "/edit"].concat())) id="edit-campaign" { "Edit" } " · "
            }
            a href=(ctx.url("/campaigns")) { "All campaigns" }
        }
    };
    Ok(layout::page(&ctx, Section::Campaigns, &c.name, body))
}

async fn load(state: &AppState, ctx: &Ctx, path: &PathParams) -> Result<CampaignRecord, PageError> {
    let id = path_param(&path.0, "id")?;
    state
        .store()
        .campaign(ctx.workspace.id, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("No campaign '{id}' in this workspace.")))
}

/// `GET /dashboard/w/{ws}/campaigns/{id}/edit`: the form with the campaign, when the form can
/// show it (else 409: edit it through the API).
pub async fn edit_form(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    if !ctx.me.may_change() {
        return Err(PageError::Forbidden(
            "Your role is read-only: you can look, not change.",
        ));
    }
    let c = load(&state, &ctx, &path).await?;
    let form = form_from(&c).ok_or_else(|| {
        PageError::Conflict(format!(
            "This campaign has what the form cannot show (several variants, or other triggers); change it with PUT /api/v1/campaigns/{}.",
            c.id
        ))
    })?;
    form_page(&state, &ctx, &form, Some(&c), None).await
}

/// `POST /dashboard/w/{ws}/campaigns/{id}`: saves the form over the campaign's name, message,
/// audience and delivery (its other settings are kept), through the API's checks.
pub async fn update(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let mut c = load(&state, &ctx, &path).await?;
    let raw = match definition(&form) {
        Ok(raw) => raw,
        Err(message) => {
            let page = form_page(&state, &ctx, &form, Some(&c), Some(&message)).await?;
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let mut merged = match c.definition.clone() {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    for key in ["messages", "delivery"] {
        merged.insert(key.into(), raw[key].clone());
    }
    match raw.get("audience") {
        Some(audience) => merged.insert("audience".into(), audience.clone()),
        None => merged.remove("audience"),
    };
    let canonical = match checked_definition(&state, &ctx.workspace, &Value::Object(merged)).await {
        Ok((_, canonical)) => canonical,
        Err(ApiError::BadRequest { message, .. }) => {
            let page = form_page(&state, &ctx, &form, Some(&c), Some(&message)).await?;
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
        Err(e) => return Err(api_error(e)),
    };
    c.name = raw["name"].as_str().unwrap_or("").to_owned();
    c.definition = canonical;
    c.updated_at = state.dashboard_now();
    let id = c.id.clone();
    state
        .store()
        .save_campaign(ctx.workspace.id, c)
        .await?
        .ok_or_else(|| PageError::NotFound("That campaign was deleted meanwhile.".into()))?;
    Ok(see_other(
        &ctx.url(&["/campaigns/", &super::segment(&id)].concat()),
    ))
}
