//! What a connection needs to (re)connect, as the builder leaves it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::signalr::Protocol;

use crate::error::{Error, Result};
use crate::reconnect::ReconnectPolicy;
use crate::transport::{Dialer, Endpoint};

/// A boxed future, as token factories and result handlers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where the access token comes from.
#[derive(Clone)]
pub(crate) enum AccessToken {
    Fixed(String),
    Factory(Arc<dyn Fn() -> BoxFuture<Result<String, String>> + Send + Sync>),
}

impl AccessToken {
    /// The token for the next connection attempt.
    pub(crate) async fn get(&self) -> Result<String> {
        match self {
            Self::Fixed(token) => Ok(token.clone()),
            Self::Factory(factory) => factory().await.map_err(Error::AccessToken),
        }
    }
}

/// Everything a connection needs to (re)connect.
pub(crate) struct Config {
    pub(crate) endpoint: Endpoint,
    pub(crate) dialer: Dialer,
    pub(crate) token: Option<AccessToken>,
    pub(crate) skip_negotiation: bool,
    pub(crate) reconnect: Option<ReconnectPolicy>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) server_timeout: Duration,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) invocation_timeout: Option<Duration>,
    pub(crate) max_message_size: usize,
    pub(crate) protocol: Protocol,
    pub(crate) stateful: bool,
}
