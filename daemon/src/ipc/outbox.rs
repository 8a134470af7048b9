//! A client's outbound buffer: events bounded in number and bytes with a drop policy,
//! replies bounded by backpressure on the client's requests.

use super::SlowClientPolicy;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Most bytes the writer takes out in one go (a single longer line still goes whole).
///
/// What the writer holds is not counted against the client's bound any more, so this cap
/// is what keeps "bound plus one batch" small: a batch of the whole queue held twice a
/// slow client's worth of events.
pub const BATCH_BYTES: usize = 512 * 1024;

/// Most lines the writer takes out in one go.
pub const BATCH_LINES: usize = 4096;

/// Lines waiting to be written to one client.
///
/// Events are shared (`Bytes` is a reference-counted slice, so one serialized event serves
/// every subscriber) and bounded twice: at most `max_events` events, and at most
/// `max_bytes` bytes of lines (replies count too, as they take the same memory). When a
/// client falls behind, its oldest events go first and it is told how many. An event that
/// alone is larger than the byte bound is still queued when no other event is, so every
/// event the server may send can be delivered.
///
/// Replies are never dropped: the client's reader stops taking requests while
/// `max_replies` replies or `max_bytes` bytes of them wait unwritten ([`Outbox::room`]), so
/// a client that sends without reading only stalls itself. A client past twice either (it
/// can only get there by not reading while the daemon keeps telling it things) is
/// disconnected.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    drained: Notify,
    max_events: usize,
    max_replies: usize,
    max_bytes: usize,
    policy: SlowClientPolicy,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<(Bytes, bool)>,
    events: usize,
    replies: usize,
    /// Bytes of every queued line, events and replies.
    bytes: usize,
    /// Bytes of the queued replies alone.
    reply_bytes: usize,
    lost: u64,
    lost_total: u64,
    closed: bool,
}

impl State {
    /// Whether one more event of `len` bytes would pass a bound.
    fn over(&self, len: usize, max_events: usize, max_bytes: usize) -> bool {
        self.events >= max_events || (self.bytes > 0 && self.bytes + len > max_bytes)
    }

    /// Drops the oldest queued event; false when there is none.
    fn drop_oldest_event(&mut self) -> bool {
        let Some(i) = self.lines.iter().position(|(_, event)| *event) else {
            return false;
        };
        if let Some((line, _)) = self.lines.remove(i) {
            self.events -= 1;
            self.bytes -= line.len();
            self.lost += 1;
            self.lost_total += 1;
        }
        true
    }
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
    /// reader pauses, `max_replies` replies; no byte bound until [`Outbox::with_max_bytes`].
    pub fn new(max_events: usize, max_replies: usize, policy: SlowClientPolicy) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            drained: Notify::new(),
            max_events,
            max_replies,
            max_bytes: usize::MAX,
            policy,
        }
    }

    /// Bounds the queued lines to `max_bytes` as well (see [`Outbox`]).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Queues an event line; returns false when the client must be disconnected instead.
    pub fn push_event(&self, line: Bytes) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        let len = line.len();
        match self.policy {
            SlowClientPolicy::Disconnect => {
                if st.over(len, self.max_events, self.max_bytes) {
                    st.closed = true;
                    drop(st);
                    self.ready.notify_one();
                    return false;
                }
            }
            SlowClientPolicy::DropOldest => {
                while st.over(len, self.max_events, self.max_bytes) {
                    // Only replies left: they are never dropped, so the event goes in
                    // beside them (at most one event then, as the next one drops it).
                    if !st.drop_oldest_event() {
                        break;
                    }
                }
            }
        }
        st.events += 1;
        st.bytes += len;
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
        let len = line.len();
        let too_many = st.replies >= self.max_replies.saturating_mul(2);
        let too_big = st.reply_bytes > 0 && st.reply_bytes + len > self.max_bytes.saturating_mul(2);
        if too_many || too_big {
            st.closed = true;
            drop(st);
            self.ready.notify_one();
            return false;
        }
        st.replies += 1;
        st.bytes += len;
        st.reply_bytes += len;
        st.lines.push_back((line, false));
        drop(st);
        self.ready.notify_one();
        true
    }

    /// Whether the client may send another request now.
    pub fn has_room(&self) -> bool {
        let st = self.lock();
        st.replies < self.max_replies && st.reply_bytes < self.max_bytes
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

    /// Waits for lines and takes the oldest ones, at most [`BATCH_LINES`] lines and about
    /// [`BATCH_BYTES`] bytes; `None` once closed and empty.
    pub async fn next_batch(&self) -> Option<Batch> {
        loop {
            let ready = self.ready.notified();
            {
                let mut st = self.lock();
                if !st.lines.is_empty() || st.lost > 0 {
                    let mut lines = Vec::with_capacity(st.lines.len().min(BATCH_LINES));
                    let mut taken = 0;
                    while lines.len() < BATCH_LINES && (lines.is_empty() || taken < BATCH_BYTES) {
                        let Some((line, event)) = st.lines.pop_front() else {
                            break;
                        };
                        taken += line.len();
                        st.bytes -= line.len();
                        if event {
                            st.events -= 1;
                        } else {
                            st.replies -= 1;
                            st.reply_bytes -= line.len();
                        }
                        lines.push(line);
                    }
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

    /// One line pushed in a byte-bound case.
    enum Push {
        Event(&'static str),
        Reply(&'static str),
    }
    use Push::{Event as E, Reply as R};

    struct Case {
        name: &'static str,
        policy: SlowClientPolicy,
        max_events: usize,
        max_bytes: usize,
        pushes: &'static [Push],
        /// What the writer then gets, in order.
        lines: &'static [&'static str],
        lost: u64,
        /// Whether a push asked for the client to be disconnected.
        kicked: bool,
        /// Whether the client may still send requests.
        room: bool,
    }

    const DROP: SlowClientPolicy = SlowClientPolicy::DropOldest;
    const DISCONNECT: SlowClientPolicy = SlowClientPolicy::Disconnect;

    #[tokio::test]
    async fn the_byte_bound_applies_beside_the_event_bound() {
        let cases = [
            Case {
                name: "the byte bound is hit first: the oldest event goes",
                policy: DROP,
                max_events: 100,
                max_bytes: 8,
                pushes: &[E("e1.."), E("e2.."), E("e3..")],
                lines: &["e2..", "e3.."],
                lost: 1,
                kicked: false,
                room: true,
            },
            Case {
                name: "the event bound is hit first",
                policy: DROP,
                max_events: 2,
                max_bytes: 1000,
                pushes: &[E("e1.."), E("e2.."), E("e3..")],
                lines: &["e2..", "e3.."],
                lost: 1,
                kicked: false,
                room: true,
            },
            Case {
                name: "a big event drops as many small ones as it needs",
                policy: DROP,
                max_events: 100,
                max_bytes: 12,
                pushes: &[E("e1.."), E("e2.."), E("e3.."), E("big-e4..")],
                lines: &["e3..", "big-e4.."],
                lost: 2,
                kicked: false,
                room: true,
            },
            Case {
                name: "an event larger than the bound alone still goes out",
                policy: DROP,
                max_events: 100,
                max_bytes: 4,
                pushes: &[E("e1.."), E("huge-event")],
                lines: &["huge-event"],
                lost: 1,
                kicked: false,
                room: true,
            },
            Case {
                name: "replies take room from events and are never dropped",
                policy: DROP,
                max_events: 100,
                max_bytes: 8,
                pushes: &[E("e1.."), R("r1.."), E("e2.."), R("r2.."), E("e3..")],
                lines: &["r1..", "r2..", "e3.."],
                lost: 2,
                kicked: false,
                room: false,
            },
            Case {
                name: "reply bytes at the bound pause the reader",
                policy: DROP,
                max_events: 100,
                max_bytes: 8,
                pushes: &[R("r1.."), R("r2..")],
                lines: &["r1..", "r2.."],
                lost: 0,
                kicked: false,
                room: false,
            },
            Case {
                name: "replies past twice the byte bound disconnect",
                policy: DROP,
                max_events: 100,
                max_bytes: 4,
                pushes: &[R("r1.."), R("r2.."), R("r3..")],
                lines: &["r1..", "r2.."],
                lost: 0,
                kicked: true,
                room: false,
            },
            Case {
                name: "disconnect policy: the byte bound disconnects",
                policy: DISCONNECT,
                max_events: 100,
                max_bytes: 8,
                pushes: &[E("e1.."), E("e2.."), E("e3..")],
                lines: &["e1..", "e2.."],
                lost: 0,
                kicked: true,
                room: true,
            },
            Case {
                name: "disconnect policy: a lone big event is no reason to disconnect",
                policy: DISCONNECT,
                max_events: 100,
                max_bytes: 4,
                pushes: &[E("huge-event")],
                lines: &["huge-event"],
                lost: 0,
                kicked: false,
                room: true,
            },
        ];
        for c in cases {
            let o = Outbox::new(c.max_events, 100, c.policy).with_max_bytes(c.max_bytes);
            let mut kicked = false;
            for p in c.pushes {
                let accepted = match p {
                    E(s) => o.push_event(b(s)),
                    R(s) => o.push_reply(b(s)),
                };
                kicked |= !accepted;
            }
            assert_eq!(kicked, c.kicked, "{}: kicked", c.name);
            assert_eq!(o.has_room(), c.room, "{}: room for requests", c.name);
            o.close();
            let mut lines = Vec::new();
            let mut lost = 0;
            while let Some(batch) = o.next_batch().await {
                lines.extend(batch.lines);
                lost += batch.lost;
            }
            let want: Vec<Bytes> = c.lines.iter().map(|s| b(s)).collect();
            assert_eq!(lines, want, "{}: lines", c.name);
            assert_eq!((lost, o.lost_total()), (c.lost, c.lost), "{}: lost", c.name);
        }
    }

    #[tokio::test]
    async fn batches_are_capped_and_what_the_writer_took_frees_the_bound() {
        let line = Bytes::from(vec![b'x'; 16 * 1024]);
        let per_batch = BATCH_BYTES / line.len();
        let o = Outbox::new(4096, 10, DROP).with_max_bytes(per_batch * 2 * line.len());
        for _ in 0..per_batch * 2 {
            assert!(o.push_event(line.clone()));
        }
        let first = o.next_batch().await.unwrap();
        assert_eq!(first.lines.len(), per_batch, "about BATCH_BYTES at a time");
        // The writer holds the first batch; the queue has room for that many again
        // without dropping anything.
        for _ in 0..per_batch {
            assert!(o.push_event(line.clone()));
        }
        assert_eq!(o.lost_total(), 0);
        let small = Outbox::new(BATCH_LINES * 2, 10, DROP);
        for _ in 0..BATCH_LINES + 1 {
            small.push_event(b("e\n"));
        }
        assert_eq!(small.next_batch().await.unwrap().lines.len(), BATCH_LINES);
        assert_eq!(small.next_batch().await.unwrap().lines.len(), 1);
        let single = Outbox::new(4, 10, DROP);
        single.push_event(Bytes::from(vec![b'y'; BATCH_BYTES * 2]));
        single.push_event(b("after\n"));
        let big = single.next_batch().await.unwrap();
        assert_eq!(
            big.lines.len(),
            1,
            "a line longer than the cap goes alone, whole"
        );
        assert_eq!(big.lines[0].len(), BATCH_BYTES * 2);
    }
}
