//! The incremental segment feed against a full load: an index caught up step by step from
//! `Store::segment_profile_changes` (appended events and purchases, attribute post-images read
//! without a flush, cohort deltas, removals, whole reloads of merge survivors) must answer every
//! filter exactly as one built from every profile at the end. Plus the case the feed reasons
//! about most: a position older than what `user_log` still holds (its rows replayed away), where
//! the current profile is the row for some users and a newer post-image for others.

use std::time::Duration;
use tideway_core::store::prelude::*;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use tideway_core::cohorts::{CohortChange, CohortId, CohortIdentifier};
use tideway_core::ids::ExternalId;
use tideway_core::segments::{LiveIndex, Member};
use tideway_core::store::Workspace;
use tideway_core::users::{DeleteRequest, MergeItem, UserKey};
use tideway_segment::{Filter, NoSegments};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::{NOW, track};

const USERS: u8 = 6;
const TIMES: [&str; 4] = [
    "2025-06-14T08:00:00Z",
    "2025-06-10T00:00:00Z",
    "2025-05-01T12:00:00Z",
    "2024-12-31T23:59:59Z",
];

fn open_with(dir: &tempfile::TempDir, sweep_period: Duration) -> SqliteStore {
    let options = SqliteOptions {
        sweep_period,
        ..SqliteOptions::default()
    };
    SqliteStore::open(&dir.path().join("t.sqlite"), options).expect("open store")
}

fn ext(user: u8) -> ExternalId {
    ExternalId::parse(&format!("u{user}")).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
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
    /// Applies the feed's changes since the index's position.
    CatchUp,
    /// Stops the store and opens it again: the replay on open empties `user_log`.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
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
        1 => Just(Op::Reopen),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    select(vec![
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
    ])
}

fn filter() -> impl Strategy<Value = Filter> {
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

async fn run(store: &SqliteStore, ws: &Workspace, op: &Op) {
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
            track(store, ws, body).await;
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
        Op::CatchUp | Op::Reopen => {}
    }
}

async fn catch_up(store: &SqliteStore, ws: &Workspace, live: &mut LiveIndex) {
    let changes = store
        .segment_profile_changes(ws.id, live.position())
        .await
        .expect("changes");
    live.apply(&changes);
}

fn answers(live: &LiveIndex, filters: &[Filter]) -> Vec<Vec<Member>> {
    let now = NOW.secs();
    filters
        .iter()
        .map(|f| live.all_members(f, now, &NoSegments).collect())
        .collect()
}

/// Runs `ops` on a fresh store (the index fully loaded after `load_at` of them, caught up at
/// each `CatchUp`), then compares it, caught up, with a full load.
fn differential(
    ops: &[Op],
    load_at: usize,
    sweep_period: Duration,
    filters: &[Filter],
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(&dir, sweep_period);
        let mut ws = store.create_workspace("w", NOW).await.unwrap();
        let mut live: Option<LiveIndex> = None;
        for (i, op) in ops.iter().enumerate() {
            if i == load_at.min(ops.len()) {
                live = Some(LiveIndex::from_snapshot(
                    store.segment_profiles(ws.id).await.unwrap(),
                ));
            }
            match op {
                Op::CatchUp => {
                    if let Some(live) = live.as_mut() {
                        catch_up(&store, &ws, live).await;
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = open_with(&dir, sweep_period);
                    ws = store.workspace_by_name("w").await.unwrap().unwrap();
                }
                op => run(&store, &ws, op).await,
            }
        }
        let mut live = match live {
            Some(live) => live,
            None => LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap()),
        };
        catch_up(&store, &ws, &mut live).await;
        let full = LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap());
        prop_assert_eq!(live.position(), full.position());
        prop_assert_eq!(live.len(), full.len());
        let (got, expected) = (answers(&live, filters), answers(&full, filters));
        for ((f, got), expected) in filters.iter().zip(&got).zip(&expected) {
            prop_assert_eq!(got, expected, "filter {}", f.to_json());
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn an_index_caught_up_incrementally_answers_as_a_full_load(
        ops in vec(op(), 1..40),
        load_at in 0usize..12,
        sweep_ms in select(vec![1u64, 3_600_000]),
        filters in vec(filter(), 1..12),
    ) {
        differential(&ops, load_at, Duration::from_millis(sweep_ms), &filters)?;
    }
}

/// Attribute changes the index has not seen, after a reopen replayed `user_log` into the rows
/// and emptied it: users changed only before it must come from their rows (no post-image left),
/// users changed again after it from their newer post-image (the rows are behind again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_older_than_user_log_falls_back_to_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    // Sweeps far longer than the test: rows stay behind their post-images.
    let long = Duration::from_secs(3600);
    let store = open_with(&dir, long);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let users = |plan: &str, from: u32, to: u32| -> Value {
        let attributes: Vec<Value> = (from..to)
            .map(|i| json!({"external_id": format!("u{i}"), "plan": plan}))
            .collect();
        json!({"attributes": attributes})
    };
    track(&store, &ws, users("free", 0, 60)).await;
    let mut live = LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap());
    // not seen by the index: everyone goes trial, then the store restarts
    track(&store, &ws, users("trial", 0, 60)).await;
    drop(store);
    let store = open_with(&dir, long);
    let ws = store.workspace_by_name("w").await.unwrap().unwrap();
    let file = rusqlite::Connection::open(dir.path().join("t.sqlite")).unwrap();
    let logged = |file: &rusqlite::Connection| -> i64 {
        file.query_row("SELECT COUNT(*) FROM user_log", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(logged(&file), 0, "the reopen replayed and emptied user_log");
    // the second half goes pro after the reopen: logged, and (mostly) not in the rows yet
    track(&store, &ws, users("pro", 30, 60)).await;
    assert!(logged(&file) > 0);
    let behind: i64 = file
        .query_row(
            "SELECT COUNT(*) FROM users WHERE profile NOT LIKE '%\"pro\"%' AND external_id IN ('u30', 'u45', 'u59')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(behind > 0, "some rows are behind their post-images");
    catch_up(&store, &ws, &mut live).await;
    let plan = |value: &str| {
        Filter::from_json(&json!({"attribute": {"name": "plan", "op": "equals", "value": value}}))
            .unwrap()
    };
    let ids = |f: &Filter| -> Vec<String> {
        live.all_members(f, NOW.secs(), &NoSegments)
            .filter_map(|m| m.external_id)
            .collect()
    };
    let expect = |from: u32, to: u32| -> Vec<String> {
        let mut v: Vec<String> = (from..to).map(|i| format!("u{i}")).collect();
        v.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
        v
    };
    assert_eq!(ids(&plan("free")), Vec::<String>::new());
    assert_eq!(ids(&plan("trial")), expect(0, 30), "from the rows");
    assert_eq!(ids(&plan("pro")), expect(30, 60), "from user_log");
    let full = LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap());
    assert_eq!(live.position(), full.position());
}
