//! Writing: gathering what is queued for the client into frames, writing them, and
//! acknowledging the durable messages they carried.

use std::borrow::Cow;
use std::task::{self, Poll};

use backplane_core::{Delivery, DeliveryKind, MessageId};
use fastwebsockets::OpCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::protocol::{HubMessage, Outcome, Protocol};
use crate::socket::{HEADER_ROOM, Outbox};

use super::{CLOSE_WRITE, ConnectionState, End, FRAME_BYTES, RESUME_BUFFER_BYTES, Reader};

/// The frame being written: what it carries, for the metrics and the durable
/// acknowledgements once it is out.
pub(super) struct Writing {
    pub(super) deliveries: u64,
    pub(super) acks: Vec<MessageId>,
    pub(super) started: Instant,
}

/// Writes what the outbox holds, within [`CLOSE_WRITE`]; whether all of it went out.
pub(super) async fn flush(outbox: &mut Outbox, socket: &mut Reader) -> bool {
    matches!(
        tokio::time::timeout(CLOSE_WRITE, outbox.flush(socket.get_mut())).await,
        Ok(Ok(()))
    )
}

/// Appends a record to a frame buffer, making room for the header first.
pub(super) fn extend_frame(frame: &mut Vec<u8>, record: &[u8]) {
    if frame.is_empty() {
        frame.reserve(HEADER_ROOM + record.len());
        frame.resize(HEADER_ROOM, 0);
    }
    frame.extend_from_slice(record);
}

/// Turns a delivery into the record the client receives, in its protocol.
pub(super) fn delivery_record(delivery: &Delivery, wire: Protocol) -> Option<Cow<'_, [u8]>> {
    match &delivery.kind {
        DeliveryKind::Invocation(id) => {
            #[derive(serde::Deserialize)]
            struct Call {
                target: String,
                arguments: Vec<Value>,
            }
            let call: Call = serde_json::from_slice(&delivery.payload).ok()?;
            Some(Cow::Owned(wire.encode(&HubMessage::Invocation {
                invocation_id: Some(id.as_str().to_owned()),
                target: call.target,
                arguments: call.arguments,
                stream_ids: Vec::new(),
            })))
        }
        // Messages are published as finished JSON records: copied once, into the frame, or
        // re-encoded for a MessagePack client.
        _ => match wire.transcode(&delivery.payload) {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::warn!(%err, "a delivery is not a valid hub message; skipped");
                None
            }
        },
    }
}

impl ConnectionState {
    /// Starts acknowledging the durable messages written to the client.
    pub(super) fn acknowledge(&mut self) {
        if self.acking.is_some() || self.acks_due.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acks_due);
        let ctx = self.ctx.clone();
        self.acking = Some(Box::pin(async move {
            for id in ids {
                if let Err(err) = ctx
                    .node()
                    .acknowledge(ctx.hub(), ctx.connection_id(), id)
                    .await
                {
                    tracing::warn!(connection = %ctx.connection_id(), %err, "could not acknowledge a durable message");
                }
            }
        }));
    }

    /// Gathers into the frame what the worker, the streams and the node queued for the
    /// client, as long as the frame (and the resume buffer) have room.
    pub(super) fn poll_queued(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        while self.frame.len() < FRAME_BYTES {
            let Some((_, records)) = self.tasks.as_mut() else {
                break;
            };
            let Poll::Ready(Some(record)) = records.poll_recv(cx) else {
                break;
            };
            self.sequenced(&record);
            progress = true;
        }
        while self.frame.len() < FRAME_BYTES
            && (!self.stateful || self.unacked.bytes < RESUME_BUFFER_BYTES)
        {
            let delivery = match self.connection.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(delivery)) => delivery,
                Poll::Ready(None) if *self.shutdown.borrow() => return Err(End::Shutdown),
                Poll::Ready(None) => return Err(End::SlowConsumer),
            };
            progress = true;
            let sent = if let Some(record) = delivery_record(&delivery, self.wire) {
                self.sequenced(&record);
                self.frame_deliveries += 1;
                true
            } else {
                false
            };
            if let DeliveryKind::Durable(id) = delivery.kind {
                if self.stateful && sent {
                    // Delivered when the client says it has it, not when it was written.
                    self.awaiting_client.push_back((self.unacked.last(), id));
                } else {
                    self.frame_acks.push(id);
                }
            }
        }
        Ok(progress)
    }

    /// Writes: the frame gathered goes out once the previous one is written.
    pub(super) fn poll_write(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        loop {
            if self.socket.is_none() {
                return Ok(progress);
            }
            if self.outbox.is_empty() {
                self.stalled = None;
                if self.writing.is_some() {
                    self.wrote(true);
                    progress = true;
                }
                if self.frame.len() <= HEADER_ROOM {
                    return Ok(progress);
                }
                if self.frame_deliveries > 0 && !self.yielded {
                    // Deliveries woke the connection: let the publisher's next messages
                    // queue up behind them, so a burst goes out in few writes.
                    self.yielded = true;
                    self.yielding = true;
                    cx.waker().wake_by_ref();
                    return Ok(progress);
                }
                self.seal();
                progress = true;
                continue;
            }
            if self.stalled.is_none() {
                let now = Instant::now();
                self.stalled = Some(now);
                self.arm(now + self.limits.client_timeout);
            }
            let Some(socket) = self.socket.as_mut() else {
                return Ok(progress);
            };
            match self.outbox.poll_flush(socket.get_mut(), cx) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(err)) => {
                    tracing::debug!(connection = %self.id(), %err, "socket write failed");
                    self.lost()?;
                    return Ok(true);
                }
            }
        }
    }

    /// Accounts for the frame in flight once its write has ended: counted, and its durable
    /// messages acknowledged if it was written (if not, the user's next connection gets them).
    pub(super) fn wrote(&mut self, written: bool) {
        if let Some(writing) = self.writing.take() {
            self.metrics.delivered(writing.deliveries, written);
            if written {
                self.metrics
                    .delivery_seconds
                    .observe(writing.started.elapsed().as_secs_f64());
                self.acks_due.extend(writing.acks);
            }
        }
    }

    /// Hands the gathered frame to the outbox.
    pub(super) fn seal(&mut self) {
        let frame = std::mem::take(&mut self.frame);
        let opcode = if self.wire.is_binary() {
            OpCode::Binary
        } else {
            OpCode::Text
        };
        self.outbox.push(frame, opcode);
        let now = Instant::now();
        self.writing = Some(Writing {
            deliveries: std::mem::take(&mut self.frame_deliveries),
            acks: std::mem::take(&mut self.frame_acks),
            started: now,
        });
        self.yielded = false;
        self.last_sent = now;
    }

    /// Adds a record that does not count for stateful reconnect (a ping, an `Ack`).
    pub(super) fn control(&mut self, record: &[u8]) {
        if self.socket.is_some() {
            extend_frame(&mut self.frame, record);
        }
    }

    /// Sends a completion, when the client gave an invocation id.
    pub(super) fn complete(&mut self, invocation_id: Option<String>, outcome: Outcome) {
        if let Some(invocation_id) = invocation_id {
            let record = self.wire.encode(&HubMessage::Completion {
                invocation_id,
                outcome,
            });
            self.sequenced(&record);
        }
    }
}
