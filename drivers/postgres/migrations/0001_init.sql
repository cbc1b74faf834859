-- backplane schema, version 1. {schema} and {prefix} are replaced by the quoted schema name and
-- the table prefix before this runs; every identifier is quoted.

-- One row per (hub, stream): the next offset to allocate, the first offset still stored, and the
-- stream's epoch. Appends lock this row for the length of their transaction, so offsets are
-- handed out and committed in the same order.
CREATE TABLE {schema}."{prefix}streams" (
    hub          text    NOT NULL,
    stream       integer NOT NULL,
    next_offset  bigint  NOT NULL DEFAULT 0,
    first_offset bigint  NOT NULL DEFAULT 0,
    epoch        bigint  NOT NULL,
    PRIMARY KEY (hub, stream)
);

-- The log: one row per entry. NOTIFY carries only "hub/stream"; readers read rows.
CREATE TABLE {schema}."{prefix}log" (
    hub        text        NOT NULL,
    stream     integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hub, stream, "offset")
);
CREATE INDEX ON {schema}."{prefix}log" (created_at);

CREATE TABLE {schema}."{prefix}nodes" (
    id             text        PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON {schema}."{prefix}nodes" (last_heartbeat);

CREATE TABLE {schema}."{prefix}connections" (
    hub          text        NOT NULL,
    id           text        NOT NULL,
    user_id      text,
    node         text        NOT NULL,
    connected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hub, id)
);
CREATE INDEX ON {schema}."{prefix}connections" (hub, user_id) WHERE user_id IS NOT NULL;
CREATE INDEX ON {schema}."{prefix}connections" (node);

CREATE TABLE {schema}."{prefix}memberships" (
    hub        text NOT NULL,
    group_name text NOT NULL,
    connection text NOT NULL,
    PRIMARY KEY (hub, group_name, connection),
    FOREIGN KEY (hub, connection) REFERENCES {schema}."{prefix}connections" (hub, id) ON DELETE CASCADE
);
CREATE INDEX ON {schema}."{prefix}memberships" (hub, connection);

CREATE TABLE {schema}."{prefix}sessions" (
    hub           text        NOT NULL,
    user_id       text        NOT NULL,
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    connections   integer     NOT NULL DEFAULT 0,
    last_activity timestamptz NOT NULL,
    PRIMARY KEY (hub, user_id)
);

CREATE TABLE {schema}."{prefix}messages" (
    id          bigserial   PRIMARY KEY,
    hub         text        NOT NULL,
    user_id     text        NOT NULL,
    sender      text,
    payload     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    acked_by    text,
    acked_at    timestamptz
);
CREATE INDEX ON {schema}."{prefix}messages" (hub, user_id, id) WHERE acked_at IS NULL;
CREATE INDEX ON {schema}."{prefix}messages" (expires_at);

CREATE TABLE {schema}."{prefix}attempts" (
    id         bigserial   PRIMARY KEY,
    message_id bigint      NOT NULL REFERENCES {schema}."{prefix}messages" (id) ON DELETE CASCADE,
    connection text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    error      text
);
CREATE INDEX ON {schema}."{prefix}attempts" (message_id);
