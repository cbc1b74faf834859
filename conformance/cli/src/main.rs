//! `backplane-conformance`: the conformance suite against a database given by URL, with every
//! driver of this build.
//!
//! ```text
//! backplane-conformance --url memory://
//! backplane-conformance --url memory:// --list
//! backplane-conformance --url memory:// group
//! backplane-conformance --url postgres://… --stop-cmd '…' --start-cmd '…'
//! backplane-conformance doctor --url postgres://…
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use backplane_conformance::Factory;
use backplane_conformance_cli::Target;

/// The suite's factory for the driver the target's URL selects.
fn factory(target: &Target<'_>) -> anyhow::Result<Arc<dyn Factory>> {
    let driver = backplane_drivers::driver_for(target.url)?;
    if target.restart.is_some() && driver.name() != "postgres" {
        bail!(
            "--stop-cmd and --start-cmd restart a PostgreSQL server: the other drivers' restart cases are skipped"
        );
    }
    match driver.name() {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(backplane_conformance::MemoryFactory)),
        #[cfg(feature = "postgres")]
        "postgres" => {
            let factory = backplane_postgres::testing::PgFactory::with_url(target.url);
            Ok(Arc::new(match target.restart {
                Some((stop, start)) => factory.restart_commands(stop, start),
                None => factory,
            }))
        }
        #[cfg(feature = "mssql")]
        "mssql" => Ok(Arc::new(backplane_mssql::testing::MssqlFactory::with_url(
            target.url,
        ))),
        name => bail!(
            "the {} backplane is not built in: build with the cargo feature `{name}`",
            driver.title()
        ),
    }
}

fn main() -> ExitCode {
    backplane_conformance_cli::main(factory)
}
