//! What a driver provides to run the suite, and what every case gets to work with.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backplane_core::{
    Connection, ConnectionId, Delivery, DeliveryKind, HubName, Message, Node, NodeOptions,
    Position, Retention, SharedBackplane, Target, UserId,
};
use bytes::Bytes;

/// How long any single wait in a case may take before the case fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a whole case may take.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a case did not pass.
#[derive(Debug)]
pub enum CaseError {
    /// The driver broke the contract.
    Failed(String),
    /// The case cannot run against this driver or setup; the reason says why.
    Skipped(String),
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(reason) => write!(f, "failed: {reason}"),
            Self::Skipped(reason) => write!(f, "skipped: {reason}"),
        }
    }
}

impl From<backplane_core::Error> for CaseError {
    fn from(err: backplane_core::Error) -> Self {
        Self::Failed(format!("unexpected error: {err}"))
    }
}

/// The result of one case.
pub type CaseResult = Result<(), CaseError>;

/// Fails the case with a formatted reason unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::CaseError::Failed(format!($($fmt)+)));
        }
    };
}

/// Fails the case unless both sides are equal.
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err($crate::CaseError::Failed(format!(
                "{} != {}: {:?} != {:?} (line {})",
                stringify!($left),
                stringify!($right),
                left,
                right,
                line!()
            )));
        }
    }};
}

/// A driver under test: hands out fresh, isolated namespaces.
#[async_trait]
pub trait Factory: Send + Sync + 'static {
    /// The driver's name, for reports.
    fn driver_name(&self) -> &'static str;

    /// A fresh namespace (schema, prefix or database) that no other namespace sees.
    async fn namespace(&self, spec: &Spec) -> Result<Box<dyn Namespace>, String>;
}

/// What a case needs from its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Streams per hub.
    pub streams: u32,
    /// Whether the case stops and starts the database, so the namespace must not share a
    /// database server with other cases running at the same time.
    pub restarts: bool,
}

/// A database a run of the suite was pointed at, as the command line names it: what a
/// driver's factory is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestDatabase<'a> {
    /// The database URL (or connection string).
    pub url: &'a str,
    /// Shell commands that stop and start that database, for the cases that restart it;
    /// `None` when not given (such cases are then skipped).
    pub restart: Option<(&'a str, &'a str)>,
}

impl TestDatabase<'_> {
    /// Refuses restart commands, for a driver whose factory cannot use them.
    ///
    /// # Errors
    ///
    /// Restart commands were given.
    pub fn without_restart(&self, driver: &str) -> Result<(), String> {
        match self.restart {
            Some(_) => Err(format!(
                "--stop-cmd and --start-cmd restart a PostgreSQL server: the {driver} driver's restart cases are skipped"
            )),
            None => Ok(()),
        }
    }
}

/// An append that has been written but not committed yet.
#[async_trait]
pub trait HeldAppend: Send {
    /// Commits it; returns the position of its first record.
    async fn commit(self: Box<Self>) -> backplane_core::Result<Position>;
}

/// One isolated namespace of a driver, shared by the nodes of one case.
#[async_trait]
pub trait Namespace: Send + Sync {
    /// A backplane handle for one more node: a new driver instance (its own pool and listener)
    /// where the driver has them.
    async fn backplane(&self) -> Result<SharedBackplane, String>;

    /// Breaks every node's wake-up channel (kills the listener connections). Returns a skip
    /// reason when the driver cannot.
    async fn interrupt_wakeups(&self) -> Result<(), CaseError> {
        Err(CaseError::Skipped(
            "the driver cannot interrupt its wake-ups".into(),
        ))
    }

    /// Stops the database: every call fails until [`start_database`](Self::start_database).
    async fn stop_database(&self) -> Result<(), CaseError> {
        Err(CaseError::Skipped(
            "the driver cannot stop its database".into(),
        ))
    }

    /// Starts the database stopped by [`stop_database`](Self::stop_database).
    async fn start_database(&self) -> Result<(), CaseError> {
        Err(CaseError::Skipped(
            "the driver cannot start its database".into(),
        ))
    }

    /// Writes `records` to a stream in a transaction that stays open until the returned handle
    /// commits, so a case can check that offsets stay gap-free in commit order.
    async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: Vec<Bytes>,
    ) -> Result<Box<dyn HeldAppend>, CaseError> {
        let _ = (hub, stream, records);
        Err(CaseError::Skipped(
            "the driver cannot hold a transaction open".into(),
        ))
    }

    /// Takes the last `count` entries off `stream` of `hub`, with the stream's end, keeping its
    /// epoch: what a restore from backup or a failover to a lagging standby does to the log.
    async fn rewind_log(&self, hub: &HubName, stream: u32, count: u64) -> Result<(), CaseError> {
        let _ = (hub, stream, count);
        Err(CaseError::Skipped(
            "the driver cannot take its log back in time".into(),
        ))
    }

    /// Removes the namespace and everything in it.
    async fn drop_namespace(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A case's function.
pub type CaseFn = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// One case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name, which is also its test function's name.
    pub name: &'static str,
    /// What the case needs from its namespace.
    pub spec: Spec,
    /// The case.
    pub run: CaseFn,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// Node settings the suite uses: fast heartbeats and cleanup, so that node death is seen in
/// about a second.
pub fn test_options() -> NodeOptions {
    NodeOptions::new()
        .heartbeat_interval(Duration::from_millis(100))
        .reap_interval(Duration::from_millis(200))
        .cleanup_interval(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(1500))
        .poll_interval(Duration::from_millis(250))
        .connection_buffer(100_000)
}

static SENTINEL: AtomicU64 = AtomicU64::new(0);

/// Everything a case works with: the namespace, its nodes, and a hub.
pub struct Ctx {
    factory: Arc<dyn Factory>,
    namespace: Box<dyn Namespace>,
    extra: Vec<Box<dyn Namespace>>,
    nodes: Vec<Node>,
    /// The hub most cases use.
    pub hub: HubName,
    spec: Spec,
}

impl Ctx {
    /// A context over a fresh namespace.
    pub async fn new(factory: Arc<dyn Factory>, spec: Spec) -> Result<Self, CaseError> {
        let namespace = factory
            .namespace(&spec)
            .await
            .map_err(|e| CaseError::Failed(format!("could not create a namespace: {e}")))?;
        Ok(Self {
            factory,
            namespace,
            extra: Vec::new(),
            nodes: Vec::new(),
            hub: HubName::new("conformance").map_err(CaseError::from)?,
            spec,
        })
    }

    /// The namespace, for fault injection.
    pub fn namespace(&self) -> &dyn Namespace {
        &*self.namespace
    }

    /// A backplane handle on the case's namespace.
    pub async fn backplane(&self) -> Result<SharedBackplane, CaseError> {
        self.namespace
            .backplane()
            .await
            .map_err(|e| CaseError::Failed(format!("could not open the backplane: {e}")))
    }

    /// A backplane on a second, fresh namespace of the same driver.
    pub async fn other_namespace(&mut self) -> Result<SharedBackplane, CaseError> {
        let spec = Spec {
            restarts: false,
            ..self.spec
        };
        let ns = self
            .factory
            .namespace(&spec)
            .await
            .map_err(|e| CaseError::Failed(format!("could not create a namespace: {e}")))?;
        let backplane = ns
            .backplane()
            .await
            .map_err(|e| CaseError::Failed(format!("could not open the backplane: {e}")))?;
        self.extra.push(ns);
        Ok(backplane)
    }

    /// Starts a node with [`test_options`].
    pub async fn node(&mut self) -> Result<Node, CaseError> {
        self.node_with(test_options()).await
    }

    /// Starts a node with the given options.
    pub async fn node_with(&mut self, options: NodeOptions) -> Result<Node, CaseError> {
        let backplane = self.backplane().await?;
        self.node_on(backplane, options).await
    }

    /// Starts a node on a given backplane handle (another namespace, a wrapper).
    pub async fn node_on(
        &mut self,
        backplane: SharedBackplane,
        options: NodeOptions,
    ) -> Result<Node, CaseError> {
        let node = Node::start(backplane, options).await?;
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Shuts `node` down with the others at teardown.
    pub fn adopt(&mut self, node: Node) {
        self.nodes.push(node);
    }

    /// Starts `N` nodes.
    pub async fn nodes<const N: usize>(&mut self) -> Result<[Node; N], CaseError> {
        let mut nodes = Vec::with_capacity(N);
        for _ in 0..N {
            nodes.push(self.node().await?);
        }
        nodes
            .try_into()
            .map_err(|_| CaseError::Failed("node count".into()))
    }

    /// Connects a client to `node` on the case's hub.
    pub async fn connect(&self, node: &Node, user: Option<&str>) -> Result<Client, CaseError> {
        connect(node, &self.hub, user).await
    }

    /// Shuts every node down and removes the namespaces.
    pub async fn teardown(self) -> Result<(), String> {
        for node in &self.nodes {
            node.shutdown().await;
        }
        for ns in self.extra.iter().chain(std::iter::once(&self.namespace)) {
            ns.drop_namespace().await?;
        }
        Ok(())
    }
}

/// Connects a client to `node` on `hub`.
pub async fn connect(node: &Node, hub: &HubName, user: Option<&str>) -> Result<Client, CaseError> {
    let user = user.map(UserId::new).transpose()?;
    let connection = node.connect(hub, None, user).await?;
    Ok(Client {
        node: node.clone(),
        connection,
    })
}

/// A test client: a connection on a node, with bounded waits.
#[derive(Debug)]
pub struct Client {
    /// The node holding the connection.
    pub node: Node,
    /// The connection.
    pub connection: Connection,
}

impl Client {
    /// The connection id.
    pub fn id(&self) -> &ConnectionId {
        &self.connection.id
    }

    /// The connection's user; fails for an anonymous connection.
    pub fn user_id(&self) -> Result<&UserId, CaseError> {
        self.connection
            .user
            .as_ref()
            .ok_or_else(|| CaseError::Failed(format!("connection {} has no user", self.id())))
    }

    /// The next delivery, failing after [`WAIT`].
    pub async fn recv(&mut self) -> Result<Delivery, CaseError> {
        match tokio::time::timeout(WAIT, self.connection.recv()).await {
            Ok(Some(delivery)) => Ok(delivery),
            Ok(None) => Err(CaseError::Failed(format!(
                "connection {} was closed while waiting for a delivery",
                self.id()
            ))),
            Err(_) => Err(CaseError::Failed(format!(
                "connection {} received nothing within {WAIT:?}",
                self.id()
            ))),
        }
    }

    /// The next delivery's payload; fails if it is not `expected`.
    pub async fn expect(&mut self, expected: &[u8]) -> CaseResult {
        let delivery = self.recv().await?;
        check!(
            delivery.payload.as_ref() == expected,
            "connection {} expected {:?}, got {:?}",
            self.id(),
            String::from_utf8_lossy(expected),
            String::from_utf8_lossy(&delivery.payload)
        );
        Ok(())
    }

    /// Receives until the sentinel `marker`, returning what came before it.
    pub async fn until(&mut self, marker: &Bytes) -> Result<Vec<Delivery>, CaseError> {
        let mut before = Vec::new();
        loop {
            let delivery = self.recv().await?;
            if delivery.payload == marker {
                return Ok(before);
            }
            before.push(delivery);
        }
    }

    /// Fails if anything was delivered before the sentinel `marker`.
    pub async fn quiet_until(&mut self, marker: &Bytes) -> CaseResult {
        let before = self.until(marker).await?;
        check!(
            before.is_empty(),
            "connection {} received {} unexpected deliveries, first {:?}",
            self.id(),
            before.len(),
            String::from_utf8_lossy(&before[0].payload)
        );
        Ok(())
    }

    /// Acknowledges a durable delivery.
    pub async fn ack(&self, delivery: &Delivery) -> CaseResult {
        if let DeliveryKind::Durable(id) = delivery.kind {
            self.node
                .acknowledge(&self.connection.hub, self.id(), id)
                .await?;
        }
        Ok(())
    }

    /// Whether the node closed this connection's channel (after draining it).
    pub async fn closed(&mut self) -> Result<bool, CaseError> {
        match tokio::time::timeout(WAIT, self.connection.recv()).await {
            Ok(None) => Ok(true),
            Ok(Some(_)) => Ok(false),
            Err(_) => Err(CaseError::Failed(format!(
                "connection {} neither closed nor received within {WAIT:?}",
                self.id()
            ))),
        }
    }
}

/// Publishes a unique sentinel from `node` (no sender: the node's stream, the one its other
/// sender-less messages take) to `clients`, and returns it. Each client then reads up to it with
/// [`Client::until`] or [`Client::quiet_until`]: a delivery that should not happen would have
/// arrived before the sentinel. This awaits an event instead of sleeping.
pub async fn sentinel(node: &Node, hub: &HubName, clients: &[&Client]) -> Result<Bytes, CaseError> {
    let marker = Bytes::from(format!(
        "sentinel-{}",
        SENTINEL.fetch_add(1, Ordering::Relaxed)
    ));
    let ids = clients.iter().map(|c| c.id().clone()).collect();
    node.publish(Message::new(
        hub.clone(),
        Target::Connections(ids),
        marker.clone(),
    ))
    .await?;
    Ok(marker)
}

/// Waits for a node event matching `pred`, failing after `within`.
pub async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<backplane_core::NodeEvent>,
    within: Duration,
    mut pred: impl FnMut(&backplane_core::NodeEvent) -> bool,
) -> CaseResult {
    let found = tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(event) if pred(&event) => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    match found {
        Ok(true) => Ok(()),
        Ok(false) => Err(CaseError::Failed("node event channel closed".into())),
        Err(_) => Err(CaseError::Failed(format!(
            "expected node event did not happen within {within:?}"
        ))),
    }
}

/// Waits, job run by job run of `node`, until `done` holds, within [`WAIT`].
pub async fn until_after_jobs<F, Fut>(
    node: &Node,
    job: backplane_core::Job,
    what: &str,
    mut done: F,
) -> CaseResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, CaseError>>,
{
    let mut events = node.events();
    let outcome = tokio::time::timeout(WAIT, async {
        while !done().await? {
            wait_event(&mut events, WAIT, |e| {
                *e == backplane_core::NodeEvent::JobRan(job)
            })
            .await?;
        }
        Ok::<(), CaseError>(())
    })
    .await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(CaseError::Failed(format!("{what} within {WAIT:?}"))),
    }
}

/// Retention that keeps nothing older than `max_entries` per stream.
pub fn keep_last(max_entries: u64) -> Retention {
    Retention {
        max_entries,
        ..Retention::default()
    }
}

/// Runs one case against a factory: fresh namespace, bounded time, teardown.
pub async fn run_case(case: &Case, factory: Arc<dyn Factory>) -> CaseResult {
    let mut ctx = Ctx::new(factory, case.spec).await?;
    let outcome = match tokio::time::timeout(CASE_TIMEOUT, (case.run)(&mut ctx)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(CaseError::Failed(format!(
            "the case did not finish within {CASE_TIMEOUT:?}"
        ))),
    };
    let teardown = ctx.teardown().await;
    match (outcome, teardown) {
        (Ok(()), Err(e)) => Err(CaseError::Failed(format!("teardown failed: {e}"))),
        (outcome, _) => outcome,
    }
}

/// Runs a case by name as a `#[tokio::test]` does: panics on failure and on an undeclared
/// run-time skip, so a skip can never read as a pass.
pub async fn run_test(name: &str, factory: Arc<dyn Factory>) {
    let Some(case) = crate::cases().iter().find(|c| c.name == name) else {
        panic!("no conformance case named {name}");
    };
    match run_case(case, factory).await {
        Ok(()) => {}
        Err(CaseError::Failed(reason)) => panic!("{name} failed: {reason}"),
        Err(CaseError::Skipped(reason)) => panic!(
            "{name} was skipped at run time ({reason}); declare it in the suite!'s skip list so it is reported as ignored"
        ),
    }
}
