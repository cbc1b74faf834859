//! The timing and size limits of client connections.

use std::time::Duration;

/// Timing and size limits of client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How often the server pings an idle connection. Defaults to 15 s.
    pub keep_alive: Duration,
    /// How long a connection may stay silent before the server closes it. Defaults to 30 s.
    pub client_timeout: Duration,
    /// How long a new connection has to send its handshake. Defaults to 15 s.
    pub handshake_timeout: Duration,
    /// The largest message a client may send, in bytes. Defaults to 1 MiB.
    pub max_message_size: usize,
    /// Invocations a connection may make per second, with bursts of twice as many; a faster
    /// client is slowed down (its messages are read later), not refused, as long as it does
    /// not stay over the limit: once every invocation has had to wait for a whole
    /// `client_timeout`, the connection is closed with a `Close` message saying why, so no call
    /// waits unboundedly. 0 turns the limit off. Defaults to 100.
    pub invocations_per_second: u32,
    /// The most groups one connection may be in. Defaults to 1 000.
    pub max_groups_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            client_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(15),
            max_message_size: 1024 * 1024,
            invocations_per_second: 100,
            max_groups_per_connection: 1000,
        }
    }
}
