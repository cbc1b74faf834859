//! Durable messages on this node: delivering a user's pending ones when a connection comes,
//! and acknowledging one a connection received.

use crate::error::Result;
use crate::message::MessageId;
use crate::name::{ConnectionId, HubName, UserId};
use crate::queue;

use super::local::{Delivery, DeliveryKind};
use super::{HubState, Node};

impl Node {
    pub(super) async fn deliver_pending(
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
}
