//! A client's outbound buffer: bounded for events, never dropping replies.

use super::SlowClientPolicy;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Lines waiting to be written to one client.
///
/// Events are shared (`Bytes` is a reference-counted slice, so one serialized event serves
/// every subscriber) and bounded: when a client falls behind, its oldest events go first
/// and it is told how many. Replies are never dropped; they are bounded by the per-client
/// cap on pending requests instead.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    max_events: usize,
    policy: SlowClientPolicy,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<(Bytes, bool)>,
    events: usize,
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
    /// An empty outbox holding at most `max_events` events.
    pub fn new(max_events: usize, policy: SlowClientPolicy) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            max_events,
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

    /// Queues a reply line; replies are never dropped.
    pub fn push_reply(&self, line: Bytes) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.lines.push_back((line, false));
        drop(st);
        self.ready.notify_one();
    }

    /// Waits for lines and takes them all; `None` once closed and empty.
    pub async fn next_batch(&self) -> Option<Batch> {
        loop {
            {
                let mut st = self.lock();
                if !st.lines.is_empty() || st.lost > 0 {
                    st.events = 0;
                    let lines = st.lines.drain(..).map(|(l, _)| l).collect();
                    return Some(Batch {
                        lines,
                        lost: std::mem::take(&mut st.lost),
                    });
                }
                if st.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Stops accepting lines; the writer finishes what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
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
        let o = Outbox::new(2, SlowClientPolicy::DropOldest);
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
        let o = Outbox::new(1, SlowClientPolicy::Disconnect);
        assert!(o.push_event(b("e1")));
        assert!(!o.push_event(b("e2")));
        let batch = o.next_batch().await.unwrap();
        assert_eq!(batch.lines, [b("e1")]);
        assert!(o.next_batch().await.is_none());
    }
}
