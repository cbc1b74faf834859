#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

pub use backplane_conformance::TestDatabase;
use backplane_conformance::{CaseError, Factory, cases, run_case};
use backplane_core::Check;
use clap::Parser;

/// Runs the backplane conformance suite against a database.
#[derive(Debug, Parser)]
#[command(name = "backplane-conformance", version, about)]
struct Args {
    /// The database to test; its scheme picks the driver (`memory://`, `postgres://`,
    /// `mssql://`); an ADO.NET connection string (`Server=…;…`) picks SQL Server.
    #[arg(
        long,
        global = true,
        env = "BACKPLANE_CONFORMANCE_URL",
        default_value = "memory://"
    )]
    url: String,

    /// List the cases instead of running them.
    #[arg(long)]
    list: bool,

    /// A shell command that stops the PostgreSQL server at --url, for the cases that stop and
    /// start their database (with --start-cmd; without both, those cases are skipped).
    #[arg(long, requires = "start_cmd")]
    stop_cmd: Option<String>,

    /// A shell command that starts that server again, on the same address.
    #[arg(long, requires = "stop_cmd")]
    start_cmd: Option<String>,

    /// Run only cases whose name contains one of these strings.
    filters: Vec<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check that the database at --url has what the driver needs: connectivity, privileges,
    /// schema version, and LISTEN/NOTIFY (PostgreSQL) or the migration lock (SQL Server).
    Doctor,
}

/// Prints doctor checks as `ok`/`FAIL` lines; `true` when all passed.
fn report(checks: &[Check]) -> bool {
    for check in checks {
        match &check.outcome {
            Ok(found) => println!("ok    {:<16} {found}", check.name),
            Err(problem) => println!("FAIL  {:<16} {problem}", check.name),
        }
    }
    checks.iter().all(|c| c.outcome.is_ok())
}

async fn run<F>(args: Args, factory: F) -> anyhow::Result<bool>
where
    F: Fn(&TestDatabase<'_>) -> anyhow::Result<Arc<dyn Factory>>,
{
    if let Some(Command::Doctor) = args.command {
        return Ok(report(&backplane_drivers::doctor(&args.url).await?));
    }
    let selected: Vec<_> = cases()
        .iter()
        .filter(|c| {
            args.filters.is_empty() || args.filters.iter().any(|f| c.name.contains(f.as_str()))
        })
        .collect();
    if args.list {
        let mut out = std::io::stdout().lock();
        for case in &selected {
            // A closed pipe (`| head`) ends the listing quietly.
            if writeln!(out, "{}", case.name).is_err() {
                break;
            }
        }
        return Ok(true);
    }
    let target = TestDatabase {
        url: &args.url,
        restart: args.stop_cmd.as_deref().zip(args.start_cmd.as_deref()),
    };
    let factory = factory(&target)?;
    println!(
        "running {} conformance cases against the {} driver",
        selected.len(),
        factory.driver_name()
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let started = Instant::now();
    for case in selected {
        let t = Instant::now();
        let outcome = run_case(case, factory.clone()).await;
        let ms = t.elapsed().as_millis();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("PASS  {:<55} {ms:>6} ms", case.name);
            }
            Err(CaseError::Failed(reason)) => {
                failed += 1;
                println!("FAIL  {:<55} {ms:>6} ms  {reason}", case.name);
            }
            Err(CaseError::Skipped(reason)) => {
                skipped += 1;
                println!("SKIP  {:<55} {ms:>6} ms  {reason}", case.name);
            }
        }
    }
    println!(
        "ran {} cases in {:.1} s",
        passed + failed + skipped,
        started.elapsed().as_secs_f64()
    );
    println!("conformance: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(failed == 0)
}

/// The whole command: parses the arguments, runs the suite (or `doctor`) with the factory
/// `factory` makes for the target, prints one line per case and a summary. Exit code 1 when
/// a case failed, 2 when the run could not start.
pub fn main<F>(factory: F) -> ExitCode
where
    F: Fn(&TestDatabase<'_>) -> anyhow::Result<Arc<dyn Factory>>,
{
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match runtime.block_on(run(args, factory)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            // Each cause once: a driver error already quotes its source.
            let mut text = err.to_string();
            for cause in err.chain().skip(1) {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text = format!("{text}: {cause}");
                }
            }
            eprintln!("error: {text}");
            ExitCode::from(2)
        }
    }
}
