//! The Currents event log: read after a position, it gives only later events, each once, in
//! increasing positions, per workspace — also while writers are committing, so a consumer that
//! reads `seq > p` never skips an event that commits late; a failed unit's events never appear.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{BrazeId, EventId, UserSeq};
use tideway_core::store::prelude::*;
use tideway_core::store::{LoggedEvent, StoreError, Workspace, run_unit};
use tideway_core::track::parse_track;
use tideway_core::users;

use super::{NOW, all_events, track, types};

/// `(position, event id)` of each event.
fn keys(events: &[LoggedEvent]) -> Vec<(i64, String)> {
    events
        .iter()
        .map(|e| (e.seq, e.event.id.0.clone()))
        .collect()
}

/// A custom event with this id, as a fixture or an import would append it.
fn custom(ws: &Workspace, id: &str) -> CurrentsEvent {
    let braze = BrazeId::from_bytes([7; 12]);
    let user = EventUser {
        braze_id: &braze,
        external_id: None,
        device_id: None,
        time_zone: None,
    };
    let mut properties = Map::new();
    properties.insert("n".into(), json!(id));
    CurrentsEvent::custom_event(
        EventId(id.to_owned()),
        NOW,
        &user,
        &ws.app_group_id,
        None,
        "appended",
        &properties,
    )
}

/// After any position of the log, a read returns exactly the later events, oldest first, at
/// most `limit`; another workspace's events never show.
pub(super) async fn read_events_after_a_position_returns_only_later_events(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    for round in 0..3 {
        for ws in [&a, &b] {
            track(&*store, ws, json!({
                "attributes": [{"external_id": format!("u{round}"), "round": round}],
                "events": [
                    {"external_id": format!("u{round}"), "name": "e", "time": "2025-01-01T00:00:00Z"},
                    {"external_id": "v", "name": "e", "time": "2025-01-01T00:00:00Z"},
                ],
            }))
            .await;
        }
    }
    let events = all_events(&*store, &a).await;
    assert_eq!(events.len(), 9);
    assert!(events.iter().all(|e| e.workspace == a.id));
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let others: HashSet<String> = all_events(&*store, &b)
        .await
        .iter()
        .map(|e| e.event.id.0.clone())
        .collect();
    assert_eq!(others.len(), 9);
    assert!(events.iter().all(|e| !others.contains(&e.event.id.0)));
    for (k, event) in events.iter().enumerate() {
        let after = store.read_events(a.id, event.seq, 100).await.unwrap();
        assert_eq!(keys(&after), keys(&events[k + 1..]), "after {}", event.seq);
        let limited = store.read_events(a.id, event.seq, 2).await.unwrap();
        assert_eq!(keys(&limited), keys(&events[k + 1..(k + 3).min(9)]));
    }
    // Between positions, and before the first, reads are the same as from the one before.
    let before_first = store
        .read_events(a.id, events[0].seq - 1, 100)
        .await
        .unwrap();
    assert_eq!(keys(&before_first), keys(&events));
    let last = events.last().unwrap().seq;
    assert_eq!(store.read_events(a.id, last, 100).await.unwrap(), vec![]);
    assert_eq!(
        store.read_events(a.id, last + 1_000, 100).await.unwrap(),
        vec![]
    );
}

/// `append_events` writes events as given (id, type, body, user) and returns the last position,
/// after what was there before.
pub(super) async fn appended_events_read_back_as_written(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"events": [{"external_id": "u", "name": "e", "time": "2025-01-01T00:00:00Z"}]}),
    )
    .await;
    let before = all_events(&*store, &ws).await;
    let written: Vec<(Option<UserSeq>, CurrentsEvent)> = vec![
        (None, custom(&ws, "x-1")),
        (Some(UserSeq(1)), custom(&ws, "x-2")),
        (None, custom(&ws, "x-3")),
    ];
    let last = store.append_events(ws.id, written.clone()).await.unwrap();
    let after = store.read_events(ws.id, before[0].seq, 100).await.unwrap();
    assert_eq!(after.len(), 3);
    assert_eq!(after[2].seq, last);
    assert!(after[0].seq > before[0].seq);
    for (read, (user, event)) in after.iter().zip(&written) {
        assert_eq!(
            (read.workspace, read.user, &read.event),
            (ws.id, *user, event)
        );
    }
    assert_eq!(
        store
            .append_events(ws.id, vec![(None, custom(&ws, "x-4"))])
            .await
            .unwrap(),
        store.read_events(ws.id, last, 10).await.unwrap()[0].seq
    );
}

/// A follower reading after its position while writers commit sees every event exactly once,
/// in increasing positions, and ends with the same log a reader from the start sees.
pub(super) async fn a_follower_of_the_log_sees_every_event_once(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let (writers, requests, per_request) = (4, 25, 3);
    let total = writers * requests * per_request;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..requests {
                let events: Vec<_> = (0..per_request)
                    .map(|e| json!({"external_id": format!("w{w}-{}", (r + e) % 5), "name": "e", "time": "2025-01-01T00:00:00Z"}))
                    .collect();
                track(&*store, &ws, json!({"events": events})).await;
            }
        }));
    }
    let follower = {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut seen: Vec<LoggedEvent> = Vec::new();
            let mut position = 0;
            while seen.len() < total {
                assert!(
                    Instant::now() < deadline,
                    "saw {} of {total} events",
                    seen.len()
                );
                let page = store.read_events(ws.id, position, 16).await.unwrap();
                for event in page {
                    assert!(event.seq > position, "{} after {position}", event.seq);
                    position = event.seq;
                    seen.push(event);
                }
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let seen = follower.await.unwrap();
    let ids: HashSet<&str> = seen.iter().map(|e| e.event.id.0.as_str()).collect();
    assert_eq!(ids.len(), total, "each event once");
    assert_eq!(keys(&seen), keys(&all_events(&*store, &ws).await));
}

/// A unit that logs events (through `track`, and appended directly) and then fails leaves no
/// event; the log goes on from where it was.
pub(super) async fn events_of_a_failed_unit_never_appear(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "before", "x": 1}]}),
    )
    .await;
    let before = all_events(&*store, &ws).await;
    assert_eq!(before.len(), 1);
    let body = json!({
        "attributes": [{"external_id": "doomed", "x": 1}],
        "events": [{"external_id": "before", "name": "e", "time": "2025-01-01T00:00:00Z"}],
    });
    let req = parse_track(body.as_object().unwrap()).unwrap();
    let lost = custom(&ws, "lost");
    let failed = run_unit(&*store, &ws, NOW, move |tx, ctx| {
        let out = users::track(tx, ctx, &req)?;
        tx.append_event(None, lost.clone())?;
        Err::<usize, _>(StoreError::Unavailable(format!(
            "planned failure after {} objects",
            out.attributes_processed + out.events_processed
        )))
    })
    .await;
    assert_eq!(
        failed,
        Err(StoreError::Unavailable(
            "planned failure after 2 objects".into()
        ))
    );
    assert_eq!(keys(&all_events(&*store, &ws).await), keys(&before));
    track(
        &*store,
        &ws,
        json!({"events": [{"external_id": "before", "name": "after", "time": "2025-01-01T00:00:00Z"}]}),
    )
    .await;
    let after = store.read_events(ws.id, before[0].seq, 100).await.unwrap();
    assert_eq!(types(&after), ["users.behaviors.CustomEvent"]);
    assert_eq!(after[0].event.body_value()["properties"]["name"], "after");
    assert_eq!(after[0].user, before[0].user);
}
