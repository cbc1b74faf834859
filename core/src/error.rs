//! The error type callers match on.

use std::fmt;
use std::time::Duration;

use crate::position::Position;

/// Which kind of name failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NameKind {
    /// A [`HubName`](crate::HubName).
    Hub,
    /// A [`GroupName`](crate::GroupName).
    Group,
    /// A [`UserId`](crate::UserId).
    User,
    /// A [`ConnectionId`](crate::ConnectionId).
    Connection,
    /// A [`NodeId`](crate::NodeId).
    Node,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hub => "hub",
            Self::Group => "group",
            Self::User => "user",
            Self::Connection => "connection",
            Self::Node => "node",
        })
    }
}

/// A boxed error from a driver or another source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the backplane, from bad input to a database that is down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name (hub, group, user, connection, node) failed validation.
    #[error("invalid {kind} name: {reason}")]
    InvalidName {
        /// Which kind of name was rejected.
        kind: NameKind,
        /// Why it was rejected.
        reason: String,
    },

    /// A payload is larger than the configured maximum.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Size of the rejected payload in bytes.
        size: usize,
        /// The configured maximum in bytes.
        max: usize,
    },

    /// A message was built in a way the protocol does not allow (for example a durable broadcast).
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// A log position lies before the oldest retained entry, or belongs to an older epoch of the
    /// stream: the entries in between are gone and cannot be replayed.
    #[error("position {requested} is too old; the oldest readable position is {earliest}")]
    PositionTooOld {
        /// The position that was asked for.
        requested: Position,
        /// The oldest position that can still be read.
        earliest: Position,
    },

    /// A stream index is outside the hub's configured stream count.
    #[error("stream {stream} does not exist (the log has {streams} streams)")]
    UnknownStream {
        /// The stream that was asked for.
        stream: u32,
        /// The number of streams.
        streams: u32,
    },

    /// No live connection has this id.
    #[error("connection {0} does not exist")]
    UnknownConnection(String),

    /// A connection with this id is already registered.
    #[error("connection {0} is already registered")]
    DuplicateConnection(String),

    /// The node already holds its configured maximum of connections.
    #[error("this node already holds its maximum of {max} connections")]
    TooManyConnections {
        /// The configured maximum.
        max: usize,
    },

    /// A client result (server-to-client invocation) failed.
    #[error("client result failed: {0}")]
    Invocation(#[from] InvocationError),

    /// The node has been shut down.
    #[error("the node is shut down")]
    Shutdown,

    /// An operation did not finish in time.
    #[error("operation timed out after {0:?}")]
    Timeout(Duration),

    /// A log record could not be decoded.
    #[error("corrupt log record: {0}")]
    Corrupt(String),

    /// A write was sent to the database but its answer was lost (the connection broke, or the
    /// call timed out after the request went out): it may or may not have taken effect.
    /// Retrying the same call may apply it twice.
    #[error("{driver} driver: the outcome of a write is unknown: {source}")]
    OutcomeUnknown {
        /// The driver's name.
        driver: &'static str,
        /// What broke.
        source: BoxError,
    },

    /// The driver failed; `source` says why.
    #[error("{driver} driver error: {source}")]
    Driver {
        /// The driver's name, such as `"memory"` or `"postgres"`.
        driver: &'static str,
        /// Whether retrying the same call later may succeed (connection lost, deadlock, timeout).
        transient: bool,
        /// The underlying error.
        source: BoxError,
    },
}

impl Error {
    /// Builds an [`Error::InvalidName`].
    pub fn invalid_name(kind: NameKind, reason: impl Into<String>) -> Self {
        Self::InvalidName {
            kind,
            reason: reason.into(),
        }
    }

    /// Builds a [`Error::Driver`] error that retrying may cure.
    pub fn transient(driver: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Driver {
            driver,
            transient: true,
            source: source.into(),
        }
    }

    /// Builds a [`Error::Driver`] error that retrying will not cure.
    pub fn permanent(driver: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Driver {
            driver,
            transient: false,
            source: source.into(),
        }
    }

    /// Builds an [`Error::OutcomeUnknown`]: a write whose answer was lost.
    pub fn outcome_unknown(driver: &'static str, source: impl Into<BoxError>) -> Self {
        Self::OutcomeUnknown {
            driver,
            source: source.into(),
        }
    }

    /// Whether this is an [`Error::OutcomeUnknown`]: the write may have taken effect.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }

    /// A copy for each of several callers that one failed call served (a batch): the same
    /// text and retry class, from the error's own driver, or `driver` for other errors.
    pub(crate) fn copy_for(&self, driver: &'static str) -> Self {
        // The copy names its driver once: it takes the source's text, not the whole message.
        let (driver, text) = match self {
            Self::Driver { driver, source, .. } | Self::OutcomeUnknown { driver, source } => {
                (*driver, source.to_string())
            }
            _ => (driver, self.to_string()),
        };
        if self.is_outcome_unknown() {
            Self::outcome_unknown(driver, text)
        } else if self.is_transient() {
            Self::transient(driver, text)
        } else {
            Self::permanent(driver, text)
        }
    }

    /// Whether the same call may succeed if retried later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Driver {
                transient: true,
                ..
            } | Self::Timeout(_)
        )
    }
}

/// Why a client result (server-to-client invocation) did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    /// The client answered with an error.
    #[error("client returned an error: {0}")]
    Client(String),
    /// The connection went away before it answered.
    #[error("connection {0} disconnected before completing the invocation")]
    Disconnected(String),
    /// The node that holds the connection stopped heartbeating and was declared dead.
    #[error("node {0} holding the connection is gone")]
    NodeGone(String),
    /// A completion arrived from a connection the invocation was not sent to.
    #[error("invocation {id} was not sent to connection {connection}")]
    WrongConnection {
        /// The invocation id.
        id: String,
        /// The connection that tried to complete it.
        connection: String,
    },
    /// No pending invocation has this id.
    #[error("no pending invocation {0}")]
    UnknownInvocation(String),
    /// The caller canceled the invocation.
    #[error("invocation canceled")]
    Canceled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_class_and_names_its_driver_once() {
        let unknown = Error::outcome_unknown("postgres", "connection closed");
        let copy = unknown.copy_for("batch");
        assert!(copy.is_outcome_unknown());
        assert_eq!(copy.to_string(), unknown.to_string());
        let transient = Error::transient("postgres", "deadlock");
        let copy = transient.copy_for("batch");
        assert!(copy.is_transient());
        assert_eq!(copy.to_string(), "postgres driver error: deadlock");
        let other = Error::Shutdown.copy_for("batch");
        assert!(!other.is_transient() && !other.is_outcome_unknown());
        assert_eq!(
            other.to_string(),
            format!("batch driver error: {}", Error::Shutdown)
        );
    }
}
