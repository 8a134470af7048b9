//! A client's outbound buffer: events bounded with a drop policy, replies bounded by
//! backpressure on the client's requests.

use super::SlowClientPolicy;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Lines waiting to be written to one client.
///
/// Events are shared (`Bytes` is a reference-counted slice, so one serialized event serves
/// every subscriber) and bounded: when a client falls behind, its oldest events go first
/// and it is told how many. Replies are never dropped: the client's reader stops taking
/// requests while `max_replies` wait unwritten ([`Outbox::room`]), so a client that sends
/// without reading only stalls itself. A client past twice that (it can only get there by
/// not reading while the daemon keeps telling it things) is disconnected.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    drained: Notify,
    max_events: usize,
    max_replies: usize,
    policy: SlowClientPolicy,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<(Bytes, bool)>,
    events: usize,
    replies: usize,
    lost: u64,
    lost_total: u64,
    closed: bool,
}

/// What the writer takes out in one go.
#[derive(Debug, Default)]
pub struct Batch {
    /// Lines in order.
    pub lines: Vec<Bytes>,
    /// Events dropped since the last batch (to be announced before these lines).
    pub lost: u64,
}

impl Outbox {
    /// An empty outbox holding at most `max_events` events and, before the client's
    /// reader pauses, `max_replies` replies.
    pub fn new(max_events: usize, max_replies: usize, policy: SlowClientPolicy) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            drained: Notify::new(),
            max_events,
            max_replies,
            policy,
        }
    }

    /// Queues an event line; returns false when the client must be disconnected instead.
    pub fn push_event(&self, line: Bytes) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        if st.events >= self.max_events {
            match self.policy {
                SlowClientPolicy::Disconnect => {
                    st.closed = true;
                    drop(st);
                    self.ready.notify_one();
                    return false;
                }
                SlowClientPolicy::DropOldest => {
                    if let Some(i) = st.lines.iter().position(|(_, event)| *event) {
                        st.lines.remove(i);
                        st.events -= 1;
                        st.lost += 1;
                        st.lost_total += 1;
                    }
                }
            }
        }
        st.events += 1;
        st.lines.push_back((line, true));
        drop(st);
        self.ready.notify_one();
        true
    }

    /// Counts events that never made it into the outbox (dropped upstream of it).
    pub fn count_lost(&self, n: u64) {
        let mut st = self.lock();
        st.lost += n;
        st.lost_total += n;
        drop(st);
        self.ready.notify_one();
    }

    /// Queues a line that must not be dropped; returns false when the client has stopped
    /// reading for so long that it must be disconnected.
    pub fn push_reply(&self, line: Bytes) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        if st.replies >= self.max_replies.saturating_mul(2) {
            st.closed = true;
            drop(st);
            self.ready.notify_one();
            return false;
        }
        st.replies += 1;
        st.lines.push_back((line, false));
        drop(st);
        self.ready.notify_one();
        true
    }

    /// Whether the client may send another request now.
    pub fn has_room(&self) -> bool {
        self.lock().replies < self.max_replies
    }

    /// Waits until the writer has made room for more replies.
    pub async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.has_room() || self.lock().closed {
                return;
            }
            drained.await;
        }
    }

    /// Waits for lines and takes them all; `None` once closed and empty.
    pub async fn next_batch(&self) -> Option<Batch> {
        loop {
            let ready = self.ready.notified();
            {
                let mut st = self.lock();
                if !st.lines.is_empty() || st.lost > 0 {
                    st.events = 0;
                    st.replies = 0;
                    let lines = st.lines.drain(..).map(|(l, _)| l).collect();
                    let lost = std::mem::take(&mut st.lost);
                    drop(st);
                    self.drained.notify_waiters();
                    return Some(Batch { lines, lost });
                }
                if st.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// Stops accepting lines; the writer finishes what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// Events dropped for this client so far.
    pub fn lost_total(&self) -> u64 {
        self.lock().lost_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-push; the queue is
        // still consistent enough to keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn drops_oldest_events_but_never_replies() {
        let o = Outbox::new(2, 10, SlowClientPolicy::DropOldest);
        o.push_reply(b("r1"));
        for e in ["e1", "e2", "e3", "e4"] {
            assert!(o.push_event(b(e)));
        }
        o.push_reply(b("r2"));
        let batch = o.next_batch().await.unwrap();
        assert_eq!(batch.lines, [b("r1"), b("e3"), b("e4"), b("r2")]);
        assert_eq!((batch.lost, o.lost_total()), (2, 2));
        o.push_event(b("e5"));
        let batch = o.next_batch().await.unwrap();
        assert_eq!((batch.lines, batch.lost), (vec![b("e5")], 0));
        o.close();
        assert!(o.next_batch().await.is_none());
    }

    #[tokio::test]
    async fn the_disconnect_policy_closes_instead() {
        let o = Outbox::new(1, 10, SlowClientPolicy::Disconnect);
        assert!(o.push_event(b("e1")));
        assert!(!o.push_event(b("e2")));
        let batch = o.next_batch().await.unwrap();
        assert_eq!(batch.lines, [b("e1")]);
        assert!(o.next_batch().await.is_none());
    }

    #[tokio::test]
    async fn replies_pause_the_reader_and_a_client_that_never_reads_is_let_go() {
        let o = Outbox::new(1, 2, SlowClientPolicy::DropOldest);
        assert!(o.push_reply(b("r1")) && o.has_room());
        assert!(o.push_reply(b("r2")));
        assert!(!o.has_room(), "two replies wait: stop reading requests");
        let waiter = o.room();
        tokio::pin!(waiter);
        assert!(futures_util::FutureExt::now_or_never(waiter.as_mut()).is_none());
        o.next_batch().await.unwrap();
        waiter.await;
        assert!(o.has_room());
        for i in 0..4 {
            assert!(o.push_reply(b(&format!("r{i}"))));
        }
        assert!(
            !o.push_reply(b("one too many")),
            "twice the bound: disconnect"
        );
    }
}
