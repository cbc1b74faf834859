//! The publishing side of a node: per hub and stream, one task takes queued messages in order,
//! appends what has queued in one call, and delivers each message to the local connections
//! once it is stored, in the order the messages were queued.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::{HubState, Node, Published};
use crate::error::{Error, Result};
use crate::message::{MessageId, Target};
use crate::name::{ConnectionId, HubName};
use crate::position::Position;

/// Messages queued per hub and stream before publishers wait: the backpressure on a burst.
pub(super) const QUEUE: usize = 1024;

/// The most log records one append carries.
const MAX_RECORDS: usize = 256;

/// One message, checked and encoded, waiting for its append.
pub(super) struct Request {
    pub(super) state: Arc<HubState>,
    /// The log records; none for a message to local connections only.
    pub(super) encoded: Vec<Bytes>,
    /// Who gets it on this node: each target with the durable message id it carries.
    pub(super) local: Vec<(Target, Option<MessageId>)>,
    pub(super) except: Vec<ConnectionId>,
    pub(super) payload: Bytes,
    pub(super) reply: oneshot::Sender<Result<Option<Position>>>,
}

/// A message that has its place in its sender's order; see [`Node::publish_in_order`].
#[derive(Debug)]
#[must_use = "dropping it is fine, but then nobody learns whether the message was stored"]
pub struct PendingPublish {
    pub(super) answer: oneshot::Receiver<Result<Option<Position>>>,
    pub(super) published: Published,
}

impl PendingPublish {
    /// Waits until the message is stored and delivered to the local connections.
    ///
    /// # Errors
    ///
    /// The driver's error when the message could not be stored (it was then sent nowhere), or
    /// [`Error::Shutdown`].
    pub async fn wait(self) -> Result<Published> {
        let position = self.answer.await.map_err(|_| Error::Shutdown)??;
        Ok(Published {
            position,
            ..self.published
        })
    }
}

/// Appends and delivers the messages of `stream` of `hub` until the node shuts down.
pub(super) async fn run(
    node: Node,
    hub: HubName,
    stream: u32,
    mut queue: mpsc::Receiver<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            request = queue.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut records = first.encoded.len();
        let mut batch = vec![first];
        while records < MAX_RECORDS {
            match queue.try_recv() {
                Ok(request) => {
                    records += request.encoded.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        // One message (the common case when the load is light) appends its own records.
        let joined: Vec<Bytes>;
        let all: &[Bytes] = if let [only] = batch.as_slice() {
            &only.encoded
        } else {
            joined = batch
                .iter()
                .flat_map(|r| r.encoded.iter().cloned())
                .collect();
            &joined
        };
        let appended = if all.is_empty() {
            Ok(None)
        } else {
            node.inner
                .backplane
                .append(&hub, stream, all)
                .await
                .map(Some)
        };
        let base = match appended {
            Ok(base) => base,
            Err(err) => {
                // The last message gets the error itself, the others a copy of it.
                let mut original = Some(err);
                let last = batch.len().saturating_sub(1);
                for (i, request) in batch.into_iter().enumerate() {
                    let reply = if i == last {
                        original.take().unwrap_or(Error::Shutdown)
                    } else {
                        original
                            .as_ref()
                            .map_or(Error::Shutdown, |e| e.copy_for("backplane"))
                    };
                    let _ = request.reply.send(Err(reply));
                }
                continue;
            }
        };
        let mut offset = base.map(|p| p.offset);
        for request in batch {
            let position = match (base, offset) {
                (Some(base), Some(at)) if !request.encoded.is_empty() => {
                    let count = request.encoded.len() as u64;
                    let position = base.at(at);
                    request
                        .state
                        .own
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(position, count);
                    offset = Some(at + count);
                    Some(position)
                }
                _ => None,
            };
            node.inner
                .counters
                .published
                .fetch_add(1, Ordering::Relaxed);
            for (target, durable) in &request.local {
                node.deliver_local(
                    &request.state,
                    target,
                    &request.except,
                    &request.payload,
                    *durable,
                )
                .await;
            }
            let _ = request.reply.send(Ok(position));
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::time::Duration;

    use crate::{ConnectionId, HubName, MemoryBackplane, Message, Node, NodeOptions};

    #[tokio::test]
    async fn queued_publishes_keep_their_order_and_share_appends() {
        let node = Node::start(
            std::sync::Arc::new(MemoryBackplane::new()),
            NodeOptions::new(),
        )
        .await
        .expect("a node");
        let hub = HubName::new("chat").expect("valid");
        let sender = ConnectionId::new("sender").expect("valid");
        let mut receiver = node.connect(&hub, None, None).await.expect("connected");
        let mut pending = Vec::new();
        for i in 0..200u32 {
            let message = Message::to_all(hub.clone(), i.to_string()).sender(sender.clone());
            pending.push(node.publish_in_order(message).await.expect("queued"));
        }
        let mut positions = Vec::new();
        for p in pending {
            let published = p.wait().await.expect("stored");
            positions.push(published.position.expect("in the log"));
        }
        for pair in positions.windows(2) {
            assert_eq!(pair[1].stream, pair[0].stream, "one sender, one stream");
            assert_eq!(pair[1].offset, pair[0].offset + 1, "gap-free, in order");
        }
        for i in 0..200u32 {
            let delivery = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
                .await
                .expect("in time")
                .expect("open");
            assert_eq!(delivery.payload.as_ref(), i.to_string().as_bytes());
        }
        assert!(receiver.try_recv().is_none(), "each message once");
        node.shutdown().await;
    }

    #[tokio::test]
    async fn a_shut_down_node_fails_what_waits() {
        let node = Node::start(
            std::sync::Arc::new(MemoryBackplane::new()),
            NodeOptions::new(),
        )
        .await
        .expect("a node");
        let hub = HubName::new("chat").expect("valid");
        node.shutdown().await;
        let err = node
            .publish_in_order(Message::to_all(hub, "late"))
            .await
            .expect_err("shut down");
        assert!(matches!(err, crate::Error::Shutdown), "{err}");
    }
}
