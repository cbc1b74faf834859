//! `wrapped://`: a backplane driver kept out of the backplane workspace. Its storage is the
//! in-memory backplane; what matters is what a driver needs around it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backplane_conformance::{Factory, Namespace, Spec};
use backplane_core::{
    Backplane, Check, ConnectionId, ConnectionInfo, DeliveryAttempt, Driver, DurableMessage,
    Error, GroupName, HubName, LogEntry, MemoryBackplane, MessageId, NewDurableMessage, NodeId,
    NodeInfo, Position, Result, Retention, SharedBackplane, UserId, UserSession, Wakeups,
};
use bytes::Bytes;

/// The driver: every call goes to the backplane it wraps.
#[derive(Debug, Clone, Default)]
pub struct Wrapped(MemoryBackplane);

#[async_trait]
impl Backplane for Wrapped {
    fn driver_name(&self) -> &'static str {
        Self::NAME
    }
    fn stream_count(&self) -> u32 {
        self.0.stream_count()
    }
    async fn append(&self, hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position> {
        self.0.append(hub, stream, records).await
    }
    async fn read(&self, hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>> {
        self.0.read(hub, from, limit).await
    }
    async fn tail(&self, hub: &HubName, stream: u32) -> Result<Position> {
        self.0.tail(hub, stream).await
    }
    async fn subscribe(&self, hub: &HubName) -> Result<Wakeups> {
        self.0.subscribe(hub).await
    }
    async fn trim(&self, retention: &Retention) -> Result<u64> {
        self.0.trim(retention).await
    }
    async fn register_node(&self, node: &NodeId, address: Option<&str>) -> Result<()> {
        self.0.register_node(node, address).await
    }
    async fn heartbeat(&self, node: &NodeId) -> Result<bool> {
        self.0.heartbeat(node).await
    }
    async fn unregister_node(&self, node: &NodeId) -> Result<()> {
        self.0.unregister_node(node).await
    }
    async fn live_nodes(&self) -> Result<Vec<NodeInfo>> {
        self.0.live_nodes().await
    }
    async fn reap_nodes(&self, timeout: Duration) -> Result<Vec<NodeId>> {
        self.0.reap_nodes(timeout).await
    }
    async fn add_connection(&self, connection: &ConnectionInfo) -> Result<()> {
        self.0.add_connection(connection).await
    }
    async fn remove_connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        node: &NodeId,
    ) -> Result<Option<ConnectionInfo>> {
        self.0.remove_connection(hub, connection, node).await
    }
    async fn connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Option<ConnectionInfo>> {
        self.0.connection(hub, connection).await
    }
    async fn user_connections(&self, hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>> {
        self.0.user_connections(hub, user).await
    }
    async fn online_users(&self, hub: &HubName) -> Result<Vec<UserId>> {
        self.0.online_users(hub).await
    }
    async fn user_session(&self, hub: &HubName, user: &UserId) -> Result<Option<UserSession>> {
        self.0.user_session(hub, user).await
    }
    async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        self.0.add_to_group(hub, group, connection).await
    }
    async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        self.0.remove_from_group(hub, group, connection).await
    }
    async fn group_members(&self, hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>> {
        self.0.group_members(hub, group).await
    }
    async fn connection_groups(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Vec<GroupName>> {
        self.0.connection_groups(hub, connection).await
    }
    async fn enqueue(&self, message: &NewDurableMessage) -> Result<MessageId> {
        self.0.enqueue(message).await
    }
    async fn pending(&self, hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>> {
        self.0.pending(hub, user).await
    }
    async fn durable_message(
        &self,
        hub: &HubName,
        id: MessageId,
    ) -> Result<Option<DurableMessage>> {
        self.0.durable_message(hub, id).await
    }
    async fn acknowledge(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
    ) -> Result<bool> {
        self.0.acknowledge(hub, id, connection).await
    }
    async fn record_attempt(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
        error: Option<&str>,
    ) -> Result<()> {
        self.0.record_attempt(hub, id, connection, error).await
    }
    async fn attempts(&self, hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>> {
        self.0.attempts(hub, id).await
    }
    async fn purge_expired(&self) -> Result<u64> {
        self.0.purge_expired().await
    }
    async fn pending_count(&self) -> Result<u64> {
        self.0.pending_count().await
    }
}

/// What picking it by URL needs.
#[async_trait]
impl Driver for Wrapped {
    const NAME: &'static str = "wrapped";
    const URL_SCHEMES: &'static [&'static str] = &["wrapped"];
    const URL_FORMS: &'static str = "`wrapped://`";

    async fn connect_url(url: &str) -> Result<Self> {
        match Self::accepts(url) {
            true => Ok(Self::default()),
            false => Err(Error::permanent(Self::NAME, "not a wrapped:// URL")),
        }
    }

    fn ddl_url(_url: &str, _hubs: &[HubName]) -> Result<String> {
        Err(Error::permanent(Self::NAME, "no schema"))
    }

    async fn doctor_url(_url: &str) -> Result<Vec<Check>> {
        Ok(vec![Check::new("wrapped", Ok("nothing to check".into()))])
    }
}

/// What the conformance suite needs: a fresh, empty backplane per namespace.
#[derive(Debug, Clone, Copy)]
pub struct WrappedFactory;

#[async_trait]
impl Factory for WrappedFactory {
    fn driver_name(&self) -> &'static str {
        Wrapped::NAME
    }

    async fn namespace(&self, spec: &Spec) -> std::result::Result<Box<dyn Namespace>, String> {
        let backplane = Wrapped(MemoryBackplane::new().streams(spec.streams));
        Ok(Box::new(WrappedNamespace(backplane)))
    }
}

struct WrappedNamespace(Wrapped);

#[async_trait]
impl Namespace for WrappedNamespace {
    async fn backplane(&self) -> std::result::Result<SharedBackplane, String> {
        Ok(Arc::new(self.0.clone()))
    }
}
