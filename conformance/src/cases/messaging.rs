//! Messaging cases: broadcast, connection and user targets, except-lists, ordering.

use std::collections::HashMap;

use backplane_core::{ConnectionId, Error, Message, NodeEvent, Target, UserId};
use bytes::Bytes;

use crate::{CaseError, CaseResult, Ctx, WAIT, check, check_eq, sentinel};

/// A broadcast reaches every connection of the node. Checklist A.1.
pub async fn broadcast_reaches_all_local_connections(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut c1 = ctx.connect(&node, None).await?;
    let mut c2 = ctx.connect(&node, None).await?;
    node.publish(Message::to_all(ctx.hub.clone(), "hello"))
        .await?;
    c1.expect(b"hello").await?;
    c2.expect(b"hello").await
}

/// A broadcast skips a connection that disconnected before it. Checklist A.2.
pub async fn broadcast_skips_disconnected_connection(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut c1 = ctx.connect(&node, None).await?;
    let mut c2 = ctx.connect(&node, None).await?;
    check!(
        node.disconnect(&ctx.hub, c2.id()).await?,
        "disconnect found no connection"
    );
    node.publish(Message::to_all(ctx.hub.clone(), "hello"))
        .await?;
    c1.expect(b"hello").await?;
    check!(
        c2.closed().await?,
        "a disconnected connection received a message"
    );
    Ok(())
}

/// A message to one connection reaches it and no other. Checklist A.5.
pub async fn connection_send_reaches_connection(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut c1 = ctx.connect(&node, None).await?;
    let mut c2 = ctx.connect(&node, None).await?;
    node.publish(Message::to_connection(
        ctx.hub.clone(),
        c1.id().clone(),
        "one",
    ))
    .await?;
    c1.expect(b"one").await?;
    let marker = sentinel(&node, &ctx.hub, &[&c2]).await?;
    c2.quiet_until(&marker).await
}

/// A broadcast from one node reaches every connection on every node exactly once.
/// Checklist A.13.
pub async fn broadcast_reaches_every_node_once(ctx: &mut Ctx) -> CaseResult {
    let nodes = ctx.nodes::<4>().await?;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(ctx.connect(node, None).await?);
        clients.push(ctx.connect(node, None).await?);
    }
    nodes[0]
        .publish(Message::to_all(ctx.hub.clone(), "everyone"))
        .await?;
    let refs: Vec<&crate::Client> = clients.iter().collect();
    let marker = sentinel(&nodes[0], &ctx.hub, &refs).await?;
    for client in &mut clients {
        let before = client.until(&marker).await?;
        check_eq!(before.len(), 1);
        check_eq!(before[0].payload.as_ref(), b"everyone");
    }
    Ok(())
}

/// A broadcast from another node skips a connection that disconnected. Checklist A.14.
pub async fn broadcast_across_nodes_skips_disconnected(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut stays = ctx.connect(&b, None).await?;
    let mut leaves = ctx.connect(&b, None).await?;
    b.disconnect(&ctx.hub, leaves.id()).await?;
    a.publish(Message::to_all(ctx.hub.clone(), "hello")).await?;
    stays.expect(b"hello").await?;
    check!(
        leaves.closed().await?,
        "a disconnected connection received a message"
    );
    Ok(())
}

/// A message to a connection on another node reaches it. Checklist A.15.
pub async fn connection_send_from_other_node(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut target = ctx.connect(&b, None).await?;
    let mut other = ctx.connect(&b, None).await?;
    a.publish(Message::to_connection(
        ctx.hub.clone(),
        target.id().clone(),
        "direct",
    ))
    .await?;
    target.expect(b"direct").await?;
    let marker = sentinel(&a, &ctx.hub, &[&other]).await?;
    other.quiet_until(&marker).await
}

/// A message to a local connection is delivered once and never written to the log.
/// Checklist A.24.
pub async fn local_connection_send_skips_log(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut client = ctx.connect(&node, None).await?;
    let backplane = ctx.backplane().await?;
    let mut tails = Vec::new();
    for stream in 0..backplane.stream_count() {
        tails.push(backplane.tail(&ctx.hub, stream).await?);
    }
    node.publish(Message::to_connection(
        ctx.hub.clone(),
        client.id().clone(),
        "local",
    ))
    .await?;
    for (stream, before) in (0..).zip(&tails) {
        check_eq!(backplane.tail(&ctx.hub, stream).await?, *before);
    }
    client.expect(b"local").await?;
    let marker = sentinel(&node, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// Sending to a remote connection whose socket is gone does not fail the sender.
/// Checklist A.25.
pub async fn send_to_failing_remote_connection_is_ok(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let failing = ctx.connect(&b, None).await?;
    let id = failing.id().clone();
    drop(failing);
    let mut witness = ctx.connect(&b, None).await?;
    a.publish(Message::to_connection(ctx.hub.clone(), id, "lost"))
        .await?;
    // The failed write must not stall the node: a later message still arrives.
    a.publish(Message::to_connection(
        ctx.hub.clone(),
        witness.id().clone(),
        "after",
    ))
    .await?;
    witness.expect(b"after").await
}

/// A message to a user reaches all of the user's connections on every node, and nobody else.
/// Checklist A.27.
pub async fn user_send_reaches_all_user_connections(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut u1 = ctx.connect(&a, Some("alice")).await?;
    let mut u2 = ctx.connect(&b, Some("alice")).await?;
    let mut u3 = ctx.connect(&b, Some("alice")).await?;
    let mut other = ctx.connect(&b, Some("bob")).await?;
    a.publish(Message::to_user(
        ctx.hub.clone(),
        UserId::new("alice")?,
        "hi",
    ))
    .await?;
    u1.expect(b"hi").await?;
    u2.expect(b"hi").await?;
    u3.expect(b"hi").await?;
    let marker = sentinel(&a, &ctx.hub, &[&other]).await?;
    other.quiet_until(&marker).await
}

/// When one of a user's connections disconnects, the others still receive the user's
/// messages. Checklist A.28.
pub async fn user_still_reached_after_one_connection_disconnects(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let leaving = ctx.connect(&b, Some("alice")).await?;
    let mut staying = ctx.connect(&b, Some("alice")).await?;
    let mut remote = ctx.connect(&a, Some("alice")).await?;
    b.disconnect(&ctx.hub, leaving.id()).await?;
    a.publish(Message::to_user(
        ctx.hub.clone(),
        UserId::new("alice")?,
        "still",
    ))
    .await?;
    staying.expect(b"still").await?;
    remote.expect(b"still").await
}

/// A message to a connection that exists nowhere fails with `UnknownConnection` and sends
/// nothing, not even to the other listed connections. Checklist A.34.
pub async fn connection_send_to_unknown_connection_errors(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut known = ctx.connect(&b, None).await?;
    let ghost = ConnectionId::new("no-such-connection")?;
    let result = a
        .publish(Message::new(
            ctx.hub.clone(),
            Target::Connections(vec![known.id().clone(), ghost.clone()]),
            "x",
        ))
        .await;
    match result {
        Err(Error::UnknownConnection(id)) => check_eq!(id, ghost.to_string()),
        other => {
            return Err(CaseError::Failed(format!(
                "expected UnknownConnection, got {other:?}"
            )));
        }
    }
    let marker = sentinel(&a, &ctx.hub, &[&known]).await?;
    known.quiet_until(&marker).await
}

/// Except-lists hold for broadcasts, on the sending node and on others. Checklist A.4.
pub async fn except_list_on_broadcast(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut a1 = ctx.connect(&a, None).await?;
    let mut a2 = ctx.connect(&a, None).await?;
    let mut b1 = ctx.connect(&b, None).await?;
    let mut b2 = ctx.connect(&b, None).await?;
    a.publish(
        Message::to_all(ctx.hub.clone(), "not for all").except([a2.id().clone(), b2.id().clone()]),
    )
    .await?;
    let marker = sentinel(&a, &ctx.hub, &[&a1, &a2, &b1, &b2]).await?;
    for client in [&mut a1, &mut b1] {
        let before = client.until(&marker).await?;
        check_eq!(before.len(), 1);
    }
    a2.quiet_until(&marker).await?;
    b2.quiet_until(&marker).await
}

/// A connection id reused by another user is keyed to the new user only. Checklist A, extras
/// (a user id that changes re-keys the subscription).
pub async fn connection_reused_with_new_user_rekeys(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let id = ConnectionId::new("reused-connection")?;
    let first = b
        .connect(&ctx.hub, Some(id.clone()), Some(UserId::new("old-user")?))
        .await?;
    drop(first);
    b.disconnect(&ctx.hub, &id).await?;
    let connection = b
        .connect(&ctx.hub, Some(id.clone()), Some(UserId::new("new-user")?))
        .await?;
    let mut client = crate::Client {
        node: b.clone(),
        connection,
    };
    a.publish(Message::to_user(
        ctx.hub.clone(),
        UserId::new("old-user")?,
        "old",
    ))
    .await?;
    a.publish(Message::to_user(
        ctx.hub.clone(),
        UserId::new("new-user")?,
        "new",
    ))
    .await?;
    client.expect(b"new").await?;
    let users = ctx.backplane().await?.online_users(&ctx.hub).await?;
    check_eq!(users, vec![UserId::new("new-user")?]);
    Ok(())
}

/// Payload bytes cross the backplane unchanged: every byte value, camelCase JSON, invalid
/// UTF-8. Checklist A, extras.
pub async fn payload_bytes_cross_unchanged(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let payloads: Vec<Bytes> = vec![
        Bytes::from((0..=255u8).collect::<Vec<_>>()),
        Bytes::from_static(br#"{"camelCase":1,"nested":{"someValue":[true,null]}}"#),
        Bytes::from_static(&[0xff, 0xfe, 0x00, 0xc3]),
    ];
    for payload in &payloads {
        a.publish(Message::to_all(ctx.hub.clone(), payload.clone()))
            .await?;
    }
    for payload in &payloads {
        let got = client.recv().await?;
        check_eq!(&got.payload, payload);
    }
    Ok(())
}

/// Messages from one sender arrive in the order sent, at every node, while other senders
/// interleave. Checklist C (per-sender order), B.41 on the default stream count.
pub async fn per_sender_order_at_every_node(ctx: &mut Ctx) -> CaseResult {
    const PER_SENDER: usize = 300;
    let nodes = ctx.nodes::<3>().await?;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for node in &nodes {
        receivers.push(ctx.connect(node, None).await?);
        senders.push(ctx.connect(node, None).await?);
    }
    let mut tasks = Vec::new();
    for (node, sender) in nodes.iter().zip(&senders) {
        let (node, hub, id) = (node.clone(), ctx.hub.clone(), sender.id().clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                let payload = format!("{id}|{i}");
                node.publish(Message::to_all(hub.clone(), payload).sender(id.clone()))
                    .await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| CaseError::Failed(format!("publisher panicked: {e}")))??;
    }
    for receiver in &mut receivers {
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..PER_SENDER * senders.len() {
            let delivery = receiver.recv().await?;
            let text = String::from_utf8_lossy(&delivery.payload).into_owned();
            let (sender, seq) = text
                .split_once('|')
                .ok_or_else(|| CaseError::Failed(format!("unexpected payload {text}")))?;
            let seq: usize = seq
                .parse()
                .map_err(|_| CaseError::Failed(format!("unexpected payload {text}")))?;
            let expected = next.entry(sender.to_owned()).or_insert(0);
            check_eq!(seq, *expected);
            *expected += 1;
        }
    }
    Ok(())
}

/// A connection that joins while another node is publishing receives a gap-free tail of the
/// stream: once the first message reaches it, every later message does, once and in order.
/// Checklist C (subscribe while publishing).
pub async fn subscribe_while_publishing(ctx: &mut Ctx) -> CaseResult {
    const COUNT: u64 = 2000;
    let [a, b] = ctx.nodes::<2>().await?;
    let sender = ctx.connect(&a, None).await?;
    let (hub, id) = (ctx.hub.clone(), sender.id().clone());
    let publisher = a.clone();
    let task = tokio::spawn(async move {
        for i in 0..COUNT {
            publisher
                .publish(Message::to_all(hub.clone(), i.to_string()).sender(id.clone()))
                .await?;
        }
        Ok::<(), Error>(())
    });
    let mut late = ctx.connect(&b, None).await?;
    task.await
        .map_err(|e| CaseError::Failed(format!("publisher panicked: {e}")))??;
    // The marker comes from the same sender, so it shares the messages' stream and follows them.
    let marker = Bytes::from_static(b"subscribe-while-publishing-end");
    a.publish(
        Message::to_connection(ctx.hub.clone(), late.id().clone(), marker.clone())
            .sender(sender.id().clone()),
    )
    .await?;
    let got = late.until(&marker).await?;
    let seqs: Vec<u64> = got
        .iter()
        .map(|d| {
            String::from_utf8_lossy(&d.payload)
                .parse()
                .unwrap_or(u64::MAX)
        })
        .collect();
    if let Some(first) = seqs.first() {
        let expected: Vec<u64> = (*first..COUNT).collect();
        check_eq!(seqs, expected);
    }
    Ok(())
}

/// A connection that cannot keep up is closed at the first delivery that does not fit its
/// queue: it gets what was queued before, then the end, never a message from after the gap,
/// even when it makes room again before the node has unregistered it. Issue: a slow consumer
/// sees a silent gap.
pub async fn slow_consumer_sees_no_gap(ctx: &mut Ctx) -> CaseResult {
    const BUFFER: usize = 4;
    let a = ctx.node().await?;
    let b = ctx
        .node_with(crate::test_options().connection_buffer(BUFFER))
        .await?;
    let mut slow = ctx.connect(&b, None).await?;
    let mut witness = ctx.connect(&b, None).await?;
    let mut events = b.events();
    for i in 0..=BUFFER {
        a.publish(Message::to_connection(
            ctx.hub.clone(),
            slow.id().clone(),
            i.to_string(),
        ))
        .await?;
    }
    let id = slow.id().clone();
    crate::wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, NodeEvent::SlowConsumer { connection, .. } if connection == &id),
    )
    .await?;
    slow.expect(b"0").await?;
    for i in BUFFER + 1..BUFFER + 4 {
        a.publish(Message::to_all(ctx.hub.clone(), i.to_string()))
            .await?;
    }
    let marker = sentinel(&a, &ctx.hub, &[&witness]).await?;
    witness.until(&marker).await?;
    for i in 1..BUFFER {
        slow.expect(i.to_string().as_bytes()).await?;
    }
    check!(
        slow.closed().await?,
        "a slow consumer received a message sent after the one it missed"
    );
    Ok(())
}
