//! Durable user messages: stored before sending, delivered to offline users on connect,
//! acknowledged, attempts recorded, expired ones never delivered and purged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use backplane_core::{
    ConnectionId, Delivery, DeliveryKind, DurableMessage, Error, GroupName, Job, Message,
    MessageId, Published, SharedBackplane, Target, UserId,
};

use crate::{
    CaseError, CaseResult, Client, Ctx, WAIT, check, check_eq, sentinel, test_options,
    until_after_jobs,
};

/// A time to live long enough that nothing expires during a case.
const LONG_TTL: Duration = Duration::from_secs(600);

/// The single durable id a publish to one user must report.
fn single_id(published: &Published) -> Result<MessageId, CaseError> {
    match published.durable.as_slice() {
        [id] => Ok(*id),
        other => Err(CaseError::Failed(format!(
            "a durable message to one user reported {} stored ids: {other:?}",
            other.len()
        ))),
    }
}

/// Fails unless `delivery` is the durable message `id` carrying `payload`.
fn expect_durable(delivery: &Delivery, id: MessageId, payload: &[u8]) -> CaseResult {
    check_eq!(delivery.kind, DeliveryKind::Durable(id));
    check!(
        delivery.payload.as_ref() == payload,
        "durable message {id} carried {:?}, expected {:?}",
        String::from_utf8_lossy(&delivery.payload),
        String::from_utf8_lossy(payload)
    );
    Ok(())
}

/// The stored message `id`, failing the case when it is gone.
async fn stored(
    backplane: &SharedBackplane,
    ctx: &Ctx,
    id: MessageId,
) -> Result<DurableMessage, CaseError> {
    backplane
        .durable_message(&ctx.hub, id)
        .await?
        .ok_or_else(|| CaseError::Failed(format!("durable message {id} is not stored")))
}

/// Fails unless `expires_at - created_at` is `ttl`, within a millisecond of clock rounding.
fn check_expiry(message: &DurableMessage, ttl: Duration) -> CaseResult {
    let lifetime = message
        .expires_at
        .duration_since(message.created_at)
        .map_err(|_| {
            CaseError::Failed(format!(
                "durable message {} expires before it was created",
                message.id
            ))
        })?;
    let slack = Duration::from_millis(1);
    check!(
        lifetime + slack >= ttl && lifetime <= ttl + slack,
        "durable message {} lives {lifetime:?}, expected its ttl {ttl:?}",
        message.id
    );
    Ok(())
}

/// A durable message published while its user is offline is stored, delivered when the user
/// connects on another node (alongside a live connection that already reads the log), once, and
/// after it is acknowledged a later connection of the user does not receive it again.
/// Checklist C.45.
pub async fn durable_offline_user_receives_on_connect_once(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    // Node B already reads the hub's log, so the message reaches B both from the log and from
    // the inbox: the user must still get it once.
    let _witness = ctx.connect(&b, None).await?;
    let published = a
        .publish(
            Message::to_user(ctx.hub.clone(), dave.clone(), "while you were away")
                .durable(LONG_TTL),
        )
        .await?;
    let id = single_id(&published)?;
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 1);

    let mut first = ctx.connect(&b, Some("dave")).await?;
    let delivery = first.recv().await?;
    expect_durable(&delivery, id, b"while you were away")?;
    let marker = sentinel(&a, &ctx.hub, &[&first]).await?;
    first.quiet_until(&marker).await?;
    check!(
        b.acknowledge(&ctx.hub, first.id(), id).await?,
        "acknowledging a delivered durable message reported no change"
    );
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 0);
    check!(
        b.disconnect(&ctx.hub, first.id()).await?,
        "disconnect found no connection"
    );

    let mut later = ctx.connect(&a, Some("dave")).await?;
    let marker = sentinel(&a, &ctx.hub, &[&later]).await?;
    later.quiet_until(&marker).await
}

/// A durable message to a user who is online reaches each of their connections at once, on the
/// publishing node and on another, as a durable delivery with the stored id; acknowledging it
/// from one connection marks it acknowledged by that connection, a second acknowledgement is
/// refused, and nobody receives it twice. Checklist C.45.
pub async fn durable_online_user_receives_live(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let mut local = ctx.connect(&a, Some("dave")).await?;
    let mut remote = ctx.connect(&b, Some("dave")).await?;
    let mut other = ctx.connect(&b, Some("eve")).await?;
    let published = a
        .publish(Message::to_user(ctx.hub.clone(), dave.clone(), "live").durable(LONG_TTL))
        .await?;
    let id = single_id(&published)?;
    expect_durable(&local.recv().await?, id, b"live")?;
    expect_durable(&remote.recv().await?, id, b"live")?;
    let marker = sentinel(&a, &ctx.hub, &[&local, &remote, &other]).await?;
    local.quiet_until(&marker).await?;
    remote.quiet_until(&marker).await?;
    other.quiet_until(&marker).await?;

    check!(
        b.acknowledge(&ctx.hub, remote.id(), id).await?,
        "the first acknowledgement reported no change"
    );
    check!(
        !a.acknowledge(&ctx.hub, local.id(), id).await?,
        "a second acknowledgement of the same message was accepted"
    );
    let message = stored(&backplane, ctx, id).await?;
    check_eq!(
        message.acknowledged.map(|(connection, _)| connection),
        Some(remote.id().clone())
    );
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 0);
    check_eq!(backplane.pending_count().await?, 0);
    Ok(())
}

/// An unacknowledged durable message is delivered again on every new connection of the user;
/// once a connection acknowledges it, no later connection receives it, and it is recorded as
/// acknowledged by that connection. Acknowledging an unknown id is refused. Checklist C.45.
pub async fn durable_ack_stops_redelivery(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let published = a
        .publish(Message::to_user(ctx.hub.clone(), dave.clone(), "ack me").durable(LONG_TTL))
        .await?;
    let id = single_id(&published)?;

    let mut ignores = ctx.connect(&b, Some("dave")).await?;
    expect_durable(&ignores.recv().await?, id, b"ack me")?;
    check!(
        b.disconnect(&ctx.hub, ignores.id()).await?,
        "disconnect found no connection"
    );
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 1);

    let mut acks = ctx.connect(&a, Some("dave")).await?;
    let delivery = acks.recv().await?;
    expect_durable(&delivery, id, b"ack me")?;
    acks.ack(&delivery).await?;
    check!(
        !a.acknowledge(&ctx.hub, acks.id(), id).await?,
        "acknowledging an acknowledged message again reported a change"
    );
    check!(
        !a.acknowledge(&ctx.hub, acks.id(), MessageId(id.0.wrapping_add(1_000_000)))
            .await?,
        "acknowledging an unknown message reported a change"
    );
    let message = stored(&backplane, ctx, id).await?;
    check_eq!(
        message.acknowledged.map(|(connection, _)| connection),
        Some(acks.id().clone())
    );
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 0);

    for node in [&a, &b] {
        let mut again = ctx.connect(node, Some("dave")).await?;
        let marker = sentinel(&a, &ctx.hub, &[&again]).await?;
        again.quiet_until(&marker).await?;
    }
    Ok(())
}

/// A durable message whose ttl passes before its user connects is no longer pending (though
/// still stored until purged) and is not delivered on connect; the cleanup job then purges it
/// with its attempts, and it is never delivered. Checklist C.45.
pub async fn durable_expired_never_delivered_and_purged(ctx: &mut Ctx) -> CaseResult {
    const TTL: Duration = Duration::from_millis(200);
    // Nodes that never clean up, so the message outlives its expiry until a cleaner comes.
    let idle = test_options().cleanup_interval(Duration::from_secs(3600));
    let a = ctx.node_with(idle.clone()).await?;
    let b = ctx.node_with(idle).await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let published = a
        .publish(Message::to_user(ctx.hub.clone(), dave.clone(), "too late").durable(TTL))
        .await?;
    let id = single_id(&published)?;
    let message = stored(&backplane, ctx, id).await?;
    check_eq!(message.payload.as_ref(), b"too late");
    check_expiry(&message, TTL)?;
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 1);

    // Heartbeat by heartbeat, until the expiry has passed (with slack for clock rounding).
    let expired = message.expires_at + Duration::from_millis(100);
    until_after_jobs(&a, Job::Heartbeat, "the ttl did not pass", || async {
        Ok(SystemTime::now() >= expired)
    })
    .await?;
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 0);
    check_eq!(backplane.pending_count().await?, 0);
    check!(
        backplane.durable_message(&ctx.hub, id).await?.is_some(),
        "an expired message was deleted although nothing purged it"
    );
    let mut early = ctx.connect(&b, Some("dave")).await?;
    let marker = sentinel(&a, &ctx.hub, &[&early]).await?;
    early.quiet_until(&marker).await?;
    check_eq!(backplane.attempts(&ctx.hub, id).await?.len(), 0);

    // A node with the suite's cleanup interval purges it.
    let cleaner = ctx.node().await?;
    until_after_jobs(
        &cleaner,
        Job::Cleanup,
        "the expired durable message was not purged",
        || async { Ok(backplane.durable_message(&ctx.hub, id).await?.is_none()) },
    )
    .await?;
    check_eq!(backplane.pending(&ctx.hub, &dave).await?.len(), 0);
    check_eq!(backplane.attempts(&ctx.hub, id).await?.len(), 0);

    let mut late = ctx.connect(&a, Some("dave")).await?;
    let marker = sentinel(&a, &ctx.hub, &[&late, &early]).await?;
    late.quiet_until(&marker).await?;
    early.quiet_until(&marker).await
}

/// Every delivery of a durable message is recorded as an attempt for its connection: a
/// delivery on connect and a live one with no error, and a live one to a connection whose
/// receiver is gone with the error's text. Checklist C.45.
pub async fn durable_attempts_recorded(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let started = SystemTime::now();

    // Delivered when the user connects: recorded before `connect` returns.
    let first = a
        .publish(Message::to_user(ctx.hub.clone(), dave.clone(), "first").durable(LONG_TTL))
        .await?;
    let first = single_id(&first)?;
    let mut alive = ctx.connect(&b, Some("dave")).await?;
    let delivery = alive.recv().await?;
    expect_durable(&delivery, first, b"first")?;
    let attempts = backplane.attempts(&ctx.hub, first).await?;
    check_eq!(attempts.len(), 1);
    check_eq!(&attempts[0].connection, alive.id());
    check_eq!(attempts[0].error, None);
    check!(
        attempts[0].at >= started - Duration::from_secs(1),
        "the attempt is dated {:?}, before the case started",
        attempts[0].at
    );
    alive.ack(&delivery).await?;

    // Delivered live from the log: one connection receives it, the other's receiver is gone.
    let dropped: Client = ctx.connect(&b, Some("dave")).await?;
    let dropped_id = dropped.id().clone();
    drop(dropped);
    let second = a
        .publish(Message::to_user(ctx.hub.clone(), dave.clone(), "second").durable(LONG_TTL))
        .await?;
    let second = single_id(&second)?;
    expect_durable(&alive.recv().await?, second, b"second")?;
    // Node B records the attempts of an entry before it reads the next one of the stream.
    let marker = sentinel(&a, &ctx.hub, &[&alive]).await?;
    alive.quiet_until(&marker).await?;
    let attempts: BTreeMap<ConnectionId, Option<String>> = backplane
        .attempts(&ctx.hub, second)
        .await?
        .into_iter()
        .map(|attempt| (attempt.connection, attempt.error))
        .collect();
    check_eq!(attempts.len(), 2);
    check_eq!(attempts.get(alive.id()), Some(&None));
    match attempts.get(&dropped_id) {
        Some(Some(error)) => check!(
            !error.is_empty(),
            "the failed attempt was recorded with an empty error"
        ),
        other => {
            return Err(CaseError::Failed(format!(
                "the attempt to a connection without a receiver expected an error text, got {other:?}"
            )));
        }
    }
    Ok(())
}

/// A durable message is stored before it is sent: a recipient holding the delivery finds it
/// stored, and when `publish` returns it is pending with its payload, user, sender and expiry,
/// unacknowledged, counted by `pending_count`. Checklist C.45.
pub async fn durable_stored_before_send(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let dave = UserId::new("dave")?;
    let sender = ctx.connect(&a, Some("sender")).await?;
    let mut remote = ctx.connect(&b, Some("dave")).await?;
    check_eq!(backplane.pending_count().await?, 0);

    let before = SystemTime::now();
    let publisher = {
        let (a, hub, dave, from) = (
            a.clone(),
            ctx.hub.clone(),
            dave.clone(),
            sender.id().clone(),
        );
        tokio::spawn(async move {
            a.publish(
                Message::to_user(hub, dave, "kept")
                    .sender(from)
                    .durable(LONG_TTL),
            )
            .await
        })
    };
    let delivery = remote.recv().await?;
    let DeliveryKind::Durable(seen) = delivery.kind else {
        return Err(CaseError::Failed(format!(
            "expected a durable delivery, got {:?}",
            delivery.kind
        )));
    };
    check!(
        backplane.durable_message(&ctx.hub, seen).await?.is_some(),
        "a delivered durable message is not stored"
    );
    let published = tokio::time::timeout(WAIT, publisher)
        .await
        .map_err(|_| CaseError::Failed(format!("publish did not return within {WAIT:?}")))?
        .map_err(|e| CaseError::Failed(format!("the publish task failed: {e}")))??;
    let id = single_id(&published)?;
    check_eq!(seen, id);

    let pending = backplane.pending(&ctx.hub, &dave).await?;
    check_eq!(pending.len(), 1);
    check_eq!(pending[0].id, id);
    check_eq!(backplane.pending_count().await?, 1);
    let message = stored(&backplane, ctx, id).await?;
    check_eq!(&message, &pending[0]);
    check_eq!(message.hub, ctx.hub);
    check_eq!(message.user, dave);
    check_eq!(message.sender, Some(sender.id().clone()));
    check_eq!(message.payload.as_ref(), b"kept");
    check_eq!(message.acknowledged, None);
    check_expiry(&message, LONG_TTL)?;
    check!(
        message.created_at + Duration::from_secs(1) >= before
            && message.created_at <= SystemTime::now() + Duration::from_secs(1),
        "the message was created at {:?}, outside the publish call",
        message.created_at
    );
    Ok(())
}

/// Only messages to users can be durable: a durable broadcast, group or connection message,
/// or a durable message with a zero ttl, fails with `InvalidMessage`, and nothing is stored,
/// logged or delivered. Checklist C.47.
pub async fn durable_requires_user_target(ctx: &mut Ctx) -> CaseResult {
    let node = ctx.node().await?;
    let backplane = ctx.backplane().await?;
    let mut client = ctx.connect(&node, Some("dave")).await?;
    let group = GroupName::new("room")?;
    check!(
        node.add_to_group(&ctx.hub, &group, client.id()).await?,
        "adding a connection to a group reported no change"
    );
    let pending_before = backplane.pending_count().await?;
    let mut tails = Vec::new();
    for stream in 0..backplane.stream_count() {
        tails.push(backplane.tail(&ctx.hub, stream).await?);
    }

    let invalid = [
        Message::to_all(ctx.hub.clone(), "all").durable(LONG_TTL),
        Message::to_group(ctx.hub.clone(), group, "group").durable(LONG_TTL),
        Message::new(
            ctx.hub.clone(),
            Target::Connections(vec![client.id().clone()]),
            "connection",
        )
        .durable(LONG_TTL),
        Message::to_user(ctx.hub.clone(), UserId::new("dave")?, "no ttl").durable(Duration::ZERO),
    ];
    for message in invalid {
        let target = message.target.kind();
        match node.publish(message).await {
            Err(Error::InvalidMessage(reason)) => {
                check!(!reason.is_empty(), "InvalidMessage without a reason");
            }
            other => {
                return Err(CaseError::Failed(format!(
                    "a durable message to {target} expected InvalidMessage, got {other:?}"
                )));
            }
        }
    }
    check_eq!(backplane.pending_count().await?, pending_before);
    check_eq!(
        backplane
            .pending(&ctx.hub, &UserId::new("dave")?)
            .await?
            .len(),
        0
    );
    for (stream, before) in (0..).zip(&tails) {
        check_eq!(backplane.tail(&ctx.hub, stream).await?, *before);
    }
    let marker = sentinel(&node, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// A node whose reader falls behind a durable message's lifetime does not deliver it from the
/// log once it catches up: an expired message is never delivered, whatever the path.
/// Checklist C.45.
pub async fn durable_expired_in_log_not_delivered(ctx: &mut Ctx) -> CaseResult {
    let publisher = ctx.node().await?;
    let gated = crate::Faulty::new(ctx.backplane().await?);
    let slow = ctx
        .node_on(
            gated.clone(),
            test_options().poll_interval(Duration::from_secs(3600)),
        )
        .await?;
    let mut client = ctx.connect(&slow, Some("late-reader")).await?;
    let backplane = ctx.backplane().await?;
    let user = UserId::new("late-reader")?;

    gated.hold_before(crate::Op::Read, true);
    let published = publisher
        .publish(
            Message::to_user(ctx.hub.clone(), user.clone(), "expires in the log")
                .durable(Duration::from_millis(200)),
        )
        .await?;
    let id = single_id(&published)?;
    let marker = bytes::Bytes::from_static(b"after the expiry");
    gated.waiting_before(crate::Op::Read, 1).await?;

    // Cleanup purges the message once it has expired; that is the event to wait for.
    until_after_jobs(
        &publisher,
        Job::Cleanup,
        "the expired message was not purged",
        || async { Ok(backplane.durable_message(&ctx.hub, id).await?.is_none()) },
    )
    .await?;
    publisher
        .publish(Message::to_user(ctx.hub.clone(), user, marker.clone()))
        .await?;
    gated.hold_before(crate::Op::Read, false);
    client.quiet_until(&marker).await
}

/// A durable message that one node delivered and that was acknowledged is not delivered again
/// by a node whose reader is still behind it when the user reconnects there: the inbox, not
/// the log, says whether it is still due. Issue: a durable message delivered again after it
/// was acknowledged.
pub async fn acknowledged_durable_not_redelivered_by_a_lagging_node(ctx: &mut Ctx) -> CaseResult {
    let a = ctx.node().await?;
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let uma = UserId::new("uma")?;
    // B serves the hub, so its reader is at the tail before the message.
    let _witness = ctx.connect(&b, None).await?;
    faulty.hold_before(crate::Op::Read, true);
    let mut first = ctx.connect(&a, Some("uma")).await?;
    let published = a
        .publish(Message::to_user(ctx.hub.clone(), uma.clone(), "once").durable(LONG_TTL))
        .await?;
    let id = single_id(&published)?;
    let delivery = first.recv().await?;
    expect_durable(&delivery, id, b"once")?;
    first.ack(&delivery).await?;
    check!(
        a.disconnect(&ctx.hub, first.id()).await?,
        "disconnect found no connection"
    );
    // B's reader was woken by the message and waits before reading it.
    faulty.waiting_before(crate::Op::Read, 1).await?;
    let mut second = ctx.connect(&b, Some("uma")).await?;
    faulty.hold_before(crate::Op::Read, false);
    let marker = sentinel(&a, &ctx.hub, &[&second]).await?;
    second.quiet_until(&marker).await
}

/// A durable message to a user with a connection on each node: the one on A gets it and
/// acknowledges it before B's reader reaches the record. B's connection, there since before
/// the message was sent, gets it too: one connection's acknowledgement does not take the
/// message from the user's other live connections.
pub async fn durable_acknowledged_on_one_node_still_reaches_the_other(ctx: &mut Ctx) -> CaseResult {
    let a = ctx.node().await?;
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let ursula = UserId::new("ursula")?;
    let mut on_a = ctx.connect(&a, Some("ursula")).await?;
    let mut on_b = ctx.connect(&b, Some("ursula")).await?;
    faulty.hold_before(crate::Op::Read, true);
    let published = a
        .publish(Message::to_user(ctx.hub.clone(), ursula, "both").durable(LONG_TTL))
        .await?;
    let id = single_id(&published)?;
    let delivery = on_a.recv().await?;
    expect_durable(&delivery, id, b"both")?;
    on_a.ack(&delivery).await?;
    faulty.waiting_before(crate::Op::Read, 1).await?;
    faulty.hold_before(crate::Op::Read, false);
    let delivery = on_b.recv().await?;
    expect_durable(&delivery, id, b"both")?;
    let marker = sentinel(&a, &ctx.hub, &[&on_b]).await?;
    on_b.quiet_until(&marker).await
}

/// Recording a delivery attempt fails for the first of a returning user's pending messages:
/// the others are still delivered, every one once. Issue: a failed attempt record stops the
/// delivery of pending messages.
pub async fn pending_delivery_survives_a_failed_attempt_record(ctx: &mut Ctx) -> CaseResult {
    let a = ctx.node().await?;
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let vera = UserId::new("vera")?;
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        let published = a
            .publish(Message::to_user(ctx.hub.clone(), vera.clone(), text).durable(LONG_TTL))
            .await?;
        ids.push(single_id(&published)?);
    }
    faulty.fail_next(crate::Op::RecordAttempt, 1);
    let mut client = ctx.connect(&b, Some("vera")).await?;
    for (id, text) in ids.iter().zip(["one", "two", "three"]) {
        expect_durable(&client.recv().await?, *id, text.as_bytes())?;
    }
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// The log append of a durable message fails after its copy is stored in the user's inbox:
/// the message is stored, so the publish succeeds, the local connection gets it at once, the
/// remote one once the append succeeds on a retry, each exactly once, and the inbox holds one
/// copy (a caller told "failed" would publish it again). Issue: an append whose outcome is
/// unknown.
pub async fn durable_publish_survives_a_failed_append(ctx: &mut Ctx) -> CaseResult {
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let a = ctx.node_on(faulty.clone(), test_options()).await?;
    let b = ctx.node().await?;
    let backplane = ctx.backplane().await?;
    let walt = UserId::new("walt")?;
    let mut local = ctx.connect(&a, Some("walt")).await?;
    let mut remote = ctx.connect(&b, Some("walt")).await?;
    for lost in [false, true] {
        let text = if lost { "answer lost" } else { "append failed" };
        if lost {
            faulty.lose_reply_next(crate::Op::Append, 1);
        } else {
            faulty.fail_next(crate::Op::Append, 1);
        }
        let published = a
            .publish(Message::to_user(ctx.hub.clone(), walt.clone(), text).durable(LONG_TTL))
            .await?;
        let id = single_id(&published)?;
        expect_durable(&local.recv().await?, id, text.as_bytes())?;
        expect_durable(&remote.recv().await?, id, text.as_bytes())?;
        let marker = sentinel(&a, &ctx.hub, &[&local, &remote]).await?;
        local.quiet_until(&marker).await?;
        remote.quiet_until(&marker).await?;
        let pending = backplane.pending(&ctx.hub, &walt).await?;
        check_eq!(pending.iter().filter(|m| m.id == id).count(), 1);
    }
    check_eq!(backplane.pending(&ctx.hub, &walt).await?.len(), 2);
    Ok(())
}
