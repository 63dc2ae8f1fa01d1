//! The Canvas editor: a Canvas's definition as fields, the way Braze's Canvas editor shows
//! it — entry (`delivery.rs`'s fieldset: API-triggered, scheduled once or recurring,
//! action-based triggers), the entry audience (segments and a filter), re-entry and the
//! entry limit, exit criteria (exception events and a filter), conversion events, the
//! variants with the step each starts at, and every step as a fieldset of its kind (Message
//! email or webhook with its Liquid fields, Delay, Decision Split, Audience Paths, Action
//! Paths with triggers and a window, Experiment Paths, User Update), each path with a select
//! of the step it leads to.
//!
//! Steps, paths, triggers, property filters, exception events, conversion events and
//! variants are added and removed by posting the form back with an `add` / `remove` button
//! value (the page has no script: the CSP forbids it), as the campaign form does; nothing is
//! saved then. Groups are named `s{i}` (steps), `s{i}p{j}` (paths), `s{i}p{j}t{k}` (an Action
//! Paths path's triggers), `x{i}` (exception events), `c{i}` (conversion events), `v{i}`
//! (variants) and `t{i}` (entry triggers).
//!
//! [`CanvasEditor::from_json`] shows a stored (canonical) definition and
//! [`CanvasEditor::to_json`] gives the management API's document back, so a Canvas opened
//! and saved is the same Canvas; it declines (`None`) what it has no field for (message
//! headers, extras, property filters it cannot show), which the JSON form then edits.
//! Segment filters (a Decision Split's, an audience path's, the audience's and the exit
//! filter) are the segment language's JSON in a text area, with a picker of saved segments
//! beside it (a segment made in the segment builder — Heap Cohorts includes and the rest —
//! becomes `{"in_segment": id}`, ANDed with any JSON; see `with_segment`). Nothing here decides what a
//! Canvas may be: the document goes through `canvases_api`'s checks, whose refusals name the
//! place (`steps[2].delay.seconds`) shown beside its field.

use maud::{Markup, html};
use serde_json::{Map, Value, json};
use tideway_core::canvas::{MAX_AUDIENCE_PATHS, MAX_EXPERIMENT_PATHS, MAX_STEPS, MAX_VARIANTS};
use tideway_core::segments::Segment;
use tideway_core::store::CohortSummary;

use super::delivery::{self, DeliveryForm, EVENT_TRIGGERS, Part, TriggerForm, TriggerRow, input};
use super::forms::{FieldError, FormData, Group, MAX_GROUPS, described_by, error_beside};

/// The step kinds, as the API names them, with their labels.
pub(super) const STEP_KINDS: [(&str, &str); 7] = [
    ("message", "Message"),
    ("delay", "Delay"),
    ("decision_split", "Decision Split"),
    ("audience_paths", "Audience Paths"),
    ("action_paths", "Action Paths"),
    ("experiment_paths", "Experiment Paths"),
    ("user_update", "User Update"),
];

/// The units a duration is written in, largest first.
const UNITS: [(&str, &str, i64); 4] = [
    ("days", "days", 86_400),
    ("hours", "hours", 3_600),
    ("minutes", "minutes", 60),
    ("seconds", "seconds", 1),
];

/// The kinds of conversion event a Canvas counts, as the API names them, with their labels
/// (email opens and clicks count for campaigns only).
const CONVERSIONS: [(&str, &str); 2] = [
    ("custom_event", "Performs a custom event"),
    ("purchase", "Makes a purchase"),
];

/// Most conversion events (the API's limit).
const MAX_CONVERSIONS: usize = 4;

/// A duration as an amount and a unit (`2` `days`): seconds as the largest unit that
/// divides them, so it reads back as the same number of seconds.
#[derive(Debug, Clone, Default, PartialEq)]
struct DurationForm {
    amount: String,
    unit: String,
}

impl DurationForm {
    fn of(secs: i64) -> DurationForm {
        let (unit, per) = UNITS
            .iter()
            .find(|(_, _, per)| secs != 0 && secs % per == 0)
            .map_or(("seconds", 1), |(u, _, per)| (*u, *per));
        DurationForm {
            amount: (secs / per).to_string(),
            unit: unit.to_owned(),
        }
    }

    fn from_group(g: &Group<'_>, field: &str) -> DurationForm {
        DurationForm {
            amount: g.get(field).trim().to_owned(),
            unit: g.get(&[field, "_unit"].concat()).to_owned(),
        }
    }

    fn from_form(form: &FormData, field: &str) -> DurationForm {
        DurationForm {
            amount: form.text(field).to_owned(),
            unit: form.text(&[field, "_unit"].concat()).to_owned(),
        }
    }

    /// The seconds, or the field to fix (`place`).
    fn secs(&self, place: &str) -> Result<i64, FieldError> {
        let per = UNITS
            .iter()
            .find(|(u, _, _)| *u == self.unit)
            .map_or(1, |(_, _, per)| *per);
        self.amount
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .ok_or_else(|| FieldError::new(place, "write a whole number"))
    }
}

/// One path of an Audience, Action or Experiment Paths step (the fields of its step's kind
/// are used).
#[derive(Debug, Clone, Default, PartialEq)]
struct PathForm {
    /// An Experiment Paths path's stored id (empty for a new one: the API gives it one).
    id: String,
    name: String,
    next: String,
    /// Audience Paths: the segment filter's JSON.
    filter: String,
    /// Experiment Paths.
    percent: String,
    /// Action Paths.
    triggers: Vec<TriggerForm>,
}

/// One step's fields; those of its kind are used.
#[derive(Debug, Clone, Default, PartialEq)]
struct StepForm {
    id: String,
    name: String,
    kind: String,
    /// Message, Delay and User Update.
    next: String,
    // Message.
    channel: String,
    url: String,
    method: String,
    from: String,
    reply_to: String,
    subject: String,
    body: String,
    plaintext: String,
    preheader: String,
    // Delay: `seconds` (a duration), `until` (a time) or `days` (days, then a time of day).
    delay: String,
    wait: DurationForm,
    until: String,
    days: String,
    at: String,
    // Decision Split.
    filter: String,
    yes: String,
    no: String,
    // Audience, Action and Experiment Paths.
    paths: Vec<PathForm>,
    everyone_else: String,
    window: DurationForm,
    // User Update: JSON objects.
    set: String,
    increment: String,
}

/// A conversion event row.
#[derive(Debug, Clone, Default, PartialEq)]
struct ConversionForm {
    kind: String,
    event: String,
    product: String,
    window: DurationForm,
}

/// A Canvas variant row.
#[derive(Debug, Clone, Default, PartialEq)]
struct VariantForm {
    id: String,
    name: String,
    percent: String,
    first_step: String,
}

/// The Canvas editor's fields (name, description and tags are the page's own).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct CanvasEditor {
    entry: DeliveryForm,
    segments: Vec<String>,
    audience_filter: String,
    /// Empty: a user enters once.
    reentry: DurationForm,
    may_reenter: bool,
    entry_limit: String,
    exceptions: Vec<TriggerForm>,
    exit_filter: String,
    conversions: Vec<ConversionForm>,
    frequency_capping: bool,
    control: String,
    variants: Vec<VariantForm>,
    steps: Vec<StepForm>,
}

/// A JSON value as a text area shows it; `null` as nothing.
fn json_text(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        serde_json::to_string_pretty(v).unwrap_or_default()
    }
}

/// A text area's JSON (empty: `null`), or the field to fix.
fn json_field(text: &str, place: &str) -> Result<Value, FieldError> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| FieldError::new(place, format!("is not JSON: {e}")))
}

/// A text field's string, or `null` when empty.
fn optional(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        json!(text)
    }
}

/// An optional string of a stored definition as a field shows it; `None` when the field
/// could not give it back (an empty string is read back as absent).
fn optional_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some(String::new()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").to_owned()
}

fn number(v: &Value) -> String {
    v.as_u64().map_or_else(String::new, |n| n.to_string())
}

/// The triggers at `raw` (canonical), or `None` when one has fields the form cannot show.
fn triggers_of(raw: &Value) -> Option<Vec<TriggerForm>> {
    raw.as_array()
        .into_iter()
        .flatten()
        .map(TriggerForm::from_json)
        .collect()
}

impl StepForm {
    /// A new step of `kind` with id `id`, with the defaults of its kind's fields (only
    /// those: a step shows and posts back its own kind's fields).
    fn new(id: String, kind: &str) -> StepForm {
        let mut s = StepForm {
            name: id.clone(),
            id,
            kind: kind.to_owned(),
            ..StepForm::default()
        };
        match kind {
            "message" => {
                s.channel = "webhook".into();
                s.method = "POST".into();
            }
            "delay" => {
                s.delay = "seconds".into();
                s.wait = DurationForm::of(86_400);
                s.days = "1".into();
            }
            "audience_paths" => s.paths.push(PathForm::named("Group 1")),
            "action_paths" => {
                s.window = DurationForm::of(86_400);
                let mut p = PathForm::named("Path 1");
                p.triggers.push(TriggerForm::empty());
                s.paths.push(p);
            }
            "experiment_paths" => {
                for name in ["Path 1", "Path 2"] {
                    let mut p = PathForm::named(name);
                    p.percent = "50".into();
                    s.paths.push(p);
                }
            }
            _ => {}
        }
        s
    }

    fn from_json(s: &Value) -> Option<StepForm> {
        let mut f = StepForm::new(text(&s["id"]), s["type"].as_str()?);
        f.name = text(&s["name"]);
        f.next = text(&s["next"]);
        match f.kind.as_str() {
            "message" => {
                let m = s["message"].as_object()?;
                let get = |k: &str| m.get(k).unwrap_or(&Value::Null);
                // Headers and extras have no field here: the JSON form edits them.
                let empty = |k: &str| match get(k) {
                    Value::Null => true,
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                if !empty("headers") || !empty("request_headers") || !empty("extras") {
                    return None;
                }
                f.channel = text(get("channel"));
                f.url = text(get("url"));
                f.method = get("request_method").as_str().unwrap_or("POST").to_owned();
                f.from = text(get("from"));
                f.reply_to = optional_text(get("reply_to"))?;
                f.subject = text(get("subject"));
                f.body = text(get("body"));
                f.plaintext = optional_text(get("plaintext_body"))?;
                f.preheader = optional_text(get("preheader"))?;
            }
            "delay" => {
                let d = &s["delay"];
                if let Some(secs) = d["seconds"].as_i64() {
                    f.delay = "seconds".into();
                    f.wait = DurationForm::of(secs);
                } else if d.get("until").is_some() {
                    f.delay = "until".into();
                    f.until = text(&d["until"]);
                } else {
                    f.delay = "days".into();
                    f.days = number(&d["days"]);
                    f.at = text(&d["at"]);
                }
            }
            "decision_split" => {
                f.filter = json_text(&s["filter"]);
                f.yes = text(&s["yes"]);
                f.no = text(&s["no"]);
            }
            "audience_paths" | "action_paths" | "experiment_paths" => {
                f.everyone_else = text(&s["everyone_else"]);
                if let Some(secs) = s["window_seconds"].as_i64() {
                    f.window = DurationForm::of(secs);
                }
                f.paths = s["paths"]
                    .as_array()?
                    .iter()
                    .map(|p| {
                        Some(PathForm {
                            id: text(&p["id"]),
                            name: text(&p["name"]),
                            next: text(&p["next"]),
                            filter: json_text(&p["filter"]),
                            percent: number(&p["percent"]),
                            triggers: triggers_of(&p["triggers"])?,
                        })
                    })
                    .collect::<Option<_>>()?;
            }
            "user_update" => {
                f.set = json_text(&s["set"]);
                f.increment = json_text(&s["increment"]);
            }
            _ => return None,
        }
        Some(f)
    }

    fn from_group(form: &FormData, g: &Group<'_>) -> StepForm {
        let get = |k: &str| g.get(k).to_owned();
        let trimmed = |k: &str| g.get(k).trim().to_owned();
        let mut paths: Vec<PathForm> = g
            .groups("p", "next")
            .iter()
            .map(|p| {
                let mut triggers: Vec<TriggerForm> = p
                    .groups("t", "kind")
                    .iter()
                    .map(|t| TriggerForm::from_group(form, t))
                    .collect();
                let add = ["trigger:", p.name()].concat();
                if form.get("add") == Some(add.as_str()) && triggers.len() < MAX_GROUPS {
                    triggers.push(TriggerForm::empty());
                }
                PathForm {
                    id: p.get("id").trim().to_owned(),
                    name: p.get("name").trim().to_owned(),
                    next: p.get("next").to_owned(),
                    filter: with_segment(p.get("filter"), p.get("filter_segment")),
                    percent: p.get("percent").trim().to_owned(),
                    triggers,
                }
            })
            .collect();
        let kind = get("kind");
        let add = ["path:", g.name()].concat();
        if form.get("add") == Some(add.as_str()) {
            let mut p = PathForm::named(&["Path ", &(paths.len() + 1).to_string()].concat());
            if kind == "action_paths" {
                p.triggers.push(TriggerForm::empty());
            }
            paths.push(p);
        }
        StepForm {
            id: trimmed("id"),
            name: trimmed("name"),
            next: get("next"),
            channel: get("channel"),
            url: trimmed("url"),
            method: get("method"),
            from: trimmed("from"),
            reply_to: trimmed("reply_to"),
            subject: get("subject"),
            body: get("body"),
            plaintext: get("plaintext"),
            preheader: get("preheader"),
            delay: get("delay"),
            wait: DurationForm::from_group(g, "wait"),
            until: trimmed("until"),
            days: trimmed("days"),
            at: trimmed("at"),
            filter: with_segment(&get("filter"), &get("filter_segment")),
            yes: get("yes"),
            no: get("no"),
            paths,
            everyone_else: get("everyone_else"),
            window: DurationForm::from_group(g, "window"),
            set: get("set"),
            increment: get("increment"),
            kind,
        }
    }

    /// The API's JSON for step `i`, or the field to fix.
    fn to_json(&self, i: usize) -> Result<Value, FieldError> {
        let at = ["steps[", &i.to_string(), "]"].concat();
        let place = |rest: &str| [at.as_str(), ".", rest].concat();
        let mut out = json!({"id": self.id, "name": self.name, "type": self.kind});
        match self.kind.as_str() {
            "message" => {
                let m = match self.channel.as_str() {
                    "email" => json!({
                        "channel": "email", "from": self.from, "reply_to": optional(&self.reply_to),
                        "subject": self.subject, "body": self.body,
                        "plaintext_body": optional(&self.plaintext), "preheader": optional(&self.preheader),
                    }),
                    "webhook" => json!({
                        "channel": "webhook", "url": self.url, "request_method": self.method,
                        "body": self.body,
                    }),
                    _ => {
                        return Err(FieldError::new(
                            place("message.channel"),
                            "choose the email or webhook channel",
                        ));
                    }
                };
                out["message"] = m;
                out["next"] = optional(&self.next);
            }
            "delay" => {
                out["delay"] = match self.delay.as_str() {
                    "seconds" => json!({"seconds": self.wait.secs(&place("delay.seconds"))?}),
                    "until" => json!({"until": self.until}),
                    "days" => {
                        let days = self.days.parse::<u64>().map_err(|_| {
                            FieldError::new(place("delay.days"), "write a whole number of days")
                        })?;
                        json!({"days": days, "at": self.at})
                    }
                    _ => {
                        return Err(FieldError::new(
                            place("delay"),
                            "choose a duration, a time, or days and a time of day",
                        ));
                    }
                };
                out["next"] = optional(&self.next);
            }
            "decision_split" => {
                out["filter"] = json_field(&self.filter, &place("filter"))?;
                out["yes"] = optional(&self.yes);
                out["no"] = optional(&self.no);
            }
            "audience_paths" | "action_paths" | "experiment_paths" => {
                let mut paths = Vec::with_capacity(self.paths.len());
                for (j, p) in self.paths.iter().enumerate() {
                    let at = place(&["paths[", &j.to_string(), "]"].concat());
                    let mut pj = json!({"name": p.name, "next": optional(&p.next)});
                    match self.kind.as_str() {
                        "audience_paths" => {
                            pj["filter"] =
                                json_field(&p.filter, &[at.as_str(), ".filter"].concat())?;
                        }
                        "action_paths" => {
                            let triggers = p
                                .triggers
                                .iter()
                                .enumerate()
                                .map(|(k, t)| {
                                    let tp =
                                        [at.as_str(), ".triggers[", &k.to_string(), "]"].concat();
                                    t.to_json(&tp, Part::CanvasEntry)
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            pj["triggers"] = Value::Array(triggers);
                        }
                        _ => {
                            if !p.id.is_empty() {
                                pj["id"] = json!(p.id);
                            }
                            pj["percent"] = json!(p.percent.parse::<u64>().map_err(|_| {
                                FieldError::new(
                                    [at.as_str(), ".percent"].concat(),
                                    "write a whole number from 0 to 100",
                                )
                            })?);
                        }
                    }
                    paths.push(pj);
                }
                out["paths"] = Value::Array(paths);
                if self.kind == "action_paths" {
                    out["window_seconds"] = json!(self.window.secs(&place("window_seconds"))?);
                }
                if self.kind != "experiment_paths" {
                    out["everyone_else"] = optional(&self.everyone_else);
                }
            }
            "user_update" => {
                out["set"] = json_field(&self.set, &place("set"))?;
                out["increment"] = json_field(&self.increment, &place("increment"))?;
                out["next"] = optional(&self.next);
            }
            _ => return Err(FieldError::new(place("type"), "choose the step's kind")),
        }
        Ok(out)
    }

    /// Every step id this step leads to, as mutable fields (to forget a removed step).
    fn leads_mut(&mut self) -> Vec<&mut String> {
        let mut out = vec![
            &mut self.next,
            &mut self.yes,
            &mut self.no,
            &mut self.everyone_else,
        ];
        out.extend(self.paths.iter_mut().map(|p| &mut p.next));
        out
    }
}

impl PathForm {
    fn named(name: &str) -> PathForm {
        PathForm {
            name: name.to_owned(),
            ..PathForm::default()
        }
    }
}

impl ConversionForm {
    fn empty() -> ConversionForm {
        ConversionForm {
            kind: "custom_event".into(),
            window: DurationForm::of(3 * 86_400),
            ..ConversionForm::default()
        }
    }
}

/// An id for a new step, `step-{n}`, that no step has.
fn new_step_id(steps: &[StepForm]) -> String {
    (1..)
        .map(|n: usize| ["step-", &n.to_string()].concat())
        .find(|id| steps.iter().all(|s| &s.id != id))
        .unwrap_or_default()
}

impl CanvasEditor {
    /// A new Canvas: API-triggered, one webhook Message step.
    pub fn starter() -> CanvasEditor {
        let mut welcome = StepForm::new("welcome".into(), "message");
        welcome.name = "Welcome".into();
        welcome.url = "https://example.com/hook".into();
        welcome.body = "Hi {{${first_name}}}".into();
        CanvasEditor {
            entry: DeliveryForm::empty(),
            frequency_capping: true,
            control: "0".into(),
            variants: vec![VariantForm {
                id: String::new(),
                name: "Variant 1".into(),
                percent: "100".into(),
                first_step: "welcome".into(),
            }],
            steps: vec![welcome],
            ..CanvasEditor::default()
        }
    }

    /// The editor for a stored (canonical) definition, or `None` when it holds something the
    /// editor has no field for.
    pub fn from_json(d: &Value) -> Option<CanvasEditor> {
        let exit = &d["exit_criteria"];
        let reentry = d["reentry"]["after_seconds"].as_i64();
        Some(CanvasEditor {
            entry: DeliveryForm::from_json(&d["entry"])?,
            segments: d["audience"]["segment_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect(),
            audience_filter: json_text(&d["audience"]["filter"]),
            may_reenter: reentry.is_some(),
            reentry: DurationForm::of(reentry.unwrap_or(86_400)),
            entry_limit: number(&d["entry_limit"]),
            exceptions: triggers_of(&exit["exception_events"])?,
            exit_filter: json_text(&exit["filter"]),
            conversions: d["conversion_events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ConversionForm {
                    kind: text(&c["type"]),
                    event: text(&c["name"]),
                    product: text(&c["product_id"]),
                    window: DurationForm::of(c["window_seconds"].as_i64().unwrap_or(0)),
                })
                .collect(),
            frequency_capping: d["frequency_capping"].as_bool().unwrap_or(true),
            control: number(&d["control_percent"]),
            variants: d["variants"]
                .as_array()?
                .iter()
                .map(|v| VariantForm {
                    id: text(&v["id"]),
                    name: text(&v["name"]),
                    percent: number(&v["percent"]),
                    first_step: text(&v["first_step"]),
                })
                .collect(),
            steps: d["steps"]
                .as_array()?
                .iter()
                .map(StepForm::from_json)
                .collect::<Option<_>>()?,
        })
    }

    /// From the posted form, reshaped by its `add` / `remove` button (see the module's doc).
    pub fn from_form(form: &FormData) -> CanvasEditor {
        let add = form.get("add").unwrap_or("");
        let mut steps: Vec<StepForm> = form
            .groups("s", "kind")
            .iter()
            .map(|g| StepForm::from_group(form, g))
            .collect();
        if add == "step" && steps.len() < MAX_STEPS.min(MAX_GROUPS) {
            let kind = form.text("new_step_kind");
            let kind = STEP_KINDS
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or("message", |(k, _)| *k);
            steps.push(StepForm::new(new_step_id(&steps), kind));
        }
        // A removed step's id no longer names a step: what led to it now ends the journey
        // (shown so; the marketer picks where it leads instead).
        let ids: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
        for s in &mut steps {
            for lead in s.leads_mut() {
                if !lead.is_empty() && !ids.contains(lead) {
                    lead.clear();
                }
            }
        }
        let mut exceptions: Vec<TriggerForm> = form
            .groups("x", "kind")
            .iter()
            .map(|g| TriggerForm::from_group(form, g))
            .collect();
        if add == "exception" && exceptions.len() < MAX_GROUPS {
            exceptions.push(TriggerForm::empty());
        }
        let mut conversions: Vec<ConversionForm> = form
            .groups("c", "kind")
            .iter()
            .map(|g| ConversionForm {
                kind: g.get("kind").to_owned(),
                event: g.get("event").trim().to_owned(),
                product: g.get("product").trim().to_owned(),
                window: DurationForm::from_group(g, "window"),
            })
            .collect();
        if add == "conversion" && conversions.len() < MAX_CONVERSIONS {
            conversions.push(ConversionForm::empty());
        }
        let mut variants: Vec<VariantForm> = form
            .groups("v", "first_step")
            .iter()
            .map(|g| VariantForm {
                id: g.get("id").trim().to_owned(),
                name: g.get("name").trim().to_owned(),
                percent: g.get("percent").trim().to_owned(),
                first_step: g.get("first_step").to_owned(),
            })
            .collect();
        // As for paths: a variant that started at a removed step starts nowhere until one is
        // picked.
        for v in &mut variants {
            if !ids.contains(&v.first_step) {
                v.first_step.clear();
            }
        }
        if add == "variant" && variants.len() < MAX_VARIANTS {
            variants.push(VariantForm {
                name: ["Variant ", &(variants.len() + 1).to_string()].concat(),
                percent: "0".into(),
                first_step: ids.first().cloned().unwrap_or_default(),
                ..VariantForm::default()
            });
        }
        CanvasEditor {
            entry: DeliveryForm::from_form(form),
            segments: form.all("segment").into_iter().map(str::to_owned).collect(),
            audience_filter: with_segment(
                form.get("audience_filter").unwrap_or(""),
                form.get("audience_filter_segment").unwrap_or(""),
            ),
            may_reenter: form.get("may_reenter") == Some("true"),
            reentry: DurationForm::from_form(form, "reentry"),
            entry_limit: form.text("entry_limit").to_owned(),
            exceptions,
            exit_filter: with_segment(
                form.get("exit_filter").unwrap_or(""),
                form.get("exit_filter_segment").unwrap_or(""),
            ),
            conversions,
            frequency_capping: form.get("frequency_capping") == Some("true"),
            control: form.text("control").to_owned(),
            variants,
            steps,
        }
    }

    /// The management API's document (without name, description and tags), or the field
    /// to fix. Numbers are passed as written and checked by the API.
    pub fn to_json(&self) -> Result<Map<String, Value>, FieldError> {
        let whole = |raw: &str, place: &str| {
            raw.parse::<u64>()
                .map_err(|_| FieldError::new(place, "write a whole number"))
        };
        let mut out = Map::new();
        out.insert("entry".into(), self.entry.to_json(Part::CanvasEntry)?);
        out.insert(
            "audience".into(),
            json!({"segment_ids": self.segments, "filter": json_field(&self.audience_filter, "audience.filter")?}),
        );
        out.insert(
            "reentry".into(),
            if self.may_reenter {
                json!({"after_seconds": self.reentry.secs("reentry.after_seconds")?})
            } else {
                Value::Null
            },
        );
        out.insert(
            "entry_limit".into(),
            if self.entry_limit.is_empty() {
                Value::Null
            } else {
                json!(whole(&self.entry_limit, "entry_limit")?)
            },
        );
        let exceptions = self
            .exceptions
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let at = ["exit_criteria.exception_events[", &i.to_string(), "]"].concat();
                t.to_json(&at, Part::CanvasEntry)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exit_filter = json_field(&self.exit_filter, "exit_criteria.filter")?;
        out.insert(
            "exit_criteria".into(),
            if exceptions.is_empty() && exit_filter.is_null() {
                Value::Null
            } else {
                json!({"exception_events": exceptions, "filter": exit_filter})
            },
        );
        let mut conversions = Vec::with_capacity(self.conversions.len());
        for (i, c) in self.conversions.iter().enumerate() {
            let place = |f: &str| ["conversion_events[", &i.to_string(), "].", f].concat();
            let mut cj = json!({"type": c.kind});
            match c.kind.as_str() {
                "custom_event" => cj["name"] = json!(c.event),
                "purchase" => cj["product_id"] = optional(&c.product),
                _ => {}
            }
            cj["window_seconds"] = json!(c.window.secs(&place("window_seconds"))?);
            conversions.push(cj);
        }
        out.insert("conversion_events".into(), Value::Array(conversions));
        out.insert("frequency_capping".into(), json!(self.frequency_capping));
        out.insert(
            "control_percent".into(),
            json!(if self.control.is_empty() {
                0
            } else {
                whole(&self.control, "control_percent")?
            }),
        );
        let mut variants = Vec::with_capacity(self.variants.len());
        for (i, v) in self.variants.iter().enumerate() {
            let place = ["variants[", &i.to_string(), "].percent"].concat();
            let mut vj = json!({"name": v.name, "percent": whole(&v.percent, &place)?, "first_step": v.first_step});
            if !v.id.is_empty() {
                vj["id"] = json!(v.id);
            }
            variants.push(vj);
        }
        out.insert("variants".into(), Value::Array(variants));
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| s.to_json(i))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("steps".into(), Value::Array(steps));
        Ok(out)
    }
}

/// A filter's JSON text with the saved segment picked beside it (`<name>_segment`): that
/// segment's membership (`in_segment`) alone when the text is empty, and with the text (AND)
/// when both are given; the text as it is when none is picked. The picker is an input aid:
/// a stored filter always comes back as JSON text.
fn with_segment(text: &str, segment: &str) -> String {
    let segment = segment.trim();
    if segment.is_empty() {
        return text.to_owned();
    }
    let member = json!({ "in_segment": segment });
    if text.trim().is_empty() {
        return member.to_string();
    }
    match serde_json::from_str::<Value>(text) {
        Ok(filter) => json!({ "and": [member, filter] }).to_string(),
        // Not JSON: left as written, so the refusal names the text the user wrote.
        Err(_) => text.to_owned(),
    }
}

/// What the editor's fieldsets need besides the form: the workspace's cohorts and segments
/// (entry triggers, audience) and the refusal to show beside its field.
pub(super) struct Context<'a> {
    pub cohorts: &'a [CohortSummary],
    pub segments: &'a [Segment],
    pub error: Option<&'a FieldError>,
}

impl Context<'_> {
    fn at(&self, place: &str) -> Option<&FieldError> {
        self.error.filter(|e| e.field == place)
    }

    /// A text area for JSON (a segment filter, attributes) with the error beside it.
    fn json_area(&self, id: &str, name: &str, value: &str, place: &str) -> Markup {
        let at = self.at(place);
        html! {
            textarea class="json mono" id=(id) name=(name) rows="4" spellcheck="false"
                aria-invalid=[at.map(|_| "true")] aria-describedby=[described_by(at, id)] { (value) }
            (error_beside(at, id))
        }
    }

    /// A segment filter: its JSON text area, and beside it a picker of the workspace's saved
    /// segments (`<name>_segment`, see [`with_segment`]), so a filter built in the segment
    /// builder — Heap Cohorts includes, attributes, events — is used without writing JSON.
    fn filter_area(&self, id: &str, name: &str, value: &str, place: &str) -> Markup {
        let picker = [id, "-segment"].concat();
        html! {
            (self.json_area(id, name, value, place))
            label for=(picker) { "…or users in a saved segment " span class="muted" { "(with the JSON above, if any: both must match)" } }
            select id=(picker) name=([name, "_segment"].concat()) {
                option value="" { "— none —" }
                @for seg in self.segments {
                    option value=(seg.id) { (seg.name) }
                }
            }
        }
    }

    /// An amount and its unit.
    fn duration(&self, id: &str, name: &str, d: &DurationForm, place: &str) -> Markup {
        let unit = [name, "_unit"].concat();
        html! {
            div class="duration" {
                (input(self.error, id, name, &d.amount, &[place]))
                select name=(unit) aria-label="unit" {
                    @for (u, label, _) in UNITS {
                        option value=(u) selected[d.unit == u] { (label) }
                    }
                }
            }
        }
    }
}

/// Where a select of steps is: a variant's start, or a path of a step.
#[derive(Clone, Copy)]
enum Lead<'a> {
    /// A variant's first step: a journey cannot end before it begins.
    Start,
    /// A path of the step with this id, which cannot lead to itself.
    From(&'a str),
}

/// A select of the step a variant starts at or a path leads to (or, for a path, the
/// journey's end).
fn leads_to(
    steps: &[StepForm],
    lead: Lead<'_>,
    id: &str,
    name: &str,
    value: &str,
    ctx: &Context<'_>,
    place: &str,
) -> Markup {
    let at = ctx.at(place);
    let known = steps.iter().any(|s| s.id == value);
    html! {
        select id=(id) name=(name) aria-invalid=[at.map(|_| "true")] aria-describedby=[described_by(at, id)] {
            @match lead {
                Lead::From(_) => option value="" selected[value.is_empty()] { "— the journey ends —" },
                // No step chosen (its step was removed): the API's check asks for one.
                Lead::Start => @if !known { option value="" selected { "— pick the first step —" } },
            }
            @for s in steps.iter().filter(|s| !matches!(lead, Lead::From(own) if own == s.id)) {
                option value=(s.id) selected[s.id == value] { (s.name) " (" (s.id) ")" }
            }
        }
        (error_beside(at, id))
    }
}

/// Every fieldset of the editor.
pub(super) fn fieldsets(f: &CanvasEditor, ctx: &Context<'_>) -> Markup {
    let error = ctx.error;
    html! {
        (delivery::fieldset(&f.entry, Part::CanvasEntry, ctx.cohorts, ctx.segments, error))
        fieldset id="canvas-audience" {
            legend { "Entry audience " span class="muted" { "(users in every ticked segment and matching the filter; none: everyone)" } }
            @if ctx.segments.is_empty() { p class="muted" { "No segments yet." } }
            @for s in ctx.segments {
                label class="check" { input type="checkbox" name="segment" value=(s.id) checked[f.segments.contains(&s.id)]; (s.name) }
            }
            // A segment the definition names that no longer exists stays ticked and says so:
            // dropping it silently would widen the audience on the next save.
            @for id in f.segments.iter().filter(|id| !ctx.segments.iter().any(|s| &s.id == *id)) {
                label class="check" { input type="checkbox" name="segment" value=(id) checked; "Deleted segment " code { (id) } " (untick it to save)" }
            }
            (error_beside(error.filter(|e| e.field.starts_with("audience.segment_ids")), "canvas-audience"))
            label for="audience-filter" { "Filter " span class="muted" { "(optional; the segment language's JSON)" } }
            (ctx.filter_area("audience-filter", "audience_filter", &f.audience_filter, "audience.filter"))
        }
        fieldset id="canvas-entry-rules" {
            legend { "Entry limits and re-eligibility" }
            label class="check" { input type="checkbox" name="may_reenter" value="true" id="may-reenter" checked[f.may_reenter]; "Users may enter again once their journey has ended" }
            label for="reentry" { "Again after " span class="muted" { "(since their last entry)" } }
            (ctx.duration("reentry", "reentry", &f.reentry, "reentry.after_seconds"))
            label for="entry-limit" { "Entry limit " span class="muted" { "(optional; most entries of all users together)" } }
            (input(error, "entry-limit", "entry_limit", &f.entry_limit, &["entry_limit"]))
            label class="check" { input type="checkbox" name="frequency_capping" value="true" id="frequency-capping" checked[f.frequency_capping]; "The workspace's frequency caps apply to its messages" }
        }
        fieldset id="canvas-exit" {
            legend { "Exit criteria" }
            (error_beside(error.filter(|e| e.field == "exit_criteria" || e.field == "exit_criteria.exception_events"), "canvas-exit"))
            @for (i, t) in f.exceptions.iter().enumerate() {
                @let row = TriggerRow {
                    name: ["x", &i.to_string()].concat(),
                    place: ["exit_criteria.exception_events[", &i.to_string(), "]"].concat(),
                    legend: ["Exception event ", &(i + 1).to_string()].concat(),
                    kinds: &EVENT_TRIGGERS,
                    removable: true,
                };
                (delivery::trigger(&row, t, ctx.cohorts, ctx.segments, error))
            }
            @if f.exceptions.len() < MAX_GROUPS {
                button type="submit" class="secondary" name="add" value="exception" id="add-exception" formnovalidate { "Add an exception event" }
            }
            label for="exit-filter" { "Exit when the user matches " span class="muted" { "(optional; checked as each step ends; the segment language's JSON)" } }
            (ctx.filter_area("exit-filter", "exit_filter", &f.exit_filter, "exit_criteria.filter"))
        }
        fieldset id="canvas-conversions" {
            legend { "Conversion events" }
            (error_beside(ctx.at("conversion_events"), "canvas-conversions"))
            @for (i, c) in f.conversions.iter().enumerate() {
                @let n = ["c", &i.to_string()].concat();
                @let id = |x: &str| [n.as_str(), "-", x].concat();
                @let name = |x: &str| [n.as_str(), "_", x].concat();
                @let place = |x: &str| ["conversion_events[", &i.to_string(), "]", x].concat();
                fieldset class="conversion" id=(id("fields")) {
                    legend { "Conversion event " (i + 1) }
                    label for=(id("kind")) { "The user" }
                    select id=(id("kind")) name=(name("kind")) {
                        @for (k, label) in CONVERSIONS { option value=(k) selected[c.kind == k] { (label) } }
                    }
                    (error_beside(ctx.at(&place(".type")), &id("kind")))
                    label for=(id("event")) { "Custom event name " span class="muted" { "(custom event)" } }
                    (input(error, &id("event"), &name("event"), &c.event, &[&place(".name")]))
                    label for=(id("product")) { "Product id " span class="muted" { "(purchase; empty: any product)" } }
                    (input(error, &id("product"), &name("product"), &c.product, &[&place(".product_id")]))
                    label for=(id("window")) { "Within " span class="muted" { "(of entering)" } }
                    (ctx.duration(&id("window"), &name("window"), &c.window, &place(".window_seconds")))
                    button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove conversion event " (i + 1) }
                }
            }
            @if f.conversions.len() < MAX_CONVERSIONS {
                button type="submit" class="secondary" name="add" value="conversion" id="add-conversion" formnovalidate { "Add a conversion event" }
            }
        }
        fieldset id="canvas-variants" {
            legend { "Variants " span class="muted" { "(each entering user gets one, by percentage; the control group enters no journey)" } }
            (error_beside(ctx.at("variants"), "canvas-variants"))
            @for (i, v) in f.variants.iter().enumerate() {
                @let n = ["v", &i.to_string()].concat();
                @let id = |x: &str| [n.as_str(), "-", x].concat();
                @let name = |x: &str| [n.as_str(), "_", x].concat();
                @let place = |x: &str| ["variants[", &i.to_string(), "].", x].concat();
                fieldset class="variant" id=(id("fields")) {
                    legend { "Variant " (i + 1) }
                    input type="hidden" name=(name("id")) value=(v.id);
                    label for=(id("name")) { "Variant name" }
                    (input(error, &id("name"), &name("name"), &v.name, &[&place("name")]))
                    label for=(id("percent")) { "Percent of users" }
                    (input(error, &id("percent"), &name("percent"), &v.percent, &[&place("percent")]))
                    label for=(id("first_step")) { "Starts at" }
                    (leads_to(&f.steps, Lead::Start, &id("first_step"), &name("first_step"), &v.first_step, ctx, &place("first_step")))
                    @if f.variants.len() > 1 {
                        button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove variant " (i + 1) }
                    }
                }
            }
            @if f.variants.len() < MAX_VARIANTS {
                button type="submit" class="secondary" name="add" value="variant" id="add-variant" formnovalidate { "Add a variant" }
            }
            label for="control-percent" { "Control group " span class="muted" { "(percent of users who enter no journey)" } }
            (input(error, "control-percent", "control", &f.control, &["control_percent"]))
        }
        fieldset id="canvas-steps-editor" {
            legend { "Steps" }
            (error_beside(ctx.at("steps"), "canvas-steps-editor"))
            @for (i, s) in f.steps.iter().enumerate() {
                (step(f, i, s, ctx))
            }
            @if f.steps.len() < MAX_STEPS.min(MAX_GROUPS) {
                div class="add-step" {
                    label for="new-step-kind" { "New step's kind" }
                    select id="new-step-kind" name="new_step_kind" {
                        @for (k, label) in STEP_KINDS { option value=(k) { (label) } }
                    }
                    button type="submit" class="secondary" name="add" value="step" id="add-step" formnovalidate { "Add a step" }
                }
            }
        }
    }
}

/// Step `i`'s fieldset: its name, kind and the fields of its kind, and where it leads.
fn step(f: &CanvasEditor, i: usize, s: &StepForm, ctx: &Context<'_>) -> Markup {
    let error = ctx.error;
    let n = ["s", &i.to_string()].concat();
    let id = |x: &str| [n.as_str(), "-", x].concat();
    let name = |x: &str| [n.as_str(), "_", x].concat();
    let at = ["steps[", &i.to_string(), "]"].concat();
    let place = |x: &str| [at.as_str(), ".", x].concat();
    let kind_label = STEP_KINDS
        .iter()
        .find(|(k, _)| *k == s.kind)
        .map_or(s.kind.as_str(), |(_, l)| l);
    // A refusal about the step as a whole (its type, its paths' percentages) is shown at its
    // legend.
    let whole = error
        .filter(|e| [at.clone(), place("type"), place("paths"), place("id")].contains(&e.field));
    let lead = |field: &str, label: &str, value: &str| {
        html! {
            label for=(id(field)) { (label) }
            (leads_to(&f.steps, Lead::From(&s.id), &id(field), &name(field), value, ctx, &place(field)))
        }
    };
    html! {
        fieldset class="step" id=(id("fields")) {
            legend { "Step " (i + 1) ": " (kind_label) " " span class="muted" { "(id " code { (s.id) } ")" } }
            (error_beside(whole, &id("fields")))
            input type="hidden" name=(name("id")) value=(s.id);
            input type="hidden" name=(name("kind")) value=(s.kind);
            label for=(id("name")) { "Step name" }
            (input(error, &id("name"), &name("name"), &s.name, &[&place("name")]))
            @match s.kind.as_str() {
                "message" => {
                    @let m = |x: &str| place(&["message.", x].concat());
                    div role="radiogroup" aria-label=(["Step ", &(i + 1).to_string(), " channel"].concat()) {
                        label class="check" { input type="radio" name=(name("channel")) value="webhook" checked[s.channel == "webhook"]; "Webhook" }
                        label class="check" { input type="radio" name=(name("channel")) value="email" checked[s.channel == "email"]; "Email" }
                    }
                    (error_beside(ctx.at(&m("channel")), &id("channel")))
                    label for=(id("url")) { "Webhook URL " span class="muted" { "(webhook; Liquid)" } }
                    (input(error, &id("url"), &name("url"), &s.url, &[&m("url")]))
                    label for=(id("method")) { "Request method " span class="muted" { "(webhook)" } }
                    select id=(id("method")) name=(name("method")) {
                        @for verb in ["POST", "PUT", "DELETE", "GET"] { option value=(verb) selected[s.method == verb] { (verb) } }
                    }
                    (error_beside(ctx.at(&m("request_method")), &id("method")))
                    label for=(id("from")) { "From " span class="muted" { "(email)" } }
                    (input(error, &id("from"), &name("from"), &s.from, &[&m("from")]))
                    label for=(id("reply_to")) { "Reply-to " span class="muted" { "(email; optional)" } }
                    (input(error, &id("reply_to"), &name("reply_to"), &s.reply_to, &[&m("reply_to")]))
                    label for=(id("subject")) { "Subject " span class="muted" { "(email; Liquid)" } }
                    (input(error, &id("subject"), &name("subject"), &s.subject, &[&m("subject")]))
                    label for=(id("preheader")) { "Preheader " span class="muted" { "(email; optional, Liquid)" } }
                    (input(error, &id("preheader"), &name("preheader"), &s.preheader, &[&m("preheader")]))
                    label for=(id("body")) { "Body " span class="muted" { "(Liquid: {{${first_name}}}, {{canvas_entry_properties.${plan}}}, …)" } }
                    textarea id=(id("body")) name=(name("body")) rows="5"
                        aria-invalid=[ctx.at(&m("body")).map(|_| "true")] aria-describedby=[described_by(ctx.at(&m("body")), &id("body"))] { (s.body) }
                    (error_beside(ctx.at(&m("body")), &id("body")))
                    label for=(id("plaintext")) { "Plain-text body " span class="muted" { "(email; optional, Liquid)" } }
                    textarea id=(id("plaintext")) name=(name("plaintext")) rows="3"
                        aria-invalid=[ctx.at(&m("plaintext_body")).map(|_| "true")] aria-describedby=[described_by(ctx.at(&m("plaintext_body")), &id("plaintext"))] { (s.plaintext) }
                    (error_beside(ctx.at(&m("plaintext_body")), &id("plaintext")))
                    (lead("next", "Then", &s.next))
                }
                "delay" => {
                    fieldset {
                        legend { "Wait" }
                        label class="check" { input type="radio" name=(name("delay")) value="seconds" checked[s.delay == "seconds"]; "For a time" }
                        label class="check" { input type="radio" name=(name("delay")) value="until" checked[s.delay == "until"]; "Until a moment" }
                        label class="check" { input type="radio" name=(name("delay")) value="days" checked[s.delay == "days"]; "Some days, then until a time of day" }
                        (error_beside(ctx.at(&place("delay")), &id("delay")))
                    }
                    label for=(id("wait")) { "For " span class="muted" { "(for a time; at most 30 days)" } }
                    (ctx.duration(&id("wait"), &name("wait"), &s.wait, &place("delay.seconds")))
                    label for=(id("until")) { "Until " span class="muted" { "(until a moment; e.g. 2026-12-24T09:00:00Z)" } }
                    (input(error, &id("until"), &name("until"), &s.until, &[&place("delay.until")]))
                    label for=(id("days")) { "Days " span class="muted" { "(then until a time of day)" } }
                    (input(error, &id("days"), &name("days"), &s.days, &[&place("delay.days")]))
                    label for=(id("at")) { "Time of day " span class="muted" { "(HH:MM, UTC)" } }
                    (input(error, &id("at"), &name("at"), &s.at, &[&place("delay.at")]))
                    (lead("next", "Then", &s.next))
                }
                "decision_split" => {
                    label for=(id("filter")) { "Users matching " span class="muted" { "(the segment language's JSON)" } }
                    (ctx.filter_area(&id("filter"), &name("filter"), &s.filter, &place("filter")))
                    (lead("yes", "Yes: they go to", &s.yes))
                    (lead("no", "No: they go to", &s.no))
                }
                "audience_paths" | "action_paths" | "experiment_paths" => {
                    @if s.kind == "action_paths" {
                        label for=(id("window")) { "Wait for an action up to " span class="muted" { "(at most 31 days)" } }
                        (ctx.duration(&id("window"), &name("window"), &s.window, &place("window_seconds")))
                    }
                    @for (j, p) in s.paths.iter().enumerate() {
                        (path(f, s, i, j, p, ctx))
                    }
                    @let most = if s.kind == "experiment_paths" { MAX_EXPERIMENT_PATHS } else { MAX_AUDIENCE_PATHS };
                    @if s.paths.len() < most {
                        button type="submit" class="secondary" name="add" value=(["path:", n.as_str()].concat()) formnovalidate { "Add a path to step " (i + 1) }
                    }
                    @if s.kind != "experiment_paths" {
                        (lead("everyone_else", "Everyone else goes to", &s.everyone_else))
                    }
                }
                "user_update" => {
                    label for=(id("set")) { "Set attributes " span class="muted" { "(a JSON object: {\"plan\": \"pro\"})" } }
                    (ctx.json_area(&id("set"), &name("set"), &s.set, &place("set")))
                    label for=(id("increment")) { "Increment attributes " span class="muted" { "(a JSON object of numbers: {\"visits\": 1})" } }
                    (ctx.json_area(&id("increment"), &name("increment"), &s.increment, &place("increment")))
                    (lead("next", "Then", &s.next))
                }
                _ => {}
            }
            @if f.steps.len() > 1 {
                button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove step " (i + 1) " (" (s.name) ")" }
            }
        }
    }
}

/// Path `j` of step `i` (a Paths step): its name, the fields of the step's kind, where it
/// leads.
fn path(
    f: &CanvasEditor,
    s: &StepForm,
    i: usize,
    j: usize,
    p: &PathForm,
    ctx: &Context<'_>,
) -> Markup {
    let error = ctx.error;
    let n = ["s", &i.to_string(), "p", &j.to_string()].concat();
    let id = |x: &str| [n.as_str(), "-", x].concat();
    let name = |x: &str| [n.as_str(), "_", x].concat();
    let at = ["steps[", &i.to_string(), "].paths[", &j.to_string(), "]"].concat();
    let place = |x: &str| [at.as_str(), ".", x].concat();
    html! {
        fieldset class="path" id=(id("fields")) {
            legend { "Path " (j + 1) " of step " (i + 1) }
            (error_beside(error.filter(|e| e.field == at), &id("fields")))
            input type="hidden" name=(name("id")) value=(p.id);
            label for=(id("name")) { "Path name" }
            (input(error, &id("name"), &name("name"), &p.name, &[&place("name")]))
            @match s.kind.as_str() {
                "audience_paths" => {
                    label for=(id("filter")) { "Users matching " span class="muted" { "(the segment language's JSON)" } }
                    (ctx.filter_area(&id("filter"), &name("filter"), &p.filter, &place("filter")))
                }
                "action_paths" => {
                    (error_beside(ctx.at(&place("triggers")), &id("triggers")))
                    @for (k, t) in p.triggers.iter().enumerate() {
                        @let row = TriggerRow {
                            name: [n.as_str(), "t", &k.to_string()].concat(),
                            place: [at.as_str(), ".triggers[", &k.to_string(), "]"].concat(),
                            legend: ["Action ", &(k + 1).to_string(), " of path ", &(j + 1).to_string()].concat(),
                            kinds: &EVENT_TRIGGERS,
                            removable: p.triggers.len() > 1,
                        };
                        (delivery::trigger(&row, t, ctx.cohorts, ctx.segments, error))
                    }
                    @if p.triggers.len() < MAX_GROUPS {
                        button type="submit" class="secondary" name="add" value=(["trigger:", n.as_str()].concat()) formnovalidate { "Add an action to path " (j + 1) " of step " (i + 1) }
                    }
                }
                _ => {
                    label for=(id("percent")) { "Percent of users" }
                    (input(error, &id("percent"), &name("percent"), &p.percent, &[&place("percent")]))
                }
            }
            label for=(id("next")) { "Goes to" }
            (leads_to(&f.steps, Lead::From(&s.id), &id("next"), &name("next"), &p.next, ctx, &place("next")))
            @if s.paths.len() > 1 {
                button type="submit" class="secondary" name="remove" value=(n) formnovalidate { "Remove path " (j + 1) " of step " (i + 1) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_core::canvas::CanvasDefinition;

    /// The editor's fields as the page renders them (no cohorts or segments to pick).
    fn page_of(f: &CanvasEditor) -> String {
        fieldsets(
            f,
            &Context {
                cohorts: &[],
                segments: &[],
                error: None,
            },
        )
        .into_string()
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            ["gen-", &n.to_string()].concat()
        }
    }

    /// The API's answer for `doc`: its canonical JSON and definition.
    fn accepted(doc: &Value) -> (CanvasDefinition, Value) {
        CanvasDefinition::parse(doc, ids()).unwrap_or_else(|e| panic!("{e:?}: {doc}"))
    }

    /// A stored definition shown in the editor and saved again is the same definition.
    fn round_trip(doc: Value) {
        let (def, canonical) = accepted(&doc);
        let form = CanvasEditor::from_json(&canonical).expect("the editor shows it");
        let back = Value::Object(form.to_json().unwrap_or_else(|e| panic!("{e:?}")));
        let (again, canonical_again) = accepted(&back);
        assert_eq!(again, def, "{back}");
        assert_eq!(canonical_again, canonical, "{back}");
    }

    const PLAN: &str = r#"{"attribute": {"name": "plan", "op": "equals", "value": "pro"}}"#;

    fn plan() -> Value {
        serde_json::from_str(PLAN).unwrap()
    }

    #[test]
    fn every_step_kind_comes_back_unchanged() {
        round_trip(json!({
            "entry": {"type": "action_based", "triggers": [
                {"custom_event": {"name": "signed_up", "property_filters": [{"property": "plan", "comparison": "equals", "value": "trial"}]}},
                {"cohort_entry": {"partner": "heap", "cohort_id": "42"}}]},
            "audience": {"segment_ids": ["s1"], "filter": plan()},
            "reentry": {"after_seconds": 604800},
            "entry_limit": 1000,
            "exit_criteria": {"exception_events": [{"custom_event": {"name": "upgraded"}}, {"purchase": {"product_id": "pro"}}], "filter": plan()},
            "conversion_events": [
                {"type": "custom_event", "name": "upgraded", "window_seconds": 259200},
                {"type": "purchase", "window_seconds": 3600},
                {"type": "purchase", "product_id": "pro", "window_seconds": 90}],
            "frequency_capping": false,
            "control_percent": 10,
            "variants": [
                {"id": "a", "name": "A", "percent": 45, "first_step": "mail"},
                {"id": "b", "name": "B", "percent": 45, "first_step": "wait"}],
            "steps": [
                {"id": "mail", "name": "Welcome <mail>", "type": "message", "next": "wait",
                 "message": {"channel": "email", "from": "T <t@example.com>", "reply_to": "r@example.com",
                  "subject": "Hi {{${first_name}}}", "body": "<p>x</p>", "plaintext_body": "x", "preheader": "p"}},
                {"id": "wait", "name": "Two days", "type": "delay", "delay": {"seconds": 172800}, "next": "split"},
                {"id": "split", "name": "On Pro?", "type": "decision_split", "filter": plan(), "yes": "hook", "no": "groups"},
                {"id": "hook", "name": "Tell sales", "type": "message", "next": null,
                 "message": {"channel": "webhook", "url": "https://example.com/{{${user_id}}}", "request_method": "PUT", "body": ""}},
                {"id": "groups", "name": "Groups", "type": "audience_paths",
                 "paths": [{"name": "Pro", "filter": plan(), "next": "until"}], "everyone_else": "acts"},
                {"id": "until", "name": "Until launch", "type": "delay", "delay": {"until": "2030-01-01T09:00:00Z"}},
                {"id": "acts", "name": "Acts", "type": "action_paths", "window_seconds": 5400,
                 "paths": [{"name": "Bought", "triggers": [{"purchase": {"product_id": null}},
                    {"custom_event": {"name": "played", "property_filters": [{"property": "level", "comparison": "greater_than", "value": 3}]}}], "next": "test"}],
                 "everyone_else": "morning"},
                {"id": "morning", "name": "Morning", "type": "delay", "delay": {"days": 2, "at": "09:30"}, "next": "update"},
                {"id": "test", "name": "Test", "type": "experiment_paths",
                 "paths": [{"id": "x", "name": "X", "percent": 30, "next": "update"}, {"id": "y", "name": "Y", "percent": 70, "next": null}]},
                {"id": "update", "name": "Mark", "type": "user_update", "set": {"stage": "done", "n": 2}, "increment": {"visits": 1.5}}
            ]
        }));
        round_trip(
            json!({"entry": {"type": "scheduled", "schedule": {"frequency": "weekly", "time": "09:00", "days": ["monday"]}},
            "steps": [{"id": "only", "type": "delay", "delay": {"seconds": 61}}]}),
        );
        round_trip(json!({"entry": {"type": "api_triggered"},
            "steps": [{"id": "only", "type": "user_update", "increment": {"visits": 1}}]}));
    }

    #[test]
    fn what_the_editor_has_no_field_for_is_left_to_the_json_form() {
        let (_, canonical) = accepted(&json!({"entry": {"type": "api_triggered"}, "steps": [
            {"id": "hook", "type": "message", "message": {"channel": "webhook", "url": "https://e.com",
             "request_headers": {"Authorization": "Bearer x"}}}]}));
        assert_eq!(CanvasEditor::from_json(&canonical), None);
    }

    #[test]
    fn the_starter_is_a_canvas_the_api_accepts() {
        let doc = Value::Object(CanvasEditor::starter().to_json().unwrap());
        accepted(&doc);
    }

    #[test]
    fn durations_read_back_as_the_same_seconds() {
        for secs in [0, 1, 59, 60, 90, 3_600, 5_400, 86_400, 172_800, 2_592_000] {
            assert_eq!(DurationForm::of(secs).secs("x").unwrap(), secs);
        }
        assert_eq!(DurationForm::of(172_800).amount, "2");
        assert_eq!(DurationForm::of(5_400).unit, "minutes");
    }

    #[test]
    fn posted_buttons_add_and_remove_steps_and_paths() {
        let (_, canonical) = accepted(&json!({"entry": {"type": "api_triggered"}, "steps": [
            {"id": "a", "type": "delay", "delay": {"seconds": 60}, "next": "b"},
            {"id": "b", "type": "audience_paths", "paths": [{"name": "P", "filter": plan(), "next": null}]}]}));
        let f = CanvasEditor::from_json(&canonical).unwrap();
        // The form as a browser posts it: the same fields the page renders.
        let page = page_of(&f);
        let mut posted = fields_of(&page);
        posted.push(("add".into(), "step".into()));
        for (k, v) in &mut posted {
            if k == "new_step_kind" {
                *v = "user_update".into();
            }
        }
        let added = CanvasEditor::from_form(&FormData(posted.clone()));
        assert_eq!(added.steps.len(), 3);
        assert_eq!(
            (added.steps[2].id.as_str(), added.steps[2].kind.as_str()),
            ("step-1", "user_update")
        );
        // Unchanged but for the new step.
        let mut without = added.clone();
        without.steps.pop();
        assert_eq!(without, f);
        posted.retain(|(k, _)| k != "add");
        posted.push(("add".into(), "path:s1".into()));
        assert_eq!(
            CanvasEditor::from_form(&FormData(posted.clone())).steps[1]
                .paths
                .len(),
            2
        );
        posted.retain(|(k, _)| k != "add");
        posted.push(("remove".into(), "s1".into()));
        let removed = CanvasEditor::from_form(&FormData(posted));
        assert_eq!(removed.steps.len(), 1);
        assert_eq!(
            removed.steps[0].next, "",
            "what led to the removed step ends the journey"
        );
    }

    /// The fields a browser posts for `page`'s inputs, selects and text areas (a test's
    /// reading of the markup this module renders; not a general HTML parser).
    fn fields_of(page: &str) -> Vec<(String, String)> {
        let attr = |tag: &str, name: &str| -> Option<String> {
            let key = [" ", name, "=\""].concat();
            let at = tag.find(&key)? + key.len();
            let end = tag[at..].find('"')? + at;
            Some(unescape(&tag[at..end]))
        };
        let mut out = Vec::new();
        let mut rest = page;
        while let Some(open) = rest.find('<') {
            rest = &rest[open..];
            let close = rest.find('>').unwrap();
            let tag = &rest[..=close];
            if tag.starts_with("<input ") {
                let name = attr(tag, "name");
                let kind = attr(tag, "type").unwrap_or_default();
                let checked = tag.contains(" checked");
                if let Some(name) = name
                    && (!matches!(kind.as_str(), "radio" | "checkbox") || checked)
                {
                    out.push((name, attr(tag, "value").unwrap_or_default()));
                }
            } else if tag.starts_with("<textarea ") {
                let end = rest.find("</textarea>").unwrap();
                out.push((attr(tag, "name").unwrap(), unescape(&rest[close + 1..end])));
            } else if tag.starts_with("<select ") {
                let end = rest.find("</select>").unwrap();
                let body = &rest[close + 1..end];
                let chosen = body
                    .split("<option ")
                    .skip(1)
                    .find(|o| o.contains(" selected"))
                    .or_else(|| body.split("<option ").nth(1))
                    .and_then(|o| attr(&[" ", o].concat(), "value"))
                    .unwrap_or_default();
                out.push((attr(tag, "name").unwrap(), chosen));
            }
            rest = &rest[close + 1..];
        }
        out
    }

    fn unescape(s: &str) -> String {
        s.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    #[test]
    fn the_rendered_form_posts_back_the_same_canvas() {
        // The first case of the round trip, through the page's markup and a browser's post.
        let (_, canonical) = accepted(&json!({"entry": {"type": "api_triggered"},
            "exit_criteria": {"exception_events": [{"custom_event": {"name": "upgraded"}}]},
            "conversion_events": [{"type": "custom_event", "name": "upgraded", "window_seconds": 259200}],
            "steps": [
            {"id": "mail", "name": "Hi \"you\" & <co>", "type": "message", "next": "split",
             "message": {"channel": "email", "from": "T <t@example.com>", "subject": "Hi", "body": "<p>x & y</p>"}},
            {"id": "split", "type": "decision_split", "filter": plan(), "yes": "acts", "no": null},
            {"id": "acts", "type": "action_paths", "window_seconds": 3600,
             "paths": [{"name": "Bought", "triggers": [{"purchase": {"product_id": "gold"}}], "next": null}]}]}));
        let f = CanvasEditor::from_json(&canonical).unwrap();
        let page = page_of(&f);
        let posted = CanvasEditor::from_form(&FormData(fields_of(&page)));
        assert_eq!(posted, f);
    }

    #[test]
    fn a_saved_segment_picked_beside_a_filter_becomes_its_membership() {
        let (_, canonical) = accepted(&json!({"entry": {"type": "api_triggered"}, "steps": [
            {"id": "split", "type": "decision_split", "filter": plan(), "yes": null, "no": null}]}));
        let f = CanvasEditor::from_json(&canonical).unwrap();
        let trials = Segment {
            id: "seg-trial".into(),
            name: "Trial <stuck>".into(),
            filter: json!({}),
            created_at: tideway_core::clock::Millis(0),
            updated_at: tideway_core::clock::Millis(0),
        };
        let page = fieldsets(
            &f,
            &Context {
                cohorts: &[],
                segments: std::slice::from_ref(&trials),
                error: None,
            },
        )
        .into_string();
        assert!(page.contains("Trial &lt;stuck&gt;"), "{page}");
        let fields = fields_of(&page);
        let filter_name = fields
            .iter()
            .map(|(k, _)| k.clone())
            .find(|k| k.ends_with("_filter") && k.starts_with('s'))
            .expect("the split's filter field");
        let picker = [filter_name.as_str(), "_segment"].concat();
        assert!(fields.iter().any(|(k, _)| *k == picker), "{fields:?}");
        let posted = |filter: &str| {
            let mut fields = fields.clone();
            for (k, v) in &mut fields {
                if *k == filter_name {
                    *v = filter.to_owned();
                }
                if *k == picker {
                    *v = "seg-trial".to_owned();
                }
            }
            let doc = CanvasEditor::from_form(&FormData(fields))
                .to_json()
                .unwrap();
            doc["steps"][0]["filter"].clone()
        };
        // The segment alone; with JSON beside it, both.
        assert_eq!(posted(""), json!({"in_segment": "seg-trial"}));
        assert_eq!(
            posted(PLAN),
            json!({"and": [{"in_segment": "seg-trial"}, plan()]})
        );
        // JSON that does not parse stays as written, for the refusal to name it.
        assert_eq!(with_segment("{oops", "seg-trial"), "{oops");
        assert_eq!(with_segment(PLAN, " "), PLAN);
    }
}
