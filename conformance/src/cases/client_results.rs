//! Client-result cases: server-to-client invocations and their answers, on one node and across
//! nodes.

use std::collections::HashSet;

use backplane_core::{
    ConnectionId, DeliveryKind, Error, HubName, InvocationError, InvocationId, Node, NodeEvent,
};
use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::{CaseError, CaseResult, Client, Ctx, WAIT, check, check_eq, wait_event};

/// An invocation running in its own task.
type Pending = JoinHandle<backplane_core::Result<Bytes>>;

/// Starts `node.invoke` in a task, so the case can answer it as the client.
fn spawn_invoke(node: &Node, hub: &HubName, connection: &ConnectionId, payload: &str) -> Pending {
    let (node, hub, connection) = (node.clone(), hub.clone(), connection.clone());
    let payload = Bytes::copy_from_slice(payload.as_bytes());
    tokio::spawn(async move { node.invoke(&hub, &connection, payload).await })
}

/// What the invocation returned, failing the case if it did not finish within [`WAIT`].
async fn outcome(mut pending: Pending) -> Result<backplane_core::Result<Bytes>, CaseError> {
    match tokio::time::timeout(WAIT, &mut pending).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(err)) => Err(CaseError::Failed(format!("the invoke task failed: {err}"))),
        Err(_) => {
            pending.abort();
            Err(CaseError::Failed(format!(
                "the invocation did not finish within {WAIT:?}"
            )))
        }
    }
}

/// Fails unless the invocation returned exactly `expected`.
async fn expect_result(pending: Pending, expected: &[u8]) -> CaseResult {
    match outcome(pending).await? {
        Ok(bytes) => {
            check!(
                bytes.as_ref() == expected,
                "invocation returned {:?}, expected {:?}",
                String::from_utf8_lossy(&bytes),
                String::from_utf8_lossy(expected)
            );
            Ok(())
        }
        Err(err) => Err(CaseError::Failed(format!(
            "invocation failed with {err:?}, expected {:?}",
            String::from_utf8_lossy(expected)
        ))),
    }
}

/// Fails unless the invocation failed with exactly `expected`.
async fn expect_failure(pending: Pending, expected: InvocationError) -> CaseResult {
    match outcome(pending).await? {
        Err(Error::Invocation(err)) if err == expected => Ok(()),
        other => Err(CaseError::Failed(format!(
            "expected Error::Invocation({expected:?}), got {other:?}"
        ))),
    }
}

/// The client's next delivery, which must be an invocation carrying `payload`; returns its id.
async fn invocation(client: &mut Client, payload: &[u8]) -> Result<InvocationId, CaseError> {
    let delivery = client.recv().await?;
    let DeliveryKind::Invocation(id) = delivery.kind else {
        return Err(CaseError::Failed(format!(
            "connection {} expected an invocation, got {:?}",
            client.id(),
            delivery.kind
        )));
    };
    check!(
        delivery.payload.as_ref() == payload,
        "invocation {id} carried {:?}, expected {:?}",
        String::from_utf8_lossy(&delivery.payload),
        String::from_utf8_lossy(payload)
    );
    Ok(id)
}

/// A successful result.
fn ok(text: &str) -> Result<Bytes, String> {
    Ok(Bytes::copy_from_slice(text.as_bytes()))
}

/// A node invokes a method on a local client, the client receives it as an invocation
/// delivery, and its answer is what `invoke` returns. Checklist A.6.
pub async fn client_result_local(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut client = ctx.connect(&node, None).await?;
    let pending = spawn_invoke(&node, &ctx.hub, client.id(), "ping");
    let id = invocation(&mut client, b"ping").await?;
    node.complete(client.id(), &id, ok("pong")).await?;
    expect_result(pending, b"pong").await
}

/// A local client that answers with an error makes `invoke` fail with
/// `InvocationError::Client` carrying the client's text. Checklist A.7.
pub async fn client_result_error_local(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut client = ctx.connect(&node, None).await?;
    let pending = spawn_invoke(&node, &ctx.hub, client.id(), "ping");
    let id = invocation(&mut client, b"ping").await?;
    node.complete(client.id(), &id, Err("the client failed".to_owned()))
        .await?;
    expect_failure(pending, InvocationError::Client("the client failed".into())).await
}

/// A completion from a connection the invocation was not sent to is refused with
/// `WrongConnection`; the invocation stays pending and the right connection completes it.
/// Checklist A.8.
pub async fn client_result_wrong_connection_refused(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut right = ctx.connect(&node, None).await?;
    let wrong = ctx.connect(&node, None).await?;
    let pending = spawn_invoke(&node, &ctx.hub, right.id(), "ping");
    let id = invocation(&mut right, b"ping").await?;
    match node.complete(wrong.id(), &id, ok("wrong")).await {
        Err(Error::Invocation(InvocationError::WrongConnection {
            id: reported,
            connection,
        })) => {
            check_eq!(reported, id.to_string());
            check_eq!(connection, wrong.id().to_string());
        }
        other => {
            return Err(CaseError::Failed(format!(
                "a completion from the wrong connection expected WrongConnection, got {other:?}"
            )));
        }
    }
    check!(
        !pending.is_finished(),
        "the invocation finished after a refused completion"
    );
    node.complete(right.id(), &id, ok("right")).await?;
    expect_result(pending, b"right").await
}

/// Invoking a connection that does not exist fails at once with `UnknownConnection`.
/// Checklist A.9.
pub async fn client_result_unknown_connection(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let ghost = ConnectionId::new("no-such-connection")?;
    let pending = spawn_invoke(&node, &ctx.hub, &ghost, "ping");
    match outcome(pending).await? {
        Err(Error::UnknownConnection(id)) => check_eq!(id, ghost.to_string()),
        other => {
            return Err(CaseError::Failed(format!(
                "expected UnknownConnection, got {other:?}"
            )));
        }
    }
    Ok(())
}

/// Two invocations in flight at once to two connections get distinct ids and each caller gets
/// its own connection's answer, whatever order they are answered in. Checklist A.10.
pub async fn client_results_do_not_collide(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut c1 = ctx.connect(&node, None).await?;
    let mut c2 = ctx.connect(&node, None).await?;
    let p1 = spawn_invoke(&node, &ctx.hub, c1.id(), "to one");
    let p2 = spawn_invoke(&node, &ctx.hub, c2.id(), "to two");
    let id1 = invocation(&mut c1, b"to one").await?;
    let id2 = invocation(&mut c2, b"to two").await?;
    check!(id1 != id2, "two invocations share the id {id1}");
    node.complete(c2.id(), &id2, ok("two")).await?;
    node.complete(c1.id(), &id1, ok("one")).await?;
    expect_result(p1, b"one").await?;
    expect_result(p2, b"two").await
}

/// A connection that disconnects without answering makes the pending invocation fail with
/// `Disconnected`. Checklist A.11.
pub async fn client_result_fails_on_disconnect(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut client = ctx.connect(&node, None).await?;
    let pending = spawn_invoke(&node, &ctx.hub, client.id(), "ping");
    invocation(&mut client, b"ping").await?;
    check!(
        node.disconnect(&ctx.hub, client.id()).await?,
        "disconnect found no connection"
    );
    expect_failure(
        pending,
        InvocationError::Disconnected(client.id().to_string()),
    )
    .await
}

/// A caller that stops waiting (its `invoke` future is dropped) cancels the invocation: a late
/// result from the right connection is accepted without error and ignored, and the next
/// invocation to the same connection works normally. Checklist A.12.
pub async fn client_result_cancel_ignores_late_result(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let mut client = ctx.connect(&node, None).await?;
    let pending = spawn_invoke(&node, &ctx.hub, client.id(), "first");
    let id = invocation(&mut client, b"first").await?;
    pending.abort();
    match tokio::time::timeout(WAIT, pending).await {
        Ok(Err(err)) if err.is_cancelled() => {}
        other => {
            return Err(CaseError::Failed(format!(
                "the aborted invocation expected to be canceled, got {other:?}"
            )));
        }
    }
    node.complete(client.id(), &id, ok("late")).await?;

    let next = spawn_invoke(&node, &ctx.hub, client.id(), "second");
    let next_id = invocation(&mut client, b"second").await?;
    check!(next_id != id, "a new invocation reused the id {id}");
    node.complete(client.id(), &next_id, ok("fresh")).await?;
    expect_result(next, b"fresh").await
}

/// A node invokes a client held by another node and gets its answer. Checklist A.29.
pub async fn client_result_across_nodes(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), "ping");
    let id = invocation(&mut client, b"ping").await?;
    b.complete(client.id(), &id, ok("pong")).await?;
    expect_result(pending, b"pong").await
}

/// A client on another node that answers with an error makes `invoke` fail with
/// `InvocationError::Client` carrying the client's text. Checklist A.30.
pub async fn client_result_error_across_nodes(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), "ping");
    let id = invocation(&mut client, b"ping").await?;
    b.complete(client.id(), &id, Err("remote failure".to_owned()))
        .await?;
    expect_failure(pending, InvocationError::Client("remote failure".into())).await
}

/// With several nodes, invoking a connection that exists on none of them (never did, or
/// disconnected from another node) fails with `UnknownConnection`. Checklist A.31.
pub async fn client_result_unknown_connection_multi_node(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let gone = ctx.connect(&b, None).await?;
    let gone_id = gone.id().clone();
    check!(
        b.disconnect(&ctx.hub, &gone_id).await?,
        "disconnect found no connection"
    );
    let _witness = ctx.connect(&b, None).await?;
    let ghost = ConnectionId::new("no-such-connection")?;
    for id in [&ghost, &gone_id] {
        match outcome(spawn_invoke(&a, &ctx.hub, id, "ping")).await? {
            Err(Error::UnknownConnection(reported)) => check_eq!(reported, id.to_string()),
            other => {
                return Err(CaseError::Failed(format!(
                    "invoking unknown connection {id} expected UnknownConnection, got {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A client on another node that disconnects without answering makes the caller's invocation
/// fail with `Disconnected`. Checklist A.32.
pub async fn client_result_fails_on_disconnect_other_node(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), "ping");
    invocation(&mut client, b"ping").await?;
    check!(
        b.disconnect(&ctx.hub, client.id()).await?,
        "disconnect found no connection"
    );
    expect_failure(
        pending,
        InvocationError::Disconnected(client.id().to_string()),
    )
    .await
}

/// Invocations made by two nodes, to local and remote connections at the same time, all get
/// distinct ids, and each caller receives the answer to its own invocation. Checklist A.33.
pub async fn invocation_ids_unique_across_nodes(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut on_a = ctx.connect(&a, None).await?;
    let mut on_b = ctx.connect(&b, None).await?;
    // Each node invokes the other's connection first, then its own: the first invocation of
    // every node is the one most likely to collide.
    let calls = [
        (spawn_invoke(&a, &ctx.hub, on_b.id(), "a->b"), "a->b"),
        (spawn_invoke(&b, &ctx.hub, on_a.id(), "b->a"), "b->a"),
    ];
    let mut ids = Vec::new();
    ids.push((invocation(&mut on_b, b"a->b").await?, "a->b"));
    ids.push((invocation(&mut on_a, b"b->a").await?, "b->a"));
    let local = [
        (spawn_invoke(&a, &ctx.hub, on_a.id(), "a->a"), "a->a"),
        (spawn_invoke(&b, &ctx.hub, on_b.id(), "b->b"), "b->b"),
    ];
    ids.push((invocation(&mut on_a, b"a->a").await?, "a->a"));
    ids.push((invocation(&mut on_b, b"b->b").await?, "b->b"));
    let distinct: HashSet<&InvocationId> = ids.iter().map(|(id, _)| id).collect();
    check!(
        distinct.len() == ids.len(),
        "invocation ids are not unique: {:?}",
        ids.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>()
    );
    for (id, label) in &ids {
        let (node, client) = match *label {
            "a->b" | "b->b" => (&b, &on_b),
            _ => (&a, &on_a),
        };
        node.complete(client.id(), id, ok(&format!("{label} done")))
            .await?;
    }
    for (pending, label) in calls.into_iter().chain(local) {
        expect_result(pending, format!("{label} done").as_bytes()).await?;
    }
    Ok(())
}

/// A client on another node answers with a JSON string where the caller expects a number:
/// the bytes cross unchanged, and decoding them as a number at the caller fails with a clear
/// error instead of hanging. Checklist A.35.
pub async fn client_result_wrong_type_across_nodes(ctx: &mut Ctx) -> CaseResult {
    const ANSWER: &[u8] = br#""forty-two""#;
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), r#"{"method":"count"}"#);
    let id = invocation(&mut client, br#"{"method":"count"}"#).await?;
    b.complete(client.id(), &id, Ok(Bytes::from_static(ANSWER)))
        .await?;
    let bytes = match outcome(pending).await? {
        Ok(bytes) => bytes,
        Err(err) => {
            return Err(CaseError::Failed(format!(
                "invocation failed with {err:?}, expected the client's bytes"
            )));
        }
    };
    check_eq!(bytes.as_ref(), ANSWER);
    match serde_json::from_slice::<i64>(&bytes) {
        Err(err) => check!(
            err.is_data(),
            "decoding a JSON string as a number failed with a non-type error: {err}"
        ),
        Ok(n) => {
            return Err(CaseError::Failed(format!(
                "a JSON string decoded as the number {n}"
            )));
        }
    }
    let text: Result<String, _> = serde_json::from_slice(&bytes);
    check_eq!(text.ok(), Some("forty-two".to_owned()));
    Ok(())
}

/// The node holding the invoked connection dies (stops without unregistering); once it is
/// reaped, the caller's pending invocation fails with `NodeGone` naming that node, within a
/// bounded time. Checklist B.42.
pub async fn client_result_fails_when_node_dies(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let mut events = a.events();
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), "ping");
    invocation(&mut client, b"ping").await?;
    b.abandon().await;
    let dead = b.id().clone();
    wait_event(
        &mut events,
        WAIT,
        |event| matches!(event, NodeEvent::NodesReaped(nodes) if nodes.contains(&dead)),
    )
    .await?;
    expect_failure(pending, InvocationError::NodeGone(dead.to_string())).await
}

/// A client's answer cannot be sent back to the caller's node (the append fails): the
/// completion reports the error and the invocation stays pending, so completing it again
/// delivers the answer. Issue: a completion removed before it was sent.
pub async fn completion_survives_a_failed_append(ctx: &mut Ctx) -> CaseResult {
    let a = ctx.node().await?;
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), crate::test_options()).await?;
    let mut client = ctx.connect(&b, None).await?;
    let pending = spawn_invoke(&a, &ctx.hub, client.id(), "ping");
    let id = invocation(&mut client, b"ping").await?;
    faulty.fail_next(crate::Op::Append, 1);
    check!(
        b.complete(client.id(), &id, ok("pong")).await.is_err(),
        "a completion that could not be sent reported success"
    );
    b.complete(client.id(), &id, ok("pong")).await?;
    expect_result(pending, b"pong").await
}
