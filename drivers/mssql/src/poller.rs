//! Wake-ups without LISTEN/NOTIFY: one connection per backplane handle polls the `next_offset`
//! of the subscribed hubs' streams, fast while appends keep coming and backing off when idle.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backplane_core::{HubName, WakeupHub, Wakeups};
use tiberius::{Query, Row};
use tokio::sync::{Notify, watch};

use crate::conn::{Conn, Connector, need};
use crate::sql;
use crate::tables::TableSet;

/// What the poller and the backplane share.
#[derive(Debug, Default)]
pub(crate) struct PollState {
    pub(crate) wakeups: WakeupHub,
    subscriptions: Mutex<Subscriptions>,
    /// Wakes the poller early: a new subscription, or an append by this node (the system is
    /// busy).
    fast: Notify,
}

#[derive(Debug, Default)]
struct Subscriptions {
    generation: u64,
    hubs: BTreeMap<HubName, Arc<TableSet>>,
}

impl PollState {
    /// A subscription to `hub`; the hub is polled from now on.
    pub(crate) fn subscribe(&self, hub: &HubName, set: Arc<TableSet>) -> Wakeups {
        let wakeups = self.wakeups.subscribe(hub);
        let mut subscriptions = self
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !subscriptions.hubs.contains_key(hub) {
            subscriptions.hubs.insert(hub.clone(), set);
            subscriptions.generation += 1;
            self.fast.notify_one();
        }
        wakeups
    }

    /// An append by this node: its own subscribers wake at once, and the poller speeds up.
    pub(crate) fn appended(&self, hub: &HubName, stream: u32) {
        self.wakeups.notify(hub, stream);
        self.fast.notify_one();
    }

    fn snapshot(&self) -> (u64, Vec<(HubName, Arc<TableSet>)>) {
        let subscriptions = self
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (
            subscriptions.generation,
            subscriptions
                .hubs
                .iter()
                .map(|(hub, set)| (hub.clone(), set.clone()))
                .collect(),
        )
    }
}

/// The poll of `hubs`: one `SELECT` per table set, joined by `UNION ALL`.
fn poll_query(hubs: &[(HubName, Arc<TableSet>)]) -> String {
    let mut by_set: Vec<(&Arc<TableSet>, Vec<&str>)> = Vec::new();
    for (hub, set) in hubs {
        match by_set.iter_mut().find(|(s, _)| Arc::ptr_eq(s, set)) {
            Some((_, names)) => names.push(hub.as_str()),
            None => by_set.push((set, vec![hub.as_str()])),
        }
    }
    by_set
        .iter()
        .map(|(set, names)| sql::poll_hubs(&set.sql, names))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// The next pause: the shortest after a poll that found appends, otherwise twice the last, up
/// to the longest.
pub(crate) fn next_interval(
    current: Duration,
    changed: bool,
    min: Duration,
    max: Duration,
) -> Duration {
    if changed {
        min
    } else {
        current.saturating_mul(2).clamp(min, max)
    }
}

/// Compares a poll's rows with what was seen before; returns the `(hub, stream)` pairs that
/// grew. A stream of a hub polled for the first time only sets the baseline (the hub is told to
/// resync instead); a stream that appears in a hub already polled counts as grown.
fn changes(
    rows: &[Row],
    seen: &mut HashMap<(HubName, u32), i64>,
    fresh: &HashSet<HubName>,
) -> Vec<(HubName, u32)> {
    let mut grown = Vec::new();
    for row in rows {
        let context = "polling for appends";
        let (Ok(hub), Ok(stream), Ok(next)) = (
            need::<&str>(row, 0, context),
            need::<i32>(row, 1, context),
            need::<i64>(row, 2, context),
        ) else {
            continue;
        };
        let (Ok(hub), Ok(stream)) = (HubName::new(hub), u32::try_from(stream)) else {
            continue;
        };
        let before = seen.insert((hub.clone(), stream), next);
        let grew = match before {
            Some(before) => before != next,
            None => !fresh.contains(&hub),
        };
        if grew {
            grown.push((hub, stream));
        }
    }
    grown
}

/// The polling task of one backplane handle.
pub(crate) struct Poller {
    pub(crate) connector: Connector,
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) state: Arc<PollState>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

impl Poller {
    /// Polls until the backplane is dropped. A lost connection is reopened with backoff, and
    /// every subscriber is then told to resync: nothing is lost, since readers read from their
    /// cursors.
    pub(crate) async fn run(mut self) {
        let mut conn: Option<Conn> = None;
        let mut backoff = RECONNECT_MIN;
        let mut healthy = true;
        let mut generation = None;
        let mut query = String::new();
        let mut known: HashSet<HubName> = HashSet::new();
        let mut fresh: HashSet<HubName> = HashSet::new();
        let mut seen: HashMap<(HubName, u32), i64> = HashMap::new();
        let mut interval = self.min;
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let Some(active) = conn.as_mut() else {
                match self.connector.open().await {
                    Ok(opened) => {
                        conn = Some(opened);
                        backoff = RECONNECT_MIN;
                        if !healthy {
                            tracing::info!("the poller reconnected");
                            self.state.wakeups.resync_all();
                            healthy = true;
                        }
                    }
                    Err(err) => {
                        if healthy {
                            tracing::warn!(error = %crate::error::describe(&err), "the poller lost its connection; reconnecting");
                        }
                        healthy = false;
                        if self.pause(backoff).await {
                            break;
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
                continue;
            };
            let (current, hubs) = self.state.snapshot();
            if generation != Some(current) {
                generation = Some(current);
                query = poll_query(&hubs);
                for (hub, _) in &hubs {
                    if known.insert(hub.clone()) {
                        fresh.insert(hub.clone());
                    }
                }
            }
            if query.is_empty() {
                tokio::select! {
                    _ = self.state.fast.notified() => continue,
                    _ = self.shutdown.changed() => break,
                }
            }
            match active
                .rows(Query::new(query.as_str()), "polling for appends")
                .await
            {
                Ok(rows) => {
                    let grown = changes(&rows, &mut seen, &fresh);
                    for (hub, stream) in &grown {
                        self.state.wakeups.notify(hub, *stream);
                    }
                    for hub in fresh.drain() {
                        self.state.wakeups.resync(&hub);
                    }
                    interval = next_interval(interval, !grown.is_empty(), self.min, self.max);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "polling failed; reconnecting");
                    conn = None;
                    healthy = false;
                    continue;
                }
            }
            // Until the next poll: an append by this node polls at once, a drop ends the task.
            let (fast, shutdown) = (&self.state.fast, &mut self.shutdown);
            let woken = tokio::time::timeout(interval, async {
                tokio::select! {
                    _ = fast.notified() => false,
                    _ = shutdown.changed() => true,
                }
            })
            .await;
            match woken {
                Ok(true) => break,
                Ok(false) => interval = self.min,
                Err(_) => {}
            }
        }
        self.state.wakeups.close_all();
    }

    /// Waits `pause`; `true` when the backplane was dropped meanwhile.
    async fn pause(&mut self, pause: Duration) -> bool {
        match tokio::time::timeout(pause, self.shutdown.changed()).await {
            Ok(_) => true,
            Err(_) => *self.shutdown.borrow(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiberius::{ColumnData, ColumnType};

    fn row(hub: &str, stream: i32, next: i64) -> Row {
        Row::builder()
            .column(
                "hub",
                ColumnType::NVarchar,
                ColumnData::String(Some(hub.to_owned().into())),
            )
            .column("stream", ColumnType::Int4, ColumnData::I32(Some(stream)))
            .column("next_offset", ColumnType::Int8, ColumnData::I64(Some(next)))
            .build()
    }

    fn hub(name: &str) -> HubName {
        HubName::new(name).expect("valid")
    }

    #[test]
    fn only_growth_wakes() {
        let mut seen = HashMap::new();
        let fresh: HashSet<HubName> = [hub("chat")].into();
        // The first poll of a hub sets the baseline.
        assert!(changes(&[row("chat", 0, 5), row("chat", 1, 0)], &mut seen, &fresh).is_empty());
        let none = HashSet::new();
        assert!(changes(&[row("chat", 0, 5), row("chat", 1, 0)], &mut seen, &none).is_empty());
        assert_eq!(
            changes(
                &[row("chat", 0, 7), row("chat", 1, 0), row("chat", 2, 1)],
                &mut seen,
                &none
            ),
            [(hub("chat"), 0), (hub("chat"), 2)]
        );
        // A trimmed or recreated stream moves too: anything but the same value wakes.
        assert_eq!(
            changes(&[row("chat", 0, 0)], &mut seen, &none),
            [(hub("chat"), 0)]
        );
        // Rows that are not valid names or streams are skipped, not fatal.
        assert!(
            changes(
                &[row("bad name", 0, 1), row("chat", -1, 1)],
                &mut seen,
                &none
            )
            .is_empty()
        );
    }

    #[test]
    fn interval_backs_off_and_snaps_back() {
        let (min, max) = (Duration::from_millis(2), Duration::from_millis(50));
        let mut interval = min;
        let mut seen = Vec::new();
        for _ in 0..7 {
            interval = next_interval(interval, false, min, max);
            seen.push(interval.as_millis());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50, 50]);
        assert_eq!(next_interval(interval, true, min, max), min);
    }

    #[test]
    fn one_select_per_table_set() {
        let options = crate::MssqlOptions::new("h", "u", "p");
        let shared = Arc::new(TableSet::new(crate::names::SetNames::shared(&options)));
        let own = Arc::new(TableSet::new(crate::names::SetNames::hub(&options, "x_1")));
        let query = poll_query(&[
            (hub("a"), shared.clone()),
            (hub("b"), shared),
            (hub("x"), own),
        ]);
        assert_eq!(
            query,
            "SELECT hub, stream, next_offset FROM [backplane].[streams] WHERE hub IN (N'a', N'b') UNION ALL SELECT hub, stream, next_offset FROM [backplane].[x_1_streams] WHERE hub IN (N'x')"
        );
        assert!(poll_query(&[]).is_empty());
    }
}
