//! Presence cases: who is online where, user sessions, live nodes, and the reaping and
//! re-registration of nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use backplane_core::{
    ConnectionId, ConnectionInfo, GroupName, Job, Message, Node, NodeEvent, NodeId,
    SharedBackplane, UserId, UserSession,
};

use crate::{
    CaseError, CaseResult, Ctx, Faulty, Op, WAIT, check, check_eq, sentinel, test_options,
    until_after_jobs, wait_event,
};

/// The user's current session, failing the case when there is none.
async fn session(
    backplane: &SharedBackplane,
    ctx: &Ctx,
    user: &UserId,
) -> Result<UserSession, CaseError> {
    backplane
        .user_session(&ctx.hub, user)
        .await?
        .ok_or_else(|| CaseError::Failed(format!("user {user} has no session")))
}

/// The ids of the live nodes, as a set.
async fn live_ids(backplane: &SharedBackplane) -> Result<BTreeSet<NodeId>, CaseError> {
    Ok(backplane
        .live_nodes()
        .await?
        .into_iter()
        .map(|n| n.id)
        .collect())
}

/// Waits until `node` has run a whole heartbeat that started after this call: the first
/// heartbeat event may belong to a run already under way, the second cannot.
async fn heartbeats_after_now(node: &Node) -> CaseResult {
    let mut events = node.events();
    for _ in 0..2 {
        wait_event(&mut events, WAIT, |e| {
            matches!(e, NodeEvent::JobRan(Job::Heartbeat))
        })
        .await?;
    }
    Ok(())
}

/// A user with a connection on each of two nodes is online once, and `user_connections` lists
/// both connections with the hub, the user and the node that holds each; once both disconnect
/// the user has no connections and is offline. Checklist C.46.
pub async fn presence_user_online_and_connections(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let alice = UserId::new("alice")?;
    let on_a = ctx.connect(&a, Some("alice")).await?;
    let on_b = ctx.connect(&b, Some("alice")).await?;

    let found = backplane.user_connections(&ctx.hub, &alice).await?;
    let got: BTreeSet<(ConnectionId, NodeId)> = found
        .iter()
        .map(|c| (c.id.clone(), c.node.clone()))
        .collect();
    let expected: BTreeSet<(ConnectionId, NodeId)> = [
        (on_a.id().clone(), a.id().clone()),
        (on_b.id().clone(), b.id().clone()),
    ]
    .into_iter()
    .collect();
    check_eq!(found.len(), 2);
    check_eq!(got, expected);
    for info in &found {
        check_eq!(info.hub, ctx.hub);
        check_eq!(info.user, Some(alice.clone()));
    }
    check_eq!(backplane.online_users(&ctx.hub).await?, vec![alice.clone()]);
    let one = backplane.connection(&ctx.hub, on_b.id()).await?;
    check_eq!(one.map(|c| c.node), Some(b.id().clone()));

    check!(
        a.disconnect(&ctx.hub, on_a.id()).await?,
        "disconnect found no connection on node A"
    );
    let left = backplane.user_connections(&ctx.hub, &alice).await?;
    check_eq!(
        left.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![on_b.id().clone()]
    );
    check_eq!(backplane.online_users(&ctx.hub).await?, vec![alice.clone()]);

    check!(
        b.disconnect(&ctx.hub, on_b.id()).await?,
        "disconnect found no connection on node B"
    );
    check_eq!(backplane.user_connections(&ctx.hub, &alice).await?.len(), 0);
    check_eq!(backplane.online_users(&ctx.hub).await?.len(), 0);
    Ok(())
}

/// `online_users` lists every user with a connection on any node, once each, sorted; anonymous
/// connections add nobody, and a user leaves the list with their last connection.
/// Checklist C.46.
pub async fn presence_online_users(ctx: &mut Ctx) -> CaseResult {
    let nodes = ctx.nodes::<3>().await?;
    let backplane = ctx.backplane().await?;
    check_eq!(backplane.online_users(&ctx.hub).await?.len(), 0);
    let carol = ctx.connect(&nodes[0], Some("carol")).await?;
    let _alice_1 = ctx.connect(&nodes[1], Some("alice")).await?;
    let _bob = ctx.connect(&nodes[2], Some("bob")).await?;
    let _alice_2 = ctx.connect(&nodes[2], Some("alice")).await?;
    let _anonymous = ctx.connect(&nodes[0], None).await?;
    let expected = vec![
        UserId::new("alice")?,
        UserId::new("bob")?,
        UserId::new("carol")?,
    ];
    check_eq!(backplane.online_users(&ctx.hub).await?, expected);

    check!(
        nodes[0].disconnect(&ctx.hub, carol.id()).await?,
        "disconnect found no connection"
    );
    check_eq!(
        backplane.online_users(&ctx.hub).await?,
        vec![UserId::new("alice")?, UserId::new("bob")?]
    );
    Ok(())
}

/// Disconnecting a connection removes it from the backplane everywhere: the connection itself,
/// the user's connections, the online users, and its group memberships; a second disconnect
/// finds nothing. Checklist C.46 and A.17.
pub async fn presence_removed_on_disconnect(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let group = GroupName::new("room")?;
    let client = ctx.connect(&b, Some("dave")).await?;
    check!(
        a.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a remote connection to a group reported no change"
    );
    let info = backplane.connection(&ctx.hub, client.id()).await?;
    check_eq!(info.map(|c| c.node), Some(b.id().clone()));
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![client.id().clone()]
    );

    check!(
        b.disconnect(&ctx.hub, client.id()).await?,
        "disconnect found no connection"
    );
    check!(
        backplane.connection(&ctx.hub, client.id()).await?.is_none(),
        "the disconnected connection is still registered"
    );
    check_eq!(backplane.user_connections(&ctx.hub, &dave).await?.len(), 0);
    check_eq!(backplane.online_users(&ctx.hub).await?.len(), 0);
    check_eq!(backplane.group_members(&ctx.hub, &group).await?.len(), 0);
    check_eq!(
        backplane
            .connection_groups(&ctx.hub, client.id())
            .await?
            .len(),
        0
    );
    check_eq!(b.local_connection_count(), 0);
    check!(
        !b.disconnect(&ctx.hub, client.id()).await?,
        "a second disconnect reported a connection"
    );
    Ok(())
}

/// Closing a node's connections (a server's graceful shutdown) ends each one's deliveries,
/// what was queued first, but keeps it registered until it disconnects itself; a message
/// sent to it meanwhile is not delivered and breaks nothing.
pub async fn closed_connections_stay_registered_until_they_disconnect(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let erin = UserId::new("erin")?;
    let mut client = ctx.connect(&b, Some("erin")).await?;
    b.publish(Message::to_connection(
        ctx.hub.clone(),
        client.id().clone(),
        b"queued".to_vec(),
    ))
    .await?;
    let got = client.recv().await?;
    check_eq!(&got.payload[..], b"queued");
    b.close_connections();
    let end = tokio::time::timeout(WAIT, client.connection.recv()).await;
    check!(
        matches!(end, Ok(None)),
        "a closed connection did not see the end of its deliveries: {end:?}"
    );
    a.publish(Message::to_connection(
        ctx.hub.clone(),
        client.id().clone(),
        b"late".to_vec(),
    ))
    .await?;
    check_eq!(backplane.user_connections(&ctx.hub, &erin).await?.len(), 1);
    check_eq!(b.local_connection_count(), 1);
    check!(
        b.disconnect(&ctx.hub, client.id()).await?,
        "disconnect found no connection"
    );
    check_eq!(backplane.user_connections(&ctx.hub, &erin).await?.len(), 0);
    check_eq!(b.local_connection_count(), 0);
    // A connection made after the close is served as usual.
    let mut later = ctx.connect(&b, Some("erin")).await?;
    a.publish(Message::to_user(ctx.hub.clone(), erin, b"again".to_vec()))
        .await?;
    check_eq!(&later.recv().await?.payload[..], b"again");
    Ok(())
}

/// A user's session opens with their first connection (start time, one connection), counts a
/// second connection on another node, stays open while one remains, and ends with the last
/// disconnect (end time, zero connections); a heartbeat of a node holding one of the user's
/// connections moves its last activity forward, and a new connection opens a new session.
/// Checklist C.46.
pub async fn user_session_lifecycle(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let erin = UserId::new("erin")?;
    check!(
        backplane.user_session(&ctx.hub, &erin).await?.is_none(),
        "a user who never connected has a session"
    );

    let first = ctx.connect(&a, Some("erin")).await?;
    let opened = session(&backplane, ctx, &erin).await?;
    check_eq!(opened.user, erin);
    check_eq!(opened.connections, 1);
    check_eq!(opened.ended_at, None);
    check!(
        opened.last_activity >= opened.started_at,
        "last activity {:?} precedes the session start {:?}",
        opened.last_activity,
        opened.started_at
    );

    let second = ctx.connect(&b, Some("erin")).await?;
    let both = session(&backplane, ctx, &erin).await?;
    check_eq!(both.connections, 2);
    check_eq!(both.started_at, opened.started_at);
    check_eq!(both.ended_at, None);
    check!(
        both.last_activity >= opened.last_activity,
        "last activity went back from {:?} to {:?}",
        opened.last_activity,
        both.last_activity
    );

    // A heartbeat of node A, which holds one of erin's connections, touches the session.
    heartbeats_after_now(&a).await?;
    let touched = session(&backplane, ctx, &erin).await?;
    check!(
        touched.last_activity > both.last_activity,
        "a heartbeat did not move last activity forward: {:?} then {:?}",
        both.last_activity,
        touched.last_activity
    );
    check_eq!(touched.connections, 2);

    check!(
        a.disconnect(&ctx.hub, first.id()).await?,
        "disconnect found no connection"
    );
    let one_left = session(&backplane, ctx, &erin).await?;
    check_eq!(one_left.connections, 1);
    check_eq!(one_left.ended_at, None);
    check_eq!(one_left.started_at, opened.started_at);

    check!(
        b.disconnect(&ctx.hub, second.id()).await?,
        "disconnect found no connection"
    );
    let ended = session(&backplane, ctx, &erin).await?;
    check_eq!(ended.connections, 0);
    check_eq!(ended.started_at, opened.started_at);
    let Some(ended_at) = ended.ended_at else {
        return Err(CaseError::Failed(
            "the session has no end after the last disconnect".into(),
        ));
    };
    check!(
        ended_at >= touched.last_activity,
        "the session ended at {ended_at:?}, before its last activity {:?}",
        touched.last_activity
    );
    check!(
        ended.last_activity >= touched.last_activity,
        "last activity went back from {:?} to {:?}",
        touched.last_activity,
        ended.last_activity
    );

    let _again = ctx.connect(&b, Some("erin")).await?;
    let reopened = session(&backplane, ctx, &erin).await?;
    check_eq!(reopened.connections, 1);
    check_eq!(reopened.ended_at, None);
    check!(
        reopened.started_at >= ended_at && reopened.started_at > opened.started_at,
        "a new connection after the session ended did not start a new session: {:?}",
        reopened
    );
    Ok(())
}

/// Both nodes lose the backplane for longer than the node timeout, as in a database outage.
/// Node A gets through first: it does not take B for dead while B's heartbeat is only as old
/// as the outage, so B's connection stays; B, still cut off a node timeout later, is reaped.
pub async fn reaping_waits_for_other_nodes_after_an_outage(ctx: &mut Ctx) -> CaseResult {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let backplane = ctx.backplane().await?;
    let (fa, fb) = (
        Faulty::new(ctx.backplane().await?),
        Faulty::new(ctx.backplane().await?),
    );
    let options = test_options().connection_timeout(TIMEOUT);
    let a = ctx.node_on(fa.clone(), options.clone()).await?;
    let b = ctx.node_on(fb.clone(), options).await?;
    let kept = ctx.connect(&b, Some("kept")).await?;

    for faulty in [&fa, &fb] {
        faulty.fail_next(Op::Heartbeat, usize::MAX);
        faulty.fail_next(Op::ReapNodes, usize::MAX);
    }
    until_after_jobs(
        &a,
        Job::Heartbeat,
        "B's heartbeat grew older than the node timeout",
        || async {
            let nodes = backplane.live_nodes().await?;
            Ok(nodes.iter().any(|n| {
                &n.id == b.id()
                    && n.last_heartbeat.elapsed().unwrap_or_default() > TIMEOUT + TIMEOUT / 4
            }))
        },
    )
    .await?;

    // A is back, B not yet.
    fa.fail_next(Op::Heartbeat, 0);
    fa.fail_next(Op::ReapNodes, 0);
    let mut events = a.events();
    let mut runs = 0;
    until_after_jobs(&a, Job::Reap, "A reaped twice after the outage", || {
        runs += 1;
        std::future::ready(Ok(runs > 2))
    })
    .await?;
    check!(
        backplane.connection(&ctx.hub, kept.id()).await?.is_some(),
        "a node back from an outage reaped another before it could heartbeat again"
    );

    let cut_off = b.id().clone();
    wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, NodeEvent::NodesReaped(nodes) if nodes.contains(&cut_off)),
    )
    .await?;
    fb.fail_next(Op::Heartbeat, 0);
    fb.fail_next(Op::ReapNodes, 0);
    Ok(())
}

/// A node that crashes (stops heartbeating without unregistering) is reaped by a live node,
/// which reports it in `NodesReaped`; its connections, presence, group memberships and user
/// sessions go with it, while the live node's own connection stays. Checklist B.42, C.46
/// (cleanup of stale connections).
pub async fn dead_node_is_reaped(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let frank = UserId::new("frank")?;
    let group = GroupName::new("room")?;
    let survivor = ctx.connect(&a, Some("grace")).await?;
    let doomed = ctx.connect(&b, Some("frank")).await?;
    check!(
        a.add_to_group(&ctx.hub, &group, doomed.id()).await?,
        "adding a remote connection to a group reported no change"
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![doomed.id().clone()]
    );
    check_eq!(
        backplane.online_users(&ctx.hub).await?,
        vec![frank.clone(), UserId::new("grace")?]
    );

    let mut events = a.events();
    b.abandon().await;
    let dead = b.id().clone();
    wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, NodeEvent::NodesReaped(nodes) if nodes.contains(&dead)),
    )
    .await?;

    let live = live_ids(&backplane).await?;
    check!(
        !live.contains(&dead),
        "the reaped node is still listed as live"
    );
    check!(live.contains(a.id()), "the live node was reaped too");
    check!(
        backplane.connection(&ctx.hub, doomed.id()).await?.is_none(),
        "the dead node's connection is still registered"
    );
    check_eq!(backplane.user_connections(&ctx.hub, &frank).await?.len(), 0);
    check_eq!(
        backplane.online_users(&ctx.hub).await?,
        vec![UserId::new("grace")?]
    );
    check_eq!(backplane.group_members(&ctx.hub, &group).await?.len(), 0);
    check_eq!(
        backplane
            .connection_groups(&ctx.hub, doomed.id())
            .await?
            .len(),
        0
    );
    let closed = session(&backplane, ctx, &frank).await?;
    check_eq!(closed.connections, 0);
    check!(
        closed.ended_at.is_some(),
        "the dead node's user still has an open session"
    );
    let info = backplane.connection(&ctx.hub, survivor.id()).await?;
    check_eq!(info.map(|c| c.node), Some(a.id().clone()));
    Ok(())
}

/// Unregistering a node removes it with its connections and their memberships at once; a live
/// node whose registration was removed behind its back (as if it had been reaped during a
/// pause) notices on its next heartbeat, emits `Reregistered`, and registers itself, its
/// connections and their group memberships again, so group messages from other nodes reach
/// them. Checklist B.42.
pub async fn reaped_node_registers_again(ctx: &mut Ctx) -> CaseResult {
    let [a, b, crashed] = ctx.nodes::<3>().await?;
    let backplane = ctx.backplane().await?;
    let heidi = UserId::new("heidi")?;
    let group = GroupName::new("room")?;
    let mut client = ctx.connect(&b, Some("heidi")).await?;
    let gone = ctx.connect(&crashed, Some("ivan")).await?;
    check!(
        b.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a local connection to a group reported no change"
    );
    check!(
        crashed.add_to_group(&ctx.hub, &group, gone.id()).await?,
        "adding a local connection to a group reported no change"
    );

    // A node that no longer heartbeats, so nothing re-registers it: unregistering it removes
    // its connection and membership and nothing else.
    crashed.abandon().await;
    backplane.unregister_node(crashed.id()).await?;
    check!(
        !live_ids(&backplane).await?.contains(crashed.id()),
        "an unregistered node is still listed as live"
    );
    check!(
        backplane.connection(&ctx.hub, gone.id()).await?.is_none(),
        "unregistering a node left its connection registered"
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![client.id().clone()]
    );
    check_eq!(backplane.online_users(&ctx.hub).await?, vec![heidi.clone()]);

    // A node that is alive: it registers again on its next heartbeat.
    let mut events = b.events();
    backplane.unregister_node(b.id()).await?;
    wait_event(&mut events, WAIT, |e| matches!(e, NodeEvent::Reregistered)).await?;
    check!(
        live_ids(&backplane).await?.contains(b.id()),
        "the node did not register again"
    );
    let info = backplane.connection(&ctx.hub, client.id()).await?;
    check_eq!(info.as_ref().map(|c| c.node.clone()), Some(b.id().clone()));
    check_eq!(info.and_then(|c| c.user), Some(heidi.clone()));
    check_eq!(
        backplane.connection_groups(&ctx.hub, client.id()).await?,
        vec![group.clone()]
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![client.id().clone()]
    );
    check_eq!(
        backplane
            .user_connections(&ctx.hub, &heidi)
            .await?
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![client.id().clone()]
    );
    check_eq!(backplane.online_users(&ctx.hub).await?, vec![heidi.clone()]);

    a.publish(Message::to_group(ctx.hub.clone(), group, "back"))
        .await?;
    client.expect(b"back").await?;
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// A node lists where other nodes reach it, stored as given (quotes and all); a node that
/// said nothing lists none; registering again replaces the address.
pub async fn node_addresses_listed(ctx: &mut Ctx) -> CaseResult {
    let address = "http://10.0.0.5:5000/it's;--";
    let a = ctx.node_with(test_options().address(address)).await?;
    let b = ctx.node_with(test_options()).await?;
    let backplane = ctx.backplane().await?;
    let listed = |nodes: &[backplane_core::NodeInfo], id: &NodeId| {
        nodes
            .iter()
            .find(|n| &n.id == id)
            .map(|n| n.address.clone())
            .ok_or_else(|| CaseError::Failed(format!("node {id} is not listed")))
    };
    let nodes = backplane.live_nodes().await?;
    check_eq!(listed(&nodes, a.id())?, Some(address.to_owned()));
    check_eq!(listed(&nodes, b.id())?, None);
    backplane
        .register_node(b.id(), Some("https://node-b.internal"))
        .await?;
    backplane.register_node(a.id(), None).await?;
    let nodes = backplane.live_nodes().await?;
    check_eq!(
        listed(&nodes, b.id())?,
        Some("https://node-b.internal".to_owned())
    );
    check_eq!(listed(&nodes, a.id())?, None);
    Ok(())
}

/// `live_nodes` lists exactly the running nodes with sane timestamps, heartbeats move
/// `last_heartbeat` forward, and a node that shuts down leaves the list. Checklist C.46,
/// B.42.
pub async fn live_nodes_listed(ctx: &mut Ctx) -> CaseResult {
    let nodes = ctx.nodes::<3>().await?;
    let backplane = ctx.backplane().await?;
    let expected: BTreeSet<NodeId> = nodes.iter().map(|n| n.id().clone()).collect();
    let listed = backplane.live_nodes().await?;
    check_eq!(listed.len(), 3);
    check_eq!(
        listed.iter().map(|n| n.id.clone()).collect::<BTreeSet<_>>(),
        expected
    );
    for info in &listed {
        check!(
            info.last_heartbeat >= info.started_at,
            "node {} heartbeat {:?} precedes its start {:?}",
            info.id,
            info.last_heartbeat,
            info.started_at
        );
    }

    let first = nodes[0].id().clone();
    let before = listed
        .iter()
        .find(|n| n.id == first)
        .map(|n| n.last_heartbeat)
        .ok_or_else(|| CaseError::Failed("the first node is not listed".into()))?;
    heartbeats_after_now(&nodes[0]).await?;
    let after = backplane
        .live_nodes()
        .await?
        .into_iter()
        .find(|n| n.id == first)
        .ok_or_else(|| CaseError::Failed("the first node is no longer listed".into()))?;
    check!(
        after.last_heartbeat > before,
        "a heartbeat did not move last_heartbeat forward: {before:?} then {:?}",
        after.last_heartbeat
    );

    nodes[1].shutdown().await;
    let remaining: BTreeSet<NodeId> = [nodes[0].id().clone(), nodes[2].id().clone()]
        .into_iter()
        .collect();
    check_eq!(live_ids(&backplane).await?, remaining);
    Ok(())
}

/// A node that restarts with the same id after a crash starts afresh: the connections, group
/// memberships and session counts its previous run left are gone once it is up, and nothing
/// of them is listed as online (the new run's heartbeats would otherwise keep them forever).
/// Issue: a node restarted with the same node id.
pub async fn restarted_node_drops_its_previous_connections(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let id = NodeId::new(format!("restarted-{}", ConnectionId::random()))?;
    let ivan = UserId::new("ivan")?;
    let group = GroupName::new("room")?;
    let first = ctx.node_with(test_options().id(id.clone())).await?;
    let other = ctx.node().await?;
    let stale = ctx.connect(&first, Some("ivan")).await?;
    let _judy = ctx.connect(&other, Some("judy")).await?;
    check!(
        first.add_to_group(&ctx.hub, &group, stale.id()).await?,
        "adding a local connection to a group reported no change"
    );
    first.abandon().await;

    let second = ctx.node_with(test_options().id(id.clone())).await?;
    check!(
        backplane.connection(&ctx.hub, stale.id()).await?.is_none(),
        "the connection of the node's previous run is still registered after it restarted"
    );
    check_eq!(backplane.group_members(&ctx.hub, &group).await?.len(), 0);
    check_eq!(
        backplane.online_users(&ctx.hub).await?,
        vec![UserId::new("judy")?]
    );
    check_eq!(session(&backplane, ctx, &ivan).await?.connections, 0);
    check!(
        live_ids(&backplane).await?.contains(&id),
        "the restarted node is not listed as live"
    );

    // The restarted node works as any other.
    let mut fresh = ctx.connect(&second, Some("ivan")).await?;
    check_eq!(session(&backplane, ctx, &ivan).await?.connections, 1);
    other
        .publish(Message::to_user(ctx.hub.clone(), ivan, "welcome back"))
        .await?;
    fresh.expect(b"welcome back").await?;
    let marker = sentinel(&other, &ctx.hub, &[&fresh]).await?;
    fresh.quiet_until(&marker).await
}

/// A connection whose node is not registered, as when its insert committed while its node was
/// being reaped (the reap's snapshot did not see it), is removed by the next reap, with its
/// memberships and its user's session count, although no node is reaped then; connections
/// of registered nodes stay. A driver may instead refuse to register it. Issue: a connection
/// inserted while its node is reaped.
pub async fn reap_removes_connections_of_unregistered_nodes(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let live = NodeId::new("live-node")?;
    let gone = NodeId::new("gone-node")?;
    let group = GroupName::new("room")?;
    let olga = UserId::new("olga")?;
    backplane.register_node(&live, None).await?;
    let info = |id: &str, user: &UserId, node: &NodeId| -> Result<ConnectionInfo, CaseError> {
        Ok(ConnectionInfo {
            hub: ctx.hub.clone(),
            id: ConnectionId::new(id)?,
            user: Some(user.clone()),
            node: node.clone(),
            connected_at: std::time::SystemTime::now(),
        })
    };
    let kept = info("kept", &UserId::new("pat")?, &live)?;
    backplane.add_connection(&kept).await?;
    let orphan = info("orphan", &olga, &gone)?;
    match backplane.add_connection(&orphan).await {
        Ok(()) => {}
        // Refusing the connection of an unregistered node keeps the contract too.
        Err(_) => {
            check!(
                backplane.connection(&ctx.hub, &orphan.id).await?.is_none(),
                "a connection whose registration failed is registered"
            );
            return Ok(());
        }
    }
    backplane.add_to_group(&ctx.hub, &group, &orphan.id).await?;
    backplane.add_to_group(&ctx.hub, &group, &kept.id).await?;

    let reaped = backplane
        .reap_nodes(std::time::Duration::from_secs(3600))
        .await?;
    check!(
        reaped.is_empty(),
        "no node was due, yet {reaped:?} were reaped"
    );
    check!(
        backplane.connection(&ctx.hub, &orphan.id).await?.is_none(),
        "the connection of an unregistered node survived a reap"
    );
    check_eq!(
        backplane.group_members(&ctx.hub, &group).await?,
        vec![kept.id.clone()]
    );
    check_eq!(
        backplane.online_users(&ctx.hub).await?,
        vec![UserId::new("pat")?]
    );
    let closed = session(&backplane, ctx, &olga).await?;
    check_eq!(closed.connections, 0);
    check!(
        closed.ended_at.is_some(),
        "the orphaned connection's user still has an open session"
    );
    let still = backplane.connection(&ctx.hub, &kept.id).await?;
    check_eq!(still.map(|c| c.node), Some(live.clone()));
    Ok(())
}

/// Removing a connection names the node that registered it: the same id registered by another
/// node stays, and its owner can still remove it.
pub async fn connection_removed_only_by_its_node(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let owner = NodeId::new("owner-node")?;
    let other = NodeId::new("other-node")?;
    backplane.register_node(&owner, None).await?;
    backplane.register_node(&other, None).await?;
    let id = ConnectionId::new("shared-id")?;
    backplane
        .add_connection(&ConnectionInfo {
            hub: ctx.hub.clone(),
            id: id.clone(),
            user: Some(UserId::new("quinn")?),
            node: owner.clone(),
            connected_at: std::time::SystemTime::now(),
        })
        .await?;
    check!(
        backplane
            .remove_connection(&ctx.hub, &id, &other)
            .await?
            .is_none(),
        "another node removed a connection it did not register"
    );
    let info = backplane.connection(&ctx.hub, &id).await?;
    check_eq!(info.map(|c| c.node), Some(owner.clone()));
    let removed = backplane.remove_connection(&ctx.hub, &id, &owner).await?;
    check_eq!(removed.map(|c| c.node), Some(owner.clone()));
    check!(
        backplane.connection(&ctx.hub, &id).await?.is_none(),
        "a removed connection is still registered"
    );
    Ok(())
}

/// A disconnect whose removal the backplane failed to record is retried by the heartbeat; if
/// meanwhile the same connection id was removed and registered on another node (a client that
/// resumed there), the retry leaves that registration alone. Issue: removing an orphan without
/// naming its node.
pub async fn orphan_retry_spares_the_id_on_another_node(ctx: &mut Ctx) -> CaseResult {
    let faulty = Faulty::new(ctx.backplane().await?);
    let a = ctx.node_on(faulty.clone(), test_options()).await?;
    let b = ctx.node().await?;
    let backplane = ctx.backplane().await?;
    let client = ctx.connect(&a, Some("rita")).await?;
    let id = client.id().clone();
    faulty.fail_next(Op::RemoveConnection, 1);
    check!(
        a.disconnect(&ctx.hub, &id).await.is_err(),
        "a disconnect whose removal failed reported success"
    );
    // The row goes (as a reap would take it), and the client resumes on B with the same id.
    backplane.remove_connection(&ctx.hub, &id, a.id()).await?;
    let resumed = b
        .connect(&ctx.hub, Some(id.clone()), Some(UserId::new("rita")?))
        .await?;
    heartbeats_after_now(&a).await?;
    let info = backplane.connection(&ctx.hub, &id).await?;
    check_eq!(info.map(|c| c.node), Some(b.id().clone()));
    drop(resumed);
    Ok(())
}

/// A live node reaped behind its back (a long pause) registers its connections and their
/// groups again from memory; a group removal another node made meanwhile is not undone by
/// that, and the connection's other groups are kept. The node's heartbeat and log reads are
/// held so that it registers again while the removal is still unread. Issue: a
/// reaped-then-returning node re-registers groups from memory.
pub async fn removal_while_reaped_is_not_undone(ctx: &mut Ctx) -> CaseResult {
    let faulty = Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let a = ctx.node().await?;
    let backplane = ctx.backplane().await?;
    let left = GroupName::new("left")?;
    let kept = GroupName::new("kept")?;
    let mut client = ctx.connect(&b, Some("sam")).await?;
    for group in [&left, &kept] {
        check!(
            b.add_to_group(&ctx.hub, group, client.id()).await?,
            "adding a local connection to a group reported no change"
        );
    }

    faulty.hold_before(Op::Heartbeat, true);
    faulty.hold_before(Op::Read, true);
    // A heartbeat already past the gate could otherwise land after the removal below, find the
    // node gone and register it again before the registration is held.
    faulty.waiting_before(Op::Heartbeat, 1).await?;
    backplane.unregister_node(b.id()).await?;
    // Not a member any more in the shared state: the reap took every membership.
    check!(
        !a.remove_from_group(&ctx.hub, &left, client.id()).await?,
        "removing a reaped connection from a group reported a change"
    );
    faulty.waiting_before(Op::Read, 1).await?;
    let mut events = b.events();
    faulty.hold_after(Op::RegisterNode, true);
    faulty.hold_before(Op::Heartbeat, false);
    faulty.waiting_after(Op::RegisterNode, 1).await?;
    faulty.hold_after(Op::RegisterNode, false);
    faulty.hold_before(Op::Read, false);
    wait_event(&mut events, WAIT, |e| matches!(e, NodeEvent::Reregistered)).await?;

    check_eq!(
        backplane.connection_groups(&ctx.hub, client.id()).await?,
        vec![kept.clone()]
    );
    a.publish(Message::to_group(ctx.hub.clone(), left, "private"))
        .await?;
    a.publish(Message::to_group(ctx.hub.clone(), kept, "still here"))
        .await?;
    client.expect(b"still here").await?;
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}
