//! One client's WebSocket, served by one task: the handshake, then a loop that reads the
//! client's frames and dispatches its invocations, and writes everything queued for the
//! client, coalesced into as few frames as possible.
//!
//! The loop polls the connection's state ([`Conn`]) by hand instead of running a task per
//! direction: a connection is idle most of its life, and a single task whose future holds
//! just that state is what keeps an idle connection small. Work that has to wait (a full
//! invocation queue, a stream item for a method that is not reading yet, a client result
//! going to the node) becomes a boxed future the loop polls, and reading pauses until it is
//! done: a client that sends faster than its work runs is slowed down, while what is queued
//! for it keeps going out.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{self, Poll};
use std::time::Duration;

use backplane_core::queue;
use backplane_core::{
    ConnectionId, Delivery, DeliveryKind, Error, InvocationId, MessageId, Node, UserId,
};
use bytes::Bytes;
use fastwebsockets::OpCode;
use fastwebsockets::upgrade::UpgradeFut;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

use crate::hub::{
    Arguments, Context, Handler, Hub, HubError, StreamReceiver, StreamSender, Upload,
};
use crate::metrics::Metrics;
use crate::protocol::{self, Handshake, HubMessage, Outcome, Protocol, RecordBuffer};
use crate::server::Limits;
use crate::socket::{FrameReader, HEADER_ROOM, Outbox, ReadError, Socket};

/// How many bytes of records one frame carries at most; while a frame this full waits for
/// the socket, the connection takes no more deliveries and reads nothing more.
const FRAME_BYTES: usize = 64 * 1024;

/// How many invocations may wait for the connection's worker before reading pauses.
const INVOCATION_QUEUE: usize = 64;

/// How many records (completions, stream items) the connection's worker and streams may
/// queue before they wait.
const TASK_QUEUE: usize = 256;

/// How long a closed connection keeps reading, for the client to answer the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// How long the last frames of a closing connection may take to write.
const CLOSE_WRITE: Duration = Duration::from_secs(5);

/// How many rounds the loop makes before it lets other tasks run.
const ROUNDS: usize = 32;

/// How many bytes of unacknowledged messages a stateful connection keeps for a resume; past
/// that, it stops taking deliveries until the client acknowledges (and falls behind, if it
/// never does).
const RESUME_BUFFER_BYTES: usize = 1024 * 1024;

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

type Reader = FrameReader<Socket>;

/// The logical connections that may resume on a new socket (stateful reconnect), by id.
pub(crate) type Sessions = Arc<Mutex<HashMap<ConnectionId, mpsc::Sender<Socket>>>>;

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

/// What the handshake established.
struct Opened {
    wire: Protocol,
    stateful: bool,
    /// Records that came in the handshake's frame.
    records: Vec<Vec<u8>>,
    connection: backplane_core::Connection,
}

/// Why a connection ends.
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
    /// The hub's connect hook refused the connection.
    Refused(String),
    /// The server shuts down.
    Shutdown,
    /// The node dropped the connection: it fell behind its deliveries.
    SlowConsumer,
    /// The socket failed or stalled, or the client hung up (or did not come back in time to
    /// resume): nothing more can be sent.
    Dropped,
}

impl End {
    /// The hub `Close` message and the close code that tell the client, if it can be told.
    fn close(&self, max_message_size: usize) -> Option<(HubMessage, u16)> {
        let (error, allow_reconnect, code) = match self {
            Self::Close(error) => (Some(error.clone()), false, 1000),
            Self::TooLarge => (
                Some(format!(
                    "Connection closed with an error: a message exceeded the maximum size of {max_message_size} bytes."
                )),
                false,
                1009,
            ),
            Self::Protocol(error, code) => (Some(error.clone()), false, *code),
            Self::ClientClosed => (None, false, 1000),
            Self::Refused(error) => (Some(error.clone()), false, 1008),
            Self::Shutdown => (Some("Server is shutting down.".into()), true, 1001),
            Self::SlowConsumer => (
                Some(
                    "The server closed the connection: it could not keep up with the messages sent to it."
                        .into(),
                ),
                true,
                1008,
            ),
            Self::Dropped => return None,
        };
        Some((
            HubMessage::Close {
                error,
                allow_reconnect,
            },
            code,
        ))
    }
}

/// Serves one WebSocket, once upgraded, until it closes.
pub(crate) async fn serve(upgrade: UpgradeFut, setup: Box<Setup>) {
    // The phases that run once are boxed, so the task holds little more than the
    // connection's state while it is served.
    let Some(mut conn) = Box::pin(open(upgrade, setup)).await else {
        return;
    };
    let end = match Box::pin(conn.start()).await {
        Some(end) => end,
        None => poll_fn(|cx| conn.poll(cx)).await,
    };
    Box::pin(conn.finish(end)).await;
}

/// Completes the upgrade and the handshake; `None` when either fails.
async fn open(upgrade: UpgradeFut, setup: Box<Setup>) -> Option<Box<Conn>> {
    let socket = match upgrade.await {
        Ok(ws) => ws.into_inner(),
        Err(err) => {
            tracing::debug!(%err, "websocket upgrade failed");
            return None;
        }
    };
    let mut reader = FrameReader::new(socket, setup.limits.max_message_size);
    let mut buffer = RecordBuffer::default();
    let opened = handshake(&mut reader, &mut buffer, &setup).await?;
    Some(Box::new(Conn::new(*setup, reader, buffer, opened)))
}

/// Reads the handshake, registers the connection and accepts it; `None` when refused (the
/// client was told why).
async fn handshake(
    reader: &mut Reader,
    buffer: &mut RecordBuffer,
    setup: &Setup,
) -> Option<Opened> {
    let limit = setup.limits.handshake_timeout;
    // The handshake: the first record, within the handshake timeout.
    let first = tokio::time::timeout(limit, async {
        loop {
            let frame = reader.read().await.map_err(|e| e.to_string())?;
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
            reject(reader, reason, limit).await;
            tracing::debug!(connection = %setup.id, reason, "handshake failed");
            return None;
        }
    };
    if !matches!(&handshake, Ok(h) if Protocol::from_name(&h.protocol).is_some() && h.version <= protocol::MAX_VERSION)
    {
        setup.metrics.refused("handshake");
    }
    let handshake = match handshake {
        Ok(h) if Protocol::from_name(&h.protocol).is_none() => {
            let reason = format!("The protocol '{}' is not supported.", h.protocol);
            reject(reader, &reason, limit).await;
            return None;
        }
        // Every version up to the server's own, as ASP.NET Core's protocols accept: 0 and 1
        // differ from 2 only in having no stateful reconnect.
        Ok(h) if h.version > protocol::MAX_VERSION => {
            let reason = format!(
                "The server does not support version {} of the '{}' protocol.",
                h.version, h.protocol
            );
            reject(reader, &reason, limit).await;
            return None;
        }
        Ok(h) => h,
        Err(err) => {
            reject(reader, &err.0, limit).await;
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
            reject(reader, &err.0, limit).await;
            return None;
        }
    };

    let hub_name = setup.hub.name();
    let connection = match setup
        .node
        .connect(hub_name, Some(setup.id.clone()), setup.user.clone())
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
            reject(reader, &reason, limit).await;
            return None;
        }
    };
    let mut outbox = Outbox::default();
    outbox.frame(OpCode::Text, &protocol::handshake_response(None));
    if !matches!(
        tokio::time::timeout(limit, outbox.flush(reader.get_mut())).await,
        Ok(Ok(()))
    ) {
        let _ = setup.node.disconnect(hub_name, &setup.id).await;
        return None;
    }
    Some(Opened {
        wire,
        stateful: handshake.version >= 2,
        records,
        connection,
    })
}

/// Sends a handshake error and closes.
async fn reject(reader: &mut Reader, reason: &str, limit: Duration) {
    let mut outbox = Outbox::default();
    outbox.frame(OpCode::Text, &protocol::handshake_response(Some(reason)));
    outbox.close(1002, reason);
    let _ = tokio::time::timeout(limit, outbox.flush(reader.get_mut())).await;
}

/// A boxed future the connection's loop polls.
type Deferred = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The frame being written: what it carries, for the metrics and the durable
/// acknowledgements once it is out.
struct Writing {
    deliveries: u64,
    acks: Vec<MessageId>,
    started: Instant,
}

/// Everything one connection is: its socket, what it has read and not yet handled, what
/// waits to be sent, and its work in flight.
struct Conn {
    ctx: Context,
    hub: Arc<Hub>,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    sessions: Sessions,
    wire: Protocol,
    /// Whether the client speaks stateful reconnect (protocol version 2).
    stateful: bool,

    /// The socket; `None` while a stateful connection waits for its client to come back.
    socket: Option<Reader>,
    /// New sockets of a stateful connection.
    attach: Option<mpsc::Receiver<Socket>>,
    /// When the socket was lost, while the connection waits for a new one.
    detached: Option<Instant>,

    /// Records of the client's frames that wait to be handled.
    buffer: RecordBuffer,
    inbox: VecDeque<Vec<u8>>,
    /// An invocation over the rate limit, handled once `paused` has passed.
    held: Option<Box<HubMessage>>,
    /// Reading stops until then (the invocation rate limit).
    paused: Option<Instant>,
    /// Paces invocations: a client over its rate is read later.
    limiter: Option<Box<DefaultDirectRateLimiter>>,
    /// Since when every invocation has had to wait for the rate limit; past the client
    /// timeout, the connection is closed rather than make its calls wait longer.
    throttled_since: Option<Instant>,
    /// The sequence id of the next sequenced message from the client.
    incoming: u64,
    /// The highest sequence id handled; resent messages at or below it are skipped.
    received: u64,
    /// Whether an `Ack` should go out.
    ack_due: bool,
    /// When the client last sent anything.
    last_read: Instant,

    /// What the node delivers.
    connection: backplane_core::Connection,
    /// Records from the connection's worker and streams, and the sender they clone; created
    /// with the first of them.
    tasks: Option<TaskRecords>,
    /// The queue of the task that runs invocations, started by the first one: a connection
    /// that never invokes anything does not pay for it.
    worker: Option<(mpsc::Sender<Box<Work>>, tokio::task::JoinHandle<()>)>,
    /// Streams the server sends, by invocation id; created with the first one.
    streams: Option<Streams>,
    /// The client's open streams to uploading methods, by stream id.
    uploads: HashMap<String, mpsc::Sender<Upload>>,
    /// Work that must finish before anything more is read.
    busy: Option<Deferred>,

    /// The data frame being gathered: records after [`HEADER_ROOM`] bytes (empty and
    /// unallocated while nothing is gathered).
    frame: Vec<u8>,
    frame_deliveries: u64,
    frame_acks: Vec<MessageId>,
    /// Frames on their way to the socket.
    outbox: Outbox,
    writing: Option<Writing>,
    /// Since when the outbox has been waiting for the socket.
    stalled: Option<Instant>,
    /// When the server last sent a frame (a ping goes out after `keep_alive` without one).
    last_sent: Instant,
    /// Whether the loop let the publisher queue more before writing a frame of deliveries.
    yielded: bool,
    /// Set to end this poll and come back at once (the loop yields to other tasks).
    yielding: bool,
    /// What has been sent and not yet acknowledged, for a resume (stateful reconnect).
    unacked: Unacked,
    /// Durable messages written to the client, to acknowledge to the node.
    acks_due: Vec<MessageId>,
    /// Durable messages sent to a stateful client, with the sequence id of their record: they
    /// are acknowledged to the node once the client's `Ack` covers that id, and otherwise
    /// stay in the user's inbox for the next connection.
    awaiting_client: VecDeque<(u64, MessageId)>,
    acking: Option<Deferred>,

    /// Wakes the loop at its next deadline: ping, client timeout, stalled write, resume
    /// window, rate limit.
    timer: Pin<Box<Sleep>>,
    /// Whether the timer has been polled since it was last set.
    timer_polled: bool,
}

/// The queue of records from a connection's tasks: the sender they clone, and its receiver.
type TaskRecords = (queue::Sender<Vec<u8>>, queue::Receiver<Vec<u8>>);

/// Streams the server sends, by invocation id, to cancel them.
type Streams = Arc<Mutex<HashMap<String, AbortHandle>>>;

impl Conn {
    fn new(setup: Setup, reader: Reader, buffer: RecordBuffer, opened: Opened) -> Self {
        let Setup {
            hub,
            node,
            id,
            user,
            limits,
            shutdown,
            metrics,
            sessions,
        } = setup;
        let ctx = Context::new(
            node,
            hub.name().clone(),
            id,
            user,
            Some(metrics.clone()),
            limits.max_groups_per_connection,
        );
        let limiter = std::num::NonZeroU32::new(limits.invocations_per_second).map(|rate| {
            let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
            Box::new(RateLimiter::direct(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        let now = Instant::now();
        Self {
            ctx,
            hub,
            limits,
            metrics,
            shutdown,
            sessions,
            wire: opened.wire,
            stateful: opened.stateful,
            socket: Some(reader),
            attach: None,
            detached: None,
            buffer,
            inbox: opened.records.into(),
            held: None,
            paused: None,
            limiter,
            throttled_since: None,
            incoming: 1,
            received: 0,
            ack_due: false,
            last_read: now,
            connection: opened.connection,
            tasks: None,
            worker: None,
            streams: None,
            uploads: HashMap::new(),
            busy: None,
            frame: Vec::new(),
            frame_deliveries: 0,
            frame_acks: Vec::new(),
            outbox: Outbox::default(),
            writing: None,
            stalled: None,
            last_sent: now,
            yielded: false,
            yielding: false,
            unacked: Unacked::default(),
            acks_due: Vec::new(),
            awaiting_client: VecDeque::new(),
            acking: None,
            timer: Box::pin(tokio::time::sleep_until(
                now + limits.keep_alive.min(limits.client_timeout),
            )),
            timer_polled: false,
        }
    }

    fn id(&self) -> &ConnectionId {
        self.ctx.connection_id()
    }

    /// Counts the connection, registers it for resumes and runs the hub's connect hook;
    /// `Some` when it ends before it is served.
    async fn start(&mut self) -> Option<End> {
        self.metrics.connects.inc();
        self.metrics.connections.inc();
        if self.stateful {
            // Only stateful connections take new sockets (a channel allocates its first
            // block when created: idle connections must not pay for what they never use).
            let (attach_tx, attach_rx) = mpsc::channel(1);
            self.attach = Some(attach_rx);
            self.sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(self.id().clone(), attach_tx);
        }
        if *self.shutdown.borrow() {
            // Registered after the node closed its connections for the shutdown.
            return Some(End::Shutdown);
        }
        match self.hub.connected(self.ctx.clone()).await {
            Ok(()) => None,
            Err(err) => Some(End::Refused(format!(
                "Connection refused by the hub: {err}"
            ))),
        }
    }

    /// Serves the connection until it ends: rounds of reading, handling, gathering what is
    /// queued for the client and writing it, until none makes progress.
    fn poll(&mut self, cx: &mut task::Context<'_>) -> Poll<End> {
        for _ in 0..ROUNDS {
            let progress = match self.round(cx) {
                Ok(progress) => progress,
                Err(end) => return Poll::Ready(end),
            };
            if std::mem::take(&mut self.yielding) {
                // The waker has been called: the task comes back after the others.
                return Poll::Pending;
            }
            if !progress {
                if self.frame.len() <= HEADER_ROOM && self.frame.capacity() > 0 {
                    // Idle: give the frame buffer back.
                    self.frame = Vec::new();
                }
                return Poll::Pending;
            }
        }
        // Busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One round over every source of work; `true` when any made progress. A source that
    /// is not ready has registered the waker, so `false` means the task may sleep.
    fn round(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
        let mut progress = poll_slot(&mut self.busy, cx);
        if poll_slot(&mut self.acking, cx) || (self.acking.is_none() && !self.acks_due.is_empty()) {
            self.acknowledge();
            progress = true;
        }
        progress |= self.poll_attach(cx);
        progress |= self.poll_input(cx)?;
        progress |= self.poll_queued(cx)?;
        progress |= self.poll_write(cx)?;
        progress |= self.poll_timer(cx)?;
        Ok(progress)
    }

    /// Starts acknowledging the durable messages written to the client.
    fn acknowledge(&mut self) {
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

    /// Takes a new socket for a stateful connection and sends it everything not
    /// acknowledged, after the id it starts at.
    fn poll_attach(&mut self, cx: &mut task::Context<'_>) -> bool {
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
    fn drop_unsent(&mut self) {
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
    fn lost(&mut self) -> Result<(), End> {
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

    /// Moves the timer earlier, to `at`.
    fn arm(&mut self, at: Instant) {
        if at < self.timer.deadline() {
            self.reset_timer(at);
        }
    }

    fn reset_timer(&mut self, at: Instant) {
        self.timer.as_mut().reset(at);
        self.timer_polled = false;
    }

    /// Handles what the client sent, and reads more while nothing holds it back.
    fn poll_input(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
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

    /// Gathers into the frame what the worker, the streams and the node queued for the
    /// client, as long as the frame (and the resume buffer) have room.
    fn poll_queued(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
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
    fn poll_write(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
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
    fn wrote(&mut self, written: bool) {
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
    fn seal(&mut self) {
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

    /// Keeps the deadlines: the client timeout, a stalled write, the resume window, the
    /// rate limit's pause and the keep-alive ping.
    fn poll_timer(&mut self, cx: &mut task::Context<'_>) -> Result<bool, End> {
        // A timer polled once stays registered: after that, a glance tells whether it fired.
        if self.timer_polled && !self.timer.is_elapsed() {
            return Ok(false);
        }
        self.timer_polled = true;
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        let now = Instant::now();
        let timeout = self.limits.client_timeout;
        if self.detached.is_some_and(|since| now >= since + timeout) {
            return Err(End::Dropped);
        }
        if self.socket.is_some() {
            if now >= self.last_read + timeout {
                return Err(End::Close(
                    "Server timeout elapsed without receiving a message from the client.".into(),
                ));
            }
            if self.stalled.is_some_and(|since| now >= since + timeout) {
                tracing::debug!(connection = %self.id(), "the client stopped reading");
                self.lost()?;
            }
        }
        if self.paused.is_some_and(|until| now >= until) {
            self.paused = None;
        }
        if self.socket.is_some() && now >= self.last_sent + self.limits.keep_alive {
            let ping = self.wire.encode(&HubMessage::Ping);
            self.control(&ping);
            self.last_sent = now;
        }
        let mut next = now + self.limits.keep_alive.max(Duration::from_millis(1));
        if self.socket.is_some() {
            next = next
                .min(self.last_read + timeout)
                .min(self.last_sent + self.limits.keep_alive);
        }
        for deadline in [
            self.stalled.map(|since| since + timeout),
            self.detached.map(|since| since + timeout),
            self.paused,
        ]
        .into_iter()
        .flatten()
        {
            next = next.min(deadline);
        }
        self.reset_timer(next.max(now));
        Ok(true)
    }

    /// Adds a record that counts for stateful reconnect (a completion, a stream item, a
    /// message): kept for a resume, and gathered when a socket is attached.
    fn sequenced(&mut self, record: &[u8]) {
        if self.stateful {
            self.unacked.push(record);
        }
        if self.socket.is_some() {
            extend_frame(&mut self.frame, record);
        }
    }

    /// Adds a record that does not count for stateful reconnect (a ping, an `Ack`).
    fn control(&mut self, record: &[u8]) {
        if self.socket.is_some() {
            extend_frame(&mut self.frame, record);
        }
    }

    /// Sends a completion, when the client gave an invocation id.
    fn complete(&mut self, invocation_id: Option<String>, outcome: Outcome) {
        if let Some(invocation_id) = invocation_id {
            let record = self.wire.encode(&HubMessage::Completion {
                invocation_id,
                outcome,
            });
            self.sequenced(&record);
        }
    }

    /// The sender the worker and streams queue their records with.
    fn task_sender(&mut self) -> queue::Sender<Vec<u8>> {
        let (tx, _) = self.tasks.get_or_insert_with(|| queue::bounded(TASK_QUEUE));
        tx.clone()
    }

    fn streams(&mut self) -> Streams {
        self.streams.get_or_insert_with(Streams::default).clone()
    }

    /// Handles one record.
    fn record(&mut self, record: &[u8]) -> Result<(), End> {
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
    fn handle(&mut self, message: HubMessage, held: bool) -> Result<(), End> {
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
    fn run(&mut self, message: HubMessage) -> Result<(), End> {
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

    fn invoke(
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

    /// Ends the connection: stops its work, unregisters it, tells the client why (when it
    /// can still be told) and runs the hub's disconnect hook.
    async fn finish(&mut self, end: End) {
        if self.stateful {
            self.sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(self.id());
        }
        // Stop the work in flight.
        if let Some((_, worker)) = self.worker.take() {
            worker.abort();
        }
        if let Some(streams) = self.streams.take() {
            for (_, handle) in streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
            {
                handle.abort();
            }
        }
        self.uploads.clear();
        self.busy = None;
        // Unregister before the last frame goes out: a client whose close was answered is
        // gone from presence and groups on every node.
        let (node, hub, id) = (self.ctx.node(), self.ctx.hub(), self.ctx.connection_id());
        if let Err(err) = node.disconnect(hub, id).await {
            tracing::warn!(connection = %id, %err, "could not unregister a connection");
        }
        let close = end.close(self.limits.max_message_size);
        if let (Some(mut socket), Some((message, code))) = (self.socket.take(), close) {
            // The frame in flight goes out first, then what was gathered with the hub
            // `Close` after it, then the close frame.
            let mut written = flush(&mut self.outbox, &mut socket).await;
            self.wrote(written);
            if written {
                extend_frame(&mut self.frame, &self.wire.encode(&message));
                self.seal();
                self.outbox.close(code, "");
                written = flush(&mut self.outbox, &mut socket).await;
                self.wrote(written);
            }
            if written {
                // The close frame is out: let the client answer and hang up.
                let _ = tokio::time::timeout(CLOSE_LINGER, socket.drain()).await;
            }
        }
        // Durable messages the client has: acknowledged, or the next connection gets them.
        if let Some(acking) = self.acking.take() {
            let _ = tokio::time::timeout(CLOSE_WRITE, acking).await;
        }
        self.acknowledge();
        if let Some(acking) = self.acking.take() {
            let _ = tokio::time::timeout(CLOSE_WRITE, acking).await;
        }
        self.metrics.disconnects.inc();
        self.metrics.connections.dec();
        if let Err(err) = self.hub.disconnected(self.ctx.clone()).await {
            tracing::warn!(connection = %self.id(), %err, "the hub's disconnect hook failed");
        }
    }
}

/// Writes what the outbox holds, within [`CLOSE_WRITE`]; whether all of it went out.
async fn flush(outbox: &mut Outbox, socket: &mut Reader) -> bool {
    matches!(
        tokio::time::timeout(CLOSE_WRITE, outbox.flush(socket.get_mut())).await,
        Ok(Ok(()))
    )
}

/// Passes `item` to an uploading method's stream: at once when its queue has room, else as
/// work the loop waits for. `false` when the method stopped reading.
fn forward(tx: &mpsc::Sender<Upload>, item: Upload, busy: &mut Option<Deferred>) -> bool {
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

/// Polls the future in `slot`, emptying the slot once it is done; `true` then.
fn poll_slot(slot: &mut Option<Deferred>, cx: &mut task::Context<'_>) -> bool {
    let Some(future) = slot.as_mut() else {
        return false;
    };
    if future.as_mut().poll(cx).is_pending() {
        return false;
    }
    *slot = None;
    true
}

/// Appends a record to a frame buffer, making room for the header first.
fn extend_frame(frame: &mut Vec<u8>, record: &[u8]) {
    if frame.is_empty() {
        frame.reserve(HEADER_ROOM + record.len());
        frame.resize(HEADER_ROOM, 0);
    }
    frame.extend_from_slice(record);
}

/// One invocation for the connection's worker.
struct Work {
    invocation_id: Option<String>,
    method: crate::hub::Method,
    arguments: Vec<Value>,
}

/// Items a client may send on one stream before reading waits for the method to take them.
const UPLOAD_QUEUE: usize = 32;

/// Streams from one client that may be open at once.
const MAX_UPLOADS: usize = 64;

/// What a finished unary or uploading call's completion says.
fn outcome(joined: Result<crate::hub::HubResult, tokio::task::JoinError>, name: &str) -> Outcome {
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
async fn completion(
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
const FINISHING: usize = 256;

/// A completion waiting for its call's messages to be stored.
type Finishing = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// Runs `work` while the completions ahead of it go out as their messages are stored, in
/// order; with `room`, first waits until fewer than that many completions are held. `None`
/// when the connection is gone.
async fn beside<T>(
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
fn finishing(
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
async fn worker(
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

/// What has been sent and not yet acknowledged, for a resume (stateful reconnect).
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

    /// The sequence id of the last message sent (0 before the first).
    fn last(&self) -> u64 {
        self.next
    }

    /// The sequence id of the first message a resumed socket gets.
    fn first(&self) -> u64 {
        self.records.front().map_or(self.next + 1, |(id, _)| *id)
    }
}
