#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

mod backplane;
pub mod batch;
mod driver;
mod error;
#[cfg(feature = "memory")]
mod memory;
mod message;
mod name;
mod observe;
mod position;
pub mod queue;
mod record;
mod router;
pub mod schema;
#[cfg(feature = "signalr")]
pub mod signalr;
mod stream_queues;

pub use backplane::{
    Backplane, ConnectionInfo, DEFAULT_STREAMS, DeliveryAttempt, DurableMessage, DynBackplane,
    LogEntry, NewDurableMessage, NodeInfo, Retention, SharedBackplane, StreamBounds, UserSession,
    Wake, WakeupHub, Wakeups, checked_read,
};
pub use driver::{Check, Driver, ddl_for_hubs, url_scheme};
pub use error::{BoxError, Error, InvocationError, NameKind, Result};
#[cfg(feature = "memory")]
pub use memory::MemoryBackplane;
pub use message::{DEFAULT_MAX_PAYLOAD, Durability, InvocationId, Message, MessageId, Target};
pub use name::{ConnectionId, GroupName, HubName, NodeId, UserId};
pub use observe::{NodeObserver, PoolStatus};
pub use position::Position;
pub use router::{
    Connection, Delivery, DeliveryKind, Job, JobStatus, Node, NodeEvent, NodeOptions, NodeStats,
    PendingPublish, Published,
};
pub use stream_queues::StreamQueues;
