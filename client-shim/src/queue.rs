//! A bounded single-consumer queue that drops its oldest items when full.
//!
//! The connection task pushes without ever waiting (a subscriber that stops reading must
//! not hold up the others); the consumer polls it as a stream and learns how many items
//! were dropped before the one it gets.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug)]
pub(crate) struct Ring<T> {
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    buf: VecDeque<T>,
    cap: usize,
    /// Dropped since the consumer last took an item.
    unreported: u64,
    total_lost: u64,
    closed: bool,
    waker: Option<Waker>,
}

impl<T> Ring<T> {
    /// A queue holding at most `cap` items (at least 1).
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Ring {
            inner: Mutex::new(Inner {
                buf: VecDeque::with_capacity(cap.min(64)),
                cap,
                unreported: 0,
                total_lost: 0,
                closed: false,
                waker: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing panics while the lock is held.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item, dropping the oldest when full; nothing happens once closed.
    pub(crate) fn push(&self, item: T) {
        let waker = {
            let mut q = self.lock();
            if q.closed {
                return;
            }
            if q.buf.len() >= q.cap {
                q.buf.pop_front();
                q.unreported += 1;
                q.total_lost += 1;
            }
            q.buf.push_back(item);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends the stream once the items already queued are taken.
    pub(crate) fn close(&self) {
        let waker = {
            let mut q = self.lock();
            q.closed = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next item and how many were dropped just before it; `None` once closed and empty.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<(T, u64)>> {
        let mut q = self.lock();
        match q.buf.pop_front() {
            Some(item) => Poll::Ready(Some((item, std::mem::take(&mut q.unreported)))),
            None if q.closed => Poll::Ready(None),
            None => {
                q.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The next item if one is there, without waiting.
    pub(crate) fn try_pop(&self) -> Option<(T, u64)> {
        let mut q = self.lock();
        let item = q.buf.pop_front()?;
        Some((item, std::mem::take(&mut q.unreported)))
    }

    /// How many items were dropped in all.
    pub(crate) fn lost(&self) -> u64 {
        self.lock().total_lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn drops_the_oldest_and_reports_the_gap_once() {
        let r = Ring::new(2);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.try_pop(), Some((3, 3)));
        assert_eq!(r.try_pop(), Some((4, 0)));
        assert_eq!(r.try_pop(), None);
        assert_eq!(r.lost(), 3);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_close_ends_the_stream() {
        let r = Arc::new(Ring::new(4));
        let r2 = r.clone();
        let consumer = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some((v, _)) = std::future::poll_fn(|cx| r2.poll_pop(cx)).await {
                got.push(v);
            }
            got
        });
        tokio::task::yield_now().await;
        r.push(1);
        r.push(2);
        r.close();
        r.push(3);
        assert_eq!(consumer.await.unwrap(), [1, 2]);
    }
}
