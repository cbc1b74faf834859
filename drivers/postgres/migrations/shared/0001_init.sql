-- backplane's shared tables, version 1: the ones every mode has once per schema and prefix.
-- {schema} and {prefix} are replaced by the quoted schema name and the table prefix before this
-- runs; every identifier is quoted. Names compare byte by byte (COLLATE "C").

CREATE TABLE {schema}."{prefix}nodes" (
    id             text COLLATE "C" PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON {schema}."{prefix}nodes" (last_heartbeat);

-- With tables per hub: one row per hub that has a table set, and the slug in its table names.
-- A slug belongs to one hub only, so two hubs never share tables. Rows are added with the
-- table set, in one transaction; operations that span hubs read this table.
CREATE TABLE {schema}."{prefix}hubs" (
    hub        text COLLATE "C" PRIMARY KEY,
    slug       text COLLATE "C" NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
