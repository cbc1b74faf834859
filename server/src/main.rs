//! `backplane-server`: the reference chat server on any backplane.
//!
//! Settings come from flags, then `BACKPLANE_*` environment variables, then an optional TOML
//! file (`--config`), then defaults. Bad configuration fails at start with one line and exit
//! code 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use backplane_core::{NodeId, NodeOptions};
use backplane_server::{Limits, Security, Server, chat};
use clap::{Parser, Subcommand};
use serde::Deserialize;

/// Parses durations such as `15s`, `500ms` or `2m`.
fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("'{value}': {e}"))
}

/// The reference backplane server: SignalR hubs over WebSockets, scaled out over a database.
#[derive(Debug, Parser)]
#[command(name = "backplane-server", version)]
struct Args {
    /// A tool instead of the server.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// A TOML file with any of the settings below (keys as the flags, without dashes
    /// prefix: `listen = "0.0.0.0:5000"`).
    #[arg(long, env = "BACKPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// The address to listen on [default: 127.0.0.1:5000].
    #[arg(long, env = "BACKPLANE_LISTEN")]
    listen: Option<SocketAddr>,
    #[arg(long, env = "BACKPLANE_URL", help = backplane_help())]
    backplane: Option<String>,
    /// This node's id [default: random].
    #[arg(long, env = "BACKPLANE_NODE_ID")]
    node_id: Option<String>,
    /// Where the other nodes reach this one (`http://host:port`): a stateful client whose
    /// resumed socket lands on another node is handed over to this one. Without it, such a
    /// client starts a new connection.
    #[arg(long, env = "BACKPLANE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// The HS256 secret of user access tokens (`sub` is the user id).
    #[arg(long, env = "BACKPLANE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Signs connection tokens; give every node the same one [default: the JWT secret].
    #[arg(long, env = "BACKPLANE_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Signs the tokens of the server API for back-end services (`/api/v1/...`); without it
    /// the API is off.
    #[arg(long, env = "BACKPLANE_SERVER_KEY", hide_env_values = true)]
    server_key: Option<String>,
    /// Development mode: clients connect without a token, as the user in `?user=`.
    #[arg(long, env = "BACKPLANE_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// Browser origins allowed to connect (repeat, or comma-separated; `*` for any).
    #[arg(
        long = "cors-origin",
        env = "BACKPLANE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// How often idle clients are pinged [default: 15s].
    #[arg(long, env = "BACKPLANE_KEEP_ALIVE", value_parser = duration)]
    keep_alive: Option<Duration>,
    /// How long a silent client is kept [default: 30s].
    #[arg(long, env = "BACKPLANE_CLIENT_TIMEOUT", value_parser = duration)]
    client_timeout: Option<Duration>,
    /// How long a new connection has for its handshake [default: 15s].
    #[arg(long, env = "BACKPLANE_HANDSHAKE_TIMEOUT", value_parser = duration)]
    handshake_timeout: Option<Duration>,
    /// The largest message a client may send, in bytes [default: 1048576].
    #[arg(long, env = "BACKPLANE_MAX_MESSAGE_SIZE")]
    max_message_size: Option<usize>,
    /// Invocations per second per connection, bursts of twice as many; faster clients are
    /// slowed, and closed once over the limit for a whole client timeout (0: no limit)
    /// [default: 100].
    #[arg(long, env = "BACKPLANE_INVOCATIONS_PER_SECOND")]
    invocations_per_second: Option<u32>,
    /// The most groups one connection may join [default: 1000].
    #[arg(long, env = "BACKPLANE_MAX_GROUPS_PER_CONNECTION")]
    max_groups_per_connection: Option<usize>,
    /// The most connections this node accepts [default: 100000].
    #[arg(long, env = "BACKPLANE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Messages that may wait for one connection; a client further behind is closed as a slow
    /// consumer [default: 1024].
    #[arg(long, env = "BACKPLANE_CONNECTION_BUFFER")]
    connection_buffer: Option<usize>,
    /// How often this node writes its heartbeat [default: 5s].
    #[arg(long, env = "BACKPLANE_HEARTBEAT_INTERVAL", value_parser = duration)]
    heartbeat_interval: Option<Duration>,
    /// How long a node may miss heartbeats before others reap it [default: 15s].
    #[arg(long, env = "BACKPLANE_NODE_TIMEOUT", value_parser = duration)]
    node_timeout: Option<Duration>,
    /// How often this node looks for dead nodes to reap [default: 5s].
    #[arg(long, env = "BACKPLANE_REAP_INTERVAL", value_parser = duration)]
    reap_interval: Option<Duration>,
    /// Print the SQL that creates the backplane's schema (for a DBA, with
    /// `create_schema=false` in the URL) and exit; with `tables_per_hub=true`, the shared
    /// tables and those of every hub this server serves.
    #[arg(long)]
    print_ddl: bool,
    /// How often expired messages and old log entries are cleaned up [default: 15m].
    #[arg(long, env = "BACKPLANE_CLEANUP_INTERVAL", value_parser = duration)]
    cleanup_interval: Option<Duration>,
}

/// Tools beside the server.
#[derive(Debug, Subcommand)]
enum Tool {
    /// Prints a user access token signed with the JWT secret (`--jwt-secret` or
    /// `BACKPLANE_JWT_SECRET`), for development: `chat --token "$(backplane-server token
    /// --user ada)"`.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// How long the token is valid.
        #[arg(long, value_parser = duration, default_value = "24h")]
        ttl: Duration,
    },
}

/// The drivers built into this binary, with their URL forms, for `--help`.
fn backplane_help() -> String {
    format!(
        "The backplane [default: memory://]. {}",
        backplane_drivers::help()
    )
}

/// The same settings, from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<SocketAddr>,
    backplane: Option<String>,
    node_id: Option<String>,
    advertise_url: Option<String>,
    jwt_secret: Option<String>,
    token_secret: Option<String>,
    server_key: Option<String>,
    allow_anonymous: Option<bool>,
    /// Named as the flag; the plural is accepted too.
    #[serde(alias = "cors-origins")]
    cors_origin: Option<Vec<String>>,
    keep_alive: Option<String>,
    client_timeout: Option<String>,
    handshake_timeout: Option<String>,
    max_message_size: Option<usize>,
    invocations_per_second: Option<u32>,
    max_groups_per_connection: Option<usize>,
    max_connections: Option<usize>,
    connection_buffer: Option<usize>,
    heartbeat_interval: Option<String>,
    node_timeout: Option<String>,
    reap_interval: Option<String>,
    cleanup_interval: Option<String>,
}

/// Everything resolved.
#[derive(Debug)]
struct Config {
    listen: SocketAddr,
    backplane: String,
    node: NodeOptions,
    advertise_url: Option<String>,
    limits: Limits,
    security: Security,
}

fn file_duration(value: Option<String>, key: &str) -> Result<Option<Duration>, String> {
    value
        .map(|v| duration(&v).map_err(|e| format!("{key} in the config file: {e}")))
        .transpose()
}

fn resolve(args: Args) -> Result<Config, String> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| format!("invalid config file {}: {}", path.display(), e.message()))?
        }
        None => FileConfig::default(),
    };
    let defaults = Limits::default();
    let limits = Limits {
        keep_alive: args
            .keep_alive
            .or(file_duration(file.keep_alive, "keep-alive")?)
            .unwrap_or(defaults.keep_alive),
        client_timeout: args
            .client_timeout
            .or(file_duration(file.client_timeout, "client-timeout")?)
            .unwrap_or(defaults.client_timeout),
        handshake_timeout: args
            .handshake_timeout
            .or(file_duration(file.handshake_timeout, "handshake-timeout")?)
            .unwrap_or(defaults.handshake_timeout),
        max_message_size: args
            .max_message_size
            .or(file.max_message_size)
            .unwrap_or(defaults.max_message_size),
        invocations_per_second: args
            .invocations_per_second
            .or(file.invocations_per_second)
            .unwrap_or(defaults.invocations_per_second),
        max_groups_per_connection: args
            .max_groups_per_connection
            .or(file.max_groups_per_connection)
            .unwrap_or(defaults.max_groups_per_connection),
    };
    if limits.keep_alive.is_zero() || limits.client_timeout <= limits.keep_alive {
        return Err(format!(
            "client-timeout ({:?}) must be longer than keep-alive ({:?})",
            limits.client_timeout, limits.keep_alive
        ));
    }
    let mut node = NodeOptions::new().max_payload(limits.max_message_size);
    if let Some(id) = args.node_id.or(file.node_id) {
        node = node.id(NodeId::new(id).map_err(|e| format!("invalid node-id: {e}"))?);
    }
    if let Some(max) = args.max_connections.or(file.max_connections) {
        node = node.max_connections(max);
    }
    if let Some(capacity) = args.connection_buffer.or(file.connection_buffer) {
        node = node.connection_buffer(capacity);
    }
    if let Some(d) = args.heartbeat_interval.or(file_duration(
        file.heartbeat_interval,
        "heartbeat-interval",
    )?) {
        node = node.heartbeat_interval(d);
    }
    if let Some(d) = args
        .node_timeout
        .or(file_duration(file.node_timeout, "node-timeout")?)
    {
        node = node.connection_timeout(d);
    }
    if let Some(d) = args
        .reap_interval
        .or(file_duration(file.reap_interval, "reap-interval")?)
    {
        node = node.reap_interval(d);
    }
    if let Some(d) = args
        .cleanup_interval
        .or(file_duration(file.cleanup_interval, "cleanup-interval")?)
    {
        node = node.cleanup_interval(d);
    }
    let advertise_url = args
        .advertise_url
        .or(file.advertise_url)
        .map(|url| advertise_url(&url).map(|()| url))
        .transpose()?;
    let allow_anonymous = args.allow_anonymous || file.allow_anonymous.unwrap_or(false);
    let jwt_secret = args.jwt_secret.or(file.jwt_secret);
    if jwt_secret.is_none() && !allow_anonymous {
        return Err(
            "no way to authenticate clients: set --jwt-secret (BACKPLANE_JWT_SECRET) or, for development, --allow-anonymous".into(),
        );
    }
    let cors_origins = if args.cors_origins.is_empty() {
        file.cors_origin.unwrap_or_default()
    } else {
        args.cors_origins
    };
    Ok(Config {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5000))),
        backplane: args
            .backplane
            .or(file.backplane)
            .unwrap_or_else(|| "memory://".into()),
        node,
        advertise_url,
        limits,
        security: Security {
            jwt_secret: jwt_secret.map(String::into_bytes),
            token_secret: args
                .token_secret
                .or(file.token_secret)
                .map(String::into_bytes),
            allow_anonymous,
            cors_origins,
            server_key: args.server_key.or(file.server_key).map(String::into_bytes),
        },
    })
}

/// Checks an advertised URL: `http://`, a host, and nothing after the port (nodes relay to it
/// over plain HTTP, inside the cluster).
fn advertise_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| format!("invalid advertise-url '{url}': {why}");
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("nodes reach each other over http://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("a base URL has no path"));
    }
    Ok(())
}

async fn run(config: Config) -> Result<(), String> {
    if config.security.allow_anonymous {
        tracing::warn!(
            "anonymous mode: clients choose their own user id with ?user=; do not use in production"
        );
    }
    raise_fd_limit();
    let backplane = backplane_drivers::connect(&config.backplane)
        .await
        .map_err(|e| e.to_string())?;
    let node = backplane_core::Node::start(backplane, config.node)
        .await
        .map_err(|e| format!("cannot start the node: {e}"))?;
    let mut server = Server::new(node.clone())
        .hub(chat::hub())
        .limits(config.limits)
        .security(config.security);
    if let Some(url) = config.advertise_url {
        server = server.advertise(url);
    }
    let running = server
        .bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(address = %running.local_addr(), node = %node.id(), backplane = node.backplane().driver_name(), "listening");
    println!(
        "backplane-server listening on http://{}",
        running.local_addr()
    );
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Raises the open-files soft limit to the hard limit, and logs the capacity that gives.
fn raise_fd_limit() {
    #[cfg(target_os = "linux")]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => tracing::info!(
                open_files = limit,
                "open-files limit raised: room for about {} connections",
                limit.saturating_sub(64)
            ),
            Err(err) => tracing::warn!(%err, "could not raise the open-files limit"),
        }
    }
}

/// The DDL of the backplane named by `url`, for the hubs this server serves.
fn ddl(url: &str) -> Result<String, String> {
    backplane_drivers::ddl(url, &[chat::hub().name().clone()]).map_err(|e| e.to_string())
}

/// `backplane-server token`: a user token signed with the configured JWT secret.
fn token(args: &Args, user: &str, ttl: Duration) -> Result<String, String> {
    let user = backplane_core::UserId::new(user).map_err(|e| format!("invalid --user: {e}"))?;
    let secret = match (&args.jwt_secret, &args.config) {
        (Some(secret), _) => Some(secret.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| format!("invalid config file {}: {}", path.display(), e.message()))?
                .jwt_secret
        }
        (None, None) => None,
    };
    let secret = secret.filter(|s| !s.is_empty()).ok_or(
        "no JWT secret: give the server's --jwt-secret (or BACKPLANE_JWT_SECRET, or jwt-secret in --config)",
    )?;
    Ok(backplane_server::user_token(
        secret.as_bytes(),
        user.as_str(),
        ttl,
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Tool::Token { user, ttl }) = &args.tool {
        return match token(&args, user, *ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        };
    }
    if args.print_ddl {
        let url = args.backplane.clone().unwrap_or_else(|| "memory://".into());
        return match ddl(&url) {
            Ok(sql) => {
                println!("{sql}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match resolve(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_flag_is_a_config_file_key() {
        // serde names the keys it knows when it meets one it does not.
        let err = toml::from_str::<FileConfig>("no-such-key = 1")
            .expect_err("an unknown key is refused")
            .message()
            .to_owned();
        let keys: BTreeSet<String> = err
            .split('`')
            .skip(3)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let flags: BTreeSet<String> = Args::command()
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !["config", "print-ddl", "help", "version"].contains(long))
            .map(str::to_owned)
            .collect();
        assert!(!flags.is_empty());
        let missing: Vec<_> = flags.difference(&keys).collect();
        assert!(
            missing.is_empty(),
            "flags with no key in the file: {missing:?} (keys {keys:?})"
        );
        let extra: Vec<_> = keys
            .difference(&flags)
            .filter(|key| key.as_str() != "cors-origins")
            .collect();
        assert!(extra.is_empty(), "file keys that are no flag: {extra:?}");
    }

    #[test]
    fn the_backplane_help_names_every_driver() {
        let help = backplane_help();
        for name in ["memory", "postgres", "mssql"] {
            assert!(help.contains(name), "{help}");
        }
        assert!(help.contains("memory://"), "{help}");
        assert!(help.contains("postgres://"), "{help}");
    }
}
