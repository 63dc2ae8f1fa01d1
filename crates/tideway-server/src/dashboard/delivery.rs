//! The campaign form's Delivery fieldset, which is also the Canvas editor's Entry fieldset
//! ([`Part`]): API-triggered; scheduled — once at a time, or recurring daily or weekly (on
//! ticked days) at a time of day, optionally from a start and until an end, optionally in
//! each user's local time; or action-based — one or more triggers (a custom event with
//! optional property filters, a purchase, entering a partner cohort, entering a segment;
//! "Add a trigger" / "Add a property filter" / "Remove" post the form back and show it
//! again), a delay (campaigns only: a Canvas has Delay steps), a start and an end. A trigger
//! row ([`trigger`]) is also what the Canvas editor's Action Paths and exception events use,
//! with the kinds the API allows there.
//!
//! [`DeliveryForm::from_json`] shows any delivery the management API stores (its canonical
//! JSON) and [`DeliveryForm::to_json`] gives it back unchanged, so a campaign opened in the
//! form and saved is the same campaign. The form only shapes the JSON: what a delivery may
//! be is decided by the API's check (`campaigns_api::checked_definition`, or the Canvas's),
//! whose refusals are shown beside the field they name
//! (`delivery.triggers[1].custom_event.name`, `entry.schedule.at`).

use maud::{Markup, html};
use serde_json::{Value, json};
use tideway_core::clock::parse_datetime;
use tideway_core::cohorts::partner;
use tideway_core::segments::Segment;
use tideway_core::store::CohortSummary;

use super::forms::{FieldError, FormData, Group, MAX_GROUPS, described_by, error_beside};

/// The weekdays as the API names them (Monday first), with their labels.
const WEEKDAYS: [(&str, &str); 7] = [
    ("monday", "Monday"),
    ("tuesday", "Tuesday"),
    ("wednesday", "Wednesday"),
    ("thursday", "Thursday"),
    ("friday", "Friday"),
    ("saturday", "Saturday"),
    ("sunday", "Sunday"),
];

/// The comparisons of a property filter, as the API names them, with their labels.
const COMPARISONS: [(&str, &str); 5] = [
    ("equals", "equals"),
    ("not_equal", "does not equal"),
    ("exists", "exists"),
    ("greater_than", "is greater than"),
    ("less_than", "is less than"),
];

/// The kinds of trigger, as the API names them, with their labels.
const TRIGGERS: [(&str, &str); 4] = [
    ("custom_event", "Performs a custom event"),
    ("purchase", "Makes a purchase"),
    ("cohort_entry", "Enters a partner cohort"),
    ("segment_entry", "Enters a segment"),
];

/// The triggers an Action Paths path or a Canvas's exception events may use (the API allows
/// no cohort or segment entry there).
pub(super) const EVENT_TRIGGERS: [(&str, &str); 2] = [
    ("custom_event", "Performs a custom event"),
    ("purchase", "Makes a purchase"),
];

/// What the fieldset is part of, which decides the place the API names its fields by
/// (`delivery.…` for a campaign, `entry.…` for a Canvas) and whether it has a delay (a
/// Canvas refuses one: it has Delay steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Campaign,
    CanvasEntry,
}

impl Part {
    fn root(self) -> &'static str {
        match self {
            Part::Campaign => "delivery",
            Part::CanvasEntry => "entry",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Part::Campaign => "the campaign",
            Part::CanvasEntry => "entry into the Canvas",
        }
    }
}

/// One property filter of a custom-event trigger.
#[derive(Debug, Clone, Default, PartialEq)]
struct FilterForm {
    property: String,
    comparison: String,
    /// The value as written: JSON (`5`, `true`, `"5"`), or any other text as a string.
    value: String,
}

impl FilterForm {
    fn empty() -> FilterForm {
        FilterForm {
            comparison: "equals".into(),
            ..FilterForm::default()
        }
    }

    fn is_blank(&self) -> bool {
        self.property.trim().is_empty() && self.value.trim().is_empty()
    }
}

/// A filter's value as the form shows it: a string as itself when reading it back gives the
/// same string (and a text input keeps it: no line breaks), anything else as JSON.
fn value_text(value: Option<&Value>) -> String {
    match value {
        None => String::new(),
        Some(Value::String(s))
            if !s.is_empty()
                && s.trim() == s
                && !s.chars().any(char::is_control)
                && serde_json::from_str::<Value>(s).is_err() =>
        {
            s.clone()
        }
        Some(v) => v.to_string(),
    }
}

/// The value a filter's text stands for (see [`value_text`]); `None` when empty.
fn value_json(text: &str) -> Option<Value> {
    let text = text.trim();
    (!text.is_empty())
        .then(|| serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())))
}

/// One trigger row; the fields of the other kinds are kept while the form is reshaped.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct TriggerForm {
    kind: String,
    event: String,
    filters: Vec<FilterForm>,
    product: String,
    /// `partner:cohort_id`.
    cohort: String,
    segment: String,
}

impl TriggerForm {
    pub fn empty() -> TriggerForm {
        TriggerForm {
            kind: "custom_event".into(),
            ..TriggerForm::default()
        }
    }

    pub fn from_json(t: &Value) -> Option<TriggerForm> {
        let (kind, body) = t.as_object().filter(|o| o.len() == 1)?.iter().next()?;
        let text = |k: &str| body[k].as_str().unwrap_or("").to_owned();
        let mut out = TriggerForm {
            kind: kind.clone(),
            ..TriggerForm::default()
        };
        match kind.as_str() {
            "custom_event" => {
                out.event = text("name");
                let filters = match body.get("property_filters") {
                    None | Some(Value::Null) => &Vec::new(),
                    Some(Value::Array(filters)) => filters,
                    Some(_) => return None,
                };
                for f in filters {
                    let f = f.as_object()?;
                    // A filter with keys the form has no field for cannot be shown.
                    if f.keys()
                        .any(|k| !["property", "comparison", "value"].contains(&k.as_str()))
                    {
                        return None;
                    }
                    out.filters.push(FilterForm {
                        property: f.get("property")?.as_str()?.to_owned(),
                        comparison: f.get("comparison")?.as_str()?.to_owned(),
                        value: value_text(f.get("value")),
                    });
                }
                if out.filters.len() > MAX_GROUPS {
                    return None;
                }
            }
            "purchase" => out.product = text("product_id"),
            "cohort_entry" => out.cohort = [text("partner"), text("cohort_id")].join(":"),
            "segment_entry" => out.segment = text("segment_id"),
            _ => return None,
        }
        Some(out)
    }

    /// Trigger group `g` of the posted form; `add` = `filter:{group}` gives it one more
    /// property filter.
    pub fn from_group(form: &FormData, g: &Group<'_>) -> TriggerForm {
        let add_filter = form.get("add").and_then(|a| a.strip_prefix("filter:")) == Some(g.name());
        let mut filters: Vec<FilterForm> = g
            .groups("f", "property")
            .iter()
            .map(|f| FilterForm {
                property: f.get("property").to_owned(),
                comparison: f.get("comparison").to_owned(),
                value: f.get("value").to_owned(),
            })
            .collect();
        if add_filter && filters.len() < MAX_GROUPS {
            filters.push(FilterForm::empty());
        }
        TriggerForm {
            kind: g.get("kind").to_owned(),
            event: g.get("event").to_owned(),
            filters,
            product: g.get("product").to_owned(),
            cohort: g.get("cohort").to_owned(),
            segment: g.get("segment").to_owned(),
        }
    }

    /// The API's JSON for the trigger at `at` (`delivery.triggers[1]`), or the field to fix.
    pub fn to_json(&self, at: &str, part: Part) -> Result<Value, FieldError> {
        let place = |rest: &str| [at, ".", rest].concat();
        match self.kind.as_str() {
            "custom_event" => {
                let filters: Vec<Value> = self
                    .filters
                    .iter()
                    .filter(|f| !f.is_blank())
                    .map(|f| {
                        let mut out = json!({"property": f.property, "comparison": f.comparison});
                        if let Some(v) = value_json(&f.value) {
                            out["value"] = v;
                        }
                        out
                    })
                    .collect();
                Ok(json!({"custom_event": {"name": self.event, "property_filters": filters}}))
            }
            "purchase" => {
                let product = (!self.product.trim().is_empty()).then_some(&self.product);
                Ok(json!({"purchase": {"product_id": product}}))
            }
            "cohort_entry" => {
                let (partner, cohort_id) = self.cohort.split_once(':').ok_or_else(|| {
                    FieldError::new(
                        place("cohort_entry.cohort_id"),
                        ["Pick the cohort whose entry triggers ", part.what(), "."].concat(),
                    )
                })?;
                Ok(json!({"cohort_entry": {"partner": partner, "cohort_id": cohort_id}}))
            }
            "segment_entry" => {
                if self.segment.is_empty() {
                    return Err(FieldError::new(
                        place("segment_entry.segment_id"),
                        ["Pick the segment whose entry triggers ", part.what(), "."].concat(),
                    ));
                }
                Ok(json!({"segment_entry": {"segment_id": self.segment}}))
            }
            _ => Err(FieldError::new(
                at,
                ["Choose what triggers ", part.what(), "."].concat(),
            )),
        }
    }
}

/// The Delivery fieldset's fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct DeliveryForm {
    /// `api_triggered`, `scheduled` or `action_based`.
    kind: String,
    /// `once`, `daily` or `weekly`.
    frequency: String,
    at: String,
    time: String,
    days: Vec<String>,
    local_time: bool,
    /// Scheduled and action-based delivery both have a start and an end.
    start: String,
    end: String,
    triggers: Vec<TriggerForm>,
    delay: String,
}

impl DeliveryForm {
    pub fn empty() -> DeliveryForm {
        DeliveryForm {
            kind: "api_triggered".into(),
            frequency: "once".into(),
            triggers: vec![TriggerForm::empty()],
            delay: "0".into(),
            ..DeliveryForm::default()
        }
    }

    /// The form for a stored (canonical) delivery, or `None` when it holds something the form
    /// has no field for.
    pub fn from_json(d: &Value) -> Option<DeliveryForm> {
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let mut f = DeliveryForm::empty();
        match d["type"].as_str()? {
            "api_triggered" => {}
            "scheduled" => {
                let s = d["schedule"].as_object()?;
                let get = |k: &str| s.get(k).unwrap_or(&Value::Null);
                f.kind = "scheduled".into();
                f.frequency = get("frequency").as_str().unwrap_or("once").to_owned();
                f.at = text(get("at"));
                f.time = text(get("time"));
                f.days = get("days")
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                f.local_time = get("in_local_time").as_bool().unwrap_or(false);
                f.start = text(get("start"));
                f.end = text(get("end"));
            }
            "action_based" => {
                let triggers = d["triggers"].as_array()?;
                if triggers.is_empty() || triggers.len() > MAX_GROUPS {
                    return None;
                }
                f.kind = "action_based".into();
                f.triggers = triggers
                    .iter()
                    .map(TriggerForm::from_json)
                    .collect::<Option<_>>()?;
                f.delay = d["delay_seconds"].as_u64().unwrap_or(0).to_string();
                f.start = text(&d["start"]);
                f.end = text(&d["end"]);
            }
            _ => return None,
        }
        Some(f)
    }

    /// From the posted form: triggers `t{i}_…` and their filters `t{i}f{j}_…`; `add` =
    /// `trigger` appends a trigger, `filter:t{i}` a filter to trigger `t{i}`; `remove` names a
    /// trigger or a filter to drop.
    pub fn from_form(form: &FormData) -> DeliveryForm {
        let mut triggers: Vec<TriggerForm> = form
            .groups("t", "kind")
            .iter()
            .map(|g| TriggerForm::from_group(form, g))
            .collect();
        if form.get("add") == Some("trigger") && triggers.len() < MAX_GROUPS {
            triggers.push(TriggerForm::empty());
        }
        if triggers.is_empty() {
            triggers.push(TriggerForm::empty());
        }
        DeliveryForm {
            kind: form.text("delivery").to_owned(),
            frequency: match form.text("frequency") {
                "" => "once".to_owned(),
                f => f.to_owned(),
            },
            at: form.text("at").to_owned(),
            time: form.text("time").to_owned(),
            days: form.all("day").into_iter().map(str::to_owned).collect(),
            local_time: form.get("local_time") == Some("true"),
            start: form.text("start").to_owned(),
            end: form.text("end").to_owned(),
            triggers,
            delay: form.text("delay").to_owned(),
        }
    }

    /// The management API's `delivery` JSON, or the field to fix. Times other than a once
    /// schedule's are passed as written and checked by the API.
    pub fn to_json(&self, part: Part) -> Result<Value, FieldError> {
        let root = part.root();
        let place = |rest: &str| [root, ".", rest].concat();
        let optional = |t: &str| if t.is_empty() { Value::Null } else { json!(t) };
        match self.kind.as_str() {
            "api_triggered" => Ok(json!({"type": "api_triggered"})),
            "scheduled" => {
                let mut schedule = match self.frequency.as_str() {
                    "once" => {
                        let at = parse_datetime(&self.at).ok_or_else(|| {
                            FieldError::new(
                                place("schedule.at"),
                                "Send at: write an ISO 8601 time such as 2026-12-24T09:00:00Z.",
                            )
                        })?;
                        json!({"frequency": "once", "at": at.to_iso()})
                    }
                    "daily" => json!({"frequency": "daily", "time": self.time}),
                    "weekly" => {
                        json!({"frequency": "weekly", "time": self.time, "days": self.days})
                    }
                    _ => {
                        return Err(FieldError::new(
                            place("schedule.frequency"),
                            "Choose once, daily or weekly.",
                        ));
                    }
                };
                schedule["start"] = optional(&self.start);
                schedule["end"] = optional(&self.end);
                schedule["in_local_time"] = json!(self.local_time);
                Ok(json!({"type": "scheduled", "schedule": schedule}))
            }
            "action_based" => {
                let triggers = self
                    .triggers
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.to_json(&place(&["triggers[", &i.to_string(), "]"].concat()), part)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let delay = if self.delay.is_empty() {
                    0
                } else {
                    self.delay.parse::<u64>().map_err(|_| {
                        FieldError::new(
                            place("delay_seconds"),
                            "write a whole number of seconds (0 sends at once)",
                        )
                    })?
                };
                Ok(json!({
                    "type": "action_based",
                    "triggers": triggers,
                    "delay_seconds": delay,
                    "start": optional(&self.start),
                    "end": optional(&self.end),
                }))
            }
            _ => Err(FieldError::new(
                root,
                match part {
                    Part::Campaign => "Choose how the campaign is delivered.",
                    Part::CanvasEntry => "Choose how users enter the Canvas.",
                },
            )),
        }
    }
}

/// A text input with its label's `id`, the error beside it when the API's check names
/// `place`.
pub(super) fn input(
    error: Option<&FieldError>,
    id: &str,
    name: &str,
    value: &str,
    places: &[&str],
) -> Markup {
    let at = error.filter(|e| places.contains(&e.field.as_str()));
    html! {
        input type="text" id=(id) name=(name) value=(value)
            aria-invalid=[at.map(|_| "true")] aria-describedby=[described_by(at, id)];
        (error_beside(at, id))
    }
}

/// The Delivery fieldset (a Canvas's Entry fieldset).
pub(super) fn fieldset(
    f: &DeliveryForm,
    part: Part,
    cohorts: &[CohortSummary],
    segments: &[Segment],
    error: Option<&FieldError>,
) -> Markup {
    let root = part.root();
    let at = |place: &str| error.filter(|e| e.field == place);
    let place = |rest: &str| [root, ".", rest].concat();
    let scheduled = |rest: &str| [root, ".schedule.", rest].concat();
    let (legend, sends) = match part {
        Part::Campaign => ("Delivery", "sends"),
        Part::CanvasEntry => ("Entry", "lets the user enter"),
    };
    html! {
        fieldset id="delivery" {
            legend { (legend) }
            (error_beside(at(root), "delivery"))
            label class="check" { input type="radio" name="delivery" value="api_triggered" checked[f.kind == "api_triggered"]; "API-triggered" }
            label class="check" { input type="radio" name="delivery" value="scheduled" checked[f.kind == "scheduled"]; "Scheduled" }
            label class="check" { input type="radio" name="delivery" value="action_based" checked[f.kind == "action_based"]; "Action-based (when a user does something)" }
            fieldset id="schedule" {
                legend { "Schedule " span class="muted" { "(scheduled)" } }
                fieldset {
                    legend { "How often" }
                    label class="check" { input type="radio" name="frequency" value="once" checked[f.frequency == "once"]; "Once" }
                    label class="check" { input type="radio" name="frequency" value="daily" checked[f.frequency == "daily"]; "Daily" }
                    label class="check" { input type="radio" name="frequency" value="weekly" checked[f.frequency == "weekly"]; "Weekly" }
                    (error_beside(at(&scheduled("frequency")), "frequency"))
                }
                label for="send-at" { "At " span class="muted" { "(once; e.g. 2026-12-24T09:00:00Z)" } }
                (input(error, "send-at", "at", &f.at, &[&scheduled("at")]))
                label for="send-time" { "Time of day " span class="muted" { "(daily and weekly; HH:MM, UTC unless in local time)" } }
                (input(error, "send-time", "time", &f.time, &[&scheduled("time")]))
                fieldset id="days" {
                    legend { "Days " span class="muted" { "(weekly)" } }
                    @for (day, label) in WEEKDAYS {
                        label class="check" { input type="checkbox" name="day" value=(day) checked[f.days.iter().any(|d| d == day)]; (label) }
                    }
                    (error_beside(error.filter(|e| e.field.starts_with(&scheduled("days"))), "days"))
                }
                label class="check" { input type="checkbox" name="local_time" value="true" id="local-time" checked[f.local_time]; "In each user's local time" }
            }
            fieldset id="triggers" {
                legend { "Triggers " span class="muted" { "(action-based: any one of them " (sends) ")" } }
                (error_beside(at(&place("triggers")), "triggers"))
                @for (i, t) in f.triggers.iter().enumerate() {
                    @let row = TriggerRow {
                        name: ["t", &i.to_string()].concat(),
                        place: place(&["triggers[", &i.to_string(), "]"].concat()),
                        legend: ["Trigger ", &(i + 1).to_string()].concat(),
                        kinds: &TRIGGERS,
                        removable: f.triggers.len() > 1,
                    };
                    (trigger(&row, t, cohorts, segments, error))
                }
                @if f.triggers.len() < MAX_GROUPS {
                    button type="submit" class="secondary" name="add" value="trigger" id="add-trigger" formnovalidate { "Add a trigger" }
                }
                @if part == Part::Campaign {
                    label for="delay" { "Delay " span class="muted" { "(seconds between the trigger and the send)" } }
                    (input(error, "delay", "delay", &f.delay, &[&place("delay_seconds")]))
                } @else {
                    input type="hidden" name="delay" value=(f.delay);
                }
            }
            label for="delivery-start" { "Starts " span class="muted" { "(optional; scheduled and action-based, e.g. 2026-12-01T00:00:00Z)" } }
            (input(error, "delivery-start", "start", &f.start, &[&scheduled("start"), &place("start")]))
            label for="delivery-end" { "Ends " span class="muted" { "(optional)" } }
            (input(error, "delivery-end", "end", &f.end, &[&scheduled("end"), &place("end")]))
        }
    }
}

/// Where a trigger row sits in the form: its group name (`t0`, `s2p1t0`: fields
/// `{name}_kind`, …), the place the API names it by (`delivery.triggers[0]`), its legend, the
/// kinds it may be, and whether it has a Remove button (a list that needs one row has none
/// on its last).
pub(super) struct TriggerRow<'a> {
    pub name: String,
    pub place: String,
    pub legend: String,
    pub kinds: &'a [(&'a str, &'a str)],
    pub removable: bool,
}

/// A trigger row: its kind and the fields of every kind it may be (the chosen one is used).
pub(super) fn trigger(
    row: &TriggerRow<'_>,
    t: &TriggerForm,
    cohorts: &[CohortSummary],
    segments: &[Segment],
    error: Option<&FieldError>,
) -> Markup {
    let n = row.name.as_str();
    let id = |f: &str| [n, "-", f].concat();
    let name = |f: &str| [n, "_", f].concat();
    let place = |rest: &str| [row.place.as_str(), rest].concat();
    let at = |p: &str| error.filter(|e| e.field == p);
    let has = |kind: &str| row.kinds.iter().any(|(k, _)| *k == kind);
    let known_cohort = cohorts
        .iter()
        .any(|c| [c.partner.as_str(), ":", c.cohort_id.as_str()].concat() == t.cohort);
    let known_segment = segments.iter().any(|s| s.id == t.segment);
    html! {
        fieldset class="trigger" id=(id("fields")) {
            legend { (row.legend) }
            label for=(id("kind")) { "The user" }
            select id=(id("kind")) name=(name("kind")) aria-describedby=[described_by(at(&place("")), &id("kind"))] {
                @for (kind, label) in row.kinds {
                    option value=(kind) selected[t.kind == *kind] { (label) }
                }
            }
            (error_beside(at(&place("")), &id("kind")))
            label for=(id("event")) { "Custom event name " span class="muted" { "(custom event)" } }
            (input(error, &id("event"), &name("event"), &t.event, &[&place(".custom_event.name")]))
            @for (j, fl) in t.filters.iter().enumerate() {
                @let fname = [n, "f", &j.to_string()].concat();
                @let fid = |f: &str| [fname.as_str(), "-", f].concat();
                @let fplace = |f: &str| place(&[".custom_event.property_filters[", &j.to_string(), "].", f].concat());
                fieldset class="filter" id=(fid("fields")) {
                    legend { "Property filter " (j + 1) " " span class="muted" { "(custom event)" } }
                    label for=(fid("property")) { "Property" }
                    (input(error, &fid("property"), &[fname.as_str(), "_property"].concat(), &fl.property, &[&fplace("property")]))
                    label for=(fid("comparison")) { "Comparison" }
                    select id=(fid("comparison")) name=([fname.as_str(), "_comparison"].concat()) aria-describedby=[described_by(at(&fplace("comparison")), &fid("comparison"))] {
                        @for (c, label) in COMPARISONS {
                            option value=(c) selected[fl.comparison == c] { (label) }
                        }
                    }
                    (error_beside(at(&fplace("comparison")), &fid("comparison")))
                    label for=(fid("value")) { "Value " span class="muted" { "(text, or JSON: 5, true, \"5\")" } }
                    (input(error, &fid("value"), &[fname.as_str(), "_value"].concat(), &fl.value, &[&fplace("value")]))
                    button type="submit" class="secondary" name="remove" value=(fname) formnovalidate { "Remove property filter " (j + 1) " of " (row.legend.to_lowercase()) }
                }
            }
            @if t.filters.len() < MAX_GROUPS {
                button type="submit" class="secondary" name="add" value=(["filter:", n].concat()) formnovalidate { "Add a property filter to " (row.legend.to_lowercase()) }
            }
            label for=(id("product")) { "Product id " span class="muted" { "(purchase; empty: any product)" } }
            (input(error, &id("product"), &name("product"), &t.product, &[&place(".purchase.product_id")]))
            @if has("cohort_entry") {
                label for=(id("cohort")) { "Cohort " span class="muted" { "(partner cohort)" } }
                @let cohort_error = error.filter(|e| e.field.starts_with(&place(".cohort_entry")));
                select id=(id("cohort")) name=(name("cohort")) aria-describedby=[described_by(cohort_error, &id("cohort"))] {
                    option value="" { "— pick a cohort —" }
                    @if !t.cohort.is_empty() && !known_cohort {
                        option value=(t.cohort) selected { (t.cohort) " (not imported)" }
                    }
                    @for c in cohorts {
                        @let value = [c.partner.as_str(), ":", c.cohort_id.as_str()].concat();
                        option value=(value) selected[t.cohort == value] {
                            (partner(&c.partner).map_or(c.partner.as_str(), |p| p.filter_name)) " › " (c.name)
                        }
                    }
                }
                (error_beside(cohort_error, &id("cohort")))
            }
            @if has("segment_entry") {
                label for=(id("segment")) { "Segment " span class="muted" { "(segment entry)" } }
                @let segment_error = at(&place(".segment_entry.segment_id"));
                select id=(id("segment")) name=(name("segment")) aria-describedby=[described_by(segment_error, &id("segment"))] {
                    option value="" { "— pick a segment —" }
                    @if !t.segment.is_empty() && !known_segment {
                        option value=(t.segment) selected { (t.segment) " (no such segment)" }
                    }
                    @for s in segments {
                        option value=(s.id) selected[t.segment == s.id] { (s.name) }
                    }
                }
                (error_beside(segment_error, &id("segment")))
            }
            @if row.removable {
                button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove " (row.legend.to_lowercase()) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(delivery: Value) {
        let f = DeliveryForm::from_json(&delivery).expect("the form shows it");
        assert_eq!(f.to_json(Part::Campaign).unwrap(), delivery, "{f:?}");
    }

    #[test]
    fn filter_values_read_back_as_they_were() {
        for v in [
            json!("gold"),
            json!("5"),
            json!("true"),
            json!(" padded"),
            json!("two\nlines"),
            json!(""),
            json!("\"quoted\""),
            json!(5),
            json!(2.5),
            json!(true),
            json!(null),
            json!([1, "a"]),
            json!({"a": 1}),
        ] {
            assert_eq!(value_json(&value_text(Some(&v))), Some(v.clone()), "{v}");
        }
        assert_eq!(value_json(&value_text(None)), None);
        assert_eq!(value_json(" gold "), Some(json!("gold")));
    }

    #[test]
    fn deliveries_the_api_stores_come_back_unchanged() {
        round_trip(json!({"type": "api_triggered"}));
        round_trip(
            json!({"type": "scheduled", "schedule": {"frequency": "once",
            "at": "2030-01-01T09:00:00.000Z", "start": null, "end": null, "in_local_time": false}}),
        );
        round_trip(
            json!({"type": "scheduled", "schedule": {"frequency": "weekly", "time": "09:30",
            "days": ["monday", "friday"], "start": "2030-01-01T00:00:00.000Z",
            "end": "2030-06-01T00:00:00.000Z", "in_local_time": true}}),
        );
        round_trip(json!({"type": "action_based", "triggers": [
            {"custom_event": {"name": "played", "property_filters": [
                {"property": "level", "comparison": "greater_than", "value": 3},
                {"property": "mode", "comparison": "equals", "value": "solo"},
                {"property": "seen", "comparison": "exists"}]}},
            {"purchase": {"product_id": null}},
            {"purchase": {"product_id": "gold"}},
            {"cohort_entry": {"partner": "heap", "cohort_id": "42"}},
            {"segment_entry": {"segment_id": "s1"}}],
            "delay_seconds": 60, "start": null, "end": "2030-01-01T00:00:00.000Z"}));
    }

    #[test]
    fn what_the_form_has_no_field_for_is_not_shown() {
        let odd_filter = json!({"type": "action_based", "triggers": [{"custom_event": {"name": "e",
            "property_filters": [{"property": "p", "comparison": "exists", "note": "x"}]}}]});
        assert_eq!(DeliveryForm::from_json(&odd_filter), None);
        assert_eq!(
            DeliveryForm::from_json(&json!({"type": "carrier_pigeon"})),
            None
        );
    }
}
