//! Node settings.

use std::time::Duration;

use crate::backplane::Retention;
use crate::message::DEFAULT_MAX_PAYLOAD;
use crate::name::NodeId;

/// Settings of a [`Node`](crate::Node). Each setter states its default.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub(crate) id: Option<NodeId>,
    pub(crate) address: Option<String>,
    pub(crate) max_payload: usize,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) connection_timeout: Duration,
    pub(crate) reap_interval: Duration,
    pub(crate) cleanup_interval: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) retention: Retention,
    pub(crate) max_connections: usize,
    pub(crate) connection_buffer: usize,
    pub(crate) read_batch: usize,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            id: None,
            address: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            heartbeat_interval: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(15),
            reap_interval: Duration::from_secs(5),
            cleanup_interval: Duration::from_secs(15 * 60),
            poll_interval: Duration::from_secs(1),
            retention: Retention::default(),
            max_connections: 100_000,
            connection_buffer: 1024,
            read_batch: 512,
        }
    }
}

impl NodeOptions {
    /// Default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most local connections the node accepts, as set by
    /// [`max_connections`](Self::max_connections).
    pub fn connection_limit(&self) -> usize {
        self.max_connections
    }

    /// The node's id. Defaults to a new random id, so a restarted process is a new node. A node
    /// that starts with a given id takes over that id afresh: whatever a previous run under it
    /// left registered (connections, memberships, session counts) is removed first, so two
    /// running processes must never share an id.
    pub fn id(mut self, id: NodeId) -> Self {
        self.id = Some(id);
        self
    }

    /// Where other nodes reach this node's server: a base URL such as `http://10.0.0.5:5000`,
    /// listed with the node (see [`NodeInfo::address`](crate::NodeInfo::address)). A server
    /// uses it to hand a client's resumed socket to the node that holds its connection.
    /// Defaults to none.
    pub fn address(mut self, url: impl Into<String>) -> Self {
        self.address = Some(url.into());
        self
    }

    /// The largest payload accepted, in bytes. Defaults to 1 MiB.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How often the node writes its heartbeat (one write per node, whatever its connection
    /// count). Defaults to 5 seconds.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// How long a node may go without a heartbeat before the others declare it dead and remove
    /// its connections, memberships and presence. Defaults to 15 seconds: with the default
    /// heartbeat and reap intervals, a crashed node's users are offline everywhere within 20
    /// seconds. Keep it a few heartbeats long, so a slow database does not get live nodes
    /// reaped.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How often the node reaps dead nodes (one statement that usually removes nothing).
    /// Defaults to 5 seconds.
    pub fn reap_interval(mut self, interval: Duration) -> Self {
        self.reap_interval = interval;
        self
    }

    /// How often the node purges expired durable messages and trims the log. Defaults to 15
    /// minutes.
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// How often the node reads the log even without a wake-up, so that a lost wake-up delays
    /// delivery by at most this long. Defaults to 1 second.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How much of the log the cleanup job keeps. Defaults to 7 days and 1 000 000 entries per
    /// stream.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The most connections this node accepts. Defaults to 100 000.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// How many deliveries may wait for one connection before it counts as a slow consumer and
    /// is disconnected. Defaults to 1024.
    pub fn connection_buffer(mut self, capacity: usize) -> Self {
        self.connection_buffer = capacity.max(1);
        self
    }

    /// How many log entries are read per query. Defaults to 512.
    pub fn read_batch(mut self, entries: usize) -> Self {
        self.read_batch = entries.max(1);
        self
    }
}
