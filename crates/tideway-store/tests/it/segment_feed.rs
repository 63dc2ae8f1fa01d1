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
use tideway_core::segments::LiveIndex;
use tideway_segment::{Filter, NoSegments};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::feed_model::{Op, answers, catch_up, filter, op, run};
use super::{NOW, track};

fn open_with(dir: &tempfile::TempDir, sweep_period: Duration) -> SqliteStore {
    let options = SqliteOptions {
        sweep_period,
        ..SqliteOptions::default()
    };
    SqliteStore::open(&dir.path().join("t.sqlite"), options).expect("open store")
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
                        catch_up(&store, ws.id, live).await;
                    }
                }
                Op::Disrupt => {
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
        catch_up(&store, ws.id, &mut live).await;
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
    let file = rusqlite::Connection::open(dir.path().join("t.sqlite")).unwrap();
    let logged = |file: &rusqlite::Connection| -> i64 {
        file.query_row("SELECT COUNT(*) FROM user_log", [], |r| r.get(0))
            .unwrap()
    };
    assert!(logged(&file) > 0);
    drop(store);
    // The writer thread stops on its own after the drop, replaying `user_log` as its last
    // act: wait for it, or on a loaded machine that replay can run after the reopened store
    // has logged again, and take those rows with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while logged(&file) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old writer never stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = open_with(&dir, long);
    let ws = store.workspace_by_name("w").await.unwrap().unwrap();
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
    catch_up(&store, ws.id, &mut live).await;
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
