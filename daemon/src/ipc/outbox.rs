//! A client's outbound buffer: events bounded in number and bytes with a drop policy,
//! replies bounded by backpressure on the client's requests.

use super::SlowClientPolicy;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Most bytes the writer takes out in one go (a single longer line still goes whole).
///
/// What the writer holds is not counted against the client's bound any more, so this cap
/// is what keeps "bound plus one batch" small: a batch of the whole queue held twice a
/// slow client's worth of events.
pub const BATCH_BYTES: usize = 512 * 1024;

/// Most lines the writer takes out in one go.
pub const BATCH_LINES: usize = 4096;

/// Most slices given to one `writev` by [`Outbox::flush`] (it loops for more).
const FLUSH_IOV: usize = 256;

/// Up to this many queued lines, [`Outbox::flush`] gives their slices from the stack.
const FEW: usize = 4;

/// A client's socket as the outbox may write to it itself: without waiting, and from any
/// thread, so the task fanning out events can write straight into an idle client's
/// socket instead of waking that client's writer task.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
}

/// What a queued line is, for the bounds and the drop policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An event: counted against `max_events`, dropped first when over a bound.
    Event,
    /// A reply or connection event: never dropped, pauses the client's reader.
    Reply,
    /// The unwritten end of an event that went out in part: never dropped (the client
    /// has its beginning), counted in bytes only.
    Tail,
}

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
    lines: VecDeque<(Bytes, Kind)>,
    events: usize,
    replies: usize,
    /// Bytes of every queued line, events and replies.
    bytes: usize,
    /// Bytes of the queued replies alone.
    reply_bytes: usize,
    lost: u64,
    lost_total: u64,
    closed: bool,
    /// The writer task holds lines it took out and has not finished writing: nobody else
    /// may write to the socket until it has.
    writing: bool,
    /// Events were queued with [`Outbox::queue_event`] and [`Outbox::flush`] has not
    /// been called since.
    unflushed: bool,
    /// The socket, while the writer task is there to take over what would block.
    sock: Option<Arc<dyn DirectWrite>>,
    /// The fan-out waited for this client to catch up and it did not in time: it sets no
    /// pace again until it has caught up ([`Outbox::holds_up`]).
    let_go: bool,
}

impl State {
    /// Whether one more event of `len` bytes would pass a bound.
    fn over(&self, len: usize, max_events: usize, max_bytes: usize) -> bool {
        self.events >= max_events || (self.bytes > 0 && self.bytes + len > max_bytes)
    }

    /// Drops the oldest queued event; false when there is none.
    fn drop_oldest_event(&mut self) -> bool {
        let Some(i) = self.lines.iter().position(|(_, kind)| *kind == Kind::Event) else {
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

impl State {
    /// Takes the oldest line off the queue and out of the counts.
    fn pop(&mut self) -> Option<Bytes> {
        let (line, kind) = self.lines.pop_front()?;
        self.bytes -= line.len();
        match kind {
            Kind::Event => self.events -= 1,
            Kind::Reply => {
                self.replies -= 1;
                self.reply_bytes -= line.len();
            }
            Kind::Tail => {}
        }
        Some(line)
    }

    /// Takes the first `n` bytes of the queue off it: whole lines, and the beginning of
    /// the next one, whose end stays first in the queue and can no longer be dropped.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some((line, kind)) = self.lines.front_mut() else {
                return;
            };
            if n < line.len() {
                let _ = line.split_to(n);
                self.bytes -= n;
                match kind {
                    Kind::Reply => self.reply_bytes -= n,
                    Kind::Event => {
                        self.events -= 1;
                        *kind = Kind::Tail;
                    }
                    Kind::Tail => {}
                }
                return;
            }
            n -= line.len();
            self.pop();
        }
    }
}

/// What became of an event given to [`Outbox::queue_event`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queued {
    /// False when the client must be disconnected instead (`slow_client = disconnect`).
    pub taken: bool,
    /// The client now waits for a flush: true once per flush, so the caller lists each
    /// client once.
    pub first: bool,
    /// The client now holds the fan-out up ([`Outbox::holds_up`]).
    pub holds_up: bool,
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

    /// Queues an event line and has the writer write it; returns false when the client
    /// must be disconnected instead.
    pub fn push_event(&self, line: Bytes) -> bool {
        let taken = self.queue(line, false).taken;
        self.ready.notify_one();
        taken
    }

    /// Queues an event line for [`Outbox::flush`] to write: the fan-out queues a burst of
    /// events first and writes each client's share at once.
    pub fn queue_event(&self, line: Bytes) -> Queued {
        self.queue(line, true)
    }

    fn queue(&self, line: Bytes, for_flush: bool) -> Queued {
        let mut st = self.lock();
        if st.closed {
            return Queued {
                taken: true,
                ..Queued::default()
            };
        }
        let len = line.len();
        match self.policy {
            SlowClientPolicy::Disconnect => {
                if st.over(len, self.max_events, self.max_bytes) {
                    st.closed = true;
                    drop(st);
                    self.ready.notify_one();
                    return Queued::default();
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
        st.lines.push_back((line, Kind::Event));
        let first = for_flush && !std::mem::replace(&mut st.unflushed, true);
        Queued {
            taken: true,
            first,
            holds_up: self.holds_up_locked(&mut st),
        }
    }

    /// Writes what is queued straight into the client's socket when the writer task is
    /// idle and the socket takes it without waiting; whatever is left (the socket is
    /// full, a `/lost` must go first, the writer is busy) is the writer's, which is woken
    /// for it. Never waits, so one slow client costs the caller one failed `writev`.
    /// Returns whether the writer task now has work (it was woken for it).
    pub fn flush(&self) -> bool {
        let mut st = self.lock();
        st.unflushed = false;
        if st.lines.is_empty() && st.lost == 0 {
            return false;
        }
        if st.writing || st.lost > 0 || st.closed {
            drop(st);
            self.ready.notify_one();
            return true;
        }
        let Some(sock) = st.sock.clone() else {
            drop(st);
            self.ready.notify_one();
            return true;
        };
        let had_replies = st.replies > 0;
        while !st.lines.is_empty() {
            let res = if st.lines.len() <= FEW {
                // On the stack: one event for one client is the common case.
                let mut slices = [IoSlice::new(&[]); FEW];
                for ((line, _), slot) in st.lines.iter().zip(slices.iter_mut()) {
                    *slot = IoSlice::new(line);
                }
                sock.try_write_vectored(&slices[..st.lines.len()])
            } else {
                let slices: Vec<IoSlice<'_>> = st
                    .lines
                    .iter()
                    .take(FLUSH_IOV)
                    .map(|(l, _)| IoSlice::new(l))
                    .collect();
                sock.try_write_vectored(&slices)
            };
            match res {
                Ok(0) | Err(_) => break,
                Ok(n) => st.consume(n),
            }
        }
        let left = !st.lines.is_empty();
        drop(st);
        if left {
            // Full, or broken: the writer waits for room, or meets the error and ends
            // the client.
            self.ready.notify_one();
        }
        if had_replies {
            self.drained.notify_waiters();
        }
        left
    }

    /// Lets [`Outbox::flush`] write into `sock` while the writer is idle.
    pub fn attach(&self, sock: Arc<dyn DirectWrite>) {
        self.lock().sock = Some(sock);
    }

    /// Stops writing into the socket from outside the writer (it is being closed).
    pub fn detach(&self) {
        self.lock().sock = None;
    }

    /// The writer has written the batch it took: the socket is free again.
    pub fn batch_written(&self) {
        self.lock().writing = false;
    }

    /// Counts events that never made it into the outbox (dropped upstream of it).
    pub fn count_lost(&self, n: u64) {
        let mut st = self.lock();
        st.lost += n;
        st.lost_total += n;
        drop(st);
        self.ready.notify_one();
    }

    /// Queues a line that must not be dropped and flushes ([`Outbox::flush`]); returns
    /// false when the client has stopped reading for so long that it must be
    /// disconnected.
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
        st.lines.push_back((line, Kind::Reply));
        drop(st);
        // Written straight away when the writer is idle and the socket has room.
        self.flush();
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
    /// [`BATCH_BYTES`] bytes; `None` once closed and empty. Until the writer says
    /// [`Outbox::batch_written`], nothing else writes to the socket.
    pub async fn next_batch(&self) -> Option<Batch> {
        loop {
            let ready = self.ready.notified();
            {
                let mut st = self.lock();
                if st.lines.front().is_some_and(|(_, k)| *k == Kind::Tail) {
                    // The end of a line the client has begun to read goes alone, before
                    // any `/lost`.
                    let lines = st.pop().into_iter().collect();
                    st.writing = true;
                    return Some(Batch { lines, lost: 0 });
                }
                if !st.lines.is_empty() || st.lost > 0 {
                    let mut lines = Vec::with_capacity(st.lines.len().min(BATCH_LINES));
                    let mut taken = 0;
                    while lines.len() < BATCH_LINES && (lines.is_empty() || taken < BATCH_BYTES) {
                        let Some(line) = st.pop() else {
                            break;
                        };
                        taken += line.len();
                        lines.push(line);
                    }
                    let lost = std::mem::take(&mut st.lost);
                    st.writing = true;
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

    /// Whether the fan-out should wait for this client before it takes more events from
    /// the server: it has fallen behind (half of a bound waits, besides what its writer
    /// is writing) and has not made the fan-out wait in vain since it last caught up.
    pub fn holds_up(&self) -> bool {
        self.holds_up_locked(&mut self.lock())
    }

    fn holds_up_locked(&self, st: &mut State) -> bool {
        let behind = self.is_behind(st);
        if !behind {
            st.let_go = false;
        }
        behind && !st.let_go
    }

    /// The fan-out waited for this client in vain: it no longer holds anything up until
    /// it has caught up.
    pub fn let_go(&self) {
        self.lock().let_go = true;
    }

    /// Waits until this client is no longer behind (or is closing).
    pub async fn caught_up(&self) {
        loop {
            let drained = self.drained.notified();
            if !self.is_behind(&self.lock()) {
                return;
            }
            drained.await;
        }
    }

    fn is_behind(&self, st: &State) -> bool {
        !st.closed && (st.events >= self.max_events.div_ceil(2) || st.bytes >= self.max_bytes / 2)
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

    /// A socket that takes `room` more bytes, then would block.
    #[derive(Debug, Default)]
    struct Sock {
        room: Mutex<usize>,
        got: Mutex<Vec<u8>>,
    }

    impl DirectWrite for Sock {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(*room - n);
                self.got.lock().unwrap().extend_from_slice(&b[..take]);
                n += take;
            }
            *room -= n;
            Ok(n)
        }
    }

    /// What `queue_event` said: taken, and first since the last flush.
    fn queued(o: &Outbox, line: Bytes) -> (bool, bool) {
        let q = o.queue_event(line);
        (q.taken, q.first)
    }

    #[tokio::test]
    async fn a_flush_writes_into_an_idle_socket_and_leaves_the_rest_to_the_writer_in_order() {
        let o = Outbox::new(2, 10, DROP);
        let sock = Arc::new(Sock::default());
        *sock.room.lock().unwrap() = 6;
        o.attach(sock.clone());
        assert_eq!(queued(&o, b("e1..\n")), (true, true));
        assert_eq!(
            queued(&o, b("e2..\n")),
            (true, false),
            "listed for a flush once"
        );
        o.flush();
        assert_eq!(&sock.got.lock().unwrap()[..], b"e1..\ne");
        // The socket is full: more events than the bound drop the oldest whole one,
        // never the end of the one the client has begun to read.
        assert_eq!(queued(&o, b("e3..\n")), (true, true));
        assert_eq!(queued(&o, b("e4..\n")), (true, false));
        assert_eq!(queued(&o, b("e5..\n")), (true, false));
        o.flush();
        assert_eq!(o.lost_total(), 1);
        // The end of e2 goes first and alone, then the /lost and the rest.
        let batch = o.next_batch().await.unwrap();
        assert_eq!((batch.lines, batch.lost), (vec![b("2..\n")], 0));
        // While the writer holds a batch, a flush leaves the socket alone.
        *sock.room.lock().unwrap() = 100;
        o.queue_event(b("e6..\n"));
        o.flush();
        assert_eq!(&sock.got.lock().unwrap()[..], b"e1..\ne");
        o.batch_written();
        let batch = o.next_batch().await.unwrap();
        assert_eq!(batch.lines, [b("e5..\n"), b("e6..\n")], "e6 dropped e4");
        assert_eq!(batch.lost, 2);
        o.batch_written();
        // Idle again: straight into the socket.
        o.queue_event(b("e7..\n"));
        o.flush();
        assert_eq!(&sock.got.lock().unwrap()[..], b"e1..\nee7..\n");
        o.detach();
        o.queue_event(b("e8..\n"));
        o.flush();
        o.close();
        assert_eq!(o.next_batch().await.unwrap().lines, [b("e8..\n")]);
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
