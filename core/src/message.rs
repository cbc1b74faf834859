//! The message envelope: what to send, to whom, and how durably.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::name::{ConnectionId, GroupName, HubName, UserId};

/// The default maximum payload size: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// Every connection of the hub, on every node.
    All,
    /// Every connection in any of these groups (a connection in several receives the message once).
    Groups(Vec<GroupName>),
    /// Every connection of any of these users.
    Users(Vec<UserId>),
    /// These connections.
    Connections(Vec<ConnectionId>),
}

impl Target {
    /// A short name for metrics and logs: `all`, `groups`, `users` or `connections`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Groups(_) => "groups",
            Self::Users(_) => "users",
            Self::Connections(_) => "connections",
        }
    }
}

/// How a message survives its recipients being offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Fan out to whoever is connected now; nobody else ever receives it.
    #[default]
    Transient,
    /// Stored in each target user's inbox before it is sent; a user who is offline receives it
    /// when they next connect, until it is acknowledged or `ttl` has passed. Only
    /// [`Target::Users`] messages can be durable.
    Durable {
        /// How long the message stays deliverable.
        ttl: Duration,
    },
}

/// A message to publish on a hub.
///
/// # Examples
///
/// ```
/// use backplane_core::{HubName, Message, GroupName, ConnectionId};
///
/// let hub = HubName::new("chat")?;
/// let msg = Message::to_group(hub, GroupName::new("room-1")?, "hello")
///     .except([ConnectionId::new("c1")?]);
/// assert_eq!(msg.payload.as_ref(), b"hello");
/// # Ok::<(), backplane_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The hub the message belongs to.
    pub hub: HubName,
    /// Who receives it.
    pub target: Target,
    /// Connections that never receive it, whatever the target says.
    pub except: Vec<ConnectionId>,
    /// Opaque bytes, delivered unchanged.
    pub payload: Bytes,
    /// The connection that sent it, if any. Messages from one sender share a log stream, so every
    /// node delivers them in the order they were sent.
    pub sender: Option<ConnectionId>,
    /// Transient or durable.
    pub durability: Durability,
}

impl Message {
    /// A transient message for `target`.
    pub fn new(hub: HubName, target: Target, payload: impl Into<Bytes>) -> Self {
        Self {
            hub,
            target,
            except: Vec::new(),
            payload: payload.into(),
            sender: None,
            durability: Durability::Transient,
        }
    }

    /// A message for every connection of the hub.
    pub fn to_all(hub: HubName, payload: impl Into<Bytes>) -> Self {
        Self::new(hub, Target::All, payload)
    }

    /// A message for the members of one group.
    pub fn to_group(hub: HubName, group: GroupName, payload: impl Into<Bytes>) -> Self {
        Self::new(hub, Target::Groups(vec![group]), payload)
    }

    /// A message for every connection of one user.
    pub fn to_user(hub: HubName, user: UserId, payload: impl Into<Bytes>) -> Self {
        Self::new(hub, Target::Users(vec![user]), payload)
    }

    /// A message for one connection.
    pub fn to_connection(
        hub: HubName,
        connection: ConnectionId,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self::new(hub, Target::Connections(vec![connection]), payload)
    }

    /// Adds connections that must not receive the message.
    pub fn except(mut self, connections: impl IntoIterator<Item = ConnectionId>) -> Self {
        self.except.extend(connections);
        self
    }

    /// Sets the sending connection, which keeps this sender's messages in order.
    pub fn sender(mut self, connection: ConnectionId) -> Self {
        self.sender = Some(connection);
        self
    }

    /// Makes the message durable for `ttl`.
    pub fn durable(mut self, ttl: Duration) -> Self {
        self.durability = Durability::Durable { ttl };
        self
    }

    /// Checks the payload size and the target/durability combination.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] above `max_payload`; [`Error::InvalidMessage`] for a durable
    /// message whose target is not [`Target::Users`], or an empty target list.
    pub fn validate(&self, max_payload: usize) -> Result<()> {
        if self.payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload,
            });
        }
        let empty = match &self.target {
            Target::All => false,
            Target::Groups(v) => v.is_empty(),
            Target::Users(v) => v.is_empty(),
            Target::Connections(v) => v.is_empty(),
        };
        if empty {
            return Err(Error::InvalidMessage(format!(
                "the {} target lists nobody",
                self.target.kind()
            )));
        }
        if let Durability::Durable { ttl } = self.durability {
            if !matches!(self.target, Target::Users(_)) {
                return Err(Error::InvalidMessage(
                    "only messages to users can be durable".to_owned(),
                ));
            }
            if ttl.is_zero() {
                return Err(Error::InvalidMessage(
                    "a durable message needs a non-zero ttl".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

/// The id a driver gives a durable message when it stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of a client-result invocation, unique across all nodes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvocationId(Arc<str>);

impl InvocationId {
    /// Wraps an id received from a client or the log.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> HubName {
        HubName::new("h").unwrap()
    }

    #[test]
    fn payload_limit_is_inclusive() {
        let max = 10;
        assert!(Message::to_all(hub(), vec![0u8; 10]).validate(max).is_ok());
        let err = Message::to_all(hub(), vec![0u8; 11])
            .validate(max)
            .unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { size: 11, max: 10 }));
    }

    #[test]
    fn durable_needs_users() {
        let msg = Message::to_all(hub(), "x").durable(Duration::from_secs(1));
        assert!(matches!(msg.validate(100), Err(Error::InvalidMessage(_))));
        let msg =
            Message::to_user(hub(), UserId::new("u").unwrap(), "x").durable(Duration::from_secs(1));
        assert!(msg.validate(100).is_ok());
    }

    #[test]
    fn empty_targets_are_rejected() {
        let msg = Message::new(hub(), Target::Groups(vec![]), "x");
        assert!(matches!(msg.validate(100), Err(Error::InvalidMessage(_))));
    }
}
