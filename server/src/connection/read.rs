//! Reading: the client's frames, their records, and the invocations they carry.

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::task::{self, Poll};

use backplane_core::InvocationId;
use backplane_core::queue;
use bytes::Bytes;
use fastwebsockets::OpCode;
use governor::clock::Clock;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::hub::{Arguments, Handler, StreamReceiver, Upload};
use crate::protocol::{HubMessage, Outcome};
use crate::socket::ReadError;

use super::worker::{MAX_UPLOADS, UPLOAD_QUEUE, Work, completion, worker};
use super::write::extend_frame;
use super::{ConnectionState, Deferred, End, FRAME_BYTES, INVOCATION_QUEUE, Streams, TASK_QUEUE};

/// Passes `item` to an uploading method's stream: at once when its queue has room, else as
/// work the loop waits for. `false` when the method stopped reading.
pub(super) fn forward(
    tx: &mpsc::Sender<Upload>,
    item: Upload,
    busy: &mut Option<Deferred>,
) -> bool {
    match tx.try_send(item) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(item)) => {
            let tx = tx.clone();
            *busy = Some(Box::pin(async move {
                let _ = tx.send(item).await;
            }));
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

impl ConnectionState {
    /// Handles what the client sent, and reads more while nothing holds it back.
    pub(super) fn poll_input(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        loop {
            if self.busy.is_some()
                || self.paused.is_some()
                || self.frame.len() >= FRAME_BYTES
                || self.outbox.queued() >= FRAME_BYTES
            {
                // The client is not silent while the server does not read it: the client
                // timeout counts only time spent waiting for it.
                self.last_read = Instant::now();
                return Ok(progress);
            }
            if let Some(message) = self.held.take() {
                self.handle(*message, true)?;
                progress = true;
                continue;
            }
            if let Some(record) = self.inbox.pop_front() {
                self.record(&record)?;
                progress = true;
                continue;
            }
            if self.inbox.capacity() > 0 {
                self.inbox = VecDeque::new();
            }
            if self.ack_due {
                self.ack_due = false;
                let ack = self.wire.encode(&HubMessage::Ack {
                    sequence_id: self.received,
                });
                self.control(&ack);
            }
            let Some(socket) = self.socket.as_mut() else {
                return Ok(progress);
            };
            let message = match socket.poll_read(cx) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(Ok(message)) => message,
                Poll::Ready(Err(ReadError::TooLarge)) => return Err(End::TooLarge),
                Poll::Ready(Err(err)) => match err.close_code() {
                    Some(code) => {
                        return Err(End::Protocol(
                            format!("Connection closed with an error: {err}"),
                            code,
                        ));
                    }
                    None => {
                        tracing::debug!(connection = %self.id(), %err, "socket read ended");
                        self.lost()?;
                        return Ok(true);
                    }
                },
            };
            progress = true;
            self.last_read = Instant::now();
            match message.opcode {
                OpCode::Text | OpCode::Binary => {
                    match self
                        .buffer
                        .push(&message.payload, self.limits.max_message_size)
                    {
                        Ok(records) => self.inbox.extend(records),
                        Err(_) => return Err(End::TooLarge),
                    }
                }
                OpCode::Ping => self.outbox.frame(OpCode::Pong, &message.payload),
                OpCode::Close => return Err(End::ClientClosed),
                _ => {}
            }
        }
    }

    /// Adds a record that counts for stateful reconnect (a completion, a stream item, a
    /// message): kept for a resume, and gathered when a socket is attached.
    pub(super) fn sequenced(&mut self, record: &[u8]) {
        if self.stateful {
            self.unacked.push(record);
        }
        if self.socket.is_some() {
            extend_frame(&mut self.frame, record);
        }
    }

    /// The sender the worker and streams queue their records with.
    pub(super) fn task_sender(&mut self) -> queue::Sender<Vec<u8>> {
        let (tx, _) = self.tasks.get_or_insert_with(|| queue::bounded(TASK_QUEUE));
        tx.clone()
    }

    pub(super) fn streams(&mut self) -> Streams {
        self.streams.get_or_insert_with(Streams::default).clone()
    }

    /// Handles one record.
    pub(super) fn record(&mut self, record: &[u8]) -> Result<(), End> {
        self.metrics.messages_in.inc();
        let message = self.wire.parse(record).map_err(|err| {
            End::Protocol(
                format!("Connection closed with an error: invalid message: {err}"),
                1002,
            )
        })?;
        if self.stateful {
            match &message {
                HubMessage::Ack { sequence_id } => {
                    self.unacked.acked(*sequence_id);
                    while let Some(&(sequence, id)) = self.awaiting_client.front() {
                        if sequence > *sequence_id {
                            break;
                        }
                        self.awaiting_client.pop_front();
                        self.acks_due.push(id);
                    }
                    return Ok(());
                }
                HubMessage::Sequence { sequence_id } => {
                    self.incoming = *sequence_id;
                    return Ok(());
                }
                m if m.is_sequenced() => {
                    let id = self.incoming;
                    self.incoming += 1;
                    if id <= self.received {
                        // Resent after a reconnect, and already handled.
                        return Ok(());
                    }
                    self.received = id;
                    self.ack_due = true;
                }
                _ => {}
            }
        }
        self.handle(message, false)
    }

    /// Acts on one message: an invocation over the rate limit is held until the limit
    /// allows it, and reading pauses meanwhile; `held` when it is the one that was held.
    pub(super) fn handle(&mut self, message: HubMessage, held: bool) -> Result<(), End> {
        if let (
            Some(limiter),
            HubMessage::Invocation { .. } | HubMessage::StreamInvocation { .. },
        ) = (&self.limiter, &message)
        {
            let Err(not_until) = limiter.check() else {
                if !held {
                    // A call that did not have to wait: the client is within its rate.
                    self.throttled_since = None;
                }
                return self.run(message);
            };
            let now = Instant::now();
            let since = *self.throttled_since.get_or_insert(now);
            if now >= since + self.limits.client_timeout {
                return Err(End::Close(format!(
                    "Connection closed with an error: invocations kept arriving faster than the rate limit ({} per second) for {} s.",
                    self.limits.invocations_per_second,
                    self.limits.client_timeout.as_secs()
                )));
            }
            let until = now + not_until.wait_time_from(limiter.clock().now());
            self.held = Some(Box::new(message));
            self.paused = Some(until);
            self.arm(until);
            return Ok(());
        }
        self.run(message)
    }

    /// Acts on one message the rate limit lets through.
    pub(super) fn run(&mut self, message: HubMessage) -> Result<(), End> {
        match message {
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => self.invoke(invocation_id, &target, arguments, stream_ids, false),
            HubMessage::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => self.invoke(Some(invocation_id), &target, arguments, stream_ids, true),
            HubMessage::StreamItem {
                invocation_id,
                item,
            } => {
                // A stream the method stopped reading (it returned) is forgotten.
                if let Some(tx) = self.uploads.get(&invocation_id)
                    && !forward(tx, Upload::Item(item), &mut self.busy)
                {
                    self.uploads.remove(&invocation_id);
                }
            }
            HubMessage::Completion {
                invocation_id,
                outcome,
            } if self.uploads.contains_key(&invocation_id) => {
                if let Some(tx) = self.uploads.remove(&invocation_id) {
                    let end = match outcome {
                        Outcome::Error(error) => Upload::Error(error),
                        _ => Upload::End,
                    };
                    forward(&tx, end, &mut self.busy);
                }
            }
            HubMessage::Completion {
                invocation_id,
                outcome,
            } => {
                let result = match outcome {
                    Outcome::Void => Ok(Bytes::from_static(b"null")),
                    Outcome::Result(value) => {
                        Ok(Bytes::from(serde_json::to_vec(&value).unwrap_or_default()))
                    }
                    Outcome::Error(error) => Err(error),
                };
                let ctx = self.ctx.clone();
                self.busy = Some(Box::pin(async move {
                    let id = InvocationId::new(&invocation_id);
                    if let Err(err) = ctx.node().complete(ctx.connection_id(), &id, result).await {
                        tracing::debug!(connection = %ctx.connection_id(), %err, "completion refused");
                    }
                }));
            }
            HubMessage::CancelInvocation { invocation_id } => {
                if let Some(handle) = self.streams.as_ref().and_then(|streams| {
                    streams
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&invocation_id)
                }) {
                    handle.abort();
                }
            }
            HubMessage::Close { .. } => return Err(End::ClientClosed),
            HubMessage::Ping | HubMessage::Ack { .. } | HubMessage::Sequence { .. } => {}
        }
        Ok(())
    }

    pub(super) fn invoke(
        &mut self,
        invocation_id: Option<String>,
        target: &str,
        arguments: Vec<Value>,
        stream_ids: Vec<String>,
        streaming: bool,
    ) {
        let Some(method) = self.hub.method(target).cloned() else {
            self.complete(
                invocation_id,
                Outcome::Error(format!("Unknown hub method '{target}'")),
            );
            return;
        };
        if stream_ids.len() != method.uploads {
            let error = if method.uploads == 0 {
                format!("'{}' does not accept client-to-server streams", method.name)
            } else {
                format!(
                    "'{}' takes {} stream(s) from the client, the invocation names {}",
                    method.name,
                    method.uploads,
                    stream_ids.len()
                )
            };
            self.complete(invocation_id, Outcome::Error(error));
            return;
        }
        // Streams whose method has returned are forgotten; the rest count against the limit.
        self.uploads.retain(|_, tx| !tx.is_closed());
        if self.uploads.len() + stream_ids.len() > MAX_UPLOADS {
            let error =
                format!("at most {MAX_UPLOADS} streams from the client may be open at once");
            self.complete(invocation_id, Outcome::Error(error));
            return;
        }
        if let Some(taken) = stream_ids.iter().find(|id| {
            self.uploads.contains_key(*id)
                || stream_ids.iter().filter(|other| other == id).count() > 1
        }) {
            let error = format!("stream id '{taken}' is already in use");
            self.complete(invocation_id, Outcome::Error(error));
            return;
        }
        if arguments.len() != method.arity {
            self.complete(
                invocation_id,
                Outcome::Error(format!(
                    "Invocation provides {} argument(s) but target expects {}.",
                    arguments.len(),
                    method.arity
                )),
            );
            return;
        }
        let is_stream = matches!(method.handler, Handler::Streaming(_));
        if is_stream != streaming {
            let error = if is_stream {
                format!(
                    "'{}' is a streaming method: call it with stream()",
                    method.name
                )
            } else {
                format!("'{}' is not a streaming method", method.name)
            };
            self.complete(invocation_id, Outcome::Error(error));
            return;
        }
        let uploads: Vec<StreamReceiver> = stream_ids
            .into_iter()
            .map(|id| {
                let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
                self.uploads.insert(id, tx);
                StreamReceiver::new(rx)
            })
            .collect();
        if let Handler::Uploading(handler) = &method.handler {
            let args = Arguments::new(&method.name, arguments);
            let call = tokio::spawn(handler(self.ctx.clone(), args, uploads));
            let (out, wire, name) = (self.task_sender(), self.wire, method.name.clone());
            tokio::spawn(async move {
                if let Some(record) = completion(call, &name, invocation_id, wire).await {
                    let _ = out.send(record).await;
                }
            });
            return;
        }
        if self.worker.is_none() {
            let (work, queue) = mpsc::channel::<Box<Work>>(INVOCATION_QUEUE);
            let handle = tokio::spawn(worker(
                queue,
                self.ctx.clone(),
                self.task_sender(),
                self.streams(),
                self.wire,
            ));
            self.worker = Some((work, handle));
        }
        let Some((work, _)) = self.worker.as_ref() else {
            return;
        };
        let item = Box::new(Work {
            invocation_id,
            method,
            arguments,
        });
        if let Err(mpsc::error::TrySendError::Full(item)) = work.try_send(item) {
            // The worker is behind: read nothing more until it takes this one.
            let work = work.clone();
            self.busy = Some(Box::pin(async move {
                let _ = work.send(item).await;
            }));
        }
    }
}
