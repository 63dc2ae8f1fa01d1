//! The model test: random sequences of {enqueue, 2xx, 400, 401, 413, 429, 5xx, timeout,
//! restart} run against the real exporter (real SQLite store, real HTTP), with an in-memory
//! model of what must have happened to every event.
//!
//! The receiver hands each request to the test, which answers it with the next scripted
//! status and updates the model: 2xx → the batch's events are delivered; a single event
//! refused with 400 or 413 → dead-lettered; 401 → the Current halts (checked, with its queue
//! intact, then re-enabled). Requests may only hold events that are still pending, or (after
//! a restart or re-enable) events already delivered. At the end everything is answered 2xx
//! and the invariant is checked: every event is delivered, or dead-lettered with a reason and
//! the receiver's response; nothing is lost and nothing else happened.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::currents_store::{CurrentStatus, CurrentsStore, DeadLetterReason, StatusChange};
use tideway_currents::spec::parse_spec;
use tokio::sync::mpsc;

use crate::*;

#[derive(Debug, Clone, Copy)]
enum Resp {
    Ok,
    BadRequest,
    Unauthorized,
    TooLarge,
    TooMany,
    ServerError,
    Timeout,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Enqueue(usize),
    Respond(Resp),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..7).prop_map(Op::Enqueue),
        4 => Just(Op::Respond(Resp::Ok)),
        2 => Just(Op::Respond(Resp::BadRequest)),
        1 => Just(Op::Respond(Resp::Unauthorized)),
        2 => Just(Op::Respond(Resp::TooLarge)),
        1 => Just(Op::Respond(Resp::TooMany)),
        2 => Just(Op::Respond(Resp::ServerError)),
        1 => Just(Op::Respond(Resp::Timeout)),
        1 => Just(Op::Restart),
    ]
}

#[derive(Default)]
struct Model {
    log: Vec<String>,
    delivered: HashSet<String>,
    /// Delivered in which restart/enable epoch (a re-send is allowed only in a later one).
    delivered_epoch: HashMap<String, u32>,
    dead: HashMap<String, DeadLetterReason>,
    dead_epoch: HashMap<String, u32>,
    epoch: u32,
}

impl Model {
    fn pending(&self) -> Vec<&String> {
        self.log
            .iter()
            .filter(|id| !self.delivered.contains(*id) && !self.dead.contains_key(*id))
            .collect()
    }
}

struct Rig {
    h: Harness,
    requests: mpsc::UnboundedReceiver<Pending>,
    cap: Capture,
    current: tideway_core::currents_store::Current,
    generation: u32,
}

fn model_spec(addr: std::net::SocketAddr, generation: u32) -> serde_json::Value {
    json!({
        "name": "model", "kind": "custom_http", "endpoint": format!("http://{addr}/m?gen={generation}"),
        "categories": ["customer_behavior"], "batch_size": 4, "flush_interval_ms": 1, "max_in_flight": 1,
        "retry": {"base_ms": 1, "cap_ms": 2, "request_timeout_ms": 100},
    })
}

impl Rig {
    async fn new() -> Rig {
        let h = Harness::new().await;
        let cap = Capture::start().await;
        let (tx, requests) = mpsc::unbounded_channel();
        *cap.state.manual.lock().unwrap() = Some(tx);
        let current = h.current(model_spec(cap.addr, 0)).await;
        Rig {
            h,
            requests,
            cap,
            current,
            generation: 0,
        }
    }

    /// The next data request of the current generation (probes answered 200, requests of an
    /// earlier generation 503: their sender is gone).
    async fn next_request(&mut self) -> Pending {
        loop {
            let (seen, reply) = tokio::time::timeout(LIMIT, self.requests.recv())
                .await
                .expect("the exporter must send the pending events")
                .expect("receiver alive");
            let gen_ok = seen.query.as_deref() == Some(&format!("gen={}", self.generation));
            if !gen_ok {
                let _ = reply.send(Reply::Status(503));
            } else if seen.ids().is_empty() {
                let _ = reply.send(Reply::Status(200));
            } else {
                return (seen, reply);
            }
        }
    }

    async fn restart(&mut self, m: &mut Model) {
        self.generation += 1;
        m.epoch += 1;
        if let Some(e) = self.h.exporter.take() {
            e.stop().await;
        }
        let spec = parse_spec(&model_spec(self.cap.addr, self.generation)).unwrap();
        self.h
            .store
            .update_current(self.h.ws.id, self.current.id, spec, Millis(2))
            .await
            .unwrap();
        self.h.restart().await;
    }

    /// Waits until the store shows the Current halted, checks the queue is intact, enables it.
    async fn halted_then_enable(&mut self, m: &mut Model) {
        let c = self
            .h
            .wait(&self.current, "halted", |c| {
                c.status == CurrentStatus::HaltedCredentials
            })
            .await;
        assert_eq!(c.last_error.as_ref().and_then(|e| e.status), Some(401));
        let lag = self.h.store.lag(c.id, None).await.unwrap();
        assert!(
            lag.events as usize >= m.pending().len(),
            "halting keeps every pending event queued: {lag:?}"
        );
        self.h
            .store
            .change_status(c.id, StatusChange::Enable, None, Millis(3))
            .await
            .unwrap();
        m.epoch += 1;
        self.h.exporter().refresh();
    }

    async fn respond(&mut self, m: &mut Model, resp: Resp) {
        let (seen, reply) = self.next_request().await;
        let ids = seen.ids();
        assert!(ids.len() <= 4, "batch size");
        for id in &ids {
            assert!(m.log.contains(id), "unknown event {id}");
            if m.dead.contains_key(id) {
                // Only a batch that never got acknowledged (halted, or cut by a restart) comes
                // back, and with it the dead letter it would have recorded.
                assert!(
                    m.dead_epoch[id] < m.epoch,
                    "dead-lettered event {id} re-sent without a restart or re-enable"
                );
                m.dead.remove(id);
            }
            if let Some(epoch) = m.delivered_epoch.get(id) {
                assert!(
                    *epoch < m.epoch,
                    "event {id} re-sent after its 2xx without a restart or re-enable"
                );
            }
        }
        let single = ids.len() == 1;
        let (answer, halted) = match resp {
            Resp::Ok => {
                for id in &ids {
                    m.delivered.insert(id.clone());
                    m.delivered_epoch.insert(id.clone(), m.epoch);
                }
                (Reply::Status(200), false)
            }
            Resp::BadRequest => {
                if single {
                    m.dead.insert(ids[0].clone(), DeadLetterReason::Rejected);
                    m.dead_epoch.insert(ids[0].clone(), m.epoch);
                }
                (Reply::Status(400), false)
            }
            Resp::TooLarge => {
                if single {
                    m.dead
                        .insert(ids[0].clone(), DeadLetterReason::TooLargeForReceiver);
                    m.dead_epoch.insert(ids[0].clone(), m.epoch);
                }
                (Reply::Status(413), false)
            }
            Resp::Unauthorized => (Reply::Status(401), true),
            Resp::TooMany => (Reply::RetryAfter(429, 0), false),
            Resp::ServerError => (Reply::Status(500), false),
            Resp::Timeout => (Reply::Hang(Duration::from_millis(400)), false),
        };
        let _ = reply.send(answer);
        if halted {
            self.halted_then_enable(m).await;
        }
    }
}

async fn run_case(ops: Vec<Op>) {
    let mut rig = Rig::new().await;
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Enqueue(n) => m.log.extend(rig.h.append(n).await),
            Op::Restart => rig.restart(&mut m).await,
            Op::Respond(resp) => {
                if !m.pending().is_empty() {
                    rig.respond(&mut m, resp).await;
                }
            }
        }
    }
    // Drain: answer everything 2xx until the model has nothing pending.
    while !m.pending().is_empty() {
        rig.respond(&mut m, Resp::Ok).await;
    }
    // Re-sends of already-delivered events (their acknowledgement was lost in a restart)
    // may still be on their way: answer everything 2xx from here on.
    let mut requests = std::mem::replace(&mut rig.requests, mpsc::unbounded_channel().1);
    let late: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
    let late_seen = late.clone();
    let responder = tokio::spawn(async move {
        while let Some((seen, reply)) = requests.recv().await {
            late_seen.lock().unwrap().extend(seen.ids());
            let _ = reply.send(Reply::Status(200));
        }
    });
    let total = m.log.len() as u64;
    let c = rig
        .h
        .wait(&rig.current, "everything resolved in the store", |c| {
            c.position >= total as i64 && c.status == CurrentStatus::Active
        })
        .await;
    // A late re-send of a "dead-lettered" event means that dead letter was never committed
    // (its batch was cut by a restart); it has now been delivered instead.
    for id in late.lock().unwrap().iter() {
        m.dead.remove(id);
        m.delivered.insert(id.clone());
    }
    let dead_count = m.dead.len() as u64;
    // The invariant: each event delivered or dead-lettered (with reason and response).
    let stored_dead = rig
        .h
        .store
        .list_dead_letters(c.id, 0, 10_000)
        .await
        .unwrap();
    let stored: HashMap<String, (DeadLetterReason, Option<u16>)> = stored_dead
        .iter()
        .map(|d| (d.event.event_id.clone(), (d.reason, d.response_status)))
        .collect();
    assert_eq!(
        stored.len(),
        m.dead.len(),
        "dead letters: store {stored:?} model {:?}",
        m.dead
    );
    for (id, reason) in &m.dead {
        let (r, status) = stored
            .get(id)
            .unwrap_or_else(|| panic!("{id} not in the dead-letter store"));
        assert_eq!(r, reason);
        assert_eq!(
            *status,
            Some(if *reason == DeadLetterReason::Rejected {
                400
            } else {
                413
            })
        );
    }
    for id in &m.log {
        assert!(
            m.delivered.contains(id) || m.dead.contains_key(id),
            "{id} neither delivered nor dead-lettered"
        );
    }
    let delivered_only = m
        .delivered
        .iter()
        .filter(|id| !m.dead.contains_key(*id))
        .count() as u64;
    assert!(
        c.counters.delivered >= delivered_only,
        "{:?} vs {delivered_only}",
        c.counters
    );
    assert_eq!(c.counters.dead_lettered, dead_count);
    assert_eq!(
        rig.h.store.lag(c.id, None).await.unwrap().events,
        0,
        "nothing left queued"
    );
    let acked: HashSet<String> = rig.cap.acked_ids().into_iter().collect();
    assert!(m.delivered.iter().all(|id| acked.contains(id)));
    if let Some(e) = rig.h.exporter.take() {
        e.stop().await;
    }
    responder.abort();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_event_ends_delivered_dead_lettered_or_queued(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_case(ops));
    }
}
