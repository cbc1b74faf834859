//! What the tests need beyond the public API. The conformance suite's factory for PostgreSQL: a fresh schema per case, on the database named by
//! `BACKPLANE_TEST_PG_URL` or on a throwaway cluster this process starts.

use std::str::FromStr;
use std::sync::Arc;

pub use crate::backplane::PgHeldAppend;
use crate::{PgBackplane, PgOptions};
use async_trait::async_trait;
use backplane_core::{Driver as _, HubName, Position, SharedBackplane};
use bytes::Bytes;
use tokio_postgres::NoTls;

use backplane_conformance::{CaseError, Factory, HeldAppend, Namespace, Spec, TestDatabase, WAIT};
use backplane_test_support::{Cluster, PG_URL_VAR, postgres_url, start_cluster};

/// Runs the suite against [`PgBackplane`]. Every namespace is a new schema; cases that stop and
/// start the database get a throwaway cluster of their own.
///
/// The layout comes from the URL (`tables_per_hub=true`) or [`tables_per_hub`](Self::tables_per_hub).
#[derive(Debug, Clone, Default)]
pub struct PgFactory {
    url: Option<String>,
    tables_per_hub: bool,
    restarts: Restarts,
}

/// How the cases that stop and start their database get one to restart.
#[derive(Debug, Clone, Default)]
enum Restarts {
    /// A throwaway cluster of their own (the tests).
    #[default]
    OwnCluster,
    /// The given database, stopped and started by these shell commands.
    Commands { stop: String, start: String },
    /// None: such cases are skipped (a database given by URL, with no way to restart it).
    Skip,
}

/// How a namespace stops and starts its database.
enum Restart {
    /// It cannot: the cases that need it fail.
    No,
    Cluster(Arc<Cluster>),
    Commands {
        stop: String,
        start: String,
    },
    /// It cannot, for this reason: the cases that need it are skipped.
    Skip(String),
}

/// Runs a shell command that stops or starts the database.
async fn shell(what: &str, command: &str) -> Result<(), CaseError> {
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(command).stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || sh.output())
        .await
        .map_err(|e| CaseError::Failed(e.to_string()))?
        .map_err(|e| CaseError::Failed(format!("the {what} command did not run: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(CaseError::Failed(format!(
        "the {what} command failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

impl PgFactory {
    /// Uses `BACKPLANE_TEST_PG_URL` when set, otherwise a throwaway cluster started on first use.
    pub fn from_env() -> Self {
        Self {
            url: std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty()),
            tables_per_hub: false,
            restarts: Restarts::OwnCluster,
        }
    }

    /// Uses the database at `url`. The cases that stop and start their database are skipped
    /// unless [`restart_commands`](Self::restart_commands) says how.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            tables_per_hub: false,
            restarts: Restarts::Skip,
        }
    }

    /// The cases that stop and start their database run these shell commands (`sh -c`) to
    /// stop and to start the server of the given URL, which must then be up again on the same
    /// address.
    pub fn restart_commands(mut self, stop: impl Into<String>, start: impl Into<String>) -> Self {
        self.restarts = Restarts::Commands {
            stop: stop.into(),
            start: start.into(),
        };
        self
    }

    /// The factory for a command-line run against `target`: its database, restarted with its
    /// commands when given.
    ///
    /// # Errors
    ///
    /// None today; the signature is that of every driver's.
    pub fn for_target(target: &TestDatabase<'_>) -> Result<Arc<dyn Factory>, String> {
        let factory = Self::with_url(target.url);
        Ok(Arc::new(match target.restart {
            Some((stop, start)) => factory.restart_commands(stop, start),
            None => factory,
        }))
    }

    /// Gives every hub a table set of its own ([`PgOptions::tables_per_hub`]) in every
    /// namespace, whatever the URL says.
    pub fn tables_per_hub(mut self) -> Self {
        self.tables_per_hub = true;
        self
    }

    async fn shared_url(&self) -> Result<String, String> {
        match &self.url {
            Some(url) => Ok(url.clone()),
            None => postgres_url().await,
        }
    }
}

#[async_trait]
impl Factory for PgFactory {
    fn driver_name(&self) -> &'static str {
        PgBackplane::NAME
    }

    async fn namespace(&self, spec: &Spec) -> Result<Box<dyn Namespace>, String> {
        let (url, restart) = match (&self.restarts, spec.restarts) {
            (_, false) => (self.shared_url().await?, Restart::No),
            (Restarts::OwnCluster, true) => {
                let cluster = start_cluster().await.map_err(|e| {
                    format!("this case restarts its database and needs a throwaway cluster: {e}")
                })?;
                (cluster.url(), Restart::Cluster(Arc::new(cluster)))
            }
            (Restarts::Commands { stop, start }, true) => (
                self.shared_url().await?,
                Restart::Commands {
                    stop: stop.clone(),
                    start: start.clone(),
                },
            ),
            (Restarts::Skip, true) => (
                self.shared_url().await?,
                Restart::Skip(
                    "this case stops and starts the database: say how with --stop-cmd and --start-cmd"
                        .into(),
                ),
            ),
        };
        let id = uuid_suffix();
        let namespace = PgNamespace {
            url,
            schema: if self.tables_per_hub {
                format!("bp_hubs_{id}")
            } else {
                format!("bp_test_{id}")
            },
            streams: spec.streams,
            tables_per_hub: self.tables_per_hub,
            restart,
        };
        Ok(Box::new(namespace))
    }
}

fn uuid_suffix() -> String {
    let mut s = String::new();
    for byte in std::process::id().to_le_bytes().iter().chain(
        &std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes()[..8],
    ) {
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

struct PgNamespace {
    url: String,
    schema: String,
    streams: u32,
    tables_per_hub: bool,
    restart: Restart,
}

impl PgNamespace {
    fn options(&self) -> Result<PgOptions, String> {
        let options = PgOptions::from_str(&self.url)
            .map_err(|e| e.to_string())?
            .schema(self.schema.clone())
            .streams(self.streams)
            .pool_size(4)
            .listener_check(std::time::Duration::from_secs(1));
        // The URL may ask for tables per hub too: only ever turn it on here.
        Ok(if self.tables_per_hub {
            options.tables_per_hub(true)
        } else {
            options
        })
    }

    async fn admin(&self) -> Result<tokio_postgres::Client, String> {
        let options = self.options()?;
        let (client, connection) = options
            .config()
            .connect(NoTls)
            .await
            .map_err(|e| format!("admin connection failed: {e}"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The cluster of its own a namespace has, when it has one.
    fn own_cluster(&self) -> Option<&Arc<Cluster>> {
        match &self.restart {
            Restart::Cluster(cluster) => Some(cluster),
            _ => None,
        }
    }

    /// Stops (`stop`) or starts the database.
    async fn stop_or_start(&self, stop: bool) -> Result<(), CaseError> {
        match &self.restart {
            Restart::No => Err(CaseError::Failed(
                "this namespace has no database of its own to restart".into(),
            )),
            Restart::Skip(reason) => Err(CaseError::Skipped(reason.clone())),
            Restart::Commands { stop: command, .. } if stop => shell("stop", command).await,
            Restart::Commands { start: command, .. } => shell("start", command).await,
            Restart::Cluster(cluster) => {
                let cluster = cluster.clone();
                tokio::task::spawn_blocking(move || {
                    if stop {
                        cluster.stop()
                    } else {
                        cluster.restart()
                    }
                })
                .await
                .map_err(|e| CaseError::Failed(e.to_string()))?
                .map_err(CaseError::Failed)
            }
        }
    }
}

struct PgHeld(PgHeldAppend);

#[async_trait]
impl HeldAppend for PgHeld {
    async fn commit(self: Box<Self>) -> backplane_core::Result<Position> {
        self.0.commit().await
    }
}

#[async_trait]
impl Namespace for PgNamespace {
    async fn backplane(&self) -> Result<SharedBackplane, String> {
        let backplane = PgBackplane::connect_with(self.options()?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(backplane))
    }

    /// Terminates the backends of this namespace's listener connections. A listener that is
    /// reconnecting after an earlier interruption is waited for, within [`WAIT`].
    async fn interrupt_wakeups(&self) -> Result<(), CaseError> {
        let admin = self.admin().await.map_err(CaseError::Failed)?;
        let name = format!("backplane-listener backplane.{}.", self.schema);
        let mut retry = tokio::time::interval(std::time::Duration::from_millis(20));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let rows = admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .await
                .map_err(|e| CaseError::Failed(format!("terminating listeners failed: {e}")))?;
            if !rows.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CaseError::Failed(format!(
                    "no listener connection of this namespace appeared within {WAIT:?}"
                )));
            }
            retry.tick().await;
        }
    }

    async fn stop_database(&self) -> Result<(), CaseError> {
        self.stop_or_start(true).await
    }

    async fn start_database(&self) -> Result<(), CaseError> {
        self.stop_or_start(false).await
    }

    async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: Vec<Bytes>,
    ) -> Result<Box<dyn HeldAppend>, CaseError> {
        let backplane =
            PgBackplane::connect_with(self.options().map_err(CaseError::Failed)?).await?;
        let held = backplane.hold_append(hub, stream, &records).await?;
        Ok(Box::new(PgHeld(held)))
    }

    /// Deletes the stream's last rows and moves its end back in one transaction: the log as a
    /// restored backup has it.
    async fn rewind_log(&self, hub: &HubName, stream: u32, count: u64) -> Result<(), CaseError> {
        let mut admin = self.admin().await.map_err(CaseError::Failed)?;
        let failed = |e: tokio_postgres::Error| {
            let detail = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.to_string());
            CaseError::Failed(format!("rewinding the log failed: {detail}"))
        };
        // The layout and prefix as the driver sees them: the URL may set them too.
        let options = self.options().map_err(CaseError::Failed)?;
        let schema = self.schema.replace('"', "\"\"");
        let prefix = options.get_table_prefix().replace('"', "\"\"");
        let set = if options.get_tables_per_hub() {
            let row = admin
                .query_one(
                    &format!("SELECT slug FROM \"{schema}\".\"{prefix}hubs\" WHERE hub = $1"),
                    &[&hub.as_str()],
                )
                .await
                .map_err(failed)?;
            let slug: String = row.get(0);
            format!("{prefix}{}_", slug.replace('"', "\"\""))
        } else {
            prefix
        };
        let count =
            i64::try_from(count).map_err(|_| CaseError::Failed("count too large".into()))?;
        let stream =
            i32::try_from(stream).map_err(|_| CaseError::Failed("stream too large".into()))?;
        let tx = admin.transaction().await.map_err(failed)?;
        tx.execute(
            &format!(
                "DELETE FROM \"{schema}\".\"{set}log\" l USING \"{schema}\".\"{set}streams\" s
                 WHERE s.hub = $1 AND s.stream = $2 AND l.stream_id = s.id
                   AND l.\"offset\" >= s.next_offset - $3"
            ),
            &[&hub.as_str(), &stream, &count],
        )
        .await
        .map_err(failed)?;
        tx.execute(
            &format!(
                "UPDATE \"{schema}\".\"{set}streams\" SET next_offset = next_offset - $3
                 WHERE hub = $1 AND stream = $2"
            ),
            &[&hub.as_str(), &stream, &count],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)
    }

    async fn drop_namespace(&self) -> Result<(), String> {
        if self.own_cluster().is_some() {
            // The cluster itself goes when the namespace is dropped.
            return Ok(());
        }
        let admin = self.admin().await?;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await
            .map_err(|e| format!("dropping schema {} failed: {e}", self.schema))
    }
}
