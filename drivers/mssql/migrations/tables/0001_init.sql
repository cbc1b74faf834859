-- A table set, version 1: the tables of every hub (by default), or of one hub (with tables per
-- hub). {schema} is replaced by the bracket-quoted schema name and {set} by the set's table
-- name prefix (the table prefix, plus the hub's slug and `_` with tables per hub; its `]`
-- doubled) before this runs. Needs SQL Server 2016 (13.x) or later, Azure SQL Database, Azure
-- SQL Managed Instance or Azure SQL Edge; every statement here also runs on 2008.
--
-- Hubs, nodes and connection ids hold no spaces: they are `nvarchar` in a binary collation.
-- User ids and group names may end in spaces, which `nvarchar` comparison ignores, so they are
-- stored as their UTF-8 bytes in `varbinary`: compared byte for byte (names never hold a NUL,
-- the one byte `varbinary` comparison pads with).

-- One row per (hub, stream): the next offset to allocate, the first offset still stored, and the
-- stream's epoch. An append updates this row first and holds its lock until it commits, so
-- offsets are handed out and committed in the same order. Clustered on (hub, stream), the key
-- every append and read looks it up by: a seek that locks only its own row, so an append to
-- one stream never waits behind another stream's (a scan of a clustered `id` would). `id`, the
-- log's key, is unique beside it.
CREATE TABLE {schema}.[{set}streams] (
    id           bigint       IDENTITY(1, 1) NOT NULL UNIQUE NONCLUSTERED,
    hub          nvarchar(64) COLLATE Latin1_General_100_BIN2 NOT NULL,
    stream       int          NOT NULL,
    next_offset  bigint       NOT NULL DEFAULT 0,
    first_offset bigint       NOT NULL DEFAULT 0,
    epoch        bigint       NOT NULL,
    PRIMARY KEY CLUSTERED (hub, stream)
);

-- The log: one row per entry, keyed by the stream's id.
CREATE TABLE {schema}.[{set}log] (
    stream_id  bigint         NOT NULL,
    [offset]   bigint         NOT NULL,
    data       varbinary(max) NOT NULL,
    created_at datetime2(6)   NOT NULL DEFAULT SYSUTCDATETIME(),
    PRIMARY KEY (stream_id, [offset])
);

-- Connections per user and node (server instance), with their connect time; the node's last
-- heartbeat is in the nodes table.
CREATE TABLE {schema}.[{set}connections] (
    hub          nvarchar(64)   COLLATE Latin1_General_100_BIN2 NOT NULL,
    id           nvarchar(128)  COLLATE Latin1_General_100_BIN2 NOT NULL,
    user_id      varbinary(256) NULL,
    node         nvarchar(64)   COLLATE Latin1_General_100_BIN2 NOT NULL,
    connected_at datetime2(6)   NOT NULL DEFAULT SYSUTCDATETIME(),
    PRIMARY KEY (hub, id)
);
CREATE INDEX [ix_user] ON {schema}.[{set}connections] (hub, user_id);
CREATE INDEX [ix_node] ON {schema}.[{set}connections] (node);

CREATE TABLE {schema}.[{set}memberships] (
    hub        nvarchar(64)   COLLATE Latin1_General_100_BIN2 NOT NULL,
    group_name varbinary(256) NOT NULL,
    connection nvarchar(128)  COLLATE Latin1_General_100_BIN2 NOT NULL,
    PRIMARY KEY (hub, group_name, connection),
    FOREIGN KEY (hub, connection) REFERENCES {schema}.[{set}connections] (hub, id) ON DELETE CASCADE
);
CREATE INDEX [ix_connection] ON {schema}.[{set}memberships] (hub, connection);

-- User sessions: from the first connection to the last disconnect.
CREATE TABLE {schema}.[{set}sessions] (
    hub           nvarchar(64)   COLLATE Latin1_General_100_BIN2 NOT NULL,
    user_id       varbinary(256) NOT NULL,
    started_at    datetime2(6)   NOT NULL,
    ended_at      datetime2(6)   NULL,
    connections   int            NOT NULL DEFAULT 0,
    last_activity datetime2(6)   NOT NULL,
    PRIMARY KEY (hub, user_id)
);

-- Durable messages: target user, sender, payload, created, expiry, and when and by which
-- connection each was acknowledged (delivered).
CREATE TABLE {schema}.[{set}messages] (
    id         bigint         IDENTITY(1, 1) NOT NULL PRIMARY KEY,
    hub        nvarchar(64)   COLLATE Latin1_General_100_BIN2 NOT NULL,
    user_id    varbinary(256) NOT NULL,
    sender     nvarchar(128)  COLLATE Latin1_General_100_BIN2 NULL,
    payload    varbinary(max) NOT NULL,
    created_at datetime2(6)   NOT NULL DEFAULT SYSUTCDATETIME(),
    expires_at datetime2(6)   NOT NULL,
    acked_by   nvarchar(128)  COLLATE Latin1_General_100_BIN2 NULL,
    acked_at   datetime2(6)   NULL
);
CREATE INDEX [ix_pending] ON {schema}.[{set}messages] (hub, user_id, id) INCLUDE (acked_at, expires_at);
CREATE INDEX [ix_expires] ON {schema}.[{set}messages] (expires_at);

-- Delivery attempts: one row per attempt, with the connection and the error text on failure.
CREATE TABLE {schema}.[{set}attempts] (
    id         bigint        IDENTITY(1, 1) NOT NULL PRIMARY KEY,
    message_id bigint        NOT NULL REFERENCES {schema}.[{set}messages] (id) ON DELETE CASCADE,
    connection nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL,
    at         datetime2(6)  NOT NULL DEFAULT SYSUTCDATETIME(),
    error      nvarchar(max) NULL
);
CREATE INDEX [ix_message] ON {schema}.[{set}attempts] (message_id);
