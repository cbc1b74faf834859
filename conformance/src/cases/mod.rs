//! The cases, one module per area.

pub mod client_results;
pub mod durable;
pub mod faults;
pub mod groups;
pub mod limits;
pub mod log;
pub mod messaging;
pub mod presence;
