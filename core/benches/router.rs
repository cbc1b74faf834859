//! Router throughput: fan-out to local connections, and delivery across two nodes through the
//! memory backplane, each beside a baseline measured in the same run.
//!
//! ```text
//! cargo bench -p backplane-core --bench router
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane_core::{Connection, HubName, MemoryBackplane, Message, Node, NodeOptions};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_main};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

const PAYLOAD: &[u8] = &[b'x'; 100];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the benchmark")
}

fn options() -> NodeOptions {
    NodeOptions::new().connection_buffer(1 << 20)
}

async fn drain(connections: &mut [Connection], expected_each: usize) {
    for connection in connections.iter_mut() {
        for _ in 0..expected_each {
            connection.recv().await.expect("connection open");
        }
    }
}

/// One broadcast to N connections on the publishing node, against handing the same payload to
/// N plain tokio channels.
fn local_fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("local_fanout");
    for n in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        let hub = HubName::new("bench").expect("valid hub");
        let (node, mut connections) = rt.block_on(async {
            let node = Node::start(Arc::new(MemoryBackplane::new()), options())
                .await
                .expect("node starts");
            let mut connections = Vec::new();
            for _ in 0..n {
                connections.push(node.connect(&hub, None, None).await.expect("connects"));
            }
            (node, connections)
        });
        group.bench_function(BenchmarkId::new("router", n), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        node.publish(Message::to_all(hub.clone(), Bytes::from_static(PAYLOAD)))
                            .await
                            .expect("publish");
                        for connection in connections.iter_mut() {
                            connection.try_recv().expect("delivered");
                        }
                    }
                    start.elapsed()
                })
            })
        });
        group.bench_function(BenchmarkId::new("tokio_mpsc_baseline", n), |b| {
            let channels: Vec<_> = (0..n).map(|_| mpsc::channel::<Bytes>(1024)).collect();
            let (senders, mut receivers): (Vec<_>, Vec<_>) = channels.into_iter().unzip();
            b.iter(|| {
                let payload = Bytes::from_static(PAYLOAD);
                for tx in &senders {
                    tx.try_send(payload.clone()).expect("room");
                }
                for rx in receivers.iter_mut() {
                    rx.try_recv().expect("sent");
                }
            })
        });
        rt.block_on(node.shutdown());
    }
    group.finish();
}

/// Messages published on node A and delivered to one connection on node B through the memory
/// backplane's log, against the same count through one local connection (no log).
fn cross_node(c: &mut Criterion) {
    const BATCH: usize = 1000;
    let rt = runtime();
    let mut group = c.benchmark_group("two_nodes");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(5));
    let hub = HubName::new("bench").expect("valid hub");
    let (a, b, mut remote, mut local) = rt.block_on(async {
        let backplane = Arc::new(MemoryBackplane::new());
        let a = Node::start(backplane.clone(), options()).await.expect("a");
        let b = Node::start(backplane, options()).await.expect("b");
        let remote = b.connect(&hub, None, None).await.expect("connects");
        let local = a.connect(&hub, None, None).await.expect("connects");
        (a, b, remote, local)
    });
    for (name, target) in [("through_log", &mut remote), ("local_baseline", &mut local)] {
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..BATCH {
                            a.publish(Message::to_connection(
                                hub.clone(),
                                target.id.clone(),
                                Bytes::from_static(PAYLOAD),
                            ))
                            .await
                            .expect("publish");
                        }
                        drain(std::slice::from_mut(target), BATCH).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
    group.finish();
}

mod group {
    #![allow(missing_docs)]
    use super::{cross_node, local_fanout};
    criterion::criterion_group!(benches, local_fanout, cross_node);
}

criterion_main!(group::benches);
