//! A throwaway PostgreSQL cluster: `initdb` and `pg_ctl` in a temporary directory, on a free
//! port, run as the `postgres` user when this process is root (initdb refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A PostgreSQL server this process started, stopped and removed when dropped (or, for a
/// cluster that lives as long as the process, when the process exits).
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    settings: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory holding `initdb` and `pg_ctl`: `BACKPLANE_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
fn bindir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("BACKPLANE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| format!("no PostgreSQL server binaries found (pg_config: {e}); install the postgresql package or set BACKPLANE_TEST_PG_URL"))?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if bin.join("initdb").exists() {
        Ok(bin)
    } else {
        Err("no initdb found; install the postgresql package or set BACKPLANE_TEST_PG_URL".into())
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl Cluster {
    /// Initializes and starts a cluster. Blocks for a second or two.
    ///
    /// # Errors
    ///
    /// No server binaries, or `initdb` or `pg_ctl` failed (their output is in the message).
    pub fn start() -> Result<Self, String> {
        Self::start_with_tls(None)
    }

    /// Like [`start`](Self::start), with TLS on when a PEM certificate chain and key are given.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start), or the files could not be written.
    pub fn start_with_tls(tls: Option<(&str, &str)>) -> Result<Self, String> {
        let mut cluster = Self::empty()?;
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if let Some((cert, key)) = tls {
            let cert_file = cluster.dir.join("server.crt");
            let key_file = cluster.dir.join("server.key");
            std::fs::write(&cert_file, cert)
                .map_err(|e| format!("writing the certificate: {e}"))?;
            std::fs::write(&key_file, key).map_err(|e| format!("writing the key: {e}"))?;
            run(Command::new("chmod").arg("600").arg(&key_file), "chmod")?;
            if cluster.as_postgres {
                run(
                    Command::new("chown")
                        .arg("postgres:")
                        .arg(&cert_file)
                        .arg(&key_file),
                    "chown",
                )?;
            }
            cluster.settings = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert_file.display(),
                key_file.display()
            );
        }
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    /// A cluster with a directory of its own and no data yet.
    fn empty() -> Result<Self, String> {
        let bin = bindir()?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "backplane-pg-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&dir), "chown")?;
        }
        Ok(Self {
            dir,
            bin,
            port: free_port()?,
            as_postgres,
            settings: String::new(),
        })
    }

    /// Starts a streaming standby of this cluster: a `pg_basebackup` of its data, on a port of
    /// its own, following it asynchronously until [`promote`](Self::promote)d.
    ///
    /// # Errors
    ///
    /// `pg_basebackup` or `pg_ctl` failed (their output is in the message).
    pub fn standby(&self) -> Result<Self, String> {
        let standby = Self::empty()?;
        let port = self.port.to_string();
        standby.pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &standby.data(),
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )?;
        standby.pg_ctl_start()?;
        Ok(standby)
    }

    /// Promotes a standby, waiting until it accepts writes.
    ///
    /// # Errors
    ///
    /// `pg_ctl promote` failed: not a standby, or not running.
    pub fn promote(&self) -> Result<(), String> {
        self.pg("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"])
    }

    /// Stops the server at once, as a crash does: no shutdown checkpoint, and nothing more
    /// reaches its standbys.
    ///
    /// # Errors
    ///
    /// `pg_ctl stop` failed.
    pub fn crash(&self) -> Result<(), String> {
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir(&self.dir);
        run(&mut command, tool)
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=500{}",
            self.port,
            self.dir.display(),
            self.settings
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser URL of the cluster.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server, keeping its data.
    ///
    /// # Errors
    ///
    /// `pg_ctl stop` failed.
    pub fn stop(&self) -> Result<(), String> {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port.
    ///
    /// # Errors
    ///
    /// `pg_ctl start` failed.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Stops and removes the cluster when this process exits, even if it never drops the
    /// cluster (a cluster kept in a static): a detached shell waits for the process to end.
    pub fn remove_at_exit(&self) {
        let script = format!(
            "tail --pid={pid} -f /dev/null; {stop}; rm -rf '{dir}'",
            pid = std::process::id(),
            stop = self.stop_command(),
            dir = self.dir.display()
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn stop_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let stop = format!("'{pg_ctl}' -D '{}' -m immediate stop", self.data());
        if self.as_postgres {
            format!("runuser -u postgres -- {stop}")
        } else {
            stop
        }
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("{} >/dev/null 2>&1", self.stop_command()))
            .status();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("could not run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
