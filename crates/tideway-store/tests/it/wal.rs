//! The WAL stays bounded under continuous writes. SQLite reuses its WAL from the start only
//! when a write begins with every frame copied back and no reader in it, which continuous
//! writes never allow on their own: the writer checkpoints (RESTART) between batches once the
//! file passes `SqliteOptions::wal_limit`.

use serde_json::json;
use tideway_core::store::prelude::*;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::{NOW, track};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_never_passes_its_bound_by_more_than_a_batch_while_writes_continue() {
    const LIMIT: u64 = 2 << 20;
    const WRITES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        wal_limit: LIMIT,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("t.sqlite"), options).unwrap();
    let wal = dir.path().join("t.sqlite-wal");
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    // Requests one after another: each is a batch of its own, so the growth between two
    // samples is at most one batch's frames.
    let (mut largest, mut largest_batch, mut written, mut shrunk) = (0, 0, 0, 0);
    let mut last = wal_size();
    for round in 0..WRITES {
        let attributes: Vec<_> = (0..75)
            .map(|i| json!({"external_id": format!("u{}", (round * 75 + i) % 20_000), "round": round, "plan": "pro"}))
            .collect();
        let events: Vec<_> = (0..25)
            .map(|i| json!({"external_id": format!("u{i}"), "name": "opened", "time": "2025-01-01T00:00:00Z", "properties": {"round": round}}))
            .collect();
        track(
            &store,
            &ws,
            json!({"attributes": attributes, "events": events}),
        )
        .await;
        let size = wal_size();
        if size >= last {
            largest_batch = largest_batch.max(size - last);
            written += size - last;
        } else {
            shrunk += 1;
        }
        largest = largest.max(size);
        last = size;
    }
    assert!(
        largest_batch < LIMIT / 4,
        "a batch ({largest_batch} bytes) is small next to the bound, or the bound means little"
    );
    assert!(
        largest <= LIMIT + largest_batch,
        "the WAL reached {largest} bytes, past the bound {LIMIT} plus a batch ({largest_batch})"
    );
    // What the test wrote passed the bound many times over: the bound did the work.
    assert!(
        written + u64::try_from(shrunk).unwrap() * LIMIT > 8 * LIMIT,
        "only {written} bytes of WAL grown, {shrunk} restarts"
    );
    assert!(shrunk >= 4, "the WAL was restarted only {shrunk} times");
}
