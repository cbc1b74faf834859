//! Errors of the PostgreSQL driver and their mapping to [`backplane_core::Error`].

use std::fmt;

use backplane_core::{Driver as _, Error};

use crate::PgBackplane;

/// SQLSTATE classes and codes after which the same call may succeed: connection exceptions
/// (class 08), serialization failures and deadlocks (40001, 40P01), a server shutting down or
/// starting (57P01, 57P02, 57P03), too many connections (53300), lock timeouts (55P03).
fn is_transient_state(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300" | "55P03" | "57014"
        )
}

/// A database error with what the driver was doing when it happened.
#[derive(Debug)]
pub struct PgError {
    context: &'static str,
    source: tokio_postgres::Error,
}

/// A tokio-postgres error in one line: the server's message and SQLSTATE, or the client-side
/// error with its causes (such as "connection refused").
pub(crate) fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "while {}: {}", self.context, describe(&self.source))
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl PgError {
    /// The SQLSTATE code, when the server sent one.
    pub fn code(&self) -> Option<&str> {
        self.source.code().map(|c| c.code())
    }

    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self.code() {
            Some(code) => is_transient_state(code),
            // No SQLSTATE: the connection broke, timed out or could not be made.
            None => true,
        }
    }
}

/// Why a hub's table set (with tables per hub) cannot be used, or why the tables under a schema
/// and prefix do not fit the layout asked for. Reported as the source of a permanent
/// [`Error::Driver`]: downcast it to match.
///
/// # Examples
///
/// ```
/// use backplane_core::Error;
/// use backplane_postgres::PgTableSetError;
///
/// fn is_slug_clash(err: &Error) -> bool {
///     matches!(
///         err,
///         Error::Driver { source, .. }
///             if matches!(
///                 source.downcast_ref::<PgTableSetError>(),
///                 Some(PgTableSetError::SlugTaken { .. })
///             )
///     )
/// }
/// # let _ = is_slug_clash;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PgTableSetError {
    /// The custom slug function gave an empty slug.
    #[error("the table slug of hub {hub:?} is empty")]
    EmptySlug {
        /// The hub.
        hub: String,
    },

    /// The custom slug function gave a slug with control characters.
    #[error("the table slug {slug:?} of hub {hub:?} contains control characters")]
    InvalidSlug {
        /// The hub.
        hub: String,
        /// The slug it got.
        slug: String,
    },

    /// A table name of the hub would be longer than PostgreSQL's 63 bytes.
    #[error(
        "table {table:?} of hub {hub:?} would be {bytes} bytes long; PostgreSQL allows 63: use a shorter table slug or prefix"
    )]
    NameTooLong {
        /// The hub.
        hub: String,
        /// The longest table name of the hub's set.
        table: String,
        /// Its length in bytes.
        bytes: usize,
    },

    /// Another hub's tables already have this slug.
    #[error(
        "hub {hub:?} would get the tables of slug {slug:?}, which belong to hub {other:?}: the table slug function must give different hubs different slugs"
    )]
    SlugTaken {
        /// The hub that was being used.
        hub: String,
        /// The slug it got.
        slug: String,
        /// The hub that has the slug.
        other: String,
    },

    /// The hub's tables were made with another slug than the one this node computes.
    #[error(
        "hub {hub:?} has the tables of slug {registered:?}, but this node's table slug is {slug:?}: every node must use the same table slug function"
    )]
    SlugChanged {
        /// The hub.
        hub: String,
        /// The slug in the registry.
        registered: String,
        /// The slug this node computes.
        slug: String,
    },

    /// The hub has no tables, or older ones, and this node may not create them.
    #[error(
        "the tables of hub {hub:?} are missing or old (version {version}, this driver needs {needed}): run the DDL from `PgBackplane::hub_ddl` or enable create_schema"
    )]
    Missing {
        /// The hub.
        hub: String,
        /// The version of its table set, 0 when it has none.
        version: i32,
        /// The version this driver needs.
        needed: i32,
    },

    /// The schema and prefix hold tables of the other layout (tables per hub, or one table set
    /// for every hub). Nodes of the two layouts would share the nodes table but not the
    /// connections, so neither could clean up after the other.
    #[error(
        "schema {schema:?} with table prefix {prefix:?} holds tables of the other layout than tables_per_hub={tables_per_hub}: use that setting, or another schema or table prefix"
    )]
    LayoutMismatch {
        /// The schema.
        schema: String,
        /// The table prefix.
        prefix: String,
        /// The layout asked for.
        tables_per_hub: bool,
    },
}

/// Converts a tokio-postgres error into the core's error, with context.
pub(crate) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| {
        let err = PgError { context, source };
        if err.is_transient() {
            Error::transient(PgBackplane::NAME, err)
        } else {
            Error::permanent(PgBackplane::NAME, err)
        }
    }
}

/// Converts the error of a statement that writes in one step (its own implicit transaction),
/// as [`db`] does, except when the outcome is unknown: the connection broke or the server went
/// away after the statement was sent, so it may have committed.
pub(crate) fn db_write(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| {
        if outcome_unknown(source.code().map(|c| c.code())) {
            Error::outcome_unknown(PgBackplane::NAME, PgError { context, source })
        } else {
            db(context)(source)
        }
    }
}

/// Whether a write that failed with `code` (`None`: no SQLSTATE, the client's side) may have
/// committed: a broken connection (no SQLSTATE, class 08) or a server shutting down (57P01,
/// 57P02), which may have come between the commit and its answer.
fn outcome_unknown(code: Option<&str>) -> bool {
    code.is_none_or(|code| code.starts_with("08") || matches!(code, "57P01" | "57P02"))
}

/// Whether `err` means the connection is gone: closed on the client's side, broken (class 08),
/// or ended by the server (57P01, 57P02, 57P03).
pub(crate) fn connection_lost(err: &tokio_postgres::Error) -> bool {
    err.is_closed()
        || err.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// Converts a pool error (no connection could be had) into the core's error.
pub(crate) fn pool(err: deadpool_postgres::PoolError) -> Error {
    match err {
        deadpool_postgres::PoolError::Backend(source) => db("getting a pooled connection")(source),
        other => Error::transient(
            PgBackplane::NAME,
            format!("could not get a pooled connection: {other}"),
        ),
    }
}

/// An error for a value read from the database that the driver cannot use.
pub(crate) fn corrupt(what: impl fmt::Display) -> Error {
    Error::Corrupt(format!("postgres: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_states() {
        for code in ["08006", "08001", "40001", "40P01", "57P01", "53300"] {
            assert!(is_transient_state(code), "{code}");
        }
        for code in ["23505", "42P01", "42501", "22P02"] {
            assert!(!is_transient_state(code), "{code}");
        }
    }

    #[test]
    fn writes_whose_outcome_is_unknown() {
        for code in [None, Some("08006"), Some("08003"), Some("57P01")] {
            assert!(outcome_unknown(code), "{code:?}");
        }
        // A cancelled statement, a serialization failure, a constraint: rolled back.
        for code in ["57014", "40001", "40P01", "23505", "55P03"] {
            assert!(!outcome_unknown(Some(code)), "{code}");
        }
    }
}
