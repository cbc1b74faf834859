//! What can go wrong, typed so callers can tell a refused token from a lost connection.

use std::time::Duration;

/// A client error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The hub URL cannot be used.
    #[error("invalid hub URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A builder setting is invalid (a header name or value, a root certificate).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A TCP, TLS or HTTP step of connecting failed.
    #[error("cannot reach {endpoint}: {reason}")]
    Connect {
        /// The host and port.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The server answered negotiation or the WebSocket upgrade with an HTTP error status.
    #[error("the server refused the {step} with HTTP {status}{}", detail(body))]
    Refused {
        /// `negotiation` or `WebSocket upgrade`.
        step: &'static str,
        /// The HTTP status code (401 for a missing or rejected access token).
        status: u16,
        /// The start of the response body, which often says why.
        body: String,
    },
    /// The negotiation response is unusable (an `error` from the server, no WebSocket
    /// transport, malformed JSON, too many redirects).
    #[error("negotiation failed: {0}")]
    Negotiate(String),
    /// The access token factory failed.
    #[error("the access token factory failed: {0}")]
    AccessToken(String),
    /// The server refused the hub protocol handshake.
    #[error("the server refused the handshake: {0}")]
    Handshake(String),
    /// The server sent something that is not the hub protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A step did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The hub method failed: the server's error completion.
    #[error("the hub method failed: {0}")]
    Hub(String),
    /// The connection is not connected (not started yet, reconnecting, or stopped).
    #[error("the connection is not connected (it is {0})")]
    NotConnected(crate::ConnectionState),
    /// The connection was lost or stopped before the invocation completed.
    #[error("the connection closed before the invocation completed{}", detail(.0.as_deref().unwrap_or("")))]
    ConnectionLost(Option<String>),
    /// Stateful reconnect keeps what the server has not acknowledged, up to this many bytes;
    /// the server has stopped acknowledging.
    #[error("the resend buffer of {0} bytes is full: the server is not acknowledging")]
    ResendBufferFull(usize),
    /// A result or argument could not be converted to or from JSON.
    #[error("JSON conversion failed: {0}")]
    Json(#[from] serde_json::Error),
}

fn detail(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
