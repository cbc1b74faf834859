-- A table set, version 1: the tables of every hub (by default), or of one hub (with tables per
-- hub). {schema} is replaced by the quoted schema name and {set} by the set's table name prefix
-- (the table prefix, plus the hub's slug and `_` with tables per hub) before this runs; every
-- identifier is quoted. Rows keep their hub column in both layouts: the statements and indexes
-- are the same, and rows of different hubs never mix. Names compare byte by byte
-- (COLLATE "C"): they are identifiers, not prose, and the database's locale must not change what
-- is equal or slow down every index lookup.

-- One row per (hub, stream): the next offset to allocate, the first offset still stored, and the
-- stream's epoch. Appends lock this row for the length of their transaction, so offsets are
-- handed out and committed in the same order.
CREATE TABLE {schema}."{set}streams" (
    id           bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hub          text    COLLATE "C" NOT NULL,
    stream       integer NOT NULL,
    next_offset  bigint  NOT NULL DEFAULT 0,
    first_offset bigint  NOT NULL DEFAULT 0,
    epoch        bigint  NOT NULL,
    UNIQUE (hub, stream)
);

-- The log: one row per entry, keyed by the stream's id, which keeps rows and index entries
-- narrow. NOTIFY carries only "hub/stream"; readers read rows.
CREATE TABLE {schema}."{set}log" (
    stream_id  bigint      NOT NULL,
    "offset"   bigint      NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, "offset")
);
-- Entries up to 8 KiB stay inline and uncompressed: every reader fetches every entry, and
-- compressing once to decompress on each node costs more than it saves. Larger ones are
-- compressed and stored out of line as usual.
ALTER TABLE {schema}."{set}log" SET (toast_tuple_target = 8160);

CREATE TABLE {schema}."{set}connections" (
    hub          text COLLATE "C" NOT NULL,
    id           text COLLATE "C" NOT NULL,
    user_id      text COLLATE "C",
    node         text COLLATE "C" NOT NULL,
    connected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hub, id)
);
CREATE INDEX ON {schema}."{set}connections" (hub, user_id) WHERE user_id IS NOT NULL;
CREATE INDEX ON {schema}."{set}connections" (node);

CREATE TABLE {schema}."{set}memberships" (
    hub        text COLLATE "C" NOT NULL,
    group_name text COLLATE "C" NOT NULL,
    connection text COLLATE "C" NOT NULL,
    PRIMARY KEY (hub, group_name, connection),
    FOREIGN KEY (hub, connection) REFERENCES {schema}."{set}connections" (hub, id) ON DELETE CASCADE
);
CREATE INDEX ON {schema}."{set}memberships" (hub, connection);

CREATE TABLE {schema}."{set}sessions" (
    hub           text COLLATE "C" NOT NULL,
    user_id       text COLLATE "C" NOT NULL,
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    connections   integer     NOT NULL DEFAULT 0,
    last_activity timestamptz NOT NULL,
    PRIMARY KEY (hub, user_id)
);

CREATE TABLE {schema}."{set}messages" (
    id          bigserial   PRIMARY KEY,
    hub         text COLLATE "C" NOT NULL,
    user_id     text COLLATE "C" NOT NULL,
    sender      text COLLATE "C",
    payload     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    acked_by    text COLLATE "C",
    acked_at    timestamptz
);
CREATE INDEX ON {schema}."{set}messages" (hub, user_id, id) WHERE acked_at IS NULL;
CREATE INDEX ON {schema}."{set}messages" (expires_at);

CREATE TABLE {schema}."{set}attempts" (
    id         bigserial   PRIMARY KEY,
    message_id bigint      NOT NULL REFERENCES {schema}."{set}messages" (id) ON DELETE CASCADE,
    connection text COLLATE "C" NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    error      text
);
CREATE INDEX ON {schema}."{set}attempts" (message_id);
