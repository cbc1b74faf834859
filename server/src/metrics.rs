//! `/metrics`: Prometheus (OpenMetrics text) counters, gauges and histograms of the server and
//! its node, encoded by the `prometheus-client` crate.

use std::sync::Mutex;
use std::time::Duration;

use backplane_core::{Node, NodeObserver, NodeStats};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Two fixed labels, looked up without allocating (on every backplane call).
type CallLabels = [(&'static str, &'static str); 2];

/// Every metric the server exports.
pub(crate) struct Metrics {
    registry: Registry,
    /// Open client connections.
    pub(crate) connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Connections that completed their handshake.
    pub(crate) connects: Counter,
    /// Connections that ended.
    pub(crate) disconnects: Counter,
    /// Connections refused, by reason.
    pub(crate) connection_failures: Family<Labels, Counter>,
    /// Hub messages received from clients.
    pub(crate) messages_in: Counter,
    /// Messages sent by hub code and the server API, by target kind.
    pub(crate) messages_out: Family<Labels, Counter>,
    /// Connections closed because they could not keep up.
    pub(crate) slow_consumers: Counter,
    /// Time to write a batch of deliveries to a socket.
    pub(crate) delivery_seconds: Histogram,
    /// Time for the node to accept a message (stored, or delivered locally).
    pub(crate) publish_seconds: Histogram,
    /// Records written to sockets, by outcome.
    deliveries: Family<Labels, Counter>,
    pending_durable: Gauge,
    node_published: Counter,
    node_delivered: Counter,
    node_failed: Counter,
    node_entries_read: Counter,
    backplane_seconds: Family<CallLabels, Histogram, fn() -> Histogram>,
    log_lag_seconds: Histogram,
    pool_connections: Family<Labels, Gauge>,
    pool_max: Gauge,
    pool_waiting: Gauge,
    last: Mutex<NodeStats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency() -> Histogram {
    // 50 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn lag() -> Histogram {
    // 500 µs to about 65 s.
    Histogram::new(exponential_buckets(0.000_5, 2.0, 18))
}

fn gauge(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("backplane");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let connects = Counter::default();
        registry.register(
            "connects",
            "Connections that completed their handshake",
            connects.clone(),
        );
        let disconnects = Counter::default();
        registry.register("disconnects", "Connections that ended", disconnects.clone());
        let connection_failures = Family::<Labels, Counter>::default();
        registry.register(
            "connection_failures",
            "Connections refused, by reason (auth, limit, handshake, upgrade)",
            connection_failures.clone(),
        );
        let messages_in = Counter::default();
        registry.register(
            "messages_in",
            "Hub messages received from clients",
            messages_in.clone(),
        );
        let messages_out = Family::<Labels, Counter>::default();
        registry.register(
            "messages_out",
            "Messages sent by hubs and the server API, by target kind",
            messages_out.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "deliveries",
            "Records written to client sockets, by outcome (written, failed)",
            deliveries.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "Connections closed because they could not keep up",
            slow_consumers.clone(),
        );
        let delivery_seconds = latency();
        registry.register(
            "delivery_write_seconds",
            "Time to write a batch of queued records to a client socket",
            delivery_seconds.clone(),
        );
        let publish_seconds = latency();
        registry.register(
            "publish_seconds",
            "Time for the backplane to accept a message (stored, or delivered locally)",
            publish_seconds.clone(),
        );
        let pending_durable = Gauge::default();
        registry.register(
            "pending_durable_messages",
            "Durable messages stored and not yet acknowledged (all nodes)",
            pending_durable.clone(),
        );
        let node_published = Counter::default();
        registry.register(
            "node_published",
            "Messages this node published",
            node_published.clone(),
        );
        let node_delivered = Counter::default();
        registry.register(
            "node_delivered",
            "Deliveries this node handed to local connections",
            node_delivered.clone(),
        );
        let node_failed = Counter::default();
        registry.register(
            "node_delivery_failures",
            "Deliveries that failed (connection gone or too slow)",
            node_failed.clone(),
        );
        let node_entries_read = Counter::default();
        registry.register(
            "node_log_entries_read",
            "Log entries this node read from the backplane",
            node_entries_read.clone(),
        );
        let backplane_seconds =
            Family::<CallLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register(
            "backplane_call_seconds",
            "Time of each backplane (database) call, by operation and outcome",
            backplane_seconds.clone(),
        );
        let log_lag_seconds = lag();
        registry.register(
            "log_lag_seconds",
            "Time from another node's append to this node's read of the entry (by the two nodes' clocks)",
            log_lag_seconds.clone(),
        );
        let pool_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "pool_connections",
            "The backplane's pooled database connections, by state (in_use, idle)",
            pool_connections.clone(),
        );
        let pool_max = Gauge::default();
        registry.register(
            "pool_max_connections",
            "The most database connections the backplane's pool opens",
            pool_max.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "pool_waiting",
            "Calls waiting for a pooled database connection",
            pool_waiting.clone(),
        );
        Self {
            registry,
            connections,
            connects,
            disconnects,
            connection_failures,
            messages_in,
            messages_out,
            slow_consumers,
            delivery_seconds,
            publish_seconds,
            deliveries,
            pending_durable,
            node_published,
            node_delivered,
            node_failed,
            node_entries_read,
            backplane_seconds,
            log_lag_seconds,
            pool_connections,
            pool_max,
            pool_waiting,
            last: Mutex::new(NodeStats::default()),
        }
    }

    /// Counts a refused connection.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.connection_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts a message sent to `kind` (`all`, `groups`, `users`, `connections`).
    pub(crate) fn sent(&self, kind: &'static str, took: Duration) {
        self.messages_out
            .get_or_create(&vec![("target", kind)])
            .inc();
        self.publish_seconds.observe(took.as_secs_f64());
    }

    /// Counts records written to a socket, or lost with it.
    pub(crate) fn delivered(&self, records: u64, written: bool) {
        let outcome = if written { "written" } else { "failed" };
        self.deliveries
            .get_or_create(&vec![("outcome", outcome)])
            .inc_by(records);
    }

    /// The text exposition, after sampling the node and its backplane.
    pub(crate) async fn render(&self, node: &Node) -> String {
        if let Ok(Ok(pending)) =
            tokio::time::timeout(Duration::from_secs(2), node.backplane().pending_count()).await
        {
            self.pending_durable
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        if let Some(pool) = node.backplane().pool_status() {
            self.pool_connections
                .get_or_create(&vec![("state", "in_use")])
                .set(gauge(pool.size.saturating_sub(pool.available)));
            self.pool_connections
                .get_or_create(&vec![("state", "idle")])
                .set(gauge(pool.available));
            self.pool_max.set(gauge(pool.max_size));
            self.pool_waiting.set(gauge(pool.waiting));
        }
        let stats = node.stats();
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.node_published
                .inc_by(stats.published.saturating_sub(last.published));
            self.node_delivered
                .inc_by(stats.delivered.saturating_sub(last.delivered));
            self.node_failed
                .inc_by(stats.failed.saturating_sub(last.failed));
            self.node_entries_read
                .inc_by(stats.entries_read.saturating_sub(last.entries_read));
            *last = stats;
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl NodeObserver for Metrics {
    fn backplane_call(&self, operation: &'static str, elapsed: Duration, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.backplane_seconds
            .get_or_create(&[("operation", operation), ("outcome", outcome)])
            .observe(elapsed.as_secs_f64());
    }

    fn log_lag(&self, lag: Duration) {
        self.log_lag_seconds.observe(lag.as_secs_f64());
    }
}
