//! The server API for back-end services, in the shape of Azure SignalR Service's REST API v1.
//!
//! Every request carries `Authorization: Bearer <JWT>`, an HS256 token signed with the server
//! key (any claims; `exp` is required). Messages have the body
//! `{"target": "Method", "arguments": [...]}`.
//!
//! | request | effect |
//! |---|---|
//! | `POST /api/v1/hubs/{hub}` | broadcast (`?excluded=id` leaves connections out, repeatable) |
//! | `POST /api/v1/hubs/{hub}/groups/{group}` | send to a group (`?excluded=id` too) |
//! | `POST /api/v1/hubs/{hub}/users/{user}` | send to a user's connections; `?ttl=1h` stores it for an offline user |
//! | `POST /api/v1/hubs/{hub}/connections/{id}` | send to one connection |
//! | `PUT`/`DELETE /api/v1/hubs/{hub}/groups/{group}/connections/{id}` | add / remove a connection |
//! | `PUT`/`DELETE /api/v1/hubs/{hub}/groups/{group}/users/{user}` | add / remove every connection of a user |
//! | `HEAD /api/v1/hubs/{hub}/users/{user}` | 200 when the user is online, 404 when not |
//! | `HEAD /api/v1/hubs/{hub}/connections/{id}` | 200 when the connection exists, 404 when not |
//! | `GET /api/v1/hubs/{hub}/groups/{group}/connections` | the group's connection ids, as JSON |
//!
//! Sends answer 202 once the message is stored; bad names and bodies answer 400 with the
//! reason; an unreachable backplane 503.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::{ConnectionId, Error, GroupName, HubName, Node, UserId};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::hub::Clients;
use crate::metrics::Metrics;

type Body = Full<Bytes>;

/// The body of a send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    target: String,
    #[serde(default)]
    arguments: Vec<Value>,
}

/// Checks server API tokens.
#[derive(Clone)]
pub(crate) struct ApiAuth {
    key: DecodingKey,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiAuth")
    }
}

impl ApiAuth {
    pub(crate) fn new(server_key: &[u8]) -> Self {
        Self {
            key: DecodingKey::from_secret(server_key),
        }
    }

    fn check(&self, req: &Request<Incoming>) -> Result<(), String> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("missing bearer token")?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        jsonwebtoken::decode::<Value>(token, &self.key, &validation)
            .map(|_| ())
            .map_err(|e| format!("invalid server token: {e}"))
    }
}

fn respond(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response
}

fn error_response(err: &Error) -> Response<Body> {
    let status = match err {
        Error::InvalidName { .. } | Error::PayloadTooLarge { .. } | Error::InvalidMessage(_) => {
            StatusCode::BAD_REQUEST
        }
        Error::UnknownConnection(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    respond(status, err.to_string())
}

/// Serves one server API request; `segments` follow `/api/v1/hubs/`.
pub(crate) async fn serve(
    req: Request<Incoming>,
    node: &Node,
    metrics: &Arc<Metrics>,
    auth: Option<&ApiAuth>,
    hubs: &[HubName],
    segments: &[&str],
    max_body: usize,
) -> Response<Body> {
    let Some(auth) = auth else {
        return respond(
            StatusCode::NOT_FOUND,
            "the server API is disabled: start the server with a server key",
        );
    };
    if let Err(reason) = auth.check(&req) {
        return respond(StatusCode::UNAUTHORIZED, reason);
    }
    let Some((hub, rest)) = segments.split_first() else {
        return respond(StatusCode::NOT_FOUND, "no hub in the path");
    };
    let hub = match HubName::new(*hub) {
        Ok(hub) if hubs.contains(&hub) => hub,
        Ok(hub) => return respond(StatusCode::NOT_FOUND, format!("no hub named '{hub}'")),
        Err(err) => return error_response(&err),
    };
    let query: HashMap<String, Vec<String>> = req
        .uri()
        .query()
        .map(|q| {
            let mut map: HashMap<String, Vec<String>> = HashMap::new();
            for (k, v) in form_urlencoded::parse(q.as_bytes()).into_owned() {
                map.entry(k).or_default().push(v);
            }
            map
        })
        .unwrap_or_default();
    let method = req.method().clone();
    let rest = rest.to_vec();
    let clients = Clients::new(node.clone(), hub.clone()).with_metrics(metrics.clone());
    match run(req, node, clients, hub, &method, &rest, &query, max_body).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    }
}

async fn body(req: Request<Incoming>, max: usize) -> Result<Payload, Response<Body>> {
    let bytes = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body could not be read: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        respond(
            StatusCode::BAD_REQUEST,
            format!("the body must be {{\"target\": \"...\", \"arguments\": [...]}}: {e}"),
        )
    })
}

fn excluded(query: &HashMap<String, Vec<String>>) -> Result<Vec<ConnectionId>, Error> {
    query
        .get("excluded")
        .into_iter()
        .flatten()
        .map(|id| ConnectionId::new(id.as_str()))
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run(
    req: Request<Incoming>,
    node: &Node,
    clients: Clients,
    hub: HubName,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, Vec<String>>,
    max_body: usize,
) -> Result<Response<Body>, Error> {
    let accepted = || respond(StatusCode::ACCEPTED, "");
    let send_error = |e: crate::hub::HubError| {
        let status = if e.is_invalid_input() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        respond(status, e.to_string())
    };
    Ok(match (method, rest) {
        (&Method::POST, []) => {
            let payload = match body(req, max_body).await {
                Ok(p) => p,
                Err(response) => return Ok(response),
            };
            match clients
                .all()
                .except(excluded(query)?)
                .send(&payload.target, payload.arguments)
                .await
            {
                Ok(_) => accepted(),
                Err(e) => send_error(e),
            }
        }
        (&Method::POST, ["groups", group]) => {
            let group = GroupName::new(*group)?;
            let payload = match body(req, max_body).await {
                Ok(p) => p,
                Err(response) => return Ok(response),
            };
            match clients
                .group(group)
                .except(excluded(query)?)
                .send(&payload.target, payload.arguments)
                .await
            {
                Ok(_) => accepted(),
                Err(e) => send_error(e),
            }
        }
        (&Method::POST, ["users", user]) => {
            let user = UserId::new(*user)?;
            let ttl = match query.get("ttl").and_then(|v| v.first()) {
                Some(ttl) => match humantime::parse_duration(ttl) {
                    Ok(ttl) if !ttl.is_zero() => Some(ttl),
                    _ => {
                        return Ok(respond(
                            StatusCode::BAD_REQUEST,
                            format!("invalid ttl '{ttl}': expected a duration such as 1h"),
                        ));
                    }
                },
                None => None,
            };
            let payload = match body(req, max_body).await {
                Ok(p) => p,
                Err(response) => return Ok(response),
            };
            let mut send = clients.user(user);
            if let Some(ttl) = ttl {
                send = send.durable(ttl);
            }
            match send.send(&payload.target, payload.arguments).await {
                Ok(_) => accepted(),
                Err(e) => send_error(e),
            }
        }
        (&Method::POST, ["connections", id]) => {
            let id = ConnectionId::new(*id)?;
            if node.backplane().connection(&hub, &id).await?.is_none() {
                return Ok(respond(
                    StatusCode::NOT_FOUND,
                    format!("no connection '{id}'"),
                ));
            }
            let payload = match body(req, max_body).await {
                Ok(p) => p,
                Err(response) => return Ok(response),
            };
            match clients
                .client(id)
                .send(&payload.target, payload.arguments)
                .await
            {
                Ok(_) => accepted(),
                Err(e) => send_error(e),
            }
        }
        (&Method::PUT | &Method::DELETE, ["groups", group, "connections", id]) => {
            let group = GroupName::new(*group)?;
            let id = ConnectionId::new(*id)?;
            if node.backplane().connection(&hub, &id).await?.is_none() {
                return Ok(respond(
                    StatusCode::NOT_FOUND,
                    format!("no connection '{id}'"),
                ));
            }
            if method == Method::PUT {
                node.add_to_group(&hub, &group, &id).await?;
            } else {
                node.remove_from_group(&hub, &group, &id).await?;
            }
            respond(StatusCode::OK, "")
        }
        (&Method::PUT | &Method::DELETE, ["groups", group, "users", user]) => {
            let group = GroupName::new(*group)?;
            let user = UserId::new(*user)?;
            for connection in node.backplane().user_connections(&hub, &user).await? {
                if method == Method::PUT {
                    node.add_to_group(&hub, &group, &connection.id).await?;
                } else {
                    node.remove_from_group(&hub, &group, &connection.id).await?;
                }
            }
            respond(StatusCode::OK, "")
        }
        (&Method::HEAD, ["users", user]) => {
            let user = UserId::new(*user)?;
            if node
                .backplane()
                .user_connections(&hub, &user)
                .await?
                .is_empty()
            {
                respond(StatusCode::NOT_FOUND, "")
            } else {
                respond(StatusCode::OK, "")
            }
        }
        (&Method::HEAD, ["connections", id]) => {
            let id = ConnectionId::new(*id)?;
            if node.backplane().connection(&hub, &id).await?.is_some() {
                respond(StatusCode::OK, "")
            } else {
                respond(StatusCode::NOT_FOUND, "")
            }
        }
        (&Method::GET, ["groups", group, "connections"]) => {
            let group = GroupName::new(*group)?;
            let members: Vec<String> = node
                .backplane()
                .group_members(&hub, &group)
                .await?
                .into_iter()
                .map(|c| c.to_string())
                .collect();
            let mut response = respond(StatusCode::OK, json!(members).to_string());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => respond(StatusCode::NOT_FOUND, "no such server API endpoint"),
    })
}

/// How long server API tokens minted by [`api_token`] live.
pub const API_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A server API token signed with `server_key`, valid for `ttl`.
pub fn api_token(server_key: &[u8], ttl: Duration) -> String {
    crate::auth::user_token(server_key, "server", ttl)
}
