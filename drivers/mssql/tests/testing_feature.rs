//! The conformance suite and the fault tests of this driver need its `testing` feature, which
//! `cargo test --workspace` turns on (the conformance command depends on it). Without it those
//! targets are left out: this test says so, rather than a run that silently tests less.

#[test]
fn the_conformance_suite_is_built() {
    let built = cfg!(feature = "testing");
    assert!(
        built,
        "the conformance suite and fault tests need the `testing` feature: run `cargo test --workspace`, or add `--features testing`"
    );
}
