//! Resumes that reach the wrong node. A stateful client comes back with its connection token
//! on a new socket, and behind a load balancer the socket may land on any node. The node it
//! lands on upgrades the same request on the node that holds the connection (found in the
//! backplane's presence, at the address that node registered) and copies bytes both ways
//! until either side closes. The holder authenticates the request as if the client had come
//! straight to it; a relayed request is never relayed again.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use backplane_core::{ConnectionId, HubName, Node};
use bytes::Bytes;
use fastwebsockets::WebSocketError;
use fastwebsockets::upgrade::UpgradeFut;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Marks a request one node relays to another.
pub(crate) const RELAYED: &str = "x-backplane-relayed";

/// Where the node holding connection `id` listens, when another node holds it and registered
/// its address.
pub(crate) async fn holder(node: &Node, hub: &HubName, id: &ConnectionId) -> Option<String> {
    let backplane = node.backplane();
    let info = match backplane.connection(hub, id).await {
        Ok(info) => info?,
        Err(err) => {
            tracing::debug!(connection = %id, %err, "cannot look up a connection to resume");
            return None;
        }
    };
    if &info.node == node.id() {
        return None;
    }
    let nodes = match backplane.live_nodes().await {
        Ok(nodes) => nodes,
        Err(err) => {
            tracing::debug!(connection = %id, %err, "cannot look up the node holding a connection");
            return None;
        }
    };
    let address = nodes.into_iter().find(|n| n.id == info.node)?.address;
    if address.is_none() {
        tracing::debug!(connection = %id, node = %info.node, "the node holding the connection registered no address");
    }
    address
}

/// Why the holder could not take the socket: the status and text for the client.
pub(crate) type Refused = (StatusCode, String);

/// Upgrades `req` (its path, query and credentials) on the node at `address`, within
/// `limit`; the holder's socket, or what to answer the client.
pub(crate) async fn open(
    address: &str,
    req: &Request<Incoming>,
    limit: Duration,
) -> Result<TokioIo<Upgraded>, Refused> {
    let unreachable = |why: String| {
        tracing::debug!(%address, %why, "cannot relay a resumed socket");
        (
            StatusCode::BAD_GATEWAY,
            "the node holding the connection cannot be reached".to_owned(),
        )
    };
    let base: Uri = address
        .parse()
        .map_err(|e| unreachable(format!("bad address: {e}")))?;
    let authority = base
        .authority()
        .ok_or_else(|| unreachable("the address names no host".into()))?
        .clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut request = Request::builder()
        .method(hyper::Method::GET)
        .uri(target)
        .header(header::HOST, authority.as_str())
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(
            header::SEC_WEBSOCKET_KEY,
            fastwebsockets::handshake::generate_key(),
        )
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(RELAYED, HeaderValue::from_static("1"));
    if let Some(credentials) = req.headers().get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, credentials);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let port = authority.port_u16().unwrap_or(80);
    let upgrade = async {
        let stream = TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match fastwebsockets::handshake::client(&Spawn, request, stream).await {
            Ok((ws, _)) => Ok(ws.into_inner()),
            Err(WebSocketError::InvalidStatusCode(code)) => Err((
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                "the node holding the connection refused it".to_owned(),
            )),
            Err(err) => Err(unreachable(err.to_string())),
        }
    };
    tokio::time::timeout(limit, upgrade)
        .await
        .map_err(|_| unreachable("timed out".into()))?
}

/// Copies bytes between the client's socket and the holder's until either side closes.
pub(crate) async fn pipe(client: UpgradeFut, mut holder: TokioIo<Upgraded>) {
    let mut client = match client.await {
        Ok(ws) => ws.into_inner(),
        Err(err) => {
            tracing::debug!(%err, "websocket upgrade failed");
            return;
        }
    };
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut holder).await {
        tracing::debug!(%err, "a relayed socket ended");
    }
}

/// Runs hyper's background work on tokio.
struct Spawn;

impl hyper::rt::Executor<Pin<Box<dyn Future<Output = ()> + Send>>> for Spawn {
    fn execute(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }
}
