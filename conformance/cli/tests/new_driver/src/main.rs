//! `backplane-conformance` for `wrapped://`, on the same runner as the built-in drivers.

fn main() -> std::process::ExitCode {
    backplane_conformance_cli::main(|target| {
        check_url(target.url)?;
        Ok(std::sync::Arc::new(backplane_wrapped::WrappedFactory))
    })
}

/// Refuses a URL that is not `wrapped://`.
fn check_url(url: &str) -> Result<(), std::io::Error> {
    use backplane_core::Driver;
    if backplane_wrapped::Wrapped::accepts(url) {
        Ok(())
    } else {
        Err(std::io::Error::other("not a wrapped:// URL"))
    }
}
