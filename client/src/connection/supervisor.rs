//! The task that watches a connection's sessions: a lost socket resumed (stateful reconnect)
//! or the connection reconnected by its policy.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;

use super::session::Session;
use super::{ConnectionCore, ConnectionEvent, ConnectionState, End};

/// Runs sessions one after another: the first, then each reconnect, until the connection ends.
pub(super) async fn supervise(
    shared: Arc<ConnectionCore>,
    first: Session,
    mut stop: watch::Receiver<bool>,
) {
    let mut session = first;
    let error = loop {
        let mut end = session.run(&shared, &mut stop).await;
        if matches!(end, End::Lost(_)) && !shared.stopping() && shared.can_resume() {
            // Stateful reconnect: the same connection continues on a new socket.
            shared.live().resuming = true;
            if let Some(next) = resume_loop(&shared, &mut stop).await {
                session = next;
                continue;
            }
        }
        {
            let mut live = shared.live();
            live.resuming = false;
            live.seq = None;
            live.connection_id = None;
        }
        if shared.stopping() {
            end = End::Stopped;
        }
        let (reason, reconnect) = match end {
            End::Stopped => (None, false),
            End::ServerClosed {
                error,
                allow_reconnect,
            } => (
                Some(match error {
                    Some(error) => format!("the server closed the connection: {error}"),
                    None => "the server closed the connection".into(),
                }),
                allow_reconnect,
            ),
            End::Lost(reason) => (Some(reason), true),
        };
        shared.fail_pending(&reason);
        let policy = match (&shared.config.reconnect, reconnect && !shared.stopping()) {
            (Some(policy), true) => policy.clone(),
            _ => break reason,
        };
        let reason = reason.unwrap_or_default();
        shared.state.send_replace(ConnectionState::Reconnecting);
        let _ = shared.events.send(ConnectionEvent::Reconnecting {
            error: reason.clone(),
        });
        tracing::info!(%reason, "connection lost; reconnecting");
        match reconnect_loop(&shared, &policy, &mut stop, reason).await {
            Ok(next) => {
                let connection_id = shared.live().connection_id.clone();
                session = next;
                let _ = shared
                    .events
                    .send(ConnectionEvent::Reconnected { connection_id });
            }
            Err(reason) => break reason,
        }
    };
    shared.fail_pending(&error);
    shared.state.send_replace(ConnectionState::Disconnected);
    let _ = shared.events.send(ConnectionEvent::Closed { error });
}

/// Tries to resume the stateful connection on new sockets, for as long as the server keeps
/// it (its client timeout, taken to be our server timeout). `None` when it cannot.
pub(super) async fn resume_loop(
    shared: &Arc<ConnectionCore>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Session> {
    let resume = shared.live().seq.as_ref()?.resume.clone();
    let backoff = crate::ReconnectPolicy::default()
        .initial(Duration::from_millis(100))
        .max(Duration::from_secs(2));
    let lost_at = Instant::now();
    let mut attempt = 0u32;
    while lost_at.elapsed() < shared.config.server_timeout {
        if attempt > 0 {
            let delay = backoff.delay(attempt - 1, lost_at.elapsed())?;
            // The backoff: a stop within it ends the attempts.
            if tokio::time::timeout(delay, stop.wait_for(|stop| *stop))
                .await
                .is_ok()
            {
                return None;
            }
        }
        attempt = attempt.saturating_add(1);
        match shared.reopen(&resume).await {
            Ok(opened) if !shared.stopping() => {
                tracing::debug!(attempt, "connection resumed on a new socket");
                return Some(Session::install(shared, opened));
            }
            Ok(_) => return None,
            // The server no longer has the connection.
            Err(Error::Refused { .. }) => return None,
            Err(err) => tracing::debug!(attempt, %err, "resume attempt failed"),
        }
    }
    None
}

/// Tries to connect again until it works, the policy gives up (`Err(Some(why))`), or the
/// connection is stopped (`Err(None)`).
pub(super) async fn reconnect_loop(
    shared: &Arc<ConnectionCore>,
    policy: &crate::ReconnectPolicy,
    stop: &mut watch::Receiver<bool>,
    mut last_error: String,
) -> std::result::Result<Session, Option<String>> {
    let lost_at = Instant::now();
    let mut attempt = 0u32;
    loop {
        let Some(delay) = policy.delay(attempt, lost_at.elapsed()) else {
            return Err(Some(format!(
                "reconnecting gave up after {attempt} attempts; the last error: {last_error}"
            )));
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|stop| *stop) => return Err(None),
        }
        attempt = attempt.saturating_add(1);
        match shared.connect().await {
            Ok(socket) if !shared.stopping() => return Ok(Session::install(shared, socket)),
            Ok(_) => return Err(None),
            Err(err) => {
                if shared.stopping() {
                    return Err(None);
                }
                tracing::debug!(attempt, %err, "reconnect attempt failed");
                last_error = err.to_string();
            }
        }
    }
}
