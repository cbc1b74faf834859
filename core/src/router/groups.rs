//! Group membership: adding and removing a connection, here or on another node.

use crate::error::Result;
use crate::name::{ConnectionId, GroupName, HubName};
use crate::record::Record;

use super::Node;

impl Node {
    /// Adds a connection on any node to a group. Returns `false` when it already was a member.
    /// When this returns, messages sent to the group afterwards, from any node, reach it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`](crate::Error::UnknownConnection) when the connection exists
    /// nowhere, or the driver's error.
    pub async fn add_to_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
    ) -> Result<bool> {
        self.change_group(hub, group, id, true).await
    }

    /// Removes a connection on any node from a group. Returns `false` when it was not a member.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn remove_from_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
    ) -> Result<bool> {
        self.change_group(hub, group, id, false).await
    }

    pub(super) async fn change_group(
        &self,
        hub: &HubName,
        group: &GroupName,
        id: &ConnectionId,
        member: bool,
    ) -> Result<bool> {
        let state = self.hub(hub).await?;
        let backplane = &self.inner.backplane;
        let changed = if member {
            backplane.add_to_group(hub, group, id).await?
        } else {
            backplane.remove_from_group(hub, group, id).await?
        };
        let local = {
            let mut index = state.write();
            let local = index.contains(id);
            if local {
                index.set_member(id, group, member);
            }
            local
        };
        if !local {
            // The owning node reloads the connection's groups when it reads this entry. It goes
            // to every stream, so whichever stream a later message takes, the change precedes it.
            // It is written even when the stored membership did not change: a first attempt may
            // have stored it and then failed to write this entry.
            let record = Record::GroupChanged {
                change: self.next_sequence() ^ crate::schema::stable_hash(self.inner.id.as_str()),
                connection: id.clone(),
                group: group.clone(),
                member,
            }
            .encode();
            for stream in 0..backplane.stream_count() {
                backplane
                    .append(hub, stream, std::slice::from_ref(&record))
                    .await?;
            }
        }
        Ok(changed)
    }
}
