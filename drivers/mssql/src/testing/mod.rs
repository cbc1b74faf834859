//! What the tests need beyond the public API: the conformance suite's factory for SQL Server
//! ([`MssqlFactory`]), and the statements it runs on an admin connection.

mod factory;

pub use crate::backplane::MssqlHeldAppend;
pub use factory::{MSSQL_URL_VAR, MssqlFactory, mssql_test_url};

use backplane_core::{Error, Result};
use tiberius::Query;

use crate::MssqlOptions;
use crate::conn;
use crate::error::db;
use crate::sql;

async fn admin(options: &MssqlOptions) -> Result<conn::Conn> {
    conn::Connector::new(options, "backplane-conformance")
        .open()
        .await
        .map_err(db("opening an admin connection"))
}

/// Drops `schema` with every table in it.
pub async fn drop_schema(options: &MssqlOptions, schema: &str) -> Result<()> {
    let mut conn = admin(options).await?;
    let mut query = Query::new(sql::DROP_SCHEMA);
    query.bind(schema);
    conn.rows(query, "dropping a test schema").await?;
    Ok(())
}

/// Kills the sessions named `program` (the pollers of a deployment); returns how many.
///
/// # Errors
///
/// A permanent error naming the permissions when the login lacks `VIEW SERVER STATE` or
/// `ALTER ANY CONNECTION`.
pub async fn kill_sessions(options: &MssqlOptions, program: &str) -> Result<u64> {
    let mut conn = admin(options).await?;
    let mut query = Query::new(sql::KILL_PROGRAM);
    query.bind(program);
    let rows = conn.rows(query, "killing sessions").await?;
    let n = rows
        .first()
        .map(|row| conn::need::<i32>(row, 0, "killing sessions"))
        .transpose()?
        .unwrap_or(0);
    if n < 0 {
        return Err(Error::permanent(
            <crate::MssqlBackplane as backplane_core::Driver>::NAME,
            "the login lacks VIEW SERVER STATE or ALTER ANY CONNECTION, which killing sessions needs",
        ));
    }
    u64::try_from(n).map_err(|_| Error::Corrupt("negative session count".into()))
}
