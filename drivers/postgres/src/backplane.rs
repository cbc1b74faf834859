//! [`PgBackplane`]: the [`Backplane`] contract on PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use backplane_core::{
    Backplane, ConnectionId, ConnectionInfo, DeliveryAttempt, Driver as _, DurableMessage, Error,
    GroupName, HubName, LogEntry, MessageId, NewDurableMessage, NodeId, NodeInfo, PoolStatus,
    Position, Result, Retention, StreamBounds, UserId, UserSession, WakeupHub, Wakeups,
    checked_read,
};
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Row;

use crate::error::{connection_lost, corrupt, db, db_write, pool};
use crate::listener::{self, Listener};
use crate::options::PgOptions;
use crate::schema::{self, Names, SetNames};
use crate::sql::{self, NodeSql, Sql, remove_orphaned_connections};
use crate::tables::{Layout, PerHub, TableSet};
use backplane_core::batch::{AppendRequest, BatchLimits, Batchers};

/// A backplane on PostgreSQL.
///
/// Clones share one pool and one listener, and, with tables per hub, the cache of hubs' table
/// sets. See the crate docs for the tables and how recovery works.
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use backplane_core::{Node, NodeOptions};
/// use backplane_postgres::PgBackplane;
///
/// # async fn run() -> backplane_core::Result<()> {
/// let backplane = PgBackplane::connect("postgres://app@db.internal/chat").await?;
/// let node = Node::start(Arc::new(backplane), NodeOptions::new()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PgBackplane {
    inner: Arc<PgState>,
}

/// What the handles of one backplane share: the pool, the names and statements, the wake-ups,
/// the batchers and the shutdown signal.
pub(crate) struct PgState {
    pub(crate) pool: Pool,
    pub(crate) options: PgOptions,
    pub(crate) names: Names,
    pub(crate) node_sql: NodeSql,
    pub(crate) layout: Layout,
    /// How held appends (feature `testing`) open a connection of their own.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    config: tokio_postgres::Config,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wakeups: Arc<WakeupHub>,
    shutdown: watch::Sender<bool>,
    batchers: Batchers,
}

impl std::fmt::Debug for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackplane")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for PgState {
    fn drop(&mut self) {
        // Stops the listener and the batchers.
        self.shutdown.send_replace(true);
    }
}

pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| corrupt(format!("{what} {value} does not fit the database")))
}

pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(format!("negative {what} {value}")))
}

fn stream_i32(stream: u32) -> Result<i32> {
    i32::try_from(stream).map_err(|_| corrupt(format!("stream {stream} is too large")))
}

fn name<T: std::str::FromStr<Err = Error>>(value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|e| corrupt(format!("stored name {value:?} is invalid: {e}")))
}

/// A position from a row of `(offset, epoch)`.
fn position(row: &Row, stream: u32, context: &'static str) -> Result<Position> {
    let offset: i64 = row.try_get(0).map_err(db(context))?;
    let epoch: i64 = row.try_get(1).map_err(db(context))?;
    Ok(Position::new(
        stream,
        to_u64(offset, "offset")?,
        to_u64(epoch, "epoch")?,
    ))
}

fn connection_info(row: &Row) -> Result<ConnectionInfo> {
    let hub: String = row.try_get(0).map_err(db("decoding a connection"))?;
    let id: String = row.try_get(1).map_err(db("decoding a connection"))?;
    let user: Option<String> = row.try_get(2).map_err(db("decoding a connection"))?;
    let node: String = row.try_get(3).map_err(db("decoding a connection"))?;
    let connected_at: SystemTime = row.try_get(4).map_err(db("decoding a connection"))?;
    Ok(ConnectionInfo {
        hub: name::<HubName>(&hub)?,
        id: name::<ConnectionId>(&id)?,
        user: user.map(|u| name::<UserId>(&u)).transpose()?,
        node: name::<NodeId>(&node)?,
        connected_at,
    })
}

fn durable_message(row: &Row) -> Result<DurableMessage> {
    let e = || db("decoding a durable message");
    let id: i64 = row.try_get(0).map_err(e())?;
    let hub: String = row.try_get(1).map_err(e())?;
    let user: String = row.try_get(2).map_err(e())?;
    let sender: Option<String> = row.try_get(3).map_err(e())?;
    let payload: Vec<u8> = row.try_get(4).map_err(e())?;
    let acked_by: Option<String> = row.try_get(7).map_err(e())?;
    let acked_at: Option<SystemTime> = row.try_get(8).map_err(e())?;
    Ok(DurableMessage {
        id: MessageId(to_u64(id, "message id")?),
        hub: name::<HubName>(&hub)?,
        user: name::<UserId>(&user)?,
        sender: sender.map(|s| name::<ConnectionId>(&s)).transpose()?,
        payload: Bytes::from(payload),
        created_at: row.try_get(5).map_err(e())?,
        expires_at: row.try_get(6).map_err(e())?,
        acknowledged: match (acked_by, acked_at) {
            (Some(by), Some(at)) => Some((name::<ConnectionId>(&by)?, at)),
            _ => None,
        },
    })
}

/// Trims one table set's streams, one after another: a short transaction moves each stream's
/// start, then bounded deletes remove what fell below it.
async fn trim_set(
    client: &mut deadpool_postgres::Object,
    set: &TableSet,
    retention: &Retention,
) -> Result<u64> {
    let sql = &set.sql;
    let streams = client
        .query(&sql.trim_streams, &[])
        .await
        .map_err(db("listing streams to trim"))?;
    let max_age = retention.max_age.as_secs_f64();
    let max_entries = i64::try_from(retention.max_entries).unwrap_or(i64::MAX);
    let mut removed = 0;
    for row in streams {
        let id: i64 = row.try_get(0).map_err(db("listing streams to trim"))?;
        let first = move_first_offset(client, sql, id, max_age, max_entries).await?;
        removed += delete_below(client, sql, id, first).await?;
    }
    Ok(removed)
}

/// A pooled connection that goes back to the pool only through [`Self::give_back`]. Dropped any
/// other way (an error, a future dropped halfway) it is closed instead, so a session-level lock
/// it may hold ends with it rather than stay on a pooled connection.
struct ClosedUnlessReturned(Option<deadpool_postgres::Object>);

impl ClosedUnlessReturned {
    fn client(&mut self) -> Result<&mut deadpool_postgres::Object> {
        self.0
            .as_mut()
            .ok_or_else(|| corrupt("a connection used after it went back to the pool"))
    }

    fn give_back(mut self) {
        drop(self.0.take());
    }
}

impl Drop for ClosedUnlessReturned {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Entries one trim statement deletes at most, so each statement stays short whatever the
/// backlog, and appends never wait for it.
const TRIM_BATCH: i64 = 5_000;

/// Moves the stream's `first_offset` past the entries `retention` drops, under a short lock on
/// the stream row, and returns it. From then on a read below it fails with `PositionTooOld`.
async fn move_first_offset(
    client: &mut deadpool_postgres::Object,
    sql: &Sql,
    id: i64,
    max_age: f64,
    max_entries: i64,
) -> Result<i64> {
    let tx = client.transaction().await.map_err(db("trimming the log"))?;
    // Locking the stream row waits for appends in flight, so the next statement's snapshot
    // sees every entry that has an offset below next_offset.
    let lock = tx
        .query_one(&sql.trim_lock, &[&id])
        .await
        .map_err(db("trimming the log"))?;
    let next: i64 = lock.try_get(0).map_err(db("trimming the log"))?;
    let first: i64 = lock.try_get(1).map_err(db("trimming the log"))?;
    let floor = first.max(next.saturating_sub(max_entries));
    let young = tx
        .query_one(&sql.trim_oldest_young, &[&id, &max_age, &floor])
        .await
        .map_err(db("trimming the log"))?;
    let oldest_young: Option<i64> = young.try_get(0).map_err(db("trimming the log"))?;
    let new_first = floor.max(oldest_young.unwrap_or(next));
    if new_first > first {
        tx.execute(&sql.trim_set_first, &[&id, &new_first])
            .await
            .map_err(db("trimming the log"))?;
    }
    tx.commit().await.map_err(db("trimming the log"))?;
    Ok(new_first.max(first))
}

/// Deletes the stream's entries below `first`, [`TRIM_BATCH`] at a time, each batch its own
/// statement and none under the stream row's lock. Entries an earlier, interrupted trim left
/// below `first` go too.
async fn delete_below(
    client: &deadpool_postgres::Object,
    sql: &Sql,
    id: i64,
    first: i64,
) -> Result<u64> {
    let lowest = client
        .query_one(&sql.trim_lowest, &[&id])
        .await
        .map_err(db("trimming the log"))?;
    let Some(mut lowest) = lowest
        .try_get::<_, Option<i64>>(0)
        .map_err(db("trimming the log"))?
    else {
        return Ok(0);
    };
    let mut removed = 0;
    while lowest < first {
        let upto = first.min(lowest.saturating_add(TRIM_BATCH));
        removed += client
            .execute(&sql.trim_delete, &[&id, &lowest, &upto])
            .await
            .map_err(db("trimming the log"))?;
        lowest = upto;
    }
    Ok(removed)
}

impl PgBackplane {
    /// Connects with options parsed from a URL (see [`PgOptions`]'s `FromStr`).
    ///
    /// # Errors
    ///
    /// An invalid URL, an unreachable database, missing privileges, or a schema that could not
    /// be created or is too old.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url.parse()?).await
    }

    /// Connects: creates or checks the schema, opens the pool, and starts listening.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with(options: PgOptions) -> Result<Self> {
        options.validate()?;
        let names = Names::new(&options);
        let (mut config, tls) = options.connect_parts()?;
        if config.get_application_name().is_none() {
            config.application_name("backplane");
        }
        let timeout_ms = options.statement_timeout.as_millis();
        let timeout = format!("-c statement_timeout={timeout_ms}");
        let server_options = match config.get_options() {
            Some(given) => format!("{given} {timeout}"),
            None => timeout,
        };
        config.options(server_options);

        if options.create_schema {
            let (mut client, connection) = config
                .connect(tls.clone())
                .await
                .map_err(db("connecting to run migrations"))?;
            let task = tokio::spawn(connection);
            let outcome = schema::migrate(&mut client, &options).await;
            drop(client);
            let _ = task.await;
            outcome?;
        }

        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| Error::permanent(Self::NAME, format!("could not build the pool: {e}")))?;
        {
            let client = pool.get().await.map_err(crate::error::pool)?;
            schema::check_version(&**client, &names, &options).await?;
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let wakeups = Arc::new(WakeupHub::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(
            Listener {
                config: config.clone(),
                tls: tls.clone(),
                options: options.clone(),
                names: names.clone(),
                wakeups: wakeups.clone(),
                shutdown: shutdown_rx,
            }
            .run(ready_tx),
        );
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                return Err(Error::transient(
                    Self::NAME,
                    format!("the listener could not start: {err}"),
                ));
            }
            Err(_) => return Err(Error::transient(Self::NAME, "the listener stopped")),
        }
        let (node_sql, layout) = if options.tables_per_hub {
            (
                NodeSql::new(&names, None),
                Layout::PerHub(PerHub::default()),
            )
        } else {
            let set = TableSet::new(SetNames::shared(&options));
            (
                NodeSql::new(&names, Some(&set.names)),
                Layout::Shared(Arc::new(set)),
            )
        };
        Ok(Self {
            inner: Arc::new(PgState {
                pool,
                batchers: Batchers::new(
                    Self::NAME,
                    BatchLimits {
                        delay: options.batch_delay,
                        max_records: options.max_batch,
                    },
                ),
                options,
                names,
                node_sql,
                layout,
                config,
                tls,
                wakeups,
                shutdown,
            }),
        })
    }

    /// The DDL that creates the schema and tables for `options`, for a DBA to run when the
    /// application may not create them (with [`PgOptions::create_schema`] set to `false`).
    ///
    /// With [`PgOptions::tables_per_hub`], it creates the shared tables only (nodes,
    /// migrations, the registry of hubs): each hub's tables come from
    /// [`hub_ddl`](Self::hub_ddl), run after it.
    pub fn ddl(options: &PgOptions) -> String {
        schema::ddl(options)
    }

    /// The DDL of one hub's table set with [`PgOptions::tables_per_hub`], for a DBA to run
    /// once per hub (after [`ddl`](Self::ddl)) when the application may not create tables. It
    /// registers the hub with its slug, creates its tables and records their version; with
    /// `create_schema=false`, a hub whose DDL was not run fails its first use with
    /// [`PgTableSetError::Missing`](crate::PgTableSetError::Missing).
    ///
    /// # Examples
    ///
    /// ```
    /// use backplane_core::HubName;
    /// use backplane_postgres::{PgBackplane, PgOptions};
    ///
    /// let options: PgOptions =
    ///     "postgres://app@db.internal/chat?schema=rt&tables_per_hub=true&create_schema=false"
    ///         .parse()?;
    /// let sql = PgBackplane::hub_ddl(&options, &HubName::new("chat")?)?;
    /// assert!(sql.contains("INSERT INTO \"rt\".\"hubs\""));
    /// # Ok::<(), backplane_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The options are not for tables per hub, or are invalid, or the hub's slug is unusable
    /// (see [`PgOptions::table_slug`]).
    pub fn hub_ddl(options: &PgOptions, hub: &HubName) -> Result<String> {
        schema::hub_ddl(options, hub.as_str())
    }

    /// The options this backplane was opened with.
    pub fn options(&self) -> &PgOptions {
        &self.inner.options
    }

    /// The NOTIFY channel the nodes of this deployment listen on.
    pub fn channel(&self) -> &str {
        &self.inner.names.channel
    }

    /// The schema version the database is at: that of the shared tables and, by default, of
    /// the table set every hub shares (the lower of the two). With tables per hub, each hub's
    /// set is versioned on its own and checked on the hub's first use.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached.
    pub async fn schema_version(&self) -> Result<i32> {
        let client = self.client().await?;
        let versions = schema::read_versions(&**client, &self.inner.names).await?;
        Ok(versions.version(self.inner.options.tables_per_hub))
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.inner.pool.get().await.map_err(pool)
    }

    pub(crate) fn inner(&self) -> &PgState {
        &self.inner
    }

    /// Runs the append statement; creates the stream row first when it is missing.
    pub(crate) async fn write(
        &self,
        set: &TableSet,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<Position> {
        let client = self.client().await?;
        let stream_db = stream_i32(stream)?;
        let count =
            i64::try_from(records.len()).map_err(|_| corrupt("too many records in one append"))?;
        let data: Vec<&[u8]> = records.iter().map(|r| r.as_ref()).collect();
        let payload = listener::payload(hub, stream);
        let statement = client
            .prepare_cached(&set.sql.append)
            .await
            .map_err(db("preparing an append"))?;
        for _ in 0..2 {
            let answer = client
                .query_opt(
                    &statement,
                    &[
                        &hub.as_str(),
                        &stream_db,
                        &count,
                        &data,
                        &self.inner.names.channel,
                        &payload,
                    ],
                )
                .await;
            let row = match answer {
                Ok(row) => row,
                Err(err) => {
                    if connection_lost(&err) {
                        // Its connection task may not have noticed yet: keep the pool from
                        // handing the dead connection to the next write.
                        drop(deadpool_postgres::Object::take(client));
                    }
                    return Err(db_write("appending to the log")(err));
                }
            };
            if let Some(row) = row {
                return position(&row, stream, "appending to the log");
            }
            self.create_stream(set, &client, hub, stream_db).await?;
        }
        Err(corrupt("the stream row vanished during an append"))
    }

    async fn create_stream(
        &self,
        set: &TableSet,
        client: &deadpool_postgres::Object,
        hub: &HubName,
        stream: i32,
    ) -> Result<()> {
        client
            .execute(
                &set.sql.create_stream,
                &[
                    &hub.as_str(),
                    &stream,
                    &to_i64(Position::random_epoch(), "epoch")?,
                ],
            )
            .await
            .map_err(db("creating a stream"))?;
        Ok(())
    }

    fn check_stream(&self, stream: u32) -> Result<()> {
        if stream >= self.inner.options.streams {
            return Err(Error::UnknownStream {
                stream,
                streams: self.inner.options.streams,
            });
        }
        Ok(())
    }

    /// The queue of a stream's appends; the first call starts the task that writes its
    /// batches, one multi-row insert each, while the backplane lives.
    fn batcher(
        &self,
        set: &Arc<TableSet>,
        hub: &HubName,
        stream: u32,
    ) -> mpsc::Sender<AppendRequest> {
        let make_write = || {
            let (set, hub) = (set.clone(), hub.clone());
            move |inner, records: Vec<Bytes>| {
                let (set, hub) = (set.clone(), hub.clone());
                async move {
                    Self::from_inner(inner)
                        .write(&set, &hub, stream, &records)
                        .await
                }
            }
        };
        let inner = &self.inner;
        inner
            .batchers
            .queue(hub, stream, inner, &inner.shutdown, make_write)
    }

    pub(crate) fn from_inner(inner: Arc<PgState>) -> Self {
        Self { inner }
    }

    fn per_hub(&self) -> bool {
        matches!(self.inner.layout, Layout::PerHub(_))
    }
}

#[async_trait]
impl Backplane for PgBackplane {
    fn driver_name(&self) -> &'static str {
        Self::NAME
    }

    fn stream_count(&self) -> u32 {
        self.inner.options.streams
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        let status = self.inner.pool.status();
        Some(PoolStatus {
            max_size: status.max_size,
            size: status.size,
            available: status.available,
            waiting: status.waiting,
        })
    }

    async fn append(&self, hub: &HubName, stream: u32, records: &[Bytes]) -> Result<Position> {
        self.check_stream(stream)?;
        if records.is_empty() {
            return self.tail(hub, stream).await;
        }
        let set = self.tables(hub).await?;
        if self.inner.options.batch_delay.is_zero() {
            return self.write(&set, hub, stream, records).await;
        }
        let (tx, rx) = oneshot::channel();
        let request = AppendRequest {
            records: records.to_vec(),
            reply: tx,
        };
        if self.batcher(&set, hub, stream).send(request).await.is_err() {
            return Err(Error::transient(Self::NAME, "the append batcher stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::transient(Self::NAME, "the append batcher stopped")))
    }

    async fn read(&self, hub: &HubName, from: Position, limit: usize) -> Result<Vec<LogEntry>> {
        self.check_stream(from.stream)?;
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let stream = stream_i32(from.stream)?;
        let offset = to_i64(from.offset, "offset")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let statement = client
            .prepare_cached(&set.sql.read)
            .await
            .map_err(db("preparing a read"))?;
        let mut rows = client
            .query(&statement, &[&hub.as_str(), &stream, &offset, &limit])
            .await
            .map_err(db("reading the log"))?;
        if rows.is_empty() {
            self.create_stream(&set, &client, hub, stream).await?;
            rows = client
                .query(&statement, &[&hub.as_str(), &stream, &offset, &limit])
                .await
                .map_err(db("reading the log"))?;
        }
        let Some(first) = rows.first() else {
            return Err(corrupt("a stream row vanished during a read"));
        };
        let first_offset: i64 = first.try_get(0).map_err(db("reading the log"))?;
        let epoch: i64 = first.try_get(1).map_err(db("reading the log"))?;
        let next_offset: i64 = first.try_get(4).map_err(db("reading the log"))?;
        let bounds = StreamBounds {
            epoch: to_u64(epoch, "epoch")?,
            first: to_u64(first_offset, "offset")?,
            end: to_u64(next_offset, "offset")?,
        };
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let offset: Option<i64> = row.try_get(2).map_err(db("reading the log"))?;
            let Some(offset) = offset else { continue };
            let data: Vec<u8> = row.try_get(3).map_err(db("reading the log"))?;
            entries.push(LogEntry {
                offset: to_u64(offset, "offset")?,
                data: Bytes::from(data),
            });
        }
        checked_read(from, bounds, entries)
    }

    async fn tail(&self, hub: &HubName, stream: u32) -> Result<Position> {
        self.check_stream(stream)?;
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let stream_db = stream_i32(stream)?;
        for _ in 0..2 {
            let row = client
                .query_opt(&set.sql.tail, &[&hub.as_str(), &stream_db])
                .await
                .map_err(db("reading the tail of the log"))?;
            if let Some(row) = row {
                return position(&row, stream, "reading the tail of the log");
            }
            self.create_stream(&set, &client, hub, stream_db).await?;
        }
        Err(corrupt("the stream row vanished"))
    }

    async fn subscribe(&self, hub: &HubName) -> Result<Wakeups> {
        Ok(self.inner.wakeups.subscribe(hub))
    }

    async fn trim(&self, retention: &Retention) -> Result<u64> {
        // One trim of a set at a time, whichever node runs it: the others wait, then find
        // nothing left to delete, so each trim reports what it removed and no two nodes delete
        // the same batches.
        let mut locking = ClosedUnlessReturned(Some(self.client().await?));
        let client = locking.client()?;
        let mut removed = 0;
        for set in self.all_tables(client).await? {
            let key = &set.sql.trim_key;
            client
                .execute(sql::LOCK_TRIMS, &[key])
                .await
                .map_err(db("waiting for another trim"))?;
            removed += trim_set(client, &set, retention).await?;
            client
                .execute(sql::UNLOCK_TRIMS, &[key])
                .await
                .map_err(db("trimming the log"))?;
        }
        locking.give_back();
        Ok(removed)
    }

    async fn register_node(&self, node: &NodeId, address: Option<&str>) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &self.inner.node_sql.register_node,
                &[&node.as_str(), &address],
            )
            .await
            .map_err(db("registering a node"))?;
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId) -> Result<bool> {
        let mut client = self.client().await?;
        let row = client
            .query_one(&self.inner.node_sql.heartbeat, &[&node.as_str()])
            .await
            .map_err(db("writing a heartbeat"))?;
        let count: i64 = row.try_get(0).map_err(db("writing a heartbeat"))?;
        if count > 0 && self.per_hub() {
            for set in self.all_tables(&mut client).await? {
                client
                    .execute(&set.sql.touch_sessions, &[&node.as_str()])
                    .await
                    .map_err(db("writing a heartbeat"))?;
            }
        }
        Ok(count > 0)
    }

    async fn unregister_node(&self, node: &NodeId) -> Result<()> {
        let mut client = self.client().await?;
        if !self.per_hub() {
            client
                .query(&self.inner.node_sql.unregister_node, &[&node.as_str()])
                .await
                .map_err(db("unregistering a node"))?;
            return Ok(());
        }
        let sets = self.all_tables(&mut client).await?;
        let tx = client
            .transaction()
            .await
            .map_err(db("unregistering a node"))?;
        tx.query(&self.inner.node_sql.unregister_node, &[&node.as_str()])
            .await
            .map_err(db("unregistering a node"))?;
        let nodes = [node.as_str()];
        for set in sets {
            tx.query(&set.sql.remove_node_connections, &[&&nodes[..]])
                .await
                .map_err(db("unregistering a node"))?;
        }
        tx.commit().await.map_err(db("unregistering a node"))
    }

    async fn live_nodes(&self) -> Result<Vec<NodeInfo>> {
        let client = self.client().await?;
        let rows = client
            .query(&self.inner.node_sql.live_nodes, &[])
            .await
            .map_err(db("listing nodes"))?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0).map_err(db("listing nodes"))?;
                Ok(NodeInfo {
                    id: name::<NodeId>(&id)?,
                    started_at: row.try_get(1).map_err(db("listing nodes"))?,
                    last_heartbeat: row.try_get(2).map_err(db("listing nodes"))?,
                    address: row.try_get(3).map_err(db("listing nodes"))?,
                })
            })
            .collect()
    }

    async fn reap_nodes(&self, timeout: Duration) -> Result<Vec<NodeId>> {
        let mut client = self.client().await?;
        let timeout = timeout.as_secs_f64();
        if !self.per_hub() {
            // One statement removes the nodes and their connections.
            let rows = client
                .query(&self.inner.node_sql.reap_nodes, &[&timeout])
                .await
                .map_err(db("reaping dead nodes"))?;
            return rows
                .iter()
                .map(|row| {
                    let id: String = row.try_get(0).map_err(db("reaping dead nodes"))?;
                    name::<NodeId>(&id)
                })
                .collect();
        }
        // With tables per hub, the dead nodes' rows go in the same transaction as their
        // connections in every hub's tables, so no connection outlives its node's row.
        let sets = self.all_tables(&mut client).await?;
        let tx = client
            .transaction()
            .await
            .map_err(db("reaping dead nodes"))?;
        let rows = tx
            .query(&self.inner.node_sql.reap_nodes, &[&timeout])
            .await
            .map_err(db("reaping dead nodes"))?;
        let dead: Vec<String> = rows
            .iter()
            .map(|row| row.try_get(0).map_err(db("reaping dead nodes")))
            .collect::<Result<_>>()?;
        // The dead nodes' rows are gone in this transaction: their connections are orphaned,
        // as are those whose insert raced with an earlier reap.
        for set in sets {
            let orphans = remove_orphaned_connections(&self.inner.names.nodes, &set.names);
            tx.query(&orphans, &[])
                .await
                .map_err(db("reaping dead nodes"))?;
        }
        tx.commit().await.map_err(db("reaping dead nodes"))?;
        dead.iter().map(|id| name::<NodeId>(id)).collect()
    }

    async fn add_connection(&self, connection: &ConnectionInfo) -> Result<()> {
        let set = self.tables(&connection.hub).await?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db("registering a connection"))?;
        let user = connection.user.as_ref().map(UserId::as_str);
        let inserted = tx
            .query_opt(
                &set.sql.add_connection,
                &[
                    &connection.hub.as_str(),
                    &connection.id.as_str(),
                    &user,
                    &connection.node.as_str(),
                ],
            )
            .await
            .map_err(db("registering a connection"))?;
        if inserted.is_none() {
            return Err(Error::DuplicateConnection(connection.id.to_string()));
        }
        if let Some(user) = user {
            tx.execute(&set.sql.open_session, &[&connection.hub.as_str(), &user])
                .await
                .map_err(db("opening a user session"))?;
        }
        tx.commit().await.map_err(db("registering a connection"))
    }

    async fn remove_connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        node: &NodeId,
    ) -> Result<Option<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &set.sql.remove_connection,
                &[&hub.as_str(), &connection.as_str(), &node.as_str()],
            )
            .await
            .map_err(db("removing a connection"))?;
        row.as_ref().map(connection_info).transpose()
    }

    async fn connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Option<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&set.sql.connection)
            .await
            .map_err(db("preparing a connection lookup"))?;
        let row = client
            .query_opt(&statement, &[&hub.as_str(), &connection.as_str()])
            .await
            .map_err(db("looking up a connection"))?;
        row.as_ref().map(connection_info).transpose()
    }

    async fn user_connections(&self, hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .query(&set.sql.user_connections, &[&hub.as_str(), &user.as_str()])
            .await
            .map_err(db("listing a user's connections"))?;
        rows.iter().map(connection_info).collect()
    }

    async fn online_users(&self, hub: &HubName) -> Result<Vec<UserId>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .query(&set.sql.online_users, &[&hub.as_str()])
            .await
            .map_err(db("listing online users"))?;
        rows.iter()
            .map(|row| {
                let user: String = row.try_get(0).map_err(db("listing online users"))?;
                name::<UserId>(&user)
            })
            .collect()
    }

    async fn user_session(&self, hub: &HubName, user: &UserId) -> Result<Option<UserSession>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let row = client
            .query_opt(&set.sql.user_session, &[&hub.as_str(), &user.as_str()])
            .await
            .map_err(db("reading a user session"))?;
        let Some(row) = row else { return Ok(None) };
        let e = || db("reading a user session");
        let connections: i32 = row.try_get(3).map_err(e())?;
        Ok(Some(UserSession {
            user: user.clone(),
            started_at: row.try_get(1).map_err(e())?,
            ended_at: row.try_get(2).map_err(e())?,
            connections: u32::try_from(connections).unwrap_or(0),
            last_activity: row.try_get(4).map_err(e())?,
        }))
    }

    async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        match client
            .execute(
                &set.sql.add_member,
                &[&hub.as_str(), &group.as_str(), &connection.as_str()],
            )
            .await
        {
            Ok(rows) => Ok(rows > 0),
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) =>
            {
                Err(Error::UnknownConnection(connection.to_string()))
            }
            Err(err) => Err(db("adding to a group")(err)),
        }
    }

    async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .execute(
                &set.sql.remove_member,
                &[&hub.as_str(), &group.as_str(), &connection.as_str()],
            )
            .await
            .map_err(db("removing from a group"))?;
        Ok(rows > 0)
    }

    async fn group_members(&self, hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .query(&set.sql.group_members, &[&hub.as_str(), &group.as_str()])
            .await
            .map_err(db("listing a group"))?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0).map_err(db("listing a group"))?;
                name::<ConnectionId>(&id)
            })
            .collect()
    }

    async fn connection_groups(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Vec<GroupName>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .query(
                &set.sql.connection_groups,
                &[&hub.as_str(), &connection.as_str()],
            )
            .await
            .map_err(db("listing a connection's groups"))?;
        rows.iter()
            .map(|row| {
                let group: String = row
                    .try_get(0)
                    .map_err(db("listing a connection's groups"))?;
                name::<GroupName>(&group)
            })
            .collect()
    }

    async fn enqueue(&self, message: &NewDurableMessage) -> Result<MessageId> {
        let set = self.tables(&message.hub).await?;
        let client = self.client().await?;
        let sender = message.sender.as_ref().map(ConnectionId::as_str);
        let row = client
            .query_one(
                &set.sql.enqueue,
                &[
                    &message.hub.as_str(),
                    &message.user.as_str(),
                    &sender,
                    &message.payload.as_ref(),
                    &message.ttl.as_secs_f64(),
                ],
            )
            .await
            .map_err(db("storing a durable message"))?;
        let id: i64 = row.try_get(0).map_err(db("storing a durable message"))?;
        Ok(MessageId(to_u64(id, "message id")?))
    }

    async fn pending(&self, hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let rows = client
            .query(&set.sql.pending, &[&hub.as_str(), &user.as_str()])
            .await
            .map_err(db("listing pending messages"))?;
        rows.iter().map(durable_message).collect()
    }

    async fn durable_message(
        &self,
        hub: &HubName,
        id: MessageId,
    ) -> Result<Option<DurableMessage>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let id = to_i64(id.0, "message id")?;
        let row = client
            .query_opt(&set.sql.durable_message, &[&hub.as_str(), &id])
            .await
            .map_err(db("reading a durable message"))?;
        row.as_ref().map(durable_message).transpose()
    }

    async fn acknowledge(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let id = to_i64(id.0, "message id")?;
        let rows = client
            .execute(
                &set.sql.acknowledge,
                &[&hub.as_str(), &id, &connection.as_str()],
            )
            .await
            .map_err(db("acknowledging a message"))?;
        Ok(rows > 0)
    }

    async fn record_attempt(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
        error: Option<&str>,
    ) -> Result<()> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let id = to_i64(id.0, "message id")?;
        match client
            .execute(
                &set.sql.record_attempt,
                &[&hub.as_str(), &id, &connection.as_str(), &error],
            )
            .await
        {
            // A message purged in the meantime has nothing to record against.
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) =>
            {
                Ok(())
            }
            Err(err) => Err(db("recording a delivery attempt")(err)),
            Ok(_) => Ok(()),
        }
    }

    async fn attempts(&self, hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>> {
        let set = self.tables(hub).await?;
        let client = self.client().await?;
        let id = to_i64(id.0, "message id")?;
        let rows = client
            .query(&set.sql.attempts, &[&hub.as_str(), &id])
            .await
            .map_err(db("listing delivery attempts"))?;
        rows.iter()
            .map(|row| {
                let e = || db("listing delivery attempts");
                let connection: String = row.try_get(0).map_err(e())?;
                Ok(DeliveryAttempt {
                    connection: name::<ConnectionId>(&connection)?,
                    at: row.try_get(1).map_err(e())?,
                    error: row.try_get(2).map_err(e())?,
                })
            })
            .collect()
    }

    async fn purge_expired(&self) -> Result<u64> {
        let mut client = self.client().await?;
        let mut purged = 0;
        for set in self.all_tables(&mut client).await? {
            purged += client
                .execute(&set.sql.purge_expired, &[])
                .await
                .map_err(db("purging expired messages"))?;
        }
        Ok(purged)
    }

    async fn pending_count(&self) -> Result<u64> {
        let mut client = self.client().await?;
        let mut pending = 0;
        for set in self.all_tables(&mut client).await? {
            let row = client
                .query_one(&set.sql.pending_count, &[])
                .await
                .map_err(db("counting pending messages"))?;
            let count: i64 = row.try_get(0).map_err(db("counting pending messages"))?;
            pending += to_u64(count, "count")?;
        }
        Ok(pending)
    }
}

#[cfg(feature = "testing")]
/// An append written in a transaction that is still open; see [`PgBackplane::hold_append`].
#[derive(Debug)]
pub struct PgHeldAppend {
    client: tokio_postgres::Client,
    position: Position,
}

#[cfg(feature = "testing")]
impl PgHeldAppend {
    /// The position the held records got.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Commits the transaction.
    ///
    /// # Errors
    ///
    /// The commit failed; the records are then not in the log.
    pub async fn commit(self) -> Result<Position> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(db("committing a held append"))?;
        Ok(self.position)
    }
}

#[cfg(feature = "testing")]
impl PgBackplane {
    /// Appends `records` in a transaction on a connection of its own and leaves it open until
    /// [`PgHeldAppend::commit`]: a slow transaction on demand, for fault tests and drills.
    /// Other appends to the same stream wait for it; readers never see its offsets before the
    /// commit, nor any later offset of the stream.
    ///
    /// # Errors
    ///
    /// The connection or the append failed.
    pub async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<PgHeldAppend> {
        self.check_stream(stream)?;
        // Make sure the stream row exists, so the held statement only updates it.
        self.tail(hub, stream).await?;
        let set = self.tables(hub).await?;
        let (client, connection) = self
            .inner
            .config
            .connect(self.inner.tls.clone())
            .await
            .map_err(db("connecting for a held append"))?;
        tokio::spawn(connection);
        client
            .batch_execute("BEGIN")
            .await
            .map_err(db("starting a held append"))?;
        let count = i64::try_from(records.len()).map_err(|_| corrupt("too many records"))?;
        let data: Vec<&[u8]> = records.iter().map(|r| r.as_ref()).collect();
        let row = client
            .query_one(
                &set.sql.append,
                &[
                    &hub.as_str(),
                    &stream_i32(stream)?,
                    &count,
                    &data,
                    &self.inner.names.channel,
                    &listener::payload(hub, stream),
                ],
            )
            .await
            .map_err(db("writing a held append"))?;
        Ok(PgHeldAppend {
            client,
            position: position(&row, stream, "writing a held append")?,
        })
    }
}
