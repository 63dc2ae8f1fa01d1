//! The Canvas context: Canvases and versions, entries (receipts, re-entry, limits, journeys
//! under way), journeys claimed as timers with leases, settlements fenced by lease and entry,
//! inboxes, sends written into the queue, per-step counts.

use std::sync::Arc;

use serde_json::{Map, json};
use tideway_core::campaigns::CampaignStatus;
use tideway_core::canvas::{Happening, HappeningKind, Journey};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{BrazeId, EventId, UserSeq, WorkspaceId};
use tideway_core::store::prelude::*;
use tideway_core::store::{
    CanvasRecipient, CanvasRecord, CanvasScan, CanvasSend, CanvasStat, DispatchRecord,
    DispatchSource, InboxItem, JourneySettlement, NewEntry, ScanOutcome, SendCounts, SendJob,
    StoreError, TriggerCursor, Workspace,
};

use super::{NOW, all_events};

fn at(s: i64) -> Millis {
    Millis(NOW.0 + s * 1000)
}

fn record(id: &str, status: CampaignStatus) -> CanvasRecord {
    CanvasRecord {
        id: id.to_owned(),
        name: format!("name of {id}"),
        description: String::new(),
        tags: vec!["trial".into()],
        status,
        version: 1,
        definition: json!({"steps": [{"id": "a"}], "v": 1}),
        created_at: NOW,
        updated_at: NOW,
        launched_at: None,
        next_run: None,
        first_entry: None,
        last_entry: None,
        entries: 0,
    }
}

fn event(ws: &Workspace, id: &str) -> CurrentsEvent {
    let braze = BrazeId::from_bytes([7; 12]);
    let user = EventUser {
        braze_id: &braze,
        external_id: None,
        device_id: None,
        time_zone: None,
    };
    CurrentsEvent::custom_event(
        EventId(id.to_owned()),
        NOW,
        &user,
        &ws.app_group_id,
        None,
        "canvas",
        &Map::new(),
    )
}

fn journey(entry: &str, step: &str, due: Millis) -> Journey {
    Journey {
        entry_id: entry.to_owned(),
        version: 1,
        variant_id: "v1".into(),
        step_id: step.to_owned(),
        entered_at: NOW,
        step_at: NOW,
        due_at: due,
        converted: 0,
        entry_properties: Some("{\"x\":1}".into()),
        event_properties: None,
    }
}

fn entry(ws: &Workspace, canvas: &str, user: u32, due: Millis, reentry: Option<i64>) -> NewEntry {
    NewEntry {
        canvas_id: canvas.to_owned(),
        user: UserSeq(user),
        journey: Some(journey(&format!("e{user}"), "a", due)),
        reentry_after_ms: reentry,
        entry_limit: Some(3),
        events: vec![event(ws, &format!("entry-{canvas}-{user}-{}", due.0))],
        stats: vec![("a".into(), CanvasStat::Entered)],
    }
}

fn enter(entries: Vec<NewEntry>) -> CanvasScan {
    CanvasScan {
        entries,
        ..CanvasScan::default()
    }
}

pub(super) async fn canvases_are_created_versioned_listed_and_deleted(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let created = store
        .create_canvas(a.id, record("c1", CampaignStatus::Draft))
        .await
        .unwrap();
    assert_eq!(created, record("c1", CampaignStatus::Draft));
    assert_eq!(store.canvas(b.id, "c1").await.unwrap(), None);
    let mut v2 = created.clone();
    v2.version = 2;
    v2.status = CampaignStatus::Active;
    v2.definition = json!({"v": 2});
    assert_eq!(
        store.save_canvas(a.id, v2.clone()).await.unwrap(),
        Some(v2.clone())
    );
    assert_eq!(
        store.canvas_version(a.id, "c1", 1).await.unwrap(),
        Some(json!({"steps": [{"id": "a"}], "v": 1}))
    );
    assert_eq!(
        store.canvas_version(a.id, "c1", 2).await.unwrap(),
        Some(json!({"v": 2}))
    );
    assert_eq!(store.canvas_version(b.id, "c1", 2).await.unwrap(), None);
    assert_eq!(store.list_canvases(a.id).await.unwrap(), vec![v2.clone()]);
    assert_eq!(store.active_canvases().await.unwrap(), vec![(a.id, v2)]);
    assert_eq!(
        store
            .save_canvas(b.id, record("c1", CampaignStatus::Draft))
            .await
            .unwrap(),
        None
    );
    assert!(!store.delete_canvas(b.id, "c1").await.unwrap());
    assert!(store.delete_canvas(a.id, "c1").await.unwrap());
    assert_eq!(store.canvas(a.id, "c1").await.unwrap(), None);
    assert_eq!(store.canvas_version(a.id, "c1", 1).await.unwrap(), None);
}

pub(super) async fn entries_follow_reentry_limits_and_journeys_under_way(store: Arc<dyn Store>) {
    let ws = store.create_workspace("a", NOW).await.unwrap();
    store
        .create_canvas(ws.id, record("c1", CampaignStatus::Active))
        .await
        .unwrap();
    let out = store
        .enter_canvas(
            ws.id,
            NOW,
            enter(vec![
                entry(&ws, "c1", 1, NOW, Some(1_000)),
                // Under way: refused.
                entry(&ws, "c1", 1, at(1), Some(1_000)),
                entry(&ws, "nope", 2, NOW, None),
                NewEntry {
                    journey: None,
                    ..entry(&ws, "c1", 3, NOW, None)
                },
            ]),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        ScanOutcome {
            entered: 2,
            refused: 2,
            inboxed: 0
        }
    );
    let c = store.canvas(ws.id, "c1").await.unwrap().unwrap();
    assert_eq!(
        (c.entries, c.first_entry, c.last_entry),
        (2, Some(NOW), Some(NOW))
    );
    // User 3 (control) has no journey but a receipt: never again.
    let again = store
        .enter_canvas(
            ws.id,
            at(10),
            enter(vec![entry(&ws, "c1", 3, at(10), None)]),
        )
        .await
        .unwrap();
    assert_eq!(again.refused, 1);
    // Limit 3: one more entry, then none.
    let out = store
        .enter_canvas(
            ws.id,
            at(10),
            enter(vec![
                entry(&ws, "c1", 4, at(10), None),
                entry(&ws, "c1", 5, at(10), None),
            ]),
        )
        .await
        .unwrap();
    assert_eq!((out.entered, out.refused), (1, 1));
    let logged: Vec<String> = all_events(store.as_ref(), &ws)
        .await
        .into_iter()
        .map(|e| e.event.id.0)
        .collect();
    assert_eq!(
        logged,
        vec![
            format!("entry-c1-1-{}", NOW.0),
            format!("entry-c1-3-{}", NOW.0),
            format!("entry-c1-4-{}", at(10).0)
        ]
    );
    // The cursor moves by compare-and-set; a conflict writes nothing.
    let moved = TriggerCursor {
        events: 5,
        cohort_changes: 2,
    };
    let scan = CanvasScan {
        cursor: Some((TriggerCursor::default(), moved)),
        entries: vec![entry(&ws, "c1", 9, NOW, None)],
        ..CanvasScan::default()
    };
    store.enter_canvas(ws.id, NOW, scan.clone()).await.unwrap();
    assert_eq!(store.canvas_cursor(ws.id).await.unwrap(), moved);
    assert!(matches!(
        store.enter_canvas(ws.id, NOW, scan).await,
        Err(StoreError::Conflict(_))
    ));
    let counts = store.canvas_step_counts(ws.id, "c1").await.unwrap();
    assert_eq!(counts.len(), 1);
    // Users 1 and 4 stand at the first step; 3 is in the control group, 9 came past the limit.
    assert_eq!(
        (
            counts[0].step_id.as_str(),
            counts[0].entered,
            counts[0].in_step
        ),
        ("a", 3, 2)
    );
}

pub(super) async fn journeys_are_claimed_as_timers_and_settled_under_their_lease(
    store: Arc<dyn Store>,
) {
    let ws = store.create_workspace("a", NOW).await.unwrap();
    store
        .create_canvas(ws.id, record("c1", CampaignStatus::Active))
        .await
        .unwrap();
    store
        .create_canvas(ws.id, record("paused", CampaignStatus::Paused))
        .await
        .unwrap();
    store
        .enter_canvas(
            ws.id,
            NOW,
            enter(vec![
                entry(&ws, "c1", 1, at(30), None),
                entry(&ws, "c1", 2, at(10), None),
                entry(&ws, "c1", 3, at(20), None),
                entry(&ws, "paused", 4, NOW, None),
            ]),
        )
        .await
        .unwrap();
    // Nothing due yet; then oldest due first, paused Canvases never.
    assert!(
        store
            .claim_journeys("n1", NOW, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let claimed = store
        .claim_journeys("n1", at(25), 60_000, 10)
        .await
        .unwrap();
    let users: Vec<u32> = claimed.iter().map(|c| c.user.0).collect();
    assert_eq!(users, vec![2, 3]);
    assert_eq!(claimed[0].journey, journey("e2", "a", at(10)));
    // Leased: another node gets nothing until the lease runs out.
    assert!(
        store
            .claim_journeys("n2", at(26), 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // An event for user 1 wakes it early, with the event in its inbox; events of users with no
    // journey are dropped.
    let happening = Happening {
        at: at(26),
        kind: HappeningKind::CustomEvent {
            name: "upgraded".into(),
        },
        properties: Map::new(),
    };
    let out = store
        .enter_canvas(
            ws.id,
            at(26),
            CanvasScan {
                inbox: vec![
                    InboxItem {
                        canvas_id: "c1".into(),
                        user: UserSeq(1),
                        happening: happening.clone(),
                    },
                    InboxItem {
                        canvas_id: "c1".into(),
                        user: UserSeq(7),
                        happening: happening.clone(),
                    },
                ],
                ..CanvasScan::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.inboxed, 1);
    let woken = store
        .claim_journeys("n1", at(27), 60_000, 10)
        .await
        .unwrap();
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].user, UserSeq(1));
    assert_eq!(woken[0].inbox.len(), 1);
    assert_eq!(woken[0].inbox[0].1, happening);

    let dispatch = DispatchRecord {
        id: "d-step".into(),
        workspace: ws.id,
        source: DispatchSource::AdHoc {
            definition: json!({"canvas": {"id": "c1"}}),
        },
        send_id: None,
        per_user_ids: true,
        properties: None,
        audience: None,
        created_at: NOW,
        expanding_after: None,
        not_before: None,
    };
    let send = CanvasSend {
        dispatch,
        job: SendJob {
            dispatch_id: "d-step".into(),
            variant: "a".into(),
            due_at: at(25),
            properties: None,
        },
    };
    let moved = Journey {
        step_id: "b".into(),
        step_at: at(25),
        due_at: at(100),
        ..journey("e2", "a", at(10))
    };
    let settle = |c: &tideway_core::store::ClaimedJourney, next: Option<Journey>, id: &str| {
        JourneySettlement {
            workspace: c.workspace,
            canvas_id: c.canvas_id.clone(),
            user: c.user,
            entry_id: c.journey.entry_id.clone(),
            journey: next,
            inbox_upto: c.inbox.last().map(|(id, _)| *id),
            events: vec![event(&ws, id)],
            sends: vec![send.clone()],
            stats: vec![
                ("a".into(), CanvasStat::Progressed),
                ("b".into(), CanvasStat::Entered),
            ],
            user_update: None,
            watch: None,
        }
    };
    // Another owner is refused and writes nothing.
    assert_eq!(
        store
            .settle_journeys(
                "n2",
                at(25),
                vec![settle(&claimed[0], Some(moved.clone()), "x")]
            )
            .await
            .unwrap(),
        1
    );
    let refused = store
        .settle_journeys(
            "n1",
            at(25),
            vec![
                settle(&claimed[0], Some(moved.clone()), "moved"),
                settle(&claimed[1], None, "ended"),
                settle(&woken[0], None, "exited"),
                // Settled already (in this call): refused.
                settle(&claimed[1], None, "twice"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(refused, 1);
    let logged: Vec<String> = all_events(store.as_ref(), &ws)
        .await
        .into_iter()
        .map(|e| e.event.id.0)
        .filter(|id| !id.starts_with("entry-"))
        .collect();
    assert_eq!(logged, vec!["moved", "ended", "exited"]);
    assert_eq!(
        store
            .dispatch_send_counts(ws.id, vec!["d-step".into(), "none".into()])
            .await
            .unwrap(),
        vec![
            SendCounts {
                pending: 3,
                sent: 0,
                failed: 0
            },
            SendCounts::default()
        ]
    );
    // The moved journey waits for its new timer; the others are gone.
    assert!(
        store
            .claim_journeys("n1", at(99), 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let later = store
        .claim_journeys("n1", at(100), 60_000, 10)
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].journey, moved);
    assert!(later[0].inbox.is_empty());
    // A restarting node takes its leases back at once.
    assert_eq!(store.release_journey_leases("n1").await.unwrap(), 1);
    assert_eq!(
        store
            .claim_journeys("n2", at(100), 60_000, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let counts = store.canvas_step_counts(ws.id, "c1").await.unwrap();
    let b = counts.iter().find(|c| c.step_id == "b").unwrap();
    assert_eq!((b.entered, b.in_step), (3, 1));
    assert!(store.next_journey_due().await.unwrap().is_some());
}

/// Journeys woken together each get their own inbox (in arrival order) and nobody else's,
/// across Canvases: the claim reads every inbox at once and hands each to its journey.
pub(super) async fn each_claimed_journey_gets_its_own_inbox_in_arrival_order(
    store: Arc<dyn Store>,
) {
    let ws = store.create_workspace("a", NOW).await.unwrap();
    for id in ["c1", "c2"] {
        store
            .create_canvas(ws.id, record(id, CampaignStatus::Active))
            .await
            .unwrap();
    }
    store
        .enter_canvas(
            ws.id,
            NOW,
            enter(vec![
                entry(&ws, "c1", 1, at(100), None),
                entry(&ws, "c1", 2, at(100), None),
                entry(&ws, "c2", 1, at(100), None),
                entry(&ws, "c2", 3, at(5), None),
            ]),
        )
        .await
        .unwrap();
    let happening = |name: &str, s: i64| Happening {
        at: at(s),
        kind: HappeningKind::CustomEvent { name: name.into() },
        properties: Map::new(),
    };
    let item = |canvas: &str, user: u32, h: &Happening| InboxItem {
        canvas_id: canvas.into(),
        user: UserSeq(user),
        happening: h.clone(),
    };
    let (first, second, other) = (
        happening("first", 1),
        happening("second", 2),
        happening("other", 3),
    );
    let out = store
        .enter_canvas(
            ws.id,
            at(4),
            CanvasScan {
                inbox: vec![
                    item("c1", 1, &first),
                    item("c2", 1, &other),
                    item("c1", 1, &second),
                ],
                ..CanvasScan::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.inboxed, 3);
    let mut claimed = store.claim_journeys("n1", at(6), 60_000, 10).await.unwrap();
    claimed.sort_by(|a, b| (&a.canvas_id, a.user).cmp(&(&b.canvas_id, b.user)));
    let inboxes: Vec<(&str, u32, Vec<Happening>)> = claimed
        .iter()
        .map(|c| {
            (
                c.canvas_id.as_str(),
                c.user.0,
                c.inbox.iter().map(|(_, h)| h.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        inboxes,
        vec![
            ("c1", 1, vec![first, second]),
            ("c2", 1, vec![other]),
            ("c2", 3, vec![]),
        ],
        "woken early by their events (c1/1, c2/1) or due (c2/3); c1/2 not due and not woken"
    );
    let c1 = &claimed[0].inbox;
    assert!(c1[0].0 < c1[1].0, "inbox ids in arrival order");
}

pub(super) async fn canvas_entry_dispatches_enter_each_chunk_once(store: Arc<dyn Store>) {
    let ws = store.create_workspace("a", NOW).await.unwrap();
    store
        .create_canvas(ws.id, record("c1", CampaignStatus::Active))
        .await
        .unwrap();
    let dispatch =
        |id: &str, recipients: Option<Vec<CanvasRecipient>>, at: Option<Millis>| DispatchRecord {
            id: id.into(),
            workspace: ws.id,
            source: DispatchSource::Canvas {
                canvas_id: "c1".into(),
                recipients,
            },
            send_id: None,
            per_user_ids: false,
            properties: Some(json!({"shared": 1}).to_string()),
            audience: Some(json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}})),
            created_at: NOW,
            expanding_after: Some(UserSeq(0)),
            not_before: at,
        };
    let named = dispatch(
        "named",
        Some(vec![
            CanvasRecipient {
                user: UserSeq(4),
                properties: Some(json!({"a": "b"}).to_string()),
            },
            CanvasRecipient {
                user: UserSeq(5),
                properties: None,
            },
        ]),
        Some(at(50)),
    );
    let broadcast = dispatch("broadcast", None, None);
    store
        .enter_canvas(
            ws.id,
            NOW,
            CanvasScan {
                dispatches: vec![named.clone(), broadcast.clone()],
                ..CanvasScan::default()
            },
        )
        .await
        .unwrap();
    // They round-trip, and are due by their `not_before`.
    assert_eq!(store.dispatch(ws.id, "named").await.unwrap(), Some(named));
    assert_eq!(
        store.dispatch(ws.id, "broadcast").await.unwrap(),
        Some(broadcast)
    );
    let due: Vec<String> = store
        .expanding_dispatches(at(10))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due, vec!["broadcast".to_owned()]);
    assert_eq!(store.expanding_dispatches(at(50)).await.unwrap().len(), 2);

    // A chunk's entries go in with its mark; the same mark again is a conflict that enters
    // nobody (another node entered the chunk first).
    let chunk = |mark: Option<UserSeq>, users: &[u32]| CanvasScan {
        expansion: Some(("broadcast".into(), mark)),
        entries: users
            .iter()
            .map(|u| entry(&ws, "c1", *u, NOW, None))
            .collect(),
        ..CanvasScan::default()
    };
    let out = store
        .enter_canvas(ws.id, NOW, chunk(Some(UserSeq(2)), &[1, 2]))
        .await
        .unwrap();
    assert_eq!(out.entered, 2);
    assert!(matches!(
        store
            .enter_canvas(ws.id, NOW, chunk(Some(UserSeq(2)), &[1, 2, 3]))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.canvas(ws.id, "c1").await.unwrap().unwrap().entries, 2);
    let out = store
        .enter_canvas(ws.id, NOW, chunk(None, &[3]))
        .await
        .unwrap();
    assert_eq!(out.entered, 1);
    assert!(matches!(
        store.enter_canvas(ws.id, NOW, chunk(None, &[7])).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.canvas(ws.id, "c1").await.unwrap().unwrap().entries, 3);
    let left: Vec<String> = store
        .expanding_dispatches(at(50))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, vec!["named".to_owned()]);

    // A scheduled entry is moved and cancelled like a campaign's; a cancelled one enters
    // nobody.
    assert!(
        store
            .reschedule_dispatch(ws.id, "named", at(90))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .dispatch(ws.id, "named")
            .await
            .unwrap()
            .unwrap()
            .not_before,
        Some(at(90))
    );
    assert!(store.cancel_dispatch(ws.id, "named").await.unwrap());
    assert!(
        store
            .expanding_dispatches(at(100))
            .await
            .unwrap()
            .is_empty()
    );
    let refused = CanvasScan {
        expansion: Some(("named".into(), None)),
        entries: vec![entry(&ws, "c1", 4, NOW, None)],
        ..CanvasScan::default()
    };
    assert!(matches!(
        store.enter_canvas(ws.id, NOW, refused).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.canvas(ws.id, "c1").await.unwrap().unwrap().entries, 3);
}

pub(super) async fn user_updates_are_applied_with_their_settlement_only(store: Arc<dyn Store>) {
    let ws = store.create_workspace("a", NOW).await.unwrap();
    let body = json!({"attributes": [{"external_id": "u1", "visits": 5}]});
    store
        .track(
            &ws,
            tideway_core::track::parse_track(body.as_object().unwrap()).unwrap(),
            NOW,
        )
        .await
        .unwrap();
    let user = store
        .users_by_seq(ws.id, vec![UserSeq(1)])
        .await
        .unwrap()
        .remove(0);
    store
        .create_canvas(ws.id, record("c1", CampaignStatus::Active))
        .await
        .unwrap();
    store
        .enter_canvas(
            ws.id,
            NOW,
            enter(vec![NewEntry {
                events: Vec::new(),
                ..entry(&ws, "c1", user.seq.0, NOW, None)
            }]),
        )
        .await
        .unwrap();
    let inc = json!({"attributes": [{"braze_id": user.braze_id.as_str(), "visits": {"inc": 2}}]});
    let settlement = JourneySettlement {
        workspace: ws.id,
        canvas_id: "c1".into(),
        user: user.seq,
        entry_id: format!("e{}", user.seq.0),
        journey: None,
        inbox_upto: None,
        events: Vec::new(),
        sends: Vec::new(),
        stats: Vec::new(),
        user_update: Some(tideway_core::store::UserUpdate {
            workspace: ws.clone(),
            request: tideway_core::track::parse_track(inc.as_object().unwrap()).unwrap(),
        }),
        watch: None,
    };
    let visits = async || {
        store
            .users_by_seq(ws.id, vec![user.seq])
            .await
            .unwrap()
            .remove(0)
            .profile
            .custom
            .get("visits")
            .cloned()
    };
    assert_eq!(
        store
            .claim_journeys("n1", NOW, 60_000, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // A settlement that fails after its update (a send of another workspace's dispatch):
    // neither the update nor the journey's move commits, and the journey settles later.
    let failing = JourneySettlement {
        sends: vec![CanvasSend {
            dispatch: DispatchRecord {
                id: "d-elsewhere".into(),
                workspace: WorkspaceId(ws.id.0 + 1),
                source: DispatchSource::AdHoc {
                    definition: json!({"canvas": {"id": "c1"}}),
                },
                send_id: None,
                per_user_ids: true,
                properties: None,
                audience: None,
                created_at: NOW,
                expanding_after: None,
                not_before: None,
            },
            job: SendJob {
                dispatch_id: "d-elsewhere".into(),
                variant: "a".into(),
                due_at: NOW,
                properties: None,
            },
        }],
        ..settlement.clone()
    };
    assert!(
        store
            .settle_journeys("n1", NOW, vec![failing])
            .await
            .is_err()
    );
    assert_eq!(
        visits().await,
        Some(json!(5)),
        "rolled back with the settlement"
    );
    // Refused (another owner): nothing applied.
    assert_eq!(
        store
            .settle_journeys("n2", NOW, vec![settlement.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(visits().await, Some(json!(5)));
    assert_eq!(
        store
            .settle_journeys("n1", NOW, vec![settlement.clone()])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        visits().await,
        Some(json!(7)),
        "applied with the settlement"
    );
    // The journey ended: settling it again is refused and applies nothing.
    assert_eq!(
        store
            .settle_journeys("n1", NOW, vec![settlement])
            .await
            .unwrap(),
        1
    );
    assert_eq!(visits().await, Some(json!(7)));
}
