//! The offline queue: events serialized while the connection is not open.

use serde_json::value::RawValue;
use std::collections::VecDeque;

/// An event waiting for the connection: its clean path and its data, serialized.
pub type Queued = (String, Box<RawValue>);

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
        let size = event.0.len() + event.1.get().len();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(path: &str, data: &str) -> Queued {
        (
            path.to_owned(),
            RawValue::from_string(data.to_owned()).unwrap(),
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
        let all: Vec<_> = q.drain().map(|(p, d)| format!("{p}={}", d.get())).collect();
        assert_eq!(all, ["/a=11", "/b=22", "/c=3"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}
