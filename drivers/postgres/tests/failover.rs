//! A failover to an asynchronous standby that missed the primary's last commits, on real
//! throwaway clusters (`pg_basebackup`, `pg_ctl promote`): the log goes back in time with the
//! same epoch. The nodes, which reach the database through a two-host URL as behind a failover
//! address, notice it, and deliver what the promoted server accepts from then on, once each;
//! nothing they delivered before the failover is delivered again.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use backplane_conformance::{WAIT, connect, sentinel, test_options, wait_event};
use backplane_core::{Error, HubName, Message, Node, NodeEvent, SharedBackplane};
use backplane_postgres::{PgBackplane, PgOptions};
use backplane_test_support::Cluster;
use tokio_postgres::NoTls;

/// The test finishes well within this, or fails.
const LIMIT: Duration = Duration::from_secs(120);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking task ends")
        .expect("the cluster operation succeeds")
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connects to the cluster");
    tokio::spawn(connection);
    client
}

/// Waits until `standby` has replayed everything `primary` has written so far.
async fn caught_up(primary: &str, standby: &str) {
    let primary = client(primary).await;
    let standby = client(standby).await;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("reads the primary's position")
        .get(0);
    let mut retry = tokio::time::interval(Duration::from_millis(20));
    loop {
        retry.tick().await;
        let replayed: bool = standby
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&lsn],
            )
            .await
            .expect("reads the standby's position")
            .get(0);
        if replayed {
            return;
        }
    }
}

/// Publishes `text` to the whole hub from `node`, again while the driver still reconnects
/// (a transient error: nothing was written). Any other error fails the test.
async fn publish(node: &Node, hub: &HubName, text: &str) {
    let mut retry = tokio::time::interval(Duration::from_millis(50));
    loop {
        match node
            .publish(Message::to_all(hub.clone(), text.to_owned()))
            .await
        {
            Ok(_) => return,
            Err(err @ (Error::Driver { .. } | Error::Timeout(_))) if err.is_transient() => {
                retry.tick().await;
            }
            Err(err) => panic!("publishing {text:?} failed: {err}"),
        }
    }
}

#[tokio::test]
async fn promoting_a_standby_that_missed_commits_is_noticed_by_every_node() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    tokio::time::timeout(LIMIT, async {
        let primary = Arc::new(blocking(Cluster::start).await);
        let standby = Arc::new(
            blocking({
                let primary = primary.clone();
                move || primary.standby()
            })
            .await,
        );
        let url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
            primary.port(),
            standby.port()
        );
        let node = |url: String| async move {
            let options = PgOptions::from_str(&url)
                .expect("valid url")
                .schema("failover")
                .pool_size(4)
                .listener_check(Duration::from_millis(500));
            let backplane: SharedBackplane = Arc::new(
                PgBackplane::connect_with(options)
                    .await
                    .expect("connects"),
            );
            // Nodes stay registered through the outage: this test is about the log.
            Node::start(
                backplane,
                test_options().connection_timeout(Duration::from_secs(60)),
            )
            .await
            .expect("the node starts")
        };
        let a = node(url.clone()).await;
        let b = node(url.clone()).await;
        let hub = HubName::new("failover").expect("valid hub");
        // A connection on each node, so both read the hub's log.
        let mut on_a = connect(&a, &hub, None).await.expect("connects on A");
        let mut receiver = connect(&b, &hub, None).await.expect("connects on B");

        // Three messages reach the standby, two more only the primary.
        for text in ["m1", "m2", "m3"] {
            publish(&a, &hub, text).await;
            receiver.expect(text.as_bytes()).await.expect("delivered");
            on_a.expect(text.as_bytes()).await.expect("delivered");
        }
        caught_up(&primary.url(), &standby.url()).await;
        blocking({
            let standby = standby.clone();
            move || standby.stop()
        })
        .await;
        for text in ["m4", "m5"] {
            publish(&a, &hub, text).await;
            receiver.expect(text.as_bytes()).await.expect("delivered");
            on_a.expect(text.as_bytes()).await.expect("delivered");
        }
        let mut a_events = a.events();
        let mut b_events = b.events();
        blocking({
            let primary = primary.clone();
            move || primary.crash()
        })
        .await;
        blocking({
            let standby = standby.clone();
            move || {
                standby.restart()?;
                standby.promote()
            }
        })
        .await;

        // The promoted server has m1-m3 only, under the same epoch.
        for text in ["m6", "m7", "m8"] {
            publish(&a, &hub, text).await;
        }
        for events in [&mut a_events, &mut b_events] {
            wait_event(events, WAIT, |e| {
                matches!(e, NodeEvent::LogRewound { hub: h, .. } if h == &hub)
            })
            .await
            .expect("the node notices the log went back in time");
        }
        let marker = sentinel(&a, &hub, &[&on_a, &receiver])
            .await
            .expect("sentinel");
        for client in [&mut on_a, &mut receiver] {
            for text in ["m6", "m7", "m8"] {
                client
                    .expect(text.as_bytes())
                    .await
                    .expect("delivered once, after the failover");
            }
            client
                .quiet_until(&marker)
                .await
                .expect("nothing delivered twice");
        }
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("the test finishes in time");
}
