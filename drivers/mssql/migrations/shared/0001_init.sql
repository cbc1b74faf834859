-- backplane's shared tables, version 1: the ones every layout has once per schema and prefix.
-- {schema} is replaced by the bracket-quoted schema name and {prefix} by the table prefix (its
-- `]` doubled) before this runs. Needs SQL Server 2016 (13.x) or later, Azure SQL Database,
-- Azure SQL Managed Instance or Azure SQL Edge.
--
-- Names of hubs, nodes and connections are `nvarchar` in a binary collation: they hold no
-- spaces, so they compare code point by code point, case-sensitively, whatever the database's
-- default collation.

-- One row per live node (server instance): when it started and its last heartbeat.
CREATE TABLE {schema}.[{prefix}nodes] (
    id             nvarchar(64) COLLATE Latin1_General_100_BIN2 NOT NULL PRIMARY KEY,
    started_at     datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME(),
    last_heartbeat datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME()
);
CREATE INDEX [ix_last_heartbeat] ON {schema}.[{prefix}nodes] (last_heartbeat);

-- With tables per hub: one row per hub that has a table set, and the slug in its table names.
-- A slug belongs to one hub only, so two hubs never share tables.
CREATE TABLE {schema}.[{prefix}hubs] (
    hub        nvarchar(64)  COLLATE Latin1_General_100_BIN2 NOT NULL PRIMARY KEY,
    slug       nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL UNIQUE,
    created_at datetime2(6)  NOT NULL DEFAULT SYSUTCDATETIME()
);
