//! The names of the driver's objects: quoting, the shared tables', a table set's, and the
//! slugs of hubs with tables of their own.

use backplane_core::schema::{default_table_slug, stable_hash};
use backplane_core::{Driver as _, Error, Result};

use crate::MssqlBackplane;
use crate::error::MssqlTableSetError;
use crate::options::MssqlOptions;

pub(crate) const DEFAULT_SET_SCOPE: &str = "tables";

pub(crate) fn hub_scope(slug: &str) -> String {
    format!("hub/{slug}")
}

/// SQL Server's limit on identifiers, in characters.
pub(crate) const MAX_IDENTIFIER: usize = 128;

/// The longest table name suffix of a set.
const LONGEST_TABLE: &str = "memberships";

/// The bytes of a hub name the default slug keeps, before its hash.
pub(crate) const SLUG_STEM: usize = 48;

/// Quotes an identifier: wraps it in brackets and doubles any `]` inside.
pub(crate) fn quote(ident: &str) -> String {
    format!("[{}]", ident.replace(']', "]]"))
}

/// Quotes a Unicode string literal: `N'…'` with quotes doubled.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("N'{}'", value.replace('\'', "''"))
}

/// The default slug of a hub: lowercased, `[a-z0-9_]` only, cut to [`SLUG_STEM`] bytes, then
/// `_` and 8 hex digits of a hash of the exact name.
pub(crate) fn default_slug(hub: &str) -> String {
    default_table_slug(hub, SLUG_STEM)
}

pub(crate) fn table_error(err: MssqlTableSetError) -> Error {
    Error::permanent(MssqlBackplane::NAME, err)
}

/// The checked slug of `hub`'s table set: not empty, no control characters, every table name
/// within SQL Server's limit.
pub(crate) fn slug(options: &MssqlOptions, hub: &str) -> Result<String> {
    let slug = match &options.table_slug {
        Some(custom) => custom.slug(hub),
        None => default_slug(hub),
    };
    if slug.is_empty() {
        return Err(table_error(MssqlTableSetError::EmptySlug {
            hub: hub.to_owned(),
        }));
    }
    if slug.chars().any(char::is_control) {
        return Err(table_error(MssqlTableSetError::InvalidSlug {
            hub: hub.to_owned(),
            slug,
        }));
    }
    let longest = format!("{}{slug}_{LONGEST_TABLE}", options.table_prefix);
    let chars = longest.chars().count();
    if chars > MAX_IDENTIFIER {
        return Err(table_error(MssqlTableSetError::NameTooLong {
            hub: hub.to_owned(),
            table: longest,
            chars,
        }));
    }
    Ok(slug)
}

/// The quoted names of the shared tables, and what else is one per schema and prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) schema: String,
    pub(crate) nodes: String,
    pub(crate) hubs: String,
    pub(crate) migrations: String,
    /// The `sp_getapplock` resource that serializes migrations and table set creation of this
    /// schema and prefix (at most 255 characters).
    pub(crate) lock: String,
    /// The program name of this deployment's poller connections.
    pub(crate) poller: String,
}

impl Names {
    pub(crate) fn new(options: &MssqlOptions) -> Self {
        let schema = quote(&options.schema);
        let prefix = &options.table_prefix;
        let table = |name: &str| format!("{schema}.{}", quote(&format!("{prefix}{name}")));
        let raw = format!("{}.{}", options.schema, prefix);
        let tag = if raw.chars().count() <= 90 {
            raw.clone()
        } else {
            format!("{:016x}", stable_hash(&raw))
        };
        Self {
            nodes: table("nodes"),
            hubs: table("hubs"),
            migrations: table("migrations"),
            lock: format!("backplane.{tag}"),
            poller: format!("backplane-poller {tag}"),
            schema,
        }
    }
}

/// The quoted names of one table set and its migration scope.
#[derive(Debug, Clone)]
pub(crate) struct SetNames {
    pub(crate) scope: String,
    /// The set's table name prefix, unquoted.
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
    /// The set every hub shares.
    pub(crate) fn shared(options: &MssqlOptions) -> Self {
        Self::with(
            options,
            DEFAULT_SET_SCOPE.to_owned(),
            options.table_prefix.clone(),
        )
    }

    /// The set of the hub whose slug is `slug`.
    pub(crate) fn hub(options: &MssqlOptions, slug: &str) -> Self {
        Self::with(
            options,
            hub_scope(slug),
            format!("{}{slug}_", options.table_prefix),
        )
    }

    fn with(options: &MssqlOptions, scope: String, base: String) -> Self {
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
