//! The per-hub loop that reads the log from this node's cursors and delivers what it finds.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::MissedTickBehavior;

use super::{HubState, Node, NodeEvent};
use crate::backplane::{Wake, Wakeups};
use crate::error::{Error, Result};
use crate::name::{ConnectionId, GroupName};
use crate::position::Position;
use crate::record::Record;

/// How many group-change ids a reader remembers, to reload a connection's groups once per
/// change although the change is written to every stream.
const SEEN_CHANGES: usize = 4096;

/// How many of its own appends per stream a node remembers for its reader to step over. Past
/// that, the oldest are forgotten and simply read (and ignored) like any other entry.
const OWN_RANGES: usize = 4096;

/// The entries this node appended with messages it already delivered locally, per stream, so
/// its reader does not fetch them back from the log only to ignore them.
#[derive(Default)]
pub(super) struct OwnEntries {
    streams: HashMap<u32, OwnStream>,
}

/// This node's entries in one stream.
#[derive(Default)]
struct OwnStream {
    epoch: u64,
    /// Start offset -> the fingerprint of each entry from there.
    ranges: BTreeMap<u64, Vec<u64>>,
    /// The end of the last append: a stream hands out every offset once, so an append that
    /// starts below it means the log went back in time.
    end: u64,
    /// The lowest offset handed out again, until the reader takes it.
    reissued: Option<u64>,
}

/// What stepping over this node's entries at a cursor found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Step {
    /// Where this node's next entries start, if known.
    pub(super) next: Option<u64>,
    /// The entries stepped over: offset and fingerprint.
    pub(super) passed: Vec<(u64, u64)>,
    /// This node's entries below the cursor, which the reader passed before their append
    /// answered: offset and fingerprint.
    pub(super) behind: Vec<(u64, u64)>,
    /// The lowest offset one of this node's appends got again: the log went back in time.
    pub(super) reissued: Option<u64>,
}

impl OwnEntries {
    /// Remembers that the entries starting at `position`, with these fingerprints, are this
    /// node's. Appends to a stream come one after another, so each starts at or after the end
    /// of the one before, unless the log went back in time.
    pub(super) fn insert(&mut self, position: Position, fingerprints: Vec<u64>) {
        if fingerprints.is_empty() {
            return;
        }
        let own = self
            .streams
            .entry(position.stream)
            .or_insert_with(|| OwnStream {
                epoch: position.epoch,
                ..OwnStream::default()
            });
        if own.epoch != position.epoch {
            *own = OwnStream {
                epoch: position.epoch,
                ..OwnStream::default()
            };
        }
        if position.offset < own.end {
            own.reissued = Some(
                own.reissued
                    .map_or(position.offset, |r| r.min(position.offset)),
            );
            // What was remembered from there on is another history's.
            own.ranges.split_off(&position.offset);
            if let Some((start, prints)) = own.ranges.iter_mut().next_back() {
                let keep = usize::try_from(position.offset - start).unwrap_or(usize::MAX);
                prints.truncate(keep);
            }
        }
        own.end = position.offset + fingerprints.len() as u64;
        own.ranges.insert(position.offset, fingerprints);
        if own.ranges.len() > OWN_RANGES {
            own.ranges.pop_first();
        }
    }

    /// Forgets the entries of `stream`: its history changed. The end of the last append stays,
    /// so that appends of the old history are not taken for signs of a new change.
    pub(super) fn forget(&mut self, stream: u32) {
        if let Some(own) = self.streams.get_mut(&stream) {
            own.ranges.clear();
            own.reissued = None;
        }
    }

    /// Moves `cursor` past this node's entries that start at it, and forgets those below it.
    pub(super) fn step_over(&mut self, cursor: &mut Position) -> Step {
        let mut step = Step::default();
        let Some(own) = self.streams.get_mut(&cursor.stream) else {
            return step;
        };
        if own.epoch != cursor.epoch {
            own.ranges.clear();
            own.reissued = None;
            return step;
        }
        step.reissued = own.reissued.take();
        while let Some(entry) = own.ranges.first_entry() {
            let start = *entry.key();
            if start > cursor.offset {
                step.next = Some(start);
                break;
            }
            let prints = entry.remove();
            let entries = (start..).zip(prints);
            if start == cursor.offset {
                step.passed.extend(entries);
                cursor.offset = step.passed.last().map_or(start, |(offset, _)| offset + 1);
            } else {
                step.behind
                    .extend(entries.take_while(|(offset, _)| *offset < cursor.offset));
            }
        }
        step
    }
}

/// How many of the entries it handled last a reader remembers per stream.
const RECENT: usize = 1024;

/// A fingerprint of a log entry: its length, its start (version, time, kind, origin, target)
/// and its end (the payload's last bytes).
pub(super) fn fingerprint(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data.len().hash(&mut hasher);
    data[..data.len().min(64)].hash(&mut hasher);
    data[data.len().saturating_sub(64)..].hash(&mut hasher);
    hasher.finish()
}

/// The offsets and fingerprints of the entries a reader handled last in one stream, so that
/// after the log went back in time (a restore from backup, a failover to a standby that had
/// not received the last commits) it can tell the entries it already handled from new ones
/// at the same offsets.
#[derive(Debug, Default)]
struct Recent {
    /// Ascending offsets, at most [`RECENT`].
    entries: VecDeque<(u64, u64)>,
    /// Re-reading after the log went back: entries that match are skipped, until the first
    /// that does not.
    verifying: bool,
}

impl Recent {
    fn push(&mut self, offset: u64, seen: u64) {
        if self.entries.back().is_some_and(|(last, _)| *last >= offset) {
            self.diverged(offset);
        }
        self.entries.push_back((offset, seen));
        if self.entries.len() > RECENT {
            self.entries.pop_front();
        }
    }

    /// The last entry remembered: its offset and fingerprint.
    fn last(&self) -> Option<(u64, u64)> {
        self.entries.back().copied()
    }

    fn get(&self, offset: u64) -> Option<u64> {
        let at = self
            .entries
            .binary_search_by_key(&offset, |(o, _)| *o)
            .ok()?;
        self.entries.get(at).map(|(_, seen)| *seen)
    }

    /// Whether `offset` lies within what is remembered.
    fn covers(&self, offset: u64) -> bool {
        match (self.entries.front(), self.entries.back()) {
            (Some((first, _)), Some((last, _))) => *first <= offset && offset <= *last,
            _ => false,
        }
    }

    /// The log's history differs from offset `changed` on at the latest (it ends there, or
    /// holds another entry there): where to read again from. From the oldest entry remembered
    /// if it is below `changed` (entries that match are then skipped), otherwise from
    /// `changed` (what lies before it is unknown to this node).
    fn rewind(&mut self, changed: u64) -> u64 {
        match self.entries.front() {
            Some((first, _)) if *first < changed => {
                self.verifying = true;
                *first
            }
            _ => {
                self.clear();
                changed
            }
        }
    }

    /// History differs from `offset` on: forget what was remembered from there.
    fn diverged(&mut self, offset: u64) {
        self.verifying = false;
        while self.entries.back().is_some_and(|(last, _)| *last >= offset) {
            self.entries.pop_back();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.verifying = false;
    }
}

pub(super) struct Reader {
    node: Node,
    state: Arc<HubState>,
    cursors: Vec<Position>,
    /// Per stream, what the reader handled last.
    recent: Vec<Recent>,
    wakeups: Option<Wakeups>,
    seen: HashSet<u64>,
    seen_order: VecDeque<u64>,
}

impl Reader {
    /// Subscribes to the hub's wake-ups, then takes every stream's tail as its cursor: whatever
    /// is appended after this returns will be read.
    pub(super) async fn start(node: Node, state: Arc<HubState>) -> Result<Self> {
        let backplane = &node.inner.backplane;
        let wakeups = backplane.subscribe(&state.name).await?;
        let mut cursors = Vec::new();
        let streams = backplane.stream_count();
        for stream in 0..streams {
            cursors.push(backplane.tail(&state.name, stream).await?);
        }
        Ok(Self {
            node,
            state,
            cursors,
            wakeups: Some(wakeups),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            recent: (0..streams).map(|_| Recent::default()).collect(),
        })
    }

    pub(super) async fn run(mut self) {
        self.state.progress.send_replace(self.cursors.clone());
        let mut shutdown = self.node.inner.shutdown.subscribe();
        let mut poll = tokio::time::interval(self.node.inner.options.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll.tick().await;
        let mut dirty = vec![false; self.cursors.len()];
        loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                wake = next_wake(&mut self.wakeups) => wake,
                _ = poll.tick() => Wake::Resync,
            };
            if *shutdown.borrow() {
                return;
            }
            // Take every wake-up already waiting too: one read per stream covers them all.
            let mut wake = Some(wake);
            while let Some(w) = wake {
                match w {
                    Wake::Appended { stream } => {
                        if let Some(flag) = dirty.get_mut(stream as usize) {
                            *flag = true;
                        }
                    }
                    Wake::Resync => dirty.fill(true),
                    Wake::Closed => {
                        self.wakeups = None;
                        dirty.fill(true);
                    }
                }
                wake = self.wakeups.as_mut().and_then(Wakeups::try_recv);
            }
            if self.wakeups.is_none() {
                // Subscribe before reading, so nothing appended after the read goes unnoticed.
                match self.node.inner.backplane.subscribe(&self.state.name).await {
                    Ok(wakeups) => {
                        self.wakeups = Some(wakeups);
                        self.node
                            .emit(NodeEvent::Resubscribed(self.state.name.clone()));
                    }
                    Err(err) => {
                        tracing::warn!(%err, hub = %self.state.name, "could not subscribe to wake-ups; polling");
                    }
                }
            }
            let mut moved = false;
            for (stream, flag) in dirty.iter_mut().enumerate() {
                if *flag && self.catch_up(stream).await.is_ok() {
                    *flag = false;
                    moved = true;
                }
            }
            if moved {
                self.state.progress.send_replace(self.cursors.clone());
            }
        }
    }

    /// Reads one stream up to its end. On error the cursor stays at the first entry not yet
    /// handled, and the next wake-up or poll retries from there.
    async fn catch_up(&mut self, stream: usize) -> Result<()> {
        let batch = self.node.inner.options.read_batch;
        let mut anchored = true;
        loop {
            let before = self.cursors[stream];
            let step = self
                .state
                .own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .step_over(&mut self.cursors[stream]);
            for (offset, seen) in &step.passed {
                self.recent[stream].push(*offset, *seen);
            }
            // One of this node's appends got an offset again, or an offset the reader passed
            // holds another entry than this node's: the log went back in time.
            let changed = step.reissued.into_iter().chain(
                step.behind
                    .iter()
                    .filter(|(offset, seen)| {
                        self.recent[stream]
                            .get(*offset)
                            .is_some_and(|before| before != *seen)
                    })
                    .map(|(offset, _)| *offset),
            );
            if let Some(changed) = changed.min() {
                self.rewound_at_tail(stream, before, changed).await?;
                continue;
            }
            let next_own = step.next;
            let cursor = self.cursors[stream];
            // Read up to this node's next own entries at most; the next round steps over them.
            let limit = next_own.map_or(batch, |start| {
                usize::try_from(start - cursor.offset).map_or(batch, |gap| gap.min(batch))
            });
            // The last entry handled is read again with the next ones: when it is not where it
            // was, the log went back in time and grew past the cursor since.
            let anchor = self.recent[stream]
                .last()
                .filter(|(offset, _)| anchored && *offset + 1 == cursor.offset);
            let from = anchor.map_or(cursor, |(offset, _)| cursor.at(offset));
            let extra = usize::from(anchor.is_some());
            let entries = match self
                .node
                .inner
                .backplane
                .read(&self.state.name, from, limit + extra)
                .await
            {
                Ok(entries) => entries,
                // Reading from the cursor itself tells what happened.
                Err(Error::PositionTooOld { .. }) if anchor.is_some() => {
                    anchored = false;
                    continue;
                }
                Err(Error::PositionTooOld {
                    requested,
                    earliest,
                }) => {
                    if earliest.epoch != requested.epoch {
                        self.recent[stream].clear();
                    } else if requested.offset > earliest.offset {
                        // The stream ends before the cursor: the log went back in time.
                        self.rewound(stream, requested, earliest, earliest.offset);
                        continue;
                    }
                    tracing::warn!(hub = %self.state.name, %requested, %earliest, "log position too old; entries were lost to this node");
                    self.node.emit(NodeEvent::PositionTooOld {
                        hub: self.state.name.clone(),
                        requested,
                        earliest,
                    });
                    self.cursors[stream] = earliest;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%err, hub = %self.state.name, stream, "could not read the log");
                    return Err(err);
                }
            };
            if let Some((offset, seen)) = anchor {
                match entries.first() {
                    Some(entry) if entry.offset == offset && fingerprint(&entry.data) == seen => {}
                    None => {
                        // The stream ends at or before the anchor: reading from the cursor
                        // tells.
                        anchored = false;
                        continue;
                    }
                    Some(_) => {
                        self.rewound_at_tail(stream, cursor, offset).await?;
                        continue;
                    }
                }
            }
            let count = entries.len() - extra;
            self.node
                .inner
                .counters
                .entries_read
                .fetch_add(count as u64, Ordering::Relaxed);
            for entry in entries.into_iter().skip(extra) {
                if entry.offset != self.cursors[stream].offset {
                    tracing::error!(hub = %self.state.name, stream, expected = self.cursors[stream].offset, got = entry.offset, "driver returned an entry out of order");
                }
                if let Some(observer) = self.node.observer()
                    && let Some(at) = Record::encoded_at(&entry.data)
                {
                    let now = super::unix_ms(SystemTime::now());
                    observer.log_lag(Duration::from_millis(now.saturating_sub(at)));
                }
                let seen = fingerprint(&entry.data);
                if self.recent[stream].verifying
                    && self.known(stream, entry.offset, seen, &entry.data)
                {
                    // Handled before the log went back in time.
                    self.cursors[stream].offset = entry.offset + 1;
                    continue;
                }
                self.process(&entry.data).await?;
                self.recent[stream].push(entry.offset, seen);
                self.cursors[stream].offset = entry.offset + 1;
            }
            if count < limit {
                return Ok(());
            }
        }
    }

    /// [`rewound`](Self::rewound), with the stream's end read from the backplane.
    async fn rewound_at_tail(
        &mut self,
        stream: usize,
        requested: Position,
        changed: u64,
    ) -> Result<()> {
        let end = self
            .node
            .inner
            .backplane
            .tail(&self.state.name, requested.stream)
            .await?;
        self.rewound(stream, requested, end, changed);
        Ok(())
    }

    /// The log went back in time under the reader of `stream`, which was at `requested`: its
    /// history differs from `changed` on at the latest, and it ends at `end` now. The reader
    /// goes on from the oldest entry it remembers, skipping those it handled.
    fn rewound(&mut self, stream: usize, requested: Position, end: Position, changed: u64) {
        let resumed = requested.at(self.recent[stream].rewind(changed));
        self.state
            .own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(requested.stream);
        tracing::error!(hub = %self.state.name, %requested, %end, %resumed, "the log went back in time (a restore or a failover); reading again from the last entry this node still knows");
        self.node.emit(NodeEvent::LogRewound {
            hub: self.state.name.clone(),
            requested,
            end,
            resumed,
        });
        self.cursors[stream] = resumed;
    }

    /// While re-reading after the log went back in time: whether the entry at `offset` is one
    /// this node handled before. The first entry that is not ends the re-reading: from there
    /// on, every entry is new.
    fn known(&mut self, stream: usize, offset: u64, seen: u64, data: &Bytes) -> bool {
        let recent = &self.recent[stream];
        match recent.get(offset) {
            Some(before) if before == seen => return true,
            Some(_) => {}
            // A gap in what the reader remembers holds one of this node's own messages, which
            // the reader stepped over; another of them there changes nothing.
            None if recent.covers(offset) && self.is_own(data) => return false,
            None => {}
        }
        self.recent[stream].diverged(offset);
        false
    }

    fn is_own(&self, data: &Bytes) -> bool {
        matches!(Record::decode(data), Ok(Record::Message(env)) if env.origin == self.node.inner.id)
    }

    async fn process(&mut self, data: &Bytes) -> Result<()> {
        let node = &self.node;
        let hub = &self.state.name;
        match Record::decode(data) {
            Err(err) => {
                tracing::error!(%err, hub = %hub, "skipping an undecodable log record");
            }
            Ok(Record::Message(env)) => {
                let expired = env
                    .durable
                    .is_some_and(|(_, expires)| expires <= super::unix_ms(SystemTime::now()));
                if expired {
                    // A reader that fell behind a durable message's lifetime must not deliver it.
                    tracing::debug!(hub = %hub, "skipping an expired durable message");
                } else if env.origin != node.inner.id {
                    node.deliver_local(
                        &self.state,
                        &env.target,
                        &env.except,
                        &env.payload,
                        env.durable.map(|(id, _)| id),
                        true,
                    )
                    .await;
                } else {
                    // One of this node's messages whose append's answer was lost: it is in.
                    let copy = self
                        .state
                        .unconfirmed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .meet(data);
                    if let Some(copy) = copy {
                        node.deliver_local(
                            &self.state,
                            &copy.target,
                            &copy.except,
                            &copy.payload,
                            None,
                            false,
                        )
                        .await;
                    }
                }
            }
            Ok(Record::GroupsChanged { change, connection }) => {
                self.group_changed(change, &connection, None).await?;
            }
            Ok(Record::GroupChanged {
                change,
                connection,
                group,
                member,
            }) => {
                self.group_changed(change, &connection, Some((group, member)))
                    .await?;
            }
            Ok(Record::Invoke {
                id,
                caller,
                node: owner,
                connection,
                payload,
            }) => {
                if let Err(err) = node
                    .on_invoke(hub, id, caller, &owner, connection, payload)
                    .await
                {
                    tracing::warn!(%err, hub = %hub, "could not answer an invocation for a missing connection");
                }
            }
            Ok(Record::Completion {
                id,
                caller,
                outcome,
            }) => node.on_completion(&id, &caller, outcome),
        }
        Ok(())
    }

    /// Another node changed the groups of `connection` in the shared state (and said which
    /// change, when `change` is given). A local connection's groups are reloaded, once per
    /// change although the change is in every stream; when the shared state does not know the
    /// connection (this node was reaped and has not registered it again), the change itself is
    /// applied, so that registering again restores the right groups. A connection that is still
    /// registering notes it, and loads its groups once indexed.
    async fn group_changed(
        &mut self,
        change: u64,
        connection: &ConnectionId,
        which: Option<(GroupName, bool)>,
    ) -> Result<()> {
        if self.seen.contains(&change) {
            return Ok(());
        }
        let local = {
            let mut index = self.state.write();
            if index.contains(connection) {
                true
            } else if let Some(changed) = index.registering.get_mut(connection) {
                *changed = true;
                false
            } else {
                // Not a connection of this node.
                return Ok(());
            }
        };
        if local
            && !self.node.reload_groups(&self.state, connection).await?
            && let Some((group, member)) = which
        {
            self.state.write().set_member(connection, &group, member);
        }
        self.remember(change);
        Ok(())
    }

    fn remember(&mut self, change: u64) {
        if self.seen.insert(change) {
            self.seen_order.push_back(change);
            if self.seen_order.len() > SEEN_CHANGES
                && let Some(old) = self.seen_order.pop_front()
            {
                self.seen.remove(&old);
            }
        }
    }
}

async fn next_wake(wakeups: &mut Option<Wakeups>) -> Wake {
    match wakeups {
        Some(w) => w.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prints(count: u64) -> Vec<u64> {
        (0..count).map(|i| 100 + i).collect()
    }

    #[test]
    fn steps_over_own_entries_at_the_cursor() {
        let mut own = OwnEntries::default();
        own.insert(Position::new(0, 5, 7), prints(3));
        own.insert(Position::new(0, 8, 7), prints(2));
        own.insert(Position::new(0, 20, 7), prints(1));
        let mut cursor = Position::new(0, 2, 7);
        assert_eq!(own.step_over(&mut cursor).next, Some(5));
        assert_eq!(cursor.offset, 2);
        cursor.offset = 5;
        let step = own.step_over(&mut cursor);
        assert_eq!(step.next, Some(20));
        assert_eq!(
            step.passed,
            [(5, 100), (6, 101), (7, 102), (8, 100), (9, 101)]
        );
        assert_eq!(cursor.offset, 10);
        cursor.offset = 21;
        assert_eq!(own.step_over(&mut cursor).behind, [(20, 100)]);
        assert_eq!(cursor.offset, 21);
        assert_eq!(own.step_over(&mut cursor), Step::default());
    }

    #[test]
    fn reports_entries_below_the_cursor_and_forgets_other_epochs() {
        let mut own = OwnEntries::default();
        own.insert(Position::new(1, 5, 7), prints(3));
        let mut cursor = Position::new(1, 6, 7);
        let step = own.step_over(&mut cursor);
        assert_eq!(step.behind, [(5, 100)]);
        assert_eq!((step.next, step.reissued), (None, None));
        assert_eq!(cursor.offset, 6);

        own.insert(Position::new(1, 10, 7), prints(1));
        let mut other_epoch = Position::new(1, 10, 8);
        assert_eq!(own.step_over(&mut other_epoch), Step::default());
        assert_eq!(other_epoch.offset, 10);

        let mut other_stream = Position::new(2, 10, 7);
        assert_eq!(own.step_over(&mut other_stream), Step::default());
    }

    #[test]
    fn an_offset_handed_out_again_is_reported_once() {
        let mut own = OwnEntries::default();
        own.insert(Position::new(0, 5, 7), prints(3));
        own.insert(Position::new(0, 8, 7), prints(2));
        // The log went back to offset 6, and this node appended there again.
        own.insert(Position::new(0, 6, 7), prints(1));
        let mut cursor = Position::new(0, 5, 7);
        let step = own.step_over(&mut cursor);
        assert_eq!(step.reissued, Some(6));
        // What the other history had from offset 6 on is gone.
        assert_eq!(step.passed, [(5, 100), (6, 100)]);
        assert_eq!(cursor.offset, 7);
        assert_eq!(own.step_over(&mut cursor).reissued, None);
        // After the reader forgot the stream, appends at the new end are no change.
        own.forget(0);
        own.insert(Position::new(0, 7, 7), prints(1));
        assert_eq!(own.step_over(&mut cursor).reissued, None);
    }

    #[test]
    fn remembers_a_bounded_number_of_ranges() {
        let mut own = OwnEntries::default();
        for i in 0..(OWN_RANGES as u64 + 10) {
            own.insert(Position::new(0, i, 1), prints(1));
        }
        let mut cursor = Position::new(0, 0, 1);
        assert_eq!(own.step_over(&mut cursor).next, Some(10));
        assert_eq!(cursor.offset, 0);
    }
}
