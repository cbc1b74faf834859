//! The `chat` binary, driven through piped standard input, against two server nodes sharing one
//! PostgreSQL: broadcast, groups, a direct message to an offline user, `/who`, errors, and
//! reconnection after a node restarts.
//!
//! Uses `BACKPLANE_TEST_PG_URL` when set, otherwise a throwaway cluster.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use backplane_core::{Node, NodeOptions};
use backplane_postgres::PgBackplane;
use backplane_server::{Running, Security, Server, chat};
use backplane_test_support::test_database_url;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// A database URL with a schema of its own.
async fn database(schema: &str) -> String {
    test_database_url(schema)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for these tests: {e}"))
}

/// A server node with the chat hub, on the shared database.
async fn node(database: &str, addr: SocketAddr) -> Running {
    let backplane = PgBackplane::connect(database)
        .await
        .expect("the backplane connects");
    let node = Node::start(Arc::new(backplane), NodeOptions::new())
        .await
        .expect("a node");
    Server::new(node)
        .hub(chat::hub())
        .security(Security {
            allow_anonymous: true,
            ..Security::default()
        })
        .bind(addr)
        .await
        .expect("the server binds")
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("an address")
}

/// A running `chat` process.
struct Chat {
    name: String,
    child: Child,
    stdin: ChildStdin,
    out: mpsc::UnboundedReceiver<String>,
    err: mpsc::UnboundedReceiver<String>,
    /// Lines already read, for failure messages.
    seen: Vec<String>,
    seen_errors: Vec<String>,
}

/// Reads `lines` until one contains `needle`, keeping them in `seen`; what was seen if none
/// does in time.
async fn wait_for_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
) -> Result<String, String> {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => Ok(line),
        _ => Err(seen.join("\n")),
    }
}

impl Chat {
    fn spawn(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(args)
            .env_remove("CHAT_URL")
            .env_remove("CHAT_USER")
            .env_remove("CHAT_TOKEN")
            .env_remove("CHAT_PROTOCOL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the chat binary starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let forward = |reader: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut lines = BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let out = forward(Box::new(child.stdout.take().expect("piped stdout")));
        let err = forward(Box::new(child.stderr.take().expect("piped stderr")));
        Self {
            name: name.to_owned(),
            child,
            stdin,
            out,
            err,
            seen: Vec::new(),
            seen_errors: Vec::new(),
        }
    }

    /// Starts `chat --url … --user …`.
    fn join(addr: SocketAddr, user: &str) -> Self {
        Self::spawn(user, &["--url", &format!("http://{addr}"), "--user", user])
    }

    async fn type_line(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("stdin is open");
        self.stdin.flush().await.expect("flushed");
    }

    /// Waits for an output line containing `needle`; earlier lines are skipped.
    async fn expect(&mut self, needle: &str) -> String {
        match wait_for_line(&mut self.out, &mut self.seen, needle).await {
            Ok(line) => line,
            Err(printed) => {
                while let Ok(line) = self.err.try_recv() {
                    self.seen_errors.push(line);
                }
                panic!(
                    "{} never printed '{needle}'; it printed:\n{printed}\nand reported:\n{}",
                    self.name,
                    self.seen_errors.join("\n")
                )
            }
        }
    }

    /// Waits for an error line containing `needle`.
    async fn expect_error(&mut self, needle: &str) -> String {
        match wait_for_line(&mut self.err, &mut self.seen_errors, needle).await {
            Ok(line) => line,
            Err(reported) => panic!(
                "{} never reported '{needle}'; it reported:\n{reported}",
                self.name
            ),
        }
    }

    /// Sends `/quit` and waits for a clean exit.
    async fn quit(mut self) {
        self.type_line("/quit").await;
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the chat exits in time")
            .expect("an exit status");
        assert!(status.success(), "{} exited with {status}", self.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chats_on_two_nodes() {
    let db = database("chat_two_nodes").await;
    let a = node(&db, any_port()).await;
    let b = node(&db, any_port()).await;

    let mut alice = Chat::join(a.local_addr(), "alice");
    // Bob speaks MessagePack; the hub carries messages between the protocols.
    let mut bob = Chat::spawn(
        "bob",
        &[
            "--url",
            &format!("http://{}", b.local_addr()),
            "--user",
            "bob",
            "--protocol",
            "messagepack",
        ],
    );
    alice.expect("connected to").await;
    bob.expect("connected to").await;

    // Broadcast, across nodes.
    alice.type_line("hello everyone").await;
    bob.expect("alice: hello everyone").await;
    alice.expect("alice: hello everyone").await;

    // Groups: joins are announced to the group, messages reach its members only.
    alice.type_line("/join rust").await;
    alice.expect("* alice joined rust").await;
    bob.type_line("/join rust").await;
    alice.expect("* bob joined rust").await;
    bob.type_line("/group rust hi rustaceans").await;
    alice.expect("[rust] bob: hi rustaceans").await;
    bob.expect("[rust] bob: hi rustaceans").await;

    // Presence across nodes.
    alice.type_line("/who").await;
    let online = alice.expect("online:").await;
    assert!(
        online.contains("alice") && online.contains("bob"),
        "{online}"
    );

    // A direct message to a user who is offline, received when they connect (on the other
    // node), after the URL and name are asked for on standard input.
    alice.type_line("/msg carol see you later").await;
    alice.expect("(to carol) see you later").await;
    let mut carol = Chat::spawn("carol", &[]);
    carol.type_line(&format!("http://{}", b.local_addr())).await;
    carol.type_line("carol").await;
    carol.expect("(direct) alice: see you later").await;

    // Leaving a group stops its messages; the sentinel shows later messages still flow.
    bob.type_line("/leave rust").await;
    bob.expect("* you left rust").await;
    alice.expect("* bob left rust").await;
    alice.type_line("/group rust only me now").await;
    alice.expect("[rust] alice: only me now").await;
    alice.type_line("after the group message").await;
    let next = bob.expect("alice: ").await;
    assert!(
        next.contains("alice: after the group message"),
        "bob got a group message after leaving: {next}"
    );

    // Mistakes get clear errors, and the chat goes on.
    alice.type_line("/dance").await;
    alice.expect_error("unknown command /dance").await;
    alice.type_line("/group rust").await;
    alice
        .expect_error("missing argument: /group <group> <message>")
        .await;
    alice.type_line("/join a b").await;
    alice.expect_error("too many arguments").await;
    alice.type_line("/help").await;
    alice.expect("/msg <user> <message>").await;

    alice.quit().await;
    bob.quit().await;
    carol.quit().await;
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_reconnects_and_rejoins_when_its_node_restarts() {
    let db = database("chat_restart").await;
    let a = node(&db, any_port()).await;
    let b = node(&db, any_port()).await;
    let b_addr = b.local_addr();

    let mut alice = Chat::join(b_addr, "alice");
    let mut bob = Chat::join(a.local_addr(), "bob");
    alice.expect("connected to").await;
    bob.expect("connected to").await;
    alice.type_line("/join ops").await;
    alice.expect("* alice joined ops").await;

    b.shutdown(Duration::from_secs(1)).await;
    alice.expect("! connection lost").await;

    let b = node(&db, b_addr).await;
    alice.expect("! reconnected; re-joined ops").await;

    // The re-joined group works across nodes again.
    bob.type_line("/group ops are you back?").await;
    alice.expect("[ops] bob: are you back?").await;
    alice.type_line("back on the restarted node").await;
    bob.expect("alice: back on the restarted node").await;

    alice.quit().await;
    bob.quit().await;
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_chat_without_a_server_says_so() {
    let mut chat = Chat::spawn("nobody", &["--url", "http://127.0.0.1:1", "--user", "x"]);
    chat.expect_error("cannot connect to http://127.0.0.1:1/hubs/chat")
        .await;
    let status = tokio::time::timeout(WAIT, chat.child.wait())
        .await
        .expect("exits in time")
        .expect("a status");
    assert_eq!(status.code(), Some(1));
}
