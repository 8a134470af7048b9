//! The offline queue: events serialized while the connection is not open.

use std::collections::VecDeque;

/// A FIFO of encoded frames bounded both in count and in bytes.
///
/// Frames are encoded when the caller sends them, so what the server finally receives is
/// exactly what the caller asked for at that moment, whatever happens meanwhile.
#[derive(Debug)]
pub struct OfflineQueue {
    frames: VecDeque<String>,
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

    /// Appends a frame, or hands it back when either bound would be exceeded.
    pub fn push(&mut self, frame: String) -> Result<(), String> {
        if self.frames.len() >= self.max_frames || self.bytes + frame.len() > self.max_bytes {
            return Err(frame);
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        Ok(())
    }

    /// Takes every queued frame, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = String> + '_ {
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

    #[test]
    fn bounded_by_count_and_bytes_and_fifo() {
        let mut q = OfflineQueue::new(3, 10);
        assert!(q.push("aaaa".into()).is_ok());
        assert!(q.push("bbbb".into()).is_ok());
        assert_eq!(q.push("ccc".into()), Err("ccc".to_string()), "bytes bound");
        assert!(q.push("cc".into()).is_ok());
        assert_eq!(q.push("".into()), Err(String::new()), "count bound");
        assert_eq!((q.len(), q.bytes()), (3, 10));
        let all: Vec<_> = q.drain().collect();
        assert_eq!(all, ["aaaa", "bbbb", "cc"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}
