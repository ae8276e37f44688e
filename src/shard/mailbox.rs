//! A bounded crossbeam channel with a doorbell: the only way anything crosses shards.
//!
//! The receiving executor must not busy-poll, so the sender rings an `AtomicWaker`
//! after each push and the receiver parks on it when the channel is empty. The channel
//! is bounded in messages and in the bytes they carry (one message may hold a whole
//! SDP): a full mailbox is reported to the sender, who refuses the client's message
//! rather than letting memory grow, or keeps what must not be lost and tries again.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::Poll;

pub use crossbeam_channel::TrySendError;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures::task::AtomicWaker;

/// The heap bytes a message carries, which a mailbox counts against its byte limit.
pub trait Weigh {
    fn bytes(&self) -> usize;
}

/// Bytes in flight: added by senders, taken off by the receiver.
struct Budget {
    used: AtomicUsize,
    limit: usize,
}

pub struct MailboxSender<T> {
    /// `None` only while dropping: the channel must close before the bell rings.
    tx: Option<Sender<T>>,
    bell: Arc<AtomicWaker>,
    budget: Arc<Budget>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bell: self.bell.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl<T> Drop for MailboxSender<T> {
    /// A parked receiver must learn that the last sender is gone: close our end
    /// first, then ring, or it could look, find the channel still open, and sleep on.
    fn drop(&mut self) {
        drop(self.tx.take());
        self.bell.wake();
    }
}

pub struct Mailbox<T> {
    rx: Receiver<T>,
    bell: Arc<AtomicWaker>,
    budget: Arc<Budget>,
}

/// A mailbox holding at most `capacity` messages and, beyond the first, `bytes` bytes.
pub fn mailbox<T: Weigh>(capacity: usize, bytes: usize) -> (MailboxSender<T>, Mailbox<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(AtomicWaker::new());
    let budget = Arc::new(Budget {
        used: AtomicUsize::new(0),
        limit: bytes,
    });
    (
        MailboxSender {
            tx: Some(tx),
            bell: bell.clone(),
            budget: budget.clone(),
        },
        Mailbox { rx, bell, budget },
    )
}

impl<T: Weigh> MailboxSender<T> {
    /// Never blocks. `Err` gives the message back, saying whether the mailbox was
    /// full (of messages or of bytes) or its receiver gone.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let Some(tx) = &self.tx else {
            return Err(TrySendError::Disconnected(msg));
        };
        let bytes = msg.bytes();
        let before = self.budget.used.fetch_add(bytes, Relaxed);
        // An empty mailbox takes any one message, so a limit below the largest
        // message delays it instead of refusing it forever.
        if before > 0 && before + bytes > self.budget.limit {
            self.budget.used.fetch_sub(bytes, Relaxed);
            return Err(TrySendError::Full(msg));
        }
        if let Err(e) = tx.try_send(msg) {
            self.budget.used.fetch_sub(bytes, Relaxed);
            return Err(e);
        }
        self.bell.wake();
        Ok(())
    }

    /// Sends from the front of `queue` until the mailbox is full; the rest stay in
    /// `queue`, in order, for the next call.
    pub fn send_from(&self, queue: &mut VecDeque<T>) {
        while let Some(msg) = queue.pop_front() {
            if let Err(back) = self.try_send(msg) {
                queue.push_front(back.into_inner());
                return;
            }
        }
    }
}

impl<T: Weigh> Mailbox<T> {
    /// Waits for at least one message, then moves up to `max` into `batch`, so one
    /// noisy sender cannot starve the rest of the executor. `false` once every sender
    /// is gone.
    pub async fn recv_batch(&self, batch: &mut Vec<T>, max: usize) -> bool {
        poll_fn(|cx| {
            let mut registered = false;
            loop {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        self.budget.used.fetch_sub(msg.bytes(), Relaxed);
                        batch.push(msg);
                        if batch.len() >= max {
                            return Poll::Ready(true);
                        }
                    }
                    Err(TryRecvError::Disconnected) => return Poll::Ready(!batch.is_empty()),
                    Err(TryRecvError::Empty) if !batch.is_empty() => return Poll::Ready(true),
                    Err(TryRecvError::Empty) if registered => return Poll::Pending,
                    Err(TryRecvError::Empty) => {
                        // Look once more after registering: a message (or the last
                        // sender's goodbye) may have landed in between.
                        self.bell.register(cx.waker());
                        registered = true;
                    }
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test message weighs its value in bytes.
    impl Weigh for u32 {
        fn bytes(&self) -> usize {
            *self as usize
        }
    }

    #[test]
    fn full_mailbox_hands_the_message_back() {
        let (tx, _rx) = mailbox::<u32>(1, 1 << 20);
        assert!(tx.try_send(1).is_ok());
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
    }

    #[test]
    fn a_mailbox_full_of_bytes_refuses_more() {
        let (tx, rx) = mailbox::<u32>(8, 10);
        assert!(tx.try_send(6).is_ok());
        assert_eq!(tx.try_send(6), Err(TrySendError::Full(6)));
        assert!(tx.try_send(4).is_ok());
        let mut got = Vec::new();
        futures::executor::block_on(rx.recv_batch(&mut got, 8));
        assert_eq!(got, [6, 4]);
        // Empty again, it takes even one message over the limit.
        assert!(tx.try_send(12).is_ok());
        assert_eq!(tx.try_send(1), Err(TrySendError::Full(1)));
    }

    #[test]
    fn what_does_not_fit_waits_in_order() {
        let (tx, rx) = mailbox::<u32>(2, 1 << 20);
        let mut queue = VecDeque::from([1, 2, 3]);
        tx.send_from(&mut queue);
        assert_eq!(queue, [3]);
        queue.push_back(4);
        let mut got = Vec::new();
        futures::executor::block_on(rx.recv_batch(&mut got, 8));
        tx.send_from(&mut queue);
        assert!(queue.is_empty());
        futures::executor::block_on(rx.recv_batch(&mut got, 8));
        assert_eq!(got, [1, 2, 3, 4]);
    }

    #[test]
    fn receiver_wakes_from_another_thread() {
        let (tx, rx) = mailbox::<u32>(8, 1 << 20);
        let sender = std::thread::spawn(move || {
            for i in 0..5 {
                while tx.try_send(i).is_err() {
                    std::thread::yield_now();
                }
            }
        });
        let got = futures::executor::block_on(async {
            let mut all = Vec::new();
            let mut batch = Vec::new();
            while rx.recv_batch(&mut batch, 2).await {
                assert!(batch.len() <= 2);
                all.append(&mut batch);
            }
            all
        });
        sender.join().unwrap();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }
}
