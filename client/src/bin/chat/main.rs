//! `chat`: the console client of the reference chat hub.
//!
//! ```text
//! chat --url http://localhost:5000 --user ada
//! ```
//!
//! Without `--url` or `--user` it asks for them. Lines are read from standard input, so it can
//! be scripted: `printf '/join rust\n/group rust hi\n' | chat --url … --user ada`. Messages and
//! notices go to standard output, errors to standard error.

mod command;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use backplane_client::{
    ConnectionEvent, Error, HubConnection, HubConnectionBuilder, Protocol, ReconnectPolicy,
};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines, Stdin};

use command::{Command, HELP};

/// The console chat: talks to the chat hub of a backplane server (or any SignalR server with
/// the same hub).
#[derive(Debug, Parser)]
#[command(name = "chat", version)]
struct Args {
    /// The server URL; `/hubs/chat` is added when it has no path. Asked for when missing.
    #[arg(long, env = "CHAT_URL")]
    url: Option<String>,
    /// Your user name (sent as `?user=`, for servers that allow anonymous users). Asked for when
    /// missing and no token is given.
    #[arg(long, env = "CHAT_USER")]
    user: Option<String>,
    /// A bearer token (JWT) identifying you; the server takes your user name from it.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The hub protocol.
    #[arg(long, value_enum, default_value_t = Wire::Json, env = "CHAT_PROTOCOL")]
    protocol: Wire,
}

/// The hub protocols `--protocol` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Wire {
    /// JSON text frames.
    Json,
    /// MessagePack binary frames.
    Messagepack,
}

/// The default server.
const DEFAULT_URL: &str = "http://localhost:5000";

/// `HH:MM:SS` in UTC.
fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3600, day % 3600 / 60, day % 60)
}

/// Prints a line of chat output with its time.
fn show(line: &str) {
    println!("[{}] {line}", now());
}

/// Prints an error.
fn complain(line: &str) {
    eprintln!("[{}] error: {line}", now());
}

fn text(args: &[Value], i: usize) -> String {
    match args.get(i) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The hub URL: the server URL, with `/hubs/chat` when it has no path, and `user=` when the
/// user is named without a token.
fn hub_url(server: &str, user: Option<&str>) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base.trim_end_matches('/'), Some(query)),
        None => (server.trim_end_matches('/'), None),
    };
    let has_path = base
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    let mut url = if has_path {
        base.to_owned()
    } else {
        format!("{base}/hubs/chat")
    };
    let mut params: Vec<String> = query.into_iter().map(str::to_owned).collect();
    if let Some(user) = user {
        params.push(
            form_urlencoded::Serializer::new(String::new())
                .append_pair("user", user)
                .finish(),
        );
    }
    if !params.is_empty() {
        url.push('?');
        url.push_str(&params.join("&"));
    }
    url
}

/// Asks a question on standard output and reads the answer; `None` at the end of input.
async fn ask(
    lines: &mut Lines<BufReader<Stdin>>,
    question: &str,
) -> std::io::Result<Option<String>> {
    let mut out = tokio::io::stdout();
    out.write_all(question.as_bytes()).await?;
    out.flush().await?;
    Ok(lines.next_line().await?.map(|l| l.trim().to_owned()))
}

fn subscribe(connection: &HubConnection) {
    connection.on("ReceiveMessage", |args| {
        show(&format!("{}: {}", text(args, 0), text(args, 1)));
    });
    connection.on("ReceiveGroupMessage", |args| {
        show(&format!(
            "[{}] {}: {}",
            text(args, 0),
            text(args, 1),
            text(args, 2)
        ));
    });
    connection.on("ReceiveNotification", |args| {
        show(&format!("(direct) {}: {}", text(args, 0), text(args, 1)));
    });
    connection.on("UserJoined", |args| {
        show(&format!("* {} joined {}", text(args, 1), text(args, 0)));
    });
    connection.on("UserLeft", |args| {
        show(&format!("* {} left {}", text(args, 1), text(args, 0)));
    });
    connection.on_invoke("Ask", |args| async move {
        show(&format!("? {} asks: {}", text(&args, 0), text(&args, 1)));
        Err("the console chat does not answer questions".to_owned())
    });
}

/// Watches the connection's life: says when it is lost, re-joins the groups after a reconnect,
/// and says so.
fn watch_events(connection: &HubConnection, groups: Arc<Mutex<BTreeSet<String>>>) {
    let mut events = connection.events();
    let connection = connection.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                ConnectionEvent::Reconnecting { error } => {
                    show(&format!("! connection lost ({error}); reconnecting…"));
                }
                ConnectionEvent::Reconnected { .. } => {
                    let wanted: Vec<String> = groups
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned()
                        .collect();
                    let mut rejoined = Vec::new();
                    for group in wanted {
                        match connection.invoke("JoinGroup", vec![json!(group)]).await {
                            Ok(_) => rejoined.push(group),
                            Err(err) => complain(&format!("re-joining {group} failed: {err}")),
                        }
                    }
                    if rejoined.is_empty() {
                        show("! reconnected");
                    } else {
                        show(&format!("! reconnected; re-joined {}", rejoined.join(", ")));
                    }
                }
                ConnectionEvent::Closed { error } => {
                    if let Some(error) = error {
                        show(&format!("! disconnected: {error}"));
                        std::process::exit(1);
                    }
                    return;
                }
            }
        }
    });
}

/// Runs one command; `false` to quit.
async fn run(
    connection: &HubConnection,
    groups: &Mutex<BTreeSet<String>>,
    command: Command,
) -> bool {
    let call = |method: &'static str, args: Vec<Value>| connection.invoke(method, args);
    let outcome = match command {
        Command::Nothing => Ok(()),
        Command::Help => {
            println!("{HELP}");
            Ok(())
        }
        Command::Quit => return false,
        Command::Say(message) => call("SendMessage", vec![json!(message)]).await.map(drop),
        Command::Join(group) => {
            let joined = call("JoinGroup", vec![json!(group)]).await.map(drop);
            // A join whose answer was lost with the connection may have happened: it is
            // re-joined after the reconnect, like the groups joined before.
            if matches!(joined, Ok(()) | Err(Error::ConnectionLost(_))) {
                groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(group);
            }
            joined
        }
        Command::Leave(group) => {
            let left = call("LeaveGroup", vec![json!(group)]).await.map(drop);
            if left.is_ok() {
                groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&group);
                show(&format!("* you left {group}"));
            }
            left
        }
        Command::Group(group, message) => call("SendToGroup", vec![json!(group), json!(message)])
            .await
            .map(drop),
        Command::Direct(user, message) => {
            let sent = call("SendToUser", vec![json!(user), json!(message)])
                .await
                .map(drop);
            if sent.is_ok() {
                show(&format!("(to {user}) {message}"));
            }
            sent
        }
        Command::Who => match connection
            .invoke_as::<Vec<String>>("GetOnlineUsers", vec![])
            .await
        {
            Ok(users) if users.is_empty() => {
                show("online: nobody");
                Ok(())
            }
            Ok(users) => {
                show(&format!("online: {}", users.join(", ")));
                Ok(())
            }
            Err(err) => Err(err),
        },
    };
    if let Err(err) = outcome {
        complain(&err.to_string());
    }
    true
}

async fn main_inner() -> Result<(), String> {
    let args = Args::parse();
    let stdin = BufReader::new(tokio::io::stdin());
    let mut lines = stdin.lines();
    let io = |e: std::io::Error| format!("reading standard input failed: {e}");
    let server = match args.url {
        Some(url) => url,
        None => match ask(&mut lines, &format!("Server URL [{DEFAULT_URL}]: "))
            .await
            .map_err(io)?
        {
            Some(url) if !url.is_empty() => url,
            _ => DEFAULT_URL.to_owned(),
        },
    };
    let user = match (args.user, &args.token) {
        (Some(user), _) => Some(user),
        (None, Some(_)) => None,
        (None, None) => loop {
            match ask(&mut lines, "User name: ").await.map_err(io)? {
                Some(user) if !user.is_empty() => break Some(user),
                Some(_) => continue,
                None => return Err("no user name given (use --user or --token)".into()),
            }
        },
    };
    // With a token, the server takes the user from it.
    let url = hub_url(&server, user.as_deref().filter(|_| args.token.is_none()));
    let protocol = match args.protocol {
        Wire::Json => Protocol::Json,
        Wire::Messagepack => Protocol::MessagePack,
    };
    let mut builder = HubConnectionBuilder::new(url.clone())
        .protocol(protocol)
        .stateful_reconnect(true)
        .reconnect(ReconnectPolicy::default());
    if let Some(token) = args.token {
        builder = builder.access_token(token);
    }
    let connection = builder.build().map_err(|e| e.to_string())?;
    subscribe(&connection);
    let groups = Arc::new(Mutex::new(BTreeSet::new()));
    watch_events(&connection, groups.clone());
    connection
        .start()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    show(&format!(
        "connected to {server} as {}; type /help for commands",
        user.as_deref().unwrap_or("the token's user")
    ));

    loop {
        let line = tokio::select! {
            line = lines.next_line() => line.map_err(io)?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        match command::parse(&line) {
            Ok(command) => {
                if !run(&connection, &groups, command).await {
                    break;
                }
            }
            Err(err) => complain(&err),
        }
    }
    connection.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(err) = main_inner().await {
        complain(&err);
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_hub_url() {
        assert_eq!(
            hub_url("http://localhost:5000", Some("ada")),
            "http://localhost:5000/hubs/chat?user=ada"
        );
        assert_eq!(
            hub_url("http://localhost:5000/", None),
            "http://localhost:5000/hubs/chat"
        );
        assert_eq!(
            hub_url("https://chat.example/hubs/other?x=1", Some("a b&c")),
            "https://chat.example/hubs/other?x=1&user=a+b%26c"
        );
    }

    #[test]
    fn times_look_like_clocks() {
        let t = now();
        assert_eq!(t.len(), 8, "{t}");
        assert_eq!(&t[2..3], ":");
    }
}
