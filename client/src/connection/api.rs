//! The API of a hub connection: starting and stopping it, handlers, sends, invocations and
//! streams both ways.

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use backplane_core::signalr::{HubMessage, Outcome};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::Config;
use crate::error::{Error, Result};

use super::session::Session;
use super::supervisor::supervise;
use super::{
    ConnectionCore, ConnectionEvent, ConnectionState, HubConnection, Owner, Pending, ResultHandler,
};

impl HubConnection {
    pub(crate) fn new(config: Config) -> Self {
        let shared = Arc::new(ConnectionCore {
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
pub(super) async fn completion(
    shared: Arc<ConnectionCore>,
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
    pub(super) id: String,
    pub(super) shared: Arc<ConnectionCore>,
    pub(super) ended: bool,
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

    pub(super) fn end(&mut self, outcome: Outcome) -> Result<()> {
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
    pub(super) id: String,
    pub(super) items: mpsc::UnboundedReceiver<Result<Value>>,
    pub(super) shared: Arc<ConnectionCore>,
    pub(super) ended: bool,
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
