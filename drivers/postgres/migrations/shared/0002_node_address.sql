-- Where other nodes reach a node's server (a base URL): a node that gets a client's resumed
-- socket for a connection another node holds hands the socket over there.
ALTER TABLE {schema}."{prefix}nodes" ADD COLUMN IF NOT EXISTS address text;
