//! User lookup: one user found by external id, alias (label and name), email or braze id —
//! through the same indexed lookups as `/users/export/ids` — with their profile, their custom
//! events and purchases (count, first and last time, from the profile the segment language
//! reads: no read of the event log), the partner cohorts they are in, the segments they are in
//! now (from the live segment index), and their recent messages: the newest sends of any
//! campaign, Canvas step or API send with channel, state and time
//! (`MessagingStore::recent_sends`, bounded and indexed), and how many were sent in the last 30
//! days.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde_json::Value;
use tideway_core::ids::{AliasLabel, AliasName, BrazeId, Email, ExternalId, UserAlias};
use tideway_core::profile::Occurrences;
use tideway_core::segments::segment_lookup;
use tideway_core::services::Services;
use tideway_core::store::{CampaignRecord, DispatchSource, UserSend};
use tideway_core::users::ExportRequest;

use super::layout::{self, Section};
use super::{Ctx, Me, PageError, PathParams, segment, when, ws_id};
use crate::AppState;

/// A user's custom events or purchases by name, from their profile.
type Behaviour = Vec<(String, Occurrences)>;

/// How many of a user's newest messages the page lists.
const MESSAGES_SHOWN: usize = 20;

/// One listed message: what sent it (and where that is shown), its channel, state and time.
struct MessageRow {
    source: String,
    link: Option<String>,
    channel: String,
    state: &'static str,
    at: tideway_core::clock::Millis,
    sent: bool,
}

/// The rows for a user's sends: campaign sends named by their campaign (its variant's
/// channel), Canvas step sends by their Canvas and step, other API sends as such.
fn message_rows(ctx: &Ctx, sends: Vec<UserSend>, campaigns: &[CampaignRecord]) -> Vec<MessageRow> {
    let channel_of = |messages: &Value, variant: &str| {
        let list = messages.as_array();
        list.and_then(|l| l.iter().find(|m| m["id"] == variant).or(l.first()))
            .and_then(|m| m["channel"].as_str())
            .unwrap_or("—")
            .to_owned()
    };
    sends
        .into_iter()
        .map(|s| {
            let (source, link, channel) = match &s.source {
                Some(DispatchSource::Campaign { campaign_id }) => {
                    match campaigns.iter().find(|c| &c.id == campaign_id) {
                        Some(c) => (
                            ["Campaign ", c.name.as_str()].concat(),
                            Some(ctx.url(&["/campaigns/", &segment(&c.id)].concat())),
                            channel_of(&c.definition["messages"], &s.variant),
                        ),
                        None => ("A deleted campaign".to_owned(), None, "—".to_owned()),
                    }
                }
                // An entry dispatch enters users; it sends nothing itself (shown if one ever
                // names a send, rather than hidden).
                Some(DispatchSource::Canvas { canvas_id, .. }) => (
                    "Canvas entry".to_owned(),
                    Some(ctx.url(&["/canvases/", &segment(canvas_id)].concat())),
                    "—".to_owned(),
                ),
                Some(DispatchSource::AdHoc { definition }) => {
                    let channel = channel_of(&definition["messages"], &s.variant);
                    match definition.get("canvas") {
                        Some(canvas) => (
                            [
                                "Canvas ",
                                canvas["name"].as_str().unwrap_or(""),
                                " › ",
                                canvas["step_name"]
                                    .as_str()
                                    .or(canvas["step_id"].as_str())
                                    .unwrap_or(""),
                            ]
                            .concat(),
                            canvas["id"]
                                .as_str()
                                .map(|id| ctx.url(&["/canvases/", &segment(id)].concat())),
                            channel,
                        ),
                        None => ("API send (/messages/send)".to_owned(), None, channel),
                    }
                }
                None => ("—".to_owned(), None, "—".to_owned()),
            };
            MessageRow {
                source,
                link,
                channel,
                state: s.state.as_str(),
                at: s.sent_at.unwrap_or(s.due_at),
                sent: s.sent_at.is_some(),
            }
        })
        .collect()
}

/// The window of the message count.
const RECENT_MESSAGES: tideway_core::clock::Millis =
    tideway_core::clock::Millis(30 * 24 * 60 * 60 * 1000);

const BY: [(&str, &str); 4] = [
    ("external_id", "External id"),
    ("alias", "Alias (label and name)"),
    ("email", "Email"),
    ("braze_id", "Braze id"),
];

/// The export request for the query, or what to fix.
fn request(by: &str, q: &str, label: &str) -> Result<ExportRequest, String> {
    let bad = |e: tideway_core::ids::IdError| e.to_string();
    let mut req = ExportRequest::default();
    match by {
        "external_id" => req.external_ids = vec![ExternalId::parse(q).map_err(bad)?],
        "alias" => {
            req.aliases = vec![UserAlias {
                label: AliasLabel::parse(label).map_err(bad)?,
                name: AliasName::parse(q).map_err(bad)?,
            }]
        }
        "email" => req.email = Some(Email::parse(q).map_err(bad)?),
        "braze_id" => req.braze_id = Some(BrazeId::parse(q).map_err(bad)?),
        _ => return Err("Search by external id, alias, email or braze id.".into()),
    }
    Ok(req)
}

/// A profile value as shown: strings bare, everything else as JSON.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `GET /dashboard/w/{ws}/users?by=…&q=…[&label=…]`.
pub async fn page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let mut status = StatusCode::OK;
    let by = query.get("by").map_or("external_id", String::as_str);
    let q = query.get("q").map_or("", |q| q.trim());
    let label = query.get("label").map_or("", |l| l.trim());
    let mut error = None;
    let mut found = None;
    if !q.is_empty() {
        match request(by, q, label) {
            Err(e) => {
                status = StatusCode::BAD_REQUEST;
                error = Some(e);
            }
            Ok(req) => {
                let out = state.store().export_ids(&ctx.workspace, req).await?;
                match out.users.into_iter().next() {
                    None => {
                        status = StatusCode::NOT_FOUND;
                        error = Some("No user matches.".to_owned());
                    }
                    Some(profile) => found = Some(profile),
                }
            }
        }
    }
    let mut cohorts = Vec::new();
    let mut segments_in = Vec::new();
    let mut sent_recently = None;
    let mut messages = Vec::new();
    let mut behaviour: Option<(Behaviour, Behaviour)> = None;
    if let Some(profile) = &found
        && let Some(braze_id) = profile
            .get("braze_id")
            .and_then(Value::as_str)
            .and_then(|b| BrazeId::parse(b).ok())
    {
        cohorts = state
            .store()
            .user_cohorts(ctx.workspace.id, braze_id.clone())
            .await?
            .unwrap_or_default();
        let segments = state.store().list_segments(ctx.workspace.id).await?;
        let lookup = segment_lookup(&segments);
        let at = state.dashboard_now().secs();
        let (seq, within) = state
            .segments()
            .with_fresh(ctx.workspace.id, move |live| {
                let Some(seq) = live.seq_of(&braze_id) else {
                    return (None, Vec::new());
                };
                let within = segments
                    .into_iter()
                    .filter(|s| {
                        s.parsed_filter()
                            .is_some_and(|f| live.index().evaluate(&f, at, &lookup).contains(seq.0))
                    })
                    .collect();
                (Some(seq), within)
            })
            .await?;
        segments_in = within;
        if let Some(seq) = seq {
            let since = tideway_core::clock::Millis(state.dashboard_now().0 - RECENT_MESSAGES.0);
            sent_recently = Some(
                state
                    .store()
                    .sends_since(ctx.workspace.id, seq, since)
                    .await?,
            );
            let sends = state
                .store()
                .recent_sends(ctx.workspace.id, seq, MESSAGES_SHOWN)
                .await?;
            if !sends.is_empty() {
                let campaigns = state.store().list_campaigns(ctx.workspace.id).await?;
                messages = message_rows(&ctx, sends, &campaigns);
            }
            behaviour = state
                .store()
                .users_by_seq(ctx.workspace.id, vec![seq])
                .await?
                .into_iter()
                .next()
                .map(|u| {
                    let list = |m: &std::collections::BTreeMap<String, Occurrences>| {
                        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
                    };
                    (list(&u.profile.events), list(&u.profile.purchases))
                });
        }
    }
    let body = html! {
        form class="card" method="get" action=(ctx.url("/users")) {
            label for="by" { "Find a user by" }
            select id="by" name="by" {
                @for (value, text) in BY { option value=(value) selected[by == value] { (text) } }
            }
            label for="label" { "Alias label " span class="muted" { "(for an alias)" } }
            input type="text" id="label" name="label" value=(label);
            label for="q" { "Value" }
            input type="text" id="q" name="q" value=(q) required;
            div class="actions" { button type="submit" { "Look up" } }
        }
        @if let Some(error) = &error { p class="notice error" role="alert" { (error) } }
        @if let Some(profile) = &found {
            h2 { "Profile" }
            table id="profile" {
                tbody {
                    @for (k, v) in profile {
                        tr { th scope="row" { (k) } td class="mono" { (shown(v)) } }
                    }
                }
            }
            h2 { "Cohorts" }
            @if cohorts.is_empty() { p class="muted" { "In no cohort." } } @else {
                ul id="user-cohorts" {
                    @for c in &cohorts {
                        li {
                            a href=(ctx.url(&["/cohorts/", &segment(&c.partner), "/", &segment(c.cohort_id.as_str())].concat())) { (c.name) }
                            " (" (c.partner) ", since " (when(c.entered_at)) ")"
                        }
                    }
                }
            }
            h2 { "Events and purchases" }
            @match &behaviour {
                None => { p class="muted" { "Not indexed yet." } }
                Some((events, purchases)) if events.is_empty() && purchases.is_empty() => {
                    p class="muted" { "No custom events or purchases." }
                }
                Some((events, purchases)) => {
                    table id="user-events" {
                        thead { tr { th { "Kind" } th { "Name" } th { "Count" } th { "First" } th { "Last" } } }
                        tbody {
                            @for (kind, list) in [("Custom event", events), ("Purchase", purchases)] {
                                @for (name, o) in list {
                                    tr { td { (kind) } td { (name) } td { (o.count) } td { (when(o.first)) } td { (when(o.last)) } }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Messages" }
            p id="user-messages" {
                @if let Some(n) = sent_recently { (n) " messages sent in the last 30 days." }
                @else { span class="muted" { "Not indexed yet." } }
            }
            @if !messages.is_empty() {
                table id="user-recent-messages" {
                    caption { "The newest " (messages.len()) " messages, newest first" }
                    thead { tr { th { "From" } th { "Channel" } th { "State" } th { "When" } } }
                    tbody {
                        @for m in &messages {
                            tr {
                                td { @if let Some(href) = &m.link { a href=(href) { (m.source) } } @else { (m.source) } }
                                td { (m.channel) }
                                td { span class=(if m.state == "sent" { "badge ok" } else if m.state == "failed" { "badge bad" } else { "badge" }) { (m.state) } }
                                td { @if !m.sent { span class="muted" { "due " } } (when(m.at)) }
                            }
                        }
                    }
                }
            }
            h2 { "Segments" }
            @if segments_in.is_empty() { p class="muted" { "In no segment." } } @else {
                ul id="user-segments" {
                    @for s in &segments_in {
                        li { a href=(ctx.url(&["/segments/", &segment(&s.id)].concat())) { (s.name) } }
                    }
                }
            }
        }
    };
    Ok((
        status,
        layout::page(&ctx, Section::Users, "User lookup", body),
    )
        .into_response())
}
