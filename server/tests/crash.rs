//! A node process killed with SIGKILL, with the default presence settings (heartbeat 5 s, node
//! timeout 15 s, reap every 5 s): within 30 s the other node no longer lists its user as
//! online, and a direct message sent to that user meanwhile arrives once when the user
//! connects again, to the surviving node.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backplane_test_support::test_database_url;
use common::RawClient;
use serde_json::{Value, json};

/// Presence must be right within this after a crash.
const PRESENCE_BOUND: Duration = Duration::from_secs(30);

/// A `backplane-server` process on `url`, killed when dropped.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    /// Starts the binary and waits for the line that says where it listens.
    fn start(url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
            .args([
                "--backplane",
                url,
                "--allow-anonymous",
                "--listen",
                "127.0.0.1:0",
            ])
            .env_remove("BACKPLANE_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server starts");
        let stdout = child.stdout.take().expect("a stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints where it listens");
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Invokes `target` and returns the completion's result.
async fn invoke(client: &mut RawClient, id: &str, target: &str, arguments: Value) -> Value {
    let invocation =
        json!({"type": 1, "invocationId": id, "target": target, "arguments": arguments});
    client.send(invocation.to_string().as_bytes()).await;
    loop {
        let message = client
            .next_message()
            .await
            .expect("the connection stays open");
        if message["type"] == 3 && message["invocationId"] == id {
            assert!(message.get("error").is_none(), "{target} failed: {message}");
            return message["result"].clone();
        }
    }
}

async fn online(client: &mut RawClient, id: &str) -> Vec<String> {
    let users = invoke(client, id, "GetOnlineUsers", json!([])).await;
    serde_json::from_value(users).expect("a list of user ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_goes_offline_and_its_user_gets_what_was_sent_meanwhile_once() {
    let url = test_database_url(&format!("crash_{}", std::process::id()))
        .await
        .expect("PostgreSQL is needed for this test");
    let (doomed, survivor) =
        tokio::task::spawn_blocking(move || (Process::start(&url), Process::start(&url)))
            .await
            .expect("both servers start");

    let victim = RawClient::connect(doomed.addr, "chat", "vic").await;
    let mut watcher = RawClient::connect(survivor.addr, "chat", "wat").await;
    let users = online(&mut watcher, "online-before").await;
    assert!(users.contains(&"vic".to_owned()), "{users:?}");

    let mut doomed = doomed;
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("the process ends");
    let killed = tokio::time::Instant::now();
    drop(victim);

    // Sent while the dead node is still listed, or after: stored either way.
    invoke(
        &mut watcher,
        "direct",
        "SendToUser",
        json!(["vic", "while you were away"]),
    )
    .await;

    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut round = 0;
    loop {
        poll.tick().await;
        round += 1;
        let users = online(&mut watcher, &format!("online-{round}")).await;
        if !users.contains(&"vic".to_owned()) {
            break;
        }
        assert!(
            killed.elapsed() < PRESENCE_BOUND,
            "vic is still online {:?} after their node was killed",
            killed.elapsed()
        );
    }
    println!("presence was right {:?} after the crash", killed.elapsed());

    let mut back = RawClient::connect(survivor.addr, "chat", "vic").await;
    invoke(
        &mut watcher,
        "marker",
        "SendToUser",
        json!(["vic", "marker"]),
    )
    .await;
    let mut received = Vec::new();
    while !(received.contains(&"marker".to_owned())
        && received.contains(&"while you were away".to_owned()))
    {
        received.extend(notification(&mut back).await);
    }
    // One more round trip: a second copy would have come before its answer.
    let ask =
        json!({"type": 1, "invocationId": "last", "target": "GetOnlineUsers", "arguments": []});
    back.send(ask.to_string().as_bytes()).await;
    loop {
        let message = back
            .next_message()
            .await
            .expect("the connection stays open");
        if message["type"] == 3 {
            break;
        }
        received.extend(text_of(&message));
    }
    received.sort();
    assert_eq!(received, ["marker", "while you were away"], "each once");
}

/// The text of a `ReceiveNotification`, if `message` is one.
fn text_of(message: &Value) -> Option<String> {
    (message["target"] == "ReceiveNotification").then(|| {
        message["arguments"][1]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
}

/// The next message's notification text, if it is one.
async fn notification(client: &mut RawClient) -> Option<String> {
    let message = client
        .next_message()
        .await
        .expect("the connection stays open");
    text_of(&message)
}
