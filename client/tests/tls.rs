//! `https://` hub URLs: the client trusts a private certificate authority it is given, and
//! refuses a server it cannot verify. A TLS terminator (rustls) sits in front of the server, as
//! a load balancer would; the certificates come from `openssl`.

use std::sync::Arc;
use std::time::Duration;

use backplane_client::{Error, HubConnectionBuilder};
use backplane_core::{MemoryBackplane, Node, NodeOptions};
use backplane_server::{Hub, Running, Security, Server};
use backplane_test_support::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

async fn server() -> Running {
    let hub = Hub::builder("test")
        .expect("a valid name")
        .method("Echo", 1, |_ctx, args| async move { args.get::<Value>(0) })
        .build();
    let node = Node::start(Arc::new(MemoryBackplane::new()), NodeOptions::new())
        .await
        .expect("a node");
    Server::new(node)
        .hub(hub)
        .security(Security {
            allow_anonymous: true,
            ..Security::default()
        })
        .bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("the server binds")
}

/// Terminates TLS on a free port and forwards every connection to `backend`.
async fn tls_terminator(pki: &TestPki, backend: std::net::SocketAddr) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("server.crt"))
        .expect("the certificate file")
        .collect::<Result<_, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("the key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("a server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let port = listener.local_addr().expect("an address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A handshake the client aborts is part of the refusal test.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    let pki = TestPki::generate("client-tls").expect("test certificates");
    let running = server().await;
    let port = tls_terminator(&pki, running.local_addr()).await;
    let url = format!("https://localhost:{port}/hubs/test?user=ada");

    let ca = pki.read("ca.pem");
    let connection = HubConnectionBuilder::new(&url)
        .tls_root_certificates_pem(ca)
        .build()
        .expect("valid settings");
    tokio::time::timeout(WAIT, connection.start())
        .await
        .expect("in time")
        .expect("connected over TLS");
    assert_eq!(
        connection
            .invoke("Echo", vec![json!("over tls")])
            .await
            .expect("a result"),
        json!("over tls")
    );
    connection.stop().await;

    let untrusting = HubConnectionBuilder::new(&url)
        .build()
        .expect("valid settings");
    let err = tokio::time::timeout(WAIT, untrusting.start())
        .await
        .expect("in time")
        .unwrap_err();
    assert!(
        matches!(&err, Error::Connect { reason, .. } if reason.contains("TLS")),
        "{err}"
    );

    let garbage = HubConnectionBuilder::new(&url)
        .tls_root_certificates_pem(
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec(),
        )
        .build()
        .unwrap_err();
    assert!(matches!(garbage, Error::InvalidSetting(_)), "{garbage}");
}
