//! What a new driver costs, shown with one kept out of the workspace: `tests/new_driver/` is a
//! crate of its own (a `wrapped://` driver over the in-memory backplane). It needs its crate
//! and nothing in this workspace: its tests run the whole suite with one `suite!` line (the
//! cases it cannot fault listed as skipped), and its binary gets this command's runner from
//! `main(factory)` in a few lines. Built and run here, in a directory of its own, offline
//! against this workspace's lock file.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Building the crate and its dependencies from nothing, then running the suite twice.
const LIMIT: Duration = Duration::from_secs(900);

/// The files the driver needed, and nothing else.
const FILES: &[&str] = &[
    "Cargo.toml.in",
    "src/lib.rs",
    "src/main.rs",
    "tests/conformance.rs",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace directory")
}

/// Copies the driver into a directory of its own, outside the workspace.
fn lay_out(dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/new_driver");
    let mut found = Vec::new();
    let mut pending = vec![source.clone()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).expect("the driver's directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(&source).expect("inside").to_owned();
                found.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found.sort();
    let mut expected: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(found, expected, "the driver is these files and no others");

    let _ = std::fs::remove_dir_all(dir);
    for file in FILES {
        let text = std::fs::read_to_string(source.join(file)).expect("readable");
        let (name, text) = match file.strip_suffix(".in") {
            Some(name) => (
                name,
                text.replace("@WORKSPACE@", &workspace().to_string_lossy()),
            ),
            None => (*file, text),
        };
        let target = dir.join(name);
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("a directory");
        std::fs::write(target, text).expect("written");
    }
    std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).expect("the lock file");
}

/// Runs `cargo args…` in `dir`; its output, or a panic with it when it fails.
async fn cargo(dir: &Path, args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = tokio::process::Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("cargo {args:?} took longer than {LIMIT:?}"))
        .expect("cargo runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "cargo {args:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn a_driver_out_of_tree_is_one_crate_and_one_suite_line() {
    let suite = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/new_driver/tests/conformance.rs"),
    )
    .expect("the driver's suite");
    assert_eq!(suite.lines().count(), 1, "one line: {suite}");
    assert_eq!(suite.matches("suite!(").count(), 1, "{suite}");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("new-driver");
    lay_out(&dir);

    let tests = cargo(&dir, &["test", "--offline", "--test", "conformance"]).await;
    let summary = tests
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no summary:\n{tests}"));
    assert!(summary.contains(" 0 failed;"), "{summary}");
    assert!(summary.contains(" 7 ignored;"), "{summary}");
    assert!(
        tests.contains("test database_restart_no_loss ... ignored, no database to stop"),
        "a skipped case says why:\n{tests}"
    );

    let run = cargo(
        &dir,
        &["run", "--offline", "--", "--url", "wrapped://", "group"],
    )
    .await;
    assert!(
        run.contains("against the wrapped driver"),
        "the runner uses the driver's factory:\n{run}"
    );
    assert!(run.contains(" passed, 0 failed, 0 skipped"), "{run}");
}
