//! One client's WebSocket, served by one task: the handshake, then a loop that reads the
//! client's frames and dispatches its invocations, and writes everything queued for the
//! client, coalesced into as few frames as possible.
//!
//! The loop polls the connection's state ([`ConnectionState`]) by hand instead of running a
//! task per direction: a connection is idle most of its life, and a single task whose future
//! holds just that state is what keeps an idle connection small. Work that has to wait (a full
//! invocation queue, a stream item for a method that is not reading yet, a client result
//! going to the node) becomes a boxed future the loop polls, and reading pauses until it is
//! done: a client that sends faster than its work runs is slowed down, while what is queued
//! for it keeps going out.
//!
//! This file holds the state and the loop; [`handshake`](mod@handshake),
//! [`read`](mod@read) (frames, records, invocations), [`write`](mod@write) (frames out,
//! durable acknowledgements), [`resend`](mod@resend) (stateful reconnect) and
//! [`worker`](mod@worker) (invocations in order, completions after their commits) each hold
//! one side of it.

mod handshake;
mod read;
mod resend;
mod worker;
mod write;

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{self, Poll};
use std::time::Duration;

use backplane_core::queue;
use backplane_core::{ConnectionId, MessageId, Node, UserId};
use fastwebsockets::upgrade::UpgradeFut;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

use crate::hub::{Context, Hub, Upload};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::protocol::{HubMessage, Protocol, RecordBuffer};
use crate::socket::{FrameReader, HEADER_ROOM, Outbox, Socket};
use handshake::{Opened, handshake};
use resend::Unacked;
pub(crate) use resend::resume;
use worker::Work;
use write::{Writing, extend_frame, flush};

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
async fn open(upgrade: UpgradeFut, setup: Box<Setup>) -> Option<Box<ConnectionState>> {
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
    Some(Box::new(ConnectionState::new(
        *setup, reader, buffer, opened,
    )))
}

/// A boxed future the connection's loop polls.
type Deferred = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Everything one connection is: its socket, what it has read and not yet handled, what
/// waits to be sent, and its work in flight.
struct ConnectionState {
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

impl ConnectionState {
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
