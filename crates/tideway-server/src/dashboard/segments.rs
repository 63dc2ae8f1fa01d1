//! Segments: the list with live sizes; a builder of filters as groups of conditions (the groups
//! combined with AND or OR, the conditions of a group with AND or OR) over Heap Cohorts (and
//! other partners' cohorts) includes / excludes — the cohort picked by name —, attributes,
//! custom events, purchases and other segments; the size shown as the filter changes (htmx
//! posts the form to `…/segments/preview` and swaps in the number, no page reload); save,
//! edit, delete; members a page at a time; CSV export.
//!
//! The builder writes the filter language's wire JSON (README, "Filters") and hands it to the
//! same parser and validation as `/api/v1/segments` (`segments_api::parse_filter`); sizes and
//! members come from the live segment index (`segment_service`), never from a scan of users.
//! A segment whose filter the builder cannot show (made through the API with `not`, random
//! buckets, …) is shown as JSON and edited through the API.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::{Map, Value, json};
use tideway_core::MAX_DISPLAY_NAME_CHARS;
use tideway_core::cohorts::partner;
use tideway_core::segments::{Segment, segment_lookup};
use tideway_core::store::CohortSummary;

use super::forms::{FieldError, refused, require_admin};
use super::layout::{self, Section};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::AppState;
use crate::segments_api::{parse_filter, segment_in_use};

/// Members on one page.
const PAGE: usize = 100;
/// Members read per index evaluation while exporting.
const EXPORT_CHUNK: usize = 10_000;

const ATTRIBUTE_OPS: [&str; 20] = [
    "equals",
    "not_equals",
    "matches",
    "starts_with",
    "is_blank",
    "exists",
    "greater_than",
    "greater_or_equal",
    "less_than",
    "less_or_equal",
    "before",
    "after",
    "more_than_days_ago",
    "less_than_days_ago",
    "within_days_future",
    "includes_value",
    "not_includes_value",
    "size_equals",
    "size_greater_than",
    "size_less_than",
];
const NUMERIC_ATTRIBUTE_OPS: [&str; 10] = [
    "greater_than",
    "greater_or_equal",
    "less_than",
    "less_or_equal",
    "more_than_days_ago",
    "less_than_days_ago",
    "within_days_future",
    "size_equals",
    "size_greater_than",
    "size_less_than",
];
const EVENT_OPS: [&str; 8] = [
    "count_at_least",
    "count_at_most",
    "count_exactly",
    "first_performed_before",
    "first_performed_after",
    "last_performed_before",
    "last_performed_after",
    "last_performed_within_days",
];
const PURCHASE_OPS: [&str; 3] = ["count_at_least", "total_spend_at_least", "made_any"];
const KINDS: [(&str, &str); 5] = [
    ("cohort", "Partner cohort (Heap Cohorts, …)"),
    ("attribute", "Attribute"),
    ("event", "Custom event"),
    ("purchase", "Purchase"),
    ("segment", "Other segment"),
];

/// One condition of the builder, as the form carries it.
#[derive(Debug, Clone, Default)]
struct Row {
    kind: String,
    /// `partner:cohort_id`
    cohort: String,
    /// includes | excludes
    cohort_op: String,
    name: String,
    op: String,
    value: String,
    /// text | number | boolean (attributes' equals / not_equals)
    vtype: String,
    within: String,
    product: String,
    segment: String,
}

#[derive(Debug, Clone)]
struct Group {
    combine: String,
    rows: Vec<Row>,
}

/// The builder's state: groups combined with `combine`.
#[derive(Debug, Clone)]
struct Builder {
    name: String,
    combine: String,
    groups: Vec<Group>,
}

fn and_or(raw: Option<&str>) -> String {
    if raw == Some("or") { "or" } else { "and" }.to_owned()
}

impl Builder {
    fn empty() -> Builder {
        Builder {
            name: String::new(),
            combine: "and".into(),
            groups: vec![Group {
                combine: "and".into(),
                rows: vec![Row {
                    kind: "cohort".into(),
                    cohort_op: "includes".into(),
                    ..Row::default()
                }],
            }],
        }
    }

    /// From the form: `combine`, `g{i}_combine`, `g{i}r{j}_{field}`; then `add` (a group's
    /// key or `group`) and `remove` (a row's key) applied.
    fn from_form(form: &FormData) -> Builder {
        let mut groups = Vec::new();
        for g in form.groups("g", "combine") {
            let mut rows: Vec<Row> = g
                .groups("r", "kind")
                .into_iter()
                .filter(|r| !r.get("kind").is_empty())
                .map(|r| Row {
                    kind: r.get("kind").to_owned(),
                    cohort: r.get("cohort").to_owned(),
                    cohort_op: r.get("cohort_op").to_owned(),
                    name: r.get("name").to_owned(),
                    op: r.get("op").to_owned(),
                    value: r.get("value").to_owned(),
                    vtype: r.get("vtype").to_owned(),
                    within: r.get("within").to_owned(),
                    product: r.get("product").to_owned(),
                    segment: r.get("segment").to_owned(),
                })
                .collect();
            if form.get("add") == Some(g.name()) {
                rows.push(Row {
                    kind: "attribute".into(),
                    ..Row::default()
                });
            }
            if !rows.is_empty() {
                groups.push(Group {
                    combine: and_or(Some(g.get("combine"))),
                    rows,
                });
            }
        }
        if form.get("add") == Some("group") || groups.is_empty() {
            groups.push(Builder::empty().groups.remove(0));
        }
        Builder {
            name: form.text("name").to_owned(),
            combine: and_or(form.get("combine")),
            groups,
        }
    }

    /// The filter's wire JSON, or what to fix.
    fn to_json(&self) -> Result<Value, String> {
        let mut groups = Vec::new();
        for (i, g) in self.groups.iter().enumerate() {
            let mut rows = Vec::new();
            for (j, r) in g.rows.iter().enumerate() {
                rows.push(r.to_json().map_err(|e| {
                    [
                        "Group ",
                        &(i + 1).to_string(),
                        ", condition ",
                        &(j + 1).to_string(),
                        ": ",
                        &e,
                    ]
                    .concat()
                })?);
            }
            let mut m = Map::new();
            m.insert(g.combine.clone(), Value::Array(rows));
            groups.push(Value::Object(m));
        }
        let mut m = Map::new();
        m.insert(self.combine.clone(), Value::Array(groups));
        Ok(Value::Object(m))
    }

    /// The builder showing `filter`, if it has the builder's shape.
    fn from_json(name: &str, filter: &Value) -> Option<Builder> {
        let (combine, groups) = combinator(filter)?;
        let mut out = Vec::new();
        for g in groups {
            let (gc, rows) = combinator(g)?;
            out.push(Group {
                combine: gc.to_owned(),
                rows: rows.iter().map(Row::from_json).collect::<Option<_>>()?,
            });
        }
        Some(Builder {
            name: name.to_owned(),
            combine: combine.to_owned(),
            groups: out,
        })
    }
}

fn combinator(v: &Value) -> Option<(&str, &Vec<Value>)> {
    let m = v.as_object().filter(|m| m.len() == 1)?;
    let (k, items) = m.iter().next()?;
    (k == "and" || k == "or").then_some(())?;
    Some((k.as_str(), items.as_array()?))
}

fn number(raw: &str, what: &str) -> Result<Value, String> {
    let raw = raw.trim();
    if let Ok(i) = raw.parse::<i64>() {
        return Ok(json!(i));
    }
    raw.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| [what, " must be a number"].concat())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Row {
    fn to_json(&self) -> Result<Value, String> {
        match self.kind.as_str() {
            "cohort" => {
                let (partner, cohort_id) = self
                    .cohort
                    .split_once(':')
                    .ok_or_else(|| "pick a cohort".to_owned())?;
                let op = if self.cohort_op == "excludes" {
                    "excludes"
                } else {
                    "includes"
                };
                Ok(json!({"cohort": {"partner": partner, "cohort_id": cohort_id, "op": op}}))
            }
            "attribute" => {
                if self.name.trim().is_empty() {
                    return Err("name the attribute".into());
                }
                let mut m = Map::new();
                m.insert("name".into(), json!(self.name.trim()));
                m.insert("op".into(), json!(self.op));
                match self.op.as_str() {
                    "is_blank" => {}
                    "exists" => {
                        m.insert("value".into(), json!(self.value != "false"));
                    }
                    op if NUMERIC_ATTRIBUTE_OPS.contains(&op) => {
                        m.insert("value".into(), number(&self.value, "the value")?);
                    }
                    "equals" | "not_equals" => {
                        let v = match self.vtype.as_str() {
                            "number" => number(&self.value, "the value")?,
                            "boolean" => json!(self.value.trim() == "true"),
                            _ => json!(self.value),
                        };
                        m.insert("value".into(), v);
                    }
                    _ => {
                        m.insert("value".into(), json!(self.value));
                    }
                }
                Ok(json!({ "attribute": m }))
            }
            "event" => {
                if self.name.trim().is_empty() {
                    return Err("name the event".into());
                }
                let mut m = Map::new();
                m.insert("name".into(), json!(self.name.trim()));
                m.insert("op".into(), json!(self.op));
                if self.op.starts_with("count_") || self.op == "last_performed_within_days" {
                    m.insert("value".into(), number(&self.value, "the count")?);
                } else {
                    m.insert("value".into(), json!(self.value.trim()));
                }
                if self.op.starts_with("count_") && !self.within.trim().is_empty() {
                    m.insert("within_days".into(), number(&self.within, "within days")?);
                }
                Ok(json!({ "event": m }))
            }
            "purchase" => {
                let mut m = Map::new();
                m.insert("op".into(), json!(self.op));
                match self.op.as_str() {
                    "made_any" => {
                        m.insert("value".into(), json!(true));
                    }
                    _ => {
                        m.insert("value".into(), number(&self.value, "the value")?);
                    }
                }
                if self.op == "count_at_least" {
                    if !self.product.trim().is_empty() {
                        m.insert("product_id".into(), json!(self.product.trim()));
                    }
                    if !self.within.trim().is_empty() {
                        m.insert("within_days".into(), number(&self.within, "within days")?);
                    }
                }
                Ok(json!({ "purchase": m }))
            }
            "segment" => {
                if self.segment.is_empty() {
                    return Err("pick a segment".into());
                }
                Ok(json!({"in_segment": self.segment}))
            }
            _ => Err("pick what the condition tests".into()),
        }
    }

    fn from_json(v: &Value) -> Option<Row> {
        let m = v.as_object().filter(|m| m.len() == 1)?;
        let (k, body) = m.iter().next()?;
        let get = |f: &str| body.get(f).map(text).unwrap_or_default();
        let row = match k.as_str() {
            "cohort" => Row {
                kind: "cohort".into(),
                cohort: [get("partner"), get("cohort_id")].join(":"),
                cohort_op: get("op"),
                ..Row::default()
            },
            "attribute" => Row {
                kind: "attribute".into(),
                name: get("name"),
                op: get("op"),
                value: get("value"),
                vtype: match body.get("value") {
                    Some(Value::Number(_)) => "number",
                    Some(Value::Bool(_)) => "boolean",
                    _ => "text",
                }
                .into(),
                ..Row::default()
            },
            "event" => Row {
                kind: "event".into(),
                name: get("name"),
                op: get("op"),
                value: get("value"),
                within: get("within_days"),
                ..Row::default()
            },
            "purchase" => Row {
                kind: "purchase".into(),
                op: get("op"),
                value: get("value"),
                within: get("within_days"),
                product: get("product_id"),
                ..Row::default()
            },
            "in_segment" => Row {
                kind: "segment".into(),
                segment: text(body),
                ..Row::default()
            },
            _ => return None,
        };
        Some(row)
    }
}

fn options(choices: &[&str], selected: &str) -> Markup {
    html! {
        @for c in choices {
            option value=(c) selected[*c == selected] { (c.replace('_', " ")) }
        }
    }
}

/// The builder's form fields (swapped as a whole by htmx when a condition or group is added
/// or removed, or a condition's kind changes).
fn builder_fields(
    ctx: &Ctx,
    b: &Builder,
    cohorts: &[CohortSummary],
    segments: &[Segment],
    editing: Option<&str>,
) -> Markup {
    let builder_url = ctx.url("/segments/builder");
    html! {
        div id="builder" {
            label for="segment-name" { "Segment name" }
            input type="text" id="segment-name" name="name" maxlength="255" required value=(b.name);
            fieldset {
                legend { "Filters" }
                label for="combine" { "Combine the groups with" }
                select id="combine" name="combine" {
                    option value="and" selected[b.combine == "and"] { "AND (every group)" }
                    option value="or" selected[b.combine == "or"] { "OR (any group)" }
                }
                @for (i, g) in b.groups.iter().enumerate() {
                    @let gk = ["g", &i.to_string()].concat();
                    div class="group" role="group" aria-label=(["Group ", &(i + 1).to_string()].concat()) {
                        label for=([gk.as_str(), "_combine"].concat()) { "Group " (i + 1) ": conditions combined with" }
                        select id=([gk.as_str(), "_combine"].concat()) name=([gk.as_str(), "_combine"].concat()) {
                            option value="and" selected[g.combine == "and"] { "AND" }
                            option value="or" selected[g.combine == "or"] { "OR" }
                        }
                        @for (j, r) in g.rows.iter().enumerate() {
                            @let rk = [gk.as_str(), "r", &j.to_string()].concat();
                            @let f = |field: &str| [rk.as_str(), "_", field].concat();
                            div class="card condition" {
                                label for=(f("kind")) { "Condition " (j + 1) }
                                select id=(f("kind")) name=(f("kind")) hx-post=(builder_url) hx-target="#builder" hx-swap="outerHTML" hx-trigger="change" {
                                    @for (k, label) in KINDS { option value=(k) selected[r.kind == k] { (label) } }
                                }
                                @match r.kind.as_str() {
                                    "cohort" => {
                                        label for=(f("cohort_op")) { "Cohort test" }
                                        select id=(f("cohort_op")) name=(f("cohort_op")) {
                                            option value="includes" selected[r.cohort_op != "excludes"] { "includes" }
                                            option value="excludes" selected[r.cohort_op == "excludes"] { "excludes" }
                                        }
                                        label for=(f("cohort")) { "Cohort" }
                                        select id=(f("cohort")) name=(f("cohort")) {
                                            option value="" { "— pick a cohort —" }
                                            @for c in cohorts {
                                                @let v = [c.partner.as_str(), ":", c.cohort_id.as_str()].concat();
                                                option value=(v) selected[r.cohort == v] {
                                                    (partner(&c.partner).map_or(c.partner.as_str(), |p| p.filter_name)) " › " (c.name)
                                                }
                                            }
                                        }
                                    }
                                    "attribute" => {
                                        label for=(f("name")) { "Attribute name" }
                                        input type="text" id=(f("name")) name=(f("name")) value=(r.name);
                                        label for=(f("op")) { "Test" }
                                        select id=(f("op")) name=(f("op")) { (options(&ATTRIBUTE_OPS, &r.op)) }
                                        label for=(f("value")) { "Value" }
                                        input type="text" id=(f("value")) name=(f("value")) value=(r.value);
                                        label for=(f("vtype")) { "Value type (for equals / not equals)" }
                                        select id=(f("vtype")) name=(f("vtype")) { (options(&["text", "number", "boolean"], &r.vtype)) }
                                    }
                                    "event" => {
                                        label for=(f("name")) { "Event name" }
                                        input type="text" id=(f("name")) name=(f("name")) value=(r.name);
                                        label for=(f("op")) { "Test" }
                                        select id=(f("op")) name=(f("op")) { (options(&EVENT_OPS, &r.op)) }
                                        label for=(f("value")) { "Value (a count, days, or a date)" }
                                        input type="text" id=(f("value")) name=(f("value")) value=(r.value);
                                        label for=(f("within")) { "Within the last days (counts; optional)" }
                                        input type="number" min="1" id=(f("within")) name=(f("within")) value=(r.within);
                                    }
                                    "purchase" => {
                                        label for=(f("op")) { "Test" }
                                        select id=(f("op")) name=(f("op")) { (options(&PURCHASE_OPS, &r.op)) }
                                        label for=(f("value")) { "Value (count or spend)" }
                                        input type="text" id=(f("value")) name=(f("value")) value=(r.value);
                                        label for=(f("product")) { "Product id (counts; optional)" }
                                        input type="text" id=(f("product")) name=(f("product")) value=(r.product);
                                        label for=(f("within")) { "Within the last days (counts; optional)" }
                                        input type="number" min="1" id=(f("within")) name=(f("within")) value=(r.within);
                                    }
                                    _ => {
                                        label for=(f("segment")) { "Segment" }
                                        select id=(f("segment")) name=(f("segment")) {
                                            option value="" { "— pick a segment —" }
                                            @for s in segments.iter().filter(|s| Some(s.id.as_str()) != editing) {
                                                option value=(s.id) selected[r.segment == s.id] { (s.name) }
                                            }
                                        }
                                    }
                                }
                                div class="actions" {
                                    button type="submit" class="secondary" name="remove" value=(rk) formaction=(builder_url) hx-post=(builder_url) hx-target="#builder" hx-swap="outerHTML" { "Remove condition" }
                                }
                            }
                        }
                        button type="submit" class="secondary" name="add" value=(gk) formaction=(builder_url) hx-post=(builder_url) hx-target="#builder" hx-swap="outerHTML" { "Add condition to group " (i + 1) }
                    }
                }
                button type="submit" class="secondary" name="add" value="group" formaction=(builder_url) hx-post=(builder_url) hx-target="#builder" hx-swap="outerHTML" { "Add group" }
            }
        }
    }
}

/// The whole builder page.
async fn builder_page(
    state: &AppState,
    ctx: &Ctx,
    b: &Builder,
    editing: Option<&Segment>,
    error: Option<&str>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let cohorts = store.list_cohorts(ctx.workspace.id).await?;
    let segments = store.list_segments(ctx.workspace.id).await?;
    let action = match editing {
        Some(s) => ctx.url(&["/segments/", &super::segment(&s.id)].concat()),
        None => ctx.url("/segments"),
    };
    let size = match b.to_json() {
        Ok(filter) => size_text(state, ctx, &filter, editing.map(|s| s.id.as_str())).await?,
        Err(e) => e,
    };
    let body = html! {
        @if let Some(error) = error { p class="notice error" role="alert" { (error) } }
        form method="post" action=(action) hx-post=(ctx.url("/segments/preview")) hx-trigger="change, input delay:500ms" hx-target="#size" hx-swap="innerHTML" {
            (ctx.csrf_field())
            // Enter in a field saves: a form's first submit button is its default, and the
            // builder's own buttons (remove a condition) come before Save.
            button type="submit" class="default-submit" tabindex="-1" aria-hidden="true" { "Save segment" }
            @if let Some(s) = editing { input type="hidden" name="editing" value=(s.id); }
            p class="card" aria-live="polite" { "Size: " span class="size" id="size" { (size) } }
            (builder_fields(ctx, b, &cohorts, &segments, editing.map(|s| s.id.as_str())))
            div class="actions" {
                button type="submit" id="save-segment" { "Save segment" }
            }
        }
        p { a href=(ctx.url("/segments")) { "All segments" } }
    };
    let title = if editing.is_some() {
        "Edit segment"
    } else {
        "New segment"
    };
    Ok(layout::page(ctx, Section::Segments, title, body))
}

/// "N users", or why the filter is not valid yet.
async fn size_text(
    state: &AppState,
    ctx: &Ctx,
    filter: &Value,
    editing: Option<&str>,
) -> Result<String, PageError> {
    match parse_filter(state, &ctx.workspace, filter, editing).await {
        Ok(filter) => {
            let lookup = segment_lookup(&state.store().list_segments(ctx.workspace.id).await?);
            let at = state.dashboard_now().secs();
            let size = state
                .segments()
                .with_fresh(ctx.workspace.id, move |live| {
                    live.size(&filter, at, &lookup)
                })
                .await?;
            Ok([
                size.to_string().as_str(),
                if size == 1 { " user" } else { " users" },
            ]
            .concat())
        }
        Err(e) => Ok(["Not valid yet: ", &FieldError::from_api(e)?.full()].concat()),
    }
}

/// `GET …/segments`: every segment with its size.
pub async fn list(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let segments = state.store().list_segments(ctx.workspace.id).await?;
    let lookup = segment_lookup(&segments);
    let filters: Vec<_> = segments.iter().map(Segment::parsed_filter).collect();
    let at = state.dashboard_now().secs();
    let sizes = state
        .segments()
        .with_fresh(ctx.workspace.id, move |live| {
            filters
                .iter()
                .map(|f| f.as_ref().map(|f| live.size(f, at, &lookup)))
                .collect::<Vec<_>>()
        })
        .await?;
    let admin = ctx.me.may_change();
    let body = html! {
        @if admin { p { a class="button" href=(ctx.url("/segments/new")) id="new-segment" { "Create Segment" } } }
        @if segments.is_empty() {
            p class="muted" { "No segments yet." }
        } @else {
            table id="segments" {
                thead { tr { th { "Name" } th { "Size" } th { "Updated" } th { span class="muted" { "Actions" } } } }
                tbody {
                    @for (s, size) in segments.iter().zip(&sizes) {
                        @let base = ctx.url(&["/segments/", &super::segment(&s.id)].concat());
                        tr {
                            td { a href=(base) { (s.name) } }
                            td class="segment-size" { @if let Some(n) = size { (n) } @else { "—" } }
                            td { (when(s.updated_at)) }
                            td {
                                a href=([base.as_str(), "/members"].concat()) { "Members" } " · "
                                a href=([base.as_str(), "/export.csv"].concat()) { "Export CSV" }
                                @if admin {
                                    " "
                                    form class="inline" method="post" action=([base.as_str(), "/delete"].concat())
                                        data-confirm=(format!("Delete the segment '{}'? This cannot be undone.", s.name)) {
                                        (ctx.csrf_field())
                                        button type="submit" class="danger" aria-label=(["Delete segment ", s.name.as_str()].concat()) { "Delete" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&ctx, Section::Segments, "Segments", body))
}

/// `GET …/segments/new`.
pub async fn new_page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    require_admin(&ctx)?;
    builder_page(&state, &ctx, &Builder::empty(), None, None).await
}

/// `POST …/segments/builder`: the builder re-rendered after adding or removing a condition or
/// group, or changing a condition's kind (the fragment for htmx, the page otherwise).
pub async fn builder(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
    headers: HeaderMap,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let b = Builder::from_form(&form);
    let editing = match form.get("editing").filter(|e| !e.is_empty()) {
        Some(id) => state.store().segment(ctx.workspace.id, id).await?,
        None => None,
    };
    if headers.contains_key("hx-request") {
        let store = state.store();
        let cohorts = store.list_cohorts(ctx.workspace.id).await?;
        let segments = store.list_segments(ctx.workspace.id).await?;
        return Ok(builder_fields(
            &ctx,
            &b,
            &cohorts,
            &segments,
            editing.as_ref().map(|s| s.id.as_str()),
        ));
    }
    builder_page(&state, &ctx, &b, editing.as_ref(), None).await
}

/// `POST …/segments/preview`: the size of the form's filter, as text (htmx swaps it in).
pub async fn preview(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let b = Builder::from_form(&form);
    let editing = form.get("editing").filter(|e| !e.is_empty());
    let text = match b.to_json() {
        Ok(filter) => size_text(&state, &ctx, &filter, editing).await?,
        Err(e) => e,
    };
    Ok(html! { (text) })
}

/// Saves (creates or updates) from the form; a filter that is not valid is answered 400 with
/// the builder and what to fix.
async fn save(
    state: &AppState,
    ctx: &Ctx,
    form: &FormData,
    editing: Option<&Segment>,
) -> Result<Response, PageError> {
    let b = Builder::from_form(form);
    let checked = if b.name.is_empty() || b.name.chars().count() > MAX_DISPLAY_NAME_CHARS {
        Err(format!(
            "Give the segment a name of 1 to {MAX_DISPLAY_NAME_CHARS} characters."
        ))
    } else {
        b.to_json()
    };
    let raw = match checked {
        Ok(raw) => raw,
        Err(message) => return refuse(state, ctx, &b, editing, &message).await,
    };
    let _definitions = state.segment_definitions(ctx.workspace.id).await?;
    let filter =
        match parse_filter(state, &ctx.workspace, &raw, editing.map(|s| s.id.as_str())).await {
            Ok(filter) => filter.to_json(),
            Err(e) => {
                let why = FieldError::from_api(e)?;
                return refuse(state, ctx, &b, editing, &why.full()).await;
            }
        };
    let now = state.dashboard_now();
    let store = state.store();
    match editing {
        Some(old) => {
            store
                .update_segment(ctx.workspace.id, &old.id, b.name, filter, now)
                .await?
                .ok_or_else(|| PageError::NotFound("That segment was deleted meanwhile.".into()))?;
        }
        None => {
            store
                .create_segment(
                    ctx.workspace.id,
                    Segment {
                        id: uuid::Uuid::new_v4().to_string(),
                        name: b.name,
                        filter,
                        created_at: now,
                        updated_at: now,
                    },
                )
                .await?;
        }
    }
    Ok(see_other(&ctx.url("/segments")))
}

/// 400 with the builder as sent and what to fix.
async fn refuse(
    state: &AppState,
    ctx: &Ctx,
    b: &Builder,
    editing: Option<&Segment>,
    message: &str,
) -> Result<Response, PageError> {
    Ok(refused(
        builder_page(state, ctx, b, editing, Some(message)).await?,
    ))
}

/// `POST …/segments`: creates a segment.
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    save(&state, &ctx, &form, None).await
}

async fn load(state: &AppState, ctx: &Ctx, path: &PathParams) -> Result<Segment, PageError> {
    let id = path_param(&path.0, "id")?;
    state
        .store()
        .segment(ctx.workspace.id, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("No segment '{id}' in this workspace.")))
}

/// `GET …/segments/{id}`: the builder with the segment (or its JSON, for filters the builder
/// cannot show, and for read-only users).
pub async fn edit_page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let s = load(&state, &ctx, &path).await?;
    if ctx.me.may_change()
        && let Some(b) = Builder::from_json(&s.name, &s.filter)
    {
        return builder_page(&state, &ctx, &b, Some(&s), None).await;
    }
    let size = size_text(&state, &ctx, &s.filter, Some(&s.id)).await?;
    let pretty = serde_json::to_string_pretty(&s.filter).unwrap_or_default();
    let base = ctx.url(&["/segments/", &super::segment(&s.id)].concat());
    let body = html! {
        p { "Size: " span class="size" id="size" { (size) } }
        p class="muted" { "Filter (edit it through PUT /api/v1/segments/" (s.id) " when the builder cannot show it):" }
        pre class="card mono" { (pretty) }
        p { a href=([base.as_str(), "/members"].concat()) { "Members" } " · " a href=(ctx.url("/segments")) { "All segments" } }
    };
    Ok(layout::page(&ctx, Section::Segments, &s.name, body))
}

/// `POST …/segments/{id}`: saves the edited segment.
pub async fn update(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let s = load(&state, &ctx, &path).await?;
    save(&state, &ctx, &form, Some(&s)).await
}

/// `POST …/segments/{id}/delete`: refused (409) while another segment, or a campaign or Canvas
/// that is not stopped, uses it.
pub async fn delete(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let s = load(&state, &ctx, &path).await?;
    let _definitions = state.segment_definitions(ctx.workspace.id).await?;
    if let Some(why) = segment_in_use(&state, ctx.workspace.id, &s.id).await? {
        return Err(PageError::Store(tideway_core::store::StoreError::Conflict(
            why,
        )));
    }
    state
        .store()
        .delete_segment(ctx.workspace.id, &s.id)
        .await?;
    Ok(see_other(&ctx.url("/segments")))
}

/// `GET …/segments/{id}/members?after=SEQ`: a page of members.
pub async fn members(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let s = load(&state, &ctx, &path).await?;
    let after: u32 = match query.get("after") {
        None => 0,
        Some(a) => a.parse().map_err(|_| {
            PageError::BadRequest(
                "'after' is the last member's position on the previous page.".into(),
            )
        })?,
    };
    let filter = s.parsed_filter().ok_or_else(|| {
        PageError::Store(tideway_core::store::StoreError::Corrupt(
            "a stored filter".into(),
        ))
    })?;
    let lookup = segment_lookup(&state.store().list_segments(ctx.workspace.id).await?);
    let at = state.dashboard_now().secs();
    let page = state
        .segments()
        .with_fresh(ctx.workspace.id, move |live| {
            live.members(&filter, at, &lookup, after, PAGE)
        })
        .await?;
    let next = (page.len() == PAGE)
        .then(|| page.last().map(|m| m.seq.0))
        .flatten();
    let base = ctx.url(&["/segments/", &super::segment(&s.id), "/members"].concat());
    let body = html! {
        @if page.is_empty() { p class="muted" { "No members on this page." } } @else {
            table id="members" {
                thead { tr { th { "External id" } th { "Braze id" } } }
                tbody {
                    @for m in &page {
                        tr {
                            td { @if let Some(e) = &m.external_id { (e) } @else { span class="muted" { "—" } } }
                            td { code { (m.braze_id.as_str()) } }
                        }
                    }
                }
            }
        }
        div class="pager" {
            @if after > 0 { a href=(base) { "First page" } }
            @if let Some(next) = next { a href=([base.as_str(), "?after=", &next.to_string()].concat()) rel="next" { "Next page" } }
        }
        p { a href=(ctx.url("/segments")) { "All segments" } }
    };
    Ok(layout::page(
        &ctx,
        Section::Segments,
        &["Members of ", s.name.as_str()].concat(),
        body,
    ))
}

/// A CSV field, quoted when it must be.
fn csv_field(out: &mut String, raw: &str) {
    if raw.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&raw.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(raw);
    }
}

/// `GET …/segments/{id}/export.csv`: every member (`braze_id,external_id`), read from the
/// index and sent in chunks of [`EXPORT_CHUNK`].
pub async fn export_csv(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let s = load(&state, &ctx, &path).await?;
    let filter = s.parsed_filter().ok_or_else(|| {
        PageError::Store(tideway_core::store::StoreError::Corrupt(
            "a stored filter".into(),
        ))
    })?;
    let lookup = std::sync::Arc::new(segment_lookup(
        &state.store().list_segments(ctx.workspace.id).await?,
    ));
    let filter = std::sync::Arc::new(filter);
    let at = state.dashboard_now().secs();
    let ws = ctx.workspace.id;
    // One chunk of members per index evaluation, sent as it is read: memory stays flat however
    // large the segment. A failure part-way ends the body early (the client sees a cut file).
    let header = futures_util::stream::once(async {
        Ok::<String, std::io::Error>("braze_id,external_id\n".to_owned())
    });
    let rows = futures_util::stream::unfold(Some(0u32), move |after| {
        let (state, filter, lookup) = (state.clone(), filter.clone(), lookup.clone());
        async move {
            let after = after?;
            let chunk = state
                .segments()
                .with_fresh(ws, move |live| {
                    live.members(&filter, at, lookup.as_ref(), after, EXPORT_CHUNK)
                })
                .await;
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), None)),
            };
            let next = match chunk.last() {
                Some(last) if chunk.len() == EXPORT_CHUNK => Some(last.seq.0),
                _ => None,
            };
            if chunk.is_empty() {
                return None;
            }
            let mut out = String::new();
            for m in &chunk {
                csv_field(&mut out, m.braze_id.as_str());
                out.push(',');
                csv_field(&mut out, m.external_id.as_deref().unwrap_or(""));
                out.push('\n');
            }
            Some((Ok(out), next))
        }
    });
    let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(header, rows));
    let filename: String = s
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition =
        HeaderValue::from_str(&["attachment; filename=\"", &filename, ".csv\""].concat())
            .unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormData {
        FormData(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn the_form_becomes_the_filter_language_and_back() {
        let f = form(&[
            ("name", "s"),
            ("combine", "or"),
            ("g0_combine", "and"),
            ("g0r0_kind", "cohort"),
            ("g0r0_cohort", "heap:c:1"),
            ("g0r0_cohort_op", "excludes"),
            ("g0r1_kind", "attribute"),
            ("g0r1_name", "ltv"),
            ("g0r1_op", "greater_than"),
            ("g0r1_value", "10.5"),
            ("g1_combine", "or"),
            ("g1r0_kind", "event"),
            ("g1r0_name", "checkout"),
            ("g1r0_op", "count_at_least"),
            ("g1r0_value", "2"),
            ("g1r0_within", "30"),
            ("g1r1_kind", "purchase"),
            ("g1r1_op", "made_any"),
            ("g1r2_kind", "attribute"),
            ("g1r2_name", "beta"),
            ("g1r2_op", "equals"),
            ("g1r2_value", "true"),
            ("g1r2_vtype", "boolean"),
        ]);
        let json = Builder::from_form(&f).to_json().unwrap();
        assert_eq!(
            json,
            json!({"or": [
                {"and": [
                    {"cohort": {"partner": "heap", "cohort_id": "c:1", "op": "excludes"}},
                    {"attribute": {"name": "ltv", "op": "greater_than", "value": 10.5}},
                ]},
                {"or": [
                    {"event": {"name": "checkout", "op": "count_at_least", "value": 2, "within_days": 30}},
                    {"purchase": {"op": "made_any", "value": true}},
                    {"attribute": {"name": "beta", "op": "equals", "value": true}},
                ]},
            ]})
        );
        tideway_segment::Filter::from_json(&json).expect("the filter language accepts it");
        let back = Builder::from_json("s", &json).expect("the builder can show it");
        assert_eq!(back.to_json().unwrap(), json);
    }

    #[test]
    fn adding_and_removing_conditions_and_groups() {
        let base = [
            ("combine", "and"),
            ("g0_combine", "and"),
            ("g0r0_kind", "segment"),
            ("g0r1_kind", "cohort"),
        ];
        let mut with = base.to_vec();
        with.push(("add", "g0"));
        assert_eq!(Builder::from_form(&form(&with)).groups[0].rows.len(), 3);
        let mut with = base.to_vec();
        with.push(("remove", "g0r0"));
        let b = Builder::from_form(&form(&with));
        assert_eq!(b.groups[0].rows.len(), 1);
        assert_eq!(b.groups[0].rows[0].kind, "cohort");
        let mut with = base.to_vec();
        with.push(("add", "group"));
        assert_eq!(Builder::from_form(&form(&with)).groups.len(), 2);
    }

    #[test]
    fn incomplete_conditions_say_what_to_fix() {
        let f = form(&[
            ("combine", "and"),
            ("g0_combine", "and"),
            ("g0r0_kind", "attribute"),
            ("g0r0_name", "age"),
            ("g0r0_op", "greater_than"),
            ("g0r0_value", "old"),
        ]);
        assert_eq!(
            Builder::from_form(&f).to_json().unwrap_err(),
            "Group 1, condition 1: the value must be a number"
        );
        let f = form(&[
            ("combine", "and"),
            ("g0_combine", "and"),
            ("g0r0_kind", "cohort"),
        ]);
        assert!(
            Builder::from_form(&f)
                .to_json()
                .unwrap_err()
                .contains("pick a cohort")
        );
        // A filter with `not` is not the builder's shape.
        assert!(Builder::from_json("s", &json!({"not": {"identified": true}})).is_none());
    }
}
