//! The conformance suite: one set of checks, generic over the store contract
//! (`tideway_core::store::Store`), run against every backend — SQLite (`SqliteStore` on a file
//! in a temp dir) and PostgreSQL (`PgStore` on a database of the check's own, see `pg.rs`).
//!
//! It holds every user, cohort, segment-feed, Currents-log, admin and messaging behaviour the
//! HTTP layer and the messaging engine rely on, stated through the contract alone (no SQL, no
//! backend type), with exact expected values: a backend conforms when every check passes on it.
//! What only one backend has (SQLite reopened with a second connection, PostgreSQL with two
//! nodes) stays in that backend's own tests (`main.rs`, `pg_*.rs`).
//!
//! **Adding a check.** Write `pub(super) async fn what_it_guarantees(store: Arc<dyn Store>)` in
//! the file of its bounded context (`users.rs`, `cohorts.rs`, `admin.rs`, `log.rs`, `feed.rs`,
//! `currents.rs`, `messaging.rs`, `dashboard.rs`), starting from an empty store, and add its name to that group
//! in the `conformance!` list at the end of this file. The macro makes one `#[tokio::test]` per
//! backend of it: `conformance::sqlite::<group>::<check>` and
//! `conformance::postgres::<group>::<check>`. Run them with
//! `cargo test -p tideway-store --test it conformance` (PostgreSQL needs
//! `TIDEWAY_TEST_DATABASE_URL`, or the server binaries to start a private one).

use std::sync::Arc;

use serde_json::{Map, Value};
use tideway_core::clock::Millis;
use tideway_core::cohorts::CohortId;
use tideway_core::ids::{AliasLabel, AliasName, DeviceId, ExternalId, UserAlias};
use tideway_core::store::prelude::*;
use tideway_core::store::{LoggedEvent, Workspace};
use tideway_core::track::parse_track;
use tideway_core::users::{ExportOutcome, ExportRequest, TrackOutcome};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::pg::TestDb;

mod admin;
mod canvas;
mod cohorts;
mod currents;
mod dashboard;
mod feed;
mod log;
mod messaging;
mod users;

/// The store a check runs against, and what keeps its backend alive: fields drop in order, so
/// the store goes before its file or database.
pub(crate) struct Subject {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<TestDb>,
}

impl Subject {
    pub(crate) async fn sqlite() -> Subject {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default())
            .expect("open the SQLite store");
        Subject {
            store: Arc::new(store),
            _dir: Some(dir),
            _db: None,
        }
    }

    pub(crate) async fn postgres() -> Subject {
        let db = TestDb::create().await;
        let store = db.store().await;
        Subject {
            store: Arc::new(store),
            _dir: None,
            _db: Some(db),
        }
    }

    pub(crate) fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }
}

// --- what many checks share ----------------------------------------------------------------

pub(super) const NOW: Millis = Millis(1_750_000_000_000);

pub(super) fn ext(s: &str) -> ExternalId {
    ExternalId::parse(s).unwrap()
}

pub(super) fn dev(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

pub(super) fn alias(label: &str, name: &str) -> UserAlias {
    UserAlias {
        label: AliasLabel::parse(label).unwrap(),
        name: AliasName::parse(name).unwrap(),
    }
}

pub(super) fn cid(s: &str) -> CohortId {
    CohortId::parse(s).unwrap()
}

/// One `/users/track` request, which must succeed as a whole.
pub(super) async fn track(store: &dyn Store, ws: &Workspace, body: Value) -> TrackOutcome {
    let req = parse_track(body.as_object().expect("a JSON object")).expect("a valid body");
    store.track(ws, req, NOW).await.expect("track")
}

pub(super) async fn export(store: &dyn Store, ws: &Workspace, req: ExportRequest) -> ExportOutcome {
    store.export_ids(ws, req).await.expect("export")
}

/// The exported profile of the user with this external id, if there is one.
pub(super) async fn export_one(
    store: &dyn Store,
    ws: &Workspace,
    external_id: &str,
) -> Option<Map<String, Value>> {
    let req = ExportRequest {
        external_ids: vec![ext(external_id)],
        ..ExportRequest::default()
    };
    let mut out = export(store, ws, req).await;
    assert!(out.users.len() <= 1, "one external id, one user");
    out.users.pop()
}

/// Every event of the workspace's log, oldest first.
pub(super) async fn all_events(store: &dyn Store, ws: &Workspace) -> Vec<LoggedEvent> {
    store
        .read_events(ws.id, 0, 100_000)
        .await
        .expect("read events")
}

/// The event types of `events`, in order.
pub(super) fn types(events: &[LoggedEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.event_type.as_str()).collect()
}

// --- one test per check and backend ----------------------------------------------------------

/// The tests of one backend: `mod $backend { mod $group { #[tokio::test] async fn $check() } }`.
macro_rules! on_backend {
    ($backend:ident, { $($group:ident: [$($check:ident),* $(,)?]),* $(,)? }) => {
        mod $backend {
            $(
                mod $group {
                    $(
                        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        async fn $check() {
                            let subject = crate::conformance::Subject::$backend().await;
                            crate::conformance::$group::$check(subject.store()).await;
                        }
                    )*
                }
            )*
        }
    };
}

/// Every check, on every backend.
macro_rules! conformance {
    ($($groups:tt)*) => {
        on_backend!(sqlite, { $($groups)* });
        on_backend!(postgres, { $($groups)* });
    };
}

conformance! {
    users: [
        concurrent_writes_log_every_event_once_in_increasing_positions,
        concurrent_updates_of_one_user_lose_nothing,
        a_failing_unit_rolls_back_alone,
        track_applies_valid_objects_and_reports_each_error,
        update_existing_only_never_creates_users,
        attribute_operations_apply_across_requests,
        device_users_identify_in_place_or_merge_and_orphan,
        alias_users_identify_in_place_or_merge,
        aliases_are_added_and_renamed,
        merges_fold_one_profile_into_another,
        deletes_erase_users_and_log_a_delete_request,
        renamed_external_ids_resolve_until_removed,
        export_finds_users_by_every_identifier,
        contact_identifiers_pick_users_by_recency_and_prioritization,
        workspaces_are_isolated,
    ],
    cohorts: [
        membership_follows_the_matching_rules_and_set_semantics,
        merges_keep_the_union_and_deletes_leave,
        sync_pages_apply_once_and_drain_empties,
        import_keys_rotate_and_partner_keys_are_per_partner,
        a_failed_import_changes_no_membership,
        concurrent_imports_count_every_member_once,
        recent_changes_are_summed_per_cohort,
    ],
    admin: [
        workspace_names_are_unique,
        api_keys_are_created_listed_revoked_and_found,
        heap_webhook_settings_are_kept_per_workspace,
    ],
    dashboard: [
        users_are_created_listed_and_their_passwords_reset,
        sessions_expire_and_end_with_a_password_reset,
        sign_in_failures_are_counted_per_key_within_the_window,
        concurrent_sign_in_failures_are_each_counted_once,
    ],
    log: [
        read_events_after_a_position_returns_only_later_events,
        appended_events_read_back_as_written,
        a_follower_of_the_log_sees_every_event_once,
        events_of_a_failed_unit_never_appear,
    ],
    feed: [
        segments_are_created_listed_updated_and_deleted,
        segment_definitions_are_locked_one_change_at_a_time,
        an_index_caught_up_from_the_feed_answers_as_a_fresh_load,
        the_feed_head_moves_past_every_acknowledged_write,
        an_index_following_concurrent_writers_ends_as_a_fresh_load,
    ],
    currents: [
        a_current_starts_at_the_end_of_the_log,
        current_ids_are_never_reused,
        an_ack_moves_the_position,
        leases_fence_a_second_owner,
        failures_and_dead_letters_are_recorded_and_replayed,
        the_log_clock_drives_lag_and_retention,
    ],
    messaging: [
        campaigns_are_created_read_listed_saved_and_deleted,
        deleting_a_campaign_keeps_only_its_sent_messages,
        enqueue_writes_dispatches_jobs_and_events_all_or_nothing,
        receipts_allow_a_campaign_once_per_window,
        scheduled_receipts_follow_their_dispatch,
        a_scheduled_adhoc_definition_is_replaced_until_cancelled,
        cursor_and_next_run_move_by_compare_and_set,
        expansion_marks_only_move_forward,
        claims_lease_due_sends_oldest_first,
        a_node_releases_its_own_leases_when_it_starts,
        settlements_are_fenced_by_the_lease,
        settled_sends_move_between_states,
        settlement_events_land_in_each_workspaces_log,
        sends_since_counts_a_users_sent_messages,
        recent_sends_list_a_users_messages_newest_first,
        engagement_is_appended_to_the_log,
        conversions_count_once,
        campaign_stats_count_increments_and_unique_users_once,
        a_refused_enqueue_counts_no_stats,
        send_series_count_per_day_and_unique_users_once,
        campaign_stats_are_per_campaign_and_workspace_and_deleted_with_it,
        concurrent_enqueues_count_each_unique_user_once,
        send_ids_are_capped_per_workspace_and_day,
        dispatches_are_rescheduled_and_cancelled,
        messaging_settings_round_trip,
        the_messaging_secret_is_the_first_candidate,
        users_by_seq_reads_current_profiles,
        trigger_reads_follow_the_logs,
        concurrent_claims_never_claim_a_send_twice,
        segment_trackers_move_by_compare_and_set,
    ],
    canvas: [
        canvases_are_created_versioned_listed_and_deleted,
        entries_follow_reentry_limits_and_journeys_under_way,
        journeys_are_claimed_as_timers_and_settled_under_their_lease,
        each_claimed_journey_gets_its_own_inbox_in_arrival_order,
        canvas_entry_dispatches_enter_each_chunk_once,
        user_updates_are_applied_with_their_settlement_only,
    ],
}
