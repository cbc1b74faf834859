//! Coalescing of concurrent appends: one multi-row insert and one NOTIFY per batch, on the
//! core's batching loop.

use std::sync::{Arc, Weak};

use backplane_core::batch::{self, AppendRequest, BatchLimits};
use backplane_core::{Driver as _, HubName};
use tokio::sync::{mpsc, watch};

use crate::PgBackplane;
use crate::backplane::Inner;
use crate::tables::TableSet;

/// Writes the batches of one stream until the backplane is dropped.
pub(crate) async fn run(
    inner: Weak<Inner>,
    set: Arc<TableSet>,
    hub: HubName,
    stream: u32,
    rx: mpsc::Receiver<AppendRequest>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(limits) = inner.upgrade().map(|inner| BatchLimits {
        delay: inner.options.batch_delay,
        max_records: inner.options.max_batch,
    }) else {
        return;
    };
    batch::run(PgBackplane::NAME, limits, rx, shutdown, |records| {
        let inner = inner.upgrade();
        let (set, hub) = (set.clone(), hub.clone());
        async move {
            let backplane = PgBackplane::from_inner(inner?);
            Some(backplane.write(&set, &hub, stream, &records).await)
        }
    })
    .await;
}
