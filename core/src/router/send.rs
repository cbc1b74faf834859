//! Sending: publishing a message in its sender's order through the stream's pipeline, and
//! delivering it to this node's connections.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::backplane::NewDurableMessage;
use crate::error::{Error, Result};
use crate::message::{Durability, Message, MessageId, Target};
use crate::name::{ConnectionId, HubName};
use crate::queue;
use crate::record::{Envelope, Record};

use super::local::{Delivery, DeliveryKind};
use super::publish::{self, PendingPublish};
use super::{HubState, Node, NodeEvent, Published, unix_ms};

impl Node {
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
    pub(super) fn pipeline(&self, hub: &HubName, stream: u32) -> mpsc::Sender<publish::Request> {
        self.inner.pipelines.get(hub, stream, |rx| {
            self.spawn(publish::run(
                self.clone(),
                hub.clone(),
                stream,
                rx,
                self.inner.shutdown.subscribe(),
            ));
        })
    }

    /// Hands a message to the matching local connections. A durable message read from the log
    /// (`from_log`) goes only where it is still due: another node may have delivered it and had
    /// it acknowledged while this node's reader was behind.
    pub(super) async fn deliver_local(
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
    pub(super) fn try_deliver(
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
}
