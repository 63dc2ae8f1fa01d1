//! The PostgreSQL schema, its versioned migrations, and how each table distributes on Citus.
//!
//! It holds what the product stores today (the SQLite schema's data), designed for PostgreSQL
//! and for a distributed PostgreSQL (Citus) later. SQLite's own machinery (`user_log`,
//! `user_behaviors`, `store_marks`: the write-behind and its marks) has no counterpart: a
//! PostgreSQL store writes rows in place, and `event_log_user_behaviors` (a partial index) is
//! the per-user index of custom events and purchases.
//!
//! **Distribution** ([`DISTRIBUTION`], checked by `tests/it/postgres.rs` against the catalog):
//! - Distributed tables are distributed by `workspace_id` and co-located, so everything a
//!   request touches inside one workspace is on one shard. `workspace_id` leads the primary key
//!   and every unique constraint or index (Citus enforces uniqueness per shard only), and every
//!   foreign key between distributed tables starts with `workspace_id`.
//! - Reference tables (replicated to every node) are the small lookups read across workspaces:
//!   `workspaces`, the REST `api_keys` and partner `import_keys` (found by hash before the
//!   workspace is known), `partner_api_keys`, `heap_webhooks` (found by secret), and
//!   `schema_migrations`. A reference table never references a distributed one.
//!
//! **Log order** ([`super::sequence`]): the event log, cohort membership changes and segment
//! user changes are read by position (`seq > position`, per workspace). Their `seq` /
//! `change_seq` is not a PostgreSQL sequence — with concurrent writers a sequence value taken
//! early can commit after a larger one a reader has already passed, and the reader would skip
//! it for ever. Instead each (workspace, log) has a counter row in `workspace_sequences`; a
//! writing transaction takes its range with `UPDATE … SET head = head + n … RETURNING` at the
//! *end* of its work, just before commit. The row lock is held until commit, so the next
//! writer of that workspace's log gets its range only after this one committed: within a
//! workspace, seq order is commit order, and a reader never sees seq `k + 1` before `k`. The
//! lock is per workspace and per log, held only from the allocation to the commit. Writers
//! must run at READ COMMITTED (the default): at REPEATABLE READ the waiting writer would fail
//! with a serialization error instead of reading the new head. Users' dense per-workspace
//! `seq` (the segment index's row number) comes from the same kind of counter (`users`), but
//! reserved in blocks in transactions of their own: unique, never reused, with holes.
//!
//! Times are milliseconds since the epoch (`bigint`, as `Millis`); JSON bodies are `text`,
//! byte for byte what the codecs write (event bodies keep their key order).

use tideway_core::store::StoreError;

use super::{PgPool, pg_err};

/// How a table is placed on a Citus cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Replicated to every node: small, read across workspaces.
    Reference,
    /// Sharded by `column`, co-located with every other distributed table.
    Distributed { column: &'static str },
}

const BY_WORKSPACE: Distribution = Distribution::Distributed {
    column: "workspace_id",
};

/// Every table of the schema and its placement: what a `create_reference_table` /
/// `create_distributed_table(…, colocate_with => …)` step runs over, and what the schema test
/// holds the catalog to.
pub const DISTRIBUTION: &[(&str, Distribution)] = &[
    ("schema_migrations", Distribution::Reference),
    ("workspaces", Distribution::Reference),
    ("api_keys", Distribution::Reference),
    ("partner_api_keys", Distribution::Reference),
    ("import_keys", Distribution::Reference),
    ("heap_webhooks", Distribution::Reference),
    ("workspace_sequences", BY_WORKSPACE),
    ("users", BY_WORKSPACE),
    ("user_aliases", BY_WORKSPACE),
    ("user_devices", BY_WORKSPACE),
    ("deprecated_external_ids", BY_WORKSPACE),
    ("user_merges", BY_WORKSPACE),
    ("event_log", BY_WORKSPACE),
    ("workspace_partners", BY_WORKSPACE),
    ("heap_sync_pages", BY_WORKSPACE),
    ("cohorts", BY_WORKSPACE),
    ("cohort_members", BY_WORKSPACE),
    ("cohort_membership_changes", BY_WORKSPACE),
    ("segments", BY_WORKSPACE),
    ("segment_user_changes", BY_WORKSPACE),
    ("currents", BY_WORKSPACE),
    ("currents_log_clock", BY_WORKSPACE),
    ("currents_dead_letters", BY_WORKSPACE),
    ("currents_replays", BY_WORKSPACE),
    ("currents_drops", BY_WORKSPACE),
    ("currents_test_sends", BY_WORKSPACE),
    ("messaging_secrets", Distribution::Reference),
    ("campaigns", BY_WORKSPACE),
    ("dispatches", BY_WORKSPACE),
    ("sends", BY_WORKSPACE),
    ("campaign_receipts", BY_WORKSPACE),
    ("campaign_conversions", BY_WORKSPACE),
    ("canvases", BY_WORKSPACE),
    ("canvas_versions", BY_WORKSPACE),
    ("canvas_journeys", BY_WORKSPACE),
    ("canvas_inbox", BY_WORKSPACE),
    ("canvas_receipts", BY_WORKSPACE),
    ("canvas_step_stats", BY_WORKSPACE),
    ("canvas_cursors", BY_WORKSPACE),
    ("canvas_conversion_watches", BY_WORKSPACE),
    ("campaign_send_ids", BY_WORKSPACE),
    ("messaging_workspaces", BY_WORKSPACE),
    ("campaign_stats", BY_WORKSPACE),
    ("campaign_stat_users", BY_WORKSPACE),
    ("segment_trackers", BY_WORKSPACE),
    ("send_stats", BY_WORKSPACE),
    ("send_stat_users", BY_WORKSPACE),
    ("dashboard_users", Distribution::Reference),
    ("dashboard_sessions", Distribution::Reference),
    ("dashboard_sign_in_failures", Distribution::Reference),
];

/// Where each table goes, or `None` for a table the schema does not have.
pub fn distribution_of(table: &str) -> Option<Distribution> {
    DISTRIBUTION
        .iter()
        .find(|(name, _)| *name == table)
        .map(|(_, d)| *d)
}

/// Key of the transaction-scoped advisory lock that serialises migrations: a constant of our
/// own ("tideway" in ASCII), so two nodes starting at once queue on the same lock.
pub const MIGRATION_LOCK: i64 = 0x0074_6964_6577_6179;

/// The migrations, in order; version `i + 1` is `MIGRATIONS[i]`. Never edit an applied one:
/// append a new version.
const MIGRATIONS: &[&str] = &[
    r#"
-- Reference tables --------------------------------------------------------------------------

CREATE TABLE workspaces (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    app_group_id  text NOT NULL UNIQUE,
    created_at    bigint NOT NULL
);
-- Found by hash on every REST request, before the workspace is known.
CREATE TABLE api_keys (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    name          text NOT NULL,
    prefix        text NOT NULL,
    hash          bytea NOT NULL UNIQUE,
    permissions   text NOT NULL,
    allow_ips     text NOT NULL,
    created_at    bigint NOT NULL,
    revoked_at    bigint
);
CREATE INDEX api_keys_workspace ON api_keys (workspace_id, id);
CREATE TABLE partner_api_keys (
    partner       text PRIMARY KEY,
    secret        text NOT NULL,
    created_at    bigint NOT NULL
);
-- Found by hash on every partner cohort import.
CREATE TABLE import_keys (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    workspace_id    bigint NOT NULL REFERENCES workspaces (id),
    partner         text NOT NULL,
    prefix          text NOT NULL,
    hash            bytea NOT NULL UNIQUE,
    created_at      bigint NOT NULL,
    invalidated_at  bigint
);
CREATE INDEX import_keys_workspace ON import_keys (workspace_id, partner, id);
-- Every node verifies Heap webhooks against every workspace's secret.
CREATE TABLE heap_webhooks (
    workspace_id  bigint PRIMARY KEY REFERENCES workspaces (id),
    secret        text NOT NULL,
    alias_label   text
);

-- Distributed by workspace_id, co-located ------------------------------------------------------

-- One counter row per (workspace, log): see the module docs and `postgres/sequence.rs`.
CREATE TABLE workspace_sequences (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    name          text NOT NULL CHECK (name IN ('users', 'event_log', 'cohort_membership_changes', 'segment_user_changes')),
    head          bigint NOT NULL CHECK (head >= 0),
    PRIMARY KEY (workspace_id, name)
);

-- Deleted users stay as tombstones (deleted_at set, identifiers and profile erased) so a seq
-- is never reused.
CREATE TABLE users (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    seq           bigint NOT NULL,
    braze_id      text NOT NULL,
    external_id   text,
    email         text,
    phone         text,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    deleted_at    bigint,
    profile       text NOT NULL,
    PRIMARY KEY (workspace_id, seq),
    UNIQUE (workspace_id, braze_id)
);
CREATE UNIQUE INDEX users_external_id ON users (workspace_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX users_email ON users (workspace_id, email) WHERE email IS NOT NULL;
CREATE INDEX users_phone ON users (workspace_id, phone) WHERE phone IS NOT NULL;
CREATE TABLE user_aliases (
    workspace_id  bigint NOT NULL,
    label         text NOT NULL,
    name          text NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (workspace_id, label, name),
    FOREIGN KEY (workspace_id, seq) REFERENCES users (workspace_id, seq)
);
CREATE INDEX user_aliases_seq ON user_aliases (workspace_id, seq);
CREATE TABLE user_devices (
    workspace_id  bigint NOT NULL,
    device_id     text NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (workspace_id, device_id),
    FOREIGN KEY (workspace_id, seq) REFERENCES users (workspace_id, seq)
);
CREATE INDEX user_devices_seq ON user_devices (workspace_id, seq);
-- External ids a rename replaced; they resolve to their user until removed.
CREATE TABLE deprecated_external_ids (
    workspace_id  bigint NOT NULL,
    external_id   text NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (workspace_id, external_id),
    FOREIGN KEY (workspace_id, seq) REFERENCES users (workspace_id, seq)
);
-- Merges, so per-user history in the event log follows a merged-away user into the survivor.
CREATE TABLE user_merges (
    workspace_id  bigint NOT NULL,
    from_seq      bigint NOT NULL,
    into_seq      bigint NOT NULL,
    at            bigint NOT NULL,
    PRIMARY KEY (workspace_id, from_seq),
    FOREIGN KEY (workspace_id, from_seq) REFERENCES users (workspace_id, seq),
    FOREIGN KEY (workspace_id, into_seq) REFERENCES users (workspace_id, seq)
);
CREATE INDEX user_merges_into ON user_merges (workspace_id, into_seq);

-- The Currents event log (transactional outbox): append-only, seq from the workspace's
-- 'event_log' counter. user_seq has no foreign key: the hot append path should not pay a
-- lookup per event, and the transaction that appends resolved the user itself.
CREATE TABLE event_log (
    workspace_id  bigint NOT NULL,
    seq           bigint NOT NULL,
    user_seq      bigint,
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    time          bigint NOT NULL,
    body          text NOT NULL,
    PRIMARY KEY (workspace_id, seq)
);
-- A user's custom events and purchases (segment loads, merges), in log order.
CREATE INDEX event_log_user_behaviors ON event_log (workspace_id, user_seq, seq)
    WHERE event_type IN ('users.behaviors.CustomEvent', 'users.behaviors.Purchase');

-- Partner cohort import ----------------------------------------------------------------------

CREATE TABLE workspace_partners (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    partner       text NOT NULL,
    enabled       boolean NOT NULL,
    PRIMARY KEY (workspace_id, partner)
);
-- Heap segment-sync pages already applied (a retried page is acknowledged, not re-applied).
CREATE TABLE heap_sync_pages (
    workspace_id  bigint NOT NULL,
    sync_task_id  text NOT NULL,
    page_number   bigint NOT NULL,
    applied_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, sync_task_id, page_number)
);
CREATE TABLE cohorts (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    id            bigint GENERATED BY DEFAULT AS IDENTITY,
    partner       text NOT NULL,
    cohort_id     text NOT NULL,
    name          text NOT NULL,
    member_count  bigint NOT NULL DEFAULT 0,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, partner, cohort_id)
);
-- Current membership with its entry time.
CREATE TABLE cohort_members (
    workspace_id  bigint NOT NULL,
    cohort        bigint NOT NULL,
    seq           bigint NOT NULL,
    entered_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, cohort, seq),
    FOREIGN KEY (workspace_id, cohort) REFERENCES cohorts (workspace_id, id) ON DELETE CASCADE,
    FOREIGN KEY (workspace_id, seq) REFERENCES users (workspace_id, seq)
);
CREATE INDEX cohort_members_user ON cohort_members (workspace_id, seq, cohort);
-- The append-only change sequence (entered / left) that triggers and the segment index read
-- by position; change_seq from the 'cohort_membership_changes' counter.
CREATE TABLE cohort_membership_changes (
    workspace_id  bigint NOT NULL,
    change_seq    bigint NOT NULL,
    cohort        bigint NOT NULL,
    seq           bigint NOT NULL,
    entered       boolean NOT NULL,
    at            bigint NOT NULL,
    PRIMARY KEY (workspace_id, change_seq)
);

-- Segments ------------------------------------------------------------------------------------

-- Filters in their wire JSON.
CREATE TABLE segments (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    id            text NOT NULL,
    name          text NOT NULL,
    filter        text NOT NULL,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX segments_workspace ON segments (workspace_id, created_at);
-- Changes to users that write no event (creation, identifiers), for the segment index's feed;
-- written by the store in the changing transaction (no triggers: Citus runs them only as
-- "unsafe"), change_seq from the 'segment_user_changes' counter.
CREATE TABLE segment_user_changes (
    workspace_id  bigint NOT NULL,
    change_seq    bigint NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (workspace_id, change_seq)
);

-- Currents ------------------------------------------------------------------------------------

-- A Current's position is the last resolved event_log.seq of its workspace. A node exports it
-- while it holds the lease (lease_owner until lease_until).
CREATE TABLE currents (
    workspace_id      bigint NOT NULL REFERENCES workspaces (id),
    id                bigint GENERATED BY DEFAULT AS IDENTITY,
    name              text NOT NULL,
    kind              text NOT NULL,
    spec              text NOT NULL,
    status            text NOT NULL,
    revision          bigint NOT NULL,
    position          bigint NOT NULL,
    delivered         bigint NOT NULL DEFAULT 0,
    retried           bigint NOT NULL DEFAULT 0,
    dead_lettered     bigint NOT NULL DEFAULT 0,
    dropped           bigint NOT NULL DEFAULT 0,
    skipped           bigint NOT NULL DEFAULT 0,
    failing_since     bigint,
    last_error_at     bigint,
    last_error_status integer,
    last_error        text,
    last_success_at   bigint,
    lease_owner       text,
    lease_until       bigint,
    created_at        bigint NOT NULL,
    updated_at        bigint NOT NULL,
    PRIMARY KEY (workspace_id, id)
);
-- "The workspace's log head was here at this time": retention, lag in seconds and replay
-- windows read it. Per workspace, since the log's seq is.
CREATE TABLE currents_log_clock (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    at            bigint NOT NULL,
    head          bigint NOT NULL,
    PRIMARY KEY (workspace_id, at)
);
CREATE INDEX currents_log_clock_head ON currents_log_clock (workspace_id, head);
CREATE TABLE currents_dead_letters (
    workspace_id     bigint NOT NULL,
    id               bigint GENERATED BY DEFAULT AS IDENTITY,
    current_id       bigint NOT NULL,
    event_seq        bigint NOT NULL,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    user_seq         bigint,
    body             text NOT NULL,
    reason           text NOT NULL,
    detail           text NOT NULL,
    response_status  integer,
    response_body    text,
    created_at       bigint NOT NULL,
    attempts         bigint NOT NULL DEFAULT 1,
    replay_pending   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, current_id, event_id),
    FOREIGN KEY (workspace_id, current_id) REFERENCES currents (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX currents_dead_letters_replay ON currents_dead_letters (workspace_id, current_id, replay_pending, id);
CREATE TABLE currents_replays (
    workspace_id  bigint NOT NULL,
    id            bigint GENERATED BY DEFAULT AS IDENTITY,
    current_id    bigint NOT NULL,
    from_seq      bigint NOT NULL,
    to_seq        bigint NOT NULL,
    cursor        bigint NOT NULL,
    created_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, id),
    FOREIGN KEY (workspace_id, current_id) REFERENCES currents (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX currents_replays_current ON currents_replays (workspace_id, current_id, id);
CREATE TABLE currents_drops (
    workspace_id  bigint NOT NULL,
    id            bigint GENERATED BY DEFAULT AS IDENTITY,
    current_id    bigint NOT NULL,
    from_seq      bigint NOT NULL,
    to_seq        bigint NOT NULL,
    count         bigint NOT NULL,
    at            bigint NOT NULL,
    PRIMARY KEY (workspace_id, id),
    FOREIGN KEY (workspace_id, current_id) REFERENCES currents (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX currents_drops_current ON currents_drops (workspace_id, current_id, id);
-- Test sends per Current, for their rate limit.
CREATE TABLE currents_test_sends (
    workspace_id  bigint NOT NULL,
    id            bigint GENERATED BY DEFAULT AS IDENTITY,
    current_id    bigint NOT NULL,
    at            bigint NOT NULL,
    count         bigint NOT NULL,
    PRIMARY KEY (workspace_id, id),
    FOREIGN KEY (workspace_id, current_id) REFERENCES currents (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX currents_test_sends_current ON currents_test_sends (workspace_id, current_id, at);
"#,
    // 2: messaging (`postgres/messaging.rs`): campaigns and dispatches, the durable send queue
    // (claimed with a lease, `FOR UPDATE SKIP LOCKED`), per-user campaign receipts (taken with a
    // conditional upsert) and conversions, send ids, each workspace's trigger cursor and
    // messaging settings, and the tracking-URL signing key (a reference table).
    r#"
CREATE TABLE campaigns (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    id            text NOT NULL,
    name          text NOT NULL,
    description   text NOT NULL,
    tags          text NOT NULL,
    status        text NOT NULL,
    definition    text NOT NULL,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    launched_at   bigint,
    next_run      bigint,
    first_sent    bigint,
    last_sent     bigint,
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX campaigns_created ON campaigns (workspace_id, created_at, id);
CREATE INDEX campaigns_active ON campaigns (workspace_id) WHERE status = 'active';
-- source 'campaign' names campaign_id; source 'adhoc' carries its definition.
CREATE TABLE dispatches (
    workspace_id     bigint NOT NULL REFERENCES workspaces (id),
    id               text NOT NULL,
    source           text NOT NULL CHECK (source IN ('campaign', 'adhoc')),
    campaign_id      text,
    definition       text,
    send_id          text,
    per_user_ids     boolean NOT NULL,
    properties       text,
    audience         text,
    created_at       bigint NOT NULL,
    expanding_after  bigint,
    not_before       bigint,
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX dispatches_campaign ON dispatches (workspace_id, campaign_id) WHERE campaign_id IS NOT NULL;
CREATE INDEX dispatches_expanding ON dispatches (workspace_id) WHERE expanding_after IS NOT NULL;
-- A send's id is its idempotency key: unique across the database (not in commit order).
CREATE TABLE sends (
    workspace_id  bigint NOT NULL,
    id            bigint GENERATED BY DEFAULT AS IDENTITY,
    dispatch_id   text NOT NULL,
    user_seq      bigint NOT NULL,
    variant       text NOT NULL,
    due_at        bigint NOT NULL,
    properties    text,
    state         text NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    lease_owner   text,
    lease_until   bigint,
    address       text,
    links         text,
    sent_at       bigint,
    PRIMARY KEY (workspace_id, id)
);
-- Claiming: pending sends in due order, of every workspace.
CREATE INDEX sends_due ON sends (due_at, id) WHERE state = 'pending';
-- When a claimed send's lease runs out (`next_due`).
CREATE INDEX sends_leased ON sends (lease_until) WHERE state = 'pending' AND lease_owner IS NOT NULL;
-- Frequency capping (`sends_since`).
CREATE INDEX sends_user ON sends (workspace_id, user_seq, sent_at) WHERE state = 'sent';
CREATE INDEX sends_dispatch ON sends (workspace_id, dispatch_id, state);
-- window_ms: the re-eligibility window the receipt was last taken with. The conditional upsert
-- compares the stored received_at with the new item's window, which reaches its WHERE only as
-- EXCLUDED.window_ms, i.e. through this column.
CREATE TABLE campaign_receipts (
    workspace_id  bigint NOT NULL,
    user_seq      bigint NOT NULL,
    campaign_id   text NOT NULL,
    received_at   bigint NOT NULL,
    window_ms     bigint,
    PRIMARY KEY (workspace_id, user_seq, campaign_id)
);
CREATE TABLE campaign_conversions (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    user_seq      bigint NOT NULL,
    idx           smallint NOT NULL,
    at            bigint NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, user_seq, idx)
);
CREATE TABLE campaign_send_ids (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    send_id       text NOT NULL,
    created_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, send_id)
);
CREATE INDEX campaign_send_ids_created ON campaign_send_ids (workspace_id, created_at);
-- Per workspace: the trigger engine's cursor (0, 0 until first moved) and the messaging
-- settings (NULL until saved). Its row is also what serialises a workspace's new send ids.
CREATE TABLE messaging_workspaces (
    workspace_id           bigint PRIMARY KEY REFERENCES workspaces (id),
    cursor_events          bigint NOT NULL DEFAULT 0,
    cursor_cohort_changes  bigint NOT NULL DEFAULT 0,
    settings               text
);
CREATE TABLE messaging_secrets (
    id            integer PRIMARY KEY CHECK (id = 1),
    key           bytea NOT NULL
);
"#,
    // 3: campaign stats (`postgres/messaging.rs`), counted in the trigger engine's enqueues: a
    // count per (campaign, stat), and the users already counted by the unique stats (unique
    // opens, unique clicks).
    r#"
CREATE TABLE campaign_stats (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    stat          text NOT NULL,
    count         bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (workspace_id, campaign_id, stat)
);
CREATE TABLE campaign_stat_users (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    stat          text NOT NULL,
    user_seq      bigint NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, stat, user_seq)
);
"#,
    // 4: segment-entry trigger trackers (`postgres/messaging.rs`): per (campaign, segment) the
    // segment feed position followed to and the members there (a serialized roaring bitmap).
    r#"
CREATE TABLE segment_trackers (
    workspace_id       bigint NOT NULL,
    campaign_id        text NOT NULL,
    segment_id         text NOT NULL,
    event_seq          bigint NOT NULL,
    cohort_change_seq  bigint NOT NULL,
    user_change_seq    bigint NOT NULL,
    members            bytea NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, segment_id)
);
"#,
    // 5: the dashboard (`postgres/dashboard.rs`): its users (argon2id hashes), sessions found
    // by the SHA-256 of their cookie token, and failed sign-ins per (username, address) key.
    // Reference tables: they belong to no workspace. And when each data import key was last
    // used (shown on the Heap page).
    r#"
CREATE TABLE dashboard_users (
    id             bigserial PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    role           text NOT NULL CHECK (role IN ('admin', 'read_only')),
    password_hash  text NOT NULL,
    created_at     bigint NOT NULL
);
CREATE TABLE dashboard_sessions (
    token_hash  bytea PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES dashboard_users (id),
    csrf        text NOT NULL,
    created_at  bigint NOT NULL,
    expires_at  bigint NOT NULL
);
CREATE INDEX dashboard_sessions_user ON dashboard_sessions (user_id);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
CREATE TABLE dashboard_sign_in_failures (
    id   bigserial PRIMARY KEY,
    key  text NOT NULL,
    at   bigint NOT NULL
);
CREATE INDEX dashboard_sign_in_failures_key ON dashboard_sign_in_failures (key, at);
ALTER TABLE import_keys ADD COLUMN last_used_at bigint;
"#,
    // 6: Canvas (`postgres/canvas.rs`): Canvases and their versions; journeys (each user's place
    // in a Canvas and its timer, claimed by `wake_at` with `FOR UPDATE SKIP LOCKED`); journey
    // inboxes; entry receipts; per-step counts; each workspace's Canvas cursor.
    r#"
CREATE TABLE canvases (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id),
    id            text NOT NULL,
    name          text NOT NULL,
    description   text NOT NULL,
    tags          text NOT NULL,
    status        text NOT NULL,
    version       integer NOT NULL,
    definition    text NOT NULL,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    launched_at   bigint,
    next_run      bigint,
    first_entry   bigint,
    last_entry    bigint,
    entries       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX canvases_created ON canvases (workspace_id, created_at, id);
CREATE TABLE canvas_versions (
    workspace_id  bigint NOT NULL,
    canvas_id     text NOT NULL,
    version       integer NOT NULL,
    definition    text NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, version)
);
CREATE TABLE canvas_journeys (
    workspace_id      bigint NOT NULL,
    canvas_id         text NOT NULL,
    user_seq          bigint NOT NULL,
    entry_id          text NOT NULL,
    version           integer NOT NULL,
    variant_id        text NOT NULL,
    step_id           text NOT NULL,
    entered_at        bigint NOT NULL,
    step_at           bigint NOT NULL,
    due_at            bigint NOT NULL,
    wake_at           bigint NOT NULL,
    converted         smallint NOT NULL,
    entry_properties  text,
    event_properties  text,
    lease_owner       text,
    lease_until       bigint,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
);
CREATE INDEX canvas_journeys_wake ON canvas_journeys (wake_at);
CREATE INDEX canvas_journeys_step ON canvas_journeys (workspace_id, canvas_id, step_id);
CREATE TABLE canvas_inbox (
    workspace_id  bigint NOT NULL,
    id            bigserial,
    canvas_id     text NOT NULL,
    user_seq      bigint NOT NULL,
    at            bigint NOT NULL,
    kind          text NOT NULL,
    name          text NOT NULL,
    properties    text NOT NULL,
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX canvas_inbox_journey ON canvas_inbox (workspace_id, canvas_id, user_seq, id);
CREATE TABLE canvas_receipts (
    workspace_id  bigint NOT NULL,
    canvas_id     text NOT NULL,
    user_seq      bigint NOT NULL,
    entered_at    bigint NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
);
CREATE TABLE canvas_step_stats (
    workspace_id  bigint NOT NULL,
    canvas_id     text NOT NULL,
    step_id       text NOT NULL,
    stat          text NOT NULL,
    count         bigint NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, step_id, stat)
);
CREATE TABLE canvas_cursors (
    workspace_id           bigint PRIMARY KEY,
    cursor_events          bigint NOT NULL,
    cursor_cohort_changes  bigint NOT NULL
);
"#,
    // 7: a user's recent messages for the dashboard's user lookup (`recent_sends`): their sends
    // in any state, newest first, read backwards from this index without a sort.
    r#"
CREATE INDEX sends_user_recent ON sends (workspace_id, user_seq, id);
"#,
    // 8: Canvas entry dispatches (`DispatchSource::Canvas`): `dispatches.source` admits 'canvas'.
    r#"
ALTER TABLE dispatches DROP CONSTRAINT dispatches_source_check;
ALTER TABLE dispatches ADD CONSTRAINT dispatches_source_check
    CHECK (source IN ('campaign', 'adhoc', 'canvas'));
"#,
    // 9: Canvas conversion watches (`postgres/canvas.rs`); `canvas_receipts.window_ms`.
    r#"
CREATE TABLE canvas_conversion_watches (
    workspace_id  bigint NOT NULL,
    canvas_id     text NOT NULL,
    user_seq      bigint NOT NULL,
    entry_id      text NOT NULL,
    version       integer NOT NULL,
    variant_id    text NOT NULL,
    step_id       text NOT NULL,
    entered_at    bigint NOT NULL,
    converted     smallint NOT NULL,
    until         bigint NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
);
CREATE INDEX canvas_conversion_watches_until ON canvas_conversion_watches (workspace_id, until);
-- Canvas entry receipts carry their re-entry window as campaign receipts do, so both are
-- taken by one statement (`messaging::take_receipt_rows`).
ALTER TABLE canvas_receipts ADD COLUMN window_ms bigint;
"#,
    // 10: no statistics on `workspace_id` in the users context's tables. Each workspace is a
    // most-common value with its share; a workspace created after the last ANALYZE has none,
    // so the planner expects ~0 rows for it, every index led by `workspace_id` costs the same,
    // and it took `users_workspace_id_braze_id_key` for a look-up by seq, reading the whole
    // workspace per key (measured: 50–490 µs a key on 50 k users, quadratic in the workspace).
    // Without statistics `workspace_id = $1` has the default selectivity (0.5 %), so a full
    // unique key is always the cheaper probe (`tests/it/plans.rs`). Queries by workspace alone
    // then read through an index rather than a sequential scan, which is what one workspace
    // among many wants.
    r#"
ALTER TABLE users ALTER COLUMN workspace_id SET STATISTICS 0;
ALTER TABLE user_aliases ALTER COLUMN workspace_id SET STATISTICS 0;
ALTER TABLE user_devices ALTER COLUMN workspace_id SET STATISTICS 0;
ALTER TABLE deprecated_external_ids ALTER COLUMN workspace_id SET STATISTICS 0;
ALTER TABLE cohort_members ALTER COLUMN workspace_id SET STATISTICS 0;
"#,
    // 11: room on each `users` page for the next version of its rows. Every track request
    // rewrites the profiles it touches (`ON CONFLICT … DO UPDATE`); with full pages the new
    // version goes to another page and each of the five indexes gets an entry for it. With
    // 20 % free, most updates stay on their page and change no indexed column, so they are
    // HOT: no index entry, less WAL. Pages written from now on get it.
    r#"
ALTER TABLE users SET (fillfactor = 80);
"#,
    // 12: Heap is enabled for a workspace once it has a webhook secret (as once it has a data
    // import key), until disabled; the segment-sync webhook now refuses a disabled workspace.
    // Workspaces whose secret was made before this get the row they would have got.
    r#"
INSERT INTO workspace_partners (workspace_id, partner, enabled)
SELECT workspace_id, 'heap', true FROM heap_webhooks
ON CONFLICT (workspace_id, partner) DO NOTHING;
"#,
    // 13: send-id series (`GET /sends/data_series`, `postgres/messaging.rs`), counted like the
    // campaign stats in the trigger engine's enqueues: a count per (campaign, send id, UTC day,
    // channel, variation, stat) — channel and variation '' for the day's totals — and the
    // users already counted by the unique figures.
    r#"
CREATE TABLE send_stats (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    send_id       text NOT NULL,
    day           bigint NOT NULL,
    channel       text NOT NULL,
    variation     text NOT NULL,
    stat          text NOT NULL,
    count         bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (workspace_id, campaign_id, send_id, day, channel, variation, stat)
);
CREATE TABLE send_stat_users (
    workspace_id  bigint NOT NULL,
    campaign_id   text NOT NULL,
    send_id       text NOT NULL,
    day           bigint NOT NULL,
    channel       text NOT NULL,
    variation     text NOT NULL,
    stat          text NOT NULL,
    user_seq      bigint NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, send_id, day, channel, variation, stat, user_seq)
);
"#,
];

/// The schema version this code writes: the number of migrations.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// What one [`migrate`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOutcome {
    /// The version found (0 on an empty database).
    pub from: i32,
    /// The version left ([`SCHEMA_VERSION`]).
    pub to: i32,
}

/// Brings the schema up to date in one transaction. The transaction first takes
/// `pg_advisory_xact_lock(MIGRATION_LOCK)`, so when several nodes start at once one migrates
/// and the others wait, then read its version and do nothing. A database newer than this code
/// (a node not yet upgraded) is `Corrupt`: running old code on a newer schema is not safe.
pub async fn migrate(pool: &PgPool) -> Result<MigrateOutcome, StoreError> {
    let mut client = pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     integer PRIMARY KEY,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg_err)?;
    let from: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    if from > SCHEMA_VERSION {
        return Err(StoreError::Invalid(format!(
            "the database schema is version {from}, newer than this build's {SCHEMA_VERSION}: \
             run the Tideway release that wrote it (or a later one)"
        )));
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(from as usize) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg_err)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(MigrateOutcome {
        from,
        to: SCHEMA_VERSION,
    })
}
