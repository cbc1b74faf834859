//! The client against a real `backplane-server` on a real socket: results and errors, client
//! results, streams, timeouts, tokens and headers, stop, and reconnect after a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use backplane_client::{
    ConnectionEvent, ConnectionState, Error, HubConnection, HubConnectionBuilder, Protocol,
    ReconnectPolicy,
};
use backplane_core::{MemoryBackplane, Node, NodeOptions};
use backplane_server::{Hub, HubError, Limits, Running, Security, Server, user_token};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, watch};

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "client-tests-secret-client-tests";

fn test_hub() -> Hub {
    Hub::builder("test")
        .expect("a valid hub name")
        .method("Echo", 1, |_ctx, args| async move { args.get::<Value>(0) })
        .method("Fail", 0, |_ctx, _args| async move {
            Err(HubError::new("it failed on purpose"))
        })
        .method("Never", 0, |_ctx, _args| async move {
            std::future::pending::<()>().await;
            Ok(Value::Null)
        })
        .method("Shout", 1, |ctx, args| async move {
            let text: String = args.get(0)?;
            ctx.clients().all().send("Heard", vec![json!(text)]).await?;
            Ok(Value::Null)
        })
        .method("AskMe", 1, |ctx, args| async move {
            let question: String = args.get(0)?;
            ctx.clients()
                .caller()
                .invoke("Question", vec![json!(question)], WAIT)
                .await
        })
        .method("WhoAmI", 0, |ctx, _args| async move {
            Ok(json!(ctx.user().map(ToString::to_string)))
        })
        .upload("Join", 1, 2, |_ctx, args, mut streams| async move {
            let separator: String = args.get(0)?;
            let mut words = Vec::new();
            for stream in &mut streams {
                while let Some(word) = stream.next_as::<String>().await? {
                    words.push(word);
                }
            }
            Ok(json!(words.join(&separator)))
        })
        .stream("Count", 1, |_ctx, args, items| async move {
            let count: u64 = args.get(0)?;
            for i in 0..count {
                items.send(json!(i)).await?;
            }
            Ok(())
        })
        .build()
}

async fn serve_at(addr: SocketAddr, limits: Limits, security: Security) -> Running {
    let node = Node::start(Arc::new(MemoryBackplane::new()), NodeOptions::new())
        .await
        .expect("a node");
    Server::new(node)
        .hub(test_hub())
        .limits(limits)
        .security(security)
        .bind(addr)
        .await
        .expect("the server binds")
}

fn anonymous() -> Security {
    Security {
        allow_anonymous: true,
        ..Security::default()
    }
}

async fn serve() -> Running {
    serve_at(
        "127.0.0.1:0".parse().expect("an address"),
        Limits::default(),
        anonymous(),
    )
    .await
}

fn url(running: &Running) -> String {
    format!("http://{}/hubs/test?user=ada", running.local_addr())
}

async fn connected(builder: HubConnectionBuilder) -> HubConnection {
    let connection = builder.build().expect("valid settings");
    tokio::time::timeout(WAIT, connection.start())
        .await
        .expect("start in time")
        .expect("connected");
    assert_eq!(connection.state(), ConnectionState::Connected);
    connection
}

async fn next_event(events: &mut broadcast::Receiver<ConnectionEvent>) -> ConnectionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("the event stream is open")
}

#[tokio::test]
async fn invocations_return_results_and_errors() {
    let running = serve().await;
    let connection = connected(HubConnectionBuilder::new(url(&running))).await;
    assert!(connection.connection_id().is_some());

    let value = connection
        .invoke("Echo", vec![json!({"a": [1, 2]})])
        .await
        .expect("a result");
    assert_eq!(value, json!({"a": [1, 2]}));
    let text: String = connection
        .invoke_as("Echo", vec![json!("hi")])
        .await
        .expect("a string");
    assert_eq!(text, "hi");
    let who: Option<String> = connection
        .invoke_as("WhoAmI", vec![])
        .await
        .expect("a user");
    assert_eq!(who.as_deref(), Some("ada"));

    let err = connection.invoke("Fail", vec![]).await.unwrap_err();
    assert!(
        matches!(&err, Error::Hub(m) if m.contains("it failed on purpose")),
        "{err}"
    );
    let err = connection.invoke("NoSuchMethod", vec![]).await.unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err}");
    let err = connection
        .invoke_as::<u32>("Echo", vec![json!("not a number")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Json(_)), "{err}");

    // The connection is still usable after every error.
    assert_eq!(
        connection
            .invoke("Echo", vec![json!(7)])
            .await
            .expect("a result"),
        json!(7)
    );
    connection.stop().await;
    assert_eq!(connection.state(), ConnectionState::Disconnected);
    let err = connection.invoke("Echo", vec![json!(1)]).await.unwrap_err();
    assert!(
        matches!(err, Error::NotConnected(ConnectionState::Disconnected)),
        "{err}"
    );
}

#[tokio::test]
async fn handlers_receive_invocations_and_answer_client_results() {
    let running = serve().await;
    let connection = connected(HubConnectionBuilder::new(url(&running))).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    connection.on("heard", move |args| {
        let _ = tx.send(args.to_vec());
    });
    connection.on_invoke("Question", |args| async move {
        match args.first().and_then(Value::as_str) {
            Some("ok?") => Ok(json!("yes")),
            _ => Err("I do not know".to_owned()),
        }
    });

    connection.on("Heard", |_| panic!("a handler that panics"));
    let (typed_tx, mut typed_rx) = mpsc::unbounded_channel();
    connection.on_args("Heard", move |(text,): (String,)| {
        let _ = typed_tx.send(text);
    });
    // Arguments of another shape are skipped, and the other handlers still run.
    connection.on_args("Heard", |_: (u32, u32)| panic!("converted the wrong shape"));
    connection
        .send("Shout", vec![json!("hello")])
        .await
        .expect("sent");
    let args = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("an invocation");
    assert_eq!(args, vec![json!("hello")]);
    let typed = tokio::time::timeout(WAIT, typed_rx.recv())
        .await
        .expect("in time")
        .expect("typed arguments");
    assert_eq!(typed, "hello");

    let answer = connection
        .invoke("AskMe", vec![json!("ok?")])
        .await
        .expect("the handler's answer");
    assert_eq!(answer, json!("yes"));
    let err = connection
        .invoke("AskMe", vec![json!("why?")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Hub(m) if m.contains("I do not know")),
        "{err}"
    );

    connection.on_invoke("Question", |_| async {
        panic!("a result handler that panics")
    });
    let err = connection
        .invoke("AskMe", vec![json!("ok?")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Hub(m) if m.contains("handler failed")),
        "{err}"
    );

    // Without a result handler the server hears that the client gave none.
    connection.remove("Question");
    let err = connection
        .invoke("AskMe", vec![json!("ok?")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Hub(m) if m.contains("didn't provide a result")),
        "{err}"
    );
}

#[tokio::test]
async fn streams_deliver_items_then_end() {
    let running = serve().await;
    let connection = connected(HubConnectionBuilder::new(url(&running))).await;
    let mut stream = connection
        .stream("Count", vec![json!(5)])
        .await
        .expect("a stream");
    let mut items = Vec::new();
    while let Some(item) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
    {
        items.push(item.expect("an item"));
    }
    assert_eq!(items, (0..5).map(|i| json!(i)).collect::<Vec<_>>());

    let mut failing = connection
        .stream("Count", vec![json!("x")])
        .await
        .expect("a stream");
    let first = tokio::time::timeout(WAIT, failing.next())
        .await
        .expect("in time")
        .expect("an outcome");
    assert!(matches!(first, Err(Error::Hub(_))), "{first:?}");

    // Dropping a long stream cancels it; the connection goes on.
    let mut long = connection
        .stream("Count", vec![json!(1_000_000)])
        .await
        .expect("a stream");
    let _ = tokio::time::timeout(WAIT, long.next())
        .await
        .expect("in time");
    drop(long);
    assert_eq!(
        connection
            .invoke("Echo", vec![json!(1)])
            .await
            .expect("a result"),
        json!(1)
    );
}

#[tokio::test]
async fn streams_to_the_server_reach_an_upload_method() {
    let running = serve().await;
    for protocol in [Protocol::Json, Protocol::MessagePack] {
        let connection =
            connected(HubConnectionBuilder::new(url(&running)).protocol(protocol)).await;
        let (mut streams, joined) = connection
            .invoke_with_streams("Join", vec![json!("-")], 2)
            .expect("the call goes out");
        let second = streams.pop().expect("two streams");
        let first = streams.pop().expect("two streams");
        second.send(json!("c")).expect("sent");
        first.send(json!("a")).expect("sent");
        first.send(json!("b")).expect("sent");
        second.complete().expect("ended");
        first.complete().expect("ended");
        let joined = tokio::time::timeout(WAIT, joined)
            .await
            .expect("in time")
            .expect("a result");
        assert_eq!(joined, json!("a-b-c"), "{protocol:?}");

        // A failed or dropped stream fails the call with the reason.
        let (mut streams, failed) = connection
            .invoke_with_streams("Join", vec![json!("-")], 2)
            .expect("the call goes out");
        streams.remove(0).fail("no more words").expect("ended");
        let err = tokio::time::timeout(WAIT, failed)
            .await
            .expect("in time")
            .expect_err("the stream failed");
        assert!(err.to_string().contains("no more words"), "{err}");
        let (streams, dropped) = connection
            .invoke_with_streams("Join", vec![json!("-")], 2)
            .expect("the call goes out");
        drop(streams);
        let err = tokio::time::timeout(WAIT, dropped)
            .await
            .expect("in time")
            .expect_err("the stream was dropped");
        assert!(err.to_string().contains("dropped"), "{err}");

        // A wrong stream count is the server's error; the connection goes on.
        let (_streams, wrong) = connection
            .invoke_with_streams("Join", vec![json!("-")], 1)
            .expect("the call goes out");
        let err = tokio::time::timeout(WAIT, wrong)
            .await
            .expect("in time")
            .expect_err("one stream is not two");
        assert!(err.to_string().contains("takes 2 stream(s)"), "{err}");
        assert_eq!(
            connection
                .invoke("Echo", vec![json!(1)])
                .await
                .expect("a result"),
            json!(1)
        );
        connection.stop().await;
    }
}

#[tokio::test]
async fn an_invocation_times_out_and_stop_fails_what_waits() {
    let running = serve().await;
    let connection = connected(
        HubConnectionBuilder::new(url(&running)).invocation_timeout(Duration::from_millis(200)),
    )
    .await;
    let err = connection.invoke("Never", vec![]).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    let patient = connected(HubConnectionBuilder::new(url(&running))).await;
    let mut events = patient.events();
    let waiting = tokio::spawn({
        let patient = patient.clone();
        async move { patient.invoke("Never", vec![]).await }
    });
    // The invocation is on the wire once its echo partner completes: same socket, in order.
    assert_eq!(
        patient
            .invoke("Echo", vec![json!(0)])
            .await
            .expect("a result"),
        json!(0)
    );
    patient.stop().await;
    let err = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("in time")
        .expect("no panic")
        .unwrap_err();
    assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
    assert_eq!(
        next_event(&mut events).await,
        ConnectionEvent::Closed { error: None }
    );
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let running = serve_at(
        "127.0.0.1:0".parse().expect("an address"),
        Limits {
            keep_alive: Duration::from_secs(3600),
            ..Limits::default()
        },
        anonymous(),
    )
    .await;
    let connection = connected(
        HubConnectionBuilder::new(url(&running)).server_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut events = connection.events();
    match next_event(&mut events).await {
        ConnectionEvent::Closed { error: Some(error) } => {
            assert!(error.contains("Server timeout"), "{error}")
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(connection.state(), ConnectionState::Disconnected);
}

#[tokio::test]
async fn a_server_that_never_answers_fails_the_start_and_sees_our_headers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener");
    let addr = listener.local_addr().expect("an address");
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("a connection");
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut chunk).await.expect("readable");
            if n == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&request).to_lowercase());
        // Never answers; holds the socket until the client gives up.
        let _ = socket.read(&mut chunk).await;
    });
    let connection = HubConnectionBuilder::new(format!("http://{addr}/hubs/test"))
        .access_token("tok-123")
        .header("X-Tenant", "blue")
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .expect("valid settings");
    let err = tokio::time::timeout(WAIT, connection.start())
        .await
        .expect("in time")
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(connection.state(), ConnectionState::Disconnected);
    let request = rx.recv().await.expect("the request");
    assert!(
        request.starts_with("post /hubs/test/negotiate?negotiateversion=1 "),
        "{request}"
    );
    assert!(
        request.contains("authorization: bearer tok-123"),
        "{request}"
    );
    assert!(request.contains("x-tenant: blue"), "{request}");
}

#[tokio::test]
async fn tokens_are_required_checked_and_refreshed() {
    let running = serve_at(
        "127.0.0.1:0".parse().expect("an address"),
        Limits::default(),
        Security {
            jwt_secret: Some(SECRET.as_bytes().to_vec()),
            ..Security::default()
        },
    )
    .await;
    let hub = format!("http://{}/hubs/test", running.local_addr());

    let err = HubConnectionBuilder::new(&hub)
        .build()
        .expect("valid settings")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Refused { status: 401, .. }), "{err}");
    let err = HubConnectionBuilder::new(&hub)
        .access_token("not-a-jwt")
        .build()
        .expect("valid settings")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Refused { status: 401, .. }), "{err}");

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let connection = connected(
        HubConnectionBuilder::new(&hub).access_token_factory(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async {
                Ok(user_token(
                    SECRET.as_bytes(),
                    "grace",
                    Duration::from_secs(60),
                ))
            }
        }),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let who: Option<String> = connection
        .invoke_as("WhoAmI", vec![])
        .await
        .expect("a user");
    assert_eq!(who.as_deref(), Some("grace"));

    let failing = HubConnectionBuilder::new(&hub)
        .access_token_factory(|| async { Err("the identity provider is down".to_owned()) })
        .build()
        .expect("valid settings");
    let err = failing.start().await.unwrap_err();
    assert!(
        matches!(&err, Error::AccessToken(m) if m.contains("identity provider")),
        "{err}"
    );
}

#[tokio::test]
async fn bad_settings_are_refused_before_connecting() {
    for builder in [
        HubConnectionBuilder::new("localhost:5000/hubs/chat"),
        HubConnectionBuilder::new("ftp://localhost/hubs/chat"),
        HubConnectionBuilder::new("http://localhost/hubs/chat").header("bad header", "x"),
        HubConnectionBuilder::new("http://localhost/hubs/chat").header("x-ok", "line\nbreak"),
    ] {
        let err = builder.build().unwrap_err();
        assert!(
            matches!(err, Error::InvalidUrl { .. } | Error::InvalidSetting(_)),
            "{err}"
        );
    }
    let err = HubConnectionBuilder::new("http://127.0.0.1:1/hubs/chat")
        .build()
        .expect("valid settings")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    reconnect_after_restart(false).await;
}

#[tokio::test]
async fn a_stateful_connection_the_server_forgot_reconnects() {
    // The restarted server has no session to resume: the client falls back to a reconnect.
    reconnect_after_restart(true).await;
}

async fn reconnect_after_restart(stateful: bool) {
    let running = serve().await;
    let addr = running.local_addr();
    let connection = connected(
        HubConnectionBuilder::new(url(&running))
            .stateful_reconnect(stateful)
            .reconnect(
                ReconnectPolicy::default()
                    .initial(Duration::from_millis(50))
                    .max(Duration::from_millis(200)),
            ),
    )
    .await;
    let first_id = connection.connection_id();
    let mut events = connection.events();

    running.shutdown(Duration::from_secs(1)).await;
    match next_event(&mut events).await {
        ConnectionEvent::Reconnecting { error } => assert!(!error.is_empty()),
        other => panic!("expected reconnecting, got {other:?}"),
    }
    let err = connection
        .invoke("Echo", vec![json!(1)])
        .await
        .expect_err("not connected while reconnecting");
    assert!(
        matches!(err, Error::NotConnected(ConnectionState::Reconnecting)),
        "{err}"
    );

    let _restarted = serve_at(addr, Limits::default(), anonymous()).await;
    match next_event(&mut events).await {
        ConnectionEvent::Reconnected { connection_id } => {
            assert!(connection_id.is_some());
            assert_ne!(connection_id, first_id, "a reconnect is a new connection");
        }
        other => panic!("expected reconnected, got {other:?}"),
    }
    assert_eq!(connection.state(), ConnectionState::Connected);
    assert_eq!(
        connection
            .invoke("Echo", vec![json!(2)])
            .await
            .expect("a result"),
        json!(2)
    );
}

#[tokio::test]
async fn reconnecting_gives_up_as_told() {
    let running = serve().await;
    let connection = connected(
        HubConnectionBuilder::new(url(&running)).reconnect(
            ReconnectPolicy::default()
                .initial(Duration::from_millis(10))
                .max_attempts(2),
        ),
    )
    .await;
    let mut events = connection.events();
    running.shutdown(Duration::from_secs(1)).await;
    assert!(matches!(
        next_event(&mut events).await,
        ConnectionEvent::Reconnecting { .. }
    ));
    match next_event(&mut events).await {
        ConnectionEvent::Closed { error: Some(error) } => {
            assert!(error.contains("gave up after 2 attempts"), "{error}")
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(connection.state(), ConnectionState::Disconnected);
}

#[tokio::test]
async fn messagepack_carries_the_same_calls() {
    let running = serve().await;
    let packed =
        connected(HubConnectionBuilder::new(url(&running)).protocol(Protocol::MessagePack)).await;
    let plain = connected(HubConnectionBuilder::new(url(&running))).await;
    let value = json!({"text": "ünï \u{1e}", "n": [1, -2, 3.5], "none": null, "yes": true});
    assert_eq!(
        packed
            .invoke("Echo", vec![value.clone()])
            .await
            .expect("a result"),
        value
    );
    let err = packed.invoke("Fail", vec![]).await.unwrap_err();
    assert!(
        matches!(&err, Error::Hub(m) if m.contains("it failed on purpose")),
        "{err}"
    );
    let mut stream = packed
        .stream("Count", vec![json!(3)])
        .await
        .expect("a stream");
    let mut items = Vec::new();
    while let Some(item) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
    {
        items.push(item.expect("an item"));
    }
    assert_eq!(items, vec![json!(0), json!(1), json!(2)]);

    // Broadcasts from a JSON client arrive re-encoded; client results go back in MessagePack.
    let (tx, mut rx) = mpsc::unbounded_channel();
    packed.on("Heard", move |args| {
        let _ = tx.send(args.to_vec());
    });
    packed.on_invoke(
        "Question",
        |args| async move { Ok(json!({ "echo": args })) },
    );
    plain
        .invoke("Shout", vec![json!("to everyone")])
        .await
        .expect("sent");
    let args = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("an invocation");
    assert_eq!(args, vec![json!("to everyone")]);
    let answer = packed
        .invoke("AskMe", vec![json!("q")])
        .await
        .expect("an answer");
    assert_eq!(answer, json!({ "echo": ["q"] }));
}

async fn next(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("a message")
}

/// A TCP forwarder between a client and a server, with a network failure on demand.
struct Proxy {
    addr: SocketAddr,
    /// Drops every open connection.
    cut: broadcast::Sender<()>,
    /// Connections accepted so far.
    accepted: watch::Sender<usize>,
    /// While false, new connections are dropped at once.
    open: Arc<AtomicBool>,
}

/// Forwards TCP connections to `backend`.
async fn cuttable_proxy(backend: SocketAddr) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener");
    let addr = listener.local_addr().expect("an address");
    let (cut, _) = broadcast::channel::<()>(4);
    let cuts = cut.clone();
    let accepted = watch::Sender::new(0usize);
    let open = Arc::new(AtomicBool::new(true));
    let counter = accepted.clone();
    let gate = open.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.send_modify(|n| *n += 1);
            if !gate.load(Ordering::SeqCst) {
                continue;
            }
            let mut cut = cuts.subscribe();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut.recv() => {}
                }
            });
        }
    });
    Proxy {
        addr,
        cut,
        accepted,
        open,
    }
}

#[tokio::test]
async fn stateful_reconnect_resumes_the_same_connection_and_loses_nothing() {
    let running = serve().await;
    let proxy = cuttable_proxy(running.local_addr()).await;
    let client = connected(
        HubConnectionBuilder::new(format!("http://{}/hubs/test?user=sam", proxy.addr))
            .stateful_reconnect(true)
            .reconnect(ReconnectPolicy::default()),
    )
    .await;
    let sender = connected(HubConnectionBuilder::new(url(&running))).await;
    let id = client.connection_id();
    let mut events = client.events();
    let (tx, mut rx) = mpsc::unbounded_channel();
    client.on("Heard", move |args| {
        let _ = tx.send(args[0].as_str().unwrap_or_default().to_owned());
    });

    sender
        .invoke("Shout", vec![json!("before")])
        .await
        .expect("sent");
    assert_eq!(next(&mut rx).await, "before");

    let _ = proxy.cut.send(());
    for i in 0..20 {
        sender
            .invoke("Shout", vec![json!(format!("during {i}"))])
            .await
            .expect("sent");
    }
    // A call made while the socket is being replaced goes out on the new one.
    let echoed = tokio::time::timeout(WAIT, client.invoke("Echo", vec![json!("across the cut")]))
        .await
        .expect("in time")
        .expect("a result");
    assert_eq!(echoed, json!("across the cut"));
    for i in 0..20 {
        assert_eq!(
            next(&mut rx).await,
            format!("during {i}"),
            "in order, once each"
        );
    }
    sender
        .invoke("Shout", vec![json!("after")])
        .await
        .expect("sent");
    assert_eq!(next(&mut rx).await, "after", "nothing arrived twice");
    assert_eq!(client.connection_id(), id, "the same connection");
    assert_eq!(
        *proxy.accepted.borrow(),
        3,
        "negotiation, the first socket, and the resumed one"
    );
    assert_eq!(client.state(), ConnectionState::Connected);
    assert!(
        matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "a resume is not a reconnect"
    );
}

#[tokio::test]
async fn a_resume_the_server_refuses_falls_back_to_a_reconnect() {
    resume_refused(Protocol::Json).await;
}

#[tokio::test]
async fn a_messagepack_resume_the_server_refuses_falls_back_to_a_reconnect() {
    resume_refused(Protocol::MessagePack).await;
}

/// The server restarts while the network is down; the new one verifies the connection token
/// (same secret) but has no such connection: the resume is refused and the client reconnects.
async fn resume_refused(protocol: Protocol) {
    let security = Security {
        allow_anonymous: true,
        token_secret: Some(b"client-tests-connection-tokens".to_vec()),
        ..Security::default()
    };
    let running = serve_at(
        "127.0.0.1:0".parse().expect("an address"),
        Limits::default(),
        security.clone(),
    )
    .await;
    let addr = running.local_addr();
    let proxy = cuttable_proxy(addr).await;
    let client = connected(
        HubConnectionBuilder::new(format!("http://{}/hubs/test?user=sam", proxy.addr))
            .protocol(protocol)
            .stateful_reconnect(true)
            .reconnect(
                ReconnectPolicy::default()
                    .initial(Duration::from_millis(50))
                    .max(Duration::from_millis(200)),
            ),
    )
    .await;
    let id = client.connection_id();
    let mut events = client.events();
    // The network fails; while it is down the server restarts, without the connection: once
    // the network is back, the resume is refused.
    proxy.open.store(false, Ordering::SeqCst);
    let _ = proxy.cut.send(());
    let before = *proxy.accepted.borrow();
    running.shutdown(Duration::from_secs(1)).await;
    // A handshake that never comes would hold the resume for an hour: it must be refused at
    // once, or the events below time out.
    let patient = Limits {
        handshake_timeout: Duration::from_secs(3600),
        ..Limits::default()
    };
    let _restarted = serve_at(addr, patient, security).await;
    // Let a resume attempt hit the closed network first.
    tokio::time::timeout(WAIT, proxy.accepted.subscribe().wait_for(|n| *n > before))
        .await
        .expect("a resume attempt in time")
        .expect("the proxy runs");
    proxy.open.store(true, Ordering::SeqCst);
    match next_event(&mut events).await {
        ConnectionEvent::Reconnecting { error } => {
            assert!(
                !error.contains("shutting down"),
                "the cut came first: {error}"
            )
        }
        other => panic!("expected reconnecting, got {other:?}"),
    }
    match next_event(&mut events).await {
        ConnectionEvent::Reconnected { connection_id } => assert_ne!(connection_id, id),
        other => panic!("expected reconnected, got {other:?}"),
    }
    assert_eq!(
        client
            .invoke("Echo", vec![json!(3)])
            .await
            .expect("a result"),
        json!(3)
    );
}
