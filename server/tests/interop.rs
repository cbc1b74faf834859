//! The official `@microsoft/signalr` client, with JSON and with
//! `@microsoft/signalr-protocol-msgpack` (pinned in `tests/interop/package-lock.json`),
//! against two `backplane-server` processes sharing one PostgreSQL: broadcast, groups, users on
//! two nodes, durable offline delivery, presence, completions and errors, token refusal, and
//! automatic reconnect after a server restart.
//!
//! The same script runs against one memory node too, without the two scenarios that need
//! two nodes (the round-robin resume, the restart of the other node). Also signalrcore, the most used Python client (pinned in `tests/interop/requirements.txt`;
//! it negotiates with version 0), against one memory node and against two PostgreSQL nodes:
//! broadcast order, groups, users, results and errors.
//!
//! Needs Node.js and Python 3; installs the JavaScript client with `npm ci` and signalrcore in
//! a virtual environment under the target directory when they are missing. Uses
//! `BACKPLANE_TEST_PG_URL` when set, otherwise a throwaway cluster.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backplane_test_support::Cluster;

const SECRET: &str = "interop-secret-interop-secret-32";

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// A server process and where it listens.
struct ServerProcess {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl ServerProcess {
    fn start(backplane: &str, listen: &str, log: PathBuf) -> Self {
        let log_file = std::fs::File::create(&log).expect("a log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
            .args(["--listen", listen, "--backplane", backplane])
            // Where the other node relays resumed sockets to.
            .args(["--advertise-url", &format!("http://{listen}")])
            .env("BACKPLANE_JWT_SECRET", SECRET)
            .env("BACKPLANE_TOKEN_SECRET", "interop-connection-tokens")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("the server binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the server did not report its address; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let addr = line
            .rsplit("http://")
            .next()
            .expect("an address in the first line")
            .trim()
            .to_owned();
        Self { child, addr, log }
    }

    /// SIGTERM, then wait (up to 30 s) for a graceful exit.
    fn stop(mut self) -> PathBuf {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let (tx, rx) = mpsc::channel();
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("a placeholder process"),
        );
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(status)) => assert!(
                status.success(),
                "the server exited with {status} on SIGTERM"
            ),
            Ok(Err(err)) => panic!("waiting for the server: {err}"),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                panic!("the server did not stop within 30 s of SIGTERM");
            }
        }
        self.log.clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ensure_client_installed(dir: &Path) {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "Node.js is required for the interop tests (install nodejs; .ci/test does)"
    );
    if !dir.join("node_modules/@microsoft/signalr").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
}

/// A loopback address whose port is free now: a node must know the address it advertises
/// before it starts.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").to_string()
}

/// A backplane URL for a fresh `schema` on `BACKPLANE_TEST_PG_URL`, or on a throwaway cluster
/// (returned, to keep it running).
fn postgres_backplane(schema: &str) -> (Option<Cluster>, String) {
    let (cluster, base) = match std::env::var("BACKPLANE_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            let cluster = Cluster::start().expect("a throwaway PostgreSQL cluster");
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let separator = if base.contains('?') { '&' } else { '?' };
    (cluster, format!("{base}{separator}schema={schema}"))
}

/// Waits up to `limit` for a script to end; its exit status and standard output.
fn script_output(
    mut child: Child,
    what: &str,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        let _ = tx.send(out);
    });
    let Ok(out) = rx.recv_timeout(limit) else {
        let _ = child.kill();
        panic!("{what} did not finish within {limit:?}");
    };
    let status = child.wait().expect("the script exits");
    println!("{out}");
    (status, out)
}

/// Prints the servers' logs, for a failed run.
fn print_logs(logs: &[&Path]) {
    for log in logs {
        eprintln!(
            "--- {} ---\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

#[test]
fn official_client_against_two_nodes() {
    let dir = interop_dir();
    ensure_client_installed(&dir);

    let (_cluster, backplane) = postgres_backplane(&format!("interop_{}", std::process::id()));

    let logs = std::env::temp_dir();
    let a = ServerProcess::start(
        &backplane,
        &free_address(),
        logs.join(format!("interop-a-{}.log", std::process::id())),
    );
    let mut b = ServerProcess::start(
        &backplane,
        &free_address(),
        logs.join(format!("interop-b-{}.log", std::process::id())),
    );

    let mut script = Command::new("node")
        .arg("interop.mjs")
        .current_dir(&dir)
        .env("NODE_A", format!("http://{}", a.addr))
        .env("NODE_B", format!("http://{}", b.addr))
        .env("JWT_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs");
    let mut stdin = script.stdin.take().expect("piped stdin");
    let stdout = script.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(240);
    let mut output = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                if line == "RESTART B" {
                    let addr = b.addr.clone();
                    let log = b.stop();
                    b = ServerProcess::start(&backplane, &addr, log);
                    writeln!(stdin, "RESTARTED").expect("the script reads stdin");
                }
                output.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = script.kill();
                panic!("the interop script did not finish within 240 s");
            }
        }
    }
    let status = script.wait().expect("the script exits");
    let summary = output.last().cloned().unwrap_or_default();
    if !status.success() {
        print_logs(&[&a.log, &b.log]);
    }
    assert!(status.success(), "interop failed: {summary}");
    assert!(
        summary.contains(" 0 failed, 0 skipped") && !output.iter().any(|l| l.starts_with("FAIL")),
        "unexpected summary: {summary}"
    );
}

#[test]
fn official_client_against_one_memory_node() {
    let dir = interop_dir();
    ensure_client_installed(&dir);
    let log = std::env::temp_dir().join(format!("interop-memory-{}.log", std::process::id()));
    let node = ServerProcess::start("memory://", &free_address(), log);
    let url = format!("http://{}", node.addr);
    let script = Command::new("node")
        .arg("interop.mjs")
        .current_dir(&dir)
        .env("NODE_A", &url)
        .env("NODE_B", &url)
        .env("JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs");
    let (status, out) = script_output(script, "the interop script", Duration::from_secs(240));
    if !status.success() {
        print_logs(&[&node.log]);
    }
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        status.success() && summary.contains(" 0 failed, 2 skipped"),
        "interop on one memory node: {summary}"
    );
}

/// The Python interpreter of a virtual environment holding signalrcore (pinned in
/// `tests/interop/requirements.txt`), created on first use.
fn signalrcore_python(dir: &Path) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("signalrcore-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("installed-requirements.txt");
    let requirements =
        std::fs::read_to_string(dir.join("requirements.txt")).expect("the requirements file");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(requirements.as_str()) {
        return python;
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 runs (the signalrcore interop test needs Python 3 with venv)");
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(dir.join("requirements.txt"))
        .status()
        .expect("pip runs");
    assert!(status.success(), "installing signalrcore failed");
    std::fs::write(&marker, requirements).expect("the marker is written");
    python
}

/// Runs the signalrcore script against `a` and `b`; panics with its output on failure.
fn run_signalrcore(python: &Path, dir: &Path, a: &str, b: &str, logs: &[&Path]) {
    let token = |user: &str| {
        backplane_server::user_token(SECRET.as_bytes(), user, Duration::from_secs(3600))
    };
    let child = Command::new(python)
        .arg("signalrcore_interop.py")
        .current_dir(dir)
        .env("NODE_A", format!("http://{a}"))
        .env("NODE_B", format!("http://{b}"))
        .env("TOKEN_ADA", token("py-ada"))
        .env("TOKEN_BOB", token("py-bob"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the signalrcore script starts");
    let (status, out) = script_output(child, "the signalrcore script", Duration::from_secs(180));
    if !status.success() {
        print_logs(logs);
    }
    assert!(
        status.success() && out.contains("signalrcore interop: all passed"),
        "signalrcore against {a} and {b}:\n{out}"
    );
}

#[test]
fn signalrcore_against_one_memory_node_and_two_postgres_nodes() {
    let dir = interop_dir();
    let python = signalrcore_python(&dir);
    let logs = std::env::temp_dir();
    let pid = std::process::id();

    let memory = ServerProcess::start(
        "memory://",
        &free_address(),
        logs.join(format!("signalrcore-memory-{pid}.log")),
    );
    run_signalrcore(&python, &dir, &memory.addr, &memory.addr, &[&memory.log]);

    let (_cluster, backplane) = postgres_backplane(&format!("signalrcore_{pid}"));
    let a = ServerProcess::start(
        &backplane,
        &free_address(),
        logs.join(format!("signalrcore-a-{pid}.log")),
    );
    let b = ServerProcess::start(
        &backplane,
        &free_address(),
        logs.join(format!("signalrcore-b-{pid}.log")),
    );
    run_signalrcore(&python, &dir, &a.addr, &b.addr, &[&a.log, &b.log]);
}
