//! The backplane reference server: hubs spoken to with the SignalR hub protocols (JSON and
//! MessagePack) over WebSockets (hyper and fastwebsockets), so the official SignalR clients
//! connect unchanged, scaled out over any backplane driver.
//!
//! ```no_run
//! use std::sync::Arc;
//! use backplane_core::{MemoryBackplane, Node, NodeOptions};
//! use backplane_server::{Server, Security, chat};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::start(Arc::new(MemoryBackplane::new()), NodeOptions::default()).await?;
//! let running = Server::new(node)
//!     .hub(chat::hub())
//!     .security(Security { allow_anonymous: true, ..Security::default() })
//!     .bind("127.0.0.1:5000".parse()?)
//!     .await?;
//! println!("listening on {}", running.local_addr());
//! # Ok(()) }
//! ```

pub mod api;
mod auth;
pub mod chat;
mod connection;
mod hub;
mod limits;
mod metrics;
mod relay;
mod server;
mod socket;

/// The SignalR hub protocol codecs the server speaks.
pub use backplane_core::signalr as protocol;

pub use api::api_token;
pub use auth::user_token;
pub use hub::{
    Arguments, BoxFuture, Client, Clients, Context, Groups, Hub, HubBuilder, HubError, HubResult,
    Recipients, StreamReceiver, StreamSender,
};
pub use limits::Limits;
pub use server::{Running, Security, Server};
