//! Planning a dispatch: which user gets which variant (or the control group), what is written
//! for each (a receipt, a queued job, an EnrollInControl event), as the store's [`NewSend`]s.
//!
//! Pure apart from the user records it is handed: the trigger engine, the scheduler and the
//! API sends all plan through here, so the rules (sticky assignment, receipts for
//! re-eligibility, control enrolment) are written once.

use std::collections::HashMap;

use tideway_core::campaigns::{Assignment, CampaignDefinition};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{EventId, UserSeq};
use tideway_core::message_events::{MessageSource, Origin};
use tideway_core::profile::UserRecord;
use tideway_core::store::{CampaignRecord, DispatchRecord, NewSend, Receipt, SendJob};

/// The key a user's variant assignment hashes: the user's `seq`, stable for the user's life
/// in the workspace (a merge keeps the survivor's).
pub fn assignment_key(user: UserSeq) -> String {
    user.0.to_string()
}

/// Users of `users` that the campaign would put in its control group (their records are
/// needed for the EnrollInControl event).
pub fn control_users(
    campaign: &CampaignRecord,
    definition: &CampaignDefinition,
    users: &[UserSeq],
) -> Vec<UserSeq> {
    users
        .iter()
        .copied()
        .filter(|u| {
            matches!(
                definition.assign(&campaign.id, &assignment_key(*u)),
                Assignment::Control(_)
            )
        })
        .collect()
}

/// One recipient of a campaign dispatch: who, and their own properties (JSON object text).
#[derive(Debug, Clone)]
pub struct Recipient {
    pub user: UserSeq,
    pub properties: Option<String>,
    /// This recipient's own due time (a local-time occurrence), instead of the dispatch's.
    pub due_at: Option<Millis>,
}

/// A campaign dispatch being planned: the campaign, its parsed definition, the dispatch and
/// the workspace's `app_group_id` (for control-group events).
#[derive(Clone, Copy)]
pub struct CampaignDispatch<'a> {
    pub campaign: &'a CampaignRecord,
    pub definition: &'a CampaignDefinition,
    pub dispatch: &'a DispatchRecord,
    pub app_group_id: &'a str,
}

/// Items of one campaign dispatch for `recipients`. Control-group users need their record in
/// `records` (others are skipped: they were deleted). Every item takes the campaign receipt.
pub fn campaign_items(
    planned: CampaignDispatch<'_>,
    recipients: &[Recipient],
    records: &HashMap<UserSeq, UserRecord>,
    due_at: Millis,
    now: Millis,
) -> Vec<NewSend> {
    let CampaignDispatch {
        campaign,
        definition,
        dispatch,
        app_group_id,
    } = planned;
    let receipt = Receipt {
        campaign_id: campaign.id.clone(),
        reeligible_after_ms: definition.reeligible_after_secs.map(|s| s * 1_000),
    };
    let mut items = Vec::with_capacity(recipients.len());
    for r in recipients {
        match definition.assign(&campaign.id, &assignment_key(r.user)) {
            Assignment::Variant(v) => items.push(NewSend {
                user: r.user,
                receipt: Some(receipt.clone()),
                job: Some(SendJob {
                    dispatch_id: dispatch.id.clone(),
                    variant: v.id.clone(),
                    due_at: r.due_at.unwrap_or(due_at),
                    properties: r.properties.clone(),
                }),
                events: Vec::new(),
            }),
            Assignment::Control(control_id) => {
                let Some(user) = records.get(&r.user) else {
                    continue;
                };
                let dispatch_id = if dispatch.per_user_ids {
                    tideway_core::campaigns::user_dispatch_id(&dispatch.id, user.braze_id.as_str())
                } else {
                    dispatch.id.clone()
                };
                let source = MessageSource {
                    app_group_id,
                    app_id: None,
                    origin: Origin::Campaign {
                        campaign_id: &campaign.id,
                        campaign_name: Some(&campaign.name),
                        message_variation_id: Some(control_id),
                        message_variation_name: Some("Control"),
                    },
                    dispatch_id: Some(&dispatch_id),
                    send_id: dispatch.send_id.as_deref(),
                };
                let event_user = EventUser {
                    braze_id: &user.braze_id,
                    external_id: user.external_id.as_ref(),
                    device_id: None,
                    time_zone: user.time_zone(),
                };
                items.push(NewSend {
                    user: r.user,
                    receipt: Some(receipt.clone()),
                    job: None,
                    events: vec![CurrentsEvent::campaign_enroll_in_control(
                        EventId(uuid::Uuid::new_v4().hyphenated().to_string()),
                        now,
                        &event_user,
                        &source,
                    )],
                });
            }
        }
    }
    items
}

/// Items of an ad-hoc dispatch (`/messages/send`): every variant (one per channel) to every
/// recipient, no receipts.
pub fn adhoc_items(
    definition: &CampaignDefinition,
    dispatch: &DispatchRecord,
    recipients: &[Recipient],
    due_at: Millis,
) -> Vec<NewSend> {
    let mut items = Vec::with_capacity(recipients.len() * definition.variants.len());
    for r in recipients {
        for v in &definition.variants {
            items.push(NewSend {
                user: r.user,
                receipt: None,
                job: Some(SendJob {
                    dispatch_id: dispatch.id.clone(),
                    variant: v.id.clone(),
                    due_at: r.due_at.unwrap_or(due_at),
                    properties: r.properties.clone(),
                }),
                events: Vec::new(),
            });
        }
    }
    items
}

/// A fresh dispatch id: 32 lowercase hex digits, like Braze's.
pub fn new_dispatch_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The workspace's `app_group_id`, which control-group and conversion events carry (empty for
/// a workspace deleted meanwhile).
pub(crate) async fn app_group_id<S: tideway_core::store::AdminStore + ?Sized>(
    store: &S,
    ws: tideway_core::ids::WorkspaceId,
) -> Result<String, tideway_core::store::StoreError> {
    Ok(store
        .list_workspaces()
        .await?
        .into_iter()
        .find(|w| w.id == ws)
        .map(|w| w.app_group_id)
        .unwrap_or_default())
}
