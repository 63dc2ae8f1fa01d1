//! Canvas: the list with status, entry and figures (entered, in a journey now, converted,
//! messages sent); a Canvas drawn as a graph (`canvas_graph.rs`: an SVG of its steps with
//! the users in each now) and shown as its steps — each step's type, name, what it does, the
//! steps its paths lead to, the users in it now and how many entered, progressed and exited,
//! and a Message step's sends; every Message step's templates rendered for a chosen user,
//! optional canvas entry properties and optional event properties (what a step after Action
//! Paths sees of the matched action) (`preview.rs`, with the variables a send of the step
//! builds); launch, pause, stop (admins; a read-only user sees the buttons disabled and the
//! guard refuses the POST); and a form to create or edit a Canvas — name, description and
//! tags, and the definition with the editor's fields (`canvas_form.rs`) or, as "Advanced:
//! edit as JSON" (`?as=json`, and for a definition the editor has no field for), as the
//! management API's JSON document. One POST handler takes both: the JSON form posts
//! `definition`, the editor its fields (and its "Add" / "Remove" buttons only show the form
//! again).
//!
//! Nothing here decides what a Canvas may be: the form's document goes through
//! `canvases_api::{create_canvas, update_canvas}` (the same parse and Liquid checks as
//! `/api/v1/canvases`; a refusal is shown beside the field it names, nothing saved), the
//! buttons through `canvases_api::change_status`, and the figures come from
//! `canvases_api::step_figures`, as `GET /api/v1/canvases/{id}` reports them.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::{Map, Value, json};
use tideway_core::campaigns::CampaignStatus;
use tideway_core::canvas::{CanvasDefinition, Delay, Step, StepKind};
use tideway_core::store::CanvasRecord;

use super::canvas_form::{self, CanvasEditor};
use super::canvas_graph;
use super::forms::{
    FieldError, api_error, described_by, error_beside, lifecycle_action, refused, require_admin,
};
use super::layout::{self, Section};
use super::preview::{self, Preview, Refusal, RenderedMessage};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::AppState;
use crate::canvases_api::{
    StepFigures, change_status, create_canvas, loaded, step_figures, update_canvas,
};

fn status_class(status: CampaignStatus) -> &'static str {
    match status {
        CampaignStatus::Active => "badge ok",
        CampaignStatus::Stopped => "badge bad",
        CampaignStatus::Draft | CampaignStatus::Paused => "badge",
    }
}

fn canvas_url(ctx: &Ctx, c: &CanvasRecord, rest: &str) -> String {
    ctx.url(&["/canvases/", &super::segment(&c.id), rest].concat())
}

/// Launch / pause / stop as the Canvas's status allows; disabled for a read-only user.
fn actions(ctx: &Ctx, c: &CanvasRecord) -> Markup {
    let admin = ctx.me.may_change();
    let button = |action: &str, label: &str| {
        html! {
            form class="inline" method="post" action=(canvas_url(ctx, c, &["/", action].concat()))
                data-confirm=[(action == "stop").then(|| format!("Stop the Canvas '{}'? A stopped Canvas never enters anyone again.", c.name))] {
                (ctx.csrf_field())
                button type="submit" class="secondary" disabled[!admin]
                    aria-label=([label, " ", c.name.as_str()].concat()) { (label) }
            }
        }
    };
    html! {
        @match c.status {
            CampaignStatus::Draft | CampaignStatus::Paused => (button("launch", "Launch")),
            CampaignStatus::Active => (button("pause", "Pause")),
            CampaignStatus::Stopped => {},
        }
        @if c.status != CampaignStatus::Stopped { " " (button("stop", "Stop")) }
    }
}

/// A stored Canvas's definition, or 500 (it was checked when saved).
fn definition(c: &CanvasRecord) -> Result<CanvasDefinition, PageError> {
    loaded(c).map_err(api_error)
}

async fn figures(
    state: &AppState,
    ctx: &Ctx,
    c: &CanvasRecord,
    def: &CanvasDefinition,
) -> Result<Vec<StepFigures>, PageError> {
    step_figures(state, &ctx.workspace, c, def)
        .await
        .map_err(api_error)
}

/// `GET /dashboard/w/{ws}/canvases`.
pub async fn list(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let canvases = state.store().list_canvases(ctx.workspace.id).await?;
    let mut rows = Vec::with_capacity(canvases.len());
    for c in canvases {
        let def = definition(&c)?;
        let f = figures(&state, &ctx, &c, &def).await?;
        let in_journey: u64 = f.iter().map(|s| s.counts.in_step).sum();
        let converted: u64 = f.iter().map(|s| s.counts.conversions).sum();
        let sent: u64 = f.iter().filter_map(|s| s.messages).map(|m| m.sent).sum();
        let entry = def.entry.schedule_type();
        rows.push((c, entry, in_journey, converted, sent));
    }
    let body = html! {
        @if ctx.me.may_change() { p { a class="button" href=(ctx.url("/canvases/new")) id="new-canvas" { "Create Canvas" } } }
        @if rows.is_empty() {
            p class="muted" { "No Canvases yet." }
        } @else {
            table id="canvases" {
                thead { tr { th { "Name" } th { "Status" } th { "Entry" } th { "Entered" } th { "In a journey" } th { "Converted" } th { "Messages sent" } th { "Last entry" } th { span class="muted" { "Actions" } } } }
                tbody {
                    @for (c, entry, in_journey, converted, sent) in &rows {
                        tr {
                            td { a href=(canvas_url(&ctx, c, "")) { (c.name) } }
                            td { span class=(status_class(c.status)) { (c.status.as_str()) } }
                            td { (entry.replace('_', " ")) }
                            td class="entered" { (c.entries) }
                            td class="in-journey" { (in_journey) }
                            td { (converted) }
                            td class="sent" { (sent) }
                            td { @if let Some(at) = c.last_entry { (when(at)) } @else { span class="muted" { "—" } } }
                            td { (actions(&ctx, c)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&ctx, Section::Canvases, "Canvas", body))
}

/// A duration in seconds as people say it ("3 days", "90 minutes").
fn duration(secs: i64) -> String {
    let (n, unit) = match secs {
        s if s != 0 && s % 86_400 == 0 => (s / 86_400, "day"),
        s if s != 0 && s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s != 0 && s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    let mut out = n.to_string();
    out.push(' ');
    out.push_str(unit);
    if n != 1 {
        out.push('s');
    }
    out
}

/// What a step does, in a line.
fn what(def: &CanvasDefinition, step: &Step) -> String {
    match &step.kind {
        StepKind::Message { message, .. } => {
            ["Sends one ", message.message.channel().as_str(), " message"].concat()
        }
        StepKind::Delay { delay, .. } => match delay {
            Delay::Duration { secs } => ["Waits ", &duration(*secs)].concat(),
            Delay::Until { at } => ["Waits until ", &when(*at)].concat(),
            Delay::DaysAt {
                days,
                minute_of_day,
            } => format!(
                "Waits {}, then until {:02}:{:02} UTC",
                duration(i64::from(*days) * 86_400),
                minute_of_day / 60,
                minute_of_day % 60
            ),
        },
        StepKind::DecisionSplit { filter, .. } => [
            "Splits on ",
            &def.filters
                .get(*filter)
                .map(Value::to_string)
                .unwrap_or_default(),
        ]
        .concat(),
        StepKind::AudiencePaths { paths, .. } => {
            format!(
                "Sends each user down the first of {} audience paths they match",
                paths.len()
            )
        }
        StepKind::ActionPaths { window_secs, .. } => [
            "Waits up to ",
            &duration(*window_secs),
            " for the first action that names a path",
        ]
        .concat(),
        StepKind::ExperimentPaths { paths } => [
            "Splits users at random: ",
            &paths
                .iter()
                .map(|p| [p.name.as_str(), " ", &p.percent.to_string(), "%"].concat())
                .collect::<Vec<_>>()
                .join(", "),
        ]
        .concat(),
        StepKind::UserUpdate { set, increment, .. } => {
            let mut names: Vec<&str> = set.keys().map(String::as_str).collect();
            names.extend(increment.iter().map(|(n, _)| n.as_str()));
            ["Updates ", &names.join(", ")].concat()
        }
    }
}

/// Properties a preview is given (`what` names them in a refusal: "Canvas entry properties",
/// "Event properties"): a JSON object (empty text: none), or why not.
fn preview_properties(what: &str, raw: &str) -> Result<Map<String, Value>, Refusal> {
    if raw.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            [
                what,
                " must be a JSON object, such as {\"plan\": \"gold\"}.",
            ]
            .concat(),
        )),
        Err(e) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{what} are not JSON: {e}."),
        )),
    }
}

/// Every Message step's templates rendered for the user with this external id and these
/// canvas entry properties, with the variables a send of the step builds: the step's
/// message as the variant, the journey's entry properties (`canvas_entry_properties` /
/// `context`), the Canvas's ids with the user's variant (`canvas.*`) and the step's
/// per-user dispatch id (`tideway_messaging::canvas::step_send`, `dispatcher::attempt`).
async fn render_preview(
    state: &AppState,
    ctx: &Ctx,
    c: &CanvasRecord,
    def: &CanvasDefinition,
    external_id: &str,
    entry: &str,
    event: &str,
) -> Result<Preview, PageError> {
    use tideway_core::campaigns::{templates_of, user_dispatch_id};
    use tideway_messaging::canvas::{canvas_vars, step_dispatch_id};
    use tideway_messaging::personalise::{CampaignVars, vars_for};
    use tideway_messaging::plan::assignment_key;
    let entry = match preview_properties("Canvas entry properties", entry) {
        Ok(entry) => entry,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let event = match preview_properties("Event properties", event) {
        Ok(event) => event,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let (seq, user) = match preview::user(state, ctx, external_id).await? {
        Ok(found) => found,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let variant = def.assign(&c.id, &assignment_key(seq));
    // What a step after Action Paths sees as `event_properties`: the matched action's
    // properties, given here by hand.
    let job = json!({"canvas_entry_properties": entry, "event_properties": event}).to_string();
    let mut out = Vec::new();
    for (i, step) in def.steps.iter().enumerate() {
        let StepKind::Message { message, .. } = &step.kind else {
            continue;
        };
        let dispatch_id = user_dispatch_id(
            &step_dispatch_id(&c.id, c.version, &step.id),
            user.braze_id.as_str(),
        );
        let canvas = json!({
            "id": c.id,
            "name": c.name,
            "variation_id": variant.map(|v| v.id.as_str()),
            "variation_name": variant.map(|v| v.name.as_str()),
            "step_id": step.id,
            "step_name": step.name,
        });
        let mut vars = vars_for(
            &user,
            CampaignVars {
                campaign_id: None,
                campaign_name: None,
                dispatch_id: &dispatch_id,
                variant_id: &message.id,
                variant_name: &message.name,
            },
            None,
            Some(&job),
            false,
            tideway_messaging::dispatcher::preview_links(),
        );
        canvas_vars(&mut vars, canvas.as_object(), Some(&job));
        let place = ["steps[", &i.to_string(), "].message"].concat();
        out.push(RenderedMessage {
            title: step.name.clone(),
            note: variant.is_none().then(|| {
                "This user is in the Canvas's control group: they would enter no journey and get no message.".to_owned()
            }),
            parts: preview::render(templates_of(message, &place), &vars),
        });
    }
    Ok(Ok(out))
}

/// `GET /dashboard/w/{ws}/canvases/{id}[?preview=EXTERNAL_ID&entry=JSON&event=JSON]`: the Canvas as its
/// steps, with their figures, and its Message steps rendered for one user.
pub async fn detail(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let c = load(&state, &ctx, &path).await?;
    let def = definition(&c)?;
    let figures = figures(&state, &ctx, &c, &def).await?;
    let wanted = query
        .get("preview")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty());
    let entry = query.get("entry").map_or("", String::as_str);
    let event = query.get("event").map_or("", String::as_str);
    let rendered = match wanted {
        Some(external_id) => {
            Some(render_preview(&state, &ctx, &c, &def, external_id, entry, event).await?)
        }
        None => None,
    };
    let entry_field = html! {
        label for="preview-entry" {
            "Canvas entry properties " span class="muted" { "(optional, a JSON object: Liquid sees {{canvas_entry_properties.${plan}}} and {{context.${plan}}})" }
        }
        textarea class="mono" id="preview-entry" name="entry" rows="3" spellcheck="false" { (entry) }
        label for="preview-event" {
            "Event properties " span class="muted" { "(optional, a JSON object: what a step after Action Paths sees as {{event_properties.${sku}}}, the matched action's properties)" }
        }
        textarea class="mono" id="preview-event" name="event" rows="2" spellcheck="false" { (event) }
    };
    let step_name = |id: &str| def.step(id).map_or(id, |s| s.name.as_str()).to_owned();
    let anchor = |id: &str| ["#step-", &super::segment(id)].concat();
    let body = html! {
        p {
            span class=(status_class(c.status)) { (c.status.as_str()) }
            " version " (c.version)
            @if let Some(at) = c.launched_at { " — launched " (when(at)) }
        }
        @if !c.description.is_empty() { p { (c.description) } }
        @if !c.tags.is_empty() { p class="muted" { "Tags: " (c.tags.join(", ")) } }
        table id="canvas-summary" {
            tbody {
                tr { th scope="row" { "Entry" } td { (def.entry.schedule_type().replace('_', " ")) } }
                tr { th scope="row" { "Entered" } td { (c.entries) } }
                tr { th scope="row" { "First entry" } td { @if let Some(at) = c.first_entry { (when(at)) } @else { "—" } } }
                tr { th scope="row" { "Last entry" } td { @if let Some(at) = c.last_entry { (when(at)) } @else { "—" } } }
                @if def.control_percent > 0 { tr { th scope="row" { "Control group" } td { (def.control_percent) "%" } } }
            }
        }
        p { (actions(&ctx, &c)) }
        h2 { "Variants" }
        ul id="canvas-variants" {
            @for v in &def.variants {
                li { (v.name) " — " (v.percent) "%, starts at " a href=(anchor(&v.first_step)) { (step_name(&v.first_step)) } }
            }
        }
        h2 { "Journey" }
        figure class="canvas-graph" {
            (canvas_graph::svg(&def, &figures, anchor))
            figcaption class="muted" { "The steps, in order below the entry; the list under it says the same in text." }
        }
        h2 { "Steps" }
        div class="steps" id="canvas-steps" {
            @for (s, f) in def.steps.iter().zip(&figures) {
                section class="step" id=(["step-", &super::segment(&s.id)].concat()) aria-label=(s.name) {
                    h3 { (s.name) " " span class="kind muted" { (s.kind.type_name().replace('_', " ")) } }
                    p class="muted" { "Step id " code { (s.id) } ". " (what(&def, s)) "." }
                    @let next = s.kind.next_paths();
                    @if next.is_empty() {
                        p class="next" { "Then: the journey ends." }
                    } @else {
                        ul class="next" {
                            @for (path, to) in &next {
                                li {
                                    @if let Some(path) = path { (path) " → " } @else { "Next → " }
                                    a href=(anchor(to)) { (step_name(to)) }
                                }
                            }
                        }
                    }
                    table class="step-stats" {
                        thead { tr { th { "In step now" } th { "Entered" } th { "Progressed" } th { "Exited" } th { "Conversions" }
                            @if f.messages.is_some() { th { "Sent" } th { "Pending" } th { "Failed" } } } }
                        tbody {
                            tr {
                                td class="in-step" { (f.counts.in_step) }
                                td class="step-entered" { (f.counts.entered) }
                                td { (f.counts.progressed) }
                                td { (f.counts.exited) }
                                td { (f.counts.conversions) }
                                @if let Some(m) = f.messages {
                                    td class="step-sent" { (m.sent) } td { (m.pending) } td { (m.failed) }
                                }
                            }
                        }
                    }
                }
            }
        }
        (preview::section(&canvas_url(&ctx, &c, ""), wanted, entry_field, rendered.as_ref()))
        p {
            @if ctx.me.may_change() && c.status != CampaignStatus::Stopped {
                a href=(canvas_url(&ctx, &c, "/edit")) id="edit-canvas" { "Edit" } " · "
            }
            a href=(ctx.url("/canvases")) { "All Canvases" }
        }
    };
    Ok((
        preview::status(rendered.as_ref()),
        layout::page(&ctx, Section::Canvases, &c.name, body),
    )
        .into_response())
}

/// How the form edits the definition: with the editor's fields (`canvas_form.rs`), or as the
/// management API's JSON document ("Advanced: edit as JSON"), which can hold anything the
/// API stores.
#[derive(Debug, Clone, PartialEq)]
enum Graph {
    Fields(Box<CanvasEditor>),
    Json(String),
}

/// The Canvas form: name, description and tags, and the definition either way.
#[derive(Debug, Clone, PartialEq)]
struct CanvasForm {
    name: String,
    description: String,
    /// Comma-separated.
    tags: String,
    graph: Graph,
}

/// What a new Canvas's JSON document starts as: one API-triggered webhook message.
const STARTER: &str = r#"{
  "entry": {"type": "api_triggered"},
  "steps": [
    {"id": "welcome", "name": "Welcome", "type": "message",
     "message": {"channel": "webhook", "url": "https://example.com/hook", "body": "Hi {{${first_name}}}"}}
  ]
}"#;

/// The keys the form has fields for (the document's copies of them are ignored).
const OWN_FIELDS: [&str; 3] = ["name", "description", "tags"];

/// Which way a GET of the form edits the definition (`?as=json`: as JSON).
fn wants_json(query: &std::collections::HashMap<String, String>) -> bool {
    query.get("as").is_some_and(|a| a == "json")
}

impl CanvasForm {
    /// The posted form: the JSON form posts `definition`, the editor its fields.
    fn from_form(form: &FormData) -> CanvasForm {
        CanvasForm {
            name: form.text("name").to_owned(),
            description: form.text("description").to_owned(),
            tags: form.text("tags").to_owned(),
            graph: match form.get("definition") {
                Some(doc) => Graph::Json(doc.to_owned()),
                None => Graph::Fields(Box::new(CanvasEditor::from_form(form))),
            },
        }
    }

    fn new(as_json: bool) -> CanvasForm {
        CanvasForm {
            name: String::new(),
            description: String::new(),
            tags: String::new(),
            graph: if as_json {
                Graph::Json(STARTER.to_owned())
            } else {
                Graph::Fields(Box::new(CanvasEditor::starter()))
            },
        }
    }

    /// A stored Canvas in the form: with the editor's fields unless JSON is asked for or the
    /// definition holds something the editor has no field for.
    fn from_record(c: &CanvasRecord, as_json: bool) -> CanvasForm {
        let editor = (!as_json)
            .then(|| CanvasEditor::from_json(&c.definition))
            .flatten();
        let graph = match editor {
            Some(e) => Graph::Fields(Box::new(e)),
            None => {
                let mut def = c.definition.clone();
                if let Value::Object(m) = &mut def {
                    for k in OWN_FIELDS {
                        m.remove(k);
                    }
                }
                Graph::Json(serde_json::to_string_pretty(&def).unwrap_or_default())
            }
        };
        CanvasForm {
            name: c.name.clone(),
            description: c.description.clone(),
            tags: c.tags.join(", "),
            graph,
        }
    }

    /// The API's request body: the definition with the form's name, description and tags.
    fn body(&self) -> Result<Map<String, Value>, FieldError> {
        let mut body = match &self.graph {
            Graph::Fields(editor) => editor.to_json()?,
            Graph::Json(doc) => match serde_json::from_str::<Value>(doc) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(FieldError::new(
                        "definition",
                        "must be a JSON object (the document /api/v1/canvases accepts)",
                    ));
                }
                Err(e) => {
                    return Err(FieldError::new("definition", format!("is not JSON: {e}")));
                }
            },
        };
        for k in OWN_FIELDS {
            body.remove(k);
        }
        body.insert("name".into(), json!(self.name));
        body.insert("description".into(), json!(self.description));
        let tags: Vec<&str> = self
            .tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        body.insert("tags".into(), json!(tags));
        Ok(body)
    }
}

/// Whether the POST only adds or removes a part of the editor (the form is shown again,
/// nothing saved).
fn reshaping(form: &FormData) -> bool {
    form.get("add").is_some() || form.get("remove").is_some()
}

async fn form_page(
    state: &AppState,
    ctx: &Ctx,
    form: &CanvasForm,
    editing: Option<&CanvasRecord>,
    error: Option<&FieldError>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let segments = store.list_segments(ctx.workspace.id).await?;
    let cohorts = store.list_cohorts(ctx.workspace.id).await?;
    let about = |field: &str| {
        error.filter(|e| e.field == field || e.field.starts_with(&[field, "["].concat()))
    };
    // In the JSON form, anything not about the named fields is about the document.
    let on_document = error.filter(|_| !OWN_FIELDS.iter().any(|f| about(f).is_some()));
    let here = match editing {
        Some(c) => canvas_url(ctx, c, "/edit"),
        None => ctx.url("/canvases/new"),
    };
    let body = html! {
        @if let Some(error) = error { p class="notice error" role="alert" { (error.full()) } }
        @match &form.graph {
            Graph::Fields(_) => p { a href=([here.as_str(), "?as=json"].concat()) id="edit-as-json" { "Advanced: edit as JSON" } " (unsaved changes here are not carried over)" },
            Graph::Json(_) => p {
                @if editing.is_some_and(|c| CanvasEditor::from_json(&c.definition).is_none()) {
                    "This Canvas holds settings the editor has no field for (message headers or extras): it is edited as JSON. "
                } @else {
                    a href=(here) id="edit-with-fields" { "Edit with fields" } " (unsaved changes here are not carried over)"
                }
            },
        }
        form class="card" method="post" action=(match editing {
            Some(c) => canvas_url(ctx, c, ""),
            None => ctx.url("/canvases"),
        }) {
            (ctx.csrf_field())
            // Enter in a field saves (a form's first submit button is its default), not the
            // first "Add" button.
            button type="submit" class="default-submit" tabindex="-1" aria-hidden="true" { "Save" }
            label for="canvas-name" { "Canvas name" }
            input type="text" id="canvas-name" name="name" required maxlength="255" value=(form.name)
                aria-invalid=[about("name").map(|_| "true")] aria-describedby=[described_by(about("name"), "canvas-name")];
            (error_beside(about("name"), "canvas-name"))
            label for="canvas-description" { "Description" }
            input type="text" id="canvas-description" name="description" value=(form.description)
                aria-describedby=[described_by(about("description"), "canvas-description")];
            (error_beside(about("description"), "canvas-description"))
            label for="canvas-tags" { "Tags " span class="muted" { "(comma-separated)" } }
            input type="text" id="canvas-tags" name="tags" value=(form.tags)
                aria-describedby=[described_by(about("tags"), "canvas-tags")];
            (error_beside(about("tags"), "canvas-tags"))
            @match &form.graph {
                Graph::Fields(editor) => {
                    (canvas_form::fieldsets(editor, &canvas_form::Context { cohorts: &cohorts, segments: &segments, error }))
                }
                Graph::Json(doc) => {
                    label for="canvas-definition" {
                        "Definition " span class="muted" { "(JSON, as POST /api/v1/canvases takes it: entry, audience, steps, variants, exit criteria, conversion events)" }
                    }
                    textarea class="json mono" id="canvas-definition" name="definition" spellcheck="false"
                        aria-invalid=[on_document.map(|_| "true")] aria-describedby=[described_by(on_document, "canvas-definition")] { (doc) }
                    (error_beside(on_document, "canvas-definition"))
                }
            }
            div class="actions" {
                @if editing.is_some() { button type="submit" id="save-canvas" { "Save changes" } }
                @else { button type="submit" id="create-canvas" { "Save as draft" } }
            }
        }
        p { a href=(ctx.url("/canvases")) { "All Canvases" } }
    };
    let title = if editing.is_some() {
        "Edit Canvas"
    } else {
        "Create Canvas"
    };
    Ok(layout::page(ctx, Section::Canvases, title, body))
}

/// `GET /dashboard/w/{ws}/canvases/new[?as=json]`.
pub async fn new_form(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    require_admin(&ctx)?;
    form_page(
        &state,
        &ctx,
        &CanvasForm::new(wants_json(&query)),
        None,
        None,
    )
    .await
}

/// `POST /dashboard/w/{ws}/canvases`: saves a draft through the API's checks (or, for an
/// editor's "Add" / "Remove", shows the form again).
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let f = CanvasForm::from_form(&form);
    if reshaping(&form) {
        return Ok(form_page(&state, &ctx, &f, None, None)
            .await?
            .into_response());
    }
    let saved = match f.body() {
        Ok(body) => create_canvas(&state, &ctx.workspace, body).await,
        Err(e) => return Ok(refused(form_page(&state, &ctx, &f, None, Some(&e)).await?)),
    };
    match saved {
        Ok(c) => Ok(see_other(&canvas_url(&ctx, &c, ""))),
        Err(e) => {
            let e = FieldError::from_api(e)?;
            Ok(refused(form_page(&state, &ctx, &f, None, Some(&e)).await?))
        }
    }
}

async fn load(state: &AppState, ctx: &Ctx, path: &PathParams) -> Result<CanvasRecord, PageError> {
    let id = path_param(&path.0, "id")?;
    state
        .store()
        .canvas(ctx.workspace.id, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("No Canvas '{id}' in this workspace.")))
}

/// `GET /dashboard/w/{ws}/canvases/{id}/edit[?as=json]`.
pub async fn edit_form(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    require_admin(&ctx)?;
    let c = load(&state, &ctx, &path).await?;
    if c.status == CampaignStatus::Stopped {
        return Err(PageError::Conflict(
            "The Canvas is stopped (stopping is final): it cannot be edited.".into(),
        ));
    }
    let form = CanvasForm::from_record(&c, wants_json(&query));
    form_page(&state, &ctx, &form, Some(&c), None).await
}

/// `POST /dashboard/w/{ws}/canvases/{id}`: saves the form (a new version when the definition
/// changed; journeys under way keep theirs), through the API's checks; or, for an editor's
/// "Add" / "Remove", shows the form again.
pub async fn update(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let c = load(&state, &ctx, &path).await?;
    let f = CanvasForm::from_form(&form);
    if reshaping(&form) {
        return Ok(form_page(&state, &ctx, &f, Some(&c), None)
            .await?
            .into_response());
    }
    let saved = match f.body() {
        Ok(body) => update_canvas(&state, &ctx.workspace, &c.id, body).await,
        Err(e) => {
            return Ok(refused(
                form_page(&state, &ctx, &f, Some(&c), Some(&e)).await?,
            ));
        }
    };
    match saved {
        Ok(c) => Ok(see_other(&canvas_url(&ctx, &c, ""))),
        Err(e) => {
            let e = FieldError::from_api(e)?;
            Ok(refused(
                form_page(&state, &ctx, &f, Some(&c), Some(&e)).await?,
            ))
        }
    }
}

/// `POST /dashboard/w/{ws}/canvases/{id}/{action}`: launch, pause or stop.
pub async fn action(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let c = load(&state, &ctx, &path).await?;
    let action = lifecycle_action(path_param(&path.0, "action")?, "Canvas")?;
    let saved = change_status(&state, &ctx.workspace, &c.id, action)
        .await
        .map_err(api_error)?;
    Ok(see_other(&canvas_url(&ctx, &saved, "")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(259_200), "3 days");
        assert_eq!(duration(3_600), "1 hour");
        assert_eq!(duration(5_400), "90 minutes");
        assert_eq!(duration(61), "61 seconds");
        assert_eq!(duration(0), "0 seconds");
    }

    #[test]
    fn the_form_becomes_the_apis_body_with_its_own_fields_winning() {
        let f = CanvasForm {
            name: "Trial".into(),
            description: "d".into(),
            tags: " a, ,b ".into(),
            graph: Graph::Json(r#"{"name": "ignored", "tags": ["x"], "steps": []}"#.into()),
        };
        let body = f.body().unwrap();
        assert_eq!(body["name"], "Trial");
        assert_eq!(body["tags"], json!(["a", "b"]));
        assert_eq!(body["steps"], json!([]));
        for (doc, says) in [("[1]", "must be a JSON object"), ("{", "is not JSON")] {
            let e = CanvasForm {
                graph: Graph::Json(doc.into()),
                ..f.clone()
            }
            .body()
            .unwrap_err();
            assert_eq!(e.field, "definition");
            assert!(e.message.contains(says), "{e:?}");
        }
    }
}
