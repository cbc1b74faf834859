//! Table names, quoting, slugs, and migrations.
//!
//! As in the PostgreSQL driver, the tables come in two parts, each versioned on its own in the
//! migrations table (one row per scope and version): the shared tables (scope `shared`: nodes
//! and the registry of hubs), and table sets (scope `tables` for the set every hub shares, or
//! `hub/{slug}` for a hub's own set with tables per hub).

use backplane_core::schema::{Versions, render};
use backplane_core::{Driver as _, Error, Result};
use tiberius::Query;

use crate::MssqlBackplane;
use crate::conn::{Conn, need};
use crate::error::{INVALID_OBJECT, MssqlTableSetError, corrupt, db, number};
use crate::names::{
    DEFAULT_SET_SCOPE, Names, SetNames, default_slug, quote, quote_literal, slug, table_error,
};
use crate::options::MssqlOptions;
use crate::sql;

/// The migrations of the shared tables, in order.
const SHARED: &[(i32, &str)] = &[
    (1, include_str!("../migrations/shared/0001_init.sql")),
    (
        2,
        include_str!("../migrations/shared/0002_node_address.sql"),
    ),
];

/// The migrations of a table set, in order.
const SET: &[(i32, &str)] = &[(1, include_str!("../migrations/tables/0001_init.sql"))];

const SHARED_SCOPE: &str = "shared";
fn render_shared(sql: &str, options: &MssqlOptions) -> String {
    render(
        sql,
        &[
            ("{schema}", &quote(&options.schema)),
            ("{prefix}", &options.table_prefix.replace(']', "]]")),
        ],
    )
}

fn render_set(sql: &str, options: &MssqlOptions, set: &SetNames) -> String {
    render(
        sql,
        &[
            ("{schema}", &quote(&options.schema)),
            ("{set}", &set.base.replace(']', "]]")),
        ],
    )
}

/// A migration as one batch: its statements and its bookkeeping row, in a transaction.
fn migration_batch(names: &Names, scope: &str, version: i32, body: &str) -> String {
    format!(
        "SET XACT_ABORT ON;\nBEGIN TRANSACTION;\n{body}\nINSERT INTO {} (scope, version) VALUES ({}, {version});\nCOMMIT TRANSACTION;\n",
        names.migrations,
        quote_literal(scope)
    )
}

/// Every migration batch the driver runs for `options`, named `migration-{scope}-{version}`:
/// the shared tables', then the default set's or, with tables per hub, those of a hub named
/// `hub`.
pub(crate) fn migration_batches(options: &MssqlOptions, hub: &str) -> Vec<(String, String)> {
    let names = Names::new(options);
    let set = if options.tables_per_hub {
        SetNames::hub(options, &default_slug(hub))
    } else {
        SetNames::shared(options)
    };
    let shared = SHARED
        .iter()
        .map(|(version, body)| (SHARED_SCOPE, *version, render_shared(body, options)));
    let own = SET.iter().map(|(version, body)| {
        (
            set.scope.as_str(),
            *version,
            render_set(body, options, &set),
        )
    });
    shared
        .chain(own)
        .map(|(scope, version, body)| {
            (
                format!("migration-{scope}-{version}"),
                migration_batch(&names, scope, version, &body),
            )
        })
        .collect()
}

/// The DDL for a schema and prefix, for a DBA to run once where the application may not
/// create tables; with tables per hub, the shared tables only ([`hub_ddl`] gives each hub's).
/// `GO` separates the batches, as `sqlcmd` and SSMS expect.
pub(crate) fn ddl(options: &MssqlOptions) -> String {
    let names = Names::new(options);
    let mut out = format!(
        "-- backplane schema for SQL Server 2016+ / Azure SQL.\n{}\nGO\nIF SCHEMA_ID({}) IS NULL EXEC (N'CREATE SCHEMA {}');\nGO\n{}\nGO\n",
        sql::ENABLE_SNAPSHOT_READS,
        quote_literal(&options.schema),
        quote(&options.schema).replace('\'', "''"),
        sql::migrations_table(&names)
    );
    for (version, body) in SHARED {
        out.push_str(&format!("\n-- migration {SHARED_SCOPE} {version}\n"));
        out.push_str(&migration_batch(
            &names,
            SHARED_SCOPE,
            *version,
            &render_shared(body, options),
        ));
        out.push_str("GO\n");
    }
    if options.tables_per_hub {
        out.push_str(
            "\n-- Every hub has a table set of its own (tables_per_hub): run the DDL of each hub\n-- (MssqlBackplane::hub_ddl) after this.\n",
        );
    } else {
        let set = SetNames::shared(options);
        for (version, body) in SET {
            out.push_str(&format!("\n-- migration {} {version}\n", set.scope));
            out.push_str(&migration_batch(
                &names,
                &set.scope,
                *version,
                &render_set(body, options, &set),
            ));
            out.push_str("GO\n");
        }
    }
    out
}

/// The DDL of one hub's table set with its registry row, for tables per hub.
pub(crate) fn hub_ddl(options: &MssqlOptions, hub: &str) -> Result<String> {
    if !options.tables_per_hub {
        return Err(Error::permanent(
            MssqlBackplane::NAME,
            "hub_ddl is for tables per hub (tables_per_hub=true); by default every hub shares the tables of MssqlBackplane::ddl",
        ));
    }
    options.validate()?;
    let names = Names::new(options);
    let slug = slug(options, hub)?;
    let set = SetNames::hub(options, &slug);
    let mut out = format!(
        "-- The tables of hub {}.\nINSERT INTO {} (hub, slug) VALUES ({}, {});\nGO\n",
        quote_literal(hub),
        names.hubs,
        quote_literal(hub),
        quote_literal(&slug)
    );
    for (version, body) in SET {
        out.push_str(&migration_batch(
            &names,
            &set.scope,
            *version,
            &render_set(body, options, &set),
        ));
        out.push_str("GO\n");
    }
    Ok(out)
}

pub(crate) fn latest_shared() -> i32 {
    SHARED.last().map_or(0, |(v, _)| *v)
}

pub(crate) fn latest_set() -> i32 {
    SET.last().map_or(0, |(v, _)| *v)
}

/// Reads the versions; no migrations table (or no schema) means nothing is applied.
pub(crate) async fn read_versions(conn: &mut Conn, names: &Names) -> Result<Versions> {
    let text = sql::versions(names);
    let mut query = Query::new(text.as_str());
    query.bind(SHARED_SCOPE);
    query.bind(DEFAULT_SET_SCOPE);
    let rows = match conn.try_rows(query).await {
        Ok(rows) => rows,
        Err(err) if number(&err) == Some(INVALID_OBJECT) => return Ok(Versions::default()),
        Err(err) => return Err(db("reading the schema version")(err)),
    };
    let Some(row) = rows.first() else {
        return Ok(Versions::default());
    };
    let context = "reading the schema version";
    Ok(Versions {
        shared: need::<i32>(row, 0, context)?,
        default_set: need::<i32>(row, 1, context)?,
        hub_sets: need::<i32>(row, 2, context)? != 0,
    })
}

/// Whether a migration of this layout is missing.
pub(crate) fn behind(versions: &Versions, per_hub: bool) -> bool {
    versions.behind(per_hub, latest_shared(), latest_set())
}

pub(crate) fn latest_version(per_hub: bool) -> i32 {
    backplane_core::schema::latest_version(per_hub, latest_shared(), latest_set())
}

fn layout_error(options: &MssqlOptions) -> Error {
    table_error(MssqlTableSetError::LayoutMismatch {
        schema: options.schema.clone(),
        prefix: options.table_prefix.clone(),
        tables_per_hub: options.tables_per_hub,
    })
}

/// Fails unless the database has `READ_COMMITTED_SNAPSHOT` on: without it every read and poll
/// waits for the appends in flight.
pub(crate) async fn check_snapshot_reads(conn: &mut Conn) -> Result<()> {
    let context = "checking READ_COMMITTED_SNAPSHOT";
    let rows = conn.rows(Query::new(sql::SNAPSHOT_READS), context).await?;
    let Some(row) = rows.first() else {
        return Err(corrupt("the current database is not in sys.databases"));
    };
    if need::<i32>(row, 0, context)? == 1 {
        return Ok(());
    }
    Err(Error::permanent(
        MssqlBackplane::NAME,
        sql::snapshot_required(need::<&str>(row, 1, context)?),
    ))
}

/// Creates the schema and applies pending migrations under a session app lock, so nodes
/// starting together neither race nor deadlock. `conn` is a connection of its own: the lock
/// goes with the session if this fails half-way.
pub(crate) async fn migrate(conn: &mut Conn, options: &MssqlOptions) -> Result<()> {
    let names = Names::new(options);
    conn.lock_session(&names.lock, "taking the migration lock")
        .await?;
    let outcome = apply(conn, options, &names).await;
    let unlocked = conn
        .unlock_session(&names.lock, "releasing the migration lock")
        .await;
    outcome.and(unlocked)
}

async fn apply(conn: &mut Conn, options: &MssqlOptions, names: &Names) -> Result<()> {
    let mut create = Query::new(sql::CREATE_SCHEMA);
    create.bind(options.schema.as_str());
    conn.rows(create, "creating the schema").await?;
    conn.batch(
        &sql::migrations_table(names),
        "creating the migrations table",
    )
    .await?;
    let versions = read_versions(conn, names).await?;
    if versions.other_layout(options.tables_per_hub) {
        return Err(layout_error(options));
    }
    for (version, body) in SHARED.iter().filter(|(v, _)| *v > versions.shared) {
        let batch = migration_batch(names, SHARED_SCOPE, *version, &render_shared(body, options));
        conn.batch(&batch, "applying a migration").await?;
        tracing::info!(schema = %options.schema, scope = SHARED_SCOPE, version, "applied migration");
    }
    if !options.tables_per_hub {
        let set = SetNames::shared(options);
        for (version, body) in SET.iter().filter(|(v, _)| *v > versions.default_set) {
            let batch = migration_batch(
                names,
                &set.scope,
                *version,
                &render_set(body, options, &set),
            );
            conn.batch(&batch, "applying a migration").await?;
            tracing::info!(schema = %options.schema, scope = %set.scope, version, "applied migration");
        }
    }
    Ok(())
}

/// Checks that the schema exists, in this layout, at the version this driver needs.
pub(crate) async fn check_version(
    conn: &mut Conn,
    names: &Names,
    options: &MssqlOptions,
) -> Result<()> {
    let per_hub = options.tables_per_hub;
    let versions = read_versions(conn, names).await?;
    if versions.other_layout(per_hub) {
        return Err(layout_error(options));
    }
    if behind(&versions, per_hub) {
        return Err(Error::permanent(
            MssqlBackplane::NAME,
            format!(
                "schema {} is at version {}, this driver needs {}: run the DDL from `MssqlBackplane::ddl` or enable create_schema",
                names.schema,
                versions.version(per_hub),
                latest_version(per_hub)
            ),
        ));
    }
    Ok(())
}

async fn hub_state(conn: &mut Conn, names: &Names, hub: &str) -> Result<Option<(String, i32)>> {
    let text = sql::hub_state(names);
    let mut query = Query::new(text.as_str());
    query.bind(hub);
    let rows = conn.rows(query, "looking up a hub's tables").await?;
    rows.first()
        .map(|row| {
            let context = "looking up a hub's tables";
            Ok((
                need::<&str>(row, 0, context)?.to_owned(),
                need::<i32>(row, 1, context)?,
            ))
        })
        .transpose()
}

/// Makes sure `hub`'s table set exists at the latest version: registers the hub and creates or
/// migrates its tables when allowed (in one transaction under the migration lock), or fails
/// with an [`MssqlTableSetError`] naming the hub.
pub(crate) async fn ensure_hub_set(
    conn: &mut Conn,
    options: &MssqlOptions,
    names: &Names,
    hub: &str,
    slug: &str,
) -> Result<()> {
    let changed = |registered: String| {
        table_error(MssqlTableSetError::SlugChanged {
            hub: hub.to_owned(),
            registered,
            slug: slug.to_owned(),
        })
    };
    let applied = match hub_state(conn, names, hub).await? {
        Some((registered, _)) if registered != slug => return Err(changed(registered)),
        Some((_, version)) if version >= latest_set() => return Ok(()),
        state => state.map_or(0, |(_, version)| version),
    };
    if !options.create_schema {
        return Err(table_error(MssqlTableSetError::Missing {
            hub: hub.to_owned(),
            version: applied,
            needed: latest_set(),
        }));
    }
    let outcome = create_hub_set(conn, options, names, hub, slug, changed).await;
    if outcome.is_err() {
        conn.rollback().await;
    }
    outcome
}

async fn create_hub_set(
    conn: &mut Conn,
    options: &MssqlOptions,
    names: &Names,
    hub: &str,
    slug: &str,
    changed: impl Fn(String) -> Error,
) -> Result<()> {
    let rows = conn
        .batch(
            &sql::begin_locked(&names.lock, conn.lock_timeout_ms()),
            "taking the migration lock",
        )
        .await?;
    let granted = rows
        .first()
        .map(|row| need::<i32>(row, 0, "taking the migration lock"))
        .transpose()?
        .unwrap_or(-999);
    if granted < 0 {
        return Err(Error::transient(
            MssqlBackplane::NAME,
            format!("the migration lock was not granted (sp_getapplock returned {granted})"),
        ));
    }
    // Under the lock, what another node committed before is visible.
    let applied = match hub_state(conn, names, hub).await? {
        Some((registered, _)) if registered != slug => return Err(changed(registered)),
        Some((_, version)) => version,
        None => {
            let text = sql::slug_holder(names);
            let mut query = Query::new(text.as_str());
            query.bind(slug);
            let rows = conn.rows(query, "registering a hub").await?;
            if let Some(row) = rows.first() {
                return Err(table_error(MssqlTableSetError::SlugTaken {
                    hub: hub.to_owned(),
                    slug: slug.to_owned(),
                    other: need::<&str>(row, 0, "registering a hub")?.to_owned(),
                }));
            }
            let text = sql::register_hub(names);
            let mut query = Query::new(text.as_str());
            query.bind(hub);
            query.bind(slug);
            conn.rows(query, "registering a hub").await?;
            0
        }
    };
    let set = SetNames::hub(options, slug);
    for (version, body) in SET.iter().filter(|(v, _)| *v > applied) {
        // Nested in the locked transaction: its COMMIT only closes the inner level.
        let batch = migration_batch(
            names,
            &set.scope,
            *version,
            &render_set(body, options, &set),
        );
        conn.batch(&batch, "creating a hub's tables").await?;
        tracing::info!(schema = %options.schema, hub, scope = %set.scope, version, "applied migration");
    }
    conn.batch("COMMIT TRANSACTION", "committing a hub's tables")
        .await?;
    Ok(())
}

/// Every registered hub with its slug and table set version, in hub order.
pub(crate) async fn registered_hubs(
    conn: &mut Conn,
    names: &Names,
) -> Result<Vec<(String, String, i32)>> {
    let text = sql::registered_hubs(names);
    let rows = conn.rows(Query::new(text.as_str()), "listing hubs").await?;
    rows.iter()
        .map(|row| {
            let context = "listing hubs";
            Ok((
                need::<&str>(row, 0, context)?.to_owned(),
                need::<&str>(row, 1, context)?.to_owned(),
                need::<i32>(row, 2, context)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::SLUG_STEM;

    fn options() -> MssqlOptions {
        MssqlOptions::new("h", "u", "p")
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote("Mixed Case"), "[Mixed Case]");
        assert_eq!(quote("a]b"), "[a]]b]");
        assert_eq!(quote("a[b"), "[a[b]");
        assert_eq!(quote_literal("it's"), "N'it''s'");
        assert_eq!(
            quote_literal("'; DROP TABLE x; --"),
            "N'''; DROP TABLE x; --'"
        );
        let set = SetNames::shared(&options().schema("Rt").table_prefix("p_"));
        assert_eq!(set.log, "[Rt].[p_log]");
        let set = SetNames::hub(&options().schema("R]t").table_prefix("p_"), "a]b");
        assert_eq!(set.log, "[R]]t].[p_a]]b_log]");
        assert_eq!(set.scope, "hub/a]b");
    }

    #[test]
    fn ddl_is_rendered_and_quoted() {
        let ddl = ddl(&options().schema("a b").table_prefix("x]_"));
        assert!(ddl.contains("CREATE TABLE [a b].[x]]_log]"), "{ddl}");
        assert!(ddl.contains("CREATE TABLE [a b].[x]]_nodes]"), "{ddl}");
        assert!(ddl.contains("IF SCHEMA_ID(N'a b') IS NULL EXEC (N'CREATE SCHEMA [a b]');"));
        assert!(!ddl.contains("{schema}") && !ddl.contains("{prefix}") && !ddl.contains("{set}"));
        assert!(ddl.contains(
            "INSERT INTO [a b].[x]]_migrations] (scope, version) VALUES (N'shared', 1);"
        ));
        assert!(ddl.contains(
            "INSERT INTO [a b].[x]]_migrations] (scope, version) VALUES (N'tables', 1);"
        ));
        assert_eq!(
            ddl.matches("BEGIN TRANSACTION").count(),
            ddl.matches("COMMIT TRANSACTION").count()
        );
        // Every batch ends with GO on a line of its own.
        assert!(ddl.trim_end().ends_with("GO"));
    }

    #[test]
    fn per_hub_ddl_splits_shared_and_hub_tables() {
        let options = options().schema("rt").tables_per_hub(true);
        let shared = ddl(&options);
        assert!(shared.contains("CREATE TABLE [rt].[hubs]"), "{shared}");
        assert!(!shared.contains("[rt].[log]"), "{shared}");
        let slug = default_slug("Chat");
        let hub = hub_ddl(&options, "Chat").expect("a valid hub");
        assert!(hub.contains(&format!(
            "INSERT INTO [rt].[hubs] (hub, slug) VALUES (N'Chat', N'{slug}');"
        )));
        assert!(
            hub.contains(&format!("CREATE TABLE [rt].[{slug}_log]")),
            "{hub}"
        );
        assert!(
            hub.contains(&format!("VALUES (N'hub/{slug}', 1);")),
            "{hub}"
        );
        assert!(hub_ddl(&options.tables_per_hub(false), "Chat").is_err());
    }

    #[test]
    fn default_slugs_are_safe_distinct_and_short() {
        let long = "x".repeat(64);
        let hubs = ["chat", "Chat", "CHAT", "a.b", "a-b", "a_b", long.as_str()];
        let slugs: Vec<String> = hubs.iter().map(|h| default_slug(h)).collect();
        for (hub, slug) in hubs.iter().zip(&slugs) {
            assert!(slug.len() <= SLUG_STEM + 9, "{hub}: {slug}");
            let options = options().table_prefix("p".repeat(20)).tables_per_hub(true);
            assert_eq!(&super::slug(&options, hub).expect("fits"), slug);
        }
        let mut unique = slugs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), slugs.len(), "{slugs:?}");
        assert!(default_slug("Chat").starts_with("chat_"));
    }

    #[test]
    fn custom_slugs_are_checked() {
        let err = |options: MssqlOptions| match super::slug(&options, "chat") {
            Err(Error::Driver { source, .. }) => *source
                .downcast::<MssqlTableSetError>()
                .expect("a table set error"),
            other => panic!("unexpected {other:?}"),
        };
        assert!(matches!(
            err(options().table_slug(|_| String::new())),
            MssqlTableSetError::EmptySlug { .. }
        ));
        assert!(matches!(
            err(options().table_slug(|h| format!("{h}\t"))),
            MssqlTableSetError::InvalidSlug { .. }
        ));
        match err(options()
            .table_prefix("pre_")
            .table_slug(|_| "s".repeat(113)))
        {
            MssqlTableSetError::NameTooLong { chars, .. } => assert_eq!(chars, 129),
            other => panic!("unexpected {other}"),
        }
        let fits = options()
            .table_prefix("pre_")
            .table_slug(|_| "s".repeat(112));
        assert!(super::slug(&fits, "chat").is_ok());
        let odd = options().table_slug(|h| format!("{h}]'; DROP TABLE x; --ü"));
        let slug = super::slug(&odd, "chat").expect("quoted, so allowed");
        let set = SetNames::hub(&odd, &slug);
        assert!(
            set.log.starts_with("[backplane].[chat]]'; DROP"),
            "{}",
            set.log
        );
    }

    #[test]
    fn lock_and_program_names_fit() {
        let names = Names::new(
            &options()
                .schema("s".repeat(64))
                .table_prefix("p".repeat(20)),
        );
        assert!(names.lock.chars().count() <= 255);
        assert!(names.poller.chars().count() <= 128);
        let other = Names::new(
            &options()
                .schema("s".repeat(64))
                .table_prefix("q".repeat(20)),
        );
        assert_ne!(names.lock, other.lock);
        assert_eq!(Names::new(&options()).poller, "backplane-poller backplane.");
    }
}
