//! Owns fire-and-forget sends: the offline queue (events serialized while the connection is
//! not open, written once after the reconnect), the sent-but-unconfirmed events of
//! `at-least-once` mode, and telling a sender when its accepted event is dropped after all.

use super::{
    check_path, FireAndForget, Outcome, Output, Phase, Session, SessionError, CONFIRM_AFTER,
};
use std::time::Instant;

use serde_json::value::RawValue;
use std::collections::VecDeque;

/// An event waiting for the connection or for proof that the server read it.
#[derive(Debug)]
pub struct Queued {
    /// The clean path.
    pub path: String,
    /// The data, serialized when the caller sent it.
    pub data: Box<RawValue>,
    /// Who sent it, to be told should it be dropped after it was accepted.
    pub sender: Option<u64>,
}

impl Queued {
    /// A new event, never sent.
    pub fn new(path: String, data: Box<RawValue>, sender: Option<u64>) -> Self {
        Queued { path, data, sender }
    }

    fn size(&self) -> usize {
        self.path.len() + self.data.get().len()
    }
}

/// A FIFO of events bounded both in count and in bytes.
///
/// The data is serialized JSON captured when the caller sent it, so what the server
/// finally receives is what the caller asked for at that moment. The frame itself is built
/// at flush time, in the dialect of the connection that carries it.
#[derive(Debug)]
pub struct OfflineQueue {
    frames: VecDeque<Queued>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl OfflineQueue {
    /// An empty queue holding at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        OfflineQueue {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Appends an event, or hands it back when either bound would be exceeded.
    pub fn push(&mut self, event: Queued) -> Result<(), Queued> {
        let size = event.size();
        if self.frames.len() >= self.max_frames || self.bytes + size > self.max_bytes {
            return Err(event);
        }
        self.bytes += size;
        self.frames.push_back(event);
        Ok(())
    }

    /// Takes every queued event, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = Queued> + '_ {
        self.bytes = 0;
        self.frames.drain(..)
    }

    /// How many frames wait.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// How many bytes wait.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl OfflineQueue {
    /// Puts events back at the front, in their order, ahead of what is queued; what does
    /// not fit in the bounds is handed back (newest first) for its senders to be told.
    pub fn push_front(&mut self, events: Vec<Queued>) -> Vec<Queued> {
        let mut refused = Vec::new();
        for event in events.into_iter().rev() {
            let size = event.size();
            if self.frames.len() >= self.max_frames || self.bytes + size > self.max_bytes {
                refused.push(event);
                continue;
            }
            self.bytes += size;
            self.frames.push_front(event);
        }
        refused
    }
}

/// Fire-and-forget events sent on the open connection, kept until the server is seen to
/// have read them, so a broken connection loses none of them.
///
/// Each carries the callback id the next callback request would get when it was sent: an
/// answer to that id or any later one proves the server read it (a server reads in order).
/// Bounded like the offline queue: when full, new events are refused at once (the caller
/// is told) rather than letting unconfirmed ones go.
#[derive(Debug)]
pub struct Unconfirmed {
    events: VecDeque<(u64, Queued)>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
}

impl Unconfirmed {
    /// Empty, with the offline queue's bounds.
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        Unconfirmed {
            events: VecDeque::new(),
            bytes: 0,
            max_events,
            max_bytes,
        }
    }

    /// Records an event sent before the callback request with id `next_cb`, or hands it
    /// back when the bounds are reached.
    pub fn push(&mut self, next_cb: u64, event: Queued) -> Result<(), Queued> {
        let size = event.size();
        if self.events.len() >= self.max_events || self.bytes + size > self.max_bytes {
            return Err(event);
        }
        self.bytes += size;
        self.events.push_back((next_cb, event));
        Ok(())
    }

    /// Whether half the bounds are used: time to ask for proof at once.
    pub fn half_full(&self) -> bool {
        self.events.len() * 2 >= self.max_events || self.bytes * 2 >= self.max_bytes
    }

    /// How many events and bytes wait, for error messages.
    pub fn size(&self) -> (usize, usize) {
        (self.events.len(), self.bytes)
    }

    /// The server answered callback `id`: every event sent before it was read.
    pub fn confirm_through(&mut self, id: u64) {
        while self.events.front().is_some_and(|(k, _)| *k <= id) {
            if let Some((_, e)) = self.events.pop_front() {
                self.bytes -= e.size();
            }
        }
    }

    /// Takes every unconfirmed event, oldest first.
    pub fn take(&mut self) -> Vec<Queued> {
        self.bytes = 0;
        self.events.drain(..).map(|(_, e)| e).collect()
    }

    /// Whether nothing waits for confirmation.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(path: &str, data: &str) -> Queued {
        Queued::new(
            path.to_owned(),
            RawValue::from_string(data.to_owned()).unwrap(),
            None,
        )
    }

    #[test]
    fn bounded_by_count_and_bytes_and_fifo() {
        let mut q = OfflineQueue::new(3, 11);
        assert!(q.push(ev("/a", "11")).is_ok());
        assert!(q.push(ev("/b", "22")).is_ok());
        assert!(q.push(ev("/c", "333")).is_err(), "bytes bound");
        assert!(q.push(ev("/c", "3")).is_ok());
        assert!(q.push(ev("/", "1")).is_err(), "count bound");
        assert_eq!((q.len(), q.bytes()), (3, 11));
        let all: Vec<_> = q
            .drain()
            .map(|e| format!("{}={}", e.path, e.data.get()))
            .collect();
        assert_eq!(all, ["/a=11", "/b=22", "/c=3"]);
        q.push(ev("/n", "1")).unwrap();
        let refused = q.push_front(vec![ev("/x", "1"), ev("/y", "22"), ev("/z", "3")]);
        let refused: Vec<_> = refused.into_iter().map(|e| e.path).collect();
        assert_eq!(refused, ["/x"], "handed back, not dropped silently");
        let all: Vec<_> = q.drain().map(|e| e.path).collect();
        assert_eq!(
            all,
            ["/y", "/z", "/n"],
            "what fits goes first, in order; the oldest is dropped"
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}

#[cfg(test)]
mod unconfirmed_tests {
    use super::*;

    fn ev(path: &str) -> Queued {
        Queued::new(
            path.to_owned(),
            RawValue::from_string("1".to_owned()).unwrap(),
            None,
        )
    }

    #[test]
    fn answers_confirm_what_was_sent_before_them() {
        let mut u = Unconfirmed::new(10, 1000);
        u.push(1, ev("/a")).unwrap();
        u.push(1, ev("/b")).unwrap();
        u.push(2, ev("/c")).unwrap();
        u.confirm_through(1);
        let left: Vec<_> = u.take().into_iter().map(|e| e.path).collect();
        assert_eq!(left, ["/c"]);
        assert!(u.is_empty());
        let mut small = Unconfirmed::new(4, 1000);
        for p in ["/a", "/b", "/c", "/d"] {
            assert!(small.push(1, ev(p)).is_ok());
            assert_eq!(small.half_full(), p >= "/b", "{p}");
        }
        assert!(
            small.push(1, ev("/e")).is_err(),
            "bounded: refused, nothing let go"
        );
        let left: Vec<_> = small.take().into_iter().map(|e| e.path).collect();
        assert_eq!(left, ["/a", "/b", "/c", "/d"]);
    }
}

/// Fire-and-forget sends: queued while not open, written once (or, at least once, kept
/// until confirmed), and told to their sender when dropped after all.
impl<T> Session<T> {
    /// Sends an event without asking for a callback; queued while not open.
    pub fn emit(&mut self, now: Instant, path: &str, data: &RawValue) -> Result<(), SessionError> {
        self.emit_from(now, path, data, None)
    }

    /// [`Session::emit`] on behalf of `sender` (the driver passes the local client's id):
    /// should the event be dropped after it was accepted, an [`Output::Dropped`] names it.
    ///
    /// What happens across breaks follows [`SessionConfig::fire_and_forget`].
    pub fn emit_from(
        &mut self,
        now: Instant,
        path: &str,
        data: &RawValue,
        sender: Option<u64>,
    ) -> Result<(), SessionError> {
        let path = check_path(path)?;
        let frame = self.dialect.encode(&path, 0, data);
        self.check_size(&frame)?;
        let event = Queued::new(path, data.to_owned(), sender);
        match self.phase {
            Phase::Open { .. } if self.cfg.fire_and_forget == FireAndForget::Once => {
                // Written once; whatever happens to the connection, never again.
                self.events_out += 1;
                self.out.push_back(Output::Send(frame));
                Ok(())
            }
            Phase::Open { .. } => {
                if self.unconfirmed.push(self.next_cb, event).is_err() {
                    let (n, bytes) = self.unconfirmed.size();
                    return Err(SessionError::QueueFull(format!(
                        "{n} events, {bytes} bytes sent and not yet confirmed by the server"
                    )));
                }
                self.events_out += 1;
                self.out.push_back(Output::Send(frame));
                if self.unconfirmed.half_full() {
                    // Ask for proof now rather than refuse events soon.
                    self.confirm_at = Some(now);
                } else if self.confirm_at.is_none() {
                    self.confirm_at = Some(now + CONFIRM_AFTER.min(self.cfg.heartbeat_interval));
                }
                Ok(())
            }
            Phase::Stopped => Err(SessionError::Stopped),
            _ => self.queue.push(event).map_err(|_| {
                SessionError::QueueFull(format!(
                    "{} events, {} bytes",
                    self.queue.len(),
                    self.queue.bytes()
                ))
            }),
        }
    }

    /// Tells the sender of an accepted event that it will not be sent after all.
    pub(super) fn drop_event(&mut self, event: Queued, code: i64, why: String) {
        self.events_dropped += 1;
        // The caller logs one line for the lot: a full queue can hold thousands.
        tracing::debug!(path = event.path, "dropping an accepted event: {why}");
        if let Some(sender) = event.sender {
            self.out.push_back(Output::Dropped {
                sender,
                path: event.path,
                outcome: Outcome::local(code, why),
            });
        }
    }
}
