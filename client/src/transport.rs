//! Reaching a hub: the URL, TCP and TLS, negotiation (with redirects), and the WebSocket upgrade.

#[cfg(feature = "tls")]
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// The WebSocket to a hub, after the HTTP upgrade.
pub(crate) type Socket = WebSocket<TokioIo<Upgraded>>;

/// How many redirects negotiation follows (the limit the official clients use).
const MAX_REDIRECTS: usize = 100;

/// How much of a negotiation response or error body is read.
const MAX_BODY: usize = 64 * 1024;

/// A byte stream to the server: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A hub URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    /// The path without a trailing slash.
    path: String,
    /// The query without its `?`, possibly empty.
    query: String,
}

impl Endpoint {
    /// Parses `http`, `https`, `ws` or `wss` URLs.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if !url.contains("://") {
            return Err(invalid("the URL has no scheme (http:// or https://)"));
        }
        let uri: Uri = url.parse().map_err(|e| invalid(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("http" | "ws") => false,
            Some("https" | "wss") => true,
            Some(other) => {
                return Err(invalid(&format!(
                    "the scheme '{other}' is not http, https, ws or wss"
                )));
            }
            None => return Err(invalid("the URL has no scheme (http:// or https://)")),
        };
        if tls && !cfg!(feature = "tls") {
            return Err(invalid(
                "this build has no TLS support (the `tls` feature is off)",
            ));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the URL has no host"))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self {
            tls,
            host,
            port,
            path: uri.path().trim_end_matches('/').to_owned(),
            query: uri.query().unwrap_or_default().to_owned(),
        })
    }

    /// `host:port`, as the `Host` header and error messages want it.
    pub(crate) fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn target(&self, suffix: &str, extra: &[(&str, &str)]) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in extra {
            query.append_pair(k, v);
        }
        let extra = query.finish();
        let query = match (self.query.is_empty(), extra.is_empty()) {
            (true, true) => String::new(),
            (false, true) => format!("?{}", self.query),
            (true, false) => format!("?{extra}"),
            (false, false) => format!("?{}&{extra}", self.query),
        };
        let path = format!("{}{suffix}", self.path);
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        format!("{path}{query}")
    }

    /// The request target of the negotiate POST; `stateful` asks for stateful reconnect.
    fn negotiate_target(&self, stateful: bool) -> String {
        if stateful {
            self.target(
                "/negotiate",
                &[("negotiateVersion", "1"), ("useStatefulReconnect", "true")],
            )
        } else {
            self.target("/negotiate", &[("negotiateVersion", "1")])
        }
    }

    /// The request target of the WebSocket upgrade, with the connection token if negotiated.
    fn websocket_target(&self, token: Option<&str>) -> String {
        match token {
            Some(token) => self.target("", &[("id", token)]),
            None => self.target("", &[]),
        }
    }
}

/// What a successful negotiation leads to.
#[derive(Debug, PartialEq, Eq)]
enum Negotiated {
    /// Connect the WebSocket with this token.
    Connect {
        connection_id: String,
        connection_token: String,
        /// The server agreed to stateful reconnect.
        stateful: bool,
    },
    /// Negotiate again at another URL (Azure SignalR and other proxies), maybe with a token.
    Redirect {
        url: String,
        access_token: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NegotiateResponse {
    connection_id: Option<String>,
    connection_token: Option<String>,
    negotiate_version: Option<u32>,
    #[serde(default)]
    available_transports: Vec<AvailableTransport>,
    url: Option<String>,
    access_token: Option<String>,
    error: Option<String>,
    #[serde(default)]
    use_stateful_reconnect: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AvailableTransport {
    transport: String,
    #[serde(default)]
    transfer_formats: Vec<String>,
}

fn parse_negotiation(body: &[u8]) -> Result<Negotiated> {
    let response: NegotiateResponse = serde_json::from_slice(body)
        .map_err(|e| Error::Negotiate(format!("the response is not valid JSON: {e}")))?;
    if let Some(error) = response.error {
        return Err(Error::Negotiate(error));
    }
    if let Some(url) = response.url {
        return Ok(Negotiated::Redirect {
            url,
            access_token: response.access_token,
        });
    }
    let websockets = response
        .available_transports
        .iter()
        .any(|t| t.transport == "WebSockets" && t.transfer_formats.iter().any(|f| f == "Text"));
    if !websockets {
        return Err(Error::Negotiate(
            "the server offers no WebSockets transport with the Text format".into(),
        ));
    }
    let connection_id = response
        .connection_id
        .ok_or_else(|| Error::Negotiate("the response has no connectionId".into()))?;
    // Version 0 servers use the connection id as the token.
    let connection_token = match response.negotiate_version {
        Some(v) if v >= 1 => response
            .connection_token
            .ok_or_else(|| Error::Negotiate("the response has no connectionToken".into()))?,
        _ => connection_id.clone(),
    };
    Ok(Negotiated::Connect {
        connection_id,
        connection_token,
        stateful: response.use_stateful_reconnect,
    })
}

/// A WebSocket opened to a hub, before the hub protocol handshake.
pub(crate) struct Opened {
    pub(crate) socket: Socket,
    /// The connection id negotiation gave; `None` when negotiation was skipped.
    pub(crate) connection_id: Option<String>,
    /// Where and with which token a dropped socket may resume, when the server agreed to
    /// stateful reconnect.
    pub(crate) resume: Option<Resume>,
}

/// What a new socket needs to resume a stateful connection.
#[derive(Debug, Clone)]
pub(crate) struct Resume {
    endpoint: Endpoint,
    connection_token: String,
    /// The token a redirect handed out, which replaces the caller's.
    access_token: Option<String>,
}

/// Opens connections: TCP, TLS, HTTP requests with the caller's headers and token.
pub(crate) struct Dialer {
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    #[cfg(feature = "tls")]
    tls: std::sync::OnceLock<std::result::Result<Arc<rustls::ClientConfig>, String>>,
    #[cfg(feature = "tls")]
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Dialer {
    pub(crate) fn new(headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        Self {
            headers,
            #[cfg(feature = "tls")]
            tls: std::sync::OnceLock::new(),
            #[cfg(feature = "tls")]
            extra_roots: Vec::new(),
        }
    }

    /// Trusts these certificates besides the platform's roots.
    #[cfg(feature = "tls")]
    pub(crate) fn with_roots(
        mut self,
        roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Self {
        self.extra_roots = roots;
        self
    }

    #[cfg(feature = "tls")]
    fn tls_config(&self) -> std::result::Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A platform certificate rustls cannot parse is skipped, as browsers do.
                    let _ = roots.add(cert);
                }
                for cert in &self.extra_roots {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("a root certificate is invalid: {e}"))?;
                }
                if roots.is_empty() {
                    return Err(
                        "no root certificates: the platform has none and none were added".into(),
                    );
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Arc::new(config))
            })
            .clone()
    }

    async fn dial(&self, endpoint: &Endpoint) -> Result<Box<dyn Io>> {
        let failed = |reason: String| Error::Connect {
            endpoint: endpoint.authority(),
            reason,
        };
        let tcp = TcpStream::connect((endpoint.host.trim_matches(['[', ']']), endpoint.port))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if !endpoint.tls {
            return Ok(Box::new(tcp));
        }
        #[cfg(feature = "tls")]
        {
            let config = self.tls_config().map_err(failed)?;
            let name = rustls::pki_types::ServerName::try_from(
                endpoint.host.trim_matches(['[', ']']).to_owned(),
            )
            .map_err(|e| failed(format!("invalid TLS server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| failed(format!("TLS: {e}")))?;
            Ok(Box::new(stream))
        }
        #[cfg(not(feature = "tls"))]
        Err(failed("this build has no TLS support".into()))
    }

    fn request(
        &self,
        endpoint: &Endpoint,
        method: &str,
        target: &str,
        token: Option<&str>,
    ) -> Result<hyper::http::request::Builder> {
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, endpoint.authority())
            .header(
                header::USER_AGENT,
                concat!("backplane-client/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::AccessToken("the token is not a valid header value".into()))?;
            request = request.header(header::AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// An HTTP/1.1 connection to `endpoint`, driven by a task of its own (which also carries
    /// an upgraded WebSocket until it ends).
    async fn http1(
        &self,
        endpoint: &Endpoint,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
        let io = self.dial(endpoint).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Error::Connect {
                endpoint: endpoint.authority(),
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            // Its errors surface on the request or the socket.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// POSTs to `negotiate` and reads the answer.
    async fn negotiate_once(
        &self,
        endpoint: &Endpoint,
        token: Option<&str>,
        stateful: bool,
    ) -> Result<Negotiated> {
        let failed = |reason: String| Error::Connect {
            endpoint: endpoint.authority(),
            reason,
        };
        let mut sender = self.http1(endpoint).await?;
        let request = self
            .request(
                endpoint,
                "POST",
                &endpoint.negotiate_target(stateful),
                token,
            )?
            .header(header::CONTENT_LENGTH, "0")
            .header("X-Requested-With", "XMLHttpRequest")
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the negotiation response: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(Error::Refused {
                step: "negotiation",
                status: status.as_u16(),
                body: excerpt(&body),
            });
        }
        parse_negotiation(&body)
    }

    /// Upgrades an HTTP connection to a WebSocket.
    async fn upgrade(
        &self,
        endpoint: &Endpoint,
        target: &str,
        token: Option<&str>,
    ) -> Result<Socket> {
        let failed = |reason: String| Error::Connect {
            endpoint: endpoint.authority(),
            reason,
        };
        let mut sender = self.http1(endpoint).await?;
        let request = self
            .request(endpoint, "GET", target, token)?
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .header(
                header::SEC_WEBSOCKET_KEY,
                fastwebsockets::handshake::generate_key(),
            )
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let mut response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map(|b| excerpt(&b.to_bytes()))
                .unwrap_or_default();
            return Err(Error::Refused {
                step: "WebSocket upgrade",
                status,
                body,
            });
        }
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| failed(format!("the WebSocket upgrade failed: {e}")))?;
        Ok(WebSocket::after_handshake(
            TokioIo::new(upgraded),
            Role::Client,
        ))
    }

    /// Negotiates (following redirects) unless told to skip it, and opens the WebSocket.
    pub(crate) async fn open(
        &self,
        url: &Endpoint,
        token: Option<String>,
        skip_negotiation: bool,
        stateful: bool,
    ) -> Result<Opened> {
        if skip_negotiation {
            let socket = self
                .upgrade(url, &url.websocket_target(None), token.as_deref())
                .await?;
            return Ok(Opened {
                socket,
                connection_id: None,
                resume: None,
            });
        }
        let mut endpoint = url.clone();
        let mut token = token;
        let mut redirected_token = None;
        for _ in 0..MAX_REDIRECTS {
            match self
                .negotiate_once(&endpoint, token.as_deref(), stateful)
                .await?
            {
                Negotiated::Redirect { url, access_token } => {
                    endpoint = Endpoint::parse(&url)?;
                    if access_token.is_some() {
                        token.clone_from(&access_token);
                        redirected_token = access_token;
                    }
                }
                Negotiated::Connect {
                    connection_id,
                    connection_token,
                    stateful: agreed,
                } => {
                    let target = endpoint.websocket_target(Some(&connection_token));
                    let socket = self.upgrade(&endpoint, &target, token.as_deref()).await?;
                    return Ok(Opened {
                        socket,
                        connection_id: Some(connection_id),
                        resume: (stateful && agreed).then_some(Resume {
                            endpoint,
                            connection_token,
                            access_token: redirected_token,
                        }),
                    });
                }
            }
        }
        Err(Error::Negotiate(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

impl Dialer {
    /// Opens a new socket for the stateful connection `resume` describes; no negotiation and
    /// no handshake: the hub protocol continues where it stopped.
    pub(crate) async fn resume(&self, resume: &Resume, token: Option<String>) -> Result<Socket> {
        let token = resume.access_token.clone().or(token);
        let target = resume
            .endpoint
            .websocket_target(Some(&resume.connection_token));
        self.upgrade(&resume.endpoint, &target, token.as_deref())
            .await
    }
}

/// The first few hundred characters of a body, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_hub_urls_apart() {
        let e = Endpoint::parse("http://localhost:5000/hubs/chat/").unwrap();
        assert_eq!(e.authority(), "localhost:5000");
        assert!(!e.tls);
        assert_eq!(
            e.negotiate_target(false),
            "/hubs/chat/negotiate?negotiateVersion=1"
        );
        assert_eq!(e.websocket_target(Some("a+b/c")), "/hubs/chat?id=a%2Bb%2Fc");
        assert_eq!(e.websocket_target(None), "/hubs/chat");

        let e = Endpoint::parse("wss://example.com/hub?tenant=7").unwrap();
        assert!(e.tls);
        assert_eq!(e.authority(), "example.com:443");
        assert_eq!(
            e.negotiate_target(false),
            "/hub/negotiate?tenant=7&negotiateVersion=1"
        );
        assert_eq!(
            e.negotiate_target(true),
            "/hub/negotiate?tenant=7&negotiateVersion=1&useStatefulReconnect=true"
        );
        assert_eq!(e.websocket_target(Some("t")), "/hub?tenant=7&id=t");

        let e = Endpoint::parse("http://[::1]:8080").unwrap();
        assert_eq!(e.authority(), "[::1]:8080");
        assert_eq!(e.websocket_target(None), "/");
    }

    #[test]
    fn refuses_unusable_urls() {
        for (url, reason) in [
            ("localhost:5000/hub", "scheme"),
            ("ftp://host/hub", "'ftp'"),
            ("/hubs/chat", "no scheme"),
            ("http://", ""),
            ("not a url", ""),
        ] {
            let err = Endpoint::parse(url).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            assert!(err.to_string().contains(reason), "{url}: {err}");
        }
    }

    #[test]
    fn reads_negotiation_responses() {
        let v1 = br#"{"negotiateVersion":1,"connectionId":"c","connectionToken":"t","availableTransports":[{"transport":"WebSockets","transferFormats":["Text","Binary"]}]}"#;
        assert_eq!(
            parse_negotiation(v1).unwrap(),
            Negotiated::Connect {
                connection_id: "c".into(),
                connection_token: "t".into(),
                stateful: false,
            }
        );
        let v0 = br#"{"connectionId":"c","availableTransports":[{"transport":"WebSockets","transferFormats":["Text"]}]}"#;
        assert_eq!(
            parse_negotiation(v0).unwrap(),
            Negotiated::Connect {
                connection_id: "c".into(),
                connection_token: "c".into(),
                stateful: false,
            }
        );
        let redirect = br#"{"url":"https://other/hub","accessToken":"x"}"#;
        assert_eq!(
            parse_negotiation(redirect).unwrap(),
            Negotiated::Redirect {
                url: "https://other/hub".into(),
                access_token: Some("x".into())
            }
        );
        let stateful = br#"{"negotiateVersion":1,"connectionId":"c","connectionToken":"t","useStatefulReconnect":true,"availableTransports":[{"transport":"WebSockets","transferFormats":["Text"]}]}"#;
        assert!(matches!(
            parse_negotiation(stateful).unwrap(),
            Negotiated::Connect { stateful: true, .. }
        ));
        let sse_only = br#"{"negotiateVersion":1,"connectionId":"c","connectionToken":"t","availableTransports":[{"transport":"ServerSentEvents","transferFormats":["Text"]}]}"#;
        assert!(
            parse_negotiation(sse_only)
                .unwrap_err()
                .to_string()
                .contains("WebSockets")
        );
        let refused = br#"{"error":"Negotiate will not accept"}"#;
        assert!(
            parse_negotiation(refused)
                .unwrap_err()
                .to_string()
                .contains("will not accept")
        );
        assert!(parse_negotiation(b"<html>").is_err());
    }

    #[test]
    fn error_bodies_are_cut_short() {
        let long = "x".repeat(1000);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), 301);
        assert_eq!(excerpt(b"  short \n"), "short");
    }
}
