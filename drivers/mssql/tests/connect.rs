//! Connecting over real sockets to servers that are not there, hang up, or never answer: each
//! fails fast with a transient error that names the server and never the password.

use std::time::{Duration, Instant};

use backplane_core::Error;
use backplane_mssql::{MssqlBackplane, MssqlOptions};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(20);

async fn connect(options: MssqlOptions) -> Error {
    tokio::time::timeout(LIMIT, MssqlBackplane::connect_with(options))
        .await
        .expect("connect gave up within the limit")
        .expect_err("there is no SQL Server")
}

fn options(port: u16) -> MssqlOptions {
    MssqlOptions::new("127.0.0.1", "app", "hunter2")
        .port(port)
        .connect_timeout(Duration::from_secs(1))
}

fn check(err: &Error) {
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("connecting"), "{text}");
}

#[tokio::test]
async fn refused_connection_is_transient() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    check(&connect(options(port)).await);
}

#[tokio::test]
async fn server_that_hangs_up_is_transient() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        // Read the prelogin packet, then hang up.
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 512];
        let n = socket.read(&mut buf).await.expect("read");
        assert!(n > 0, "the client sent its prelogin");
        assert_eq!(buf[0], 0x12, "a TDS prelogin packet");
    });
    check(&connect(options(port)).await);
    server.await.expect("the fake server saw the prelogin");
}

#[tokio::test]
async fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        // Hold the socket open without answering, until the test is over.
        let _ = finished.await;
        drop(socket);
    });
    let started = Instant::now();
    let err = connect(options(port)).await;
    check(&err);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(done);
    server.await.expect("the silent server ends");
}
