//! What comes in and goes out on a session: messages dispatched to waiting calls and
//! handlers, and frames written.

use std::sync::Arc;
use std::time::Duration;

use backplane_core::signalr::{HubMessage, Outcome, Protocol};
use fastwebsockets::{Frame, Payload};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;

use super::{ConnectionCore, End, MAX_FRAME, Out, Pending, Writer};

/// Handles one record from the server; `Some` ends the session.
pub(super) fn dispatch(shared: &Arc<ConnectionCore>, record: &[u8]) -> Option<End> {
    let message = match shared.config.protocol.parse(record) {
        Ok(message) => message,
        Err(err) => {
            return Some(End::Lost(format!(
                "the server sent an invalid message: {err}"
            )));
        }
    };
    // Stateful reconnect: acknowledgements, and skipping what a resume resends.
    if let Some(seq) = shared.live().seq.as_mut() {
        match &message {
            HubMessage::Ack { sequence_id } => {
                seq.acked(*sequence_id);
                return None;
            }
            HubMessage::Sequence { sequence_id } => {
                seq.next_in = *sequence_id;
                seq.awaiting_sequence = false;
                return None;
            }
            m if m.is_sequenced() => {
                let id = seq.next_in;
                seq.next_in += 1;
                if id <= seq.received {
                    return None;
                }
                seq.received = id;
                seq.ack_due = true;
            }
            _ => {}
        }
    }
    match message {
        HubMessage::Invocation {
            invocation_id,
            target,
            arguments,
            ..
        } => invoke_handlers(shared, invocation_id, &target, arguments),
        HubMessage::Completion {
            invocation_id,
            outcome,
        } => {
            let pending = shared.live().pending.remove(&invocation_id);
            let result = match outcome {
                Outcome::Void => Ok(Value::Null),
                Outcome::Result(value) => Ok(value),
                Outcome::Error(error) => Err(Error::Hub(error)),
            };
            match pending {
                Some(Pending::Invoke(tx)) => drop(tx.send(result)),
                Some(Pending::Stream(tx)) => {
                    if let Err(err) = result {
                        let _ = tx.send(Err(err));
                    }
                }
                None => tracing::debug!(invocation_id, "a completion for no pending call"),
            }
        }
        HubMessage::StreamItem {
            invocation_id,
            item,
        } => {
            if let Some(Pending::Stream(tx)) = shared.live().pending.get(&invocation_id) {
                let _ = tx.send(Ok(item));
            }
        }
        HubMessage::Close {
            error,
            allow_reconnect,
        } => {
            return Some(End::ServerClosed {
                error,
                allow_reconnect,
            });
        }
        HubMessage::Ping | HubMessage::Ack { .. } | HubMessage::Sequence { .. } => {}
        HubMessage::StreamInvocation { .. } | HubMessage::CancelInvocation { .. } => {
            tracing::warn!("the server sent a message only clients send; ignored");
        }
    }
    None
}

pub(super) fn invoke_handlers(
    shared: &Arc<ConnectionCore>,
    invocation_id: Option<String>,
    target: &str,
    arguments: Vec<Value>,
) {
    let key = target.to_ascii_lowercase();
    if let Some(id) = invocation_id {
        let handler = shared
            .result_handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        match handler {
            Some(handler) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    // Its own task, so that a panicking handler still gets an answer sent.
                    let outcome = match tokio::spawn(handler(arguments)).await {
                        Ok(Ok(value)) => Outcome::Result(value),
                        Ok(Err(error)) => Outcome::Error(error),
                        Err(_) => Outcome::Error("the client's handler failed".into()),
                    };
                    let completion = HubMessage::Completion {
                        invocation_id: id,
                        outcome,
                    };
                    let _ = shared.queue(&completion, None);
                });
            }
            None => {
                run_handlers(shared, &key, target, &arguments);
                let completion = HubMessage::Completion {
                    invocation_id: id,
                    outcome: Outcome::Error("Client didn't provide a result.".into()),
                };
                let _ = shared.queue(&completion, None);
            }
        }
        return;
    }
    run_handlers(shared, &key, target, &arguments);
}

pub(super) fn run_handlers(
    shared: &Arc<ConnectionCore>,
    key: &str,
    target: &str,
    arguments: &[Value],
) {
    let handlers = shared
        .handlers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned()
        .unwrap_or_default();
    if handlers.is_empty() {
        tracing::warn!(target, "no client method with this name");
    }
    for handler in handlers {
        // A panicking handler must not take the connection's reader down with it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(arguments)));
        if ran.is_err() {
            tracing::error!(target, "a handler panicked");
        }
    }
}

/// A frame of records: binary for MessagePack, text for JSON.
pub(super) fn frame_of(wire: Protocol, bytes: Vec<u8>) -> Frame<'static> {
    if wire.is_binary() {
        Frame::binary(Payload::Owned(bytes))
    } else {
        Frame::text(Payload::Owned(bytes))
    }
}

/// Writes queued records, coalescing them into frames, and pings when idle. Returns why it
/// stopped when the socket failed.
pub(super) async fn write_loop(
    mut write: Writer,
    mut rx: mpsc::UnboundedReceiver<Out>,
    keep_alive: Duration,
    deadline: Duration,
    wire: Protocol,
) -> Option<String> {
    let ping = wire.encode(&HubMessage::Ping);
    let mut idle_until = Instant::now() + keep_alive;
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = tokio::time::sleep_until(idle_until) => Some(Out::Record(ping.clone())),
        };
        let frame = match next {
            None => return None,
            Some(Out::Close) => {
                let _ = tokio::time::timeout(deadline, write.write_frame(Frame::close(1000, b"")))
                    .await;
                return None;
            }
            Some(Out::Pong(payload)) => Frame::pong(Payload::Owned(payload)),
            Some(Out::Record(mut bytes)) => {
                let mut close = false;
                while bytes.len() < MAX_FRAME {
                    match rx.try_recv() {
                        Ok(Out::Record(more)) => bytes.extend_from_slice(&more),
                        Ok(Out::Pong(_)) => {}
                        Ok(Out::Close) => {
                            close = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if close {
                    let _ =
                        tokio::time::timeout(deadline, write.write_frame(frame_of(wire, bytes)))
                            .await;
                    let _ =
                        tokio::time::timeout(deadline, write.write_frame(Frame::close(1000, b"")))
                            .await;
                    return None;
                }
                frame_of(wire, bytes)
            }
        };
        match tokio::time::timeout(deadline, write.write_frame(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Some(format!("writing to the socket failed: {err}")),
            Err(_) => return Some("writing to the socket timed out".into()),
        }
        idle_until = Instant::now() + keep_alive;
    }
}
