//! Table names, slugs, the notification channel, and migrations.
//!
//! The tables come in two parts, each versioned on its own in the migrations table (one row per
//! scope and version):
//!
//! - the shared tables (scope `shared`): nodes and the registry of hubs, once per schema and
//!   prefix;
//! - table sets (streams, log, connections, memberships, sessions, messages, attempts): one for
//!   every hub (scope `tables`, named `{prefix}streams` and so on), or, with tables per hub, one
//!   per hub (scope `hub/{slug}`, named `{prefix}{slug}_streams` and so on), created on the
//!   hub's first use.

use backplane_core::schema::{Versions, default_table_slug, render, stable_hash};
use backplane_core::{Driver as _, Error, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use crate::PgBackplane;
use crate::error::{PgTableSetError, db};
use crate::options::PgOptions;

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

/// The scope of the shared tables' migrations.
const SHARED_SCOPE: &str = "shared";

/// The scope of the table set every hub shares by default.
const DEFAULT_SET_SCOPE: &str = "tables";

/// The scope of a hub's table set: `hub/` and its slug (the statements below build the same).
fn hub_scope(slug: &str) -> String {
    format!("hub/{slug}")
}

/// PostgreSQL's limit on identifiers, in bytes.
pub(crate) const MAX_IDENTIFIER: usize = 63;

/// The longest table name suffix of a set (`connections` is as long).
const LONGEST_TABLE: &str = "memberships";

/// The bytes of a hub name the default slug keeps, before its hash: with the longest prefix
/// (20 bytes), `_`, 8 hex digits, `_` and the longest table name, a table name is 63 bytes.
pub(crate) const SLUG_STEM: usize = 22;

/// Quotes an identifier: wraps it in double quotes and doubles any quote inside.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal, as PostgreSQL's `quote_literal`: quotes doubled, and backslashes
/// doubled in an `E''` literal when there are any, so it reads the same whatever
/// `standard_conforming_strings` says.
pub(crate) fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// The default slug of a hub: the name lowercased, every character outside `[a-z0-9_]` turned
/// into `_`, cut to [`SLUG_STEM`] bytes, then `_` and 8 hex digits of a hash of the exact name,
/// so names that differ only in case or past the cut still get tables of their own.
pub(crate) fn default_slug(hub: &str) -> String {
    default_table_slug(hub, SLUG_STEM)
}

/// The slug of `hub`'s table set under `options`, checked: not empty, no control characters,
/// and every table name within PostgreSQL's limit.
pub(crate) fn slug(options: &PgOptions, hub: &str) -> Result<String> {
    let slug = match &options.table_slug {
        Some(custom) => custom.slug(hub),
        None => default_slug(hub),
    };
    let fail = |err: PgTableSetError| Err(Error::permanent(PgBackplane::NAME, err));
    if slug.is_empty() {
        return fail(PgTableSetError::EmptySlug {
            hub: hub.to_owned(),
        });
    }
    if slug.chars().any(char::is_control) {
        return fail(PgTableSetError::InvalidSlug {
            hub: hub.to_owned(),
            slug,
        });
    }
    let longest = format!("{}{slug}_{LONGEST_TABLE}", options.table_prefix);
    if longest.len() > MAX_IDENTIFIER {
        return fail(PgTableSetError::NameTooLong {
            hub: hub.to_owned(),
            bytes: longest.len(),
            table: longest,
        });
    }
    Ok(slug)
}

/// The fully quoted names of the shared tables, and what else is one per schema and prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) schema: String,
    pub(crate) nodes: String,
    pub(crate) hubs: String,
    pub(crate) migrations: String,
    /// The NOTIFY channel: case-exact, at most 63 bytes.
    pub(crate) channel: String,
    /// The advisory lock key that serializes migrations and table set creation of this schema
    /// and prefix.
    pub(crate) lock_key: i64,
}

impl Names {
    pub(crate) fn new(options: &PgOptions) -> Self {
        let schema = quote(&options.schema);
        let prefix = &options.table_prefix;
        let table = |name: &str| format!("{schema}.{}", quote(&format!("{prefix}{name}")));
        let raw = format!("backplane.{}.{}", options.schema, prefix);
        let channel = if raw.len() <= MAX_IDENTIFIER {
            raw.clone()
        } else {
            format!("backplane.{:016x}", stable_hash(&raw))
        };
        Self {
            nodes: table("nodes"),
            hubs: table("hubs"),
            migrations: table("migrations"),
            channel,
            lock_key: i64::from_le_bytes(stable_hash(&raw).to_le_bytes()),
            schema,
        }
    }
}

/// The fully quoted names of one table set, and the scope its migrations are recorded under.
#[derive(Debug, Clone)]
pub(crate) struct SetNames {
    pub(crate) scope: String,
    /// The table name prefix of the set, unquoted.
    pub(crate) base: String,
    pub(crate) streams: String,
    pub(crate) log: String,
    pub(crate) connections: String,
    pub(crate) memberships: String,
    pub(crate) sessions: String,
    pub(crate) messages: String,
    pub(crate) attempts: String,
}

impl SetNames {
    /// The set every hub shares (the default layout).
    pub(crate) fn shared(options: &PgOptions) -> Self {
        Self::with(
            options,
            DEFAULT_SET_SCOPE.to_owned(),
            options.table_prefix.clone(),
        )
    }

    /// The set of the hub whose slug is `slug` (tables per hub).
    pub(crate) fn hub(options: &PgOptions, slug: &str) -> Self {
        Self::with(
            options,
            hub_scope(slug),
            format!("{}{slug}_", options.table_prefix),
        )
    }

    fn with(options: &PgOptions, scope: String, base: String) -> Self {
        let schema = quote(&options.schema);
        let table = |name: &str| format!("{schema}.{}", quote(&format!("{base}{name}")));
        Self {
            scope,
            streams: table("streams"),
            log: table("log"),
            connections: table("connections"),
            memberships: table("memberships"),
            sessions: table("sessions"),
            messages: table("messages"),
            attempts: table("attempts"),
            base,
        }
    }
}

/// Renders a shared migration for a schema and prefix. The prefix is placed inside quoted
/// identifiers: its quotes are doubled the way `quote` does.
fn render_shared(sql: &str, options: &PgOptions) -> String {
    render(
        sql,
        &[
            ("{schema}", &quote(&options.schema)),
            ("{prefix}", &options.table_prefix.replace('"', "\"\"")),
        ],
    )
}

/// Renders a table set migration.
fn render_set(sql: &str, options: &PgOptions, set: &SetNames) -> String {
    render(
        sql,
        &[
            ("{schema}", &quote(&options.schema)),
            ("{set}", &set.base.replace('"', "\"\"")),
        ],
    )
}

fn migrations_table(names: &Names) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    scope      text        COLLATE \"C\" NOT NULL,\n    version    integer     NOT NULL,\n    applied_at timestamptz NOT NULL DEFAULT now(),\n    PRIMARY KEY (scope, version)\n);\n",
        names.migrations
    )
}

/// The DDL of migrations `list` for `scope`, each followed by its bookkeeping row.
fn ddl_of(
    out: &mut String,
    names: &Names,
    scope: &str,
    list: &[(i32, &str)],
    render: impl Fn(&str) -> String,
) {
    for (version, sql) in list {
        out.push_str(&format!("\n-- migration {scope} {version}\n"));
        out.push_str(&render(sql));
        out.push_str(&format!(
            "\nINSERT INTO {} (scope, version) VALUES ({}, {version});\n",
            names.migrations,
            quote_literal(scope)
        ));
    }
}

/// The DDL for a schema and prefix, for databases where the application may not create tables:
/// a DBA runs it once. By default it holds every table; with tables per hub, the shared ones,
/// and [`hub_ddl`] gives each hub's.
pub(crate) fn ddl(options: &PgOptions) -> String {
    let names = Names::new(options);
    let mut out = format!(
        "CREATE SCHEMA IF NOT EXISTS {};\n\n{}",
        names.schema,
        migrations_table(&names)
    );
    ddl_of(&mut out, &names, SHARED_SCOPE, SHARED, |sql| {
        render_shared(sql, options)
    });
    if options.tables_per_hub {
        out.push_str(
            "\n-- Every hub has a table set of its own (tables_per_hub): run the DDL of each hub\n-- (PgBackplane::hub_ddl) after this.\n",
        );
    } else {
        let set = SetNames::shared(options);
        ddl_of(&mut out, &names, &set.scope, SET, |sql| {
            render_set(sql, options, &set)
        });
    }
    out
}

/// The DDL of one hub's table set, with its registry row, for tables per hub: a DBA runs it
/// once per hub, after [`ddl`]. The registry row comes first, so a slug another hub has fails
/// before any table is made.
pub(crate) fn hub_ddl(options: &PgOptions, hub: &str) -> Result<String> {
    if !options.tables_per_hub {
        return Err(Error::permanent(
            PgBackplane::NAME,
            "hub_ddl is for tables per hub (tables_per_hub=true); by default every hub shares the tables of PgBackplane::ddl",
        ));
    }
    options.validate()?;
    let names = Names::new(options);
    let slug = slug(options, hub)?;
    let set = SetNames::hub(options, &slug);
    let mut out = format!(
        "-- The tables of hub {}.\nINSERT INTO {} (hub, slug) VALUES ({}, {});\n",
        quote_literal(hub),
        names.hubs,
        quote_literal(hub),
        quote_literal(&slug)
    );
    ddl_of(&mut out, &names, &set.scope, SET, |sql| {
        render_set(sql, options, &set)
    });
    Ok(out)
}

/// The latest version of the shared tables.
pub(crate) fn latest_shared() -> i32 {
    SHARED.last().map_or(0, |(v, _)| *v)
}

/// The latest version of a table set.
pub(crate) fn latest_set() -> i32 {
    SET.last().map_or(0, |(v, _)| *v)
}

/// Reads the versions; no migrations table (or no schema) means nothing is applied.
pub(crate) async fn read_versions(client: &impl GenericClient, names: &Names) -> Result<Versions> {
    let sql = format!(
        "SELECT coalesce(max(version) FILTER (WHERE scope = $1), 0),
                coalesce(max(version) FILTER (WHERE scope = $2), 0),
                EXISTS (SELECT 1 FROM {m} WHERE scope LIKE 'hub/%')
         FROM {m}",
        m = names.migrations
    );
    let row = match client
        .query_one(&sql, &[&SHARED_SCOPE, &DEFAULT_SET_SCOPE])
        .await
    {
        Ok(row) => row,
        Err(err)
            if matches!(
                err.code(),
                Some(&SqlState::UNDEFINED_TABLE) | Some(&SqlState::INVALID_SCHEMA_NAME)
            ) =>
        {
            return Ok(Versions::default());
        }
        Err(err) => return Err(db("reading the schema version")(err)),
    };
    let e = || db("reading the schema version");
    Ok(Versions {
        shared: row.try_get(0).map_err(e())?,
        default_set: row.try_get(1).map_err(e())?,
        hub_sets: row.try_get(2).map_err(e())?,
    })
}

/// Whether a migration of this layout is missing.
pub(crate) fn behind(versions: &Versions, per_hub: bool) -> bool {
    versions.behind(per_hub, latest_shared(), latest_set())
}

/// The schema version this driver needs for the layout of `options`.
pub(crate) fn latest_version(per_hub: bool) -> i32 {
    backplane_core::schema::latest_version(per_hub, latest_shared(), latest_set())
}

/// An error for tables of the other layout under this schema and prefix: nodes of both
/// layouts would share the nodes table, and each would reap only its own connections.
fn layout_error(options: &PgOptions) -> Error {
    Error::permanent(
        PgBackplane::NAME,
        PgTableSetError::LayoutMismatch {
            schema: options.schema.clone(),
            prefix: options.table_prefix.clone(),
            tables_per_hub: options.tables_per_hub,
        },
    )
}

/// Creates the schema and applies pending migrations of the shared tables (and, by default, of
/// the table set every hub shares), under an advisory lock so that nodes starting together
/// neither race nor deadlock. `client` must be a connection of its own: the session lock is
/// released when it ends, even if this fails half-way.
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
            "CREATE SCHEMA IF NOT EXISTS {};\n{}",
            names.schema,
            migrations_table(names)
        ))
        .await
        .map_err(db("creating the schema"))?;
    let versions = read_versions(client, names).await?;
    if versions.other_layout(options.tables_per_hub) {
        return Err(layout_error(options));
    }
    for (version, sql) in SHARED.iter().filter(|(v, _)| *v > versions.shared) {
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a migration"))?;
        tx.batch_execute(&render_shared(sql, options))
            .await
            .map_err(db("applying a migration"))?;
        record(&tx, names, SHARED_SCOPE, *version).await?;
        tx.commit().await.map_err(db("committing a migration"))?;
        tracing::info!(schema = %options.schema, scope = SHARED_SCOPE, version, "applied migration");
    }
    if !options.tables_per_hub {
        let set = SetNames::shared(options);
        for (version, sql) in SET.iter().filter(|(v, _)| *v > versions.default_set) {
            let tx = client
                .transaction()
                .await
                .map_err(db("starting a migration"))?;
            tx.batch_execute(&render_set(sql, options, &set))
                .await
                .map_err(db("applying a migration"))?;
            record(&tx, names, &set.scope, *version).await?;
            tx.commit().await.map_err(db("committing a migration"))?;
            tracing::info!(schema = %options.schema, scope = %set.scope, version, "applied migration");
        }
    }
    Ok(())
}

/// Writes a migration's bookkeeping row.
async fn record(
    client: &impl GenericClient,
    names: &Names,
    scope: &str,
    version: i32,
) -> Result<()> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (scope, version) VALUES ($1, $2)",
                names.migrations
            ),
            &[&scope, &version],
        )
        .await
        .map_err(db("recording a migration"))?;
    Ok(())
}

/// Checks that the schema exists, in this layout, at the version this driver needs.
pub(crate) async fn check_version(
    client: &impl GenericClient,
    names: &Names,
    options: &PgOptions,
) -> Result<()> {
    let per_hub = options.tables_per_hub;
    let versions = read_versions(client, names).await?;
    if versions.other_layout(per_hub) {
        return Err(layout_error(options));
    }
    if behind(&versions, per_hub) {
        return Err(Error::permanent(
            PgBackplane::NAME,
            format!(
                "schema {} is at version {}, this driver needs {}: run the DDL from `PgBackplane::ddl` or enable create_schema",
                names.schema,
                versions.version(per_hub),
                latest_version(per_hub)
            ),
        ));
    }
    Ok(())
}

/// A hub's registry row: its slug and the version of its table set, if it has one.
async fn hub_state(
    client: &impl GenericClient,
    names: &Names,
    hub: &str,
) -> Result<Option<(String, i32)>> {
    let sql = format!(
        "SELECT h.slug, (SELECT coalesce(max(m.version), 0) FROM {m} m
                         WHERE m.scope = 'hub/' || h.slug)
         FROM {h} h WHERE h.hub = $1",
        m = names.migrations,
        h = names.hubs
    );
    let row = client
        .query_opt(&sql, &[&hub])
        .await
        .map_err(db("looking up a hub's tables"))?;
    row.map(|row| {
        let e = || db("looking up a hub's tables");
        Ok((row.try_get(0).map_err(e())?, row.try_get(1).map_err(e())?))
    })
    .transpose()
}

/// Makes sure `hub`'s table set, named with `slug`, exists at the latest version: registers the
/// hub and creates or migrates its tables when allowed (in one transaction under the migration
/// lock, so nodes using a new hub together neither race nor deadlock), or fails with a
/// [`PgTableSetError`] naming the hub.
///
/// Cancel safe: the transaction rolls back, and its lock goes with it, when dropped.
pub(crate) async fn ensure_hub_set(
    client: &mut Client,
    options: &PgOptions,
    names: &Names,
    hub: &str,
    slug: &str,
) -> Result<()> {
    let table_error = |err: PgTableSetError| Error::permanent(PgBackplane::NAME, err);
    let changed = |registered: String| {
        table_error(PgTableSetError::SlugChanged {
            hub: hub.to_owned(),
            registered,
            slug: slug.to_owned(),
        })
    };
    let applied = match hub_state(client, names, hub).await? {
        Some((registered, _)) if registered != slug => return Err(changed(registered)),
        Some((_, version)) if version >= latest_set() => return Ok(()),
        state => state.map_or(0, |(_, version)| version),
    };
    if !options.create_schema {
        return Err(table_error(PgTableSetError::Missing {
            hub: hub.to_owned(),
            version: applied,
            needed: latest_set(),
        }));
    }
    let tx = client
        .transaction()
        .await
        .map_err(db("starting a hub's tables"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&names.lock_key])
        .await
        .map_err(db("taking the migration lock"))?;
    // Under the lock, what another node did before is visible (each statement of a READ
    // COMMITTED transaction sees what committed before it began).
    let applied = match hub_state(&tx, names, hub).await? {
        Some((registered, _)) if registered != slug => return Err(changed(registered)),
        Some((_, version)) => version,
        None => {
            let holder = tx
                .query_opt(
                    &format!("SELECT hub FROM {} WHERE slug = $1", names.hubs),
                    &[&slug],
                )
                .await
                .map_err(db("registering a hub"))?;
            if let Some(holder) = holder {
                return Err(table_error(PgTableSetError::SlugTaken {
                    hub: hub.to_owned(),
                    slug: slug.to_owned(),
                    other: holder.try_get(0).map_err(db("registering a hub"))?,
                }));
            }
            tx.execute(
                &format!("INSERT INTO {} (hub, slug) VALUES ($1, $2)", names.hubs),
                &[&hub, &slug],
            )
            .await
            .map_err(db("registering a hub"))?;
            0
        }
    };
    let set = SetNames::hub(options, slug);
    for (version, sql) in SET.iter().filter(|(v, _)| *v > applied) {
        tx.batch_execute(&render_set(sql, options, &set))
            .await
            .map_err(db("creating a hub's tables"))?;
        record(&tx, names, &set.scope, *version).await?;
        tracing::info!(schema = %options.schema, hub, scope = %set.scope, version, "applied migration");
    }
    tx.commit().await.map_err(db("committing a hub's tables"))
}

/// Every registered hub with its slug and table set version, in hub order.
pub(crate) async fn registered_hubs(
    client: &impl GenericClient,
    names: &Names,
) -> Result<Vec<(String, String, i32)>> {
    let sql = format!(
        "SELECT h.hub, h.slug, coalesce(max(m.version), 0)
         FROM {h} h LEFT JOIN {m} m ON m.scope = 'hub/' || h.slug
         GROUP BY h.hub, h.slug ORDER BY h.hub",
        m = names.migrations,
        h = names.hubs
    );
    let rows = client.query(&sql, &[]).await.map_err(db("listing hubs"))?;
    rows.iter()
        .map(|row| {
            let e = || db("listing hubs");
            Ok((
                row.try_get(0).map_err(e())?,
                row.try_get(1).map_err(e())?,
                row.try_get(2).map_err(e())?,
            ))
        })
        .collect()
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
        let set = SetNames::shared(&options().schema("Rt").table_prefix("p_"));
        assert_eq!(set.log, "\"Rt\".\"p_log\"");
        let set = SetNames::hub(&options().schema("Rt").table_prefix("p_"), "a\"b");
        assert_eq!(set.log, "\"Rt\".\"p_a\"\"b_log\"");
        assert_eq!(set.scope, "hub/a\"b");
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("chat"), "'chat'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
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
        assert!(ddl.contains("CREATE TABLE \"a b\".\"x_nodes\""), "{ddl}");
        assert!(!ddl.contains("{schema}") && !ddl.contains("{prefix}") && !ddl.contains("{set}"));
        assert!(ddl.contains(
            "INSERT INTO \"a b\".\"x_migrations\" (scope, version) VALUES ('shared', 1);"
        ));
        assert!(ddl.contains(
            "INSERT INTO \"a b\".\"x_migrations\" (scope, version) VALUES ('tables', 1);"
        ));
    }

    #[test]
    fn per_hub_ddl_splits_shared_and_hub_tables() {
        let options = options().schema("rt").tables_per_hub(true);
        let shared = ddl(&options);
        assert!(shared.contains("CREATE TABLE \"rt\".\"hubs\""), "{shared}");
        assert!(!shared.contains("\"rt\".\"log\""), "{shared}");
        let slug = default_slug("Chat");
        let hub = hub_ddl(&options, "Chat").expect("a valid hub");
        assert!(
            hub.contains(&format!(
                "INSERT INTO \"rt\".\"hubs\" (hub, slug) VALUES ('Chat', '{slug}');"
            )),
            "{hub}"
        );
        assert!(
            hub.contains(&format!("CREATE TABLE \"rt\".\"{slug}_log\"")),
            "{hub}"
        );
        assert!(hub.contains(&format!("VALUES ('hub/{slug}', 1);")), "{hub}");
        assert!(hub_ddl(&options.tables_per_hub(false), "Chat").is_err());
    }

    #[test]
    fn default_slugs_are_safe_distinct_and_short() {
        let hubs = [
            "chat",
            "Chat",
            "CHAT",
            "a.b",
            "a-b",
            "a_b",
            &"x".repeat(64),
            &format!("{}1", "x".repeat(63)),
            &format!("{}2", "x".repeat(63)),
            &format!("{}y", "Long_Common_Prefix_Name_"),
            &format!("{}z", "Long_Common_Prefix_Name_"),
        ];
        let slugs: Vec<String> = hubs.iter().map(|h| default_slug(h)).collect();
        for (hub, slug) in hubs.iter().zip(&slugs) {
            assert!(slug.len() <= SLUG_STEM + 9, "{hub}: {slug}");
            assert!(
                slug.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{hub}: {slug}"
            );
            let options = options().table_prefix("p".repeat(20)).tables_per_hub(true);
            let checked = super::slug(&options, hub).expect("a default slug always fits");
            assert_eq!(&checked, slug);
            let set = SetNames::hub(&options, slug);
            for table in [&set.memberships, &set.connections, &set.attempts] {
                // The quoted name minus the schema and the quotes.
                let bare = table
                    .rsplit_once(".\"")
                    .map(|(_, t)| t.trim_end_matches('"'))
                    .expect("qualified");
                assert!(bare.len() <= MAX_IDENTIFIER, "{bare}");
            }
        }
        let mut unique = slugs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), slugs.len(), "{slugs:?}");
        assert_eq!(default_slug("chat"), default_slug("chat"), "stable");
        assert!(default_slug("Chat").starts_with("chat_"));
        assert!(default_slug("a.b").starts_with("a_b_"));
    }

    #[test]
    fn custom_slugs_are_checked() {
        let options = || options().table_prefix("pre_");
        let err = |options: PgOptions, hub: &str| {
            let err = super::slug(&options, hub).expect_err("rejected");
            match err {
                Error::Driver { source, .. } => source
                    .downcast::<PgTableSetError>()
                    .map(|e| *e)
                    .expect("a table set error"),
                other => panic!("unexpected {other}"),
            }
        };
        assert!(matches!(
            err(options().table_slug(|_| String::new()), "chat"),
            PgTableSetError::EmptySlug { .. }
        ));
        assert!(matches!(
            err(options().table_slug(|h| format!("{h}\n")), "chat"),
            PgTableSetError::InvalidSlug { .. }
        ));
        match err(options().table_slug(|_| "s".repeat(48)), "chat") {
            PgTableSetError::NameTooLong { hub, table, bytes } => {
                assert_eq!(hub, "chat");
                assert_eq!(bytes, 64);
                assert_eq!(table.len(), 64);
            }
            other => panic!("unexpected {other}"),
        }
        let fits = options().table_slug(|_| "s".repeat(47));
        assert_eq!(super::slug(&fits, "chat").expect("63 bytes fit").len(), 47);
        let quoted = options().table_slug(|h| format!("{h}'; DROP TABLE x; --\" ü"));
        assert!(super::slug(&quoted, "chat").is_ok());
    }
}
