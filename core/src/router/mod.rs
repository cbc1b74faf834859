//! The node: this process's view of the backplane and the router that delivers messages to its
//! connections.

mod invocations;
mod jobs;
mod local;
mod options;
mod publish;
mod reader;
#[cfg(all(test, feature = "memory"))]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::{OnceCell, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::backplane::NewDurableMessage;
use crate::backplane::{ConnectionInfo, SharedBackplane};
use crate::error::{Error, Result};
use crate::message::{Durability, InvocationId, Message, MessageId, Target};
use crate::name::{ConnectionId, GroupName, HubName, NodeId, UserId};
use crate::position::Position;
use crate::queue;
use crate::record::{Envelope, Record};

pub use jobs::{Job, JobStatus};
pub use local::{Delivery, DeliveryKind};
pub use options::NodeOptions;
pub use publish::PendingPublish;

use invocations::Invocations;
use local::{LocalConnection, LocalIndex};
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

pub(crate) struct Inner {
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
    pipelines: Mutex<HashMap<(HubName, u32), mpsc::Sender<publish::Request>>>,
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
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("driver", &self.inner.backplane.driver_name())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
        let inner = Arc::new(Inner {
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
            pipelines: Mutex::default(),
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

    /// Registers a connection on this node. A random id is chosen when `id` is `None`.
    ///
    /// Durable messages waiting for the user are queued on the returned connection at once.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyConnections`], [`Error::DuplicateConnection`], [`Error::Shutdown`] or the
    /// driver's error; on error nothing stays registered.
    pub async fn connect(
        &self,
        hub: &HubName,
        id: Option<ConnectionId>,
        user: Option<UserId>,
    ) -> Result<Connection> {
        let max = self.inner.options.max_connections;
        if self.local_connection_count() >= max {
            return Err(Error::TooManyConnections { max });
        }
        let state = self.hub(hub).await?;
        let id = id.unwrap_or_else(ConnectionId::random);
        {
            let mut index = state.write();
            if index.contains(&id) || index.registering.contains_key(&id) {
                return Err(Error::DuplicateConnection(id.to_string()));
            }
            // From here until it is indexed, group changes read for it are noted.
            index.registering.insert(id.clone(), false);
        }
        let registered = self.register_connection(&state, &id, user).await;
        if registered.is_err() {
            state.write().registering.remove(&id);
        }
        registered
    }

    /// Stores a connection that is marked as registering in the hub's index, then indexes it.
    async fn register_connection(
        &self,
        state: &Arc<HubState>,
        id: &ConnectionId,
        user: Option<UserId>,
    ) -> Result<Connection> {
        let hub = &state.name;
        let id = id.clone();
        let orphaned = {
            let mut orphans = self.orphans();
            let before = orphans.len();
            orphans.retain(|(h, c)| !(h == hub && c == &id));
            orphans.len() != before
        };
        if orphaned {
            // The same id comes back before its old registration was removed: remove it now.
            if let Err(err) = self
                .inner
                .backplane
                .remove_connection(hub, &id, &self.inner.id)
                .await
            {
                self.orphans().push((hub.clone(), id.clone()));
                return Err(err);
            }
        }
        let info = ConnectionInfo {
            hub: hub.clone(),
            id: id.clone(),
            user: user.clone(),
            node: self.inner.id.clone(),
            connected_at: SystemTime::now(),
        };
        self.inner.backplane.add_connection(&info).await?;
        let (tx, rx) = queue::bounded(self.inner.options.connection_buffer);
        let groups_changed = {
            let mut index = state.write();
            let changed = index.registering.remove(&id).unwrap_or(false);
            index.insert(
                id.clone(),
                LocalConnection {
                    user: user.clone(),
                    tx: tx.clone(),
                    groups: HashSet::new(),
                    version: 0,
                    durable: local::Claims::default(),
                    connected_at: info.connected_at,
                },
            );
            changed
        };
        tracing::debug!(hub = %hub, connection = %id, "connection registered");
        if groups_changed {
            // Another node changed its groups before it was indexed: load them now.
            if let Err(err) = self.reload_groups(state, &id).await {
                tracing::warn!(%err, hub = %hub, connection = %id, "could not load the groups of a new connection");
            }
        }
        if let Some(user) = &user
            && let Err(err) = self.deliver_pending(state, &id, user, &tx).await
        {
            tracing::warn!(%err, hub = %hub, connection = %id, "could not load pending durable messages");
        }
        Ok(Connection {
            hub: hub.clone(),
            id,
            user,
            rx,
        })
    }

    async fn deliver_pending(
        &self,
        state: &HubState,
        id: &ConnectionId,
        user: &UserId,
        tx: &queue::Sender<Delivery>,
    ) -> Result<()> {
        let hub = &state.name;
        for message in self.inner.backplane.pending(hub, user).await? {
            // The reader may already have delivered it from the log since the connection
            // was inserted.
            let fresh = state.write().claim_durable(id, message.id);
            if !fresh {
                continue;
            }
            let delivery = Delivery {
                payload: message.payload,
                kind: DeliveryKind::Durable(message.id),
            };
            let error = self.try_deliver(hub, id, tx, delivery);
            if let Err(err) = self
                .inner
                .backplane
                .record_attempt(hub, message.id, id, error)
                .await
            {
                // The attempt goes unrecorded; the message itself was handed over.
                tracing::warn!(%err, hub = %hub, message = %message.id, "could not record a delivery attempt");
            }
        }
        Ok(())
    }

    /// Replaces a local connection's groups with the stored ones. A local change made while the
    /// query ran wins: the query is repeated until no local change interleaves. Returns `false`
    /// when the backplane does not know the connection (this node was reaped and has not
    /// registered it again), and then changes nothing.
    pub(super) async fn reload_groups(
        &self,
        state: &HubState,
        connection: &ConnectionId,
    ) -> Result<bool> {
        loop {
            let Some(version) = state.read().version(connection) else {
                return Ok(true);
            };
            let groups = self
                .inner
                .backplane
                .connection_groups(&state.name, connection)
                .await?;
            if groups.is_empty()
                && self
                    .inner
                    .backplane
                    .connection(&state.name, connection)
                    .await?
                    .is_none()
            {
                return Ok(false);
            }
            let mut index = state.write();
            if index.version(connection) == Some(version) {
                index.set_groups(connection, groups.into_iter().collect());
                return Ok(true);
            }
        }
    }

    /// Unregisters a connection: its channel closes, its memberships go, pending client results
    /// sent to it fail with [`InvocationError::Disconnected`](crate::InvocationError::Disconnected).
    /// Returns `false` when no such connection was on this node.
    ///
    /// # Errors
    ///
    /// The driver's error; the connection is gone from this node either way, and the
    /// heartbeat job removes it from the backplane once the backplane answers again.
    pub async fn disconnect(&self, hub: &HubName, id: &ConnectionId) -> Result<bool> {
        let Some(state) = self.existing_hub(hub) else {
            return Ok(false);
        };
        let removed = state.write().remove(id).is_some();
        if !removed {
            return Ok(false);
        }
        self.fail_invocations_of(hub, id).await;
        if let Err(err) = self
            .inner
            .backplane
            .remove_connection(hub, id, &self.inner.id)
            .await
        {
            tracing::warn!(%err, hub = %hub, connection = %id, "could not unregister a connection; the heartbeat retries");
            self.orphans().push((hub.clone(), id.clone()));
            return Err(err);
        }
        tracing::debug!(hub = %hub, connection = %id, "connection unregistered");
        Ok(true)
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, Vec<(HubName, ConnectionId)>> {
        self.inner
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes from the backplane the connections whose removal failed before. Returns the
    /// first error; what could not be removed stays for the next try.
    async fn remove_orphans(&self) -> Result<()> {
        let orphans = std::mem::take(&mut *self.orphans());
        let mut outcome = Ok(());
        for (hub, id) in orphans {
            if let Err(err) = self
                .inner
                .backplane
                .remove_connection(&hub, &id, &self.inner.id)
                .await
            {
                self.orphans().push((hub, id));
                if outcome.is_ok() {
                    outcome = Err(err);
                }
            }
        }
        outcome
    }

    /// Publishes a message to every matching connection on every node, and waits until it is
    /// stored and delivered locally: [`publish_in_order`](Self::publish_in_order), then
    /// [`PendingPublish::wait`].
    ///
    /// Local recipients get it once it is stored; other nodes read it from the log. A
    /// connection-targeted message for local connections only never touches the log. A durable
    /// message is stored in each target user's inbox before anything is sent.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`], [`Error::InvalidMessage`], [`Error::UnknownConnection`] for a
    /// connection target that exists nowhere (nothing is sent then), or the driver's error: a
    /// message that could not be stored is never reported as sent.
    pub async fn publish(&self, message: Message) -> Result<Published> {
        self.publish_in_order(message).await?.wait().await
    }

    /// Takes a message's place in its sender's order and returns without waiting for the log:
    /// the checks, the durable copies in the users' inboxes and the queueing are done when this
    /// returns, and messages of one sender published one after the other are stored and
    /// delivered in that order. The returned [`PendingPublish`] says when (and whether) the
    /// message was stored and delivered locally; a sender that does not need to know can drop
    /// it and publish its next message meanwhile, so a burst from one sender shares appends.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish), for what fails before the message is queued.
    pub async fn publish_in_order(&self, message: Message) -> Result<PendingPublish> {
        message.validate(self.inner.options.max_payload)?;
        let state = self.hub(&message.hub).await?;
        let hub = &message.hub;
        let mut published = Published::default();
        let mut remote_target = message.target.clone();

        if let Target::Connections(ids) = &message.target {
            let remote: Vec<ConnectionId> = {
                let index = state.read();
                ids.iter()
                    .filter(|id| !index.contains(id))
                    .cloned()
                    .collect()
            };
            for id in &remote {
                if self.inner.backplane.connection(hub, id).await?.is_none() {
                    return Err(Error::UnknownConnection(id.to_string()));
                }
            }
            remote_target = Target::Connections(remote);
        }

        let mut records = Vec::new();
        match (&message.durability, &message.target) {
            (Durability::Durable { ttl }, Target::Users(users)) => {
                for user in users {
                    let id = self
                        .inner
                        .backplane
                        .enqueue(&NewDurableMessage {
                            hub: hub.clone(),
                            user: user.clone(),
                            sender: message.sender.clone(),
                            payload: message.payload.clone(),
                            ttl: *ttl,
                        })
                        .await?;
                    published.durable.push(id);
                    let expires = SystemTime::now() + *ttl;
                    records.push((
                        Target::Users(vec![user.clone()]),
                        Some((id, unix_ms(expires))),
                    ));
                }
            }
            _ => {
                let empty = matches!(&remote_target, Target::Connections(v) if v.is_empty());
                if !empty {
                    records.push((remote_target, None));
                }
            }
        }

        let encoded: Vec<Bytes> = records
            .iter()
            .map(|(target, durable)| {
                Record::Message(Envelope {
                    origin: self.inner.id.clone(),
                    target: target.clone(),
                    except: message.except.clone(),
                    durable: *durable,
                    payload: message.payload.clone(),
                })
                .encode()
            })
            .collect();
        let stream = self.stream_for(message.sender.as_ref());
        let (reply, answer) = oneshot::channel();
        let local =
            if records.is_empty() || !matches!(message.durability, Durability::Durable { .. }) {
                vec![(message.target, None)]
            } else {
                records
                    .into_iter()
                    .map(|(target, durable)| (target, durable.map(|(id, _)| id)))
                    .collect()
            };
        let request = publish::Request {
            state,
            encoded,
            local,
            except: message.except,
            payload: message.payload,
            reply,
        };
        self.pipeline(hub, stream)
            .send(request)
            .await
            .map_err(|_| Error::Shutdown)?;
        Ok(PendingPublish { answer, published })
    }

    /// The queue of the task that appends and delivers `stream` of `hub` for this node, started
    /// on first use.
    fn pipeline(&self, hub: &HubName, stream: u32) -> mpsc::Sender<publish::Request> {
        let mut pipelines = self
            .inner
            .pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = pipelines.get(&(hub.clone(), stream)) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(publish::QUEUE);
        pipelines.insert((hub.clone(), stream), tx.clone());
        drop(pipelines);
        self.spawn(publish::run(
            self.clone(),
            hub.clone(),
            stream,
            rx,
            self.inner.shutdown.subscribe(),
        ));
        tx
    }

    /// Hands a message to the matching local connections. A durable message read from the log
    /// (`from_log`) goes only where it is still due: another node may have delivered it and had
    /// it acknowledged while this node's reader was behind.
    async fn deliver_local(
        &self,
        state: &HubState,
        target: &Target,
        except: &[ConnectionId],
        payload: &Bytes,
        durable: Option<MessageId>,
        from_log: bool,
    ) {
        let Some(message) = durable else {
            // Transient: hand over under the read lock, without collecting recipients.
            let index = state.read();
            index.for_each_recipient(target, except, |id, connection| {
                let delivery = Delivery {
                    payload: payload.clone(),
                    kind: DeliveryKind::Message,
                };
                self.try_deliver(&state.name, id, &connection.tx, delivery);
            });
            return;
        };
        let mut recipients = state.read().recipients(target, except);
        {
            // A connection that got this message from its user's inbox on connect does not get
            // it again from the log.
            let mut index = state.write();
            recipients.retain(|(id, _)| index.claim_durable(id, message));
        }
        if recipients.is_empty() {
            return;
        }
        if from_log {
            match self
                .inner
                .backplane
                .durable_message(&state.name, message)
                .await
            {
                Ok(Some(stored)) if stored.acknowledged.is_none() => {}
                Ok(stored) => {
                    // Acknowledged, or expired and purged: not due any more to a connection
                    // that came later (it had its chance on connect). One of the user's
                    // connections that was there when the message was sent gets it anyway,
                    // as it would have without the reader's delay.
                    let created = stored
                        .filter(|s| s.expires_at > SystemTime::now())
                        .map(|s| s.created_at);
                    let mut index = state.write();
                    recipients.retain(|(id, _)| {
                        let due = created.is_some_and(|at| index.connected_before(id, at));
                        if !due {
                            index.release_durable(id, message);
                        }
                        due
                    });
                    drop(index);
                    if recipients.is_empty() {
                        return;
                    }
                }
                Err(err) => {
                    // Better twice than never: the client acknowledges by id.
                    tracing::warn!(%err, hub = %state.name, message = %message, "could not check whether a durable message is still due; delivering it");
                }
            }
        }
        for (id, tx) in recipients {
            let delivery = Delivery {
                payload: payload.clone(),
                kind: DeliveryKind::Durable(message),
            };
            let error = self.try_deliver(&state.name, &id, &tx, delivery);
            if let Err(err) = self
                .inner
                .backplane
                .record_attempt(&state.name, message, &id, error)
                .await
            {
                tracing::warn!(%err, hub = %state.name, message = %message, "could not record a delivery attempt");
            }
        }
    }

    /// Queues a delivery; returns the error text when it could not be queued. A full queue
    /// means a slow consumer, which is disconnected rather than silently skipped.
    fn try_deliver(
        &self,
        hub: &HubName,
        id: &ConnectionId,
        tx: &queue::Sender<Delivery>,
        delivery: Delivery,
    ) -> Option<&'static str> {
        let counters = &self.inner.counters;
        match tx.try_send(delivery) {
            Ok(()) => {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(queue::TrySendError::Closed(_)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                Some("connection closed")
            }
            Err(queue::TrySendError::Full(_)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Nothing after the missing delivery may reach the connection: it gets what is
                // queued, then the end.
                tx.close();
                tracing::warn!(hub = %hub, connection = %id, "slow consumer disconnected");
                self.emit(NodeEvent::SlowConsumer {
                    hub: hub.clone(),
                    connection: id.clone(),
                });
                let node = self.clone();
                let (hub, id) = (hub.clone(), id.clone());
                tokio::spawn(async move {
                    if let Err(err) = node.disconnect(&hub, &id).await {
                        tracing::warn!(%err, hub = %hub, connection = %id, "could not unregister a slow consumer");
                    }
                });
                Some("connection too slow: disconnected")
            }
        }
    }

    /// Adds a connection on any node to a group. Returns `false` when it already was a member.
    /// When this returns, messages sent to the group afterwards, from any node, reach it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] when the connection exists nowhere, or the driver's error.
    pub async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
    ) -> Result<bool> {
        self.change_group(hub, group, id, true).await
    }

    /// Removes a connection on any node from a group. Returns `false` when it was not a member.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
    ) -> Result<bool> {
        self.change_group(hub, group, id, false).await
    }

    async fn change_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
        member: bool,
    ) -> Result<bool> {
        let state = self.hub(hub).await?;
        let backplane = &self.inner.backplane;
        let changed = if member {
            backplane.add_to_group(hub, group, id).await?
        } else {
            backplane.remove_from_group(hub, group, id).await?
        };
        let local = {
            let mut index = state.write();
            let local = index.contains(id);
            if local {
                index.set_member(id, group, member);
            }
            local
        };
        if !local {
            // The owning node reloads the connection's groups when it reads this entry. It goes
            // to every stream, so whichever stream a later message takes, the change precedes it.
            // It is written even when the stored membership did not change: a first attempt may
            // have stored it and then failed to write this entry.
            let record = Record::GroupChanged {
                change: self.next_sequence() ^ crate::schema::stable_hash(self.inner.id.as_str()),
                connection: id.clone(),
                group: group.clone(),
                member,
            }
            .encode();
            for stream in 0..backplane.stream_count() {
                backplane
                    .append(hub, stream, std::slice::from_ref(&record))
                    .await?;
            }
        }
        Ok(changed)
    }

    /// Marks a durable message as received by `connection`, so it is not delivered again.
    /// Returns `false` when it was already acknowledged or does not exist.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn acknowledge(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        message: MessageId,
    ) -> Result<bool> {
        let acknowledged = self
            .inner
            .backplane
            .acknowledge(hub, message, connection)
            .await?;
        if let Some(state) = self.existing_hub(hub) {
            state.write().release_durable(connection, message);
        }
        Ok(acknowledged)
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
