//! A bounded queue from many senders to one receiver that holds no memory while it is empty.
//!
//! Every connection has queues (its deliveries, what its writer sends), and most connections
//! are idle most of the time. A `tokio::sync::mpsc` channel allocates a block of slots when it
//! is created and keeps it; this queue starts empty, grows with what is queued and gives its
//! memory back once drained, so an idle connection pays for a few words per queue.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Past this many slots, a drained queue frees its buffer.
const KEEP_SLOTS: usize = 16;

/// Creates a queue that holds at most `capacity` items (at least 1).
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver: None,
            senders_waiting: Vec::new(),
            receiver_gone: false,
            senders_gone: false,
        }),
        senders: AtomicUsize::new(1),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    senders: AtomicUsize,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver, waiting for an item.
    receiver: Option<Waker>,
    /// Senders waiting for room.
    senders_waiting: Vec<Waker>,
    receiver_gone: bool,
    senders_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while the lock is held cannot leave the state inconsistent: every critical
        // section is a push, a pop or a flag.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Sender::try_send`] did not queue an item; the item comes back.
#[derive(PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "Full(..)",
            Self::Closed(_) => "Closed(..)",
        })
    }
}

/// The receiver is gone; the item comes back.
#[derive(PartialEq, Eq)]
pub struct SendError<T>(pub T);

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

/// The sending side; clones send to the same queue.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] or [`TrySendError::Closed`], with the item.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return Err(TrySendError::Closed(item));
        }
        if state.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        state.items.push_back(item);
        let receiver = state.receiver.take();
        drop(state);
        if let Some(waker) = receiver {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room while the queue is full.
    ///
    /// # Errors
    ///
    /// [`SendError`] with the item when the receiver is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled send queued nothing.
    pub async fn send(&self, item: T) -> Result<(), SendError<T>> {
        let mut item = Some(item);
        poll_fn(|cx| {
            let mut state = self.shared.lock();
            let Some(value) = item.take() else {
                return Poll::Ready(Ok(()));
            };
            if state.receiver_gone {
                return Poll::Ready(Err(SendError(value)));
            }
            if state.items.len() >= self.shared.capacity {
                if !state
                    .senders_waiting
                    .iter()
                    .any(|w| w.will_wake(cx.waker()))
                {
                    state.senders_waiting.push(cx.waker().clone());
                }
                item = Some(value);
                return Poll::Pending;
            }
            state.items.push_back(value);
            let receiver = state.receiver.take();
            drop(state);
            if let Some(waker) = receiver {
                waker.wake();
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Whether the receiver is gone or the queue was closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }

    /// Closes the queue for every sender: later sends fail with `Closed`, and the receiver
    /// gets what is queued, then `None`.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        // The receiver sees the end, as if every sender were gone; senders see a closed
        // queue, as if the receiver were gone.
        state.senders_gone = true;
        state.receiver_gone = true;
        let receiver = state.receiver.take();
        let waiting = std::mem::take(&mut state.senders_waiting);
        drop(state);
        for waker in receiver.into_iter().chain(waiting) {
            waker.wake();
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut state = self.shared.lock();
        state.senders_gone = true;
        let receiver = state.receiver.take();
        drop(state);
        if let Some(waker) = receiver {
            waker.wake();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// The receiving side.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item, or `None` once every sender is gone and the queue is drained.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call took nothing.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next item; see [`Receiver::recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        match self.pop(&mut state) {
            Some(item) => Poll::Ready(Some(item)),
            None if state.senders_gone => Poll::Ready(None),
            None => {
                match &mut state.receiver {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// An item that is already queued, if any.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut state = self.shared.lock();
        self.pop(&mut state)
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pop(&self, state: &mut MutexGuard<'_, State<T>>) -> Option<T> {
        let item = state.items.pop_front()?;
        if state.items.is_empty() && state.items.capacity() > KEEP_SLOTS {
            state.items = VecDeque::new();
        }
        if !state.senders_waiting.is_empty() {
            // Room for one more: every waiting sender tries again (few ever wait).
            for waker in std::mem::take(&mut state.senders_waiting) {
                waker.wake();
            }
        }
        Some(item)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_gone = true;
        let items = std::mem::take(&mut state.items);
        let waiting = std::mem::take(&mut state.senders_waiting);
        drop(state);
        drop(items);
        for waker in waiting {
            waker.wake();
        }
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_closed_queue_hands_over_what_it_holds_then_ends() {
        let (tx, mut rx) = bounded(4);
        let other = tx.clone();
        tx.try_send(1).unwrap();
        let received = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        other.try_send(2).unwrap();
        tx.close();
        assert_eq!(other.try_send(3), Err(TrySendError::Closed(3)));
        assert!(other.is_closed());
        // The receiver sees the end although senders remain.
        let got = tokio::time::timeout(LIMIT, received)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![1, 2]);
    }

    #[tokio::test]
    async fn items_arrive_in_order_and_the_end_is_reported() {
        let (tx, mut rx) = bounded(4);
        let other = tx.clone();
        tx.try_send(1).unwrap();
        other.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.recv().await, Some(2));
        drop(tx);
        assert!(rx.try_recv().is_none());
        other.try_send(3).unwrap();
        drop(other);
        // Queued items outlive the senders.
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_dropped_receiver_closes() {
        let (tx, rx) = bounded(2);
        tx.try_send("a").unwrap();
        tx.try_send("b").unwrap();
        assert_eq!(tx.try_send("c"), Err(TrySendError::Full("c")));
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send("d"), Err(TrySendError::Closed("d")));
        assert_eq!(tx.send("e").await, Err(SendError("e")));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_from_another_task() {
        let (tx, mut rx) = bounded(1);
        let receiver = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        let got = tokio::time::timeout(LIMIT, receiver)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, Some(7));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_when_the_last_sender_goes() {
        let (tx, mut rx) = bounded::<u8>(1);
        let receiver = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        drop(tx);
        let got = tokio::time::timeout(LIMIT, receiver)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, None);
    }

    #[tokio::test]
    async fn send_waits_for_room_then_every_item_arrives_once_in_order() {
        let (tx, mut rx) = bounded(2);
        let senders: Vec<_> = (0..3u32)
            .map(|s| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for i in 0..200u32 {
                        tx.send((s, i)).await.unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u32; 3];
        let received = tokio::time::timeout(LIMIT, async {
            let mut n = 0;
            while let Some((s, i)) = rx.recv().await {
                assert_eq!(next[s as usize], i, "sender {s} out of order");
                next[s as usize] += 1;
                n += 1;
            }
            n
        })
        .await
        .unwrap();
        assert_eq!(received, 600);
        for sender in senders {
            sender.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = bounded(1000);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(rx.len(), 500);
        assert!(rx.shared.lock().items.capacity() >= 500);
        while rx.try_recv().is_some() {}
        assert!(rx.is_empty());
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }

    #[tokio::test]
    async fn dropping_the_receiver_wakes_a_waiting_sender() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let sender = tokio::spawn(async move { tx.send(2).await });
        tokio::task::yield_now().await;
        drop(rx);
        let got = tokio::time::timeout(LIMIT, sender).await.unwrap().unwrap();
        assert_eq!(got, Err(SendError(2)));
    }
}
