//! Canvas: multi-step journeys, as the domain sees them — a definition (entry, audience,
//! re-entry, entry limit, exit criteria, conversion events, variants and a graph of steps)
//! parsed from the management API's JSON, and the pure rules that move one user's journey
//! through the graph ([`advance`]).
//!
//! As for campaigns ([`crate::campaigns`]), the management API's JSON is the stored form:
//! [`CanvasDefinition::parse`] checks it (graph rules included: every `next` names a step,
//! every step is reachable from a variant's first step, no cycles, percentages add up to 100,
//! Braze's limits) and returns the definition with its canonical JSON, which is what a Canvas
//! *version* stores. Errors name the place (`steps[2].next: …`).
//!
//! **Versions.** Every edit of a Canvas's definition makes a new version; a journey keeps
//! the version it entered with until it ends, so a user never finds a step removed or
//! rewired under them. New entries take the current version.
//!
//! **Journeys.** A user's journey ([`Journey`]) stands at one step. [`advance`] is called
//! when the journey's timer is due or when something it waits for happened (an event in
//! its inbox): it applies the inbox (conversions, exception events, Action Paths matches),
//! then walks instant steps (Message, Decision Split, Audience Paths, Experiment Paths,
//! User Update) until the journey waits (a Delay not yet due, an Action Paths window still
//! open) or ends. What happened on the way comes back as a list of [`StepEvent`]s that the
//! engine turns into Currents events, sends and attribute updates — all written with the
//! journey's new position in one transaction. Exit criteria (exception events at once; the
//! exit filter when a step ends, as Braze does) and conversions are applied here too.
//!
//! Pure: time (`now`), filter answers and the experiment bucket are parameters.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::campaigns::{
    Audience, ConversionEvent, ConversionKind, DefinitionError, Delivery, Occurrence, Saving,
    Trigger, Variant, bad, conversion_json, parse_audience, parse_conversion, parse_delivery,
    parse_trigger, parse_variant, refuse_nul, string_field, time_field,
};
use crate::clock::Millis;

/// Most steps of one Canvas (Braze: 200).
pub const MAX_STEPS: usize = 200;
/// Longest Delay: 30 days.
pub const MAX_DELAY_SECS: i64 = 30 * 86_400;
/// Longest Action Paths window: 31 days.
pub const MAX_ACTION_WINDOW_SECS: i64 = 31 * 86_400;
/// Most groups of an Audience Paths step (Braze: 8).
pub const MAX_AUDIENCE_PATHS: usize = 8;
/// Most paths of an Experiment Paths step (Braze: 4).
pub const MAX_EXPERIMENT_PATHS: usize = 4;
/// Most Canvas variants.
pub const MAX_VARIANTS: usize = 8;

/// A Canvas variant: a share of the entering users and the step they start at.
#[derive(Debug, Clone, PartialEq)]
pub struct CanvasVariant {
    pub id: String,
    pub name: String,
    pub percent: u8,
    pub first_step: String,
}

/// How long a Delay step holds a user.
#[derive(Debug, Clone, PartialEq)]
pub enum Delay {
    /// A fixed time after arriving.
    Duration { secs: i64 },
    /// Until a fixed moment; arriving after it exits the user (`past_delay`).
    Until { at: Millis },
    /// `days` days after arriving, at the next `minute_of_day` (UTC) from then.
    DaysAt { days: u32, minute_of_day: u16 },
}

impl Delay {
    /// When a user arriving at `arrived` is released; `None` when the moment is already
    /// past (`Until` in the past).
    pub fn due(&self, arrived: Millis) -> Option<Millis> {
        const DAY: i64 = 86_400_000;
        match self {
            Delay::Duration { secs } => Some(Millis(arrived.0 + secs * 1_000)),
            Delay::Until { at } => (at.0 >= arrived.0).then_some(*at),
            Delay::DaysAt {
                days,
                minute_of_day,
            } => {
                let base = arrived.0 + i64::from(*days) * DAY;
                let offset = i64::from(*minute_of_day) * 60_000;
                let day = (base - offset).div_euclid(DAY);
                let mut at = day * DAY + offset;
                if at < base {
                    at += DAY;
                }
                Some(Millis(at))
            }
        }
    }
}

/// One path of an Audience Paths step.
#[derive(Debug, Clone, PartialEq)]
pub struct AudiencePath {
    pub name: String,
    /// Index into [`CanvasDefinition::filters`].
    pub filter: usize,
    pub next: Option<String>,
}

/// One path of an Action Paths step.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionPath {
    pub name: String,
    pub triggers: Vec<Trigger>,
    pub next: Option<String>,
}

/// One path of an Experiment Paths step.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentPath {
    pub id: String,
    pub name: String,
    pub percent: u8,
    pub next: Option<String>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Sends one message (the campaign variant types; its `id` is the step's id).
    Message {
        message: Variant,
        next: Option<String>,
    },
    Delay {
        delay: Delay,
        next: Option<String>,
    },
    DecisionSplit {
        /// Index into [`CanvasDefinition::filters`].
        filter: usize,
        yes: Option<String>,
        no: Option<String>,
    },
    AudiencePaths {
        paths: Vec<AudiencePath>,
        everyone_else: Option<String>,
    },
    ActionPaths {
        window_secs: i64,
        paths: Vec<ActionPath>,
        everyone_else: Option<String>,
    },
    ExperimentPaths {
        paths: Vec<ExperimentPath>,
    },
    UserUpdate {
        /// Attributes to set (custom attribute names, or standard ones as `/users/track`
        /// names them).
        set: Map<String, Value>,
        /// Numeric attributes to increment by the amount, as given (an integer stays one, as
        /// `/users/track`'s `inc` keeps it).
        increment: Vec<(String, serde_json::Number)>,
        next: Option<String>,
    },
}

impl StepKind {
    /// Braze's step type name (`/canvas/details`).
    pub fn type_name(&self) -> &'static str {
        match self {
            StepKind::Message { .. } => "message",
            StepKind::Delay { .. } => "delay",
            StepKind::DecisionSplit { .. } => "decision_split",
            StepKind::AudiencePaths { .. } => "audience_paths",
            StepKind::ActionPaths { .. } => "action_paths",
            StepKind::ExperimentPaths { .. } => "experiment_paths",
            StepKind::UserUpdate { .. } => "user_update",
        }
    }

    /// Every step this one can lead to, with the path's name where it has one.
    pub fn next_paths(&self) -> Vec<(Option<&str>, &str)> {
        let mut out: Vec<(Option<&str>, &str)> = Vec::new();
        match self {
            StepKind::Message { next, .. }
            | StepKind::Delay { next, .. }
            | StepKind::UserUpdate { next, .. } => {
                if let Some(n) = next {
                    out.push((None, n));
                }
            }
            StepKind::DecisionSplit { yes, no, .. } => {
                if let Some(n) = yes {
                    out.push((Some("Yes"), n));
                }
                if let Some(n) = no {
                    out.push((Some("No"), n));
                }
            }
            StepKind::AudiencePaths {
                paths,
                everyone_else,
            } => {
                for p in paths {
                    if let Some(n) = &p.next {
                        out.push((Some(p.name.as_str()), n));
                    }
                }
                if let Some(n) = everyone_else {
                    out.push((Some("Everyone Else"), n));
                }
            }
            StepKind::ActionPaths {
                paths,
                everyone_else,
                ..
            } => {
                for p in paths {
                    if let Some(n) = &p.next {
                        out.push((Some(p.name.as_str()), n));
                    }
                }
                if let Some(n) = everyone_else {
                    out.push((Some("Everyone Else"), n));
                }
            }
            StepKind::ExperimentPaths { paths } => {
                for p in paths {
                    if let Some(n) = &p.next {
                        out.push((Some(p.name.as_str()), n));
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub name: String,
    pub kind: StepKind,
}

/// A parsed Canvas definition (one version).
#[derive(Debug, Clone, PartialEq)]
pub struct CanvasDefinition {
    /// How users enter: API-triggered, scheduled (the audience enters at each occurrence) or
    /// action-based (custom event, purchase, partner cohort entry, segment entry).
    pub entry: Delivery,
    /// Who may enter (checked once, at entry).
    pub audience: Audience,
    /// `None`: a user enters once. `Some(s)`: again `s` seconds after their last entry, once
    /// their previous journey has ended.
    pub reentry_after_secs: Option<i64>,
    /// Most entries of all users together (lifetime).
    pub entry_limit: Option<u64>,
    /// Performing one of these exits the user at once.
    pub exception_events: Vec<Trigger>,
    /// Matching this filter (index into [`CanvasDefinition::filters`]) exits the user when a
    /// step ends.
    pub exit_filter: Option<usize>,
    pub conversion_events: Vec<ConversionEvent>,
    pub variants: Vec<CanvasVariant>,
    pub control_percent: u8,
    pub steps: Vec<Step>,
    /// Every filter of the definition (segment-language JSON), referenced by index: the
    /// engine answers them all for a batch of users at once.
    pub filters: Vec<Value>,
    /// Whether the workspace's frequency caps apply to this Canvas's messages.
    pub obey_frequency_caps: bool,
}

/// The control group's variation id (its `canvas_variation_id` in Entry events).
pub const CONTROL_VARIANT_ID: &str = "control";

fn next_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<String>, DefinitionError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{path}.{key}"), "must be a step id or null")),
    }
}

fn percent_field(v: Option<&Value>, path: &str) -> Result<u8, DefinitionError> {
    v.and_then(Value::as_u64)
        .filter(|p| *p <= 100)
        .map(|p| p as u8)
        .ok_or_else(|| bad(path, "must be an integer from 0 to 100"))
}

fn filter_field(
    raw: Option<&Value>,
    path: &str,
    filters: &mut Vec<Value>,
) -> Result<usize, DefinitionError> {
    let raw = raw
        .filter(|v| !v.is_null())
        .ok_or_else(|| bad(path, "is required: a segment filter"))?;
    tideway_segment::Filter::from_json(raw).map_err(|e| bad(path, e.to_string()))?;
    filters.push(raw.clone());
    Ok(filters.len() - 1)
}

fn triggers_field(
    raw: Option<&Value>,
    path: &str,
    allow_entries: bool,
) -> Result<(Vec<Trigger>, Vec<Value>), DefinitionError> {
    let list = match raw {
        None | Some(Value::Null) => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(bad(path, "must be an array of triggers")),
    };
    let mut triggers = Vec::new();
    let mut json = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let (trigger, j) = parse_trigger(t, &p)?;
        if !allow_entries
            && matches!(
                trigger,
                Trigger::CohortEntry { .. } | Trigger::SegmentEntry { .. }
            )
        {
            return Err(bad(p, "must be a custom_event or purchase"));
        }
        triggers.push(trigger);
        json.push(j);
    }
    Ok((triggers, json))
}

impl CanvasDefinition {
    /// Checks the management API's JSON. `new_id` makes ids for steps, variants and paths
    /// that have none (the canonical JSON keeps them, so ids are stable across versions).
    pub fn parse(
        raw: &Value,
        new_id: impl FnMut() -> String,
    ) -> Result<(CanvasDefinition, Value), DefinitionError> {
        Self::parse_checked(raw, new_id, Saving::New)
    }

    fn parse_checked(
        raw: &Value,
        mut new_id: impl FnMut() -> String,
        saving: Saving,
    ) -> Result<(CanvasDefinition, Value), DefinitionError> {
        if saving == Saving::New {
            refuse_nul(raw, "")?;
        }
        let obj = raw
            .as_object()
            .ok_or_else(|| bad("$", "must be a JSON object"))?;
        let mut canonical = Map::new();
        let mut filters = Vec::new();

        let (entry, entry_json) =
            parse_delivery(obj.get("entry")).map_err(|e| DefinitionError {
                path: e.path.replacen("delivery", "entry", 1),
                message: e.message.replace("delivery", "entry"),
            })?;
        if let Delivery::ActionBased(a) = &entry
            && a.delay_secs > 0
        {
            return Err(bad(
                "entry.delay_seconds",
                "is not supported by a Canvas (use a Delay step)",
            ));
        }
        canonical.insert("entry".into(), entry_json);

        let audience = parse_audience(obj.get("audience"))?;
        canonical.insert(
            "audience".into(),
            json!({"segment_ids": audience.segment_ids, "filter": audience.filter}),
        );

        let reentry_after_secs = crate::campaigns::wait_after(
            obj.get("reentry"),
            "reentry",
            "must be null (enter once) or {\"after_seconds\": n}",
        )?;
        canonical.insert(
            "reentry".into(),
            reentry_after_secs.map_or(Value::Null, |s| json!({"after_seconds": s})),
        );

        let entry_limit = match obj.get("entry_limit") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("entry_limit", "must be a positive integer or null"))?,
            ),
        };
        canonical.insert("entry_limit".into(), json!(entry_limit));

        let (exception_events, exit_filter, exit_json) = match obj.get("exit_criteria") {
            None | Some(Value::Null) => (Vec::new(), None, Value::Null),
            Some(Value::Object(e)) => {
                let (triggers, tj) = triggers_field(
                    e.get("exception_events"),
                    "exit_criteria.exception_events",
                    false,
                )?;
                let filter = match e.get("filter") {
                    None | Some(Value::Null) => None,
                    Some(f) => Some(filter_field(Some(f), "exit_criteria.filter", &mut filters)?),
                };
                (
                    triggers,
                    filter,
                    json!({"exception_events": tj, "filter": e.get("filter").cloned().unwrap_or(Value::Null)}),
                )
            }
            Some(_) => return Err(bad("exit_criteria", "must be an object")),
        };
        canonical.insert("exit_criteria".into(), exit_json);

        let conversion_events = match obj.get("conversion_events") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => {
                if list.len() > crate::campaigns::MAX_CONVERSION_EVENTS {
                    return Err(bad(
                        "conversion_events",
                        "at most 4 conversion events are allowed",
                    ));
                }
                let parsed = list
                    .iter()
                    .enumerate()
                    .map(|(i, c)| parse_conversion(c, &format!("conversion_events[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                // A Canvas counts conversions from the log's custom events and purchases; email
                // opens and clicks are counted for campaigns only, so saying them here would
                // save a conversion that never counts.
                if saving == Saving::New
                    && let Some(i) = parsed.iter().position(|c| {
                        matches!(
                            c.kind,
                            ConversionKind::OpensEmail | ConversionKind::ClicksEmail
                        )
                    })
                {
                    return Err(bad(
                        format!("conversion_events[{i}].type"),
                        "a Canvas counts custom_event and purchase conversions; opens_email and clicks_email are counted for campaigns only",
                    ));
                }
                parsed
            }
            Some(_) => return Err(bad("conversion_events", "must be an array")),
        };
        canonical.insert(
            "conversion_events".into(),
            Value::Array(conversion_events.iter().map(conversion_json).collect()),
        );

        let obey_frequency_caps = match obj.get("frequency_capping") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("frequency_capping", "must be a boolean")),
        };
        canonical.insert("frequency_capping".into(), json!(obey_frequency_caps));

        // Steps.
        let steps_raw = obj
            .get("steps")
            .and_then(Value::as_array)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("steps", "is required: a non-empty array of steps"))?;
        if steps_raw.len() > MAX_STEPS {
            return Err(bad(
                "steps",
                format!("at most {MAX_STEPS} steps are allowed"),
            ));
        }
        let mut steps = Vec::with_capacity(steps_raw.len());
        let mut steps_json = Vec::with_capacity(steps_raw.len());
        for (i, s) in steps_raw.iter().enumerate() {
            let path = format!("steps[{i}]");
            let (step, json) = parse_step(s, &path, &mut new_id, &mut filters, saving)?;
            if steps.iter().any(|x: &Step| x.id == step.id) {
                return Err(bad(
                    format!("{path}.id"),
                    format!("duplicate step id {:?}", step.id),
                ));
            }
            steps.push(step);
            steps_json.push(json);
        }

        // Variants (default: one variant starting at `first_step`, else the first step).
        let control_percent = match obj.get("control_percent") {
            None | Some(Value::Null) => 0,
            v => percent_field(v, "control_percent")?,
        };
        let mut variants = Vec::new();
        match obj.get("variants") {
            None | Some(Value::Null) => {
                let first = match obj.get("first_step") {
                    None | Some(Value::Null) => steps[0].id.clone(),
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => return Err(bad("first_step", "must be a step id")),
                };
                variants.push(CanvasVariant {
                    id: "variant-1".into(),
                    name: "Variant 1".into(),
                    percent: 100 - control_percent,
                    first_step: first,
                });
            }
            Some(Value::Array(list)) if !list.is_empty() && list.len() <= MAX_VARIANTS => {
                for (i, v) in list.iter().enumerate() {
                    let p = format!("variants[{i}]");
                    let o = v.as_object().ok_or_else(|| bad(&p, "must be an object"))?;
                    let id = crate::campaigns::id_field(o, &p, &mut new_id)?;
                    if id == CONTROL_VARIANT_ID
                        || variants.iter().any(|x: &CanvasVariant| x.id == id)
                    {
                        return Err(bad(format!("{p}.id"), "duplicate or reserved variant id"));
                    }
                    let name = string_field(o, "name", &p, false)?
                        .unwrap_or_else(|| format!("Variant {}", i + 1));
                    let percent = percent_field(o.get("percent"), &format!("{p}.percent"))?;
                    let first_step = string_field(o, "first_step", &p, true)?.unwrap_or_default();
                    variants.push(CanvasVariant {
                        id,
                        name,
                        percent,
                        first_step,
                    });
                }
            }
            Some(_) => {
                return Err(bad(
                    "variants",
                    format!("must be an array of 1 to {MAX_VARIANTS} variants"),
                ));
            }
        }
        let total: u32 =
            variants.iter().map(|v| u32::from(v.percent)).sum::<u32>() + u32::from(control_percent);
        if total != 100 {
            return Err(bad(
                "variants",
                format!(
                    "variant percents plus control_percent must add up to 100 (they add up to {total})"
                ),
            ));
        }
        canonical.insert("control_percent".into(), json!(control_percent));
        canonical.insert(
            "variants".into(),
            Value::Array(
                variants
                    .iter()
                    .map(|v| json!({"id": v.id, "name": v.name, "percent": v.percent, "first_step": v.first_step}))
                    .collect(),
            ),
        );
        canonical.insert("steps".into(), Value::Array(steps_json));

        let definition = CanvasDefinition {
            entry,
            audience,
            reentry_after_secs,
            entry_limit,
            exception_events,
            exit_filter,
            conversion_events,
            variants,
            control_percent,
            steps,
            filters,
            obey_frequency_caps,
        };
        definition.check_graph()?;
        Ok((definition, Value::Object(canonical)))
    }

    /// Parses a stored (canonical) definition.
    pub fn load(stored: &Value) -> Result<CanvasDefinition, DefinitionError> {
        Self::parse_checked(stored, || String::from("missing-id"), Saving::Stored).map(|(d, _)| d)
    }

    /// Every `next` names a step, every step is reachable from a variant's first step, and
    /// there is no cycle (a journey always ends).
    fn check_graph(&self) -> Result<(), DefinitionError> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        for (i, v) in self.variants.iter().enumerate() {
            if !index.contains_key(v.first_step.as_str()) {
                return Err(bad(
                    format!("variants[{i}].first_step"),
                    format!("names no step: {:?}", v.first_step),
                ));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            for (_, n) in s.kind.next_paths() {
                if !index.contains_key(n) {
                    return Err(bad(
                        format!("steps[{i}]"),
                        format!("leads to {n:?}, which is no step"),
                    ));
                }
            }
        }
        // Depth-first search from every first step: 0 unseen, 1 on the stack, 2 done.
        let mut state = vec![0u8; self.steps.len()];
        for v in &self.variants {
            let start = index[v.first_step.as_str()];
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            if state[start] == 0 {
                state[start] = 1;
            } else {
                continue;
            }
            while let Some((node, child)) = stack.pop() {
                let nexts = self.steps[node].kind.next_paths();
                if child < nexts.len() {
                    stack.push((node, child + 1));
                    let n = index[nexts[child].1];
                    match state[n] {
                        0 => {
                            state[n] = 1;
                            stack.push((n, 0));
                        }
                        1 => {
                            return Err(bad(
                                format!("steps[{n}]"),
                                format!(
                                    "is part of a cycle (step {:?} leads back to it): a journey must end",
                                    self.steps[node].id
                                ),
                            ));
                        }
                        _ => {}
                    }
                } else {
                    state[node] = 2;
                }
            }
        }
        if let Some(i) = state.iter().position(|s| *s == 0) {
            return Err(bad(
                format!("steps[{i}]"),
                format!(
                    "step {:?} is not reachable from any variant's first step",
                    self.steps[i].id
                ),
            ));
        }
        Ok(())
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    pub fn variant(&self, id: &str) -> Option<&CanvasVariant> {
        self.variants.iter().find(|v| v.id == id)
    }

    /// Sticky variant assignment (or `None`: the control group), by the user's bucket.
    pub fn assign(&self, canvas_id: &str, user_key: &str) -> Option<&CanvasVariant> {
        let b = crate::campaigns::bucket(canvas_id, user_key);
        let mut upto = 0u32;
        for v in &self.variants {
            upto += u32::from(v.percent);
            if b < upto {
                return Some(v);
            }
        }
        None
    }

    /// Whether an event may matter to a journey of this definition (exception events, Action
    /// Paths, conversions): only those are put in journeys' inboxes.
    pub fn listens_to(&self, occurrence: &Occurrence<'_>) -> bool {
        self.exception_events.iter().any(|t| t.matches(occurrence))
            || self.conversion_events.iter().any(|c| c.matches(occurrence))
            || self.steps.iter().any(|s| match &s.kind {
                StepKind::ActionPaths { paths, .. } => paths
                    .iter()
                    .any(|p| p.triggers.iter().any(|t| t.matches(occurrence))),
                _ => false,
            })
    }

    /// Every Liquid template of the message steps, with its path (checked on save).
    pub fn templates(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            if let StepKind::Message { message, .. } = &s.kind {
                let single =
                    crate::campaigns::templates_of(message, &format!("steps[{i}].message"));
                out.extend(single);
            }
        }
        out
    }

    /// Channels of the message steps, each once.
    pub fn channels(&self) -> Vec<crate::campaigns::Channel> {
        let mut out = Vec::new();
        for s in &self.steps {
            if let StepKind::Message { message, .. } = &s.kind {
                let c = message.message.channel();
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// Checks a User Update step's `set` as `/users/track` will when the step runs (about the
/// journey's user, by braze id): a value it would refuse is refused now, on save, rather than
/// dropping the whole update when a journey reaches the step. Keys that name a user are
/// refused: the step changes the user on the journey.
fn check_user_update_set(set: &Map<String, Value>, path: &str) -> Result<(), DefinitionError> {
    for key in ["external_id", "braze_id", "user_alias", "device_id"] {
        if set.contains_key(key) {
            return Err(bad(
                format!("{path}.{key}"),
                "names a user; a user_update step changes the user on the journey",
            ));
        }
    }
    let mut probe = set.clone();
    probe.insert("braze_id".into(), json!("000000000000000000000000"));
    crate::track::parse_attribute_object(&Value::Object(probe))
        .map(|_| ())
        .map_err(|message| bad(path, message))
}

fn parse_step(
    raw: &Value,
    path: &str,
    new_id: &mut impl FnMut() -> String,
    filters: &mut Vec<Value>,
    saving: Saving,
) -> Result<(Step, Value), DefinitionError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| bad(path, "must be an object"))?;
    let id = crate::campaigns::id_field(obj, path, new_id)?;
    let name = string_field(obj, "name", path, false)?.unwrap_or_else(|| id.clone());
    let ty = string_field(obj, "type", path, true)?.unwrap_or_default();
    let mut json = json!({"id": id, "name": name, "type": ty});
    let kind = match ty.as_str() {
        "message" => {
            let m = obj
                .get("message")
                .ok_or_else(|| bad(format!("{path}.message"), "is required"))?;
            let mut m = m.clone();
            if let Some(o) = m.as_object_mut() {
                o.insert("id".into(), json!(id));
                o.insert("name".into(), json!(name));
                o.insert("percent".into(), json!(100));
            }
            let (variant, vj) = parse_variant(&m, &format!("{path}.message"), new_id, saving)?;
            let next = next_field(obj, "next", path)?;
            json["message"] = vj;
            json["next"] = json!(next);
            StepKind::Message {
                message: variant,
                next,
            }
        }
        "delay" => {
            let d = obj
                .get("delay")
                .and_then(Value::as_object)
                .ok_or_else(|| bad(format!("{path}.delay"), "is required: {\"seconds\": n}, {\"until\": time} or {\"days\": n, \"at\": \"HH:MM\"}"))?;
            let p = format!("{path}.delay");
            let delay = if let Some(secs) = d.get("seconds") {
                let secs = secs
                    .as_i64()
                    .filter(|s| (0..=MAX_DELAY_SECS).contains(s))
                    .ok_or_else(|| bad(format!("{p}.seconds"), "must be 0 to 2592000 (30 days)"))?;
                Delay::Duration { secs }
            } else if d.contains_key("until") {
                let at = time_field(d, "until", &p)?
                    .ok_or_else(|| bad(format!("{p}.until"), "is required"))?;
                Delay::Until { at }
            } else if let Some(days) = d.get("days") {
                let days = days
                    .as_u64()
                    .filter(|n| *n <= 30)
                    .ok_or_else(|| bad(format!("{p}.days"), "must be 0 to 30"))?
                    as u32;
                let minute_of_day =
                    crate::campaigns::minute_of_day(d.get("at"), &format!("{p}.at"))?;
                Delay::DaysAt {
                    days,
                    minute_of_day,
                }
            } else {
                return Err(bad(p, "must hold seconds, until or days"));
            };
            json["delay"] = match &delay {
                Delay::Duration { secs } => json!({"seconds": secs}),
                Delay::Until { at } => json!({"until": at.to_iso()}),
                Delay::DaysAt {
                    days,
                    minute_of_day,
                } => {
                    json!({"days": days, "at": format!("{:02}:{:02}", minute_of_day / 60, minute_of_day % 60)})
                }
            };
            let next = next_field(obj, "next", path)?;
            json["next"] = json!(next);
            StepKind::Delay { delay, next }
        }
        "decision_split" => {
            let filter = filter_field(obj.get("filter"), &format!("{path}.filter"), filters)?;
            let yes = next_field(obj, "yes", path)?;
            let no = next_field(obj, "no", path)?;
            json["filter"] = filters[filter].clone();
            json["yes"] = json!(yes);
            json["no"] = json!(no);
            StepKind::DecisionSplit { filter, yes, no }
        }
        "audience_paths" => {
            let list = obj
                .get("paths")
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty() && l.len() <= MAX_AUDIENCE_PATHS)
                .ok_or_else(|| {
                    bad(
                        format!("{path}.paths"),
                        format!("must hold 1 to {MAX_AUDIENCE_PATHS} paths"),
                    )
                })?;
            let mut paths = Vec::new();
            let mut pj = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let pp = format!("{path}.paths[{i}]");
                let o = p.as_object().ok_or_else(|| bad(&pp, "must be an object"))?;
                let name = string_field(o, "name", &pp, false)?
                    .unwrap_or_else(|| format!("Group {}", i + 1));
                let filter = filter_field(o.get("filter"), &format!("{pp}.filter"), filters)?;
                let next = next_field(o, "next", &pp)?;
                pj.push(json!({"name": name, "filter": filters[filter], "next": next}));
                paths.push(AudiencePath { name, filter, next });
            }
            let everyone_else = next_field(obj, "everyone_else", path)?;
            json["paths"] = Value::Array(pj);
            json["everyone_else"] = json!(everyone_else);
            StepKind::AudiencePaths {
                paths,
                everyone_else,
            }
        }
        "action_paths" => {
            let window_secs = obj
                .get("window_seconds")
                .and_then(Value::as_i64)
                .filter(|w| (1..=MAX_ACTION_WINDOW_SECS).contains(w))
                .ok_or_else(|| {
                    bad(
                        format!("{path}.window_seconds"),
                        "must be 1 to 2678400 (31 days)",
                    )
                })?;
            let list = obj
                .get("paths")
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty() && l.len() <= MAX_AUDIENCE_PATHS)
                .ok_or_else(|| {
                    bad(
                        format!("{path}.paths"),
                        format!("must hold 1 to {MAX_AUDIENCE_PATHS} paths"),
                    )
                })?;
            let mut paths = Vec::new();
            let mut pj = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let pp = format!("{path}.paths[{i}]");
                let o = p.as_object().ok_or_else(|| bad(&pp, "must be an object"))?;
                let name = string_field(o, "name", &pp, false)?
                    .unwrap_or_else(|| format!("Path {}", i + 1));
                let (triggers, tj) =
                    triggers_field(o.get("triggers"), &format!("{pp}.triggers"), false)?;
                if triggers.is_empty() {
                    return Err(bad(
                        format!("{pp}.triggers"),
                        "is required: at least one trigger",
                    ));
                }
                let next = next_field(o, "next", &pp)?;
                pj.push(json!({"name": name, "triggers": tj, "next": next}));
                paths.push(ActionPath {
                    name,
                    triggers,
                    next,
                });
            }
            let everyone_else = next_field(obj, "everyone_else", path)?;
            json["window_seconds"] = json!(window_secs);
            json["paths"] = Value::Array(pj);
            json["everyone_else"] = json!(everyone_else);
            StepKind::ActionPaths {
                window_secs,
                paths,
                everyone_else,
            }
        }
        "experiment_paths" => {
            let list = obj
                .get("paths")
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty() && l.len() <= MAX_EXPERIMENT_PATHS)
                .ok_or_else(|| {
                    bad(
                        format!("{path}.paths"),
                        format!("must hold 1 to {MAX_EXPERIMENT_PATHS} paths"),
                    )
                })?;
            let mut paths: Vec<ExperimentPath> = Vec::new();
            let mut pj = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let pp = format!("{path}.paths[{i}]");
                let o = p.as_object().ok_or_else(|| bad(&pp, "must be an object"))?;
                let pid = crate::campaigns::id_field(o, &pp, new_id)?;
                if paths.iter().any(|x| x.id == pid) {
                    return Err(bad(format!("{pp}.id"), "duplicate path id"));
                }
                let name = string_field(o, "name", &pp, false)?
                    .unwrap_or_else(|| format!("Path {}", i + 1));
                let percent = percent_field(o.get("percent"), &format!("{pp}.percent"))?;
                let next = next_field(o, "next", &pp)?;
                pj.push(json!({"id": pid, "name": name, "percent": percent, "next": next}));
                paths.push(ExperimentPath {
                    id: pid,
                    name,
                    percent,
                    next,
                });
            }
            let total: u32 = paths.iter().map(|p| u32::from(p.percent)).sum();
            if total != 100 {
                return Err(bad(
                    format!("{path}.paths"),
                    format!("percents must add up to 100 (they add up to {total})"),
                ));
            }
            json["paths"] = Value::Array(pj);
            StepKind::ExperimentPaths { paths }
        }
        "user_update" => {
            let set = match obj.get("set") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => {
                    return Err(bad(
                        format!("{path}.set"),
                        "must be an object of attributes",
                    ));
                }
            };
            let increment = match obj.get("increment") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| match v {
                        Value::Number(n) => Ok((k.clone(), n.clone())),
                        _ => Err(bad(format!("{path}.increment.{k}"), "must be a number")),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(bad(
                        format!("{path}.increment"),
                        "must be an object of numbers",
                    ));
                }
            };
            if set.is_empty() && increment.is_empty() {
                return Err(bad(path, "a user_update step needs set or increment"));
            }
            if saving == Saving::New {
                check_user_update_set(&set, &format!("{path}.set"))?;
            }
            let next = next_field(obj, "next", path)?;
            json["set"] = Value::Object(set.clone());
            json["increment"] = Value::Object(
                increment
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            );
            json["next"] = json!(next);
            StepKind::UserUpdate {
                set,
                increment,
                next,
            }
        }
        other => {
            return Err(bad(
                format!("{path}.type"),
                format!(
                    "unknown step type {other:?} (message, delay, decision_split, audience_paths, action_paths, experiment_paths or user_update)"
                ),
            ));
        }
    };
    Ok((Step { id, name, kind }, json))
}

// ---- journeys --------------------------------------------------------------------------------

/// Where one user's journey stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Journey {
    /// `canvas_entry_id`: one per entry.
    pub entry_id: String,
    pub version: u32,
    pub variant_id: String,
    pub step_id: String,
    /// When the user entered the Canvas.
    pub entered_at: Millis,
    /// When the user arrived at the current step.
    pub step_at: Millis,
    /// The step's own timer (a Delay's end, an Action Paths window's end).
    pub due_at: Millis,
    /// Conversion events already counted (bit `i` for conversion event `i`).
    pub converted: u8,
    /// `canvas_entry_properties` / `context` (JSON object text).
    pub entry_properties: Option<String>,
    /// The properties of the event that chose the last Action Paths path (JSON object text),
    /// for the next Message step.
    pub event_properties: Option<String>,
}

/// Something that happened to a user in a journey, read from the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Happening {
    pub at: Millis,
    pub kind: HappeningKind,
    /// The event's properties (JSON object).
    pub properties: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HappeningKind {
    CustomEvent { name: String },
    Purchase { product_id: String },
}

impl Happening {
    pub fn occurrence(&self) -> Occurrence<'_> {
        match &self.kind {
            HappeningKind::CustomEvent { name } => Occurrence::CustomEvent {
                name,
                properties: &self.properties,
            },
            HappeningKind::Purchase { product_id } => Occurrence::Purchase { product_id },
        }
    }
}

/// Why a journey ended (`exit_reason` of the last Progression).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// An exception event was performed.
    ExceptionEvent,
    /// The exit filter matched when a step ended.
    MatchedAudience,
    /// A Delay until a moment already past.
    PastDelay,
    /// A step with no next step.
    EndOfPath,
    /// The step the journey stood at no longer exists (a damaged version).
    MissingStep,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::ExceptionEvent => "exception_event",
            ExitReason::MatchedAudience => "matched_audience",
            ExitReason::PastDelay => "past_delay",
            ExitReason::EndOfPath => "end_of_path",
            ExitReason::MissingStep => "missing_step",
        }
    }
}

/// What happened on the way, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    /// The user moved from `from` to `to` at `at`.
    Progressed { from: String, to: String },
    /// The user was assigned `path` of the Experiment Paths step `step`.
    SplitEntry {
        step: String,
        path: String,
        path_name: String,
    },
    /// The Message step `step` sends its message (with `event_properties`, if any).
    Send {
        step: String,
        event_properties: Option<String>,
    },
    /// The User Update step `step` applies its update.
    UserUpdate { step: String },
    /// Conversion event `index` happened at `at`.
    Conversion { index: u8, at: Millis, step: String },
    /// The journey ended at step `step`.
    Exited { step: String, reason: ExitReason },
}

/// The answers [`advance`] needs from outside.
pub trait Facts {
    /// Whether the user matches filter `index` of the definition now.
    fn matches(&self, filter: usize) -> bool;
    /// The user's bucket 0..100 for an Experiment Paths step (sticky per user and step).
    fn bucket(&self, step_id: &str) -> u32;
}

/// The sticky experiment bucket of a user for a step: SHA-256 of (canvas, step, user).
pub fn experiment_bucket(canvas_id: &str, step_id: &str, user_key: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(canvas_id.as_bytes())
        .chain_update([0])
        .chain_update(step_id.as_bytes())
        .chain_update([0])
        .chain_update(user_key.as_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 100
}

/// The result of [`advance`]: what happened, and the journey after it (`None`: it ended).
#[derive(Debug, Clone, PartialEq)]
pub struct Advanced {
    pub events: Vec<StepEvent>,
    pub journey: Option<Journey>,
}

/// A journey at its first step, as it enters at `now` (the first step is not run yet: call
/// [`advance`] with the result, whose `due_at` is `now`).
pub fn start(
    variant: &CanvasVariant,
    entry_id: String,
    version: u32,
    now: Millis,
    entry_properties: Option<String>,
) -> Journey {
    Journey {
        entry_id,
        version,
        variant_id: variant.id.clone(),
        step_id: variant.first_step.clone(),
        entered_at: now,
        step_at: now,
        due_at: now,
        converted: 0,
        entry_properties,
        event_properties: None,
    }
}

/// The conversion events (their indexes) that `h` counts as for an entry at `entered_at`
/// that has counted `converted` (bit `i` for event `i`): once per conversion event and
/// entry, within each event's window counted from the entry — whether the user is still in
/// the journey or has left it (Braze's rule).
pub fn conversions(
    def: &CanvasDefinition,
    entered_at: Millis,
    converted: u8,
    h: &Happening,
) -> Vec<u8> {
    let occurrence = h.occurrence();
    let mut out = Vec::new();
    for (i, c) in def.conversion_events.iter().enumerate().take(8) {
        if converted & (1u8 << i) == 0
            && h.at.0 >= entered_at.0 - entered_at.0.rem_euclid(1_000)
            && h.at.0 <= entered_at.0 + c.window_secs * 1_000
            && !matches!(
                c.kind,
                ConversionKind::OpensEmail | ConversionKind::ClicksEmail
            )
            && c.matches(&occurrence)
        {
            out.push(i as u8);
        }
    }
    out
}

/// When the last conversion window of an entry at `entered_at` closes (`None`: the
/// definition has no conversion event a log event can count as).
pub fn conversions_close(def: &CanvasDefinition, entered_at: Millis) -> Option<Millis> {
    def.conversion_events
        .iter()
        .take(8)
        .filter(|c| {
            !matches!(
                c.kind,
                ConversionKind::OpensEmail | ConversionKind::ClicksEmail
            )
        })
        .map(|c| Millis(entered_at.0 + c.window_secs * 1_000))
        .max()
}

/// Runs the journey's step at `now` and walks on through instant steps: a step that waits
/// (a Delay or an Action Paths window) returns the journey waiting there unless its timer,
/// counted from the arrival (`step_at`), has run out — then the step ends (a Delay goes to its
/// next step, Action Paths to "everyone else") and the walk goes on.
fn run_arrival(
    def: &CanvasDefinition,
    mut j: Journey,
    now: Millis,
    facts: &dyn Facts,
    out: &mut Vec<StepEvent>,
) -> Option<Journey> {
    // At most one visit per step: the graph has no cycles.
    for _ in 0..=def.steps.len() {
        let Some(step) = def.step(&j.step_id) else {
            out.push(StepEvent::Exited {
                step: j.step_id.clone(),
                reason: ExitReason::MissingStep,
            });
            return None;
        };
        let next: Option<&Option<String>> = match &step.kind {
            StepKind::Message { next, .. } => {
                out.push(StepEvent::Send {
                    step: step.id.clone(),
                    event_properties: j.event_properties.take(),
                });
                Some(next)
            }
            StepKind::UserUpdate { next, .. } => {
                out.push(StepEvent::UserUpdate {
                    step: step.id.clone(),
                });
                Some(next)
            }
            StepKind::Delay { delay, next } => match delay.due(j.step_at) {
                None => {
                    out.push(StepEvent::Exited {
                        step: step.id.clone(),
                        reason: ExitReason::PastDelay,
                    });
                    return None;
                }
                Some(due) if due.0 > now.0 => {
                    j.due_at = due;
                    return Some(j);
                }
                Some(_) => Some(next),
            },
            StepKind::ActionPaths { window_secs, .. } => {
                let due = Millis(j.step_at.0 + window_secs * 1_000);
                if due.0 > now.0 {
                    j.due_at = due;
                    return Some(j);
                }
                match &step.kind {
                    StepKind::ActionPaths { everyone_else, .. } => Some(everyone_else),
                    _ => None,
                }
            }
            StepKind::DecisionSplit { filter, yes, no } => {
                Some(if facts.matches(*filter) { yes } else { no })
            }
            StepKind::AudiencePaths {
                paths,
                everyone_else,
            } => Some(
                paths
                    .iter()
                    .find(|p| facts.matches(p.filter))
                    .map_or(everyone_else, |p| &p.next),
            ),
            StepKind::ExperimentPaths { paths } => {
                let b = facts.bucket(&step.id);
                let mut upto = 0u32;
                let chosen = paths
                    .iter()
                    .find(|p| {
                        upto += u32::from(p.percent);
                        b < upto
                    })
                    .unwrap_or(&paths[paths.len() - 1]);
                out.push(StepEvent::SplitEntry {
                    step: step.id.clone(),
                    path: chosen.id.clone(),
                    path_name: chosen.name.clone(),
                });
                Some(&chosen.next)
            }
        };
        j = finish_step(def, j, next.and_then(Option::as_ref), now, facts, out)?;
    }
    out.push(StepEvent::Exited {
        step: j.step_id.clone(),
        reason: ExitReason::EndOfPath,
    });
    None
}

/// The current step ends: the exit filter is checked, then the journey moves to `next` (or
/// ends at the end of its path).
fn finish_step(
    def: &CanvasDefinition,
    mut j: Journey,
    next: Option<&String>,
    now: Millis,
    facts: &dyn Facts,
    out: &mut Vec<StepEvent>,
) -> Option<Journey> {
    if def.exit_filter.is_some_and(|f| facts.matches(f)) {
        out.push(StepEvent::Exited {
            step: j.step_id.clone(),
            reason: ExitReason::MatchedAudience,
        });
        return None;
    }
    let Some(next) = next else {
        out.push(StepEvent::Exited {
            step: j.step_id.clone(),
            reason: ExitReason::EndOfPath,
        });
        return None;
    };
    out.push(StepEvent::Progressed {
        from: j.step_id.clone(),
        to: next.clone(),
    });
    j.step_id = next.clone();
    j.step_at = now;
    j.due_at = now;
    Some(j)
}

/// Moves a journey on at `now`: applies its inbox (in order), then runs its step if it is
/// due (or just arrived). See the module docs.
pub fn advance(
    def: &CanvasDefinition,
    journey: Journey,
    now: Millis,
    inbox: &[Happening],
    facts: &dyn Facts,
) -> Advanced {
    let mut events = Vec::new();
    let mut j = journey;
    let mut taken_by_action = false;
    for h in inbox {
        let occurrence = h.occurrence();
        for i in conversions(def, j.entered_at, j.converted, h) {
            j.converted |= 1u8 << i;
            events.push(StepEvent::Conversion {
                index: i,
                at: h.at,
                step: j.step_id.clone(),
            });
        }
        if def.exception_events.iter().any(|t| t.matches(&occurrence)) {
            events.push(StepEvent::Exited {
                step: j.step_id.clone(),
                reason: ExitReason::ExceptionEvent,
            });
            return Advanced {
                events,
                journey: None,
            };
        }
        // Action Paths: the first matching event within the window picks the path.
        if taken_by_action {
            continue;
        }
        let Some(step) = def.step(&j.step_id) else {
            continue;
        };
        if let StepKind::ActionPaths {
            window_secs, paths, ..
        } = &step.kind
        {
            let opened = j.step_at.0 - j.step_at.0.rem_euclid(1_000);
            let closes = j.step_at.0 + window_secs * 1_000;
            if h.at.0 < opened || h.at.0 > closes {
                continue;
            }
            if let Some(p) = paths
                .iter()
                .find(|p| p.triggers.iter().any(|t| t.matches(&occurrence)))
            {
                taken_by_action = true;
                let next = p.next.clone();
                j.event_properties = Some(Value::Object(h.properties.clone()).to_string());
                match finish_step(def, j, next.as_ref(), now, facts, &mut events) {
                    Some(next) => j = next,
                    None => {
                        return Advanced {
                            events,
                            journey: None,
                        };
                    }
                }
            }
        }
    }
    if j.due_at.0 > now.0 {
        // Woken by its inbox only: the step's timer has not run out.
        return Advanced {
            events,
            journey: Some(j),
        };
    }
    let journey = run_arrival(def, j, now, facts, &mut events);
    Advanced { events, journey }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaigns::MAX_REELIGIBILITY_SECS;

    struct Answers {
        yes: Vec<usize>,
        bucket: u32,
    }

    impl Facts for Answers {
        fn matches(&self, filter: usize) -> bool {
            self.yes.contains(&filter)
        }
        fn bucket(&self, _step: &str) -> u32 {
            self.bucket
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn trial() -> Value {
        json!({
            "entry": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "7"}}]},
            "exit_criteria": {"exception_events": [{"custom_event": {"name": "upgraded"}}]},
            "conversion_events": [{"type": "custom_event", "name": "upgraded"}],
            "steps": [
                {"id": "remind", "type": "message", "message": {"channel": "email", "from": "T <t@example.com>", "subject": "Hi", "body": "x"}, "next": "wait"},
                {"id": "wait", "type": "delay", "delay": {"seconds": 259200}, "next": "plan"},
                {"id": "plan", "type": "decision_split", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}, "yes": "hook", "no": "mail"},
                {"id": "hook", "type": "message", "message": {"channel": "webhook", "url": "http://127.0.0.1:1/h", "body": "{}"}},
                {"id": "mail", "type": "message", "message": {"channel": "email", "from": "T <t@example.com>", "subject": "Again", "body": "y"}}
            ]
        })
    }

    /// A NUL anywhere in a Canvas (an event it scans the log for, an id, a key) is refused
    /// on save with where it is; one saved before the check still loads.
    #[test]
    fn a_nul_anywhere_in_a_canvas_is_refused_on_save_only() {
        let mut c = trial();
        c["exit_criteria"]["exception_events"][0]["custom_event"]["name"] = json!("q\u{0}");
        let e = CanvasDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (
                "exit_criteria.exception_events[0].custom_event.name",
                "must not contain a NUL character (\\u0000)"
            )
        );
        assert!(CanvasDefinition::load(&c).is_ok());
        let mut c = trial();
        c["steps"][1]["id"] = json!("w\u{0}");
        assert_eq!(
            CanvasDefinition::parse(&c, ids()).unwrap_err().path,
            "steps[1].id"
        );
        let mut c = trial();
        c["steps"][0]["message"]["x\u{0}"] = json!(1);
        assert_eq!(
            CanvasDefinition::parse(&c, ids()).unwrap_err().path,
            "steps[0].message.x\u{0}"
        );
    }

    #[test]
    fn the_trial_journey_runs_step_by_step() {
        let (def, canonical) = CanvasDefinition::parse(&trial(), ids()).unwrap();
        assert_eq!(CanvasDefinition::load(&canonical).unwrap(), def);
        let j = start(&def.variants[0], "e1".into(), 1, Millis(1_000), None);
        let facts = Answers {
            yes: vec![],
            bucket: 0,
        };
        let a = advance(&def, j, Millis(1_000), &[], &facts);
        assert_eq!(
            a.events,
            vec![
                StepEvent::Send {
                    step: "remind".into(),
                    event_properties: None
                },
                StepEvent::Progressed {
                    from: "remind".into(),
                    to: "wait".into()
                },
            ]
        );
        let j = a.journey.unwrap();
        assert_eq!(j.due_at, Millis(1_000 + 259_200_000));
        // Not due yet: nothing happens.
        let again = advance(&def, j.clone(), Millis(2_000), &[], &facts);
        assert!(again.events.is_empty());
        // Due: the split sends non-Pro users to the email.
        let a = advance(&def, j.clone(), j.due_at, &[], &facts);
        assert_eq!(a.journey, None);
        assert!(a.events.contains(&StepEvent::Send {
            step: "mail".into(),
            event_properties: None
        }));
        assert_eq!(
            a.events.last(),
            Some(&StepEvent::Exited {
                step: "mail".into(),
                reason: ExitReason::EndOfPath
            })
        );
        let pro = Answers {
            yes: vec![0],
            bucket: 0,
        };
        let a = advance(&def, j.clone(), j.due_at, &[], &pro);
        assert!(a.events.contains(&StepEvent::Send {
            step: "hook".into(),
            event_properties: None
        }));
        // The exception event exits at once, after counting the conversion.
        let upgraded = Happening {
            at: Millis(5_000),
            kind: HappeningKind::CustomEvent {
                name: "upgraded".into(),
            },
            properties: Map::new(),
        };
        let a = advance(&def, j, Millis(5_000), &[upgraded], &facts);
        assert_eq!(a.journey, None);
        assert_eq!(
            a.events,
            vec![
                StepEvent::Conversion {
                    index: 0,
                    at: Millis(5_000),
                    step: "wait".into()
                },
                StepEvent::Exited {
                    step: "wait".into(),
                    reason: ExitReason::ExceptionEvent
                },
            ]
        );
    }

    #[test]
    fn graph_errors_name_the_step() {
        let mut bad_next = trial();
        bad_next["steps"][1]["next"] = json!("nowhere");
        let e = CanvasDefinition::parse(&bad_next, ids()).unwrap_err();
        assert_eq!(e.path, "steps[1]");
        assert!(e.message.contains("nowhere"), "{e}");

        let mut cycle = trial();
        cycle["steps"][3]["next"] = json!("wait");
        let e = CanvasDefinition::parse(&cycle, ids()).unwrap_err();
        assert!(e.message.contains("cycle"), "{e}");

        let mut orphan = trial();
        orphan["steps"][2]["no"] = Value::Null;
        let e = CanvasDefinition::parse(&orphan, ids()).unwrap_err();
        assert_eq!(e.path, "steps[4]");
        assert!(e.message.contains("not reachable"), "{e}");

        let mut dup = trial();
        dup["steps"][4]["id"] = json!("hook");
        assert_eq!(
            CanvasDefinition::parse(&dup, ids()).unwrap_err().path,
            "steps[4].id"
        );

        let mut split = trial();
        split["steps"][3] = json!({"id": "hook", "type": "experiment_paths", "paths": [{"percent": 60}, {"percent": 30}]});
        let e = CanvasDefinition::parse(&split, ids()).unwrap_err();
        assert!(e.message.contains("add up to 100"), "{e}");

        let mut long = trial();
        long["steps"][1]["delay"] = json!({"seconds": MAX_DELAY_SECS + 1});
        assert_eq!(
            CanvasDefinition::parse(&long, ids()).unwrap_err().path,
            "steps[1].delay.seconds"
        );

        let mut ty = trial();
        ty["steps"][1]["type"] = json!("teleport");
        assert_eq!(
            CanvasDefinition::parse(&ty, ids()).unwrap_err().path,
            "steps[1].type"
        );
    }

    #[test]
    fn blank_step_ids_and_endless_reentry_are_refused_so_what_is_saved_always_loads() {
        for blank in [" ", "   ", "\t", "\u{a0}", "\u{3000}"] {
            let mut first = trial();
            first["steps"][0]["id"] = json!(blank);
            let e = CanvasDefinition::parse(&first, ids()).unwrap_err();
            assert_eq!(e.path, "steps[0].id", "{blank:?}");
        }
        let mut padded = trial();
        padded["steps"][0]["id"] = json!(" remind ");
        let (def, canonical) = CanvasDefinition::parse(&padded, ids()).unwrap();
        assert_eq!(CanvasDefinition::load(&canonical).unwrap(), def);

        for bad_wait in [
            json!(-1),
            json!(MAX_REELIGIBILITY_SECS + 1),
            json!(i64::MAX),
            json!(1.5),
        ] {
            let mut r = trial();
            r["reentry"] = json!({"after_seconds": bad_wait});
            let e = CanvasDefinition::parse(&r, ids()).unwrap_err();
            assert_eq!(e.path, "reentry.after_seconds", "{bad_wait}");
        }
        let mut longest = trial();
        longest["reentry"] = json!({"after_seconds": MAX_REELIGIBILITY_SECS});
        let (def, canonical) = CanvasDefinition::parse(&longest, ids()).unwrap();
        assert_eq!(def.reentry_after_secs, Some(MAX_REELIGIBILITY_SECS));
        assert_eq!(CanvasDefinition::load(&canonical).unwrap(), def);
    }

    /// A User Update step's `set` is checked on save as `/users/track` checks it when the step
    /// runs: a value it would refuse (and so the whole update dropped then) is refused now.
    #[test]
    fn save_only_checks_refuse_what_never_works_while_saved_canvases_load() {
        let with_set = |set: Value| {
            json!({
                "entry": {"type": "api_triggered"},
                "steps": [
                    {"id": "u", "type": "user_update", "set": set, "next": "m"},
                    {"id": "m", "type": "message", "message": {"channel": "webhook", "url": "http://127.0.0.1:1/h", "body": "{}"}}
                ]
            })
        };
        for (set, path, message) in [
            (json!({"email": 5}), "steps[0].set", "'email' is not valid"),
            (
                json!({"email_subscribe": "bogus"}),
                "steps[0].set",
                "'email_subscribe' is not valid",
            ),
            (
                json!({"first_name": {"x": 1}}),
                "steps[0].set",
                "'first_name' is not valid",
            ),
            (
                json!({"external_id": "x"}),
                "steps[0].set.external_id",
                "names a user; a user_update step changes the user on the journey",
            ),
        ] {
            let e = CanvasDefinition::parse(&with_set(set.clone()), ids()).unwrap_err();
            assert_eq!(
                (e.path.as_str(), e.message.as_str()),
                (path, message),
                "{set}"
            );
        }
        let ok = with_set(json!({"plan": "pro", "email": "a@example.com", "pets": [{"id": 1}]}));
        assert!(CanvasDefinition::parse(&ok, ids()).is_ok());
        // Increments keep their numbers as given: an integer stays an integer (it was stored,
        // and so applied, as 1.0, where `/users/track`'s `inc` of 1 keeps integers).
        let mut inc = with_set(json!({"plan": "pro"}));
        inc["steps"][0]["increment"] = json!({"visits": 1, "score": 1.5});
        let (_, canonical) = CanvasDefinition::parse(&inc, ids()).unwrap();
        assert_eq!(
            canonical["steps"][0]["increment"],
            json!({"visits": 1, "score": 1.5})
        );
        assert!(canonical["steps"][0]["increment"]["visits"].is_i64());
        // A Canvas saved before the check still loads (its step is dropped at run time, as then).
        assert!(CanvasDefinition::load(&with_set(json!({"email": 5}))).is_ok());

        // Email opens and clicks are not conversions a Canvas counts: refused on save, so none
        // is saved that never counts; one saved before still loads.
        for kind in ["opens_email", "clicks_email"] {
            let mut raw = with_set(json!({"plan": "pro"}));
            raw["conversion_events"] = json!([{"type": "purchase"}, {"type": kind}]);
            let e = CanvasDefinition::parse(&raw, ids()).unwrap_err();
            assert_eq!(e.path, "conversion_events[1].type", "{kind}");
            assert!(CanvasDefinition::load(&raw).is_ok(), "{kind}");
        }
    }

    #[test]
    fn action_paths_take_the_first_matching_event_in_the_window() {
        let raw = json!({
            "entry": {"type": "api_triggered"},
            "steps": [
                {"id": "ap", "type": "action_paths", "window_seconds": 60,
                 "paths": [{"name": "Bought", "triggers": [{"purchase": {}}], "next": "thanks"}],
                 "everyone_else": "nudge"},
                {"id": "thanks", "type": "message", "message": {"channel": "webhook", "url": "http://h/t"}},
                {"id": "nudge", "type": "message", "message": {"channel": "webhook", "url": "http://h/n"}}
            ]
        });
        let (def, _) = CanvasDefinition::parse(&raw, ids()).unwrap();
        let facts = Answers {
            yes: vec![],
            bucket: 0,
        };
        let j = start(&def.variants[0], "e".into(), 1, Millis(10_000), None);
        let j = advance(&def, j, Millis(10_000), &[], &facts)
            .journey
            .unwrap();
        assert_eq!(j.due_at, Millis(70_000));
        let mut props = Map::new();
        props.insert("sku".into(), json!("a"));
        let bought = Happening {
            at: Millis(20_000),
            kind: HappeningKind::Purchase {
                product_id: "a".into(),
            },
            properties: props,
        };
        let a = advance(&def, j.clone(), Millis(20_000), &[bought], &facts);
        assert!(a.events.contains(&StepEvent::Send {
            step: "thanks".into(),
            event_properties: Some("{\"sku\":\"a\"}".into())
        }));
        let a = advance(&def, j, Millis(70_000), &[], &facts);
        assert!(a.events.contains(&StepEvent::Send {
            step: "nudge".into(),
            event_properties: None
        }));
    }

    #[test]
    fn delays_compute_their_due_time() {
        assert_eq!(
            Delay::Duration { secs: 5 }.due(Millis(1_000)),
            Some(Millis(6_000))
        );
        assert_eq!(Delay::Until { at: Millis(500) }.due(Millis(1_000)), None);
        // One day later at 09:00 UTC.
        let d = Delay::DaysAt {
            days: 1,
            minute_of_day: 540,
        };
        let arrived = Millis(10 * 3_600_000); // 1970-01-01 10:00
        assert_eq!(
            d.due(arrived),
            Some(Millis(86_400_000 + 86_400_000 + 9 * 3_600_000))
        );
    }

    // ---- the engine against a reference model ------------------------------------------
    //
    // Random step graphs (each step leads only to later ones, so there is no cycle) and
    // random event sequences: [`advance`], driven the way the store drives it (called at
    // each event's arrival and at each timer, with the events that arrived since), must
    // produce the same sends, updates and exit as a direct reading of the rules below.
    // Events fall on odd seconds and timers on even ones, so no event ties a timer.

    use proptest::prelude::*;

    use crate::campaigns::{ActionDelivery, Message, WebhookContent, WebhookMethod};

    #[derive(Debug, Clone, PartialEq)]
    enum Out {
        Send(String),
        Update(String),
        Exit(String, ExitReason),
    }

    #[derive(Debug, Clone)]
    enum Gen {
        Message,
        Delay(i64),
        Split(usize),
        Audience(usize),
        Experiment(u8),
        Action(i64, usize),
        Update,
    }

    fn id(i: usize) -> String {
        format!("s{i}")
    }

    fn build(kinds: &[(Gen, Vec<Option<usize>>)]) -> CanvasDefinition {
        let n = kinds.len();
        let next = |targets: &[Option<usize>], k: usize| -> Option<String> {
            targets.get(k).copied().flatten().filter(|t| *t < n).map(id)
        };
        let steps = kinds
            .iter()
            .enumerate()
            .map(|(i, (g, t))| {
                let kind = match g {
                    Gen::Message => StepKind::Message {
                        message: Variant {
                            id: id(i),
                            name: id(i),
                            percent: 100,
                            message: Message::Webhook(WebhookContent {
                                url: "http://h/".into(),
                                method: WebhookMethod::Post,
                                headers: Vec::new(),
                                body: String::new(),
                                extras: None,
                            }),
                        },
                        next: next(t, 0),
                    },
                    Gen::Delay(secs) => StepKind::Delay {
                        delay: Delay::Duration { secs: *secs },
                        next: next(t, 0),
                    },
                    Gen::Split(f) => StepKind::DecisionSplit {
                        filter: *f,
                        yes: next(t, 0),
                        no: next(t, 1),
                    },
                    Gen::Audience(f) => StepKind::AudiencePaths {
                        paths: vec![AudiencePath {
                            name: "g".into(),
                            filter: *f,
                            next: next(t, 0),
                        }],
                        everyone_else: next(t, 1),
                    },
                    Gen::Experiment(p) => StepKind::ExperimentPaths {
                        paths: vec![
                            ExperimentPath {
                                id: "x".into(),
                                name: "x".into(),
                                percent: *p,
                                next: next(t, 0),
                            },
                            ExperimentPath {
                                id: "y".into(),
                                name: "y".into(),
                                percent: 100 - p,
                                next: next(t, 1),
                            },
                        ],
                    },
                    Gen::Action(window, which) => StepKind::ActionPaths {
                        window_secs: *window,
                        paths: vec![ActionPath {
                            name: "p".into(),
                            triggers: vec![Trigger::CustomEvent {
                                name: ["a", "b"][*which].into(),
                                property_filters: Vec::new(),
                            }],
                            next: next(t, 0),
                        }],
                        everyone_else: next(t, 1),
                    },
                    Gen::Update => StepKind::UserUpdate {
                        set: Map::new(),
                        increment: vec![("n".into(), 1.into())],
                        next: next(t, 0),
                    },
                };
                Step {
                    id: id(i),
                    name: id(i),
                    kind,
                }
            })
            .collect();
        CanvasDefinition {
            entry: Delivery::ActionBased(ActionDelivery {
                triggers: Vec::new(),
                delay_secs: 0,
                start: None,
                end: None,
            }),
            audience: Audience {
                segment_ids: Vec::new(),
                filter: None,
            },
            reentry_after_secs: None,
            entry_limit: None,
            exception_events: vec![Trigger::CustomEvent {
                name: "stop".into(),
                property_filters: Vec::new(),
            }],
            exit_filter: None,
            conversion_events: Vec::new(),
            variants: vec![CanvasVariant {
                id: "v".into(),
                name: "v".into(),
                percent: 100,
                first_step: id(0),
            }],
            control_percent: 0,
            steps,
            filters: vec![json!(null), json!(null)],
            obey_frequency_caps: true,
        }
    }

    /// The rules read directly: walk the graph, letting time pass at Delays and Action Paths.
    fn reference(def: &CanvasDefinition, events: &[(i64, &str)], facts: &Answers) -> Vec<Out> {
        let mut out = Vec::new();
        let mut t = 0i64;
        let mut pos = def.variants[0].first_step.clone();
        let exception = |from: i64, to: i64| {
            events
                .iter()
                .any(|(at, n)| *n == "stop" && *at > from && *at <= to)
        };
        loop {
            let step = def.step(&pos).unwrap();
            let next: Option<String> = match &step.kind {
                StepKind::Message { next, .. } => {
                    out.push(Out::Send(pos.clone()));
                    next.clone()
                }
                StepKind::UserUpdate { next, .. } => {
                    out.push(Out::Update(pos.clone()));
                    next.clone()
                }
                StepKind::Delay {
                    delay: Delay::Duration { secs },
                    next,
                } => {
                    let due = t + secs;
                    if let Some((at, _)) = events
                        .iter()
                        .find(|(at, n)| *n == "stop" && *at > t && *at <= due)
                    {
                        let _ = at;
                        out.push(Out::Exit(pos.clone(), ExitReason::ExceptionEvent));
                        return out;
                    }
                    t = due;
                    next.clone()
                }
                StepKind::Delay { .. } => unreachable!("only durations are generated"),
                StepKind::DecisionSplit { filter, yes, no } => {
                    if facts.matches(*filter) {
                        yes.clone()
                    } else {
                        no.clone()
                    }
                }
                StepKind::AudiencePaths {
                    paths,
                    everyone_else,
                } => {
                    if facts.matches(paths[0].filter) {
                        paths[0].next.clone()
                    } else {
                        everyone_else.clone()
                    }
                }
                StepKind::ExperimentPaths { paths } => {
                    if facts.bucket(&pos) < u32::from(paths[0].percent) {
                        paths[0].next.clone()
                    } else {
                        paths[1].next.clone()
                    }
                }
                StepKind::ActionPaths {
                    window_secs,
                    paths,
                    everyone_else,
                } => {
                    let end = t + window_secs;
                    let first = events.iter().find(|(at, n)| {
                        *at > t
                            && *at <= end
                            && (*n == "stop"
                                || paths[0].triggers.iter().any(|tr| {
                                    matches!(tr, Trigger::CustomEvent { name, .. } if name == n)
                                }))
                    });
                    match first {
                        Some((_, "stop")) => {
                            out.push(Out::Exit(pos.clone(), ExitReason::ExceptionEvent));
                            return out;
                        }
                        Some((at, _)) => {
                            t = *at;
                            paths[0].next.clone()
                        }
                        None => {
                            if exception(t, end) {
                                unreachable!("a stop in the window is found above");
                            }
                            t = end;
                            everyone_else.clone()
                        }
                    }
                }
            };
            match next {
                Some(n) => pos = n,
                None => {
                    out.push(Out::Exit(pos.clone(), ExitReason::EndOfPath));
                    return out;
                }
            }
        }
    }

    /// The engine, driven as the store drives it.
    fn engine(def: &CanvasDefinition, events: &[(i64, &str)], facts: &Answers) -> Vec<Out> {
        let happenings: Vec<Happening> = events
            .iter()
            .map(|(at, n)| Happening {
                at: Millis(at * 1_000),
                kind: HappeningKind::CustomEvent { name: (*n).into() },
                properties: Map::new(),
            })
            .collect();
        let mut out = Vec::new();
        let mut collect = |events: Vec<StepEvent>| {
            for e in events {
                match e {
                    StepEvent::Send { step, .. } => out.push(Out::Send(step)),
                    StepEvent::UserUpdate { step } => out.push(Out::Update(step)),
                    StepEvent::Exited { step, reason } => out.push(Out::Exit(step, reason)),
                    _ => {}
                }
            }
        };
        let mut j = start(&def.variants[0], "e".into(), 1, Millis(0), None);
        let mut now = Millis(0);
        let mut delivered = 0;
        for _ in 0..1_000 {
            let upto = happenings[delivered..]
                .iter()
                .take_while(|h| h.at.0 <= now.0)
                .count();
            let inbox = &happenings[delivered..delivered + upto];
            delivered += upto;
            let a = advance(def, j, now, inbox, facts);
            collect(a.events);
            let Some(next) = a.journey else {
                return out;
            };
            j = next;
            // The next wake: the step's timer or the next event, whichever comes first.
            now = match happenings.get(delivered) {
                Some(h) if h.at.0 < j.due_at.0 => h.at,
                _ => j.due_at,
            };
        }
        panic!("the journey did not end");
    }

    fn step_strategy() -> impl Strategy<Value = (Gen, Vec<Option<usize>>)> {
        let kind = prop_oneof![
            Just(Gen::Message),
            (1i64..10).prop_map(|d| Gen::Delay(d * 2)),
            (0usize..2).prop_map(Gen::Split),
            (0usize..2).prop_map(Gen::Audience),
            (0u8..=100).prop_map(Gen::Experiment),
            ((1i64..10), (0usize..2)).prop_map(|(w, k)| Gen::Action(w * 2, k)),
            Just(Gen::Update),
        ];
        (
            kind,
            proptest::collection::vec(proptest::option::of(0usize..12), 2),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn advance_agrees_with_the_reference_model(
            raw in proptest::collection::vec(step_strategy(), 1..10),
            events in proptest::collection::btree_map(0i64..60, 0usize..3, 0..8),
            yes in proptest::collection::vec(any::<bool>(), 2),
            bucket in 0u32..100,
        ) {
            // Each step leads only to a later one: target k of step i is i + 1 + k.
            let kinds: Vec<(Gen, Vec<Option<usize>>)> = raw
                .iter()
                .enumerate()
                .map(|(i, (g, t))| (g.clone(), t.iter().map(|x| x.map(|k| i + 1 + k)).collect()))
                .collect();
            let def = build(&kinds);
            let events: Vec<(i64, &str)> = events
                .into_iter()
                .map(|(t, k)| (t * 2 + 1, ["a", "b", "stop"][k]))
                .collect();
            let facts = Answers {
                yes: yes.iter().enumerate().filter(|(_, y)| **y).map(|(i, _)| i).collect(),
                bucket,
            };
            prop_assert_eq!(engine(&def, &events, &facts), reference(&def, &events, &facts));
        }
    }
}
