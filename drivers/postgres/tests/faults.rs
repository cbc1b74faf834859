//! Faults only a real PostgreSQL shows: an append whose connection dies after it was sent may
//! have committed, so it is reported as an unknown outcome, never as a plain failure a caller
//! would retry into a second copy; a trim that waits while it deletes never holds up appends.

use std::str::FromStr;
use std::time::Duration;

use backplane_core::{Backplane, Error, HubName, Retention};
use backplane_postgres::{PgBackplane, PgOptions};
use backplane_test_support::test_database_url;
use bytes::Bytes;
use tokio_postgres::NoTls;

/// Every test finishes well within this, or fails.
const LIMIT: Duration = Duration::from_secs(60);

/// Options for `schema` on the database the tests share (`BACKPLANE_TEST_PG_URL`, or a
/// throwaway cluster).
async fn options(schema: &str) -> PgOptions {
    let url = test_database_url(schema)
        .await
        .expect("PostgreSQL is needed for these tests");
    PgOptions::from_str(&url).expect("valid url").pool_size(2)
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = options("public")
        .await
        .config()
        .connect(NoTls)
        .await
        .expect("admin connects");
    tokio::spawn(connection);
    client
}

/// Waits until a backend running a statement on `schema`'s tables waits on a lock, other than
/// those in `known`, and returns its process id.
async fn backend_waiting_on_a_lock(
    admin: &tokio_postgres::Client,
    schema: &str,
    known: &[i32],
) -> i32 {
    let pattern = format!("%{schema}%");
    let mut retry = tokio::time::interval(Duration::from_millis(10));
    loop {
        retry.tick().await;
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()
                   AND NOT pid = ANY($2)",
                &[&pattern, &known],
            )
            .await
            .expect("pg_stat_activity is readable");
        if let Some(row) = rows.first() {
            return row.get(0);
        }
    }
}

/// Waits until a backend of `schema` waits on a lock, and terminates it.
async fn terminate_waiting_backend(admin: &tokio_postgres::Client, schema: &str) {
    let pid = backend_waiting_on_a_lock(admin, schema, &[]).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminates the backend");
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

#[tokio::test]
async fn a_trim_waiting_to_delete_does_not_hold_up_appends() {
    tokio::time::timeout(LIMIT, async {
        let schema = format!("trim_{}", std::process::id());
        let hub = HubName::new("trim").expect("valid hub");
        let backplane = PgBackplane::connect_with(options(&schema).await)
            .await
            .expect("connects");
        let records: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i])).collect();
        let start = backplane.append(&hub, 0, &records).await.expect("appends");
        // Another session locks an entry the trim will delete: the trim's delete waits for it.
        let locker = admin().await;
        locker
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM \"{schema}\".log WHERE \"offset\" = {} FOR UPDATE",
                start.offset + 3
            ))
            .await
            .expect("locks an entry");
        let trim = tokio::spawn({
            let backplane = backplane.clone();
            async move {
                let retention = Retention {
                    max_entries: 2,
                    ..Retention::default()
                };
                backplane.trim(&retention).await
            }
        });
        let watcher = admin().await;
        let trimmer = backend_waiting_on_a_lock(&watcher, &schema, &[]).await;
        // While the trim waits, an append to the same stream goes through: it would wait too if
        // the trim held the stream row while deleting.
        let during = [Bytes::from_static(b"during")];
        let known = [trimmer];
        let append = backplane.append(&hub, 0, &during);
        tokio::select! {
            appended = append => {
                let at = appended.expect("appends while the trim waits");
                assert_eq!(at.offset, start.offset + 10);
            }
            pid = backend_waiting_on_a_lock(&watcher, &schema, &known) => {
                panic!("the append (backend {pid}) waits for the trim");
            }
        }
        locker.batch_execute("ROLLBACK").await.expect("unlocks");
        let removed = trim
            .await
            .expect("the trim task ends")
            .expect("the trim succeeds");
        assert_eq!(
            removed, 8,
            "all but the last two entries at the time of the trim"
        );
        let err = backplane
            .read(&hub, start, 100)
            .await
            .expect_err("the trimmed entries are gone");
        assert!(matches!(err, Error::PositionTooOld { .. }), "{err}");
        let kept = backplane
            .read(&hub, start.at(start.offset + 8), 100)
            .await
            .expect("reads what was kept");
        let data: Vec<&[u8]> = kept.iter().map(|e| e.data.as_ref()).collect();
        assert_eq!(
            data,
            [[8u8].as_slice(), [9u8].as_slice(), b"during".as_slice()]
        );
    })
    .await
    .expect("the test finishes in time");
}
