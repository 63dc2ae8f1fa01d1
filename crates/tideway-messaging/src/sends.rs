//! Sends asked for through the API: `/campaigns/trigger/send` (an API-triggered campaign to
//! named recipients or to its audience) and `/messages/send` (an ad-hoc message without a
//! stored campaign), now or at a scheduled time.
//!
//! Recipients are resolved to users in one read; named recipients who are not in the
//! campaign's audience (or the request's own) are not sent to, as Braze does; a broadcast is a
//! dispatch expanded to the audience by the scheduler, in chunks. The HTTP edge parses and
//! checks the wire format and maps [`SendError`] to Braze's messages.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tideway_core::campaigns::{CampaignDefinition, CampaignStatus, Delivery};
use tideway_core::clock::Millis;
use tideway_core::ids::{BrazeId, Email, ExternalId, UserAlias, UserSeq};
use tideway_core::store::{
    DispatchRecord, DispatchSource, Enqueue, Lookup, StoreError, UserStore, Workspace, read_unit,
};
use tideway_segment::Filter;

use crate::audience::{Audiences, audience_filter, narrowed};
use crate::dispatcher::DispatchStore;
use crate::plan::{self, Recipient};

/// How a request names a recipient.
#[derive(Debug, Clone, PartialEq)]
pub enum RecipientId {
    External(ExternalId),
    Alias(UserAlias),
    Braze(BrazeId),
    /// Every profile with this address (Braze's `prioritization` picks one; Tideway sends to
    /// the most recently updated).
    Email(Email),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiRecipient {
    pub id: RecipientId,
    /// The recipient's own `trigger_properties` (override the request's on key clash).
    pub properties: Option<Map<String, Value>>,
}

/// Who a request targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Recipients(Vec<ApiRecipient>),
    /// Everyone in the audience (`broadcast: true`, or a `segment_id` / `audience` alone).
    Broadcast,
}

/// A send through the API, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSend {
    pub send_id: Option<String>,
    /// The request's `trigger_properties`.
    pub properties: Option<Map<String, Value>>,
    pub target: Target,
    /// The request's own audience (`audience` or `segment_id`), in the segment language.
    pub audience: Option<Value>,
    /// When to send; now when `None`.
    pub at: Option<Millis>,
}

/// Why a send request was refused (nothing was queued).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    #[error("Invalid Campaign ID")]
    InvalidCampaign,
    #[error("the campaign is {0}; launch it to send")]
    NotActive(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatched {
    pub dispatch_id: String,
    /// Jobs queued now (a broadcast's are queued by its expansion, after the answer).
    pub queued: u64,
    /// Named recipients that did not resolve to a user.
    pub not_found: usize,
    /// Named recipients outside the audience.
    pub outside_audience: usize,
    /// Recipients that already received the campaign and are not re-eligible.
    pub ineligible: u64,
}

/// Resolves named recipients to users (in one read): `(user, own properties)`, in request
/// order, duplicates merged (the first one's properties win), and how many did not resolve.
pub async fn resolve<S: UserStore + ?Sized>(
    store: &S,
    workspace: &Workspace,
    recipients: Vec<ApiRecipient>,
) -> Result<(Vec<(UserSeq, Option<Map<String, Value>>)>, usize), StoreError> {
    read_unit(store, workspace.id, move |tx| {
        let keys: Vec<Lookup<'_>> = recipients
            .iter()
            .map(|r| match &r.id {
                RecipientId::External(id) => Lookup::External(id),
                RecipientId::Alias(a) => Lookup::Alias(a),
                RecipientId::Braze(b) => Lookup::Braze(b),
                RecipientId::Email(e) => Lookup::Email(e),
            })
            .collect();
        tx.prefetch(&keys)?;
        let mut out: Vec<(UserSeq, Option<Map<String, Value>>)> = Vec::new();
        let mut missing = 0;
        for r in &recipients {
            let seq = match &r.id {
                RecipientId::External(id) => tx.seq_by_external_id(id)?,
                RecipientId::Alias(a) => tx.seq_by_alias(a)?,
                RecipientId::Braze(b) => tx.user_by_braze_id(b)?.map(|u| u.seq),
                RecipientId::Email(e) => tx.users_by_email(e)?.first().map(|u| u.seq),
            };
            match seq {
                Some(seq) if !out.iter().any(|(s, _)| *s == seq) => {
                    out.push((seq, r.properties.clone()))
                }
                Some(_) => {}
                None => missing += 1,
            }
        }
        Ok((out, missing))
    })
    .await
}

fn object_text(map: &Option<Map<String, Value>>) -> Option<String> {
    map.as_ref().map(|m| Value::Object(m.clone()).to_string())
}

/// `/campaigns/trigger/send` (and its scheduled form): an API-triggered campaign.
pub async fn trigger_campaign<S: DispatchStore + UserStore + ?Sized>(
    store: &S,
    audiences: &dyn Audiences,
    workspace: &Workspace,
    campaign_id: &str,
    send: ApiSend,
    now: Millis,
) -> Result<Dispatched, SendError> {
    let campaign = store
        .campaign(workspace.id, campaign_id)
        .await?
        .ok_or(SendError::InvalidCampaign)?;
    let def = CampaignDefinition::load(&campaign.definition)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if !matches!(def.delivery, Delivery::ApiTriggered) {
        return Err(SendError::InvalidCampaign);
    }
    match campaign.status {
        CampaignStatus::Active => {}
        other => return Err(SendError::NotActive(other.as_str())),
    }
    let dispatch = DispatchRecord {
        id: plan::new_dispatch_id(),
        workspace: workspace.id,
        source: DispatchSource::Campaign {
            campaign_id: campaign.id.clone(),
        },
        send_id: send.send_id.clone(),
        per_user_ids: true,
        properties: object_text(&send.properties),
        audience: send.audience.clone(),
        created_at: now,
        expanding_after: None,
        // Marks a scheduled send as one (so its schedule can be moved or deleted) whether it
        // expands an audience then or names its recipients now.
        not_before: send.at,
    };
    let due_at = send.at.unwrap_or(now);
    match send.target {
        Target::Broadcast => {
            let dispatch = DispatchRecord {
                expanding_after: Some(UserSeq(0)),
                ..dispatch
            };
            store
                .enqueue(
                    workspace.id,
                    Enqueue {
                        dispatches: vec![dispatch.clone()],
                        ..Enqueue::default()
                    },
                )
                .await?;
            Ok(Dispatched {
                dispatch_id: dispatch.id,
                queued: 0,
                not_found: 0,
                outside_audience: 0,
                ineligible: 0,
            })
        }
        Target::Recipients(recipients) => {
            let (users, not_found) = resolve(store, workspace, recipients).await?;
            let filter = narrowed(audience_filter(&def.audience)?, send.audience.as_ref())?;
            let seqs: Vec<UserSeq> = users.iter().map(|(u, _)| *u).collect();
            let mut sorted = seqs.clone();
            sorted.sort_unstable();
            let inside = audiences.matching(workspace.id, filter, sorted).await?;
            let recipients: Vec<Recipient> = users
                .iter()
                .filter(|(u, _)| inside.binary_search(u).is_ok())
                .map(|(u, props)| Recipient {
                    user: *u,
                    properties: object_text(props),
                    due_at: None,
                })
                .collect();
            let outside_audience = users.len() - recipients.len();
            let controls = plan::control_users(
                &campaign,
                &def,
                &recipients.iter().map(|r| r.user).collect::<Vec<_>>(),
            );
            let records: HashMap<_, _> = if controls.is_empty() {
                HashMap::new()
            } else {
                store
                    .users_by_seq(workspace.id, controls)
                    .await?
                    .into_iter()
                    .map(|u| (u.seq, u))
                    .collect()
            };
            let items = plan::campaign_items(
                plan::CampaignDispatch {
                    campaign: &campaign,
                    definition: &def,
                    dispatch: &dispatch,
                    app_group_id: &workspace.app_group_id,
                },
                &recipients,
                &records,
                due_at,
                now,
            );
            let outcome = store
                .enqueue(
                    workspace.id,
                    Enqueue {
                        dispatches: vec![dispatch.clone()],
                        items,
                        ..Enqueue::default()
                    },
                )
                .await?;
            Ok(Dispatched {
                dispatch_id: dispatch.id,
                queued: outcome.queued,
                not_found,
                outside_audience,
                ineligible: outcome.ineligible,
            })
        }
    }
}

/// `/messages/send` (and its scheduled form): `definition` is the canonical JSON of an ad-hoc
/// definition (one variant per channel, see [`adhoc_definition`]).
pub async fn send_messages<S: DispatchStore + UserStore + ?Sized>(
    store: &S,
    audiences: &dyn Audiences,
    workspace: &Workspace,
    definition: Value,
    send: ApiSend,
    now: Millis,
) -> Result<Dispatched, SendError> {
    let def =
        CampaignDefinition::load(&definition).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let broadcast = matches!(send.target, Target::Broadcast);
    let dispatch = DispatchRecord {
        id: plan::new_dispatch_id(),
        workspace: workspace.id,
        source: DispatchSource::AdHoc { definition },
        send_id: send.send_id.clone(),
        per_user_ids: !broadcast,
        properties: object_text(&send.properties),
        audience: send.audience.clone(),
        created_at: now,
        expanding_after: broadcast.then_some(UserSeq(0)),
        not_before: send.at,
    };
    let due_at = send.at.unwrap_or(now);
    let Target::Recipients(recipients) = send.target else {
        store
            .enqueue(
                workspace.id,
                Enqueue {
                    dispatches: vec![dispatch.clone()],
                    ..Enqueue::default()
                },
            )
            .await?;
        return Ok(Dispatched {
            dispatch_id: dispatch.id,
            queued: 0,
            not_found: 0,
            outside_audience: 0,
            ineligible: 0,
        });
    };
    let (users, not_found) = resolve(store, workspace, recipients).await?;
    let inside: Vec<UserSeq> = match &send.audience {
        Some(extra) => {
            let filter = Filter::from_json(extra)
                .map_err(|e| StoreError::Corrupt(format!("request audience: {e}")))?;
            let mut sorted: Vec<UserSeq> = users.iter().map(|(u, _)| *u).collect();
            sorted.sort_unstable();
            audiences.matching(workspace.id, filter, sorted).await?
        }
        None => {
            let mut all: Vec<UserSeq> = users.iter().map(|(u, _)| *u).collect();
            all.sort_unstable();
            all
        }
    };
    let recipients: Vec<Recipient> = users
        .iter()
        .filter(|(u, _)| inside.binary_search(u).is_ok())
        .map(|(u, props)| Recipient {
            user: *u,
            properties: object_text(props),
            due_at: None,
        })
        .collect();
    let outside_audience = users.len() - recipients.len();
    let items = plan::adhoc_items(&def, &dispatch, &recipients, due_at);
    let outcome = store
        .enqueue(
            workspace.id,
            Enqueue {
                dispatches: vec![dispatch.clone()],
                items,
                ..Enqueue::default()
            },
        )
        .await?;
    Ok(Dispatched {
        dispatch_id: dispatch.id,
        queued: outcome.queued,
        not_found,
        outside_audience,
        ineligible: outcome.ineligible,
    })
}

/// Credits an ad-hoc definition to the API campaign a `/messages/send` named with
/// `campaign_id` (braze-api.md: "needed for stats"): its messages' events carry the campaign's
/// id and name and the variation's id and name, so they count in the campaign's stats and its
/// send id's series like the campaign's own sends. `variation_name` names each variation id.
pub fn credit_to_campaign(
    definition: &mut Value,
    campaign_id: &str,
    campaign_name: &str,
    variation_name: impl Fn(&str) -> Option<String>,
) {
    let Value::Object(fields) = definition else {
        return;
    };
    if let Some(Value::Array(variants)) = fields.get_mut("messages") {
        for variant in variants.iter_mut().filter_map(Value::as_object_mut) {
            let name = variant
                .get("id")
                .and_then(Value::as_str)
                .and_then(&variation_name);
            if let Some(name) = name {
                variant.insert("name".into(), Value::String(name));
            }
        }
    }
    fields.insert(
        "campaign".into(),
        serde_json::json!({"id": campaign_id, "name": campaign_name}),
    );
}

/// The campaign an ad-hoc definition is credited to ([`credit_to_campaign`]): its id and name.
pub fn credited_campaign(definition: &Value) -> Option<(&str, &str)> {
    let campaign = definition.get("campaign")?;
    Some((
        campaign.get("id")?.as_str()?,
        campaign
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    ))
}

/// The canonical ad-hoc definition for `/messages/send`'s `messages` object: one variant per
/// channel given (`email`, `webhook`), in the campaign JSON shape, audience and delivery
/// left to the request. Returns the JSON and the channels Tideway does not support (named in
/// the answer's `errors`), or the first problem with a message.
pub fn adhoc_definition(
    messages: &Map<String, Value>,
) -> Result<(Value, Vec<String>), tideway_core::campaigns::DefinitionError> {
    let mut variants = Vec::new();
    let mut unsupported = Vec::new();
    let mut first = true;
    for (channel, body) in messages {
        let mut variant = match body {
            Value::Object(o) => o.clone(),
            _ => {
                return Err(tideway_core::campaigns::DefinitionError {
                    path: format!("messages.{channel}"),
                    message: "must be an object".into(),
                });
            }
        };
        match channel.as_str() {
            "email" | "webhook" => {}
            other => {
                unsupported.push(format!("unsupported channel: {other}"));
                continue;
            }
        }
        let id = variant
            .get("message_variation_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{channel}-{}", plan::new_dispatch_id()));
        variant.insert("id".into(), Value::String(id));
        variant.insert("channel".into(), Value::String(channel.clone()));
        variant.insert("percent".into(), Value::from(if first { 100 } else { 0 }));
        first = false;
        variants.push(Value::Object(variant));
    }
    if variants.is_empty() {
        return Err(tideway_core::campaigns::DefinitionError {
            path: "messages".into(),
            message: "No message to send".into(),
        });
    }
    let raw = serde_json::json!({
        "messages": variants,
        "delivery": {"type": "api_triggered"},
        "frequency_capping": false,
    });
    let (_, canonical) = CampaignDefinition::parse(&raw, plan::new_dispatch_id)?;
    Ok((canonical, unsupported))
}
