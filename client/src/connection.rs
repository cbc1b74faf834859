//! The hub connection: invocations, handlers, keep-alive, and the reconnect loop.

use std::collections::HashMap;
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

use crate::builder::{BoxFuture, Config};
use crate::error::{Error, Result};
use crate::transport::Socket;

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
    fn queue(&self, message: &HubMessage, waiter: Option<(String, Pending)>) -> Result<()> {
        let record = self.config.protocol.encode(message);
        let mut live = self.live();
        let sent = live
            .outgoing
            .as_ref()
            .is_some_and(|out| out.send(Out::Record(record)).is_ok());
        if !sent {
            return Err(Error::NotConnected(self.state()));
        }
        if let Some((id, waiter)) = waiter {
            live.pending.insert(id, waiter);
        }
        Ok(())
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
    async fn connect(
        &self,
    ) -> Result<(Reader, Writer, Vec<Vec<u8>>, RecordBuffer, Option<String>)> {
        let config = &self.config;
        let attempt = async {
            let token = match &config.token {
                Some(source) => Some(source.get().await?),
                None => None,
            };
            let opened = config
                .dialer
                .open(&config.endpoint, token, config.skip_negotiation)
                .await?;
            let mut socket: Socket = opened.socket;
            socket.set_auto_close(false);
            socket.set_auto_pong(false);
            socket.set_max_message_size(config.max_message_size);
            let (read, mut write) = socket.split(tokio::io::split);
            let mut read = FragmentCollectorRead::new(read);
            let handshake = Handshake {
                protocol: config.protocol.name().into(),
                version: 1,
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
            Ok((read, write, records, buffer, opened.connection_id))
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
    /// connected.
    fn install(
        shared: &Arc<Shared>,
        (read, write, early, buffer, connection_id): (
            Reader,
            Writer,
            Vec<Vec<u8>>,
            RecordBuffer,
            Option<String>,
        ),
    ) -> Self {
        let (out, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(
            write,
            rx,
            shared.config.keep_alive_interval,
            shared.config.server_timeout,
            shared.config.protocol,
        ));
        {
            let mut live = shared.live();
            live.outgoing = Some(out.clone());
            live.connection_id = connection_id;
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
            if let Some(e) = dispatch(shared, &self.out, &record) {
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
                            if let Some(e) = dispatch(shared, &self.out, &record) {
                                end = Some(e);
                                break;
                            }
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
        {
            let mut live = shared.live();
            live.outgoing = None;
            live.connection_id = None;
        }
        let _ = self.out.send(Out::Close);
        drop(self.out);
        if !self.writer.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
        }
        end.unwrap_or(End::Stopped)
    }
}

/// Handles one record from the server; `Some` ends the session.
fn dispatch(shared: &Arc<Shared>, out: &mpsc::UnboundedSender<Out>, record: &[u8]) -> Option<End> {
    let message = match shared.config.protocol.parse(record) {
        Ok(message) => message,
        Err(err) => {
            return Some(End::Lost(format!(
                "the server sent an invalid message: {err}"
            )));
        }
    };
    match message {
        HubMessage::Invocation {
            invocation_id,
            target,
            arguments,
            ..
        } => invoke_handlers(shared, out, invocation_id, &target, arguments),
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
    out: &mpsc::UnboundedSender<Out>,
    invocation_id: Option<String>,
    target: &str,
    arguments: Vec<Value>,
) {
    let key = target.to_ascii_lowercase();
    let wire = shared.config.protocol;
    if let Some(id) = invocation_id {
        let handler = shared
            .result_handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let out = out.clone();
        match handler {
            Some(handler) => {
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
                    let _ = out.send(Out::Record(wire.encode(&completion)));
                });
            }
            None => {
                run_handlers(shared, &key, target, &arguments);
                let completion = HubMessage::Completion {
                    invocation_id: id,
                    outcome: Outcome::Error("Client didn't provide a result.".into()),
                };
                let _ = out.send(Out::Record(wire.encode(&completion)));
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
        let end = session.run(&shared, &mut stop).await;
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
