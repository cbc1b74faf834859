//! Connections coming and going: registering one (and reloading its groups), and removing
//! it, with a retry for the removals the backplane did not take.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use crate::backplane::ConnectionInfo;
use crate::error::{Error, Result};
use crate::name::{ConnectionId, HubName, UserId};
use crate::queue;

use super::local::LocalConnection;

use super::local::{self};
use super::{Connection, HubState, Node};

impl Node {
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
    pub(super) async fn register_connection(
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

    pub(super) fn orphans(&self) -> std::sync::MutexGuard<'_, Vec<(HubName, ConnectionId)>> {
        self.inner
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes from the backplane the connections whose removal failed before. Returns the
    /// first error; what could not be removed stays for the next try.
    pub(super) async fn remove_orphans(&self) -> Result<()> {
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
}
