//! Campaign stats, derived from the messaging Currents events themselves.
//!
//! Every send, delivery, bounce, open, click, unsubscribe, conversion, abort and control-group
//! enrollment is already a Currents event in the log, written in the transaction that made it
//! happen. The stats are those events counted by campaign: the trigger engine, which follows
//! the log anyway, turns each stretch it reads into [`StatIncrement`]s and commits them with
//! its cursor's compare-and-set, so each event is counted exactly once, on any number of nodes,
//! without a counter write on the send path. Unique opens and clicks count a user once per
//! campaign (the store keeps who was counted).
//!
//! Events that name a `send_id` (sends through the API with one) are counted a second time into
//! that send id's **daily series** (`GET /sends/data_series`): per UTC day of the event, per
//! channel and variation (its id), and the day's totals. There the unique figures (opens,
//! clicks, recipients) count a user once per day.

use serde::Deserialize;
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::UserSeq;
use tideway_core::store::{
    CampaignStat, SendSeriesKey, SendStat, SendStatIncrement, StatIncrement,
};

/// Milliseconds in a UTC day.
const DAY_MS: i64 = 86_400_000;

/// What one logged event adds to the counted figures.
#[derive(Debug, Default, PartialEq)]
pub struct Increments {
    /// To its campaign's stats.
    pub stats: Vec<StatIncrement>,
    /// To its `send_id`'s daily series, when it names one (`GET /sends/data_series`).
    pub send_stats: Vec<SendStatIncrement>,
}

/// What one logged event adds to its campaign's stats and its send id's series (nothing for
/// events of no campaign).
pub fn increments(user: Option<UserSeq>, event: &CurrentsEvent) -> Increments {
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
        _ => return Increments::default(),
    };
    // Only the properties this needs, not the whole body as a `Value`: this runs for every
    // messaging event in the log.
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        properties: Properties,
    }
    #[derive(Deserialize, Default)]
    struct Properties {
        campaign_id: Option<String>,
        is_terminal: Option<bool>,
        send_id: Option<String>,
        message_variation_id: Option<String>,
        message_variation_name: Option<String>,
    }
    let Ok(body) = serde_json::from_str::<Body>(&event.body) else {
        return Increments::default();
    };
    let Properties {
        campaign_id: Some(campaign_id),
        is_terminal,
        send_id,
        message_variation_id,
        message_variation_name,
    } = body.properties
    else {
        return Increments::default();
    };
    // A webhook failure counts once, when it is final.
    if kind == "users.messages.webhook.Failure" && is_terminal != Some(true) {
        return Increments::default();
    }
    let send_stats = match send_id {
        Some(send_id) => {
            // Keyed by the variation's id: names may repeat and change; the answer names it.
            let variation = message_variation_id.or(message_variation_name);
            send_increments(kind, user, event.time, &campaign_id, send_id, variation)
        }
        None => Vec::new(),
    };
    let stats = stats
        .iter()
        .filter_map(|&(stat, unique)| {
            let unique_user = if unique { Some(user?) } else { None };
            Some(StatIncrement {
                campaign_id: campaign_id.clone(),
                stat,
                unique_user,
            })
        })
        .collect();
    Increments { stats, send_stats }
}

/// What an event of `kind` naming `send_id` adds to that send id's series on its UTC day: the
/// channel's figures under its variation, and the day's totals (unique recipients,
/// conversions). A conversion names no channel, so it counts in the day's totals only.
fn send_increments(
    kind: &str,
    user: Option<UserSeq>,
    time_secs: i64,
    campaign_id: &str,
    send_id: String,
    variation: Option<String>,
) -> Vec<SendStatIncrement> {
    let (channel, figures): (&str, &[(SendStat, bool)]) = match kind {
        "users.messages.email.Send" => ("email", &[(SendStat::Sent, false)]),
        "users.messages.webhook.Send" => ("webhook", &[(SendStat::Sent, false)]),
        "users.messages.email.Delivery" => ("email", &[(SendStat::Delivered, false)]),
        "users.messages.email.Bounce" => ("email", &[(SendStat::Bounces, false)]),
        "users.messages.email.Open" => (
            "email",
            &[(SendStat::Opens, false), (SendStat::UniqueOpens, true)],
        ),
        "users.messages.email.Click" => (
            "email",
            &[(SendStat::Clicks, false), (SendStat::UniqueClicks, true)],
        ),
        "users.messages.email.Unsubscribe" => ("email", &[(SendStat::Unsubscribes, false)]),
        "users.messages.webhook.Failure" => ("webhook", &[(SendStat::Errors, false)]),
        "users.campaigns.Conversion" => ("", &[(SendStat::Conversions, false)]),
        _ => return Vec::new(),
    };
    let day = Millis(Millis::from_secs(time_secs).0.div_euclid(DAY_MS) * DAY_MS);
    let key = |channel: &str, variation: &str| SendSeriesKey {
        campaign_id: campaign_id.to_owned(),
        send_id: send_id.clone(),
        day,
        channel: channel.to_owned(),
        variation: variation.to_owned(),
    };
    let (channel_key, totals_key) = (
        key(channel, variation.as_deref().unwrap_or_default()),
        key("", ""),
    );
    let mut out: Vec<SendStatIncrement> = figures
        .iter()
        .filter_map(|&(stat, unique)| {
            let unique_user = if unique { Some(user?) } else { None };
            Some(SendStatIncrement {
                key: if channel.is_empty() {
                    totals_key.clone()
                } else {
                    channel_key.clone()
                },
                stat,
                unique_user,
            })
        })
        .collect();
    if kind.ends_with(".Send")
        && let Some(user) = user
    {
        for key in [channel_key, totals_key] {
            out.push(SendStatIncrement {
                key,
                stat: SendStat::UniqueRecipients,
                unique_user: Some(user),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tideway_core::currents::EventType;
    use tideway_core::ids::EventId;

    /// An event of `kind` at `time` (Unix seconds) with these properties.
    fn logged(kind: &str, time: i64, properties: serde_json::Value) -> CurrentsEvent {
        CurrentsEvent {
            id: EventId("e".into()),
            event_type: EventType::parse(kind).unwrap(),
            time,
            body: json!({"event_type": kind, "properties": properties}).to_string(),
        }
    }

    fn keyed(channel: &str, variation: &str) -> SendSeriesKey {
        SendSeriesKey {
            campaign_id: "c".into(),
            send_id: "s".into(),
            // 2026-12-06T00:00:00Z: the UTC day of every event below.
            day: Millis(1_796_515_200_000),
            channel: channel.into(),
            variation: variation.into(),
        }
    }

    fn series(kind: &str, properties: serde_json::Value) -> Vec<(SendSeriesKey, SendStat, bool)> {
        // 2026-12-06T23:59:59Z, the day's last second.
        increments(Some(UserSeq(7)), &logged(kind, 1_796_601_599, properties))
            .send_stats
            .into_iter()
            .map(|s| (s.key, s.stat, s.unique_user.is_some()))
            .collect()
    }

    /// Events naming a send id count into its series on their UTC day, under their channel
    /// and variation id (not its name, which may repeat or change); a send also counts its user once among the
    /// variation's and the day's unique recipients; a conversion counts in the day's totals;
    /// an event without a send id counts in the campaign's stats only.
    #[test]
    fn send_id_events_count_into_the_days_series() {
        let named = json!({"campaign_id": "c", "send_id": "s", "message_variation_id": "v1", "message_variation_name": "Blue"});
        assert_eq!(
            series("users.messages.email.Send", named.clone()),
            [
                (keyed("email", "v1"), SendStat::Sent, false),
                (keyed("email", "v1"), SendStat::UniqueRecipients, true),
                (keyed("", ""), SendStat::UniqueRecipients, true),
            ]
        );
        assert_eq!(
            series("users.messages.email.Click", named.clone()),
            [
                (keyed("email", "v1"), SendStat::Clicks, false),
                (keyed("email", "v1"), SendStat::UniqueClicks, true),
            ]
        );
        let unnamed = json!({"campaign_id": "c", "send_id": "s", "message_variation_id": "v1"});
        assert_eq!(
            series("users.messages.webhook.Send", unnamed.clone()),
            [
                (keyed("webhook", "v1"), SendStat::Sent, false),
                (keyed("webhook", "v1"), SendStat::UniqueRecipients, true),
                (keyed("", ""), SendStat::UniqueRecipients, true),
            ]
        );
        assert_eq!(
            series("users.campaigns.Conversion", named.clone()),
            [(keyed("", ""), SendStat::Conversions, false)]
        );
        // A webhook failure counts as an error once, when it is final.
        let mut failing = unnamed.clone();
        failing["is_terminal"] = json!(false);
        assert!(series("users.messages.webhook.Failure", failing.clone()).is_empty());
        failing["is_terminal"] = json!(true);
        assert_eq!(
            series("users.messages.webhook.Failure", failing),
            [(keyed("webhook", "v1"), SendStat::Errors, false)]
        );
        // No send id: campaign stats only. No campaign: nothing.
        let plain = increments(
            Some(UserSeq(7)),
            &logged(
                "users.messages.email.Send",
                1_796_601_599,
                json!({"campaign_id": "c"}),
            ),
        );
        assert!(plain.send_stats.is_empty());
        assert_eq!(plain.stats.len(), 1);
        assert_eq!(
            series("users.messages.email.Send", json!({"send_id": "s"})),
            []
        );
        // The next second is the next day.
        let next = increments(
            Some(UserSeq(7)),
            &logged("users.messages.email.Open", 1_796_601_600, named),
        );
        assert_eq!(next.send_stats[0].key.day, Millis(1_796_601_600_000));
    }
}
