//! The SQLite schema and its migrations, applied in order and tracked in `PRAGMA user_version`.
//!
//! Users get a dense per-workspace `seq` (segment bitmaps index it) beside the global rowid.
//! Deleted users stay as tombstones (`deleted_at` set, identifiers and profile erased) so a
//! `seq` is never reused. The event log is append-only; its rowid is the commit-ordered position
//! Currents consumers read from.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE workspaces (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    app_group_id  TEXT NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    hash          BLOB NOT NULL UNIQUE,
    permissions   TEXT NOT NULL,
    allow_ips     TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    braze_id      TEXT NOT NULL,
    external_id   TEXT,
    email         TEXT,
    phone         TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    deleted_at    INTEGER,
    profile       TEXT NOT NULL,
    UNIQUE (workspace_id, seq)
);
CREATE UNIQUE INDEX users_braze_id ON users(workspace_id, braze_id);
CREATE UNIQUE INDEX users_external_id ON users(workspace_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX users_email ON users(workspace_id, email) WHERE email IS NOT NULL;
CREATE INDEX users_phone ON users(workspace_id, phone) WHERE phone IS NOT NULL;
CREATE TABLE user_aliases (
    workspace_id  INTEGER NOT NULL,
    label         TEXT NOT NULL,
    name          TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, label, name)
) WITHOUT ROWID;
CREATE INDEX user_aliases_seq ON user_aliases(workspace_id, seq);
CREATE TABLE user_devices (
    workspace_id  INTEGER NOT NULL,
    device_id     TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, device_id)
) WITHOUT ROWID;
CREATE INDEX user_devices_seq ON user_devices(workspace_id, seq);
CREATE TABLE deprecated_external_ids (
    workspace_id  INTEGER NOT NULL,
    external_id   TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, external_id)
) WITHOUT ROWID;
CREATE TABLE event_log (
    seq           INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    user_seq      INTEGER,
    event_id      TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    time          INTEGER NOT NULL,
    body          TEXT NOT NULL
);
CREATE INDEX event_log_workspace ON event_log(workspace_id, seq);
"#,
    // 2: partner cohort import. `cohort_members` holds current membership with its entry
    // time; `cohort_membership_changes` is the append-only change sequence (entered / left,
    // with time) that triggers and the segment index consume.
    r#"
CREATE TABLE partner_api_keys (
    partner       TEXT PRIMARY KEY,
    secret        TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE TABLE import_keys (
    id              INTEGER PRIMARY KEY,
    workspace_id    INTEGER NOT NULL REFERENCES workspaces(id),
    partner         TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    hash            BLOB NOT NULL UNIQUE,
    created_at      INTEGER NOT NULL,
    invalidated_at  INTEGER
);
CREATE TABLE workspace_partners (
    workspace_id  INTEGER NOT NULL,
    partner       TEXT NOT NULL,
    enabled       INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, partner)
) WITHOUT ROWID;
CREATE TABLE heap_webhooks (
    workspace_id  INTEGER PRIMARY KEY,
    secret        TEXT NOT NULL,
    alias_label   TEXT
);
CREATE TABLE heap_sync_pages (
    workspace_id  INTEGER NOT NULL,
    sync_task_id  TEXT NOT NULL,
    page_number   INTEGER NOT NULL,
    applied_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, sync_task_id, page_number)
) WITHOUT ROWID;
CREATE TABLE cohorts (
    id            INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    partner       TEXT NOT NULL,
    cohort_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    member_count  INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (workspace_id, partner, cohort_id)
);
CREATE TABLE cohort_members (
    cohort        INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    entered_at    INTEGER NOT NULL,
    PRIMARY KEY (cohort, seq)
) WITHOUT ROWID;
CREATE INDEX cohort_members_user ON cohort_members(seq, cohort);
CREATE TABLE cohort_membership_changes (
    change_seq    INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    cohort        INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    entered       INTEGER NOT NULL,
    at            INTEGER NOT NULL
);
CREATE INDEX cohort_membership_changes_workspace ON cohort_membership_changes(workspace_id, change_seq);
"#,
    // 3: Currents connectors. A Current's position is the last resolved `event_log.seq`;
    // `currents_log_clock` samples "the log head was here at this time" (retention, lag in
    // seconds and replay windows read it); dead letters, replay windows, retention drops and
    // test sends are per Current.
    r#"
CREATE TABLE currents (
    id               INTEGER PRIMARY KEY,
    workspace_id     INTEGER NOT NULL,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    spec             TEXT NOT NULL,
    status           TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    position         INTEGER NOT NULL,
    delivered        INTEGER NOT NULL DEFAULT 0,
    retried          INTEGER NOT NULL DEFAULT 0,
    dead_lettered    INTEGER NOT NULL DEFAULT 0,
    dropped          INTEGER NOT NULL DEFAULT 0,
    skipped          INTEGER NOT NULL DEFAULT 0,
    failing_since    INTEGER,
    last_error_at    INTEGER,
    last_error_status INTEGER,
    last_error       TEXT,
    last_success_at  INTEGER,
    lease_owner      TEXT,
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX currents_workspace ON currents(workspace_id, id);
CREATE TABLE currents_log_clock (
    at            INTEGER PRIMARY KEY,
    head          INTEGER NOT NULL
);
CREATE INDEX currents_log_clock_head ON currents_log_clock(head);
CREATE TABLE currents_dead_letters (
    id               INTEGER PRIMARY KEY,
    current_id       INTEGER NOT NULL,
    event_seq        INTEGER NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    user_seq         INTEGER,
    body             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    detail           TEXT NOT NULL,
    response_status  INTEGER,
    response_body    TEXT,
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 1,
    replay_pending   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (current_id, event_id)
);
CREATE INDEX currents_dead_letters_replay ON currents_dead_letters(current_id, replay_pending, id);
CREATE TABLE currents_replays (
    id            INTEGER PRIMARY KEY,
    current_id    INTEGER NOT NULL,
    from_seq      INTEGER NOT NULL,
    to_seq        INTEGER NOT NULL,
    cursor        INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX currents_replays_current ON currents_replays(current_id, id);
CREATE TABLE currents_drops (
    id            INTEGER PRIMARY KEY,
    current_id    INTEGER NOT NULL,
    from_seq      INTEGER NOT NULL,
    to_seq        INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    at            INTEGER NOT NULL
);
CREATE INDEX currents_drops_current ON currents_drops(current_id, id);
CREATE TABLE currents_test_sends (
    current_id    INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    count         INTEGER NOT NULL
);
CREATE INDEX currents_test_sends_current ON currents_test_sends(current_id, at);
"#,
    // 4: segments (filters in their wire JSON), per-user event reads and the user-change feed
    // for the segment index.
    r#"
CREATE TABLE segments (
    id            TEXT PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    name          TEXT NOT NULL,
    filter        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX segments_workspace ON segments(workspace_id, created_at);
CREATE INDEX event_log_user_behaviors ON event_log(workspace_id, user_seq)
    WHERE event_type IN ('users.behaviors.CustomEvent', 'users.behaviors.Purchase');
-- Changes to users that write no event: creation, and identifiers (identify, rename,
-- remove, email/phone). The segment index's change feed reads it with event_log and
-- cohort_membership_changes.
CREATE TABLE segment_user_changes (
    change_seq    INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    seq           INTEGER NOT NULL
);
CREATE INDEX segment_user_changes_workspace ON segment_user_changes(workspace_id, change_seq);
CREATE TRIGGER segment_user_created AFTER INSERT ON users
BEGIN
    INSERT INTO segment_user_changes (workspace_id, seq) VALUES (NEW.workspace_id, NEW.seq);
END;
CREATE TRIGGER segment_user_identifiers AFTER UPDATE OF external_id, email, phone ON users
    WHEN OLD.external_id IS NOT NEW.external_id OR OLD.email IS NOT NEW.email OR OLD.phone IS NOT NEW.phone
BEGIN
    INSERT INTO segment_user_changes (workspace_id, seq) VALUES (NEW.workspace_id, NEW.seq);
END;
"#,
    // 5: merges, so per-user history kept in the event log (custom events, purchases) follows
    // a merged-away user into the survivor.
    r#"
CREATE TABLE user_merges (
    workspace_id  INTEGER NOT NULL,
    from_seq      INTEGER NOT NULL,
    into_seq      INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, from_seq)
) WITHOUT ROWID;
CREATE INDEX user_merges_into ON user_merges(workspace_id, into_seq);
"#,
    // 6: profile writes behind a log. A saved profile is appended to `user_log` (its whole
    // post-image; one row holds a job's) in the transaction that acknowledges it, and written to its `users` row
    // later, in seq order, by the writer's sweep; `user_log` rows are deleted once a finished
    // sweep has superseded them, and replayed into `users` when the store opens. The per-user
    // index of custom events and purchases moves off `event_log` (a random insert per event on
    // the ingest path) into `user_behaviors`, filled behind the log in sorted batches;
    // `store_marks.behaviors_indexed_upto` says how far.
    r#"
-- One row per job: its users' post-images, encoded by `sqlite/users.rs` (`LogEntry`).
CREATE TABLE user_log (
    id            INTEGER PRIMARY KEY,
    entries       BLOB NOT NULL
);
CREATE TABLE user_behaviors (
    workspace_id  INTEGER NOT NULL,
    user_seq      INTEGER NOT NULL,
    log_seq       INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, user_seq, log_seq)
) WITHOUT ROWID;
INSERT INTO user_behaviors (workspace_id, user_seq, log_seq)
    SELECT workspace_id, user_seq, seq FROM event_log
    WHERE user_seq IS NOT NULL AND event_type IN ('users.behaviors.CustomEvent', 'users.behaviors.Purchase');
DROP INDEX event_log_user_behaviors;
CREATE TABLE store_marks (
    name          TEXT PRIMARY KEY,
    value         INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO store_marks (name, value)
    VALUES ('behaviors_indexed_upto', (SELECT COALESCE(MAX(seq), 0) FROM event_log));
"#,
    // 7: messaging (`sqlite/messaging.rs`). Campaigns and dispatches; the durable send queue
    // (a send is `pending` until settled `sent` or `failed`, claimed with a lease); per-user
    // campaign receipts and conversions; send ids; each workspace's trigger cursor and
    // messaging settings; the tracking-URL signing key.
    r#"
CREATE TABLE campaigns (
    workspace_id  INTEGER NOT NULL,
    id            TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    tags          TEXT NOT NULL,
    status        TEXT NOT NULL,
    definition    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    launched_at   INTEGER,
    next_run      INTEGER,
    first_sent    INTEGER,
    last_sent     INTEGER,
    PRIMARY KEY (workspace_id, id)
) WITHOUT ROWID;
CREATE INDEX campaigns_created ON campaigns(workspace_id, created_at, id);
CREATE INDEX campaigns_status ON campaigns(status);
-- source 'campaign' names campaign_id; source 'adhoc' carries its definition.
CREATE TABLE dispatches (
    workspace_id     INTEGER NOT NULL,
    id               TEXT NOT NULL,
    source           TEXT NOT NULL CHECK (source IN ('campaign', 'adhoc')),
    campaign_id      TEXT,
    definition       TEXT,
    send_id          TEXT,
    per_user_ids     INTEGER NOT NULL,
    properties       TEXT,
    audience         TEXT,
    created_at       INTEGER NOT NULL,
    expanding_after  INTEGER,
    not_before       INTEGER,
    PRIMARY KEY (workspace_id, id)
) WITHOUT ROWID;
CREATE INDEX dispatches_campaign ON dispatches(workspace_id, campaign_id) WHERE campaign_id IS NOT NULL;
CREATE INDEX dispatches_expanding ON dispatches(not_before) WHERE expanding_after IS NOT NULL;
CREATE TABLE sends (
    id            INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL,
    dispatch_id   TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    variant       TEXT NOT NULL,
    due_at        INTEGER NOT NULL,
    properties    TEXT,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_until   INTEGER,
    address       TEXT,
    links         TEXT,
    sent_at       INTEGER
);
-- Claiming: pending sends in due order.
CREATE INDEX sends_due ON sends(state, due_at);
-- When a claimed send's lease runs out (`next_due`).
CREATE INDEX sends_leased ON sends(lease_until) WHERE state = 'pending' AND lease_owner IS NOT NULL;
-- Frequency capping (`sends_since`).
CREATE INDEX sends_user ON sends(workspace_id, user_seq, sent_at) WHERE state = 'sent';
CREATE INDEX sends_dispatch ON sends(workspace_id, dispatch_id, state);
CREATE TABLE campaign_receipts (
    workspace_id  INTEGER NOT NULL,
    user_seq      INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    received_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, user_seq, campaign_id)
) WITHOUT ROWID;
CREATE TABLE campaign_conversions (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    idx           INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, user_seq, idx)
) WITHOUT ROWID;
CREATE TABLE campaign_send_ids (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    send_id       TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, send_id)
) WITHOUT ROWID;
CREATE INDEX campaign_send_ids_created ON campaign_send_ids(workspace_id, created_at);
-- Per workspace: the trigger engine's cursor (0, 0 until first moved) and the messaging
-- settings (NULL until saved).
CREATE TABLE messaging_workspaces (
    workspace_id           INTEGER PRIMARY KEY,
    cursor_events          INTEGER NOT NULL DEFAULT 0,
    cursor_cohort_changes  INTEGER NOT NULL DEFAULT 0,
    settings               TEXT
);
CREATE TABLE messaging_secrets (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    key           BLOB NOT NULL
);
"#,
    // 8: a send's id is its idempotency key, `Message-ID` and tracking-token subject, so it is
    // never reused: `AUTOINCREMENT` (a plain rowid gives the newest send's id again once that
    // send is deleted by a cancelled dispatch or a deleted campaign). SQLite cannot add it to a
    // table, so `sends` is rebuilt with its rows and indexes.
    r#"
CREATE TABLE sends_v8 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id  INTEGER NOT NULL,
    dispatch_id   TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    variant       TEXT NOT NULL,
    due_at        INTEGER NOT NULL,
    properties    TEXT,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_until   INTEGER,
    address       TEXT,
    links         TEXT,
    sent_at       INTEGER
);
INSERT INTO sends_v8 (id, workspace_id, dispatch_id, user_seq, variant, due_at, properties,
        state, attempts, lease_owner, lease_until, address, links, sent_at)
    SELECT id, workspace_id, dispatch_id, user_seq, variant, due_at, properties,
        state, attempts, lease_owner, lease_until, address, links, sent_at
    FROM sends;
DROP TABLE sends;
ALTER TABLE sends_v8 RENAME TO sends;
CREATE INDEX sends_due ON sends(state, due_at);
CREATE INDEX sends_leased ON sends(lease_until) WHERE state = 'pending' AND lease_owner IS NOT NULL;
CREATE INDEX sends_user ON sends(workspace_id, user_seq, sent_at) WHERE state = 'sent';
CREATE INDEX sends_dispatch ON sends(workspace_id, dispatch_id, state);
"#,
    // 9: campaign stats (`sqlite/messaging.rs`), counted in the trigger engine's enqueues: a
    // count per (campaign, stat), and the users already counted by the unique stats (unique
    // opens, unique clicks).
    r#"
CREATE TABLE campaign_stats (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    stat          TEXT NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, stat)
) WITHOUT ROWID;
CREATE TABLE campaign_stat_users (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    stat          TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, stat, user_seq)
) WITHOUT ROWID;
"#,
    // 10: segment-entry trigger trackers (`sqlite/messaging.rs`): per (campaign, segment) the
    // segment feed position followed to and the members there (a serialized roaring bitmap).
    r#"
CREATE TABLE segment_trackers (
    workspace_id        INTEGER NOT NULL,
    campaign_id         TEXT NOT NULL,
    segment_id          TEXT NOT NULL,
    event_seq           INTEGER NOT NULL,
    cohort_change_seq   INTEGER NOT NULL,
    user_change_seq     INTEGER NOT NULL,
    members             BLOB NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, segment_id)
) WITHOUT ROWID;
"#,
    // 11: the queue's index holds only pending sends (as on PostgreSQL): settling a send
    // deletes its entry instead of moving it, and claims and `next_due` read a small index
    // however many sends were ever made.
    r#"
DROP INDEX sends_due;
CREATE INDEX sends_due ON sends(due_at) WHERE state = 'pending';
"#,
    // 12: `sends` without its CHECK on `state`: with a CHECK on a column an UPDATE sets, SQLite
    // runs every UPDATE of the table through a temporary b-tree (no one-pass update), which
    // cost the writer about a third of its time at one UPDATE per claimed and settled send.
    // The three states are written only by `sqlite/messaging.rs` (PostgreSQL keeps its CHECK).
    r#"
CREATE TABLE sends_v12 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id  INTEGER NOT NULL,
    dispatch_id   TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    variant       TEXT NOT NULL,
    due_at        INTEGER NOT NULL,
    properties    TEXT,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_until   INTEGER,
    address       TEXT,
    links         TEXT,
    sent_at       INTEGER
);
INSERT INTO sends_v12 (id, workspace_id, dispatch_id, user_seq, variant, due_at, properties,
        state, attempts, lease_owner, lease_until, address, links, sent_at)
    SELECT id, workspace_id, dispatch_id, user_seq, variant, due_at, properties,
        state, attempts, lease_owner, lease_until, address, links, sent_at
    FROM sends;
-- The counter goes on from where it was (an id freed by a deleted newest send is not reused).
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'sends_v12', seq FROM sqlite_sequence WHERE name = 'sends'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'sends_v12');
UPDATE sqlite_sequence
    SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'sends'), 0))
    WHERE name = 'sends_v12';
DROP TABLE sends;
ALTER TABLE sends_v12 RENAME TO sends;
CREATE INDEX sends_due ON sends(due_at) WHERE state = 'pending';
CREATE INDEX sends_leased ON sends(lease_until) WHERE state = 'pending' AND lease_owner IS NOT NULL;
CREATE INDEX sends_user ON sends(workspace_id, user_seq, sent_at) WHERE state = 'sent';
CREATE INDEX sends_dispatch ON sends(workspace_id, dispatch_id, state);
"#,
    // 13: the dashboard (`sqlite/dashboard.rs`): its users (argon2id hashes), sessions found by
    // the SHA-256 of their cookie token, and failed sign-ins per (username, address) key; and
    // when each data import key was last used (shown on the Heap page).
    r#"
CREATE TABLE dashboard_users (
    id             INTEGER PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE TABLE dashboard_sessions (
    token_hash  BLOB PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES dashboard_users(id),
    csrf        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX dashboard_sessions_user ON dashboard_sessions(user_id);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions(expires_at);
CREATE TABLE dashboard_sign_in_failures (
    id   INTEGER PRIMARY KEY,
    key  TEXT NOT NULL,
    at   INTEGER NOT NULL
);
CREATE INDEX dashboard_sign_in_failures_key ON dashboard_sign_in_failures(key, at);
ALTER TABLE import_keys ADD COLUMN last_used_at INTEGER;
"#,
    // 14: Canvas (`sqlite/canvas.rs`): Canvases and their versions; journeys (each user's place in
    // a Canvas and its timer, claimed with a lease by `wake_at`); journey inboxes; entry
    // receipts; per-step counts; each workspace's Canvas cursor.
    r#"
CREATE TABLE canvases (
    workspace_id  INTEGER NOT NULL,
    id            TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    tags          TEXT NOT NULL,
    status        TEXT NOT NULL,
    version       INTEGER NOT NULL,
    definition    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    launched_at   INTEGER,
    next_run      INTEGER,
    first_entry   INTEGER,
    last_entry    INTEGER,
    entries       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, id)
) WITHOUT ROWID;
CREATE INDEX canvases_created ON canvases(workspace_id, created_at, id);
CREATE TABLE canvas_versions (
    workspace_id  INTEGER NOT NULL,
    canvas_id     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    definition    TEXT NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, version)
) WITHOUT ROWID;
CREATE TABLE canvas_journeys (
    workspace_id      INTEGER NOT NULL,
    canvas_id         TEXT NOT NULL,
    user_seq          INTEGER NOT NULL,
    entry_id          TEXT NOT NULL,
    version           INTEGER NOT NULL,
    variant_id        TEXT NOT NULL,
    step_id           TEXT NOT NULL,
    entered_at        INTEGER NOT NULL,
    step_at           INTEGER NOT NULL,
    due_at            INTEGER NOT NULL,
    wake_at           INTEGER NOT NULL,
    converted         INTEGER NOT NULL,
    entry_properties  TEXT,
    event_properties  TEXT,
    lease_owner       TEXT,
    lease_until       INTEGER,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
) WITHOUT ROWID;
CREATE INDEX canvas_journeys_wake ON canvas_journeys(wake_at);
CREATE INDEX canvas_journeys_step ON canvas_journeys(workspace_id, canvas_id, step_id);
CREATE TABLE canvas_inbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id  INTEGER NOT NULL,
    canvas_id     TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    properties    TEXT NOT NULL
);
CREATE INDEX canvas_inbox_journey ON canvas_inbox(workspace_id, canvas_id, user_seq, id);
CREATE TABLE canvas_receipts (
    workspace_id  INTEGER NOT NULL,
    canvas_id     TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    entered_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
) WITHOUT ROWID;
CREATE TABLE canvas_step_stats (
    workspace_id  INTEGER NOT NULL,
    canvas_id     TEXT NOT NULL,
    step_id       TEXT NOT NULL,
    stat          TEXT NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, step_id, stat)
) WITHOUT ROWID;
CREATE TABLE canvas_cursors (
    workspace_id           INTEGER PRIMARY KEY,
    cursor_events          INTEGER NOT NULL,
    cursor_cohort_changes  INTEGER NOT NULL
);
"#,
    // 15: a user's recent messages for the dashboard's user lookup (`recent_sends`): their sends
    // in any state, newest first. The rowid (`id`) ends every SQLite index, so (workspace_id,
    // user_seq) serves `ORDER BY id DESC LIMIT n` without a sort.
    r#"
CREATE INDEX sends_user_recent ON sends(workspace_id, user_seq);
"#,
    // 16: Canvas entry dispatches (`DispatchSource::Canvas`): `dispatches.source` admits
    // 'canvas' (SQLite cannot alter a CHECK: the table is rebuilt with its indexes).
    r#"
CREATE TABLE dispatches_new (
    workspace_id     INTEGER NOT NULL,
    id               TEXT NOT NULL,
    source           TEXT NOT NULL CHECK (source IN ('campaign', 'adhoc', 'canvas')),
    campaign_id      TEXT,
    definition       TEXT,
    send_id          TEXT,
    per_user_ids     INTEGER NOT NULL,
    properties       TEXT,
    audience         TEXT,
    created_at       INTEGER NOT NULL,
    expanding_after  INTEGER,
    not_before       INTEGER,
    PRIMARY KEY (workspace_id, id)
) WITHOUT ROWID;
INSERT INTO dispatches_new SELECT workspace_id, id, source, campaign_id, definition, send_id,
    per_user_ids, properties, audience, created_at, expanding_after, not_before FROM dispatches;
DROP TABLE dispatches;
ALTER TABLE dispatches_new RENAME TO dispatches;
CREATE INDEX dispatches_campaign ON dispatches(workspace_id, campaign_id) WHERE campaign_id IS NOT NULL;
CREATE INDEX dispatches_expanding ON dispatches(not_before) WHERE expanding_after IS NOT NULL;
"#,
    // 17: Canvas conversion watches: an ended journey's open conversion windows
    // (`sqlite/canvas.rs`), so a conversion after the user left still counts.
    r#"
CREATE TABLE canvas_conversion_watches (
    workspace_id  INTEGER NOT NULL,
    canvas_id     TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    entry_id      TEXT NOT NULL,
    version       INTEGER NOT NULL,
    variant_id    TEXT NOT NULL,
    step_id       TEXT NOT NULL,
    entered_at    INTEGER NOT NULL,
    converted     INTEGER NOT NULL,
    until         INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, canvas_id, user_seq)
) WITHOUT ROWID;
CREATE INDEX canvas_conversion_watches_until ON canvas_conversion_watches(workspace_id, until);
"#,
    // Heap is enabled for a workspace once it has a webhook secret (as once it has a data import
    // key), until disabled; the segment-sync webhook now refuses a disabled workspace. Workspaces
    // whose secret was made before this get the row they would have got.
    r#"
INSERT OR IGNORE INTO workspace_partners (workspace_id, partner, enabled)
SELECT workspace_id, 'heap', 1 FROM heap_webhooks;
"#,
    // 19: send-id series (`GET /sends/data_series`, `sqlite/messaging.rs`), counted like the
    // campaign stats in the trigger engine's enqueues: a count per (campaign, send id, UTC day,
    // channel, variation, stat) — channel and variation '' for the day's totals — and the
    // users already counted by the unique figures.
    r#"
CREATE TABLE send_stats (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    send_id       TEXT NOT NULL,
    day           INTEGER NOT NULL,
    channel       TEXT NOT NULL,
    variation     TEXT NOT NULL,
    stat          TEXT NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, send_id, day, channel, variation, stat)
) WITHOUT ROWID;
CREATE TABLE send_stat_users (
    workspace_id  INTEGER NOT NULL,
    campaign_id   TEXT NOT NULL,
    send_id       TEXT NOT NULL,
    day           INTEGER NOT NULL,
    channel       TEXT NOT NULL,
    variation     TEXT NOT NULL,
    stat          TEXT NOT NULL,
    user_seq      INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, campaign_id, send_id, day, channel, variation, stat, user_seq)
) WITHOUT ROWID;
"#,
    // A Current's id is never reused. A plain `INTEGER PRIMARY KEY` hands a deleted Current's
    // id to the next one, and consumers, leases and metrics keyed by id then took the new
    // Current for the old: its events went to the deleted one's endpoint, counted delivered.
    // `AUTOINCREMENT` never reuses an id from now on. Ids deleted before this migration left no
    // trace (deleting a Current removes every row that names it), so the sequence starts 1,000
    // above every id any table still names: the ids of up to 1,000 Currents deleted at the top
    // of the range before the upgrade are not reused either.
    r#"
CREATE TABLE currents_never_reused (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id     INTEGER NOT NULL,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    spec             TEXT NOT NULL,
    status           TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    position         INTEGER NOT NULL,
    delivered        INTEGER NOT NULL DEFAULT 0,
    retried          INTEGER NOT NULL DEFAULT 0,
    dead_lettered    INTEGER NOT NULL DEFAULT 0,
    dropped          INTEGER NOT NULL DEFAULT 0,
    skipped          INTEGER NOT NULL DEFAULT 0,
    failing_since    INTEGER,
    last_error_at    INTEGER,
    last_error_status INTEGER,
    last_error       TEXT,
    last_success_at  INTEGER,
    lease_owner      TEXT,
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
INSERT INTO currents_never_reused (id, workspace_id, name, kind, spec, status, revision, position, delivered, retried,
    dead_lettered, dropped, skipped, failing_since, last_error_at, last_error_status,
    last_error, last_success_at, lease_owner, lease_until, created_at, updated_at)
    SELECT id, workspace_id, name, kind, spec, status, revision, position, delivered, retried,
    dead_lettered, dropped, skipped, failing_since, last_error_at, last_error_status,
    last_error, last_success_at, lease_owner, lease_until, created_at, updated_at FROM currents;
DROP TABLE currents;
ALTER TABLE currents_never_reused RENAME TO currents;
CREATE INDEX currents_workspace ON currents(workspace_id, id);
DELETE FROM sqlite_sequence WHERE name = 'currents';
INSERT INTO sqlite_sequence (name, seq) SELECT 'currents', COALESCE(MAX(id), 0) + 1000 FROM (
    SELECT MAX(id) AS id FROM currents
    UNION ALL SELECT MAX(current_id) FROM currents_dead_letters
    UNION ALL SELECT MAX(current_id) FROM currents_replays
    UNION ALL SELECT MAX(current_id) FROM currents_drops
    UNION ALL SELECT MAX(current_id) FROM currents_test_sends
);
"#,
];

/// The migration that enables Heap for workspaces with a webhook secret (see its comment).
#[cfg(test)]
const HEAP_ENABLED_BY_SECRET: usize = 17;

/// The migration after which Current ids are never reused (see its comment).
#[cfg(test)]
const CURRENT_IDS_NEVER_REUSED: usize = 19;

/// The schema version this build writes (`PRAGMA user_version` after [`migrate`]).
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// The schema version of the database behind `conn` (0 for a new file).
pub fn version(conn: &Connection) -> rusqlite::Result<usize> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the schema up to date inside one transaction.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Heap migration gives a workspace whose Heap webhook secret was made before it the
    /// `workspace_partners` row a secret now makes (Heap enabled), and keeps an explicit
    /// disable.
    #[test]
    fn heap_webhook_secrets_made_before_enable_heap_unless_disabled() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (i, sql) in MIGRATIONS[..HEAP_ENABLED_BY_SECRET].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO workspaces (id, name, app_group_id, created_at) VALUES (1, 'a', 'g1', 0), (2, 'b', 'g2', 0);
             INSERT INTO heap_webhooks (workspace_id, secret) VALUES (1, 's1'), (2, 's2');
             INSERT INTO workspace_partners (workspace_id, partner, enabled) VALUES (2, 'heap', 0);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(i64, bool)> = conn
            .prepare("SELECT workspace_id, enabled FROM workspace_partners WHERE partner = 'heap' ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(1, true), (2, false)]);
    }

    /// Migrated Currents keep their rows and ids, and the next Current's id is 1,000 above
    /// every id any table still names (a deleted Current's included), so ids deleted before the
    /// upgrade, which no table names any more, are not reused either.
    #[test]
    fn current_ids_continue_above_every_id_ever_named() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (i, sql) in MIGRATIONS[..CURRENT_IDS_NEVER_REUSED].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO currents (id, workspace_id, name, kind, spec, status, revision, position, delivered, created_at, updated_at)
                 VALUES (1, 1, 'kept', 'custom_http', '{}', 'active', 3, 10, 7, 0, 0);
             INSERT INTO currents_test_sends (current_id, at, count) VALUES (5, 0, 1);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let kept: (i64, String, i64, i64) = conn
            .query_row(
                "SELECT id, name, revision, delivered FROM currents",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(kept, (1, "kept".to_owned(), 3, 7));
        conn.execute_batch(
            "INSERT INTO currents (workspace_id, name, kind, spec, status, revision, position, created_at, updated_at)
                 VALUES (1, 'new', 'custom_http', '{}', 'active', 1, 10, 0, 0);",
        )
        .unwrap();
        assert_eq!(conn.last_insert_rowid(), 1006);
    }
}
