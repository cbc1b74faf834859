//! Settings of a [`HubConnection`], gathered by [`HubConnectionBuilder`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::signalr::Protocol;
use hyper::header::{HeaderName, HeaderValue};

use crate::config::{AccessToken, BoxFuture, Config};
use crate::connection::HubConnection;
use crate::error::{Error, Result};
use crate::reconnect::ReconnectPolicy;
use crate::transport::{Dialer, Endpoint};

/// Configures and builds a [`HubConnection`].
///
/// ```no_run
/// use backplane_client::{HubConnectionBuilder, ReconnectPolicy};
///
/// # async fn run() -> backplane_client::Result<()> {
/// let connection = HubConnectionBuilder::new("http://localhost:5000/hubs/chat")
///     .access_token("eyJhbGciOi…")
///     .header("X-Tenant", "blue")
///     .reconnect(ReconnectPolicy::default())
///     .build()?;
/// connection.start().await?;
/// # Ok(()) }
/// ```
pub struct HubConnectionBuilder {
    url: String,
    token: Option<AccessToken>,
    headers: Vec<(String, String)>,
    skip_negotiation: bool,
    reconnect: Option<ReconnectPolicy>,
    handshake_timeout: Duration,
    server_timeout: Duration,
    keep_alive_interval: Duration,
    invocation_timeout: Option<Duration>,
    max_message_size: usize,
    protocol: Protocol,
    stateful: bool,
    #[cfg(feature = "tls")]
    roots: Vec<Vec<u8>>,
}

impl std::fmt::Debug for HubConnectionBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token and header values stay out of logs.
        f.debug_struct("HubConnectionBuilder")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("skip_negotiation", &self.skip_negotiation)
            .field("reconnect", &self.reconnect)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("server_timeout", &self.server_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("invocation_timeout", &self.invocation_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("protocol", &self.protocol)
            .field("stateful", &self.stateful)
            .finish()
    }
}

impl HubConnectionBuilder {
    /// A connection to the hub at `url` (`http`, `https`, `ws` or `wss`), e.g.
    /// `http://localhost:5000/hubs/chat`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            headers: Vec::new(),
            skip_negotiation: false,
            reconnect: None,
            handshake_timeout: Duration::from_secs(15),
            server_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(15),
            invocation_timeout: None,
            max_message_size: 16 * 1024 * 1024,
            protocol: Protocol::Json,
            stateful: false,
            #[cfg(feature = "tls")]
            roots: Vec::new(),
        }
    }

    /// Sends this bearer token with negotiation and the WebSocket upgrade.
    pub fn access_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(AccessToken::Fixed(token.into()));
        self
    }

    /// Asks `factory` for a fresh bearer token before every connection attempt (tokens expire;
    /// reconnects need a valid one).
    pub fn access_token_factory<F, Fut>(mut self, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Some(AccessToken::Factory(Arc::new(move || {
            Box::pin(factory()) as BoxFuture<_>
        })));
        self
    }

    /// Adds a header to negotiation and the WebSocket upgrade.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Opens the WebSocket directly, without negotiating first (the server must allow it).
    pub fn skip_negotiation(mut self, skip: bool) -> Self {
        self.skip_negotiation = skip;
        self
    }

    /// Reconnects automatically after the connection is lost, with this policy. Without it, a
    /// lost connection is closed.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = Some(policy);
        self
    }

    /// How long negotiation, the upgrade and the handshake may take together. Default 15 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long the server may stay silent before the connection counts as lost. Default 30 s,
    /// twice the server's keep-alive interval.
    pub fn server_timeout(mut self, timeout: Duration) -> Self {
        self.server_timeout = timeout;
        self
    }

    /// How long this client may stay silent before it sends a ping. Default 15 s.
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = interval;
        self
    }

    /// How long an invocation waits for its completion. Default: until it completes or the
    /// connection is lost.
    pub fn invocation_timeout(mut self, timeout: Duration) -> Self {
        self.invocation_timeout = Some(timeout);
        self
    }

    /// The largest message accepted from the server. Default 16 MiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The hub protocol: [`Protocol::Json`] (the default) or [`Protocol::MessagePack`]
    /// (smaller messages in binary frames; arguments and results are still
    /// [`serde_json::Value`]s).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Asks for stateful reconnect (hub protocol version 2), as the official clients'
    /// `withStatefulReconnect`: when the socket drops, a new one continues the same
    /// connection (same id, same groups), and what either side sent meanwhile arrives once.
    /// Used when the server agrees in negotiation; otherwise a drop is a reconnect.
    pub fn stateful_reconnect(mut self, enabled: bool) -> Self {
        self.stateful = enabled;
        self
    }

    /// Trusts the certificates in this PEM text besides the platform's roots (for private
    /// certificate authorities).
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots.push(pem.into());
        self
    }

    /// Checks the settings and builds the connection, not yet started.
    ///
    /// # Errors
    ///
    /// An unusable URL, an invalid header, or an unreadable root certificate.
    pub fn build(self) -> Result<HubConnection> {
        let endpoint = Endpoint::parse(&self.url)?;
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let invalid = Error::InvalidSetting;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("'{name}' is not a valid header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("the value of header '{name}' is not valid")))?;
            headers.push((name, value));
        }
        #[allow(unused_mut)]
        let mut dialer = Dialer::new(headers);
        #[cfg(feature = "tls")]
        {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let mut roots = Vec::new();
            for pem in &self.roots {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.push(cert.map_err(|e| {
                        Error::InvalidSetting(format!("a root certificate cannot be read: {e}"))
                    })?);
                }
            }
            dialer = dialer.with_roots(roots);
        }
        Ok(HubConnection::new(Config {
            endpoint,
            dialer,
            token: self.token,
            skip_negotiation: self.skip_negotiation,
            reconnect: self.reconnect,
            handshake_timeout: self.handshake_timeout,
            server_timeout: self.server_timeout,
            keep_alive_interval: self.keep_alive_interval,
            invocation_timeout: self.invocation_timeout,
            max_message_size: self.max_message_size,
            protocol: self.protocol,
            stateful: self.stateful,
        }))
    }
}
