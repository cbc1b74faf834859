//! The driver contract: what a database must provide so that nodes can share state.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::message::MessageId;
use crate::name::{ConnectionId, GroupName, HubName, NodeId, UserId};
use crate::position::Position;

/// The default number of streams per hub log.
pub const DEFAULT_STREAMS: u32 = 4;

/// A backplane behind a pointer, so a URL can pick the driver at run time.
pub type DynBackplane = dyn Backplane;

/// One entry of a stream of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The entry's offset in its stream.
    pub offset: u64,
    /// The encoded record, opaque to the driver.
    pub data: Bytes,
}

/// The bounds of one stream as a read found them: its epoch, its oldest retained offset and
/// its end (the offset its next entry gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamBounds {
    /// The stream's epoch.
    pub epoch: u64,
    /// The offset of the oldest entry kept.
    pub first: u64,
    /// The offset the next appended entry gets.
    pub end: u64,
}

/// Holds a read of `from` to the contract of [`Backplane::read`], given the bounds of the
/// stream it read and the entries it found, oldest first: a position of another epoch, before
/// `first` or past `end` fails with [`Error::PositionTooOld`](crate::Error::PositionTooOld);
/// entries that do not start at `from` fail the same way (what lies between is gone); entries
/// after a gap are dropped, so the next read, from the gap, reports it. Drivers call it on
/// every read, so no driver returns a silent gap.
///
/// # Errors
///
/// [`Error::PositionTooOld`](crate::Error::PositionTooOld) as above.
pub fn checked_read(
    from: Position,
    bounds: StreamBounds,
    mut entries: Vec<LogEntry>,
) -> Result<Vec<LogEntry>> {
    let too_old = |earliest: u64| {
        Err(crate::Error::PositionTooOld {
            requested: from,
            earliest: Position::new(from.stream, earliest, bounds.epoch),
        })
    };
    if from.epoch != bounds.epoch || from.offset < bounds.first {
        return too_old(bounds.first);
    }
    if from.offset > bounds.end {
        // A cursor past the end: the log went back in time (a restore, a failover).
        return too_old(bounds.end);
    }
    if let Some(head) = entries.first()
        && head.offset != from.offset
    {
        return too_old(head.offset.max(bounds.first));
    }
    let contiguous = entries
        .iter()
        .zip(from.offset..)
        .take_while(|(entry, expected)| entry.offset == *expected)
        .count();
    entries.truncate(contiguous);
    Ok(entries)
}

/// How much of the log to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries older than this are removed. Defaults to 7 days.
    pub max_age: Duration,
    /// At most this many entries are kept per stream. Defaults to 1 000 000.
    pub max_entries: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_entries: 1_000_000,
        }
    }
}

/// A live node as the backplane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// When the node registered.
    pub started_at: SystemTime,
    /// The node's last heartbeat.
    pub last_heartbeat: SystemTime,
    /// Where other nodes reach the node's server (a base URL such as
    /// `http://10.0.0.5:5000`), when it said.
    pub address: Option<String>,
}

/// A connection as the backplane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The hub the connection belongs to.
    pub hub: HubName,
    /// The connection's id, unique within the hub.
    pub id: ConnectionId,
    /// The user the connection is authenticated as.
    pub user: Option<UserId>,
    /// The node that holds the connection's socket.
    pub node: NodeId,
    /// When the connection was registered (set by the driver).
    pub connected_at: SystemTime,
}

/// A user's session: from their first connection to their last disconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    /// The user.
    pub user: UserId,
    /// When the first connection of the session arrived.
    pub started_at: SystemTime,
    /// When the last connection went away; `None` while the session is open.
    pub ended_at: Option<SystemTime>,
    /// How many connections the user has now.
    pub connections: u32,
    /// The last connect, disconnect, or heartbeat of a node holding one of its connections.
    pub last_activity: SystemTime,
}

/// A durable message to store in a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDurableMessage {
    /// The hub the message belongs to.
    pub hub: HubName,
    /// The recipient.
    pub user: UserId,
    /// The sending connection, if any.
    pub sender: Option<ConnectionId>,
    /// The payload, opaque.
    pub payload: Bytes,
    /// How long the message stays deliverable, from the moment it is stored.
    pub ttl: Duration,
}

/// A durable message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableMessage {
    /// The id the driver gave it.
    pub id: MessageId,
    /// The hub the message belongs to.
    pub hub: HubName,
    /// The recipient.
    pub user: UserId,
    /// The sending connection, if any.
    pub sender: Option<ConnectionId>,
    /// The payload.
    pub payload: Bytes,
    /// When it was stored.
    pub created_at: SystemTime,
    /// When it stops being deliverable.
    pub expires_at: SystemTime,
    /// When a connection acknowledged it, and which.
    pub acknowledged: Option<(ConnectionId, SystemTime)>,
}

/// One attempt to deliver a durable message to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// The connection it was delivered to.
    pub connection: ConnectionId,
    /// When (set by the driver when recorded).
    pub at: SystemTime,
    /// `None` on success, otherwise what went wrong.
    pub error: Option<String>,
}

/// What a subscriber is told about a hub's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Entries were appended to this stream.
    Appended {
        /// The stream that grew.
        stream: u32,
    },
    /// Wake-ups may have been lost (a listener reconnected, a buffer overflowed): read every
    /// stream from its cursor.
    Resync,
    /// The wake-up source is gone; subscribe again (and read every stream).
    Closed,
}

/// A subscription to one hub's wake-ups.
///
/// Lost wake-ups are never hidden: when any may have been missed, [`recv`](Self::recv) returns
/// [`Wake::Resync`].
#[derive(Debug)]
pub struct Wakeups {
    rx: broadcast::Receiver<Wake>,
}

impl Wakeups {
    /// Wraps a broadcast receiver fed by a driver.
    pub fn new(rx: broadcast::Receiver<Wake>) -> Self {
        Self { rx }
    }

    /// The next wake-up.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe.
    pub async fn recv(&mut self) -> Wake {
        match self.rx.recv().await {
            Ok(wake) => wake,
            Err(broadcast::error::RecvError::Lagged(_)) => Wake::Resync,
            Err(broadcast::error::RecvError::Closed) => Wake::Closed,
        }
    }

    /// A wake-up that has already arrived, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Wake> {
        match self.rx.try_recv() {
            Ok(wake) => Some(wake),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(Wake::Resync),
            Err(broadcast::error::TryRecvError::Closed) => Some(Wake::Closed),
        }
    }
}

/// Per-hub wake-up channels, for drivers to build [`Wakeups`] from.
#[derive(Debug, Default)]
pub struct WakeupHub {
    senders: Mutex<HashMap<HubName, broadcast::Sender<Wake>>>,
}

impl WakeupHub {
    const CAPACITY: usize = 1024;

    /// A new subscription to `hub`.
    pub fn subscribe(&self, hub: &HubName) -> Wakeups {
        let mut senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = senders
            .entry(hub.clone())
            .or_insert_with(|| broadcast::channel(Self::CAPACITY).0);
        Wakeups::new(tx.subscribe())
    }

    /// Tells the subscribers of `hub` that `stream` grew.
    pub fn notify(&self, hub: &HubName, stream: u32) {
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = senders.get(hub) {
            let _ = tx.send(Wake::Appended { stream });
        }
    }

    /// Tells the subscribers of `hub` to read all its streams.
    pub fn resync(&self, hub: &HubName) {
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = senders.get(hub) {
            let _ = tx.send(Wake::Resync);
        }
    }

    /// Tells every subscriber to read all streams.
    pub fn resync_all(&self) {
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in senders.values() {
            let _ = tx.send(Wake::Resync);
        }
    }

    /// Ends every subscription: subscribers see [`Wake::Closed`].
    pub fn close_all(&self) {
        self.senders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The storage and wake-ups that nodes share: the minimum a database driver implements.
///
/// The [`Node`](crate::Node) owns the protocol on top of it (encoding, routing, ordering,
/// client results, background jobs); a driver stores bytes and rows and signals appends.
///
/// # Contract
///
/// Every sentence here has a case in the conformance suite (`backplane-conformance`).
///
/// - **Log.** Each hub has [`stream_count`](Self::stream_count) streams. [`append`](Self::append)
///   stores a batch atomically and returns the position of its first entry; offsets in a stream
///   grow by one per entry with no gaps *in commit order*: a reader that has read up to offset N
///   never later finds a committed entry below N. [`read`](Self::read) returns entries from a
///   position, oldest first; a position before the oldest retained entry, or of another epoch,
///   fails with [`Error::PositionTooOld`](crate::Error::PositionTooOld), never a silent gap, and
///   so does a position past the stream's end (the log went back in time, as after a restore
///   from backup or a failover to a standby that lagged), with the stream's end as `earliest`.
///   [`subscribe`](Self::subscribe) wakes the subscriber after appends; wake-ups may be
///   coalesced, but a lost wake-up is reported as [`Wake::Resync`] or [`Wake::Closed`].
/// - **Presence.** Nodes register, heartbeat, and are reaped by
///   [`reap_nodes`](Self::reap_nodes) when their last heartbeat is older than a timeout;
///   reaping or unregistering a node removes its connections and their group memberships and
///   closes user sessions left without connections; each reap also removes the connections of
///   nodes that are not registered (an insert that raced with the reaping of its node). A
///   connection id is unique per hub; only the node that registered a connection removes it.
/// - **Groups.** Memberships are stored per hub; adding an existing member or removing a
///   non-member changes nothing and returns `false`; adding an unknown connection fails with
///   [`Error::UnknownConnection`](crate::Error::UnknownConnection).
/// - **Inbox.** Durable messages are stored per hub and user with an expiry computed from the
///   driver's clock; [`pending`](Self::pending) lists unacknowledged, unexpired messages oldest
///   first; [`purge_expired`](Self::purge_expired) deletes expired ones with their attempts.
/// - **Names and payloads** are opaque: stored and compared byte for byte, never interpreted.
#[async_trait]
pub trait Backplane: Send + Sync + fmt::Debug + 'static {
    /// The driver's name, such as `"memory"` or `"postgres"`.
    fn driver_name(&self) -> &'static str;

    /// How many streams each hub's log has. All nodes sharing a namespace must agree.
    fn stream_count(&self) -> u32;

    /// The state of the driver's connection pool, for metrics; `None` when it has none.
    fn pool_status(&self) -> Option<crate::PoolStatus> {
        None
    }

    /// Appends `records` to `stream` of `hub` in one atomic step.
    ///
    /// Returns the position of the first record; the others follow it without gaps.
    async fn append(&self, hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position>;

    /// Reads up to `limit` entries starting at `from`, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::PositionTooOld`](crate::Error::PositionTooOld) when `from` was trimmed away,
    /// belongs to another epoch (`earliest`: the oldest entry kept), or lies past the stream's
    /// end (`earliest`: the end).
    async fn read(&self, hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>>;

    /// The position the next appended entry of `stream` will get.
    async fn tail(&self, hub: &HubName, stream: u32) -> Result<Position>;

    /// Wake-ups for appends to `hub`'s log.
    async fn subscribe(&self, hub: &HubName) -> Result<Wakeups>;

    /// Removes log entries outside `retention`, in every hub and stream. Returns how many went.
    async fn trim(&self, retention: &Retention) -> Result<u64>;

    /// Registers a node (or refreshes its registration) with a fresh heartbeat, and where
    /// other nodes reach it (see [`NodeInfo::address`]).
    async fn register_node(&self, node: &NodeId, address: Option<&str>) -> Result<()>;

    /// Records a heartbeat of `node` and touches the sessions of its users. Returns `false` when
    /// the node is not registered (it was reaped) and must register again.
    async fn heartbeat(&self, node: &NodeId) -> Result<bool>;

    /// Removes a node with its connections and their memberships.
    async fn unregister_node(&self, node: &NodeId) -> Result<()>;

    /// Nodes whose registration has not been removed.
    async fn live_nodes(&self) -> Result<Vec<NodeInfo>>;

    /// Unregisters every node whose last heartbeat is older than `timeout`, and removes the
    /// connections of nodes that are not registered; returns the nodes unregistered.
    async fn reap_nodes(&self, timeout: Duration) -> Result<Vec<NodeId>>;

    /// Registers a connection; opens the user's session if it is their first.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateConnection`](crate::Error::DuplicateConnection) when the id is taken.
    async fn add_connection(&self, connection: &ConnectionInfo) -> Result<()>;

    /// Removes a connection that `node` registered, and its memberships; closes the user's
    /// session if it was their last. Returns the removed connection, or `None` when `node` had
    /// none with this id (a connection of the same id on another node stays).
    async fn remove_connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        node: &NodeId,
    ) -> Result<Option<ConnectionInfo>>;

    /// Looks a connection up.
    async fn connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Option<ConnectionInfo>>;

    /// A user's connections on every node.
    async fn user_connections(&self, hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>>;

    /// Users with at least one connection, sorted.
    async fn online_users(&self, hub: &HubName) -> Result<Vec<UserId>>;

    /// The user's latest session, open or closed.
    async fn user_session(&self, hub: &HubName, user: &UserId) -> Result<Option<UserSession>>;

    /// Adds a connection to a group; `false` if it already was a member.
    async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool>;

    /// Removes a connection from a group; `false` if it was not a member.
    async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool>;

    /// A group's members, sorted.
    async fn group_members(&self, hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>>;

    /// The groups a connection belongs to, sorted.
    async fn connection_groups(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Vec<GroupName>>;

    /// Stores a durable message in a user's inbox.
    async fn enqueue(&self, message: &NewDurableMessage) -> Result<MessageId>;

    /// A user's unacknowledged, unexpired messages, oldest first.
    async fn pending(&self, hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>>;

    /// A stored message, whatever its state (until purged).
    async fn durable_message(&self, hub: &HubName, id: MessageId)
    -> Result<Option<DurableMessage>>;

    /// Marks a message as received by `connection`; `false` if it was already acknowledged or
    /// does not exist.
    async fn acknowledge(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
    ) -> Result<bool>;

    /// Records one delivery attempt (success or error text).
    async fn record_attempt(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
        error: Option<&str>,
    ) -> Result<()>;

    /// The attempts recorded for a message, oldest first.
    async fn attempts(&self, hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>>;

    /// Deletes expired messages and their attempts; returns how many messages went.
    async fn purge_expired(&self) -> Result<u64>;

    /// How many unacknowledged, unexpired durable messages exist in all hubs.
    async fn pending_count(&self) -> Result<u64>;
}

/// Shared ownership of a backplane.
pub type SharedBackplane = Arc<DynBackplane>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn entries(offsets: &[u64]) -> Vec<LogEntry> {
        offsets
            .iter()
            .map(|&offset| LogEntry {
                offset,
                data: Bytes::from(offset.to_string()),
            })
            .collect()
    }

    const BOUNDS: StreamBounds = StreamBounds {
        epoch: 7,
        first: 10,
        end: 20,
    };

    fn too_old(result: Result<Vec<LogEntry>>) -> Option<u64> {
        match result {
            Err(Error::PositionTooOld { earliest, .. }) => Some(earliest.offset),
            _ => None,
        }
    }

    #[test]
    fn a_read_in_bounds_keeps_its_entries() {
        let read = checked_read(Position::new(0, 12, 7), BOUNDS, entries(&[12, 13, 14]));
        assert_eq!(read.ok(), Some(entries(&[12, 13, 14])));
        let at_end = checked_read(Position::new(0, 20, 7), BOUNDS, Vec::new());
        assert_eq!(at_end.ok(), Some(Vec::new()));
    }

    #[test]
    fn positions_out_of_bounds_are_too_old() {
        let before = checked_read(Position::new(0, 9, 7), BOUNDS, entries(&[10]));
        assert_eq!(too_old(before), Some(10));
        let other_epoch = checked_read(Position::new(0, 12, 6), BOUNDS, entries(&[12]));
        assert_eq!(too_old(other_epoch), Some(10));
        let past_end = checked_read(Position::new(0, 21, 7), BOUNDS, Vec::new());
        assert_eq!(too_old(past_end), Some(20));
    }

    #[test]
    fn gaps_are_never_silent() {
        let late_start = checked_read(Position::new(0, 12, 7), BOUNDS, entries(&[14, 15]));
        assert_eq!(too_old(late_start), Some(14));
        let inner_gap = checked_read(Position::new(0, 12, 7), BOUNDS, entries(&[12, 13, 15]));
        assert_eq!(inner_gap.ok(), Some(entries(&[12, 13])));
    }
}
