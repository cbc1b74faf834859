//! The whole conformance suite against SQL Server, when `BACKPLANE_TEST_MSSQL_URL` names one
//! (an ADO.NET connection string or an `mssql://` URL).
//!
//! No SQL Server can be started by the tests, so this target has its own harness: without the
//! variable it prints every case as SKIPPED with the reason, and a summary line with the skip
//! count; it never reports them as passed. With the variable, every case runs against that
//! database, in both table layouts (`SKIP` only for cases the driver cannot inject, such as
//! stopping the database), and any failure fails the target.
//!
//! Arguments work as for other test targets: words filter cases by name, `--list` lists them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use backplane_conformance::{
    CaseError, Factory, MSSQL_URL_VAR, MssqlFactory, cases, mssql_test_url, run_case,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // libtest's options that take a value; `--skip NAME` excludes, bare words select.
    const WITH_VALUE: &[&str] = &[
        "--test-threads",
        "--format",
        "--color",
        "--logfile",
        "-Z",
        "--report-time",
        "--shuffle-seed",
    ];
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut words = args.iter().map(String::as_str);
    while let Some(arg) = words.next() {
        if arg == "--skip" {
            skips.extend(words.next());
        } else if WITH_VALUE.contains(&arg) {
            words.next();
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    let layouts = ["shared_tables", "tables_per_hub"];
    let selected: Vec<(&str, &backplane_conformance::Case)> = layouts
        .iter()
        .flat_map(|layout| cases().iter().map(move |case| (*layout, case)))
        .filter(|(layout, case)| {
            let full = format!("mssql::{layout}::{}", case.name);
            (filters.is_empty() || filters.iter().any(|f| full.contains(f)))
                && !skips.iter().any(|f| full.contains(f))
        })
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (layout, case) in &selected {
            println!("mssql::{layout}::{}: test", case.name);
        }
        return ExitCode::SUCCESS;
    }
    let Some(url) = mssql_test_url() else {
        let reason = format!(
            "{MSSQL_URL_VAR} is not set: no SQL Server to test against (this machine cannot run one)"
        );
        println!();
        for (layout, case) in &selected {
            println!("SKIPPED mssql::{layout}::{}: {reason}", case.name);
        }
        println!(
            "mssql conformance: 0 passed, 0 failed, {} SKIPPED ({reason})",
            selected.len()
        );
        println!();
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let shared: Arc<dyn Factory> = Arc::new(MssqlFactory::with_url(url.clone()));
    let per_hub: Arc<dyn Factory> = Arc::new(MssqlFactory::with_url(url).tables_per_hub());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    runtime.block_on(async {
        for (layout, case) in &selected {
            let factory = if *layout == "tables_per_hub" {
                per_hub.clone()
            } else {
                shared.clone()
            };
            let started = Instant::now();
            let outcome = run_case(case, factory).await;
            let ms = started.elapsed().as_millis();
            let name = format!("mssql::{layout}::{}", case.name);
            match outcome {
                Ok(()) => {
                    passed += 1;
                    println!("test {name} ... ok ({ms} ms)");
                }
                Err(CaseError::Failed(reason)) => {
                    failed += 1;
                    println!("test {name} ... FAILED ({ms} ms): {reason}");
                }
                Err(CaseError::Skipped(reason)) => {
                    skipped += 1;
                    println!("test {name} ... SKIPPED: {reason}");
                }
            }
        }
    });
    println!("mssql conformance: {passed} passed, {failed} failed, {skipped} SKIPPED");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
