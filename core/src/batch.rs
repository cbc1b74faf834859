//! Coalescing of concurrent appends to one stream, for database drivers: what has queued behind
//! the append being written goes out as one batch (one statement, one wake-up).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::Result;
use crate::name::HubName;
use crate::position::Position;
use crate::stream_queues::StreamQueues;

/// One caller's append, waiting for its batch.
#[derive(Debug)]
pub struct AppendRequest {
    /// The records, in order.
    pub records: Vec<Bytes>,
    /// Where the position of the first record (or the batch's error) goes.
    pub reply: oneshot::Sender<Result<Position>>,
}

/// How a batcher groups appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// How long a batch waits for more appends under load.
    pub delay: Duration,
    /// The most records in one batch.
    pub max_records: usize,
}

/// A driver's append batchers: one queue per stream, each with the task that writes the
/// stream's batches (see [`run`]) while the driver's shared state lives.
#[derive(Debug)]
pub struct Batchers {
    driver: &'static str,
    limits: BatchLimits,
    queues: StreamQueues<AppendRequest>,
}

impl Batchers {
    /// The batchers of the driver named `driver`.
    pub fn new(driver: &'static str, limits: BatchLimits) -> Self {
        Self {
            driver,
            limits,
            queues: StreamQueues::new(QUEUE),
        }
    }

    /// The queue of `stream` of `hub`. The first call makes the stream's writer with
    /// `make_write` and starts its task: each batch goes to the writer with `owner`, until
    /// `owner` is dropped or `shutdown` changes.
    pub fn queue<S, M, W, F>(
        &self,
        hub: &HubName,
        stream: u32,
        owner: &Arc<S>,
        shutdown: &watch::Sender<bool>,
        make_write: M,
    ) -> mpsc::Sender<AppendRequest>
    where
        S: Send + Sync + 'static,
        M: FnOnce() -> W,
        W: Fn(Arc<S>, Vec<Bytes>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Position>> + Send,
    {
        self.queues.get(hub, stream, |rx| {
            let (driver, limits, write) = (self.driver, self.limits, make_write());
            let (owner, shutdown) = (Arc::downgrade(owner), shutdown.subscribe());
            tokio::spawn(async move {
                run(driver, limits, rx, shutdown, |records| {
                    let batch = owner.upgrade().map(|owner| write(owner, records));
                    async move {
                        match batch {
                            Some(batch) => Some(batch.await),
                            None => None,
                        }
                    }
                })
                .await;
            });
        })
    }
}

/// Appends a stream's queue holds before callers wait.
const QUEUE: usize = 4096;

/// Collects appends to one stream into batches of at most `limits.max_records` records, each
/// written by one call of `write`, which returns the position of the batch's first record, or
/// `None` when the driver is gone (the loop then ends). Callers keep their order, and each gets
/// the position of its own first record.
///
/// An append on an idle stream is written at once. Under load (several appends queued, or the
/// previous batch held several), the batch waits up to `limits.delay` for more, and stops
/// waiting once it has as many appends as the previous batch: the callers answered last time
/// are usually back by then.
///
/// The loop ends when every sender is dropped or `shutdown` changes.
pub async fn run<W, F>(
    driver: &'static str,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<AppendRequest>,
    mut shutdown: watch::Receiver<bool>,
    mut write: W,
) where
    W: FnMut(Vec<Bytes>) -> F,
    F: Future<Output = Option<Result<Position>>>,
{
    let max = limits.max_records.max(1);
    let mut previous = 1usize;
    loop {
        let first = tokio::select! {
            request = rx.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut count = first.records.len();
        let mut batch = vec![first];
        while count < max {
            match rx.try_recv() {
                Ok(request) => {
                    count += request.records.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        if batch.len() > 1 || previous > 1 {
            let deadline = Instant::now() + limits.delay;
            while count < max && batch.len() < previous.max(2) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(request)) => {
                        count += request.records.len();
                        batch.push(request);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        previous = batch.len();
        let records: Vec<Bytes> = batch
            .iter()
            .flat_map(|r| r.records.iter().cloned())
            .collect();
        let Some(result) = write(records).await else {
            return;
        };
        let mut skip = 0u64;
        for request in batch {
            let reply = match &result {
                Ok(position) => Ok(position.at(position.offset + skip)),
                Err(err) => Err(err.copy_for(driver)),
            };
            skip += request.records.len() as u64;
            let _ = request.reply.send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[tokio::test]
    async fn queued_appends_share_a_batch_and_keep_their_offsets() {
        let (tx, rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let mut replies = Vec::new();
        for n in [2u8, 1, 3] {
            let (reply, answer) = oneshot::channel();
            let records = (0..n).map(|i| Bytes::from(vec![i])).collect();
            tx.send(AppendRequest { records, reply })
                .await
                .expect("queued");
            replies.push(answer);
        }
        drop(tx);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let limits = BatchLimits {
            delay: Duration::from_millis(1),
            max_records: 100,
        };
        run("test", limits, rx, shutdown, |records| {
            let _ = seen_tx.send(records.len());
            async { Some(Ok(Position::new(0, 10, 7))) }
        })
        .await;
        assert_eq!(seen.recv().await, Some(6), "one batch of every record");
        let mut offsets = Vec::new();
        for answer in replies {
            offsets.push(answer.await.expect("answered").expect("ok").offset);
        }
        assert_eq!(offsets, [10, 12, 13]);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_caller_alike() {
        let (tx, rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let (reply, answer) = oneshot::channel();
        tx.send(AppendRequest {
            records: vec![Bytes::from_static(b"x")],
            reply,
        })
        .await
        .expect("queued");
        drop(tx);
        let limits = BatchLimits {
            delay: Duration::ZERO,
            max_records: 1,
        };
        run("test", limits, rx, shutdown, |_| async {
            Some(Err(Error::transient("test", "database gone")))
        })
        .await;
        let err = answer.await.expect("answered").expect_err("failed");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("database gone"), "{err}");
    }
}
