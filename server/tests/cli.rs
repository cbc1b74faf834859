//! The `backplane-server` binary refuses bad configuration at start with one clear line and
//! exit code 2, and reads settings from a TOML file.

use std::io::Write;
use std::process::{Command, Stdio};

/// Arguments, environment, and what the error line must contain.
type Case = (
    Vec<&'static str>,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backplane-server"));
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for var in [
        "BACKPLANE_URL",
        "BACKPLANE_JWT_SECRET",
        "BACKPLANE_ALLOW_ANONYMOUS",
        "BACKPLANE_CONFIG",
        "BACKPLANE_LISTEN",
    ] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.env("RUST_LOG", "off");
    let output = command.output().expect("the binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

/// What starting on an unreachable SQL Server says: the connection failed, or (without the
/// driver) which feature to enable.
const MSSQL_UNAVAILABLE: &str = if cfg!(feature = "mssql") {
    "cannot start the SQL Server backplane"
} else {
    "cargo feature `mssql`"
};

/// What an ADO.NET string with Windows authentication gets.
const MSSQL_REFUSED: &str = if cfg!(feature = "mssql") {
    "integrated Windows authentication is not supported"
} else {
    "cargo feature `mssql`"
};

#[test]
fn bad_configuration_fails_with_one_line_and_exit_code_2() {
    let cases: Vec<Case> = vec![
        (
            vec!["--allow-anonymous", "--backplane", "nope://x"],
            vec![],
            "unknown backplane scheme 'nope'",
        ),
        (
            vec![
                "--allow-anonymous",
                "--advertise-url",
                "https://node-1:5000",
            ],
            vec![],
            "invalid advertise-url 'https://node-1:5000': nodes reach each other over http://",
        ),
        (
            vec![
                "--allow-anonymous",
                "--advertise-url",
                "http://node-1:5000/hubs",
            ],
            vec![],
            "invalid advertise-url 'http://node-1:5000/hubs': a base URL has no path",
        ),
        (
            vec!["--allow-anonymous", "--backplane", "not a url"],
            vec![],
            "malformed backplane URL",
        ),
        (
            vec![
                "--allow-anonymous",
                "--backplane",
                "mssql://sa:hunter2@127.0.0.1:1/db?connect_timeout=2",
            ],
            vec![],
            MSSQL_UNAVAILABLE,
        ),
        (
            vec![
                "--allow-anonymous",
                "--backplane",
                "Server=127.0.0.1,1;User Id=sa;Password=hunter2;Connect Timeout=2",
            ],
            vec![],
            MSSQL_UNAVAILABLE,
        ),
        (
            vec![
                "--allow-anonymous",
                "--backplane",
                "Server=db;Password=hunter2;Trusted_Connection=true",
            ],
            vec![],
            MSSQL_REFUSED,
        ),
        (
            vec![
                "--allow-anonymous",
                "--backplane",
                "postgres://postgres@127.0.0.1:1/db?connect_timeout=2",
            ],
            vec![],
            "cannot start the PostgreSQL backplane",
        ),
        (vec![], vec![], "no way to authenticate clients"),
        (
            vec![
                "--allow-anonymous",
                "--keep-alive",
                "30s",
                "--client-timeout",
                "10s",
            ],
            vec![],
            "must be longer than keep-alive",
        ),
        (
            vec!["--allow-anonymous", "--node-id", "bad id!"],
            vec![],
            "invalid node-id",
        ),
        (
            vec![],
            vec![
                ("BACKPLANE_ALLOW_ANONYMOUS", "true"),
                ("BACKPLANE_URL", "nope://"),
            ],
            "unknown backplane scheme",
        ),
    ];
    for (args, env, expected) in cases {
        let (code, stderr) = run(&args, &env);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got:\n{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} should contain {expected:?}"
        );
        assert!(!stderr.contains("hunter2"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_config_file_is_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("backplane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let bad = dir.join("bad.toml");
    let mut file = std::fs::File::create(&bad).expect("a file");
    writeln!(
        file,
        "allow-anonymous = true\nlisten = \"127.0.0.1:0\"\nno-such-setting = 1"
    )
    .expect("written");
    let (code, stderr) = run(&["--config", bad.to_str().expect("utf-8")], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no-such-setting"), "{stderr}");

    let good = dir.join("good.toml");
    std::fs::write(&good, "allow-anonymous = true\nbackplane = \"nope://\"\n").expect("written");
    let (code, stderr) = run(&["--config", good.to_str().expect("utf-8")], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown backplane scheme 'nope'"),
        "the file's backplane is used: {stderr}"
    );

    let (code, stderr) = run(
        &[
            "--config",
            dir.join("missing.toml").to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read the config file"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prints_the_ddl_for_a_dba() {
    let output = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
        .args([
            "--print-ddl",
            "--backplane",
            "postgres://app@db.example/prod?schema=rt&create_schema=false",
        ])
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let sql = String::from_utf8_lossy(&output.stdout);
    assert!(sql.contains("CREATE TABLE \"rt\".\"log\""), "{sql}");
    let output = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
        .args([
            "--print-ddl",
            "--backplane",
            "postgres://app@db.example/prod?schema=rt&create_schema=false&tables_per_hub=true",
        ])
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let sql = String::from_utf8_lossy(&output.stdout);
    assert!(sql.contains("CREATE TABLE \"rt\".\"hubs\""), "{sql}");
    assert!(
        sql.contains("INSERT INTO \"rt\".\"hubs\" (hub, slug) VALUES ('chat', 'chat_"),
        "{sql}"
    );
    assert!(!sql.contains("\"rt\".\"log\""), "{sql}");
    let (code, stderr) = run(&["--print-ddl", "--backplane", "memory://"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[cfg(feature = "mssql")]
#[test]
fn prints_the_sql_server_ddl_for_a_dba() {
    let output = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
        .args([
            "--print-ddl",
            "--backplane",
            "Server=db.example,1433;User Id=app;Password=hunter2;schema=rt;create_schema=false;tables_per_hub=true",
        ])
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let sql = String::from_utf8_lossy(&output.stdout);
    assert!(sql.contains("CREATE TABLE [rt].[hubs]"), "{sql}");
    assert!(
        sql.contains("INSERT INTO [rt].[hubs] (hub, slug) VALUES (N'chat', N'chat_"),
        "{sql}"
    );
    assert!(sql.contains("\nGO\n"), "{sql}");
    assert!(!sql.contains("hunter2"), "{sql}");
}

#[test]
fn token_mints_a_development_token_from_the_jwt_secret() {
    let secret = "a-development-secret-of-some-length";
    let output = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
        .args(["token", "--user", "ada", "--ttl", "1h"])
        .env("BACKPLANE_JWT_SECRET", secret)
        .env_remove("BACKPLANE_CONFIG")
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let token = String::from_utf8(output.stdout).expect("text");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("a token signed with the secret");
    assert_eq!(data.claims["sub"], "ada");

    // Without a secret there is nothing to sign with: one clear line, exit code 2.
    let (code, stderr) = run(&["token", "--user", "ada"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no JWT secret"), "{stderr}");
}

#[test]
fn help_lists_the_backplane_drivers() {
    let output = Command::new(env!("CARGO_BIN_EXE_backplane-server"))
        .arg("--help")
        .output()
        .expect("the binary runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for form in ["memory://", "postgres://", "mssql"] {
        assert!(help.contains(form), "{help}");
    }
}
