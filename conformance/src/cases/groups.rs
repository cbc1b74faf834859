//! Group cases: group sends, except-lists, membership changes on any node, listings.

use backplane_core::{Error, GroupName, HubName, Message, Node, Target};
use bytes::Bytes;

use crate::{
    CaseError, CaseResult, Client, Ctx, Faulty, Op, WAIT, check, check_eq, sentinel, test_options,
};

/// Adds `client` to `group` through `node` and fails unless that changed the membership.
async fn join(node: &Node, hub: &HubName, group: &GroupName, client: &Client) -> CaseResult {
    check!(
        node.add_to_group(hub, group, client.id()).await?,
        "adding connection {} to group {group} reported no change",
        client.id()
    );
    Ok(())
}

/// Reads `client` up to `marker` and fails unless exactly one delivery, `expected`, came first.
async fn exactly_once(client: &mut Client, marker: &Bytes, expected: &[u8]) -> CaseResult {
    let before = client.until(marker).await?;
    let payloads: Vec<&[u8]> = before.iter().map(|d| d.payload.as_ref()).collect();
    check!(
        payloads == [expected],
        "connection {} expected exactly one {:?} before the sentinel, got {:?}",
        client.id(),
        String::from_utf8_lossy(expected),
        payloads
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A group message reaches every member once and no connection outside the group.
/// Checklist A.3.
pub async fn group_send_reaches_members_only(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let group = GroupName::new("room")?;
    let mut m1 = ctx.connect(&node, None).await?;
    let mut m2 = ctx.connect(&node, None).await?;
    let mut outsider = ctx.connect(&node, None).await?;
    join(&node, &ctx.hub, &group, &m1).await?;
    join(&node, &ctx.hub, &group, &m2).await?;
    node.publish(Message::to_group(ctx.hub.clone(), group, "members"))
        .await?;
    let marker = sentinel(&node, &ctx.hub, &[&m1, &m2, &outsider]).await?;
    exactly_once(&mut m1, &marker, b"members").await?;
    exactly_once(&mut m2, &marker, b"members").await?;
    outsider.quiet_until(&marker).await
}

/// A group message with an except-list skips the excluded members, on the sending node and on
/// another node, and reaches the other members once. Checklist A.4.
pub async fn group_send_except_skips_excluded(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let mut a_in = ctx.connect(&a, None).await?;
    let mut a_out = ctx.connect(&a, None).await?;
    let mut b_in = ctx.connect(&b, None).await?;
    let mut b_out = ctx.connect(&b, None).await?;
    for client in [&a_in, &a_out, &b_in, &b_out] {
        join(&a, &ctx.hub, &group, client).await?;
    }
    a.publish(
        Message::to_group(ctx.hub.clone(), group, "not for all")
            .except([a_out.id().clone(), b_out.id().clone()]),
    )
    .await?;
    let marker = sentinel(&a, &ctx.hub, &[&a_in, &a_out, &b_in, &b_out]).await?;
    exactly_once(&mut a_in, &marker, b"not for all").await?;
    exactly_once(&mut b_in, &marker, b"not for all").await?;
    a_out.quiet_until(&marker).await?;
    b_out.quiet_until(&marker).await
}

/// A group message sent from a node that holds no member reaches the members on another node
/// once, and not the non-members there. Checklist A.16.
pub async fn group_send_from_node_without_members(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let mut m1 = ctx.connect(&b, None).await?;
    let mut m2 = ctx.connect(&b, None).await?;
    let mut outsider = ctx.connect(&b, None).await?;
    join(&b, &ctx.hub, &group, &m1).await?;
    join(&b, &ctx.hub, &group, &m2).await?;
    check_eq!(a.local_connection_count(), 0);
    a.publish(Message::to_group(ctx.hub.clone(), group, "remote"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&m1, &m2, &outsider]).await?;
    exactly_once(&mut m1, &marker, b"remote").await?;
    exactly_once(&mut m2, &marker, b"remote").await?;
    outsider.quiet_until(&marker).await
}

/// Disconnecting a connection removes its memberships: the backplane no longer lists it, and
/// a new connection with the same id (and a fresh one) is not a member, whichever node sends.
/// Checklist A.17.
pub async fn disconnect_removes_group_membership(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let mut leaving = ctx.connect(&b, None).await?;
    let mut witness = ctx.connect(&b, None).await?;
    let id = leaving.id().clone();
    join(&a, &ctx.hub, &group, &leaving).await?;
    join(&a, &ctx.hub, &group, &witness).await?;
    // Before: the membership delivers, so node b has applied it to its own index too.
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "before"))
        .await?;
    leaving.expect(b"before").await?;
    witness.expect(b"before").await?;
    check!(
        b.disconnect(&ctx.hub, &id).await?,
        "disconnect found no connection"
    );
    drop(leaving);

    let backplane = ctx.backplane().await?;
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![witness.id().clone()]
    );
    check_eq!(
        backplane.connection_groups(&ctx.hub, &id).await?,
        Vec::<GroupName>::new()
    );

    let connection = b.connect(&ctx.hub, Some(id.clone()), None).await?;
    let mut returned = Client {
        node: b.clone(),
        connection,
    };
    let mut fresh = ctx.connect(&b, None).await?;
    check_eq!(
        backplane.connection_groups(&ctx.hub, &id).await?,
        Vec::<GroupName>::new()
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![witness.id().clone()]
    );

    for sender in [&a, &b] {
        sender
            .publish(Message::to_group(ctx.hub.clone(), group.clone(), "after"))
            .await?;
        let marker = sentinel(sender, &ctx.hub, &[&witness, &returned, &fresh]).await?;
        exactly_once(&mut witness, &marker, b"after").await?;
        returned.quiet_until(&marker).await?;
        fresh.quiet_until(&marker).await?;
    }
    Ok(())
}

/// Removing a local connection from a group it is not in returns `false` and changes nothing:
/// its other memberships still deliver. Checklist A.18.
pub async fn remove_local_not_member_is_noop(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let kept = GroupName::new("kept")?;
    let other = GroupName::new("other")?;
    let mut client = ctx.connect(&node, None).await?;
    join(&node, &ctx.hub, &kept, &client).await?;
    check!(
        !node
            .remove_from_group(&ctx.hub, &other, client.id())
            .await?,
        "removing a non-member reported a change"
    );
    let backplane = ctx.backplane().await?;
    check_eq!(
        backplane.connection_groups(&ctx.hub, client.id()).await?,
        vec![kept.clone()]
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &other).await?,
        Vec::<backplane_core::ConnectionId>::new()
    );
    node.publish(Message::to_group(ctx.hub.clone(), other, "never"))
        .await?;
    node.publish(Message::to_group(ctx.hub.clone(), kept, "still"))
        .await?;
    let marker = sentinel(&node, &ctx.hub, &[&client]).await?;
    exactly_once(&mut client, &marker, b"still").await
}

/// Removing a connection on another node from a group it is not in returns `false` within a
/// bounded time and changes nothing. Checklist A.19.
pub async fn remove_remote_not_member_is_noop(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let kept = GroupName::new("kept")?;
    let other = GroupName::new("other")?;
    let mut client = ctx.connect(&b, None).await?;
    join(&b, &ctx.hub, &kept, &client).await?;
    let removed = tokio::time::timeout(WAIT, a.remove_from_group(&ctx.hub, &other, client.id()))
        .await
        .map_err(|_| {
            CaseError::Failed(format!(
                "removing a remote non-member did not return within {WAIT:?}"
            ))
        })??;
    check!(!removed, "removing a remote non-member reported a change");
    let backplane = ctx.backplane().await?;
    check_eq!(
        backplane.connection_groups(&ctx.hub, client.id()).await?,
        vec![kept.clone()]
    );
    a.publish(Message::to_group(ctx.hub.clone(), other, "never"))
        .await?;
    a.publish(Message::to_group(ctx.hub.clone(), kept, "still"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    exactly_once(&mut client, &marker, b"still").await
}

/// A node adds a connection that lives on another node to a group; as soon as the call returns,
/// a group message from that node and from a third node reaches it, once each.
/// Checklist A.20.
pub async fn add_remote_connection_to_group(ctx: &mut Ctx) -> CaseResult {
    let [a, b, c] = ctx.nodes::<3>().await?;
    let group = GroupName::new("room")?;
    let mut client = ctx.connect(&b, None).await?;
    join(&a, &ctx.hub, &group, &client).await?;
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "from a"))
        .await?;
    c.publish(Message::to_group(ctx.hub.clone(), group.clone(), "from c"))
        .await?;
    let marker_a = sentinel(&a, &ctx.hub, &[&client]).await?;
    let marker_c = sentinel(&c, &ctx.hub, &[&client]).await?;
    // The two senders use different streams, so the two pairs may interleave; each message must
    // still precede its own sender's sentinel, and arrive once.
    let mut seen = Vec::new();
    let mut pending = 2;
    while pending > 0 {
        let delivery = client.recv().await?;
        if delivery.payload == marker_a || delivery.payload == marker_c {
            pending -= 1;
        }
        seen.push(delivery.payload);
    }
    let position = |p: &[u8]| seen.iter().position(|s| s.as_ref() == p);
    check_eq!(seen.len(), 4);
    match (
        position(b"from a"),
        position(&marker_a),
        position(b"from c"),
        position(&marker_c),
    ) {
        (Some(ma), Some(sa), Some(mc), Some(sc)) if ma < sa && mc < sc => Ok(()),
        _ => Err(CaseError::Failed(format!(
            "expected each group message before its sender's sentinel, got {:?}",
            seen.iter()
                .map(|p| String::from_utf8_lossy(p))
                .collect::<Vec<_>>()
        ))),
    }
}

/// Adding a local connection to a group it is already in returns `false`, and a group message
/// reaches it once, not twice. Checklist A.21.
pub async fn add_local_already_member_is_noop(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let group = GroupName::new("room")?;
    let mut client = ctx.connect(&node, None).await?;
    join(&node, &ctx.hub, &group, &client).await?;
    check!(
        !node.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a member again reported a change"
    );
    check_eq!(
        ctx.backplane()
            .await?
            .group_members(&ctx.hub, &group)
            .await?,
        vec![client.id().clone()]
    );
    node.publish(Message::to_group(ctx.hub.clone(), group, "once"))
        .await?;
    let marker = sentinel(&node, &ctx.hub, &[&client]).await?;
    exactly_once(&mut client, &marker, b"once").await
}

/// Adding a connection on another node to a group it is already in returns `false` (from
/// either node), and group messages from either node reach it once. Checklist A.22.
pub async fn add_remote_already_member_is_noop(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let mut client = ctx.connect(&b, None).await?;
    join(&a, &ctx.hub, &group, &client).await?;
    check!(
        !a.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a remote member again reported a change"
    );
    check!(
        !b.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a member again on its own node reported a change"
    );
    check_eq!(
        ctx.backplane()
            .await?
            .group_members(&ctx.hub, &group)
            .await?,
        vec![client.id().clone()]
    );
    for sender in [&a, &b] {
        sender
            .publish(Message::to_group(ctx.hub.clone(), group.clone(), "once"))
            .await?;
        let marker = sentinel(sender, &ctx.hub, &[&client]).await?;
        exactly_once(&mut client, &marker, b"once").await?;
    }
    Ok(())
}

/// A node removes a connection that lives on another node from a group: the call returns
/// `true`, and group messages sent afterwards, from that node or a third one, no longer reach
/// it while they still reach the remaining member. Checklist A.23.
pub async fn remove_remote_connection_from_group(ctx: &mut Ctx) -> CaseResult {
    let [a, b, c] = ctx.nodes::<3>().await?;
    let group = GroupName::new("room")?;
    let mut removed = ctx.connect(&b, None).await?;
    let mut witness = ctx.connect(&b, None).await?;
    join(&b, &ctx.hub, &group, &removed).await?;
    join(&b, &ctx.hub, &group, &witness).await?;
    // Before: the membership delivers.
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "before"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&removed, &witness]).await?;
    exactly_once(&mut removed, &marker, b"before").await?;
    exactly_once(&mut witness, &marker, b"before").await?;

    check!(
        a.remove_from_group(&ctx.hub, &group, removed.id()).await?,
        "removing a remote member reported no change"
    );
    check_eq!(
        ctx.backplane()
            .await?
            .group_members(&ctx.hub, &group)
            .await?,
        vec![witness.id().clone()]
    );
    for sender in [&a, &c] {
        sender
            .publish(Message::to_group(ctx.hub.clone(), group.clone(), "after"))
            .await?;
        let marker = sentinel(sender, &ctx.hub, &[&removed, &witness]).await?;
        exactly_once(&mut witness, &marker, b"after").await?;
        removed.quiet_until(&marker).await?;
    }
    Ok(())
}

/// A group member whose socket is gone (its receiver dropped) fails its delivery without
/// stopping the others: the remaining members, local and remote, still receive, and the
/// failure is counted. Checklist A.26.
pub async fn group_with_failing_member_still_delivers(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let a_failing = ctx.connect(&a, None).await?;
    let mut a_ok = ctx.connect(&a, None).await?;
    let b_failing = ctx.connect(&b, None).await?;
    let mut b_ok = ctx.connect(&b, None).await?;
    for client in [&a_failing, &a_ok, &b_failing, &b_ok] {
        join(&a, &ctx.hub, &group, client).await?;
    }
    drop(a_failing);
    drop(b_failing);
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "first"))
        .await?;
    a.publish(Message::to_group(ctx.hub.clone(), group, "second"))
        .await?;
    a_ok.expect(b"first").await?;
    a_ok.expect(b"second").await?;
    b_ok.expect(b"first").await?;
    b_ok.expect(b"second").await?;
    // Once a connection of a node got the sentinel, that node handled both group messages.
    let marker = sentinel(&a, &ctx.hub, &[&a_ok, &b_ok]).await?;
    a_ok.quiet_until(&marker).await?;
    b_ok.quiet_until(&marker).await?;
    check_eq!(a.stats().failed, 2);
    check_eq!(b.stats().failed, 2);
    Ok(())
}

/// The backplane lists a group's members and a connection's groups, sorted, the same through
/// every node's handle, and keeps the lists current after a removal.
/// No numbered checklist line: the `Backplane` contract's group listings, which A.17 to A.23
/// rely on.
pub async fn group_members_and_connection_groups_listed(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let zeta = GroupName::new("zeta")?;
    let alpha = GroupName::new("alpha")?;
    let mid = GroupName::new("mid")?;
    let c1 = ctx.connect(&a, None).await?;
    let c2 = ctx.connect(&b, None).await?;
    let c3 = ctx.connect(&b, None).await?;
    for group in [&zeta, &alpha, &mid] {
        join(&a, &ctx.hub, group, &c2).await?;
    }
    join(&b, &ctx.hub, &alpha, &c3).await?;
    join(&b, &ctx.hub, &alpha, &c1).await?;

    let mut all_members = vec![c1.id().clone(), c2.id().clone(), c3.id().clone()];
    all_members.sort();
    let handles = [
        a.backplane().clone(),
        b.backplane().clone(),
        ctx.backplane().await?,
    ];
    for backplane in &handles {
        check_eq!(
            backplane.group_members(&ctx.hub, &alpha).await?,
            all_members
        );
        check_eq!(
            backplane.group_members(&ctx.hub, &zeta).await?,
            vec![c2.id().clone()]
        );
        check_eq!(
            backplane.connection_groups(&ctx.hub, c2.id()).await?,
            vec![alpha.clone(), mid.clone(), zeta.clone()]
        );
        check_eq!(
            backplane.connection_groups(&ctx.hub, c1.id()).await?,
            vec![alpha.clone()]
        );
    }

    check!(
        b.remove_from_group(&ctx.hub, &mid, c2.id()).await?,
        "removing a member reported no change"
    );
    for backplane in &handles {
        check_eq!(
            backplane.connection_groups(&ctx.hub, c2.id()).await?,
            vec![alpha.clone(), zeta.clone()]
        );
        check_eq!(
            backplane.group_members(&ctx.hub, &mid).await?,
            Vec::<backplane_core::ConnectionId>::new()
        );
        check_eq!(
            backplane
                .group_members(&ctx.hub, &GroupName::new("nobody")?)
                .await?,
            Vec::<backplane_core::ConnectionId>::new()
        );
    }
    Ok(())
}

/// Adding a connection that exists nowhere (never did, or disconnected) to a group fails with
/// `UnknownConnection`, from any node, and stores nothing. No numbered checklist
/// line for groups (the `Backplane` contract's "Groups" rule); in the spirit of C.47.
pub async fn add_unknown_connection_to_group_errors(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let group = GroupName::new("room")?;
    let gone = ctx.connect(&b, None).await?;
    let gone_id = gone.id().clone();
    check!(
        b.disconnect(&ctx.hub, &gone_id).await?,
        "disconnect found no connection"
    );
    drop(gone);
    let ghost = backplane_core::ConnectionId::new("no-such-connection")?;
    for node in [&a, &b] {
        for id in [&ghost, &gone_id] {
            match node.add_to_group(&ctx.hub, &group, id).await {
                Err(Error::UnknownConnection(reported)) => check_eq!(reported, id.to_string()),
                other => {
                    return Err(CaseError::Failed(format!(
                        "adding unknown connection {id} expected UnknownConnection, got {other:?}"
                    )));
                }
            }
        }
    }
    let backplane = ctx.backplane().await?;
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        Vec::<backplane_core::ConnectionId>::new()
    );
    check_eq!(
        backplane.connection_groups(&ctx.hub, &ghost).await?,
        Vec::<GroupName>::new()
    );
    Ok(())
}

/// A message to several groups reaches a connection that is in more than one of them once,
/// on the sending node and on another node, and skips connections in none.
/// No numbered checklist line: `Target::Groups` with several groups; complements A.3.
pub async fn multiple_groups_deliver_once(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let g1 = GroupName::new("g1")?;
    let g2 = GroupName::new("g2")?;
    let mut a_both = ctx.connect(&a, None).await?;
    let mut b_both = ctx.connect(&b, None).await?;
    let mut b_one = ctx.connect(&b, None).await?;
    let mut b_none = ctx.connect(&b, None).await?;
    for client in [&a_both, &b_both] {
        join(&a, &ctx.hub, &g1, client).await?;
        join(&a, &ctx.hub, &g2, client).await?;
    }
    join(&a, &ctx.hub, &g2, &b_one).await?;
    for sender in [&a, &b] {
        sender
            .publish(Message::new(
                ctx.hub.clone(),
                Target::Groups(vec![g1.clone(), g2.clone()]),
                "both",
            ))
            .await?;
        let marker = sentinel(sender, &ctx.hub, &[&a_both, &b_both, &b_one, &b_none]).await?;
        exactly_once(&mut a_both, &marker, b"both").await?;
        exactly_once(&mut b_both, &marker, b"both").await?;
        exactly_once(&mut b_one, &marker, b"both").await?;
        b_none.quiet_until(&marker).await?;
    }
    Ok(())
}

/// Adding a connection on another node to a group commits the membership, then writes the
/// change to the log for the node that holds it; when that write fails the caller gets the
/// error, and a retry (which finds the membership already there) still tells the owning node,
/// so the group's messages reach the connection. The same for a removal: after the retry the
/// connection no longer gets the group's messages. Issue: a failed group-change record.
pub async fn group_change_reaches_the_owner_after_a_failed_record(ctx: &mut Ctx) -> CaseResult {
    let faulty = Faulty::new(ctx.backplane().await?);
    let a = ctx.node_on(faulty.clone(), test_options()).await?;
    let b = ctx.node().await?;
    let group = GroupName::new("room")?;
    let mut member = ctx.connect(&b, None).await?;

    faulty.fail_next(Op::Append, 1);
    check!(
        a.add_to_group(&ctx.hub, &group, member.id()).await.is_err(),
        "an add whose change record could not be written reported success"
    );
    check!(
        !a.add_to_group(&ctx.hub, &group, member.id()).await?,
        "the retried add found no membership: the first add did not commit it"
    );
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "joined"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&member]).await?;
    exactly_once(&mut member, &marker, b"joined").await?;

    faulty.fail_next(Op::Append, 1);
    check!(
        a.remove_from_group(&ctx.hub, &group, member.id())
            .await
            .is_err(),
        "a removal whose change record could not be written reported success"
    );
    check!(
        !a.remove_from_group(&ctx.hub, &group, member.id()).await?,
        "the retried removal found a membership: the first removal did not commit"
    );
    a.publish(Message::to_group(ctx.hub.clone(), group, "left"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&member]).await?;
    member.quiet_until(&marker).await
}

/// A connection is stored before the node that holds it indexes it; a group change another
/// node makes in between (and that the holder reads in between) is kept: once connected, the
/// connection gets the group's messages. Runs with one stream, so the change and the probe
/// that shows it was read share a stream. Issue: a group change while a connection registers.
pub async fn group_change_while_connecting_is_kept(ctx: &mut Ctx) -> CaseResult {
    let faulty = Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let a = ctx.node().await?;
    let group = GroupName::new("room")?;
    let mut witness = ctx.connect(&b, None).await?;

    faulty.hold_after(Op::AddConnection, true);
    let id = backplane_core::ConnectionId::random();
    let connecting = {
        let (b, hub, id) = (b.clone(), ctx.hub.clone(), id.clone());
        tokio::spawn(async move { b.connect(&hub, Some(id), None).await })
    };
    faulty.waiting_after(Op::AddConnection, 1).await?;
    check!(
        a.add_to_group(&ctx.hub, &group, &id).await?,
        "adding the connecting connection to a group reported no change"
    );
    // B reads the change before it indexes the connection.
    let marker = sentinel(&a, &ctx.hub, &[&witness]).await?;
    witness.quiet_until(&marker).await?;
    faulty.hold_after(Op::AddConnection, false);
    let connection = match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok(result)) => result?,
        Ok(Err(err)) => return Err(CaseError::Failed(format!("connect panicked: {err}"))),
        Err(_) => {
            return Err(CaseError::Failed(format!(
                "connect did not finish within {WAIT:?}"
            )));
        }
    };
    let mut joined = Client {
        node: b.clone(),
        connection,
    };
    a.publish(Message::to_group(ctx.hub.clone(), group, "to the room"))
        .await?;
    let marker = sentinel(&a, &ctx.hub, &[&joined]).await?;
    exactly_once(&mut joined, &marker, b"to the room").await
}
