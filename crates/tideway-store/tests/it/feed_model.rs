//! The model both differential tests of the segment feed draw from (`segment_feed.rs` on
//! SQLite, `pg_segments.rs` on PostgreSQL): random operations on a few users, run through the
//! services of any store, random filters, and an index caught up from any store's feed.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use tideway_core::cohorts::{CohortChange, CohortId, CohortIdentifier};
use tideway_core::ids::{ExternalId, WorkspaceId};
use tideway_core::segments::{LiveIndex, Member};
use tideway_core::services::Services;
use tideway_core::store::{SegmentStore, UserStore, Workspace};
use tideway_core::track::parse_track;
use tideway_core::users::{DeleteRequest, MergeItem, UserKey};
use tideway_segment::{Filter, NoSegments};

use super::NOW;

pub const USERS: u8 = 6;
pub const TIMES: [&str; 4] = [
    "2025-06-14T08:00:00Z",
    "2025-06-10T00:00:00Z",
    "2025-05-01T12:00:00Z",
    "2024-12-31T23:59:59Z",
];

pub fn ext(user: u8) -> ExternalId {
    ExternalId::parse(&format!("u{user}")).unwrap()
}

#[derive(Debug, Clone)]
pub enum Op {
    /// One `/users/track` request: any of an attribute update, an event, a purchase.
    Track {
        user: u8,
        plan: Option<Option<&'static str>>,
        score: Option<i64>,
        email: Option<bool>,
        event: Option<(&'static str, usize)>,
        purchase: Option<(&'static str, f64, u32, usize)>,
    },
    Merge {
        from: u8,
        into: u8,
    },
    Delete(u8),
    Cohort {
        user: u8,
        cohort: &'static str,
        remove: bool,
    },
    /// The reader applies the feed's changes since its index's position.
    CatchUp,
    /// The backend's disruption: SQLite stops the store and opens it again (the replay on
    /// open empties `user_log`); PostgreSQL writes through the other node from now on.
    Disrupt,
}

pub fn op() -> impl Strategy<Value = Op> {
    let user = || 0..USERS;
    let track = (
        user(),
        proptest::option::of(proptest::option::of(select(vec!["free", "pro"]))),
        proptest::option::of(0i64..4),
        proptest::option::weighted(0.2, any::<bool>()),
        proptest::option::of((select(vec!["open", "buy"]), 0..TIMES.len())),
        proptest::option::weighted(
            0.4,
            (
                select(vec!["p1", "p2"]),
                select(vec![0.1, 0.2, 5.0, 99.5]),
                1u32..3,
                0..TIMES.len(),
            ),
        ),
    )
        .prop_map(|(user, plan, score, email, event, purchase)| Op::Track {
            user,
            plan,
            score,
            email,
            event,
            purchase,
        });
    prop_oneof![
        8 => track,
        1 => (user(), user()).prop_map(|(from, into)| Op::Merge { from, into }),
        1 => user().prop_map(Op::Delete),
        2 => (user(), select(vec!["c1", "c2"]), any::<bool>())
            .prop_map(|(user, cohort, remove)| Op::Cohort { user, cohort, remove }),
        3 => Just(Op::CatchUp),
        1 => Just(Op::Disrupt),
    ]
}

pub fn leaves() -> Vec<Value> {
    vec![
        json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}),
        json!({"attribute": {"name": "plan", "op": "exists", "value": true}}),
        json!({"attribute": {"name": "score", "op": "greater_than", "value": 1}}),
        json!({"attribute": {"name": "email_available", "op": "equals", "value": true}}),
        json!({"event": {"name": "open", "op": "count_at_least", "value": 2}}),
        json!({"event": {"name": "open", "op": "count_at_least", "value": 1, "within_days": 7}}),
        json!({"event": {"name": "buy", "op": "count_at_most", "value": 1}}),
        json!({"purchase": {"op": "total_spend_at_least", "value": 10}}),
        json!({"purchase": {"op": "total_spend_at_most", "value": 0.3}}),
        json!({"purchase": {"product_id": "p2", "op": "count_at_least", "value": 2}}),
        json!({"purchase": {"op": "made_any", "value": true}}),
        json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}}),
        json!({"cohort": {"partner": "heap", "cohort_id": "c2", "op": "excludes"}}),
        json!({"identified": true}),
    ]
}

pub fn leaf() -> impl Strategy<Value = Value> {
    select(leaves())
}

pub fn filter() -> impl Strategy<Value = Filter> {
    leaf()
        .prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                vec(inner.clone(), 1..3).prop_map(|v| json!({"and": v})),
                vec(inner.clone(), 1..3).prop_map(|v| json!({"or": v})),
                inner.prop_map(|f| json!({"not": f})),
            ]
        })
        .prop_map(|v| Filter::from_json(&v).expect("a valid filter"))
}

/// Every leaf once, for the tests that do not draw filters.
pub fn every_leaf() -> Vec<Filter> {
    leaves()
        .iter()
        .map(|v| Filter::from_json(v).unwrap())
        .collect()
}

pub async fn run(store: &impl UserStore, ws: &Workspace, op: &Op) {
    match op {
        Op::Track {
            user,
            plan,
            score,
            email,
            event,
            purchase,
        } => {
            let id = format!("u{user}");
            let mut attributes = json!({"external_id": id});
            if let Some(plan) = plan {
                attributes["plan"] = json!(plan);
            }
            if let Some(score) = score {
                attributes["score"] = json!(score);
            }
            if let Some(email) = email {
                attributes["email"] = match email {
                    true => json!(format!("{id}@example.com")),
                    false => Value::Null,
                };
            }
            let mut body = json!({"attributes": [attributes]});
            if let Some((name, at)) = event {
                body["events"] = json!([{"external_id": id, "name": name, "time": TIMES[*at]}]);
            }
            if let Some((product, price, quantity, at)) = purchase {
                body["purchases"] = json!([{
                    "external_id": id, "product_id": product, "currency": "USD",
                    "price": price, "quantity": quantity, "time": TIMES[*at],
                }]);
            }
            let request = parse_track(body.as_object().unwrap()).unwrap();
            store.track(ws, request, NOW).await.unwrap();
        }
        Op::Merge { from, into } => {
            let item = MergeItem {
                merge: UserKey::External(ext(*from)),
                keep: UserKey::External(ext(*into)),
            };
            // unknown or equal users are per-item errors: nothing changes
            store.merge_users(ws, vec![(0, item)], NOW).await.unwrap();
        }
        Op::Delete(user) => {
            let request = DeleteRequest {
                users: vec![UserKey::External(ext(*user))],
            };
            store.delete_users(ws, request, NOW).await.unwrap();
        }
        Op::Cohort {
            user,
            cohort,
            remove,
        } => {
            let changes = vec![CohortChange {
                identifiers: vec![CohortIdentifier::External(ext(*user))],
                remove: *remove,
            }];
            store
                .apply_cohort_changes(ws, "heap", CohortId::parse(cohort).unwrap(), changes, NOW)
                .await
                .unwrap();
        }
        Op::CatchUp | Op::Disrupt => {}
    }
}

pub async fn catch_up(store: &impl SegmentStore, ws: WorkspaceId, live: &mut LiveIndex) {
    let changes = store
        .segment_profile_changes(ws, live.position())
        .await
        .expect("changes");
    live.apply(&changes);
}

pub fn answers(live: &LiveIndex, filters: &[Filter]) -> Vec<Vec<Member>> {
    filters
        .iter()
        .map(|f| live.all_members(f, NOW.secs(), &NoSegments).collect())
        .collect()
}
