//! The publishing side of a node: per hub and stream, one task takes queued messages in order,
//! appends what has queued in one call, and delivers each message to the local connections
//! once it is stored, in the order the messages were queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{HubState, Node, Published};
use crate::error::{Error, Result};
use crate::message::{MessageId, Target};
use crate::name::{ConnectionId, HubName};
use crate::position::Position;

/// Messages queued per hub and stream before publishers wait: the backpressure on a burst.
pub(super) const QUEUE: usize = 1024;

/// The most log records one append carries.
const MAX_RECORDS: usize = 256;

/// What a node delivers locally of a message whose append's outcome is unknown, once its
/// reader finds the message in the log.
#[derive(Debug)]
pub(super) struct LocalCopy {
    pub(super) target: Target,
    pub(super) except: Vec<ConnectionId>,
    pub(super) payload: Bytes,
}

/// The local copies of this node's messages whose appends' outcomes are unknown, by log
/// record, the most recent [`Unconfirmed::CAPACITY`] of them; and the fingerprints of the last
/// records of this node the reader met without a copy waiting, so that an append whose answer
/// is lost after the reader passed its records is known to be in.
#[derive(Debug, Default)]
pub(super) struct Unconfirmed {
    copies: HashMap<Bytes, LocalCopy>,
    order: VecDeque<Bytes>,
    met: VecDeque<u64>,
}

/// A fingerprint of a whole log record (records carry their message's id and time).
fn fingerprint(record: &Bytes) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(record)
}

impl Unconfirmed {
    const CAPACITY: usize = 1024;

    /// What the reader does with one of this node's records: takes its local copy, if one is
    /// waiting, or else notes that the record is in the log.
    pub(super) fn meet(&mut self, record: &Bytes) -> Option<LocalCopy> {
        if let Some(copy) = self.take(record) {
            return Some(copy);
        }
        self.met.push_back(fingerprint(record));
        if self.met.len() > Self::CAPACITY {
            self.met.pop_front();
        }
        None
    }

    /// Whether the reader met `record` in the log already.
    fn was_met(&self, record: &Bytes) -> bool {
        if self.met.is_empty() {
            return false;
        }
        let print = fingerprint(record);
        self.met.iter().rev().any(|&m| m == print)
    }

    fn insert(&mut self, record: Bytes, copy: LocalCopy) {
        if self.copies.insert(record.clone(), copy).is_none() {
            self.order.push_back(record);
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.copies.remove(&old);
            }
        }
    }

    /// Takes the local copy of `record`, if it is one of this node's unconfirmed messages.
    pub(super) fn take(&mut self, record: &Bytes) -> Option<LocalCopy> {
        if self.copies.is_empty() {
            return None;
        }
        let copy = self.copies.remove(record)?;
        self.order.retain(|r| r != record);
        Some(copy)
    }
}

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
    /// What is known before the message is stored: the ids of its durable copies, no position.
    pub fn queued(&self) -> Published {
        Published {
            position: None,
            ..self.published.clone()
        }
    }

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

/// How long a node tries to find out whether an append whose answer was lost took effect.
const RESOLVE_FOR: Duration = Duration::from_secs(2);

/// How long a node retries the log append of durable messages stored in their inboxes.
const DURABLE_RETRY_FOR: Duration = Duration::from_secs(60);

/// Appends and delivers the messages of `stream` of `hub` until the node shuts down.
pub(super) async fn run(
    node: Node,
    hub: HubName,
    stream: u32,
    mut queue: mpsc::Receiver<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Where this node's next records in the stream can start at the earliest: the stream's end
    // when the task starts, then the end of its last append. An append whose answer was lost
    // is looked for from there.
    let mut known_end = node.inner.backplane.tail(&hub, stream).await.ok();
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
            append(&node, &hub, stream, all, &batch, &mut known_end)
                .await
                .map(Some)
        };
        match appended {
            Ok(stored) => deliver(&node, batch, stored).await,
            Err(err) => {
                fail(
                    &node,
                    &hub,
                    stream,
                    batch,
                    err,
                    &mut known_end,
                    &mut shutdown,
                )
                .await;
            }
        }
    }
}

/// Delivers each message of a stored batch locally, in order, and tells its publisher where
/// it went. A message the node's reader already delivered (it found it in the log while the
/// append's answer was looked for) is not delivered again.
async fn deliver(node: &Node, batch: Vec<Request>, stored: Option<Stored>) {
    let base = stored.map(|s| s.base);
    let watched = stored.is_some_and(|s| s.watched);
    let mut offset = base.map(|p| p.offset);
    for request in batch {
        let position = match (base, offset) {
            (Some(base), Some(at)) if !request.encoded.is_empty() => {
                let count = request.encoded.len() as u64;
                let position = base.at(at);
                // Hashed before the lock, which the reader takes too.
                let prints = request
                    .encoded
                    .iter()
                    .map(|record| super::reader::fingerprint(record))
                    .collect();
                request
                    .state
                    .own
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(position, prints);
                offset = Some(at + count);
                Some(position)
            }
            _ => None,
        };
        if !watched || is_durable(&request) || unwatch(&request) {
            deliver_one(node, &request).await;
        }
        let _ = request.reply.send(Ok(position));
    }
}

/// Where a batch went, and whether its local copies were handed to the node's reader while
/// the append's answer was looked for.
#[derive(Debug, Clone, Copy)]
struct Stored {
    base: Position,
    watched: bool,
}

/// Hands the local copies of the transient messages in `batch` to the node's reader, which
/// delivers them if it finds them in the log. Returns the messages the reader met in the log
/// already, which the caller delivers: no copy of theirs is handed over.
fn watch(batch: &[Request]) -> Vec<&Request> {
    let mut met = Vec::new();
    for request in batch.iter().filter(|r| !is_durable(r)) {
        let mut unconfirmed = request
            .state
            .unconfirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if request.encoded.iter().any(|r| unconfirmed.was_met(r)) {
            met.push(request);
            continue;
        }
        for (record, (target, _)) in request.encoded.iter().zip(&request.local) {
            unconfirmed.insert(
                record.clone(),
                LocalCopy {
                    target: target.clone(),
                    except: request.except.clone(),
                    payload: request.payload.clone(),
                },
            );
        }
    }
    met
}

/// Takes back the local copies of `request` from the node's reader: `true` when the reader
/// had not delivered them yet.
fn unwatch(request: &Request) -> bool {
    let mut unconfirmed = request
        .state
        .unconfirmed
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut held = false;
    for record in &request.encoded {
        held |= unconfirmed.take(record).is_some();
    }
    held
}

async fn deliver_one(node: &Node, request: &Request) {
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
            false,
        )
        .await;
    }
}

/// Whether a request carries durable messages, already stored in their users' inboxes.
fn is_durable(request: &Request) -> bool {
    request.local.iter().any(|(_, durable)| durable.is_some())
}

/// What becomes of a batch whose append failed. A durable message is stored in its user's
/// inbox, so it is sent all the same: delivered locally at once, its log records appended
/// again until they are in (a copy too many in the log is harmless: a connection takes each
/// durable message once, and only while it is unacknowledged), and reported as published. A
/// transient message fails with the append's error; when that error says the outcome is
/// unknown, its local recipients still get it if the node's reader finds it in the log.
async fn fail(
    node: &Node,
    hub: &HubName,
    stream: u32,
    batch: Vec<Request>,
    err: Error,
    known_end: &mut Option<Position>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut original = Some(err);
    let (durable, transient): (Vec<Request>, Vec<Request>) =
        batch.into_iter().partition(is_durable);
    let last = transient.len().saturating_sub(1);
    for (i, request) in transient.into_iter().enumerate() {
        let reply = if i == last && durable.is_empty() {
            original.take().unwrap_or(Error::Shutdown)
        } else {
            original
                .as_ref()
                .map_or(Error::Shutdown, |e| e.copy_for("backplane"))
        };
        let _ = request.reply.send(Err(reply));
    }
    if durable.is_empty() {
        return;
    }
    for request in &durable {
        deliver_one(node, request).await;
    }
    let records: Vec<Bytes> = durable
        .iter()
        .flat_map(|r| r.encoded.iter().cloned())
        .collect();
    let deadline = Instant::now() + DURABLE_RETRY_FOR;
    let mut pause = Duration::from_millis(20);
    let mut base = None;
    while Instant::now() < deadline && !*shutdown.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => break,
        }
        match append(node, hub, stream, &records, &[], known_end).await {
            Ok(stored) => {
                base = Some(stored.base);
                break;
            }
            Err(err) => {
                tracing::warn!(%err, hub = %hub, stream, "could not append stored durable messages; retrying");
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
    if base.is_none() {
        tracing::warn!(hub = %hub, stream, "durable messages stay in their inboxes only: their users' connections elsewhere get them when they connect again");
    }
    let mut offset = base.map(|p| p.offset);
    for request in durable {
        let position = match (base, offset) {
            (Some(base), Some(at)) => {
                let count = request.encoded.len() as u64;
                offset = Some(at + count);
                Some(base.at(at))
            }
            _ => None,
        };
        let _ = request.reply.send(Ok(position));
    }
}

/// Appends `records` to the stream. When the answer is lost, finds out whether they are in the
/// log (looking from `known_end`): found, it is an append like any other; not there, a plain
/// failure. Which of the two cannot be told within [`RESOLVE_FOR`]: `OutcomeUnknown`, and the
/// local copies of `batch`'s transient messages stay with the node's reader, which delivers
/// them if it finds them in the log later.
async fn append(
    node: &Node,
    hub: &HubName,
    stream: u32,
    records: &[Bytes],
    batch: &[Request],
    known_end: &mut Option<Position>,
) -> Result<Stored> {
    let backplane = &node.inner.backplane;
    let err = match backplane.append(hub, stream, records).await {
        Ok(base) => {
            *known_end = Some(base.at(base.offset + records.len() as u64));
            return Ok(Stored {
                base,
                watched: false,
            });
        }
        Err(err) if err.is_outcome_unknown() => err,
        Err(err) => return Err(err),
    };
    // The reader may meet the records while they are looked for: it delivers them then. Those
    // it met already are in the log, and delivered here.
    for request in watch(batch) {
        deliver_one(node, request).await;
    }
    let Some(from) = *known_end else {
        return Err(err);
    };
    let Some(first) = records.first() else {
        return Err(err);
    };
    let deadline = Instant::now() + RESOLVE_FOR;
    let mut pause = Duration::from_millis(10);
    loop {
        match find(node, hub, from, first).await {
            Ok(Some(base)) => {
                tracing::info!(hub = %hub, stream, %base, "an append whose answer was lost is in the log");
                *known_end = Some(base.at(base.offset + records.len() as u64));
                return Ok(Stored {
                    base,
                    watched: true,
                });
            }
            Ok(None) => {
                for request in batch {
                    unwatch(request);
                }
                return Err(Error::transient(
                    "backplane",
                    format!("an append whose answer was lost is not in the log: {err}"),
                ));
            }
            Err(lookup) => {
                if Instant::now() + pause > deadline {
                    tracing::warn!(%lookup, hub = %hub, stream, "could not find out whether an append took effect");
                    return Err(err);
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}

/// Looks for `record` in the stream from `from` to its current end: its position, or `None`
/// when it is not there.
async fn find(
    node: &Node,
    hub: &HubName,
    from: Position,
    record: &Bytes,
) -> Result<Option<Position>> {
    let backplane = &node.inner.backplane;
    let end = backplane.tail(hub, from.stream).await?;
    if end.epoch != from.epoch || end.offset < from.offset {
        return Err(Error::transient(
            "backplane",
            "the stream changed its epoch or went back: the append cannot be looked for",
        ));
    }
    let mut cursor = from;
    while cursor.offset < end.offset {
        let entries = backplane
            .read(hub, cursor, node.inner.options.read_batch)
            .await?;
        let Some(last) = entries.last().map(|e| e.offset) else {
            break;
        };
        if let Some(found) = entries.iter().find(|e| e.data == record) {
            return Ok(Some(cursor.at(found.offset)));
        }
        cursor.offset = last + 1;
    }
    Ok(None)
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
