//! Campaign stats, derived from the messaging Currents events themselves.
//!
//! Every send, delivery, bounce, open, click, unsubscribe, conversion, abort and control-group
//! enrollment is already a Currents event in the log, written in the transaction that made it
//! happen. The stats are those events counted by campaign: the trigger engine, which follows
//! the log anyway, turns each stretch it reads into [`StatIncrement`]s and commits them with
//! its cursor's compare-and-set, so each event is counted exactly once, on any number of nodes,
//! without a counter write on the send path. Unique opens and clicks count a user once per
//! campaign (the store keeps who was counted).

use serde::Deserialize;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::UserSeq;
use tideway_core::store::{CampaignStat, StatIncrement};

/// What one logged event adds to its campaign's stats (nothing for events of no campaign).
pub fn increments(user: Option<UserSeq>, event: &CurrentsEvent) -> Vec<StatIncrement> {
    let kind = event.event_type.as_str();
    let stats: &[(CampaignStat, bool)] = match kind {
        "users.messages.email.Send" | "users.messages.webhook.Send" => {
            &[(CampaignStat::Sends, false)]
        }
        "users.messages.email.Delivery" => &[(CampaignStat::Deliveries, false)],
        "users.messages.email.Bounce" => &[(CampaignStat::Bounces, false)],
        "users.messages.email.SoftBounce" => &[(CampaignStat::SoftBounces, false)],
        "users.messages.email.Open" => &[
            (CampaignStat::Opens, false),
            (CampaignStat::UniqueOpens, true),
        ],
        "users.messages.email.Click" => &[
            (CampaignStat::Clicks, false),
            (CampaignStat::UniqueClicks, true),
        ],
        "users.messages.email.Unsubscribe" => &[(CampaignStat::Unsubscribes, false)],
        "users.campaigns.Conversion" => &[(CampaignStat::Conversions, false)],
        "users.messages.email.Abort" | "users.messages.webhook.Abort" => {
            &[(CampaignStat::Aborts, false)]
        }
        "users.messages.webhook.Failure" => &[(CampaignStat::Failures, false)],
        "users.campaigns.EnrollInControl" => &[(CampaignStat::ControlGroup, false)],
        _ => return Vec::new(),
    };
    // Only the two properties this needs, not the whole body as a `Value`: this runs for
    // every messaging event in the log.
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        properties: Properties,
    }
    #[derive(Deserialize, Default)]
    struct Properties {
        campaign_id: Option<String>,
        is_terminal: Option<bool>,
    }
    let Ok(body) = serde_json::from_str::<Body>(&event.body) else {
        return Vec::new();
    };
    let Some(campaign_id) = body.properties.campaign_id else {
        return Vec::new();
    };
    // A webhook failure counts once, when it is final.
    if kind == "users.messages.webhook.Failure" && body.properties.is_terminal != Some(true) {
        return Vec::new();
    }
    stats
        .iter()
        .filter_map(|&(stat, unique)| {
            let unique_user = if unique { Some(user?) } else { None };
            Some(StatIncrement {
                campaign_id: campaign_id.clone(),
                stat,
                unique_user,
            })
        })
        .collect()
}
