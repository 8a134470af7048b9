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
    /// Most events held for one subscription while its `on` waits for the server.
    pub pending_events: usize,
}

impl ClientRef {
    /// Queues an event, applying the slow-client policy.
    pub fn push_event(&self, line: Bytes) {
        if !self.outbox.push_event(line) {
            tracing::warn!(
                client = self.id,
                "disconnecting a client that does not read its events (slow_client = disconnect)"
            );
            self.kick.cancel();
        }
    }

    /// Queues a line that must not be dropped (a reply or a connection event).
    pub fn push_notice(&self, line: Bytes) {
        if !self.outbox.push_reply(line) {
            tracing::warn!(
                client = self.id,
                "disconnecting a client that stopped reading"
            );
            self.kick.cancel();
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    client: Arc<ClientRef>,
    once: bool,
    /// `Some` while the client's `on` waits for its answer: events that arrive meanwhile
    /// are held here and delivered right after the reply, so none is missed.
    held: Option<Vec<Bytes>>,
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
    /// Confirmed subscriptions indexed by client, so per-client questions cost O(1).
    by_client: HashMap<u64, HashSet<String>>,
    handles: Handles,
    open: bool,
    /// Counts opened connections, as the session's handle generations do.
    conn: u64,
    close_reason: Option<String>,
    delivered: u64,
}

impl State {
    fn remove_subscriber(&mut self, id: u64, path: &str) -> Option<Subscriber> {
        let list = self.subs.get_mut(path)?;
        let i = list.iter().position(|s| s.client.id == id)?;
        let sub = list.swap_remove(i);
        if list.is_empty() {
            self.subs.remove(path);
        }
        Some(sub)
    }

    /// Sends a connection event to every client; under the same lock as the state change
    /// and as [`Hub::join`], so no client misses a change or sees one twice.
    fn tell_all(&self, line: &Bytes) {
        for c in self.clients.values() {
            c.push_notice(line.clone());
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
        client.push_notice(line);
        st.clients.insert(client.id, client);
    }

    /// Removes a client and returns the paths whose confirmed subscription it held (to
    /// give back to the session; references still `waiting` for an answer are given back
    /// by the driver).
    ///
    /// Handles the client was allowed to answer stay in the bounded table until they age
    /// out; ids are never reused, so nobody else can use them.
    pub fn leave(&self, id: u64, waiting: &[String]) -> Vec<String> {
        let mut st = self.lock();
        st.clients.remove(&id);
        // Only this client's paths: all clients leaving at once must not cost
        // clients x paths under the lock.
        let held: Vec<String> = st
            .by_client
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for path in held.iter().chain(waiting) {
            st.remove_subscriber(id, path);
        }
        held
    }

    /// Whether the client holds a confirmed subscription to the path.
    pub fn is_subscribed(&self, id: u64, path: &str) -> bool {
        self.lock()
            .by_client
            .get(&id)
            .is_some_and(|paths| paths.contains(path))
    }

    /// How many confirmed subscriptions the client holds.
    pub fn subscription_count(&self, id: u64) -> usize {
        self.lock().by_client.get(&id).map_or(0, HashSet::len)
    }

    /// Starts holding events of `path` for a client whose `on` is on its way.
    pub fn expect(&self, client: &Arc<ClientRef>, path: &str, once: bool) {
        let mut st = self.lock();
        let list = st.subs.entry(path.to_owned()).or_default();
        if !list.iter().any(|s| s.client.id == client.id) {
            list.push(Subscriber {
                client: client.clone(),
                once,
                held: Some(Vec::new()),
            });
        }
    }

    /// The `on` was confirmed (and its reply queued): deliver what was held and go live.
    ///
    /// Returns true when a one-shot subscription got its event from what was held, so the
    /// caller gives its reference back at once.
    pub fn confirm(&self, client: &Arc<ClientRef>, path: &str, once: bool) -> bool {
        let mut st = self.lock();
        let list = st.subs.entry(path.to_owned()).or_default();
        let i = match list.iter().position(|s| s.client.id == client.id) {
            Some(i) => i,
            None => {
                list.push(Subscriber {
                    client: client.clone(),
                    once,
                    held: None,
                });
                list.len() - 1
            }
        };
        let sub = &mut list[i];
        sub.once = once;
        let held = sub.held.take().unwrap_or_default();
        let got_one = !held.is_empty();
        for line in held {
            client.push_event(line);
        }
        if once && got_one {
            st.remove_subscriber(client.id, path);
            return true;
        }
        st.by_client
            .entry(client.id)
            .or_default()
            .insert(path.to_owned());
        false
    }

    /// The `on` failed or was cancelled: stop holding events for it.
    pub fn abandon(&self, id: u64, path: &str) {
        let mut st = self.lock();
        let waiting = st
            .subs
            .get(path)
            .is_some_and(|l| l.iter().any(|s| s.client.id == id && s.held.is_some()));
        if waiting {
            st.remove_subscriber(id, path);
        }
    }

    /// A later `on` for a path held by a one-shot subscription makes it lasting.
    pub fn make_lasting(&self, id: u64, path: &str) {
        if let Some(list) = self.lock().subs.get_mut(path) {
            for s in list.iter_mut().filter(|s| s.client.id == id) {
                s.once = false;
            }
        }
    }

    /// Unregisters a confirmed subscription; returns whether there was one.
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
        let per_path = st
            .subs
            .iter()
            .map(|(p, l)| (p.clone(), l.iter().filter(|s| s.held.is_none()).count()))
            .collect();
        (st.clients.len(), st.delivered, per_path)
    }

    /// Fans out one notice from the session.
    ///
    /// Returns the paths whose one-shot subscriber just got its event, for the caller to
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
                let mut receivers = Vec::new();
                let mut once_done = Vec::new();
                let mut delivered = 0u64;
                for s in list.iter_mut() {
                    match &mut s.held {
                        Some(held) => {
                            // One event is all a one-shot subscriber will take.
                            if s.once && !held.is_empty() {
                                continue;
                            }
                            if held.len() >= s.client.pending_events {
                                held.remove(0);
                                s.client.outbox.count_lost(1);
                            }
                            held.push(line.clone());
                        }
                        None => {
                            s.client.push_event(line.clone());
                            delivered += 1;
                            if s.once {
                                once_done.push(s.client.id);
                            }
                        }
                    }
                    if ev.cb.is_some() {
                        receivers.push(s.client.id);
                    }
                }
                list.retain(|s| !(s.held.is_none() && once_done.contains(&s.client.id)));
                if list.is_empty() {
                    st.subs.remove(&ev.path);
                }
                for id in &once_done {
                    if let Some(paths) = st.by_client.get_mut(id) {
                        paths.remove(&ev.path);
                    }
                }
                st.delivered += delivered;
                if let Some(h) = ev.cb {
                    drop(st);
                    for id in receivers {
                        self.allow_handle(h, id);
                    }
                }
                once_done.iter().map(|_| ev.path.clone()).collect()
            }
            Notice::State(state) => {
                let mut st = self.lock();
                let line = match &state {
                    StateChange::Open { .. } => {
                        st.open = true;
                        st.conn += 1;
                        st.close_reason = None;
                        Some(event_line(events::OPEN, None, None))
                    }
                    StateChange::Closed { reason } => {
                        st.open = false;
                        st.close_reason = Some(reason.clone());
                        st.handles = Handles::default();
                        Some(event_line(events::CLOSE, Some(&reason_data(reason)), None))
                    }
                    StateChange::ConnectFailed { url, reason } => {
                        st.close_reason = Some(format!("{url}: {reason}"));
                        let data = ErrorData {
                            op: None,
                            path: None,
                            code: qio_ipc::code::DISCONNECTED,
                            err_msg: format!("cannot connect to {url}: {reason}"),
                        };
                        Some(event_line(events::ERROR, Some(&to_raw(&data)), None))
                    }
                    StateChange::Stopped => {
                        st.open = false;
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
                    st.tell_all(&line);
                }
                Vec::new()
            }
            Notice::Dropped {
                client,
                path,
                outcome,
            } => {
                // The event was accepted without a reply: an `/error` is the only way to
                // tell its sender, if it is still here.
                if let Some(c) = self.lock().clients.get(&client) {
                    c.push_notice(error_event(Some("send"), Some(&path), &outcome));
                }
                Vec::new()
            }
            Notice::SubscriptionLost { path, outcome } => {
                let mut st = self.lock();
                let list = st.subs.remove(&path).unwrap_or_default();
                let (lost, waiting): (Vec<_>, Vec<_>) =
                    list.into_iter().partition(|s| s.held.is_none());
                if !waiting.is_empty() {
                    // Their own `on` is still waiting; its answer tells them.
                    st.subs.insert(path.clone(), waiting);
                }
                for s in lost {
                    if let Some(paths) = st.by_client.get_mut(&s.client.id) {
                        paths.remove(&path);
                    }
                    let op = if s.once { "one" } else { "on" };
                    s.client
                        .push_notice(error_event(Some(op), Some(&path), &outcome));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Event;

    fn client(id: u64) -> Arc<ClientRef> {
        Arc::new(ClientRef {
            id,
            outbox: Outbox::new(16, 16, super::super::SlowClientPolicy::DropOldest),
            kick: CancellationToken::new(),
            pending_events: 4,
        })
    }

    fn event(path: &str, n: u32) -> Notice {
        Notice::Event(Event {
            path: path.into(),
            data: RawValue::from_string(n.to_string()).unwrap(),
            cb: None,
        })
    }

    async fn lines(c: &ClientRef) -> Vec<String> {
        c.outbox.close();
        let mut out = Vec::new();
        while let Some(b) = c.outbox.next_batch().await {
            out.extend(
                b.lines
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).trim().to_owned()),
            );
        }
        out
    }

    #[tokio::test]
    async fn events_between_the_servers_answer_and_the_reply_are_held_not_lost() {
        let hub = Hub::new(8);
        let a = client(1);
        hub.expect(&a, "/p", false);
        hub.dispatch(event("/p", 1));
        a.push_notice(Bytes::from_static(b"reply\n"));
        assert!(!hub.confirm(&a, "/p", false));
        hub.dispatch(event("/p", 2));
        assert_eq!(
            lines(&a).await,
            [
                "reply",
                r#"{"event":"/p","data":1}"#,
                r#"{"event":"/p","data":2}"#
            ]
        );
        assert_eq!(hub.leave(1, &[]), ["/p"]);
    }

    #[tokio::test]
    async fn a_one_shot_subscription_takes_one_held_event_and_ends() {
        let hub = Hub::new(8);
        let a = client(1);
        hub.expect(&a, "/p", true);
        hub.dispatch(event("/p", 1));
        hub.dispatch(event("/p", 2));
        assert!(
            hub.confirm(&a, "/p", true),
            "the caller gives the reference back"
        );
        hub.dispatch(event("/p", 3));
        assert_eq!(lines(&a).await, [r#"{"event":"/p","data":1}"#]);
        assert!(hub.leave(1, &[]).is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_subscription_delivers_nothing() {
        let hub = Hub::new(8);
        let a = client(1);
        hub.expect(&a, "/p", false);
        hub.dispatch(event("/p", 1));
        hub.abandon(1, "/p");
        hub.dispatch(event("/p", 2));
        assert!(lines(&a).await.is_empty());
        assert!(hub.leave(1, &[]).is_empty(), "nothing to give back");
    }

    #[tokio::test]
    async fn a_client_joining_sees_each_state_change_once() {
        let hub = Hub::new(8);
        let url = url::Url::parse("ws://x/").unwrap();
        let a = client(1);
        hub.join(a.clone());
        hub.dispatch(Notice::State(StateChange::Open { url }));
        let b = client(2);
        hub.join(b.clone());
        assert_eq!(lines(&a).await.len(), 2, "/close at join, then /open");
        assert_eq!(lines(&b).await, [r#"{"event":"/open"}"#]);
    }
}
