//! Campaigns as the domain sees them: a definition (variants, audience, delivery,
//! re-eligibility, conversion events, rate limit), parsed from the management API's JSON into
//! types, and the pure rules the engine applies (variant assignment, trigger matching, the next
//! occurrence of a schedule).
//!
//! The management API's JSON (`/api/v1/campaigns`) is the stored form: [`CampaignDefinition::parse`]
//! checks it and returns the definition plus its *canonical* JSON (defaults filled in, variant
//! ids generated), and that canonical JSON is what the store keeps. Loading parses it again, so
//! there is one reader of the format and no `Serialize` on domain types. Errors name the place
//! (`messages[1].url: …`), so a 400 tells the author what to fix.
//!
//! Liquid templates are checked by the caller (`tideway-messaging` owns the Liquid dialect);
//! [`CampaignDefinition::templates`] lists every template field with its path for that.

use std::fmt;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::clock::{Millis, parse_datetime};

/// Most variants of one campaign (Braze: 8).
pub const MAX_VARIANTS: usize = 8;
/// Most conversion events (Braze: 4).
pub const MAX_CONVERSION_EVENTS: usize = 4;
/// Longest conversion window: 30 days.
pub const MAX_CONVERSION_WINDOW_SECS: i64 = 30 * 86_400;

/// The longest re-eligibility (campaigns) or re-entry (Canvas) wait, ten years. A bound, not
/// only a sanity check: the wait is kept in milliseconds and added to "now", so an unbounded
/// number of seconds would wrap negative and make every user eligible again at once.
pub const MAX_REELIGIBILITY_SECS: i64 = 10 * 365 * 86_400;
/// Default conversion window: 3 days.
pub const DEFAULT_CONVERSION_WINDOW_SECS: i64 = 3 * 86_400;
/// Per-campaign rate limit bounds, messages per minute (Braze: 10 … 500,000).
pub const RATE_LIMIT_RANGE: std::ops::RangeInclusive<u32> = 10..=500_000;

/// A campaign definition the management API refused, with the place it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DefinitionError {
    pub path: String,
    pub message: String,
}

/// Parses `null` or `{"after_seconds": n}` at `path` (a campaign's `reeligibility`, a Canvas's
/// `reentry`), with `n` from 0 to [`MAX_REELIGIBILITY_SECS`].
pub(crate) fn wait_after(
    v: Option<&Value>,
    path: &str,
    shape: &str,
) -> Result<Option<i64>, DefinitionError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(r)) => r
            .get("after_seconds")
            .and_then(Value::as_i64)
            .filter(|s| (0..=MAX_REELIGIBILITY_SECS).contains(s))
            .map(Some)
            .ok_or_else(|| {
                bad(
                    format!("{path}.after_seconds"),
                    "must be an integer from 0 to 315360000 (ten years)",
                )
            }),
        Some(_) => Err(bad(path, shape)),
    }
}

pub(crate) fn bad(path: impl Into<String>, message: impl Into<String>) -> DefinitionError {
    DefinitionError {
        path: path.into(),
        message: message.into(),
    }
}

/// A campaign's lifecycle. Only `Active` campaigns send; `Draft` is editable and never sends;
/// `Paused` keeps pending sends waiting; `Stopped` is final (pending sends are aborted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CampaignStatus {
    Draft,
    Active,
    Paused,
    Stopped,
}

impl CampaignStatus {
    pub const ALL: [CampaignStatus; 4] = [
        CampaignStatus::Draft,
        CampaignStatus::Active,
        CampaignStatus::Paused,
        CampaignStatus::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Draft => "draft",
            CampaignStatus::Active => "active",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Stopped => "stopped",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// A lifecycle action of the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignAction {
    Launch,
    Pause,
    Stop,
}

impl CampaignAction {
    /// The status the action leads to from `from`, or `None` when it cannot start there
    /// (launch from draft or paused; pause from active; stop from anything but stopped).
    pub fn apply(self, from: CampaignStatus) -> Option<CampaignStatus> {
        use CampaignStatus::*;
        match (self, from) {
            (CampaignAction::Launch, Draft | Paused) => Some(Active),
            (CampaignAction::Pause, Active) => Some(Paused),
            (CampaignAction::Stop, Draft | Active | Paused) => Some(Stopped),
            _ => None,
        }
    }
}

/// An email message (one variant's content). Every text field is a Liquid template.
#[derive(Debug, Clone, PartialEq)]
pub struct EmailContent {
    pub from: String,
    pub reply_to: Option<String>,
    pub subject: String,
    pub body: String,
    pub plaintext_body: Option<String>,
    pub preheader: Option<String>,
    /// Extra MIME headers, verbatim (values are Liquid).
    pub headers: Vec<(String, String)>,
    /// Carried into Send events as `message_extras` (JSON text).
    pub extras: Option<String>,
    /// Files fetched when the message is sent and attached to it (Braze's `attachments`).
    pub attachments: Vec<EmailAttachment>,
}

/// A file to attach to an email: fetched from `url` when the message is sent (at most
/// [`MAX_ATTACHMENT_BYTES`]) and attached under `file_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAttachment {
    pub file_name: String,
    pub url: String,
}

/// Braze's limit on one attachment (braze-messaging.md: "≤ 2 MB each").
pub const MAX_ATTACHMENT_BYTES: usize = 2 * 1024 * 1024;

/// Attachments one email may carry; more are refused on save.
pub const MAX_ATTACHMENTS: usize = 10;

/// The HTTP method of a webhook message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookMethod {
    Post,
    Put,
    Delete,
    Get,
}

impl WebhookMethod {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.to_ascii_uppercase().as_str() {
            "POST" => Some(WebhookMethod::Post),
            "PUT" => Some(WebhookMethod::Put),
            "DELETE" => Some(WebhookMethod::Delete),
            "GET" => Some(WebhookMethod::Get),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookMethod::Post => "POST",
            WebhookMethod::Put => "PUT",
            WebhookMethod::Delete => "DELETE",
            WebhookMethod::Get => "GET",
        }
    }
}

/// A webhook message. URL, header values and body are Liquid templates.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookContent {
    pub url: String,
    pub method: WebhookMethod,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub extras: Option<String>,
}

/// What a variant sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Email(EmailContent),
    Webhook(WebhookContent),
}

impl Message {
    pub fn channel(&self) -> Channel {
        match self {
            Message::Email(_) => Channel::Email,
            Message::Webhook(_) => Channel::Webhook,
        }
    }
}

/// The channels Tideway sends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
        }
    }
}

/// One message variant with its share of the audience.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// `message_variation_id` in Currents events and `/campaigns/details`.
    pub id: String,
    pub name: String,
    pub percent: u8,
    pub message: Message,
}

/// Who a campaign may reach: members of every listed segment (AND) that also match the
/// filter. Empty means everyone in the workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct Audience {
    pub segment_ids: Vec<String>,
    /// A filter in the segment language (`tideway-segment` wire JSON), checked on save.
    pub filter: Option<Value>,
}

impl Audience {
    pub fn is_everyone(&self) -> bool {
        self.segment_ids.is_empty() && self.filter.is_none()
    }
}

/// How often a scheduled campaign sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Frequency {
    /// Once, at `at`.
    Once { at: Millis },
    /// Every day at `minute_of_day` (UTC), from `start` on.
    Daily { minute_of_day: u16 },
    /// On the listed weekdays (0 = Monday) at `minute_of_day` (UTC), from `start` on.
    Weekly { days: Vec<u8>, minute_of_day: u16 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub frequency: Frequency,
    /// Recurring schedules start here (default: when launched).
    pub start: Option<Millis>,
    /// No occurrence after this.
    pub end: Option<Millis>,
    /// Each occurrence's time of day is each user's local time (their `time_zone`; UTC when
    /// they have none or an unknown one): occurrences are read as wall-clock times in UTC and
    /// moved per user when the audience is expanded, which starts [`LOCAL_TIME_LEAD_MS`]
    /// early so the first zone (UTC+14) is on time.
    pub in_local_time: bool,
}

/// How early a local-time occurrence is expanded: the earliest time zone is UTC+14.
pub const LOCAL_TIME_LEAD_MS: i64 = 14 * 3_600_000;

impl Schedule {
    /// When the occurrence `at` is expanded into sends: at once, or early enough for the first
    /// zone when it is in users' local time.
    pub fn expands_at(&self, at: Millis) -> Millis {
        if self.in_local_time {
            Millis(at.0 - LOCAL_TIME_LEAD_MS)
        } else {
            at
        }
    }

    /// The first occurrence strictly after `after` (and not before `start`), or `None` when
    /// the schedule has no more.
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        const DAY: i64 = 86_400_000;
        let floor = match self.start {
            Some(start) if start.0 > after.0 => Millis(start.0 - 1),
            _ => after,
        };
        let next = match &self.frequency {
            Frequency::Once { at } => (at.0 > floor.0).then_some(*at),
            Frequency::Daily { minute_of_day } => {
                let offset = i64::from(*minute_of_day) * 60_000;
                let day = (floor.0 - offset).div_euclid(DAY) + 1;
                Some(Millis(day * DAY + offset))
            }
            Frequency::Weekly {
                days,
                minute_of_day,
            } => {
                let offset = i64::from(*minute_of_day) * 60_000;
                let first_day = (floor.0 - offset).div_euclid(DAY) + 1;
                (0..8).map(|d| first_day + d).find_map(|day| {
                    // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
                    let weekday = (day + 3).rem_euclid(7) as u8;
                    days.contains(&weekday)
                        .then_some(Millis(day * DAY + offset))
                })
            }
        }?;
        match self.end {
            Some(end) if next.0 > end.0 => None,
            _ => Some(next),
        }
    }
}

/// A comparison on one event property (action-based triggers).
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyFilter {
    pub property: String,
    pub comparison: PropertyComparison,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PropertyComparison {
    Equals(Value),
    NotEqual(Value),
    Exists,
    GreaterThan(f64),
    LessThan(f64),
}

impl PropertyFilter {
    pub fn matches(&self, properties: &Map<String, Value>) -> bool {
        let value = properties.get(&self.property);
        match &self.comparison {
            PropertyComparison::Exists => value.is_some_and(|v| !v.is_null()),
            PropertyComparison::Equals(want) => value == Some(want),
            PropertyComparison::NotEqual(want) => value != Some(want),
            PropertyComparison::GreaterThan(n) => {
                value.and_then(Value::as_f64).is_some_and(|v| v > *n)
            }
            PropertyComparison::LessThan(n) => {
                value.and_then(Value::as_f64).is_some_and(|v| v < *n)
            }
        }
    }
}

/// What starts an action-based send.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    CustomEvent {
        name: String,
        property_filters: Vec<PropertyFilter>,
    },
    /// Any purchase, or of one product.
    Purchase { product_id: Option<String> },
    /// Entering a partner cohort (a Tideway extension: Braze has no such trigger).
    CohortEntry { partner: String, cohort_id: String },
    /// Entering one of the workspace's segments (a Tideway extension). Never matches an
    /// [`Occurrence`]: the trigger engine detects entries itself by following the segment's
    /// membership (`tideway-messaging`'s `triggers.rs`).
    SegmentEntry { segment_id: String },
}

/// What happened to a user that may start a send, as the trigger engine reads it from the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Occurrence<'a> {
    CustomEvent {
        name: &'a str,
        properties: &'a Map<String, Value>,
    },
    Purchase {
        product_id: &'a str,
    },
    CohortEntry {
        partner: &'a str,
        cohort_id: &'a str,
    },
}

impl Trigger {
    pub fn matches(&self, occurrence: &Occurrence<'_>) -> bool {
        match (self, occurrence) {
            (
                Trigger::CustomEvent {
                    name,
                    property_filters,
                },
                Occurrence::CustomEvent {
                    name: got,
                    properties,
                },
            ) => name == got && property_filters.iter().all(|f| f.matches(properties)),
            (Trigger::Purchase { product_id }, Occurrence::Purchase { product_id: got }) => {
                product_id.as_deref().is_none_or(|p| p == *got)
            }
            (
                Trigger::CohortEntry { partner, cohort_id },
                Occurrence::CohortEntry {
                    partner: p,
                    cohort_id: c,
                },
            ) => partner == p && cohort_id == c,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionDelivery {
    pub triggers: Vec<Trigger>,
    /// Seconds between the trigger and the send.
    pub delay_secs: u32,
    /// Triggers before `start` (default: launch) or after `end` are ignored.
    pub start: Option<Millis>,
    pub end: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    ApiTriggered,
    Scheduled(Schedule),
    ActionBased(ActionDelivery),
}

impl Delivery {
    /// `schedule_type` in `/campaigns/details`.
    pub fn schedule_type(&self) -> &'static str {
        match self {
            Delivery::ApiTriggered => "api_triggered",
            Delivery::Scheduled(_) => "time_based",
            Delivery::ActionBased(_) => "action_based",
        }
    }
}

/// A conversion event: what counts as the campaign having worked, within a window.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversionEvent {
    pub kind: ConversionKind,
    pub window_secs: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConversionKind {
    CustomEvent { name: String },
    Purchase { product_id: Option<String> },
    OpensEmail,
    ClicksEmail,
}

impl ConversionEvent {
    /// Whether what happened counts as this conversion.
    pub fn matches(&self, occurrence: &Occurrence<'_>) -> bool {
        match (&self.kind, occurrence) {
            (ConversionKind::CustomEvent { name }, Occurrence::CustomEvent { name: got, .. }) => {
                name == got
            }
            (ConversionKind::Purchase { product_id }, Occurrence::Purchase { product_id: got }) => {
                product_id.as_deref().is_none_or(|p| p == *got)
            }
            _ => false,
        }
    }

    /// Braze's `conversion_behavior` object (a JSON string in Currents events).
    pub fn behavior_json(&self) -> Value {
        let mut out = match &self.kind {
            ConversionKind::CustomEvent { name } => {
                json!({"type": "Performs Custom Event", "custom_event_name": name})
            }
            ConversionKind::Purchase { product_id: None } => json!({"type": "Makes Any Purchase"}),
            ConversionKind::Purchase {
                product_id: Some(p),
            } => json!({"type": "Makes Specific Purchase", "product": p}),
            ConversionKind::OpensEmail => json!({"type": "Opens Email"}),
            ConversionKind::ClicksEmail => json!({"type": "Clicks Email"}),
        };
        out["window"] = json!(self.window_secs);
        out
    }
}

/// A workspace frequency-capping rule: at most `max` messages per user within
/// `window_secs`, across campaigns that obey caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyCap {
    pub max: u32,
    pub window_secs: i64,
}

/// Most frequency-capping rules per workspace (Braze: 10).
pub const MAX_FREQUENCY_CAPS: usize = 10;

impl FrequencyCap {
    /// Parses the workspace messaging settings' `frequency_caps` (`[{"max", "window_seconds"}]`,
    /// at most 10, windows up to 30 days). Missing means no caps.
    pub fn parse_rules(settings: &Value) -> Result<Vec<FrequencyCap>, DefinitionError> {
        let list = match settings.get("frequency_caps") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(bad("frequency_caps", "must be an array")),
        };
        if list.len() > MAX_FREQUENCY_CAPS {
            return Err(bad(
                "frequency_caps",
                format!("at most {MAX_FREQUENCY_CAPS} rules are allowed"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, rule)| {
                let path = format!("frequency_caps[{i}]");
                let max = rule
                    .get("max")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok())
                    .filter(|m| *m >= 1)
                    .ok_or_else(|| bad(format!("{path}.max"), "must be a positive integer"))?;
                let window_secs = rule
                    .get("window_seconds")
                    .and_then(Value::as_i64)
                    .filter(|w| (60..=MAX_CONVERSION_WINDOW_SECS).contains(w))
                    .ok_or_else(|| {
                        bad(
                            format!("{path}.window_seconds"),
                            "must be 60 to 2592000 (one minute to 30 days)",
                        )
                    })?;
                Ok(FrequencyCap { max, window_secs })
            })
            .collect()
    }
}

/// A parsed campaign definition.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignDefinition {
    pub variants: Vec<Variant>,
    /// The control group: its variation id and share (users enrolled get no message).
    pub control: Option<(String, u8)>,
    pub audience: Audience,
    pub delivery: Delivery,
    /// `None`: a user receives the campaign once. `Some(s)`: again after `s` seconds.
    pub reeligible_after_secs: Option<i64>,
    /// Whether the workspace's frequency caps apply to this campaign's sends.
    pub obey_frequency_caps: bool,
    pub rate_limit_per_minute: Option<u32>,
    pub conversion_events: Vec<ConversionEvent>,
    /// Who its emails may go to, by `email_subscribe`.
    pub recipient_subscription_state: SubscriptionState,
}

/// Which users a campaign's emails go to, by their `email_subscribe` (Braze's
/// `recipient_subscription_state`; a definition's key of that name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubscriptionState {
    /// Everyone but those who unsubscribed (Braze's default).
    #[default]
    Subscribed,
    /// Only users who opted in.
    OptedIn,
    /// Everyone, those who unsubscribed included (transactional email: receipts, resets).
    All,
}

impl SubscriptionState {
    pub fn parse(s: &str) -> Option<SubscriptionState> {
        match s {
            "subscribed" => Some(SubscriptionState::Subscribed),
            "opted_in" => Some(SubscriptionState::OptedIn),
            "all" => Some(SubscriptionState::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionState::Subscribed => "subscribed",
            SubscriptionState::OptedIn => "opted_in",
            SubscriptionState::All => "all",
        }
    }

    /// Whether an email may go to a user whose `email_subscribe` is `state` (`None`: never
    /// set, which Braze counts as subscribed).
    pub fn admits(self, state: Option<&str>) -> bool {
        match self {
            SubscriptionState::Subscribed => state != Some("unsubscribed"),
            SubscriptionState::OptedIn => state == Some("opted_in"),
            SubscriptionState::All => true,
        }
    }
}

/// The outcome of assigning a user to a variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Assignment<'a> {
    Variant(&'a Variant),
    Control(&'a str),
}

impl CampaignDefinition {
    /// Checks the management API's JSON. `new_id` makes ids for variants that have none (the
    /// canonical JSON keeps them, so ids are stable across edits). Returns the definition and
    /// the canonical JSON to store.
    pub fn parse(
        raw: &Value,
        new_id: impl FnMut() -> String,
    ) -> Result<(CampaignDefinition, Value), DefinitionError> {
        Self::parse_checked(raw, new_id, Saving::New)
    }

    fn parse_checked(
        raw: &Value,
        mut new_id: impl FnMut() -> String,
        saving: Saving,
    ) -> Result<(CampaignDefinition, Value), DefinitionError> {
        if saving == Saving::New {
            refuse_nul(raw, "")?;
        }
        let obj = raw
            .as_object()
            .ok_or_else(|| bad("$", "must be a JSON object"))?;
        let mut canonical = Map::new();

        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("messages", "must be a non-empty array of message variants"))?;
        if messages.is_empty() {
            return Err(bad("messages", "must hold at least one message variant"));
        }
        if messages.len() > MAX_VARIANTS {
            return Err(bad(
                "messages",
                format!("at most {MAX_VARIANTS} variants are allowed"),
            ));
        }
        let mut variants = Vec::with_capacity(messages.len());
        let mut canonical_messages = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let (variant, json) = parse_variant(m, &format!("messages[{i}]"), &mut new_id, saving)?;
            if variants.iter().any(|v: &Variant| v.id == variant.id) {
                return Err(bad(format!("messages[{i}].id"), "duplicate variant id"));
            }
            variants.push(variant);
            canonical_messages.push(json);
        }
        let control_percent = match obj.get("control_percent") {
            None | Some(Value::Null) => 0,
            Some(v) => percent(v, "control_percent")?,
        };
        let total: u32 =
            variants.iter().map(|v| u32::from(v.percent)).sum::<u32>() + u32::from(control_percent);
        if total != 100 {
            return Err(bad(
                "messages",
                format!(
                    "variant percents plus control_percent must add up to 100 (they add up to {total})"
                ),
            ));
        }
        let control = if control_percent > 0 {
            let id = match obj.get("control_id").and_then(Value::as_str) {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ => new_id(),
            };
            canonical.insert("control_id".into(), json!(id));
            Some((id, control_percent))
        } else {
            None
        };
        canonical.insert("messages".into(), Value::Array(canonical_messages));
        canonical.insert("control_percent".into(), json!(control_percent));

        let audience = parse_audience(obj.get("audience"))?;
        canonical.insert(
            "audience".into(),
            json!({"segment_ids": audience.segment_ids, "filter": audience.filter}),
        );

        let (delivery, delivery_json) = parse_delivery(obj.get("delivery"))?;
        canonical.insert("delivery".into(), delivery_json);

        let reeligible_after_secs = wait_after(
            obj.get("reeligibility"),
            "reeligibility",
            "must be null (receive once) or {\"after_seconds\": n}",
        )?;
        canonical.insert(
            "reeligibility".into(),
            match reeligible_after_secs {
                Some(s) => json!({"after_seconds": s}),
                None => Value::Null,
            },
        );

        let obey_frequency_caps = match obj.get("frequency_capping") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("frequency_capping", "must be a boolean")),
        };
        canonical.insert("frequency_capping".into(), json!(obey_frequency_caps));

        let rate_limit_per_minute = match obj.get("rate_limit_per_minute") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let n = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| RATE_LIMIT_RANGE.contains(n))
                    .ok_or_else(|| {
                        bad(
                            "rate_limit_per_minute",
                            "must be an integer from 10 to 500000 (messages per minute)",
                        )
                    })?;
                Some(n)
            }
        };
        canonical.insert("rate_limit_per_minute".into(), json!(rate_limit_per_minute));

        let conversion_events = match obj.get("conversion_events") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => {
                if list.len() > MAX_CONVERSION_EVENTS {
                    return Err(bad(
                        "conversion_events",
                        format!("at most {MAX_CONVERSION_EVENTS} conversion events are allowed"),
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, c)| parse_conversion(c, &format!("conversion_events[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(_) => return Err(bad("conversion_events", "must be an array")),
        };
        canonical.insert(
            "conversion_events".into(),
            Value::Array(conversion_events.iter().map(conversion_json).collect()),
        );

        let recipient_subscription_state = match obj.get("recipient_subscription_state") {
            None | Some(Value::Null) => SubscriptionState::default(),
            Some(v) => v
                .as_str()
                .and_then(SubscriptionState::parse)
                .ok_or_else(|| {
                    bad(
                        "recipient_subscription_state",
                        "must be subscribed, opted_in or all",
                    )
                })?,
        };
        // Kept only when not the default, so definitions saved before it read back the same.
        if recipient_subscription_state != SubscriptionState::default() {
            canonical.insert(
                "recipient_subscription_state".into(),
                json!(recipient_subscription_state.as_str()),
            );
        }

        Ok((
            CampaignDefinition {
                variants,
                control,
                audience,
                delivery,
                reeligible_after_secs,
                obey_frequency_caps,
                rate_limit_per_minute,
                conversion_events,
                recipient_subscription_state,
            },
            Value::Object(canonical),
        ))
    }

    /// Parses a stored (canonical) definition.
    pub fn load(stored: &Value) -> Result<CampaignDefinition, DefinitionError> {
        Self::parse_checked(stored, || String::from("missing-id"), Saving::Stored).map(|(d, _)| d)
    }

    /// The segments whose entry triggers this campaign, each once, in trigger order (empty
    /// unless the delivery is action-based with `segment_entry` triggers).
    pub fn segment_entry_ids(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Delivery::ActionBased(action) = &self.delivery {
            for t in &action.triggers {
                if let Trigger::SegmentEntry { segment_id } = t
                    && !out.contains(&segment_id.as_str())
                {
                    out.push(segment_id);
                }
            }
        }
        out
    }

    /// Every Liquid template of the definition, with its path (for checking on save).
    pub fn templates(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for (i, v) in self.variants.iter().enumerate() {
            out.extend(templates_of(v, &format!("messages[{i}]")));
        }
        out
    }

    pub fn variant(&self, id: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.id == id)
    }

    /// Sticky assignment: the same campaign and user land in the same variant (or control)
    /// while the percentages are unchanged. `user_key` is the user's braze id.
    pub fn assign(&self, campaign_id: &str, user_key: &str) -> Assignment<'_> {
        let bucket = bucket(campaign_id, user_key);
        let mut upto = 0u32;
        for v in &self.variants {
            upto += u32::from(v.percent);
            if bucket < upto {
                return Assignment::Variant(v);
            }
        }
        match &self.control {
            Some((id, _)) => Assignment::Control(id),
            // Percents add up to 100 without a control, so this is not reached; the last
            // variant is the safe answer.
            None => Assignment::Variant(&self.variants[self.variants.len() - 1]),
        }
    }

    pub fn channels(&self) -> Vec<Channel> {
        let mut out: Vec<Channel> = Vec::new();
        for v in &self.variants {
            let c = v.message.channel();
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }
}

/// Every Liquid template of one variant, with its path under `p` (as the dispatcher names
/// them: `p.body`, `p.request_headers.X`, …).
pub fn templates_of<'a>(v: &'a Variant, p: &str) -> Vec<(String, &'a str)> {
    let mut out = Vec::new();
    match &v.message {
        Message::Email(e) => {
            out.push((format!("{p}.from"), e.from.as_str()));
            out.push((format!("{p}.subject"), e.subject.as_str()));
            out.push((format!("{p}.body"), e.body.as_str()));
            if let Some(t) = &e.plaintext_body {
                out.push((format!("{p}.plaintext_body"), t.as_str()));
            }
            if let Some(t) = &e.preheader {
                out.push((format!("{p}.preheader"), t.as_str()));
            }
            if let Some(t) = &e.reply_to {
                out.push((format!("{p}.reply_to"), t.as_str()));
            }
            for (name, value) in &e.headers {
                out.push((format!("{p}.headers.{name}"), value.as_str()));
            }
        }
        Message::Webhook(w) => {
            out.push((format!("{p}.url"), w.url.as_str()));
            out.push((format!("{p}.body"), w.body.as_str()));
            for (name, value) in &w.headers {
                out.push((format!("{p}.request_headers.{name}"), value.as_str()));
            }
        }
    }
    out
}

/// A user's bucket 0..100 for a campaign: the first bytes of SHA-256(campaign, user).
pub fn bucket(campaign_id: &str, user_key: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(campaign_id.as_bytes())
        .chain_update([0])
        .chain_update(user_key.as_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 100
}

/// The per-user `dispatch_id` of a triggered send: derived from the request's dispatch id
/// and the user, so a retry of the same send carries the same id
/// (`braze-messaging.md` §3.1, "Our choice").
pub fn user_dispatch_id(dispatch_id: &str, user_key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(dispatch_id.as_bytes())
        .chain_update([0])
        .chain_update(user_key.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

fn percent(v: &Value, path: &str) -> Result<u8, DefinitionError> {
    v.as_u64()
        .filter(|p| *p <= 100)
        .map(|p| p as u8)
        .ok_or_else(|| bad(path, "must be an integer from 0 to 100"))
}

pub(crate) fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    required: bool,
) -> Result<Option<String>, DefinitionError> {
    match obj.get(key) {
        None | Some(Value::Null) if required => Err(bad(format!("{path}.{key}"), "is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if required && s.trim().is_empty() => {
            Err(bad(format!("{path}.{key}"), "must not be empty"))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{path}.{key}"), "must be a string")),
    }
}

/// A message's headers (email `headers`, webhook `request_headers`). A value with a line break
/// or another control character (a NUL) is refused on save, as it would fail every send;
/// definitions stored before the check still load.
fn headers_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    saving: Saving,
) -> Result<Vec<(String, String)>, DefinitionError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let valid_name = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid_name {
                    return Err(bad(
                        format!("{path}.{key}"),
                        format!("invalid header name {k:?}"),
                    ));
                }
                match v {
                    Value::String(s)
                        if saving == Saving::New
                            && s.chars().any(|c| c.is_control() && c != '\t') =>
                    {
                        Err(bad(
                            format!("{path}.{key}.{k}"),
                            "must not contain line breaks or other control characters",
                        ))
                    }
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(bad(format!("{path}.{key}.{k}"), "must be a string")),
                }
            })
            .collect(),
        Some(_) => Err(bad(format!("{path}.{key}"), "must be an object of strings")),
    }
}

/// `attachments`: up to [`MAX_ATTACHMENTS`] `{"file_name", "url"}`, the name a plain file name
/// (no path, no control characters, at most 255 characters), the URL http(s).
fn attachments_field(
    obj: &Map<String, Value>,
    path: &str,
) -> Result<Vec<EmailAttachment>, DefinitionError> {
    let items = match obj.get("attachments") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= MAX_ATTACHMENTS => items,
        Some(Value::Array(_)) => {
            return Err(bad(
                format!("{path}.attachments"),
                format!("at most {MAX_ATTACHMENTS} attachments"),
            ));
        }
        Some(_) => return Err(bad(format!("{path}.attachments"), "must be an array")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{path}.attachments[{i}]");
            let Some(item) = item.as_object() else {
                return Err(bad(at, "must be an object {\"file_name\", \"url\"}"));
            };
            let file_name = match item.get("file_name").and_then(Value::as_str).map(str::trim) {
                Some(name)
                    if !name.is_empty()
                        && name != "."
                        && name != ".."
                        && name.chars().count() <= 255
                        && !name
                            .chars()
                            .any(|c| c.is_control() || c == '/' || c == '\\') =>
                {
                    name.to_owned()
                }
                _ => {
                    return Err(bad(
                        format!("{at}.file_name"),
                        "must be a file name of 1 to 255 characters, without a path",
                    ));
                }
            };
            // http(s), a host, and nothing a URL cannot hold (spaces, controls); the rest (the
            // outgoing-request policy) is judged when the file is fetched.
            let url = match item.get("url").and_then(Value::as_str).map(str::trim) {
                Some(url) if http_url_with_host(url) => url.to_owned(),
                _ => return Err(bad(format!("{at}.url"), "must be an http or https URL")),
            };
            Ok(EmailAttachment { file_name, url })
        })
        .collect()
}

/// `http://host…` or `https://host…` with a host, and no whitespace or control character.
fn http_url_with_host(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    !host.is_empty()
        && !host.starts_with(':')
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn extras_field(obj: &Map<String, Value>, path: &str) -> Result<Option<String>, DefinitionError> {
    match obj.get("extras") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.to_string())),
        Some(_) => Err(bad(format!("{path}.extras"), "must be an object")),
    }
}

fn headers_json(headers: &[(String, String)]) -> Value {
    Value::Object(
        headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn extras_json(extras: &Option<String>) -> Value {
    extras
        .as_deref()
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or(Value::Null)
}

/// A variant's or step's `id` at `path`: given, or a new one when absent.
pub(crate) fn id_field(
    obj: &Map<String, Value>,
    path: &str,
    new_id: &mut impl FnMut() -> String,
) -> Result<String, DefinitionError> {
    match obj.get("id") {
        None | Some(Value::Null) => Ok(new_id()),
        // Blank ids (spaces, tabs, no-break spaces) are refused here rather than when the
        // saved definition is loaded again, where the variant naming such a step would fail.
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 64 => Ok(s.clone()),
        Some(_) => Err(bad(
            format!("{path}.id"),
            "must be a string of 1 to 64 characters, not only spaces",
        )),
    }
}

/// Whether a definition is being saved (every check) or read back from the store (the checks a
/// saved definition passed when it was saved, less those added since: a campaign, Canvas or
/// scheduled ad-hoc send saved before a check existed must still load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Saving {
    New,
    Stored,
}

/// Refuses a definition (campaign or Canvas) with a NUL character in any of its strings or
/// keys, naming where: every id, name and text in it reaches the database as text or a query
/// parameter (variation ids on each message's events, event names a Canvas scans the log for),
/// which PostgreSQL cannot hold, so one would fail later, on one backend only, and
/// in the middle of a send or a scan rather than on save.
pub(crate) fn refuse_nul(value: &Value, path: &str) -> Result<(), DefinitionError> {
    let here = |path: &str| {
        if path.is_empty() {
            "$".to_owned()
        } else {
            path.to_owned()
        }
    };
    let nul = |path: &str| bad(here(path), "must not contain a NUL character (\\u0000)");
    match value {
        Value::String(s) if s.contains('\0') => Err(nul(path)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| refuse_nul(item, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().try_for_each(|(key, item)| {
            let at = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if key.contains('\0') {
                return Err(nul(&at));
            }
            refuse_nul(item, &at)
        }),
        _ => Ok(()),
    }
}

pub(crate) fn parse_variant(
    raw: &Value,
    path: &str,
    new_id: &mut impl FnMut() -> String,
    saving: Saving,
) -> Result<(Variant, Value), DefinitionError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| bad(path, "must be an object"))?;
    let id = id_field(obj, path, new_id)?;
    let name = string_field(obj, "name", path, false)?.unwrap_or_else(|| id.clone());
    let percent = match obj.get("percent") {
        None | Some(Value::Null) => 100,
        Some(v) => percent(v, &format!("{path}.percent"))?,
    };
    let channel = string_field(obj, "channel", path, true)?.unwrap_or_default();
    let (message, mut json) = match channel.as_str() {
        "email" => {
            let from = string_field(obj, "from", path, true)?.unwrap_or_default();
            if !from.contains('@') {
                return Err(bad(
                    format!("{path}.from"),
                    "must be an address such as \"Shop <shop@example.com>\"",
                ));
            }
            let reply_to =
                string_field(obj, "reply_to", path, false)?.filter(|r| r != "NO_REPLY_TO");
            // A line break in an address header is refused on save: sending would abort
            // (`invalid_email_address`) for every recipient.
            for (key, value) in [("from", Some(&from)), ("reply_to", reply_to.as_ref())] {
                if saving == Saving::New && value.is_some_and(|v| v.chars().any(char::is_control)) {
                    return Err(bad(
                        format!("{path}.{key}"),
                        "must not contain line breaks or other control characters",
                    ));
                }
            }
            // Braze takes only a BCC address configured for the workspace; Tideway configures
            // none, so one is refused rather than dropped.
            if saving == Saving::New && obj.get("bcc").is_some_and(|b| !b.is_null()) {
                return Err(bad(
                    format!("{path}.bcc"),
                    "no BCC address is configured on this server",
                ));
            }
            // SMTP forbids a NUL in a message (a personalised value's is dropped when sent).
            if saving == Saving::New {
                for key in ["subject", "body", "plaintext_body", "preheader"] {
                    if obj
                        .get(key)
                        .and_then(Value::as_str)
                        .is_some_and(|v| v.contains('\0'))
                    {
                        return Err(bad(
                            format!("{path}.{key}"),
                            "must not contain a NUL character (\\u0000)",
                        ));
                    }
                }
            }
            let content = EmailContent {
                from,
                reply_to,
                subject: string_field(obj, "subject", path, true)?.unwrap_or_default(),
                body: string_field(obj, "body", path, true)?.unwrap_or_default(),
                plaintext_body: string_field(obj, "plaintext_body", path, false)?,
                preheader: string_field(obj, "preheader", path, false)?,
                headers: headers_field(obj, "headers", path, saving)?,
                extras: extras_field(obj, path)?,
                attachments: attachments_field(obj, path)?,
            };
            let mut json = json!({
                "channel": "email",
                "from": content.from,
                "reply_to": content.reply_to,
                "subject": content.subject,
                "body": content.body,
                "plaintext_body": content.plaintext_body,
                "preheader": content.preheader,
                "headers": headers_json(&content.headers),
                "extras": extras_json(&content.extras),
            });
            // Only when there are some: definitions saved before attachments read back the same.
            if !content.attachments.is_empty() {
                json["attachments"] = content
                    .attachments
                    .iter()
                    .map(|a| json!({"file_name": a.file_name, "url": a.url}))
                    .collect();
            }
            (Message::Email(content), json)
        }
        "webhook" => {
            let url = string_field(obj, "url", path, true)?.unwrap_or_default();
            // The URL is a template; check the literal scheme when it is not computed.
            let lower = url.trim_start().to_ascii_lowercase();
            if !(lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("{{"))
            {
                return Err(bad(
                    format!("{path}.url"),
                    "must be an http:// or https:// URL",
                ));
            }
            // Every send of such a URL would abort (`invalid_webhook_url`).
            if saving == Saving::New && url.chars().any(char::is_control) {
                return Err(bad(
                    format!("{path}.url"),
                    "must not contain control characters",
                ));
            }
            let method_raw =
                string_field(obj, "request_method", path, false)?.unwrap_or_else(|| "POST".into());
            let method = WebhookMethod::parse(&method_raw).ok_or_else(|| {
                bad(
                    format!("{path}.request_method"),
                    "must be POST, PUT, DELETE or GET",
                )
            })?;
            let content = WebhookContent {
                url,
                method,
                headers: headers_field(obj, "request_headers", path, saving)?,
                body: string_field(obj, "body", path, false)?.unwrap_or_default(),
                extras: extras_field(obj, path)?,
            };
            let json = json!({
                "channel": "webhook",
                "url": content.url,
                "request_method": content.method.as_str(),
                "request_headers": headers_json(&content.headers),
                "body": content.body,
                "extras": extras_json(&content.extras),
            });
            (Message::Webhook(content), json)
        }
        other => {
            return Err(bad(
                format!("{path}.channel"),
                format!("unsupported channel {other:?} (Tideway sends \"email\" and \"webhook\")"),
            ));
        }
    };
    json["id"] = json!(id);
    json["name"] = json!(name);
    json["percent"] = json!(percent);
    Ok((
        Variant {
            id,
            name,
            percent,
            message,
        },
        json,
    ))
}

pub(crate) fn parse_audience(raw: Option<&Value>) -> Result<Audience, DefinitionError> {
    let obj = match raw {
        None | Some(Value::Null) => {
            return Ok(Audience {
                segment_ids: Vec::new(),
                filter: None,
            });
        }
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad("audience", "must be an object")),
    };
    let segment_ids = match obj.get("segment_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                id.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        bad(format!("audience.segment_ids[{i}]"), "must be a segment id")
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "audience.segment_ids",
                "must be an array of segment ids",
            ));
        }
    };
    let filter = match obj.get("filter") {
        None | Some(Value::Null) => None,
        Some(f) => {
            tideway_segment::Filter::from_json(f)
                .map_err(|e| bad("audience.filter", e.to_string()))?;
            Some(f.clone())
        }
    };
    Ok(Audience {
        segment_ids,
        filter,
    })
}

pub(crate) fn time_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<Millis>, DefinitionError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_datetime(s).map(Some).ok_or_else(|| {
            bad(
                format!("{path}.{key}"),
                "must be an ISO-8601 time in the years 0 to 3000, such as 2026-05-24T20:30:00Z",
            )
        }),
        Some(_) => Err(bad(
            format!("{path}.{key}"),
            "must be an ISO-8601 time string",
        )),
    }
}

fn iso(t: Option<Millis>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_iso()))
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

pub(crate) fn minute_of_day(raw: Option<&Value>, path: &str) -> Result<u16, DefinitionError> {
    let text = raw
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, "is required: a time of day \"HH:MM\" (UTC)"))?;
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| bad(path, "must be \"HH:MM\""))?;
    match (h.parse::<u16>(), m.parse::<u16>()) {
        (Ok(h), Ok(m)) if h < 24 && m < 60 && m_len_ok(h, m, text) => Ok(h * 60 + m),
        _ => Err(bad(path, "must be \"HH:MM\" with HH 00-23 and MM 00-59")),
    }
}

fn m_len_ok(_h: u16, _m: u16, text: &str) -> bool {
    text.len() == 5
}

pub(crate) fn parse_delivery(raw: Option<&Value>) -> Result<(Delivery, Value), DefinitionError> {
    let obj = raw.and_then(Value::as_object).ok_or_else(|| {
        bad(
            "delivery",
            "is required: an object with \"type\" api_triggered, scheduled or action_based",
        )
    })?;
    match obj.get("type").and_then(Value::as_str) {
        Some("api_triggered") => Ok((Delivery::ApiTriggered, json!({"type": "api_triggered"}))),
        Some("scheduled") => {
            let s = obj
                .get("schedule")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("delivery.schedule", "is required for scheduled delivery"))?;
            let p = "delivery.schedule";
            let start = time_field(s, "start", p)?;
            let end = time_field(s, "end", p)?;
            let frequency = match s.get("frequency") {
                None | Some(Value::Null) => "once",
                Some(Value::String(f)) => f.as_str(),
                Some(_) => {
                    return Err(bad(
                        "delivery.schedule.frequency",
                        "must be \"once\", \"daily\" or \"weekly\"",
                    ));
                }
            };
            let (frequency, json) = match frequency {
                "once" => {
                    let at = time_field(s, "at", p)?.ok_or_else(|| {
                        bad("delivery.schedule.at", "is required for a once schedule")
                    })?;
                    (
                        Frequency::Once { at },
                        json!({"frequency": "once", "at": at.to_iso()}),
                    )
                }
                "daily" => {
                    let m = minute_of_day(s.get("time"), "delivery.schedule.time")?;
                    (
                        Frequency::Daily { minute_of_day: m },
                        json!({"frequency": "daily", "time": format!("{:02}:{:02}", m / 60, m % 60)}),
                    )
                }
                "weekly" => {
                    let m = minute_of_day(s.get("time"), "delivery.schedule.time")?;
                    let days = s
                        .get("days")
                        .and_then(Value::as_array)
                        .filter(|d| !d.is_empty())
                        .ok_or_else(|| {
                            bad(
                                "delivery.schedule.days",
                                "is required: weekday names such as [\"monday\"]",
                            )
                        })?;
                    let mut parsed = Vec::new();
                    for (i, d) in days.iter().enumerate() {
                        let idx = d
                            .as_str()
                            .and_then(|d| WEEKDAYS.iter().position(|w| w.eq_ignore_ascii_case(d)))
                            .ok_or_else(|| {
                                bad(
                                    format!("delivery.schedule.days[{i}]"),
                                    "must be a weekday name",
                                )
                            })?;
                        if !parsed.contains(&(idx as u8)) {
                            parsed.push(idx as u8);
                        }
                    }
                    parsed.sort_unstable();
                    let names: Vec<&str> =
                        parsed.iter().map(|d| WEEKDAYS[usize::from(*d)]).collect();
                    (
                        Frequency::Weekly {
                            days: parsed,
                            minute_of_day: m,
                        },
                        json!({"frequency": "weekly", "time": format!("{:02}:{:02}", m / 60, m % 60), "days": names}),
                    )
                }
                other => {
                    return Err(bad(
                        "delivery.schedule.frequency",
                        format!("unknown frequency {other:?} (once, daily or weekly)"),
                    ));
                }
            };
            let in_local_time = match s.get("in_local_time") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "delivery.schedule.in_local_time",
                        "must be true or false",
                    ));
                }
            };
            let mut json = json;
            json["start"] = iso(start);
            json["end"] = iso(end);
            json["in_local_time"] = json!(in_local_time);
            Ok((
                Delivery::Scheduled(Schedule {
                    frequency,
                    start,
                    end,
                    in_local_time,
                }),
                json!({"type": "scheduled", "schedule": json}),
            ))
        }
        Some("action_based") => {
            let triggers_raw = obj
                .get("triggers")
                .and_then(Value::as_array)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad("delivery.triggers", "is required: at least one trigger"))?;
            let mut triggers = Vec::new();
            let mut triggers_json = Vec::new();
            for (i, t) in triggers_raw.iter().enumerate() {
                let (trigger, json) = parse_trigger(t, &format!("delivery.triggers[{i}]"))?;
                triggers.push(trigger);
                triggers_json.push(json);
            }
            let delay_secs = match obj.get("delay_seconds") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .and_then(|d| u32::try_from(d).ok())
                    .filter(|d| *d <= 30 * 86_400)
                    .ok_or_else(|| {
                        bad(
                            "delivery.delay_seconds",
                            "must be an integer from 0 to 2592000",
                        )
                    })?,
            };
            let start = time_field(obj, "start", "delivery")?;
            let end = time_field(obj, "end", "delivery")?;
            Ok((
                Delivery::ActionBased(ActionDelivery {
                    triggers,
                    delay_secs,
                    start,
                    end,
                }),
                json!({"type": "action_based", "triggers": triggers_json, "delay_seconds": delay_secs, "start": iso(start), "end": iso(end)}),
            ))
        }
        _ => Err(bad(
            "delivery.type",
            "must be \"api_triggered\", \"scheduled\" or \"action_based\"",
        )),
    }
}

pub(crate) fn parse_trigger(raw: &Value, path: &str) -> Result<(Trigger, Value), DefinitionError> {
    let obj = raw.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        bad(
            path,
            "must be an object with one key: custom_event, purchase, cohort_entry or segment_entry",
        )
    })?;
    let (kind, body) = obj.iter().next().ok_or_else(|| bad(path, "is empty"))?;
    let body = body
        .as_object()
        .ok_or_else(|| bad(format!("{path}.{kind}"), "must be an object"))?;
    let p = format!("{path}.{kind}");
    match kind.as_str() {
        "custom_event" => {
            let name = string_field(body, "name", &p, true)?.unwrap_or_default();
            let filters = match body.get("property_filters") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(list)) => list
                    .iter()
                    .enumerate()
                    .map(|(i, f)| parse_property_filter(f, &format!("{p}.property_filters[{i}]")))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(bad(format!("{p}.property_filters"), "must be an array")),
            };
            let json = json!({"custom_event": {"name": name, "property_filters": body.get("property_filters").cloned().unwrap_or(json!([]))}});
            Ok((
                Trigger::CustomEvent {
                    name,
                    property_filters: filters,
                },
                json,
            ))
        }
        "purchase" => {
            let product_id = string_field(body, "product_id", &p, false)?;
            let json = json!({"purchase": {"product_id": product_id}});
            Ok((Trigger::Purchase { product_id }, json))
        }
        "cohort_entry" => {
            let partner =
                string_field(body, "partner", &p, false)?.unwrap_or_else(|| "heap".into());
            let cohort_id = match body.get("cohort_id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(bad(format!("{p}.cohort_id"), "is required")),
            };
            let json = json!({"cohort_entry": {"partner": partner, "cohort_id": cohort_id}});
            Ok((Trigger::CohortEntry { partner, cohort_id }, json))
        }
        "segment_entry" => {
            let segment_id = string_field(body, "segment_id", &p, true)?.unwrap_or_default();
            let json = json!({"segment_entry": {"segment_id": segment_id}});
            Ok((Trigger::SegmentEntry { segment_id }, json))
        }
        other => Err(bad(
            path,
            format!(
                "unknown trigger {other:?} (custom_event, purchase, cohort_entry or segment_entry)"
            ),
        )),
    }
}

fn parse_property_filter(raw: &Value, path: &str) -> Result<PropertyFilter, DefinitionError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| bad(path, "must be an object"))?;
    let property = string_field(obj, "property", path, true)?.unwrap_or_default();
    let value = obj.get("value");
    let number = || {
        value
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(format!("{path}.value"), "must be a number"))
    };
    let comparison = match obj.get("comparison").and_then(Value::as_str) {
        Some("equals") => PropertyComparison::Equals(value.cloned().unwrap_or(Value::Null)),
        Some("not_equal") => PropertyComparison::NotEqual(value.cloned().unwrap_or(Value::Null)),
        Some("exists") => PropertyComparison::Exists,
        Some("greater_than") => PropertyComparison::GreaterThan(number()?),
        Some("less_than") => PropertyComparison::LessThan(number()?),
        _ => {
            return Err(bad(
                format!("{path}.comparison"),
                "must be equals, not_equal, exists, greater_than or less_than",
            ));
        }
    };
    Ok(PropertyFilter {
        property,
        comparison,
    })
}

pub(crate) fn parse_conversion(
    raw: &Value,
    path: &str,
) -> Result<ConversionEvent, DefinitionError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| bad(path, "must be an object"))?;
    let kind = match obj.get("type").and_then(Value::as_str) {
        Some("custom_event") => ConversionKind::CustomEvent {
            name: string_field(obj, "name", path, true)?.unwrap_or_default(),
        },
        Some("purchase") => ConversionKind::Purchase {
            product_id: string_field(obj, "product_id", path, false)?,
        },
        Some("opens_email") => ConversionKind::OpensEmail,
        Some("clicks_email") => ConversionKind::ClicksEmail,
        _ => {
            return Err(bad(
                format!("{path}.type"),
                "must be custom_event, purchase, opens_email or clicks_email",
            ));
        }
    };
    let window_secs = match obj.get("window_seconds") {
        None | Some(Value::Null) => DEFAULT_CONVERSION_WINDOW_SECS,
        Some(v) => v
            .as_i64()
            .filter(|w| (1..=MAX_CONVERSION_WINDOW_SECS).contains(w))
            .ok_or_else(|| {
                bad(
                    format!("{path}.window_seconds"),
                    "must be 1 to 2592000 (30 days)",
                )
            })?,
    };
    Ok(ConversionEvent { kind, window_secs })
}

pub(crate) fn conversion_json(c: &ConversionEvent) -> Value {
    let mut out = match &c.kind {
        ConversionKind::CustomEvent { name } => json!({"type": "custom_event", "name": name}),
        ConversionKind::Purchase { product_id } => {
            json!({"type": "purchase", "product_id": product_id})
        }
        ConversionKind::OpensEmail => json!({"type": "opens_email"}),
        ConversionKind::ClicksEmail => json!({"type": "clicks_email"}),
    };
    out["window_seconds"] = json!(c.window_secs);
    out
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id-{n}")
        }
    }

    fn email_campaign() -> Value {
        json!({
            "messages": [
                {"channel": "email", "from": "Shop <shop@example.com>", "subject": "Hi {{${first_name}}}", "body": "<p>Back?</p>", "percent": 90}
            ],
            "control_percent": 10,
            "audience": {"segment_ids": ["s1"]},
            "delivery": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "123"}}]},
            "conversion_events": [{"type": "purchase"}]
        })
    }

    #[test]
    fn a_campaign_parses_and_its_canonical_form_round_trips() {
        let (def, canonical) = CampaignDefinition::parse(&email_campaign(), ids()).unwrap();
        assert_eq!(def.variants.len(), 1);
        assert_eq!(def.variants[0].id, "id-1");
        assert_eq!(def.control, Some(("id-2".into(), 10)));
        assert_eq!(
            def.conversion_events[0].window_secs,
            DEFAULT_CONVERSION_WINDOW_SECS
        );
        assert!(def.obey_frequency_caps);
        let reloaded = CampaignDefinition::load(&canonical).unwrap();
        assert_eq!(reloaded, def);
        // Parsing the canonical form again does not mint new ids.
        let (_, again) = CampaignDefinition::parse(&canonical, || unreachable!()).unwrap();
        assert_eq!(again, canonical);
    }

    /// `recipient_subscription_state` says whose `email_subscribe` admits an email; the
    /// canonical form keeps it only when it is not the default, so older definitions read back
    /// unchanged.
    #[test]
    fn the_recipient_subscription_state_is_parsed_kept_and_applied() {
        use SubscriptionState as S;
        for (state, never, subscribed, opted_in, unsubscribed) in [
            (S::Subscribed, true, true, true, false),
            (S::OptedIn, false, false, true, false),
            (S::All, true, true, true, true),
        ] {
            let admitted = [
                None,
                Some("subscribed"),
                Some("opted_in"),
                Some("unsubscribed"),
            ]
            .map(|s| state.admits(s));
            assert_eq!(
                admitted,
                [never, subscribed, opted_in, unsubscribed],
                "{state:?}"
            );
        }
        let (def, canonical) = CampaignDefinition::parse(&email_campaign(), ids()).unwrap();
        assert_eq!(def.recipient_subscription_state, S::Subscribed);
        assert!(canonical.get("recipient_subscription_state").is_none());
        let mut c = email_campaign();
        c["recipient_subscription_state"] = json!("all");
        let (def, canonical) = CampaignDefinition::parse(&c, ids()).unwrap();
        assert_eq!(def.recipient_subscription_state, S::All);
        assert_eq!(CampaignDefinition::load(&canonical).unwrap(), def);
        c["recipient_subscription_state"] = json!("everyone");
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "recipient_subscription_state");
    }

    /// A NUL in a variation's id (which every event of its messages carries) is refused on
    /// save, as anywhere in a campaign; one saved before the check still loads.
    #[test]
    fn a_nul_in_a_variation_id_is_refused_on_save_only() {
        let mut c = email_campaign();
        c["messages"][0]["id"] = json!("v\u{0}");
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "messages[0].id");
        assert!(e.message.contains("NUL"), "{e:?}");
        assert!(CampaignDefinition::load(&c).is_ok());
    }

    /// A line break in `from` or `reply_to` is refused on save (every send would abort), and a
    /// campaign saved before that check still loads.
    #[test]
    fn address_headers_with_line_breaks_are_refused_on_save_only() {
        for (key, value) in [
            ("from", "a@b.c\r\nBcc: evil@x.com"),
            ("reply_to", "r@b.c\nBcc: evil@x.com"),
            ("from", "Shop\u{0} <a@b.c>"),
        ] {
            let mut c = email_campaign();
            c["messages"][0][key] = json!(value);
            let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
            assert_eq!(e.path, format!("messages[0].{key}"), "{value:?}");
            assert!(CampaignDefinition::load(&c).is_ok(), "{value:?}");
        }
        // Message headers too (a webhook with one would fail for good on every send); a tab
        // is a header value's own whitespace.
        for value in ["a\u{0}b", "x\r\nEvil: 1"] {
            let mut c = email_campaign();
            c["messages"][0]["headers"] = json!({"X-Tag": value});
            let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
            assert_eq!(e.path, "messages[0].headers.X-Tag", "{value:?}");
            assert!(CampaignDefinition::load(&c).is_ok(), "{value:?}");
        }
        let mut c = email_campaign();
        c["messages"][0]["headers"] = json!({"X-Tag": "a\tb"});
        assert!(CampaignDefinition::parse(&c, ids()).is_ok());
        // A NUL in the subject or a body, which SMTP forbids.
        for key in ["subject", "body", "plaintext_body", "preheader"] {
            let mut c = email_campaign();
            c["messages"][0][key] = json!("a\u{0}b");
            let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
            assert_eq!(e.path, format!("messages[0].{key}"));
            assert!(CampaignDefinition::load(&c).is_ok());
        }
        // A webhook URL with one: every send would abort.
        let mut c = email_campaign();
        c["messages"][0] =
            json!({"channel": "webhook", "url": "http://h.example/a\u{0}b", "percent": 90});
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "messages[0].url");
        assert!(CampaignDefinition::load(&c).is_ok());
    }

    #[test]
    fn errors_name_the_place() {
        let mut c = email_campaign();
        c["messages"][0]["channel"] = json!("sms");
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "messages[0].channel");

        let mut c = email_campaign();
        c["control_percent"] = json!(20);
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "messages");
        assert!(e.message.contains("110"), "{e}");

        let mut c = email_campaign();
        c["delivery"] =
            json!({"type": "scheduled", "schedule": {"frequency": "daily", "time": "25:00"}});
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "delivery.schedule.time");

        for frequency in [json!(123), json!({}), json!([]), json!(true)] {
            let mut c = email_campaign();
            c["delivery"] = json!({"type": "scheduled", "schedule": {"frequency": frequency, "at": "2030-01-01T00:00:00Z"}});
            let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
            assert_eq!(e.path, "delivery.schedule.frequency", "{frequency}");
        }

        for bad_wait in [
            json!(-1),
            json!(MAX_REELIGIBILITY_SECS + 1),
            json!(u64::MAX),
            json!("60"),
        ] {
            let mut c = email_campaign();
            c["reeligibility"] = json!({"after_seconds": bad_wait});
            let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
            assert_eq!(e.path, "reeligibility.after_seconds", "{bad_wait}");
        }

        let mut c = email_campaign();
        c["messages"][0]["id"] = json!("\u{a0}\t");
        let e = CampaignDefinition::parse(&c, ids()).unwrap_err();
        assert_eq!(e.path, "messages[0].id");

        let mut c = email_campaign();
        c["audience"] = json!({"filter": {"nonsense": 1}});
        assert_eq!(
            CampaignDefinition::parse(&c, ids()).unwrap_err().path,
            "audience.filter"
        );

        let mut c = email_campaign();
        c["rate_limit_per_minute"] = json!(5);
        assert_eq!(
            CampaignDefinition::parse(&c, ids()).unwrap_err().path,
            "rate_limit_per_minute"
        );
    }

    #[test]
    fn assignment_is_sticky_and_follows_the_percentages() {
        let (def, _) = CampaignDefinition::parse(&email_campaign(), ids()).unwrap();
        let mut control = 0;
        for u in 0..2000 {
            let key = format!("user-{u}");
            let a = def.assign("c1", &key);
            assert_eq!(a, def.assign("c1", &key));
            if matches!(a, Assignment::Control(_)) {
                control += 1;
            }
        }
        assert!(
            (120..=290).contains(&control),
            "{control} of 2000 in a 10% control"
        );
    }

    #[test]
    fn triggers_match_occurrences() {
        let t = Trigger::CustomEvent {
            name: "checkout".into(),
            property_filters: vec![PropertyFilter {
                property: "total".into(),
                comparison: PropertyComparison::GreaterThan(10.0),
            }],
        };
        let mut props = Map::new();
        props.insert("total".into(), json!(12));
        assert!(t.matches(&Occurrence::CustomEvent {
            name: "checkout",
            properties: &props
        }));
        props.insert("total".into(), json!(5));
        assert!(!t.matches(&Occurrence::CustomEvent {
            name: "checkout",
            properties: &props
        }));
        let c = Trigger::CohortEntry {
            partner: "heap".into(),
            cohort_id: "7".into(),
        };
        assert!(c.matches(&Occurrence::CohortEntry {
            partner: "heap",
            cohort_id: "7"
        }));
        assert!(!c.matches(&Occurrence::CohortEntry {
            partner: "heap",
            cohort_id: "8"
        }));
        let p = Trigger::Purchase { product_id: None };
        assert!(p.matches(&Occurrence::Purchase { product_id: "x" }));
        let s = Trigger::SegmentEntry {
            segment_id: "7".into(),
        };
        assert!(!s.matches(&Occurrence::CohortEntry {
            partner: "heap",
            cohort_id: "7"
        }));
        assert!(!s.matches(&Occurrence::Purchase { product_id: "7" }));
    }

    #[test]
    fn segment_entry_triggers_parse_and_list_their_segments() {
        let mut c = email_campaign();
        c["delivery"] = json!({"type": "action_based", "delay_seconds": 60, "triggers": [
            {"segment_entry": {"segment_id": "seg-a"}},
            {"purchase": {}},
            {"segment_entry": {"segment_id": "seg-b"}},
            {"segment_entry": {"segment_id": "seg-a"}}
        ]});
        let (def, canonical) = CampaignDefinition::parse(&c, ids()).unwrap();
        let Delivery::ActionBased(action) = &def.delivery else {
            panic!("{:?}", def.delivery)
        };
        assert_eq!(
            action.triggers[0],
            Trigger::SegmentEntry {
                segment_id: "seg-a".into()
            }
        );
        assert_eq!(action.delay_secs, 60);
        assert_eq!(
            canonical["delivery"]["triggers"][2],
            json!({"segment_entry": {"segment_id": "seg-b"}})
        );
        assert_eq!(CampaignDefinition::load(&canonical).unwrap(), def);
        assert_eq!(def.segment_entry_ids(), vec!["seg-a", "seg-b"]);

        let (other, _) = CampaignDefinition::parse(&email_campaign(), ids()).unwrap();
        assert!(other.segment_entry_ids().is_empty());

        for (body, path) in [
            (json!({}), "delivery.triggers[0].segment_entry.segment_id"),
            (
                json!({"segment_id": ""}),
                "delivery.triggers[0].segment_entry.segment_id",
            ),
            (
                json!({"segment_id": 7}),
                "delivery.triggers[0].segment_entry.segment_id",
            ),
            (json!("seg-a"), "delivery.triggers[0].segment_entry"),
        ] {
            let mut c = email_campaign();
            c["delivery"] = json!({"type": "action_based", "triggers": [{"segment_entry": body}]});
            assert_eq!(
                CampaignDefinition::parse(&c, ids()).unwrap_err().path,
                path,
                "{body}"
            );
        }
    }

    #[test]
    fn schedules_find_their_next_occurrence() {
        let day = 86_400_000;
        let daily = Schedule {
            frequency: Frequency::Daily {
                minute_of_day: 9 * 60,
            },
            start: None,
            end: None,
            in_local_time: false,
        };
        // 1970-01-01T00:00Z → 09:00 the same day; at 09:00 exactly → the next day.
        assert_eq!(daily.next_after(Millis(0)), Some(Millis(9 * 3_600_000)));
        assert_eq!(
            daily.next_after(Millis(9 * 3_600_000)),
            Some(Millis(day + 9 * 3_600_000))
        );
        let weekly = Schedule {
            frequency: Frequency::Weekly {
                days: vec![0],
                minute_of_day: 0,
            },
            start: None,
            end: None,
            in_local_time: false,
        };
        // 1970-01-01 was a Thursday; the next Monday is 1970-01-05.
        assert_eq!(weekly.next_after(Millis(0)), Some(Millis(4 * day)));
        let once = Schedule {
            frequency: Frequency::Once { at: Millis(5_000) },
            start: None,
            end: None,
            in_local_time: false,
        };
        assert_eq!(once.next_after(Millis(0)), Some(Millis(5_000)));
        assert_eq!(once.next_after(Millis(5_000)), None);
        let ended = Schedule {
            end: Some(Millis(day)),
            in_local_time: false,
            ..daily
        };
        assert_eq!(ended.next_after(Millis(day)), None);
    }

    #[test]
    fn frequency_caps_parse_with_limits() {
        let rules = FrequencyCap::parse_rules(
            &json!({"frequency_caps": [{"max": 2, "window_seconds": 86400}]}),
        )
        .unwrap();
        assert_eq!(
            rules,
            vec![FrequencyCap {
                max: 2,
                window_secs: 86_400
            }]
        );
        assert!(FrequencyCap::parse_rules(&json!({})).unwrap().is_empty());
        let e = FrequencyCap::parse_rules(
            &json!({"frequency_caps": [{"max": 0, "window_seconds": 86400}]}),
        )
        .unwrap_err();
        assert_eq!(e.path, "frequency_caps[0].max");
        let e = FrequencyCap::parse_rules(
            &json!({"frequency_caps": [{"max": 1, "window_seconds": 40 * 86400}]}),
        )
        .unwrap_err();
        assert_eq!(e.path, "frequency_caps[0].window_seconds");
    }

    #[test]
    fn conversions_match_their_kind() {
        let c = ConversionEvent {
            kind: ConversionKind::CustomEvent {
                name: "upgraded".into(),
            },
            window_secs: 60,
        };
        let props = Map::new();
        assert!(c.matches(&Occurrence::CustomEvent {
            name: "upgraded",
            properties: &props
        }));
        assert!(!c.matches(&Occurrence::CustomEvent {
            name: "other",
            properties: &props
        }));
        assert!(!c.matches(&Occurrence::Purchase { product_id: "x" }));
    }

    #[test]
    fn lifecycle_rules() {
        use CampaignStatus::*;
        assert_eq!(CampaignAction::Launch.apply(Draft), Some(Active));
        assert_eq!(CampaignAction::Launch.apply(Active), None);
        assert_eq!(CampaignAction::Pause.apply(Active), Some(Paused));
        assert_eq!(CampaignAction::Launch.apply(Paused), Some(Active));
        assert_eq!(CampaignAction::Stop.apply(Stopped), None);
    }
}
