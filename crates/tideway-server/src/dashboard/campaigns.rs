//! Campaigns: the list with status, channel, delivery and sent / pending / failed counts;
//! launch, pause, stop; a campaign's page with its figures (queue and Currents-counted
//! stats), its templates and their Liquid rendering for a chosen user (`preview.rs`, shared
//! with the Canvas page); and a form to create or edit a campaign — up to eight email or
//! webhook message variants with their percentages and a control group ("Add a variant" /
//! "Remove" post the form back and show it again, nothing saved), an audience of segments,
//! and its delivery (`delivery.rs`: API-triggered, scheduled once or recurring, in UTC or
//! users' local time, or action-based with several triggers). A refusal is shown beside the
//! field the API's check names (`messages[1].url` beside variant 2's URL).
//!
//! The form becomes the management API's JSON and goes through the same checks
//! (`campaigns_api::checked_definition`: shape, Liquid templates, segments) and the same
//! lifecycle function (`campaigns_api::change_status`), so nothing here decides what a
//! campaign may be.

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::{Value, json};
use tideway_core::campaigns::{CampaignStatus, MAX_VARIANTS, templates_of};
use tideway_core::store::CampaignRecord;

use super::delivery::{self, DeliveryForm, Part};
use super::forms::{
    FieldError, api_error, described_by, error_beside, lifecycle_action, refused, require_admin,
};
use super::layout::{self, Section};
use super::preview::{self, Preview, RenderedMessage};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::AppState;
use crate::campaigns_api::{change_status, checked_definition};

/// The channels of a campaign's variants, as the list shows them ("email", "email, webhook").
fn channels(definition: &Value) -> String {
    let mut out: Vec<&str> = definition["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["channel"].as_str())
        .collect();
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        "—".to_owned()
    } else {
        out.join(", ")
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
                            td { (channels(&c.definition)) }
                            td { (c.definition["delivery"]["type"].as_str().unwrap_or("—").replace('_', " ")) }
                            td class="sent" { (counts.sent) }
                            td { (counts.pending) }
                            td { (counts.failed) }
                            td { @if let Some(at) = c.launched_at { (when(at)) } @else { span class="muted" { "—" } } }
                            td {
                                @if admin { (lifecycle_buttons(&ctx, c, false)) }
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
    require_admin(&ctx)?;
    form_page(&state, &ctx, &CampaignForm::empty(), None, None).await
}

/// One message variant as the form shows it.
#[derive(Debug, Clone, Default, PartialEq)]
struct VariantForm {
    /// The stored variant's id (empty for a new one: the API gives it one).
    id: String,
    name: String,
    percent: String,
    channel: String,
    url: String,
    from: String,
    subject: String,
    body: String,
}

impl VariantForm {
    fn new(percent: &str) -> VariantForm {
        VariantForm {
            percent: percent.to_owned(),
            channel: "webhook".into(),
            ..VariantForm::default()
        }
    }
}

/// The campaign form: name, the message variants with their percentages and the control
/// group, the audience's segments and the delivery.
#[derive(Debug, Clone, Default, PartialEq)]
struct CampaignForm {
    name: String,
    variants: Vec<VariantForm>,
    control: String,
    delivery: DeliveryForm,
    segments: Vec<String>,
}

impl CampaignForm {
    fn empty() -> CampaignForm {
        CampaignForm {
            variants: vec![VariantForm::new("100")],
            control: "0".into(),
            delivery: DeliveryForm::empty(),
            ..CampaignForm::default()
        }
    }

    /// From the posted form: variants `v{i}_{field}` (`remove` drops one, `add` = `variant`
    /// appends one).
    fn from_form(form: &FormData) -> CampaignForm {
        let mut variants: Vec<VariantForm> = form
            .groups("v", "channel")
            .iter()
            .map(|g| VariantForm {
                id: g.get("id").trim().to_owned(),
                name: g.get("name").trim().to_owned(),
                percent: g.get("percent").trim().to_owned(),
                channel: g.get("channel").to_owned(),
                url: g.get("url").trim().to_owned(),
                from: g.get("from").trim().to_owned(),
                subject: g.get("subject").to_owned(),
                body: g.get("body").to_owned(),
            })
            .collect();
        if form.get("add") == Some("variant") && variants.len() < MAX_VARIANTS {
            variants.push(VariantForm::new("0"));
        }
        CampaignForm {
            name: form.text("name").to_owned(),
            variants,
            control: form.text("control").to_owned(),
            delivery: DeliveryForm::from_form(form),
            segments: form.all("segment").into_iter().map(str::to_owned).collect(),
        }
    }

    /// The form for a stored campaign, when it can show it: email and webhook variants, and
    /// any delivery but one with property filters the form has no field for.
    fn from_record(c: &CampaignRecord) -> Option<CampaignForm> {
        let d = &c.definition;
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let number = |v: &Value| v.as_u64().map_or_else(String::new, |n| n.to_string());
        let variants = d["messages"]
            .as_array()?
            .iter()
            .map(|m| VariantForm {
                id: text(&m["id"]),
                name: text(&m["name"]),
                percent: number(&m["percent"]),
                channel: text(&m["channel"]),
                url: text(&m["url"]),
                from: text(&m["from"]),
                subject: text(&m["subject"]),
                body: text(&m["body"]),
            })
            .collect();
        Some(CampaignForm {
            name: c.name.clone(),
            variants,
            control: number(&d["control_percent"]),
            segments: d["audience"]["segment_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect(),
            delivery: DeliveryForm::from_json(&d["delivery"])?,
        })
    }

    /// The management API's JSON for the form, or the field to fix. Percentages are passed as
    /// numbers and checked by the API (each 0–100, all with the control group adding up to 100).
    fn to_json(&self) -> Result<Value, FieldError> {
        if self.name.is_empty() {
            return Err(FieldError::new("name", "Give the campaign a name."));
        }
        if self.variants.is_empty() {
            return Err(FieldError::new(
                "messages",
                "Add at least one message variant.",
            ));
        }
        let whole = |raw: &str, place: String| {
            raw.parse::<u64>()
                .map_err(|_| FieldError::new(place, "write a whole number from 0 to 100"))
        };
        let mut messages = Vec::with_capacity(self.variants.len());
        for (i, v) in self.variants.iter().enumerate() {
            let place = |f: &str| ["messages[", &i.to_string(), "].", f].concat();
            let mut m = match v.channel.as_str() {
                "email" => {
                    json!({"channel": "email", "from": v.from, "subject": v.subject, "body": v.body})
                }
                "webhook" => json!({"channel": "webhook", "url": v.url, "body": v.body}),
                _ => {
                    return Err(FieldError::new(
                        place("channel"),
                        "choose the email or webhook channel",
                    ));
                }
            };
            m["percent"] = json!(whole(&v.percent, place("percent"))?);
            if !v.id.is_empty() {
                m["id"] = json!(v.id);
            }
            if !v.name.is_empty() {
                m["name"] = json!(v.name);
            }
            messages.push(m);
        }
        let control = if self.control.is_empty() {
            0
        } else {
            whole(&self.control, "control_percent".into())?
        };
        let delivery = self.delivery.to_json(Part::Campaign)?;
        let mut out = json!({"name": self.name, "messages": messages, "control_percent": control, "delivery": delivery});
        if !self.segments.is_empty() {
            out["audience"] = json!({ "segment_ids": self.segments });
        }
        Ok(out)
    }
}

async fn form_page(
    state: &AppState,
    ctx: &Ctx,
    form: &CampaignForm,
    editing: Option<&CampaignRecord>,
    error: Option<&FieldError>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let segments = store.list_segments(ctx.workspace.id).await?;
    let cohorts = store.list_cohorts(ctx.workspace.id).await?;
    // The error, when it is about this place (the API's path).
    let at = |place: &str| error.filter(|e| e.field == place);
    let input = |id: &str, name: &str, kind: &str, value: &str, place: &str| {
        html! {
            input type=(kind) id=(id) name=(name) value=(value)
                aria-invalid=[at(place).map(|_| "true")] aria-describedby=[described_by(at(place), id)];
            (error_beside(at(place), id))
        }
    };
    let body = html! {
        @if let Some(error) = error { p class="notice error" role="alert" { (error.full()) } }
        form class="card" method="post" action=(match editing {
            Some(c) => ctx.url(&["/campaigns/", &super::segment(&c.id)].concat()),
            None => ctx.url("/campaigns"),
        }) {
            (ctx.csrf_field())
            // Enter in a field saves (a form's first submit button is its default).
            button type="submit" class="default-submit" tabindex="-1" aria-hidden="true" { "Save" }
            label for="campaign-name" { "Campaign name" }
            input type="text" id="campaign-name" name="name" required maxlength="255" value=(form.name)
                aria-invalid=[at("name").map(|_| "true")] aria-describedby=[described_by(at("name"), "campaign-name")];
            (error_beside(at("name"), "campaign-name"))
            fieldset id="variants" {
                legend { "Messages " span class="muted" { "(variants: each user gets one, by percentage; the control group gets none)" } }
                (error_beside(at("messages"), "variants"))
                @for (i, v) in form.variants.iter().enumerate() {
                    @let n = ["v", &i.to_string()].concat();
                    @let id = |f: &str| [n.as_str(), "-", f].concat();
                    @let name = |f: &str| [n.as_str(), "_", f].concat();
                    @let place = |f: &str| ["messages[", &i.to_string(), "].", f].concat();
                    fieldset class="variant" id=(id("fields")) {
                        legend { "Variant " (i + 1) }
                        input type="hidden" name=(name("id")) value=(v.id);
                        label for=(id("name")) { "Variant name" }
                        (input(&id("name"), &name("name"), "text", &v.name, &place("name")))
                        label for=(id("percent")) { "Percent of users" }
                        (input(&id("percent"), &name("percent"), "number", &v.percent, &place("percent")))
                        div role="radiogroup" aria-label=(["Variant ", &(i + 1).to_string(), " channel"].concat()) {
                            label class="check" { input type="radio" name=(name("channel")) value="webhook" checked[v.channel == "webhook"]; "Webhook" }
                            label class="check" { input type="radio" name=(name("channel")) value="email" checked[v.channel == "email"]; "Email" }
                        }
                        (error_beside(at(&place("channel")), &id("channel")))
                        label for=(id("url")) { "Webhook URL " span class="muted" { "(webhook)" } }
                        (input(&id("url"), &name("url"), "url", &v.url, &place("url")))
                        label for=(id("from")) { "From " span class="muted" { "(email)" } }
                        (input(&id("from"), &name("from"), "text", &v.from, &place("from")))
                        label for=(id("subject")) { "Subject " span class="muted" { "(email; Liquid)" } }
                        (input(&id("subject"), &name("subject"), "text", &v.subject, &place("subject")))
                        label for=(id("body")) { "Body " span class="muted" { "(Liquid: {{${first_name}}}, {{custom_attribute.${plan}}}, …)" } }
                        textarea id=(id("body")) name=(name("body")) rows="5"
                            aria-invalid=[at(&place("body")).map(|_| "true")] aria-describedby=[described_by(at(&place("body")), &id("body"))] { (v.body) }
                        (error_beside(at(&place("body")), &id("body")))
                        @if form.variants.len() > 1 {
                            button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove variant " (i + 1) }
                        }
                    }
                }
                @if form.variants.len() < MAX_VARIANTS {
                    button type="submit" class="secondary" name="add" value="variant" id="add-variant" formnovalidate { "Add a variant" }
                }
                label for="control-percent" { "Control group " span class="muted" { "(percent of users who get no message)" } }
                (input("control-percent", "control", "number", &form.control, "control_percent"))
            }
            fieldset {
                legend { "Audience " span class="muted" { "(users in every ticked segment; none ticked: everyone)" } }
                @if segments.is_empty() { p class="muted" { "No segments yet." } }
                @for s in &segments {
                    label class="check" { input type="checkbox" name="segment" value=(s.id) checked[form.segments.contains(&s.id)]; (s.name) }
                }
                // A segment the definition names that no longer exists stays ticked and says so:
                // dropping it silently would widen the audience on the next save.
                @for id in form.segments.iter().filter(|id| !segments.iter().any(|s| &s.id == *id)) {
                    label class="check" { input type="checkbox" name="segment" value=(id) checked; "Deleted segment " code { (id) } " (untick it to save)" }
                }
                (error_beside(error.filter(|e| e.field.starts_with("audience")), "audience"))
            }
            (delivery::fieldset(&form.delivery, Part::Campaign, &cohorts, &segments, error))
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

/// Whether the POST only adds or removes a variant (the form is shown again, nothing saved).
fn reshaping(form: &FormData) -> bool {
    form.get("add").is_some() || form.get("remove").is_some()
}

/// The form's definition through the API's checks: the canonical JSON, or the form again
/// (400) with the field to fix.
async fn checked_form(
    state: &AppState,
    ctx: &Ctx,
    f: &CampaignForm,
    editing: Option<&CampaignRecord>,
) -> Result<Result<(String, Value), Response>, PageError> {
    let refuse = |e: FieldError| async move {
        Ok::<_, PageError>(refused(form_page(state, ctx, f, editing, Some(&e)).await?))
    };
    let raw = match f.to_json() {
        Ok(raw) => raw,
        Err(e) => return Ok(Err(refuse(e).await?)),
    };
    // An edit keeps what the form does not show: the campaign's other settings, and each
    // kept variant's other fields (headers, extras, …) while its channel is unchanged.
    let merged = match editing.map(|c| &c.definition) {
        Some(Value::Object(stored)) => {
            let mut merged = stored.clone();
            let old = stored
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let messages: Vec<Value> = raw["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    match old
                        .iter()
                        .find(|o| o.get("id").is_some() && o["id"] == m["id"])
                    {
                        Some(Value::Object(o)) if o.get("channel") == m.get("channel") => {
                            let mut kept = o.clone();
                            if let Value::Object(new) = m {
                                kept.extend(new.clone());
                            }
                            Value::Object(kept)
                        }
                        _ => m.clone(),
                    }
                })
                .collect();
            merged.insert("messages".into(), Value::Array(messages));
            for key in ["control_percent", "delivery"] {
                merged.insert(key.into(), raw[key].clone());
            }
            match raw.get("audience") {
                Some(audience) => merged.insert("audience".into(), audience.clone()),
                None => merged.remove("audience"),
            };
            Value::Object(merged)
        }
        _ => raw.clone(),
    };
    match checked_definition(state, &ctx.workspace, &merged).await {
        Ok((_, canonical)) => Ok(Ok((f.name.clone(), canonical))),
        Err(e) => Ok(Err(refuse(FieldError::from_api(e)?).await?)),
    }
}

/// `POST /dashboard/w/{ws}/campaigns`: saves a draft (or, for "Add a variant" / "Remove",
/// shows the form again).
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let f = CampaignForm::from_form(&form);
    if reshaping(&form) {
        return Ok(form_page(&state, &ctx, &f, None, None)
            .await?
            .into_response());
    }
    // Held to the save: a segment cannot be deleted between its check and the save.
    let _definitions = state.segment_definitions(ctx.workspace.id).await?;
    let (name, canonical) = match checked_form(&state, &ctx, &f, None).await? {
        Ok(ok) => ok,
        Err(page) => return Ok(page),
    };
    let at = state.dashboard_now();
    state
        .store()
        .create_campaign(
            ctx.workspace.id,
            CampaignRecord {
                id: uuid::Uuid::new_v4().to_string(),
                name,
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
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let id = path_param(&path.0, "id")?;
    let action = lifecycle_action(path_param(&path.0, "action")?, "campaign")?;
    change_status(&state, &ctx.workspace, id, action)
        .await
        .map_err(api_error)?;
    if form.get("back") == Some("campaign") {
        return Ok(see_other(
            &ctx.url(&["/campaigns/", &super::segment(id)].concat()),
        ));
    }
    Ok(see_other(&ctx.url("/campaigns")))
}

/// Every template of the campaign rendered for the user with this external id, variant by
/// variant, as the dispatcher would.
async fn render_preview(
    state: &AppState,
    ctx: &Ctx,
    c: &CampaignRecord,
    def: &tideway_core::campaigns::CampaignDefinition,
    external_id: &str,
) -> Result<Preview, PageError> {
    use tideway_messaging::personalise::{CampaignVars, vars_for};
    let (_, user) = match preview::user(state, ctx, external_id).await? {
        Ok(found) => found,
        Err(refusal) => return Ok(Err(refusal)),
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
            tideway_messaging::dispatcher::preview_links(),
        );
        let prefix = ["messages[", &i.to_string(), "]"].concat();
        out.push(RenderedMessage {
            title: ["Variant ", &(i + 1).to_string(), ": ", &variant.name].concat(),
            note: None,
            parts: preview::render(templates_of(variant, &prefix), &vars),
        });
    }
    Ok(Ok(out))
}

/// `GET /dashboard/w/{ws}/campaigns/{id}[?preview=EXTERNAL_ID]`: the campaign, its figures,
/// its templates, and their rendering for one user.
/// Launch or Pause, and Stop (which asks first), for a campaign that is not stopped; on the
/// campaign's own page (`on_its_page`) they lead back to it, on the list to the list.
fn lifecycle_buttons(ctx: &Ctx, c: &CampaignRecord, on_its_page: bool) -> Markup {
    let action = |action: &str, label: &str| {
        html! {
            form class="inline" method="post" action=(ctx.url(&["/campaigns/", &super::segment(&c.id), "/", action].concat()))
                data-confirm=[(action == "stop").then(|| format!("Stop the campaign '{}'? A stopped campaign never sends again.", c.name))] {
                (ctx.csrf_field())
                @if on_its_page { input type="hidden" name="back" value="campaign"; }
                button type="submit" class="secondary" aria-label=([label, " ", c.name.as_str()].concat()) { (label) }
            }
        }
    };
    html! {
        @match c.status {
            CampaignStatus::Draft | CampaignStatus::Paused => (action("launch", "Launch")),
            CampaignStatus::Active => (action("pause", "Pause")),
            CampaignStatus::Stopped => {},
        }
        @if c.status != CampaignStatus::Stopped { " " (action("stop", "Stop")) }
    }
}

pub async fn detail(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, PageError> {
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
        Some(external_id) => Some(render_preview(&state, &ctx, &c, &def, external_id).await?),
        None => None,
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let segments = store.list_segments(ctx.workspace.id).await?;
    let segment_name = |id: &str| {
        segments
            .iter()
            .find(|s| s.id == id)
            .map_or_else(|| format!("deleted segment {id}"), |s| s.name.clone())
    };
    let body = html! {
        p { span class=(status_class(c.status)) { (c.status.as_str()) }
            @if let Some(at) = c.launched_at { " — launched " (when(at)) }
            @if ctx.me.may_change() { " " (lifecycle_buttons(&ctx, &c, true)) } }
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
        p id="campaign-audience" {
            @if def.audience.segment_ids.is_empty() { "Segments: none (everyone)" }
            @else { "Segments: " (def.audience.segment_ids.iter().map(|id| segment_name(id)).collect::<Vec<_>>().join(", ")) }
        }
        @if let Some(filter) = c.definition["audience"].get("filter").filter(|f| !f.is_null()) {
            pre class="card mono" { (pretty(filter)) }
        }
        h2 { "Messages" }
        @for (place, source) in def.templates() {
            p { code { (place) } }
            pre class="card mono" { (source) }
        }
        (preview::section(&ctx.url(&["/campaigns/", &super::segment(&c.id)].concat()), wanted, html! {}, rendered.as_ref()))
        p {
            @if ctx.me.may_change() && c.status != CampaignStatus::Stopped && CampaignForm::from_record(&c).is_some() {
                a href=(ctx.url(&["/campaigns/", &super::segment(&c.id), "/edit"].concat())) id="edit-campaign" { "Edit" } " · "
            }
            a href=(ctx.url("/campaigns")) { "All campaigns" }
        }
    };
    Ok((
        preview::status(rendered.as_ref()),
        layout::page(&ctx, Section::Campaigns, &c.name, body),
    )
        .into_response())
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
    require_admin(&ctx)?;
    let c = load(&state, &ctx, &path).await?;
    let form = CampaignForm::from_record(&c).ok_or_else(|| {
        PageError::Conflict(format!(
            "This campaign's delivery has settings the form cannot show (property filters with keys other than property, comparison and value, or more than 20 triggers or filters); change it with PUT /api/v1/campaigns/{}.",
            c.id
        ))
    })?;
    form_page(&state, &ctx, &form, Some(&c), None).await
}

/// `POST /dashboard/w/{ws}/campaigns/{id}`: saves the form over the campaign's name,
/// variants, control group, audience and delivery (its other settings are kept), through the
/// API's checks; "Add a variant" / "Remove" show the form again.
pub async fn update(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let mut c = load(&state, &ctx, &path).await?;
    let f = CampaignForm::from_form(&form);
    if reshaping(&form) {
        return Ok(form_page(&state, &ctx, &f, Some(&c), None)
            .await?
            .into_response());
    }
    // Held to the save: a segment cannot be deleted between its check and the save.
    let _definitions = state.segment_definitions(ctx.workspace.id).await?;
    let (name, canonical) = match checked_form(&state, &ctx, &f, Some(&c)).await? {
        Ok(ok) => ok,
        Err(page) => return Ok(page),
    };
    c.name = name;
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
