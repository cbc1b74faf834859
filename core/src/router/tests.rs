//! Tests of the router's internals that no public API can drive step by step.

use std::sync::Arc;

use bytes::Bytes;

use super::{Delivery, DeliveryKind, Node, NodeOptions};
use crate::{HubName, MemoryBackplane, Message, UserId};

async fn node(options: NodeOptions) -> Node {
    Node::start(Arc::new(MemoryBackplane::new()), options)
        .await
        .expect("a node")
}

fn message(text: &str) -> Delivery {
    Delivery {
        payload: Bytes::copy_from_slice(text.as_bytes()),
        kind: DeliveryKind::Message,
    }
}

/// Two deliveries to one connection with nothing in between that lets the spawned disconnect
/// of a slow consumer run (one thread, no await): the one after the gap must not arrive.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_consumer_gets_nothing_after_the_gap() {
    let node = node(NodeOptions::new().connection_buffer(2)).await;
    let hub = HubName::new("chat").expect("valid");
    let mut connection = node.connect(&hub, None, None).await.expect("connected");
    let state = node.existing_hub(&hub).expect("the hub");
    let tx = state
        .read()
        .connections
        .get(&connection.id)
        .map(|c| c.tx.clone())
        .expect("indexed");
    let id = connection.id.clone();
    assert_eq!(node.try_deliver(&hub, &id, &tx, message("0")), None);
    assert_eq!(node.try_deliver(&hub, &id, &tx, message("1")), None);
    assert!(
        node.try_deliver(&hub, &id, &tx, message("2")).is_some(),
        "full"
    );
    // The client makes room before the node has unregistered it.
    assert_eq!(
        connection.try_recv().map(|d| d.payload),
        Some(Bytes::from("0"))
    );
    assert!(
        node.try_deliver(&hub, &id, &tx, message("3")).is_some(),
        "a message after the gap was queued"
    );
    assert_eq!(
        connection.try_recv().map(|d| d.payload),
        Some(Bytes::from("1"))
    );
    assert_eq!(
        connection.recv().await,
        None,
        "the connection ends after the gap"
    );
    node.shutdown().await;
}

/// A connection that receives and acknowledges many durable messages keeps no memory of
/// them, and what it keeps of unacknowledged ones is bounded.
#[tokio::test]
async fn durable_claims_are_released_and_bounded() {
    let node = node(NodeOptions::new().connection_buffer(100_000)).await;
    let hub = HubName::new("chat").expect("valid");
    let user = UserId::new("ada").expect("valid");
    let mut connection = node
        .connect(&hub, None, Some(user.clone()))
        .await
        .expect("connected");
    let claims = |node: &Node| {
        let state = node.existing_hub(&hub).expect("the hub");
        let index = state.read();
        index
            .connections
            .values()
            .map(|c| c.durable.len())
            .sum::<usize>()
    };
    for i in 0..100 {
        node.publish(
            Message::to_user(hub.clone(), user.clone(), i.to_string())
                .durable(std::time::Duration::from_secs(600)),
        )
        .await
        .expect("published");
        let delivery = connection.recv().await.expect("delivered");
        let DeliveryKind::Durable(id) = delivery.kind else {
            panic!("not durable: {delivery:?}");
        };
        assert!(
            node.acknowledge(&hub, &connection.id, id)
                .await
                .expect("acknowledged")
        );
    }
    assert_eq!(
        claims(&node),
        0,
        "acknowledged messages are still remembered"
    );

    let capacity = super::local::Claims::CAPACITY;
    for i in 0..capacity + 10 {
        node.publish(
            Message::to_user(hub.clone(), user.clone(), i.to_string())
                .durable(std::time::Duration::from_secs(600)),
        )
        .await
        .expect("published");
    }
    assert_eq!(claims(&node), capacity);
    node.shutdown().await;
}
