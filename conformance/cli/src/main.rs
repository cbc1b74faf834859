//! `backplane-conformance`: the conformance suite against a database given by URL, with every
//! driver of this build and the conformance factory `backplane-drivers` lists for it.
//!
//! ```text
//! backplane-conformance --url memory://
//! backplane-conformance --url memory:// --list
//! backplane-conformance --url memory:// group
//! backplane-conformance --url postgres://… --stop-cmd '…' --start-cmd '…'
//! backplane-conformance doctor --url postgres://…
//! ```

fn main() -> std::process::ExitCode {
    backplane_conformance_cli::main(|target| Ok(backplane_drivers::factory(target)?))
}
