//! The server API (`/api/v1`, the shape of Azure SignalR Service's REST API) on real sockets.

mod common;

use std::time::Duration;

use backplane_core::NodeOptions;
use backplane_server::{Limits, Security, api_token, chat};
use common::{RawClient, http, http_with_body, server_with};
use serde_json::{Value, json};

const KEY: &[u8] = b"server-key-server-key-server-key";

async fn api_server() -> backplane_server::Running {
    server_with(
        vec![chat::hub()],
        Limits::default(),
        Security {
            allow_anonymous: true,
            server_key: Some(KEY.to_vec()),
            ..Security::default()
        },
        NodeOptions::new(),
    )
    .await
}

/// The next invocation of `target`, skipping pings and other messages.
async fn next_call(c: &mut RawClient, target: &str) -> Value {
    loop {
        let m = c.next_message().await.expect("a message");
        if m["type"] == 1 && m["target"] == target {
            return m;
        }
    }
}

/// The connection id of `c`, as the server knows it (from the group members list).
async fn connection_id(
    addr: std::net::SocketAddr,
    auth: &str,
    c: &mut RawClient,
    tag: &str,
) -> String {
    c.send(
        format!(r#"{{"type":1,"invocationId":"j","target":"JoinGroup","arguments":["{tag}"]}}"#)
            .as_bytes(),
    )
    .await;
    let _ = next_call(c, "UserJoined").await;
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/v1/hubs/chat/groups/{tag}/connections"),
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = serde_json::from_str(&body).expect("a JSON list");
    assert_eq!(ids.len(), 1, "{body}");
    ids[0].clone()
}

#[tokio::test]
async fn sends_reach_their_targets() {
    let running = api_server().await;
    let addr = running.local_addr();
    let auth = format!("Bearer {}", api_token(KEY, Duration::from_secs(60)));
    let auth = auth.as_str();
    let mut alice = RawClient::connect(addr, "chat", "alice").await;
    let mut bob = RawClient::connect(addr, "chat", "bob").await;
    let body = r#"{"target":"Notice","arguments":["hi",1]}"#;

    let (status, text) = http_with_body(
        addr,
        "POST",
        "/api/v1/hubs/chat",
        &[("authorization", auth)],
        body,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(
        next_call(&mut alice, "Notice").await["arguments"],
        json!(["hi", 1])
    );
    assert_eq!(
        next_call(&mut bob, "Notice").await["arguments"],
        json!(["hi", 1])
    );

    let (status, _) = http_with_body(
        addr,
        "POST",
        "/api/v1/hubs/chat/users/bob",
        &[("authorization", auth)],
        r#"{"target":"ForBob","arguments":[]}"#,
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(next_call(&mut bob, "ForBob").await["target"], "ForBob");

    let bob_id = connection_id(addr, auth, &mut bob, "bobs").await;
    let (status, _) = http_with_body(
        addr,
        "POST",
        &format!("/api/v1/hubs/chat/connections/{bob_id}"),
        &[("authorization", auth)],
        r#"{"target":"Direct","arguments":[]}"#,
    )
    .await;
    assert_eq!(status, 202);
    let _ = next_call(&mut bob, "Direct").await;

    // Group membership through the API, then a group send that excludes nobody.
    let alice_id = connection_id(addr, auth, &mut alice, "alices").await;
    let (status, _) = http(
        addr,
        "PUT",
        &format!("/api/v1/hubs/chat/groups/team/connections/{alice_id}"),
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = http(
        addr,
        "PUT",
        "/api/v1/hubs/chat/groups/team/users/bob",
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200);
    let (_, members) = http(
        addr,
        "GET",
        "/api/v1/hubs/chat/groups/team/connections",
        &[("authorization", auth)],
    )
    .await;
    let mut members: Vec<String> = serde_json::from_str(&members).expect("JSON");
    members.sort();
    let mut expected = vec![alice_id.clone(), bob_id.clone()];
    expected.sort();
    assert_eq!(members, expected);
    let (status, _) = http_with_body(
        addr,
        "POST",
        &format!("/api/v1/hubs/chat/groups/team?excluded={alice_id}"),
        &[("authorization", auth)],
        r#"{"target":"Team","arguments":[]}"#,
    )
    .await;
    assert_eq!(status, 202);
    let _ = next_call(&mut bob, "Team").await;
    // Alice was excluded: a broadcast after it reaches her first.
    let (status, _) = http_with_body(
        addr,
        "POST",
        "/api/v1/hubs/chat",
        &[("authorization", auth)],
        r#"{"target":"Marker","arguments":[]}"#,
    )
    .await;
    assert_eq!(status, 202);
    loop {
        let m = alice.next_message().await.expect("a message");
        assert_ne!(
            m["target"], "Team",
            "an excluded connection received the group message"
        );
        if m["target"] == "Marker" {
            break;
        }
    }

    let (status, _) = http(
        addr,
        "DELETE",
        "/api/v1/hubs/chat/groups/team/users/bob",
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200);
    let (_, members) = http(
        addr,
        "GET",
        "/api/v1/hubs/chat/groups/team/connections",
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&members).expect("JSON"),
        vec![alice_id]
    );

    // Presence.
    let (status, _) = http(
        addr,
        "HEAD",
        "/api/v1/hubs/chat/users/bob",
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = http(
        addr,
        "HEAD",
        "/api/v1/hubs/chat/users/nobody",
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(
        addr,
        "HEAD",
        &format!("/api/v1/hubs/chat/connections/{bob_id}"),
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(status, 200);
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_durable_user_send_waits_for_the_user() {
    let running = api_server().await;
    let addr = running.local_addr();
    let auth = format!("Bearer {}", api_token(KEY, Duration::from_secs(60)));
    let (status, text) = http_with_body(
        addr,
        "POST",
        "/api/v1/hubs/chat/users/carol?ttl=1h",
        &[("authorization", &auth)],
        r#"{"target":"Later","arguments":["kept"]}"#,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let mut carol = RawClient::connect(addr, "chat", "carol").await;
    assert_eq!(
        next_call(&mut carol, "Later").await["arguments"],
        json!(["kept"])
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let running = api_server().await;
    let addr = running.local_addr();
    let auth = format!("Bearer {}", api_token(KEY, Duration::from_secs(60)));
    let other = format!(
        "Bearer {}",
        api_token(b"another-key", Duration::from_secs(60))
    );
    let body = r#"{"target":"X","arguments":[]}"#;
    for (method, path, headers, body, status) in [
        ("POST", "/api/v1/hubs/chat", vec![], body, 401),
        (
            "POST",
            "/api/v1/hubs/chat",
            vec![("authorization", other.as_str())],
            body,
            401,
        ),
        (
            "POST",
            "/api/v1/hubs/chat",
            vec![("authorization", "Bearer garbage")],
            body,
            401,
        ),
        (
            "POST",
            "/api/v1/hubs/nothing",
            vec![("authorization", auth.as_str())],
            body,
            404,
        ),
        (
            "POST",
            "/api/v1/hubs/chat",
            vec![("authorization", auth.as_str())],
            "{",
            400,
        ),
        (
            "POST",
            "/api/v1/hubs/chat",
            vec![("authorization", auth.as_str())],
            r#"{"arguments":[]}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/hubs/chat/groups/%27%3B%20DROP%20TABLE%20x%3B--",
            vec![("authorization", auth.as_str())],
            body,
            202,
        ),
        (
            "POST",
            "/api/v1/hubs/chat/users/bob?ttl=never",
            vec![("authorization", auth.as_str())],
            body,
            400,
        ),
        (
            "POST",
            "/api/v1/hubs/chat/connections/missing",
            vec![("authorization", auth.as_str())],
            body,
            404,
        ),
        (
            "PUT",
            "/api/v1/hubs/chat/groups/g/connections/missing",
            vec![("authorization", auth.as_str())],
            "",
            404,
        ),
        (
            "GET",
            "/api/v1/hubs/chat/nowhere",
            vec![("authorization", auth.as_str())],
            "",
            404,
        ),
    ] {
        let (got, text) = http_with_body(addr, method, path, &headers, body).await;
        assert_eq!(got, status, "{method} {path}: {text}");
    }
    let long = format!("/api/v1/hubs/chat/groups/{}", "g".repeat(300));
    let (got, text) = http_with_body(addr, "POST", &long, &[("authorization", &auth)], body).await;
    assert_eq!(got, 400, "{text}");
    assert!(text.contains("group"), "{text}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_api_is_off_without_a_server_key() {
    let running = common::server(vec![chat::hub()], Limits::default()).await;
    let auth = format!("Bearer {}", api_token(KEY, Duration::from_secs(60)));
    let (status, text) = http_with_body(
        running.local_addr(),
        "POST",
        "/api/v1/hubs/chat",
        &[("authorization", &auth)],
        r#"{"target":"X"}"#,
    )
    .await;
    assert_eq!(status, 404);
    assert!(text.contains("disabled"), "{text}");
    running.shutdown(Duration::from_secs(5)).await;
}
