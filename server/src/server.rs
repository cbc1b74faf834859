//! The HTTP side: negotiate, the WebSocket upgrade, `/health`, and graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backplane_core::{ConnectionId, HubName, Node};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiAuth};
use crate::auth::Auth;
use crate::connection::{self, Sessions, Setup};
use crate::hub::Hub;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::relay;

/// How the server authenticates clients.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The HS256 secret of user tokens (`sub` is the user id). Without it, only anonymous
    /// clients can connect.
    pub jwt_secret: Option<Vec<u8>>,
    /// Signs the connection tokens negotiate hands out. Every node of a deployment needs the
    /// same secret, so a client can negotiate with one node and connect to another. Defaults to
    /// the JWT secret, else a random secret (single node only).
    pub token_secret: Option<Vec<u8>>,
    /// Development mode: clients without a token connect, as the user named by `?user=`.
    pub allow_anonymous: bool,
    /// Origins allowed to call the server from a browser; `*` allows any.
    pub cors_origins: Vec<String>,
    /// Signs the tokens of the server API (`/api/v1`); without it the API is off.
    pub server_key: Option<Vec<u8>>,
}

/// The reference server: hubs served over HTTP and WebSockets on a [`Node`].
#[derive(Debug)]
pub struct Server {
    node: Node,
    hubs: HashMap<HubName, Arc<Hub>>,
    limits: Limits,
    security: Security,
    advertise: Option<Advertise>,
}

/// Where other nodes reach a server.
#[derive(Debug, Clone)]
enum Advertise {
    /// This base URL.
    Url(String),
    /// `http://` and the address the server listens on.
    Listener,
}

struct Shared {
    node: Node,
    hubs: HashMap<HubName, Arc<Hub>>,
    limits: Limits,
    auth: Auth,
    cors: Vec<String>,
    api: Option<ApiAuth>,
    hub_names: Vec<HubName>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// How many WebSocket connections are being served.
    active: Arc<watch::Sender<usize>>,
    /// Stateful connections that can resume on a new socket.
    sessions: Sessions,
}

impl Server {
    /// A server on `node`, with no hubs yet.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            hubs: HashMap::new(),
            limits: Limits::default(),
            security: Security::default(),
            advertise: None,
        }
    }

    /// Serves `hub` at `/hubs/{name}`.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hubs.insert(hub.name().clone(), Arc::new(hub));
        self
    }

    /// Sets the connection limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how clients authenticate.
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// Registers `url` (such as `http://10.0.0.5:5000`) as where other nodes reach this
    /// server: a stateful client whose resumed socket lands on another node is then handed
    /// over to this one. Without it (or [`advertise_listener`](Self::advertise_listener)),
    /// such a client falls back to a new connection.
    pub fn advertise(mut self, url: impl Into<String>) -> Self {
        self.advertise = Some(Advertise::Url(url.into()));
        self
    }

    /// Registers `http://` and the address the server listens on as where other nodes reach
    /// it: for nodes on one host, or listening on an address the others can reach (binding
    /// fails for an unspecified address such as `0.0.0.0`).
    pub fn advertise_listener(mut self) -> Self {
        self.advertise = Some(Advertise::Listener);
        self
    }

    /// Listens on `addr` and serves in the background until [`Running::shutdown`].
    ///
    /// # Errors
    ///
    /// The address could not be bound, or the advertised address could not be registered.
    pub async fn bind(self, addr: SocketAddr) -> std::io::Result<Running> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let advertised = match self.advertise {
            Some(Advertise::Url(url)) => Some(url),
            Some(Advertise::Listener) if local.ip().is_unspecified() => {
                return Err(std::io::Error::other(format!(
                    "cannot advertise {local} to other nodes: it names no host; advertise a URL"
                )));
            }
            Some(Advertise::Listener) => Some(format!("http://{local}")),
            None => None,
        };
        if let Some(url) = advertised {
            self.node
                .advertise(url)
                .await
                .map_err(std::io::Error::other)?;
        }
        let token_secret = self
            .security
            .token_secret
            .clone()
            .or_else(|| self.security.jwt_secret.clone())
            .unwrap_or_else(|| {
                tracing::warn!("no token secret: connection tokens only work on this node");
                ConnectionId::random().to_string().into_bytes()
            });
        let (shutdown_tx, shutdown) = watch::channel(false);
        let active = Arc::new(watch::channel(0usize).0);
        let hub_names = self.hubs.keys().cloned().collect();
        let metrics = Arc::new(Metrics::new());
        if !self.node.observe(metrics.clone()) {
            tracing::debug!(
                "the node already has an observer: backplane timings and log lag are not exported"
            );
        }
        let shared = Arc::new(Shared {
            node: self.node.clone(),
            hub_names,
            metrics,
            api: self.security.server_key.as_deref().map(ApiAuth::new),
            hubs: self.hubs,
            limits: self.limits,
            auth: Auth::new(
                self.security.jwt_secret.as_deref(),
                &token_secret,
                self.security.allow_anonymous,
                Duration::from_secs(300),
            ),
            cors: self.security.cors_origins,
            shutdown: shutdown.clone(),
            active: active.clone(),
            sessions: Sessions::default(),
        });
        let metrics = shared.metrics.clone();
        let mut events = self.node.events();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(backplane_core::NodeEvent::SlowConsumer { .. }) => {
                        metrics.slow_consumers.inc();
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let task = tokio::spawn(accept(listener, shared.clone(), shutdown));
        Ok(Running {
            addr: local,
            node: self.node,
            shutdown: shutdown_tx,
            active,
            task,
        })
    }
}

/// A server accepting connections.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    node: Node,
    shutdown: watch::Sender<bool>,
    active: Arc<watch::Sender<usize>>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node it serves.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops accepting, sends every client a close message (reconnect allowed), waits up to
    /// `grace` for connections to end, then shuts the node down (unregisters its presence).
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        self.task.abort();
        // Every connection's deliveries end; seeing the shutdown flag, each sends its client
        // a close message and unregisters.
        self.node.close_connections();
        let mut active = self.active.subscribe();
        if tokio::time::timeout(grace, active.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                connections = *active.borrow(),
                "connections still open after the grace period"
            );
        }
        self.node.shutdown().await;
    }
}

/// Counts a served WebSocket connection until dropped.
pub(crate) struct ActiveGuard(Arc<watch::Sender<usize>>);

impl ActiveGuard {
    fn new(active: &Arc<watch::Sender<usize>>) -> Self {
        active.send_modify(|n| *n += 1);
        Self(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(err) => {
                // Out of file descriptors (or a transient network error): keep serving the
                // connections we have and try again shortly, without spinning.
                tracing::warn!(%err, "accept failed; backing off for {backoff:?}");
                let _ = tokio::time::timeout(backoff, shutdown.changed()).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, shared).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.changed() => {
                    // Finish the request in flight, then close: clients reconnect elsewhere.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%err, "http connection ended with an error");
            }
        });
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A request's query string. Keys match in any case, as in ASP.NET Core, whose clients
/// may write `negotiateVersion` or `NegotiateVersion`.
struct Query(HashMap<String, String>);

impl Query {
    fn of(req: &Request<Incoming>) -> Self {
        let pairs = req
            .uri()
            .query()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(key, value)| (key.to_ascii_lowercase(), value.into_owned()))
                    .collect::<HashMap<_, _>>()
            })
            .unwrap_or_default();
        Self(pairs)
    }

    /// The value of `key`, in whatever case the request wrote it.
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }
}

fn bearer(req: &Request<Incoming>, query: &Query) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .map(str::to_owned)
        .or_else(|| query.get("access_token").map(str::to_owned))
}

/// The negotiate version a request asks for, read as ASP.NET Core reads it: absent is 0, a
/// version above the server's gets the server's, anything else is refused with the message a
/// SignalR client shows.
fn negotiate_version(query: &Query) -> Result<u32, String> {
    let Some(asked) = query.get("negotiateVersion") else {
        return Ok(0);
    };
    match asked.trim().parse::<i32>() {
        Err(_) => Err("The client requested a non-integer protocol version.".to_owned()),
        Ok(version) if version < 0 => Err(format!(
            "The client requested version '{version}', but the server does not support this version."
        )),
        Ok(version) => Ok(version.unsigned_abs().min(NEGOTIATE_VERSION)),
    }
}

/// The newest negotiate protocol the server speaks.
const NEGOTIATE_VERSION: u32 = 1;

fn with_cors(
    shared: &Shared,
    origin: Option<&HeaderValue>,
    mut response: Response<Body>,
) -> Response<Body> {
    let Some(origin) = origin else {
        return response;
    };
    let allowed = shared
        .cors
        .iter()
        .any(|o| o == "*" || origin.to_str().is_ok_and(|v| v == o));
    if allowed {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (req.method(), segments.as_slice()) {
        (&Method::OPTIONS, _) => {
            let mut response = text(StatusCode::NO_CONTENT, "");
            let headers = response.headers_mut();
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, DELETE, HEAD, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "authorization, content-type, x-requested-with, x-signalr-user-agent",
                ),
            );
            response
        }
        (&Method::GET, ["health"]) => health(&shared).await,
        (&Method::GET, ["metrics"]) => {
            let body = shared.metrics.render(&shared.node).await;
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (_, ["api", "v1", "hubs", rest @ ..]) => {
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            api::serve(
                req,
                &shared.node,
                &shared.metrics,
                shared.api.as_ref(),
                &shared.hub_names,
                &rest,
                shared.limits.max_message_size,
            )
            .await
        }
        (&Method::POST, ["hubs", hub, "negotiate"]) => negotiate(&req, &shared, hub),
        (_, ["hubs", _, "negotiate"]) => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "negotiate is a POST");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            response
        }
        (&Method::GET, ["hubs", hub]) => upgrade(req, &shared, hub).await,
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    with_cors(&shared, origin.as_ref(), response)
}

fn find_hub(shared: &Shared, name: &str) -> Option<Arc<Hub>> {
    let name = HubName::new(name).ok()?;
    shared.hubs.get(&name).cloned()
}

fn negotiate(req: &Request<Incoming>, shared: &Shared, hub: &str) -> Response<Body> {
    let Some(hub) = find_hub(shared, hub) else {
        return text(StatusCode::NOT_FOUND, format!("no hub named '{hub}'"));
    };
    if *shared.shutdown.borrow() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let max = shared.node.options().connection_limit();
    if shared.node.local_connection_count() >= max {
        shared.metrics.refused("limit");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is at its connection limit ({max})"),
        );
    }
    let query = Query::of(req);
    let user = match shared
        .auth
        .authenticate(bearer(req, &query).as_deref(), query.get("user"))
    {
        Ok(user) => user,
        Err(err) => {
            shared.metrics.refused("auth");
            return text(StatusCode::UNAUTHORIZED, err.0);
        }
    };
    // A version the server cannot use is answered with `200` and the error alone, which the
    // clients show as the reason.
    let version = match negotiate_version(&query) {
        Ok(version) => version,
        Err(error) => return json_response(StatusCode::OK, &json!({ "error": error })),
    };
    let id = ConnectionId::random();
    let stateful = query
        .get("useStatefulReconnect")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let token = shared
        .auth
        .connection_token(hub.name(), &id, user.as_ref(), stateful);
    let transports = json!([{ "transport": "WebSockets", "transferFormats": ["Text", "Binary"] }]);
    let mut body = if version >= 1 {
        json!({
            "negotiateVersion": version,
            "connectionId": id.as_str(),
            "connectionToken": token,
            "availableTransports": transports,
        })
    } else {
        // Version 0 clients send the connection id back as `id`. ASP.NET Core writes the
        // version in every successful response, and such clients refuse one without it.
        json!({
            "negotiateVersion": 0,
            "connectionId": token,
            "availableTransports": transports,
        })
    };
    if stateful {
        body["useStatefulReconnect"] = json!(true);
    }
    json_response(StatusCode::OK, &body)
}

async fn upgrade(mut req: Request<Incoming>, shared: &Arc<Shared>, hub: &str) -> Response<Body> {
    let Some(hub) = find_hub(shared, hub) else {
        return text(StatusCode::NOT_FOUND, format!("no hub named '{hub}'"));
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return text(
            StatusCode::BAD_REQUEST,
            "this endpoint speaks WebSockets only; negotiate first",
        );
    }
    if *shared.shutdown.borrow() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let query = Query::of(&req);
    let user = match shared
        .auth
        .authenticate(bearer(&req, &query).as_deref(), query.get("user"))
    {
        Ok(user) => user,
        Err(err) => {
            shared.metrics.refused("auth");
            return text(StatusCode::UNAUTHORIZED, err.0);
        }
    };
    let token = match query.get("id") {
        Some(token) => match shared.auth.check_connection_token(token, hub.name()) {
            Ok(token) if token.user == user => Some(token),
            Ok(_) => {
                shared.metrics.refused("auth");
                return text(
                    StatusCode::UNAUTHORIZED,
                    "the connection token belongs to another user",
                );
            }
            Err(err) => {
                shared.metrics.refused("token");
                return text(StatusCode::NOT_FOUND, err.0);
            }
        },
        // skipNegotiation: the WebSocket is the whole connection.
        None => None,
    };
    let id = token
        .as_ref()
        .map_or_else(ConnectionId::random, |t| t.id.clone());
    // The same id again: a stateful connection resuming on a new socket.
    let resuming = shared
        .sessions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .cloned();
    if resuming.is_none()
        && let Some(token) = &token
    {
        // A resume that reached the wrong node goes to the node holding the connection.
        if token.stateful
            && !req.headers().contains_key(relay::RELAYED)
            && let Some(address) = relay::holder(&shared.node, hub.name(), &id).await
        {
            let holder = match relay::open(&address, &req, shared.limits.handshake_timeout).await {
                Ok(holder) => holder,
                Err((status, why)) => return text(status, why),
            };
            let (response, socket) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(pair) => pair,
                Err(err) => return text(StatusCode::BAD_REQUEST, format!("bad upgrade: {err}")),
            };
            tokio::spawn(relay::pipe(socket, holder));
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, Full::new(Bytes::new()));
        }
        if token.expired {
            shared.metrics.refused("token");
            return text(StatusCode::NOT_FOUND, "the connection token has expired");
        }
    }
    let (response, socket) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(err) => return text(StatusCode::BAD_REQUEST, format!("bad upgrade: {err}")),
    };
    if let Some(session) = resuming {
        let limits = shared.limits;
        tokio::spawn(async move {
            match socket.await {
                Ok(ws) => connection::resume(ws.into_inner(), limits, session).await,
                Err(err) => tracing::debug!(%err, "websocket upgrade failed"),
            }
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    let guard = ActiveGuard::new(&shared.active);
    let setup = Box::new(Setup {
        hub,
        node: shared.node.clone(),
        id,
        user,
        limits: shared.limits,
        shutdown: shared.shutdown.clone(),
        metrics: shared.metrics.clone(),
        sessions: shared.sessions.clone(),
    });
    tokio::spawn(async move {
        let _guard = guard;
        connection::serve(socket, setup).await;
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn health(shared: &Shared) -> Response<Body> {
    let node = &shared.node;
    let backplane = node.backplane();
    let probe = tokio::time::timeout(Duration::from_secs(3), async {
        let nodes = backplane.live_nodes().await?;
        let pending = backplane.pending_count().await?;
        Ok::<_, backplane_core::Error>((nodes, pending))
    })
    .await;
    let jobs: Vec<serde_json::Value> = node
        .jobs()
        .into_iter()
        .map(|j| {
            json!({
                "job": format!("{:?}", j.job).to_lowercase(),
                "runs": j.runs,
                "last_run": j.last_run.map(unix),
                "last_error": j.last_error,
            })
        })
        .collect();
    let (status, backplane_json) = match probe {
        Ok(Ok((nodes, pending))) => (
            StatusCode::OK,
            json!({
                "driver": backplane.driver_name(),
                "reachable": true,
                "live_nodes": nodes.iter().map(|n| n.id.to_string()).collect::<Vec<_>>(),
                "pending_durable_messages": pending,
            }),
        ),
        Ok(Err(err)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "driver": backplane.driver_name(), "reachable": false, "error": err.to_string() }),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "driver": backplane.driver_name(), "reachable": false, "error": "timed out" }),
        ),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "node": node.id().to_string(),
        "local_connections": node.local_connection_count(),
        "backplane": backplane_json,
        "jobs": jobs,
    });
    json_response(status, &body)
}
