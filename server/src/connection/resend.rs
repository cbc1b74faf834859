//! Stateful reconnect: what is kept for a resume, and a new socket taking over a connection.

use std::collections::VecDeque;
use std::task::{self, Poll};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::limits::Limits;
use crate::protocol::{HubMessage, RecordBuffer};
use crate::socket::{FrameReader, Outbox, Socket};

use super::write::extend_frame;
use super::{ConnectionState, End};

/// Hands a new socket to the stateful connection it resumes. There is no handshake: the
/// client sends `Sequence` and resends what it has not seen acknowledged. When that
/// connection has just ended, the socket is closed.
pub(crate) async fn resume(socket: Socket, limits: Limits, session: mpsc::Sender<Socket>) {
    if let Err(mpsc::error::SendError(mut socket)) = session.send(socket).await {
        let mut outbox = Outbox::default();
        outbox.close(1000, "the connection ended");
        let _ = tokio::time::timeout(limits.handshake_timeout, outbox.flush(&mut socket)).await;
    }
}

/// What has been sent and not yet acknowledged, for a resume (stateful reconnect).
#[derive(Default)]
pub(super) struct Unacked {
    pub(super) next: u64,
    pub(super) records: VecDeque<(u64, Vec<u8>)>,
    pub(super) bytes: usize,
}

impl Unacked {
    pub(super) fn push(&mut self, record: &[u8]) {
        self.next += 1;
        self.bytes += record.len();
        self.records.push_back((self.next, record.to_vec()));
    }

    pub(super) fn acked(&mut self, up_to: u64) {
        while let Some((id, record)) = self.records.front() {
            if *id > up_to {
                break;
            }
            self.bytes -= record.len();
            self.records.pop_front();
        }
    }

    /// The sequence id of the last message sent (0 before the first).
    pub(super) fn last(&self) -> u64 {
        self.next
    }

    /// The sequence id of the first message a resumed socket gets.
    pub(super) fn first(&self) -> u64 {
        self.records.front().map_or(self.next + 1, |(id, _)| *id)
    }
}

impl ConnectionState {
    /// Takes a new socket for a stateful connection and sends it everything not
    /// acknowledged, after the id it starts at.
    pub(super) fn poll_attach(&mut self, cx: &mut task::Context<'_>) -> bool {
        let Some(attach) = self.attach.as_mut() else {
            return false;
        };
        let Poll::Ready(Some(socket)) = attach.poll_recv(cx) else {
            return false;
        };
        tracing::debug!(connection = %self.id(), "connection resumed on a new socket");
        self.socket = Some(FrameReader::new(socket, self.limits.max_message_size));
        self.detached = None;
        self.buffer = RecordBuffer::new(self.wire);
        self.drop_unsent();
        let now = Instant::now();
        self.last_read = now;
        let sequence = self.wire.encode(&HubMessage::Sequence {
            sequence_id: self.unacked.first(),
        });
        self.control(&sequence);
        for (_, record) in &self.unacked.records {
            extend_frame(&mut self.frame, record);
        }
        true
    }

    /// Forgets what was on its way to a lost socket. What counts for a resume is kept in
    /// `unacked`, and its durable messages wait for the client's `Ack`.
    pub(super) fn drop_unsent(&mut self) {
        self.outbox.clear();
        self.stalled = None;
        self.frame.clear();
        self.frame_deliveries = 0;
        if let Some(writing) = self.writing.take() {
            self.frame_acks.extend(writing.acks);
        }
        self.yielded = false;
    }

    /// The socket failed: a stateful connection waits for its client to come back with a
    /// new one, any other ends.
    pub(super) fn lost(&mut self) -> Result<(), End> {
        if !self.stateful || self.attach.is_none() {
            self.wrote(false);
            return Err(End::Dropped);
        }
        self.socket = None;
        self.drop_unsent();
        let now = Instant::now();
        self.detached = Some(now);
        self.arm(now + self.limits.client_timeout);
        Ok(())
    }
}
