//! Hubs: named methods that clients invoke, and what a method can do with the caller's context.
//!
//! ```
//! use backplane_server::{Hub, HubError};
//! use serde_json::json;
//!
//! let hub = Hub::builder("echo")
//!     .expect("a valid hub name")
//!     .method("Echo", 1, |ctx, args| async move {
//!         let text: String = args.get(0)?;
//!         ctx.clients().caller().send("Echoed", vec![json!(text)]).await?;
//!         Ok(json!(text))
//!     })
//!     .build();
//! assert_eq!(hub.name().as_str(), "echo");
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane_core::{
    ConnectionId, Error, GroupName, HubName, Message, Node, PendingPublish, Published, Target,
    UserId,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::protocol;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a hub method returns: a value for the caller's completion (`null` for none), or an
/// error the caller receives as the completion's error.
pub type HubResult<T = Value> = Result<T, HubError>;

/// An error a hub method reports to its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubError {
    message: String,
    invalid_input: bool,
}

impl HubError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            invalid_input: false,
        }
    }

    /// The message the caller receives.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the caller's input was at fault (a bad name, an oversized payload, an unknown
    /// connection), rather than the server or its backplane.
    pub fn is_invalid_input(&self) -> bool {
        self.invalid_input
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HubError {}

impl From<Error> for HubError {
    fn from(err: Error) -> Self {
        let invalid_input = matches!(
            err,
            Error::InvalidName { .. }
                | Error::PayloadTooLarge { .. }
                | Error::InvalidMessage(_)
                | Error::UnknownConnection(_)
        );
        Self {
            message: err.to_string(),
            invalid_input,
        }
    }
}

/// The arguments of an invocation.
#[derive(Debug, Clone, Default)]
pub struct Arguments {
    method: Arc<str>,
    values: Vec<Value>,
}

impl Arguments {
    pub(crate) fn new(method: &str, values: Vec<Value>) -> Self {
        Self {
            method: method.into(),
            values,
        }
    }

    /// The argument at `index`, converted to `T`.
    ///
    /// # Errors
    ///
    /// A caller-facing error naming the argument when it is missing or of another type.
    pub fn get<T: DeserializeOwned>(&self, index: usize) -> HubResult<T> {
        let value = self.values.get(index).ok_or_else(|| {
            HubError::new(format!(
                "'{}' takes at least {} argument(s)",
                self.method,
                index + 1
            ))
        })?;
        T::deserialize(value).map_err(|e| {
            HubError::new(format!(
                "argument {} of '{}' has the wrong type: {e}",
                index + 1,
                self.method
            ))
        })
    }

    /// How many arguments there are.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The raw values.
    pub fn into_values(self) -> Vec<Value> {
        self.values
    }
}

/// Items of a streaming method, sent to the caller as `StreamItem` messages.
#[derive(Debug, Clone)]
pub struct StreamSender {
    tx: mpsc::Sender<Value>,
}

impl StreamSender {
    pub(crate) fn new(tx: mpsc::Sender<Value>) -> Self {
        Self { tx }
    }

    /// Sends one item; waits while the caller's queue is full.
    ///
    /// # Errors
    ///
    /// The caller cancelled the stream or went away.
    pub async fn send(&self, item: Value) -> HubResult<()> {
        self.tx
            .send(item)
            .await
            .map_err(|_| HubError::new("the stream was cancelled"))
    }
}

/// What a client sent on one of its streams to a hub method.
#[derive(Debug)]
pub(crate) enum Upload {
    /// One item.
    Item(Value),
    /// The client completed the stream.
    End,
    /// The client ended the stream with an error.
    Error(String),
}

/// Items a client streams to a hub method (a SignalR client-to-server stream: a `Subject` in
/// the JavaScript client, a `ChannelReader` or `IAsyncEnumerable` in .NET), in order.
#[derive(Debug)]
pub struct StreamReceiver {
    rx: mpsc::Receiver<Upload>,
    done: bool,
}

impl StreamReceiver {
    pub(crate) fn new(rx: mpsc::Receiver<Upload>) -> Self {
        Self { rx, done: false }
    }

    /// The next item; `None` once the client has completed the stream.
    ///
    /// # Errors
    ///
    /// The client ended the stream with an error, or went away before completing it.
    pub async fn next(&mut self) -> HubResult<Option<Value>> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Upload::Item(item)) => Ok(Some(item)),
            Some(Upload::End) => {
                self.done = true;
                Ok(None)
            }
            Some(Upload::Error(error)) => {
                self.done = true;
                Err(HubError::new(format!(
                    "the client ended the stream: {error}"
                )))
            }
            None => {
                self.done = true;
                Err(HubError::new(
                    "the client went away before completing the stream",
                ))
            }
        }
    }

    /// The next item converted to `T`; `None` once the client has completed the stream.
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next), and when an item is not a `T`.
    pub async fn next_as<T: DeserializeOwned>(&mut self) -> HubResult<Option<T>> {
        match self.next().await? {
            Some(item) => T::deserialize(item)
                .map(Some)
                .map_err(|e| HubError::new(format!("a stream item has the wrong type: {e}"))),
            None => Ok(None),
        }
    }
}

type Unary = Arc<dyn Fn(Context, Arguments) -> BoxFuture<HubResult> + Send + Sync>;
type Uploading =
    Arc<dyn Fn(Context, Arguments, Vec<StreamReceiver>) -> BoxFuture<HubResult> + Send + Sync>;
type Streaming =
    Arc<dyn Fn(Context, Arguments, StreamSender) -> BoxFuture<HubResult<()>> + Send + Sync>;
type Hook = Arc<dyn Fn(Context) -> BoxFuture<HubResult<()>> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Handler {
    Unary(Unary),
    Streaming(Streaming),
    Uploading(Uploading),
}

#[derive(Clone)]
pub(crate) struct Method {
    pub(crate) name: String,
    pub(crate) arity: usize,
    /// How many streams the client sends to it (uploading methods only).
    pub(crate) uploads: usize,
    pub(crate) handler: Handler,
}

/// A hub: its name, methods and connection hooks. Method names match case-insensitively, as
/// in ASP.NET Core SignalR.
#[derive(Clone)]
pub struct Hub {
    name: HubName,
    methods: HashMap<String, Method>,
    on_connected: Option<Hook>,
    on_disconnected: Option<Hook>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<&str> = self.methods.values().map(|m| m.name.as_str()).collect();
        methods.sort_unstable();
        f.debug_struct("Hub")
            .field("name", &self.name)
            .field("methods", &methods)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Starts a hub served at `/hubs/{name}`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] when `name` is not a valid hub name.
    pub fn builder(name: &str) -> backplane_core::Result<HubBuilder> {
        Ok(HubBuilder {
            hub: Hub {
                name: HubName::new(name)?,
                methods: HashMap::new(),
                on_connected: None,
                on_disconnected: None,
            },
        })
    }

    /// The hub's name.
    pub fn name(&self) -> &HubName {
        &self.name
    }

    pub(crate) fn method(&self, name: &str) -> Option<&Method> {
        self.methods.get(&name.to_ascii_lowercase())
    }

    pub(crate) async fn connected(&self, ctx: Context) -> HubResult<()> {
        match &self.on_connected {
            Some(hook) => hook(ctx).await,
            None => Ok(()),
        }
    }

    pub(crate) async fn disconnected(&self, ctx: Context) -> HubResult<()> {
        match &self.on_disconnected {
            Some(hook) => hook(ctx).await,
            None => Ok(()),
        }
    }
}

/// Builds a [`Hub`].
pub struct HubBuilder {
    hub: Hub,
}

impl fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.hub.fmt(f)
    }
}

impl HubBuilder {
    /// Adds a method taking `arity` arguments. A call with another number of arguments gets an
    /// error completion without reaching the handler.
    pub fn method<F, Fut>(self, name: &str, arity: usize, handler: F) -> Self
    where
        F: Fn(Context, Arguments) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HubResult> + Send + 'static,
    {
        let handler: Unary = Arc::new(move |ctx, args| Box::pin(handler(ctx, args)));
        self.add(name, arity, 0, Handler::Unary(handler))
    }

    fn add(mut self, name: &str, arity: usize, uploads: usize, handler: Handler) -> Self {
        self.hub.methods.insert(
            name.to_ascii_lowercase(),
            Method {
                name: name.to_owned(),
                arity,
                uploads,
                handler,
            },
        );
        self
    }

    /// Adds a method that takes `arity` arguments and `streams` streams from the client (its
    /// invocation names them in `streamIds`; the client sends their items as `StreamItem`
    /// messages and ends each with a completion). The handler reads each stream with a
    /// [`StreamReceiver`], in the order of the stream ids; the caller's completion carries its
    /// result. Items wait in a small queue per stream (32): a client that sends faster than
    /// the handler reads is slowed down, not buffered without bound. While one stream's queue
    /// is full, nothing more is read from the connection, so a method with several streams
    /// that the client may interleave should read them concurrently (`tokio::join!`), not one
    /// after the other.
    pub fn upload<F, Fut>(self, name: &str, arity: usize, streams: usize, handler: F) -> Self
    where
        F: Fn(Context, Arguments, Vec<StreamReceiver>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HubResult> + Send + 'static,
    {
        let handler: Uploading =
            Arc::new(move |ctx, args, streams| Box::pin(handler(ctx, args, streams)));
        self.add(name, arity, streams.max(1), Handler::Uploading(handler))
    }

    /// Adds a streaming method: the caller receives what the handler sends, then a completion.
    pub fn stream<F, Fut>(self, name: &str, arity: usize, handler: F) -> Self
    where
        F: Fn(Context, Arguments, StreamSender) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HubResult<()>> + Send + 'static,
    {
        let handler: Streaming =
            Arc::new(move |ctx, args, items| Box::pin(handler(ctx, args, items)));
        self.add(name, arity, 0, Handler::Streaming(handler))
    }

    /// Runs after a connection's handshake, before its first invocation.
    pub fn on_connected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HubResult<()>> + Send + 'static,
    {
        self.hub.on_connected = Some(Arc::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Runs once a connection has ended.
    pub fn on_disconnected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HubResult<()>> + Send + 'static,
    {
        self.hub.on_disconnected = Some(Arc::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// The finished hub.
    pub fn build(self) -> Hub {
        self.hub
    }
}

/// The caller of a hub method: who it is, and handles to reach other clients and groups.
#[derive(Clone)]
pub struct Context {
    node: Node,
    hub: HubName,
    connection: ConnectionId,
    user: Option<UserId>,
    metrics: Option<Arc<Metrics>>,
    max_groups: usize,
    /// How this invocation's sends wait for the log; see [`Recipients::send`].
    waiting: Waiting,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("hub", &self.hub)
            .field("connection", &self.connection)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(
        node: Node,
        hub: HubName,
        connection: ConnectionId,
        user: Option<UserId>,
        metrics: Option<Arc<Metrics>>,
        max_groups: usize,
    ) -> Self {
        Self {
            node,
            hub,
            connection,
            user,
            metrics,
            max_groups,
            waiting: Waiting::Stored,
        }
    }

    /// The context of an invocation the caller does not wait for (sent without an invocation
    /// id): its sends return once queued in order.
    pub(crate) fn not_awaited(&self) -> Self {
        Self {
            waiting: Waiting::Nobody,
            ..self.clone()
        }
    }

    /// The context of an invocation whose completion waits for what it sent: its sends return
    /// once queued in order, and the returned [`Commits`] tell when they are stored.
    pub(crate) fn completion_waits(&self) -> (Self, Arc<Commits>) {
        let commits = Arc::new(Commits {
            queued: std::sync::Mutex::new(Some(Vec::new())),
            metrics: self.metrics.clone(),
        });
        let ctx = Self {
            waiting: Waiting::Completion(commits.clone()),
            ..self.clone()
        };
        (ctx, commits)
    }

    /// Whether the caller waits for this invocation's completion (it sent an invocation id).
    pub fn is_awaited(&self) -> bool {
        !matches!(self.waiting, Waiting::Nobody)
    }

    /// The caller's connection id.
    pub fn connection_id(&self) -> &ConnectionId {
        &self.connection
    }

    /// The caller's user, when it is authenticated.
    pub fn user(&self) -> Option<&UserId> {
        self.user.as_ref()
    }

    /// The hub.
    pub fn hub(&self) -> &HubName {
        &self.hub
    }

    /// The node this connection lives on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Sends to clients of this hub, on every node.
    pub fn clients(&self) -> Clients {
        Clients {
            node: self.node.clone(),
            hub: self.hub.clone(),
            caller: Some(self.connection.clone()),
            metrics: self.metrics.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Adds this connection to, or removes it from, groups.
    pub fn groups(&self) -> Groups {
        Groups {
            node: self.node.clone(),
            hub: self.hub.clone(),
            max_groups: self.max_groups,
        }
    }

    /// The users with at least one connection to this hub, on any node.
    ///
    /// # Errors
    ///
    /// The backplane could not be read.
    pub async fn online_users(&self) -> HubResult<Vec<UserId>> {
        Ok(self.node.backplane().online_users(&self.hub).await?)
    }
}

/// Picks the clients of a hub to send to.
#[derive(Debug, Clone)]
pub struct Clients {
    node: Node,
    hub: HubName,
    caller: Option<ConnectionId>,
    metrics: Option<Arc<Metrics>>,
    waiting: Waiting,
}

impl Clients {
    /// Clients of `hub` on `node`, outside any invocation (for back-end code and the server
    /// API).
    pub fn new(node: Node, hub: HubName) -> Self {
        Self {
            node,
            hub,
            caller: None,
            metrics: None,
            waiting: Waiting::Stored,
        }
    }

    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn to(&self, target: Target) -> Recipients {
        Recipients {
            node: self.node.clone(),
            hub: self.hub.clone(),
            target,
            except: Vec::new(),
            sender: self.caller.clone(),
            durable: None,
            metrics: self.metrics.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Every connection.
    pub fn all(&self) -> Recipients {
        self.to(Target::All)
    }

    /// Every connection except the caller.
    pub fn others(&self) -> Recipients {
        let send = self.all();
        match &self.caller {
            Some(caller) => send.except([caller.clone()]),
            None => send,
        }
    }

    /// The caller alone; outside an invocation it addresses nobody.
    pub fn caller(&self) -> Client {
        Client {
            send: self.to(Target::Connections(self.caller.iter().cloned().collect())),
            node: self.node.clone(),
            hub: self.hub.clone(),
            connection: self.caller.clone(),
        }
    }

    /// One connection, wherever it lives.
    pub fn client(&self, connection: ConnectionId) -> Client {
        Client {
            send: self.to(Target::Connections(vec![connection.clone()])),
            node: self.node.clone(),
            hub: self.hub.clone(),
            connection: Some(connection),
        }
    }

    /// These connections.
    pub fn connections(&self, connections: impl IntoIterator<Item = ConnectionId>) -> Recipients {
        self.to(Target::Connections(connections.into_iter().collect()))
    }

    /// Every connection in `group`.
    pub fn group(&self, group: GroupName) -> Recipients {
        self.to(Target::Groups(vec![group]))
    }

    /// Every connection in any of `groups`, once.
    pub fn groups(&self, groups: impl IntoIterator<Item = GroupName>) -> Recipients {
        self.to(Target::Groups(groups.into_iter().collect()))
    }

    /// Every connection in `group` except the caller.
    pub fn others_in_group(&self, group: GroupName) -> Recipients {
        let send = self.group(group);
        match &self.caller {
            Some(caller) => send.except([caller.clone()]),
            None => send,
        }
    }

    /// Every connection of `user`.
    pub fn user(&self, user: UserId) -> Recipients {
        self.to(Target::Users(vec![user]))
    }

    /// Every connection of any of `users`.
    pub fn users(&self, users: impl IntoIterator<Item = UserId>) -> Recipients {
        self.to(Target::Users(users.into_iter().collect()))
    }
}

/// A message on its way to a set of clients.
#[derive(Debug, Clone)]
#[must_use = "nothing is sent until `send` is awaited"]
pub struct Recipients {
    node: Node,
    hub: HubName,
    target: Target,
    except: Vec<ConnectionId>,
    sender: Option<ConnectionId>,
    durable: Option<Duration>,
    metrics: Option<Arc<Metrics>>,
    waiting: Waiting,
}

impl Recipients {
    /// Leaves these connections out.
    pub fn except(mut self, connections: impl IntoIterator<Item = ConnectionId>) -> Self {
        self.except.extend(connections);
        self
    }

    /// Stores the message in each target user's inbox first, so a user who is offline receives
    /// it on their next connect, within `ttl`. Only for messages to users.
    pub fn durable(mut self, ttl: Duration) -> Self {
        self.durable = Some(ttl);
        self
    }

    /// Invokes `method` with `arguments` on every target client, without waiting for answers.
    /// Returns once the message is stored (or delivered, for local-only targets).
    ///
    /// In the invocation of a plain method (not a streaming or uploading one) it returns as
    /// soon as the message has its place in the caller's order, with the durable copies already stored, and the returned [`Published`]
    /// has no position: the caller's next invocation runs meanwhile, and a burst of sends from
    /// one client shares appends. Messages still reach everyone in the order sent. When the
    /// caller waits for the invocation (it sent an invocation id), the completion goes out
    /// only once every message the method sent is stored, and is an error if one could not
    /// be; when it does not, a failure to store is logged (nobody is waiting for it). Use
    /// [`send_stored`](Self::send_stored) where the method itself must know.
    ///
    /// # Errors
    ///
    /// The message could not be stored: it was not sent. Or the backplane's answer was lost and
    /// the node could not find out whether it was stored (the error says the outcome is
    /// unknown): it may have been sent, and sending it again may deliver it twice.
    pub async fn send(self, method: &str, arguments: Vec<Value>) -> HubResult<Published> {
        self.publish(method, arguments, false).await
    }

    /// As [`send`](Self::send), but waits until the message is stored in every case, and the
    /// returned [`Published`] says where it entered the log.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn send_stored(self, method: &str, arguments: Vec<Value>) -> HubResult<Published> {
        self.publish(method, arguments, true).await
    }

    async fn publish(
        self,
        method: &str,
        arguments: Vec<Value>,
        stored: bool,
    ) -> HubResult<Published> {
        let payload = protocol::invocation(method, &arguments);
        let kind = self.target.kind();
        let hub = self.hub.clone();
        let mut message = Message::new(self.hub, self.target, payload).except(self.except);
        if let Some(sender) = self.sender {
            message = message.sender(sender);
        }
        if let Some(ttl) = self.durable {
            message = message.durable(ttl);
        }
        let started = std::time::Instant::now();
        let pending = self.node.publish_in_order(message).await?;
        let commit = Commit {
            pending,
            kind,
            started,
        };
        let commit = match (&self.waiting, stored) {
            (Waiting::Completion(commits), false) => match commits.defer(commit) {
                Ok(published) => return Ok(published),
                // The completion has gone out: wait here.
                Err(commit) => commit,
            },
            (Waiting::Nobody, false) => commit,
            _ => return Ok(commit.stored(self.metrics.as_deref()).await?),
        };
        let Commit {
            pending,
            kind,
            started,
        } = commit;
        let metrics = self.metrics;
        tokio::spawn(async move {
            match pending.wait().await {
                Ok(_) => {
                    if let Some(metrics) = &metrics {
                        metrics.sent(kind, started.elapsed());
                    }
                }
                Err(err) => {
                    tracing::warn!(%hub, %err, "a message sent by a call nobody waits for could not be stored");
                }
            }
        });
        Ok(Published::default())
    }
}

/// How the sends of an invocation wait for the log.
#[derive(Debug, Clone)]
enum Waiting {
    /// Until the message is stored: outside invocations, and in streaming methods.
    Stored,
    /// Not at all: the caller sent no invocation id, nobody waits.
    Nobody,
    /// The invocation's completion waits for them.
    Completion(Arc<Commits>),
}

/// One queued message: the node's word on it, and what its metrics need.
#[derive(Debug)]
struct Commit {
    pending: PendingPublish,
    kind: &'static str,
    started: Instant,
}

impl Commit {
    /// Waits until the message is stored, and counts it.
    async fn stored(self, metrics: Option<&Metrics>) -> Result<Published, Error> {
        let published = self.pending.wait().await?;
        if let Some(metrics) = metrics {
            metrics.sent(self.kind, self.started.elapsed());
        }
        Ok(published)
    }
}

/// The messages an invocation sent, which its completion waits for: the method returns once
/// they have their places in order, and the caller's next invocation runs while they are
/// stored.
#[derive(Debug)]
pub(crate) struct Commits {
    /// `None` once the completion took them.
    queued: std::sync::Mutex<Option<Vec<Commit>>>,
    metrics: Option<Arc<Metrics>>,
}

impl Commits {
    /// Adds a message for the completion to wait for; gives it back when the completion has
    /// already taken the others (a task the method left running sends after it returned).
    fn defer(&self, commit: Commit) -> Result<Published, Commit> {
        let mut queued = self
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match queued.as_mut() {
            Some(commits) => {
                let published = commit.pending.queued();
                commits.push(commit);
                Ok(published)
            }
            None => Err(commit),
        }
    }

    /// Waits until every message sent so far is stored; the first error if one was not.
    /// Messages sent after this was called are waited for by their senders.
    pub(crate) fn stored(&self) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let metrics = self.metrics.clone();
        let commits = self
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        async move {
            let mut outcome = Ok(());
            for commit in commits {
                if let Err(err) = commit.stored(metrics.as_deref()).await
                    && outcome.is_ok()
                {
                    outcome = Err(err);
                }
            }
            outcome
        }
    }
}

/// One client: send to it, or invoke a method on it and wait for its result.
#[derive(Debug, Clone)]
pub struct Client {
    send: Recipients,
    node: Node,
    hub: HubName,
    connection: Option<ConnectionId>,
}

impl Client {
    /// Invokes `method` on the client without waiting for an answer.
    ///
    /// # Errors
    ///
    /// As [`Recipients::send`].
    pub async fn send(self, method: &str, arguments: Vec<Value>) -> HubResult<Published> {
        self.send.send(method, arguments).await
    }

    /// Invokes `method` on the client and waits up to `timeout` for the value its handler
    /// returns (a SignalR client result), wherever the client is connected.
    ///
    /// # Errors
    ///
    /// The client answered with an error, disconnected, did not answer in time, or does not
    /// exist.
    pub async fn invoke(
        self,
        method: &str,
        arguments: Vec<Value>,
        timeout: Duration,
    ) -> HubResult<Value> {
        let connection = self
            .connection
            .ok_or_else(|| HubError::new("no client to invoke"))?;
        let payload = serde_json::to_vec(&serde_json::json!({
            "target": method,
            "arguments": arguments,
        }))
        .map_err(|e| HubError::new(e.to_string()))?;
        let answer =
            tokio::time::timeout(timeout, self.node.invoke(&self.hub, &connection, payload))
                .await
                .map_err(|_| {
                    HubError::new(format!("the client did not answer within {timeout:?}"))
                })??;
        serde_json::from_slice(&answer).map_err(|e| HubError::new(e.to_string()))
    }
}

/// Group membership of connections.
#[derive(Debug, Clone)]
pub struct Groups {
    node: Node,
    hub: HubName,
    max_groups: usize,
}

impl Groups {
    /// Puts `connection` in `group`, wherever the connection lives.
    ///
    /// # Errors
    ///
    /// The connection is already in the most groups allowed, the backplane could not record
    /// it, or the connection does not exist.
    pub async fn add(&self, connection: &ConnectionId, group: &GroupName) -> HubResult<()> {
        let current = self
            .node
            .backplane()
            .connection_groups(&self.hub, connection)
            .await?;
        if current.len() >= self.max_groups && !current.contains(group) {
            let mut err = HubError::new(format!(
                "a connection can be in at most {} groups",
                self.max_groups
            ));
            err.invalid_input = true;
            return Err(err);
        }
        self.node
            .add_to_group(&self.hub, group, connection)
            .await
            .map(|_| ())
            .map_err(HubError::from)
    }

    /// Takes `connection` out of `group`.
    ///
    /// # Errors
    ///
    /// The backplane could not record it.
    pub async fn remove(&self, connection: &ConnectionId, group: &GroupName) -> HubResult<()> {
        self.node
            .remove_from_group(&self.hub, group, connection)
            .await
            .map(|_| ())
            .map_err(HubError::from)
    }
}
