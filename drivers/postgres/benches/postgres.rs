//! Cross-node throughput and latency of the PostgreSQL driver, beside the database's own raw
//! ceiling measured in the same run on the same cluster.
//!
//! ```text
//! cargo bench -p backplane-postgres --bench postgres
//! ```
//!
//! Uses `BACKPLANE_TEST_PG_URL` when set, otherwise a throwaway cluster. `BENCH_MESSAGES`
//! (default 100 000) sets the messages per throughput run, `BENCH_SENDERS` (default 512) the
//! concurrent senders on the publishing node. `BENCH_FILTER` runs only the measurements whose
//! label contains it (e.g. `100 B  batching on`, `latency`).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane_core::{Connection, ConnectionId, HubName, Message, Node, NodeOptions};
use backplane_postgres::{PgBackplane, PgOptions};
use backplane_test_support::Cluster;
use bytes::Bytes;
use tokio_postgres::{AsyncMessage, NoTls};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn admin(url: &str) -> BenchResult<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// One-row INSERT + NOTIFY transactions per second, and rows per second of 100-row INSERTs,
/// each from one tight loop on one connection.
async fn raw_ceiling(url: &str, seconds: u64) -> BenchResult<(f64, f64)> {
    let client = admin(url).await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS bench_raw;
             CREATE TABLE bench_raw (id bigserial PRIMARY KEY, data bytea NOT NULL,
                                     created_at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
    let one = client
        .prepare(
            "WITH i AS (INSERT INTO bench_raw (data) VALUES ($1)) SELECT pg_notify('bench_raw', 'x')",
        )
        .await?;
    let payload = vec![b'x'; 100];
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tx = 0u64;
    while Instant::now() < until {
        client.query(&one, &[&payload]).await?;
        tx += 1;
    }
    let tx_per_s = tx as f64 / started.elapsed().as_secs_f64();

    let hundred = client
        .prepare("INSERT INTO bench_raw (data) SELECT d FROM unnest($1::bytea[]) AS t(d)")
        .await?;
    let rows: Vec<&[u8]> = (0..100).map(|_| payload.as_slice()).collect();
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut inserted = 0u64;
    while Instant::now() < until {
        inserted += client.execute(&hundred, &[&rows]).await?;
    }
    let rows_per_s = inserted as f64 / started.elapsed().as_secs_f64();
    client.batch_execute("DROP TABLE bench_raw").await?;
    Ok((tx_per_s, rows_per_s))
}

/// Round trips of a NOTIFY from one connection to a LISTEN on another, in microseconds.
async fn notify_round_trips(url: &str, count: usize) -> BenchResult<Vec<f64>> {
    let (listener, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(_) = message {
                let _ = tx.send(Instant::now());
            }
        }
    });
    listener.batch_execute("LISTEN bench_rtt").await?;
    let sender = admin(url).await?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        sender
            .execute("SELECT pg_notify('bench_rtt', 'x')", &[])
            .await?;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await?
            .ok_or("listener ended")?;
        out.push(got.duration_since(sent).as_secs_f64() * 1e6);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Cluster4 {
    nodes: Vec<Node>,
    receivers: Vec<Connection>,
    hub: HubName,
}

async fn cluster(url: &str, schema: &str, batch_delay: Duration) -> BenchResult<Cluster4> {
    let hub = HubName::new("bench")?;
    let mut nodes = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..4 {
        let options = PgOptions::from_str(url)?
            .schema(schema)
            .batch_delay(batch_delay)
            .pool_size(16);
        let backplane = PgBackplane::connect_with(options).await?;
        let node = Node::start(
            Arc::new(backplane),
            NodeOptions::new().connection_buffer(1 << 22),
        )
        .await?;
        if i > 0 {
            receivers.push(node.connect(&hub, None, None).await?);
        }
        nodes.push(node);
    }
    Ok(Cluster4 {
        nodes,
        receivers,
        hub,
    })
}

/// `size` bytes that do not compress, like encrypted or already compressed content: the
/// database cannot make them smaller than they are (xorshift64*, seeded per message).
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Checks one subscriber got every message exactly once and in per-sender order.
fn verify(received: &[Bytes], senders: usize, per_sender: usize) -> (usize, usize, usize) {
    let mut next = vec![0usize; senders];
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    let mut out_of_order = 0;
    for payload in received {
        let (s, i) = (
            usize::from(payload[0]) << 8 | usize::from(payload[1]),
            (usize::from(payload[2]) << 16)
                | (usize::from(payload[3]) << 8)
                | usize::from(payload[4]),
        );
        *seen.entry((s, i)).or_default() += 1;
        if s < senders {
            if i != next[s] {
                out_of_order += 1;
            }
            next[s] = i + 1;
        }
    }
    let duplicated = seen.values().filter(|n| **n > 1).count();
    let lost = senders * per_sender - seen.len();
    (lost, duplicated, out_of_order)
}

/// Messages per second delivered to each of three subscriber nodes, published by `senders`
/// concurrent senders on the first node.
async fn throughput(
    url: &str,
    schema: &str,
    size: usize,
    total: usize,
    senders: usize,
    batch_delay: Duration,
) -> BenchResult<(f64, (usize, usize, usize))> {
    let mut c = cluster(url, schema, batch_delay).await?;
    let per_sender = total / senders;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (node, hub) = (c.nodes[0].clone(), c.hub.clone());
        let sender = ConnectionId::new(format!("sender-{s}"))?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_sender {
                let mut payload = noise(size, (s as u64) << 32 | i as u64);
                payload[..5].copy_from_slice(&[
                    (s >> 8) as u8,
                    s as u8,
                    (i >> 16) as u8,
                    (i >> 8) as u8,
                    i as u8,
                ]);
                node.publish(Message::to_all(hub.clone(), payload).sender(sender.clone()))
                    .await?;
            }
            Ok::<(), backplane_core::Error>(())
        }));
    }
    let expected = per_sender * senders;
    let mut receiving = Vec::new();
    for mut receiver in std::mem::take(&mut c.receivers) {
        receiving.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(expected);
            while got.len() < expected {
                match tokio::time::timeout(Duration::from_secs(30), receiver.recv()).await {
                    Ok(Some(d)) => got.push(d.payload),
                    _ => break,
                }
            }
            (got, Instant::now())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut rates = Vec::new();
    let mut check = (0, 0, 0);
    for r in receiving {
        let (got, done) = r.await?;
        let (lost, dup, ooo) = verify(&got, senders, per_sender);
        check = (check.0 + lost, check.1 + dup, check.2 + ooo);
        rates.push(got.len() as f64 / done.duration_since(started).as_secs_f64());
    }
    for node in &c.nodes {
        node.shutdown().await;
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    Ok((mean, check))
}

/// Publish-to-delivery latency at a fixed rate, in microseconds, measured at one subscriber.
async fn latency(url: &str, schema: &str, rate: u64, seconds: u64) -> BenchResult<Vec<f64>> {
    let mut c = cluster(url, schema, Duration::from_millis(1)).await?;
    let origin = Instant::now();
    let total = rate * seconds;
    let mut receiver = c.receivers.remove(0);
    let collect = tokio::spawn(async move {
        let mut samples = Vec::new();
        while (samples.len() as u64) < total {
            match tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await {
                Ok(Some(d)) => {
                    let mut sent = [0u8; 8];
                    sent.copy_from_slice(&d.payload[..8]);
                    let sent = Duration::from_nanos(u64::from_le_bytes(sent));
                    samples.push((origin.elapsed() - sent).as_secs_f64() * 1e6);
                }
                _ => break,
            }
        }
        samples
    });
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / u32::try_from(rate)?);
    let sender = ConnectionId::new("latency")?;
    for _ in 0..total {
        ticks.tick().await;
        let mut payload = vec![b'x'; 100];
        payload[..8].copy_from_slice(&(origin.elapsed().as_nanos() as u64).to_le_bytes());
        c.nodes[0]
            .publish(Message::to_all(c.hub.clone(), payload).sender(sender.clone()))
            .await?;
    }
    let mut samples = collect.await?;
    for node in &c.nodes {
        node.shutdown().await;
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

async fn run() -> BenchResult<()> {
    let cluster;
    let url = match std::env::var("BACKPLANE_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            cluster = tokio::task::spawn_blocking(Cluster::start).await??;
            cluster.url()
        }
    };
    let total: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let senders: usize = std::env::var("BENCH_SENDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
        .clamp(1, 65_535);

    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let wanted = |label: &str| label.contains(filter.as_str());

    println!("raw ceiling (one connection, tight loops, 3 s each)");
    let (tx_per_s, rows_per_s) = raw_ceiling(&url, 3).await?;
    println!("  one-row INSERT + NOTIFY      {tx_per_s:>10.0} tx/s");
    println!("  100-row INSERT               {rows_per_s:>10.0} rows/s");
    let mut rtt = notify_round_trips(&url, 2000).await?;
    rtt.sort_by(f64::total_cmp);
    println!(
        "  NOTIFY round trip            p50 {:>7.0} us   p99 {:>7.0} us",
        percentile(&rtt, 50.0),
        percentile(&rtt, 99.0)
    );

    println!(
        "\ncross-node throughput: 1 publishing node -> 3 subscriber nodes, {senders} senders, {total} messages"
    );
    let mut run = 0;
    for size in [100usize, 4096] {
        for (label, delay) in [
            ("batching on ", Duration::from_millis(1)),
            ("batching off", Duration::ZERO),
        ] {
            run += 1;
            if !wanted(&format!("{size} B  {label}")) {
                continue;
            }
            let schema = format!("bench_{}_{run}", std::process::id());
            let (rate, (lost, dup, ooo)) =
                throughput(&url, &schema, size, total, senders, delay).await?;
            println!(
                "  {size:>5} B  {label}  {rate:>9.0} msg/s per subscriber   {:>5.1}x one-row tx/s   {:>5.1}% of 100-row rows/s   lost {lost} dup {dup} out-of-order {ooo}",
                rate / tx_per_s,
                100.0 * rate / rows_per_s
            );
        }
    }

    if !wanted("latency") {
        return Ok(());
    }
    println!("\nlatency at 1 000 msg/s for 5 s, publish -> delivery on another node");
    let schema = format!("bench_{}_latency", std::process::id());
    let samples = latency(&url, &schema, 1000, 5).await?;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "  p50 {p50:>7.0} us   p99 {p99:>7.0} us   ({} samples; p99 - NOTIFY p99 = {:.0} us)",
        samples.len(),
        p99 - percentile(&rtt, 99.0)
    );
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(err) = runtime.block_on(run()) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
