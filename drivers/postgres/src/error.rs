//! Errors of the PostgreSQL driver and their mapping to [`backplane_core::Error`].

use std::fmt;

use backplane_core::Error;

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
}
