//! Measurements a node reports for metrics: how long backplane calls take, and how far behind
//! the log this node reads.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::backplane::{
    Backplane, ConnectionInfo, DeliveryAttempt, DurableMessage, LogEntry, NewDurableMessage,
    NodeInfo, Retention, SharedBackplane, UserSession, Wakeups,
};
use crate::error::Result;
use crate::message::MessageId;
use crate::name::{ConnectionId, GroupName, HubName, NodeId, UserId};
use crate::position::Position;

/// Receives a node's measurements; see [`Node::observe`](crate::Node::observe). Methods run on
/// the node's hot paths: keep them cheap (update a histogram, nothing that blocks).
pub trait NodeObserver: Send + Sync + 'static {
    /// A backplane call finished after `elapsed`; `ok` is false when it returned an error.
    /// `operation` is the [`Backplane`] method's name, such as `"append"`.
    fn backplane_call(&self, operation: &'static str, elapsed: Duration, ok: bool);

    /// This node read an entry another node appended, `lag` after it was appended (by the
    /// appending node's clock, so skewed clocks skew it).
    fn log_lag(&self, lag: Duration);
}

/// A driver's connection pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// The most connections the pool opens.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not in use.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// Where a node's observer is, once one is set.
pub(crate) type ObserverSlot = Arc<OnceLock<Arc<dyn NodeObserver>>>;

/// A backplane that reports the duration of every call to the node's observer.
#[derive(Debug)]
pub(crate) struct Observed {
    inner: SharedBackplane,
    observer: ObserverSlot,
}

impl Observed {
    pub(crate) fn new(inner: SharedBackplane, observer: ObserverSlot) -> Self {
        Self { inner, observer }
    }

    fn report(&self, operation: &'static str, started: Instant, ok: bool) {
        if let Some(observer) = self.observer.get() {
            observer.backplane_call(operation, started.elapsed(), ok);
        }
    }
}

impl std::fmt::Debug for dyn NodeObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeObserver")
    }
}

/// Implements [`Backplane`] for [`Observed`]: each listed method calls the inner backplane and
/// reports how long it took.
macro_rules! observed {
    ($( $name:ident ( $( $arg:ident : $ty:ty ),* ) -> $ret:ty; )*) => {
        #[async_trait]
        impl Backplane for Observed {
            fn driver_name(&self) -> &'static str {
                self.inner.driver_name()
            }

            fn stream_count(&self) -> u32 {
                self.inner.stream_count()
            }

            fn pool_status(&self) -> Option<PoolStatus> {
                self.inner.pool_status()
            }

            $(
                async fn $name(&self, $( $arg: $ty ),*) -> $ret {
                    let started = Instant::now();
                    let outcome = self.inner.$name($( $arg ),*).await;
                    self.report(stringify!($name), started, outcome.is_ok());
                    outcome
                }
            )*
        }
    };
}

observed! {
    append(hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position>;
    read(hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>>;
    tail(hub: &HubName, stream: u32) -> Result<Position>;
    subscribe(hub: &HubName) -> Result<Wakeups>;
    trim(retention: &Retention) -> Result<u64>;
    register_node(node: &NodeId, address: Option<&str>) -> Result<()>;
    heartbeat(node: &NodeId) -> Result<bool>;
    unregister_node(node: &NodeId) -> Result<()>;
    live_nodes() -> Result<Vec<NodeInfo>>;
    reap_nodes(timeout: Duration) -> Result<Vec<NodeId>>;
    add_connection(connection: &ConnectionInfo) -> Result<()>;
    remove_connection(hub: &HubName, connection: &ConnectionId, node: &NodeId) -> Result<Option<ConnectionInfo>>;
    connection(hub: &HubName, connection: &ConnectionId) -> Result<Option<ConnectionInfo>>;
    user_connections(hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>>;
    online_users(hub: &HubName) -> Result<Vec<UserId>>;
    user_session(hub: &HubName, user: &UserId) -> Result<Option<UserSession>>;
    add_to_group(hub: &HubName, group: &GroupName, connection: &ConnectionId) -> Result<bool>;
    remove_from_group(hub: &HubName, group: &GroupName, connection: &ConnectionId) -> Result<bool>;
    group_members(hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>>;
    connection_groups(hub: &HubName, connection: &ConnectionId) -> Result<Vec<GroupName>>;
    enqueue(message: &NewDurableMessage) -> Result<MessageId>;
    pending(hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>>;
    durable_message(hub: &HubName, id: MessageId) -> Result<Option<DurableMessage>>;
    acknowledge(hub: &HubName, id: MessageId, connection: &ConnectionId) -> Result<bool>;
    record_attempt(hub: &HubName, id: MessageId, connection: &ConnectionId, error: Option<&str>) -> Result<()>;
    attempts(hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>>;
    purge_expired() -> Result<u64>;
    pending_count() -> Result<u64>;
}
