//! Faults only a real PostgreSQL shows: an append whose connection dies after it was sent may
//! have committed, so it is reported as an unknown outcome, never as a plain failure a caller
//! would retry into a second copy.

use std::str::FromStr;
use std::time::Duration;

use backplane_conformance::{Cluster, PG_URL_VAR};
use backplane_core::{Backplane, HubName};
use backplane_postgres::{PgBackplane, PgOptions};
use bytes::Bytes;
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

/// Every test finishes well within this, or fails.
const LIMIT: Duration = Duration::from_secs(60);

/// The cluster the tests of this file share, unless `BACKPLANE_TEST_PG_URL` names a database.
static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

async fn url() -> String {
    if let Some(url) = std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty()) {
        return url;
    }
    let cluster = CLUSTER
        .get_or_init(|| async {
            let cluster = tokio::task::spawn_blocking(Cluster::start)
                .await
                .map_err(|e| e.to_string())??;
            cluster.remove_at_exit();
            Ok(cluster)
        })
        .await;
    match cluster {
        Ok(cluster) => cluster.url(),
        Err(err) => panic!("no PostgreSQL for the tests: {err}"),
    }
}

async fn options(schema: &str) -> PgOptions {
    PgOptions::from_str(&url().await)
        .expect("valid url")
        .schema(schema)
        .pool_size(2)
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url().await, NoTls)
        .await
        .expect("admin connects");
    tokio::spawn(connection);
    client
}

/// Waits until a backend of `schema` waits on a lock, and terminates it.
async fn terminate_waiting_backend(admin: &tokio_postgres::Client, schema: &str) {
    let pattern = format!("%{schema}%");
    let mut retry = tokio::time::interval(Duration::from_millis(10));
    loop {
        retry.tick().await;
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()",
                &[&pattern],
            )
            .await
            .expect("pg_stat_activity is readable");
        if !rows.is_empty() {
            return;
        }
    }
}

#[tokio::test]
async fn an_append_whose_connection_dies_has_an_unknown_outcome() {
    tokio::time::timeout(LIMIT, async {
        let schema = format!("faults_{}", std::process::id());
        let hub = HubName::new("faults").expect("valid hub");
        let holder = PgBackplane::connect_with(options(&schema).await)
            .await
            .expect("connects");
        let writer = PgBackplane::connect_with(options(&schema).await)
            .await
            .expect("connects");
        // The held append keeps the stream row locked, so the writer's append waits on it
        // after it was sent: the moment a broken connection leaves its outcome unknown.
        let held = holder
            .hold_append(&hub, 0, &[Bytes::from_static(b"held")])
            .await
            .expect("holds an append");
        let append = tokio::spawn({
            let (writer, hub) = (writer.clone(), hub.clone());
            async move { writer.append(&hub, 0, &[Bytes::from_static(b"cut")]).await }
        });
        terminate_waiting_backend(&admin().await, &schema).await;
        let err = append
            .await
            .expect("the append task ends")
            .expect_err("the append's connection was terminated");
        assert!(
            err.is_outcome_unknown(),
            "a write cut off after it was sent may have committed: {err}"
        );
        let first = held.commit().await.expect("the held append commits");
        // The writer recovers, and the cut append left no record behind.
        let next = writer
            .append(&hub, 0, &[Bytes::from_static(b"after")])
            .await
            .expect("the writer appends again");
        assert_eq!(
            next.offset,
            first.offset + 1,
            "the cut append wrote nothing"
        );
        let entries = writer.read(&hub, first, 10).await.expect("reads");
        let data: Vec<&[u8]> = entries.iter().map(|e| e.data.as_ref()).collect();
        assert_eq!(data, [b"held".as_slice(), b"after".as_slice()]);
    })
    .await
    .expect("the test finishes in time");
}
