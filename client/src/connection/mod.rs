//! The hub connection: invocations, handlers, keep-alive, and the reconnect loop.
//!
//! This file holds the shared state and the connection's handle; [`api`](mod@api) is what the
//! handle offers, [`session`](mod@session) one socket's session, [`dispatch`](mod@dispatch) what
//! comes in and goes out on it, and [`supervisor`](mod@supervisor) the resume and reconnect loops.

mod api;
mod dispatch;
mod session;
mod supervisor;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use backplane_core::signalr::{Handshake, HandshakeResponse, HubMessage, RecordBuffer};
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::{BoxFuture, Config};
use crate::error::{Error, Result};
use crate::transport::{Resume, Socket};

pub use api::{HubStream, UploadStream};
use session::{RESEND_BUFFER_BYTES, Sequencing};

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

/// The current socket's writer and the calls waiting on it.
#[derive(Default)]
struct CurrentSocket {
    outgoing: Option<mpsc::UnboundedSender<Out>>,
    pending: HashMap<String, Pending>,
    connection_id: Option<String>,
    /// Stateful reconnect's bookkeeping, when the server agreed to it.
    seq: Option<Sequencing>,
    /// A dropped socket is being replaced: sequenced sends are kept for the new one.
    resuming: bool,
}

/// A socket that finished its handshake (or resumed), before it is put in service.
struct Opened {
    read: Reader,
    write: Writer,
    /// Records that came after the handshake response.
    early: Vec<Vec<u8>>,
    buffer: RecordBuffer,
    /// `None` for a resumed socket: the connection stays the same.
    fresh: Option<NewConnection>,
}

/// What a new connection (not a resume) brings.
struct NewConnection {
    connection_id: Option<String>,
    resume: Option<Resume>,
}

/// What the handles and the connection's tasks share: settings, handlers, the current
/// socket, the state and the stop signal.
struct ConnectionCore {
    config: Config,
    handlers: RwLock<HashMap<String, Vec<Handler>>>,
    result_handlers: RwLock<HashMap<String, ResultHandler>>,
    live: Mutex<CurrentSocket>,
    state: watch::Sender<ConnectionState>,
    stop: watch::Sender<bool>,
    events: broadcast::Sender<ConnectionEvent>,
    next_id: AtomicU64,
}

/// Stops the connection when the last [`HubConnection`] handle is dropped.
struct Owner(Arc<ConnectionCore>);

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
    shared: Arc<ConnectionCore>,
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

impl ConnectionCore {
    fn live(&self) -> MutexGuard<'_, CurrentSocket> {
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
                fresh: Some(NewConnection {
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

impl ConnectionCore {
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
