//! `/metrics` of two nodes on one PostgreSQL: database call times, the connection pool, and
//! the lag of log entries read from the other node.

mod common;

use std::sync::Arc;
use std::time::Duration;

use backplane_core::{Node, NodeOptions};
use backplane_postgres::PgBackplane;
use backplane_server::{Running, Security, Server, chat};
use backplane_test_support::test_database_url;
use common::{RawClient, http};

async fn node(url: &str) -> Running {
    let backplane = PgBackplane::connect(url)
        .await
        .expect("the backplane connects");
    let node = Node::start(Arc::new(backplane), NodeOptions::new())
        .await
        .expect("a node");
    Server::new(node)
        .hub(chat::hub())
        .security(Security {
            allow_anonymous: true,
            ..Security::default()
        })
        .bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("the server binds")
}

/// The value of the sample that starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix:?} in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_database_time_pool_and_log_lag() {
    let url = test_database_url("metrics_test")
        .await
        .expect("PostgreSQL is needed for this test");
    let a = node(&url).await;
    let b = node(&url).await;

    let mut receiver = RawClient::connect(b.local_addr(), "chat", "bea").await;
    let mut sender = RawClient::connect(a.local_addr(), "chat", "al").await;
    sender
        .send(
            br#"{"type":1,"invocationId":"1","target":"SendMessage","arguments":["over the log"]}"#,
        )
        .await;
    loop {
        let message = tokio::time::timeout(common::WAIT, receiver.next_message())
            .await
            .expect("the message in time")
            .expect("a message");
        if message["target"] == "ReceiveMessage" {
            assert_eq!(message["arguments"][1], "over the log");
            break;
        }
    }

    let (status, metrics) = http(b.local_addr(), "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    // B read A's entry from the log: one lag sample at least, well under a minute.
    assert!(sample(&metrics, "backplane_log_lag_seconds_count") >= 1.0);
    assert!(sample(&metrics, "backplane_log_lag_seconds_sum") < 60.0);
    assert!(
        sample(
            &metrics,
            "backplane_backplane_call_seconds_count{operation=\"read\",outcome=\"ok\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &metrics,
            "backplane_backplane_call_seconds_count{operation=\"add_connection\",outcome=\"ok\"}"
        ) >= 1.0
    );
    assert!(sample(&metrics, "backplane_pool_max_connections") >= 1.0);
    assert!(sample(&metrics, "backplane_pool_connections{state=\"idle\"}") >= 0.0);
    assert!(sample(&metrics, "backplane_pool_connections{state=\"in_use\"}") >= 0.0);
    assert_eq!(sample(&metrics, "backplane_pool_waiting"), 0.0);

    // A appended it; A read nothing from B.
    let (_, metrics) = http(a.local_addr(), "GET", "/metrics", &[]).await;
    assert!(
        sample(
            &metrics,
            "backplane_backplane_call_seconds_count{operation=\"append\",outcome=\"ok\"}"
        ) >= 1.0
    );

    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
}
