//! Messaging as the scheduler, the trigger engine, the dispatcher and tracking use it:
//! campaigns and dispatches; enqueues that take receipts, move the trigger cursor, a campaign's
//! next run and a dispatch's expansion by compare-and-set, all or nothing; the send queue's
//! leases and the settlements they fence, with their events in the Currents log; frequency
//! caps, conversions, campaign stats, segment-entry trackers, send ids, settings, the signing
//! key and the users a dispatcher reads.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tideway_core::campaigns::CampaignStatus;
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortChange, CohortIdentifier};
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{BrazeId, EventId, UserSeq};
use tideway_core::segments::FeedPosition;
use tideway_core::store::prelude::*;
use tideway_core::store::{
    CampaignRecord, CampaignStat, ClaimedSend, CohortEntry, DispatchRecord, DispatchSource,
    Enqueue, EnqueueOutcome, LoggedEvent, NewConversion, NewSend, QueueState, Receipt,
    ReceiptRecord, SegmentTracker, SendCounts, SendJob, SendSeriesKey, SendStat, SendStatIncrement,
    SendState, SentMessage, Settlement, StatIncrement, StoreError, TriggerCursor, UserSend,
    Workspace,
};
use tideway_core::users::{DeleteRequest, UserKey};

use super::{NOW, all_events, cid, ext, track};

/// `NOW` plus `s` seconds.
fn at(s: i64) -> Millis {
    Millis(NOW.0 + s * 1000)
}

const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

fn campaign(id: &str, created_at: Millis, status: CampaignStatus) -> CampaignRecord {
    CampaignRecord {
        id: id.to_owned(),
        name: format!("name of {id}"),
        description: format!("about {id}"),
        tags: vec!["onboarding".into(), "ünïcode".into()],
        status,
        definition: json!({"messages": {"email": {"subject": id, "body": "<p>hi</p>"}}, "n": 1.5}),
        created_at,
        updated_at: created_at,
        launched_at: None,
        next_run: None,
        first_sent: None,
        last_sent: None,
    }
}

/// A dispatch of a stored campaign, complete (nothing to expand).
fn dispatch(ws: &Workspace, id: &str, campaign_id: &str) -> DispatchRecord {
    DispatchRecord {
        id: id.to_owned(),
        workspace: ws.id,
        source: DispatchSource::Campaign {
            campaign_id: campaign_id.to_owned(),
        },
        send_id: None,
        per_user_ids: false,
        properties: None,
        audience: None,
        created_at: NOW,
        expanding_after: None,
        not_before: None,
    }
}

/// A dispatch whose audience is still to be expanded from the start.
fn expanding(
    ws: &Workspace,
    id: &str,
    created_at: Millis,
    not_before: Option<Millis>,
) -> DispatchRecord {
    DispatchRecord {
        created_at,
        expanding_after: Some(UserSeq(0)),
        not_before,
        ..dispatch(ws, id, "camp")
    }
}

fn job(dispatch_id: &str, due_at: Millis) -> SendJob {
    SendJob {
        dispatch_id: dispatch_id.to_owned(),
        variant: "v-email".to_owned(),
        due_at,
        properties: None,
    }
}

/// A custom event with this id at `at`, standing for whatever the messaging context logs
/// (EnrollInControl, Send, Failure, Open…): the store keeps events as given.
fn event_at(ws: &Workspace, id: &str, at: Millis) -> CurrentsEvent {
    let braze = BrazeId::from_bytes([9; 12]);
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
        at,
        &user,
        &ws.app_group_id,
        None,
        "messaging",
        &properties,
    )
}

fn event(ws: &Workspace, id: &str) -> CurrentsEvent {
    event_at(ws, id, NOW)
}

/// One user's item: a job, no receipt, no events.
fn item(user: u32, job: SendJob) -> NewSend {
    NewSend {
        user: UserSeq(user),
        receipt: None,
        job: Some(job),
        events: vec![],
    }
}

fn receipt(campaign_id: &str, reeligible_after_ms: Option<i64>) -> Option<Receipt> {
    Some(Receipt {
        campaign_id: campaign_id.to_owned(),
        reeligible_after_ms,
    })
}

fn items(items: Vec<NewSend>) -> Enqueue {
    Enqueue {
        items,
        ..Enqueue::default()
    }
}

fn queued(n: u64) -> EnqueueOutcome {
    EnqueueOutcome {
        queued: n,
        ..EnqueueOutcome::default()
    }
}

/// Enqueues one job per user of `users` for `dispatch_id`, due at `due_at`.
async fn queue(
    store: &dyn Store,
    ws: &Workspace,
    dispatch_id: &str,
    users: &[u32],
    due_at: Millis,
) {
    let jobs = users
        .iter()
        .map(|&u| item(u, job(dispatch_id, due_at)))
        .collect();
    assert_eq!(
        store.enqueue(ws.id, items(jobs)).await.unwrap(),
        queued(users.len() as u64)
    );
}

/// Everything a claim returns about one send that a test names it by.
fn who(c: &ClaimedSend) -> (i64, u32, Millis, u32) {
    (c.workspace.0, c.user.0, c.job.due_at, c.attempts)
}

fn sent(send: &ClaimedSend, events: Vec<CurrentsEvent>) -> Settlement {
    settle(
        send,
        SendState::Sent {
            address: None,
            links: None,
        },
        events,
    )
}

fn settle(send: &ClaimedSend, state: SendState, events: Vec<CurrentsEvent>) -> Settlement {
    Settlement {
        send: send.id,
        workspace: send.workspace,
        user: send.user,
        state,
        events,
    }
}

/// `(user, event id)` of each event.
fn logged(events: &[LoggedEvent]) -> Vec<(Option<u32>, String)> {
    events
        .iter()
        .map(|e| (e.user.map(|u| u.0), e.event.id.0.clone()))
        .collect()
}

fn by(user: Option<u32>, id: &str) -> (Option<u32>, String) {
    (user, id.to_owned())
}

async fn log_of(store: &dyn Store, ws: &Workspace) -> Vec<(Option<u32>, String)> {
    logged(&all_events(store, ws).await)
}

async fn counts(store: &dyn Store, ws: &Workspace, campaign_id: &str) -> SendCounts {
    store
        .campaign_send_counts(ws.id, campaign_id)
        .await
        .unwrap()
}

fn pending(pending: u64, sent: u64, failed: u64) -> SendCounts {
    SendCounts {
        pending,
        sent,
        failed,
    }
}

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Conflict(_)))
}

// --- campaigns -------------------------------------------------------------------------------

/// Campaigns read back as created; a workspace lists its own, oldest first (ties by id); a
/// second one with an id taken is a `Conflict`; saving replaces everything but the id and the
/// creation time, only in its workspace; deleting answers whether it existed; the active ones
/// of every workspace are listed by workspace, oldest first.
pub(super) async fn campaigns_are_created_read_listed_saved_and_deleted(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let c3 = campaign("c3", at(3), CampaignStatus::Active);
    let c1 = campaign("c1", at(1), CampaignStatus::Draft);
    let c2b = campaign("c2b", at(2), CampaignStatus::Active);
    let c2a = campaign("c2a", at(2), CampaignStatus::Paused);
    let cb = campaign("cb", at(0), CampaignStatus::Active);
    for c in [&c3, &c1, &c2b, &c2a] {
        assert_eq!(store.create_campaign(a.id, c.clone()).await.unwrap(), *c);
    }
    store.create_campaign(b.id, cb.clone()).await.unwrap();
    assert_eq!(store.campaign(a.id, "c1").await.unwrap(), Some(c1.clone()));
    assert_eq!(store.campaign(b.id, "c1").await.unwrap(), None);
    assert_eq!(store.campaign(a.id, "nope").await.unwrap(), None);
    let ids = |list: Vec<CampaignRecord>| list.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_campaigns(a.id).await.unwrap()),
        ["c1", "c2a", "c2b", "c3"]
    );
    assert_eq!(store.list_campaigns(b.id).await.unwrap(), vec![cb.clone()]);

    let again = store
        .create_campaign(a.id, campaign("c1", at(9), CampaignStatus::Active))
        .await;
    assert!(is_conflict(&again), "{again:?}");
    assert_eq!(store.campaign(a.id, "c1").await.unwrap(), Some(c1.clone()));

    let edited = CampaignRecord {
        id: "c1".into(),
        name: "renamed".into(),
        description: String::new(),
        tags: vec![],
        status: CampaignStatus::Active,
        definition: json!({"messages": {}}),
        created_at: at(99),
        updated_at: at(5),
        launched_at: Some(at(5)),
        next_run: Some(at(60)),
        first_sent: Some(at(6)),
        last_sent: Some(at(7)),
    };
    let kept = CampaignRecord {
        created_at: c1.created_at,
        ..edited.clone()
    };
    assert_eq!(
        store.save_campaign(a.id, edited.clone()).await.unwrap(),
        Some(kept.clone())
    );
    assert_eq!(
        store.campaign(a.id, "c1").await.unwrap(),
        Some(kept.clone())
    );
    assert_eq!(
        store.save_campaign(b.id, edited.clone()).await.unwrap(),
        None
    );
    let unknown = CampaignRecord {
        id: "unknown".into(),
        ..edited
    };
    assert_eq!(store.save_campaign(a.id, unknown).await.unwrap(), None);
    assert_eq!(store.campaign(a.id, "unknown").await.unwrap(), None);
    assert_eq!(store.campaign(b.id, "c1").await.unwrap(), None);

    let active: Vec<_> = store
        .active_campaigns()
        .await
        .unwrap()
        .into_iter()
        .map(|(ws, c)| (ws, c.id))
        .collect();
    let mut expected = vec![
        (a.id, "c1".to_owned()),
        (a.id, "c2b".to_owned()),
        (a.id, "c3".to_owned()),
        (b.id, "cb".to_owned()),
    ];
    expected.sort_by_key(|(ws, _)| *ws);
    assert_eq!(active, expected);

    assert!(store.delete_campaign(a.id, "c3").await.unwrap());
    assert!(!store.delete_campaign(a.id, "c3").await.unwrap());
    assert!(!store.delete_campaign(b.id, "c1").await.unwrap());
    assert_eq!(store.campaign(a.id, "c3").await.unwrap(), None);
    assert_eq!(
        ids(store.list_campaigns(a.id).await.unwrap()),
        ["c1", "c2a", "c2b"]
    );
    assert_eq!(store.campaign(a.id, "c1").await.unwrap(), Some(kept));
}

/// Deleting a campaign deletes its pending sends (claimed ones too: their settlement is
/// refused) and ends its dispatches' expansions; sent messages stay for tracking.
pub(super) async fn deleting_a_campaign_keeps_only_its_sent_messages(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let c = campaign("camp", NOW, CampaignStatus::Active);
    store.create_campaign(ws.id, c).await.unwrap();
    store
        .create_campaign(ws.id, campaign("other", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let enqueue = Enqueue {
        dispatches: vec![
            dispatch(&ws, "d", "camp"),
            expanding(&ws, "x", NOW, None),
            dispatch(&ws, "o", "other"),
        ],
        items: vec![
            item(1, job("d", at(1))),
            item(2, job("d", at(2))),
            item(3, job("d", at(9))),
            item(4, job("o", at(1))),
        ],
        ..Enqueue::default()
    };
    assert_eq!(store.enqueue(ws.id, enqueue).await.unwrap(), queued(4));
    let first = store.claim_sends("n", at(2), 60_000, 3).await.unwrap();
    assert_eq!(
        first.iter().map(|c| c.user.0).collect::<Vec<_>>(),
        [1, 4, 2]
    );
    assert_eq!(
        store
            .settle_sends("n", at(2), vec![sent(&first[0], vec![])])
            .await
            .unwrap(),
        0
    );
    assert_eq!(counts(&*store, &ws, "camp").await, pending(2, 1, 0));
    assert!(store.delete_campaign(ws.id, "camp").await.unwrap());
    assert_eq!(counts(&*store, &ws, "camp").await, pending(0, 1, 0));
    assert_eq!(counts(&*store, &ws, "other").await, pending(1, 0, 0));
    // User 2's send was claimed when it was deleted: its settlement is refused, its events
    // never logged.
    let late = sent(&first[2], vec![event(&ws, "late")]);
    assert_eq!(store.settle_sends("n", at(3), vec![late]).await.unwrap(), 1);
    assert_eq!(log_of(&*store, &ws).await, vec![]);
    assert!(
        store
            .sent_message(ws.id, first[0].id)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.expanding_dispatches(at(100)).await.unwrap(), vec![]);
    let more = Enqueue {
        expansion: Some(("x".into(), Some(UserSeq(10)))),
        ..items(vec![item(5, job("x", at(3)))])
    };
    let refused = store.enqueue(ws.id, more).await;
    assert!(is_conflict(&refused), "{refused:?}");
    let rest = store.claim_sends("n", at(100), 60_000, 10).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.user.0).collect::<Vec<_>>(), [4]);
}

// --- enqueue ---------------------------------------------------------------------------------

/// An enqueue creates its dispatches as given, writes the jobs of its items and appends the
/// items' events, then the loose ones, each about its user; one that fails writes nothing.
pub(super) async fn enqueue_writes_dispatches_jobs_and_events_all_or_nothing(
    store: Arc<dyn Store>,
) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let d1 = DispatchRecord {
        send_id: Some("send-1".into()),
        per_user_ids: true,
        properties: Some(r#"{"k":1}"#.into()),
        audience: Some(json!({"AND": [{"custom_attribute": {"name": "x", "eq": 1}}]})),
        ..dispatch(&a, "d1", "camp")
    };
    let d2 = DispatchRecord {
        source: DispatchSource::AdHoc {
            definition: json!({"messages": {"webhook": {"url": "https://h.example/x"}}}),
        },
        created_at: at(1),
        expanding_after: Some(UserSeq(0)),
        not_before: Some(at(60)),
        ..dispatch(&a, "d2", "-")
    };
    let with_props = SendJob {
        properties: Some(r#"{"p":"q"}"#.into()),
        variant: "v-2".into(),
        ..job("d1", at(1))
    };
    let enqueue = Enqueue {
        dispatches: vec![d1.clone(), d2.clone()],
        items: vec![
            NewSend {
                events: vec![event(&a, "e1"), event(&a, "e2")],
                ..item(1, with_props.clone())
            },
            NewSend {
                user: UserSeq(2),
                receipt: receipt("camp", None),
                job: None,
                events: vec![event(&a, "e3")],
            },
            item(3, job("d1", at(2))),
        ],
        events: vec![(None, event(&a, "e4")), (Some(UserSeq(7)), event(&a, "e5"))],
        ..Enqueue::default()
    };
    assert_eq!(store.enqueue(a.id, enqueue).await.unwrap(), queued(2));
    assert_eq!(store.dispatch(a.id, "d1").await.unwrap(), Some(d1.clone()));
    assert_eq!(store.dispatch(a.id, "d2").await.unwrap(), Some(d2.clone()));
    assert_eq!(store.dispatch(b.id, "d1").await.unwrap(), None);
    let events = all_events(&*store, &a).await;
    assert_eq!(
        logged(&events),
        [
            by(Some(1), "e1"),
            by(Some(1), "e2"),
            by(Some(2), "e3"),
            by(None, "e4"),
            by(Some(7), "e5"),
        ]
    );
    assert_eq!(events[0].event, event(&a, "e1"), "as given");
    assert_eq!(store.event_log_head(a.id).await.unwrap(), events[4].seq);
    assert_eq!(log_of(&*store, &b).await, vec![]);
    let claimed = store.claim_sends("n", at(2), 10_000_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        (
            claimed[0].workspace,
            claimed[0].user,
            &claimed[0].job,
            claimed[0].attempts
        ),
        (a.id, UserSeq(1), &with_props, 0)
    );
    assert_eq!(
        (claimed[1].workspace, claimed[1].user, &claimed[1].job),
        (a.id, UserSeq(3), &job("d1", at(2)))
    );
    assert_ne!(claimed[0].id, claimed[1].id);

    // A dispatch id taken fails the enqueue: none of it is written.
    let failing = Enqueue {
        dispatches: vec![dispatch(&a, "d3", "camp"), dispatch(&a, "d1", "camp")],
        items: vec![NewSend {
            events: vec![event(&a, "lost-1")],
            ..item(4, job("d3", at(1)))
        }],
        events: vec![(None, event(&a, "lost-2"))],
        conversions: vec![NewConversion {
            campaign_id: "camp".into(),
            user: UserSeq(4),
            index: 0,
            event: event(&a, "lost-3"),
        }],
        ..Enqueue::default()
    };
    let failed = store.enqueue(a.id, failing).await;
    assert!(is_conflict(&failed), "{failed:?}");
    assert_eq!(all_events(&*store, &a).await, events);
    assert_eq!(store.dispatch(a.id, "d3").await.unwrap(), None);
    assert_eq!(store.dispatch(a.id, "d1").await.unwrap(), Some(d1));
    assert_eq!(store.receipts_of(a.id, UserSeq(4)).await.unwrap(), vec![]);
    assert_eq!(
        store.claim_sends("n", at(100), 1000, 10).await.unwrap(),
        vec![]
    );
    let conversion = Enqueue {
        conversions: vec![NewConversion {
            campaign_id: "camp".into(),
            user: UserSeq(4),
            index: 0,
            event: event(&a, "conv"),
        }],
        ..Enqueue::default()
    };
    assert_eq!(
        store.enqueue(a.id, conversion).await.unwrap().conversions,
        1,
        "the failed enqueue recorded no conversion"
    );
}

/// A receipt lets a user receive a campaign once, or again once the re-eligibility window has
/// passed since the last receipt; the receipt's time is the job's due time, else its first
/// event's, else the newest dispatch's creation. A refused item is skipped whole (no job, no
/// events) and counted ineligible; repeats within one enqueue see the ones before them.
/// A receipt taken ahead (a send scheduled for later) does not keep an earlier send out when a
/// window separates them, and the row keeps the later time; a rescheduled dispatch moves the
/// receipts its pending sends took, a cancelled one releases them (its user may receive the
/// campaign again), while a receipt another send moved on is left alone.
pub(super) async fn scheduled_receipts_follow_their_dispatch(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let later = Millis(NOW.0 + 365 * DAY);
    let send =
        |user: u32, dispatch_id: &str, campaign: &str, window: Option<i64>, due: Millis| NewSend {
            user: UserSeq(user),
            receipt: receipt(campaign, window),
            job: Some(job(dispatch_id, due)),
            events: vec![],
        };
    let enqueue = |dispatch_id: &str, campaign: &str, sends: Vec<NewSend>| Enqueue {
        dispatches: vec![dispatch(&a, dispatch_id, campaign)],
        items: sends,
        ..Enqueue::default()
    };
    let received = |user: u32| {
        let store = Arc::clone(&store);
        async move {
            store
                .receipts_of(a.id, UserSeq(user))
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.campaign_id, r.received_at))
                .collect::<Vec<_>>()
        }
    };
    // Window 0: a send scheduled a year ahead, then one now; both go, the row keeps the later.
    let ahead = enqueue(
        "ahead",
        "zero",
        vec![send(1, "ahead", "zero", Some(0), later)],
    );
    assert_eq!(store.enqueue(a.id, ahead).await.unwrap().queued, 1);
    let now = enqueue("now", "zero", vec![send(1, "now", "zero", Some(0), NOW)]);
    assert_eq!(store.enqueue(a.id, now).await.unwrap().queued, 1);
    assert_eq!(received(1).await, [("zero".to_owned(), later)]);
    // A window wider than the gap keeps the earlier one out, as it would the later one.
    let wide = enqueue(
        "wide",
        "zero",
        vec![send(1, "wide", "zero", Some(DAY), Millis(later.0 - 1))],
    );
    assert_eq!(store.enqueue(a.id, wide).await.unwrap().ineligible, 1);

    // Once only: scheduled ahead for users 2 and 3, then moved, then cancelled.
    let once = enqueue(
        "sched",
        "once",
        vec![
            send(2, "sched", "once", None, later),
            send(3, "sched", "once", None, later),
        ],
    );
    assert_eq!(store.enqueue(a.id, once).await.unwrap().queued, 2);
    let moved = Millis(later.0 + DAY);
    assert!(
        store
            .reschedule_dispatch(a.id, "sched", moved)
            .await
            .unwrap()
    );
    assert_eq!(received(2).await, [("once".to_owned(), moved)]);
    // User 3 also has a receipt of another campaign; user 4's receipt of the scheduled
    // dispatch's campaign was moved on by a later send (window 0).
    let other = enqueue(
        "other",
        "zero",
        vec![send(3, "other", "zero", Some(0), NOW)],
    );
    store.enqueue(a.id, other).await.unwrap();
    let four = items(vec![send(4, "sched", "once", Some(0), moved)]);
    store.enqueue(a.id, four).await.unwrap();
    let past = Millis(moved.0 + 5);
    let on = enqueue("on", "once", vec![send(4, "on", "once", Some(0), past)]);
    assert_eq!(store.enqueue(a.id, on).await.unwrap().queued, 1);
    assert!(store.cancel_dispatch(a.id, "sched").await.unwrap());
    assert_eq!(
        received(2).await,
        [],
        "the cancelled send's receipt is released"
    );
    assert_eq!(
        received(3).await,
        [("zero".to_owned(), NOW)],
        "only the cancelled dispatch's campaign is touched"
    );
    assert_eq!(
        received(4).await,
        [("once".to_owned(), past)],
        "a receipt a later send moved on is not the cancelled send's"
    );
    let again = enqueue("again", "once", vec![send(2, "again", "once", None, NOW)]);
    assert_eq!(
        store.enqueue(a.id, again).await.unwrap().queued,
        1,
        "user 2 may receive it now"
    );
    assert_eq!(
        store
            .dispatch(a.id, "sched")
            .await
            .unwrap()
            .unwrap()
            .not_before,
        None,
        "a cancelled dispatch is no longer a schedule"
    );
}

/// A scheduled ad-hoc dispatch's definition can be replaced until it is cancelled; nothing else
/// can be (a campaign's dispatch, a dispatch sent now, another workspace's).
pub(super) async fn a_scheduled_adhoc_definition_is_replaced_until_cancelled(
    store: Arc<dyn Store>,
) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let adhoc = |id: &str, not_before: Option<Millis>, body: &str| DispatchRecord {
        source: DispatchSource::AdHoc {
            definition: json!({"messages": [{"id": "v", "body": body}]}),
        },
        not_before,
        ..dispatch(&a, id, "unused")
    };
    let later = Millis(NOW.0 + DAY);
    let e = Enqueue {
        dispatches: vec![
            adhoc("sched", Some(later), "old"),
            adhoc("now", None, "old"),
            dispatch(&a, "camp", "c"),
        ],
        ..Enqueue::default()
    };
    store.enqueue(a.id, e).await.unwrap();
    let new = json!({"messages": [{"id": "v", "body": "new"}]});
    assert!(
        store
            .replace_adhoc_definition(a.id, "sched", new.clone())
            .await
            .unwrap()
    );
    let DispatchSource::AdHoc { definition } =
        store.dispatch(a.id, "sched").await.unwrap().unwrap().source
    else {
        panic!("an ad-hoc dispatch")
    };
    assert_eq!(definition, new);
    for (ws, id) in [
        (a.id, "now"),
        (a.id, "camp"),
        (a.id, "nope"),
        (b.id, "sched"),
    ] {
        assert!(
            !store
                .replace_adhoc_definition(ws, id, new.clone())
                .await
                .unwrap(),
            "{id}"
        );
    }
    assert!(store.cancel_dispatch(a.id, "sched").await.unwrap());
    assert!(
        !store
            .replace_adhoc_definition(a.id, "sched", new)
            .await
            .unwrap(),
        "a cancelled schedule is no longer one"
    );
}

pub(super) async fn receipts_allow_a_campaign_once_per_window(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let with = |user: u32, campaign_id: &str, window: Option<i64>, due: Millis, ev: &str| NewSend {
        user: UserSeq(user),
        receipt: receipt(campaign_id, window),
        job: Some(job("d", due)),
        events: vec![event(&a, ev)],
    };
    let one = |s: NewSend| items(vec![s]);
    let outcome = |queued: u64, ineligible: u64| EnqueueOutcome {
        queued,
        ineligible,
        conversions: 0,
    };
    let recv = |campaign_id: &str, received_at: Millis| ReceiptRecord {
        campaign_id: campaign_id.to_owned(),
        received_at,
    };

    let a_id = a.id;
    let enq = |e: Enqueue| {
        let store = Arc::clone(&store);
        async move { store.enqueue(a_id, e).await.unwrap() }
    };
    assert_eq!(
        enq(one(with(1, "camp", Some(MINUTE), NOW, "r1"))).await,
        outcome(1, 0)
    );
    assert_eq!(
        store.receipts_of(a.id, UserSeq(1)).await.unwrap(),
        [recv("camp", NOW)]
    );
    let within = Millis(NOW.0 + MINUTE - 1);
    assert_eq!(
        enq(one(with(1, "camp", Some(MINUTE), within, "r2"))).await,
        outcome(0, 1)
    );
    assert_eq!(
        store.receipts_of(a.id, UserSeq(1)).await.unwrap(),
        [recv("camp", NOW)],
        "a refused receipt changes nothing"
    );
    let after = Millis(NOW.0 + MINUTE);
    assert_eq!(
        enq(one(with(1, "camp", Some(MINUTE), after, "r3"))).await,
        outcome(1, 0)
    );
    // Without a window, never again.
    assert_eq!(
        enq(one(with(1, "once", None, NOW, "o1"))).await,
        outcome(1, 0)
    );
    let years = Millis(NOW.0 + 3650 * DAY);
    assert_eq!(
        enq(one(with(1, "once", None, years, "o2"))).await,
        outcome(0, 1)
    );
    assert_eq!(
        store.receipts_of(a.id, UserSeq(1)).await.unwrap(),
        [recv("camp", after), recv("once", NOW)],
        "most recent first"
    );

    // The longest window does not overflow: never again either.
    assert_eq!(
        enq(one(with(1, "huge", Some(i64::MAX), NOW, "h1"))).await,
        outcome(1, 0)
    );
    assert_eq!(
        enq(one(with(1, "huge", Some(i64::MAX), years, "h2"))).await,
        outcome(0, 1)
    );
    assert_eq!(
        store.receipts_of(a.id, UserSeq(1)).await.unwrap(),
        [recv("camp", after), recv("huge", NOW), recv("once", NOW)],
        "ties by campaign id"
    );

    // A control-group enrolment: no job, the receipt at its event's time.
    let control = NewSend {
        user: UserSeq(2),
        receipt: receipt("camp", Some(MINUTE)),
        job: None,
        events: vec![event_at(&a, "c1", at(5))],
    };
    assert_eq!(enq(one(control)).await, outcome(0, 0));
    assert_eq!(
        store.receipts_of(a.id, UserSeq(2)).await.unwrap(),
        [recv("camp", at(5))]
    );
    let early = Millis(at(5).0 + MINUTE - 1);
    assert_eq!(
        enq(one(with(2, "camp", Some(MINUTE), early, "c2"))).await,
        outcome(0, 1)
    );

    // Neither a job nor events: the newest dispatch the enqueue creates.
    let bare = Enqueue {
        dispatches: vec![
            DispatchRecord {
                created_at: at(9),
                ..dispatch(&a, "d-new", "camp")
            },
            DispatchRecord {
                created_at: at(7),
                ..dispatch(&a, "d-old", "camp")
            },
        ],
        items: vec![NewSend {
            user: UserSeq(3),
            receipt: receipt("camp", Some(MINUTE)),
            job: None,
            events: vec![],
        }],
        ..Enqueue::default()
    };
    assert_eq!(enq(bare).await, outcome(0, 0));
    assert_eq!(
        store.receipts_of(a.id, UserSeq(3)).await.unwrap(),
        [recv("camp", at(9))]
    );

    // Repeats in one enqueue, in order: the second is a window after the first, the third
    // within the second's window; another campaign and another user are independent.
    let repeats = items(vec![
        with(4, "camp", Some(MINUTE), NOW, "x1"),
        with(4, "camp", Some(MINUTE), after, "x2"),
        with(4, "camp", Some(MINUTE), Millis(after.0 + 1), "x3"),
        with(4, "other", Some(MINUTE), NOW, "x4"),
        with(5, "camp", Some(MINUTE), NOW, "x5"),
    ]);
    assert_eq!(enq(repeats).await, outcome(4, 1));
    assert_eq!(
        store.receipts_of(a.id, UserSeq(4)).await.unwrap(),
        [recv("camp", after), recv("other", NOW)]
    );

    let seen: Vec<String> = log_of(&*store, &a)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(seen, ["r1", "r3", "o1", "h1", "c1", "x1", "x2", "x4", "x5"]);
    assert_eq!(store.receipts_of(b.id, UserSeq(1)).await.unwrap(), vec![]);
    assert_eq!(store.receipts_of(a.id, UserSeq(9)).await.unwrap(), vec![]);
    let total = store.claim_sends("n", years, 1000, 100).await.unwrap();
    assert_eq!(total.len(), 8, "one job per accepted item");

    // Concurrent enqueues of one (campaign, user): exactly one goes ahead.
    let mut tasks = Vec::new();
    for k in 0..8 {
        let store = Arc::clone(&store);
        let ws = a.clone();
        tasks.push(tokio::spawn(async move {
            let racing = NewSend {
                user: UserSeq(6),
                receipt: receipt("race", None),
                job: Some(job("d", NOW)),
                events: vec![event(&ws, &format!("race-{k}"))],
            };
            store.enqueue(ws.id, items(vec![racing])).await.unwrap()
        }));
    }
    let mut sum = EnqueueOutcome::default();
    for t in tasks {
        let o = t.await.unwrap();
        sum.queued += o.queued;
        sum.ineligible += o.ineligible;
    }
    assert_eq!((sum.queued, sum.ineligible), (1, 7));
    let races = log_of(&*store, &a)
        .await
        .into_iter()
        .filter(|(_, id)| id.starts_with("race-"))
        .count();
    assert_eq!(races, 1);
}

/// The trigger cursor and a campaign's next run move by compare-and-set: a stale expectation
/// is a `Conflict` and the enqueue writes nothing (no dispatch, job, receipt or event).
pub(super) async fn cursor_and_next_run_move_by_compare_and_set(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let start = TriggerCursor::default();
    let c1 = TriggerCursor {
        events: 10,
        cohort_changes: 3,
    };
    let c2 = TriggerCursor {
        events: 12,
        cohort_changes: 3,
    };
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), start);
    let settings = json!({"rules": [{"max": 2, "window_days": 1}]});
    store
        .save_messaging_settings(a.id, settings.clone())
        .await
        .unwrap();
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), start);
    // Everything an enqueue can write, to see that a conflict writes none of it.
    let payload = |tag: &str| Enqueue {
        dispatches: vec![dispatch(&a, &format!("d-{tag}"), "camp")],
        items: vec![NewSend {
            user: UserSeq(1),
            receipt: receipt(&format!("camp-{tag}"), None),
            job: Some(job(&format!("d-{tag}"), NOW)),
            events: vec![event(&a, &format!("item-{tag}"))],
        }],
        events: vec![(None, event(&a, &format!("loose-{tag}")))],
        ..Enqueue::default()
    };
    let moved = Enqueue {
        cursor: Some((start, c1)),
        ..payload("1")
    };
    assert_eq!(store.enqueue(a.id, moved).await.unwrap(), queued(1));
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), c1);
    assert_eq!(
        store.messaging_settings(a.id).await.unwrap(),
        Some(settings.clone())
    );
    let stale = Enqueue {
        cursor: Some((start, c2)),
        ..payload("2")
    };
    let refused = store.enqueue(a.id, stale).await;
    assert!(is_conflict(&refused), "{refused:?}");
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), c1);
    nothing_of_refused(&*store, &a).await;
    let next = Enqueue {
        cursor: Some((c1, c2)),
        ..payload("3")
    };
    assert_eq!(store.enqueue(a.id, next).await.unwrap(), queued(1));
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), c2);
    assert_eq!(
        store.messaging_settings(a.id).await.unwrap(),
        Some(settings)
    );
    // Workspaces have their own cursor; a send id or settings saved first do not move it.
    assert_eq!(store.trigger_cursor(b.id).await.unwrap(), start);
    assert!(
        store
            .create_send_id(b.id, "camp", "s", NOW, NOW, 10)
            .await
            .unwrap()
    );
    let stale_b = Enqueue {
        cursor: Some((c1, c2)),
        ..Enqueue::default()
    };
    assert!(is_conflict(&store.enqueue(b.id, stale_b).await));
    let first_b = Enqueue {
        cursor: Some((start, c1)),
        ..Enqueue::default()
    };
    store.enqueue(b.id, first_b).await.unwrap();
    assert_eq!(store.trigger_cursor(b.id).await.unwrap(), c1);
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), c2);

    // Nodes racing from the same cursor: exactly one moves it and writes its events.
    let mut tasks = Vec::new();
    for k in 0..6 {
        let store = Arc::clone(&store);
        let ws = a.clone();
        tasks.push(tokio::spawn(async move {
            let to = TriggerCursor {
                events: 100 + k,
                cohort_changes: 3,
            };
            let racing = Enqueue {
                cursor: Some((c2, to)),
                events: vec![(None, event(&ws, &format!("cursor-{k}")))],
                ..Enqueue::default()
            };
            (to, store.enqueue(ws.id, racing).await)
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        let (to, result) = t.await.unwrap();
        match result {
            Ok(_) => won.push(to),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won.len(), 1);
    assert_eq!(store.trigger_cursor(a.id).await.unwrap(), won[0]);
    let racers = log_of(&*store, &a)
        .await
        .into_iter()
        .filter(|(_, id)| id.starts_with("cursor-"))
        .collect::<Vec<_>>();
    assert_eq!(
        racers,
        [by(None, &format!("cursor-{}", won[0].events - 100))]
    );

    // A campaign's next run.
    store
        .create_campaign(a.id, campaign("sched", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let next_run = |expected: Option<Millis>, new: Option<Millis>, tag: &str| Enqueue {
        next_run: Some(("sched".into(), expected, new)),
        ..payload(tag)
    };
    let a_id = a.id;
    let run_of = |store: Arc<dyn Store>| async move {
        store
            .campaign(a_id, "sched")
            .await
            .unwrap()
            .unwrap()
            .next_run
    };
    store
        .enqueue(a.id, next_run(None, Some(at(60)), "4"))
        .await
        .unwrap();
    assert_eq!(run_of(Arc::clone(&store)).await, Some(at(60)));
    let refused = store
        .enqueue(a.id, next_run(None, Some(at(120)), "2"))
        .await;
    assert!(is_conflict(&refused), "{refused:?}");
    let refused = store
        .enqueue(a.id, next_run(Some(at(59)), Some(at(120)), "2"))
        .await;
    assert!(is_conflict(&refused), "{refused:?}");
    assert_eq!(run_of(Arc::clone(&store)).await, Some(at(60)));
    nothing_of_refused(&*store, &a).await;
    store
        .enqueue(a.id, next_run(Some(at(60)), Some(at(120)), "5"))
        .await
        .unwrap();
    assert_eq!(run_of(Arc::clone(&store)).await, Some(at(120)));
    store
        .enqueue(a.id, next_run(Some(at(120)), None, "6"))
        .await
        .unwrap();
    assert_eq!(run_of(Arc::clone(&store)).await, None);
    // Nodes racing to dispatch the same occurrence: exactly one does.
    let mut tasks = Vec::new();
    for k in 0..6 {
        let store = Arc::clone(&store);
        let ws = a.clone();
        tasks.push(tokio::spawn(async move {
            let racing = Enqueue {
                dispatches: vec![dispatch(&ws, &format!("occurrence-{k}"), "sched")],
                next_run: Some(("sched".into(), None, Some(at(1000 + k)))),
                ..Enqueue::default()
            };
            store.enqueue(ws.id, racing).await
        }));
    }
    let mut winners = Vec::new();
    for (k, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => winners.push(k as i64),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        run_of(Arc::clone(&store)).await,
        Some(at(1000 + winners[0]))
    );
    for k in 0..6 {
        let created = store
            .dispatch(a.id, &format!("occurrence-{k}"))
            .await
            .unwrap();
        assert_eq!(created.is_some(), k == winners[0]);
    }
    // A campaign that does not exist (here or at all) can no longer be dispatched.
    let missing = Enqueue {
        next_run: Some(("nope".into(), None, Some(at(1)))),
        ..payload("2")
    };
    assert!(is_conflict(&store.enqueue(a.id, missing).await));
    let elsewhere = Enqueue {
        next_run: Some(("sched".into(), None, Some(at(1)))),
        ..Enqueue::default()
    };
    assert!(is_conflict(&store.enqueue(b.id, elsewhere).await));
    nothing_of_refused(&*store, &a).await;
}

/// Nothing of the enqueues tagged "2" (all refused) was written (their events are `item-2`
/// and `loose-2`; a racer's `cursor-2` is another test's).
async fn nothing_of_refused(store: &dyn Store, a: &Workspace) {
    assert_eq!(store.dispatch(a.id, "d-2").await.unwrap(), None);
    assert!(
        !store
            .receipts_of(a.id, UserSeq(1))
            .await
            .unwrap()
            .iter()
            .any(|r| r.campaign_id == "camp-2")
    );
    assert!(
        !log_of(store, a)
            .await
            .iter()
            .any(|(_, id)| id == "item-2" || id == "loose-2")
    );
}

/// An expansion mark moves a dispatch's expansion forward only while it is expanding: a mark
/// at or before the current one, or on a complete, cancelled or unknown dispatch, is a
/// `Conflict` and writes nothing. `expanding_dispatches` lists the incomplete ones whose
/// `not_before` has come, of every workspace, oldest first.
pub(super) async fn expansion_marks_only_move_forward(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let dx = expanding(&a, "dx", at(1), None);
    let dy = expanding(&a, "dy", at(2), Some(at(100)));
    let dz = dispatch(&a, "dz", "camp");
    let db = expanding(&b, "db", at(3), None);
    let create = Enqueue {
        dispatches: vec![dy.clone(), dx.clone(), dz],
        ..Enqueue::default()
    };
    store.enqueue(a.id, create).await.unwrap();
    let create_b = Enqueue {
        dispatches: vec![db.clone()],
        ..Enqueue::default()
    };
    store.enqueue(b.id, create_b).await.unwrap();
    let names = |list: Vec<DispatchRecord>| list.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        store.expanding_dispatches(at(99)).await.unwrap(),
        vec![dx.clone(), db.clone()]
    );
    assert_eq!(
        names(store.expanding_dispatches(at(100)).await.unwrap()),
        ["dx", "dy", "db"]
    );

    let mark = |mark: Option<u32>, user: u32, tag: &str| Enqueue {
        expansion: Some(("dx".into(), mark.map(UserSeq))),
        items: vec![NewSend {
            events: vec![event(&a, tag)],
            ..item(user, job("dx", NOW))
        }],
        ..Enqueue::default()
    };
    let a_id = a.id;
    let mark_of = |store: Arc<dyn Store>| async move {
        store
            .dispatch(a_id, "dx")
            .await
            .unwrap()
            .unwrap()
            .expanding_after
    };
    assert_eq!(
        store
            .enqueue(a.id, mark(Some(10), 10, "m10"))
            .await
            .unwrap(),
        queued(1)
    );
    assert_eq!(mark_of(Arc::clone(&store)).await, Some(UserSeq(10)));
    for (back, tag) in [(5, "m5"), (10, "m10-again")] {
        let refused = store.enqueue(a.id, mark(Some(back), back, tag)).await;
        assert!(is_conflict(&refused), "{back}: {refused:?}");
    }
    assert_eq!(mark_of(Arc::clone(&store)).await, Some(UserSeq(10)));
    assert_eq!(
        store.enqueue(a.id, mark(None, 20, "done")).await.unwrap(),
        queued(1)
    );
    assert_eq!(mark_of(Arc::clone(&store)).await, None);
    assert_eq!(
        names(store.expanding_dispatches(at(100)).await.unwrap()),
        ["dy", "db"]
    );
    // Complete: a second node finishing the same expansion writes nothing.
    for (m, tag) in [(None, "done-again"), (Some(30), "m30")] {
        let refused = store.enqueue(a.id, mark(m, 30, tag)).await;
        assert!(is_conflict(&refused), "{m:?}: {refused:?}");
    }
    assert_eq!(
        log_of(&*store, &a).await,
        [by(Some(10), "m10"), by(Some(20), "done")]
    );
    let all = store.claim_sends("n", NOW, 1000, 10).await.unwrap();
    assert_eq!(all.iter().map(|c| c.user.0).collect::<Vec<_>>(), [10, 20]);
    // An unknown dispatch, or one of another workspace.
    for m in [None, Some(UserSeq(1))] {
        let unknown = Enqueue {
            expansion: Some(("nope".into(), m)),
            ..Enqueue::default()
        };
        assert!(is_conflict(&store.enqueue(a.id, unknown).await));
        let other = Enqueue {
            expansion: Some(("db".into(), m)),
            ..Enqueue::default()
        };
        assert!(is_conflict(&store.enqueue(a.id, other).await));
    }
    assert_eq!(store.dispatch(b.id, "db").await.unwrap(), Some(db));
    // A dispatch created by the enqueue that marks it.
    let created = Enqueue {
        dispatches: vec![expanding(&a, "dw", at(4), None)],
        expansion: Some(("dw".into(), Some(UserSeq(3)))),
        ..Enqueue::default()
    };
    store.enqueue(a.id, created).await.unwrap();
    assert_eq!(
        store
            .dispatch(a.id, "dw")
            .await
            .unwrap()
            .unwrap()
            .expanding_after,
        Some(UserSeq(3))
    );
}

// --- the queue -------------------------------------------------------------------------------

/// Claims take pending sends that are due, of every workspace, oldest due first, at most
/// `limit`, under a lease of `lease_ms`: another owner cannot claim them until the lease runs
/// out (at `now + lease_ms`), then anyone can, with the attempt count unchanged.
/// A starting node takes back the sends its previous incarnation (same owner name) held:
/// they are claimable at once, another owner's leases stay, settled sends are untouched.
pub(super) async fn a_node_releases_its_own_leases_when_it_starts(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    queue(&*store, &a, "d", &[1, 2, 3], at(1)).await;
    let lease = 60_000;
    let mine = store.claim_sends("node-1", at(2), lease, 2).await.unwrap();
    let theirs = store.claim_sends("node-2", at(2), lease, 10).await.unwrap();
    assert_eq!((mine.len(), theirs.len()), (2, 1));
    // One of node-1's sends was settled before it died.
    let settled = Settlement {
        send: mine[0].id,
        workspace: a.id,
        user: mine[0].user,
        state: SendState::Sent {
            address: None,
            links: None,
        },
        events: vec![],
    };
    assert_eq!(
        store
            .settle_sends("node-1", at(3), vec![settled])
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.release_leases("node-1").await.unwrap(), 1);
    assert_eq!(store.release_leases("node-1").await.unwrap(), 0);
    assert_eq!(store.release_leases("nobody").await.unwrap(), 0);
    // Long before any lease ends, only node-1's unsettled send is claimable again.
    let again = store.claim_sends("node-1", at(4), lease, 10).await.unwrap();
    assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), [mine[1].id]);
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(Millis(at(2).0 + lease as i64))
    );
}

pub(super) async fn claims_lease_due_sends_oldest_first(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    queue(&*store, &a, "d", &[1], at(4)).await;
    queue(&*store, &a, "d", &[2], at(1)).await;
    queue(&*store, &b, "d", &[1], at(2)).await;
    queue(&*store, &a, "d", &[3], at(9)).await;
    queue(&*store, &a, "d", &[4], at(3)).await;
    let lease = 10_000;
    let first = store.claim_sends("A", at(3), lease, 2).await.unwrap();
    assert_eq!(
        first.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 2, at(1), 0), (b.id.0, 1, at(2), 0)]
    );
    let second = store.claim_sends("B", at(3), lease, 10).await.unwrap();
    assert_eq!(
        second.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 4, at(3), 0)]
    );
    assert_eq!(
        store.claim_sends("C", at(3), lease, 10).await.unwrap(),
        vec![]
    );
    assert_eq!(
        store.claim_sends("A", at(3), lease, 10).await.unwrap(),
        vec![]
    );
    // A moment before the leases end: only what came due since.
    let third = store
        .claim_sends("C", Millis(at(13).0 - 1), lease, 10)
        .await
        .unwrap();
    assert_eq!(
        third.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 1, at(4), 0), (a.id.0, 3, at(9), 0)]
    );
    // When they end, A's and B's sends are free again.
    assert_eq!(
        store.claim_sends("D", at(13), lease, 0).await.unwrap(),
        vec![]
    );
    let fourth = store.claim_sends("D", at(13), lease, 10).await.unwrap();
    assert_eq!(
        fourth.iter().map(who).collect::<Vec<_>>(),
        [
            (a.id.0, 2, at(1), 0),
            (b.id.0, 1, at(2), 0),
            (a.id.0, 4, at(3), 0)
        ]
    );
    let ids = |c: &[ClaimedSend]| c.iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(&fourth), [ids(&first), ids(&second)].concat());
    let all: HashSet<i64> = [ids(&first), ids(&second), ids(&third)]
        .concat()
        .into_iter()
        .collect();
    assert_eq!(all.len(), 5, "every send has its own id");
}

/// A settlement counts only from the owner that holds the send's lease: one whose lease was
/// taken over, that never claimed the send, names the wrong workspace, or settles it twice is
/// refused and counted, and its events are not logged. An owner whose lease ran out but was
/// not taken over still holds it.
pub(super) async fn settlements_are_fenced_by_the_lease(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    store
        .create_campaign(a.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let create = Enqueue {
        dispatches: vec![dispatch(&a, "d", "camp")],
        items: vec![item(1, job("d", NOW))],
        ..Enqueue::default()
    };
    store.enqueue(a.id, create).await.unwrap();
    let lease: u64 = 30_000;
    let by_a = store.claim_sends("A", NOW, lease, 10).await.unwrap();
    assert_eq!(by_a.len(), 1);
    let taken_over = Millis(NOW.0 + lease as i64);
    let by_b = store.claim_sends("B", taken_over, lease, 10).await.unwrap();
    assert_eq!(by_b, by_a, "the same send, attempts unchanged");
    let stale = sent(&by_a[0], vec![event(&a, "stale")]);
    assert_eq!(
        store
            .settle_sends("A", Millis(taken_over.0 + 1), vec![stale])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.sent_message(a.id, by_a[0].id).await.unwrap(), None);
    assert_eq!(counts(&*store, &a, "camp").await, pending(1, 0, 0));
    let holder = sent(&by_b[0], vec![event(&a, "sent-1"), event(&a, "sent-2")]);
    assert_eq!(
        store
            .settle_sends("B", Millis(taken_over.0 + 2), vec![holder])
            .await
            .unwrap(),
        0
    );
    assert_eq!(counts(&*store, &a, "camp").await, pending(0, 1, 0));
    assert_eq!(
        store
            .settle_sends(
                "B",
                Millis(taken_over.0 + 3),
                vec![settle(
                    &by_b[0],
                    SendState::Failed,
                    vec![event(&a, "twice")]
                )]
            )
            .await
            .unwrap(),
        1,
        "a settled send is settled once"
    );
    assert_eq!(counts(&*store, &a, "camp").await, pending(0, 1, 0));
    assert_eq!(
        log_of(&*store, &a).await,
        [by(Some(1), "sent-1"), by(Some(1), "sent-2")]
    );

    // Never claimed; the wrong workspace; a lease that ran out without a new owner; a batch
    // mixing accepted and refused settlements.
    queue(&*store, &a, "d", &[2, 3, 4], at(10)).await;
    // Claimed by another owner whose lease ran out: still not A's.
    let others = store.claim_sends("peek", at(10), 1, 10).await.unwrap();
    assert_eq!(others.len(), 3);
    let later = Millis(at(10).0 + 1);
    let refused = store
        .settle_sends("A", later, vec![sent(&others[0], vec![event(&a, "never")])])
        .await
        .unwrap();
    assert_eq!(refused, 1);
    let unknown = Settlement {
        send: i64::MAX,
        ..sent(&others[0], vec![event(&a, "unknown")])
    };
    assert_eq!(
        store.settle_sends("A", later, vec![unknown]).await.unwrap(),
        1
    );
    let mine = store.claim_sends("A", later, lease, 10).await.unwrap();
    assert_eq!(mine.len(), 3);
    let wrong_ws = Settlement {
        workspace: b.id,
        ..sent(&mine[0], vec![event(&a, "wrong")])
    };
    assert_eq!(
        store
            .settle_sends("A", later, vec![wrong_ws])
            .await
            .unwrap(),
        1
    );
    let expired = Millis(later.0 + 2 * lease as i64);
    let batch = vec![
        sent(&mine[0], vec![event(&a, "ok-1")]),
        sent(&by_a[0], vec![event(&a, "lost")]),
        settle(
            &mine[1],
            SendState::RetryAt { at: at(5000) },
            vec![event(&a, "ok-2")],
        ),
        sent(&mine[0], vec![event(&a, "dup")]),
        settle(&mine[2], SendState::Failed, vec![event(&a, "ok-3")]),
    ];
    assert_eq!(store.settle_sends("A", expired, batch).await.unwrap(), 2);
    let log = log_of(&*store, &a).await;
    assert_eq!(
        log[2..],
        [
            by(Some(2), "ok-1"),
            by(Some(3), "ok-2"),
            by(Some(4), "ok-3")
        ]
    );
    assert_eq!(counts(&*store, &a, "camp").await, pending(1, 2, 1));
    assert_eq!(log_of(&*store, &b).await, vec![]);

    // A send cancelled while claimed: its settlement is refused.
    queue(&*store, &a, "d", &[5], at(600)).await;
    let claimed = store.claim_sends("A", at(600), lease, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|c| c.user.0).collect::<Vec<_>>(), [5]);
    assert!(store.cancel_dispatch(a.id, "d").await.unwrap());
    let gone = sent(&claimed[0], vec![event(&a, "cancelled")]);
    assert_eq!(
        store.settle_sends("A", at(601), vec![gone]).await.unwrap(),
        1
    );
    assert_eq!(log_of(&*store, &a).await.len(), 5);
}

/// Outcomes: `Sent` keeps the message for tracking (address, links, sent at `now`) and marks
/// the campaign's first and last send; `RetryAt` makes it due again with one more attempt,
/// `Deferred` with the same count; `Failed` ends it. Counts follow the states; `next_due` is
/// when the next send can be claimed.
pub(super) async fn settled_sends_move_between_states(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), None);
    store
        .create_campaign(a.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let create = Enqueue {
        dispatches: vec![dispatch(&a, "d", "camp")],
        ..Enqueue::default()
    };
    store.enqueue(a.id, create).await.unwrap();
    assert_eq!(counts(&*store, &a, "camp").await, pending(0, 0, 0));
    queue(&*store, &a, "d", &[1, 2, 3, 4], NOW).await;
    queue(&*store, &b, "elsewhere", &[1], at(20)).await;
    assert_eq!(counts(&*store, &a, "camp").await, pending(4, 0, 0));
    assert_eq!(counts(&*store, &b, "camp").await, pending(0, 0, 0));
    assert_eq!(store.next_due().await.unwrap(), Some(NOW));
    let c = store.claim_sends("A", NOW, 100_000, 4).await.unwrap();
    assert_eq!(c.iter().map(|c| c.user.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Claimed: the next send is b's, due before the leases end.
    assert_eq!(store.next_due().await.unwrap(), Some(at(20)));
    let links = r#"["https://example.com/a","https://example.com/b"]"#;
    let settlements = vec![
        settle(
            &c[0],
            SendState::Sent {
                address: Some("one@example.com".into()),
                links: Some(links.into()),
            },
            vec![event(&a, "sent")],
        ),
        settle(
            &c[1],
            SendState::RetryAt { at: at(60) },
            vec![event(&a, "retry")],
        ),
        settle(&c[2], SendState::Deferred { at: at(30) }, vec![]),
        settle(&c[3], SendState::Failed, vec![event(&a, "failed")]),
    ];
    assert_eq!(
        store.settle_sends("A", at(1), settlements).await.unwrap(),
        0
    );
    assert_eq!(counts(&*store, &a, "camp").await, pending(2, 1, 1));
    assert_eq!(
        store.sent_message(a.id, c[0].id).await.unwrap(),
        Some(SentMessage {
            id: c[0].id,
            workspace: a.id,
            user: UserSeq(1),
            dispatch_id: "d".into(),
            variant: "v-email".into(),
            address: Some("one@example.com".into()),
            links: Some(links.into()),
            sent_at: at(1),
        })
    );
    assert_eq!(store.sent_message(b.id, c[0].id).await.unwrap(), None);
    for pending_or_failed in &c[1..] {
        assert_eq!(
            store
                .sent_message(a.id, pending_or_failed.id)
                .await
                .unwrap(),
            None
        );
    }
    let camp = store.campaign(a.id, "camp").await.unwrap().unwrap();
    assert_eq!(
        (camp.first_sent, camp.last_sent),
        (Some(at(1)), Some(at(1)))
    );
    assert_eq!(
        log_of(&*store, &a).await,
        [
            by(Some(1), "sent"),
            by(Some(2), "retry"),
            by(Some(4), "failed")
        ]
    );
    assert_eq!(store.next_due().await.unwrap(), Some(at(20)));
    let elsewhere = store.claim_sends("A", at(20), 1000, 10).await.unwrap();
    assert_eq!(
        elsewhere.iter().map(who).collect::<Vec<_>>(),
        [(b.id.0, 1, at(20), 0)]
    );
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(Millis(at(20).0 + 1000))
    );
    store
        .settle_sends("A", at(20), vec![sent(&elsewhere[0], vec![])])
        .await
        .unwrap();
    assert_eq!(store.next_due().await.unwrap(), Some(at(30)));

    assert_eq!(
        store
            .claim_sends("A", Millis(at(30).0 - 1), 1000, 10)
            .await
            .unwrap(),
        vec![]
    );
    let deferred = store.claim_sends("A", at(30), 1000, 10).await.unwrap();
    assert_eq!(
        deferred.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 3, at(30), 0)]
    );
    let retry = vec![settle(
        &deferred[0],
        SendState::RetryAt { at: at(40) },
        vec![],
    )];
    assert_eq!(store.settle_sends("A", at(30), retry).await.unwrap(), 0);
    assert_eq!(store.next_due().await.unwrap(), Some(at(40)));
    let again = store.claim_sends("A", at(60), 1000, 10).await.unwrap();
    assert_eq!(
        again.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 3, at(40), 1), (a.id.0, 2, at(60), 1)]
    );
    let last = vec![
        sent(&again[0], vec![]),
        settle(&again[1], SendState::Failed, vec![]),
    ];
    assert_eq!(store.settle_sends("A", at(61), last).await.unwrap(), 0);
    assert_eq!(counts(&*store, &a, "camp").await, pending(0, 2, 2));
    let camp = store.campaign(a.id, "camp").await.unwrap().unwrap();
    assert_eq!(
        (camp.first_sent, camp.last_sent),
        (Some(at(1)), Some(at(61)))
    );
    assert_eq!(store.next_due().await.unwrap(), None);
    assert_eq!(
        store.claim_sends("A", at(10_000), 1000, 10).await.unwrap(),
        vec![]
    );
    // A claimed send whose dispatch is rescheduled: claimable when it is due again, not when
    // its lease ends.
    queue(&*store, &a, "d", &[5], at(100)).await;
    let c5 = store.claim_sends("A", at(100), 1000, 10).await.unwrap();
    assert_eq!(c5.len(), 1);
    assert_eq!(store.next_due().await.unwrap(), Some(at(101)));
    assert!(store.reschedule_dispatch(a.id, "d", at(500)).await.unwrap());
    assert_eq!(store.next_due().await.unwrap(), Some(at(500)));
    assert_eq!(
        store.claim_sends("B", at(499), 1000, 10).await.unwrap(),
        vec![]
    );
    let c5 = store.claim_sends("B", at(500), 1000, 10).await.unwrap();
    assert_eq!(
        c5.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 5, at(500), 0)]
    );
}

/// A settlement's events go to the log of its send's workspace, about its user, in the order
/// of the call — a call may settle sends of several workspaces.
pub(super) async fn settlement_events_land_in_each_workspaces_log(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    queue(&*store, &a, "da", &[1, 2], NOW).await;
    queue(&*store, &b, "db", &[1], NOW).await;
    track(
        &*store,
        &b,
        json!({"events": [{"external_id": "u", "name": "before", "time": "2025-01-01T00:00:00Z"}]}),
    )
    .await;
    let before = all_events(&*store, &b).await;
    let c = store.claim_sends("A", NOW, 1000, 10).await.unwrap();
    let by_ws = |ws: &Workspace, user: u32| {
        c.iter()
            .find(|s| s.workspace == ws.id && s.user.0 == user)
            .unwrap()
            .clone()
    };
    let settlements = vec![
        sent(&by_ws(&a, 2), vec![event(&a, "a2-1"), event(&a, "a2-2")]),
        sent(&by_ws(&b, 1), vec![event(&b, "b1")]),
        settle(&by_ws(&a, 1), SendState::Failed, vec![event(&a, "a1")]),
    ];
    assert_eq!(store.settle_sends("A", NOW, settlements).await.unwrap(), 0);
    let in_a = all_events(&*store, &a).await;
    assert_eq!(
        logged(&in_a),
        [by(Some(2), "a2-1"), by(Some(2), "a2-2"), by(Some(1), "a1")]
    );
    assert_eq!(in_a[0].event, event(&a, "a2-1"));
    assert!(in_a.windows(2).all(|w| w[0].seq < w[1].seq));
    let in_b = store.read_events(b.id, before[0].seq, 100).await.unwrap();
    assert_eq!(logged(&in_b), [by(Some(1), "b1")]);
    assert_eq!(store.event_log_head(b.id).await.unwrap(), in_b[0].seq);
    assert_eq!(
        store.event_log_head(a.id).await.unwrap(),
        in_a.last().unwrap().seq
    );
}

/// `sends_since` counts a user's sent messages (not pending or failed ones) at or after a
/// time, across campaigns and dispatches, in its workspace.
pub(super) async fn sends_since_counts_a_users_sent_messages(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let send_at = |user: u32, dispatch_id: &'static str, when: Millis, state: SendState| {
        let store = Arc::clone(&store);
        let a = a.clone();
        async move {
            queue(&*store, &a, dispatch_id, &[user], NOW).await;
            let c = store.claim_sends("n", when, 1000, 1).await.unwrap();
            assert_eq!(c.len(), 1);
            let s = vec![settle(&c[0], state, vec![])];
            assert_eq!(store.settle_sends("n", when, s).await.unwrap(), 0);
        }
    };
    let sent_state = || SendState::Sent {
        address: None,
        links: None,
    };
    send_at(1, "d1", at(1), sent_state()).await;
    send_at(1, "d2", at(5), sent_state()).await;
    send_at(1, "d2", at(6), SendState::Failed).await;
    send_at(1, "d2", at(7), SendState::RetryAt { at: at(100) }).await;
    send_at(2, "d1", at(5), sent_state()).await;
    queue(&*store, &b, "d1", &[1], NOW).await;
    let c = store.claim_sends("n", at(5), 1000, 1).await.unwrap();
    store
        .settle_sends("n", at(5), vec![sent(&c[0], vec![])])
        .await
        .unwrap();
    let a_id = a.id;
    let since = |user: u32, t: Millis| {
        let store = Arc::clone(&store);
        async move { store.sends_since(a_id, UserSeq(user), t).await.unwrap() }
    };
    assert_eq!(since(1, NOW).await, 2);
    assert_eq!(since(1, at(1)).await, 2, "at `since` counts");
    assert_eq!(since(1, Millis(at(1).0 + 1)).await, 1);
    assert_eq!(since(1, at(5)).await, 1);
    assert_eq!(since(1, Millis(at(5).0 + 1)).await, 0);
    assert_eq!(since(2, NOW).await, 1);
    assert_eq!(since(3, NOW).await, 0);
    assert_eq!(store.sends_since(b.id, UserSeq(1), NOW).await.unwrap(), 1);
    assert_eq!(store.sends_since(b.id, UserSeq(2), NOW).await.unwrap(), 0);
}

/// `recent_sends` lists a user's sends in every state, newest first, at most `limit`, each with
/// its dispatch's source (none when the dispatch row does not exist), in its workspace only.
pub(super) async fn recent_sends_list_a_users_messages_newest_first(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let adhoc = DispatchRecord {
        source: DispatchSource::AdHoc {
            definition: json!({"messages": [{"channel": "webhook"}], "canvas": {"id": "cv"}}),
        },
        ..dispatch(&a, "d-adhoc", "unused")
    };
    store
        .enqueue(
            a.id,
            Enqueue {
                dispatches: vec![dispatch(&a, "d-camp", "camp"), adhoc.clone()],
                items: vec![item(1, job("d-camp", at(1))), item(2, job("d-camp", at(1)))],
                ..Enqueue::default()
            },
        )
        .await
        .unwrap();
    let c = store.claim_sends("n", at(1), 1000, 10).await.unwrap();
    assert_eq!(c.len(), 2);
    let mine = c.iter().find(|c| c.user == UserSeq(1)).unwrap();
    let settled = vec![sent(mine, vec![])];
    assert_eq!(store.settle_sends("n", at(2), settled).await.unwrap(), 0);
    queue(&*store, &a, "d-adhoc", &[1], at(3)).await;
    queue(&*store, &a, "d-gone", &[1], at(4)).await;
    let c = store.claim_sends("n", at(3), 1000, 10).await.unwrap();
    let failed = c.iter().find(|c| c.job.dispatch_id == "d-adhoc").unwrap();
    let settled = vec![settle(failed, SendState::Failed, vec![])];
    assert_eq!(store.settle_sends("n", at(3), settled).await.unwrap(), 0);
    queue(&*store, &b, "d-camp", &[1], at(1)).await;
    let shown = |s: &UserSend| {
        (
            s.dispatch_id.clone(),
            s.source.clone(),
            s.variant.clone(),
            s.state,
            s.due_at,
            s.sent_at,
        )
    };
    let all = store.recent_sends(a.id, UserSeq(1), 10).await.unwrap();
    assert_eq!(
        all.iter().map(shown).collect::<Vec<_>>(),
        vec![
            (
                "d-gone".into(),
                None,
                "v-email".into(),
                QueueState::Pending,
                at(4),
                None
            ),
            (
                "d-adhoc".into(),
                Some(adhoc.source.clone()),
                "v-email".into(),
                QueueState::Failed,
                at(3),
                None
            ),
            (
                "d-camp".into(),
                Some(DispatchSource::Campaign {
                    campaign_id: "camp".into()
                }),
                "v-email".into(),
                QueueState::Sent,
                at(1),
                Some(at(2))
            ),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let two = store.recent_sends(a.id, UserSeq(1), 2).await.unwrap();
    assert_eq!(two, all[..2].to_vec());
    assert_eq!(
        store.recent_sends(a.id, UserSeq(1), 0).await.unwrap(),
        vec![]
    );
    assert_eq!(
        store
            .recent_sends(a.id, UserSeq(2), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store.recent_sends(a.id, UserSeq(3), 10).await.unwrap(),
        vec![]
    );
    let other = store.recent_sends(b.id, UserSeq(1), 10).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].source, None, "b has no dispatch d-camp");
}

/// Engagement events are appended about their user, in order.
pub(super) async fn engagement_is_appended_to_the_log(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    store
        .record_engagement(
            a.id,
            UserSeq(3),
            vec![event(&a, "open"), event(&a, "click")],
        )
        .await
        .unwrap();
    store
        .record_engagement(a.id, UserSeq(4), vec![])
        .await
        .unwrap();
    let events = all_events(&*store, &a).await;
    assert_eq!(logged(&events), [by(Some(3), "open"), by(Some(3), "click")]);
    assert_eq!(events[1].event, event(&a, "click"));
    assert_eq!(log_of(&*store, &b).await, vec![]);
}

/// A conversion is recorded (and its event logged) once per (campaign, user, conversion event
/// index): later ones, in the same enqueue or another, are not counted.
pub(super) async fn conversions_count_once(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let conv = |ws: &Workspace, campaign_id: &str, user: u32, index: u8, id: &str| NewConversion {
        campaign_id: campaign_id.to_owned(),
        user: UserSeq(user),
        index,
        event: event(ws, id),
    };
    let first = Enqueue {
        conversions: vec![
            conv(&a, "camp", 1, 0, "k1"),
            conv(&a, "camp", 1, 1, "k2"),
            conv(&a, "camp", 2, 0, "k3"),
            conv(&a, "other", 1, 0, "k4"),
            conv(&a, "camp", 1, 0, "k5"),
        ],
        ..Enqueue::default()
    };
    assert_eq!(
        store.enqueue(a.id, first).await.unwrap(),
        EnqueueOutcome {
            queued: 0,
            ineligible: 0,
            conversions: 4
        }
    );
    let second = Enqueue {
        conversions: vec![conv(&a, "camp", 1, 0, "k6"), conv(&a, "camp", 3, 0, "k7")],
        events: vec![(None, event(&a, "loose"))],
        ..Enqueue::default()
    };
    assert_eq!(store.enqueue(a.id, second).await.unwrap().conversions, 1);
    assert_eq!(
        log_of(&*store, &a).await,
        [
            by(Some(1), "k1"),
            by(Some(1), "k2"),
            by(Some(2), "k3"),
            by(Some(1), "k4"),
            by(None, "loose"),
            by(Some(3), "k7"),
        ]
    );
    let elsewhere = Enqueue {
        conversions: vec![conv(&b, "camp", 1, 0, "kb")],
        ..Enqueue::default()
    };
    assert_eq!(store.enqueue(b.id, elsewhere).await.unwrap().conversions, 1);
}

// --- campaign stats --------------------------------------------------------------------------

fn inc(campaign_id: &str, stat: CampaignStat, user: Option<u32>) -> StatIncrement {
    StatIncrement {
        campaign_id: campaign_id.to_owned(),
        stat,
        unique_user: user.map(UserSeq),
    }
}

fn counting(stats: Vec<StatIncrement>) -> Enqueue {
    Enqueue {
        stats,
        ..Enqueue::default()
    }
}

/// Every stat in `CampaignStat::ALL` order: the given counts, zero for the rest.
fn stat_counts(counted: &[(CampaignStat, u64)]) -> Vec<(CampaignStat, u64)> {
    CampaignStat::ALL
        .iter()
        .map(|&stat| {
            let n = counted.iter().find(|(s, _)| *s == stat).map_or(0, |c| c.1);
            (stat, n)
        })
        .collect()
}

async fn stats_of(
    store: &dyn Store,
    ws: &Workspace,
    campaign_id: &str,
) -> Vec<(CampaignStat, u64)> {
    store.campaign_stats(ws.id, campaign_id).await.unwrap()
}

/// A campaign never counted has every stat at zero, in `ALL` order; each increment without a
/// user adds one (repeats too), while a unique one counts a (campaign, stat, user) once —
/// repeated within one enqueue or across enqueues — and its user is counted separately per
/// stat and per campaign. Increments go with the rest of an enqueue.
pub(super) async fn campaign_stats_count_increments_and_unique_users_once(store: Arc<dyn Store>) {
    use CampaignStat::*;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    store
        .create_campaign(ws.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let zero = CampaignStat::ALL.map(|s| (s, 0)).to_vec();
    assert_eq!(stats_of(&*store, &ws, "camp").await, zero);
    assert_eq!(stats_of(&*store, &ws, "no-such").await, zero);
    assert_eq!(
        zero.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        [
            "sends",
            "deliveries",
            "bounces",
            "soft_bounces",
            "opens",
            "unique_opens",
            "clicks",
            "unique_clicks",
            "unsubscribes",
            "conversions",
            "aborts",
            "failures",
            "control_group",
        ]
    );

    let first = counting(vec![
        inc("camp", Sends, None),
        inc("camp", Opens, None),
        inc("camp", UniqueOpens, Some(1)),
        inc("camp", Sends, None),
        inc("camp", Opens, None),
        inc("camp", UniqueOpens, Some(1)),
        inc("camp", UniqueOpens, Some(2)),
        inc("camp", UniqueClicks, Some(1)),
        inc("camp", Sends, None),
        inc("camp", ControlGroup, None),
        inc("other", UniqueOpens, Some(1)),
    ]);
    assert_eq!(
        store.enqueue(ws.id, first).await.unwrap(),
        EnqueueOutcome::default()
    );
    assert_eq!(
        stats_of(&*store, &ws, "camp").await,
        stat_counts(&[
            (Sends, 3),
            (Opens, 2),
            (UniqueOpens, 2),
            (UniqueClicks, 1),
            (ControlGroup, 1),
        ])
    );
    assert_eq!(
        stats_of(&*store, &ws, "other").await,
        stat_counts(&[(UniqueOpens, 1)])
    );

    // A second enqueue, with a job and an event: users 1 and 2 are counted already.
    let second = Enqueue {
        dispatches: vec![dispatch(&ws, "d", "camp")],
        items: vec![NewSend {
            events: vec![event(&ws, "sent")],
            ..item(3, job("d", NOW))
        }],
        ..counting(vec![
            inc("camp", UniqueOpens, Some(1)),
            inc("camp", UniqueOpens, Some(3)),
            inc("camp", Opens, None),
            inc("camp", UniqueClicks, Some(2)),
            inc("camp", UniqueClicks, Some(1)),
            inc("camp", Deliveries, None),
            inc("camp", Bounces, None),
            inc("camp", SoftBounces, None),
            inc("camp", Clicks, None),
            inc("camp", Unsubscribes, None),
            inc("camp", Conversions, None),
            inc("camp", Aborts, None),
            inc("camp", Failures, None),
        ])
    };
    assert_eq!(store.enqueue(ws.id, second).await.unwrap(), queued(1));
    assert_eq!(log_of(&*store, &ws).await, [by(Some(3), "sent")]);
    assert_eq!(
        stats_of(&*store, &ws, "camp").await,
        [
            (Sends, 3),
            (Deliveries, 1),
            (Bounces, 1),
            (SoftBounces, 1),
            (Opens, 3),
            (UniqueOpens, 3),
            (Clicks, 1),
            (UniqueClicks, 2),
            (Unsubscribes, 1),
            (Conversions, 1),
            (Aborts, 1),
            (Failures, 1),
            (ControlGroup, 1),
        ]
    );
    assert_eq!(
        stats_of(&*store, &ws, "other").await,
        stat_counts(&[(UniqueOpens, 1)])
    );
}

// --- send-id series --------------------------------------------------------------------------
fn series_key(campaign_id: &str, send_id: &str, day: i64, channel: &str) -> SendSeriesKey {
    SendSeriesKey {
        campaign_id: campaign_id.to_owned(),
        send_id: send_id.to_owned(),
        day: Millis(day * DAY),
        channel: channel.to_owned(),
        variation: if channel.is_empty() { "" } else { "A" }.to_owned(),
    }
}

fn send_inc(key: &SendSeriesKey, stat: SendStat, user: Option<u32>) -> SendStatIncrement {
    SendStatIncrement {
        key: key.clone(),
        stat,
        unique_user: user.map(UserSeq),
    }
}

/// `(day, channel, stat, count)` of a send id's series over days `first..=last`.
async fn series_of(
    store: &dyn Store,
    ws: &Workspace,
    (campaign_id, send_id): (&str, &str),
    first: i64,
    last: i64,
) -> Vec<(i64, String, &'static str, u64)> {
    store
        .send_series(
            ws.id,
            campaign_id,
            send_id,
            Millis(first * DAY),
            Millis(last * DAY),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.day.0 / DAY, f.channel, f.stat.as_str(), f.count))
        .collect()
}

/// A send id's series counts per (day, channel, variation, stat): plain increments add one
/// each; a unique one counts a user once per key and stat, within an enqueue and across
/// enqueues; a refused enqueue counts nothing; reads take the days asked for, in (day,
/// channel, variation, stat) order, and see only their campaign, send id and workspace; the
/// campaign's deletion deletes its series and the users counted.
pub(super) async fn send_series_count_per_day_and_unique_users_once(store: Arc<dyn Store>) {
    use SendStat::*;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let other_ws = store.create_workspace("x", NOW).await.unwrap();
    store
        .create_campaign(ws.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let (email, totals, webhook) = (
        series_key("camp", "s1", 20_000, "email"),
        series_key("camp", "s1", 20_000, ""),
        series_key("camp", "s1", 20_001, "webhook"),
    );
    let first = Enqueue {
        send_stats: vec![
            send_inc(&email, Sent, None),
            send_inc(&email, Sent, None),
            send_inc(&email, UniqueRecipients, Some(1)),
            send_inc(&email, UniqueRecipients, Some(1)),
            send_inc(&email, UniqueRecipients, Some(2)),
            send_inc(&totals, UniqueRecipients, Some(1)),
            send_inc(&totals, Conversions, None),
            send_inc(&webhook, Errors, None),
            send_inc(&series_key("camp", "s2", 20_000, "email"), Sent, None),
            send_inc(&series_key("other", "s1", 20_000, "email"), Sent, None),
        ],
        ..Enqueue::default()
    };
    store.enqueue(ws.id, first).await.unwrap();
    let second = Enqueue {
        send_stats: vec![
            send_inc(&email, UniqueRecipients, Some(2)),
            send_inc(&email, UniqueRecipients, Some(3)),
            send_inc(&email, Opens, None),
            send_inc(&email, UniqueOpens, Some(1)),
            send_inc(&totals, UniqueRecipients, Some(1)),
            send_inc(&totals, UniqueRecipients, Some(2)),
        ],
        ..Enqueue::default()
    };
    store.enqueue(ws.id, second).await.unwrap();
    // Refused (a stale cursor): nothing counted, no user recorded.
    let stale = Enqueue {
        cursor: Some((
            TriggerCursor {
                events: 7,
                cohort_changes: 0,
            },
            TriggerCursor {
                events: 9,
                cohort_changes: 0,
            },
        )),
        send_stats: vec![
            send_inc(&email, Sent, None),
            send_inc(&email, UniqueOpens, Some(2)),
        ],
        ..Enqueue::default()
    };
    assert!(is_conflict(&store.enqueue(ws.id, stale).await));
    let s = |day, channel: &str, stat: SendStat, n| (day, channel.to_owned(), stat.as_str(), n);
    let both_days = vec![
        s(20_000, "", Conversions, 1),
        s(20_000, "", UniqueRecipients, 2),
        s(20_000, "email", Opens, 1),
        s(20_000, "email", Sent, 2),
        s(20_000, "email", UniqueOpens, 1),
        s(20_000, "email", UniqueRecipients, 3),
        s(20_001, "webhook", Errors, 1),
    ];
    assert_eq!(
        series_of(&*store, &ws, ("camp", "s1"), 19_990, 20_010).await,
        both_days
    );
    assert_eq!(
        series_of(&*store, &ws, ("camp", "s1"), 20_001, 20_001).await,
        [s(20_001, "webhook", Errors, 1)]
    );
    assert_eq!(
        series_of(&*store, &ws, ("camp", "s2"), 20_000, 20_000).await,
        [s(20_000, "email", Sent, 1)]
    );
    assert!(
        series_of(&*store, &ws, ("camp", "s1"), 20_002, 20_100)
            .await
            .is_empty()
    );
    assert!(
        series_of(&*store, &ws, ("camp", "none"), 0, 30_000)
            .await
            .is_empty()
    );
    assert!(
        series_of(&*store, &other_ws, ("camp", "s1"), 0, 30_000)
            .await
            .is_empty(),
        "another workspace's series"
    );
    // The unique users counted stay counted after a refused enqueue: user 2 opens now.
    let third = Enqueue {
        send_stats: vec![send_inc(&email, UniqueOpens, Some(2))],
        ..Enqueue::default()
    };
    store.enqueue(ws.id, third).await.unwrap();
    assert!(
        series_of(&*store, &ws, ("camp", "s1"), 20_000, 20_000)
            .await
            .contains(&s(20_000, "email", UniqueOpens, 2))
    );
    // Deleted with its campaign, users counted too; another campaign's stay.
    assert!(store.delete_campaign(ws.id, "camp").await.unwrap());
    assert!(
        series_of(&*store, &ws, ("camp", "s1"), 0, 30_000)
            .await
            .is_empty()
    );
    assert_eq!(
        series_of(&*store, &ws, ("other", "s1"), 0, 30_000).await,
        [s(20_000, "email", Sent, 1)]
    );
    let again = Enqueue {
        send_stats: vec![send_inc(&email, UniqueRecipients, Some(1))],
        ..Enqueue::default()
    };
    store.enqueue(ws.id, again).await.unwrap();
    assert_eq!(
        series_of(&*store, &ws, ("camp", "s1"), 0, 30_000).await,
        [s(20_000, "email", UniqueRecipients, 1)],
        "counted afresh"
    );
}

/// An enqueue that fails — its trigger cursor's compare-and-set refused, another node having
/// read that stretch of log — counts nothing, and records none of its unique users.
pub(super) async fn a_refused_enqueue_counts_no_stats(store: Arc<dyn Store>) {
    use CampaignStat::*;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let start = TriggerCursor::default();
    let c1 = TriggerCursor {
        events: 5,
        cohort_changes: 0,
    };
    let c2 = TriggerCursor {
        events: 9,
        cohort_changes: 1,
    };
    let moved = Enqueue {
        cursor: Some((start, c1)),
        ..counting(vec![
            inc("camp", Sends, None),
            inc("camp", UniqueClicks, Some(1)),
        ])
    };
    store.enqueue(ws.id, moved).await.unwrap();
    let counted = stat_counts(&[(Sends, 1), (UniqueClicks, 1)]);
    assert_eq!(stats_of(&*store, &ws, "camp").await, counted);
    // Counted again from the stale cursor: refused.
    let stale = Enqueue {
        cursor: Some((start, c2)),
        ..counting(vec![
            inc("camp", Sends, None),
            inc("camp", Opens, None),
            inc("camp", UniqueClicks, Some(2)),
            inc("camp", UniqueOpens, Some(2)),
            inc("fresh", Sends, None),
        ])
    };
    let refused = store.enqueue(ws.id, stale).await;
    assert!(is_conflict(&refused), "{refused:?}");
    assert_eq!(stats_of(&*store, &ws, "camp").await, counted);
    assert_eq!(
        stats_of(&*store, &ws, "fresh").await,
        stat_counts(&[]),
        "nothing counted"
    );
    // Refused by a dispatch id taken, too.
    let taken = Enqueue {
        dispatches: vec![dispatch(&ws, "d", "camp"), dispatch(&ws, "d", "camp")],
        ..counting(vec![inc("camp", UniqueClicks, Some(2))])
    };
    assert!(store.enqueue(ws.id, taken).await.is_err());
    assert_eq!(stats_of(&*store, &ws, "camp").await, counted);
    // The refused enqueues recorded no unique user: user 2 counts now.
    let next = Enqueue {
        cursor: Some((c1, c2)),
        ..counting(vec![
            inc("camp", UniqueClicks, Some(2)),
            inc("camp", UniqueOpens, Some(2)),
        ])
    };
    store.enqueue(ws.id, next).await.unwrap();
    assert_eq!(
        stats_of(&*store, &ws, "camp").await,
        stat_counts(&[(Sends, 1), (UniqueOpens, 1), (UniqueClicks, 2)])
    );
    assert_eq!(store.trigger_cursor(ws.id).await.unwrap(), c2);
}

/// Stats belong to one (workspace, campaign): counting one leaves the others as they were,
/// unique users are recorded per workspace, and deleting a campaign deletes its stats and its
/// recorded users (counted afresh if it comes back) but no other campaign's.
pub(super) async fn campaign_stats_are_per_campaign_and_workspace_and_deleted_with_it(
    store: Arc<dyn Store>,
) {
    use CampaignStat::*;
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    for (ws, id) in [(&a, "camp"), (&a, "other"), (&b, "camp")] {
        store
            .create_campaign(ws.id, campaign(id, NOW, CampaignStatus::Active))
            .await
            .unwrap();
    }
    let in_a = counting(vec![
        inc("camp", Sends, None),
        inc("camp", Sends, None),
        inc("camp", UniqueOpens, Some(1)),
        inc("other", Sends, None),
        inc("other", UniqueOpens, Some(1)),
    ]);
    store.enqueue(a.id, in_a).await.unwrap();
    assert_eq!(
        stats_of(&*store, &b, "camp").await,
        stat_counts(&[]),
        "another workspace's campaign of the same id"
    );
    let in_b = counting(vec![
        inc("camp", Sends, None),
        inc("camp", UniqueOpens, Some(1)),
    ]);
    store.enqueue(b.id, in_b).await.unwrap();
    let camp_a = stat_counts(&[(Sends, 2), (UniqueOpens, 1)]);
    let other_a = stat_counts(&[(Sends, 1), (UniqueOpens, 1)]);
    let camp_b = stat_counts(&[(Sends, 1), (UniqueOpens, 1)]);
    assert_eq!(stats_of(&*store, &a, "camp").await, camp_a);
    assert_eq!(stats_of(&*store, &a, "other").await, other_a);
    assert_eq!(stats_of(&*store, &b, "camp").await, camp_b);

    assert!(store.delete_campaign(a.id, "camp").await.unwrap());
    assert_eq!(stats_of(&*store, &a, "camp").await, stat_counts(&[]));
    assert_eq!(stats_of(&*store, &a, "other").await, other_a);
    assert_eq!(stats_of(&*store, &b, "camp").await, camp_b);
    // Its recorded users went with it: user 1 counts again for a campaign of that id.
    store
        .enqueue(a.id, counting(vec![inc("camp", UniqueOpens, Some(1))]))
        .await
        .unwrap();
    assert_eq!(
        stats_of(&*store, &a, "camp").await,
        stat_counts(&[(UniqueOpens, 1)])
    );
    // The other workspace's campaign of the same id keeps its users.
    store
        .enqueue(b.id, counting(vec![inc("camp", UniqueOpens, Some(1))]))
        .await
        .unwrap();
    assert_eq!(stats_of(&*store, &b, "camp").await, camp_b);
    assert!(!store.delete_campaign(a.id, "no-such").await.unwrap());
    assert_eq!(stats_of(&*store, &a, "other").await, other_a);
}

/// Enqueues racing (no cursor between them), each counting the same unique users in its own
/// order: every user counts once, every plain increment once per enqueue, none deadlocks.
pub(super) async fn concurrent_enqueues_count_each_unique_user_once(store: Arc<dyn Store>) {
    use CampaignStat::*;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    const TASKS: u32 = 6;
    const USERS: u32 = 40;
    let mut tasks = Vec::new();
    for k in 0..TASKS {
        let store = Arc::clone(&store);
        let ws = ws.id;
        tasks.push(tokio::spawn(async move {
            let mut stats = Vec::new();
            for i in 0..USERS {
                // Each task its own order of users and campaigns.
                let user = (i * 7 + k * 13) % USERS + 1;
                let campaign_id = if (i + k).is_multiple_of(2) {
                    "c1"
                } else {
                    "c2"
                };
                stats.push(inc("c1", UniqueOpens, Some(user)));
                stats.push(inc("c2", UniqueClicks, Some(user)));
                stats.push(inc(campaign_id, Opens, None));
            }
            store.enqueue(ws, counting(stats)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let c1 = stats_of(&*store, &ws, "c1").await;
    let c2 = stats_of(&*store, &ws, "c2").await;
    let opens = |stats: &[(CampaignStat, u64)]| stats.iter().find(|s| s.0 == Opens).unwrap().1;
    let (c1_opens, c2_opens) = (opens(&c1), opens(&c2));
    assert_eq!(
        c1,
        stat_counts(&[(Opens, c1_opens), (UniqueOpens, u64::from(USERS))])
    );
    assert_eq!(
        c2,
        stat_counts(&[(Opens, c2_opens), (UniqueClicks, u64::from(USERS))])
    );
    assert_eq!(c1_opens + c2_opens, u64::from(TASKS * USERS));
}

/// A send id is new once per (campaign, send id); at most `max_per_day` new ones per workspace
/// since `day_start` (then `Conflict`), while known ones are still answered.
pub(super) async fn send_ids_are_capped_per_workspace_and_day(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let create =
        |ws: &Workspace, campaign_id: &'static str, send_id: &'static str, day: i64, max: u32| {
            let store = Arc::clone(&store);
            let ws = ws.id;
            async move {
                let day_start = Millis(NOW.0 + day * DAY);
                let now = Millis(day_start.0 + 3_600_000);
                store
                    .create_send_id(ws, campaign_id, send_id, now, day_start, max)
                    .await
            }
        };
    assert_eq!(create(&a, "camp", "s1", 0, 2).await, Ok(true));
    assert_eq!(create(&a, "camp", "s1", 0, 2).await, Ok(false));
    assert_eq!(create(&a, "other", "s1", 0, 2).await, Ok(true));
    let over = create(&a, "camp", "s2", 0, 2).await;
    assert!(is_conflict(&over), "{over:?}");
    assert_eq!(
        create(&a, "camp", "s1", 0, 2).await,
        Ok(false),
        "known ones still answer"
    );
    assert_eq!(
        create(&a, "camp", "s2", 0, 3).await,
        Ok(true),
        "a higher cap"
    );
    // The next day counts afresh.
    assert_eq!(create(&a, "camp", "s3", 1, 1).await, Ok(true));
    assert!(is_conflict(&create(&a, "camp", "s4", 1, 1).await));
    assert_eq!(create(&a, "camp", "s2", 1, 1).await, Ok(false));
    // Workspaces count apart.
    assert_eq!(create(&b, "camp", "s1", 0, 1).await, Ok(true));
    assert!(is_conflict(&create(&b, "camp", "s9", 0, 1).await));
    assert!(is_conflict(&create(&b, "camp", "s9", 5, 0).await));
    // Concurrent new ones never pass the cap.
    let c = store.create_workspace("c", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for k in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .create_send_id(c.id, "camp", &format!("p{k}"), NOW, NOW, 3)
                .await
        }));
    }
    let (mut new, mut capped) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(true) => new += 1,
            Err(StoreError::Conflict(_)) => capped += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((new, capped), (3, 5));
}

/// Rescheduling moves a dispatch's pending sends (and its expansion, while it expands) to a
/// new time; cancelling deletes its pending sends and ends its expansion. Both leave sent
/// messages alone and answer false for a dispatch that does not exist in the workspace. Send
/// ids are never reused.
pub(super) async fn dispatches_are_rescheduled_and_cancelled(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    store
        .create_campaign(a.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let create = Enqueue {
        dispatches: vec![
            dispatch(&a, "dr", "camp"),
            expanding(&a, "dx", NOW, Some(at(50))),
            DispatchRecord {
                not_before: Some(at(50)),
                ..dispatch(&a, "dz", "camp")
            },
            expanding(&a, "dc", at(1), None),
        ],
        items: vec![
            item(1, job("dr", at(10))),
            item(2, job("dr", at(10))),
            item(3, job("dc", at(10))),
            item(4, job("dc", at(11))),
        ],
        ..Enqueue::default()
    };
    assert_eq!(store.enqueue(a.id, create).await.unwrap(), queued(4));
    let first = store.claim_sends("n", at(10), 1000, 1).await.unwrap();
    assert_eq!(first[0].user, UserSeq(1));
    store
        .settle_sends("n", at(10), vec![sent(&first[0], vec![])])
        .await
        .unwrap();

    assert!(
        store
            .reschedule_dispatch(a.id, "dr", at(100))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .dispatch(a.id, "dr")
            .await
            .unwrap()
            .unwrap()
            .not_before,
        None
    );
    assert!(
        store
            .sent_message(a.id, first[0].id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !store
            .reschedule_dispatch(a.id, "nope", at(100))
            .await
            .unwrap()
    );
    assert!(
        !store
            .reschedule_dispatch(b.id, "dr", at(200))
            .await
            .unwrap()
    );
    assert!(
        store
            .reschedule_dispatch(a.id, "dx", at(200))
            .await
            .unwrap()
    );
    assert!(
        store
            .reschedule_dispatch(a.id, "dz", at(200))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .dispatch(a.id, "dx")
            .await
            .unwrap()
            .unwrap()
            .not_before,
        Some(at(200))
    );
    assert_eq!(
        store
            .dispatch(a.id, "dz")
            .await
            .unwrap()
            .unwrap()
            .not_before,
        Some(at(50)),
        "a complete dispatch has no expansion to move"
    );
    let names = |list: Vec<DispatchRecord>| list.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        names(store.expanding_dispatches(at(199)).await.unwrap()),
        ["dc"]
    );
    assert_eq!(
        names(store.expanding_dispatches(at(200)).await.unwrap()),
        ["dx", "dc"]
    );

    assert!(store.cancel_dispatch(a.id, "dc").await.unwrap());
    assert!(!store.cancel_dispatch(a.id, "nope").await.unwrap());
    assert!(!store.cancel_dispatch(b.id, "dr").await.unwrap());
    assert_eq!(
        names(store.expanding_dispatches(at(200)).await.unwrap()),
        ["dx"]
    );
    let cancelled = store.dispatch(a.id, "dc").await.unwrap().unwrap();
    assert_eq!(cancelled.expanding_after, None);
    let more = Enqueue {
        expansion: Some(("dc".into(), Some(UserSeq(9)))),
        ..items(vec![item(9, job("dc", at(12)))])
    };
    assert!(is_conflict(&store.enqueue(a.id, more).await));
    // dr's pending send is due at its new time; dc's are gone.
    assert_eq!(
        store.claim_sends("n", at(99), 1000, 10).await.unwrap(),
        vec![]
    );
    let moved = store.claim_sends("n", at(100), 1000, 10).await.unwrap();
    assert_eq!(
        moved.iter().map(who).collect::<Vec<_>>(),
        [(a.id.0, 2, at(100), 0)]
    );
    assert_eq!(counts(&*store, &a, "camp").await, pending(1, 1, 0));
    store
        .settle_sends("n", at(100), vec![sent(&moved[0], vec![])])
        .await
        .unwrap();

    // Ids are never reused, even the newest one's after it was deleted.
    let before: i64 = [first[0].id, moved[0].id].into_iter().max().unwrap();
    let fresh = Enqueue {
        dispatches: vec![dispatch(&a, "dn", "camp")],
        items: vec![item(5, job("dn", at(300))), item(6, job("dn", at(300)))],
        ..Enqueue::default()
    };
    store.enqueue(a.id, fresh).await.unwrap();
    let doomed = store.claim_sends("n", at(300), 1000, 10).await.unwrap();
    assert_eq!(doomed.len(), 2);
    let newest = doomed.iter().map(|c| c.id).max().unwrap();
    assert!(newest > before);
    assert!(store.cancel_dispatch(a.id, "dn").await.unwrap());
    queue(&*store, &a, "dr", &[7], at(400)).await;
    let next = store.claim_sends("n", at(400), 1000, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert!(next[0].id > newest, "{} after {newest}", next[0].id);
}

// --- settings, secrets, users, triggers ------------------------------------------------------

/// Messaging settings are `None` until saved, then read back as last saved, per workspace.
pub(super) async fn messaging_settings_round_trip(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    assert_eq!(store.messaging_settings(a.id).await.unwrap(), None);
    let first = json!({"frequency_capping": [{"max": 3, "window": {"days": 7}, "channels": ["email"]}], "note": "ünï"});
    store
        .save_messaging_settings(a.id, first.clone())
        .await
        .unwrap();
    assert_eq!(store.messaging_settings(a.id).await.unwrap(), Some(first));
    let second = json!({"frequency_capping": []});
    store
        .save_messaging_settings(a.id, second.clone())
        .await
        .unwrap();
    assert_eq!(
        store.messaging_settings(a.id).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(store.messaging_settings(b.id).await.unwrap(), None);
    // Moving the trigger cursor first leaves the settings unsaved.
    let moved = Enqueue {
        cursor: Some((
            TriggerCursor::default(),
            TriggerCursor {
                events: 1,
                cohort_changes: 1,
            },
        )),
        ..Enqueue::default()
    };
    store.enqueue(b.id, moved).await.unwrap();
    assert_eq!(store.messaging_settings(b.id).await.unwrap(), None);
    store
        .save_messaging_settings(b.id, Value::Null)
        .await
        .unwrap();
    assert_eq!(
        store.messaging_settings(b.id).await.unwrap(),
        Some(Value::Null)
    );
    assert_eq!(
        store.trigger_cursor(b.id).await.unwrap().events,
        1,
        "saving settings leaves the cursor"
    );
    assert_eq!(store.messaging_settings(a.id).await.unwrap(), Some(second));
}

/// The signing key is the first candidate ever offered, for every caller after it, also when
/// several offer theirs at once.
pub(super) async fn the_messaging_secret_is_the_first_candidate(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for k in 1..=6u8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.messaging_secret([k; 32]).await.unwrap()
        }));
    }
    let mut keys = HashSet::new();
    for t in tasks {
        keys.insert(t.await.unwrap());
    }
    assert_eq!(keys.len(), 1, "one key for everyone");
    let key = keys.into_iter().next().unwrap();
    assert!((1..=6u8).any(|k| key == [k; 32]), "one of the candidates");
    assert_eq!(store.messaging_secret([42; 32]).await.unwrap(), key);
}

/// `users_by_seq` answers the users asked for as of every acknowledged write, in the order
/// asked, leaving out deleted and unknown ones and other workspaces' users.
pub(super) async fn users_by_seq_reads_current_profiles(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    for name in ["x", "y", "z"] {
        track(
            &*store,
            &a,
            json!({"events": [{"external_id": name, "name": "e", "time": "2025-01-01T00:00:00Z"}]}),
        )
        .await;
    }
    let seqs: Vec<UserSeq> = all_events(&*store, &a)
        .await
        .iter()
        .map(|e| e.user.unwrap())
        .collect();
    let (x, y, z) = (seqs[0], seqs[1], seqs[2]);
    track(
        &*store,
        &a,
        json!({"attributes": [{"external_id": "x", "email": "x@example.com"}]}),
    )
    .await;
    let found = store
        .users_by_seq(a.id, vec![z, UserSeq(999), x, y])
        .await
        .unwrap();
    let shown: Vec<_> = found
        .iter()
        .map(|u| {
            (
                u.seq,
                u.external_id.as_ref().map(|e| e.as_str().to_owned()),
                u.email.as_ref().map(|e| e.as_str().to_owned()),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (z, Some("z".to_owned()), None),
            (x, Some("x".to_owned()), Some("x@example.com".to_owned())),
            (y, Some("y".to_owned()), None),
        ]
    );
    let deleted = DeleteRequest {
        users: vec![UserKey::External(ext("y"))],
    };
    store.delete_users(&a, deleted, NOW).await.unwrap();
    let left: Vec<UserSeq> = store
        .users_by_seq(a.id, vec![x, y, z])
        .await
        .unwrap()
        .iter()
        .map(|u| u.seq)
        .collect();
    assert_eq!(left, [x, z]);
    assert_eq!(
        store.users_by_seq(b.id, vec![x, y, z]).await.unwrap(),
        vec![]
    );
    assert_eq!(store.users_by_seq(a.id, vec![]).await.unwrap(), vec![]);
}

/// The trigger engine's reads: the heads of the event log and of the cohort-change log (0 when
/// empty), and users entering partner cohorts after a position, oldest first, at most `limit`.
pub(super) async fn trigger_reads_follow_the_logs(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    assert_eq!(store.event_log_head(a.id).await.unwrap(), 0);
    assert_eq!(store.cohort_changes_head(a.id).await.unwrap(), 0);
    assert_eq!(store.cohort_entries(a.id, 0, 10).await.unwrap(), vec![]);
    track(
        &*store,
        &a,
        json!({"events": [
            {"external_id": "x", "name": "e", "time": "2025-01-01T00:00:00Z"},
            {"external_id": "y", "name": "e", "time": "2025-01-01T00:00:00Z"},
        ]}),
    )
    .await;
    let events = all_events(&*store, &a).await;
    let (x, y) = (events[0].user.unwrap(), events[1].user.unwrap());
    assert_eq!(store.event_log_head(a.id).await.unwrap(), events[1].seq);
    assert_eq!(store.event_log_head(b.id).await.unwrap(), 0);
    let change = |ids: &[&str], remove: bool| {
        vec![CohortChange {
            identifiers: ids
                .iter()
                .map(|s| CohortIdentifier::External(ext(s)))
                .collect(),
            remove,
        }]
    };
    store
        .apply_cohort_changes(&a, "heap", cid("c1"), change(&["x", "y"], false), at(1))
        .await
        .unwrap();
    store
        .apply_cohort_changes(&a, "heap", cid("c1"), change(&["x"], true), at(2))
        .await
        .unwrap();
    store
        .apply_cohort_changes(&a, "heap", cid("c2"), change(&["x"], false), at(3))
        .await
        .unwrap();
    let entries = store.cohort_entries(a.id, 0, 10).await.unwrap();
    let shown: Vec<_> = entries
        .iter()
        .map(|e| (e.user, e.partner.as_str(), e.cohort_id.as_str(), e.at))
        .collect();
    let mut first_two = shown[..2].to_vec();
    first_two.sort_by_key(|(u, ..)| *u);
    assert_eq!(
        first_two,
        [(x, "heap", "c1", at(1)), (y, "heap", "c1", at(1))]
    );
    assert_eq!(shown[2..], [(x, "heap", "c2", at(3))]);
    assert!(entries.windows(2).all(|w| w[0].position < w[1].position));
    let head = store.cohort_changes_head(a.id).await.unwrap();
    assert_eq!(
        head, entries[2].position,
        "the removal is a change, not an entry"
    );
    assert_eq!(
        store
            .cohort_entries(a.id, entries[0].position, 1)
            .await
            .unwrap(),
        entries[1..2].to_vec()
    );
    assert_eq!(
        store
            .cohort_entries(a.id, entries[1].position, 10)
            .await
            .unwrap(),
        entries[2..].to_vec()
    );
    assert_eq!(
        store.cohort_entries(a.id, head, 10).await.unwrap(),
        Vec::<CohortEntry>::new()
    );
    assert_eq!(store.cohort_changes_head(b.id).await.unwrap(), 0);
    assert_eq!(store.cohort_entries(b.id, 0, 10).await.unwrap(), vec![]);
}

// --- concurrency -----------------------------------------------------------------------------

/// Several dispatchers claiming from one queue at once never claim a send twice, and between
/// them settle every send once.
pub(super) async fn concurrent_claims_never_claim_a_send_twice(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    store
        .create_campaign(a.id, campaign("camp", NOW, CampaignStatus::Active))
        .await
        .unwrap();
    let (per_ws, workers) = (150u32, 6);
    let users: Vec<u32> = (1..=per_ws).collect();
    let create = Enqueue {
        dispatches: vec![dispatch(&a, "d", "camp")],
        ..Enqueue::default()
    };
    store.enqueue(a.id, create).await.unwrap();
    for chunk in users.chunks(50) {
        queue(&*store, &a, "d", chunk, NOW).await;
        queue(&*store, &b, "d", chunk, NOW).await;
    }
    let mut tasks = Vec::new();
    for w in 0..workers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let owner = format!("node-{w}");
            let mut mine = Vec::new();
            loop {
                let batch = store.claim_sends(&owner, at(1), 60_000, 7).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                assert!(batch.len() <= 7);
                let settlements = batch.iter().map(|c| sent(c, vec![])).collect();
                assert_eq!(
                    store
                        .settle_sends(&owner, at(1), settlements)
                        .await
                        .unwrap(),
                    0
                );
                mine.extend(batch.iter().map(|c| c.id));
                tokio::task::yield_now().await;
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "no send claimed twice");
    assert_eq!(all.len(), 2 * per_ws as usize);
    assert_eq!(
        counts(&*store, &a, "camp").await,
        pending(0, per_ws as u64, 0)
    );
    assert_eq!(store.next_due().await.unwrap(), None);
}

fn tracker(event_seq: i64, members: &[u8]) -> SegmentTracker {
    SegmentTracker {
        position: FeedPosition {
            event_seq,
            cohort_change_seq: 2,
            user_change_seq: 3,
        },
        members: members.to_vec(),
    }
}

/// Segment-entry trackers: written by an enqueue, each a compare-and-set on the stored position
/// (none: must not exist yet); a stale one, or one of a campaign the workspace does not have,
/// is a `Conflict` and the enqueue writes nothing; racing moves have one winner; they are per
/// (workspace, campaign, segment) and deleted with their campaign.
pub(super) async fn segment_trackers_move_by_compare_and_set(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    for (ws, id) in [(&a, "camp"), (&a, "other"), (&b, "camp")] {
        store
            .create_campaign(ws.id, campaign(id, NOW, CampaignStatus::Active))
            .await
            .unwrap();
    }
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        None
    );
    let payload = |tag: &str| Enqueue {
        dispatches: vec![dispatch(&a, &format!("d-{tag}"), "camp")],
        items: vec![NewSend {
            user: UserSeq(1),
            receipt: receipt(&format!("camp-{tag}"), None),
            job: Some(job(&format!("d-{tag}"), NOW)),
            events: vec![event(&a, &format!("item-{tag}"))],
        }],
        events: vec![(None, event(&a, &format!("loose-{tag}")))],
        ..Enqueue::default()
    };
    let move_to = |expected: Option<FeedPosition>, new: &SegmentTracker, tag: &str| Enqueue {
        segment_trackers: vec![("camp".into(), "seg".into(), expected, new.clone())],
        ..payload(tag)
    };
    // Round trip: created from none, bytes kept exactly (empty too).
    let t1 = tracker(10, &[0, 1, 2, 255]);
    assert_eq!(
        store.enqueue(a.id, move_to(None, &t1, "1")).await.unwrap(),
        queued(1)
    );
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        Some(t1.clone())
    );
    // Stale expectations: none when one exists, another position.
    let t2 = tracker(20, &[]);
    for expected in [None, Some(tracker(9, &[]).position)] {
        let refused = store.enqueue(a.id, move_to(expected, &t2, "2")).await;
        assert!(is_conflict(&refused), "{refused:?}");
    }
    // A stale tracker fails the whole enqueue, the other tracker moves too.
    let both = Enqueue {
        segment_trackers: vec![
            ("other".into(), "seg".into(), None, t2.clone()),
            ("camp".into(), "seg".into(), None, t2.clone()),
        ],
        ..payload("2")
    };
    assert!(is_conflict(&store.enqueue(a.id, both).await));
    // A campaign the workspace does not have.
    let missing = Enqueue {
        segment_trackers: vec![("nope".into(), "seg".into(), None, t2.clone())],
        ..payload("2")
    };
    assert!(is_conflict(&store.enqueue(a.id, missing).await));
    nothing_of_refused(&*store, &a).await;
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        Some(t1.clone())
    );
    assert_eq!(
        store.segment_tracker(a.id, "other", "seg").await.unwrap(),
        None
    );
    assert_eq!(
        store.segment_tracker(a.id, "nope", "seg").await.unwrap(),
        None
    );
    // The right expectation moves it.
    store
        .enqueue(a.id, move_to(Some(t1.position), &t2, "3"))
        .await
        .unwrap();
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        Some(t2.clone())
    );
    // Per (workspace, campaign, segment).
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg2").await.unwrap(),
        None
    );
    assert_eq!(
        store.segment_tracker(b.id, "camp", "seg").await.unwrap(),
        None
    );
    let in_b = Enqueue {
        segment_trackers: vec![
            ("camp".into(), "seg".into(), None, tracker(5, b"b")),
            ("camp".into(), "seg2".into(), None, tracker(6, b"b2")),
        ],
        ..Enqueue::default()
    };
    store.enqueue(b.id, in_b).await.unwrap();
    assert_eq!(
        store.segment_tracker(b.id, "camp", "seg2").await.unwrap(),
        Some(tracker(6, b"b2"))
    );
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        Some(t2.clone())
    );

    // Nodes racing from the same position: exactly one moves it and writes its events.
    for expected in [Some(t2.position), None] {
        let segment = if expected.is_some() { "seg" } else { "fresh" };
        let mut tasks = Vec::new();
        for k in 0..6 {
            let store = Arc::clone(&store);
            let ws = a.clone();
            tasks.push(tokio::spawn(async move {
                let racing = Enqueue {
                    segment_trackers: vec![(
                        "camp".into(),
                        segment.into(),
                        expected,
                        tracker(100 + k, &[k as u8]),
                    )],
                    events: vec![(None, event(&ws, &format!("{segment}-race-{k}")))],
                    ..Enqueue::default()
                };
                store.enqueue(ws.id, racing).await
            }));
        }
        let mut won = Vec::new();
        for (k, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(_) => won.push(k as i64),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won.len(), 1, "{segment}");
        assert_eq!(
            store.segment_tracker(a.id, "camp", segment).await.unwrap(),
            Some(tracker(100 + won[0], &[won[0] as u8]))
        );
        let racers = log_of(&*store, &a)
            .await
            .into_iter()
            .filter(|(_, id)| id.starts_with(&format!("{segment}-race-")))
            .collect::<Vec<_>>();
        assert_eq!(racers, [by(None, &format!("{segment}-race-{}", won[0]))]);
    }

    // Deleted with their campaign, and only theirs.
    assert!(store.delete_campaign(a.id, "camp").await.unwrap());
    assert_eq!(
        store.segment_tracker(a.id, "camp", "seg").await.unwrap(),
        None
    );
    assert_eq!(
        store.segment_tracker(a.id, "camp", "fresh").await.unwrap(),
        None
    );
    assert_eq!(
        store.segment_tracker(b.id, "camp", "seg").await.unwrap(),
        Some(tracker(5, b"b"))
    );
    let other = Enqueue {
        segment_trackers: vec![("other".into(), "seg".into(), None, tracker(1, b"o"))],
        ..Enqueue::default()
    };
    store.enqueue(a.id, other).await.unwrap();
    assert!(store.delete_campaign(b.id, "camp").await.unwrap());
    assert_eq!(
        store.segment_tracker(b.id, "camp", "seg2").await.unwrap(),
        None
    );
    assert_eq!(
        store.segment_tracker(a.id, "other", "seg").await.unwrap(),
        Some(tracker(1, b"o"))
    );
}
