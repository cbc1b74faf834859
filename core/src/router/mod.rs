//! The node: this process's view of the backplane and the router that delivers messages to its
//! connections.

mod connections;
mod durable;
mod groups;
mod invocations;
mod jobs;
mod local;
mod options;
mod publish;
mod reader;
mod send;
#[cfg(all(test, feature = "memory"))]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{OnceCell, broadcast, watch};
use tokio::task::JoinHandle;

use crate::backplane::SharedBackplane;
use crate::error::{Error, Result};
use crate::message::{InvocationId, MessageId};
use crate::name::{ConnectionId, HubName, NodeId, UserId};
use crate::position::Position;
use crate::queue;
use crate::record::unix_ms;
use crate::stream_queues::StreamQueues;

pub use jobs::{Job, JobStatus};
pub use local::{Delivery, DeliveryKind};
pub use options::NodeOptions;
pub use publish::PendingPublish;

use invocations::Invocations;
use local::LocalIndex;
use reader::OwnEntries;

/// Something that happened on a node, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// The cleanup job declared these nodes dead and removed their connections.
    NodesReaped(Vec<NodeId>),
    /// A reader fell behind retention or the stream's history was lost: entries between
    /// `requested` and `earliest` were never delivered by this node.
    PositionTooOld {
        /// The hub.
        hub: HubName,
        /// Where the reader was.
        requested: Position,
        /// Where it continues.
        earliest: Position,
    },
    /// A stream of the log ended before this node's cursor: the database went back in time (a
    /// restore from backup, a failover to a standby that had not received the last commits).
    /// The reader reads again from `resumed`, skipping the entries it had already handled
    /// there; entries between `resumed` and `end` that it cannot tell apart (when `resumed` is
    /// `end`) were never delivered by this node.
    LogRewound {
        /// The hub.
        hub: HubName,
        /// Where the reader was.
        requested: Position,
        /// Where the stream ends now.
        end: Position,
        /// Where the reader goes on.
        resumed: Position,
    },
    /// A connection could not keep up with its deliveries and was disconnected.
    SlowConsumer {
        /// The hub.
        hub: HubName,
        /// The connection.
        connection: ConnectionId,
    },
    /// The node found it had been reaped and registered itself and its connections again.
    Reregistered,
    /// A background job ran.
    JobRan(Job),
    /// A hub's reader lost its wake-ups and subscribed again.
    Resubscribed(HubName),
}

/// Counters of a node since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Messages this node published.
    pub published: u64,
    /// Deliveries handed to local connections.
    pub delivered: u64,
    /// Deliveries that failed (connection gone or too slow).
    pub failed: u64,
    /// Log entries this node read.
    pub entries_read: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    entries_read: AtomicU64,
}

/// A connection registered on this node: its id and the deliveries for its socket.
///
/// Dropping it does not unregister the connection; call [`Node::disconnect`].
#[derive(Debug)]
pub struct Connection {
    /// The hub.
    pub hub: HubName,
    /// The connection's id.
    pub id: ConnectionId,
    /// The user it is authenticated as.
    pub user: Option<UserId>,
    rx: queue::Receiver<Delivery>,
}

impl Connection {
    /// The next delivery, or `None` once the node dropped the connection (disconnect, slow
    /// consumer, shutdown).
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// A delivery that is already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv()
    }

    /// Polls for the next delivery; see [`Connection::recv`].
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

/// What [`Node::publish`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Where the message entered the log; `None` when it went to local connections only.
    pub position: Option<Position>,
    /// The ids of the stored durable copies, one per target user.
    pub durable: Vec<MessageId>,
}

pub(crate) struct HubState {
    name: HubName,
    index: RwLock<LocalIndex>,
    started: OnceCell<()>,
    /// Entries this node appended and already delivered locally, which its reader steps over.
    own: Mutex<OwnEntries>,
    /// This node's messages whose appends' outcomes are unknown, for its reader to deliver
    /// locally if it finds them in the log.
    unconfirmed: Mutex<publish::Unconfirmed>,
    /// Where the hub's reader is, per stream: what it has read and handled.
    progress: watch::Sender<Vec<Position>>,
}

impl HubState {
    fn read(&self) -> RwLockReadGuard<'_, LocalIndex> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, LocalIndex> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a node's handles and tasks share: its identity, options, backplane, hubs, queues and
/// background tasks.
pub(crate) struct NodeState {
    id: NodeId,
    backplane: SharedBackplane,
    options: NodeOptions,
    /// Where other nodes reach this node's server; see [`Node::advertise`].
    address: Mutex<Option<String>>,
    hubs: Mutex<HashMap<HubName, Arc<HubState>>>,
    invocations: Invocations,
    events: broadcast::Sender<NodeEvent>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    sequence: AtomicU64,
    counters: Counters,
    jobs: jobs::JobTable,
    /// Connections removed from this node whose removal the backplane did not record; the
    /// heartbeat job retries them.
    orphans: Mutex<Vec<(HubName, ConnectionId)>>,
    /// Receives measurements once [`Node::observe`] sets it.
    observer: crate::observe::ObserverSlot,
    /// The queues of the tasks that append and deliver what this node publishes, one per hub
    /// and stream.
    pipelines: StreamQueues<publish::Request>,
}

/// One server process's membership in the backplane.
///
/// A node registers itself, keeps its heartbeat, holds its connections' outgoing channels and
/// their group and user indexes, reads every hub's log from its cursor on each wake-up and
/// delivers each entry to the matching local connections exactly once. It is cheap to clone.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use backplane_core::{HubName, MemoryBackplane, Message, Node, NodeOptions, DeliveryKind};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> backplane_core::Result<()> {
/// let backplane = Arc::new(MemoryBackplane::new());
/// let node = Node::start(backplane, NodeOptions::new()).await?;
/// let hub = HubName::new("chat")?;
/// let mut conn = node.connect(&hub, None, None).await?;
/// node.publish(Message::to_all(hub.clone(), "hello")).await?;
/// let delivery = conn.recv().await.expect("connected");
/// assert_eq!(delivery.payload.as_ref(), b"hello");
/// node.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeState>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("driver", &self.inner.backplane.driver_name())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Registers a new node on `backplane` and starts its background jobs.
    ///
    /// # Errors
    ///
    /// The driver's error when the node cannot register.
    pub async fn start(backplane: SharedBackplane, options: NodeOptions) -> Result<Self> {
        let id = options.id.clone().unwrap_or_else(NodeId::random);
        let observer = crate::observe::ObserverSlot::default();
        let backplane: SharedBackplane =
            Arc::new(crate::observe::Observed::new(backplane, observer.clone()));
        if options.id.is_some() {
            // A node that comes back under its id after a crash starts afresh: what its
            // previous run registered would otherwise live on under the new run's heartbeats.
            backplane.unregister_node(&id).await?;
        }
        backplane
            .register_node(&id, options.address.as_deref())
            .await?;
        let inner = Arc::new(NodeState {
            address: Mutex::new(options.address.clone()),
            id,
            backplane,
            observer,
            options,
            hubs: Mutex::default(),
            invocations: Invocations::default(),
            events: broadcast::channel(1024).0,
            shutdown: watch::channel(false).0,
            tasks: Mutex::default(),
            sequence: AtomicU64::new(0),
            counters: Counters::default(),
            pipelines: StreamQueues::new(publish::QUEUE),
            jobs: jobs::JobTable::default(),
            orphans: Mutex::default(),
        });
        let node = Self { inner };
        node.spawn(jobs::heartbeat(node.clone()));
        node.spawn(jobs::reap(node.clone()));
        node.spawn(jobs::cleanup(node.clone()));
        tracing::info!(node = %node.inner.id, driver = node.inner.backplane.driver_name(), "node started");
        Ok(node)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// Reports this node's measurements to `observer` from now on: the duration of every
    /// backplane call, and the lag of every log entry read from another node. A node has one
    /// observer; returns `false` (and changes nothing) when it already has one.
    pub fn observe(&self, observer: Arc<dyn crate::NodeObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// The observer set by [`observe`](Self::observe), if any.
    pub(crate) fn observer(&self) -> Option<&Arc<dyn crate::NodeObserver>> {
        self.inner.observer.get()
    }

    /// The backplane this node shares state through (every call through it is measured for
    /// the node's observer).
    pub fn backplane(&self) -> &SharedBackplane {
        &self.inner.backplane
    }

    /// The node's settings.
    pub fn options(&self) -> &NodeOptions {
        &self.inner.options
    }

    /// Where other nodes reach this node's server, as registered.
    pub fn address(&self) -> Option<String> {
        self.inner
            .address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Registers where other nodes reach this node's server (a base URL such as
    /// `http://10.0.0.5:5000`), for a server that knows it only once it listens.
    ///
    /// # Errors
    ///
    /// The driver's error when the registration cannot be written.
    pub async fn advertise(&self, url: impl Into<String>) -> Result<()> {
        let url = url.into();
        *self
            .inner
            .address
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(url.clone());
        self.inner
            .backplane
            .register_node(&self.inner.id, Some(&url))
            .await
    }

    /// Events of this node from now on.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Counters since the node started.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        NodeStats {
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            entries_read: c.entries_read.load(Ordering::Relaxed),
        }
    }

    /// When each background job last ran and how it went.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.inner.jobs.snapshot()
    }

    /// How many connections this node holds in all hubs.
    pub fn local_connection_count(&self) -> usize {
        self.hub_states()
            .iter()
            .map(|h| h.read().connections.len())
            .sum()
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.inner.events.send(event);
    }

    fn next_sequence(&self) -> u64 {
        self.inner.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    fn hub_states(&self) -> Vec<Arc<HubState>> {
        self.inner
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn existing_hub(&self, hub: &HubName) -> Option<Arc<HubState>> {
        self.inner
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(hub)
            .cloned()
    }

    /// The hub's state, with its log reader running: positioned at the tail and subscribed
    /// before this returns, so everything appended afterwards is read.
    async fn hub(&self, hub: &HubName) -> Result<Arc<HubState>> {
        if self.is_shut_down() {
            return Err(Error::Shutdown);
        }
        let state = self
            .inner
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(hub.clone())
            .or_insert_with(|| {
                Arc::new(HubState {
                    name: hub.clone(),
                    index: RwLock::default(),
                    started: OnceCell::new(),
                    own: Mutex::default(),
                    unconfirmed: Mutex::default(),
                    progress: watch::channel(Vec::new()).0,
                })
            })
            .clone();
        state
            .started
            .get_or_try_init(|| async {
                let reader = reader::Reader::start(self.clone(), state.clone()).await?;
                self.spawn(reader.run());
                Ok::<(), Error>(())
            })
            .await?;
        Ok(state)
    }

    fn stream_for(&self, sender: Option<&ConnectionId>) -> u32 {
        let key = sender.map_or(self.inner.id.as_str(), ConnectionId::as_str);
        let streams = u64::from(self.inner.backplane.stream_count().max(1));
        u32::try_from(crate::schema::stable_hash(key) % streams).unwrap_or(0)
    }

    /// Stops the node: no new work, every local connection's channel closes, pending client
    /// results fail, the node's presence is removed, background tasks end.
    pub async fn shutdown(&self) {
        if self.inner.shutdown.send_replace(true) {
            return;
        }
        for state in self.hub_states() {
            let ids: Vec<ConnectionId> = state.read().connections.keys().cloned().collect();
            for id in ids {
                state.write().remove(&id);
                self.fail_invocations_of(&state.name, &id).await;
            }
        }
        self.inner.invocations.fail_all();
        // Stop the background tasks first: a heartbeat still running would find the node
        // unregistered and register it again.
        self.join_tasks().await;
        if let Err(err) = self.inner.backplane.unregister_node(&self.inner.id).await {
            tracing::warn!(%err, node = %self.inner.id, "could not unregister the node");
        }
        tracing::info!(node = %self.inner.id, "node stopped");
    }

    /// Ends every local connection's deliveries: each [`Connection::recv`] returns `None` once
    /// what is queued has been taken, as when the node stops. The connections stay registered
    /// until each disconnects, so a server calls this to have its connections close (and
    /// unregister themselves) before [`Node::shutdown`]. Connections registered later are not
    /// affected.
    pub fn close_connections(&self) {
        for state in self.hub_states() {
            for connection in state.read().connections.values() {
                connection.tx.close();
            }
        }
    }

    /// Stops every task of the node without telling the backplane, as a crashed process would:
    /// its presence stays until other nodes reap it. For fault tests and drills.
    pub async fn abandon(&self) {
        self.inner.shutdown.send_replace(true);
        for state in self.hub_states() {
            let ids: Vec<ConnectionId> = state.read().connections.keys().cloned().collect();
            for id in ids {
                state.write().remove(&id);
            }
        }
        self.inner.invocations.fail_all();
        self.join_tasks().await;
    }

    async fn join_tasks(&self) {
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// A fresh invocation id, unique across nodes: this node's id and a counter.
    fn invocation_id(&self) -> InvocationId {
        InvocationId::new(format!("{}.{}", self.inner.id, self.next_sequence()))
    }
}
