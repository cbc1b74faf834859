//! The server benchmark: `backplane-server` beside Socket.IO 4 (with
//! `@socket.io/postgres-adapter` across nodes), both as separate processes, measured in the same
//! run by the same Rust client harness, so every line reads as a ratio.
//!
//! ```sh
//! cargo bench -p backplane-server --bench server
//! ```
//!
//! - idle connections: server RSS growth per WebSocket connection, at `BENCH_IDLE` (10 000)
//!   connections on one node;
//! - fan-out: a burst of `BENCH_BURST` (200) broadcasts to 1 000 and 10 000 local connections,
//!   deliveries per second;
//! - cross-node over PostgreSQL: a publisher on node A, 100 receivers on node B: a burst of
//!   `BENCH_MESSAGES` (20 000) messages (delivered messages per second per receiver), and
//!   latency p50/p99 at a paced 1 000 messages per second;
//! - acknowledged calls from one connection across nodes: `BENCH_CALLS` (20 000) calls of
//!   `SendMessage` with invocation ids, 64 in flight, from one connection on node A, one
//!   receiver on node B: completions per second (ours: each completion goes out once its
//!   message is stored in the log; Socket.IO's acknowledged `emit`: once emitted), beside the
//!   same connection sending without waiting for answers (delivered messages per second).
//!
//! Our server runs with `--invocations-per-second 0` (no rate limit) and `--connection-buffer
//! 32768` (a whole burst fits a receiver's queue); the publisher sends without invocation ids,
//! as Socket.IO's `emit` does, so its calls are pipelined.
//!
//! `BENCH_FILTER` runs only the scenarios whose name contains it; `BENCH_SERVER_LOGS` (a
//! `RUST_LOG` filter) shows our servers' logs. PostgreSQL is a throwaway
//! cluster, or `BACKPLANE_TEST_PG_URL`. The peer's npm packages are pinned by
//! `benches/peer/package-lock.json` and installed with `npm ci` when missing.
//!
//! The client harness reads raw frames and counts records by their prefix: it parses no JSON,
//! so it costs less CPU than the servers it drives.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

type Ws = FragmentCollector<TokioIo<Upgraded>>;

/// How long any one step may take before the benchmark fails.
const STEP: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wanted(name: &str) -> bool {
    std::env::var("BENCH_FILTER").map_or(true, |f| name.contains(&f))
}

/// Which server a scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// `backplane-server`, SignalR JSON hub protocol.
    Ours,
    /// Socket.IO 4 on Node.
    SocketIo,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Self::Ours => "backplane",
            Self::SocketIo => "Socket.IO",
        }
    }

    fn path(self, user: &str) -> String {
        match self {
            Self::Ours => format!("/hubs/chat?user={user}"),
            Self::SocketIo => format!("/socket.io/?EIO=4&transport=websocket&user={user}"),
        }
    }

    /// One `SendMessage(text)` as the client writes it.
    fn send_message(self, text: &str) -> Vec<u8> {
        self.call(None, text)
    }

    /// One `SendMessage(text)`, with an invocation id (an acknowledgement id for Socket.IO)
    /// when given.
    fn call(self, id: Option<usize>, text: &str) -> Vec<u8> {
        match (self, id) {
            (Self::Ours, Some(id)) => {
                let mut out = format!(
                    r#"{{"type":1,"invocationId":"{id}","target":"SendMessage","arguments":["{text}"]}}"#
                )
                .into_bytes();
                out.push(0x1e);
                out
            }
            (Self::SocketIo, Some(id)) => format!(r#"42{id}["SendMessage","{text}"]"#).into_bytes(),
            (peer, None) => peer.fire_and_forget(text),
        }
    }

    fn fire_and_forget(self, text: &str) -> Vec<u8> {
        match self {
            Self::Ours => {
                let mut out =
                    format!(r#"{{"type":1,"target":"SendMessage","arguments":["{text}"]}}"#)
                        .into_bytes();
                out.push(0x1e);
                out
            }
            Self::SocketIo => format!(r#"42["SendMessage","{text}"]"#).into_bytes(),
        }
    }
}

/// A server process.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    fn start(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("BENCH_SERVER_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{what} did not report its address"));
        let addr = line
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what} printed no address: {line}"));
        Self { child, addr }
    }

    fn ours(backplane: &str) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backplane-server"));
        command
            .args(["--listen", "127.0.0.1:0", "--backplane", backplane])
            .args(["--allow-anonymous", "--invocations-per-second", "0"])
            // Room for a whole 20,000-message burst per connection, as Socket.IO's unbounded
            // buffers have: with the default 1,024, receivers that fall that far behind are
            // closed as slow consumers (by design) and the burst counts them as losses.
            .args(["--connection-buffer", "32768"])
            .env("BACKPLANE_TOKEN_SECRET", "bench-connection-tokens")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVER_LOGS").unwrap_or_else(|_| "warn".into()),
            );
        Self::start(command, "backplane-server")
    }

    fn socket_io(database: Option<&str>) -> Self {
        let dir = peer_dir();
        let mut command = Command::new("node");
        command
            .arg(dir.join("server.mjs"))
            .current_dir(&dir)
            .env("PORT", "0");
        if let Some(url) = database {
            command.env("DATABASE_URL", url);
        }
        Self::start(command, "the Socket.IO peer")
    }

    /// The resident set size, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer")
}

fn install_peer() {
    let dir = peer_dir();
    if dir.join("node_modules/socket.io").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .expect("npm runs (Node.js is needed for the peer)");
    assert!(status.success(), "npm ci failed in {}", dir.display());
}

struct Spawner;

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Opens a WebSocket and completes the peer's handshake.
async fn open(peer: Peer, addr: SocketAddr, user: &str) -> Ws {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let request = Request::builder()
        .method("GET")
        .uri(peer.path(user))
        .header("Host", addr.to_string())
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .expect("a request");
    let (ws, _) = fastwebsockets::handshake::client(&Spawner, request, stream)
        .await
        .expect("the upgrade succeeds");
    let mut ws = FragmentCollector::new(ws);
    match peer {
        Peer::Ours => {
            let mut hello = br#"{"protocol":"json","version":1}"#.to_vec();
            hello.push(0x1e);
            write(&mut ws, hello).await;
            let answer = read(&mut ws).await;
            assert!(answer.starts_with(b"{}"), "handshake: {answer:?}");
        }
        Peer::SocketIo => {
            let open = read(&mut ws).await;
            assert!(open.starts_with(b"0{"), "open packet: {open:?}");
            write(&mut ws, b"40".to_vec()).await;
            let connected = read(&mut ws).await;
            assert!(
                connected.starts_with(b"40"),
                "connect packet: {connected:?}"
            );
        }
    }
    ws
}

async fn write(ws: &mut Ws, data: Vec<u8>) {
    ws.write_frame(Frame::text(Payload::Owned(data)))
        .await
        .expect("the frame is written");
}

async fn read(ws: &mut Ws) -> Vec<u8> {
    loop {
        let frame = ws.read_frame().await.expect("a frame");
        match frame.opcode {
            OpCode::Text | OpCode::Binary => return frame.payload.to_vec(),
            OpCode::Close => panic!("the server closed the socket"),
            _ => {}
        }
    }
}

/// Opens `n` connections, at most 256 handshakes at a time.
async fn open_many(peer: Peer, addr: SocketAddr, n: usize, prefix: &str) -> Vec<Ws> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let gate = gate.clone();
        let user = format!("{prefix}{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open semaphore");
            open(peer, addr, &user).await
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for task in tasks {
        sockets.push(task.await.expect("a connection"));
    }
    sockets
}

/// What receivers saw, shared by their tasks.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    /// Receivers that got everything they expect.
    done: AtomicUsize,
    all_done: Notify,
    /// Latencies in microseconds, when timed.
    latencies: Mutex<Vec<u64>>,
    out_of_order: AtomicU64,
    duplicates: AtomicU64,
    /// When the last delivery arrived, in nanoseconds after the run's start.
    last_ns: AtomicU64,
}

/// Finds `marker` in `record` and parses the digits after it.
fn number_after(record: &[u8], marker: &[u8]) -> Option<u64> {
    let at = record.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let digits = record[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n = 0u64;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Reads until `expect` messages arrived (or the socket ends), counting and timing them.
fn receive(
    peer: Peer,
    mut ws: Ws,
    expect: u64,
    tally: Arc<Tally>,
    receivers: usize,
    start: Instant,
    timed: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut got = 0u64;
        // Sequence numbers seen, to tell duplicates from late arrivals.
        let mut seen = vec![false; usize::try_from(expect).unwrap_or(0)];
        let mut highest: Option<u64> = None;
        let mut seen_latencies = Vec::new();
        while got < expect {
            let Ok(frame) = ws.read_frame().await else {
                break;
            };
            if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
                continue;
            }
            let payload = &frame.payload[..];
            let before = got;
            let mut handle = |record: &[u8]| {
                got += 1;
                if timed && let Some(sent) = number_after(record, b"t:") {
                    let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    seen_latencies.push(now.saturating_sub(sent) / 1000);
                }
                if let Some(seq) = number_after(record, b"s:") {
                    let slot = usize::try_from(seq).ok().and_then(|i| seen.get_mut(i));
                    if let Some(slot) = slot {
                        if *slot {
                            tally.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        *slot = true;
                    }
                    // Arrived after a message sent later than it.
                    if highest.is_some_and(|h| seq < h) {
                        tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                    highest = highest.max(Some(seq));
                }
            };
            match peer {
                Peer::Ours => {
                    for record in payload.split(|b| *b == 0x1e) {
                        if record.starts_with(br#"{"type":1,"#) {
                            handle(record);
                        }
                    }
                }
                Peer::SocketIo => {
                    if payload.starts_with(b"42[") {
                        handle(payload);
                    } else if payload == b"2" {
                        let _ = ws.write_frame(Frame::text(Payload::Borrowed(b"3"))).await;
                    }
                }
            }
            if got > before {
                tally.delivered.fetch_add(got - before, Ordering::Relaxed);
                tally.last_ns.fetch_max(
                    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        }
        if timed {
            tally
                .latencies
                .lock()
                .expect("latencies")
                .extend(seen_latencies);
        }
        if tally.done.fetch_add(1, Ordering::AcqRel) + 1 == receivers {
            tally.all_done.notify_one();
        }
        // Keep the socket until the scenario ends, so the server keeps the connection.
        let _ = ws.read_frame().await;
    })
}

/// Waits until every receiver finished or `limit` passed; `false` on timeout.
async fn all_received(tally: &Tally, receivers: usize, limit: Duration) -> bool {
    let wait = async {
        while tally.done.load(Ordering::Acquire) < receivers {
            tally.all_done.notified().await;
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

fn raise_open_files() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

/// Memory per idle connection, in bytes.
async fn idle(peer: Peer, n: usize) -> f64 {
    let server = match peer {
        Peer::Ours => Process::ours("memory://"),
        Peer::SocketIo => Process::socket_io(None),
    };
    // One connection first, so lazily built state is not counted per connection.
    let warm = open(peer, server.addr, "warm").await;
    let before = server.rss_kib();
    let sockets = tokio::time::timeout(STEP, open_many(peer, server.addr, n, "idle"))
        .await
        .expect("connections in time");
    let after = server.rss_kib();
    drop((sockets, warm));
    (after.saturating_sub(before) * 1024) as f64 / n as f64
}

/// Deliveries per second of a burst of `burst` broadcasts to `n` local connections.
async fn fan_out(peer: Peer, n: usize, burst: usize) -> f64 {
    let server = match peer {
        Peer::Ours => Process::ours("memory://"),
        Peer::SocketIo => Process::socket_io(None),
    };
    let receivers = tokio::time::timeout(STEP, open_many(peer, server.addr, n, "fan"))
        .await
        .expect("connections in time");
    let mut sender = open(peer, server.addr, "sender").await;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let tasks: Vec<_> = receivers
        .into_iter()
        .map(|ws| receive(peer, ws, burst as u64, tally.clone(), n, start, false))
        .collect();
    let started = Instant::now();
    for i in 0..burst {
        write(&mut sender, peer.send_message(&format!("s:{i} burst"))).await;
    }
    let complete = all_received(&tally, n, STEP).await;
    let elapsed = started.elapsed();
    for task in tasks {
        task.abort();
    }
    let delivered = tally.delivered.load(Ordering::Relaxed);
    if !complete {
        println!("    ({} of {} deliveries arrived)", delivered, n * burst);
    }
    delivered as f64 / elapsed.as_secs_f64()
}

/// What a cross-node run measured.
struct CrossNode {
    per_receiver: f64,
    lost: u64,
    out_of_order: u64,
    duplicates: u64,
}

/// A publisher on node A, `receivers` on node B: a burst of `messages`.
async fn cross_burst(
    peer: Peer,
    a: SocketAddr,
    b: SocketAddr,
    receivers: usize,
    messages: usize,
) -> CrossNode {
    let sockets = open_many(peer, b, receivers, "cross").await;
    let mut publisher = open(peer, a, "publisher").await;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            receive(
                peer,
                ws,
                messages as u64,
                tally.clone(),
                receivers,
                start,
                false,
            )
        })
        .collect();
    for i in 0..messages {
        write(&mut publisher, peer.send_message(&format!("s:{i} x"))).await;
    }
    // Losses leave receivers waiting: stop once nothing arrived for a while.
    let mut last_seen = 0u64;
    loop {
        if all_received(&tally, receivers, Duration::from_secs(10)).await {
            break;
        }
        let now = tally.delivered.load(Ordering::Relaxed) + tally.last_ns.load(Ordering::Relaxed);
        if now == last_seen {
            break;
        }
        last_seen = now;
    }
    for task in tasks {
        task.abort();
    }
    let expected = (receivers * messages) as u64;
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let elapsed =
        Duration::from_nanos(tally.last_ns.load(Ordering::Relaxed)).max(Duration::from_millis(1));
    CrossNode {
        per_receiver: delivered as f64 / receivers as f64 / elapsed.as_secs_f64(),
        lost: expected.saturating_sub(delivered),
        out_of_order: tally.out_of_order.load(Ordering::Relaxed),
        duplicates: tally.duplicates.load(Ordering::Relaxed),
    }
}

/// Latency percentiles (µs) at a paced `rate` for `seconds`.
async fn cross_latency(
    peer: Peer,
    a: SocketAddr,
    b: SocketAddr,
    receivers: usize,
    rate: u64,
    seconds: u64,
) -> (u64, u64, u64) {
    let sockets = open_many(peer, b, receivers, "lat").await;
    let mut publisher = open(peer, a, "lat-publisher").await;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let messages = rate * seconds;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| receive(peer, ws, messages, tally.clone(), receivers, start, true))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..messages {
        tick.tick().await;
        let sent = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        write(
            &mut publisher,
            peer.send_message(&format!("s:{i} t:{sent}")),
        )
        .await;
    }
    let _ = all_received(&tally, receivers, Duration::from_secs(30)).await;
    for task in tasks {
        task.abort();
    }
    let mut latencies = std::mem::take(&mut *tally.latencies.lock().expect("latencies"));
    latencies.sort_unstable();
    // The sample at `per_mille` of the sorted latencies.
    let at = |per_mille: usize| {
        latencies
            .get((latencies.len() * per_mille / 1000).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let expected = receivers as u64 * messages;
    (
        at(500),
        at(990),
        expected.saturating_sub(latencies.len() as u64),
    )
}

/// What the acknowledged calls of one connection did.
struct Acked {
    calls_per_second: f64,
    /// Completions that did not arrive in the calls' order.
    out_of_order: u64,
    errors: u64,
    receiver: CrossNode,
}

/// `calls` acknowledged `SendMessage` calls from one connection on `a`, `window` in flight,
/// with one receiver on `b`.
async fn acked_calls(
    peer: Peer,
    a: SocketAddr,
    b: SocketAddr,
    calls: usize,
    window: usize,
) -> Acked {
    let receiver = open(peer, b, "acked-receiver").await;
    let mut caller = open(peer, a, "acked-caller").await;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let task = receive(peer, receiver, calls as u64, tally.clone(), 1, start, false);
    let (mut sent, mut completed, mut out_of_order, mut errors) = (0usize, 0usize, 0u64, 0u64);
    while completed < calls {
        while sent < calls && sent - completed < window {
            write(&mut caller, peer.call(Some(sent), &format!("s:{sent} x"))).await;
            sent += 1;
        }
        let frame = tokio::time::timeout(STEP, caller.read_frame())
            .await
            .expect("a completion in time")
            .expect("a frame");
        if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
            continue;
        }
        let mut done = |id: Option<u64>, error: bool| {
            if id != Some(completed as u64) {
                out_of_order += 1;
            }
            errors += u64::from(error);
            completed += 1;
        };
        match peer {
            Peer::Ours => {
                for record in frame.payload.split(|b| *b == 0x1e) {
                    // A completion (the server writes `invocationId` first).
                    if record.windows(9).any(|w| w == br#""type":3}"#)
                        || record.windows(9).any(|w| w == br#""type":3,"#)
                    {
                        let error = record.windows(8).any(|w| w == br#""error":"#);
                        done(number_after(record, br#""invocationId":""#), error);
                    }
                }
            }
            Peer::SocketIo => {
                if frame.payload.starts_with(b"43") {
                    done(number_after(&frame.payload, b"43"), false);
                } else if &frame.payload[..] == b"2" {
                    write(&mut caller, b"3".to_vec()).await;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let _ = all_received(&tally, 1, Duration::from_secs(30)).await;
    task.abort();
    let delivered = tally.delivered.load(Ordering::Relaxed);
    Acked {
        calls_per_second: calls as f64 / elapsed.as_secs_f64(),
        out_of_order,
        errors,
        receiver: CrossNode {
            per_receiver: 0.0,
            lost: (calls as u64).saturating_sub(delivered),
            out_of_order: tally.out_of_order.load(Ordering::Relaxed),
            duplicates: tally.duplicates.load(Ordering::Relaxed),
        },
    }
}

fn ratio(ours: f64, theirs: f64) -> String {
    if theirs > 0.0 {
        format!("{:.1}x", ours / theirs)
    } else {
        "-".into()
    }
}

async fn database_url() -> (Option<backplane_test_support::Cluster>, String) {
    match std::env::var(backplane_test_support::PG_URL_VAR)
        .ok()
        .filter(|u| !u.is_empty())
    {
        Some(url) => (None, url),
        None => {
            let cluster = tokio::task::spawn_blocking(backplane_test_support::Cluster::start)
                .await
                .expect("no panic")
                .expect("PostgreSQL for the cross-node runs");
            let url = cluster.url();
            (Some(cluster), url)
        }
    }
}

#[tokio::main]
async fn main() {
    raise_open_files();
    install_peer();
    let idle_n = env_usize("BENCH_IDLE", 10_000);
    let burst = env_usize("BENCH_BURST", 200);
    let messages = env_usize("BENCH_MESSAGES", 20_000);
    let calls = env_usize("BENCH_CALLS", 20_000);

    println!(
        "server benchmark: backplane-server vs Socket.IO 4 (same machine, same harness, same run)"
    );

    let name = format!("idle connections ({idle_n})");
    if wanted(&name) {
        let ours = idle(Peer::Ours, idle_n).await;
        let theirs = idle(Peer::SocketIo, idle_n).await;
        println!(
            "  {name:<34} {:>9.0} B/conn  {} {:>9.0} B/conn   {} of theirs",
            ours,
            Peer::SocketIo.name(),
            theirs,
            if theirs > 0.0 {
                format!("{:.0}%", ours / theirs * 100.0)
            } else {
                "-".into()
            }
        );
    }
    for n in [1_000, 10_000] {
        let name = format!("fan-out {burst} broadcasts to {n}");
        if wanted(&name) {
            let ours = fan_out(Peer::Ours, n, burst).await;
            let theirs = fan_out(Peer::SocketIo, n, burst).await;
            println!(
                "  {name:<34} {ours:>11.0} deliveries/s  {} {theirs:>11.0}/s   {}",
                Peer::SocketIo.name(),
                ratio(ours, theirs)
            );
        }
    }

    let burst_name = format!("cross-node burst of {messages}, 100 receivers");
    let latency_name = "cross-node latency at 1000 msg/s, 100 receivers";
    let acked_name = format!("{calls} acknowledged calls, one connection, 64 in flight");
    let unacked_name = format!("{calls} calls nobody waits for, one connection");
    if wanted(&burst_name) || wanted(latency_name) || wanted(&acked_name) || wanted(&unacked_name) {
        let (_cluster, base) = database_url().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let schema = format!("{base}{sep}schema=bench_server");
        let mut results = Vec::new();
        let mut calls_results = Vec::new();
        for peer in [Peer::Ours, Peer::SocketIo] {
            let (a, b) = match peer {
                Peer::Ours => (Process::ours(&schema), Process::ours(&schema)),
                Peer::SocketIo => (
                    Process::socket_io(Some(&base)),
                    Process::socket_io(Some(&base)),
                ),
            };
            let burst = if wanted(&burst_name) {
                Some(cross_burst(peer, a.addr, b.addr, 100, messages).await)
            } else {
                None
            };
            let latency = if wanted(latency_name) {
                Some(cross_latency(peer, a.addr, b.addr, 100, 1000, 3).await)
            } else {
                None
            };
            let acked = if wanted(&acked_name) {
                Some(acked_calls(peer, a.addr, b.addr, calls, 64).await)
            } else {
                None
            };
            let unacked = if wanted(&unacked_name) {
                Some(cross_burst(peer, a.addr, b.addr, 1, calls).await)
            } else {
                None
            };
            results.push((peer, burst, latency));
            calls_results.push((peer, acked, unacked));
        }
        if wanted(&burst_name) {
            for (peer, burst, _) in &results {
                if let Some(r) = burst {
                    println!(
                        "  {burst_name:<34} {:<10} {:>9.0} msg/s per receiver   lost {} out-of-order {} dup {}",
                        peer.name(),
                        r.per_receiver,
                        r.lost,
                        r.out_of_order,
                        r.duplicates
                    );
                }
            }
            if let [(_, Some(ours), _), (_, Some(theirs), _)] = &results[..] {
                println!(
                    "  {:<34} {}",
                    "  ratio",
                    ratio(ours.per_receiver, theirs.per_receiver)
                );
            }
        }
        if wanted(latency_name) {
            for (peer, _, latency) in &results {
                if let Some((p50, p99, missing)) = latency {
                    println!(
                        "  {latency_name:<34} {:<10} p50 {p50:>6} us   p99 {p99:>6} us   missing {missing}",
                        peer.name()
                    );
                }
            }
        }
        if wanted(&acked_name) {
            for (peer, acked, _) in &calls_results {
                if let Some(r) = acked {
                    println!(
                        "  {acked_name:<34} {:<10} {:>9.0} calls/s   completions out of order {} errors {}; receiver lost {} out-of-order {} dup {}",
                        peer.name(),
                        r.calls_per_second,
                        r.out_of_order,
                        r.errors,
                        r.receiver.lost,
                        r.receiver.out_of_order,
                        r.receiver.duplicates
                    );
                }
            }
            if let [(_, Some(ours), _), (_, Some(theirs), _)] = &calls_results[..] {
                println!(
                    "  {:<34} {}",
                    "  ratio",
                    ratio(ours.calls_per_second, theirs.calls_per_second)
                );
            }
        }
        if wanted(&unacked_name) {
            for (peer, _, unacked) in &calls_results {
                if let Some(r) = unacked {
                    println!(
                        "  {unacked_name:<34} {:<10} {:>9.0} msg/s delivered   lost {} out-of-order {} dup {}",
                        peer.name(),
                        r.per_receiver,
                        r.lost,
                        r.out_of_order,
                        r.duplicates
                    );
                }
            }
            if let [(_, _, Some(ours)), (_, _, Some(theirs))] = &calls_results[..] {
                println!(
                    "  {:<34} {}",
                    "  ratio",
                    ratio(ours.per_receiver, theirs.per_receiver)
                );
            }
        }
    }
}
