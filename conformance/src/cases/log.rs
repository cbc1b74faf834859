//! Log cases: offsets, replay, retention and epochs through the driver, and ordering and
//! exactly-once delivery through nodes.

use std::collections::HashMap;
use std::time::Duration;

use backplane_core::{
    ConnectionId, Error, HubName, LogEntry, Message, NodeEvent, Position, SharedBackplane,
};
use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::{
    CaseError, CaseResult, Client, Ctx, Faulty, Op, WAIT, check, check_eq, keep_last, sentinel,
    test_options, wait_event,
};

/// `count` payloads `"{prefix}-{i}"`.
fn payloads(prefix: &str, count: usize) -> Vec<Bytes> {
    (0..count)
        .map(|i| Bytes::from(format!("{prefix}-{i}")))
        .collect()
}

/// Reads `stream` from `cursor` to its current end, `limit` entries per read, checking that
/// every entry has exactly the next offset; advances `cursor` and returns the payloads.
async fn read_on(
    backplane: &SharedBackplane,
    hub: &HubName,
    cursor: &mut Position,
    limit: usize,
) -> Result<Vec<Bytes>, CaseError> {
    let mut out = Vec::new();
    loop {
        let entries = backplane.read(hub, *cursor, limit).await?;
        check!(
            entries.len() <= limit,
            "a read with limit {limit} returned {} entries",
            entries.len()
        );
        let count = entries.len();
        for entry in entries {
            check!(
                entry.offset == cursor.offset,
                "stream {} returned offset {} where {} was next: a gap or a step back",
                cursor.stream,
                entry.offset,
                cursor.offset
            );
            cursor.offset += 1;
            out.push(entry.data);
        }
        if count < limit {
            return Ok(out);
        }
    }
}

/// Fails unless `result` is `PositionTooOld` for `requested` with `earliest`.
fn expect_too_old(
    result: backplane_core::Result<Vec<LogEntry>>,
    requested: Position,
    earliest: Position,
) -> CaseResult {
    match result {
        Err(Error::PositionTooOld {
            requested: got_requested,
            earliest: got_earliest,
        }) => {
            check_eq!(got_requested, requested);
            check_eq!(got_earliest, earliest);
            Ok(())
        }
        other => Err(CaseError::Failed(format!(
            "reading from {requested} expected PositionTooOld (earliest {earliest}), got {other:?}"
        ))),
    }
}

/// Awaits a spawned task within [`WAIT`].
async fn join<T>(task: JoinHandle<backplane_core::Result<T>>, what: &str) -> Result<T, CaseError> {
    match tokio::time::timeout(WAIT, task).await {
        Ok(Ok(result)) => Ok(result?),
        Ok(Err(err)) => Err(CaseError::Failed(format!("{what} panicked: {err}"))),
        Err(_) => Err(CaseError::Failed(format!(
            "{what} did not finish within {WAIT:?}"
        ))),
    }
}

/// Receives `per_sender` messages `"{sender}|{seq}"` from each of `senders` on `client`, and
/// fails unless each sender's arrive exactly once and in order.
async fn expect_per_sender_order(
    client: &mut Client,
    senders: &[ConnectionId],
    per_sender: usize,
) -> CaseResult {
    let mut next: HashMap<&str, usize> = senders.iter().map(|s| (s.as_str(), 0)).collect();
    for _ in 0..per_sender * senders.len() {
        let delivery = client.recv().await?;
        let text = String::from_utf8_lossy(&delivery.payload);
        let parsed = text
            .split_once('|')
            .and_then(|(sender, seq)| Some((sender, seq.parse::<usize>().ok()?)));
        let Some((sender, seq)) = parsed else {
            return Err(CaseError::Failed(format!(
                "connection {} received an unexpected payload {text:?}",
                client.id()
            )));
        };
        let Some(expected) = next.get_mut(sender) else {
            return Err(CaseError::Failed(format!(
                "connection {} received a message from unknown sender {sender}",
                client.id()
            )));
        };
        check!(
            seq == *expected,
            "connection {} received {sender}'s message {seq} where {} was next (lost, duplicated or out of order)",
            client.id(),
            *expected
        );
        *expected += 1;
    }
    for (sender, count) in &next {
        check_eq!((*sender, *count), (*sender, per_sender));
    }
    Ok(())
}

/// Offsets stay gap-free in commit order: while an append to a stream is held open in its
/// transaction, other appends go on (to that stream, where the driver may make them wait, and
/// to another stream, which must commit), and a reader that reads the stream from its start
/// sees strictly consecutive offsets; after the held append commits, the reader never finds an
/// entry below what it already read, and in the end every record is in the stream exactly
/// once, each batch contiguous. Checklist B.40.
pub async fn log_offsets_gap_free_in_commit_order(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let start = backplane.tail(&hub, 0).await?;
    let other_start = backplane.tail(&hub, 1).await?;
    let held_records = payloads("held", 3);
    let held = ctx
        .namespace()
        .hold_append(&hub, 0, held_records.clone())
        .await?;

    // Appends to the same stream, each from its own handle: they commit, or wait for the held
    // transaction, as the driver does it.
    let mut appenders = Vec::new();
    for batch in 0..3 {
        let records = payloads(&format!("other{batch}"), 2);
        let (backplane, hub) = (ctx.backplane().await?, hub.clone());
        appenders.push(tokio::spawn(async move {
            backplane.append(&hub, 0, &records).await
        }));
    }
    // An append to another stream must commit while the transaction is held open.
    let elsewhere = payloads("elsewhere", 2);
    let elsewhere_at = backplane.append(&hub, 1, &elsewhere).await?;
    check_eq!(elsewhere_at, other_start);
    let mut other_cursor = other_start;
    check_eq!(
        read_on(&backplane, &hub, &mut other_cursor, 100).await?,
        elsewhere
    );

    let mut cursor = start;
    let mut seen = read_on(&backplane, &hub, &mut cursor, 2).await?;
    check!(
        !seen.iter().any(|p| p.starts_with(b"held")),
        "records of an uncommitted append are readable"
    );
    let read_before_commit = cursor;

    let held_at = held.commit().await?;
    for appender in appenders {
        join(appender, "an append").await?;
    }
    seen.extend(read_on(&backplane, &hub, &mut cursor, 2).await?);
    check!(
        cursor.offset >= read_before_commit.offset,
        "the cursor went back"
    );
    check_eq!(cursor.offset, start.offset + 9);
    check_eq!(backplane.tail(&hub, 0).await?, cursor);
    check!(
        held_at.offset >= start.offset && held_at.offset + 3 <= cursor.offset,
        "the held append got offset {}, outside the stream's {}..{}",
        held_at.offset,
        start.offset,
        cursor.offset
    );

    // Every record once; every batch contiguous and in order, the held one where it said.
    let mut everything = seen.clone();
    everything.sort();
    let mut expected: Vec<Bytes> = held_records.clone();
    for batch in 0..3 {
        expected.extend(payloads(&format!("other{batch}"), 2));
    }
    expected.sort();
    check_eq!(everything, expected);
    let held_index = usize::try_from(held_at.offset - start.offset)
        .map_err(|_| CaseError::Failed("offset out of range".into()))?;
    check_eq!(
        seen.get(held_index..held_index + 3),
        Some(&held_records[..])
    );
    for batch in 0..3 {
        let records = payloads(&format!("other{batch}"), 2);
        let first = seen.iter().position(|p| p == &records[0]);
        let Some(first) = first else {
            return Err(CaseError::Failed(format!("batch {batch} is missing")));
        };
        check_eq!(seen.get(first..first + 2), Some(&records[..]));
    }

    // A fresh reader from the start sees the same history.
    let mut again = start;
    check_eq!(read_on(&backplane, &hub, &mut again, 100).await?, seen);
    Ok(())
}

/// Reading from a position in the middle of a stream returns exactly the later entries, in
/// order and with their offsets, and respects the limit; reading at the tail returns nothing.
/// Checklist B.36 (catching up from a cursor).
pub async fn log_replay_from_position(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let stream = 2;
    let records = payloads("replay", 10);
    let mut positions = Vec::new();
    for record in &records {
        positions.push(
            backplane
                .append(&hub, stream, std::slice::from_ref(record))
                .await?,
        );
    }
    for pair in positions.windows(2) {
        check_eq!(pair[1], pair[0].at(pair[0].offset + 1));
    }
    let middle = positions[4];
    let entries = backplane.read(&hub, middle, 100).await?;
    check_eq!(
        entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (middle.offset..middle.offset + 6).collect::<Vec<_>>()
    );
    check_eq!(
        entries.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        records[4..].to_vec()
    );

    let limited = backplane.read(&hub, positions[2], 3).await?;
    check_eq!(
        limited.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        records[2..5].to_vec()
    );
    check_eq!(limited.first().map(|e| e.offset), Some(positions[2].offset));

    let tail = backplane.tail(&hub, stream).await?;
    check_eq!(tail, positions[9].at(positions[9].offset + 1));
    check_eq!(backplane.read(&hub, tail, 100).await?.len(), 0);
    // The other streams are untouched.
    for other in (0..backplane.stream_count()).filter(|s| *s != stream) {
        let start = backplane.tail(&hub, other).await?;
        check_eq!(backplane.read(&hub, start, 100).await?.len(), 0);
    }
    Ok(())
}

/// Trimming with a keep-last retention removes the oldest entries; reading below the earliest
/// retained entry fails with `PositionTooOld` naming the earliest readable position, and
/// reading from it returns exactly the retained entries. Checklist B.39.
pub async fn log_position_too_old_after_trim(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let start = backplane.tail(&hub, 1).await?;
    let records = payloads("trim", 10);
    check_eq!(backplane.append(&hub, 1, &records).await?, start);
    let small_start = backplane.tail(&hub, 0).await?;
    let small = payloads("small", 3);
    backplane.append(&hub, 0, &small).await?;

    let removed = backplane.trim(&keep_last(4)).await?;
    check_eq!(removed, 6);
    let earliest = start.at(start.offset + 6);
    expect_too_old(backplane.read(&hub, start, 100).await, start, earliest)?;
    let just_before = start.at(start.offset + 5);
    expect_too_old(
        backplane.read(&hub, just_before, 100).await,
        just_before,
        earliest,
    )?;
    let mut cursor = earliest;
    check_eq!(
        read_on(&backplane, &hub, &mut cursor, 100).await?,
        records[6..].to_vec()
    );
    check_eq!(backplane.tail(&hub, 1).await?, start.at(start.offset + 10));

    // A stream within retention keeps everything.
    let mut small_cursor = small_start;
    check_eq!(
        read_on(&backplane, &hub, &mut small_cursor, 100).await?,
        small
    );
    // Trimming again with the same retention removes nothing more.
    check_eq!(backplane.trim(&keep_last(4)).await?, 0);
    Ok(())
}

/// Trims running at once, as every node's cleanup job does, each remove an entry at most once,
/// and a trim that leaves a stream with fewer entries reports every entry it took away: a laxer
/// trim running meanwhile does not finish its deletes for it. The log holds several delete
/// batches, so a trim's deletes take a while. Checklist B.39.
pub async fn concurrent_trims_count_each_entry_once(ctx: &mut Ctx) -> CaseResult {
    const ENTRIES: usize = 12_000;
    const KEPT: usize = 10;
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let start = backplane.tail(&hub, 0).await?;
    for chunk in payloads("many", ENTRIES).chunks(1000) {
        backplane.append(&hub, 0, chunk).await?;
    }

    let (done, _) = tokio::sync::watch::channel(false);
    let lax = (0..3)
        .map(|_| {
            let backplane = backplane.clone();
            let mut finished = done.subscribe();
            tokio::spawn(async move {
                let mut removed = 0;
                while !*finished.borrow_and_update() {
                    removed += backplane.trim(&keep_last(u64::MAX)).await?;
                    tokio::task::yield_now().await;
                }
                Ok::<u64, backplane_core::Error>(removed)
            })
        })
        .collect::<Vec<_>>();
    let strict = backplane.trim(&keep_last(KEPT as u64)).await;
    done.send_replace(true);
    let mut stolen = 0;
    for task in lax {
        stolen += task
            .await
            .map_err(|e| CaseError::Failed(format!("a trim task failed: {e}")))??;
    }
    check_eq!(strict?, (ENTRIES - KEPT) as u64);
    check_eq!(stolen, 0);

    let earliest = start.at(start.offset + (ENTRIES - KEPT) as u64);
    expect_too_old(backplane.read(&hub, start, 100).await, start, earliest)?;
    let mut cursor = earliest;
    check_eq!(
        read_on(&backplane, &hub, &mut cursor, 100).await?.len(),
        KEPT
    );
    check_eq!(backplane.trim(&keep_last(KEPT as u64)).await?, 0);
    Ok(())
}

/// A trim cut short, its future dropped at any point (a node shutting down, a caller's
/// timeout), leaves nothing behind that blocks the next trim or corrupts the stream: later trims
/// finish, and the stream reads gap-free from its earliest entry to its end. Checklist B.39.
pub async fn trim_cut_short_does_not_block_the_next(ctx: &mut Ctx) -> CaseResult {
    const ENTRIES: usize = 12_000;
    const KEPT: usize = 10;
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    for cut in [1, 2, 4, 8, 16, 32, 64, 128] {
        for chunk in payloads("cut", ENTRIES).chunks(1000) {
            backplane.append(&hub, 0, chunk).await?;
        }
        let retention = keep_last(KEPT as u64);
        let cut_short =
            tokio::time::timeout(Duration::from_millis(cut), backplane.trim(&retention));
        if let Ok(trimmed) = cut_short.await {
            trimmed?;
        }
        // Two at once, so at least one runs on another pooled connection than the cut one.
        let lax = keep_last(u64::MAX);
        let (one, other) = tokio::time::timeout(WAIT, async {
            tokio::join!(backplane.trim(&lax), backplane.trim(&lax))
        })
        .await
        .map_err(|_| {
            CaseError::Failed(format!(
                "trims after one cut short at {cut} ms did not finish within {WAIT:?}"
            ))
        })?;
        one?;
        other?;
    }
    tokio::time::timeout(WAIT, backplane.trim(&keep_last(KEPT as u64)))
        .await
        .map_err(|_| {
            CaseError::Failed(format!("the last trim did not finish within {WAIT:?}"))
        })??;
    check_eq!(backplane.trim(&keep_last(KEPT as u64)).await?, 0);
    let end = backplane.tail(&hub, 0).await?;
    let earliest = end.at(end.offset - KEPT as u64);
    let below = end.at(end.offset - KEPT as u64 - 1);
    expect_too_old(backplane.read(&hub, below, 100).await, below, earliest)?;
    let mut cursor = earliest;
    check_eq!(
        read_on(&backplane, &hub, &mut cursor, 100).await?,
        payloads("cut", ENTRIES)[ENTRIES - KEPT..].to_vec()
    );
    Ok(())
}

/// A position that belongs to another epoch of a stream fails with `PositionTooOld` naming the
/// stream's earliest position in its real epoch, whatever its offset, and reading from that
/// position works. Checklist B.39.
pub async fn log_position_of_other_epoch_too_old(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let start = backplane.tail(&hub, 0).await?;
    let records = payloads("epoch", 3);
    backplane.append(&hub, 0, &records).await?;
    let other_epoch = if start.epoch > 1 {
        start.epoch - 1
    } else {
        start.epoch + 1
    };
    for offset in [start.offset, start.offset + 1, start.offset + 3] {
        let foreign = Position::new(0, offset, other_epoch);
        expect_too_old(backplane.read(&hub, foreign, 100).await, foreign, start)?;
    }
    let mut cursor = start;
    check_eq!(read_on(&backplane, &hub, &mut cursor, 100).await?, records);
    Ok(())
}

/// A position past the stream's end, as a reader holds after the database went back in time
/// (a restore from backup, a failover to a standby that had not received the last commits),
/// fails with `PositionTooOld` naming the end, never reads as "nothing new": on a stream that
/// was never written, and on one with entries, and again after more were appended. Reading
/// from the end itself is fine and empty. Issue: a log that went back in time.
pub async fn log_position_past_end_too_old(ctx: &mut Ctx) -> CaseResult {
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let empty = backplane.tail(&hub, 1).await?;
    for ahead in [1, 5] {
        let beyond = empty.at(empty.offset + ahead);
        expect_too_old(backplane.read(&hub, beyond, 100).await, beyond, empty)?;
    }
    check_eq!(backplane.read(&hub, empty, 100).await?.len(), 0);

    let start = backplane.tail(&hub, 0).await?;
    let records = payloads("end", 3);
    backplane.append(&hub, 0, &records).await?;
    let end = start.at(start.offset + 3);
    for beyond in [end.at(end.offset + 1), end.at(end.offset + 100)] {
        expect_too_old(backplane.read(&hub, beyond, 100).await, beyond, end)?;
    }
    check_eq!(backplane.read(&hub, end, 100).await?.len(), 0);
    let mut cursor = start;
    check_eq!(read_on(&backplane, &hub, &mut cursor, 100).await?, records);
    check_eq!(cursor, end);
    Ok(())
}

/// A node whose reader stalls while the log grows past retention and is trimmed gets an
/// explicit `PositionTooOld` event naming where it was and where it continues, then delivers
/// exactly the retained entries, in order, and goes on with new ones: never a silent gap.
/// Checklist B.39.
pub async fn reader_behind_retention_gets_signal(ctx: &mut Ctx) -> CaseResult {
    const PUBLISHED: usize = 50;
    const KEPT: usize = 10;
    let publisher = ctx.node().await?;
    let gated = Faulty::new(ctx.backplane().await?);
    let slow = ctx
        .node_on(
            gated.clone(),
            test_options().poll_interval(Duration::from_secs(3600)),
        )
        .await?;
    // The slow node's reader starts here, positioned at the tail.
    let mut client = ctx.connect(&slow, None).await?;
    let backplane = ctx.backplane().await?;

    gated.hold_before(Op::Read, true);
    let mut first = None;
    for i in 0..PUBLISHED {
        let published = publisher
            .publish(Message::to_all(ctx.hub.clone(), format!("m{i}")))
            .await?;
        first.get_or_insert(published.position);
    }
    let Some(Some(first)) = first else {
        return Err(CaseError::Failed(
            "a broadcast to another node reported no log position".into(),
        ));
    };
    // The slow node was woken and its read waits at the gate, behind everything published.
    gated.waiting_before(Op::Read, 1).await?;
    let removed = backplane.trim(&keep_last(KEPT as u64)).await?;
    check_eq!(removed, (PUBLISHED - KEPT) as u64);

    let mut events = slow.events();
    gated.hold_before(Op::Read, false);
    let earliest = first.at(first.offset + (PUBLISHED - KEPT) as u64);
    wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            NodeEvent::PositionTooOld { hub, requested, earliest: at }
                if hub == &ctx.hub && *requested == first && *at == earliest
        )
    })
    .await?;

    for i in PUBLISHED - KEPT..PUBLISHED {
        client.expect(format!("m{i}").as_bytes()).await?;
    }
    publisher
        .publish(Message::to_all(ctx.hub.clone(), "after"))
        .await?;
    client.expect(b"after").await?;
    let marker = sentinel(&publisher, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// Four nodes each publish 5 000 broadcasts at the same time, each from its own sender
/// connection: every connection on every node receives all 20 000 exactly once, each sender's
/// in the order sent (its own node's locally, the others' from the log). Checklist B.40.
pub async fn concurrent_publishers_no_loss_no_duplicates(ctx: &mut Ctx) -> CaseResult {
    const PER_NODE: usize = 5000;
    let nodes = ctx.nodes::<4>().await?;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(ctx.connect(node, None).await?);
    }
    let senders: Vec<ConnectionId> = clients.iter().map(|c| c.id().clone()).collect();
    let mut publishers = Vec::new();
    for (node, sender) in nodes.iter().zip(&senders) {
        let (node, hub, sender) = (node.clone(), ctx.hub.clone(), sender.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_NODE {
                node.publish(
                    Message::to_all(hub.clone(), format!("{sender}|{i}")).sender(sender.clone()),
                )
                .await?;
            }
            Ok(())
        }));
    }
    // Receive while they publish: each wait is bounded by progress, not by the total time.
    for client in &mut clients {
        expect_per_sender_order(client, &senders, PER_NODE).await?;
    }
    for publisher in publishers {
        join(publisher, "a publisher").await?;
    }
    let refs: Vec<&Client> = clients.iter().collect();
    let marker = sentinel(&nodes[0], &ctx.hub, &refs).await?;
    for client in &mut clients {
        client.quiet_until(&marker).await?;
    }
    Ok(())
}

/// With 8 streams per hub, several senders on each of three nodes publish at once, their
/// messages spread over several streams, and every node delivers each sender's messages
/// exactly once and in the order sent. Checklist B.41.
pub async fn multi_stream_per_sender_order(ctx: &mut Ctx) -> CaseResult {
    const PER_SENDER: usize = 200;
    const SENDERS_PER_NODE: usize = 3;
    let nodes = ctx.nodes::<3>().await?;
    let backplane = ctx.backplane().await?;
    check_eq!(backplane.stream_count(), 8);
    let mut tails = Vec::new();
    for stream in 0..8 {
        tails.push(backplane.tail(&ctx.hub, stream).await?);
    }
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let mut publishers = Vec::new();
    for node in &nodes {
        receivers.push(ctx.connect(node, None).await?);
        for _ in 0..SENDERS_PER_NODE {
            let sender = ctx.connect(node, None).await?;
            let (node, hub, id) = (node.clone(), ctx.hub.clone(), sender.id().clone());
            senders.push(sender);
            publishers.push((node, hub, id));
        }
    }
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|(node, hub, id)| {
            tokio::spawn(async move {
                for i in 0..PER_SENDER {
                    node.publish(
                        Message::to_all(hub.clone(), format!("{id}|{i}")).sender(id.clone()),
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .collect();
    let ids: Vec<ConnectionId> = senders.iter().map(|s| s.id().clone()).collect();
    for receiver in &mut receivers {
        expect_per_sender_order(receiver, &ids, PER_SENDER).await?;
    }
    for task in tasks {
        join(task, "a publisher").await?;
    }
    let mut used = 0;
    for (stream, before) in (0..).zip(&tails) {
        if backplane.tail(&ctx.hub, stream).await? != *before {
            used += 1;
        }
    }
    check!(
        used >= 2,
        "nine senders' messages all went to {used} stream(s) of 8"
    );
    let refs: Vec<&Client> = receivers.iter().collect();
    let marker = sentinel(&nodes[0], &ctx.hub, &refs).await?;
    for receiver in &mut receivers {
        receiver.quiet_until(&marker).await?;
    }
    Ok(())
}

/// An append of N records returns the position of the first, the records occupy
/// first..first+N in order, and the tail moves by N; batches appended at the same time each
/// stay contiguous; appending to a stream beyond the stream count fails with `UnknownStream`.
/// Checklist B.40.
pub async fn log_batch_append_is_contiguous(ctx: &mut Ctx) -> CaseResult {
    const BATCH: usize = 5;
    let backplane = ctx.backplane().await?;
    let hub = ctx.hub.clone();
    let stream = 3;
    let start = backplane.tail(&hub, stream).await?;
    let single = payloads("single", 1);
    check_eq!(backplane.append(&hub, stream, &single).await?, start);
    let batch = payloads("batch", BATCH);
    let first = backplane.append(&hub, stream, &batch).await?;
    check_eq!(first, start.at(start.offset + 1));
    check_eq!(
        backplane.tail(&hub, stream).await?,
        first.at(first.offset + BATCH as u64)
    );
    let entries = backplane.read(&hub, first, 100).await?;
    check_eq!(
        entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (first.offset..first.offset + BATCH as u64).collect::<Vec<_>>()
    );
    check_eq!(
        entries.into_iter().map(|e| e.data).collect::<Vec<_>>(),
        batch
    );

    // Concurrent batches from separate handles never interleave.
    let before = backplane.tail(&hub, stream).await?;
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let records = payloads(&format!("w{writer}"), BATCH);
        let (backplane, hub) = (ctx.backplane().await?, hub.clone());
        tasks.push(tokio::spawn(async move {
            let at = backplane.append(&hub, stream, &records).await?;
            Ok((at, records))
        }));
    }
    let mut cursor = before;
    let mut results = Vec::new();
    for task in tasks {
        results.push(join(task, "a batch append").await?);
    }
    let all = read_on(&backplane, &hub, &mut cursor, 7).await?;
    check_eq!(all.len(), 8 * BATCH);
    check_eq!(backplane.tail(&hub, stream).await?, cursor);
    for (at, records) in results {
        check!(
            at.offset >= before.offset && at.offset + BATCH as u64 <= cursor.offset,
            "a batch reported offset {} outside {}..{}",
            at.offset,
            before.offset,
            cursor.offset
        );
        let index = usize::try_from(at.offset - before.offset)
            .map_err(|_| CaseError::Failed("offset out of range".into()))?;
        check_eq!(all.get(index..index + BATCH), Some(&records[..]));
    }

    let streams = backplane.stream_count();
    match backplane.append(&hub, streams, &single).await {
        Err(Error::UnknownStream {
            stream,
            streams: count,
        }) => {
            check_eq!(stream, streams);
            check_eq!(count, streams);
        }
        other => {
            return Err(CaseError::Failed(format!(
                "appending to stream {streams} of {streams} expected UnknownStream, got {other:?}"
            )));
        }
    }
    Ok(())
}

/// The database goes back in time under running nodes (a restore from backup, a failover to a
/// standby that had not received the last commits): the last entries of a stream are gone and
/// new ones take their offsets, fewer than were lost, so the stream ends before the cursor of a
/// node that had read them all. That node notices (`LogRewound`), reads again from what it
/// still knows, skips what it had delivered, and delivers every new entry exactly once. Issue:
/// epochs do not detect a log that went back in time.
pub async fn log_rewind_rereads_without_duplicates(ctx: &mut Ctx) -> CaseResult {
    rewind_under_a_reader(ctx, 3).await
}

/// As [`log_rewind_rereads_without_duplicates`], but more new entries land than were lost
/// before the node reads again, so the stream has grown past its cursor: the node still
/// notices, because the last entry it handled is not where it was.
pub async fn log_rewind_overtaken_rereads_without_duplicates(ctx: &mut Ctx) -> CaseResult {
    rewind_under_a_reader(ctx, 6).await
}

/// Node A publishes ten messages to a stream (its reader steps over them) and reads one of
/// node B's there; the last four entries are lost (a restore or a failover), then B, A and B
/// again append to the same stream before A reads. A's own append gets an offset it had been
/// given before: A notices the log went back in time, and its connection receives every entry
/// of B's new history once, none of A's twice.
pub async fn log_rewind_under_own_appends_rereads_without_loss(ctx: &mut Ctx) -> CaseResult {
    const LOST: u64 = 4;
    let faulty = Faulty::new(ctx.backplane().await?);
    let a = ctx.node_on(faulty.clone(), test_options()).await?;
    let b = ctx.node().await?;
    let mut client = ctx.connect(&a, None).await?;
    let sender = ConnectionId::new("one-stream")?;
    let to_all =
        |text: &str| Message::to_all(ctx.hub.clone(), text.to_owned()).sender(sender.clone());
    for i in 0..10 {
        a.publish(to_all(&format!("old-{i}"))).await?;
        client.expect(format!("old-{i}").as_bytes()).await?;
    }
    // Read by A's reader from the log: once A's connection has it, the reader is past it all.
    let last = b.publish(to_all("b-old")).await?.position;
    client.expect(b"b-old").await?;
    let Some(last) = last else {
        return Err(CaseError::Failed(
            "a broadcast to another node reported no log position".into(),
        ));
    };

    faulty.hold_before(Op::Read, true);
    ctx.namespace()
        .rewind_log(&ctx.hub, last.stream, LOST)
        .await?;
    let mut events = a.events();
    b.publish(to_all("new-0")).await?;
    let mine = a.publish(to_all("mine")).await?.position;
    check!(
        mine.is_some_and(|p| p.offset < last.offset),
        "A's append after the rewind got {mine:?}, expected an offset below {last}"
    );
    client.expect(b"mine").await?;
    for i in 1..5 {
        b.publish(to_all(&format!("new-{i}"))).await?;
    }
    faulty.waiting_before(Op::Read, 1).await?;
    faulty.hold_before(Op::Read, false);
    let hub = ctx.hub.clone();
    wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, NodeEvent::LogRewound { hub: h, .. } if h == &hub),
    )
    .await?;
    for i in 0..5 {
        client.expect(format!("new-{i}").as_bytes()).await?;
    }
    let marker = sentinel(&b, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}

/// Ten entries read by node B, the last four lost, then `new` entries, then B reads.
async fn rewind_under_a_reader(ctx: &mut Ctx, new: usize) -> CaseResult {
    const OLD: usize = 10;
    const LOST: u64 = 4;
    let a = ctx.node().await?;
    let faulty = Faulty::new(ctx.backplane().await?);
    let b = ctx.node_on(faulty.clone(), test_options()).await?;
    let mut client = ctx.connect(&b, None).await?;
    let mut last = None;
    for i in 0..OLD {
        let published = a
            .publish(Message::to_all(ctx.hub.clone(), format!("old-{i}")))
            .await?;
        last = published.position.or(last);
    }
    let Some(last) = last else {
        return Err(CaseError::Failed(
            "a broadcast to another node reported no log position".into(),
        ));
    };
    for i in 0..OLD {
        client.expect(format!("old-{i}").as_bytes()).await?;
    }

    faulty.hold_before(Op::Read, true);
    ctx.namespace()
        .rewind_log(&ctx.hub, last.stream, LOST)
        .await?;
    let mut events = b.events();
    for i in 0..new {
        a.publish(Message::to_all(ctx.hub.clone(), format!("new-{i}")))
            .await?;
    }
    faulty.waiting_before(Op::Read, 1).await?;
    faulty.hold_before(Op::Read, false);
    let (hub, cursor) = (ctx.hub.clone(), last.at(last.offset + 1));
    let end = cursor.offset - LOST + new as u64;
    wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            NodeEvent::LogRewound { hub: h, requested, end: at, .. }
                if h == &hub && *requested == cursor && at.offset == end
        )
    })
    .await?;
    for i in 0..new {
        client.expect(format!("new-{i}").as_bytes()).await?;
    }
    let marker = sentinel(&a, &ctx.hub, &[&client]).await?;
    client.quiet_until(&marker).await
}
