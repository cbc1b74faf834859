//! Table names, the notification channel, and migrations.

use backplane_core::{Error, Result};
use tokio_postgres::Client;

use crate::error::db;
use crate::options::PgOptions;

/// The migrations, in order. Each runs once, in a transaction with its bookkeeping row.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_init.sql"))];

/// Quotes an identifier: wraps it in double quotes and doubles any quote inside.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A 64-bit FNV-1a hash, stable across processes and versions.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The fully quoted names the driver's statements use.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) schema: String,
    pub(crate) streams: String,
    pub(crate) log: String,
    pub(crate) nodes: String,
    pub(crate) connections: String,
    pub(crate) memberships: String,
    pub(crate) sessions: String,
    pub(crate) messages: String,
    pub(crate) attempts: String,
    pub(crate) migrations: String,
    /// The NOTIFY channel: case-exact, at most 63 bytes.
    pub(crate) channel: String,
    /// The advisory lock key that serializes migrations of this schema and prefix.
    pub(crate) lock_key: i64,
}

impl Names {
    pub(crate) fn new(options: &PgOptions) -> Self {
        let schema = quote(&options.schema);
        let prefix = &options.table_prefix;
        let table = |name: &str| format!("{schema}.{}", quote(&format!("{prefix}{name}")));
        let raw = format!("backplane.{}.{}", options.schema, prefix);
        let channel = if raw.len() <= 63 {
            raw.clone()
        } else {
            format!("backplane.{:016x}", fnv(&raw))
        };
        Self {
            streams: table("streams"),
            log: table("log"),
            nodes: table("nodes"),
            connections: table("connections"),
            memberships: table("memberships"),
            sessions: table("sessions"),
            messages: table("messages"),
            attempts: table("attempts"),
            migrations: table("migrations"),
            channel,
            lock_key: i64::from_le_bytes(fnv(&raw).to_le_bytes()),
            schema,
        }
    }
}

/// Renders a migration's SQL for a schema and prefix.
fn render(sql: &str, options: &PgOptions) -> String {
    // The prefix is placed inside quoted identifiers: escape quotes the way `quote` does.
    sql.replace("{schema}", &quote(&options.schema))
        .replace("{prefix}", &options.table_prefix.replace('"', "\"\""))
}

/// The complete DDL for a schema and prefix, for databases where the application may not
/// create tables: a DBA runs it once.
pub(crate) fn ddl(options: &PgOptions) -> String {
    let names = Names::new(options);
    let mut out = format!(
        "CREATE SCHEMA IF NOT EXISTS {};\n\nCREATE TABLE IF NOT EXISTS {} (\n    version    integer     PRIMARY KEY,\n    applied_at timestamptz NOT NULL DEFAULT now()\n);\n",
        names.schema, names.migrations
    );
    for (version, sql) in MIGRATIONS {
        out.push_str(&format!("\n-- migration {version}\n"));
        out.push_str(&render(sql, options));
        out.push_str(&format!(
            "\nINSERT INTO {} (version) VALUES ({version});\n",
            names.migrations
        ));
    }
    out
}

/// The latest schema version this driver knows.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Creates the schema and applies pending migrations, under an advisory lock so that nodes
/// starting together neither race nor deadlock. `client` must be a connection of its own: the
/// session lock is released when it ends, even if this fails half-way.
pub(crate) async fn migrate(client: &mut Client, options: &PgOptions) -> Result<()> {
    let names = Names::new(options);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&names.lock_key])
        .await
        .map_err(db("taking the migration lock"))?;
    let outcome = apply(client, options, &names).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&names.lock_key])
        .await
        .map_err(db("releasing the migration lock"));
    outcome.and(unlock.map(drop))
}

async fn apply(client: &mut Client, options: &PgOptions, names: &Names) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};
             CREATE TABLE IF NOT EXISTS {} (
                 version    integer     PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
            names.schema, names.migrations
        ))
        .await
        .map_err(db("creating the schema"))?;
    let applied = schema_version(client, names).await?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a migration"))?;
        tx.batch_execute(&render(sql, options))
            .await
            .map_err(db("applying a migration"))?;
        tx.execute(
            &format!("INSERT INTO {} (version) VALUES ($1)", names.migrations),
            &[version],
        )
        .await
        .map_err(db("recording a migration"))?;
        tx.commit().await.map_err(db("committing a migration"))?;
        tracing::info!(schema = %options.schema, version, "applied migration");
    }
    Ok(())
}

/// The highest applied migration, 0 when none.
pub(crate) async fn schema_version(client: &Client, names: &Names) -> Result<i32> {
    let row = match client
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {}", names.migrations),
            &[],
        )
        .await
    {
        Ok(row) => row,
        // No migrations table (or no schema): nothing has been applied.
        Err(err)
            if matches!(
                err.code(),
                Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                    | Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME)
            ) =>
        {
            return Ok(0);
        }
        Err(err) => return Err(db("reading the schema version")(err)),
    };
    row.try_get(0).map_err(db("reading the schema version"))
}

/// Checks that the schema exists at the version this driver needs.
pub(crate) async fn check_version(client: &Client, names: &Names) -> Result<()> {
    let version = schema_version(client, names).await?;
    if version < latest_version() {
        return Err(Error::permanent(
            crate::PgBackplane::NAME,
            format!(
                "schema {} is at version {version}, this driver needs {}: run the DDL from `PgBackplane::ddl` or enable create_schema",
                names.schema,
                latest_version()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> PgOptions {
        PgOptions::from_config(tokio_postgres::Config::new())
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        let names = Names::new(&options().schema("Rt").table_prefix("p_"));
        assert_eq!(names.log, "\"Rt\".\"p_log\"");
    }

    #[test]
    fn channel_fits_and_is_case_exact() {
        let names = Names::new(&options().schema("MySchema"));
        assert_eq!(names.channel, "backplane.MySchema.");
        let long = Names::new(
            &options()
                .schema("s".repeat(40))
                .table_prefix("p".repeat(20)),
        );
        assert!(long.channel.len() <= 63, "{}", long.channel);
        let other = Names::new(
            &options()
                .schema("s".repeat(40))
                .table_prefix("q".repeat(20)),
        );
        assert_ne!(long.channel, other.channel);
        assert_ne!(long.lock_key, other.lock_key);
    }

    #[test]
    fn ddl_quotes_everything() {
        let ddl = ddl(&options().schema("a b").table_prefix("x_"));
        assert!(ddl.contains("CREATE TABLE \"a b\".\"x_log\""), "{ddl}");
        assert!(!ddl.contains("{schema}") && !ddl.contains("{prefix}"));
        assert!(ddl.contains("INSERT INTO \"a b\".\"x_migrations\" (version) VALUES (1);"));
    }
}
