#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

mod builder;
mod config;
mod connection;
mod error;
mod reconnect;
mod transport;

pub use backplane_core::signalr::Protocol;
pub use builder::HubConnectionBuilder;
pub use config::BoxFuture;
pub use connection::{ConnectionEvent, ConnectionState, HubConnection, HubStream, UploadStream};
pub use error::{Error, Result};
pub use reconnect::ReconnectPolicy;
