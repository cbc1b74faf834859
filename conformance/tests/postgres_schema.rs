//! Schema management against a real PostgreSQL: without automatic creation the driver refuses
//! to start and says how to fix it; the DDL it prints, run once by a DBA, is all it needs.

use backplane_conformance::Cluster;
use backplane_postgres::{PgBackplane, PgOptions};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_for_dbas_when_creation_is_off() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster task")
        .expect("a cluster starts");
    let url = format!("{}?schema=Dba%20Managed&create_schema=false", cluster.url());
    let options: PgOptions = url.parse().expect("valid options");

    let err = PgBackplane::connect_with(options.clone())
        .await
        .expect_err("no schema yet");
    let text = err.to_string();
    assert!(text.contains("version 0") && text.contains("DDL"), "{text}");

    let (admin, connection) = tokio_postgres::connect(&cluster.url(), NoTls)
        .await
        .expect("admin connects");
    tokio::spawn(connection);
    admin
        .batch_execute(&PgBackplane::ddl(&options))
        .await
        .expect("the printed DDL runs");

    let backplane = PgBackplane::connect_with(options)
        .await
        .expect("connects once the DBA ran the DDL");
    assert_eq!(backplane.schema_version().await.expect("version"), 1);
}
