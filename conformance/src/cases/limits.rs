//! Limits, bad input and isolation.

use backplane_core::{
    ConnectionId, DEFAULT_MAX_PAYLOAD, Error, GroupName, HubName, Message, NameKind, UserId,
};
use bytes::Bytes;

use crate::{CaseError, CaseResult, Ctx, check, check_eq, connect, sentinel, test_options};

/// Payloads of 7 999, 8 000, 8 001 bytes and the 1 MiB maximum cross nodes intact.
/// Checklist B.38.
pub async fn payload_sizes_cross_nodes(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let sizes = [7_999, 8_000, 8_001, DEFAULT_MAX_PAYLOAD];
    for size in sizes {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251).to_le_bytes()[0]).collect();
        a.publish(Message::to_all(ctx.hub.clone(), payload)).await?;
    }
    for size in sizes {
        let got = client.recv().await?;
        check_eq!(got.payload.len(), size);
        check!(
            got.payload
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251).to_le_bytes()[0]),
            "payload of {size} bytes was altered"
        );
    }
    Ok(())
}

/// A payload of exactly the maximum is accepted; one byte more fails with `PayloadTooLarge`
/// and nothing is stored or sent. Checklist C.47.
pub async fn payload_limit_exact_and_over(ctx: &mut Ctx) -> CaseResult {
    let max = 4096;
    let [a, b] = [
        ctx.node_with(test_options().max_payload(max)).await?,
        ctx.node_with(test_options().max_payload(max)).await?,
    ];
    let mut client = ctx.connect(&b, Some("u")).await?;
    let backplane = ctx.backplane().await?;
    let stream_count = backplane.stream_count();
    let mut tails = Vec::new();
    for stream in 0..stream_count {
        tails.push(backplane.tail(&ctx.hub, stream).await?);
    }
    let over = Message::to_all(ctx.hub.clone(), vec![1u8; max + 1]);
    match a.publish(over).await {
        Err(Error::PayloadTooLarge { size, max: limit }) => {
            check_eq!(size, max + 1);
            check_eq!(limit, max);
        }
        other => {
            return Err(CaseError::Failed(format!(
                "expected PayloadTooLarge, got {other:?}"
            )));
        }
    }
    let durable_over = Message::to_user(ctx.hub.clone(), UserId::new("u")?, vec![1u8; max + 1])
        .durable(std::time::Duration::from_secs(60));
    check!(
        matches!(
            a.publish(durable_over).await,
            Err(Error::PayloadTooLarge { .. })
        ),
        "an oversized durable message was accepted"
    );
    check_eq!(backplane.pending_count().await?, 0);
    for (stream, before) in (0..).zip(&tails) {
        check_eq!(backplane.tail(&ctx.hub, stream).await?, *before);
    }
    a.publish(Message::to_all(ctx.hub.clone(), vec![2u8; max]))
        .await?;
    let got = client.recv().await?;
    check_eq!(got.payload.len(), max);
    Ok(())
}

/// Empty, whitespace-only, too long and control-character names are rejected with
/// `InvalidName` naming the kind. Checklist C.47.
pub async fn invalid_names_rejected(ctx: &mut Ctx) -> CaseResult {
    let _ = ctx;
    let cases: Vec<(NameKind, Result<(), Error>)> = vec![
        (NameKind::Group, GroupName::new("").map(drop)),
        (NameKind::Group, GroupName::new("a\0b").map(drop)),
        (NameKind::Group, GroupName::new("g".repeat(257)).map(drop)),
        (NameKind::User, UserId::new("").map(drop)),
        (NameKind::User, UserId::new("line\nbreak").map(drop)),
        (NameKind::User, UserId::new("u".repeat(257)).map(drop)),
        (
            NameKind::Connection,
            ConnectionId::new("with space").map(drop),
        ),
        (
            NameKind::Connection,
            ConnectionId::new("c".repeat(129)).map(drop),
        ),
        (NameKind::Hub, HubName::new("no/slash").map(drop)),
        (NameKind::Hub, HubName::new("").map(drop)),
    ];
    for (expected, result) in cases {
        match result {
            Err(Error::InvalidName { kind, reason }) => {
                check_eq!(kind, expected);
                check!(!reason.is_empty(), "an InvalidName error without a reason");
            }
            other => {
                return Err(CaseError::Failed(format!(
                    "expected InvalidName for a {expected} name, got {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// Names that look like SQL, patterns or wildcards are plain data: stored, listed and matched
/// byte for byte, never interpreted. Checklist C.47 and A, extras (pattern-like names).
pub async fn injection_names_are_opaque(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let tricky = [
        "'; DROP TABLE connections; --",
        "*",
        "?",
        "[a]",
        "%",
        "_",
        "a%",
        "\"quoted\"",
        "ünï €",
    ];
    let mut members = Vec::new();
    for name in tricky {
        members.push(ctx.connect(&b, Some(name)).await?);
    }
    // A plain group and user the patterns would match if they were interpreted.
    let mut plain = ctx.connect(&b, Some("abc")).await?;
    let backplane = ctx.backplane().await?;
    for (name, client) in tricky.iter().zip(&members) {
        a.add_to_group(&ctx.hub, &GroupName::new(*name)?, client.id())
            .await?;
    }
    a.add_to_group(&ctx.hub, &GroupName::new("abc")?, plain.id())
        .await?;
    for (name, client) in tricky.iter().zip(members.iter_mut()) {
        let group = GroupName::new(*name)?;
        check_eq!(
            backplane.group_members(&ctx.hub, &group).await?,
            vec![client.id().clone()]
        );
        a.publish(Message::to_group(
            ctx.hub.clone(),
            group,
            format!("g:{name}"),
        ))
        .await?;
        a.publish(Message::to_user(
            ctx.hub.clone(),
            UserId::new(*name)?,
            format!("u:{name}"),
        ))
        .await?;
        client.expect(format!("g:{name}").as_bytes()).await?;
        client.expect(format!("u:{name}").as_bytes()).await?;
        let found = backplane
            .user_connections(&ctx.hub, &UserId::new(*name)?)
            .await?;
        check_eq!(found.len(), 1);
    }
    let marker = sentinel(&a, &ctx.hub, &[&plain]).await?;
    plain.quiet_until(&marker).await
}

/// Two hubs on one namespace never see each other's messages, groups or users.
/// Checklist B.44.
pub async fn hubs_are_isolated(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let other_hub = HubName::new("conformance-other")?;
    let mut here = ctx.connect(&b, Some("same-user")).await?;
    let mut there = connect(&b, &other_hub, Some("same-user")).await?;
    let group = GroupName::new("same-group")?;
    a.add_to_group(&ctx.hub, &group, here.id()).await?;
    a.publish(Message::to_all(other_hub.clone(), "other-hub"))
        .await?;
    a.publish(Message::to_group(ctx.hub.clone(), group.clone(), "group"))
        .await?;
    a.publish(Message::to_user(
        ctx.hub.clone(),
        UserId::new("same-user")?,
        "user",
    ))
    .await?;
    here.expect(b"group").await?;
    here.expect(b"user").await?;
    there.expect(b"other-hub").await?;
    let marker = sentinel(&a, &ctx.hub, &[&here]).await?;
    here.quiet_until(&marker).await?;
    let marker = sentinel(&a, &other_hub, &[&there]).await?;
    there.quiet_until(&marker).await?;
    let backplane = ctx.backplane().await?;
    check_eq!(backplane.group_members(&other_hub, &group).await?.len(), 0);
    check_eq!(backplane.online_users(&other_hub).await?.len(), 1);
    Ok(())
}

/// Two namespaces of one driver (two deployments) never see each other's messages or state.
/// Checklist B.44.
pub async fn namespaces_are_isolated(ctx: &mut Ctx) -> CaseResult {
    let a = ctx.node().await?;
    let other = ctx.other_namespace().await?;
    let b = ctx.node_on(other.clone(), test_options()).await?;
    let mut here = ctx.connect(&a, Some("same-user")).await?;
    let mut there = ctx.connect(&b, Some("same-user")).await?;
    a.publish(Message::to_all(ctx.hub.clone(), "ns-a")).await?;
    b.publish(Message::to_all(ctx.hub.clone(), "ns-b")).await?;
    here.expect(b"ns-a").await?;
    there.expect(b"ns-b").await?;
    let marker = sentinel(&a, &ctx.hub, &[&here]).await?;
    here.quiet_until(&marker).await?;
    let marker = sentinel(&b, &ctx.hub, &[&there]).await?;
    there.quiet_until(&marker).await?;
    let mine = ctx.backplane().await?;
    check_eq!(
        mine.user_connections(&ctx.hub, here.user_id()?)
            .await?
            .len(),
        1
    );
    check!(
        mine.connection(&ctx.hub, there.id()).await?.is_none(),
        "a connection of another namespace is visible"
    );
    let nodes = mine.live_nodes().await?;
    check!(
        !nodes.iter().any(|n| &n.id == b.id()),
        "a node of another namespace is listed"
    );
    check!(
        other.connection(&ctx.hub, here.id()).await?.is_none(),
        "a connection is visible from another namespace"
    );
    Ok(())
}

/// Several nodes starting at the same moment on an empty namespace all come up, see each
/// other, and exchange messages. Checklist B.43.
pub async fn concurrent_node_start(ctx: &mut Ctx) -> CaseResult {
    let mut handles = Vec::new();
    for _ in 0..5 {
        handles.push(ctx.backplane().await?);
    }
    let starts: Vec<_> = handles
        .into_iter()
        .map(|backplane| tokio::spawn(backplane_core::Node::start(backplane, test_options())))
        .collect();
    let mut nodes = Vec::new();
    for start in starts {
        let node = start
            .await
            .map_err(|e| CaseError::Failed(format!("node start panicked: {e}")))??;
        ctx.adopt(node.clone());
        nodes.push(node);
    }
    let live = ctx.backplane().await?.live_nodes().await?;
    check_eq!(live.len(), 5);
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(ctx.connect(node, None).await?);
    }
    nodes[4]
        .publish(Message::to_all(ctx.hub.clone(), "started"))
        .await?;
    for client in &mut clients {
        client.expect(b"started").await?;
    }
    Ok(())
}

/// Empty, one-byte and Unicode payloads cross nodes intact. Checklist C (payloads).
pub async fn empty_and_unicode_payloads(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let payloads = [
        Bytes::new(),
        Bytes::from_static(b"x"),
        Bytes::from("héllo wörld ✓ 𝄞 漢字 🎉".as_bytes().to_vec()),
    ];
    for payload in &payloads {
        a.publish(Message::to_all(ctx.hub.clone(), payload.clone()))
            .await?;
    }
    for payload in &payloads {
        check_eq!(&client.recv().await?.payload, payload);
    }
    Ok(())
}
