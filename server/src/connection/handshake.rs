//! The handshake: the first record, the protocol it names, registering the connection, and
//! the answer.

use std::time::Duration;

use backplane_core::Error;
use fastwebsockets::OpCode;

use crate::protocol::{self, Handshake, Protocol, RecordBuffer};
use crate::socket::Outbox;

use super::{Reader, Setup};

/// What the handshake established.
pub(super) struct Opened {
    pub(super) wire: Protocol,
    pub(super) stateful: bool,
    /// Records that came in the handshake's frame.
    pub(super) records: Vec<Vec<u8>>,
    pub(super) connection: backplane_core::Connection,
}

/// Reads the handshake, registers the connection and accepts it; `None` when refused (the
/// client was told why).
pub(super) async fn handshake(
    reader: &mut Reader,
    buffer: &mut RecordBuffer,
    setup: &Setup,
) -> Option<Opened> {
    let limit = setup.limits.handshake_timeout;
    // The handshake: the first record, within the handshake timeout.
    let first = tokio::time::timeout(limit, async {
        loop {
            let frame = reader.read().await.map_err(|e| e.to_string())?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    // Bytes that are no handshake are answered (below); a failed socket is not.
                    match buffer.push_handshake(&frame.payload, setup.limits.max_message_size) {
                        Ok(Some(handshake)) => return Ok::<_, String>(Ok(handshake)),
                        Ok(None) => {}
                        Err(err) => return Ok(Err(err)),
                    }
                }
                OpCode::Close => return Err("the client closed before its handshake".into()),
                _ => {}
            }
        }
    })
    .await;
    let handshake = match first {
        Ok(Ok(record)) => record.and_then(|record| Handshake::parse(&record)),
        Ok(Err(reason)) => {
            setup.metrics.refused("handshake");
            tracing::debug!(connection = %setup.id, %reason, "handshake failed");
            return None;
        }
        Err(_) => {
            setup.metrics.refused("handshake");
            let reason = "no handshake within the handshake timeout";
            reject(reader, reason, limit).await;
            tracing::debug!(connection = %setup.id, reason, "handshake failed");
            return None;
        }
    };
    if !matches!(&handshake, Ok(h) if Protocol::from_name(&h.protocol).is_some() && h.version <= protocol::MAX_VERSION)
    {
        setup.metrics.refused("handshake");
    }
    let handshake = match handshake {
        Ok(h) if Protocol::from_name(&h.protocol).is_none() => {
            let reason = format!("The protocol '{}' is not supported.", h.protocol);
            reject(reader, &reason, limit).await;
            return None;
        }
        // Every version up to the server's own, as ASP.NET Core's protocols accept: 0 and 1
        // differ from 2 only in having no stateful reconnect.
        Ok(h) if h.version > protocol::MAX_VERSION => {
            let reason = format!(
                "The server does not support version {} of the '{}' protocol.",
                h.version, h.protocol
            );
            reject(reader, &reason, limit).await;
            return None;
        }
        Ok(h) => h,
        Err(err) => {
            reject(reader, &err.0, limit).await;
            return None;
        }
    };
    tracing::trace!(connection = %setup.id, protocol = %handshake.protocol, version = handshake.version, "handshake");
    let wire = Protocol::from_name(&handshake.protocol).unwrap_or(Protocol::Json);
    buffer.switch_to(wire);
    let records = match buffer.drain(setup.limits.max_message_size) {
        Ok(records) => records,
        Err(err) => {
            setup.metrics.refused("handshake");
            reject(reader, &err.0, limit).await;
            return None;
        }
    };

    let hub_name = setup.hub.name();
    let connection = match setup
        .node
        .connect(hub_name, Some(setup.id.clone()), setup.user.clone())
        .await
    {
        Ok(c) => c,
        Err(err) => {
            setup.metrics.refused(match &err {
                Error::TooManyConnections { .. } => "limit",
                _ => "register",
            });
            let reason = match &err {
                Error::TooManyConnections { .. } => "The server is at its connection limit.".into(),
                Error::DuplicateConnection(_) => "This connection id is already connected.".into(),
                other => format!("The connection could not be registered: {other}"),
            };
            reject(reader, &reason, limit).await;
            return None;
        }
    };
    let mut outbox = Outbox::default();
    outbox.frame(OpCode::Text, &protocol::handshake_response(None));
    if !matches!(
        tokio::time::timeout(limit, outbox.flush(reader.get_mut())).await,
        Ok(Ok(()))
    ) {
        let _ = setup.node.disconnect(hub_name, &setup.id).await;
        return None;
    }
    Some(Opened {
        wire,
        stateful: handshake.version >= 2,
        records,
        connection,
    })
}

/// Sends a handshake error and closes.
pub(super) async fn reject(reader: &mut Reader, reason: &str, limit: Duration) {
    let mut outbox = Outbox::default();
    outbox.frame(OpCode::Text, &protocol::handshake_response(Some(reason)));
    outbox.close(1002, reason);
    let _ = tokio::time::timeout(limit, outbox.flush(reader.get_mut())).await;
}
