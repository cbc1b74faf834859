//! The hub connection: invocations, handlers, keep-alive, and the reconnect loop.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use backplane_core::signalr::{
    Handshake, HandshakeResponse, HubMessage, Outcome, Protocol, RecordBuffer,
};
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, WebSocketWrite,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{BoxFuture, Config};
use crate::error::{Error, Result};
use crate::transport::{Resume, Socket};

type Reader = FragmentCollectorRead<ReadHalf<TokioIo<Upgraded>>>;
type Writer = WebSocketWrite<WriteHalf<TokioIo<Upgraded>>>;
type Handler = Arc<dyn Fn(&[Value]) + Send + Sync>;
type ResultHandler = Arc<dyn Fn(Vec<Value>) -> BoxFuture<Result<Value, String>> + Send + Sync>;

/// The most bytes of queued records written as one WebSocket frame.
const MAX_FRAME: usize = 64 * 1024;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not started, or stopped.
    Disconnected,
    /// Starting: negotiating, upgrading or shaking hands.
    Connecting,
    /// Connected: invocations and sends go through.
    Connected,
    /// Lost, and trying to reconnect.
    Reconnecting,
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disconnected => "disconnected",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Reconnecting => "reconnecting",
        })
    }
}

/// Changes of a connection's life, from [`HubConnection::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The connection was lost and reconnecting starts.
    Reconnecting {
        /// Why it was lost.
        error: String,
    },
    /// A reconnect succeeded: a new connection, with a new id, and no groups. Re-join here.
    Reconnected {
        /// The new connection id, when negotiation gave one.
        connection_id: Option<String>,
    },
    /// The connection ended for good: stopped, closed by the server, or reconnecting gave up.
    Closed {
        /// Why, unless [`HubConnection::stop`] ended it.
        error: Option<String>,
    },
}

/// What a call waiting on the server gets.
enum Pending {
    Invoke(oneshot::Sender<Result<Value>>),
    Stream(mpsc::UnboundedSender<Result<Value>>),
}

/// What the writer task sends.
enum Out {
    Record(Vec<u8>),
    Pong(Vec<u8>),
    Close,
}

/// The live part: the current socket's writer and the calls waiting on it.
#[derive(Default)]
struct Live {
    outgoing: Option<mpsc::UnboundedSender<Out>>,
    pending: HashMap<String, Pending>,
    connection_id: Option<String>,
    /// Stateful reconnect's bookkeeping, when the server agreed to it.
    seq: Option<Sequencing>,
    /// A dropped socket is being replaced: sequenced sends are kept for the new one.
    resuming: bool,
}

/// The most bytes of sent and unacknowledged messages kept for a resume.
const RESEND_BUFFER_BYTES: usize = 1024 * 1024;

/// Stateful reconnect (hub protocol version 2): what was sent and not yet acknowledged, and
/// where the server's messages stand, so a new socket continues the same connection.
struct Sequencing {
    resume: Resume,
    /// The id of the last sequenced message sent.
    sent: u64,
    unacked: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// The id the server's next sequenced message carries.
    next_in: u64,
    /// The highest id handled; what a resume resends at or below it is skipped.
    received: u64,
    /// Whether an `Ack` should go out.
    ack_due: bool,
    /// The socket is a resumed one that has not yet seen the server's `Sequence`.
    awaiting_sequence: bool,
}

impl Sequencing {
    fn new(resume: Resume) -> Self {
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

    fn acked(&mut self, up_to: u64) {
        while let Some((id, record)) = self.unacked.front() {
            if *id > up_to {
                break;
            }
            self.bytes -= record.len();
            self.unacked.pop_front();
        }
    }
}

/// A socket that finished its handshake (or resumed), before it is put in service.
struct Opened {
    read: Reader,
    write: Writer,
    /// Records that came after the handshake response.
    early: Vec<Vec<u8>>,
    buffer: RecordBuffer,
    /// `None` for a resumed socket: the connection stays the same.
    fresh: Option<Fresh>,
}

/// What a new connection (not a resume) brings.
struct Fresh {
    connection_id: Option<String>,
    resume: Option<Resume>,
}

struct Shared {
    config: Config,
    handlers: RwLock<HashMap<String, Vec<Handler>>>,
    result_handlers: RwLock<HashMap<String, ResultHandler>>,
    live: Mutex<Live>,
    state: watch::Sender<ConnectionState>,
    stop: watch::Sender<bool>,
    events: broadcast::Sender<ConnectionEvent>,
    next_id: AtomicU64,
}

/// Stops the connection when the last [`HubConnection`] handle is dropped.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.stop.send_replace(true);
    }
}

/// A connection to one hub, speaking the SignalR JSON hub protocol over a WebSocket.
///
/// Cheap to clone; every clone is the same connection. Dropping the last clone stops it.
///
/// ```no_run
/// use backplane_client::HubConnectionBuilder;
/// use serde_json::json;
///
/// # async fn run() -> backplane_client::Result<()> {
/// let connection = HubConnectionBuilder::new("http://localhost:5000/hubs/chat?user=ada").build()?;
/// connection.on("ReceiveMessage", |args| println!("{args:?}"));
/// connection.start().await?;
/// connection.send("SendMessage", vec![json!("hello")]).await?;
/// let users: Vec<String> = connection.invoke_as("GetOnlineUsers", vec![]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HubConnection {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl fmt::Debug for HubConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConnection")
            .field("state", &self.state())
            .field("connection_id", &self.connection_id())
            .finish()
    }
}

/// The session's end, which decides what happens next.
enum End {
    /// [`HubConnection::stop`], or the last handle dropped.
    Stopped,
    /// The server sent `Close`.
    ServerClosed {
        error: Option<String>,
        allow_reconnect: bool,
    },
    /// The socket failed or went silent.
    Lost(String),
}

fn no_obligations(_: Frame<'_>) -> std::future::Ready<Result<(), std::io::Error>> {
    std::future::ready(Ok(()))
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, Live> {
        // A panic while the lock was held leaves plain data behind: keep going.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Queues `message` on the current socket. A call that waits for an answer registers
    /// `waiter` under its invocation id in the same step, so the answer cannot come first.
    ///
    /// With stateful reconnect, sequenced messages are also kept until the server acknowledges
    /// them, and are accepted while a dropped socket is being replaced.
    fn queue(&self, message: &HubMessage, waiter: Option<(String, Pending)>) -> Result<()> {
        let record = self.config.protocol.encode(message);
        let mut guard = self.live();
        let live = &mut *guard;
        match live.seq.as_mut() {
            Some(seq) if message.is_sequenced() => {
                if live.outgoing.is_none() && !live.resuming {
                    return Err(Error::NotConnected(self.state()));
                }
                if seq.bytes + record.len() > RESEND_BUFFER_BYTES {
                    return Err(Error::ResendBufferFull(RESEND_BUFFER_BYTES));
                }
                seq.sent += 1;
                seq.bytes += record.len();
                seq.unacked.push_back((seq.sent, record.clone()));
                if let Some(out) = &live.outgoing {
                    // A failed send is resent by the resume.
                    let _ = out.send(Out::Record(record));
                }
            }
            _ => {
                let sent = live
                    .outgoing
                    .as_ref()
                    .is_some_and(|out| out.send(Out::Record(record)).is_ok());
                if !sent {
                    return Err(Error::NotConnected(self.state()));
                }
            }
        }
        if let Some((id, waiter)) = waiter {
            live.pending.insert(id, waiter);
        }
        Ok(())
    }

    /// The `Ack` for what was received since the last one, if one is due.
    fn take_ack(&self) -> Option<Vec<u8>> {
        let mut live = self.live();
        let seq = live.seq.as_mut()?;
        if !seq.ack_due {
            return None;
        }
        seq.ack_due = false;
        let ack = HubMessage::Ack {
            sequence_id: seq.received,
        };
        Some(self.config.protocol.encode(&ack))
    }

    /// Whether a dropped socket may be replaced without losing the connection.
    fn can_resume(&self) -> bool {
        self.live()
            .seq
            .as_ref()
            .is_some_and(|seq| !seq.awaiting_sequence)
    }

    /// A fresh invocation id.
    fn next_id(&self) -> String {
        (self.next_id.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }

    /// Fails every call waiting on the server.
    fn fail_pending(&self, reason: &Option<String>) {
        let pending: Vec<Pending> = self.live().pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            let err = Error::ConnectionLost(reason.clone());
            match p {
                Pending::Invoke(tx) => drop(tx.send(Err(err))),
                Pending::Stream(tx) => drop(tx.send(Err(err))),
            }
        }
    }

    /// Opens a socket and completes the handshake.
    async fn connect(&self) -> Result<Opened> {
        let config = &self.config;
        let attempt = async {
            let token = match &config.token {
                Some(source) => Some(source.get().await?),
                None => None,
            };
            let opened = config
                .dialer
                .open(
                    &config.endpoint,
                    token,
                    config.skip_negotiation,
                    config.stateful,
                )
                .await?;
            let (mut read, mut write) = split(opened.socket, config.max_message_size);
            // Version 2 adds the messages of stateful reconnect.
            let handshake = Handshake {
                protocol: config.protocol.name().into(),
                version: if opened.resume.is_some() { 2 } else { 1 },
            }
            .encode();
            write
                .write_frame(Frame::text(Payload::Owned(handshake)))
                .await
                .map_err(|e| Error::Handshake(format!("sending the handshake failed: {e}")))?;
            let mut buffer = RecordBuffer::default();
            let first = loop {
                let frame = read.read_frame(&mut no_obligations).await.map_err(|e| {
                    Error::Handshake(format!("the socket closed during the handshake: {e}"))
                })?;
                match frame.opcode {
                    OpCode::Text | OpCode::Binary => {
                        let handshake = buffer
                            .push_handshake(&frame.payload, config.max_message_size)
                            .map_err(|e| Error::Protocol(e.to_string()))?;
                        if let Some(handshake) = handshake {
                            break handshake;
                        }
                    }
                    OpCode::Close => {
                        return Err(Error::Handshake(
                            "the server closed the socket during the handshake".into(),
                        ));
                    }
                    _ => {}
                }
            };
            let response =
                HandshakeResponse::parse(&first).map_err(|e| Error::Protocol(e.to_string()))?;
            if let Some(error) = response.error {
                return Err(Error::Handshake(error));
            }
            buffer.switch_to(config.protocol);
            let records = buffer
                .drain(config.max_message_size)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            Ok(Opened {
                read,
                write,
                early: records,
                buffer,
                fresh: Some(Fresh {
                    connection_id: opened.connection_id,
                    resume: opened.resume,
                }),
            })
        };
        let mut stop = self.stop.subscribe();
        tokio::select! {
            outcome = tokio::time::timeout(config.handshake_timeout, attempt) => {
                outcome.map_err(|_| Error::Timeout { what: "connecting", after: config.handshake_timeout })?
            }
            _ = stop.wait_for(|stop| *stop) => Err(Error::NotConnected(ConnectionState::Disconnected)),
        }
    }
}

impl Shared {
    /// Opens a new socket for the stateful connection, without negotiation or handshake.
    async fn reopen(&self, resume: &Resume) -> Result<Opened> {
        let config = &self.config;
        let attempt = async {
            let token = match &config.token {
                Some(source) => Some(source.get().await?),
                None => None,
            };
            let socket = config.dialer.resume(resume, token).await?;
            let (read, write) = split(socket, config.max_message_size);
            Ok(Opened {
                read,
                write,
                early: Vec::new(),
                buffer: RecordBuffer::new(config.protocol),
                fresh: None,
            })
        };
        tokio::time::timeout(config.handshake_timeout, attempt)
            .await
            .map_err(|_| Error::Timeout {
                what: "resuming",
                after: config.handshake_timeout,
            })?
    }
}

/// Sets a socket up for the hub protocol (pongs and closes are answered by the reader) and
/// splits it.
fn split(mut socket: Socket, max_message_size: usize) -> (Reader, Writer) {
    socket.set_auto_close(false);
    socket.set_auto_pong(false);
    socket.set_max_message_size(max_message_size);
    let (read, write) = socket.split(tokio::io::split);
    (FragmentCollectorRead::new(read), write)
}

impl HubConnection {
    pub(crate) fn new(config: Config) -> Self {
        let shared = Arc::new(Shared {
            config,
            handlers: RwLock::default(),
            result_handlers: RwLock::default(),
            live: Mutex::default(),
            state: watch::Sender::new(ConnectionState::Disconnected),
            stop: watch::Sender::new(false),
            events: broadcast::Sender::new(64),
            next_id: AtomicU64::new(0),
        });
        Self {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        }
    }

    /// Where the connection stands.
    pub fn state(&self) -> ConnectionState {
        self.shared.state()
    }

    /// The connection id negotiation gave, while connected.
    pub fn connection_id(&self) -> Option<String> {
        self.shared.live().connection_id.clone()
    }

    /// The connection's events: reconnecting, reconnected, closed. Each receiver sees the
    /// events after it subscribed.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.shared.events.subscribe()
    }

    /// Calls `handler` with the arguments of every invocation of `target` from the server, in
    /// the order they arrive. Several handlers of one target all run. Handlers run on the
    /// connection's reader: keep them short, or hand work to a task.
    pub fn on<F>(&self, target: &str, handler: F)
    where
        F: Fn(&[Value]) + Send + Sync + 'static,
    {
        self.shared
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target.to_ascii_lowercase())
            .or_default()
            .push(Arc::new(handler));
    }

    /// Like [`on`](Self::on), with the arguments converted to `T`, a tuple or a struct that
    /// deserializes from the arguments array: `on_args("ReceiveMessage", |(user, text):
    /// (String, String)| …)`. An invocation whose arguments do not convert is logged and
    /// skipped.
    pub fn on_args<T, F>(&self, target: &str, handler: F)
    where
        T: DeserializeOwned,
        F: Fn(T) + Send + Sync + 'static,
    {
        let name = target.to_owned();
        self.on(target, move |args| {
            match serde_json::from_value::<T>(Value::Array(args.to_vec())) {
                Ok(args) => handler(args),
                Err(err) => {
                    tracing::warn!(target = %name, %err, "arguments of an unexpected shape; skipped");
                }
            }
        });
    }

    /// Answers the server's invocations of `target` that expect a result (SignalR client
    /// results): the value `handler` returns, or its error, goes back to the server. One
    /// handler per target; a later one replaces it.
    pub fn on_invoke<F, Fut>(&self, target: &str, handler: F)
    where
        F: Fn(Vec<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        let handler: ResultHandler = Arc::new(move |args| Box::pin(handler(args)));
        self.shared
            .result_handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_ascii_lowercase(), handler);
    }

    /// Removes every handler of `target`.
    pub fn remove(&self, target: &str) {
        let key = target.to_ascii_lowercase();
        self.shared
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        self.shared
            .result_handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Connects: negotiates, opens the WebSocket and shakes hands. A failure here is returned
    /// and not retried, whatever the reconnect policy.
    ///
    /// # Errors
    ///
    /// The connection is not disconnected, or connecting failed.
    pub async fn start(&self) -> Result<()> {
        let shared = &self.shared;
        let mut started = false;
        shared.state.send_if_modified(|state| {
            if *state == ConnectionState::Disconnected {
                *state = ConnectionState::Connecting;
                started = true;
            }
            started
        });
        if !started {
            return Err(Error::NotConnected(shared.state()));
        }
        shared.stop.send_replace(false);
        match shared.connect().await {
            Ok(socket) => {
                let stop = shared.stop.subscribe();
                let run = Session::install(shared, socket);
                tokio::spawn(supervise(shared.clone(), run, stop));
                Ok(())
            }
            Err(err) => {
                shared.state.send_replace(ConnectionState::Disconnected);
                Err(err)
            }
        }
    }

    /// Stops the connection and waits until it is disconnected. Calls waiting on the server
    /// fail with [`Error::ConnectionLost`].
    pub async fn stop(&self) {
        self.shared.stop.send_replace(true);
        let mut state = self.shared.state.subscribe();
        let _ = state
            .wait_for(|s| *s == ConnectionState::Disconnected)
            .await;
    }

    /// Sends an invocation without waiting for the method to run (no completion is asked for).
    ///
    /// # Errors
    ///
    /// The connection is not connected.
    pub async fn send(&self, method: &str, arguments: Vec<Value>) -> Result<()> {
        let call = HubMessage::Invocation {
            invocation_id: None,
            target: method.to_owned(),
            arguments,
            stream_ids: Vec::new(),
        };
        self.shared.queue(&call, None)
    }

    /// Calls a hub method and waits for its result.
    ///
    /// # Errors
    ///
    /// [`Error::Hub`] when the method failed, [`Error::ConnectionLost`] when the connection
    /// ended first, [`Error::Timeout`] past the invocation timeout, [`Error::NotConnected`].
    pub async fn invoke(&self, method: &str, arguments: Vec<Value>) -> Result<Value> {
        let shared = &self.shared;
        let id = shared.next_id();
        let (tx, rx) = oneshot::channel();
        let call = HubMessage::Invocation {
            invocation_id: Some(id.clone()),
            target: method.to_owned(),
            arguments,
            stream_ids: Vec::new(),
        };
        shared.queue(&call, Some((id.clone(), Pending::Invoke(tx))))?;
        completion(shared.clone(), id, rx).await
    }

    /// Calls a hub method that takes `streams` streams from the client (an upload method), and
    /// returns a handle for each, in order, with the future of the method's result. The call
    /// goes out at once; send each stream's items with [`UploadStream::send`] and end it with
    /// [`UploadStream::complete`] (or [`UploadStream::fail`]): the method returns once it has
    /// read what it wants. A handle dropped without either ends its stream with an error.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(connection: backplane_client::HubConnection) -> backplane_client::Result<()> {
    /// use serde_json::json;
    ///
    /// let (mut streams, sent) = connection.invoke_with_streams("UploadMessages", vec![], 1)?;
    /// let lines = streams.remove(0);
    /// for line in ["one", "two"] {
    ///     lines.send(json!(line))?;
    /// }
    /// lines.complete()?;
    /// let count = sent.await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The connection is not connected. The result future fails as [`invoke`](Self::invoke)
    /// does.
    pub fn invoke_with_streams(
        &self,
        method: &str,
        arguments: Vec<Value>,
        streams: usize,
    ) -> Result<(
        Vec<UploadStream>,
        impl Future<Output = Result<Value>> + Send + 'static,
    )> {
        let shared = &self.shared;
        let id = shared.next_id();
        let stream_ids: Vec<String> = (0..streams).map(|_| shared.next_id()).collect();
        let (tx, rx) = oneshot::channel();
        let call = HubMessage::Invocation {
            invocation_id: Some(id.clone()),
            target: method.to_owned(),
            arguments,
            stream_ids: stream_ids.clone(),
        };
        shared.queue(&call, Some((id.clone(), Pending::Invoke(tx))))?;
        let uploads = stream_ids
            .into_iter()
            .map(|id| UploadStream {
                id,
                shared: shared.clone(),
                ended: false,
            })
            .collect();
        Ok((uploads, completion(shared.clone(), id, rx)))
    }

    /// Calls a hub method and converts its result.
    ///
    /// # Errors
    ///
    /// As [`invoke`](Self::invoke), and [`Error::Json`] when the result has another shape.
    pub async fn invoke_as<T: DeserializeOwned>(
        &self,
        method: &str,
        arguments: Vec<Value>,
    ) -> Result<T> {
        let value = self.invoke(method, arguments).await?;
        Ok(serde_json::from_value(value)?)
    }

    /// Calls a streaming hub method; its items arrive through the returned [`HubStream`].
    /// Dropping the stream before it ends cancels it on the server.
    ///
    /// # Errors
    ///
    /// The connection is not connected.
    pub async fn stream(&self, method: &str, arguments: Vec<Value>) -> Result<HubStream> {
        let shared = &self.shared;
        let id = shared.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let call = HubMessage::StreamInvocation {
            invocation_id: id.clone(),
            target: method.to_owned(),
            arguments,
            stream_ids: Vec::new(),
        };
        shared.queue(&call, Some((id.clone(), Pending::Stream(tx))))?;
        Ok(HubStream {
            id,
            items: rx,
            shared: shared.clone(),
            ended: false,
        })
    }
}

/// Waits for the completion of invocation `id`, within the invocation timeout.
async fn completion(
    shared: Arc<Shared>,
    id: String,
    rx: oneshot::Receiver<Result<Value>>,
) -> Result<Value> {
    let outcome = match shared.config.invocation_timeout {
        None => rx.await,
        Some(after) => match tokio::time::timeout(after, rx).await {
            Ok(outcome) => outcome,
            Err(_) => {
                shared.live().pending.remove(&id);
                return Err(Error::Timeout {
                    what: "the invocation",
                    after,
                });
            }
        },
    };
    outcome.unwrap_or(Err(Error::ConnectionLost(None)))
}

/// One stream of items to an upload method; see [`HubConnection::invoke_with_streams`].
/// Items are queued to the socket without waiting; the server slows a client that sends faster
/// than the method reads.
pub struct UploadStream {
    id: String,
    shared: Arc<Shared>,
    ended: bool,
}

impl fmt::Debug for UploadStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadStream")
            .field("id", &self.id)
            .finish()
    }
}

impl UploadStream {
    /// Sends one item.
    ///
    /// # Errors
    ///
    /// The connection is not connected.
    pub fn send(&self, item: Value) -> Result<()> {
        let message = HubMessage::StreamItem {
            invocation_id: self.id.clone(),
            item,
        };
        self.shared.queue(&message, None)
    }

    /// Ends the stream: the method sees its end.
    ///
    /// # Errors
    ///
    /// The connection is not connected.
    pub fn complete(mut self) -> Result<()> {
        self.end(Outcome::Void)
    }

    /// Ends the stream with an error, which the method sees.
    ///
    /// # Errors
    ///
    /// The connection is not connected.
    pub fn fail(mut self, error: impl Into<String>) -> Result<()> {
        self.end(Outcome::Error(error.into()))
    }

    fn end(&mut self, outcome: Outcome) -> Result<()> {
        self.ended = true;
        let message = HubMessage::Completion {
            invocation_id: self.id.clone(),
            outcome,
        };
        self.shared.queue(&message, None)
    }
}

impl Drop for UploadStream {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end(Outcome::Error("the client dropped the stream".into()));
        }
    }
}

/// The items of a streaming invocation.
pub struct HubStream {
    id: String,
    items: mpsc::UnboundedReceiver<Result<Value>>,
    shared: Arc<Shared>,
    ended: bool,
}

impl fmt::Debug for HubStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubStream").field("id", &self.id).finish()
    }
}

impl HubStream {
    /// The next item; `None` once the stream completed, an error if it failed.
    pub async fn next(&mut self) -> Option<Result<Value>> {
        let item = self.items.recv().await;
        if matches!(item, None | Some(Err(_))) {
            self.ended = true;
        }
        item
    }
}

impl Drop for HubStream {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let removed = self.shared.live().pending.remove(&self.id).is_some();
        if removed {
            let cancel = HubMessage::CancelInvocation {
                invocation_id: self.id.clone(),
            };
            let _ = self.shared.queue(&cancel, None);
        }
    }
}

/// One socket's reader; the writer runs as its own task.
struct Session {
    read: Reader,
    buffer: RecordBuffer,
    early: Vec<Vec<u8>>,
    out: mpsc::UnboundedSender<Out>,
    writer: tokio::task::JoinHandle<Option<String>>,
}

impl Session {
    /// Starts the writer, publishes the socket as the current one, and marks the connection
    /// connected. A resumed socket first sends `Sequence` and everything not acknowledged.
    fn install(shared: &Arc<Shared>, opened: Opened) -> Self {
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
    async fn run(mut self, shared: &Arc<Shared>, stop: &mut watch::Receiver<bool>) -> End {
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

/// Handles one record from the server; `Some` ends the session.
fn dispatch(shared: &Arc<Shared>, record: &[u8]) -> Option<End> {
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

fn invoke_handlers(
    shared: &Arc<Shared>,
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

fn run_handlers(shared: &Arc<Shared>, key: &str, target: &str, arguments: &[Value]) {
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
fn frame_of(wire: Protocol, bytes: Vec<u8>) -> Frame<'static> {
    if wire.is_binary() {
        Frame::binary(Payload::Owned(bytes))
    } else {
        Frame::text(Payload::Owned(bytes))
    }
}

/// Writes queued records, coalescing them into frames, and pings when idle. Returns why it
/// stopped when the socket failed.
async fn write_loop(
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

/// Runs sessions one after another: the first, then each reconnect, until the connection ends.
async fn supervise(shared: Arc<Shared>, first: Session, mut stop: watch::Receiver<bool>) {
    let mut session = first;
    let error = loop {
        let mut end = session.run(&shared, &mut stop).await;
        if matches!(end, End::Lost(_)) && !shared.stopping() && shared.can_resume() {
            // Stateful reconnect: the same connection continues on a new socket.
            shared.live().resuming = true;
            if let Some(next) = resume_loop(&shared, &mut stop).await {
                session = next;
                continue;
            }
        }
        {
            let mut live = shared.live();
            live.resuming = false;
            live.seq = None;
            live.connection_id = None;
        }
        if shared.stopping() {
            end = End::Stopped;
        }
        let (reason, reconnect) = match end {
            End::Stopped => (None, false),
            End::ServerClosed {
                error,
                allow_reconnect,
            } => (
                Some(match error {
                    Some(error) => format!("the server closed the connection: {error}"),
                    None => "the server closed the connection".into(),
                }),
                allow_reconnect,
            ),
            End::Lost(reason) => (Some(reason), true),
        };
        shared.fail_pending(&reason);
        let policy = match (&shared.config.reconnect, reconnect && !shared.stopping()) {
            (Some(policy), true) => policy.clone(),
            _ => break reason,
        };
        let reason = reason.unwrap_or_default();
        shared.state.send_replace(ConnectionState::Reconnecting);
        let _ = shared.events.send(ConnectionEvent::Reconnecting {
            error: reason.clone(),
        });
        tracing::info!(%reason, "connection lost; reconnecting");
        match reconnect_loop(&shared, &policy, &mut stop, reason).await {
            Ok(next) => {
                let connection_id = shared.live().connection_id.clone();
                session = next;
                let _ = shared
                    .events
                    .send(ConnectionEvent::Reconnected { connection_id });
            }
            Err(reason) => break reason,
        }
    };
    shared.fail_pending(&error);
    shared.state.send_replace(ConnectionState::Disconnected);
    let _ = shared.events.send(ConnectionEvent::Closed { error });
}

/// Tries to resume the stateful connection on new sockets, for as long as the server keeps
/// it (its client timeout, taken to be our server timeout). `None` when it cannot.
async fn resume_loop(shared: &Arc<Shared>, stop: &mut watch::Receiver<bool>) -> Option<Session> {
    let resume = shared.live().seq.as_ref()?.resume.clone();
    let backoff = crate::ReconnectPolicy::default()
        .initial(Duration::from_millis(100))
        .max(Duration::from_secs(2));
    let lost_at = Instant::now();
    let mut attempt = 0u32;
    while lost_at.elapsed() < shared.config.server_timeout {
        if attempt > 0 {
            let delay = backoff.delay(attempt - 1, lost_at.elapsed())?;
            // The backoff: a stop within it ends the attempts.
            if tokio::time::timeout(delay, stop.wait_for(|stop| *stop))
                .await
                .is_ok()
            {
                return None;
            }
        }
        attempt = attempt.saturating_add(1);
        match shared.reopen(&resume).await {
            Ok(opened) if !shared.stopping() => {
                tracing::debug!(attempt, "connection resumed on a new socket");
                return Some(Session::install(shared, opened));
            }
            Ok(_) => return None,
            // The server no longer has the connection.
            Err(Error::Refused { .. }) => return None,
            Err(err) => tracing::debug!(attempt, %err, "resume attempt failed"),
        }
    }
    None
}

/// Tries to connect again until it works, the policy gives up (`Err(Some(why))`), or the
/// connection is stopped (`Err(None)`).
async fn reconnect_loop(
    shared: &Arc<Shared>,
    policy: &crate::ReconnectPolicy,
    stop: &mut watch::Receiver<bool>,
    mut last_error: String,
) -> std::result::Result<Session, Option<String>> {
    let lost_at = Instant::now();
    let mut attempt = 0u32;
    loop {
        let Some(delay) = policy.delay(attempt, lost_at.elapsed()) else {
            return Err(Some(format!(
                "reconnecting gave up after {attempt} attempts; the last error: {last_error}"
            )));
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|stop| *stop) => return Err(None),
        }
        attempt = attempt.saturating_add(1);
        match shared.connect().await {
            Ok(socket) if !shared.stopping() => return Ok(Session::install(shared, socket)),
            Ok(_) => return Err(None),
            Err(err) => {
                if shared.stopping() {
                    return Err(None);
                }
                tracing::debug!(attempt, %err, "reconnect attempt failed");
                last_error = err.to_string();
            }
        }
    }
}
