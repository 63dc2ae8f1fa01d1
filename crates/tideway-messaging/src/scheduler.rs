//! The scheduler: scheduled campaigns' occurrences, and the expansion of a dispatch to its
//! audience.
//!
//! An occurrence is claimed by moving the campaign's `next_run` with a compare-and-set in the
//! same transaction that creates its dispatch, so with several nodes exactly one dispatches it.
//! The dispatch is then *expanded*: its audience is evaluated on the segment index and
//! enqueued in chunks of [`CHUNK`] users in seq order, each chunk one transaction that also
//! records how far the expansion got (`expanding_after`). After a crash the expansion resumes
//! from there ([`Scheduler::resume`]), so no user is skipped and none is queued twice (the
//! receipts would refuse a second item anyway).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tideway_core::campaigns::{CampaignDefinition, CampaignStatus, Delivery};
use tideway_core::clock::Millis;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::{CampaignRecord, DispatchRecord, DispatchSource, Enqueue, StoreError};
use tideway_currents::Clock;
use tracing::{info, warn};

use crate::audience::{Audiences, audience_filter};
use crate::dispatcher::{DispatchStore, Dispatcher};
use crate::plan::{self, Recipient};

/// Users enqueued per transaction when expanding a dispatch.
pub const CHUNK: usize = 5_000;

pub struct Scheduler<S: ?Sized> {
    store: Arc<S>,
    audiences: Arc<dyn Audiences>,
    dispatcher: Arc<Dispatcher<S>>,
    clock: Clock,
    poll: Duration,
}

impl<S: DispatchStore + ?Sized + 'static> Scheduler<S> {
    pub fn new(
        store: Arc<S>,
        audiences: Arc<dyn Audiences>,
        dispatcher: Arc<Dispatcher<S>>,
        clock: Clock,
        poll: Duration,
    ) -> Self {
        Scheduler {
            store,
            audiences,
            dispatcher,
            clock,
            poll,
        }
    }

    pub async fn run(self) {
        let mut failures = 0;
        loop {
            // Expansions left by a crash, and broadcasts the API queued.
            let resumed = self.resume().await;
            if let Err(e) = &resumed {
                warn!(error = %e, failures, "resuming dispatch expansions failed");
            }
            let passed = self.pass().await;
            if let Err(e) = &passed {
                warn!(error = %e, failures, "scheduler pass failed; retrying");
            }
            failures = if resumed.is_ok() && passed.is_ok() {
                0
            } else {
                failures + 1
            };
            tokio::time::sleep(crate::engine::retry_wait(self.poll, failures)).await;
        }
    }

    /// Finishes every expansion a previous run left half done.
    pub async fn resume(&self) -> Result<(), StoreError> {
        for dispatch in self.store.expanding_dispatches(self.clock.now()).await? {
            if matches!(dispatch.source, DispatchSource::Canvas { .. }) {
                // The Canvas engine's (its expansion enters users, it queues no sends).
                continue;
            }
            let id = dispatch.id.clone();
            if let Err(e) = self.expand(dispatch).await {
                // One dispatch's trouble does not hold up the others; it is resumed next pass.
                warn!(dispatch = %id, error = %e, "expanding a dispatch failed; will retry");
            }
        }
        Ok(())
    }

    /// Dispatches every scheduled occurrence that is due.
    pub async fn pass(&self) -> Result<(), StoreError> {
        let now = self.clock.now();
        for (ws, campaign) in self.store.active_campaigns().await? {
            let Ok(def) = CampaignDefinition::load(&campaign.definition) else {
                continue;
            };
            let Delivery::Scheduled(schedule) = &def.delivery else {
                continue;
            };
            if campaign.status != CampaignStatus::Active {
                continue;
            }
            let next = match campaign.next_run {
                Some(n) => n,
                None => {
                    let launched = campaign.launched_at.unwrap_or(campaign.updated_at);
                    let first = schedule.next_after(Millis(launched.0 - 1));
                    if first.is_none() {
                        continue;
                    }
                    match self
                        .store
                        .enqueue(
                            ws,
                            Enqueue {
                                next_run: Some((campaign.id.clone(), None, first)),
                                ..Enqueue::default()
                            },
                        )
                        .await
                    {
                        Ok(_) | Err(StoreError::Conflict(_)) => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
            };
            if schedule.expands_at(next).0 > now.0 {
                continue;
            }
            let following = schedule.next_after(next);
            let dispatch = DispatchRecord {
                id: plan::new_dispatch_id(),
                workspace: ws,
                source: DispatchSource::Campaign {
                    campaign_id: campaign.id.clone(),
                },
                send_id: None,
                per_user_ids: false,
                properties: None,
                audience: None,
                created_at: now,
                expanding_after: Some(UserSeq(0)),
                // A local-time occurrence remembers itself here (its expansion may resume
                // after a restart): the occurrence is `not_before + LOCAL_TIME_LEAD_MS`.
                not_before: schedule.in_local_time.then(|| schedule.expands_at(next)),
            };
            let claimed = self
                .store
                .enqueue(
                    ws,
                    Enqueue {
                        dispatches: vec![dispatch.clone()],
                        next_run: Some((campaign.id.clone(), Some(next), following)),
                        ..Enqueue::default()
                    },
                )
                .await;
            match claimed {
                Ok(_) => {
                    info!(workspace = ws.0, campaign = %campaign.id, dispatch = %dispatch.id, "scheduled occurrence dispatched");
                    self.expand(dispatch).await?;
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Enqueues the dispatch's audience from where its expansion stopped.
    pub async fn expand(&self, dispatch: DispatchRecord) -> Result<(), StoreError> {
        let ws = dispatch.workspace;
        let (campaign, def) = match &dispatch.source {
            DispatchSource::Campaign { campaign_id } => {
                let Some(campaign) = self.store.campaign(ws, campaign_id).await? else {
                    return self.finish(ws, &dispatch.id).await;
                };
                let Ok(def) = CampaignDefinition::load(&campaign.definition) else {
                    return self.finish(ws, &dispatch.id).await;
                };
                (Some(campaign), def)
            }
            DispatchSource::AdHoc { definition } => {
                let Ok(def) = CampaignDefinition::load(definition) else {
                    return self.finish(ws, &dispatch.id).await;
                };
                (None, def)
            }
            DispatchSource::Canvas { .. } => return Ok(()),
        };
        let filter =
            crate::audience::narrowed(audience_filter(&def.audience)?, dispatch.audience.as_ref())?;
        let members = self
            .audiences
            .members(ws, filter, dispatch.expanding_after)
            .await?;
        let app_group_id = self.app_group_id(ws).await?;
        let total = members.len();
        let mut chunks = members.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return self.finish(ws, &dispatch.id).await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunk.last().copied();
            let done = chunks.peek().is_none();
            let outcome = self
                .enqueue_chunk(
                    campaign.as_ref(),
                    &def,
                    &dispatch,
                    &app_group_id,
                    chunk,
                    last,
                    done,
                )
                .await;
            match outcome {
                Ok(()) => self.dispatcher.wake(),
                // Another node moved the mark first, or the dispatch was cancelled: its
                // expansion is someone else's (or over).
                Err(StoreError::Conflict(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        metrics::counter!("tideway_campaign_audience_expanded_total").increment(total as u64);
        info!(workspace = ws.0, dispatch = %dispatch.id, users = total, "dispatch expanded");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn enqueue_chunk(
        &self,
        campaign: Option<&CampaignRecord>,
        def: &CampaignDefinition,
        dispatch: &DispatchRecord,
        app_group_id: &str,
        chunk: &[UserSeq],
        last: Option<UserSeq>,
        done: bool,
    ) -> Result<(), StoreError> {
        let ws = dispatch.workspace;
        let now = self.clock.now();
        let local = local_occurrence(def, dispatch);
        let dues =
            crate::local_time::local_dues(self.store.as_ref(), ws, chunk, local, now).await?;
        let recipients: Vec<Recipient> = chunk
            .iter()
            .map(|u| Recipient {
                user: *u,
                properties: None,
                due_at: dues.get(u).copied(),
            })
            .collect();
        let items = match campaign {
            Some(campaign) => {
                let controls = plan::control_users(campaign, def, chunk);
                let records: HashMap<_, _> = if controls.is_empty() {
                    HashMap::new()
                } else {
                    self.store
                        .users_by_seq(ws, controls)
                        .await?
                        .into_iter()
                        .map(|u| (u.seq, u))
                        .collect()
                };
                plan::campaign_items(
                    plan::CampaignDispatch {
                        campaign,
                        definition: def,
                        dispatch,
                        app_group_id,
                    },
                    &recipients,
                    &records,
                    now,
                    now,
                )
            }
            None => plan::adhoc_items(def, dispatch, &recipients, now),
        };
        self.store
            .enqueue(
                ws,
                Enqueue {
                    items,
                    expansion: Some((dispatch.id.clone(), if done { None } else { last })),
                    ..Enqueue::default()
                },
            )
            .await?;
        Ok(())
    }

    /// Ends an expansion with nothing (more) to enqueue; already ended (by another node, or a
    /// cancel) is fine.
    async fn finish(&self, ws: WorkspaceId, dispatch: &str) -> Result<(), StoreError> {
        match self
            .store
            .enqueue(
                ws,
                Enqueue {
                    expansion: Some((dispatch.to_owned(), None)),
                    ..Enqueue::default()
                },
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn app_group_id(&self, ws: WorkspaceId) -> Result<String, StoreError> {
        crate::plan::app_group_id(self.store.as_ref(), ws).await
    }
}

/// The occurrence a local-time scheduled dispatch delivers (each user at its wall-clock time
/// in their zone), or `None` for every other dispatch.
fn local_occurrence(def: &CampaignDefinition, dispatch: &DispatchRecord) -> Option<Millis> {
    match (&def.delivery, &dispatch.source, dispatch.not_before) {
        (Delivery::Scheduled(s), DispatchSource::Campaign { .. }, Some(expanded))
            if s.in_local_time =>
        {
            Some(Millis(
                expanded.0 + tideway_core::campaigns::LOCAL_TIME_LEAD_MS,
            ))
        }
        _ => None,
    }
}
