//! [`MssqlBackplane`]: the [`Backplane`] contract on SQL Server.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backplane_core::batch::{AppendRequest, BatchLimits, Batchers};
use backplane_core::{
    Backplane, ConnectionId, ConnectionInfo, DeliveryAttempt, Driver as _, DurableMessage, Error,
    GroupName, HubName, LogEntry, MessageId, NewDurableMessage, NodeId, NodeInfo, PoolStatus,
    Position, Result, Retention, StreamBounds, UserId, UserSession, Wakeups, checked_read,
};
use bytes::Bytes;
use tiberius::{Query, Row};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conn::{
    self, Conn, Connector, Manager, Pool, Pooled, get, need, need_time, text_bytes, time,
};
use crate::error::{CONSTRAINT_CONFLICT, DUPLICATE_KEY, corrupt, db, db_write, number, pool};
use crate::names::{Names, SetNames};
use crate::options::{MAX_BATCH, MssqlOptions};
use crate::poller::{PollState, Poller};
use crate::schema;
use crate::sql::{self, NodeSql};
use crate::tables::{Layout, PerHub, TableSet};

/// A backplane on SQL Server (2016 and later, Azure SQL Database, Azure SQL Managed Instance,
/// Azure SQL Edge).
///
/// Clones share one pool and one poller, and, with tables per hub, the cache of hubs' table
/// sets. See the crate docs for the tables and how wake-ups work.
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use backplane_core::{Node, NodeOptions};
/// use backplane_mssql::MssqlBackplane;
///
/// # async fn run() -> backplane_core::Result<()> {
/// let backplane = MssqlBackplane::connect(
///     "Server=tcp:db.internal,1433;Database=chat;User Id=app;Password=…;Encrypt=true",
/// )
/// .await?;
/// let node = Node::start(Arc::new(backplane), NodeOptions::new()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MssqlBackplane {
    inner: Arc<MssqlState>,
}

/// What the handles of one backplane share: the pool, the names and statements, the poller,
/// the batchers and the shutdown signal.
pub(crate) struct MssqlState {
    pub(crate) pool: Pool,
    pub(crate) options: MssqlOptions,
    pub(crate) names: Names,
    pub(crate) node_sql: NodeSql,
    pub(crate) layout: Layout,
    /// How held appends (feature `testing`) open a connection of their own.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    connector: Connector,
    poll: Arc<PollState>,
    shutdown: watch::Sender<bool>,
    batchers: Batchers,
}

impl std::fmt::Debug for MssqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MssqlBackplane")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for MssqlState {
    fn drop(&mut self) {
        // Stops the poller and the batchers.
        self.shutdown.send_replace(true);
    }
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| corrupt(format!("{what} {value} does not fit the database")))
}

fn to_u64(value: i64, what: &str) -> Result<u64> {
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

/// A position from a row of `(offset, epoch)` starting at `column`.
fn position(row: &Row, column: usize, stream: u32, context: &'static str) -> Result<Position> {
    let offset = need::<i64>(row, column, context)?;
    let epoch = need::<i64>(row, column + 1, context)?;
    Ok(Position::new(
        stream,
        to_u64(offset, "offset")?,
        to_u64(epoch, "epoch")?,
    ))
}

/// A connection from `(hub, id, user_id, node, connected_at)`.
pub(crate) fn connection_info(row: &Row) -> Result<ConnectionInfo> {
    let context = "decoding a connection";
    Ok(ConnectionInfo {
        hub: name::<HubName>(need::<&str>(row, 0, context)?)?,
        id: name::<ConnectionId>(need::<&str>(row, 1, context)?)?,
        user: text_bytes(row, 2, context)?
            .map(|u| name::<UserId>(&u))
            .transpose()?,
        node: name::<NodeId>(need::<&str>(row, 3, context)?)?,
        connected_at: need_time(row, 4, context)?,
    })
}

/// A durable message from the columns of [`Sql::pending`](crate::sql::Sql).
pub(crate) fn durable_message(row: &Row) -> Result<DurableMessage> {
    let context = "decoding a durable message";
    let acked_by = get::<&str>(row, 7, context)?;
    let acked_at = time(row, 8, context)?;
    Ok(DurableMessage {
        id: MessageId(to_u64(need::<i64>(row, 0, context)?, "message id")?),
        hub: name::<HubName>(need::<&str>(row, 1, context)?)?,
        user: name::<UserId>(
            &text_bytes(row, 2, context)?.ok_or_else(|| corrupt("a message without a user"))?,
        )?,
        sender: get::<&str>(row, 3, context)?
            .map(name::<ConnectionId>)
            .transpose()?,
        payload: Bytes::copy_from_slice(need::<&[u8]>(row, 4, context)?),
        created_at: need_time(row, 5, context)?,
        expires_at: need_time(row, 6, context)?,
        acknowledged: match (acked_by, acked_at) {
            (Some(by), Some(at)) => Some((name::<ConnectionId>(by)?, at)),
            _ => None,
        },
    })
}

/// Entries one trim statement deletes at most, so each stays short whatever the backlog, and
/// below the 5 000 locks at which SQL Server escalates to a lock on the whole table.
const TRIM_BATCH: u32 = 4_000;

/// Expired messages one purge statement deletes at most: with their attempts (by cascade), well
/// below the lock escalation threshold.
const PURGE_BATCH: u32 = 2_000;

/// Trims one table set's streams, one after another: a short transaction moves each stream's
/// start (`secs` and `millis` of age, `max_entries`), then bounded deletes remove what fell
/// below it, none under the stream row's lock, so appends never wait for a long delete.
async fn trim_set(
    conn: &mut Conn,
    set: &TableSet,
    secs: i32,
    millis: i32,
    max_entries: i64,
) -> Result<u64> {
    let streams = conn
        .rows(
            Query::new(set.sql.trim_streams.as_str()),
            "listing streams to trim",
        )
        .await?;
    let ids: Vec<i64> = streams
        .iter()
        .map(|row| need::<i64>(row, 0, "listing streams to trim"))
        .collect::<Result<_>>()?;
    let mut removed = 0;
    for id in ids {
        let mut query = Query::new(set.sql.trim.as_str());
        query.bind(id);
        query.bind(secs);
        query.bind(millis);
        query.bind(max_entries);
        let rows = conn.rows(query, "trimming the log").await?;
        let Some(first) = rows
            .first()
            .map(|row| get::<i64>(row, 0, "trimming the log"))
            .transpose()?
            .flatten()
        else {
            // The stream went meanwhile.
            continue;
        };
        removed += delete_in_batches(
            conn,
            TRIM_BATCH,
            |batch| {
                let mut query = Query::new(set.sql.trim_delete.as_str());
                query.bind(id);
                query.bind(first);
                query.bind(batch);
                query
            },
            "trimming the log",
        )
        .await?;
    }
    Ok(removed)
}

/// Runs a bounded delete (`query` of the batch size, returning `@@ROWCOUNT`) until it deletes
/// fewer than `batch` rows; returns how many went in all.
async fn delete_in_batches<'a>(
    conn: &mut Conn,
    batch: u32,
    query: impl Fn(i64) -> Query<'a>,
    context: &'static str,
) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let rows = conn.rows(query(i64::from(batch)), context).await?;
        let went = count(&rows, context)?;
        deleted += went;
        if went < u64::from(batch) {
            return Ok(deleted);
        }
    }
}

/// The first column of the first row as a count.
fn count(rows: &[Row], context: &'static str) -> Result<u64> {
    let Some(row) = rows.first() else {
        return Ok(0);
    };
    let value = match get::<i64>(row, 0, context) {
        Ok(value) => value,
        // `@@ROWCOUNT` and `int` variables come back as `int`.
        Err(_) => get::<i32>(row, 0, context)?.map(i64::from),
    };
    to_u64(value.unwrap_or(0), "count")
}

impl MssqlBackplane {
    /// Connects with options parsed from an ADO.NET connection string or an `mssql://` URL
    /// (see [`MssqlOptions`]'s `FromStr`).
    ///
    /// # Errors
    ///
    /// An invalid string, an unreachable server, a failed login, missing privileges, or a
    /// schema that could not be created or is too old.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url.parse()?).await
    }

    /// Connects: creates or checks the schema, opens the pool, and starts polling.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with(options: MssqlOptions) -> Result<Self> {
        options.validate()?;
        let names = Names::new(&options);
        let connector = Connector::new(&options, &options.endpoint.application_name);
        let connect_timeout = options.endpoint.connect_timeout;
        if options.create_schema {
            let mut conn = connector
                .open()
                .await
                .map_err(db("connecting to run migrations"))?;
            schema::migrate(&mut conn, &options).await?;
        }
        let pool = Pool::builder(Manager {
            connector: connector.clone(),
        })
        .max_size(options.pool_size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(connect_timeout + Duration::from_secs(5)))
        .build()
        .map_err(|e| Error::permanent(Self::NAME, format!("could not build the pool: {e}")))?;
        {
            let mut conn = pool.get().await.map_err(pool_error)?;
            schema::check_snapshot_reads(&mut conn).await?;
            schema::check_version(&mut conn, &names, &options).await?;
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let poll = Arc::new(PollState::default());
        tokio::spawn(
            Poller {
                connector: Connector::new(&options, &names.poller),
                min: options.poll_min,
                max: options.poll_max,
                state: poll.clone(),
                shutdown: shutdown_rx,
            }
            .run(),
        );
        let layout = if options.tables_per_hub {
            Layout::PerHub(PerHub::default())
        } else {
            Layout::Shared(Arc::new(TableSet::new(SetNames::shared(&options))))
        };
        Ok(Self {
            inner: Arc::new(MssqlState {
                pool,
                node_sql: NodeSql::new(&names),
                batchers: Batchers::new(
                    Self::NAME,
                    BatchLimits {
                        delay: options.batch_delay,
                        max_records: options.max_batch,
                    },
                ),
                options,
                names,
                layout,
                connector,
                poll,
                shutdown,
            }),
        })
    }

    /// The DDL that creates the schema and tables for `options`, in `sqlcmd`/SSMS form (batches
    /// separated by `GO`), for a DBA to run when the application may not create them (with
    /// [`MssqlOptions::create_schema`] set to `false`). With
    /// [`MssqlOptions::tables_per_hub`], the shared tables only; each hub's come from
    /// [`hub_ddl`](Self::hub_ddl).
    pub fn ddl(options: &MssqlOptions) -> String {
        schema::ddl(options)
    }

    /// The DDL of one hub's table set with [`MssqlOptions::tables_per_hub`], for a DBA to run
    /// once per hub after [`ddl`](Self::ddl).
    ///
    /// # Errors
    ///
    /// The options are not for tables per hub, or are invalid, or the hub's slug is unusable.
    pub fn hub_ddl(options: &MssqlOptions, hub: &HubName) -> Result<String> {
        schema::hub_ddl(options, hub.as_str())
    }

    /// The options this backplane was opened with.
    pub fn options(&self) -> &MssqlOptions {
        &self.inner.options
    }

    /// The program name of this deployment's poller connections, as `sys.dm_exec_sessions`
    /// shows it.
    pub fn poller_program_name(&self) -> &str {
        &self.inner.names.poller
    }

    /// The schema version the database is at (see the PostgreSQL driver: the lower of the
    /// shared tables' and the shared set's, or the shared tables' with tables per hub).
    ///
    /// # Errors
    ///
    /// When the database cannot be reached.
    pub async fn schema_version(&self) -> Result<i32> {
        let mut conn = self.conn().await?;
        let versions = schema::read_versions(&mut conn, &self.inner.names).await?;
        Ok(versions.version(self.inner.options.tables_per_hub))
    }

    pub(crate) async fn conn(&self) -> Result<Pooled> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    pub(crate) fn inner(&self) -> &MssqlState {
        &self.inner
    }

    pub(crate) fn from_inner(inner: Arc<MssqlState>) -> Self {
        Self { inner }
    }

    /// Writes `records` to `stream` in one transaction; creates the stream row first when it
    /// is missing.
    pub(crate) async fn write(
        &self,
        set: &TableSet,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<Position> {
        if records.len() > MAX_BATCH {
            // The stream row must exist before the transaction that reserves its offsets (and
            // before this call holds a pooled connection).
            self.tail(hub, stream).await?;
        }
        let mut conn = self.conn().await?;
        let position = if records.len() > MAX_BATCH {
            self.write_chunked(&mut conn, set, hub, stream, records)
                .await?
        } else {
            self.write_one(&mut conn, set, hub, stream, records).await?
        };
        self.inner.poll.appended(hub, stream);
        Ok(position)
    }

    /// One request: [`Sql::append`](crate::sql::Sql::append), the records packed.
    async fn write_one(
        &self,
        conn: &mut Conn,
        set: &TableSet,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<Position> {
        let stream_db = stream_i32(stream)?;
        let count = i64::try_from(records.len()).map_err(|_| corrupt("too many records"))?;
        let packed = sql::Packed::new(records);
        for _ in 0..2 {
            let mut query = Query::new(set.sql.append.as_str());
            query.bind(hub.as_str());
            query.bind(stream_db);
            query.bind(count);
            query.bind(packed.data.as_slice());
            query.bind(packed.ends.as_slice());
            let rows = conn
                .try_rows(query)
                .await
                .map_err(db_write("appending to the log"))?;
            if let Some(row) = rows.first() {
                return position(row, 0, stream, "appending to the log");
            }
            self.create_stream(conn, set, hub, stream_db).await?;
        }
        Err(corrupt("the stream row vanished during an append"))
    }

    /// More records than one request carries: a transaction over several requests, the stream
    /// row locked from the first to the commit.
    async fn write_chunked(
        &self,
        conn: &mut Conn,
        set: &TableSet,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<Position> {
        let stream_db = stream_i32(stream)?;
        let outcome = async {
            conn.batch(
                "SET XACT_ABORT ON; BEGIN TRANSACTION;",
                "starting an append",
            )
            .await?;
            let reserve = set.sql.reserve();
            let mut query = Query::new(reserve.as_str());
            query.bind(hub.as_str());
            query.bind(stream_db);
            query.bind(i64::try_from(records.len()).map_err(|_| corrupt("too many records"))?);
            let rows = conn.rows(query, "appending to the log").await?;
            let row = rows
                .first()
                .ok_or_else(|| corrupt("the stream row vanished during an append"))?;
            let context = "appending to the log";
            let id = need::<i64>(row, 0, context)?;
            let first = position(row, 1, stream, context)?;
            let mut offset = to_i64(first.offset, "offset")?;
            for chunk in records.chunks(MAX_BATCH) {
                let packed = sql::Packed::new(chunk);
                let mut query = Query::new(set.sql.insert_chunk.as_str());
                query.bind(id);
                query.bind(offset);
                query.bind(i64::try_from(chunk.len()).unwrap_or(i64::MAX));
                query.bind(packed.data.as_slice());
                query.bind(packed.ends.as_slice());
                conn.rows(query, "appending to the log").await?;
                offset += i64::try_from(chunk.len()).unwrap_or(i64::MAX);
            }
            conn.try_batch("COMMIT TRANSACTION")
                .await
                .map_err(db_write("committing an append"))?;
            Ok(first)
        }
        .await;
        if outcome.is_err() {
            conn.rollback().await;
        }
        outcome
    }

    async fn create_stream(
        &self,
        conn: &mut Conn,
        set: &TableSet,
        hub: &HubName,
        stream: i32,
    ) -> Result<()> {
        let mut query = Query::new(set.sql.create_stream.as_str());
        query.bind(hub.as_str());
        query.bind(stream);
        query.bind(to_i64(Position::random_epoch(), "epoch")?);
        match conn.try_rows(query).await {
            Ok(_) => Ok(()),
            // Another node made it first.
            Err(err) if number(&err).is_some_and(|n| DUPLICATE_KEY.contains(&n)) => Ok(()),
            Err(err) => Err(db("creating a stream")(err)),
        }
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

    /// Runs a node-wide batch of `node_sql` over every table set, with node id `@P1` and
    /// optionally a duration as `@P1`/`@P2`.
    async fn node_batch<'a>(
        &self,
        build: impl Fn(&NodeSql, &[&SetNames]) -> String,
        bind: impl Fn(&mut Query<'a>),
        context: &'static str,
    ) -> Result<Vec<Row>> {
        let mut conn = self.conn().await?;
        let sets = self.all_tables(&mut conn).await?;
        let names: Vec<&SetNames> = sets.iter().map(|set| &set.names).collect();
        let text = build(&self.inner.node_sql, &names);
        conn.rows_retrying(
            || {
                let mut query = Query::new(text.clone());
                bind(&mut query);
                query
            },
            context,
        )
        .await
    }

    /// Runs `sql` with `hub` and `key` as `@P1` and `@P2` and decodes every row.
    async fn list<T>(
        &self,
        sql: &str,
        hub: &HubName,
        key: Key<'_>,
        context: &'static str,
        decode: impl Fn(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut conn = self.conn().await?;
        let mut query = Query::new(sql);
        query.bind(hub.as_str());
        key.bind(&mut query);
        let rows = conn.rows(query, context).await?;
        rows.iter().map(decode).collect()
    }

    /// Like [`list`](Self::list), for a lookup of at most one row.
    async fn first<T>(
        &self,
        sql: &str,
        hub: &HubName,
        key: Key<'_>,
        context: &'static str,
        decode: impl Fn(&Row) -> Result<T>,
    ) -> Result<Option<T>> {
        let rows = self.list(sql, hub, key, context, decode).await?;
        Ok(rows.into_iter().next())
    }
}

/// The second parameter of a lookup: a name stored as text, or as UTF-8 bytes.
#[derive(Clone, Copy)]
enum Key<'a> {
    Text(&'a str),
    Bytes(&'a str),
    Id(i64),
}

impl<'a> Key<'a> {
    fn bind(self, query: &mut Query<'a>) {
        match self {
            Self::Text(text) => query.bind(text),
            Self::Bytes(text) => query.bind(text.as_bytes()),
            Self::Id(id) => query.bind(id),
        }
    }
}

fn pool_error(err: deadpool::managed::PoolError<tiberius::error::Error>) -> Error {
    pool(err)
}

#[async_trait]
impl Backplane for MssqlBackplane {
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
        if self.inner.options.batch_delay.is_zero() || records.len() > MAX_BATCH {
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
        let mut conn = self.conn().await?;
        let stream = stream_i32(from.stream)?;
        let offset = to_i64(from.offset, "offset")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = || {
            let mut query = Query::new(set.sql.read.as_str());
            query.bind(hub.as_str());
            query.bind(stream);
            query.bind(offset);
            query.bind(limit);
            query
        };
        let mut rows = conn.rows(query(), "reading the log").await?;
        if rows.is_empty() {
            self.create_stream(&mut conn, &set, hub, stream).await?;
            rows = conn.rows(query(), "reading the log").await?;
        }
        let Some(first) = rows.first() else {
            return Err(corrupt("a stream row vanished during a read"));
        };
        let earliest = position(first, 0, from.stream, "reading the log")?;
        let end = need::<i64>(first, 4, "reading the log")?;
        let bounds = StreamBounds {
            epoch: earliest.epoch,
            first: earliest.offset,
            end: to_u64(end, "offset")?,
        };
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(offset) = get::<i64>(row, 2, "reading the log")? else {
                continue;
            };
            entries.push(LogEntry {
                offset: to_u64(offset, "offset")?,
                data: Bytes::copy_from_slice(need::<&[u8]>(row, 3, "reading the log")?),
            });
        }
        checked_read(from, bounds, entries)
    }

    async fn tail(&self, hub: &HubName, stream: u32) -> Result<Position> {
        self.check_stream(stream)?;
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let stream_db = stream_i32(stream)?;
        for _ in 0..2 {
            let mut query = Query::new(set.sql.tail.as_str());
            query.bind(hub.as_str());
            query.bind(stream_db);
            let rows = conn.rows(query, "reading the tail of the log").await?;
            if let Some(row) = rows.first() {
                return position(row, 0, stream, "reading the tail of the log");
            }
            self.create_stream(&mut conn, &set, hub, stream_db).await?;
        }
        Err(corrupt("the stream row vanished"))
    }

    async fn subscribe(&self, hub: &HubName) -> Result<Wakeups> {
        let set = self.tables(hub).await?;
        Ok(self.inner.poll.subscribe(hub, set))
    }

    async fn trim(&self, retention: &Retention) -> Result<u64> {
        let mut conn = self.conn().await?;
        let (secs, millis) = conn::seconds_and_millis(retention.max_age);
        let max_entries = i64::try_from(retention.max_entries).unwrap_or(i64::MAX);
        let mut removed = 0;
        for set in self.all_tables(&mut conn).await? {
            // One trim of a set at a time, whichever node runs it: the others wait, then find
            // nothing left to delete, so each trim reports what it removed.
            conn.lock_session(&set.sql.trim_key, "waiting for another trim")
                .await?;
            removed += trim_set(&mut conn, &set, secs, millis, max_entries).await?;
            conn.unlock_session(&set.sql.trim_key, "trimming the log")
                .await?;
        }
        Ok(removed)
    }

    async fn register_node(&self, node: &NodeId, address: Option<&str>) -> Result<()> {
        let mut conn = self.conn().await?;
        let query = || {
            let mut query = Query::new(self.inner.node_sql.register_node.as_str());
            query.bind(node.as_str());
            query.bind(address);
            query
        };
        conn.rows_retrying(query, "registering a node").await?;
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId) -> Result<bool> {
        let rows = self
            .node_batch(
                NodeSql::heartbeat,
                |q| q.bind(node.as_str()),
                "writing a heartbeat",
            )
            .await?;
        Ok(count(&rows, "writing a heartbeat")? > 0)
    }

    async fn unregister_node(&self, node: &NodeId) -> Result<()> {
        self.node_batch(
            NodeSql::unregister_node,
            |q| q.bind(node.as_str()),
            "unregistering a node",
        )
        .await?;
        Ok(())
    }

    async fn live_nodes(&self) -> Result<Vec<NodeInfo>> {
        let mut conn = self.conn().await?;
        let rows = conn
            .rows(
                Query::new(self.inner.node_sql.live_nodes.as_str()),
                "listing nodes",
            )
            .await?;
        rows.iter()
            .map(|row| {
                let context = "listing nodes";
                Ok(NodeInfo {
                    id: name::<NodeId>(need::<&str>(row, 0, context)?)?,
                    started_at: need_time(row, 1, context)?,
                    last_heartbeat: need_time(row, 2, context)?,
                    address: get::<&str>(row, 3, context)?.map(str::to_owned),
                })
            })
            .collect()
    }

    async fn reap_nodes(&self, timeout: Duration) -> Result<Vec<NodeId>> {
        let (secs, millis) = conn::seconds_and_millis(timeout);
        let rows = self
            .node_batch(
                NodeSql::reap_nodes,
                |q| {
                    q.bind(secs);
                    q.bind(millis);
                },
                "reaping dead nodes",
            )
            .await?;
        rows.iter()
            .map(|row| name::<NodeId>(need::<&str>(row, 0, "reaping dead nodes")?))
            .collect()
    }

    async fn add_connection(&self, connection: &ConnectionInfo) -> Result<()> {
        let set = self.tables(&connection.hub).await?;
        let mut conn = self.conn().await?;
        let mut query = Query::new(set.sql.add_connection.as_str());
        query.bind(connection.hub.as_str());
        query.bind(connection.id.as_str());
        query.bind(connection.user.as_ref().map(|u| u.as_str().as_bytes()));
        query.bind(connection.node.as_str());
        match conn.try_rows(query).await {
            Ok(_) => Ok(()),
            Err(err) if number(&err).is_some_and(|n| DUPLICATE_KEY.contains(&n)) => {
                Err(Error::DuplicateConnection(connection.id.to_string()))
            }
            Err(err) => Err(db("registering a connection")(err)),
        }
    }

    async fn remove_connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        node: &NodeId,
    ) -> Result<Option<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let query = || {
            let mut query = Query::new(set.sql.remove_connection.as_str());
            query.bind(hub.as_str());
            query.bind(connection.as_str());
            query.bind(node.as_str());
            query
        };
        let rows = conn.rows_retrying(query, "removing a connection").await?;
        rows.iter().map(connection_info).next().transpose()
    }

    async fn connection(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Option<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        self.first(
            &set.sql.connection,
            hub,
            Key::Text(connection.as_str()),
            "looking up a connection",
            connection_info,
        )
        .await
    }

    async fn user_connections(&self, hub: &HubName, user: &UserId) -> Result<Vec<ConnectionInfo>> {
        let set = self.tables(hub).await?;
        let mut found = self
            .list(
                &set.sql.user_connections,
                hub,
                Key::Bytes(user.as_str()),
                "listing a user's connections",
                connection_info,
            )
            .await?;
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    async fn online_users(&self, hub: &HubName) -> Result<Vec<UserId>> {
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let mut query = Query::new(set.sql.online_users.as_str());
        query.bind(hub.as_str());
        let rows = conn.rows(query, "listing online users").await?;
        let mut users = rows
            .iter()
            .map(|row| {
                let user = text_bytes(row, 0, "listing online users")?
                    .ok_or_else(|| corrupt("a NULL user among online users"))?;
                name::<UserId>(&user)
            })
            .collect::<Result<Vec<_>>>()?;
        users.sort();
        Ok(users)
    }

    async fn user_session(&self, hub: &HubName, user: &UserId) -> Result<Option<UserSession>> {
        let set = self.tables(hub).await?;
        self.first(
            &set.sql.user_session,
            hub,
            Key::Bytes(user.as_str()),
            "reading a user session",
            |row| {
                let context = "reading a user session";
                Ok(UserSession {
                    user: user.clone(),
                    started_at: need_time(row, 0, context)?,
                    ended_at: time(row, 1, context)?,
                    connections: u32::try_from(need::<i32>(row, 2, context)?).unwrap_or(0),
                    last_activity: need_time(row, 3, context)?,
                })
            },
        )
        .await
    }

    async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let query = || {
            let mut query = Query::new(set.sql.add_member.as_str());
            query.bind(hub.as_str());
            query.bind(group.as_str().as_bytes());
            query.bind(connection.as_str());
            query
        };
        match conn.try_rows_retrying(query).await {
            Ok(rows) => Ok(count(&rows, "adding to a group")? > 0),
            Err(err) if number(&err) == Some(CONSTRAINT_CONFLICT) => {
                Err(Error::UnknownConnection(connection.to_string()))
            }
            // Added by a concurrent call between the check and the insert.
            Err(err) if number(&err).is_some_and(|n| DUPLICATE_KEY.contains(&n)) => Ok(false),
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
        let mut conn = self.conn().await?;
        let query = || {
            let mut query = Query::new(set.sql.remove_member.as_str());
            query.bind(hub.as_str());
            query.bind(group.as_str().as_bytes());
            query.bind(connection.as_str());
            query
        };
        let rows = conn.rows_retrying(query, "removing from a group").await?;
        Ok(count(&rows, "removing from a group")? > 0)
    }

    async fn group_members(&self, hub: &HubName, group: &GroupName) -> Result<Vec<ConnectionId>> {
        let set = self.tables(hub).await?;
        let mut members = self
            .list(
                &set.sql.group_members,
                hub,
                Key::Bytes(group.as_str()),
                "listing a group",
                |row| name::<ConnectionId>(need::<&str>(row, 0, "listing a group")?),
            )
            .await?;
        members.sort();
        Ok(members)
    }

    async fn connection_groups(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
    ) -> Result<Vec<GroupName>> {
        let set = self.tables(hub).await?;
        let mut groups = self
            .list(
                &set.sql.connection_groups,
                hub,
                Key::Text(connection.as_str()),
                "listing a connection's groups",
                |row| {
                    let group = text_bytes(row, 0, "listing a connection's groups")?
                        .ok_or_else(|| corrupt("a NULL group name"))?;
                    name::<GroupName>(&group)
                },
            )
            .await?;
        groups.sort();
        Ok(groups)
    }

    async fn enqueue(&self, message: &NewDurableMessage) -> Result<MessageId> {
        let set = self.tables(&message.hub).await?;
        let mut conn = self.conn().await?;
        let (secs, millis) = conn::seconds_and_millis(message.ttl);
        let mut query = Query::new(set.sql.enqueue.as_str());
        query.bind(message.hub.as_str());
        query.bind(message.user.as_str().as_bytes());
        query.bind(message.sender.as_ref().map(ConnectionId::as_str));
        query.bind(message.payload.as_ref());
        query.bind(secs);
        query.bind(millis);
        let rows = conn.rows(query, "storing a durable message").await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt("storing a durable message returned no id"))?;
        let id = need::<i64>(row, 0, "storing a durable message")?;
        Ok(MessageId(to_u64(id, "message id")?))
    }

    async fn pending(&self, hub: &HubName, user: &UserId) -> Result<Vec<DurableMessage>> {
        let set = self.tables(hub).await?;
        self.list(
            &set.sql.pending,
            hub,
            Key::Bytes(user.as_str()),
            "listing pending messages",
            durable_message,
        )
        .await
    }

    async fn durable_message(
        &self,
        hub: &HubName,
        id: MessageId,
    ) -> Result<Option<DurableMessage>> {
        let set = self.tables(hub).await?;
        self.first(
            &set.sql.durable_message,
            hub,
            Key::Id(to_i64(id.0, "message id")?),
            "reading a durable message",
            durable_message,
        )
        .await
    }

    async fn acknowledge(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
    ) -> Result<bool> {
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let mut query = Query::new(set.sql.acknowledge.as_str());
        query.bind(hub.as_str());
        query.bind(to_i64(id.0, "message id")?);
        query.bind(connection.as_str());
        let rows = conn.rows(query, "acknowledging a message").await?;
        Ok(count(&rows, "acknowledging a message")? > 0)
    }

    async fn record_attempt(
        &self,
        hub: &HubName,
        id: MessageId,
        connection: &ConnectionId,
        error: Option<&str>,
    ) -> Result<()> {
        let set = self.tables(hub).await?;
        let mut conn = self.conn().await?;
        let mut query = Query::new(set.sql.record_attempt.as_str());
        query.bind(hub.as_str());
        query.bind(to_i64(id.0, "message id")?);
        query.bind(connection.as_str());
        query.bind(error);
        match conn.try_rows(query).await {
            // A message purged in the meantime has nothing to record against.
            Err(err) if number(&err) == Some(CONSTRAINT_CONFLICT) => Ok(()),
            Err(err) => Err(db("recording a delivery attempt")(err)),
            Ok(_) => Ok(()),
        }
    }

    async fn attempts(&self, hub: &HubName, id: MessageId) -> Result<Vec<DeliveryAttempt>> {
        let set = self.tables(hub).await?;
        self.list(
            &set.sql.attempts,
            hub,
            Key::Id(to_i64(id.0, "message id")?),
            "listing delivery attempts",
            |row| {
                let context = "listing delivery attempts";
                Ok(DeliveryAttempt {
                    connection: name::<ConnectionId>(need::<&str>(row, 0, context)?)?,
                    at: need_time(row, 1, context)?,
                    error: get::<&str>(row, 2, context)?.map(str::to_owned),
                })
            },
        )
        .await
    }

    async fn purge_expired(&self) -> Result<u64> {
        let mut conn = self.conn().await?;
        let mut purged = 0;
        for set in self.all_tables(&mut conn).await? {
            purged += delete_in_batches(
                &mut conn,
                PURGE_BATCH,
                |batch| {
                    let mut query = Query::new(set.sql.purge_expired.as_str());
                    query.bind(batch);
                    query
                },
                "purging expired messages",
            )
            .await?;
        }
        Ok(purged)
    }

    async fn pending_count(&self) -> Result<u64> {
        let mut conn = self.conn().await?;
        let mut pending = 0;
        for set in self.all_tables(&mut conn).await? {
            let rows = conn
                .rows(
                    Query::new(set.sql.pending_count.as_str()),
                    "counting pending messages",
                )
                .await?;
            pending += count(&rows, "counting pending messages")?;
        }
        Ok(pending)
    }
}

#[cfg(feature = "testing")]
/// An append written in a transaction that is still open; see
/// [`MssqlBackplane::hold_append`].
pub struct MssqlHeldAppend {
    conn: Conn,
    position: Position,
}

#[cfg(feature = "testing")]
impl std::fmt::Debug for MssqlHeldAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MssqlHeldAppend")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "testing")]
impl MssqlHeldAppend {
    /// The position the held records got.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Commits the transaction.
    ///
    /// # Errors
    ///
    /// The commit failed; the records are then not in the log.
    pub async fn commit(mut self) -> Result<Position> {
        self.conn
            .batch("COMMIT TRANSACTION", "committing a held append")
            .await?;
        Ok(self.position)
    }
}

#[cfg(feature = "testing")]
impl MssqlBackplane {
    /// Appends `records` in a transaction on a connection of its own and leaves it open until
    /// [`MssqlHeldAppend::commit`]: a slow transaction on demand, for fault tests and drills.
    /// Other appends to the same stream wait for it.
    ///
    /// # Errors
    ///
    /// The connection or the append failed.
    pub async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: &[Bytes],
    ) -> Result<MssqlHeldAppend> {
        self.check_stream(stream)?;
        if records.is_empty() || records.len() > MAX_BATCH {
            return Err(Error::InvalidMessage(format!(
                "a held append takes 1 to {MAX_BATCH} records"
            )));
        }
        // The stream row must exist, so the held statement only updates it.
        self.tail(hub, stream).await?;
        let set = self.tables(hub).await?;
        let mut conn = self
            .inner
            .connector
            .open()
            .await
            .map_err(db("connecting for a held append"))?;
        conn.batch(
            "SET XACT_ABORT ON; BEGIN TRANSACTION;",
            "starting a held append",
        )
        .await?;
        // The append's own transaction nests in the open one: its COMMIT keeps the outer open.
        let position = self
            .write_one(&mut conn, &set, hub, stream, records)
            .await?;
        Ok(MssqlHeldAppend { conn, position })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiberius::{ColumnData, ColumnType};

    fn text(value: Option<&str>) -> ColumnData<'static> {
        ColumnData::String(value.map(|v| v.to_owned().into()))
    }

    fn bytes(value: Option<&[u8]>) -> ColumnData<'static> {
        ColumnData::Binary(value.map(|v| v.to_vec().into()))
    }

    #[test]
    fn connections_decode() {
        let row = Row::builder()
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("id", ColumnType::NVarchar, text(Some("c-1")))
            .column(
                "user_id",
                ColumnType::BigVarBin,
                bytes(Some("ålice ".as_bytes())),
            )
            .column("node", ColumnType::NVarchar, text(Some("n1")))
            .column(
                "connected_at",
                ColumnType::Int8,
                ColumnData::I64(Some(1_500_000)),
            )
            .build();
        let info = connection_info(&row).expect("decodes");
        assert_eq!(info.hub.as_str(), "chat");
        assert_eq!(info.user.as_ref().map(UserId::as_str), Some("ålice "));
        assert_eq!(
            info.connected_at,
            std::time::UNIX_EPOCH + Duration::from_micros(1_500_000)
        );

        let anonymous = Row::builder()
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("id", ColumnType::NVarchar, text(Some("c-2")))
            .column("user_id", ColumnType::BigVarBin, bytes(None))
            .column("node", ColumnType::NVarchar, text(Some("n1")))
            .column("connected_at", ColumnType::Int8, ColumnData::I64(Some(0)))
            .build();
        assert_eq!(connection_info(&anonymous).expect("decodes").user, None);
    }

    #[test]
    fn bad_rows_are_corrupt_not_panics() {
        let invalid_utf8 = Row::builder()
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("id", ColumnType::NVarchar, text(Some("c-1")))
            .column("user_id", ColumnType::BigVarBin, bytes(Some(&[0xff, 0xfe])))
            .column("node", ColumnType::NVarchar, text(Some("n1")))
            .column("connected_at", ColumnType::Int8, ColumnData::I64(Some(0)))
            .build();
        assert!(matches!(
            connection_info(&invalid_utf8),
            Err(Error::Corrupt(_))
        ));
        let before_1970 = Row::builder()
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("id", ColumnType::NVarchar, text(Some("c-1")))
            .column("user_id", ColumnType::BigVarBin, bytes(None))
            .column("node", ColumnType::NVarchar, text(Some("n1")))
            .column("connected_at", ColumnType::Int8, ColumnData::I64(Some(-1)))
            .build();
        assert!(matches!(
            connection_info(&before_1970),
            Err(Error::Corrupt(_))
        ));
        let null_id = Row::builder()
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("id", ColumnType::NVarchar, text(None))
            .build();
        assert!(matches!(connection_info(&null_id), Err(Error::Corrupt(_))));
        let wrong_type = Row::builder()
            .column("hub", ColumnType::Int4, ColumnData::I32(Some(1)))
            .build();
        assert!(connection_info(&wrong_type).is_err());
    }

    #[test]
    fn durable_messages_decode() {
        let row = Row::builder()
            .column("id", ColumnType::Int8, ColumnData::I64(Some(42)))
            .column("hub", ColumnType::NVarchar, text(Some("chat")))
            .column("user_id", ColumnType::BigVarBin, bytes(Some(b"bob")))
            .column("sender", ColumnType::NVarchar, text(None))
            .column("payload", ColumnType::BigVarBin, bytes(Some(b"")))
            .column("created_at", ColumnType::Int8, ColumnData::I64(Some(1)))
            .column("expires_at", ColumnType::Int8, ColumnData::I64(Some(2)))
            .column("acked_by", ColumnType::NVarchar, text(Some("c-9")))
            .column("acked_at", ColumnType::Int8, ColumnData::I64(Some(3)))
            .build();
        let message = durable_message(&row).expect("decodes");
        assert_eq!(message.id, MessageId(42));
        assert_eq!(message.user.as_str(), "bob");
        assert_eq!(message.sender, None);
        assert!(message.payload.is_empty());
        let (by, at) = message.acknowledged.expect("acknowledged");
        assert_eq!(by.as_str(), "c-9");
        assert_eq!(at, std::time::UNIX_EPOCH + Duration::from_micros(3));
    }

    #[test]
    fn counts_accept_int_and_bigint() {
        let int = Row::builder()
            .column("n", ColumnType::Int4, ColumnData::I32(Some(3)))
            .build();
        let bigint = Row::builder()
            .column("n", ColumnType::Int8, ColumnData::I64(Some(4)))
            .build();
        assert_eq!(count(&[int], "x").expect("int"), 3);
        assert_eq!(count(&[bigint], "x").expect("bigint"), 4);
        assert_eq!(count(&[], "x").expect("no row"), 0);
    }
}
