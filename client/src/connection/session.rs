//! One socket's session: the handshake, the sequence numbers of stateful reconnect and what
//! they keep for a resume.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::signalr::{HubMessage, RecordBuffer};
use fastwebsockets::{OpCode, WebSocketError};
use tokio::sync::{mpsc, watch};

use crate::transport::Resume;

use super::dispatch::{dispatch, write_loop};
use super::{ConnectionCore, ConnectionState, End, Opened, Out, Reader, no_obligations};

/// The most bytes of sent and unacknowledged messages kept for a resume.
pub(super) const RESEND_BUFFER_BYTES: usize = 1024 * 1024;

/// Stateful reconnect (hub protocol version 2): what was sent and not yet acknowledged, and
/// where the server's messages stand, so a new socket continues the same connection.
pub(super) struct Sequencing {
    pub(super) resume: Resume,
    /// The id of the last sequenced message sent.
    pub(super) sent: u64,
    pub(super) unacked: VecDeque<(u64, Vec<u8>)>,
    pub(super) bytes: usize,
    /// The id the server's next sequenced message carries.
    pub(super) next_in: u64,
    /// The highest id handled; what a resume resends at or below it is skipped.
    pub(super) received: u64,
    /// Whether an `Ack` should go out.
    pub(super) ack_due: bool,
    /// The socket is a resumed one that has not yet seen the server's `Sequence`.
    pub(super) awaiting_sequence: bool,
}

impl Sequencing {
    pub(super) fn new(resume: Resume) -> Self {
        Self {
            resume,
            sent: 0,
            unacked: VecDeque::new(),
            bytes: 0,
            next_in: 1,
            received: 0,
            ack_due: false,
            awaiting_sequence: false,
        }
    }

    pub(super) fn acked(&mut self, up_to: u64) {
        while let Some((id, record)) = self.unacked.front() {
            if *id > up_to {
                break;
            }
            self.bytes -= record.len();
            self.unacked.pop_front();
        }
    }
}

/// One socket's reader; the writer runs as its own task.
pub(super) struct Session {
    pub(super) read: Reader,
    pub(super) buffer: RecordBuffer,
    pub(super) early: Vec<Vec<u8>>,
    pub(super) out: mpsc::UnboundedSender<Out>,
    pub(super) writer: tokio::task::JoinHandle<Option<String>>,
}

impl Session {
    /// Starts the writer, publishes the socket as the current one, and marks the connection
    /// connected. A resumed socket first sends `Sequence` and everything not acknowledged.
    pub(super) fn install(shared: &Arc<ConnectionCore>, opened: Opened) -> Self {
        let Opened {
            read,
            write,
            early,
            buffer,
            fresh,
        } = opened;
        let (out, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(
            write,
            rx,
            shared.config.keep_alive_interval,
            shared.config.server_timeout,
            shared.config.protocol,
        ));
        {
            let mut guard = shared.live();
            let live = &mut *guard;
            match fresh {
                Some(fresh) => {
                    live.connection_id = fresh.connection_id;
                    live.seq = fresh.resume.map(Sequencing::new);
                }
                None => {
                    if let Some(seq) = live.seq.as_mut() {
                        let first = seq.unacked.front().map_or(seq.sent + 1, |(id, _)| *id);
                        let sequence = HubMessage::Sequence { sequence_id: first };
                        let _ = out.send(Out::Record(shared.config.protocol.encode(&sequence)));
                        for (_, record) in &seq.unacked {
                            let _ = out.send(Out::Record(record.clone()));
                        }
                        seq.awaiting_sequence = true;
                    }
                }
            }
            live.resuming = false;
            live.outgoing = Some(out.clone());
        }
        shared.state.send_replace(ConnectionState::Connected);
        Self {
            read,
            buffer,
            early,
            out,
            writer,
        }
    }

    /// Reads and dispatches until the socket ends.
    pub(super) async fn run(
        mut self,
        shared: &Arc<ConnectionCore>,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let mut end = None;
        for record in std::mem::take(&mut self.early) {
            if let Some(e) = dispatch(shared, &record) {
                end = Some(e);
                break;
            }
        }
        let timeout = shared.config.server_timeout;
        let max = shared.config.max_message_size;
        let mut obligations = no_obligations;
        while end.is_none() {
            let frame = tokio::select! {
                frame = tokio::time::timeout(timeout, self.read.read_frame(&mut obligations)) => frame,
                _ = stop.wait_for(|stop| *stop) => {
                    end = Some(End::Stopped);
                    break;
                }
                failure = &mut self.writer => {
                    let reason = failure.ok().flatten().unwrap_or_else(|| "the writer ended".into());
                    end = Some(End::Lost(reason));
                    break;
                }
            };
            let frame = match frame {
                Err(_) => {
                    end = Some(End::Lost(
                        "Server timeout elapsed without receiving a message from the server."
                            .into(),
                    ));
                    break;
                }
                Ok(Err(WebSocketError::FrameTooLarge)) => {
                    end = Some(End::Lost(format!(
                        "the server sent a message larger than {max} bytes"
                    )));
                    break;
                }
                Ok(Err(err)) => {
                    end = Some(End::Lost(format!("the socket failed: {err}")));
                    break;
                }
                Ok(Ok(frame)) => frame,
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary => match self.buffer.push(&frame.payload, max) {
                    Ok(records) => {
                        for record in records {
                            if let Some(e) = dispatch(shared, &record) {
                                end = Some(e);
                                break;
                            }
                        }
                        if let Some(ack) = shared.take_ack() {
                            let _ = self.out.send(Out::Record(ack));
                        }
                    }
                    Err(err) => end = Some(End::Lost(err.to_string())),
                },
                OpCode::Ping => {
                    let _ = self.out.send(Out::Pong(frame.payload.to_vec()));
                }
                OpCode::Close => {
                    end = Some(End::Lost("the server closed the WebSocket".into()));
                }
                _ => {}
            }
        }
        // Take the socket out of service, then close it.
        shared.live().outgoing = None;
        let _ = self.out.send(Out::Close);
        drop(self.out);
        if !self.writer.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
        }
        end.unwrap_or(End::Stopped)
    }
}
