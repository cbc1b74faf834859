//! The in-memory driver: every semantic of the contract, in one process.
//!
//! Several [`Node`](crate::Node)s created on clones of one [`MemoryBackplane`] share state as
//! nodes on one database would, which is what tests and single-process deployments need.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::backplane::{
    Backplane, ConnectionInfo, DEFAULT_STREAMS, DeliveryAttempt, DurableMessage, LogEntry,
    NewDurableMessage, NodeInfo, Retention, StreamBounds, UserSession, WakeupHub, Wakeups,
    checked_read,
};
use crate::driver::{Check, Driver};
use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::name::{ConnectionId, GroupName, HubName, NodeId, UserId};
use crate::position::Position;

/// A backplane that keeps everything in this process's memory.
///
/// Clones share state. It is the embedded default: one node and no database, or several nodes in
/// one process (tests).
///
/// # Examples
///
/// ```
/// use backplane_core::{Backplane, MemoryBackplane};
///
/// let backplane = MemoryBackplane::new().streams(8);
/// assert_eq!(backplane.stream_count(), 8);
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBackplane {
    shared: Arc<Shared>,
    streams: u32,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wakeups: WakeupHub,
}

#[derive(Debug, Default)]
struct State {
    unavailable: bool,
    logs: HashMap<HubName, Vec<Stream>>,
    nodes: BTreeMap<NodeId, Node>,
    hubs: HashMap<HubName, Hub>,
    next_message: u64,
}

#[derive(Debug)]
struct Stream {
    epoch: u64,
    first: u64,
    entries: VecDeque<(Bytes, Instant)>,
}

#[derive(Debug)]
struct Node {
    started_at: SystemTime,
    last_heartbeat: SystemTime,
    heartbeat_at: Instant,
    address: Option<String>,
}

#[derive(Debug, Default)]
struct Hub {
    connections: HashMap<ConnectionId, Connection>,
    groups: HashMap<GroupName, BTreeSet<ConnectionId>>,
    sessions: HashMap<UserId, UserSession>,
    inbox: BTreeMap<MessageId, Stored>,
}

#[derive(Debug)]
struct Connection {
    info: ConnectionInfo,
    groups: BTreeSet<GroupName>,
}

#[derive(Debug)]
struct Stored {
    message: DurableMessage,
    expires: Instant,
    attempts: Vec<DeliveryAttempt>,
}

impl Default for MemoryBackplane {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Driver for MemoryBackplane {
    const NAME: &'static str = "memory";
    const URL_SCHEMES: &'static [&'static str] = &["memory"];
    const URL_FORMS: &'static str = "`memory://` (one node, no database)";

    async fn connect_url(url: &str) -> Result<Self> {
        if Self::accepts(url) {
            Ok(Self::new())
        } else {
            Err(Error::permanent(Self::NAME, "not a memory:// URL"))
        }
    }

    fn ddl_url(_url: &str, _hubs: &[HubName]) -> Result<String> {
        Err(Error::permanent(
            Self::NAME,
            "the memory backplane has no schema",
        ))
    }

    async fn doctor_url(_url: &str) -> Result<Vec<Check>> {
        Ok(vec![Check::new(
            "memory://",
            Ok("nothing to check: the memory backplane lives in the process".into()),
        )])
    }
}

impl MemoryBackplane {
    /// An empty backplane with [`DEFAULT_STREAMS`] streams per hub.
    pub fn new() -> Self {
        Self {
            shared: Arc::default(),
            streams: DEFAULT_STREAMS,
        }
    }

    /// Sets the number of streams per hub (at least 1). Defaults to 4.
    pub fn streams(mut self, streams: u32) -> Self {
        self.streams = streams.max(1);
        self
    }

    /// Drops every wake-up subscription, as a database would when its listener connection dies.
    /// Subscribers see [`Wake::Closed`](crate::Wake::Closed) and must subscribe again.
    pub fn interrupt_wakeups(&self) {
        self.shared.wakeups.close_all();
    }

    /// Takes the last `count` entries off a stream and its end back with them, keeping its
    /// epoch, as restoring a backup or failing over to a standby that had not received them
    /// would. For fault tests and drills.
    pub fn rewind(&self, hub: &HubName, stream: u32, count: u64) {
        let mut state = self.state_unchecked();
        if let Some(log) = state.streams(hub, self.streams).get_mut(stream as usize) {
            let keep = (log.entries.len() as u64).saturating_sub(count);
            log.entries
                .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        }
    }

    /// Makes every call fail with a transient error while `false`, as a database that is
    /// restarting would; data is kept.
    pub fn set_available(&self, available: bool) {
        self.state_unchecked().unavailable = !available;
        if available {
            self.shared.wakeups.resync_all();
        } else {
            self.shared.wakeups.close_all();
        }
    }

    fn state_unchecked(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state_unchecked();
        if state.unavailable {
            return Err(Error::transient(Self::NAME, "backplane unavailable"));
        }
        Ok(state)
    }

    fn check_stream(&self, stream: u32) -> Result<()> {
        if stream >= self.streams {
            return Err(Error::UnknownStream {
                stream,
                streams: self.streams,
            });
        }
        Ok(())
    }
}

impl State {
    fn streams(&mut self, hub: &HubName, count: u32) -> &mut Vec<Stream> {
        self.logs.entry(hub.clone()).or_insert_with(|| {
            (0..count)
                .map(|_| Stream {
                    epoch: Position::random_epoch(),
                    first: 0,
                    entries: VecDeque::new(),
                })
                .collect()
        })
    }

    fn hub(&mut self, hub: &HubName) -> &mut Hub {
        self.hubs.entry(hub.clone()).or_default()
    }

    fn remove_node(&mut self, node: &NodeId) {
        self.nodes.remove(node);
        for hub in self.hubs.values_mut() {
            let gone: Vec<ConnectionId> = hub
                .connections
                .values()
                .filter(|c| &c.info.node == node)
                .map(|c| c.info.id.clone())
                .collect();
            for id in gone {
                hub.remove_connection(&id);
            }
        }
    }
}

impl Hub {
    fn remove_connection(&mut self, id: &ConnectionId) -> Option<ConnectionInfo> {
        let connection = self.connections.remove(id)?;
        for group in &connection.groups {
            if let Some(members) = self.groups.get_mut(group) {
                members.remove(id);
                if members.is_empty() {
                    self.groups.remove(group);
                }
            }
        }
        if let Some(user) = &connection.info.user
            && let Some(session) = self.sessions.get_mut(user)
        {
            let now = SystemTime::now();
            session.connections = session.connections.saturating_sub(1);
            session.last_activity = now;
            if session.connections == 0 {
                session.ended_at = Some(now);
            }
        }
        Some(connection.info)
    }

    fn live(stored: &Stored, now: Instant) -> bool {
        stored.message.acknowledged.is_none() && stored.expires > now
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    fn driver_name(&self) -> &'static str {
        Self::NAME
    }

    fn stream_count(&self) -> u32 {
        self.streams
    }

    async fn append(&self, hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position> {
        self.check_stream(stream)?;
        let position = {
            let mut state = self.state()?;
            let log = &mut state.streams(hub, self.streams)[stream as usize];
            let offset = log.first + log.entries.len() as u64;
            let now = Instant::now();
            log.entries
                .extend(records.iter().map(|record| (record.clone(), now)));
            Position::new(stream, offset, log.epoch)
        };
        if !records.is_empty() {
            self.shared.wakeups.notify(hub, stream);
        }
        Ok(position)
    }

    async fn read(&self, hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>> {
        self.check_stream(from.stream)?;
        let mut state = self.state()?;
        let log = &state.streams(hub, self.streams)[from.stream as usize];
        let bounds = StreamBounds {
            epoch: log.epoch,
            first: log.first,
            end: log.first + log.entries.len() as u64,
        };
        let skip = usize::try_from(from.offset.saturating_sub(log.first)).unwrap_or(usize::MAX);
        let entries = log
            .entries
            .iter()
            .skip(skip)
            .take(limit)
            .zip(from.offset..)
            .map(|((data, _), offset)| LogEntry {
                offset,
                data: data.clone(),
            })
            .collect();
        checked_read(from, bounds, entries)
    }

    async fn tail(&self, hub: &HubName, stream: u32) -> Result<Position> {
        self.check_stream(stream)?;
        let mut state = self.state()?;
        let log = &state.streams(hub, self.streams)[stream as usize];
        Ok(Position::new(
            stream,
            log.first + log.entries.len() as u64,
            log.epoch,
        ))
    }

    async fn subscribe(&self, hub: &HubName) -> Result<Wakeups> {
        let _state = self.state()?;
        Ok(self.shared.wakeups.subscribe(hub))
    }

    async fn trim(&self, retention: &Retention) -> Result<u64> {
        let mut state = self.state()?;
        let now = Instant::now();
        let mut removed = 0;
        for log in state
            .logs
            .values_mut()
            .flat_map(|streams| streams.iter_mut())
        {
            while let Some((_, at)) = log.entries.front() {
                let too_many = log.entries.len() as u64 > retention.max_entries;
                if !too_many && now.duration_since(*at) <= retention.max_age {
                    break;
                }
                log.entries.pop_front();
                log.first += 1;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn register_node(&self, node: &NodeId, address: Option<&str>) -> Result<()> {
        let mut state = self.state()?;
        let now = SystemTime::now();
        let entry = state.nodes.entry(node.clone()).or_insert(Node {
            started_at: now,
            last_heartbeat: now,
            heartbeat_at: Instant::now(),
            address: None,
        });
        entry.last_heartbeat = now;
        entry.heartbeat_at = Instant::now();
        entry.address = address.map(str::to_owned);
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId) -> Result<bool> {
        let mut state = self.state()?;
        let now = SystemTime::now();
        let Some(entry) = state.nodes.get_mut(node) else {
            return Ok(false);
        };
        entry.last_heartbeat = now;
        entry.heartbeat_at = Instant::now();
        for hub in state.hubs.values_mut() {
            let users: BTreeSet<UserId> = hub
                .connections
                .values()
                .filter(|c| &c.info.node == node)
                .filter_map(|c| c.info.user.clone())
                .collect();
            for user in users {
                if let Some(session) = hub.sessions.get_mut(&user) {
                    session.last_activity = now;
                }
            }
        }
        Ok(true)
    }

    async fn unregister_node(&self, node: &NodeId) -> Result<()> {
        self.state()?.remove_node(node);
        Ok(())
    }

    async fn live_nodes(&self) -> Result<Vec<NodeInfo>> {
        let state = self.state()?;
        Ok(state
            .nodes
            .iter()
            .map(|(id, node)| NodeInfo {
                id: id.clone(),
                started_at: node.started_at,
                last_heartbeat: node.last_heartbeat,
                address: node.address.clone(),
            })
            .collect())
    }

    async fn reap_nodes(&self, timeout: Duration) -> Result<Vec<NodeId>> {
        let mut state = self.state()?;
        let now = Instant::now();
        let dead: Vec<NodeId> = state
            .nodes
            .iter()
            .filter(|(_, node)| now.duration_since(node.heartbeat_at) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for node in &dead {
            state.remove_node(node);
        }
        // Connections whose node is not registered (none can arise here, where every call is
        // atomic, but the contract holds them to it).
        let State { nodes, hubs, .. } = &mut *state;
        for hub in hubs.values_mut() {
            let orphans: Vec<ConnectionId> = hub
                .connections
                .values()
                .filter(|c| !nodes.contains_key(&c.info.node))
                .map(|c| c.info.id.clone())
                .collect();
            for id in orphans {
                hub.remove_connection(&id);
            }
        }
        Ok(dead)
    }

    async fn add_connection(&self, connection: &ConnectionInfo) -> Result<()> {
        let mut state = self.state()?;
        let hub = state.hub(&connection.hub);
        if hub.connections.contains_key(&connection.id) {
            return Err(Error::DuplicateConnection(connection.id.to_string()));
        }
        let now = SystemTime::now();
        let mut info = connection.clone();
        info.connected_at = now;
        if let Some(user) = &info.user {
            let session = hub.sessions.entry(user.clone()).or_insert(UserSession {
                user: user.clone(),
                started_at: now,
                ended_at: None,
                connections: 0,
                last_activity: now,
            });
            if session.connections == 0 {
                session.started_at = now;
                session.ended_at = None;
            }
            session.connections += 1;
            session.last_activity = now;
        }
        hub.connections.insert(
            info.id.clone(),
            Connection {
                info,
                groups: BTreeSet::new(),
            },
        );
        Ok(())
    }

    async fn remove_connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        node: &NodeId,
    ) -> Result<Option<ConnectionInfo>> {
        let mut state = self.state()?;
        let hub = state.hub(hub);
        if hub
            .connections
            .get(connection)
            .is_none_or(|c| &c.info.node != node)
        {
            return Ok(None);
        }
        Ok(hub.remove_connection(connection))
    }

    async fn connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Option<ConnectionInfo>> {
        let mut state = self.state()?;
        Ok(state
            .hub(hub)
            .connections
            .get(connection)
            .map(|c| c.info.clone()))
    }

    async fn user_connections(&self, hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>> {
        let mut state = self.state()?;
        let mut found: Vec<ConnectionInfo> = state
            .hub(hub)
            .connections
            .values()
            .filter(|c| c.info.user.as_ref() == Some(user))
            .map(|c| c.info.clone())
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    async fn online_users(&self, hub: &HubName) -> Result<Vec<UserId>> {
        let mut state = self.state()?;
        let users: BTreeSet<UserId> = state
            .hub(hub)
            .connections
            .values()
            .filter_map(|c| c.info.user.clone())
            .collect();
        Ok(users.into_iter().collect())
    }

    async fn user_session(&self, hub: &HubName, user: &UserId) -> Result<Option<UserSession>> {
        Ok(self.state()?.hub(hub).sessions.get(user).cloned())
    }

    async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let mut state = self.state()?;
        let hub = state.hub(hub);
        let Some(conn) = hub.connections.get_mut(connection) else {
            return Err(Error::UnknownConnection(connection.to_string()));
        };
        if !conn.groups.insert(group.clone()) {
            return Ok(false);
        }
        hub.groups
            .entry(group.clone())
            .or_default()
            .insert(connection.clone());
        Ok(true)
    }

    async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let mut state = self.state()?;
        let hub = state.hub(hub);
        let Some(conn) = hub.connections.get_mut(connection) else {
            return Ok(false);
        };
        if !conn.groups.remove(group) {
            return Ok(false);
        }
        if let Some(members) = hub.groups.get_mut(group) {
            members.remove(connection);
            if members.is_empty() {
                hub.groups.remove(group);
            }
        }
        Ok(true)
    }

    async fn group_members(&self, hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>> {
        let mut state = self.state()?;
        Ok(state
            .hub(hub)
            .groups
            .get(group)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn connection_groups(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Vec<GroupName>> {
        let mut state = self.state()?;
        Ok(state
            .hub(hub)
            .connections
            .get(connection)
            .map(|c| c.groups.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn enqueue(&self, message: &NewDurableMessage) -> Result<MessageId> {
        let mut state = self.state()?;
        state.next_message += 1;
        let id = MessageId(state.next_message);
        let now = SystemTime::now();
        let stored = Stored {
            message: DurableMessage {
                id,
                hub: message.hub.clone(),
                user: message.user.clone(),
                sender: message.sender.clone(),
                payload: message.payload.clone(),
                created_at: now,
                expires_at: now + message.ttl,
                acknowledged: None,
            },
            expires: Instant::now() + message.ttl,
            attempts: Vec::new(),
        };
        state.hub(&message.hub).inbox.insert(id, stored);
        Ok(id)
    }

    async fn pending(&self, hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>> {
        let mut state = self.state()?;
        let now = Instant::now();
        Ok(state
            .hub(hub)
            .inbox
            .values()
            .filter(|s| &s.message.user == user && Hub::live(s, now))
            .map(|s| s.message.clone())
            .collect())
    }

    async fn durable_message(
        &self,
        hub: &HubName,
        id: MessageId,
    ) -> Result<Option<DurableMessage>> {
        let mut state = self.state()?;
        Ok(state.hub(hub).inbox.get(&id).map(|s| s.message.clone()))
    }

    async fn acknowledge(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let mut state = self.state()?;
        let Some(stored) = state.hub(hub).inbox.get_mut(&id) else {
            return Ok(false);
        };
        if stored.message.acknowledged.is_some() {
            return Ok(false);
        }
        stored.message.acknowledged = Some((connection.clone(), SystemTime::now()));
        Ok(true)
    }

    async fn record_attempt(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
        error: Option<&str>,
    ) -> Result<()> {
        let mut state = self.state()?;
        if let Some(stored) = state.hub(hub).inbox.get_mut(&id) {
            stored.attempts.push(DeliveryAttempt {
                connection: connection.clone(),
                at: SystemTime::now(),
                error: error.map(str::to_owned),
            });
        }
        Ok(())
    }

    async fn attempts(&self, hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>> {
        let mut state = self.state()?;
        Ok(state
            .hub(hub)
            .inbox
            .get(&id)
            .map(|s| s.attempts.clone())
            .unwrap_or_default())
    }

    async fn purge_expired(&self) -> Result<u64> {
        let mut state = self.state()?;
        let now = Instant::now();
        let mut purged = 0;
        for hub in state.hubs.values_mut() {
            let before = hub.inbox.len();
            hub.inbox.retain(|_, s| s.expires > now);
            purged += (before - hub.inbox.len()) as u64;
        }
        Ok(purged)
    }

    async fn pending_count(&self) -> Result<u64> {
        let state = self.state()?;
        let now = Instant::now();
        Ok(state
            .hubs
            .values()
            .flat_map(|h| h.inbox.values())
            .filter(|s| Hub::live(s, now))
            .count() as u64)
    }
}
