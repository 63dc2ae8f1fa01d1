//! The variables a message sees ([`Vars`]) built from a user's profile, the trigger's
//! properties and the campaign, in Braze's namespaces (`braze-messaging.md` §7).

use serde_json::{Map, Value, json};
use tideway_core::profile::{StandardField, UserRecord};

use crate::liquid::Vars;

/// What a campaign message knows about where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct CampaignVars<'a> {
    pub campaign_id: Option<&'a str>,
    pub campaign_name: Option<&'a str>,
    pub dispatch_id: &'a str,
    pub variant_id: &'a str,
    pub variant_name: &'a str,
}

/// The standard attributes under their Liquid names.
fn standard(user: &UserRecord) -> Map<String, Value> {
    let mut out = Map::new();
    let field = |f: StandardField| user.profile.standard.get(&f).cloned();
    for (name, f) in [
        ("first_name", StandardField::FirstName),
        ("last_name", StandardField::LastName),
        ("city", StandardField::HomeCity),
        ("country", StandardField::Country),
        ("language", StandardField::Language),
        ("time_zone", StandardField::TimeZone),
        ("gender", StandardField::Gender),
        ("date_of_birth", StandardField::Dob),
    ] {
        if let Some(v) = field(f) {
            out.insert(name.into(), v);
        }
    }
    if let Some(email) = &user.email {
        out.insert("email_address".into(), json!(email.as_str()));
    }
    if let Some(phone) = &user.phone {
        out.insert("phone_number".into(), json!(phone.as_str()));
    }
    if let Some(id) = &user.external_id {
        out.insert("user_id".into(), json!(id.as_str()));
    }
    out.insert("braze_id".into(), json!(user.braze_id.as_str()));
    out.insert("random_bucket_number".into(), json!(user.random_bucket()));
    out
}

fn object(text: Option<&str>) -> Map<String, Value> {
    match text.and_then(|t| serde_json::from_str::<Value>(t).ok()) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// Everything one user's message may reference. `shared` are the dispatch's properties (an
/// API trigger's top-level `trigger_properties`), `own` the user's (a recipient's
/// `trigger_properties` override the shared ones; for action-based sends, the triggering
/// event's properties). `links` are the user's subscription URLs.
pub fn vars_for(
    user: &UserRecord,
    campaign: CampaignVars<'_>,
    shared: Option<&str>,
    own: Option<&str>,
    event_triggered: bool,
    links: Map<String, Value>,
) -> Vars {
    let mut properties = object(shared);
    for (k, v) in object(own) {
        properties.insert(k, v);
    }
    let mut campaign_map = Map::new();
    if let Some(id) = campaign.campaign_id {
        campaign_map.insert("api_id".into(), json!(id));
    }
    if let Some(name) = campaign.campaign_name {
        campaign_map.insert("name".into(), json!(name));
    }
    campaign_map.insert("dispatch_id".into(), json!(campaign.dispatch_id));
    campaign_map.insert("message_api_id".into(), json!(campaign.variant_id));
    campaign_map.insert("message_name".into(), json!(campaign.variant_name));
    let (event_properties, api_trigger_properties) = if event_triggered {
        (properties, Map::new())
    } else {
        (Map::new(), properties)
    };
    Vars {
        standard: standard(user),
        custom_attribute: user.profile.custom.clone(),
        event_properties,
        api_trigger_properties,
        campaign: campaign_map,
        links,
        ..Vars::default()
    }
}
