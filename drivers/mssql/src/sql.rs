//! Every T-SQL statement the driver runs, in one place, rendered once per schema and prefix
//! (the shared tables) and once per table set. The migrations themselves are the `.sql` files
//! under `migrations/`.
//!
//! Unless a statement says otherwise it runs on SQL Server 2008 and later. The driver as a
//! whole needs SQL Server 2016 (13.x) or later, Azure SQL Database, Azure SQL Managed Instance
//! or Azure SQL Edge, for `DATEDIFF_BIG` (times are read as microseconds since 1970 so that no
//! date type crosses the wire).
//!
//! Parameters are `@P1`, `@P2`, … in the order the caller binds them. Statements that write more
//! than one row run in one batch that begins and commits its own transaction, under
//! `XACT_ABORT`, so an error rolls everything back and leaves no transaction open.

use crate::names::{Names, SetNames, quote_literal};

/// The binary collation of names: code point order, case-sensitive, locale-independent.
pub(crate) const COLLATION: &str = "Latin1_General_100_BIN2";

/// Session settings for every connection, sent as a plain batch so they last for the session
/// (SQL Server 2008+). These are the `SET` options SQL Server requires for indexes on computed
/// columns and filtered indexes (the ones ODBC and ADO.NET use); `XACT_ABORT` makes any error
/// roll back the whole transaction.
///
/// `LOCK_TIMEOUT` makes a statement waiting for a lock fail (error 1222, transient, rolling the
/// transaction back under `XACT_ABORT`) before the command timeout would cut it short: a
/// statement cut short by the client may still commit later, one that fails on the server
/// cannot.
pub(crate) fn session_settings(lock_timeout: std::time::Duration) -> String {
    format!(
        "SET ANSI_NULLS ON; SET ANSI_PADDING ON; SET ANSI_WARNINGS ON; \
         SET ARITHABORT ON; SET CONCAT_NULL_YIELDS_NULL ON; SET QUOTED_IDENTIFIER ON; \
         SET NUMERIC_ROUNDABORT OFF; SET XACT_ABORT ON; SET LOCK_TIMEOUT {};",
        millis(lock_timeout)
    )
}

/// `duration` in whole milliseconds, at least 1, at most `i32::MAX`.
pub(crate) fn millis(duration: std::time::Duration) -> i32 {
    i32::try_from(duration.as_millis())
        .unwrap_or(i32::MAX)
        .max(1)
}

/// A `datetime2` column as microseconds since 1970 (`DATEDIFF_BIG`: SQL Server 2016+).
fn micros(column: &str) -> String {
    format!("DATEDIFF_BIG(microsecond, CAST('19700101' AS datetime2(6)), {column})")
}

/// The current time minus a duration given as whole seconds in `secs` and milliseconds in
/// `millis` (both `int` parameters; `DATEADD` takes `int`).
fn ago(secs: &str, millis: &str) -> String {
    format!("DATEADD(millisecond, -{millis}, DATEADD(second, -{secs}, SYSUTCDATETIME()))")
}

/// The table variable that collects removed connections. Its text columns carry the tables'
/// collation: a table variable's default comes from `tempdb` and would not compare.
fn gone_table() -> String {
    format!(
        "DECLARE @gone TABLE (
             hub nvarchar(64) COLLATE {COLLATION}, id nvarchar(128) COLLATE {COLLATION},
             user_id varbinary(256), node nvarchar(64) COLLATE {COLLATION},
             connected_at datetime2(6));"
    )
}

/// Removes the connections of one set matching `condition` (on `c`) into `@gone` (memberships go by
/// foreign-key cascade), and closes the sessions they leave without connections.
fn remove_connections(n: &SetNames, condition: &str) -> String {
    format!(
        "DELETE FROM @gone;
         DELETE c
         OUTPUT deleted.hub, deleted.id, deleted.user_id, deleted.node, deleted.connected_at
         INTO @gone
         FROM {c} AS c
         WHERE {condition};
         UPDATE s SET
             connections = CASE WHEN s.connections - g.n > 0 THEN s.connections - g.n ELSE 0 END,
             last_activity = SYSUTCDATETIME(),
             ended_at = CASE WHEN s.connections - g.n <= 0 THEN SYSUTCDATETIME() ELSE s.ended_at END
         FROM (SELECT hub, user_id, COUNT(*) AS n FROM @gone WHERE user_id IS NOT NULL
               GROUP BY hub, user_id) AS g
         JOIN {s} AS s WITH (FORCESEEK)
           ON s.hub = g.hub AND s.user_id = g.user_id;",
        c = n.connections,
        s = n.sessions,
    )
}

/// Marks the sessions of node `@P1`'s users active. The users are read first (from row
/// versions: no locks), then their sessions are updated by key seeks, so the heartbeat locks
/// only those rows, as a connection's removal does (see the lock order on [`NodeSql`]).
fn touch_sessions(n: &SetNames) -> String {
    format!(
        "DELETE FROM @users;
         INSERT INTO @users (hub, user_id)
         SELECT DISTINCT c.hub, c.user_id FROM {c} AS c
         WHERE c.node = @P1 AND c.user_id IS NOT NULL;
         UPDATE s SET last_activity = SYSUTCDATETIME()
         FROM @users AS u
         JOIN {s} AS s WITH (FORCESEEK) ON s.hub = u.hub AND s.user_id = u.user_id;",
        s = n.sessions,
        c = n.connections
    )
}

/// The user list of [`touch_sessions`].
fn users_table() -> String {
    format!(
        "DECLARE @users TABLE (
             hub nvarchar(64) COLLATE {COLLATION}, user_id varbinary(256),
             PRIMARY KEY (hub, user_id));"
    )
}

/// The statements on the nodes table. Those that remove connections or touch sessions cover the
/// table sets they are given, in the same batch and transaction.
///
/// Lock order, the same in every statement so no two wait on each other in a cycle: the nodes
/// row (by its clustered key, before its index on `last_heartbeat`), then connections (and
/// their memberships, by cascade), then sessions, each by key seeks on rows picked beforehand
/// from row versions, never by a scan that locks rows it does not change.
#[derive(Debug)]
pub(crate) struct NodeSql {
    nodes: String,
    /// Inserts the node, or refreshes its heartbeat and address (`@P1` the id, `@P2` the
    /// address), under a key-range lock so two registrations of one id do not race.
    pub(crate) register_node: String,
    pub(crate) live_nodes: String,
}

impl NodeSql {
    pub(crate) fn new(names: &Names) -> Self {
        let nodes = &names.nodes;
        Self {
            register_node: format!(
                "SET XACT_ABORT ON;
                 BEGIN TRANSACTION;
                 UPDATE {nodes} WITH (UPDLOCK, SERIALIZABLE)
                 SET last_heartbeat = SYSUTCDATETIME(), address = @P2 WHERE id = @P1;
                 IF @@ROWCOUNT = 0 INSERT INTO {nodes} (id, address) VALUES (@P1, @P2);
                 COMMIT TRANSACTION;"
            ),
            live_nodes: format!(
                "SELECT id, {}, {}, address FROM {nodes} ORDER BY id",
                micros("started_at"),
                micros("last_heartbeat")
            ),
            nodes: nodes.clone(),
        }
    }

    /// Records node `@P1`'s heartbeat and touches its users' sessions in `sets`; returns one
    /// row, the count of nodes updated (0 or 1).
    pub(crate) fn heartbeat(&self, sets: &[&SetNames]) -> String {
        let touch: String = sets.iter().map(|n| touch_sessions(n)).collect();
        let touch = if touch.is_empty() {
            String::new()
        } else {
            format!("IF @n > 0\n BEGIN\n {touch}\n END")
        };
        format!(
            "SET XACT_ABORT ON;
             DECLARE @n int;
             {users}
             BEGIN TRANSACTION;
             UPDATE {nodes} SET last_heartbeat = SYSUTCDATETIME() WHERE id = @P1;
             SET @n = @@ROWCOUNT;
             {touch}
             COMMIT TRANSACTION;
             SELECT @n;",
            users = users_table(),
            nodes = self.nodes
        )
    }

    /// Removes node `@P1` and its connections (with their memberships) in `sets`, and closes
    /// the sessions left empty.
    pub(crate) fn unregister_node(&self, sets: &[&SetNames]) -> String {
        let remove: String = sets
            .iter()
            .map(|n| remove_connections(n, "node = @P1"))
            .collect();
        format!(
            "SET XACT_ABORT ON;
             {gone}
             BEGIN TRANSACTION;
             DELETE FROM {nodes} WHERE id = @P1;
             {remove}
             COMMIT TRANSACTION;",
            gone = gone_table(),
            nodes = self.nodes
        )
    }

    /// Removes every node whose last heartbeat is older than `@P1` seconds plus `@P2`
    /// milliseconds, with its connections in `sets`, and the connections of nodes that are not
    /// registered (an insert that raced with an earlier reap); returns the ids removed.
    pub(crate) fn reap_nodes(&self, sets: &[&SetNames]) -> String {
        // After the nodes' delete, the dead nodes' connections are orphaned too.
        let orphaned = format!(
            "NOT EXISTS (SELECT 1 FROM {} AS n WHERE n.id = c.node)",
            self.nodes
        );
        let remove: String = sets
            .iter()
            .map(|n| remove_connections(n, &orphaned))
            .collect();
        format!(
            "SET XACT_ABORT ON;
             DECLARE @dead TABLE (id nvarchar(64) COLLATE {COLLATION} PRIMARY KEY);
             DECLARE @silent TABLE (id nvarchar(64) COLLATE {COLLATION} PRIMARY KEY);
             {gone}
             INSERT INTO @silent (id) SELECT id FROM {nodes} WHERE last_heartbeat < {cutoff};
             BEGIN TRANSACTION;
             DELETE n OUTPUT deleted.id INTO @dead
             FROM @silent AS q
             JOIN {nodes} AS n WITH (FORCESEEK) ON n.id = q.id
             WHERE n.last_heartbeat < {cutoff};
             {remove}
             COMMIT TRANSACTION;
             SELECT id FROM @dead ORDER BY id;",
            gone = gone_table(),
            nodes = self.nodes,
            cutoff = ago("@P1", "@P2")
        )
    }
}

/// Records as an append sends them: two parameters whatever their count and sizes, so SQL
/// Server compiles one plan per statement (per `varbinary(8000)` or `varbinary(max)` of each)
/// instead of one per count and mix of sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packed {
    /// The records one after another.
    pub(crate) data: Vec<u8>,
    /// Where each record ends in `data`, in bytes from its start: 8 bytes each, big-endian, as
    /// `CAST(… AS bigint)` reads them.
    pub(crate) ends: Vec<u8>,
}

impl Packed {
    pub(crate) fn new(records: &[bytes::Bytes]) -> Self {
        let mut data = Vec::with_capacity(records.iter().map(bytes::Bytes::len).sum());
        let mut ends = Vec::with_capacity(records.len() * 8);
        for record in records {
            data.extend_from_slice(record);
            ends.extend_from_slice(&(data.len() as u64).to_be_bytes());
        }
        Self { data, ends }
    }
}

// The row generator of `packed_rows` covers the largest batch.
const _: () = assert!(crate::options::MAX_BATCH <= 1024);

/// The records of a [`Packed`] as rows `(i, start, length)`: `@P3` records, `@P4` the data,
/// `@P5` the ends; `start` counts from 1, as `SUBSTRING` does. Up to 1 024 records (five base-4
/// digits).
fn packed_rows() -> String {
    let digits = "(VALUES (0), (1), (2), (3))";
    format!(
        "(SELECT n.i,
                 CASE WHEN n.i = 0 THEN 0
                      ELSE CAST(SUBSTRING(@P5, 8 * n.i - 7, 8) AS bigint) END + 1 AS start,
                 CAST(SUBSTRING(@P5, 8 * n.i + 1, 8) AS bigint)
                 - CASE WHEN n.i = 0 THEN 0
                        ELSE CAST(SUBSTRING(@P5, 8 * n.i - 7, 8) AS bigint) END AS length
          FROM (SELECT d1.v * 256 + d2.v * 64 + d3.v * 16 + d4.v * 4 + d5.v AS i
                FROM {digits} AS d1 (v) CROSS JOIN {digits} AS d2 (v)
                CROSS JOIN {digits} AS d3 (v) CROSS JOIN {digits} AS d4 (v)
                CROSS JOIN {digits} AS d5 (v)) AS n
          WHERE n.i < @P3)"
    )
}

/// The statements of one table set.
#[derive(Debug)]
pub(crate) struct Sql {
    names: SetNames,
    pub(crate) create_stream: String,
    pub(crate) tail: String,
    pub(crate) read: String,
    pub(crate) trim_streams: String,
    /// The session lock one trim of the set holds at a time (see [`Conn::lock_session`]).
    ///
    /// [`Conn::lock_session`]: crate::conn::Conn::lock_session
    pub(crate) trim_key: String,
    /// Moves a stream's `first_offset` under a short lock and returns it.
    pub(crate) trim: String,
    /// Deletes up to `@P3` entries below `@P2`: one bounded batch, outside any lock on the
    /// stream row. Returns how many went.
    pub(crate) trim_delete: String,
    pub(crate) add_connection: String,
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
    /// `(hub, stream, next_offset)` of every stream, for the poller (`WHERE` added per poll).
    pub(crate) poll: String,
    /// Appends records to a stream in one batch and transaction; see [`Sql::new`].
    pub(crate) append: String,
    /// Inserts records of a reserved range (appends too large for one request).
    pub(crate) insert_chunk: String,
}

impl Sql {
    pub(crate) fn new(n: &SetNames) -> Self {
        let message_columns = format!(
            "id, hub, user_id, sender, payload, {}, {}, acked_by, {}",
            micros("created_at"),
            micros("expires_at"),
            micros("acked_at")
        );
        let connection_columns = format!("hub, id, user_id, node, {}", micros("connected_at"));
        Self {
            // One statement, atomic: the key-range lock of UPDLOCK + HOLDLOCK keeps two nodes
            // from both inserting.
            create_stream: format!(
                "INSERT INTO {s} (hub, stream, epoch)
                 SELECT @P1, @P2, @P3
                 WHERE NOT EXISTS (SELECT 1 FROM {s} WITH (UPDLOCK, HOLDLOCK)
                                   WHERE hub = @P1 AND stream = @P2)",
                s = n.streams
            ),
            tail: format!(
                "SELECT next_offset, epoch FROM {} WHERE hub = @P1 AND stream = @P2",
                n.streams
            ),
            // OUTER APPLY and TOP (@var): SQL Server 2005+. A trim deleting meanwhile can only
            // leave a gap at the start, which the core's read check turns into PositionTooOld.
            read: format!(
                "SELECT s.first_offset, s.epoch, l.[offset], l.data, s.next_offset
                 FROM {streams} AS s
                 OUTER APPLY (
                     SELECT TOP (@P4) [offset], data FROM {log}
                     WHERE stream_id = s.id AND [offset] >= @P3
                     ORDER BY [offset]
                 ) AS l
                 WHERE s.hub = @P1 AND s.stream = @P2
                 ORDER BY l.[offset]",
                streams = n.streams,
                log = n.log
            ),
            trim_streams: format!("SELECT id FROM {}", n.streams),
            trim_key: format!("backplane trim {}", n.log),
            // Trims stream `@P1`: `@P2` seconds plus `@P3` milliseconds of age, `@P4` entries.
            // The UPDLOCK on the stream row waits for appends in flight (they hold it until
            // commit), so every entry below next_offset is visible to what follows. It only
            // moves first_offset; `trim_delete` removes the entries below it afterwards.
            trim: format!(
                "SET XACT_ABORT ON;
                 DECLARE @next bigint, @first bigint, @floor bigint, @young bigint, @new bigint;
                 BEGIN TRANSACTION;
                 SELECT @next = next_offset, @first = first_offset
                 FROM {streams} WITH (UPDLOCK, ROWLOCK) WHERE id = @P1;
                 IF @next IS NOT NULL
                 BEGIN
                     SET @floor = CASE WHEN @next - @P4 > @first THEN @next - @P4 ELSE @first END;
                     SELECT TOP (1) @young = [offset] FROM {log}
                     WHERE stream_id = @P1 AND [offset] >= @floor AND created_at >= {cutoff}
                     ORDER BY [offset];
                     SET @new = CASE WHEN @young IS NULL THEN @next
                                     WHEN @young > @floor THEN @young ELSE @floor END;
                     IF @new > @first
                     BEGIN
                         UPDATE {streams} SET first_offset = @new WHERE id = @P1;
                         SET @first = @new;
                     END
                 END
                 COMMIT TRANSACTION;
                 SELECT @first;",
                streams = n.streams,
                log = n.log,
                cutoff = ago("@P2", "@P3")
            ),
            trim_delete: format!(
                "DELETE TOP (@P3) FROM {} WHERE stream_id = @P1 AND [offset] < @P2;
                 SELECT @@ROWCOUNT;",
                n.log
            ),
            // The connection, then the user's session: updated under a key-range lock, or
            // inserted when the user has none. A taken id fails with error 2627.
            add_connection: format!(
                "SET XACT_ABORT ON;
                 BEGIN TRANSACTION;
                 INSERT INTO {c} (hub, id, user_id, node) VALUES (@P1, @P2, @P3, @P4);
                 IF @P3 IS NOT NULL
                 BEGIN
                     UPDATE {s} WITH (UPDLOCK, SERIALIZABLE) SET
                         started_at = CASE WHEN connections = 0 THEN SYSUTCDATETIME() ELSE started_at END,
                         ended_at = CASE WHEN connections = 0 THEN NULL ELSE ended_at END,
                         connections = connections + 1,
                         last_activity = SYSUTCDATETIME()
                     WHERE hub = @P1 AND user_id = @P3;
                     IF @@ROWCOUNT = 0
                         INSERT INTO {s} (hub, user_id, started_at, connections, last_activity)
                         VALUES (@P1, @P3, SYSUTCDATETIME(), 1, SYSUTCDATETIME());
                 END
                 COMMIT TRANSACTION;",
                c = n.connections,
                s = n.sessions
            ),
            remove_connection: format!(
                "SET XACT_ABORT ON;
                 {gone}
                 BEGIN TRANSACTION;
                 {remove}
                 COMMIT TRANSACTION;
                 SELECT hub, id, user_id, node, {at} FROM @gone;",
                gone = gone_table(),
                remove = remove_connections(n, "hub = @P1 AND id = @P2 AND node = @P3"),
                at = micros("connected_at")
            ),
            connection: format!(
                "SELECT {connection_columns} FROM {} WHERE hub = @P1 AND id = @P2",
                n.connections
            ),
            user_connections: format!(
                "SELECT {connection_columns} FROM {} WHERE hub = @P1 AND user_id = @P2",
                n.connections
            ),
            online_users: format!(
                "SELECT DISTINCT user_id FROM {} WHERE hub = @P1 AND user_id IS NOT NULL",
                n.connections
            ),
            user_session: format!(
                "SELECT {}, {}, connections, {} FROM {} WHERE hub = @P1 AND user_id = @P2",
                micros("started_at"),
                micros("ended_at"),
                micros("last_activity"),
                n.sessions
            ),
            // One statement under a key-range lock; returns the rows inserted (0 or 1). An
            // unknown connection fails the foreign key with error 547.
            add_member: format!(
                "INSERT INTO {m} (hub, group_name, connection)
                 SELECT @P1, @P2, @P3
                 WHERE NOT EXISTS (SELECT 1 FROM {m} WITH (UPDLOCK, HOLDLOCK)
                                   WHERE hub = @P1 AND group_name = @P2 AND connection = @P3);
                 SELECT @@ROWCOUNT;",
                m = n.memberships
            ),
            remove_member: format!(
                "DELETE FROM {} WHERE hub = @P1 AND group_name = @P2 AND connection = @P3;
                 SELECT @@ROWCOUNT;",
                n.memberships
            ),
            group_members: format!(
                "SELECT connection FROM {} WHERE hub = @P1 AND group_name = @P2",
                n.memberships
            ),
            connection_groups: format!(
                "SELECT group_name FROM {} WHERE hub = @P1 AND connection = @P2",
                n.memberships
            ),
            // The expiry is `@P5` seconds plus `@P6` milliseconds from the server's clock.
            enqueue: format!(
                "INSERT INTO {} (hub, user_id, sender, payload, expires_at)
                 OUTPUT inserted.id
                 VALUES (@P1, @P2, @P3, @P4,
                         DATEADD(millisecond, @P6, DATEADD(second, @P5, SYSUTCDATETIME())))",
                n.messages
            ),
            pending: format!(
                "SELECT {message_columns} FROM {}
                 WHERE hub = @P1 AND user_id = @P2 AND acked_at IS NULL
                   AND expires_at > SYSUTCDATETIME()
                 ORDER BY id",
                n.messages
            ),
            durable_message: format!(
                "SELECT {message_columns} FROM {} WHERE hub = @P1 AND id = @P2",
                n.messages
            ),
            acknowledge: format!(
                "UPDATE {} SET acked_by = @P3, acked_at = SYSUTCDATETIME()
                 WHERE hub = @P1 AND id = @P2 AND acked_at IS NULL;
                 SELECT @@ROWCOUNT;",
                n.messages
            ),
            record_attempt: format!(
                "INSERT INTO {a} (message_id, connection, error)
                 SELECT id, @P3, @P4 FROM {m} WHERE hub = @P1 AND id = @P2",
                a = n.attempts,
                m = n.messages
            ),
            attempts: format!(
                "SELECT a.connection, {}, a.error
                 FROM {a} AS a JOIN {m} AS m ON m.id = a.message_id
                 WHERE m.hub = @P1 AND a.message_id = @P2
                 ORDER BY a.id",
                micros("a.at"),
                a = n.attempts,
                m = n.messages
            ),
            // Attempts go by foreign-key cascade; the count is of messages only.
            // Deletes up to `@P1` expired messages: one bounded batch.
            purge_expired: format!(
                "DELETE TOP (@P1) FROM {} WHERE expires_at <= SYSUTCDATETIME();
                 SELECT @@ROWCOUNT;",
                n.messages
            ),
            pending_count: format!(
                "SELECT COUNT_BIG(*) FROM {} WHERE acked_at IS NULL AND expires_at > SYSUTCDATETIME()",
                n.messages
            ),
            poll: format!("SELECT hub, stream, next_offset FROM {}", n.streams),
            // `@P1` hub, `@P2` stream, `@P3` the record count, `@P4` and `@P5` the records
            // (see `Packed`). In one batch and transaction: the stream row's `next_offset` is
            // bumped (its lock held until commit, so offsets commit in the order they are handed
            // out; `OUTPUT … INTO` returns the old value), the records are inserted at the
            // offsets that gives, and the first offset and the epoch are returned. No row: the
            // stream does not exist yet.
            append: format!(
                "SET XACT_ABORT ON;
                 DECLARE @a TABLE (id bigint, base bigint, epoch bigint);
                 BEGIN TRANSACTION;
                 UPDATE {streams} SET next_offset = next_offset + @P3
                 OUTPUT inserted.id, deleted.next_offset, inserted.epoch INTO @a
                 WHERE hub = @P1 AND stream = @P2;
                 INSERT INTO {log} (stream_id, [offset], data)
                 SELECT a.id, a.base + r.i, SUBSTRING(@P4, r.start, r.length)
                 FROM @a AS a CROSS JOIN {rows} AS r;
                 COMMIT TRANSACTION;
                 SELECT base, epoch FROM @a;",
                streams = n.streams,
                log = n.log,
                rows = packed_rows()
            ),
            // `@P1` the stream id, `@P2` the first offset of this chunk, `@P3` the record
            // count, `@P4` and `@P5` the records (see `Packed`).
            insert_chunk: format!(
                "INSERT INTO {log} (stream_id, [offset], data)
                 SELECT @P1, @P2 + r.i, SUBSTRING(@P4, r.start, r.length) FROM {rows} AS r",
                log = n.log,
                rows = packed_rows()
            ),
            names: n.clone(),
        }
    }
}

impl Sql {
    /// For appends of more records than one request can carry, inside a transaction the caller
    /// opened: bumps stream `@P1`/`@P2` by `@P3` and returns its id, first offset and epoch.
    pub(crate) fn reserve(&self) -> String {
        format!(
            "DECLARE @a TABLE (id bigint, base bigint, epoch bigint);
             UPDATE {streams} SET next_offset = next_offset + @P3
             OUTPUT inserted.id, deleted.next_offset, inserted.epoch INTO @a
             WHERE hub = @P1 AND stream = @P2;
             SELECT id, base, epoch FROM @a;",
            streams = self.names.streams
        )
    }
}

/// The poll of the streams of `hubs` in one table set.
pub(crate) fn poll_hubs(sql: &Sql, hubs: &[&str]) -> String {
    let list: Vec<String> = hubs.iter().map(|h| quote_literal(h)).collect();
    format!("{} WHERE hub IN ({})", sql.poll, list.join(", "))
}

/// Rolls back a transaction the session may have left open.
pub(crate) const ROLLBACK: &str = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION";

// ---- Schema management ----------------------------------------------------------------------

/// Takes a session-level application lock (`sp_getapplock`, SQL Server 2005+), the migration
/// lock or a table set's trim lock: `@P1` the resource, `@P2` how many milliseconds to wait.
/// Returns the procedure's result: 0 or 1 granted, negative refused or timed out.
pub(crate) const LOCK_SESSION: &str = "DECLARE @r int;
     EXEC @r = sp_getapplock @Resource = @P1, @LockMode = 'Exclusive',
                             @LockOwner = 'Session', @LockTimeout = @P2;
     SELECT @r;";

/// Releases a lock [`LOCK_SESSION`] took (`@P1` the resource).
pub(crate) const UNLOCK_SESSION: &str =
    "EXEC sp_releaseapplock @Resource = @P1, @LockOwner = 'Session';";

/// Begins a transaction and takes the migration lock for it (released at commit or rollback).
/// A plain batch: the transaction outlives it.
pub(crate) fn begin_locked(resource: &str, timeout_ms: i32) -> String {
    format!(
        "SET XACT_ABORT ON;
         BEGIN TRANSACTION;
         DECLARE @r int;
         EXEC @r = sp_getapplock @Resource = {}, @LockMode = 'Exclusive',
                                 @LockOwner = 'Transaction', @LockTimeout = {timeout_ms};
         SELECT @r;",
        quote_literal(resource)
    )
}

/// Creates schema `@P1` when missing. `CREATE SCHEMA` must be alone in its batch, hence the
/// dynamic SQL.
pub(crate) const CREATE_SCHEMA: &str = "IF SCHEMA_ID(@P1) IS NULL
     BEGIN
         DECLARE @ddl nvarchar(400) = N'CREATE SCHEMA ' + QUOTENAME(@P1);
         EXEC (@ddl);
     END";

/// The migrations table, created when missing (`OBJECT_ID` takes the quoted name).
pub(crate) fn migrations_table(names: &Names) -> String {
    format!(
        "IF OBJECT_ID({literal}, N'U') IS NULL
         CREATE TABLE {m} (
             scope      nvarchar(200) COLLATE {COLLATION} NOT NULL,
             version    int           NOT NULL,
             applied_at datetime2(6)  NOT NULL DEFAULT SYSUTCDATETIME(),
             PRIMARY KEY (scope, version)
         );",
        literal = quote_literal(&names.migrations),
        m = names.migrations
    )
}

/// The versions of the shared tables (`@P1` scope), of the shared set (`@P2` scope), and
/// whether any hub has a set of its own, in one row.
pub(crate) fn versions(names: &Names) -> String {
    format!(
        "SELECT ISNULL(MAX(CASE WHEN scope = @P1 THEN version END), 0),
                ISNULL(MAX(CASE WHEN scope = @P2 THEN version END), 0),
                CASE WHEN EXISTS (SELECT 1 FROM {m} WHERE scope LIKE N'hub/%') THEN 1 ELSE 0 END
         FROM {m}",
        m = names.migrations
    )
}

/// Hub `@P1`'s registered slug and its set's version.
pub(crate) fn hub_state(names: &Names) -> String {
    format!(
        "SELECT h.slug, (SELECT ISNULL(MAX(m.version), 0) FROM {m} AS m
                         WHERE m.scope = N'hub/' + h.slug)
         FROM {h} AS h WHERE h.hub = @P1",
        m = names.migrations,
        h = names.hubs
    )
}

/// The hub that has slug `@P1`.
pub(crate) fn slug_holder(names: &Names) -> String {
    format!("SELECT hub FROM {} WHERE slug = @P1", names.hubs)
}

/// Registers hub `@P1` with slug `@P2`.
pub(crate) fn register_hub(names: &Names) -> String {
    format!("INSERT INTO {} (hub, slug) VALUES (@P1, @P2)", names.hubs)
}

/// Every registered hub with its slug and set version, in hub order.
pub(crate) fn registered_hubs(names: &Names) -> String {
    format!(
        "SELECT h.hub, h.slug, ISNULL(MAX(m.version), 0)
         FROM {h} AS h LEFT JOIN {m} AS m ON m.scope = N'hub/' + h.slug
         GROUP BY h.hub, h.slug
         ORDER BY h.hub",
        m = names.migrations,
        h = names.hubs
    )
}

// ---- Checks and tests ---------------------------------------------------------------------

/// The server's version, edition and the database's name, compatibility level and whether
/// readers use row versions (`READ_COMMITTED_SNAPSHOT`).
pub(crate) const SERVER_INFO: &str =
    "SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128)),
            CAST(SERVERPROPERTY('Edition') AS nvarchar(128)),
            DB_NAME(),
            CAST(d.compatibility_level AS int),
            CAST(d.is_read_committed_snapshot_on AS int)
     FROM sys.databases AS d WHERE d.name = DB_NAME()";

/// Whether the database reads committed rows from their versions (`READ_COMMITTED_SNAPSHOT`):
/// 1 or 0, and the database's name.
pub(crate) const SNAPSHOT_READS: &str =
    "SELECT CAST(is_read_committed_snapshot_on AS int), DB_NAME()
     FROM sys.databases WHERE name = DB_NAME()";

/// Turns `READ_COMMITTED_SNAPSHOT` on where it is off (the DDL's first batch): it ends other
/// sessions' open transactions, so run it where nothing else is writing.
pub(crate) const ENABLE_SNAPSHOT_READS: &str = "-- The backplane needs READ_COMMITTED_SNAPSHOT: readers use row versions, never waiting for appends.
IF (SELECT is_read_committed_snapshot_on FROM sys.databases WHERE name = DB_NAME()) = 0
    ALTER DATABASE CURRENT SET READ_COMMITTED_SNAPSHOT ON WITH ROLLBACK IMMEDIATE;";

/// Why the driver refuses a database without `READ_COMMITTED_SNAPSHOT`, and the statement that
/// turns it on.
pub(crate) fn snapshot_required(database: &str) -> String {
    format!(
        "READ_COMMITTED_SNAPSHOT is OFF in database {database:?}: reads and the poller would wait \
         for every append in flight, and appends for them. Turn it on once (it waits for, or with \
         ROLLBACK IMMEDIATE ends, the other sessions' transactions): \
         ALTER DATABASE {} SET READ_COMMITTED_SNAPSHOT ON WITH ROLLBACK IMMEDIATE;",
        crate::names::quote(database)
    )
}

/// Whether the login may create tables in the database and use schema `@P1` (1 or 0 each).
pub(crate) const PERMISSIONS: &str =
    "SELECT ISNULL(HAS_PERMS_BY_NAME(DB_NAME(), 'DATABASE', 'CREATE TABLE'), 0),
            ISNULL(HAS_PERMS_BY_NAME(@P1, 'SCHEMA', 'ALTER'), 0),
            CASE WHEN SCHEMA_ID(@P1) IS NULL THEN 0 ELSE 1 END,
            ISNULL(HAS_PERMS_BY_NAME(DB_NAME(), 'DATABASE', 'CREATE SCHEMA'), 0)";

/// Kills the sessions whose program name is `@P1`; returns how many there were, or -1 when the
/// login lacks `VIEW SERVER STATE` (without it, it sees only its own session) or
/// `ALTER ANY CONNECTION` (needed to kill).
pub(crate) const KILL_PROGRAM: &str =
    "IF ISNULL(HAS_PERMS_BY_NAME(NULL, NULL, 'VIEW SERVER STATE'), 0) = 0
        OR ISNULL(HAS_PERMS_BY_NAME(NULL, NULL, 'ALTER ANY CONNECTION'), 0) = 0
         SELECT -1;
     ELSE
     BEGIN
         DECLARE @kill nvarchar(max) = N'', @n int;
         SELECT @kill = @kill + N'KILL ' + CAST(session_id AS nvarchar(12)) + N'; ',
                @n = ISNULL(@n, 0) + 1
         FROM sys.dm_exec_sessions WHERE program_name = @P1 AND session_id <> @@SPID;
         EXEC sp_executesql @kill;
         SELECT ISNULL(@n, 0);
     END";

/// Drops schema `@P1` with every table in it: foreign keys first, then tables, then the schema
/// (SQL Server has no `DROP SCHEMA … CASCADE`).
pub(crate) const DROP_SCHEMA: &str = "DECLARE @drop nvarchar(max) = N'';
     SELECT @drop = @drop + N'ALTER TABLE ' + QUOTENAME(s.name) + N'.' + QUOTENAME(t.name)
                  + N' DROP CONSTRAINT ' + QUOTENAME(f.name) + N'; '
     FROM sys.foreign_keys AS f
     JOIN sys.tables AS t ON t.object_id = f.parent_object_id
     JOIN sys.schemas AS s ON s.schema_id = t.schema_id
     WHERE s.name = @P1;
     SELECT @drop = @drop + N'DROP TABLE ' + QUOTENAME(s.name) + N'.' + QUOTENAME(t.name) + N'; '
     FROM sys.tables AS t JOIN sys.schemas AS s ON s.schema_id = t.schema_id
     WHERE s.name = @P1;
     IF SCHEMA_ID(@P1) IS NOT NULL SET @drop = @drop + N'DROP SCHEMA ' + QUOTENAME(@P1) + N';';
     EXEC sp_executesql @drop;";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MssqlOptions;
    use std::time::Duration;

    fn set() -> SetNames {
        SetNames::shared(&MssqlOptions::new("h", "u", "p").schema("rt"))
    }

    #[test]
    fn records_are_packed_into_two_parameters() {
        let records = [
            bytes::Bytes::from_static(b"ab"),
            bytes::Bytes::new(),
            bytes::Bytes::from_static(b"cde"),
        ];
        let packed = Packed::new(&records);
        assert_eq!(packed.data, b"abcde");
        let ends: Vec<u64> = packed
            .ends
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(ends, [2, 2, 5]);
        // What the statement computes from them, with SUBSTRING's 1-based starts.
        let rows: Vec<(u64, u64)> = (0..ends.len())
            .map(|i| {
                let before = if i == 0 { 0 } else { ends[i - 1] };
                (before + 1, ends[i] - before)
            })
            .collect();
        assert_eq!(rows, [(1, 2), (3, 0), (3, 3)]);
        let sql = Sql::new(&set());
        for text in [&sql.append, &sql.insert_chunk] {
            assert!(text.contains("SUBSTRING(@P4, r.start, r.length)"), "{text}");
            assert!(!text.contains("@P6"), "{text}");
            assert!(text.contains("WHERE n.i < @P3"), "{text}");
        }
        assert!(
            sql.append
                .contains("OUTPUT inserted.id, deleted.next_offset, inserted.epoch INTO @a")
        );
        assert!(sql.append.contains("[rt].[log]"));
    }

    #[test]
    fn a_trim_deletes_in_batches_outside_the_stream_lock() {
        let sql = Sql::new(&set());
        // The locked part only moves the start of the stream.
        assert!(sql.trim.contains("UPDLOCK"), "{}", sql.trim);
        assert!(!sql.trim.contains("DELETE"), "{}", sql.trim);
        // The deletes are bounded, and take no lock on the stream row.
        assert!(
            sql.trim_delete.contains("DELETE TOP (@P3)"),
            "{}",
            sql.trim_delete
        );
        assert!(!sql.trim_delete.contains("streams"), "{}", sql.trim_delete);
        assert!(
            !sql.trim_delete.contains("TRANSACTION"),
            "{}",
            sql.trim_delete
        );
        // One trim of the set at a time: a session lock named after its log table, which
        // outlives the batches of one trim and fits sp_getapplock's 255 characters.
        assert!(sql.trim_key.contains(&set().log), "{}", sql.trim_key);
        assert!(sql.trim_key.len() <= 255, "{}", sql.trim_key);
        assert!(LOCK_SESSION.contains("@LockOwner = 'Session'"));
        assert!(UNLOCK_SESSION.contains("@LockOwner = 'Session'"));
    }

    #[test]
    fn transactions_are_balanced() {
        let sql = Sql::new(&set());
        let node = NodeSql::new(&Names::new(&MssqlOptions::new("h", "u", "p")));
        let s = set();
        for text in [
            sql.append.clone(),
            sql.trim.clone(),
            sql.add_connection.clone(),
            sql.remove_connection.clone(),
            node.register_node.clone(),
            node.heartbeat(&[&s]),
            node.heartbeat(&[]),
            node.unregister_node(&[&s, &s]),
            node.reap_nodes(&[]),
        ] {
            assert_eq!(
                text.matches("BEGIN TRANSACTION").count(),
                text.matches("COMMIT TRANSACTION").count(),
                "{text}"
            );
            assert!(text.starts_with("SET XACT_ABORT ON;"), "{text}");
        }
        // No set, no empty BEGIN … END block (a syntax error in T-SQL).
        assert!(!node.heartbeat(&[]).contains("IF @n > 0"));
    }

    #[test]
    fn reaping_removes_connections_of_unregistered_nodes() {
        let node = NodeSql::new(&Names::new(&MssqlOptions::new("h", "u", "p")));
        let s = set();
        let reap = node.reap_nodes(&[&s]);
        // The nodes' delete comes first, so the orphan condition covers the dead nodes too.
        let delete_nodes = reap.find("OUTPUT deleted.id INTO @dead").expect("{reap}");
        let orphans = reap
            .find(&format!(
                "NOT EXISTS (SELECT 1 FROM {} AS n WHERE n.id = c.node)",
                node.nodes
            ))
            .expect("{reap}");
        assert!(delete_nodes < orphans, "{reap}");
        assert!(
            reap.contains(&format!("FROM {} AS c", s.connections)),
            "{reap}"
        );
    }

    #[test]
    fn a_read_returns_the_end_of_the_stream() {
        let sql = Sql::new(&set());
        assert!(
            sql.read
                .starts_with("SELECT s.first_offset, s.epoch, l.[offset], l.data, s.next_offset"),
            "{}",
            sql.read
        );
    }

    #[test]
    fn table_variables_carry_the_collation() {
        let sql = Sql::new(&set());
        let declared = sql
            .remove_connection
            .split("DECLARE @gone TABLE (")
            .nth(1)
            .and_then(|rest| rest.split(");").next())
            .expect("a table variable");
        assert_eq!(declared.matches("nvarchar").count(), 3);
        assert_eq!(declared.matches(COLLATION).count(), 3);
    }

    /// Checks the lexical shape of a T-SQL text: `'…'` literals closed, `[…]` identifiers
    /// closed (`]]` inside), parentheses balanced outside both, `BEGIN`/`END` blocks paired.
    fn well_formed(text: &str) -> Result<(), String> {
        let chars: Vec<char> = text.chars().collect();
        let (mut depth, mut i) = (0i32, 0);
        while i < chars.len() {
            match chars[i] {
                '\'' => {
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => return Err("an unclosed string literal".into()),
                            Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                            Some('\'') => break,
                            Some(_) => i += 1,
                        }
                    }
                }
                '[' => {
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => return Err("an unclosed [identifier]".into()),
                            Some(']') if chars.get(i + 1) == Some(&']') => i += 2,
                            Some(']') => break,
                            Some(_) => i += 1,
                        }
                    }
                }
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth < 0 {
                        return Err("a ) without its (".into());
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if depth != 0 {
            return Err(format!("{depth} unclosed parentheses"));
        }
        let words: Vec<String> = text
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .map(str::to_ascii_uppercase)
            .collect();
        let opened = words
            .windows(2)
            .filter(|w| w[0] == "BEGIN" && w[1] != "TRANSACTION")
            .count();
        let cases = words.iter().filter(|w| *w == "CASE").count();
        let ends = words.iter().filter(|w| *w == "END").count();
        if opened + cases != ends {
            return Err(format!("{opened} BEGIN and {cases} CASE but {ends} END"));
        }
        Ok(())
    }

    #[test]
    fn every_statement_is_well_formed() {
        let base = MssqlOptions::new("h", "u", "p");
        let texts: Vec<String> = [
            base.clone(),
            base.clone().schema("we]ird sch'ema").table_prefix("p("),
            base.schema("we]ird sch'ema")
                .table_prefix("p(")
                .tables_per_hub(true),
        ]
        .iter()
        .flat_map(crate::statements::render)
        .map(|statement| statement.text)
        .collect();
        for text in &texts {
            // Comments may hold anything; the migrations' comments are plain prose.
            let code: String = text
                .lines()
                .map(|line| line.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            if let Err(problem) = well_formed(&code) {
                panic!("{problem} in:\n{text}");
            }
        }
        assert!(well_formed("SELECT (1").is_err());
        assert!(well_formed("SELECT 'a").is_err());
        assert!(well_formed("SELECT [a").is_err());
        assert!(well_formed("IF 1 = 1 BEGIN SELECT 1").is_err());
        assert!(well_formed("SELECT N'it''s', [a]]b] WHERE (1 = 1)").is_ok());
    }

    #[test]
    fn locks_wait_less_than_the_command_timeout() {
        let options = MssqlOptions::new("h", "u", "p").command_timeout(Duration::from_secs(30));
        assert_eq!(options.lock_timeout(), Duration::from_secs(20));
        let settings = session_settings(options.lock_timeout());
        assert!(settings.contains("SET LOCK_TIMEOUT 20000;"), "{settings}");
        assert!(settings.contains("SET XACT_ABORT ON;"), "{settings}");
        assert!(LOCK_SESSION.contains("@LockTimeout = @P2"));
        assert!(begin_locked("r", 20_000).contains("@LockTimeout = 20000"));
        assert_eq!(
            millis(Duration::ZERO),
            1,
            "0 would mean: do not wait at all"
        );
        assert_eq!(millis(Duration::from_secs(u64::MAX)), i32::MAX);
    }

    #[test]
    fn a_database_without_snapshot_reads_is_refused_with_the_fix() {
        let why = snapshot_required("app]db");
        assert!(why.contains("READ_COMMITTED_SNAPSHOT is OFF"), "{why}");
        assert!(
            why.contains("ALTER DATABASE [app]]db] SET READ_COMMITTED_SNAPSHOT ON"),
            "{why}"
        );
        // The DDL turns it on first, in a batch of its own (ALTER DATABASE cannot run in a
        // transaction).
        let ddl = crate::schema::ddl(&MssqlOptions::new("h", "u", "p"));
        let first = ddl.split("\nGO\n").next().unwrap_or_default();
        assert!(first.contains(ENABLE_SNAPSHOT_READS), "{first}");
        assert!(!first.contains("TRANSACTION"), "{first}");
    }

    #[test]
    fn node_statements_lock_rows_they_picked_beforehand_by_key() {
        let node = NodeSql::new(&Names::new(&MssqlOptions::new("h", "u", "p")));
        let s = set();
        let heartbeat = node.heartbeat(&[&s]);
        let (before, within) = heartbeat
            .split_once("BEGIN TRANSACTION;")
            .expect("a transaction");
        assert!(before.contains("DECLARE @users TABLE"), "{heartbeat}");
        assert!(within.contains("INSERT INTO @users"), "{heartbeat}");
        assert!(
            within.contains("[rt].[sessions] AS s WITH (FORCESEEK)"),
            "{heartbeat}"
        );
        assert!(
            !heartbeat.contains("EXISTS"),
            "a scan of sessions: {heartbeat}"
        );
        let reap = node.reap_nodes(&[&s]);
        let (before, within) = reap
            .split_once("BEGIN TRANSACTION;")
            .expect("a transaction");
        assert!(before.contains("INSERT INTO @silent"), "{reap}");
        assert!(within.contains("WITH (FORCESEEK) ON n.id = q.id"), "{reap}");
        // Picked from row versions, checked again under the lock.
        assert_eq!(reap.matches("last_heartbeat <").count(), 2, "{reap}");
        let remove = Sql::new(&s).remove_connection;
        assert!(
            remove.contains("JOIN [rt].[sessions] AS s WITH (FORCESEEK)"),
            "{remove}"
        );
    }

    #[test]
    fn purges_delete_in_bounded_batches() {
        let sql = Sql::new(&set());
        assert!(
            sql.purge_expired
                .starts_with("DELETE TOP (@P1) FROM [rt].[messages]"),
            "{}",
            sql.purge_expired
        );
        assert!(sql.purge_expired.contains("SELECT @@ROWCOUNT"));
    }

    #[test]
    fn streams_are_looked_up_by_their_clustered_key() {
        let ddl = crate::schema::ddl(&MssqlOptions::new("h", "u", "p"));
        let streams = ddl
            .split("CREATE TABLE")
            .find(|table| table.contains("streams] ("))
            .expect("the streams table");
        assert!(
            streams.contains("PRIMARY KEY CLUSTERED (hub, stream)"),
            "{streams}"
        );
        assert!(streams.contains("UNIQUE NONCLUSTERED"), "{streams}");
        let sql = Sql::new(&set());
        for text in [&sql.tail, &sql.read, &sql.create_stream] {
            assert!(
                text.contains("hub = @P1 AND s.stream = @P2")
                    || text.contains("hub = @P1 AND stream = @P2"),
                "{text}"
            );
        }
    }

    #[test]
    fn poll_lists_quote_hubs() {
        let sql = Sql::new(&set());
        assert_eq!(
            poll_hubs(&sql, &["chat", "o'brien"]),
            "SELECT hub, stream, next_offset FROM [rt].[streams] WHERE hub IN (N'chat', N'o''brien')"
        );
    }
}
