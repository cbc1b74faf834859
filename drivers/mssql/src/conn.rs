//! Connections: opening one (with redirects and the session settings), the pool, and reading
//! rows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backplane_core::{Driver as _, Error, Result};
use tiberius::{Query, Row};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use crate::MssqlOptions;
use crate::error::{corrupt, db};
use crate::sql;

/// A tiberius client over tokio's TCP.
pub(crate) type Tds = tiberius::Client<Compat<TcpStream>>;

/// A connection that knows whether it is still in step with the server: a call that was
/// cancelled or failed at the transport leaves it `broken`, and the pool drops it. So does a
/// session-level lock it may still hold.
pub(crate) struct Conn {
    client: Tds,
    standing: Standing,
    /// How long a lock may keep a statement waiting (`LOCK_TIMEOUT`), below the command timeout.
    lock_timeout_ms: i32,
}

/// What the pool needs to know of a connection before it hands it out again.
#[derive(Debug, Default)]
struct Standing {
    /// A call is unsettled (cancelled halfway) or failed at the transport.
    broken: bool,
    /// Session locks asked for and not released: some may be held.
    session_locks: u32,
    /// The server answered a call with an error: a transaction may be left open (errors at
    /// compile time are not rolled back by `XACT_ABORT`), so it is rolled back before reuse.
    failed: bool,
}

impl Standing {
    /// A call goes out: until it settles, the connection counts as broken.
    fn call_started(&mut self) {
        self.broken = true;
    }

    /// The call came back: in step unless it failed at the transport; `failed` when the server
    /// answered with an error.
    fn call_settled(&mut self, in_step: bool, failed: bool) {
        self.broken = !in_step;
        self.failed |= failed;
    }

    /// A session lock is asked for: from now on it may be held.
    fn lock_asked(&mut self) {
        self.session_locks += 1;
    }

    /// The server refused or released a lock asked for.
    fn lock_gone(&mut self) {
        self.session_locks = self.session_locks.saturating_sub(1);
    }

    /// Why the connection must be closed rather than reused, if it must.
    fn unusable(&self) -> Option<&'static str> {
        if self.broken {
            Some("the connection broke or was interrupted mid-call")
        } else if self.session_locks > 0 {
            Some("the connection may still hold a session lock")
        } else {
            None
        }
    }
}

/// How to open connections: the server, the login and the session's settings.
#[derive(Clone)]
pub(crate) struct Connector {
    config: tiberius::Config,
    connect_timeout: Duration,
    lock_timeout: Duration,
}

impl Connector {
    /// Connections of `options`, named `application` on the server.
    pub(crate) fn new(options: &MssqlOptions, application: &str) -> Self {
        Self {
            config: options.tds_config(application),
            connect_timeout: options.endpoint.connect_timeout,
            lock_timeout: options.lock_timeout(),
        }
    }

    /// Opens a connection, following one redirect (Azure SQL's gateway sends clients to the
    /// node that holds the database), and applies the session settings.
    pub(crate) async fn open(&self) -> Result<Conn, tiberius::error::Error> {
        open(&self.config, self.connect_timeout, self.lock_timeout).await
    }
}

async fn open(
    config: &tiberius::Config,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<Conn, tiberius::error::Error> {
    let settings = sql::session_settings(lock_timeout);
    let lock_timeout_ms = sql::millis(lock_timeout);
    let attempt = async {
        let mut config = config.clone();
        for _ in 0..2 {
            let tcp = TcpStream::connect(config.get_addr()).await?;
            tcp.set_nodelay(true)?;
            match tiberius::Client::connect(config.clone(), tcp.compat_write()).await {
                Ok(mut client) => {
                    client
                        .simple_query(settings.as_str())
                        .await?
                        .into_results()
                        .await?;
                    return Ok(Conn {
                        client,
                        standing: Standing::default(),
                        lock_timeout_ms,
                    });
                }
                Err(tiberius::error::Error::Routing { host, port }) => {
                    config.host(host);
                    config.port(port);
                }
                Err(err) => return Err(err),
            }
        }
        Err(tiberius::error::Error::Protocol(
            "the server redirected the connection more than once".into(),
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(tiberius::error::Error::Io {
            kind: std::io::ErrorKind::TimedOut,
            message: format!("connecting took longer than {timeout:?}"),
        }),
    }
}

impl Conn {
    /// Runs `query` and returns the rows of its first result set (none for statements that
    /// return no rows). The batch may hold several statements.
    pub(crate) async fn rows(
        &mut self,
        query: Query<'_>,
        context: &'static str,
    ) -> Result<Vec<Row>> {
        self.try_rows(query).await.map_err(db(context))
    }

    /// Runs a batch without parameters (DDL, transaction control) as a plain SQL batch, so
    /// `SET` options and transactions it starts stay with the session.
    pub(crate) async fn batch(&mut self, sql: &str, context: &'static str) -> Result<Vec<Row>> {
        self.try_batch(sql).await.map_err(db(context))
    }

    /// Like [`batch`](Self::batch), but hands back the raw error.
    pub(crate) async fn try_batch(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Row>, tiberius::error::Error> {
        self.standing.call_started();
        let outcome = async {
            self.client
                .simple_query(sql)
                .await?
                .into_first_result()
                .await
        }
        .await;
        self.settle(outcome)
    }

    /// Like [`rows`](Self::rows), but hands back the raw error, for callers that map some
    /// server errors to outcomes.
    pub(crate) async fn try_rows(
        &mut self,
        query: Query<'_>,
    ) -> Result<Vec<Row>, tiberius::error::Error> {
        self.standing.call_started();
        let outcome = async {
            query
                .query(&mut self.client)
                .await?
                .into_first_result()
                .await
        }
        .await;
        self.settle(outcome)
    }

    /// Like [`try_rows`](Self::try_rows) for a batch that is one whole transaction (or none),
    /// made by `query` for each attempt: when the server picks it as a deadlock victim (1205)
    /// it rolled all of it back, so it runs again at once (the other transaction holds its
    /// locks no longer than it needs), up to [`DEADLOCK_ATTEMPTS`] times in all.
    pub(crate) async fn try_rows_retrying<'a>(
        &mut self,
        query: impl Fn() -> Query<'a>,
    ) -> Result<Vec<Row>, tiberius::error::Error> {
        let mut attempt = 1;
        loop {
            match self.try_rows(query()).await {
                Err(err) if retry_deadlock(crate::error::number(&err), attempt) => {
                    tracing::debug!(attempt, "deadlock victim; running the transaction again");
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// [`try_rows_retrying`](Self::try_rows_retrying) with errors in the driver's form.
    pub(crate) async fn rows_retrying<'a>(
        &mut self,
        query: impl Fn() -> Query<'a>,
        context: &'static str,
    ) -> Result<Vec<Row>> {
        self.try_rows_retrying(query).await.map_err(db(context))
    }

    /// Marks the connection broken unless the call succeeded or the server answered with an
    /// error: a transport or protocol error leaves it out of step. Until this runs (a call that
    /// was cancelled), it counts as broken.
    fn settle<T>(
        &mut self,
        outcome: Result<T, tiberius::error::Error>,
    ) -> Result<T, tiberius::error::Error> {
        let server_error = matches!(&outcome, Err(tiberius::error::Error::Server(_)));
        self.standing
            .call_settled(outcome.is_ok() || server_error, server_error);
        outcome
    }

    /// How long a statement of this session may wait for a lock, in milliseconds.
    pub(crate) fn lock_timeout_ms(&self) -> i32 {
        self.lock_timeout_ms
    }

    /// Takes the session-level application lock `resource` (`sp_getapplock`), waiting for it
    /// as long as the session's lock timeout. Until [`unlock_session`](Self::unlock_session)
    /// succeeds, the connection counts as holding it: the pool closes it rather than reuse it,
    /// so a call cut short never leaves the lock on a pooled connection.
    ///
    /// # Errors
    ///
    /// A transient error when the lock was not granted in time.
    pub(crate) async fn lock_session(
        &mut self,
        resource: &str,
        context: &'static str,
    ) -> Result<()> {
        self.standing.lock_asked();
        let mut lock = Query::new(sql::LOCK_SESSION);
        lock.bind(resource);
        lock.bind(self.lock_timeout_ms);
        let rows = self.rows(lock, context).await?;
        let granted = rows
            .first()
            .map(|row| need::<i32>(row, 0, context))
            .transpose()?
            .unwrap_or(-999);
        if granted < 0 {
            self.standing.lock_gone();
            return Err(Error::transient(
                crate::MssqlBackplane::NAME,
                format!(
                    "{context}: {resource:?} was not granted (sp_getapplock returned {granted})"
                ),
            ));
        }
        Ok(())
    }

    /// Releases the lock [`lock_session`](Self::lock_session) took.
    pub(crate) async fn unlock_session(
        &mut self,
        resource: &str,
        context: &'static str,
    ) -> Result<()> {
        let mut unlock = Query::new(sql::UNLOCK_SESSION);
        unlock.bind(resource);
        self.rows(unlock, context).await?;
        self.standing.lock_gone();
        Ok(())
    }

    /// Rolls back a transaction this connection may have open; a connection where that fails
    /// is dropped by the pool.
    pub(crate) async fn rollback(&mut self) {
        if self.batch(sql::ROLLBACK, "rolling back").await.is_err() {
            self.standing.call_settled(false, false);
        }
    }

    /// Makes the connection fit for its next user: after a server error, rolls back a
    /// transaction it may have left open. Anything else wrong with it, and it must go.
    async fn reset(&mut self) -> Result<(), &'static str> {
        if let Some(reason) = self.standing.unusable() {
            return Err(reason);
        }
        if self.standing.failed {
            self.try_batch(sql::ROLLBACK)
                .await
                .map_err(|_| "rolling back after an error failed")?;
            self.standing.failed = false;
        }
        Ok(())
    }
}

/// How many times a transaction a deadlock rolled back runs in all.
pub(crate) const DEADLOCK_ATTEMPTS: u32 = 3;

/// Whether attempt `attempt` (from 1) of a one-transaction batch that failed with error
/// `number` runs again.
fn retry_deadlock(number: Option<u32>, attempt: u32) -> bool {
    number == Some(crate::error::DEADLOCK_VICTIM) && attempt < DEADLOCK_ATTEMPTS
}

/// Creates and checks pooled connections.
pub(crate) struct Manager {
    pub(crate) connector: Connector,
}

impl deadpool::managed::Manager for Manager {
    type Type = Conn;
    type Error = tiberius::error::Error;

    async fn create(&self) -> Result<Conn, tiberius::error::Error> {
        self.connector.open().await
    }

    async fn recycle(
        &self,
        conn: &mut Conn,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<tiberius::error::Error> {
        conn.reset()
            .await
            .map_err(deadpool::managed::RecycleError::message)
    }
}

/// The pool.
pub(crate) type Pool = deadpool::managed::Pool<Manager>;

/// A pooled connection.
pub(crate) type Pooled = deadpool::managed::Object<Manager>;

fn missing(column: usize, context: &'static str) -> Error {
    corrupt(format!("column {column} is NULL while {context}"))
}

/// Reads one column of a row, mapping decode errors.
pub(crate) fn get<'a, T: tiberius::FromSql<'a>>(
    row: &'a Row,
    column: usize,
    context: &'static str,
) -> Result<Option<T>> {
    row.try_get::<T, usize>(column).map_err(db(context))
}

/// Reads a column that must not be NULL.
pub(crate) fn need<'a, T: tiberius::FromSql<'a>>(
    row: &'a Row,
    column: usize,
    context: &'static str,
) -> Result<T> {
    get(row, column, context)?.ok_or_else(|| missing(column, context))
}

/// Reads a name stored as UTF-8 bytes (`varbinary`).
pub(crate) fn text_bytes(
    row: &Row,
    column: usize,
    context: &'static str,
) -> Result<Option<String>> {
    get::<&[u8]>(row, column, context)?
        .map(|bytes| {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| corrupt(format!("a stored name is not UTF-8 while {context}")))
        })
        .transpose()
}

/// A time from a column of microseconds since the Unix epoch (`DATEDIFF_BIG`).
pub(crate) fn time(row: &Row, column: usize, context: &'static str) -> Result<Option<SystemTime>> {
    get::<i64>(row, column, context)?
        .map(|micros| {
            u64::try_from(micros)
                .map(|m| UNIX_EPOCH + Duration::from_micros(m))
                .map_err(|_| corrupt(format!("a time before 1970 while {context}")))
        })
        .transpose()
}

/// A time that must not be NULL.
pub(crate) fn need_time(row: &Row, column: usize, context: &'static str) -> Result<SystemTime> {
    time(row, column, context)?.ok_or_else(|| missing(column, context))
}

/// A duration as whole seconds and the remaining milliseconds, each fitting SQL Server's `int`
/// (for `DATEADD`), the seconds capped at about 68 years.
pub(crate) fn seconds_and_millis(duration: Duration) -> (i32, i32) {
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    let millis = i32::try_from(duration.subsec_millis()).unwrap_or(0);
    (secs, millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_cut_short_is_not_reused() {
        let mut standing = Standing::default();
        assert_eq!(standing.unusable(), None);
        standing.call_started();
        assert!(standing.unusable().is_some(), "a call never settled");
        standing.call_settled(true, false);
        assert_eq!(standing.unusable(), None);
        standing.call_started();
        standing.call_settled(false, false);
        assert!(standing.unusable().is_some(), "a transport error");
    }

    #[test]
    fn deadlock_victims_run_again_a_bounded_number_of_times() {
        assert!(retry_deadlock(Some(1205), 1));
        assert!(retry_deadlock(Some(1205), DEADLOCK_ATTEMPTS - 1));
        assert!(!retry_deadlock(Some(1205), DEADLOCK_ATTEMPTS));
        // A lock timeout, a duplicate key, a broken connection: never here.
        assert!(!retry_deadlock(Some(1222), 1));
        assert!(!retry_deadlock(Some(2627), 1));
        assert!(!retry_deadlock(None, 1));
    }

    #[test]
    fn a_server_error_is_remembered_until_the_rollback() {
        let mut standing = Standing::default();
        standing.call_started();
        standing.call_settled(true, true);
        // In step, so reusable, but rolled back first.
        assert_eq!(standing.unusable(), None);
        assert!(standing.failed);
        // A later call that works does not clear it: the transaction may still be open.
        standing.call_started();
        standing.call_settled(true, false);
        assert!(standing.failed);
    }

    #[test]
    fn a_connection_that_may_hold_a_session_lock_is_not_reused() {
        let mut standing = Standing::default();
        // A trim takes its lock, and its future is dropped after the lock came back.
        standing.lock_asked();
        standing.call_started();
        standing.call_settled(true, false);
        assert_eq!(
            standing.unusable(),
            Some("the connection may still hold a session lock")
        );
        // Released: the connection goes back to the pool.
        standing.call_started();
        standing.call_settled(true, false);
        standing.lock_gone();
        assert_eq!(standing.unusable(), None);
        // Two locks, one released.
        standing.lock_asked();
        standing.lock_asked();
        standing.lock_gone();
        assert!(standing.unusable().is_some());
        standing.lock_gone();
        standing.lock_gone();
        assert_eq!(standing.unusable(), None, "never below zero");
    }

    #[test]
    fn durations_split_for_dateadd() {
        assert_eq!(seconds_and_millis(Duration::from_millis(1500)), (1, 500));
        assert_eq!(
            seconds_and_millis(Duration::from_secs(7 * 86_400)),
            (604_800, 0)
        );
        assert_eq!(
            seconds_and_millis(Duration::from_secs(u64::MAX)),
            (i32::MAX, 0)
        );
    }
}
