//! Client results: server-to-client invocations that expect an answer, across nodes.
//!
//! The caller's node keeps a waiter per invocation; the node that holds the connection keeps
//! which connection each invocation was sent to and which node waits for it. Both directions
//! travel through the hub's log ([`Record::Invoke`], [`Record::Completion`]) unless caller and
//! connection share a node.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{Delivery, DeliveryKind, Node};
use crate::error::{Error, InvocationError, Result};
use crate::message::InvocationId;
use crate::name::{ConnectionId, HubName, NodeId};
use crate::record::{Outcome, Record};

#[derive(Debug)]
struct Waiter {
    node: NodeId,
    tx: oneshot::Sender<Result<Bytes>>,
}

#[derive(Debug)]
struct Sent {
    hub: HubName,
    connection: ConnectionId,
    caller: NodeId,
}

#[derive(Debug, Default)]
struct Tables {
    /// Invocations this node waits for, by id, with the node holding the connection.
    waiters: HashMap<InvocationId, Waiter>,
    /// Invocations sent to this node's connections, by id.
    sent: HashMap<InvocationId, Sent>,
}

#[derive(Debug, Default)]
pub(crate) struct Invocations {
    tables: Mutex<Tables>,
}

impl Invocations {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn resolve(&self, id: &InvocationId, outcome: Result<Bytes>) {
        if let Some(waiter) = self.lock().waiters.remove(id) {
            let _ = waiter.tx.send(outcome);
        }
    }

    /// Fails every waiter: the node is shutting down.
    pub(crate) fn fail_all(&self) {
        let waiters: Vec<Waiter> = self.lock().waiters.drain().map(|(_, w)| w).collect();
        for waiter in waiters {
            let _ = waiter.tx.send(Err(Error::Shutdown));
        }
    }

    /// Fails the waiters whose connection lives on one of `nodes`.
    pub(crate) fn fail_nodes(&self, nodes: &[NodeId]) {
        let failed: Vec<Waiter> = {
            let mut tables = self.lock();
            let ids: Vec<InvocationId> = tables
                .waiters
                .iter()
                .filter(|(_, w)| nodes.contains(&w.node))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| tables.waiters.remove(id))
                .collect()
        };
        for waiter in failed {
            let node = waiter.node.to_string();
            let _ = waiter.tx.send(Err(InvocationError::NodeGone(node).into()));
        }
    }

    /// The nodes that hold connections this node waits on.
    pub(crate) fn awaited_nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .lock()
            .waiters
            .values()
            .map(|w| w.node.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

/// Removes the waiter if the caller stops waiting (cancellation by drop).
struct WaiterGuard<'a> {
    invocations: &'a Invocations,
    id: InvocationId,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.invocations.lock().waiters.remove(&self.id);
    }
}

impl Node {
    /// Invokes a method on one client and waits for its result, wherever the connection lives.
    ///
    /// `payload` is what the connection receives as a [`Delivery`] of kind
    /// [`DeliveryKind::Invocation`]; its answer comes back through [`Node::complete`] on the node
    /// that holds it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] when no such connection exists; [`Error::Invocation`] when
    /// the client answers with an error, disconnects first, or its node dies; the driver's error
    /// when the invocation could not be sent.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the invocation; a result that arrives later is ignored.
    pub async fn invoke(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes> {
        let payload = payload.into();
        if payload.len() > self.inner.options.max_payload {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                max: self.inner.options.max_payload,
            });
        }
        let state = self.hub(hub).await?;
        let id = self.invocation_id();
        let invocations = &self.inner.invocations;
        let local_tx = state
            .read()
            .connections
            .get(connection)
            .map(|c| c.tx.clone());
        let owner = match &local_tx {
            Some(_) => self.inner.id.clone(),
            None => match self.inner.backplane.connection(hub, connection).await? {
                Some(info) => info.node,
                None => return Err(Error::UnknownConnection(connection.to_string())),
            },
        };
        let (tx, rx) = oneshot::channel();
        invocations.lock().waiters.insert(
            id.clone(),
            Waiter {
                node: owner.clone(),
                tx,
            },
        );
        let _guard = WaiterGuard {
            invocations,
            id: id.clone(),
        };
        match local_tx {
            Some(conn_tx) => {
                self.accept_invocation(
                    hub,
                    &id,
                    connection,
                    self.inner.id.clone(),
                    payload,
                    &conn_tx,
                )
                .await;
            }
            None => {
                let record = Record::Invoke {
                    id: id.clone(),
                    caller: self.inner.id.clone(),
                    node: owner,
                    connection: connection.clone(),
                    payload,
                }
                .encode();
                let stream = self.stream_for(Some(connection));
                self.inner
                    .backplane
                    .append(hub, stream, std::slice::from_ref(&record))
                    .await?;
            }
        }
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(InvocationError::Canceled.into()),
        }
    }

    /// Records an invocation for a local connection and hands it over; a connection that is
    /// gone fails the invocation at once.
    async fn accept_invocation(
        &self,
        hub: &HubName,
        id: &InvocationId,
        connection: &ConnectionId,
        caller: NodeId,
        payload: Bytes,
        tx: &crate::queue::Sender<Delivery>,
    ) {
        self.inner.invocations.lock().sent.insert(
            id.clone(),
            Sent {
                hub: hub.clone(),
                connection: connection.clone(),
                caller,
            },
        );
        let delivery = Delivery {
            payload,
            kind: DeliveryKind::Invocation(id.clone()),
        };
        if self.try_deliver(hub, connection, tx, delivery).is_some()
            && let Err(err) = self
                .finish(id, Outcome::Disconnected(connection.clone()))
                .await
        {
            tracing::warn!(%err, invocation = %id, "could not report an undeliverable invocation");
        }
    }

    /// Completes an invocation that was sent to `connection` on this node, with the client's
    /// result or error text. A completion for an invocation whose caller stopped waiting is
    /// accepted and ignored.
    ///
    /// # Errors
    ///
    /// [`InvocationError::WrongConnection`] when the invocation was sent to another connection
    /// (it stays pending for the right one); [`InvocationError::UnknownInvocation`] when no
    /// invocation with this id is pending here; the driver's error when the result could not be
    /// sent back to the caller's node.
    pub async fn complete(
        &self,
        connection: &ConnectionId,
        id: &InvocationId,
        result: std::result::Result<Bytes, String>,
    ) -> Result<()> {
        {
            let tables = self.inner.invocations.lock();
            match tables.sent.get(id) {
                None => {
                    return Err(InvocationError::UnknownInvocation(id.to_string()).into());
                }
                Some(sent) if &sent.connection != connection => {
                    return Err(InvocationError::WrongConnection {
                        id: id.to_string(),
                        connection: connection.to_string(),
                    }
                    .into());
                }
                Some(_) => {}
            }
        }
        let outcome = match result {
            Ok(bytes) => Outcome::Result(bytes),
            Err(text) => Outcome::ClientError(text),
        };
        self.finish(id, outcome).await
    }

    /// Sends an invocation's outcome to its caller, local or remote. The invocation stays
    /// pending until the outcome is on its way, so a completion that could not be sent can be
    /// sent again.
    async fn finish(&self, id: &InvocationId, outcome: Outcome) -> Result<()> {
        let (hub, connection, caller) = {
            let tables = self.inner.invocations.lock();
            let Some(sent) = tables.sent.get(id) else {
                return Ok(());
            };
            (
                sent.hub.clone(),
                sent.connection.clone(),
                sent.caller.clone(),
            )
        };
        if caller == self.inner.id {
            self.inner.invocations.lock().sent.remove(id);
            self.inner.invocations.resolve(id, outcome_result(outcome));
            return Ok(());
        }
        let record = Record::Completion {
            id: id.clone(),
            caller,
            outcome,
        }
        .encode();
        let stream = self.stream_for(Some(&connection));
        self.inner
            .backplane
            .append(&hub, stream, std::slice::from_ref(&record))
            .await?;
        self.inner.invocations.lock().sent.remove(id);
        Ok(())
    }

    /// Fails every invocation sent to a connection that went away.
    pub(super) async fn fail_invocations_of(&self, hub: &HubName, connection: &ConnectionId) {
        let ids: Vec<InvocationId> = self
            .inner
            .invocations
            .lock()
            .sent
            .iter()
            .filter(|(_, s)| &s.connection == connection && &s.hub == hub)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Err(err) = self
                .finish(&id, Outcome::Disconnected(connection.clone()))
                .await
            {
                // Nobody can complete it any more; the caller's node fails it when it learns
                // that the connection or its node is gone, or when its caller gives up.
                self.inner.invocations.lock().sent.remove(&id);
                tracing::warn!(%err, invocation = %id, "could not report a disconnected invocation");
            }
        }
    }

    /// Handles an invocation read from the log.
    pub(super) async fn on_invoke(
        &self,
        hub: &HubName,
        id: InvocationId,
        caller: NodeId,
        node: &NodeId,
        connection: ConnectionId,
        payload: Bytes,
    ) -> Result<()> {
        if node != &self.inner.id {
            return Ok(());
        }
        let tx = self
            .existing_hub(hub)
            .and_then(|s| s.read().connections.get(&connection).map(|c| c.tx.clone()));
        match tx {
            Some(tx) => {
                self.accept_invocation(hub, &id, &connection, caller, payload, &tx)
                    .await;
                Ok(())
            }
            None => {
                self.inner.invocations.lock().sent.insert(
                    id.clone(),
                    Sent {
                        hub: hub.clone(),
                        connection: connection.clone(),
                        caller,
                    },
                );
                let outcome = self.finish(&id, Outcome::Disconnected(connection)).await;
                self.inner.invocations.lock().sent.remove(&id);
                outcome
            }
        }
    }

    /// Handles a completion read from the log.
    pub(super) fn on_completion(&self, id: &InvocationId, caller: &NodeId, outcome: Outcome) {
        if caller == &self.inner.id {
            self.inner.invocations.resolve(id, outcome_result(outcome));
        }
    }
}

fn outcome_result(outcome: Outcome) -> Result<Bytes> {
    match outcome {
        Outcome::Result(bytes) => Ok(bytes),
        Outcome::ClientError(text) => Err(InvocationError::Client(text).into()),
        Outcome::Disconnected(c) => Err(InvocationError::Disconnected(c.to_string()).into()),
    }
}
