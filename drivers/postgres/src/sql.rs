//! Every statement the driver runs, rendered once per schema and prefix (the shared tables) and
//! once per table set.
//!
//! All statements work on PostgreSQL 12 and later.

use crate::schema::{Names, SetNames};

/// The statements of one table set: those of every call that names a hub, and the parts of
/// node-wide calls that touch the set.
#[derive(Debug)]
pub(crate) struct Sql {
    /// Allocates offsets under the stream row's lock, inserts the records, and notifies, in one
    /// statement (one round trip, one implicit transaction). No row: the stream does not exist.
    pub(crate) append: String,
    pub(crate) create_stream: String,
    pub(crate) tail: String,
    pub(crate) read: String,
    pub(crate) trim_streams: String,
    /// Names the set's trim lock in [`LOCK_TRIMS`] and [`UNLOCK_TRIMS`].
    pub(crate) trim_key: String,
    pub(crate) trim_lock: String,
    /// The first entry young enough to keep, at or above `$3`. It walks the primary key from
    /// there and stops at the first young entry, so its cost follows the entries removed.
    pub(crate) trim_oldest_young: String,
    pub(crate) trim_set_first: String,
    /// The stream's lowest entry still stored: below `first_offset` when a trim is deleting.
    pub(crate) trim_lowest: String,
    /// Deletes the entries from `$2` up to (not including) `$3`: one bounded batch.
    pub(crate) trim_delete: String,
    pub(crate) add_connection: String,
    pub(crate) open_session: String,
    pub(crate) remove_connection: String,
    pub(crate) connection: String,
    pub(crate) user_connections: String,
    pub(crate) online_users: String,
    pub(crate) user_session: String,
    pub(crate) add_member: String,
    pub(crate) remove_member: String,
    pub(crate) group_members: String,
    pub(crate) connection_groups: String,
    pub(crate) enqueue: String,
    pub(crate) pending: String,
    pub(crate) durable_message: String,
    pub(crate) acknowledge: String,
    pub(crate) record_attempt: String,
    pub(crate) attempts: String,
    pub(crate) purge_expired: String,
    pub(crate) pending_count: String,
    /// With tables per hub: marks the sessions of node `$1`'s users active.
    pub(crate) touch_sessions: String,
    /// With tables per hub: removes the connections of the nodes in `$1` (a text array), their
    /// memberships, and closes the sessions they leave empty.
    pub(crate) remove_node_connections: String,
}

/// Waits for the session-level lock that one trim of a table set holds at a time (`$1`: the
/// set's [`Sql::trim_key`]). Appends and reads never take it.
pub(crate) const LOCK_TRIMS: &str = "SELECT pg_advisory_lock(hashtextextended($1, 0))";
/// Releases the lock [`LOCK_TRIMS`] took.
pub(crate) const UNLOCK_TRIMS: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

/// The statements on the nodes table. By default the node-wide ones also clean up the table set
/// every hub shares, in the same statement; with tables per hub they touch the nodes table only,
/// and the driver runs the set's part for each hub.
#[derive(Debug)]
pub(crate) struct NodeSql {
    pub(crate) register_node: String,
    /// Returns one row, the count of nodes updated (0 or 1).
    pub(crate) heartbeat: String,
    pub(crate) unregister_node: String,
    /// Returns the ids of the nodes removed.
    pub(crate) reap_nodes: String,
    pub(crate) live_nodes: String,
}

/// Common table expressions that remove the connections matching `condition` (on `c`), their
/// memberships (by foreign-key cascade), and close the sessions they leave without connections.
/// The removed rows are in `gone`.
fn remove_connections(n: &SetNames, condition: &str) -> String {
    format!(
        "gone AS (
             DELETE FROM {c} c WHERE {condition}
             RETURNING c.hub, c.id, c.user_id, c.node, c.connected_at
         ), counts AS (
             SELECT hub, user_id, count(*)::int AS n FROM gone WHERE user_id IS NOT NULL
             GROUP BY hub, user_id
         ), sessions AS (
             UPDATE {s} s
             SET connections = greatest(s.connections - counts.n, 0),
                 last_activity = now(),
                 ended_at = CASE WHEN s.connections - counts.n <= 0 THEN now() ELSE s.ended_at END
             FROM counts WHERE s.hub = counts.hub AND s.user_id = counts.user_id
         )",
        c = n.connections,
        s = n.sessions,
    )
}

/// Common table expressions that find the nodes with connections in set `n` but no row in
/// `nodes` (in `orphaned`): a connection whose insert committed while its node was reaped.
/// A loose index scan of `connections (node)` walks one entry per node, so the cost follows
/// the number of nodes, not of connections. Needs `WITH RECURSIVE`.
fn orphaned_nodes(n: &SetNames, nodes: &str) -> String {
    format!(
        "present (node) AS (
             (SELECT node FROM {c} ORDER BY node LIMIT 1)
             UNION ALL
             SELECT (SELECT c.node FROM {c} c WHERE c.node > p.node ORDER BY c.node LIMIT 1)
             FROM present p WHERE p.node IS NOT NULL
         ), orphaned AS (
             SELECT p.node FROM present p
             WHERE p.node IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM {nodes} n WHERE n.id = p.node)
         )",
        c = n.connections,
    )
}

/// With tables per hub: removes the connections in set `n` of every node without a row in
/// `nodes`, their memberships, and closes the sessions they leave empty; returns their count.
pub(crate) fn remove_orphaned_connections(nodes: &str, n: &SetNames) -> String {
    format!(
        "WITH RECURSIVE {orphaned}, {remove}
         SELECT count(*) FROM gone",
        orphaned = orphaned_nodes(n, nodes),
        remove = remove_connections(n, "c.node IN (SELECT node FROM orphaned)")
    )
}

impl NodeSql {
    /// `set`: the table set every hub shares, by default; `None` with tables per hub.
    pub(crate) fn new(names: &Names, set: Option<&SetNames>) -> Self {
        let nodes = &names.nodes;
        let Some(n) = set else {
            return Self {
                register_node: register_node(nodes),
                heartbeat: format!(
                    "WITH beat AS (
                         UPDATE {nodes} SET last_heartbeat = now() WHERE id = $1 RETURNING id
                     )
                     SELECT count(*) FROM beat"
                ),
                unregister_node: format!(
                    "WITH dead AS (DELETE FROM {nodes} WHERE id = $1 RETURNING id)
                     SELECT count(*) FROM dead"
                ),
                reap_nodes: format!(
                    "WITH dead AS (
                         DELETE FROM {nodes}
                         WHERE last_heartbeat < now() - make_interval(secs => $1)
                         RETURNING id
                     )
                     SELECT id FROM dead ORDER BY id"
                ),
                live_nodes: live_nodes(nodes),
            };
        };
        Self {
            register_node: register_node(nodes),
            heartbeat: format!(
                "WITH beat AS (
                     UPDATE {nodes} SET last_heartbeat = now() WHERE id = $1 RETURNING id
                 ), touched AS (
                     UPDATE {s} s SET last_activity = now()
                     FROM (SELECT DISTINCT hub, user_id FROM {c}
                           WHERE node = $1 AND user_id IS NOT NULL) u
                     WHERE s.hub = u.hub AND s.user_id = u.user_id
                       AND EXISTS (SELECT 1 FROM beat)
                 )
                 SELECT count(*) FROM beat",
                s = n.sessions,
                c = n.connections
            ),
            unregister_node: format!(
                "WITH dead AS (DELETE FROM {nodes} WHERE id = $1 RETURNING id), {remove}
                 SELECT count(*) FROM dead",
                remove = remove_connections(n, "c.node = $1")
            ),
            // `orphaned` reads the nodes table as the statement found it, dead nodes included;
            // their connections go by `dead`.
            reap_nodes: format!(
                "WITH RECURSIVE dead AS (
                     DELETE FROM {nodes}
                     WHERE last_heartbeat < now() - make_interval(secs => $1)
                     RETURNING id
                 ), {orphaned}, {remove}
                 SELECT id FROM dead ORDER BY id",
                orphaned = orphaned_nodes(n, nodes),
                remove = remove_connections(
                    n,
                    "c.node IN (SELECT id FROM dead) OR c.node IN (SELECT node FROM orphaned)"
                )
            ),
            live_nodes: live_nodes(nodes),
        }
    }
}

fn register_node(nodes: &str) -> String {
    format!(
        "INSERT INTO {nodes} (id, address) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET last_heartbeat = now(), address = EXCLUDED.address"
    )
}

fn live_nodes(nodes: &str) -> String {
    format!("SELECT id, started_at, last_heartbeat, address FROM {nodes} ORDER BY id")
}

impl Sql {
    pub(crate) fn new(n: &SetNames) -> Self {
        Self {
            append: format!(
                "WITH a AS (
                     UPDATE {streams} SET next_offset = next_offset + $3
                     WHERE hub = $1 AND stream = $2
                     RETURNING id, next_offset - $3 AS base, epoch
                 ), i AS (
                     INSERT INTO {log} (stream_id, \"offset\", data)
                     SELECT a.id, a.base + t.i - 1, t.d
                     FROM a, unnest($4::bytea[]) WITH ORDINALITY AS t(d, i)
                 ), notified AS (
                     SELECT pg_notify($5, $6) FROM a
                 )
                 SELECT a.base, a.epoch FROM a, notified",
                streams = n.streams,
                log = n.log
            ),
            create_stream: format!(
                "INSERT INTO {} (hub, stream, epoch) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                n.streams
            ),
            tail: format!(
                "SELECT next_offset, epoch FROM {} WHERE hub = $1 AND stream = $2",
                n.streams
            ),
            read: format!(
                "SELECT s.first_offset, s.epoch, l.\"offset\", l.data, s.next_offset
                 FROM {streams} s
                 LEFT JOIN LATERAL (
                     SELECT \"offset\", data FROM {log}
                     WHERE stream_id = s.id AND \"offset\" >= $3
                     ORDER BY \"offset\" LIMIT $4
                 ) l ON true
                 WHERE s.hub = $1 AND s.stream = $2
                 ORDER BY l.\"offset\"",
                streams = n.streams,
                log = n.log
            ),
            trim_streams: format!("SELECT id FROM {}", n.streams),
            trim_key: format!("backplane trim {}", n.log),
            trim_lock: format!(
                "SELECT next_offset, first_offset FROM {} WHERE id = $1 FOR UPDATE",
                n.streams
            ),
            trim_oldest_young: format!(
                "SELECT (SELECT \"offset\" FROM {}
                         WHERE stream_id = $1 AND \"offset\" >= $3
                           AND created_at >= now() - make_interval(secs => $2)
                         ORDER BY \"offset\" LIMIT 1)",
                n.log
            ),
            trim_set_first: format!(
                "UPDATE {} SET first_offset = $2 WHERE id = $1",
                n.streams
            ),
            trim_lowest: format!(
                "SELECT min(\"offset\") FROM {} WHERE stream_id = $1",
                n.log
            ),
            trim_delete: format!(
                "DELETE FROM {} WHERE stream_id = $1 AND \"offset\" >= $2 AND \"offset\" < $3",
                n.log
            ),
            add_connection: format!(
                "INSERT INTO {} (hub, id, user_id, node) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING RETURNING connected_at",
                n.connections
            ),
            open_session: format!(
                "INSERT INTO {s} AS s (hub, user_id, started_at, connections, last_activity)
                 VALUES ($1, $2, now(), 1, now())
                 ON CONFLICT (hub, user_id) DO UPDATE SET
                     connections = s.connections + 1,
                     started_at = CASE WHEN s.connections = 0 THEN now() ELSE s.started_at END,
                     ended_at = CASE WHEN s.connections = 0 THEN NULL ELSE s.ended_at END,
                     last_activity = now()",
                s = n.sessions
            ),
            remove_connection: format!(
                "WITH {} SELECT hub, id, user_id, node, connected_at FROM gone",
                remove_connections(n, "c.hub = $1 AND c.id = $2 AND c.node = $3")
            ),
            connection: format!(
                "SELECT hub, id, user_id, node, connected_at FROM {} WHERE hub = $1 AND id = $2",
                n.connections
            ),
            user_connections: format!(
                "SELECT hub, id, user_id, node, connected_at FROM {}
                 WHERE hub = $1 AND user_id = $2 ORDER BY id",
                n.connections
            ),
            online_users: format!(
                "SELECT DISTINCT user_id FROM {} WHERE hub = $1 AND user_id IS NOT NULL
                 ORDER BY user_id",
                n.connections
            ),
            user_session: format!(
                "SELECT user_id, started_at, ended_at, connections, last_activity FROM {}
                 WHERE hub = $1 AND user_id = $2",
                n.sessions
            ),
            add_member: format!(
                "INSERT INTO {} (hub, group_name, connection) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                n.memberships
            ),
            remove_member: format!(
                "DELETE FROM {} WHERE hub = $1 AND group_name = $2 AND connection = $3",
                n.memberships
            ),
            group_members: format!(
                "SELECT connection FROM {} WHERE hub = $1 AND group_name = $2 ORDER BY connection",
                n.memberships
            ),
            connection_groups: format!(
                "SELECT group_name FROM {} WHERE hub = $1 AND connection = $2 ORDER BY group_name",
                n.memberships
            ),
            enqueue: format!(
                "INSERT INTO {} (hub, user_id, sender, payload, expires_at)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
                 RETURNING id",
                n.messages
            ),
            pending: format!(
                "SELECT id, hub, user_id, sender, payload, created_at, expires_at, acked_by, acked_at
                 FROM {} WHERE hub = $1 AND user_id = $2 AND acked_at IS NULL AND expires_at > now()
                 ORDER BY id",
                n.messages
            ),
            durable_message: format!(
                "SELECT id, hub, user_id, sender, payload, created_at, expires_at, acked_by, acked_at
                 FROM {} WHERE hub = $1 AND id = $2",
                n.messages
            ),
            acknowledge: format!(
                "UPDATE {} SET acked_by = $3, acked_at = now()
                 WHERE hub = $1 AND id = $2 AND acked_at IS NULL",
                n.messages
            ),
            record_attempt: format!(
                "INSERT INTO {a} (message_id, connection, error)
                 SELECT id, $3, $4 FROM {m} WHERE hub = $1 AND id = $2",
                a = n.attempts,
                m = n.messages
            ),
            attempts: format!(
                "SELECT a.connection, a.at, a.error FROM {a} a JOIN {m} m ON m.id = a.message_id
                 WHERE m.hub = $1 AND a.message_id = $2 ORDER BY a.id",
                a = n.attempts,
                m = n.messages
            ),
            purge_expired: format!("DELETE FROM {} WHERE expires_at <= now()", n.messages),
            pending_count: format!(
                "SELECT count(*) FROM {} WHERE acked_at IS NULL AND expires_at > now()",
                n.messages
            ),
            touch_sessions: format!(
                "UPDATE {s} s SET last_activity = now()
                 FROM (SELECT DISTINCT hub, user_id FROM {c}
                       WHERE node = $1 AND user_id IS NOT NULL) u
                 WHERE s.hub = u.hub AND s.user_id = u.user_id",
                s = n.sessions,
                c = n.connections
            ),
            remove_node_connections: format!(
                "WITH {} SELECT count(*) FROM gone",
                remove_connections(n, "c.node = ANY($1::text[])")
            ),
        }
    }
}
