//! The task that runs a connection's invocations in order, and the completions it holds
//! until what they sent is stored.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::PoisonError;

use backplane_core::queue;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::hub::{Arguments, Context, Handler, HubError, StreamSender};
use crate::protocol::{HubMessage, Outcome, Protocol};

use super::Streams;

/// One invocation for the connection's worker.
pub(super) struct Work {
    pub(super) invocation_id: Option<String>,
    pub(super) method: crate::hub::Method,
    pub(super) arguments: Vec<Value>,
}

/// Items a client may send on one stream before reading waits for the method to take them.
pub(super) const UPLOAD_QUEUE: usize = 32;

/// Streams from one client that may be open at once.
pub(super) const MAX_UPLOADS: usize = 64;

/// What a finished unary or uploading call's completion says.
pub(super) fn outcome(
    joined: Result<crate::hub::HubResult, tokio::task::JoinError>,
    name: &str,
) -> Outcome {
    match joined {
        Ok(Ok(Value::Null)) => Outcome::Void,
        Ok(Ok(value)) => Outcome::Result(value),
        Ok(Err(err)) => Outcome::Error(err.message().to_owned()),
        Err(join) => {
            tracing::error!(method = %name, error = %join, "a hub method failed");
            Outcome::Error(format!(
                "An unexpected error occurred invoking '{name}' on the server."
            ))
        }
    }
}

/// Waits for a unary or uploading call and encodes its completion (none without an
/// invocation id).
pub(super) async fn completion(
    call: tokio::task::JoinHandle<crate::hub::HubResult>,
    name: &str,
    invocation_id: Option<String>,
    wire: Protocol,
) -> Option<Vec<u8>> {
    let outcome = outcome(call.await, name);
    let invocation_id = invocation_id?;
    Some(wire.encode(&HubMessage::Completion {
        invocation_id,
        outcome,
    }))
}

/// Completions a connection's worker may hold while their calls' messages are stored; past
/// that, the next call waits for the oldest.
pub(super) const FINISHING: usize = 256;

/// A completion waiting for its call's messages to be stored.
pub(super) type Finishing = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// Runs `work` while the completions ahead of it go out as their messages are stored, in
/// order; with `room`, first waits until fewer than that many completions are held. `None`
/// when the connection is gone.
pub(super) async fn beside<T>(
    finishing: &mut VecDeque<Finishing>,
    out: &queue::Sender<Vec<u8>>,
    room: Option<usize>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    loop {
        if room.is_some_and(|room| finishing.len() >= room) {
            let oldest = finishing.pop_front()?.await;
            out.send(oldest).await.ok()?;
            continue;
        }
        let Some(oldest) = finishing.front_mut() else {
            return Some(work.await);
        };
        tokio::select! {
            biased;
            record = oldest => {
                finishing.pop_front();
                out.send(record).await.ok()?;
            }
            value = &mut work => return Some(value),
        }
    }
}

/// A completion that goes out once every message its call sent is stored, and is an error if
/// one could not be.
pub(super) fn finishing(
    invocation_id: String,
    outcome: Outcome,
    commits: &crate::hub::Commits,
    wire: Protocol,
) -> Finishing {
    let stored = commits.stored();
    Box::pin(async move {
        let outcome = match (outcome, stored.await) {
            (Outcome::Error(message), _) => Outcome::Error(message),
            (outcome, Ok(())) => outcome,
            (_, Err(err)) => Outcome::Error(HubError::from(err).message().to_owned()),
        };
        wire.encode(&HubMessage::Completion {
            invocation_id,
            outcome,
        })
    })
}

/// Runs a connection's invocations one at a time, in order (streams, and methods that take
/// streams from the client, run beside it: they wait for the client's next items, which must
/// not hold up the calls behind them). A call's completion waits for the messages it sent to
/// be stored, but the next call does not: it runs while they are appended.
pub(super) async fn worker(
    mut work: mpsc::Receiver<Box<Work>>,
    ctx: Context,
    out: queue::Sender<Vec<u8>>,
    streams: Streams,
    wire: Protocol,
) {
    let mut held = VecDeque::new();
    while let Some(Some(item)) = beside(&mut held, &out, Some(FINISHING), work.recv()).await {
        let args = Arguments::new(&item.method.name, item.arguments);
        let (handler, args) = match item.method.handler.clone() {
            Handler::Unary(handler) => match item.invocation_id {
                // A call without an invocation id is not waited for: its sends need not wait
                // for the log either (see `Recipients::send`).
                None => {
                    let call = tokio::spawn(handler(ctx.not_awaited(), args));
                    match beside(&mut held, &out, None, call).await {
                        None => return,
                        Some(Err(join)) => {
                            tracing::error!(method = %item.method.name, error = %join, "a hub method failed");
                        }
                        Some(Ok(_)) => {}
                    }
                    continue;
                }
                Some(invocation_id) => {
                    let (call_ctx, commits) = ctx.completion_waits();
                    let call = tokio::spawn(handler(call_ctx, args));
                    let Some(joined) = beside(&mut held, &out, None, call).await else {
                        return;
                    };
                    let outcome = outcome(joined, &item.method.name);
                    held.push_back(finishing(invocation_id, outcome, &commits, wire));
                    continue;
                }
            },
            Handler::Streaming(handler) => (handler, args),
            // Run beside the worker, from `invoke`.
            Handler::Uploading(_) => continue,
        };
        let Some(invocation_id) = item.invocation_id else {
            continue;
        };
        let (tx, mut rx) = mpsc::channel::<Value>(16);
        let producer = tokio::spawn(handler(ctx.clone(), args, StreamSender::new(tx)));
        let out = out.clone();
        let id = invocation_id.clone();
        let name = item.method.name.clone();
        let forward = tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let record = wire.encode(&HubMessage::StreamItem {
                    invocation_id: id.clone(),
                    item,
                });
                if out.send(record).await.is_err() {
                    return;
                }
            }
            let outcome = match producer.await {
                Ok(Ok(())) => Outcome::Void,
                Ok(Err(err)) => Outcome::Error(err.message().to_owned()),
                Err(join) => {
                    tracing::error!(method = %name, error = %join, "a streaming hub method failed");
                    Outcome::Error(format!(
                        "An unexpected error occurred invoking '{name}' on the server."
                    ))
                }
            };
            let record = wire.encode(&HubMessage::Completion {
                invocation_id: id,
                outcome,
            });
            let _ = out.send(record).await;
        });
        streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(invocation_id, forward.abort_handle());
    }
    // No more calls: the completions held go out as their messages are stored.
    while let Some(oldest) = held.pop_front() {
        if out.send(oldest.await).await.is_err() {
            return;
        }
    }
}
