//! The per-hub loop that reads the log from this node's cursors and delivers what it finds.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::time::MissedTickBehavior;

use super::{HubState, Node, NodeEvent};
use crate::backplane::{Wake, Wakeups};
use crate::error::{Error, Result};
use crate::name::ConnectionId;
use crate::position::Position;
use crate::record::Record;

/// How many group-change ids a reader remembers, to reload a connection's groups once per
/// change although the change is written to every stream.
const SEEN_CHANGES: usize = 4096;

pub(super) struct Reader {
    node: Node,
    state: Arc<HubState>,
    cursors: Vec<Position>,
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
        for stream in 0..backplane.stream_count() {
            cursors.push(backplane.tail(&state.name, stream).await?);
        }
        Ok(Self {
            node,
            state,
            cursors,
            wakeups: Some(wakeups),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
        })
    }

    pub(super) async fn run(mut self) {
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
            match wake {
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
            for (stream, flag) in dirty.iter_mut().enumerate() {
                if *flag && self.catch_up(stream).await.is_ok() {
                    *flag = false;
                }
            }
        }
    }

    /// Reads one stream up to its end. On error the cursor stays at the first entry not yet
    /// handled, and the next wake-up or poll retries from there.
    async fn catch_up(&mut self, stream: usize) -> Result<()> {
        let batch = self.node.inner.options.read_batch;
        loop {
            let cursor = self.cursors[stream];
            let entries = match self
                .node
                .inner
                .backplane
                .read(&self.state.name, cursor, batch)
                .await
            {
                Ok(entries) => entries,
                Err(Error::PositionTooOld {
                    requested,
                    earliest,
                }) => {
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
            let count = entries.len();
            self.node
                .inner
                .counters
                .entries_read
                .fetch_add(count as u64, Ordering::Relaxed);
            for entry in entries {
                if entry.offset != self.cursors[stream].offset {
                    tracing::error!(hub = %self.state.name, stream, expected = self.cursors[stream].offset, got = entry.offset, "driver returned an entry out of order");
                }
                self.process(&entry.data).await?;
                self.cursors[stream].offset = entry.offset + 1;
            }
            if count < batch {
                return Ok(());
            }
        }
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
                    )
                    .await;
                }
            }
            Ok(Record::GroupsChanged { change, connection }) => {
                if !self.seen.contains(&change) && self.state.read().contains(&connection) {
                    self.reload_groups(&connection).await?;
                    self.remember(change);
                }
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

    /// Replaces a local connection's groups with the stored ones. A local change made while the
    /// query ran wins: the query is repeated until no local change interleaves.
    async fn reload_groups(&self, connection: &ConnectionId) -> Result<()> {
        loop {
            let Some(version) = self.state.read().version(connection) else {
                return Ok(());
            };
            let groups = self
                .node
                .inner
                .backplane
                .connection_groups(&self.state.name, connection)
                .await?;
            let mut index = self.state.write();
            if index.version(connection) == Some(version) {
                index.set_groups(connection, groups.into_iter().collect());
                return Ok(());
            }
        }
    }

    fn remember(&mut self, change: u64) {
        if self.seen.insert(change) {
            self.seen_order.push_back(change);
            if self.seen_order.len() > SEEN_CHANGES {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
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
