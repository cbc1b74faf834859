#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

mod backplane;
mod doctor;
mod driver;
mod error;
mod listener;
mod options;
mod schema;
mod sql;
mod tables;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;

pub use backplane::PgBackplane;
pub use doctor::doctor;
pub use error::{PgError, PgTableSetError};
pub use options::PgOptions;
pub use tls::{RootCerts, SslMode};
