//! One queue per log stream, each drained by a task started with it: a driver's append
//! batchers, a node's publish pipelines.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::name::HubName;

/// The queues of `(hub, stream)` pairs, made on first use.
#[derive(Debug)]
pub struct StreamQueues<T> {
    queues: Mutex<HashMap<(HubName, u32), mpsc::Sender<T>>>,
    capacity: usize,
}

impl<T> StreamQueues<T> {
    /// No queues yet; each holds `capacity` items.
    pub fn new(capacity: usize) -> Self {
        Self {
            queues: Mutex::default(),
            capacity,
        }
    }

    /// The queue of `stream` of `hub`. The first call makes it and hands its receiver to
    /// `start` (which spawns the task that drains it), outside the map's lock.
    pub fn get(
        &self,
        hub: &HubName,
        stream: u32,
        start: impl FnOnce(mpsc::Receiver<T>),
    ) -> mpsc::Sender<T> {
        let (tx, rx) = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(tx) = queues.get(&(hub.clone(), stream)) {
                return tx.clone();
            }
            let (tx, rx) = mpsc::channel(self.capacity);
            queues.insert((hub.clone(), stream), tx.clone());
            (tx, rx)
        };
        start(rx);
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::StreamQueues;
    use crate::HubName;

    #[tokio::test]
    async fn each_stream_gets_one_queue_started_once() {
        let queues = StreamQueues::<u32>::new(4);
        let hub = HubName::new("h").expect("a name");
        let mut started = Vec::new();
        let first = queues.get(&hub, 0, |rx| started.push(rx));
        let again = queues.get(&hub, 0, |rx| started.push(rx));
        let other = queues.get(&hub, 1, |rx| started.push(rx));
        assert_eq!(started.len(), 2, "one start per stream");
        first.send(1).await.expect("open");
        again.send(2).await.expect("open");
        other.send(3).await.expect("open");
        assert_eq!(started[0].recv().await, Some(1));
        assert_eq!(started[0].recv().await, Some(2));
        assert_eq!(started[1].recv().await, Some(3));
    }
}
