-- backplane's shared tables, version 2. Same placeholders and SQL Server versions as version 1.
--
-- Where other nodes reach a node's server (a base URL): a node that gets a client's resumed
-- socket for a connection another node holds hands the socket over there. Adding a NULL
-- column is a metadata-only change.
ALTER TABLE {schema}.[{prefix}nodes] ADD address nvarchar(2048) NULL;
