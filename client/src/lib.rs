//! A client for hubs that speak the SignalR hub protocol: this project's server, ASP.NET
//! Core SignalR, or any other server that keeps to the published protocol.
//!
//! - The JSON or the MessagePack hub protocol ([`Protocol`]).
//! - Negotiation (versions 0 and 1, with redirects and their access tokens), then a WebSocket
//!   (fastwebsockets over hyper), `http`/`ws` or, with the default `tls` feature,
//!   `https`/`wss` through rustls.
//! - The hub protocol handshake, then [`invoke`](HubConnection::invoke) with a result,
//!   [`send`](HubConnection::send) without one, [`stream`](HubConnection::stream) for streaming
//!   methods, [`on`](HubConnection::on) for the server's calls and
//!   [`on_invoke`](HubConnection::on_invoke) to answer the ones that expect a result.
//! - Pings when idle, a server timeout, access tokens (fixed or from a factory asked before
//!   every attempt) and custom headers.
//! - Stateful reconnect ([`stateful_reconnect`](HubConnectionBuilder::stateful_reconnect),
//!   hub protocol version 2): a dropped socket is replaced by a new one on the same
//!   connection, and what either side sent meanwhile arrives once, in order.
//! - Automatic reconnect with backoff and jitter ([`ReconnectPolicy`]) and
//!   [`events`](HubConnection::events): reconnecting, reconnected, closed. A reconnect is a new
//!   connection with no groups: re-join them on [`ConnectionEvent::Reconnected`].
//!
//! ```no_run
//! use backplane_client::{ConnectionEvent, HubConnectionBuilder, ReconnectPolicy};
//! use serde_json::json;
//!
//! # async fn run() -> backplane_client::Result<()> {
//! let connection = HubConnectionBuilder::new("http://localhost:5000/hubs/chat")
//!     .access_token("eyJhbGciOi…")
//!     .reconnect(ReconnectPolicy::default())
//!     .build()?;
//! connection.on("ReceiveMessage", |args| println!("{} says {}", args[0], args[1]));
//! let mut events = connection.events();
//! connection.start().await?;
//! connection.invoke("JoinGroup", vec![json!("rust")]).await?;
//! while let Ok(event) = events.recv().await {
//!     if let ConnectionEvent::Reconnected { .. } = event {
//!         connection.invoke("JoinGroup", vec![json!("rust")]).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
#![deny(rustdoc::broken_intra_doc_links)]

mod builder;
mod connection;
mod error;
mod reconnect;
mod transport;

pub use backplane_core::signalr::Protocol;
pub use builder::{BoxFuture, HubConnectionBuilder};
pub use connection::{ConnectionEvent, ConnectionState, HubConnection, HubStream};
pub use error::{Error, Result};
pub use reconnect::ReconnectPolicy;
