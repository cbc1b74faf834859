//! The node's LISTEN connection: turns notifications into wake-ups, reconnects with backoff,
//! and checks itself with a round trip so a dead connection is noticed quickly.

use std::sync::Arc;
use std::time::Duration;

use backplane_core::{HubName, WakeupHub};
use tokio::sync::{oneshot, watch};
use tokio_postgres::AsyncMessage;

use crate::options::PgOptions;
use crate::schema::{Names, quote};

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Splits a notification payload, `hub/stream`, into its parts.
pub(crate) fn parse_payload(payload: &str) -> Option<(HubName, u32)> {
    let (hub, stream) = payload.rsplit_once('/')?;
    Some((HubName::new(hub).ok()?, stream.parse().ok()?))
}

/// The payload announcing an append to `stream` of `hub`.
pub(crate) fn payload(hub: &HubName, stream: u32) -> String {
    format!("{hub}/{stream}")
}

pub(crate) struct Listener {
    /// The connection configuration, TLS mode applied.
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub(crate) options: PgOptions,
    pub(crate) names: Names,
    pub(crate) wakeups: Arc<WakeupHub>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Listener {
    /// Runs until shutdown. `ready` fires once the first LISTEN is in place.
    pub(crate) async fn run(mut self, ready: oneshot::Sender<Result<(), String>>) {
        let mut ready = Some(ready);
        let mut backoff = MIN_BACKOFF;
        loop {
            let mut listened = false;
            match self.session(&mut ready, &mut listened).await {
                Ok(()) => return,
                Err(err) => {
                    if listened {
                        // The connection worked for a while: reconnect quickly.
                        backoff = MIN_BACKOFF;
                    }
                    // Everything appended while nobody listened must be read: subscribers see
                    // `Wake::Closed`, read from their cursors and subscribe again.
                    self.wakeups.close_all();
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(err));
                        return;
                    }
                    tracing::warn!(%err, ?backoff, "postgres listener lost; reconnecting");
                }
            }
            // Wait out the backoff, or stop at once on shutdown.
            if tokio::time::timeout(backoff, self.shutdown.changed())
                .await
                .is_ok()
            {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection's life. `Ok` means shutdown; `Err` means the connection was lost.
    async fn session(
        &mut self,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        listened: &mut bool,
    ) -> Result<(), String> {
        let mut config = self.config.clone();
        config.application_name(format!("backplane-listener {}", self.names.channel));
        let (client, mut connection) = config
            .connect(self.tls.clone())
            .await
            .map_err(|e| format!("could not connect: {e}"))?;
        let (dead_tx, mut dead_rx) = oneshot::channel::<String>();
        let wakeups = self.wakeups.clone();
        let pump = tokio::spawn(async move {
            let reason = loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if let Some((hub, stream)) = parse_payload(n.payload()) {
                            wakeups.notify(&hub, stream);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("connection failed: {e}"),
                    None => break "connection closed".to_owned(),
                }
            };
            let _ = dead_tx.send(reason);
        });
        let result = self.listen(&client, &mut dead_rx, ready, listened).await;
        pump.abort();
        result
    }

    async fn listen(
        &mut self,
        client: &tokio_postgres::Client,
        dead: &mut oneshot::Receiver<String>,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        listened: &mut bool,
    ) -> Result<(), String> {
        client
            .batch_execute(&format!("LISTEN {}", quote(&self.names.channel)))
            .await
            .map_err(|e| format!("LISTEN failed: {e}"))?;
        *listened = true;
        // Now listening: whatever was appended before is found by re-reading.
        self.wakeups.resync_all();
        if let Some(tx) = ready.take() {
            let _ = tx.send(Ok(()));
        } else {
            tracing::info!(channel = %self.names.channel, "postgres listener reconnected");
        }
        let mut check = tokio::time::interval(self.options.listener_check);
        check.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.changed() => return Ok(()),
                reason = &mut *dead => {
                    return Err(reason.unwrap_or_else(|_| "connection task ended".to_owned()));
                }
                _ = check.tick() => {
                    let timeout = self.options.listener_check.max(Duration::from_secs(1));
                    match tokio::time::timeout(timeout, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(format!("round trip failed: {e}")),
                        Err(_) => return Err(format!("no answer to a round trip within {timeout:?}")),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrip() {
        let hub = HubName::new("chat.v2").unwrap();
        assert_eq!(parse_payload(&payload(&hub, 3)), Some((hub, 3)));
        assert_eq!(parse_payload("no-slash"), None);
        assert_eq!(parse_payload("bad hub/1"), None);
        assert_eq!(parse_payload("hub/x"), None);
    }
}
