//! Per-workspace commit sequences: the positions of the event log, cohort membership changes
//! and segment user changes, and users' dense `seq`.
//!
//! A consumer reads a log by position (`seq > position`). With a PostgreSQL sequence a writer
//! that took its value first can commit after one that took a larger value, so a reader that
//! already passed the larger one skips the late event for ever. Here a writer takes its range
//! from the workspace's counter row in `workspace_sequences`, as the last step of its
//! transaction: the row lock it takes is held until its commit, and the next writer's
//! `UPDATE` waits for that commit and then reads the new head (READ COMMITTED). So within a
//! workspace seqs are gap-free and their order is commit order; a reader that has seen seq `k`
//! has already been able to see every seq below it. Writers of other workspaces, and of other
//! logs of the same workspace, never wait for each other.

use tideway_core::ids::WorkspaceId;
use tideway_core::store::StoreError;

use super::pg_err;

/// One per-workspace counter (a row of `workspace_sequences`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// Users' `seq`, the segment index's row number. Reserved in blocks by a transaction of
    /// its own (`users.rs`, `SeqSource`), so creating users holds no counter lock: seqs are
    /// unique and never reused, but not gap-free, and not in commit order (nothing reads users
    /// by position).
    Users,
    /// `event_log.seq`, the Currents and segment feed position.
    EventLog,
    /// `cohort_membership_changes.change_seq`.
    CohortMembershipChanges,
    /// `segment_user_changes.change_seq`.
    SegmentUserChanges,
}

impl Sequence {
    /// The row's `name` (the schema's CHECK lists the same names).
    pub fn name(self) -> &'static str {
        match self {
            Sequence::Users => "users",
            Sequence::EventLog => "event_log",
            Sequence::CohortMembershipChanges => "cohort_membership_changes",
            Sequence::SegmentUserChanges => "segment_user_changes",
        }
    }
}

/// [`allocate`] as the `WITH` clause of a statement that then inserts the rows numbered from
/// it (one statement, one round trip): the counter `$name` (a [`Sequence::name`]) of
/// workspace `$1` moves on by `$2` (bigint, > 0) and `range.before` is the value before the
/// first taken, so the range is `range.before + 1 ..= range.before + $2`. The same row lock
/// as [`allocate`], held to the commit.
macro_rules! range_then {
    ($name:literal) => {
        concat!(
            "WITH range AS (INSERT INTO workspace_sequences AS s (workspace_id, name, head) ",
            "VALUES ($1, '",
            $name,
            "', $2::bigint) ON CONFLICT (workspace_id, name) DO UPDATE SET head = s.head + EXCLUDED.head ",
            "RETURNING s.head - $2::bigint AS before) "
        )
    };
}
pub(super) use range_then;

/// Takes the next `n` values of `sequence` in `workspace`: returns the first; the range is
/// `first..first + n`. Call it inside the writing transaction, after everything else it does
/// and right before inserting the rows and committing, since the counter row stays locked
/// until the transaction ends. The first call for a (workspace, sequence) creates its row; two
/// first calls at once are serialised by the primary key (the second waits, then updates).
/// `n == 0` takes nothing and locks nothing.
pub async fn allocate(
    tx: &tokio_postgres::Transaction<'_>,
    workspace: WorkspaceId,
    sequence: Sequence,
    n: u32,
) -> Result<i64, StoreError> {
    let n = i64::from(n);
    if n == 0 {
        let head: Option<i64> = tx
            .query_opt(
                "SELECT head FROM workspace_sequences WHERE workspace_id = $1 AND name = $2",
                &[&workspace.0, &sequence.name()],
            )
            .await
            .map_err(pg_err)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(pg_err)?;
        return Ok(head.unwrap_or(0) + 1);
    }
    advance(tx, workspace, sequence, n).await
}

/// Takes the next `n` (> 0) values of `sequence` in a transaction of their own (autocommit on
/// `client`): for a counter whose values need not be in commit order (users' seqs, reserved in
/// blocks), so the row lock lasts one statement. Returns the first.
pub async fn reserve(
    client: &tokio_postgres::Client,
    workspace: WorkspaceId,
    sequence: Sequence,
    n: u32,
) -> Result<i64, StoreError> {
    advance(client, workspace, sequence, i64::from(n.max(1))).await
}

/// Moves the counter on by `n` and returns the first value taken.
async fn advance<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    workspace: WorkspaceId,
    sequence: Sequence,
    n: i64,
) -> Result<i64, StoreError> {
    let head: i64 = client
        .query_one(
            "INSERT INTO workspace_sequences AS s (workspace_id, name, head) VALUES ($1, $2, $3)
             ON CONFLICT (workspace_id, name) DO UPDATE SET head = s.head + EXCLUDED.head
             RETURNING head",
            &[&workspace.0, &sequence.name(), &n],
        )
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    Ok(head - n + 1)
}
