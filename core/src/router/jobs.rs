//! Background jobs: heartbeat, reaping dead nodes, and cleanup (purging expired durable
//! messages, trimming the log).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, MissedTickBehavior};

use super::{Node, NodeEvent};
use crate::backplane::ConnectionInfo;
use crate::error::{Error, Result};

/// The background jobs of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Job {
    /// Writes the node's heartbeat, re-registers it if it was reaped, removes connections whose
    /// unregistration failed earlier, and fails client results awaited from nodes that are gone.
    Heartbeat,
    /// Reaps dead nodes (and connections whose node is not registered), and fails client
    /// results awaited from them. Skipped while the node's own heartbeats fail, and for a node
    /// timeout after they work again, so that other nodes back from the same outage are not
    /// taken for dead.
    Reap,
    /// Purges expired durable messages and trims the log, each step on its own.
    Cleanup,
}

/// The last run of a background job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// Which job.
    pub job: Job,
    /// How many times it ran.
    pub runs: u64,
    /// When it last finished.
    pub last_run: Option<SystemTime>,
    /// The last run's error, if it failed.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct JobTable {
    jobs: Mutex<BTreeMap<Job, JobStatus>>,
    heartbeats: Mutex<Heartbeats>,
}

/// How this node's heartbeats went: whether they fail, and since when they succeed again.
#[derive(Debug, Default)]
struct Heartbeats {
    failing: bool,
    /// When the first heartbeat after a failed one succeeded.
    recovered_at: Option<Instant>,
}

impl JobTable {
    fn record(&self, job: Job, outcome: &Result<()>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let status = jobs.entry(job).or_insert(JobStatus {
            job,
            runs: 0,
            last_run: None,
            last_error: None,
        });
        status.runs += 1;
        status.last_run = Some(SystemTime::now());
        status.last_error = outcome.as_ref().err().map(ToString::to_string);
        drop(jobs);
        if job == Job::Heartbeat {
            let mut heartbeats = self
                .heartbeats
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Err(_) => heartbeats.failing = true,
                Ok(()) if heartbeats.failing => {
                    heartbeats.failing = false;
                    heartbeats.recovered_at = Some(Instant::now());
                }
                Ok(()) => {}
            }
        }
    }

    /// Whether this node may judge others dead: its own heartbeats succeed, and have for
    /// `timeout` since they last failed. After an outage of the backplane every node's last
    /// heartbeat is old; the first node back would otherwise reap all the others before their
    /// own heartbeats get through.
    fn may_reap(&self, timeout: Duration) -> bool {
        let heartbeats = self
            .heartbeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        !heartbeats.failing
            && heartbeats
                .recovered_at
                .is_none_or(|at| at.elapsed() >= timeout)
    }

    pub(crate) fn snapshot(&self) -> Vec<JobStatus> {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

async fn every(node: &Node, period: Duration, job: Job) {
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = node.inner.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticks.tick() => {}
        }
        if node.is_shut_down() {
            return;
        }
        let outcome = match job {
            Job::Heartbeat => node.heartbeat_once().await,
            Job::Reap => node.reap_once().await,
            Job::Cleanup => node.cleanup_once().await,
        };
        if let Err(err) = &outcome {
            tracing::warn!(%err, ?job, "background job failed");
        }
        node.inner.jobs.record(job, &outcome);
        node.emit(NodeEvent::JobRan(job));
    }
}

pub(super) async fn heartbeat(node: Node) {
    let period = node.inner.options.heartbeat_interval;
    every(&node, period, Job::Heartbeat).await;
}

pub(super) async fn reap(node: Node) {
    let period = node.inner.options.reap_interval;
    every(&node, period, Job::Reap).await;
}

pub(super) async fn cleanup(node: Node) {
    let period = node.inner.options.cleanup_interval;
    every(&node, period, Job::Cleanup).await;
}

impl Node {
    /// One heartbeat: a single write for the whole node.
    pub(super) async fn heartbeat_once(&self) -> Result<()> {
        let backplane = &self.inner.backplane;
        if !backplane.heartbeat(&self.inner.id).await? {
            tracing::warn!(node = %self.inner.id, "node was reaped while alive; registering again");
            self.reregister().await?;
            self.emit(NodeEvent::Reregistered);
        }
        let awaited = self.inner.invocations.awaited_nodes();
        if !awaited.is_empty() {
            let live = backplane.live_nodes().await?;
            let gone: Vec<_> = awaited
                .into_iter()
                .filter(|n| n != &self.inner.id && !live.iter().any(|l| &l.id == n))
                .collect();
            self.inner.invocations.fail_nodes(&gone);
        }
        self.remove_orphans().await
    }

    /// Registers the node and its connections and memberships again after it was reaped.
    ///
    /// Before a hub's connections go back, its reader catches up with the log, so that a
    /// group change another node made meanwhile is applied to what is registered again.
    async fn reregister(&self) -> Result<()> {
        let backplane = &self.inner.backplane;
        backplane
            .register_node(&self.inner.id, self.address().as_deref())
            .await?;
        for state in self.hub_states() {
            if state.read().connections.is_empty() {
                continue;
            }
            let mut tails = Vec::new();
            for stream in 0..backplane.stream_count() {
                tails.push(backplane.tail(&state.name, stream).await?);
            }
            let mut progress = state.progress.subscribe();
            let caught_up = progress.wait_for(|cursors| {
                cursors.len() == tails.len()
                    && cursors
                        .iter()
                        .zip(&tails)
                        .all(|(c, t)| c.epoch != t.epoch || c.offset >= t.offset)
            });
            if tokio::time::timeout(self.inner.options.connection_timeout / 3, caught_up)
                .await
                .is_err()
            {
                tracing::warn!(hub = %state.name, "the reader did not catch up before the node registered its connections again");
            }
            let connections: Vec<_> = state
                .read()
                .connections
                .iter()
                .map(|(id, c)| (id.clone(), c.user.clone(), c.groups.clone()))
                .collect();
            for (id, user, groups) in connections {
                let info = ConnectionInfo {
                    hub: state.name.clone(),
                    id: id.clone(),
                    user,
                    node: self.inner.id.clone(),
                    connected_at: SystemTime::now(),
                };
                match backplane.add_connection(&info).await {
                    Ok(()) | Err(Error::DuplicateConnection(_)) => {}
                    Err(err) => return Err(err),
                }
                for group in groups {
                    backplane.add_to_group(&state.name, &group, &id).await?;
                }
            }
        }
        Ok(())
    }

    /// Reaps dead nodes, and fails the client results awaited from them. Waits while this
    /// node's own heartbeats fail, and for a node timeout after they work again.
    pub(super) async fn reap_once(&self) -> Result<()> {
        if !self
            .inner
            .jobs
            .may_reap(self.inner.options.connection_timeout)
        {
            tracing::debug!(
                "not reaping: this node's own heartbeats failed within the node timeout"
            );
            return Ok(());
        }
        let reaped = self
            .inner
            .backplane
            .reap_nodes(self.inner.options.connection_timeout)
            .await?;
        if !reaped.is_empty() {
            tracing::info!(nodes = ?reaped, "reaped dead nodes");
            self.inner.invocations.fail_nodes(&reaped);
            self.emit(NodeEvent::NodesReaped(reaped));
        }
        Ok(())
    }

    /// One cleanup pass: purge expired durable messages, trim the log. Each step runs whatever
    /// the other did; the first error is reported.
    pub(super) async fn cleanup_once(&self) -> Result<()> {
        let backplane = &self.inner.backplane;
        let purged = backplane.purge_expired().await;
        let trimmed = backplane.trim(&self.inner.options.retention).await;
        tracing::debug!(?purged, ?trimmed, "cleanup done");
        purged?;
        trimmed?;
        Ok(())
    }
}
