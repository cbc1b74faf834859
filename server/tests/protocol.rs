//! The hub protocol on real sockets: the handshake, invocations and their errors, streams,
//! client results, keep-alive and timeouts, and every kind of bad input, none of which may
//! crash the server or disturb other connections.

mod common;

use std::sync::Arc;
use std::time::Duration;

use backplane_conformance::{Faulty, Op};
use backplane_core::{HubName, MemoryBackplane, NodeOptions, UserId};
use backplane_server::protocol::{HubMessage, Outcome, Protocol, RecordBuffer};
use backplane_server::{Hub, HubError, Limits, Security, chat, user_token};
use common::{RawClient, Received, WAIT, http, server, server_on, server_with};
use serde_json::{Value, json};

fn test_hub() -> Hub {
    Hub::builder("test")
        .expect("a valid name")
        .method("Echo", 1, |_ctx, args| async move { args.get::<Value>(0) })
        .method("Fail", 0, |_ctx, _args| async move {
            Err::<Value, _>(HubError::new("it failed"))
        })
        .method("Panic", 0, |_ctx, _args| async move {
            panic!("a handler bug");
        })
        .method("AskCaller", 1, |ctx, args| async move {
            let question: String = args.get(0)?;
            ctx.clients()
                .caller()
                .invoke("Question", vec![json!(question)], Duration::from_secs(5))
                .await
        })
        .upload("Sum", 1, 2, |_ctx, args, mut streams| async move {
            let scale: i64 = args.get(0)?;
            let mut total = 0;
            for stream in &mut streams {
                while let Some(n) = stream.next_as::<i64>().await? {
                    total += n * scale;
                }
            }
            Ok(json!(total))
        })
        .stream("Counter", 1, |_ctx, args, items| async move {
            let count: u64 = args.get(0)?;
            for i in 0..count {
                items.send(json!(i)).await?;
            }
            Ok(())
        })
        .build()
}

fn limits() -> Limits {
    Limits::default()
}

#[tokio::test]
async fn invocations_get_results_and_errors_and_the_connection_survives() {
    let running = server(vec![test_hub()], limits()).await;
    let addr = running.local_addr();
    let mut c = RawClient::connect(addr, "test", "u1").await;

    c.send(br#"{"type":1,"invocationId":"1","target":"Echo","arguments":[{"a":[1,2]}]}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m, json!({"type":3,"invocationId":"1","result":{"a":[1,2]}}));

    // Case-insensitive method names, as ASP.NET Core SignalR.
    c.send(br#"{"type":1,"invocationId":"2","target":"echo","arguments":["x"]}"#)
        .await;
    assert_eq!(c.next_message().await.expect("a completion")["result"], "x");

    for (request, error) in [
        (
            r#"{"type":1,"invocationId":"3","target":"Nope","arguments":[]}"#,
            "Unknown hub method 'Nope'",
        ),
        (
            r#"{"type":1,"invocationId":"4","target":"Echo","arguments":[]}"#,
            "Invocation provides 0 argument(s) but target expects 1.",
        ),
        (
            r#"{"type":1,"invocationId":"5","target":"Fail","arguments":[]}"#,
            "it failed",
        ),
        (
            r#"{"type":1,"invocationId":"6","target":"Panic","arguments":[]}"#,
            "An unexpected error occurred invoking 'Panic' on the server.",
        ),
        (
            r#"{"type":1,"invocationId":"7","target":"Counter","arguments":[1]}"#,
            "'Counter' is a streaming method",
        ),
        (
            r#"{"type":4,"invocationId":"8","target":"Echo","arguments":[1]}"#,
            "'Echo' is not a streaming method",
        ),
        (
            r#"{"type":1,"invocationId":"9","target":"Echo","arguments":[1],"streamIds":["s"]}"#,
            "does not accept client-to-server streams",
        ),
    ] {
        c.send(request.as_bytes()).await;
        let m = c.next_message().await.expect("a completion");
        assert_eq!(m["type"], 3, "{request}: {m}");
        let got = m["error"].as_str().unwrap_or_default();
        assert!(
            got.contains(error),
            "{request}: expected {error:?}, got {m}"
        );
    }

    // Without an invocation id: no completion, even for an error. The next call answers.
    c.send(br#"{"type":1,"target":"Nope","arguments":[]}"#)
        .await;
    c.send(br#"{"type":1,"invocationId":"10","target":"Echo","arguments":[10]}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m["invocationId"], "10");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn streams_send_items_then_a_completion() {
    let running = server(vec![test_hub()], limits()).await;
    let mut c = RawClient::connect(running.local_addr(), "test", "u1").await;
    c.send(br#"{"type":4,"invocationId":"s1","target":"Counter","arguments":[3]}"#)
        .await;
    for i in 0..3 {
        let m = c.next_message().await.expect("an item");
        assert_eq!(m, json!({"type":2,"invocationId":"s1","item":i}));
    }
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m, json!({"type":3,"invocationId":"s1"}));

    // A cancelled stream stops: after the cancel, a later call's completion arrives and the
    // stream's does not.
    c.send(br#"{"type":4,"invocationId":"s2","target":"Counter","arguments":[1000000000]}"#)
        .await;
    let first = c.next_message().await.expect("an item");
    assert_eq!(first["invocationId"], "s2");
    c.send(br#"{"type":5,"invocationId":"s2"}"#).await;
    c.send(br#"{"type":1,"invocationId":"after","target":"Echo","arguments":[1]}"#)
        .await;
    loop {
        let m = c.next_message().await.expect("a message");
        if m["invocationId"] == "after" {
            break;
        }
        assert_eq!(
            m["type"], 2,
            "the cancelled stream sent more than items: {m}"
        );
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn client_to_server_streams_reach_the_method_in_order() {
    let running = server(vec![test_hub()], limits()).await;
    let mut c = RawClient::connect(running.local_addr(), "test", "u1").await;
    // Two streams; items interleaved, the second stream completed first.
    c.send(
        br#"{"type":1,"invocationId":"i1","target":"Sum","arguments":[10],"streamIds":["a","b"]}"#,
    )
    .await;
    for record in [
        &br#"{"type":2,"invocationId":"b","item":100}"#[..],
        br#"{"type":2,"invocationId":"a","item":1}"#,
        br#"{"type":2,"invocationId":"a","item":2}"#,
        br#"{"type":3,"invocationId":"b"}"#,
        br#"{"type":2,"invocationId":"a","item":3}"#,
        br#"{"type":3,"invocationId":"a"}"#,
    ] {
        c.send(record).await;
    }
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m, json!({"type":3,"invocationId":"i1","result":1060}));

    // A stream the client ends with an error fails the call with that error.
    c.send(
        br#"{"type":1,"invocationId":"i2","target":"Sum","arguments":[1],"streamIds":["c","d"]}"#,
    )
    .await;
    c.send(br#"{"type":2,"invocationId":"c","item":5}"#).await;
    c.send(br#"{"type":3,"invocationId":"c","error":"the upload broke"}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m["invocationId"], "i2");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("the upload broke")),
        "{m}"
    );

    // Wrong stream counts, reused ids, wrong item types and streams to other methods get
    // error completions; the connection lives on.
    let cases: [(&[u8], &str); 4] = [
        (
            br#"{"type":1,"invocationId":"e1","target":"Sum","arguments":[1],"streamIds":["x"]}"#,
            "takes 2 stream(s) from the client, the invocation names 1",
        ),
        (
            br#"{"type":1,"invocationId":"e2","target":"Sum","arguments":[1],"streamIds":["y","y"]}"#,
            "stream id 'y' is already in use",
        ),
        (
            br#"{"type":1,"invocationId":"e3","target":"Echo","arguments":[1],"streamIds":["z"]}"#,
            "does not accept client-to-server streams",
        ),
        (
            br#"{"type":1,"invocationId":"e4","target":"Sum","arguments":[1]}"#,
            "takes 2 stream(s) from the client, the invocation names 0",
        ),
    ];
    for (record, expected) in cases {
        c.send(record).await;
        let m = c.next_message().await.expect("a completion");
        assert!(
            m["error"].as_str().is_some_and(|e| e.contains(expected)),
            "{m} should say {expected:?}"
        );
    }
    c.send(
        br#"{"type":1,"invocationId":"i3","target":"Sum","arguments":[1],"streamIds":["p","q"]}"#,
    )
    .await;
    c.send(br#"{"type":2,"invocationId":"p","item":"not a number"}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("wrong type")),
        "{m}"
    );
    // Open streams are bounded: 32 calls with 2 streams each fill the 64 places (the one
    // stream "q" above is forgotten once its method returned), the next call is refused.
    for i in 0..32 {
        let record = format!(
            r#"{{"type":1,"invocationId":"o{i}","target":"Sum","arguments":[1],"streamIds":["o{i}a","o{i}b"]}}"#
        );
        c.send(record.as_bytes()).await;
    }
    c.send(br#"{"type":1,"invocationId":"full","target":"Sum","arguments":[1],"streamIds":["f1","f2"]}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m["invocationId"], "full", "{m}");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 64 streams")),
        "{m}"
    );
    // Ending one call's streams frees its places (and answers it).
    c.send(br#"{"type":3,"invocationId":"o0a"}"#).await;
    c.send(br#"{"type":3,"invocationId":"o0b"}"#).await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m, json!({"type":3,"invocationId":"o0","result":0}));
    // Items for a stream nobody reads any more, or that never existed, are ignored.
    c.send(br#"{"type":2,"invocationId":"q","item":1}"#).await;
    c.send(br#"{"type":2,"invocationId":"nope","item":1}"#)
        .await;
    c.send(br#"{"type":1,"invocationId":"after","target":"Echo","arguments":["ok"]}"#)
        .await;
    let m = c.next_message().await.expect("a completion");
    assert_eq!(m, json!({"type":3,"invocationId":"after","result":"ok"}));
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_hub_method_gets_a_client_result() {
    let running = server(vec![test_hub()], limits()).await;
    let mut c = RawClient::connect(running.local_addr(), "test", "u1").await;
    c.send(
        br#"{"type":1,"invocationId":"1","target":"AskCaller","arguments":["six times seven?"]}"#,
    )
    .await;
    let question = c.next_message().await.expect("the server's invocation");
    assert_eq!(question["type"], 1);
    assert_eq!(question["target"], "Question");
    assert_eq!(question["arguments"], json!(["six times seven?"]));
    let id = question["invocationId"]
        .as_str()
        .expect("an invocation id")
        .to_owned();
    c.send(format!(r#"{{"type":3,"invocationId":"{id}","result":42}}"#).as_bytes())
        .await;
    let m = c.next_message().await.expect("the completion");
    assert_eq!(m, json!({"type":3,"invocationId":"1","result":42}));

    // An error from the client becomes the method's error.
    c.send(br#"{"type":1,"invocationId":"2","target":"AskCaller","arguments":["?"]}"#)
        .await;
    let question = c.next_message().await.expect("the server's invocation");
    let id = question["invocationId"].as_str().expect("an id").to_owned();
    c.send(format!(r#"{{"type":3,"invocationId":"{id}","error":"no idea"}}"#).as_bytes())
        .await;
    let m = c.next_message().await.expect("the completion");
    assert_eq!(m["invocationId"], "2");
    assert!(
        m["error"].as_str().unwrap_or_default().contains("no idea"),
        "{m}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn handshake_errors_are_answered_then_closed() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    for (handshake, error) in [
        (
            &br#"{"protocol":"xml","version":1}"#[..],
            "The protocol 'xml' is not supported.",
        ),
        (
            br#"{"protocol":"json","version":9}"#,
            "does not support version 9",
        ),
        (br#"{"protocol":"json"}"#, "'version'"),
        (b"not json", "must be a JSON object"),
        (b"{not json", "not valid JSON"),
    ] {
        let mut c = RawClient::open(addr, "/hubs/chat?user=x")
            .await
            .expect("upgrade");
        c.send(handshake).await;
        let answer = c.next_record().await.expect("a handshake answer");
        let got = answer["error"].as_str().unwrap_or_default();
        assert!(got.contains(error), "{answer} should contain {error:?}");
        assert!(matches!(
            c.receive().await,
            Some(Received::Close(..)) | None
        ));
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_missing_handshake_times_out() {
    let running = server(
        vec![chat::hub()],
        Limits {
            handshake_timeout: Duration::from_millis(200),
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::open(running.local_addr(), "/hubs/chat?user=x")
        .await
        .expect("upgrade");
    let answer = c.next_record().await.expect("a handshake error");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("handshake timeout"),
        "{answer}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_input_closes_only_that_connection_with_a_reason() {
    let running = server(
        vec![chat::hub()],
        Limits {
            max_message_size: 4096,
            ..limits()
        },
    )
    .await;
    let addr = running.local_addr();
    let mut bystander = RawClient::connect(addr, "chat", "bystander").await;

    let cases: Vec<(Vec<u8>, &str, u16)> = vec![
        (b"{not json\x1e".to_vec(), "invalid message", 1002),
        (b"[1,2]\x1e".to_vec(), "JSON object", 1002),
        (
            b"{\"type\":42}\x1e".to_vec(),
            "unknown message type 42",
            1002,
        ),
        (
            b"{\"type\":1,\"target\":7,\"arguments\":[]}\x1e".to_vec(),
            "'target'",
            1002,
        ),
        (
            b"{\"type\":1,\"target\":\"x\",\"arguments\":\"no\"}\x1e".to_vec(),
            "'arguments'",
            1002,
        ),
        // No record separator, and more than the limit: never buffered without bound.
        (vec![b' '; 5000], "maximum size", 1009),
        // One frame over the limit.
        (
            {
                let mut big = format!(
                    r#"{{"type":1,"target":"SendMessage","arguments":["{}"]}}"#,
                    "x".repeat(5000)
                )
                .into_bytes();
                big.push(0x1e);
                big
            },
            "maximum size",
            1009,
        ),
    ];
    for (data, reason, code) in cases {
        let mut c = RawClient::connect(addr, "chat", "attacker").await;
        c.send_raw(data.clone()).await;
        let (close, frame_code) = c.until_closed().await;
        let close = close.unwrap_or_else(|| {
            panic!(
                "a Close message for {:?}",
                String::from_utf8_lossy(&data[..data.len().min(60)])
            )
        });
        assert!(
            close["error"].as_str().unwrap_or_default().contains(reason),
            "{close} should contain {reason:?}"
        );
        assert_eq!(frame_code, Some(code), "close code for {reason}");
    }

    // The bystander never noticed.
    bystander
        .send(br#"{"type":1,"invocationId":"1","target":"SendMessage","arguments":["still here"]}"#)
        .await;
    let mut got_message = false;
    let mut got_completion = false;
    while !(got_message && got_completion) {
        let m = bystander
            .next_message()
            .await
            .expect("the bystander is served");
        got_message |= m["target"] == "ReceiveMessage" && m["arguments"][1] == "still here";
        got_completion |= m["type"] == 3 && m["invocationId"] == "1";
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_ping_flood_is_harmless() {
    let running = server(vec![chat::hub()], limits()).await;
    let mut c = RawClient::connect(running.local_addr(), "chat", "flooder").await;
    for _ in 0..5000 {
        c.send(br#"{"type":6}"#).await;
    }
    for _ in 0..500 {
        c.ping().await;
    }
    c.send(br#"{"type":1,"invocationId":"1","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    let m = c.next_message().await.expect("still served");
    assert_eq!(m, json!({"type":3,"invocationId":"1","result":["flooder"]}));
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn idle_connections_are_pinged_and_silent_ones_closed() {
    let running = server(
        vec![chat::hub()],
        Limits {
            keep_alive: Duration::from_millis(100),
            client_timeout: Duration::from_millis(600),
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::connect(running.local_addr(), "chat", "quiet").await;
    let ping = c.next_record().await.expect("a keep-alive ping");
    assert_eq!(ping, json!({"type":6}));
    let (close, _) = c.until_closed().await;
    let close = close.expect("a Close message");
    assert!(
        close["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Server timeout elapsed"),
        "{close}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_the_server_does_not_read_is_not_timed_out() {
    let running = server(
        vec![test_hub()],
        Limits {
            keep_alive: Duration::from_millis(100),
            client_timeout: Duration::from_millis(600),
            invocations_per_second: 0,
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::connect(running.local_addr(), "test", "u1").await;
    // The worker waits for the client's answer (5 s at most) while more invocations than
    // its queue holds arrive: reading pauses behind them, far longer than the client
    // timeout, and the answer, sent last, is read only once the wait gave up.
    c.send(br#"{"type":1,"invocationId":"q","target":"AskCaller","arguments":["?"]}"#)
        .await;
    let question = c.next_message().await.expect("the server's invocation");
    assert_eq!(question["target"], "Question");
    let id = question["invocationId"].as_str().expect("an id").to_owned();
    for i in 0..100 {
        c.send(
            format!(r#"{{"type":1,"invocationId":"e{i}","target":"Echo","arguments":[{i}]}}"#)
                .as_bytes(),
        )
        .await;
    }
    c.send(format!(r#"{{"type":3,"invocationId":"{id}","result":42}}"#).as_bytes())
        .await;
    let m = c.next_message().await.expect("the connection lives");
    assert_eq!(m["invocationId"], "q");
    assert!(m["error"].is_string(), "{m}");
    for i in 0..100 {
        let m = c.next_message().await.expect("the connection lives");
        assert_eq!(
            m,
            json!({"type":3,"invocationId":format!("e{i}"),"result":i})
        );
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn negotiate_hands_out_tokens_that_the_upgrade_checks() {
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let running = server_with(
        vec![chat::hub()],
        limits(),
        Security {
            jwt_secret: Some(secret.clone()),
            ..Security::default()
        },
        NodeOptions::new(),
    )
    .await;
    let addr = running.local_addr();
    let token = user_token(&secret, "alice", Duration::from_secs(60));
    let auth = format!("Bearer {token}");

    let (status, body) = http(
        addr,
        "POST",
        "/hubs/chat/negotiate?negotiateVersion=1",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let negotiated: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(negotiated["negotiateVersion"], 1);
    assert_eq!(
        negotiated["availableTransports"][0]["transport"],
        "WebSockets"
    );
    let connection_token = negotiated["connectionToken"]
        .as_str()
        .expect("a token")
        .to_owned();

    for (path, headers, expected) in [
        ("/hubs/chat/negotiate?negotiateVersion=1", vec![], 401),
        (
            "/hubs/chat/negotiate?negotiateVersion=1",
            vec![("authorization", "Bearer nope")],
            401,
        ),
        (
            "/hubs/nothing/negotiate?negotiateVersion=1",
            vec![("authorization", auth.as_str())],
            404,
        ),
        (
            "/hubs/chat/negotiate?negotiateVersion=1&access_token=x.y.z",
            vec![],
            401,
        ),
    ] {
        let (status, body) = http(addr, "POST", path, &headers).await;
        assert_eq!(status, expected, "{path}: {body}");
    }

    // The token from negotiate opens the socket, with the same user's access token.
    let path = format!("/hubs/chat?id={connection_token}&access_token={token}");
    let mut c = RawClient::open(addr, &path)
        .await
        .expect("the upgrade succeeds");
    c.send(br#"{"protocol":"json","version":1}"#).await;
    assert_eq!(c.next_record().await.expect("an answer"), json!({}));
    c.send(br#"{"type":1,"invocationId":"1","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    assert_eq!(
        c.next_message().await.expect("a completion")["result"],
        json!(["alice"])
    );

    // Another user cannot use it, and a forged one is refused.
    let mallory = user_token(&secret, "mallory", Duration::from_secs(60));
    let stolen = format!("/hubs/chat?id={connection_token}&access_token={mallory}");
    assert!(RawClient::open(addr, &stolen).await.is_err());
    let forged = format!("/hubs/chat?id=abc.def.ghi&access_token={token}");
    assert!(RawClient::open(addr, &forged).await.is_err());
    running.shutdown(Duration::from_secs(5)).await;
}

/// Older and third-party clients: a negotiate without `negotiateVersion` (version 0) is answered
/// with `negotiateVersion: 0` and the connection id to send back, and a handshake of version 0
/// is accepted; the connection then works like any other.
#[tokio::test]
async fn version_0_clients_negotiate_shake_hands_and_call() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let (status, body) = http(addr, "POST", "/hubs/chat/negotiate?user=old", &[]).await;
    assert_eq!(status, 200, "{body}");
    let negotiated: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(negotiated["negotiateVersion"], 0, "{negotiated}");
    assert!(negotiated.get("connectionToken").is_none(), "{negotiated}");
    let id = negotiated["connectionId"]
        .as_str()
        .expect("an id")
        .to_owned();

    let mut c = RawClient::open(addr, &format!("/hubs/chat?id={id}&user=old"))
        .await
        .expect("the upgrade succeeds");
    c.send(br#"{"protocol":"json","version":0}"#).await;
    assert_eq!(c.next_record().await.expect("an answer"), json!({}));
    c.send(br#"{"type":1,"invocationId":"1","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    let completion = c.next_message().await.expect("a completion");
    assert_eq!(completion["invocationId"], "1", "{completion}");
    assert!(completion.get("error").is_none(), "{completion}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn negotiate_refuses_past_the_connection_limit() {
    let running = server_with(
        vec![chat::hub()],
        limits(),
        Security {
            allow_anonymous: true,
            ..Security::default()
        },
        NodeOptions::new().max_connections(1),
    )
    .await;
    let addr = running.local_addr();
    let _first = RawClient::connect(addr, "chat", "one").await;
    let (status, body) = http(
        addr,
        "POST",
        "/hubs/chat/negotiate?negotiateVersion=1&user=two",
        &[],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connection limit"), "{body}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn health_reports_the_node() {
    let running = server(vec![chat::hub()], limits()).await;
    let _c = RawClient::connect(running.local_addr(), "chat", "h").await;
    let (status, body) = http(running.local_addr(), "GET", "/health", &[]).await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["local_connections"], 1);
    assert_eq!(health["backplane"]["driver"], "memory");
    assert_eq!(health["backplane"]["reachable"], true);
    assert_eq!(health["node"], running.node().id().to_string());
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_reconnect_allowed() {
    let running = server(vec![chat::hub()], limits()).await;
    let mut c = RawClient::connect(running.local_addr(), "chat", "s").await;
    let stopping = tokio::spawn(running.shutdown(Duration::from_secs(5)));
    let (close, code) = c.until_closed().await;
    let close = close.expect("a Close message");
    assert_eq!(close["allowReconnect"], true, "{close}");
    assert_eq!(code, Some(1001));
    stopping.await.expect("shutdown finishes");
}

#[tokio::test]
async fn metrics_count_connections_and_messages() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let mut c = RawClient::connect(addr, "chat", "m").await;
    c.send(br#"{"type":1,"invocationId":"1","target":"SendMessage","arguments":["x"]}"#)
        .await;
    while c.next_message().await.expect("a message")["type"] != 3 {}
    let long_user = "u".repeat(300);
    let path = format!("/hubs/chat/negotiate?negotiateVersion=1&user={long_user}");
    let (status, _) = http(addr, "POST", &path, &[]).await;
    assert_eq!(status, 401, "an overlong user name is refused");
    let (status, body) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    for line in [
        "backplane_connections 1",
        "backplane_connects_total 1",
        "backplane_messages_in_total 1",
        "backplane_messages_out_total{target=\"all\"} 1",
        "backplane_connection_failures_total{reason=\"auth\"} 1",
        "backplane_deliveries_total{outcome=\"written\"}",
        "backplane_publish_seconds_count 1",
        "backplane_pending_durable_messages 0",
        "backplane_backplane_call_seconds_count{operation=\"add_connection\",outcome=\"ok\"} 1",
        "backplane_backplane_call_seconds_count{operation=\"append\",outcome=\"ok\"}",
        "# EOF",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_a_reason() {
    let running = server_with(
        vec![chat::hub()],
        Limits {
            // Long enough that the blocked write is still waiting when the client reads again.
            client_timeout: Duration::from_secs(20),
            keep_alive: Duration::from_secs(1),
            invocations_per_second: 0,
            ..limits()
        },
        Security {
            allow_anonymous: true,
            ..Security::default()
        },
        NodeOptions::new().connection_buffer(64),
    )
    .await;
    let addr = running.local_addr();
    let mut events = running.node().events();
    let mut stuck = RawClient::connect(addr, "chat", "stuck").await;
    let mut sender = RawClient::connect(addr, "chat", "sender").await;
    let text = "y".repeat(8000);
    // Far more than the socket buffers and the connection's queue hold.
    let mut sent = 0;
    let slow = loop {
        let call = format!(r#"{{"type":1,"target":"SendMessage","arguments":["{text}"]}}"#);
        sender.send(call.as_bytes()).await;
        sent += 1;
        match events.try_recv() {
            Ok(backplane_core::NodeEvent::SlowConsumer { connection, .. }) => break connection,
            _ if sent < 20_000 => {}
            other => panic!("no slow consumer after {sent} messages: {other:?}"),
        }
        // The sender reads its own copies, so only the stuck client falls behind.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(1), sender.next_record()).await
        {}
    };
    let (status, metrics) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("backplane_slow_consumer_closes_total 1"),
        "{metrics}"
    );
    // Reading again, the stuck client finds the reason after whatever was queued for it.
    let (close, _) = stuck.until_closed().await;
    if let Some(close) = close {
        assert!(
            close["error"]
                .as_str()
                .unwrap_or_default()
                .contains("could not keep up"),
            "{close}"
        );
        assert_eq!(close["allowReconnect"], true);
    }
    let _ = slow;
    // The sender is still served.
    sender
        .send(br#"{"type":1,"invocationId":"z","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    loop {
        let m = sender.next_message().await.expect("still served");
        if m["invocationId"] == "z" {
            assert_eq!(m["result"], json!(["sender"]));
            break;
        }
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_connection_joins_a_bounded_number_of_groups() {
    let running = server(
        vec![chat::hub()],
        Limits {
            max_groups_per_connection: 2,
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::connect(running.local_addr(), "chat", "joiner").await;
    for (i, group) in ["a", "b", "a", "c"].iter().enumerate() {
        let call = format!(
            r#"{{"type":1,"invocationId":"{i}","target":"JoinGroup","arguments":["{group}"]}}"#
        );
        c.send(call.as_bytes()).await;
        let completion = loop {
            let m = c.next_message().await.expect("a message");
            if m["type"] == 3 {
                break m;
            }
        };
        if *group == "c" {
            assert!(
                completion["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("at most 2 groups"),
                "{completion}"
            );
        } else {
            assert!(completion.get("error").is_none(), "{group}: {completion}");
        }
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_stays_over_the_rate_limit_is_closed_with_a_reason() {
    let running = server(
        vec![test_hub()],
        Limits {
            invocations_per_second: 20,
            client_timeout: Duration::from_secs(1),
            keep_alive: Duration::from_millis(250),
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::connect(running.local_addr(), "test", "flood").await;
    // 40 pass at once, the other 160 would take 8 s at 20 per second: far past the bound of
    // one client timeout that a call may be kept waiting by the limit.
    for i in 0..200 {
        let call =
            format!(r#"{{"type":1,"invocationId":"{i}","target":"Echo","arguments":[{i}]}}"#);
        c.send(call.as_bytes()).await;
    }
    let mut completed = 0;
    let mut close = None;
    while let Some(m) = c.next_record().await {
        match m["type"].as_u64() {
            Some(3) => {
                assert_eq!(m["invocationId"], completed.to_string(), "in order");
                completed += 1;
            }
            Some(7) => close = Some(m),
            _ => {}
        }
    }
    let close = close.expect("a Close message");
    assert!(
        close["error"]
            .as_str()
            .is_some_and(|e| e.contains("rate limit")),
        "{close}"
    );
    assert!(completed < 200, "every call waited its turn: {completed}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_flood_of_invocations_is_paced_not_dropped() {
    let running = server(
        vec![test_hub()],
        Limits {
            invocations_per_second: 50,
            ..limits()
        },
    )
    .await;
    let mut c = RawClient::connect(running.local_addr(), "test", "flood").await;
    let started = std::time::Instant::now();
    // A burst of 100 passes at once; the next 50 take about a second.
    for i in 0..150 {
        let call =
            format!(r#"{{"type":1,"invocationId":"{i}","target":"Echo","arguments":[{i}]}}"#);
        c.send(call.as_bytes()).await;
    }
    for i in 0..150 {
        let m = c.next_message().await.expect("a completion");
        assert_eq!(m["invocationId"], i.to_string(), "in order, none lost");
        assert_eq!(m["result"], i);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "150 invocations at 50/s (burst 100) took only {:?}",
        started.elapsed()
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sends_nobody_waits_for_arrive_in_order_and_awaited_calls_after_them() {
    let running = server(vec![chat::hub()], limits()).await;
    let mut reader = RawClient::connect(running.local_addr(), "chat", "reader").await;
    let mut writer = RawClient::connect(running.local_addr(), "chat", "writer").await;
    // A burst of calls without invocation ids, then one the writer waits for.
    for i in 0..150 {
        let call = format!(r#"{{"type":1,"target":"SendMessage","arguments":["m{i}"]}}"#);
        writer.send(call.as_bytes()).await;
    }
    writer
        .send(br#"{"type":1,"invocationId":"last","target":"SendMessage","arguments":["last"]}"#)
        .await;
    // The awaited call completes after everything before it is stored.
    loop {
        let m = writer.next_message().await.expect("a message");
        if m["type"] == 3 {
            assert_eq!(m, json!({"type":3,"invocationId":"last"}));
            break;
        }
    }
    for i in 0..150 {
        let m = reader.next_message().await.expect("a broadcast");
        assert_eq!(m["target"], "ReceiveMessage", "{m}");
        assert_eq!(
            m["arguments"],
            json!(["writer", format!("m{i}")]),
            "in order"
        );
    }
    let m = reader.next_message().await.expect("the last broadcast");
    assert_eq!(m["arguments"], json!(["writer", "last"]));
    running.shutdown(Duration::from_secs(5)).await;
}

/// A hub whose `Send` broadcasts its argument and whose `Mark` tells the test it ran.
fn pipelined_hub(marked: Arc<tokio::sync::Notify>) -> Hub {
    Hub::builder("pipe")
        .expect("a valid name")
        .method("Send", 1, |ctx, args| async move {
            let text: String = args.get(0)?;
            ctx.clients().all().send("Got", vec![json!(text)]).await?;
            Ok(Value::Null)
        })
        .method("Mark", 0, move |_ctx, _args| {
            let marked = marked.clone();
            async move {
                marked.notify_one();
                Ok(Value::Null)
            }
        })
        .build()
}

/// The next `count` completions, skipping everything else.
async fn completions(c: &mut RawClient, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let m = c.next_message().await.expect("a message");
        if m["type"] == 3 {
            got.push(m);
        }
    }
    got
}

#[tokio::test]
async fn the_next_call_runs_while_the_previous_one_waits_for_its_append() {
    let marked = Arc::new(tokio::sync::Notify::new());
    let (faulty, running) = faulty_server(vec![pipelined_hub(marked.clone())]).await;
    let mut c = RawClient::connect(running.local_addr(), "pipe", "ann").await;
    faulty.hold_after(Op::Append, true);
    c.send(br#"{"type":1,"invocationId":"1","target":"Send","arguments":["one"]}"#)
        .await;
    c.send(br#"{"type":1,"invocationId":"2","target":"Mark","arguments":[]}"#)
        .await;
    faulty
        .waiting_after(Op::Append, 1)
        .await
        .expect("the first call's append is held");
    tokio::time::timeout(WAIT, marked.notified())
        .await
        .expect("the second call ran while the first waited for the log");
    faulty.hold_after(Op::Append, false);
    // The completions go out in order, the first once its message is stored.
    assert_eq!(
        completions(&mut c, 2).await,
        vec![
            json!({"type":3,"invocationId":"1"}),
            json!({"type":3,"invocationId":"2"})
        ]
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_call_whose_message_is_not_stored_completes_with_the_error() {
    let marked = Arc::new(tokio::sync::Notify::new());
    let (faulty, running) = faulty_server(vec![pipelined_hub(marked)]).await;
    let mut c = RawClient::connect(running.local_addr(), "pipe", "ann").await;
    faulty.fail_next(Op::Append, 1);
    c.send(br#"{"type":1,"invocationId":"1","target":"Send","arguments":["lost"]}"#)
        .await;
    c.send(br#"{"type":1,"invocationId":"2","target":"Send","arguments":["kept"]}"#)
        .await;
    let got = completions(&mut c, 2).await;
    assert_eq!(got[0]["invocationId"], "1");
    assert!(
        got[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the method returned, but its message was not stored: {got:?}"
    );
    assert_eq!(got[1], json!({"type":3,"invocationId":"2"}));
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_complete_in_order_after_their_messages() {
    let unpaced = Limits {
        invocations_per_second: 0,
        ..Limits::default()
    };
    let running = server(vec![chat::hub()], unpaced).await;
    let mut reader = RawClient::connect(running.local_addr(), "chat", "reader").await;
    let mut writer = RawClient::connect(running.local_addr(), "chat", "writer").await;
    for i in 0..300 {
        let call = format!(
            r#"{{"type":1,"invocationId":"{i}","target":"SendMessage","arguments":["m{i}"]}}"#
        );
        writer.send(call.as_bytes()).await;
    }
    let got = completions(&mut writer, 300).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            *m,
            json!({"type":3,"invocationId":i.to_string()}),
            "in order"
        );
    }
    for i in 0..300 {
        let m = reader.next_message().await.expect("a broadcast");
        assert_eq!(
            m["arguments"],
            json!(["writer", format!("m{i}")]),
            "in order"
        );
    }
    running.shutdown(Duration::from_secs(5)).await;
}

/// The next record that is not a ping.
async fn next_non_ping(c: &mut RawClient) -> Value {
    loop {
        let m = c.next_record().await.expect("a record");
        if m["type"] != 6 {
            return m;
        }
    }
}

/// Negotiates a stateful connection for `user`; the path of its WebSocket.
async fn negotiate_stateful(addr: std::net::SocketAddr, user: &str) -> String {
    let (status, body) = http(
        addr,
        "POST",
        &format!("/hubs/chat/negotiate?negotiateVersion=1&useStatefulReconnect=true&user={user}"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let negotiated: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(negotiated["useStatefulReconnect"], true);
    let token = negotiated["connectionToken"].as_str().expect("a token");
    format!("/hubs/chat?id={token}&user={user}")
}

/// Opens the WebSocket at `path` and shakes hands with hub protocol version 2.
async fn open_stateful(addr: std::net::SocketAddr, path: &str) -> RawClient {
    let mut socket = RawClient::open(addr, path).await.expect("upgrade");
    socket.send(br#"{"protocol":"json","version":2}"#).await;
    assert_eq!(socket.next_record().await.expect("an answer"), json!({}));
    socket
}

#[tokio::test]
async fn stateful_reconnect_resumes_without_loss_or_duplicates() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let path = negotiate_stateful(addr, "sr").await;

    let mut first = open_stateful(addr, &path).await;
    let mut sender = RawClient::connect(addr, "chat", "other").await;

    // Client message 1 is handled and answered (server message 1), and the client
    // acknowledges that answer.
    first
        .send(br#"{"type":1,"invocationId":"a","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    // The answer and the server's acknowledgement of client message 1, in either order.
    let got = [
        next_non_ping(&mut first).await,
        next_non_ping(&mut first).await,
    ];
    assert!(
        got.iter()
            .any(|m| m["type"] == 3 && m["invocationId"] == "a"),
        "{got:?}"
    );
    assert!(got.contains(&json!({"type":8,"sequenceId":1})), "{got:?}");
    first.send(br#"{"type":8,"sequenceId":1}"#).await;

    // Server message 2 arrives but is not acknowledged; then the socket drops.
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["two"]}"#)
        .await;
    let two = next_non_ping(&mut first).await;
    assert_eq!(two["arguments"][1], "two");
    drop(first);
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["three"]}"#)
        .await;

    // The same id on a new socket resumes: no handshake, the client says where its messages
    // start and resends the one it has no acknowledgement for... which was acknowledged.
    let mut second = RawClient::open(addr, &path).await.expect("upgrade");
    second.send(br#"{"type":9,"sequenceId":1}"#).await;
    second
        .send(br#"{"type":1,"invocationId":"a","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    second
        .send(br#"{"type":1,"invocationId":"b","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    let sequence = next_non_ping(&mut second).await;
    assert_eq!(
        sequence,
        json!({"type":9,"sequenceId":2}),
        "resent from the first unacknowledged"
    );
    let mut seen = Vec::new();
    while !(seen.contains(&"three".to_owned()) && seen.contains(&"b".to_owned())) {
        let m = next_non_ping(&mut second).await;
        match m["type"].as_u64() {
            Some(1) => seen.push(m["arguments"][1].as_str().unwrap_or_default().to_owned()),
            Some(3) => seen.push(m["invocationId"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    assert!(
        !seen.contains(&"a".to_owned()),
        "a resent message was handled twice: {seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|s| *s == "two" || *s == "three")
            .collect::<Vec<_>>(),
        vec!["two", "three"],
        "what was missed arrives once, in order: {seen:?}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_resume_replaces_a_socket_the_server_still_holds() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let path = negotiate_stateful(addr, "half").await;
    let mut first = open_stateful(addr, &path).await;
    let mut sender = RawClient::connect(addr, "chat", "other").await;
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["one"]}"#)
        .await;
    assert_eq!(next_non_ping(&mut first).await["arguments"][1], "one");

    // The client's network changed: its old socket looks alive to the server (a half-open
    // connection), and the client resumes on a new one.
    let mut second = RawClient::open(addr, &path).await.expect("upgrade");
    second.send(br#"{"type":9,"sequenceId":1}"#).await;
    assert_eq!(
        next_non_ping(&mut second).await,
        json!({"type":9,"sequenceId":1})
    );
    assert_eq!(next_non_ping(&mut second).await["arguments"][1], "one");
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["two"]}"#)
        .await;
    assert_eq!(next_non_ping(&mut second).await["arguments"][1], "two");
    // The old socket is let go, and got nothing more.
    let mut old = Vec::new();
    while let Some(record) = first.next_record().await {
        old.push(record);
    }
    assert!(
        old.iter().all(|m| m["type"] == 6),
        "the replaced socket got {old:?}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

/// A server on a memory backplane whose calls the test can hold.
async fn faulty_server(hubs: Vec<Hub>) -> (Arc<Faulty>, backplane_server::Running) {
    let faulty = Faulty::new(Arc::new(MemoryBackplane::new()));
    let running = server_on(
        faulty.clone(),
        hubs,
        limits(),
        Security {
            allow_anonymous: true,
            ..Security::default()
        },
        NodeOptions::new(),
    )
    .await;
    (faulty, running)
}

/// The next `ReceiveNotification` (a durable direct message of the chat hub): its text.
async fn next_notification(c: &mut RawClient) -> String {
    loop {
        let m = c.next_message().await.expect("a message");
        if m["type"] == 1 && m["target"] == "ReceiveNotification" {
            return m["arguments"][1].as_str().expect("a text").to_owned();
        }
    }
}

/// Sends a durable direct message to `user` and waits for the call's completion.
async fn send_durable(sender: &mut RawClient, user: &str, text: &str) {
    sender
        .send(
            format!(
                r#"{{"type":1,"invocationId":"{text}","target":"SendToUser","arguments":["{user}","{text}"]}}"#
            )
            .as_bytes(),
        )
        .await;
    loop {
        let m = sender.next_message().await.expect("the completion");
        if m["type"] == 3 && m["invocationId"] == text {
            assert!(m.get("error").is_none(), "{m}");
            return;
        }
    }
}

#[tokio::test]
async fn a_durable_message_a_stateful_client_did_not_acknowledge_reaches_its_next_connection() {
    let (_faulty, running) = faulty_server(vec![chat::hub()]).await;
    let addr = running.local_addr();
    let path = negotiate_stateful(addr, "dora").await;
    let mut first = open_stateful(addr, &path).await;
    let mut sender = RawClient::connect(addr, "chat", "other").await;
    send_durable(&mut sender, "dora", "kept").await;
    assert_eq!(next_notification(&mut first).await, "kept");
    // A round trip after the write: the server has long seen that the message went out.
    first
        .send(br#"{"type":1,"invocationId":"r","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    while next_non_ping(&mut first).await["invocationId"] != "r" {}

    // The socket is cut before the client acknowledged the message; the client does not
    // resume but connects afresh, and gets it there, once.
    drop(first);
    let mut next = RawClient::connect(addr, "chat", "dora").await;
    assert_eq!(next_notification(&mut next).await, "kept");
    send_durable(&mut sender, "dora", "after").await;
    assert_eq!(
        next_notification(&mut next).await,
        "after",
        "the unacknowledged message came once"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_durable_message_is_delivered_once_the_resumed_client_acknowledges_it() {
    let (faulty, running) = faulty_server(vec![chat::hub()]).await;
    let addr = running.local_addr();
    let hub = HubName::new("chat").expect("a name");
    let dora = UserId::new("dora").expect("a name");
    let path = negotiate_stateful(addr, "dora").await;
    let mut first = open_stateful(addr, &path).await;
    let mut sender = RawClient::connect(addr, "chat", "other").await;
    send_durable(&mut sender, "dora", "kept").await;
    assert_eq!(next_notification(&mut first).await, "kept");
    drop(first);

    // The resumed socket gets it again (sequence id 1); until the client acknowledges it, it
    // is still waiting in dora's inbox.
    let mut second = RawClient::open(addr, &path).await.expect("upgrade");
    second.send(br#"{"type":9,"sequenceId":1}"#).await;
    assert_eq!(
        next_non_ping(&mut second).await,
        json!({"type":9,"sequenceId":1})
    );
    assert_eq!(next_notification(&mut second).await, "kept");
    let waiting = running
        .node()
        .backplane()
        .pending(&hub, &dora)
        .await
        .expect("the inbox");
    assert_eq!(waiting.len(), 1, "acknowledged before the client said so");

    faulty.hold_after(Op::Acknowledge, true);
    second.send(br#"{"type":8,"sequenceId":1}"#).await;
    faulty
        .waiting_after(Op::Acknowledge, 1)
        .await
        .expect("the client's Ack acknowledges the message");
    faulty.hold_after(Op::Acknowledge, false);

    // Acknowledged: a later connection of dora's does not get it again.
    let mut later = RawClient::connect(addr, "chat", "dora").await;
    send_durable(&mut sender, "dora", "after").await;
    assert_eq!(next_notification(&mut later).await, "after");
    running.shutdown(Duration::from_secs(5)).await;
}

/// Two nodes on one backplane, each registering its listening address, with one token secret.
async fn two_nodes() -> (backplane_server::Running, backplane_server::Running) {
    let backplane = std::sync::Arc::new(backplane_core::MemoryBackplane::new());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = backplane_core::Node::start(backplane.clone(), NodeOptions::new())
            .await
            .expect("a node");
        let running = backplane_server::Server::new(node)
            .hub(chat::hub())
            .security(Security {
                allow_anonymous: true,
                token_secret: Some(b"one secret for every node".to_vec()),
                ..Security::default()
            })
            .advertise_listener()
            .bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("the server binds");
        nodes.push(running);
    }
    let b = nodes.pop().expect("two nodes");
    let a = nodes.pop().expect("two nodes");
    (a, b)
}

#[tokio::test]
async fn an_unspecified_listening_address_is_not_advertised() {
    let node = backplane_core::Node::start(
        std::sync::Arc::new(backplane_core::MemoryBackplane::new()),
        NodeOptions::new(),
    )
    .await
    .expect("a node");
    let err = backplane_server::Server::new(node.clone())
        .advertise_listener()
        .bind("0.0.0.0:0".parse().expect("an address"))
        .await
        .expect_err("0.0.0.0 names no host");
    assert!(err.to_string().contains("advertise a URL"), "{err}");
    assert_eq!(node.address(), None);
    node.shutdown().await;
}

#[tokio::test]
async fn a_resume_that_reaches_another_node_is_handed_to_the_holder() {
    let (a, b) = two_nodes().await;
    let path = negotiate_stateful(a.local_addr(), "roamer").await;
    let mut first = open_stateful(a.local_addr(), &path).await;
    let mut sender = RawClient::connect(b.local_addr(), "chat", "other").await;
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["one"]}"#)
        .await;
    assert_eq!(next_non_ping(&mut first).await["arguments"][1], "one");
    drop(first);
    sender
        .send(br#"{"type":1,"target":"SendMessage","arguments":["two"]}"#)
        .await;

    // The load balancer sends the resumed socket to the other node.
    let mut second = RawClient::open(b.local_addr(), &path)
        .await
        .expect("upgrade");
    second.send(br#"{"type":9,"sequenceId":1}"#).await;
    assert_eq!(
        next_non_ping(&mut second).await,
        json!({"type":9,"sequenceId":1})
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = next_non_ping(&mut second).await;
        if m["type"] == 1 {
            got.push(m["arguments"][1].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(got, ["one", "two"], "missed messages arrive once, in order");
    second
        .send(br#"{"type":1,"invocationId":"1","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    let done = loop {
        let m = next_non_ping(&mut second).await;
        if m["type"] == 3 {
            break m;
        }
    };
    let mut users: Vec<String> = serde_json::from_value(done["result"].clone()).expect("ids");
    users.sort();
    assert_eq!(users, ["other", "roamer"]);
    // The holder is still the first node: the connection did not move.
    assert_eq!(a.node().local_connection_count(), 1);

    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

/// Reads MessagePack messages (binary frames) until `done` says it has what it waits for.
async fn packed_messages(
    client: &mut RawClient,
    mut done: impl FnMut(&[HubMessage]) -> bool,
) -> Vec<HubMessage> {
    let mut buffer = RecordBuffer::new(Protocol::MessagePack);
    let mut messages = Vec::new();
    while !done(&messages) {
        let (binary, data) = client.receive_frame().await.expect("a frame");
        assert!(binary, "MessagePack travels in binary frames: {data:?}");
        for record in buffer.push(&data, 1 << 20).expect("framed") {
            messages.push(Protocol::MessagePack.parse(&record).expect("MessagePack"));
        }
    }
    messages
}

#[tokio::test]
async fn messagepack_and_json_clients_share_a_hub() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let mut jay = RawClient::connect(addr, "chat", "jay").await;
    let mut pam = RawClient::open(addr, "/hubs/chat?user=pam")
        .await
        .expect("the upgrade succeeds");

    // The handshake and the first message in one (binary: MessagePack is not UTF-8) frame.
    let mut first = br#"{"protocol":"messagepack","version":1}"#.to_vec();
    first.push(0x1e);
    first.extend(Protocol::MessagePack.encode(&HubMessage::Invocation {
        invocation_id: Some("1".into()),
        target: "SendMessage".into(),
        arguments: vec![json!("packed \u{1e} hello")],
        stream_ids: vec![],
    }));
    pam.send_binary(first).await;
    assert_eq!(
        pam.receive_frame().await,
        Some((false, b"{}\x1e".to_vec())),
        "the handshake answer is JSON text"
    );
    let messages = packed_messages(&mut pam, |m| m.len() >= 2).await;
    assert!(messages.contains(&HubMessage::Invocation {
        invocation_id: None,
        target: "ReceiveMessage".into(),
        arguments: vec![json!("pam"), json!("packed \u{1e} hello")],
        stream_ids: vec![],
    }));
    assert!(messages.contains(&HubMessage::Completion {
        invocation_id: "1".into(),
        outcome: Outcome::Void,
    }));
    let heard = jay.next_message().await.expect("a message");
    assert_eq!(heard["arguments"], json!(["pam", "packed \u{1e} hello"]));

    // JSON to MessagePack, and a result in MessagePack.
    jay.send(br#"{"type":1,"target":"SendMessage","arguments":["from json"]}"#)
        .await;
    let messages = packed_messages(&mut pam, |m| !m.is_empty()).await;
    assert_eq!(
        messages[0],
        HubMessage::Invocation {
            invocation_id: None,
            target: "ReceiveMessage".into(),
            arguments: vec![json!("jay"), json!("from json")],
            stream_ids: vec![],
        }
    );
    pam.send_binary(Protocol::MessagePack.encode(&HubMessage::Invocation {
        invocation_id: Some("2".into()),
        target: "GetOnlineUsers".into(),
        arguments: vec![],
        stream_ids: vec![],
    }))
    .await;
    let messages = packed_messages(&mut pam, |m| {
        m.iter().any(
            |m| matches!(m, HubMessage::Completion { invocation_id, .. } if invocation_id == "2"),
        )
    })
    .await;
    assert!(messages.contains(&HubMessage::Completion {
        invocation_id: "2".into(),
        outcome: Outcome::Result(json!(["jay", "pam"])),
    }));

    // Binary data has no JSON form: a clear protocol error, and the connection closes.
    let bin = vec![
        0x0b, 0x95, 0x01, 0x80, 0xc0, 0xa1, b'T', 0x91, 0xc4, 0x02, b'a', b'b',
    ];
    pam.send_binary(bin).await;
    let mut buffer = RecordBuffer::new(Protocol::MessagePack);
    let mut close = None;
    while let Some((_, data)) = pam.receive_frame().await {
        for record in buffer.push(&data, 1 << 20).expect("framed") {
            if let Ok(m @ HubMessage::Close { .. }) = Protocol::MessagePack.parse(&record) {
                close = Some(m);
            }
        }
    }
    match close {
        Some(HubMessage::Close {
            error: Some(error), ..
        }) => assert!(error.contains("no JSON form"), "{error}"),
        other => panic!("expected a close with an error, got {other:?}"),
    }
    running.shutdown(Duration::from_secs(5)).await;
}

/// Negotiate reads its query as ASP.NET Core does: keys in any case, `useStatefulReconnect`
/// as a boolean in any case, a version above the server's answered with the server's, and a
/// version it cannot use answered with `200` and an `error` property alone. Only `POST`
/// negotiates.
#[tokio::test]
async fn negotiate_reads_its_query_and_reports_errors_as_asp_net_core_does() {
    let running = server(vec![chat::hub()], limits()).await;
    let addr = running.local_addr();
    let negotiate = |query: &'static str| async move {
        let (status, body) = http(
            addr,
            "POST",
            &format!("/hubs/chat/negotiate?user=q&{query}"),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{query}: {body}");
        serde_json::from_str::<Value>(&body).expect("JSON")
    };

    let upper = negotiate("NegotiateVersion=1&UseStatefulReconnect=True").await;
    assert_eq!(upper["negotiateVersion"], 1, "{upper}");
    assert!(upper["connectionToken"].is_string(), "{upper}");
    assert_eq!(upper["useStatefulReconnect"], true, "{upper}");

    let newer = negotiate("negotiateVersion=7").await;
    assert_eq!(newer["negotiateVersion"], 1, "{newer}");
    assert!(newer.get("useStatefulReconnect").is_none(), "{newer}");

    let old_stateful = negotiate("useStatefulReconnect=true").await;
    assert_eq!(old_stateful["negotiateVersion"], 0, "{old_stateful}");
    assert_eq!(old_stateful["useStatefulReconnect"], true, "{old_stateful}");

    for (query, error) in [
        (
            "negotiateVersion=one",
            "The client requested a non-integer protocol version.",
        ),
        (
            "negotiateVersion=-1",
            "The client requested version '-1', but the server does not support this version.",
        ),
    ] {
        let answer = negotiate(query).await;
        assert_eq!(answer, json!({ "error": error }), "{query}");
    }

    let (status, body) = http(addr, "GET", "/hubs/chat/negotiate?user=q", &[]).await;
    assert_eq!(status, 405, "{body}");
    running.shutdown(Duration::from_secs(5)).await;
}

/// ASP.NET Core's protocols accept every handshake version up to their own, negative ones
/// included.
#[tokio::test]
async fn a_handshake_with_a_negative_version_is_accepted() {
    let running = server(vec![chat::hub()], limits()).await;
    let mut c = RawClient::open(running.local_addr(), "/hubs/chat?user=neg")
        .await
        .expect("the upgrade succeeds");
    c.send(br#"{"protocol":"json","version":-1}"#).await;
    assert_eq!(c.next_record().await.expect("an answer"), json!({}));
    c.send(br#"{"type":1,"invocationId":"1","target":"GetOnlineUsers","arguments":[]}"#)
        .await;
    let completion = c.next_message().await.expect("a completion");
    assert_eq!(completion["result"], json!(["neg"]), "{completion}");
    running.shutdown(Duration::from_secs(5)).await;
}
