//! Coalescing of concurrent appends: one multi-row insert and one NOTIFY per batch.

use std::sync::{Arc, Weak};

use backplane_core::{Error, HubName, Position, Result};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::PgBackplane;
use crate::backplane::Inner;
use crate::tables::TableSet;

/// One caller's append, waiting for its batch.
pub(crate) struct AppendRequest {
    pub(crate) records: Vec<Bytes>,
    pub(crate) reply: oneshot::Sender<Result<Position>>,
}

/// The same error for every caller of a failed batch.
fn share(err: &Error) -> Error {
    if err.is_transient() {
        Error::transient(PgBackplane::NAME, err.to_string())
    } else {
        Error::permanent(PgBackplane::NAME, err.to_string())
    }
}

/// Collects appends to one stream into batches of at most `max_batch` records, each written by
/// one statement. Callers keep their order.
///
/// An append on an idle stream is written at once. Under load (several appends queued, or the
/// previous batch held several), the batch waits up to `batch_delay` for more, and stops waiting
/// once it has as many appends as the previous batch: the callers answered last time are
/// usually back by then.
pub(crate) async fn run(
    inner: Weak<Inner>,
    set: Arc<TableSet>,
    hub: HubName,
    stream: u32,
    mut rx: mpsc::Receiver<AppendRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut previous = 1usize;
    loop {
        let first = tokio::select! {
            request = rx.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        let backplane = PgBackplane::from_inner(inner);
        let (delay, max) = {
            let options = &backplane.inner().options;
            (options.batch_delay, options.max_batch)
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
            let deadline = Instant::now() + delay;
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
        let result = backplane.write(&set, &hub, stream, &records).await;
        let mut skip = 0u64;
        for request in batch {
            let reply = match &result {
                Ok(position) => Ok(position.at(position.offset + skip)),
                Err(err) => Err(share(err)),
            };
            skip += request.records.len() as u64;
            let _ = request.reply.send(reply);
        }
    }
}
