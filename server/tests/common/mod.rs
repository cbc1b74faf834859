//! A raw WebSocket client speaking the hub protocol byte by byte, and an in-process server, for
//! protocol edge cases.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::{MemoryBackplane, Node, NodeOptions, SharedBackplane};
use backplane_server::{Hub, Limits, Running, Security, Server};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::{Empty, Full};
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(10);

/// Starts a server on a memory backplane with `hubs`, anonymous clients allowed.
pub async fn server(hubs: Vec<Hub>, limits: Limits) -> Running {
    server_with(
        hubs,
        limits,
        Security {
            allow_anonymous: true,
            ..Security::default()
        },
        NodeOptions::new(),
    )
    .await
}

pub async fn server_with(
    hubs: Vec<Hub>,
    limits: Limits,
    security: Security,
    options: NodeOptions,
) -> Running {
    server_on(
        Arc::new(MemoryBackplane::new()),
        hubs,
        limits,
        security,
        options,
    )
    .await
}

/// Starts a server on `backplane`.
pub async fn server_on(
    backplane: SharedBackplane,
    hubs: Vec<Hub>,
    limits: Limits,
    security: Security,
    options: NodeOptions,
) -> Running {
    let node = Node::start(backplane, options).await.expect("a node");
    let mut server = Server::new(node).limits(limits).security(security);
    for hub in hubs {
        server = server.hub(hub);
    }
    server
        .bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("the server binds")
}

struct Spawner;

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// What the server sent: a text payload, or a close frame.
#[derive(Debug)]
pub enum Received {
    Text(Vec<u8>),
    Close(u16, String),
}

/// A WebSocket to the server, without any SignalR client logic.
pub struct RawClient {
    ws: FragmentCollector<TokioIo<Upgraded>>,
    /// Records received but not yet taken.
    pending: Vec<Value>,
}

/// An HTTP request to the server without a body; returns the status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_with_body(addr, method, path, headers, "").await
}

/// An HTTP request to the server with `body`; returns the status and body.
pub async fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .expect("a request"),
        )
        .await
        .expect("a response");
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("a body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

impl RawClient {
    /// Opens a WebSocket at `path` (with its query), without a handshake.
    pub async fn open(addr: SocketAddr, path: &str) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = Request::builder()
            .method("GET")
            .uri(format!("http://{addr}{path}"))
            .header("Host", addr.to_string())
            .header("Upgrade", "websocket")
            .header("Connection", "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let (ws, _) = fastwebsockets::handshake::client(&Spawner, request, stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            ws: FragmentCollector::new(ws),
            pending: Vec::new(),
        })
    }

    /// Opens a WebSocket to `hub` (skipNegotiation) and completes the JSON handshake.
    pub async fn connect(addr: SocketAddr, hub: &str, user: &str) -> Self {
        let mut client = Self::open(addr, &format!("/hubs/{hub}?user={user}"))
            .await
            .expect("the upgrade succeeds");
        client.send(br#"{"protocol":"json","version":1}"#).await;
        let answer = client.next_record().await.expect("a handshake answer");
        assert_eq!(answer, serde_json::json!({}), "handshake answer");
        client
    }

    /// Sends `record` followed by the record separator.
    pub async fn send(&mut self, record: &[u8]) {
        let mut data = record.to_vec();
        data.push(0x1e);
        self.send_raw(data).await;
    }

    /// Sends a text frame as is.
    pub async fn send_raw(&mut self, data: Vec<u8>) {
        self.ws
            .write_frame(Frame::text(Payload::Owned(data)))
            .await
            .expect("the frame is written");
    }

    /// Sends a binary frame as is.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .write_frame(Frame::binary(Payload::Owned(data)))
            .await
            .expect("the frame is written");
    }

    /// The next data frame as (is it binary, payload); `None` once closed.
    pub async fn receive_frame(&mut self) -> Option<(bool, Vec<u8>)> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.read_frame())
                .await
                .expect("the server answers in time")
                .ok()?;
            match frame.opcode {
                OpCode::Text => return Some((false, frame.payload.to_vec())),
                OpCode::Binary => return Some((true, frame.payload.to_vec())),
                OpCode::Close => return None,
                _ => {}
            }
        }
    }

    /// Sends a WebSocket ping.
    pub async fn ping(&mut self) {
        self.ws
            .write_frame(Frame::new(
                true,
                OpCode::Ping,
                None,
                Payload::Owned(b"p".to_vec()),
            ))
            .await
            .expect("the ping is written");
    }

    /// The next frame, within [`WAIT`].
    pub async fn receive(&mut self) -> Option<Received> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.read_frame())
                .await
                .expect("the server answers in time")
                .ok()?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    return Some(Received::Text(frame.payload.to_vec()));
                }
                OpCode::Close => {
                    let code = if frame.payload.len() >= 2 {
                        u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default())
                            .into_owned();
                    return Some(Received::Close(code, reason));
                }
                _ => {}
            }
        }
    }

    /// The next record (parsed JSON), or `None` when the socket closed first.
    pub async fn next_record(&mut self) -> Option<Value> {
        loop {
            if !self.pending.is_empty() {
                return Some(self.pending.remove(0));
            }
            match self.receive().await? {
                Received::Text(data) => {
                    assert_eq!(
                        data.last(),
                        Some(&0x1e),
                        "every record ends with 0x1E: {data:?}"
                    );
                    for record in data.split(|b| *b == 0x1e).filter(|r| !r.is_empty()) {
                        self.pending
                            .push(serde_json::from_slice(record).expect("the server sends JSON"));
                    }
                }
                Received::Close(..) => return None,
            }
        }
    }

    /// The next record that is not a ping.
    pub async fn next_message(&mut self) -> Option<Value> {
        loop {
            let record = self.next_record().await?;
            if record["type"] != 6 {
                return Some(record);
            }
        }
    }

    /// Reads until the server closes; returns the hub `Close` message (if any) and the close
    /// frame's code.
    pub async fn until_closed(&mut self) -> (Option<Value>, Option<u16>) {
        let mut close_message = None;
        loop {
            for record in self.pending.drain(..) {
                if record["type"] == 7 {
                    close_message = Some(record);
                }
            }
            match self.receive().await {
                Some(Received::Text(data)) => {
                    for record in data.split(|b| *b == 0x1e).filter(|r| !r.is_empty()) {
                        let value: Value = serde_json::from_slice(record).expect("JSON");
                        if value["type"] == 7 {
                            close_message = Some(value);
                        }
                    }
                }
                Some(Received::Close(code, _)) => return (close_message, Some(code)),
                None => return (close_message, None),
            }
        }
    }
}

/// Boxes a future, for hub handlers written as closures.
pub type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
