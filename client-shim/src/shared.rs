//! What the handles (`Client`, `Subscription`, `Handle`) and the connection task share.
//!
//! Handles talk to the task through a bounded mailbox of [`Cmd`]s, each carrying a oneshot
//! for its answer. The task holds no `Sender` of its own mailbox, so it ends when the last
//! handle is dropped. What must work from `Drop` (releasing a subscription) goes through
//! [`Common`] instead of the mailbox, because `Drop` cannot wait for room in it.

use crate::queue::Ring;
use crate::types::ConnectionEvent;
use crate::Error;
use qio_ipc::Op;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// Where a call's answer goes.
pub(crate) type Tx<T> = oneshot::Sender<Result<T, Error>>;

/// Commands queued for the connection task.
pub(crate) const MAILBOX: usize = 256;
/// Connection events buffered per [`ConnectionEvents`](crate::ConnectionEvents) stream.
pub(crate) const EVENTS_BUFFER: usize = 256;

/// A reply as the connection task hands it over; the caller adds the [`Handle`](crate::Handle).
#[derive(Debug)]
pub(crate) struct RawReply {
    pub code: i64,
    pub data: Value,
    pub err_msg: Option<String>,
    pub cb: Option<String>,
    /// The daemon connection it came on (handles are only valid on it).
    pub generation: u64,
}

/// An event as queued for a subscription; the subscription adds the handle when read.
#[derive(Debug, Clone)]
pub(crate) struct RawEvent {
    pub path: Arc<str>,
    pub data: Value,
    pub cb: Option<String>,
    pub generation: u64,
}

/// A request line to write.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub op: Op,
    pub path: Option<String>,
    pub data: Option<Value>,
    /// A callback handle and the daemon connection it belongs to.
    pub cb: Option<(String, u64)>,
}

#[derive(Debug)]
pub(crate) enum Cmd {
    /// A request with an id; the answer is the daemon's reply.
    Request {
        msg: Outgoing,
        reply: Tx<RawReply>,
    },
    /// A request without an id; answered once the line is written.
    Forget {
        msg: Outgoing,
        done: Tx<()>,
    },
    On {
        path: String,
        data: Option<Value>,
        once: bool,
        reply: Tx<SubParts>,
    },
    Off {
        path: String,
        reply: Tx<()>,
    },
    Close {
        done: Tx<()>,
    },
}

/// A confirmed subscription as the task hands it over.
#[derive(Debug)]
pub(crate) struct SubParts {
    pub ring: Arc<Ring<RawEvent>>,
    pub slot: SlotGuard,
}

/// Releases a subscription slot when dropped, wherever that happens (even in transit,
/// when the caller gave up before the confirmation arrived).
#[derive(Debug)]
pub(crate) struct SlotGuard {
    pub common: Arc<Common>,
    pub id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.common.release(self.id);
    }
}

/// The link as the connection-events streams report it first.
#[derive(Debug, Clone)]
pub(crate) enum LinkState {
    Open,
    Closed(String),
    Gone(String),
}

#[derive(Debug)]
struct Hub {
    state: LinkState,
    streams: Vec<Weak<Ring<ConnectionEvent>>>,
    ended: bool,
}

/// State shared by the handles and the connection task.
#[derive(Debug)]
pub(crate) struct Common {
    pub socket: PathBuf,
    /// Whom to trust behind the socket, checked again on every reconnect.
    pub rules: qio_platform::trust::Rules,
    pub started: Option<u32>,
    hub: Mutex<Hub>,
    /// What the daemon's last `/close` said: it is making a connection (starting, or
    /// reconnecting after losing one), rather than waiting after a failed attempt.
    /// Cleared by the `/error` of a failed attempt.
    connecting: AtomicBool,
    released: Mutex<Vec<u64>>,
    /// Wakes the task when slots were released.
    pub wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Common {
    pub(crate) fn new(
        socket: PathBuf,
        rules: qio_platform::trust::Rules,
        started: Option<u32>,
        state: LinkState,
        connecting: bool,
    ) -> Self {
        Common {
            connecting: AtomicBool::new(connecting),
            socket,
            rules,
            started,
            hub: Mutex::new(Hub {
                state,
                streams: Vec::new(),
                ended: false,
            }),
            released: Mutex::new(Vec::new()),
            wake: Notify::new(),
        }
    }

    /// Reports a connection event to every stream, updating the state new streams start with.
    pub(crate) fn publish(&self, ev: ConnectionEvent) {
        let mut hub = lock(&self.hub);
        match &ev {
            ConnectionEvent::Open => hub.state = LinkState::Open,
            ConnectionEvent::Close { reason } => hub.state = LinkState::Closed(reason.clone()),
            ConnectionEvent::DaemonGone { reason } => hub.state = LinkState::Gone(reason.clone()),
            ConnectionEvent::DaemonBack { .. } => {
                hub.state = LinkState::Closed("reconnected to qiod; its state follows".into())
            }
            ConnectionEvent::Error { .. }
            | ConnectionEvent::Lost { .. }
            | ConnectionEvent::Untrusted { .. } => {}
        }
        hub.streams.retain(|w| match w.upgrade() {
            Some(ring) => {
                ring.push(ev.clone());
                true
            }
            None => false,
        });
    }

    /// A new stream, starting with the current state.
    pub(crate) fn subscribe(&self) -> Arc<Ring<ConnectionEvent>> {
        let ring = Arc::new(Ring::new(EVENTS_BUFFER));
        let mut hub = lock(&self.hub);
        ring.push(match &hub.state {
            LinkState::Open => ConnectionEvent::Open,
            LinkState::Closed(reason) => ConnectionEvent::Close {
                reason: reason.clone(),
            },
            LinkState::Gone(reason) => ConnectionEvent::DaemonGone {
                reason: reason.clone(),
            },
        });
        if hub.ended {
            ring.close();
        } else {
            hub.streams.push(Arc::downgrade(&ring));
        }
        ring
    }

    /// Ends every stream (the client is closed or gone).
    pub(crate) fn end_streams(&self) {
        let mut hub = lock(&self.hub);
        hub.ended = true;
        for ring in hub.streams.drain(..).filter_map(|w| w.upgrade()) {
            ring.close();
        }
    }

    /// Whether the daemon said it is making a connection (see the field).
    pub(crate) fn upstream_connecting(&self) -> bool {
        self.connecting.load(Ordering::Relaxed)
    }

    pub(crate) fn set_upstream_connecting(&self, on: bool) {
        self.connecting.store(on, Ordering::Relaxed);
    }

    /// Called from `Drop`: the task gives the slot up at its next turn.
    pub(crate) fn release(&self, slot: u64) {
        lock(&self.released).push(slot);
        self.wake.notify_one();
    }

    pub(crate) fn take_released(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.released))
    }
}

/// What every handle holds: the mailbox and the shared state.
#[derive(Debug)]
pub(crate) struct Shared {
    pub tx: mpsc::Sender<Cmd>,
    pub common: Arc<Common>,
    pub request_timeout: Option<Duration>,
}

impl Shared {
    /// Queues a command and waits for its answer, within the request timeout if one is set.
    pub(crate) async fn call<T>(&self, make: impl FnOnce(Tx<T>) -> Cmd) -> Result<T, Error> {
        let run = async {
            let (tx, rx) = oneshot::channel();
            self.tx.send(make(tx)).await.map_err(|_| Error::Closed)?;
            // The task answers every command it takes; a dropped oneshot means it ended.
            rx.await.unwrap_or(Err(Error::Closed))
        };
        match self.request_timeout {
            Some(after) => tokio::time::timeout(after, run)
                .await
                .unwrap_or(Err(Error::Timeout { after })),
            None => run.await,
        }
    }
}
