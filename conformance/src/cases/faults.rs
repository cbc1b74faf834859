//! Fault cases: lost wake-ups, a database restart, and a backplane that fails calls.

use backplane_core::{ConnectionId, Error, HubName, Job, Message, Node, UserId};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::{
    CaseError, CaseResult, Client, Ctx, WAIT, check, check_eq, sentinel, test_options,
    until_after_jobs,
};

/// Receives `"{from}"` … `"{to - 1}"` on each client, in that order and nothing else.
async fn expect_range(clients: &mut [&mut Client], from: usize, to: usize) -> CaseResult {
    for client in clients {
        for i in from..to {
            let delivery = client.recv().await?;
            check!(
                delivery.payload.as_ref() == i.to_string().as_bytes(),
                "connection {} expected message {i}, got {:?} (lost, duplicated or out of order)",
                client.id(),
                String::from_utf8_lossy(&delivery.payload)
            );
        }
    }
    Ok(())
}

/// Node B's wake-up channels are broken again and again while node A publishes to B's clients:
/// while B reads along, and while B cannot subscribe again until A has published more (the
/// wake-ups of those messages go nowhere). B catches up from its cursors, and every message
/// arrives exactly once, in order. Checklist B.36.
pub async fn wakeups_interrupted_no_loss(ctx: &mut Ctx) -> CaseResult {
    const ROUNDS: usize = 4;
    const PER_PHASE: usize = 60;
    let a = ctx.node().await?;
    let gated = crate::Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(gated.clone(), test_options()).await?;
    let mut first = ctx.connect(&b, None).await?;
    let mut second = ctx.connect(&b, None).await?;
    let mut next = 0;
    for _ in 0..ROUNDS {
        // Broken while messages flow and B reads along.
        let from = next;
        next = publish_numbered(&a, &ctx.hub, next, PER_PHASE / 2).await?;
        ctx.namespace().interrupt_wakeups().await?;
        next = publish_numbered(&a, &ctx.hub, next, PER_PHASE / 2).await?;
        expect_range(&mut [&mut first, &mut second], from, next).await?;
        // Broken, and B cannot subscribe again until more messages are in the log.
        let from = next;
        gated.hold_before(crate::Op::Subscribe, true);
        ctx.namespace().interrupt_wakeups().await?;
        next = publish_numbered(&a, &ctx.hub, next, PER_PHASE).await?;
        gated.hold_before(crate::Op::Subscribe, false);
        expect_range(&mut [&mut first, &mut second], from, next).await?;
    }
    let from = next;
    next = publish_numbered(&a, &ctx.hub, next, PER_PHASE).await?;
    check_eq!(next, (ROUNDS * 2 + 1) * PER_PHASE);
    expect_range(&mut [&mut first, &mut second], from, next).await?;
    let marker = sentinel(&a, &ctx.hub, &[&first, &second]).await?;
    first.quiet_until(&marker).await?;
    second.quiet_until(&marker).await
}

/// Broadcasts `"{from}"` … `"{from + count - 1}"` from `node`; returns the next number.
async fn publish_numbered(
    node: &Node,
    hub: &HubName,
    from: usize,
    count: usize,
) -> Result<usize, CaseError> {
    for i in from..from + count {
        node.publish(Message::to_all(hub.clone(), i.to_string()))
            .await?;
    }
    Ok(from + count)
}

/// Reads `client` up to the sentinel `marker`, and checks that it got `"0"` … `"{to - 1}"` in
/// order, each once, and nothing else, except that a number in `maybe` (a publish whose outcome
/// was unknown) may be missing.
async fn expect_numbers(
    client: &mut Client,
    marker: &Bytes,
    to: usize,
    maybe: &[usize],
) -> CaseResult {
    let got = client.until(marker).await?;
    let mut next = 0;
    for delivery in &got {
        let text = String::from_utf8_lossy(&delivery.payload);
        let number = text.parse::<usize>().ok();
        while next < to && maybe.contains(&next) && number != Some(next) {
            next += 1;
        }
        check!(
            next < to && number == Some(next),
            "connection {} expected message {next}, got {text:?} (lost, duplicated or out of order)",
            client.id()
        );
        next += 1;
    }
    while next < to && maybe.contains(&next) {
        next += 1;
    }
    check!(
        next == to,
        "connection {} received messages up to {next} of {to}: the rest was lost",
        client.id()
    );
    Ok(())
}

/// What the publisher tells the case.
#[derive(Debug)]
enum Progress {
    /// This many messages were reported as sent.
    Sent(usize),
    /// A publish failed with this error; the publisher waits for the database to come back.
    Failed(Error),
}

/// The most messages the publisher sends, well below the connection buffer of
/// [`test_options`](crate::test_options).
const MAX_PUBLISHED: usize = 50_000;

/// Publishes `"0"`, `"1"`, … from `node`, in order, until `stop` is set. A publish that fails is
/// reported and retried once `up` says the database is up, so every message is sent exactly
/// once; one whose outcome is unknown may have been sent, so its number is never used again.
/// Returns the next number, how many publishes failed, and the numbers of unknown outcome.
async fn publish_through_outages(
    node: Node,
    hub: HubName,
    progress: mpsc::UnboundedSender<Progress>,
    mut up: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> Result<(usize, usize, Vec<usize>), CaseError> {
    let mut failures = 0;
    let mut sent = 0;
    let mut unknown = Vec::new();
    while !*stop.borrow() && sent < MAX_PUBLISHED {
        match node
            .publish(Message::to_all(hub.clone(), sent.to_string()))
            .await
        {
            Ok(_) => {
                sent += 1;
                let _ = progress.send(Progress::Sent(sent));
            }
            Err(err) => {
                failures += 1;
                if err.is_outcome_unknown() {
                    unknown.push(sent);
                    sent += 1;
                }
                let _ = progress.send(Progress::Failed(err));
                tokio::time::timeout(WAIT, up.wait_for(|up| *up))
                    .await
                    .map_err(|_| {
                        CaseError::Failed(format!("the database did not come back within {WAIT:?}"))
                    })?
                    .map_err(|_| CaseError::Failed("the case stopped".into()))?;
            }
        }
    }
    Ok((sent, failures, unknown))
}

/// The next progress report, within [`WAIT`].
async fn next_progress(
    progress: &mut mpsc::UnboundedReceiver<Progress>,
) -> Result<Progress, CaseError> {
    match tokio::time::timeout(WAIT, progress.recv()).await {
        Ok(Some(report)) => Ok(report),
        Ok(None) => Err(CaseError::Failed("the publisher stopped".into())),
        Err(_) => Err(CaseError::Failed(format!(
            "the publisher reported nothing within {WAIT:?}"
        ))),
    }
}

/// Waits until the publisher reports at least `target` messages sent; returns the count.
async fn sent_at_least(
    progress: &mut mpsc::UnboundedReceiver<Progress>,
    mut sent: usize,
    target: usize,
) -> Result<usize, CaseError> {
    while sent < target {
        match next_progress(progress).await? {
            Progress::Sent(n) => sent = n,
            // A driver may still fail a call or two while it reconnects after a restart.
            Progress::Failed(
                Error::Driver { .. } | Error::Timeout(_) | Error::OutcomeUnknown { .. },
            ) => {}
            Progress::Failed(err) => {
                return Err(CaseError::Failed(format!(
                    "a publish failed with {err:?}, not a driver error"
                )));
            }
        }
    }
    Ok(sent)
}

/// The database stops and starts twice while node A keeps publishing to node B's client:
/// publishes during an outage fail with an error (never reported as sent), the publisher
/// retries them, and every message reported as sent arrives exactly once, in order. One cut off
/// in flight fails with an unknown outcome: it arrives once or not at all.
/// Checklist B.37.
pub async fn database_restart_no_loss(ctx: &mut Ctx) -> CaseResult {
    const OUTAGES: usize = 2;
    const BETWEEN: usize = 150;
    let [a, b] = ctx.nodes::<2>().await?;
    let mut client = ctx.connect(&b, None).await?;
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = watch::channel(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = tokio::spawn(publish_through_outages(
        a.clone(),
        ctx.hub.clone(),
        progress_tx,
        up_rx,
        stop_rx,
    ));

    let mut sent = 0;
    for _ in 0..OUTAGES {
        sent = sent_at_least(&mut progress, sent, sent + BETWEEN).await?;
        up_tx.send_replace(false);
        ctx.namespace().stop_database().await?;
        // Wait until a publish has failed against the stopped database.
        loop {
            match next_progress(&mut progress).await? {
                Progress::Sent(n) => sent = n,
                Progress::Failed(err) => {
                    check!(
                        matches!(
                            err,
                            Error::Driver { .. } | Error::Timeout(_) | Error::OutcomeUnknown { .. }
                        ),
                        "a publish during the outage failed with {err:?}, not a driver error"
                    );
                    break;
                }
            }
        }
        ctx.namespace().start_database().await?;
        up_tx.send_replace(true);
    }
    sent_at_least(&mut progress, sent, sent + BETWEEN).await?;
    stop_tx.send_replace(true);

    let (sent, failures, unknown) = match tokio::time::timeout(WAIT, publisher).await {
        Ok(Ok(result)) => result?,
        Ok(Err(err)) => return Err(CaseError::Failed(format!("the publisher panicked: {err}"))),
        Err(_) => {
            return Err(CaseError::Failed(format!(
                "the publisher did not stop within {WAIT:?}"
            )));
        }
    };
    check!(
        sent < MAX_PUBLISHED,
        "the publisher reached its limit of {MAX_PUBLISHED} messages before the case ended"
    );
    check!(
        failures >= OUTAGES,
        "only {failures} publishes failed during {OUTAGES} outages"
    );
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    expect_numbers(&mut client, &marker, sent, &unknown).await
}

/// While the database is stopped, connecting fails with an error and leaves nothing
/// registered, on a hub the node already serves and on a new one, and an existing connection
/// can still be disconnected locally; once the database is back, connecting, publishing
/// across nodes and disconnecting work again, and the failed connection ids are free.
/// Checklist A, extras (a failing connection factory is reported and the node can still
/// disconnect).
pub async fn failing_backplane_reports_errors(ctx: &mut Ctx) -> CaseResult {
    let [a, b] = ctx.nodes::<2>().await?;
    let backplane = ctx.backplane().await?;
    let mut existing = ctx.connect(&a, Some("erin")).await?;
    let mut remote = ctx.connect(&b, None).await?;
    let failed_id = ConnectionId::new("failed-connection")?;
    let new_hub = HubName::new("conformance-new")?;
    check_eq!(a.local_connection_count(), 1);

    ctx.namespace().stop_database().await?;
    for hub in [&ctx.hub, &new_hub] {
        match a
            .connect(hub, Some(failed_id.clone()), Some(UserId::new("erin")?))
            .await
        {
            Err(Error::Driver { .. } | Error::Timeout(_)) => {}
            other => {
                return Err(CaseError::Failed(format!(
                    "connecting to hub {hub} while the database is stopped expected a driver error, got {other:?}"
                )));
            }
        }
        check_eq!(a.local_connection_count(), 1);
    }
    match a
        .publish(Message::to_all(ctx.hub.clone(), "while down"))
        .await
    {
        Err(Error::Driver { .. } | Error::Timeout(_)) => {}
        other => {
            return Err(CaseError::Failed(format!(
                "publishing while the database is stopped expected a driver error, got {other:?}"
            )));
        }
    }
    // Disconnecting still works locally; the driver may report that it could not record it.
    match a.disconnect(&ctx.hub, existing.id()).await {
        Ok(true) | Err(Error::Driver { .. } | Error::Timeout(_)) => {}
        other => {
            return Err(CaseError::Failed(format!(
                "disconnecting while the database is stopped expected true or a driver error, got {other:?}"
            )));
        }
    }
    check_eq!(a.local_connection_count(), 0);
    check!(
        existing.closed().await?,
        "the disconnected connection's channel stayed open"
    );
    let existing_id = existing.id().clone();
    ctx.namespace().start_database().await?;
    // A disconnect the backplane could not record is removed by a later heartbeat.
    until_after_jobs(
        &a,
        Job::Heartbeat,
        "the connection disconnected while the database was down is still registered",
        || async {
            Ok(backplane
                .connection(&ctx.hub, &existing_id)
                .await?
                .is_none())
        },
    )
    .await?;

    for hub in [&ctx.hub, &new_hub] {
        check!(
            backplane.connection(hub, &failed_id).await?.is_none(),
            "a connection whose connect failed is registered in hub {hub}"
        );
    }
    let connection = a
        .connect(
            &ctx.hub,
            Some(failed_id.clone()),
            Some(UserId::new("erin")?),
        )
        .await?;
    let mut again = Client {
        node: a.clone(),
        connection,
    };
    let info = backplane.connection(&ctx.hub, &failed_id).await?;
    check_eq!(info.map(|c| c.node), Some(a.id().clone()));
    let mut on_new_hub = crate::connect(&a, &new_hub, None).await?;

    b.publish(Message::to_all(ctx.hub.clone(), "back")).await?;
    again.expect(b"back").await?;
    remote.expect(b"back").await?;
    b.publish(Message::to_all(new_hub.clone(), "new hub"))
        .await?;
    on_new_hub.expect(b"new hub").await?;
    a.publish(Message::to_all(ctx.hub.clone(), "from a"))
        .await?;
    again.expect(b"from a").await?;
    remote.expect(b"from a").await?;

    check!(
        a.disconnect(&ctx.hub, again.id()).await?,
        "disconnect found no connection"
    );
    check!(
        backplane.connection(&ctx.hub, again.id()).await?.is_none(),
        "a disconnected connection is still registered"
    );
    for node in [&a, &b] {
        let marker = sentinel(node, &ctx.hub, &[&remote]).await?;
        remote.quiet_until(&marker).await?;
    }
    Ok(())
}

/// The answer to an append is lost after it committed (the connection broke on the way back):
/// the publishing node finds its records in the log, so the publish succeeds and its own
/// connections get the message exactly once, as the other node's do. When it cannot find out
/// (the log's end cannot be read), the publish fails with `OutcomeUnknown`, never a plain
/// failure that invites a retry, and its own connections still get the message, once, when
/// its reader finds it in the log. Issue: an append whose outcome is unknown.
pub async fn lost_append_answer_delivers_everywhere_once(ctx: &mut Ctx) -> CaseResult {
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    let a = ctx.node_on(faulty.clone(), test_options()).await?;
    let b = ctx.node().await?;
    let mut local = ctx.connect(&a, None).await?;
    let mut remote = ctx.connect(&b, None).await?;

    faulty.lose_reply_next(crate::Op::Append, 1);
    let published = a.publish(Message::to_all(ctx.hub.clone(), "found")).await?;
    check!(
        published.position.is_some(),
        "a broadcast found in the log reported no position"
    );
    local.expect(b"found").await?;
    remote.expect(b"found").await?;
    let marker = sentinel(&b, &ctx.hub, &[&local, &remote]).await?;
    local.quiet_until(&marker).await?;
    remote.quiet_until(&marker).await?;

    faulty.lose_reply_next(crate::Op::Append, 1);
    faulty.fail_next(crate::Op::Tail, usize::MAX);
    let outcome = a.publish(Message::to_all(ctx.hub.clone(), "unknown")).await;
    faulty.fail_next(crate::Op::Tail, 0);
    check!(
        matches!(outcome, Err(Error::OutcomeUnknown { .. })),
        "a publish whose append answer was lost and could not be checked expected OutcomeUnknown, got {outcome:?}"
    );
    local.expect(b"unknown").await?;
    remote.expect(b"unknown").await?;
    let marker = sentinel(&b, &ctx.hub, &[&local, &remote]).await?;
    local.quiet_until(&marker).await?;
    remote.quiet_until(&marker).await?;

    // The reader passes the records before their publisher learns that the answer was lost.
    let sender = ConnectionId::new("one-stream")?;
    faulty.lose_reply_next(crate::Op::Append, 1);
    faulty.fail_next(crate::Op::Tail, usize::MAX);
    faulty.hold_after(crate::Op::Append, true);
    let publishing = tokio::spawn({
        let a = a.clone();
        let message = Message::to_all(ctx.hub.clone(), "passed").sender(sender.clone());
        async move { a.publish(message).await }
    });
    faulty.waiting_after(crate::Op::Append, 1).await?;
    // Behind it in the same stream: once A's connection has this, A's reader is past both.
    b.publish(Message::to_all(ctx.hub.clone(), "behind").sender(sender))
        .await?;
    local.expect(b"behind").await?;
    faulty.hold_after(crate::Op::Append, false);
    let outcome = tokio::time::timeout(WAIT, publishing)
        .await
        .map_err(|_| CaseError::Failed("a publish whose answer was lost hung".into()))?
        .map_err(|e| CaseError::Failed(format!("the publishing task failed: {e}")))?;
    faulty.fail_next(crate::Op::Tail, 0);
    check!(
        outcome.is_ok() || matches!(outcome, Err(Error::OutcomeUnknown { .. })),
        "a publish whose records the reader met expected success or OutcomeUnknown, got {outcome:?}"
    );
    // B delivers its own message at once and A's from the log: in either order.
    let mut got = vec![remote.recv().await?.payload, remote.recv().await?.payload];
    got.sort();
    check!(
        got == [&b"behind"[..], &b"passed"[..]],
        "connection {} expected \"passed\" and \"behind\", got {got:?}",
        remote.id()
    );
    local.expect(b"passed").await?;
    let marker = sentinel(&b, &ctx.hub, &[&local, &remote]).await?;
    local.quiet_until(&marker).await?;
    remote.quiet_until(&marker).await
}

/// Each step of the cleanup runs on its own: with reaping and purging failing on every run,
/// the log is still trimmed. Issue: a failing reap or purge skips the trim.
pub async fn cleanup_steps_run_on_their_own(ctx: &mut Ctx) -> CaseResult {
    let faulty = crate::Faulty::new(ctx.backplane().await?);
    faulty.fail_next(crate::Op::ReapNodes, usize::MAX);
    faulty.fail_next(crate::Op::PurgeExpired, usize::MAX);
    let a = ctx
        .node_on(
            faulty.clone(),
            test_options().retention(crate::keep_last(2)),
        )
        .await?;
    let backplane = ctx.backplane().await?;
    let mut first = None;
    for i in 0..10 {
        let published = a
            .publish(Message::to_all(ctx.hub.clone(), i.to_string()))
            .await?;
        first = first.or(published.position);
    }
    let Some(first) = first else {
        return Err(CaseError::Failed(
            "a broadcast with no local recipient reported no log position".into(),
        ));
    };
    let outcome = until_after_jobs(
        &a,
        Job::Cleanup,
        "the log was not trimmed while reaping and purging failed",
        || async {
            Ok(matches!(
                backplane.read(&ctx.hub, first, 100).await,
                Err(Error::PositionTooOld { .. })
            ))
        },
    )
    .await;
    faulty.fail_next(crate::Op::ReapNodes, 0);
    faulty.fail_next(crate::Op::PurgeExpired, 0);
    outcome
}
