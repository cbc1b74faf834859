#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

mod backplane;
mod conn;
mod doctor;
mod driver;
mod error;
mod names;
mod options;
mod poller;
mod schema;
mod sql;
pub mod statements;
mod tables;

pub use backplane::MssqlBackplane;
pub use doctor::doctor;
pub use error::{MssqlError, MssqlTableSetError, TRANSIENT_ERRORS, is_transient_number};
pub use options::{Encrypt, MssqlOptions};

#[cfg(feature = "testing")]
pub mod testing;
