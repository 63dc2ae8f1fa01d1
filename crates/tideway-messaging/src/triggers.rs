//! The trigger engine: action-based campaigns, started by what users do.
//!
//! It follows each workspace's logs from a cursor kept in the store: the event log (custom
//! events, purchases) and the cohort-membership change log (users entering partner cohorts).
//! For every occurrence that matches an active action-based campaign's trigger (after the
//! campaign's launch and within its start/end), and whose user is in the campaign's audience
//! at that moment, it plans a per-user dispatch; the jobs, receipts and the cursor's advance are
//! one transaction ([`tideway_core::store::Enqueue::cursor`] is a compare-and-set). So a
//! trigger is acted on exactly once: a crash before the commit re-reads the same stretch, and
//! a second node that read it too loses the compare-and-set and writes nothing.
//!
//! The same pass records conversions: a custom event or purchase (or an email open or click)
//! of a user who received a campaign with a matching conversion event, within its window,
//! becomes a `users.campaigns.Conversion` in that transaction (once per campaign, user and
//! conversion event; the store keeps the first), credited to the campaign's latest message
//! sent to the user by then (its dispatch, variation and `send_id`, as Braze credits the most
//! recent send id), and counts every messaging event it reads into its campaign's stats and
//! send-id series ([`crate::stats`]), in the same transaction.
//!
//! **Segment entry** (a Tideway extension: `{"segment_entry": {"segment_id"}}`) is detected
//! here rather than read from a log. Each (campaign, segment) has a tracker in the store
//! ([`SegmentTracker`]): a segment change-feed position and the segment's members there (a
//! roaring bitmap of user seqs). The first pass after launch records the head and the members
//! then — users already in do not "enter". Each later pass reads the feed's changes since the
//! tracker (`segment_profile_changes`), asks which of the users it names are in the segment
//! now, and plans a per-user dispatch (as for a cohort entry: audience, receipts, delay) for
//! those who were not members before; those jobs and the tracker's move (a compare-and-set on
//! its position) are one enqueue, so an entry is acted on exactly once across restarts and
//! nodes, and entries while no node ran are found after the restart. Membership is evaluated
//! when the pass runs: a user who enters and leaves between two passes is not seen, and a
//! change that needs no write — a filter on time passing (`"more_than_days_ago"`, …) — is
//! seen only at the user's next change. Entries while the campaign is paused are acted on when
//! it is resumed (its tracker waits for it). A trigger naming a deleted segment is skipped.
//!
//! Latency: the engine polls every [`TriggerConfig::poll`] (100 ms) and runs again at once
//! when a read was full, so a cohort delta becomes a queued send in a fraction of a second.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use roaring::RoaringBitmap;
use serde_json::{Map, Value};
use tideway_core::campaigns::{
    ActionDelivery, Assignment, CampaignDefinition, CampaignStatus, ConversionEvent,
    ConversionKind, Delivery, Occurrence,
};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventType, EventUser};
use tideway_core::ids::{EventId, UserSeq, WorkspaceId};
use tideway_core::message_events::{MessageSource, Origin};
use tideway_core::profile::UserRecord;
use tideway_core::segments::FeedPosition;
use tideway_core::store::{
    CampaignRecord, CurrentsStore, DispatchRecord, DispatchSource, Enqueue, NewConversion,
    SegmentStore, SegmentTracker, StoreError, TriggerCursor,
};
use tideway_currents::Clock;
use tideway_segment::Filter;
use tracing::{debug, warn};

use crate::audience::{Audiences, audience_filter};
use crate::dispatcher::{DispatchStore, Dispatcher};
use crate::plan::{self, Recipient};

/// One step of a segment-entry tracker along the segment change feed: the users who entered
/// the segment since the tracker's position, and the tracker's move (a compare-and-set on its
/// position) to write in the same transaction as what is done about them.
pub struct SegmentStep {
    pub entered: Vec<UserSeq>,
    pub moves: Vec<(String, String, Option<FeedPosition>, SegmentTracker)>,
}

/// The next [`SegmentStep`] of the tracker of (`owner_id` — a campaign's or a Canvas's id —,
/// `segment_id`); `None` when the tracker is at the feed's head. The first look records the
/// head and the members then, and nobody enters (see the module docs). `head` caches the
/// feed's head over a pass.
pub async fn segment_step<S: TriggerStore + ?Sized>(
    store: &S,
    audiences: &dyn Audiences,
    ws: WorkspaceId,
    owner_id: &str,
    segment_id: &str,
    head: &mut Option<FeedPosition>,
) -> Result<Option<SegmentStep>, StoreError> {
    let segment_filter = Filter::InSegment(segment_id.to_owned());
    let tracker_of = |expected: Option<FeedPosition>, position, members: &RoaringBitmap| {
        let mut bytes = Vec::with_capacity(members.serialized_size());
        members
            .serialize_into(&mut bytes)
            .map_err(|e| StoreError::Corrupt(format!("segment tracker members: {e}")))?;
        Ok::<_, StoreError>(vec![(
            owner_id.to_owned(),
            segment_id.to_owned(),
            expected,
            SegmentTracker {
                position,
                members: bytes,
            },
        )])
    };
    let Some(tracker) = store.segment_tracker(ws, owner_id, segment_id).await? else {
        // The first look: whoever is in the segment now is in already and does not enter.
        // The head is read first, so the members are as of it or later (the audience's
        // answer includes every write acknowledged before the question).
        let position = store.segment_feed_head(ws).await?;
        let members: RoaringBitmap = audiences
            .members(ws, segment_filter, None)
            .await?
            .into_iter()
            .map(|u| u.0)
            .collect();
        return Ok(Some(SegmentStep {
            entered: Vec::new(),
            moves: tracker_of(None, position, &members)?,
        }));
    };
    let feed_head = match *head {
        Some(h) => h,
        None => *head.insert(store.segment_feed_head(ws).await?),
    };
    if tracker.position.event_seq >= feed_head.event_seq
        && tracker.position.cohort_change_seq >= feed_head.cohort_change_seq
        && tracker.position.user_change_seq >= feed_head.user_change_seq
    {
        return Ok(None);
    }
    let changes = store.segment_profile_changes(ws, tracker.position).await?;
    if changes.position == tracker.position {
        return Ok(None);
    }
    let mut changed: Vec<UserSeq> = changes
        .users
        .iter()
        .chain(&changes.attributes)
        .map(|u| UserSeq(u.profile.uid))
        .chain(changes.occurrences.iter().map(|o| o.user))
        .chain(changes.removed.iter().copied())
        .chain(changes.cohort_deltas.iter().map(|d| d.user))
        .collect();
    changed.sort_unstable();
    changed.dedup();
    let previous = RoaringBitmap::deserialize_from(tracker.members.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("segment tracker members: {e}")))?;
    let now_in: RoaringBitmap = if changed.is_empty() {
        RoaringBitmap::new()
    } else {
        audiences
            .matching(ws, segment_filter, changed.clone())
            .await?
            .into_iter()
            .map(|u| u.0)
            .collect()
    };
    let changed_set: RoaringBitmap = changed.iter().map(|u| u.0).collect();
    let entered = &now_in - &previous;
    let left = &changed_set - &now_in;
    let members = (&previous | &entered) - &left;
    Ok(Some(SegmentStep {
        entered: entered.iter().map(UserSeq).collect(),
        moves: tracker_of(Some(tracker.position), changes.position, &members)?,
    }))
}

/// Most log entries read per pass.
pub const READ_LIMIT: usize = 1_000;

#[derive(Debug, Clone)]
pub struct TriggerConfig {
    pub poll: Duration,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig {
            poll: Duration::from_millis(100),
        }
    }
}

/// The store the trigger engine needs.
pub trait TriggerStore: DispatchStore + CurrentsStore + SegmentStore {}
impl<T: DispatchStore + CurrentsStore + SegmentStore + ?Sized> TriggerStore for T {}

/// Points the workspace's trigger cursor at the logs' heads if it was never set, so a first
/// action-based campaign starts from now rather than from the start of history. Called when
/// such a campaign is launched.
pub async fn start_cursor<S: TriggerStore + ?Sized>(
    store: &S,
    workspace: WorkspaceId,
) -> Result<(), StoreError> {
    let cursor = store.trigger_cursor(workspace).await?;
    if cursor.is_started() {
        return Ok(());
    }
    let heads = TriggerCursor::at_heads(
        store.event_log_head(workspace).await?,
        store.cohort_changes_head(workspace).await?,
    );
    match store
        .enqueue(
            workspace,
            Enqueue {
                cursor: Some((cursor, heads)),
                ..Enqueue::default()
            },
        )
        .await
    {
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One occurrence read from the logs.
struct Happened {
    user: UserSeq,
    /// Milliseconds.
    at: Millis,
    kind: Kind,
}

enum Kind {
    Custom {
        name: String,
        properties: Map<String, Value>,
    },
    Purchase {
        product_id: String,
        properties: Map<String, Value>,
    },
    Cohort {
        partner: String,
        cohort_id: String,
    },
    /// An email of `campaign_id` opened or clicked (conversions only).
    Engaged {
        engagement: Engagement,
        campaign_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engagement {
    Open,
    Click,
}

impl Happened {
    /// What a campaign trigger sees; `None` for engagement, which triggers nothing
    /// ([`Self::converts`] reads it directly).
    fn occurrence(&self) -> Option<Occurrence<'_>> {
        Some(match &self.kind {
            Kind::Custom { name, properties } => Occurrence::CustomEvent { name, properties },
            Kind::Purchase { product_id, .. } => Occurrence::Purchase { product_id },
            Kind::Cohort { partner, cohort_id } => Occurrence::CohortEntry { partner, cohort_id },
            Kind::Engaged { .. } => return None,
        })
    }

    /// Whether this counts as `conversion` of `campaign_id`.
    fn converts(&self, conversion: &ConversionEvent, campaign_id: &str) -> bool {
        match (&self.kind, &conversion.kind) {
            (
                Kind::Engaged {
                    engagement,
                    campaign_id: of,
                },
                ConversionKind::OpensEmail,
            ) => of == campaign_id && *engagement == Engagement::Open,
            (
                Kind::Engaged {
                    engagement,
                    campaign_id: of,
                },
                ConversionKind::ClicksEmail,
            ) => of == campaign_id && *engagement == Engagement::Click,
            (Kind::Engaged { .. } | Kind::Cohort { .. }, _) => false,
            _ => self.occurrence().is_some_and(|o| conversion.matches(&o)),
        }
    }

    /// What `{{event_properties.${x}}}` sees.
    fn properties(&self) -> Option<String> {
        match &self.kind {
            Kind::Custom { properties, .. } | Kind::Purchase { properties, .. } => {
                Some(Value::Object(properties.clone()).to_string())
            }
            Kind::Cohort { .. } | Kind::Engaged { .. } => None,
        }
    }
}

pub struct TriggerEngine<S: ?Sized> {
    store: Arc<S>,
    audiences: Arc<dyn Audiences>,
    dispatcher: Arc<Dispatcher<S>>,
    clock: Clock,
    config: TriggerConfig,
    /// Workspaces with at least one campaign (whose stats are counted), re-read every
    /// [`WORKSPACES_TTL_MS`].
    with_campaigns: std::sync::Mutex<(Millis, Arc<Vec<WorkspaceId>>)>,
    /// Segment-entry triggers found naming a deleted segment (logged once each).
    missing_segments: std::sync::Mutex<HashSet<(WorkspaceId, String, String)>>,
}

/// How long the list of workspaces with campaigns is cached.
const WORKSPACES_TTL_MS: i64 = 5_000;

impl<S: TriggerStore + ?Sized + 'static> TriggerEngine<S> {
    pub fn new(
        store: Arc<S>,
        audiences: Arc<dyn Audiences>,
        dispatcher: Arc<Dispatcher<S>>,
        clock: Clock,
        config: TriggerConfig,
    ) -> Self {
        TriggerEngine {
            store,
            audiences,
            dispatcher,
            clock,
            config,
            with_campaigns: std::sync::Mutex::new((Millis(i64::MIN), Arc::new(Vec::new()))),
            missing_segments: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Workspaces that have (or had) campaigns: their logs are read for stats even when no
    /// campaign is triggered by them.
    async fn workspaces_with_campaigns(&self) -> Result<Arc<Vec<WorkspaceId>>, StoreError> {
        let now = self.clock.now();
        {
            let cached = self
                .with_campaigns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.0.saturating_sub(cached.0.0) < WORKSPACES_TTL_MS {
                return Ok(Arc::clone(&cached.1));
            }
        }
        let mut found = Vec::new();
        for w in self.store.list_workspaces().await? {
            if !self.store.list_campaigns(w.id).await?.is_empty() {
                found.push(w.id);
            }
        }
        let found = Arc::new(found);
        *self
            .with_campaigns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (now, Arc::clone(&found));
        Ok(found)
    }

    pub async fn run(self) {
        let mut failures = 0;
        loop {
            let busy = match self.pass().await {
                Ok(busy) => {
                    failures = 0;
                    busy
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, failures, "trigger pass failed; retrying");
                    false
                }
            };
            if !busy {
                tokio::time::sleep(crate::engine::retry_wait(self.config.poll, failures)).await;
            }
        }
    }

    /// One pass over every workspace with campaigns (triggers of its active action-based
    /// campaigns, conversions, stats); true if some read was full (more is waiting).
    pub async fn pass(&self) -> Result<bool, StoreError> {
        let mut by_workspace: HashMap<WorkspaceId, Vec<(CampaignRecord, CampaignDefinition)>> =
            HashMap::new();
        for (ws, c) in self.store.active_campaigns().await? {
            let Ok(def) = CampaignDefinition::load(&c.definition) else {
                continue;
            };
            if matches!(def.delivery, Delivery::ActionBased(_)) || !def.conversion_events.is_empty()
            {
                by_workspace.entry(ws).or_default().push((c, def));
            }
        }
        for ws in self.workspaces_with_campaigns().await?.iter() {
            by_workspace.entry(*ws).or_default();
        }
        let mut busy = false;
        for (ws, campaigns) in by_workspace {
            match self.workspace_pass(ws, &campaigns).await {
                Ok(full) => busy |= full,
                Err(StoreError::Conflict(_)) => busy = true,
                Err(e) => warn!(workspace = ws.0, error = %e, "trigger pass of a workspace failed"),
            }
            match self.segment_pass(ws, &campaigns).await {
                Ok(raced) => busy |= raced,
                Err(e) => {
                    warn!(workspace = ws.0, error = %e, "segment-entry pass of a workspace failed")
                }
            }
        }
        Ok(busy)
    }

    async fn app_group_id(&self, ws: WorkspaceId) -> Result<String, StoreError> {
        crate::plan::app_group_id(self.store.as_ref(), ws).await
    }

    /// The records of those of `users` the campaign puts in its control group (their
    /// enrolment events need them).
    async fn control_records(
        &self,
        ws: WorkspaceId,
        campaign: &CampaignRecord,
        def: &CampaignDefinition,
        users: &[UserSeq],
    ) -> Result<HashMap<UserSeq, UserRecord>, StoreError> {
        let controls = plan::control_users(campaign, def, users);
        if controls.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(self
            .store
            .users_by_seq(ws, controls)
            .await?
            .into_iter()
            .map(|u| (u.seq, u))
            .collect())
    }

    /// Segment-entry triggers of the workspace's active action-based campaigns: each
    /// (campaign, segment) tracker followed along the segment change feed (see the module
    /// docs). True if a tracker move lost a race (another node moved it: look again soon).
    async fn segment_pass(
        &self,
        ws: WorkspaceId,
        campaigns: &[(CampaignRecord, CampaignDefinition)],
    ) -> Result<bool, StoreError> {
        let mut head: Option<FeedPosition> = None;
        let mut app_group_id: Option<String> = None;
        let mut raced = false;
        for (campaign, def) in campaigns {
            if campaign.status != CampaignStatus::Active {
                continue;
            }
            let Delivery::ActionBased(action) = &def.delivery else {
                continue;
            };
            for segment_id in def.segment_entry_ids() {
                let followed = self
                    .follow_segment(
                        ws,
                        (campaign, def, action),
                        segment_id,
                        &mut head,
                        &mut app_group_id,
                    )
                    .await;
                match followed {
                    Ok(()) => {}
                    Err(StoreError::Conflict(_)) => raced = true,
                    Err(e) => warn!(
                        workspace = ws.0,
                        campaign = %campaign.id,
                        segment = segment_id,
                        error = %e,
                        "segment-entry trigger failed"
                    ),
                }
            }
        }
        Ok(raced)
    }

    /// Moves one (campaign, segment) tracker to the feed's head, planning a send for each user
    /// who entered the segment on the way, in one enqueue.
    async fn follow_segment(
        &self,
        ws: WorkspaceId,
        (campaign, def, action): (&CampaignRecord, &CampaignDefinition, &ActionDelivery),
        segment_id: &str,
        head: &mut Option<FeedPosition>,
        app_group_id: &mut Option<String>,
    ) -> Result<(), StoreError> {
        if self.store.segment(ws, segment_id).await?.is_none() {
            let first = self
                .missing_segments
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((ws, campaign.id.clone(), segment_id.to_owned()));
            if first {
                debug!(
                    workspace = ws.0,
                    campaign = %campaign.id,
                    segment = segment_id,
                    "segment-entry trigger names a deleted segment; skipped"
                );
            }
            return Ok(());
        }
        let Some(step) = segment_step(
            self.store.as_ref(),
            self.audiences.as_ref(),
            ws,
            &campaign.id,
            segment_id,
            head,
        )
        .await?
        else {
            return Ok(());
        };
        let entered = step.entered;
        let now = self.clock.now();
        let launched = campaign.launched_at.unwrap_or(campaign.updated_at);
        let in_window = now.0 >= launched.0
            && action.start.is_none_or(|s| now.0 >= s.0)
            && action.end.is_none_or(|e| now.0 <= e.0);
        let mut enqueue = Enqueue {
            segment_trackers: step.moves,
            ..Enqueue::default()
        };
        if in_window && !entered.is_empty() {
            let filter = audience_filter(&def.audience)?;
            let in_audience = self.audiences.matching(ws, filter, entered).await?;
            let records = self
                .control_records(ws, campaign, def, &in_audience)
                .await?;
            let app_group_id = match app_group_id {
                Some(id) => id,
                None => app_group_id.insert(self.app_group_id(ws).await?),
            };
            let planned = TriggeredBy {
                ws,
                campaign,
                def,
                app_group_id,
                records: &records,
                due_at: Millis(now.0 + i64::from(action.delay_secs) * 1_000),
                now,
            };
            for user in in_audience {
                let recipient = Recipient {
                    user,
                    properties: None,
                    due_at: None,
                };
                planned.dispatch_to(recipient, &mut enqueue);
            }
        }
        let triggered = enqueue.items.len();
        let outcome = self.store.enqueue(ws, enqueue).await?;
        if triggered > 0 {
            debug!(
                workspace = ws.0,
                campaign = %campaign.id,
                segment = segment_id,
                triggered,
                queued = outcome.queued,
                ineligible = outcome.ineligible,
                "segment entries triggered sends"
            );
            metrics::counter!("tideway_campaign_triggers_total").increment(triggered as u64);
            self.dispatcher.wake();
        }
        Ok(())
    }

    async fn workspace_pass(
        &self,
        ws: WorkspaceId,
        campaigns: &[(CampaignRecord, CampaignDefinition)],
    ) -> Result<bool, StoreError> {
        let cursor = self.store.trigger_cursor(ws).await?;
        if !cursor.is_started() {
            start_cursor(self.store.as_ref(), ws).await?;
            return Ok(true);
        }
        let events = self
            .store
            .read_events(ws, cursor.events, READ_LIMIT)
            .await?;
        let entries = self
            .store
            .cohort_entries(ws, cursor.cohort_changes, READ_LIMIT)
            .await?;
        if events.is_empty() && entries.is_empty() {
            return Ok(false);
        }
        let full = events.len() == READ_LIMIT || entries.len() == READ_LIMIT;
        let next = TriggerCursor {
            events: events.last().map_or(cursor.events, |e| e.seq),
            cohort_changes: entries.last().map_or(cursor.cohort_changes, |e| e.position),
        };
        let (mut stats, mut send_stats) = (Vec::new(), Vec::new());
        for logged in &events {
            let counted = crate::stats::increments(logged.user, &logged.event);
            stats.extend(counted.stats);
            send_stats.extend(counted.send_stats);
        }
        let mut happened = Vec::new();
        for logged in &events {
            let Some(user) = logged.user else { continue };
            let engagement = match logged.event.event_type.as_str() {
                "users.messages.email.Open" => Some(Engagement::Open),
                "users.messages.email.Click" => Some(Engagement::Click),
                _ => None,
            };
            if let Some(engagement) = engagement {
                let body = logged.event.body_value();
                if let Some(campaign_id) = body["properties"]["campaign_id"].as_str() {
                    happened.push(Happened {
                        user,
                        at: Millis::from_secs(logged.event.time),
                        kind: Kind::Engaged {
                            engagement,
                            campaign_id: campaign_id.to_owned(),
                        },
                    });
                }
                continue;
            }
            let kind = match logged.event.event_type {
                EventType::CustomEvent | EventType::Purchase => {
                    let body = logged.event.body_value();
                    let props = &body["properties"];
                    if logged.event.event_type == EventType::CustomEvent {
                        Kind::Custom {
                            name: props["name"].as_str().unwrap_or_default().to_owned(),
                            properties: props["custom_properties"]
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        }
                    } else {
                        Kind::Purchase {
                            product_id: props["product_id"].as_str().unwrap_or_default().to_owned(),
                            properties: props["purchase_properties"]
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        }
                    }
                }
                _ => continue,
            };
            happened.push(Happened {
                user,
                at: Millis::from_secs(logged.event.time),
                kind,
            });
        }
        for entry in entries {
            happened.push(Happened {
                user: entry.user,
                at: entry.at,
                kind: Kind::Cohort {
                    partner: entry.partner,
                    cohort_id: entry.cohort_id,
                },
            });
        }

        let now = self.clock.now();
        let app_group_id = self.app_group_id(ws).await?;
        let mut enqueue = Enqueue {
            cursor: Some((cursor, next)),
            stats,
            send_stats,
            ..Enqueue::default()
        };
        for (campaign, def) in campaigns {
            if campaign.status != CampaignStatus::Active {
                continue;
            }
            let Delivery::ActionBased(action) = &def.delivery else {
                continue;
            };
            let launched = campaign.launched_at.unwrap_or(campaign.updated_at);
            let from = action
                .start
                .map_or(launched, |s| Millis(s.0.max(launched.0)));
            // Custom events carry second precision: an event in the launch's second counts.
            let matching: Vec<&Happened> = happened
                .iter()
                .filter(|h| {
                    h.at.0 >= from.0 - from.0.rem_euclid(1_000)
                        && action.end.is_none_or(|end| h.at.0 <= end.0)
                        && h.occurrence()
                            .is_some_and(|o| action.triggers.iter().any(|t| t.matches(&o)))
                })
                .collect();
            if matching.is_empty() {
                continue;
            }
            let mut users: Vec<UserSeq> = matching.iter().map(|h| h.user).collect();
            users.sort_unstable();
            users.dedup();
            let filter = audience_filter(&def.audience)?;
            let in_audience = self.audiences.matching(ws, filter, users).await?;
            let records = self
                .control_records(ws, campaign, def, &in_audience)
                .await?;
            let due_at = Millis(now.0 + i64::from(action.delay_secs) * 1_000);
            // One dispatch per (user, trigger); the receipt keeps a user who triggers twice in
            // one pass to one send (unless re-eligible).
            for h in matching {
                if in_audience.binary_search(&h.user).is_err() {
                    continue;
                }
                let recipient = Recipient {
                    user: h.user,
                    properties: h.properties(),
                    due_at: None,
                };
                let planned = TriggeredBy {
                    ws,
                    campaign,
                    def,
                    app_group_id: &app_group_id,
                    records: &records,
                    due_at,
                    now,
                };
                planned.dispatch_to(recipient, &mut enqueue);
            }
        }
        enqueue.conversions = self
            .conversions(ws, campaigns, &happened, &app_group_id)
            .await?;
        let triggered = enqueue.items.len();
        let outcome = self.store.enqueue(ws, enqueue).await?;
        if triggered > 0 {
            debug!(
                workspace = ws.0,
                triggered,
                queued = outcome.queued,
                ineligible = outcome.ineligible,
                "triggered sends"
            );
            metrics::counter!("tideway_campaign_triggers_total").increment(triggered as u64);
            self.dispatcher.wake();
        }
        Ok(full)
    }

    /// The conversions among `happened`: for each user who received one of `campaigns` with
    /// conversion events, each event that matches one within its window after the receipt.
    async fn conversions(
        &self,
        ws: WorkspaceId,
        campaigns: &[(CampaignRecord, CampaignDefinition)],
        happened: &[Happened],
        app_group_id: &str,
    ) -> Result<Vec<NewConversion>, StoreError> {
        let converting: HashMap<&str, (&CampaignRecord, &CampaignDefinition)> = campaigns
            .iter()
            .filter(|(_, d)| !d.conversion_events.is_empty())
            .map(|(c, d)| (c.id.as_str(), (c, d)))
            .collect();
        if converting.is_empty() {
            return Ok(Vec::new());
        }
        let mut users: Vec<UserSeq> = happened
            .iter()
            .filter(|h| !matches!(h.kind, Kind::Cohort { .. }))
            .map(|h| h.user)
            .collect();
        users.sort_unstable();
        users.dedup();
        let mut found: Vec<(UserSeq, Millis, &CampaignRecord, u8, &ConversionEvent)> = Vec::new();
        for &user in &users {
            let receipts = self.store.receipts_of(ws, user).await?;
            for receipt in receipts {
                let Some((campaign, def)) = converting.get(receipt.campaign_id.as_str()) else {
                    continue;
                };
                for h in happened.iter().filter(|h| h.user == user) {
                    for (index, conversion) in def.conversion_events.iter().enumerate() {
                        let within = h.at.0
                            >= receipt.received_at.0 - receipt.received_at.0.rem_euclid(1_000)
                            && h.at.0 <= receipt.received_at.0 + conversion.window_secs * 1_000;
                        if within && h.converts(conversion, &campaign.id) {
                            found.push((user, h.at, campaign, index as u8, conversion));
                        }
                    }
                }
            }
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut seqs: Vec<UserSeq> = found.iter().map(|f| f.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let records: HashMap<UserSeq, _> = self
            .store
            .users_by_seq(ws, seqs)
            .await?
            .into_iter()
            .map(|u| (u.seq, u))
            .collect();
        let mut out = Vec::new();
        for (user, at, campaign, index, conversion) in found {
            let Some(record) = records.get(&user) else {
                continue;
            };
            let event_user = EventUser {
                braze_id: &record.braze_id,
                external_id: record.external_id.as_ref(),
                device_id: None,
                time_zone: record.time_zone(),
            };
            let def = converting.get(campaign.id.as_str()).map(|(_, d)| *d);
            let credited = self.credited_message(ws, record, &campaign.id, at).await?;
            // No message: a control-group user (enrolled, never sent one) converts under the
            // control variation, as its enrolment event names it.
            let (variation_id, variation_name) = match (&credited, def) {
                (Some(c), _) => (
                    Some(c.variant.as_str()),
                    def.and_then(|d| d.variants.iter().find(|v| v.id == c.variant))
                        .map(|v| v.name.as_str()),
                ),
                (None, Some(d)) => match d.assign(&campaign.id, &plan::assignment_key(user)) {
                    Assignment::Control(id) => (Some(id), Some("Control")),
                    Assignment::Variant(_) => (None, None),
                },
                (None, None) => (None, None),
            };
            let source = MessageSource {
                app_group_id,
                app_id: None,
                origin: Origin::Campaign {
                    campaign_id: &campaign.id,
                    campaign_name: Some(&campaign.name),
                    message_variation_id: variation_id,
                    message_variation_name: variation_name,
                },
                dispatch_id: credited.as_ref().map(|c| c.dispatch_id.as_str()),
                send_id: credited.as_ref().and_then(|c| c.send_id.as_deref()),
            };
            out.push(NewConversion {
                campaign_id: campaign.id.clone(),
                user,
                index,
                event: CurrentsEvent::campaign_conversion(
                    EventId(uuid::Uuid::new_v4().hyphenated().to_string()),
                    at,
                    &event_user,
                    &source,
                    i32::from(index),
                    &conversion.behavior_json().to_string(),
                ),
            });
        }
        Ok(out)
    }
}

/// The message of a campaign a conversion is credited to.
struct Credited {
    /// As the message's own events name it (per user when its dispatch's ids are).
    dispatch_id: String,
    variant: String,
    send_id: Option<String>,
}

/// Sends read back to find the message a conversion is credited to: a user converting within
/// a window after a campaign's message has rarely had more messages since.
const CREDIT_LOOKBACK: usize = 100;

impl<S: TriggerStore + ?Sized + 'static> TriggerEngine<S> {
    /// The campaign's message a conversion of `user` at `at` is credited to — the latest one
    /// sent (or, when it failed or is still being tried, due) to the user by then, as Braze
    /// credits the most recent `send_id` — with its dispatch's `send_id`; `None` when none is
    /// among the user's recent sends.
    async fn credited_message(
        &self,
        ws: WorkspaceId,
        user: &UserRecord,
        campaign_id: &str,
        at: Millis,
    ) -> Result<Option<Credited>, StoreError> {
        let sends = self
            .store
            .recent_sends(ws, user.seq, CREDIT_LOOKBACK)
            .await?;
        let latest = sends
            .into_iter()
            .filter(|s| {
                matches!(&s.source, Some(DispatchSource::Campaign { campaign_id: c }) if c == campaign_id)
                    // Whole seconds, as the receipt window is read: an event logged in
                    // the second of the send counts.
                    && {
                        let t = s.sent_at.unwrap_or(s.due_at);
                        t.0 - t.0.rem_euclid(1_000) <= at.0
                    }
            })
            .max_by_key(|s| (s.sent_at.unwrap_or(s.due_at), s.id));
        let Some(send) = latest else {
            return Ok(None);
        };
        let Some(dispatch) = self.store.dispatch(ws, &send.dispatch_id).await? else {
            return Ok(None);
        };
        let dispatch_id = if dispatch.per_user_ids {
            tideway_core::campaigns::user_dispatch_id(&dispatch.id, user.braze_id.as_str())
        } else {
            dispatch.id
        };
        Ok(Some(Credited {
            dispatch_id,
            variant: send.variant,
            send_id: dispatch.send_id,
        }))
    }
}

/// A triggered campaign's per-user dispatches being planned in one pass.
struct TriggeredBy<'a> {
    ws: WorkspaceId,
    campaign: &'a CampaignRecord,
    def: &'a CampaignDefinition,
    app_group_id: &'a str,
    /// Records of the control-group users among the recipients.
    records: &'a HashMap<UserSeq, UserRecord>,
    due_at: Millis,
    now: Millis,
}

impl TriggeredBy<'_> {
    /// Adds a per-user dispatch to `recipient` and its items (receipt, job or control-group
    /// enrolment) to `enqueue`; nothing if there is nothing to write.
    fn dispatch_to(&self, recipient: Recipient, enqueue: &mut Enqueue) {
        let dispatch = DispatchRecord {
            id: plan::new_dispatch_id(),
            workspace: self.ws,
            source: DispatchSource::Campaign {
                campaign_id: self.campaign.id.clone(),
            },
            send_id: None,
            per_user_ids: true,
            properties: None,
            audience: None,
            created_at: self.now,
            expanding_after: None,
            not_before: None,
        };
        let items = plan::campaign_items(
            plan::CampaignDispatch {
                campaign: self.campaign,
                definition: self.def,
                dispatch: &dispatch,
                app_group_id: self.app_group_id,
            },
            &[recipient],
            self.records,
            self.due_at,
            self.now,
        );
        if items.is_empty() {
            return;
        }
        enqueue.dispatches.push(dispatch);
        enqueue.items.extend(items);
    }
}
