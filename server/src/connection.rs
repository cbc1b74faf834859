//! One client's WebSocket: the handshake, then a reader that dispatches invocations and a
//! writer that sends everything queued for the client, coalesced into as few frames as
//! possible.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backplane_core::queue;
use backplane_core::{ConnectionId, Delivery, DeliveryKind, Error, InvocationId, Node, UserId};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::hub::{Arguments, Context, Handler, Hub, StreamReceiver, StreamSender, Upload};
use crate::metrics::Metrics;
use crate::protocol::{self, Handshake, HubMessage, Outcome, Protocol, RecordBuffer};
use crate::server::Limits;
use crate::socket::{FrameReader, FrameWriter, ReadError, Socket};

/// How many bytes of queued records one frame carries at most.
const FRAME_BYTES: usize = 64 * 1024;

/// How many invocations may wait for the connection's worker before the reader waits too.
const INVOCATION_QUEUE: usize = 64;

/// How many records (completions, stream items, pongs) may wait for the writer before their
/// senders wait too.
const OUT_QUEUE: usize = 256;

/// How long a closed connection keeps reading, for the client to answer the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the writer sends.
enum Out {
    /// One encoded hub message that counts for stateful reconnect (a completion, a stream item).
    Record(Vec<u8>),
    /// One encoded hub message that does not (an `Ack`).
    Control(Vec<u8>),
    /// The client received every message up to this sequence id.
    Acked(u64),
    /// The answer to a WebSocket ping.
    Pong(Vec<u8>),
    /// A hub `Close` message, then the WebSocket close frame; the writer ends.
    Close {
        error: Option<String>,
        allow_reconnect: bool,
        code: u16,
    },
}

/// Who is connecting and where.
pub(crate) struct Setup {
    pub(crate) hub: Arc<Hub>,
    pub(crate) node: Node,
    pub(crate) id: ConnectionId,
    pub(crate) user: Option<UserId>,
    pub(crate) limits: Limits,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Sessions,
}

type Reader = FrameReader<ReadHalf<Socket>>;
type Writer = FrameWriter<WriteHalf<Socket>>;

/// The logical connections that may resume on a new socket (stateful reconnect), by id.
pub(crate) type Sessions = Arc<Mutex<HashMap<ConnectionId, mpsc::Sender<(Reader, Writer)>>>>;

/// How many bytes of unacknowledged messages a stateful connection keeps for a resume; past
/// that, it stops taking deliveries until the client acknowledges (and falls behind, if it
/// never does).
const RESUME_BUFFER_BYTES: usize = 1024 * 1024;

/// The two halves of a new socket.
fn halves(socket: Socket, limits: &Limits) -> (Reader, Writer) {
    let (read, write) = tokio::io::split(socket);
    (
        FrameReader::new(read, limits.max_message_size),
        FrameWriter::new(write),
    )
}

/// Hands a new socket to the stateful connection it resumes. There is no handshake: the
/// client sends `Sequence` and resends what it has not seen acknowledged. When that
/// connection has just ended, the socket is closed.
pub(crate) async fn resume(
    socket: Socket,
    limits: Limits,
    session: mpsc::Sender<(Reader, Writer)>,
) {
    if let Err(mpsc::error::SendError((_, mut write))) = session.send(halves(socket, &limits)).await
    {
        let _ = put(
            &mut write,
            Frame::close(1000, b"the connection ended"),
            limits.handshake_timeout,
        )
        .await;
    }
}

/// What the handshake established.
struct Opened {
    wire: Protocol,
    stateful: bool,
    /// Records that came in the handshake's frame.
    records: Vec<Vec<u8>>,
    connection: backplane_core::Connection,
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn serve(socket: Box<Socket>, setup: Box<Setup>) {
    let (mut read, mut write) = halves(*socket, &setup.limits);
    let mut buffer = RecordBuffer::default();
    // Each phase that runs once is boxed, so the connection's task is sized for the loop that
    // serves it, not for the handshake or the registration.
    let Some(opened) = Box::pin(open(&mut read, &mut write, &mut buffer, &setup)).await else {
        return;
    };
    let Opened {
        wire,
        stateful,
        records,
        connection,
    } = opened;
    let hub_name = setup.hub.name().clone();

    let ctx = Context::new(
        setup.node.clone(),
        hub_name.clone(),
        setup.id.clone(),
        setup.user.clone(),
        Some(setup.metrics.clone()),
        setup.limits.max_groups_per_connection,
    );
    let metrics = setup.metrics.clone();
    metrics.connects.inc();
    metrics.connections.inc();
    let (out_tx, out_rx) = queue::bounded::<Out>(OUT_QUEUE);
    let ending = Arc::new(AtomicBool::new(false));
    // Only stateful connections take new sockets (a channel's first block is allocated with
    // it: idle connections must not pay for what they never use).
    let (swap_tx, swap_rx, mut attach_rx) = if stateful {
        let (swap_tx, swap_rx) = mpsc::channel::<Writer>(1);
        let (attach_tx, attach_rx) = mpsc::channel::<(Reader, Writer)>(1);
        setup
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(setup.id.clone(), attach_tx);
        (Some(swap_tx), Some(swap_rx), Some(attach_rx))
    } else {
        (None, None, None)
    };
    let mut writer = tokio::spawn(writer(Box::new(WriterParts {
        write,
        connection,
        out: out_rx,
        node: setup.node.clone(),
        ctx: ctx.clone(),
        limits: setup.limits,
        shutdown: setup.shutdown.clone(),
        ending: ending.clone(),
        metrics: metrics.clone(),
        resume: swap_rx,
        wire,
    })));

    if let Err(err) = setup.hub.connected(ctx.clone()).await {
        let _ = out_tx
            .send(Out::Close {
                error: Some(format!("Connection refused by the hub: {err}")),
                allow_reconnect: false,
                code: 1008,
            })
            .await;
    }

    let streams: Streams = Arc::default();
    let limiter = std::num::NonZeroU32::new(setup.limits.invocations_per_second).map(|rate| {
        let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
    });
    let mut dispatch = Dispatch {
        wire,
        stateful,
        incoming: 1,
        received: 0,
        ack_due: false,
        limiter,
        metrics: metrics.clone(),
        hub: setup.hub.clone(),
        ctx: ctx.clone(),
        out: out_tx.clone(),
        worker: None,
        streams: streams.clone(),
        uploads: HashMap::new(),
    };

    // Records that came in the handshake's frame.
    let mut end = None;
    for record in records {
        if let Some(reason) = Box::pin(dispatch.record(&record)).await {
            end = Some(reason);
            break;
        }
    }
    // Set once the writer task has ended (its handle is then not awaited again).
    let mut writer_ended = false;
    // Whether the socket failed or the client hung up (nothing left to read).
    let mut dropped;
    'socket: loop {
        dropped = false;
        while end.is_none() {
            if dispatch.ack_due {
                dispatch.ack_due = false;
                let ack = wire.encode(&HubMessage::Ack {
                    sequence_id: dispatch.received,
                });
                let _ = out_tx.send(Out::Control(ack)).await;
            }
            let frame = tokio::select! {
                frame = Box::pin(tokio::time::timeout(setup.limits.client_timeout, read.read())) => frame,
                _ = &mut writer => {
                    writer_ended = true;
                    break 'socket;
                }
            };
            let frame = match frame {
                Err(_) => {
                    end = Some(End::Close(
                        "Server timeout elapsed without receiving a message from the client."
                            .into(),
                    ));
                    break;
                }
                Ok(Err(ReadError::TooLarge)) => {
                    end = Some(End::TooLarge);
                    break;
                }
                Ok(Err(err)) if err.close_code().is_some() => {
                    let code = err.close_code().unwrap_or(1002);
                    end = Some(End::Protocol(
                        format!("Connection closed with an error: {err}"),
                        code,
                    ));
                    break;
                }
                Ok(Err(err)) => {
                    tracing::debug!(connection = %setup.id, %err, "socket read ended");
                    dropped = true;
                    break;
                }
                Ok(Ok(frame)) => frame,
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    match buffer.push(&frame.payload, setup.limits.max_message_size) {
                        Ok(records) => {
                            for record in records {
                                if let Some(reason) = Box::pin(dispatch.record(&record)).await {
                                    end = Some(reason);
                                    break;
                                }
                            }
                        }
                        Err(_) => end = Some(End::TooLarge),
                    }
                }
                OpCode::Ping => {
                    let _ = out_tx.send(Out::Pong(frame.payload.to_vec())).await;
                }
                OpCode::Close => {
                    end = Some(End::ClientClosed);
                }
                _ => {}
            }
        }
        let (Some(attach_rx), Some(swap_tx)) = (attach_rx.as_mut(), swap_tx.as_ref()) else {
            break;
        };
        if end.is_some() || !dropped {
            break;
        }
        // Stateful reconnect: keep the connection, and what is sent to it, for a new socket.
        // The writer keeps every unacknowledged message whether or not its writes to the dead
        // socket fail, and sends them again on the new one.
        let resumed = tokio::select! {
            resumed = tokio::time::timeout(setup.limits.client_timeout, attach_rx.recv()) => resumed,
            _ = &mut writer => {
                writer_ended = true;
                break;
            }
        };
        match resumed {
            Ok(Some((new_read, new_write))) => {
                tracing::debug!(connection = %setup.id, "connection resumed on a new socket");
                read = new_read;
                buffer = RecordBuffer::new(wire);
                if Box::pin(swap_tx.send(new_write)).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    if stateful {
        setup
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&setup.id);
    }

    // Stop the work in flight, then close.
    let worker = dispatch.worker.take().map(|(_, handle)| handle);
    drop(dispatch);
    for (_, handle) in streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
    {
        handle.abort();
    }
    if let Some(worker) = worker {
        worker.abort();
    }
    let close = match end {
        Some(End::Close(error)) => Some(Out::Close {
            error: Some(error),
            allow_reconnect: false,
            code: 1000,
        }),
        Some(End::TooLarge) => Some(Out::Close {
            error: Some(format!(
                "Connection closed with an error: a message exceeded the maximum size of {} bytes.",
                setup.limits.max_message_size
            )),
            allow_reconnect: false,
            code: 1009,
        }),
        Some(End::Protocol(error, code)) => Some(Out::Close {
            error: Some(error),
            allow_reconnect: false,
            code,
        }),
        Some(End::ClientClosed) => Some(Out::Close {
            error: None,
            allow_reconnect: false,
            code: 1000,
        }),
        None => None,
    };
    Box::pin(async move {
        // Unregister before the last frame goes out: a client whose close was answered is
        // gone from presence and groups on every node. The writer is told first, so the end
        // of its delivery channel is not mistaken for a slow consumer.
        ending.store(true, Ordering::Release);
        if let Err(err) = setup.node.disconnect(&hub_name, &setup.id).await {
            tracing::warn!(connection = %setup.id, %err, "could not unregister a connection");
        }
        if let Some(close) = close {
            let _ = out_tx.send(close).await;
        }
        drop(out_tx);
        if !writer_ended {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
        if !dropped {
            // The close frame is out: let the client answer and hang up.
            let _ = tokio::time::timeout(CLOSE_LINGER, read.drain()).await;
        }
        metrics.disconnects.inc();
        metrics.connections.dec();
        if let Err(err) = setup.hub.disconnected(ctx).await {
            tracing::warn!(connection = %setup.id, %err, "the hub's disconnect hook failed");
        }
    })
    .await;
}

/// Reads the handshake, registers the connection and accepts it; `None` when refused (the
/// client was told why).
async fn open(
    read: &mut Reader,
    write: &mut Writer,
    buffer: &mut RecordBuffer,
    setup: &Setup,
) -> Option<Opened> {
    // The handshake: the first record, within the handshake timeout.
    let first = tokio::time::timeout(setup.limits.handshake_timeout, async {
        loop {
            let frame = read.read().await.map_err(|e| e.to_string())?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    // Bytes that are no handshake are answered (below); a failed socket is not.
                    match buffer.push_handshake(&frame.payload, setup.limits.max_message_size) {
                        Ok(Some(handshake)) => return Ok::<_, String>(Ok(handshake)),
                        Ok(None) => {}
                        Err(err) => return Ok(Err(err)),
                    }
                }
                OpCode::Close => return Err("the client closed before its handshake".into()),
                _ => {}
            }
        }
    })
    .await;
    let handshake = match first {
        Ok(Ok(record)) => record.and_then(|record| Handshake::parse(&record)),
        Ok(Err(reason)) => {
            setup.metrics.refused("handshake");
            tracing::debug!(connection = %setup.id, %reason, "handshake failed");
            return None;
        }
        Err(_) => {
            setup.metrics.refused("handshake");
            let reason = "no handshake within the handshake timeout";
            reject(write, reason, setup.limits.handshake_timeout).await;
            tracing::debug!(connection = %setup.id, reason, "handshake failed");
            return None;
        }
    };
    if !matches!(&handshake, Ok(h) if Protocol::from_name(&h.protocol).is_some() && h.version >= 1 && h.version <= protocol::MAX_VERSION)
    {
        setup.metrics.refused("handshake");
    }
    let handshake = match handshake {
        Ok(h) if Protocol::from_name(&h.protocol).is_none() => {
            let reason = format!("The protocol '{}' is not supported.", h.protocol);
            reject(write, &reason, setup.limits.handshake_timeout).await;
            return None;
        }
        Ok(h) if h.version == 0 || h.version > protocol::MAX_VERSION => {
            let reason = format!(
                "The server does not support version {} of the '{}' protocol.",
                h.version, h.protocol
            );
            reject(write, &reason, setup.limits.handshake_timeout).await;
            return None;
        }
        Ok(h) => h,
        Err(err) => {
            reject(write, &err.0, setup.limits.handshake_timeout).await;
            return None;
        }
    };
    tracing::trace!(connection = %setup.id, protocol = %handshake.protocol, version = handshake.version, "handshake");
    let wire = Protocol::from_name(&handshake.protocol).unwrap_or(Protocol::Json);
    buffer.switch_to(wire);
    let records = match buffer.drain(setup.limits.max_message_size) {
        Ok(records) => records,
        Err(err) => {
            setup.metrics.refused("handshake");
            reject(write, &err.0, setup.limits.handshake_timeout).await;
            return None;
        }
    };

    let hub_name = setup.hub.name().clone();
    let connection = match setup
        .node
        .connect(&hub_name, Some(setup.id.clone()), setup.user.clone())
        .await
    {
        Ok(c) => c,
        Err(err) => {
            setup.metrics.refused(match &err {
                Error::TooManyConnections { .. } => "limit",
                _ => "register",
            });
            let reason = match &err {
                Error::TooManyConnections { .. } => "The server is at its connection limit.".into(),
                Error::DuplicateConnection(_) => "This connection id is already connected.".into(),
                other => format!("The connection could not be registered: {other}"),
            };
            reject(write, &reason, setup.limits.handshake_timeout).await;
            return None;
        }
    };
    let accepted = Frame::text(Payload::Owned(protocol::handshake_response(None)));
    if !put(write, accepted, setup.limits.handshake_timeout).await {
        let _ = setup.node.disconnect(&hub_name, &setup.id).await;
        return None;
    }
    Some(Opened {
        wire,
        stateful: handshake.version >= 2,
        records,
        connection,
    })
}

/// A frame of records: binary for MessagePack, text for JSON.
fn frame_of(wire: Protocol, payload: Payload<'_>) -> Frame<'_> {
    if wire.is_binary() {
        Frame::binary(payload)
    } else {
        Frame::text(payload)
    }
}

/// Sends a handshake error and closes.
async fn reject(write: &mut Writer, reason: &str, limit: Duration) {
    let response = protocol::handshake_response(Some(reason));
    if put(write, Frame::text(Payload::Owned(response)), limit).await {
        let _ = put(write, Frame::close(1002, reason.as_bytes()), limit).await;
    }
}

/// Writes one frame, giving up after `limit`: a client that stops reading must not hold its
/// writer (and the deliveries queued behind it) forever. The write and its timer are boxed
/// while they run, so the writer task is not sized for them while it waits.
async fn put(write: &mut Writer, frame: Frame<'_>, limit: Duration) -> bool {
    matches!(
        Box::pin(tokio::time::timeout(limit, write.write(frame))).await,
        Ok(Ok(()))
    )
}

/// Why the reader stopped.
enum End {
    /// Close with this error.
    Close(String),
    /// A message over the size limit.
    TooLarge,
    /// A record that is not the hub protocol, or a frame that is not WebSocket: the error
    /// and the close code.
    Protocol(String, u16),
    /// The client sent a hub `Close` or a WebSocket close.
    ClientClosed,
}

type Streams = Arc<Mutex<HashMap<String, AbortHandle>>>;

/// One invocation for the connection's worker.
struct Work {
    invocation_id: Option<String>,
    method: crate::hub::Method,
    arguments: Vec<Value>,
}

/// Items a client may send on one stream before the reader waits for the method to take them.
const UPLOAD_QUEUE: usize = 32;

/// Streams from one client that may be open at once.
const MAX_UPLOADS: usize = 64;

struct Dispatch {
    /// The hub protocol the client chose.
    wire: Protocol,
    /// Whether the client speaks stateful reconnect (protocol version 2).
    stateful: bool,
    /// The sequence id of the next sequenced message from the client.
    incoming: u64,
    /// The highest sequence id handled; resent messages at or below it are skipped.
    received: u64,
    /// Whether an `Ack` should go out.
    ack_due: bool,
    /// Paces invocations: a client over its rate waits, and stops being read meanwhile.
    limiter: Option<DefaultDirectRateLimiter>,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    ctx: Context,
    out: queue::Sender<Out>,
    /// The queue of the task that runs invocations, started by the first one: a connection
    /// that never invokes anything does not pay for it.
    worker: Option<(mpsc::Sender<Box<Work>>, tokio::task::JoinHandle<()>)>,
    streams: Streams,
    /// The client's open streams to uploading methods, by stream id.
    uploads: HashMap<String, mpsc::Sender<Upload>>,
}

impl Dispatch {
    async fn complete(&self, invocation_id: Option<String>, outcome: Outcome) {
        if let Some(invocation_id) = invocation_id {
            let record = self.wire.encode(&HubMessage::Completion {
                invocation_id,
                outcome,
            });
            let _ = self.out.send(Out::Record(record)).await;
        }
    }

    /// Handles one record; `Some` ends the connection.
    async fn record(&mut self, record: &[u8]) -> Option<End> {
        self.metrics.messages_in.inc();
        let message = match self.wire.parse(record) {
            Ok(m) => m,
            Err(err) => {
                return Some(End::Protocol(
                    format!("Connection closed with an error: invalid message: {err}"),
                    1002,
                ));
            }
        };
        if self.stateful {
            match &message {
                HubMessage::Ack { sequence_id } => {
                    let _ = self.out.send(Out::Acked(*sequence_id)).await;
                    return None;
                }
                HubMessage::Sequence { sequence_id } => {
                    self.incoming = *sequence_id;
                    return None;
                }
                m if m.is_sequenced() => {
                    let id = self.incoming;
                    self.incoming += 1;
                    if id <= self.received {
                        // Resent after a reconnect, and already handled.
                        return None;
                    }
                    self.received = id;
                    self.ack_due = true;
                }
                _ => {}
            }
        }
        if let (
            Some(limiter),
            HubMessage::Invocation { .. } | HubMessage::StreamInvocation { .. },
        ) = (&self.limiter, &message)
        {
            limiter.until_ready().await;
        }
        match message {
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                self.invoke(invocation_id, &target, arguments, stream_ids, false)
                    .await;
            }
            HubMessage::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                self.invoke(Some(invocation_id), &target, arguments, stream_ids, true)
                    .await;
            }
            HubMessage::StreamItem {
                invocation_id,
                item,
            } => {
                // A stream the method stopped reading (it returned) is forgotten.
                if let Some(tx) = self.uploads.get(&invocation_id)
                    && tx.send(Upload::Item(item)).await.is_err()
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
                    let _ = tx.send(end).await;
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
                let id = InvocationId::new(&invocation_id);
                if let Err(err) = self
                    .ctx
                    .node()
                    .complete(self.ctx.connection_id(), &id, result)
                    .await
                {
                    tracing::debug!(connection = %self.ctx.connection_id(), %err, "completion refused");
                }
            }
            HubMessage::CancelInvocation { invocation_id } => {
                if let Some(handle) = self
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&invocation_id)
                {
                    handle.abort();
                }
            }
            HubMessage::Close { .. } => return Some(End::ClientClosed),
            HubMessage::Ping | HubMessage::Ack { .. } | HubMessage::Sequence { .. } => {}
        }
        None
    }

    async fn invoke(
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
            )
            .await;
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
            self.complete(invocation_id, Outcome::Error(error)).await;
            return;
        }
        // Streams whose method has returned are forgotten; the rest count against the limit.
        self.uploads.retain(|_, tx| !tx.is_closed());
        if self.uploads.len() + stream_ids.len() > MAX_UPLOADS {
            let error =
                format!("at most {MAX_UPLOADS} streams from the client may be open at once");
            self.complete(invocation_id, Outcome::Error(error)).await;
            return;
        }
        if let Some(taken) = stream_ids.iter().find(|id| {
            self.uploads.contains_key(*id)
                || stream_ids.iter().filter(|other| other == id).count() > 1
        }) {
            let error = format!("stream id '{taken}' is already in use");
            self.complete(invocation_id, Outcome::Error(error)).await;
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
            )
            .await;
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
            self.complete(invocation_id, Outcome::Error(error)).await;
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
            let (out, wire, name) = (self.out.clone(), self.wire, method.name.clone());
            tokio::spawn(async move {
                if let Some(record) = completion(call, &name, invocation_id, wire).await {
                    let _ = out.send(Out::Record(record)).await;
                }
            });
            return;
        }
        let (work, _) = self.worker.get_or_insert_with(|| {
            let (work, queue) = mpsc::channel::<Box<Work>>(INVOCATION_QUEUE);
            let handle = tokio::spawn(worker(
                queue,
                self.ctx.clone(),
                self.out.clone(),
                self.streams.clone(),
                self.wire,
            ));
            (work, handle)
        });
        let _ = work
            .send(Box::new(Work {
                invocation_id,
                method,
                arguments,
            }))
            .await;
    }
}

/// Waits for a unary or uploading call and encodes its completion (none without an
/// invocation id).
async fn completion(
    call: tokio::task::JoinHandle<crate::hub::HubResult>,
    name: &str,
    invocation_id: Option<String>,
    wire: Protocol,
) -> Option<Vec<u8>> {
    let outcome = match call.await {
        Ok(Ok(Value::Null)) => Outcome::Void,
        Ok(Ok(value)) => Outcome::Result(value),
        Ok(Err(err)) => Outcome::Error(err.message().to_owned()),
        Err(join) => {
            tracing::error!(method = %name, error = %join, "a hub method failed");
            Outcome::Error(format!(
                "An unexpected error occurred invoking '{name}' on the server."
            ))
        }
    };
    let invocation_id = invocation_id?;
    Some(wire.encode(&HubMessage::Completion {
        invocation_id,
        outcome,
    }))
}

/// Runs a connection's invocations one at a time, in order (streams, and methods that take
/// streams from the client, run beside it: they wait for the client's next items, which must
/// not hold up the calls behind them).
async fn worker(
    mut work: mpsc::Receiver<Box<Work>>,
    ctx: Context,
    out: queue::Sender<Out>,
    streams: Streams,
    wire: Protocol,
) {
    while let Some(item) = work.recv().await {
        let args = Arguments::new(&item.method.name, item.arguments);
        let call = match item.method.handler.clone() {
            // A call without an invocation id is not waited for: its sends need not wait for
            // the log either (see `Recipients::send`).
            Handler::Unary(handler) => Ok(tokio::spawn(handler(
                if item.invocation_id.is_some() {
                    ctx.clone()
                } else {
                    ctx.not_awaited()
                },
                args,
            ))),
            Handler::Streaming(handler) => Err((handler, args)),
            // Run beside the worker, from `invoke`.
            Handler::Uploading(_) => continue,
        };
        match call {
            Ok(call) => {
                let record = completion(call, &item.method.name, item.invocation_id, wire).await;
                if let Some(record) = record
                    && out.send(Out::Record(record)).await.is_err()
                {
                    return;
                }
            }
            Err((handler, args)) => {
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
                        if out.send(Out::Record(record)).await.is_err() {
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
                    let _ = out.send(Out::Record(record)).await;
                });
                streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(invocation_id, forward.abort_handle());
            }
        }
    }
}

/// Turns a delivery into the record the client receives, in its protocol.
fn delivery_record(delivery: &Delivery, wire: Protocol) -> Option<Cow<'_, [u8]>> {
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

/// What the writer has sent and not yet seen acknowledged, for a resume (stateful reconnect).
#[derive(Default)]
struct Unacked {
    next: u64,
    records: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

impl Unacked {
    fn push(&mut self, record: &[u8]) {
        self.next += 1;
        self.bytes += record.len();
        self.records.push_back((self.next, record.to_vec()));
    }

    fn acked(&mut self, up_to: u64) {
        while let Some((id, record)) = self.records.front() {
            if *id > up_to {
                break;
            }
            self.bytes -= record.len();
            self.records.pop_front();
        }
    }

    /// The sequence id of the first message a resumed socket gets.
    fn first(&self) -> u64 {
        self.records.front().map_or(self.next + 1, |(id, _)| *id)
    }
}

/// What the writer task works with.
struct WriterParts {
    write: Writer,
    connection: backplane_core::Connection,
    out: queue::Receiver<Out>,
    node: Node,
    ctx: Context,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    ending: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// New sockets of a stateful connection.
    resume: Option<mpsc::Receiver<Writer>>,
    wire: Protocol,
}

/// The frame being assembled: its bytes, how many deliveries it carries, and their durable ids.
struct Pending {
    bytes: Vec<u8>,
    deliveries: u64,
    acks: Vec<backplane_core::MessageId>,
}

/// Sends everything queued for the client: what the node delivers and what the reader and
/// worker queue, coalesced into frames of up to [`FRAME_BYTES`], plus keep-alive pings. With
/// stateful reconnect (`resume` is set), sequenced messages are kept until the client
/// acknowledges them, and a new socket from `resume` gets them again after a `Sequence`.
///
/// Its parts come boxed: the task keeps one copy of them, not the arguments and the locals.
async fn writer(parts: Box<WriterParts>) {
    let WriterParts {
        write,
        mut connection,
        mut out,
        node,
        ctx,
        limits,
        mut shutdown,
        ending,
        metrics,
        mut resume,
        wire,
    } = *parts;
    let stateful = resume.is_some();
    let mut write = Some(write);
    let mut unacked = Unacked::default();
    let mut connection_open = true;
    let mut ping = tokio::time::interval(limits.keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut wrote_since_tick = false;
    let mut frame = Pending {
        // Grown by what is queued; an idle connection holds next to nothing.
        bytes: Vec::new(),
        deliveries: 0,
        acks: Vec::new(),
    };
    let mut closing: Option<(u16, Option<Vec<u8>>)> = None;
    let mut out_open = true;
    let mut unwritten_acks = Vec::new();
    // A sequenced record: kept for a resume, and written when a socket is attached.
    let sequenced = |frame: &mut Pending, unacked: &mut Unacked, record: &[u8], attached: bool| {
        if stateful {
            unacked.push(record);
        }
        if attached {
            frame.bytes.extend_from_slice(record);
        }
    };
    loop {
        frame.bytes.clear();
        frame.acks.clear();
        frame.deliveries = 0;
        let attached = write.is_some();
        let room = !stateful || unacked.bytes < RESUME_BUFFER_BYTES;
        tokio::select! {
            biased;
            _ = shutdown.changed(), if closing.is_none() => {
                let record = wire.encode(&HubMessage::Close {
                    error: Some("Server is shutting down.".into()),
                    allow_reconnect: true,
                });
                closing = Some((1001, Some(record)));
            }
            new = async { resume.as_mut()?.recv().await }, if stateful => match new {
                Some(new) => {
                    write = Some(new);
                    // Everything not acknowledged, after the id it starts at.
                    frame.bytes.extend_from_slice(&wire.encode(&HubMessage::Sequence { sequence_id: unacked.first() }));
                    for (_, record) in &unacked.records {
                        frame.bytes.extend_from_slice(record);
                    }
                }
                None => resume = None,
            },
            item = out.recv(), if out_open => match item {
                Some(Out::Record(record)) => sequenced(&mut frame, &mut unacked, &record, attached),
                Some(Out::Control(record)) => {
                    if attached {
                        frame.bytes.extend_from_slice(&record);
                    }
                }
                Some(Out::Acked(id)) => unacked.acked(id),
                Some(Out::Pong(payload)) => {
                    if let Some(w) = write.as_mut() {
                        if !put(w, Frame::pong(Payload::Owned(payload)), limits.client_timeout).await {
                            write = None;
                            if !stateful {
                                break;
                            }
                        }
                    }
                    continue;
                }
                Some(Out::Close { error, allow_reconnect, code }) => {
                    let record = wire.encode(&HubMessage::Close { error, allow_reconnect });
                    closing = Some((code, Some(record)));
                }
                None => out_open = false,
            },
            delivery = connection.recv(), if connection_open && room => match delivery {
                Some(delivery) => {
                    if let Some(record) = delivery_record(&delivery, wire) {
                        sequenced(&mut frame, &mut unacked, &record, attached);
                        frame.deliveries += 1;
                    }
                    if let DeliveryKind::Durable(id) = delivery.kind {
                        frame.acks.push(id);
                    }
                }
                None if ending.load(Ordering::Acquire) => connection_open = false,
                None => {
                    // The node dropped the connection: it fell behind, or the node stops.
                    let record = wire.encode(&HubMessage::Close {
                        error: Some("The server closed the connection: it could not keep up with the messages sent to it.".into()),
                        allow_reconnect: true,
                    });
                    closing = Some((1008, Some(record)));
                }
            },
            _ = ping.tick() => {
                if !wrote_since_tick && attached {
                    frame.bytes.extend_from_slice(&wire.encode(&HubMessage::Ping));
                }
                wrote_since_tick = false;
            }
        }
        let attached = write.is_some();
        if closing.is_none() && frame.deliveries > 0 {
            // A delivery woke the writer: let the publisher's next messages queue up behind it,
            // so a burst goes out in few writes.
            tokio::task::yield_now().await;
        }
        if closing.is_none() {
            // Everything else already queued goes in the same frame.
            while frame.bytes.len() < FRAME_BYTES {
                if connection_open && (!stateful || unacked.bytes < RESUME_BUFFER_BYTES) {
                    if let Some(delivery) = connection.try_recv() {
                        if let Some(record) = delivery_record(&delivery, wire) {
                            sequenced(&mut frame, &mut unacked, &record, attached);
                            frame.deliveries += 1;
                        }
                        if let DeliveryKind::Durable(id) = delivery.kind {
                            frame.acks.push(id);
                        }
                        continue;
                    }
                }
                match out.try_recv() {
                    Some(Out::Record(record)) => {
                        sequenced(&mut frame, &mut unacked, &record, attached)
                    }
                    Some(Out::Control(record)) => {
                        if attached {
                            frame.bytes.extend_from_slice(&record);
                        }
                    }
                    Some(Out::Acked(id)) => unacked.acked(id),
                    Some(Out::Pong(payload)) => {
                        if let Some(w) = write.as_mut() {
                            let _ = put(
                                w,
                                Frame::pong(Payload::Owned(payload)),
                                limits.client_timeout,
                            )
                            .await;
                        }
                    }
                    Some(Out::Close {
                        error,
                        allow_reconnect,
                        code,
                    }) => {
                        let record = wire.encode(&HubMessage::Close {
                            error,
                            allow_reconnect,
                        });
                        closing = Some((code, Some(record)));
                        break;
                    }
                    None => break,
                }
            }
        }
        if !frame.bytes.is_empty() {
            if let Some(w) = write.as_mut() {
                let started = std::time::Instant::now();
                if put(
                    w,
                    frame_of(wire, Payload::Borrowed(&frame.bytes)),
                    limits.client_timeout,
                )
                .await
                {
                    metrics.delivered(frame.deliveries, true);
                    metrics
                        .delivery_seconds
                        .observe(started.elapsed().as_secs_f64());
                    wrote_since_tick = true;
                } else {
                    write = None;
                    if !stateful {
                        metrics.delivered(frame.deliveries, false);
                        break;
                    }
                }
            }
        }
        // A durable message is acknowledged once written to a socket; one kept for a resume
        // waits for that. If the connection ends first, the user's next connection gets it.
        unwritten_acks.append(&mut frame.acks);
        if write.is_some() && !frame.bytes.is_empty() {
            for id in unwritten_acks.drain(..) {
                if let Err(err) =
                    Box::pin(node.acknowledge(ctx.hub(), ctx.connection_id(), id)).await
                {
                    tracing::warn!(connection = %ctx.connection_id(), %err, "could not acknowledge a durable message");
                }
            }
        }
        if let Some((code, record)) = closing.take() {
            if let Some(w) = write.as_mut() {
                if let Some(record) = record {
                    let _ = put(
                        w,
                        frame_of(wire, Payload::Owned(record)),
                        limits.client_timeout,
                    )
                    .await;
                }
                let _ = put(w, Frame::close(code, b""), limits.client_timeout).await;
            }
            break;
        }
        if !out_open {
            // The reader is gone and said nothing more: close quietly.
            if let Some(w) = write.as_mut() {
                let _ = put(w, Frame::close(1000, b""), limits.client_timeout).await;
            }
            break;
        }
    }
}
