//! Partner cohorts: the technology-partner table, parsing of the partner cohort-import API
//! with Braze's exact error texts, and the membership rules.
//!
//! Rules (reference/braze-api.md §2): cohort import never creates users; unknown identifiers
//! are ignored; a `device_id` matches only a user who is still anonymous; identified users match
//! by `external_id` or alias; changes apply in array order with set semantics (adding a member
//! or removing a non-member is a no-op); at most 1,000 identifiers per request, checked before
//! anything is applied.

use serde_json::{Map, Value};

use crate::clock::{Millis, parse_datetime};
use crate::ids::{DeviceId, ExternalId, UserAlias, UserSeq};
use crate::store::{Lookup, SegmentSyncOutcome, SegmentSyncPage, StoreError, UserLookup};
use crate::track::parse_alias;

/// A technology partner that can import cohorts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partner {
    /// The `{partner}` path segment.
    pub slug: &'static str,
    pub display_name: &'static str,
    /// The segment filter's name in the dashboard ("Heap Cohorts").
    pub filter_name: &'static str,
}

pub const PARTNERS: [Partner; 6] = [
    Partner {
        slug: "heap",
        display_name: "Heap",
        filter_name: "Heap Cohorts",
    },
    Partner {
        slug: "amplitude",
        display_name: "Amplitude",
        filter_name: "Amplitude Cohorts",
    },
    Partner {
        slug: "mixpanel",
        display_name: "Mixpanel",
        filter_name: "Mixpanel Cohorts",
    },
    Partner {
        slug: "segment",
        display_name: "Segment",
        filter_name: "Segment Cohorts",
    },
    Partner {
        slug: "census",
        display_name: "Census",
        filter_name: "Census Cohorts",
    },
    Partner {
        slug: "hightouch",
        display_name: "Hightouch",
        filter_name: "Hightouch Cohorts",
    },
];

pub fn partner(slug: &str) -> Option<Partner> {
    PARTNERS.into_iter().find(|p| p.slug == slug)
}

/// Most identifiers one `/cohorts/users` request may carry.
pub const MAX_IDENTIFIERS_PER_REQUEST: usize = 1_000;

/// The partner API's errors, with Braze's documented texts (braze-api.md §2.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CohortApiError {
    #[error("cohort_id must be a valid string")]
    InvalidCohortId,
    #[error(
        "cohort_changes must be an array of objects each with key user_ids and/or device_ids mapping to an array of strings, or an aliases object"
    )]
    InvalidChanges,
    #[error("Only 1,000 user_ids, device_ids, and aliases are allowed per request")]
    TooManyIdentifiers,
    #[error("name must be a non-empty string")]
    InvalidName,
    /// Our choice (Braze documents no bound): the names other APIs take, at most 255 characters.
    #[error("name must be at most 255 characters")]
    NameTooLong,
    #[error("created_at must be a valid time as an ISO-8601 string")]
    InvalidCreatedAt,
    #[error("Invalid Partner API key")]
    InvalidPartnerKey,
    #[error("Invalid client secret")]
    InvalidClientSecret,
    #[error("Partner not enabled for client with client secret: {0}")]
    PartnerNotEnabled(String),
    #[error("Unauthorized access")]
    Unauthorized,
    #[error("Resource locked")]
    Locked,
}

impl CohortApiError {
    /// The HTTP status Braze documents for it.
    pub fn status(&self) -> u16 {
        match self {
            CohortApiError::InvalidCohortId
            | CohortApiError::InvalidChanges
            | CohortApiError::TooManyIdentifiers
            | CohortApiError::InvalidName
            | CohortApiError::NameTooLong
            | CohortApiError::InvalidCreatedAt => 400,
            CohortApiError::InvalidPartnerKey
            | CohortApiError::InvalidClientSecret
            | CohortApiError::PartnerNotEnabled(_)
            | CohortApiError::Unauthorized => 401,
            CohortApiError::Locked => 423,
        }
    }
}

/// A partner's cohort id: any non-blank string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CohortId(String);

impl CohortId {
    pub fn parse(raw: &str) -> Option<Self> {
        if raw.trim().is_empty()
            || raw.len() > crate::ids::MAX_IDENTIFIER_BYTES
            || raw.contains('\0')
        {
            None
        } else {
            Some(CohortId(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The two credentials every partner request carries in its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerCredentials {
    pub partner_api_key: String,
    pub client_secret: String,
}

/// Reads `partner_api_key` and `client_secret` (missing or non-string → the 401 texts).
pub fn parse_credentials(body: &Map<String, Value>) -> Result<PartnerCredentials, CohortApiError> {
    let partner_api_key = body
        .get("partner_api_key")
        .and_then(Value::as_str)
        .ok_or(CohortApiError::InvalidPartnerKey)?;
    let client_secret = body
        .get("client_secret")
        .and_then(Value::as_str)
        .ok_or(CohortApiError::InvalidClientSecret)?;
    Ok(PartnerCredentials {
        partner_api_key: partner_api_key.to_owned(),
        client_secret: client_secret.to_owned(),
    })
}

/// `POST /partners/{partner}/cohorts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortUpsert {
    pub cohort_id: CohortId,
    pub name: String,
    pub created_at: Millis,
}

pub fn parse_cohort_id(body: &Map<String, Value>) -> Result<CohortId, CohortApiError> {
    body.get("cohort_id")
        .and_then(Value::as_str)
        .and_then(CohortId::parse)
        .ok_or(CohortApiError::InvalidCohortId)
}

pub fn parse_upsert(body: &Map<String, Value>) -> Result<CohortUpsert, CohortApiError> {
    let cohort_id = parse_cohort_id(body)?;
    let name = match body.get("name").and_then(Value::as_str) {
        Some(n) if n.chars().count() > crate::MAX_DISPLAY_NAME_CHARS => {
            return Err(CohortApiError::NameTooLong);
        }
        Some(n) if !n.trim().is_empty() && !n.contains('\0') => n.to_owned(),
        _ => return Err(CohortApiError::InvalidName),
    };
    let created_at = body
        .get("created_at")
        .and_then(Value::as_str)
        .and_then(parse_datetime)
        .ok_or(CohortApiError::InvalidCreatedAt)?;
    Ok(CohortUpsert {
        cohort_id,
        name,
        created_at,
    })
}

/// One identifier in a change object. Identifiers that do not parse (blank strings) are kept
/// as `Unusable` so they are counted as ignored rather than failing the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CohortIdentifier {
    External(ExternalId),
    Device(DeviceId),
    Alias(UserAlias),
    Unusable,
}

/// One element of `cohort_changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortChange {
    pub identifiers: Vec<CohortIdentifier>,
    pub remove: bool,
}

/// Parses `cohort_changes`, enforcing the shape and the 1,000-identifier limit.
pub fn parse_changes(body: &Map<String, Value>) -> Result<Vec<CohortChange>, CohortApiError> {
    let items = match body.get("cohort_changes") {
        Some(Value::Array(items)) => items,
        _ => return Err(CohortApiError::InvalidChanges),
    };
    let mut changes = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for item in items {
        let obj = item.as_object().ok_or(CohortApiError::InvalidChanges)?;
        // A key set to null counts as absent (as everywhere in the change), so a change of
        // nulls is refused as an empty one is.
        if !["user_ids", "device_ids", "aliases"]
            .iter()
            .any(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        {
            return Err(CohortApiError::InvalidChanges);
        }
        let remove = match obj.get("should_remove") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(CohortApiError::InvalidChanges),
        };
        let mut identifiers = Vec::new();
        for s in string_list(obj.get("user_ids"))? {
            identifiers.push(
                ExternalId::parse(s).map_or(CohortIdentifier::Unusable, CohortIdentifier::External),
            );
        }
        for s in string_list(obj.get("device_ids"))? {
            identifiers.push(
                DeviceId::parse(s).map_or(CohortIdentifier::Unusable, CohortIdentifier::Device),
            );
        }
        for alias in alias_list(obj.get("aliases"))? {
            identifiers.push(alias.map_or(CohortIdentifier::Unusable, CohortIdentifier::Alias));
        }
        total += identifiers.len();
        if total > MAX_IDENTIFIERS_PER_REQUEST {
            return Err(CohortApiError::TooManyIdentifiers);
        }
        changes.push(CohortChange {
            identifiers,
            remove,
        });
    }
    Ok(changes)
}

fn string_list(v: Option<&Value>) -> Result<Vec<&str>, CohortApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().ok_or(CohortApiError::InvalidChanges))
            .collect(),
        Some(_) => Err(CohortApiError::InvalidChanges),
    }
}

/// `aliases` as an array of `{alias_name, alias_label}` (or `{"user_alias": {…}}`-wrapped)
/// objects, or a single such object (braze-api.md §2.4 "Our choice"). An element with the
/// right shape but blank parts is `None` (ignored, counted).
fn alias_list(v: Option<&Value>) -> Result<Vec<Option<UserAlias>>, CohortApiError> {
    let one = |v: &Value| -> Result<Option<UserAlias>, CohortApiError> {
        let obj = v.as_object().ok_or(CohortApiError::InvalidChanges)?;
        let inner = obj.get("user_alias").unwrap_or(v);
        let o = inner.as_object().ok_or(CohortApiError::InvalidChanges)?;
        if !o.get("alias_name").is_some_and(Value::is_string)
            || !o.get("alias_label").is_some_and(Value::is_string)
        {
            return Err(CohortApiError::InvalidChanges);
        }
        Ok(parse_alias(inner).ok())
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(obj @ Value::Object(_)) => Ok(vec![one(obj)?]),
        Some(_) => Err(CohortApiError::InvalidChanges),
    }
}

/// The database key of a cohort within its workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CohortKey(pub i64);

/// Membership writes inside a workspace transaction.
pub trait CohortTx: UserLookup {
    /// Creates the cohort (named `name`, or its id until named) or renames it; returns its key.
    fn upsert_cohort(
        &mut self,
        partner: &str,
        cohort_id: &CohortId,
        name: Option<&str>,
        created_at: Millis,
        now: Millis,
    ) -> Result<CohortKey, StoreError>;
    /// Sets whether `user` is a member; returns true if that changed anything. Entering and
    /// leaving are recorded with their time. The cohort's member count is not touched: callers
    /// adjust it once per request with [`CohortTx::adjust_member_count`].
    fn set_member(
        &mut self,
        cohort: CohortKey,
        user: UserSeq,
        member: bool,
        now: Millis,
    ) -> Result<bool, StoreError>;
    /// Adds `delta` to the cohort's member count and marks it updated.
    fn adjust_member_count(
        &mut self,
        cohort: CohortKey,
        delta: i64,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Every current member (for a drain).
    fn members(&mut self, cohort: CohortKey) -> Result<Vec<UserSeq>, StoreError>;
    /// Records that Heap's sync page `(task, page)` is being applied; false if it was
    /// recorded before (the page is then acknowledged without applying it again).
    fn mark_sync_page(&mut self, task: &str, page: i64, now: Millis) -> Result<bool, StoreError>;
}

/// What one `/cohorts/users` request did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipOutcome {
    /// Identifiers that named an eligible existing user.
    pub matched: usize,
    /// Identifiers that named no eligible user (unknown, blank, or the device of an
    /// identified user).
    pub ignored: usize,
    /// Users who entered the cohort.
    pub added: usize,
    /// Users who left it.
    pub removed: usize,
}

/// `/partners/{partner}/cohorts/users`: applies `changes` to the cohort, creating it (named by
/// its id) if it is new. Partners test their credentials by sending empty changes for made-up
/// cohort ids, so a request with no identifier at all creates nothing and answers zeroes.
pub fn apply_partner_changes(
    tx: &mut dyn CohortTx,
    partner: &str,
    cohort_id: &CohortId,
    changes: &[CohortChange],
    now: Millis,
) -> Result<MembershipOutcome, StoreError> {
    if changes.iter().all(|c| c.identifiers.is_empty()) {
        return Ok(MembershipOutcome::default());
    }
    let cohort = tx.upsert_cohort(partner, cohort_id, None, now, now)?;
    apply_changes(tx, cohort, changes, now)
}

/// One page of Heap's segment sync: a page already applied (same sync task and page number)
/// is acknowledged without being applied again; otherwise the cohort is created or renamed and
/// the page drains it or applies its changes.
pub fn apply_segment_sync(
    tx: &mut dyn CohortTx,
    partner: &str,
    page: &SegmentSyncPage,
    now: Millis,
) -> Result<SegmentSyncOutcome, StoreError> {
    if let Some((task, number)) = &page.page_key
        && !tx.mark_sync_page(task, *number, now)?
    {
        return Ok(SegmentSyncOutcome {
            membership: MembershipOutcome::default(),
            replayed: true,
        });
    }
    let cohort = tx.upsert_cohort(partner, &page.cohort_id, page.name.as_deref(), now, now)?;
    let membership = if page.drain {
        drain(tx, cohort, now)?
    } else {
        apply_changes(tx, cohort, &page.changes, now)?
    };
    Ok(SegmentSyncOutcome {
        membership,
        replayed: false,
    })
}

/// Finds the user an identifier names, under cohort import's rules.
pub fn match_identifier(
    tx: &mut dyn UserLookup,
    id: &CohortIdentifier,
) -> Result<Option<UserSeq>, StoreError> {
    match id {
        CohortIdentifier::External(e) => tx.seq_by_external_id(e),
        CohortIdentifier::Alias(a) => tx.seq_by_alias(a),
        // A device id matches only a user who is still anonymous (braze-api.md §2.7, §7).
        CohortIdentifier::Device(d) => tx.anonymous_seq_by_device(d),
        CohortIdentifier::Unusable => Ok(None),
    }
}

/// Applies `changes` in array order with set semantics. Within one request the last mention
/// of a user wins and only the net effect is written, so a user added and removed in the same
/// request (or a replayed request) records no spurious enter/leave.
pub fn apply_changes(
    tx: &mut dyn CohortTx,
    cohort: CohortKey,
    changes: &[CohortChange],
    now: Millis,
) -> Result<MembershipOutcome, StoreError> {
    let keys: Vec<Lookup<'_>> = changes
        .iter()
        .flat_map(|c| &c.identifiers)
        .filter_map(|id| match id {
            CohortIdentifier::External(e) => Some(Lookup::External(e)),
            CohortIdentifier::Alias(a) => Some(Lookup::Alias(a)),
            CohortIdentifier::Device(d) => Some(Lookup::Device(d)),
            CohortIdentifier::Unusable => None,
        })
        .collect();
    tx.prefetch(&keys)?;
    let mut out = MembershipOutcome::default();
    let mut wanted: Vec<(UserSeq, bool)> = Vec::new();
    let mut position: std::collections::HashMap<UserSeq, usize> = std::collections::HashMap::new();
    for change in changes {
        for id in &change.identifiers {
            match match_identifier(tx, id)? {
                Some(user) => {
                    out.matched += 1;
                    match position.get(&user) {
                        Some(&i) => wanted[i].1 = !change.remove,
                        None => {
                            position.insert(user, wanted.len());
                            wanted.push((user, !change.remove));
                        }
                    }
                }
                None => out.ignored += 1,
            }
        }
    }
    for (user, member) in wanted {
        if tx.set_member(cohort, user, member, now)? {
            if member {
                out.added += 1;
            } else {
                out.removed += 1;
            }
        }
    }
    tx.adjust_member_count(cohort, count_delta(&out), now)?;
    Ok(out)
}

fn count_delta(out: &MembershipOutcome) -> i64 {
    i64::try_from(out.added).unwrap_or(i64::MAX) - i64::try_from(out.removed).unwrap_or(i64::MAX)
}

/// Removes every member (Heap's `segment.users.drain`).
pub fn drain(
    tx: &mut dyn CohortTx,
    cohort: CohortKey,
    now: Millis,
) -> Result<MembershipOutcome, StoreError> {
    let mut out = MembershipOutcome::default();
    for user in tx.members(cohort)? {
        if tx.set_member(cohort, user, false, now)? {
            out.removed += 1;
        }
    }
    tx.adjust_member_count(cohort, count_delta(&out), now)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes(v: Value) -> Result<Vec<CohortChange>, CohortApiError> {
        parse_changes(json!({ "cohort_changes": v }).as_object().unwrap())
    }

    #[test]
    fn accepts_segment_shapes() {
        let parsed = changes(json!([
            {"aliases": [], "device_ids": [], "user_ids": ["a"]},
            {"aliases": [{"alias_label": "email", "alias_name": "x@y"}], "device_ids": [], "should_remove": true, "user_ids": []},
            {"aliases": {"alias_label": "l", "alias_name": "n"}},
            {"aliases": [{"user_alias": {"alias_label": "l", "alias_name": "n"}}], "device_ids": ["d", ""]},
        ]))
        .unwrap();
        assert_eq!(parsed.len(), 4);
        assert!(!parsed[0].remove && parsed[1].remove);
        assert_eq!(parsed[3].identifiers.len(), 3);
        assert_eq!(parsed[3].identifiers[1], CohortIdentifier::Unusable);
    }

    #[test]
    fn rejects_bad_shapes_with_the_documented_text() {
        for bad in [
            json!({}),
            json!([1]),
            json!([{"should_remove": true}]),
            json!([{"user_ids": null}]),
            json!([{"user_ids": null, "device_ids": null, "aliases": null}]),
            json!([{"user_ids": "a"}]),
            json!([{"user_ids": [1]}]),
            json!([{"user_ids": [], "should_remove": "yes"}]),
        ] {
            assert_eq!(
                changes(bad.clone()),
                Err(CohortApiError::InvalidChanges),
                "{bad}"
            );
        }
        let ids: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
        assert_eq!(
            changes(json!([{"user_ids": ids}])),
            Err(CohortApiError::TooManyIdentifiers)
        );
        let half: Vec<String> = (0..500).map(|i| i.to_string()).collect();
        assert_eq!(
            changes(json!([{"user_ids": half}, {"user_ids": half}]))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn upsert_validation_texts() {
        let body = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            parse_upsert(&body(
                json!({"cohort_id": 5, "name": "n", "created_at": "2021-01-21T19:20:30+05:00"})
            )),
            Err(CohortApiError::InvalidCohortId)
        );
        assert_eq!(
            parse_upsert(&body(
                json!({"cohort_id": "c", "name": " ", "created_at": "2021-01-21"})
            )),
            Err(CohortApiError::InvalidName)
        );
        assert_eq!(
            parse_upsert(&body(
                json!({"cohort_id": "c", "name": "n".repeat(256), "created_at": "2021-01-21"})
            )),
            Err(CohortApiError::NameTooLong)
        );
        assert!(
            parse_upsert(&body(
                json!({"cohort_id": "c", "name": "é".repeat(255), "created_at": "2021-01-21"})
            ))
            .is_ok()
        );
        assert_eq!(
            parse_upsert(&body(
                json!({"cohort_id": "c", "name": "n", "created_at": "soon"})
            )),
            Err(CohortApiError::InvalidCreatedAt)
        );
        assert!(
            parse_upsert(&body(
                json!({"cohort_id": "c", "name": "n", "created_at": "2021-01-21T19:20:30+05:00"})
            ))
            .is_ok()
        );
        assert_eq!(
            CohortApiError::PartnerNotEnabled("s".into()).to_string(),
            "Partner not enabled for client with client secret: s"
        );
    }
}
