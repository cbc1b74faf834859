//! Sets `cfg(mssql_server)` when `BACKPLANE_TEST_MSSQL_URL` names a SQL Server: the SQL Server
//! suite (`tests/conformance.rs`) then runs against it; without it, its tests are ignored with the
//! reason, never reported as passed.

fn main() {
    println!("cargo::rerun-if-env-changed=BACKPLANE_TEST_MSSQL_URL");
    println!("cargo::rustc-check-cfg=cfg(mssql_server)");
    if std::env::var("BACKPLANE_TEST_MSSQL_URL").is_ok_and(|url| !url.trim().is_empty()) {
        println!("cargo::rustc-cfg=mssql_server");
    }
}
