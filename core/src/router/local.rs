//! This node's live connections and their group and user indexes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::SystemTime;

use crate::queue;

use crate::message::{InvocationId, MessageId, Target};
use crate::name::{ConnectionId, GroupName, UserId};

use bytes::Bytes;

/// What a connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message payload, or the invocation's payload.
    pub payload: Bytes,
    /// What kind of delivery this is.
    pub kind: DeliveryKind,
}

/// The kinds of [`Delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryKind {
    /// A transient message.
    Message,
    /// A durable message: acknowledge it with [`Node::acknowledge`](crate::Node::acknowledge)
    /// once the client has it, or it is delivered again on the user's next connect.
    Durable(MessageId),
    /// A client-result invocation: answer it with [`Node::complete`](crate::Node::complete).
    Invocation(InvocationId),
}

#[derive(Debug)]
pub(crate) struct LocalConnection {
    pub(crate) user: Option<UserId>,
    pub(crate) tx: queue::Sender<Delivery>,
    pub(crate) groups: HashSet<GroupName>,
    /// Bumped on every membership change, so a reload can tell it raced with one.
    pub(crate) version: u64,
    /// The durable messages handed to this connection: one can arrive both from the user's
    /// inbox on connect and from the log, and must be delivered once.
    pub(crate) durable: Claims,
    /// When the connection was registered (just before the backplane had it).
    pub(crate) connected_at: SystemTime,
}

/// The durable messages handed to one connection and not acknowledged by it yet, the most
/// recent [`Claims::CAPACITY`] of them: an acknowledged message is never delivered from the log
/// again (the inbox says so), so only the unacknowledged ones need remembering.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    ids: HashSet<MessageId>,
    order: VecDeque<MessageId>,
}

impl Claims {
    /// How many claims a connection keeps; older ones are forgotten.
    pub(crate) const CAPACITY: usize = 4096;

    /// Records `id`; `false` when it was already there.
    fn insert(&mut self, id: MessageId) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    /// Forgets `id`, once acknowledged.
    fn remove(&mut self, id: MessageId) {
        if self.ids.remove(&id) {
            self.order.retain(|m| *m != id);
        }
    }

    /// How many claims are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The connections of one hub on this node.
#[derive(Debug, Default)]
pub(crate) struct LocalIndex {
    pub(crate) connections: HashMap<ConnectionId, LocalConnection>,
    /// Connections stored in the backplane but not indexed yet, each with whether a change of
    /// its groups was read meanwhile (its groups are then loaded once it is indexed).
    pub(crate) registering: HashMap<ConnectionId, bool>,
    groups: HashMap<GroupName, HashSet<ConnectionId>>,
    users: HashMap<UserId, HashSet<ConnectionId>>,
}

impl LocalIndex {
    pub(crate) fn insert(&mut self, id: ConnectionId, connection: LocalConnection) {
        if let Some(user) = &connection.user {
            self.users
                .entry(user.clone())
                .or_default()
                .insert(id.clone());
        }
        for group in &connection.groups {
            self.groups
                .entry(group.clone())
                .or_default()
                .insert(id.clone());
        }
        self.connections.insert(id, connection);
    }

    pub(crate) fn remove(&mut self, id: &ConnectionId) -> Option<LocalConnection> {
        let connection = self.connections.remove(id)?;
        if let Some(user) = &connection.user {
            remove_from(&mut self.users, user, id);
        }
        for group in &connection.groups {
            remove_from(&mut self.groups, group, id);
        }
        Some(connection)
    }

    pub(crate) fn contains(&self, id: &ConnectionId) -> bool {
        self.connections.contains_key(id)
    }

    /// Records that durable `message` goes to connection `id`; `false` when it already went
    /// there (or the connection is gone), so it is not delivered twice.
    pub(crate) fn claim_durable(&mut self, id: &ConnectionId, message: MessageId) -> bool {
        self.connections
            .get_mut(id)
            .is_some_and(|c| c.durable.insert(message))
    }

    /// Forgets the claim of durable `message` by connection `id`, once it acknowledged it.
    pub(crate) fn release_durable(&mut self, id: &ConnectionId, message: MessageId) {
        if let Some(connection) = self.connections.get_mut(id) {
            connection.durable.remove(message);
        }
    }

    /// Whether connection `id` was registered before `time`.
    pub(crate) fn connected_before(&self, id: &ConnectionId, time: SystemTime) -> bool {
        self.connections
            .get(id)
            .is_some_and(|c| c.connected_at < time)
    }

    pub(crate) fn version(&self, id: &ConnectionId) -> Option<u64> {
        self.connections.get(id).map(|c| c.version)
    }

    /// Adds or removes one membership; returns whether anything changed.
    pub(crate) fn set_member(
        &mut self,
        id: &ConnectionId,
        group: &GroupName,
        member: bool,
    ) -> bool {
        let Some(connection) = self.connections.get_mut(id) else {
            return false;
        };
        let changed = if member {
            connection.groups.insert(group.clone())
        } else {
            connection.groups.remove(group)
        };
        if changed {
            connection.version += 1;
            if member {
                self.groups
                    .entry(group.clone())
                    .or_default()
                    .insert(id.clone());
            } else {
                remove_from(&mut self.groups, group, id);
            }
        }
        changed
    }

    /// Replaces a connection's memberships with `groups`.
    pub(crate) fn set_groups(&mut self, id: &ConnectionId, groups: HashSet<GroupName>) {
        let Some(connection) = self.connections.get(id) else {
            return;
        };
        let old = connection.groups.clone();
        for group in old.difference(&groups) {
            self.set_member(id, group, false);
        }
        for group in groups.difference(&old) {
            self.set_member(id, group, true);
        }
    }

    /// Calls `f` once for every local connection a message goes to, without the excepted ones.
    pub(crate) fn for_each_recipient(
        &self,
        target: &Target,
        except: &[ConnectionId],
        mut f: impl FnMut(&ConnectionId, &LocalConnection),
    ) {
        let excepted = Except::new(except);
        let mut visit = |id: &ConnectionId, connection: &LocalConnection| {
            if !excepted.contains(id) {
                f(id, connection);
            }
        };
        let (members, dedupe): (Box<dyn Iterator<Item = &ConnectionId>>, bool) = match target {
            Target::All => {
                for (id, connection) in &self.connections {
                    visit(id, connection);
                }
                return;
            }
            Target::Groups(groups) => (
                Box::new(groups.iter().filter_map(|g| self.groups.get(g)).flatten()),
                groups.len() > 1,
            ),
            Target::Users(users) => (
                Box::new(users.iter().filter_map(|u| self.users.get(u)).flatten()),
                users.len() > 1,
            ),
            Target::Connections(ids) => (Box::new(ids.iter()), ids.len() > 1),
        };
        // A list of one name cannot repeat a connection; a longer list can.
        let mut seen: HashSet<&ConnectionId> = HashSet::new();
        for id in members {
            if let Some((key, connection)) = self.connections.get_key_value(id)
                && (!dedupe || seen.insert(key))
            {
                visit(key, connection);
            }
        }
    }

    /// The local connections a message goes to, each once, without the excepted ones.
    pub(crate) fn recipients(
        &self,
        target: &Target,
        except: &[ConnectionId],
    ) -> Vec<(ConnectionId, queue::Sender<Delivery>)> {
        let mut out = Vec::new();
        self.for_each_recipient(target, except, |id, connection| {
            out.push((id.clone(), connection.tx.clone()));
        });
        out
    }
}

/// An except-list: scanned when short, hashed when long.
enum Except<'a> {
    Few(&'a [ConnectionId]),
    Many(HashSet<&'a ConnectionId>),
}

impl<'a> Except<'a> {
    fn new(except: &'a [ConnectionId]) -> Self {
        if except.len() <= 8 {
            Self::Few(except)
        } else {
            Self::Many(except.iter().collect())
        }
    }

    fn contains(&self, id: &ConnectionId) -> bool {
        match self {
            Self::Few(list) => list.contains(id),
            Self::Many(set) => set.contains(id),
        }
    }
}

fn remove_from<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, HashSet<ConnectionId>>,
    key: &K,
    id: &ConnectionId,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}
