//! The hub: who is subscribed to what, and the fan-out of upstream notices to clients.

use super::outbox::Outbox;
use crate::driver::{Notice, SessionHandle};
use crate::session::{CbHandle, Outcome, StateChange};
use bytes::Bytes;
use qio_ipc::{events, ErrorData, EventOut};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A local client as the hub knows it.
#[derive(Debug)]
pub struct ClientRef {
    /// Unique for the daemon's lifetime.
    pub id: u64,
    /// Where its lines go.
    pub outbox: Outbox,
    /// Cancelled to disconnect it (slow-client policy, shutdown).
    pub kick: CancellationToken,
}

#[derive(Debug)]
struct Subscriber {
    client: Arc<ClientRef>,
    once: bool,
}

/// Server callback requests handed to clients, so only a client that received one can
/// answer it. Bounded: the oldest entries go first.
#[derive(Debug, Default)]
struct Handles {
    allowed: HashMap<CbHandle, HashSet<u64>>,
    order: VecDeque<CbHandle>,
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<u64, Arc<ClientRef>>,
    subs: HashMap<String, Vec<Subscriber>>,
    /// The same subscriptions indexed by client, so per-client questions cost O(1).
    by_client: HashMap<u64, HashSet<String>>,
    handles: Handles,
    open: bool,
    /// Counts opened connections, as the session's handle generations do.
    conn: u64,
    close_reason: Option<String>,
    delivered: u64,
}

impl State {
    fn remove_subscriber(&mut self, id: u64, path: &str) {
        if let Some(list) = self.subs.get_mut(path) {
            list.retain(|s| s.client.id != id);
            if list.is_empty() {
                self.subs.remove(path);
            }
        }
    }
}

/// Shared routing state; every method takes the lock briefly and never awaits under it.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    max_handles: usize,
}

impl Hub {
    /// An empty hub remembering at most `max_handles` server callback requests.
    pub fn new(max_handles: usize) -> Self {
        Hub {
            state: Mutex::new(State::default()),
            max_handles,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path leaves the state half-updated across a panic point.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a client and tells it the current upstream state first.
    pub fn join(&self, client: Arc<ClientRef>) {
        let mut st = self.lock();
        let line = if st.open {
            event_line(events::OPEN, None, None)
        } else {
            let reason = st.close_reason.as_deref().unwrap_or("not connected yet");
            event_line(events::CLOSE, Some(&reason_data(reason)), None)
        };
        client.outbox.push_event(line);
        st.clients.insert(client.id, client);
    }

    /// Removes a client and returns the paths it was subscribed to (to give back).
    ///
    /// Handles the client was allowed to answer stay in the bounded table until they age
    /// out; ids are never reused, so nobody else can use them.
    pub fn leave(&self, id: u64) -> Vec<String> {
        let mut st = self.lock();
        st.clients.remove(&id);
        let paths: Vec<String> = st
            .by_client
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for path in &paths {
            st.remove_subscriber(id, path);
        }
        paths
    }

    /// Whether the client is subscribed to the path.
    pub fn is_subscribed(&self, id: u64, path: &str) -> bool {
        self.lock()
            .by_client
            .get(&id)
            .is_some_and(|paths| paths.contains(path))
    }

    /// How many paths the client is subscribed to.
    pub fn subscription_count(&self, id: u64) -> usize {
        self.lock().by_client.get(&id).map_or(0, HashSet::len)
    }

    /// Registers a confirmed subscription.
    pub fn subscribe(&self, client: &Arc<ClientRef>, path: &str, once: bool) {
        let mut st = self.lock();
        if !st
            .by_client
            .entry(client.id)
            .or_default()
            .insert(path.to_owned())
        {
            return;
        }
        st.subs
            .entry(path.to_owned())
            .or_default()
            .push(Subscriber {
                client: client.clone(),
                once,
            });
    }

    /// Unregisters a subscription; returns whether there was one.
    pub fn unsubscribe(&self, id: u64, path: &str) -> bool {
        let mut st = self.lock();
        let held = st
            .by_client
            .get_mut(&id)
            .is_some_and(|paths| paths.remove(path));
        if held {
            st.remove_subscriber(id, path);
        }
        held
    }

    /// Lets `client` answer the server's callback request `handle`.
    pub fn allow_handle(&self, handle: CbHandle, client: u64) {
        let mut st = self.lock();
        let max = self.max_handles;
        let h = &mut st.handles;
        if !h.allowed.contains_key(&handle) {
            h.order.push_back(handle);
            while h.order.len() > max {
                if let Some(old) = h.order.pop_front() {
                    h.allowed.remove(&old);
                }
            }
        }
        h.allowed.entry(handle).or_default().insert(client);
    }

    /// Whether a handle belongs to the connection that is open now.
    pub fn is_current(&self, handle: CbHandle) -> bool {
        let st = self.lock();
        st.open && handle.conn == st.conn
    }

    /// Takes the right to answer `handle` (first answer wins).
    pub fn take_handle(&self, handle: CbHandle, client: u64) -> bool {
        let mut st = self.lock();
        let ok = st
            .handles
            .allowed
            .get(&handle)
            .is_some_and(|s| s.contains(&client));
        if ok {
            st.handles.allowed.remove(&handle);
        }
        ok
    }

    /// Local counters for `status`.
    pub fn counts(&self) -> (usize, u64, HashMap<String, usize>) {
        let st = self.lock();
        let per_path = st.subs.iter().map(|(p, l)| (p.clone(), l.len())).collect();
        (st.clients.len(), st.delivered, per_path)
    }

    /// Every client, for shutdown.
    pub fn clients(&self) -> Vec<Arc<ClientRef>> {
        self.lock().clients.values().cloned().collect()
    }

    /// Fans out one notice from the session.
    ///
    /// Returns the paths whose last `one` subscriber just got its event, for the caller to
    /// give back to the session (never from under the lock, never from the notice loop).
    fn dispatch(&self, notice: Notice) -> Vec<String> {
        match notice {
            Notice::Event(ev) => {
                let cb = ev.cb.map(|h| h.to_string());
                let line = event_line(&ev.path, Some(&ev.data), cb.as_deref());
                let mut st = self.lock();
                let Some(list) = st.subs.get_mut(&ev.path) else {
                    return Vec::new();
                };
                let mut kicked = Vec::new();
                let mut receivers =
                    Vec::with_capacity(if ev.cb.is_some() { list.len() } else { 0 });
                let mut once_gone = Vec::new();
                let mut once_ids = Vec::new();
                list.retain(|s| {
                    if !s.client.outbox.push_event(line.clone()) {
                        kicked.push(s.client.clone());
                    }
                    if ev.cb.is_some() {
                        receivers.push(s.client.id);
                    }
                    if s.once {
                        once_gone.push(ev.path.clone());
                        once_ids.push(s.client.id);
                    }
                    !s.once
                });
                let delivered = list.len() + once_gone.len();
                if list.is_empty() {
                    st.subs.remove(&ev.path);
                }
                for id in &once_ids {
                    if let Some(paths) = st.by_client.get_mut(id) {
                        paths.remove(&ev.path);
                    }
                }
                st.delivered += delivered as u64;
                drop(st);
                if let Some(h) = ev.cb {
                    for id in receivers {
                        self.allow_handle(h, id);
                    }
                }
                for c in kicked {
                    tracing::warn!(client = c.id, "disconnecting a client that does not read its events (slow_client = disconnect)");
                    c.kick.cancel();
                }
                once_gone
            }
            Notice::State(state) => {
                let line = match &state {
                    StateChange::Open { .. } => {
                        let mut st = self.lock();
                        st.open = true;
                        st.conn += 1;
                        st.close_reason = None;
                        Some(event_line(events::OPEN, None, None))
                    }
                    StateChange::Closed { reason } => {
                        let mut st = self.lock();
                        st.open = false;
                        st.close_reason = Some(reason.clone());
                        st.handles = Handles::default();
                        Some(event_line(events::CLOSE, Some(&reason_data(reason)), None))
                    }
                    StateChange::ConnectFailed { url, reason } => {
                        self.lock().close_reason = Some(format!("{url}: {reason}"));
                        let data = ErrorData {
                            op: None,
                            path: None,
                            code: qio_ipc::code::DISCONNECTED,
                            err_msg: format!("cannot connect to {url}: {reason}"),
                        };
                        Some(event_line(events::ERROR, Some(&to_raw(&data)), None))
                    }
                    StateChange::Stopped => {
                        self.lock().open = false;
                        Some(event_line(
                            events::CLOSE,
                            Some(&reason_data("the daemon is shutting down")),
                            None,
                        ))
                    }
                    StateChange::Connecting { .. }
                    | StateChange::Moved { .. }
                    | StateChange::Reconnecting { .. } => None,
                };
                if let Some(line) = line {
                    for c in self.clients() {
                        c.outbox.push_event(line.clone());
                    }
                }
                Vec::new()
            }
            Notice::SubscriptionLost { path, outcome } => {
                let mut st = self.lock();
                let list = st.subs.remove(&path).unwrap_or_default();
                for s in &list {
                    if let Some(paths) = st.by_client.get_mut(&s.client.id) {
                        paths.remove(&path);
                    }
                }
                drop(st);
                let line = error_event(Some("on"), Some(&path), &outcome);
                for s in list {
                    s.client.outbox.push_event(line.clone());
                }
                Vec::new()
            }
        }
    }
}

/// Runs the fan-out until the session's notice channel closes.
pub async fn run_notices(
    hub: Arc<Hub>,
    session: SessionHandle,
    mut notices: mpsc::Receiver<Notice>,
) {
    while let Some(notice) = notices.recv().await {
        let give_back = hub.dispatch(notice);
        if !give_back.is_empty() {
            // The session may be waiting for this very loop to take its next notice, so
            // giving references back must not be awaited here.
            let session = session.clone();
            tokio::spawn(async move {
                for path in give_back {
                    session.unsubscribe(&path).await;
                }
            });
        }
    }
}

/// Serializes an event line once; every receiver shares the bytes.
pub fn event_line(event: &str, data: Option<&RawValue>, cb: Option<&str>) -> Bytes {
    let mut v = serde_json::to_vec(&EventOut { event, data, cb }).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// An `/error` event about a request or a path.
pub fn error_event(op: Option<&str>, path: Option<&str>, outcome: &Outcome) -> Bytes {
    let data = ErrorData {
        op: op.map(str::to_owned),
        path: path.map(str::to_owned),
        code: outcome.code,
        err_msg: outcome.err_msg.clone().unwrap_or_default(),
    };
    event_line(events::ERROR, Some(&to_raw(&data)), None)
}

fn reason_data(reason: &str) -> Box<RawValue> {
    to_raw(&serde_json::json!({ "reason": reason }))
}

/// Serializes a value the daemon built itself (never fails for these types).
pub fn to_raw<T: serde::Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| crate::codec::null())
}
