//! [`Faulty`]: a backplane wrapper that fails, pauses or loses the answer of chosen calls, so
//! a case can provoke a failure at one exact step of the protocol, on any driver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use backplane_core::{
    Backplane, ConnectionId, ConnectionInfo, DeliveryAttempt, DurableMessage, Error, GroupName,
    HubName, LogEntry, MessageId, NewDurableMessage, NodeId, NodeInfo, PoolStatus, Position,
    Result, Retention, SharedBackplane, UserId, UserSession, Wakeups,
};
use bytes::Bytes;
use tokio::sync::watch;

use crate::{CaseError, CaseResult, WAIT};

/// The calls of the [`Backplane`] trait, to name the one a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Op {
    Append,
    Read,
    Tail,
    Subscribe,
    Trim,
    RegisterNode,
    Heartbeat,
    UnregisterNode,
    LiveNodes,
    ReapNodes,
    AddConnection,
    RemoveConnection,
    Connection,
    UserConnections,
    OnlineUsers,
    UserSession,
    AddToGroup,
    RemoveFromGroup,
    GroupMembers,
    ConnectionGroups,
    Enqueue,
    Pending,
    DurableMessage,
    Acknowledge,
    RecordAttempt,
    Attempts,
    PurgeExpired,
    PendingCount,
}

/// A gate that lets calls pass only while it is open, counting the calls waiting at it.
#[derive(Debug)]
struct Gate {
    open: watch::Sender<bool>,
    waiting: watch::Sender<usize>,
}

/// Counts one call as waiting at a gate until it is dropped (passed or canceled).
struct Waiting<'a>(&'a watch::Sender<usize>);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Gate {
    fn new() -> Self {
        Self {
            open: watch::channel(true).0,
            waiting: watch::channel(0).0,
        }
    }

    /// Returns once the gate is open. Its sender lives as long as `self`, so it cannot close.
    async fn pass(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow_and_update() {
            return;
        }
        self.waiting.send_modify(|n| *n += 1);
        let _waiting = Waiting(&self.waiting);
        let _ = open.wait_for(|open| *open).await;
    }

    async fn waiting(&self, count: usize, what: &str) -> CaseResult {
        let mut waiting = self.waiting.subscribe();
        match tokio::time::timeout(WAIT, waiting.wait_for(|n| *n >= count)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(CaseError::Failed(format!(
                "{count} calls {what} did not arrive within {WAIT:?}"
            ))),
        }
    }
}

/// What is planned for one kind of call.
#[derive(Debug)]
struct Plan {
    /// Calls wait here before they reach the wrapped backplane.
    before: Gate,
    /// Calls wait here after the wrapped backplane answered, before they return.
    after: Gate,
    /// How many of the next calls fail without reaching the wrapped backplane.
    fail: Mutex<usize>,
    /// How many of the next calls reach the wrapped backplane and then lose its answer.
    lose: Mutex<usize>,
}

impl Plan {
    fn new() -> Self {
        Self {
            before: Gate::new(),
            after: Gate::new(),
            fail: Mutex::new(0),
            lose: Mutex::new(0),
        }
    }

    fn take(counter: &Mutex<usize>) -> bool {
        let mut n = counter.lock().unwrap_or_else(PoisonError::into_inner);
        if *n > 0 {
            *n -= 1;
            true
        } else {
            false
        }
    }
}

/// A backplane that passes every call to the one it wraps, except where a case planned a
/// fault: fail the next calls of a kind (a transient driver error, nothing applied), lose the
/// answer of the next calls (applied, then [`Error::OutcomeUnknown`]), or hold calls before or
/// after they are applied until the case releases them.
///
/// A node started on it stands for one node whose database calls misbehave; the other nodes
/// of a case share the same namespace unharmed.
#[derive(Debug)]
pub struct Faulty {
    inner: SharedBackplane,
    plans: Mutex<HashMap<Op, Arc<Plan>>>,
}

/// The driver name of the errors [`Faulty`] makes up.
const FAULT: &str = "fault";

impl Faulty {
    /// Wraps `inner` with no fault planned.
    pub fn new(inner: SharedBackplane) -> Arc<Self> {
        Arc::new(Self {
            inner,
            plans: Mutex::default(),
        })
    }

    fn plan(&self, op: Op) -> Arc<Plan> {
        self.plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_insert_with(|| Arc::new(Plan::new()))
            .clone()
    }

    /// The next `count` calls of `op` fail with a transient driver error and change nothing.
    pub fn fail_next(&self, op: Op, count: usize) {
        *self
            .plan(op)
            .fail
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = count;
    }

    /// The next `count` calls of `op` take effect, then fail with [`Error::OutcomeUnknown`],
    /// as when the connection breaks after the database committed.
    pub fn lose_reply_next(&self, op: Op, count: usize) {
        *self
            .plan(op)
            .lose
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = count;
    }

    /// Calls of `op` wait before they reach the wrapped backplane while `hold` is `true`.
    pub fn hold_before(&self, op: Op, hold: bool) {
        self.plan(op).before.open.send_replace(!hold);
    }

    /// Calls of `op` take effect, then wait before they return while `hold` is `true`.
    pub fn hold_after(&self, op: Op, hold: bool) {
        self.plan(op).after.open.send_replace(!hold);
    }

    /// Waits, within [`WAIT`], until `count` calls of `op` wait before reaching the backplane.
    pub async fn waiting_before(&self, op: Op, count: usize) -> CaseResult {
        self.plan(op)
            .before
            .waiting(count, &format!("of {op:?} held before"))
            .await
    }

    /// Waits, within [`WAIT`], until `count` calls of `op` wait after taking effect.
    pub async fn waiting_after(&self, op: Op, count: usize) -> CaseResult {
        self.plan(op)
            .after
            .waiting(count, &format!("of {op:?} held after"))
            .await
    }

    /// Runs one call of `op` through its plan.
    async fn call<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let plan = self.plan(op);
        plan.before.pass().await;
        if Plan::take(&plan.fail) {
            return Err(Error::transient(
                FAULT,
                format!("{op:?} failed by the fault plan"),
            ));
        }
        let outcome = call.await;
        plan.after.pass().await;
        if outcome.is_ok() && Plan::take(&plan.lose) {
            return Err(Error::outcome_unknown(
                FAULT,
                format!("the answer to {op:?} was lost by the fault plan"),
            ));
        }
        outcome
    }
}

/// Implements [`Backplane`] for [`Faulty`]: each listed call goes through its plan.
macro_rules! faulty {
    ($( $op:ident => $name:ident ( $( $arg:ident : $ty:ty ),* ) -> $ret:ty; )*) => {
        #[async_trait]
        impl Backplane for Faulty {
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
                    self.call(Op::$op, self.inner.$name($( $arg ),*)).await
                }
            )*
        }
    };
}

faulty! {
    Append => append(hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position>;
    Read => read(hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>>;
    Tail => tail(hub: &HubName, stream: u32) -> Result<Position>;
    Subscribe => subscribe(hub: &HubName) -> Result<Wakeups>;
    Trim => trim(retention: &Retention) -> Result<u64>;
    RegisterNode => register_node(node: &NodeId, address: Option<&str>) -> Result<()>;
    Heartbeat => heartbeat(node: &NodeId) -> Result<bool>;
    UnregisterNode => unregister_node(node: &NodeId) -> Result<()>;
    LiveNodes => live_nodes() -> Result<Vec<NodeInfo>>;
    ReapNodes => reap_nodes(timeout: Duration) -> Result<Vec<NodeId>>;
    AddConnection => add_connection(connection: &ConnectionInfo) -> Result<()>;
    RemoveConnection => remove_connection(hub: &HubName, connection: &ConnectionId, node: &NodeId) -> Result<Option<ConnectionInfo>>;
    Connection => connection(hub: &HubName, connection: &ConnectionId) -> Result<Option<ConnectionInfo>>;
    UserConnections => user_connections(hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>>;
    OnlineUsers => online_users(hub: &HubName) -> Result<Vec<UserId>>;
    UserSession => user_session(hub: &HubName, user: &UserId) -> Result<Option<UserSession>>;
    AddToGroup => add_to_group(hub: &HubName, group: &GroupName, connection: &ConnectionId) -> Result<bool>;
    RemoveFromGroup => remove_from_group(hub: &HubName, group: &GroupName, connection: &ConnectionId) -> Result<bool>;
    GroupMembers => group_members(hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>>;
    ConnectionGroups => connection_groups(hub: &HubName, connection: &ConnectionId) -> Result<Vec<GroupName>>;
    Enqueue => enqueue(message: &NewDurableMessage) -> Result<MessageId>;
    Pending => pending(hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>>;
    DurableMessage => durable_message(hub: &HubName, id: MessageId) -> Result<Option<DurableMessage>>;
    Acknowledge => acknowledge(hub: &HubName, id: MessageId, connection: &ConnectionId) -> Result<bool>;
    RecordAttempt => record_attempt(hub: &HubName, id: MessageId, connection: &ConnectionId, error: Option<&str>) -> Result<()>;
    Attempts => attempts(hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>>;
    PurgeExpired => purge_expired() -> Result<u64>;
    PendingCount => pending_count() -> Result<u64>;
}
