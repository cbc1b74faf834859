//! Errors of the SQL Server driver, their retry classification, and their mapping to
//! [`backplane_core::Error`].

use std::fmt;

use backplane_core::{Driver as _, Error};

use crate::MssqlBackplane;

/// SQL Server error numbers after which the same call may succeed on a fresh try:
///
/// - 1205 deadlock victim; 1222 lock request timeout;
/// - 233, 64, 20, 121, 10053, 10054, 10060: the connection broke or timed out at the transport;
/// - 4060 database unavailable (during a failover), 4221 login waiting for an availability
///   group replica, 18456 is *not* here (a wrong password stays wrong);
/// - Azure SQL transient faults: 40197 (service error, failover), 40501 (service busy), 40540,
///   40613 (database unavailable), 40143, 49918, 49919, 49920 (too many operations),
///   10928, 10929 (resource limits), 42108, 42109 (serverless database resuming);
/// - 8645, 8651 (memory grant timeouts).
pub const TRANSIENT_ERRORS: &[u32] = &[
    20, 64, 121, 233, 1205, 1222, 4060, 4221, 8645, 8651, 10053, 10054, 10060, 10928, 10929, 40143,
    40197, 40501, 40540, 40613, 42108, 42109, 49918, 49919, 49920,
];

/// Whether SQL Server error `number` is transient (see [`TRANSIENT_ERRORS`]).
pub fn is_transient_number(number: u32) -> bool {
    TRANSIENT_ERRORS.contains(&number)
}

/// Duplicate key in a unique index (2601) or a primary key or unique constraint (2627).
pub(crate) const DUPLICATE_KEY: [u32; 2] = [2601, 2627];

/// Chosen as a deadlock victim: the server rolled the whole transaction back.
pub(crate) const DEADLOCK_VICTIM: u32 = 1205;

/// A foreign key (or check) constraint refused the row.
pub(crate) const CONSTRAINT_CONFLICT: u32 = 547;

/// Invalid object name: a table that does not exist.
pub(crate) const INVALID_OBJECT: u32 = 208;

/// A database error with what the driver was doing when it happened.
#[derive(Debug)]
pub struct MssqlError {
    context: &'static str,
    source: tiberius::error::Error,
}

impl MssqlError {
    /// The SQL Server error number, when the server sent one.
    pub fn number(&self) -> Option<u32> {
        self.source.code()
    }

    /// Whether retrying may succeed: a transient server error number, or a connection that
    /// broke, timed out, or was redirected.
    pub fn is_transient(&self) -> bool {
        is_transient(&self.source)
    }
}

/// Whether a tiberius error is worth retrying.
pub(crate) fn is_transient(err: &tiberius::error::Error) -> bool {
    use tiberius::error::Error as E;
    match err {
        E::Server(token) => is_transient_number(token.code()),
        // The connection broke, timed out (the command timeout), or lost its place in the
        // stream: a fresh connection may do.
        E::Io { .. } | E::Protocol(_) | E::Routing { .. } => true,
        _ => false,
    }
}

/// A tiberius error in one line: the server's message and error number, or the client side's.
pub(crate) fn describe(err: &tiberius::error::Error) -> String {
    match err {
        tiberius::error::Error::Server(token) => {
            format!(
                "{} (error {}, state {})",
                token.message(),
                token.code(),
                token.state()
            )
        }
        other => other.to_string(),
    }
}

impl fmt::Display for MssqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "while {}: {}", self.context, describe(&self.source))
    }
}

impl std::error::Error for MssqlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Why a hub's table set (with tables per hub) cannot be used, or why the tables under a schema
/// and prefix do not fit the layout asked for. Reported as the source of a permanent
/// [`Error::Driver`]: downcast it to match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MssqlTableSetError {
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

    /// A table name of the hub would be longer than SQL Server's 128 characters.
    #[error(
        "table {table:?} of hub {hub:?} would be {chars} characters long; SQL Server allows 128: use a shorter table slug or prefix"
    )]
    NameTooLong {
        /// The hub.
        hub: String,
        /// The longest table name of the hub's set.
        table: String,
        /// Its length in characters.
        chars: usize,
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
        "the tables of hub {hub:?} are missing or old (version {version}, this driver needs {needed}): run the DDL from `MssqlBackplane::hub_ddl` or enable create_schema"
    )]
    Missing {
        /// The hub.
        hub: String,
        /// The version of its table set, 0 when it has none.
        version: i32,
        /// The version this driver needs.
        needed: i32,
    },

    /// The schema and prefix hold tables of the other layout.
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

/// Converts a tiberius error into the core's error, with context.
pub(crate) fn db(context: &'static str) -> impl FnOnce(tiberius::error::Error) -> Error {
    move |source| {
        let err = MssqlError { context, source };
        if err.is_transient() {
            Error::transient(MssqlBackplane::NAME, err)
        } else {
            Error::permanent(MssqlBackplane::NAME, err)
        }
    }
}

/// Converts the error of a request that writes and commits, as [`db`] does, except when the
/// outcome is unknown: the connection broke or fell out of step after the request was sent,
/// so it may have committed.
pub(crate) fn db_write(context: &'static str) -> impl FnOnce(tiberius::error::Error) -> Error {
    move |source| {
        if outcome_unknown(&source) {
            Error::outcome_unknown(MssqlBackplane::NAME, MssqlError { context, source })
        } else {
            db(context)(source)
        }
    }
}

/// Whether a write that failed with `err` may have committed: the transport broke or the
/// answer could not be read (the server's own errors come before the commit).
fn outcome_unknown(err: &tiberius::error::Error) -> bool {
    matches!(
        err,
        tiberius::error::Error::Io { .. } | tiberius::error::Error::Protocol(_)
    )
}

/// Converts a pool error (no connection could be had) into the core's error.
pub(crate) fn pool(err: deadpool::managed::PoolError<tiberius::error::Error>) -> Error {
    match err {
        deadpool::managed::PoolError::Backend(source) => db("getting a pooled connection")(source),
        other => Error::transient(
            MssqlBackplane::NAME,
            format!("could not get a pooled connection: {other}"),
        ),
    }
}

/// An error for a value read from the database that the driver cannot use.
pub(crate) fn corrupt(what: impl fmt::Display) -> Error {
    Error::Corrupt(format!("mssql: {what}"))
}

/// The server error number of a tiberius error, if any.
pub(crate) fn number(err: &tiberius::error::Error) -> Option<u32> {
    err.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_numbers() {
        for n in [
            1205, 1222, 40613, 40501, 40197, 49918, 49919, 49920, 10928, 10929, 4060, 233, 10053,
            10054, 10060, 64, 20,
        ] {
            assert!(is_transient_number(n), "{n}");
        }
        // Wrong password, missing table, syntax error, duplicate key, constraint, permission.
        for n in [18456, 208, 102, 2627, 2601, 547, 229, 262] {
            assert!(!is_transient_number(n), "{n}");
        }
    }

    #[test]
    fn client_side_errors_are_classified() {
        use tiberius::error::Error as E;
        let io = E::Io {
            kind: std::io::ErrorKind::ConnectionReset,
            message: "reset".into(),
        };
        assert!(is_transient(&io));
        assert!(is_transient(&E::Routing {
            host: "h".into(),
            port: 1
        }));
        assert!(!is_transient(&E::Tls("bad certificate".into())));
        assert!(!is_transient(&E::Conversion("no".into())));
        assert!(outcome_unknown(&io));
        assert!(db_write("testing")(io.clone()).is_outcome_unknown());
        let mapped = db("testing")(io);
        assert!(mapped.is_transient());
        assert!(mapped.to_string().contains("while testing"), "{mapped}");
    }
}
