//! The suite's factory for SQL Server: a fresh schema per case, on the database named by
//! `BACKPLANE_TEST_MSSQL_URL`. No SQL Server can be started by the tests; without the variable
//! the runner reports every case as skipped.

use std::sync::Arc;

use crate::testing::{self, MssqlHeldAppend};
use crate::{MssqlBackplane, MssqlOptions};
use async_trait::async_trait;
use backplane_core::{Driver as _, HubName, Position, SharedBackplane};
use bytes::Bytes;

use backplane_conformance::{CaseError, Factory, HeldAppend, Namespace, Spec, TestDatabase};

/// The environment variable that points the suite at a SQL Server database (an ADO.NET
/// connection string or an `mssql://` URL).
pub const MSSQL_URL_VAR: &str = "BACKPLANE_TEST_MSSQL_URL";

/// The SQL Server database the suite should use, from `BACKPLANE_TEST_MSSQL_URL`; `None` when
/// the variable is unset or empty.
pub fn mssql_test_url() -> Option<String> {
    std::env::var(MSSQL_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Runs the suite against [`MssqlBackplane`]: every namespace is a new schema, dropped after
/// the case. Cases that stop the database are skipped (the suite cannot stop a SQL Server it
/// did not start).
#[derive(Debug, Clone)]
pub struct MssqlFactory {
    url: String,
    tables_per_hub: bool,
}

impl MssqlFactory {
    /// Uses the database at `url` (an ADO.NET connection string or an `mssql://` URL).
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tables_per_hub: false,
        }
    }

    /// Uses the database `BACKPLANE_TEST_MSSQL_URL` names; without one, every namespace fails
    /// with that reason.
    pub fn from_env() -> Self {
        Self::with_url(mssql_test_url().unwrap_or_default())
    }

    /// The factory for a command-line run against `target`.
    ///
    /// # Errors
    ///
    /// Restart commands were given: the suite cannot stop a SQL Server.
    pub fn for_target(target: &TestDatabase<'_>) -> Result<Arc<dyn Factory>, String> {
        target.without_restart(MssqlBackplane::NAME)?;
        Ok(Arc::new(Self::with_url(target.url)))
    }

    /// Gives every hub a table set of its own in every namespace.
    pub fn tables_per_hub(mut self) -> Self {
        self.tables_per_hub = true;
        self
    }
}

#[async_trait]
impl Factory for MssqlFactory {
    fn driver_name(&self) -> &'static str {
        MssqlBackplane::NAME
    }

    async fn namespace(&self, spec: &Spec) -> Result<Box<dyn Namespace>, String> {
        if self.url.trim().is_empty() {
            return Err(format!(
                "no SQL Server to test against: set {MSSQL_URL_VAR}"
            ));
        }
        let base: MssqlOptions = self.url.parse().map_err(|e| format!("{e}"))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let schema = format!(
            "bp_test_{:x}_{:x}",
            std::process::id(),
            nanos & 0xffff_ffff_ffff
        );
        let options = base
            .schema(schema.clone())
            .streams(spec.streams)
            .pool_size(4);
        let options = if self.tables_per_hub {
            options.tables_per_hub(true)
        } else {
            options
        };
        Ok(Box::new(MssqlNamespace {
            options,
            schema,
            poller: Arc::default(),
        }))
    }
}

struct MssqlNamespace {
    options: MssqlOptions,
    schema: String,
    /// The program name of this namespace's pollers, once a backplane is open.
    poller: Arc<std::sync::OnceLock<String>>,
}

struct MssqlHeld(MssqlHeldAppend);

#[async_trait]
impl HeldAppend for MssqlHeld {
    async fn commit(self: Box<Self>) -> backplane_core::Result<Position> {
        self.0.commit().await
    }
}

#[async_trait]
impl Namespace for MssqlNamespace {
    async fn backplane(&self) -> Result<SharedBackplane, String> {
        let backplane = MssqlBackplane::connect_with(self.options.clone())
            .await
            .map_err(|e| e.to_string())?;
        let _ = self.poller.set(backplane.poller_program_name().to_owned());
        Ok(Arc::new(backplane))
    }

    /// Kills the namespace's polling sessions (needs `ALTER ANY CONNECTION` and
    /// `VIEW SERVER STATE`; without them the case is skipped, with the reason).
    async fn interrupt_wakeups(&self) -> Result<(), CaseError> {
        let Some(program) = self.poller.get() else {
            return Err(CaseError::Failed(
                "no backplane of this namespace is open".into(),
            ));
        };
        match testing::kill_sessions(&self.options, program).await {
            Ok(0) => Err(CaseError::Failed(format!(
                "no session named {program:?} was found to interrupt"
            ))),
            Ok(_) => Ok(()),
            Err(err) => Err(CaseError::Skipped(format!(
                "killing the polling sessions failed (the login needs ALTER ANY CONNECTION and VIEW SERVER STATE): {err}"
            ))),
        }
    }

    async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: Vec<Bytes>,
    ) -> Result<Box<dyn HeldAppend>, CaseError> {
        let backplane = MssqlBackplane::connect_with(self.options.clone()).await?;
        let held = backplane.hold_append(hub, stream, &records).await?;
        Ok(Box::new(MssqlHeld(held)))
    }

    async fn drop_namespace(&self) -> Result<(), String> {
        testing::drop_schema(&self.options, &self.schema)
            .await
            .map_err(|e| format!("dropping schema {} failed: {e}", self.schema))
    }
}
