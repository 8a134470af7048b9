//! The hub: the one owner of who holds and who waits for which subscription, and the
//! fan-out of upstream notices to clients.
//!
//! Per path it knows the confirmed holders, the clients whose `on`/`one` waits (with each
//! waiting request), the upstream state as the session last reported it, and the
//! generation of the path's current want. It switches the path on and off in the session
//! ([`SessionHandle::want`]/[`SessionHandle::unwant`]) when holders plus waiters go
//! 0 <-> 1, and learns the answers from [`Notice::Subscription`], which comes on the same
//! ordered stream as the events: a confirmation can neither overtake nor be overtaken by
//! the events it relates to, and an answer for a generation already ended is ignored.

use super::outbox::{Outbox, Queued};
use super::IpcConfig;
use crate::driver::{Notice, SessionHandle};
use crate::session::{code, CbHandle, Outcome, StateChange};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use qio_ipc::{events, ErrorData, EventOut, Id, Op, ReplyOut};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// Its `on`/`one` requests waiting in the hub for the server's answer; written by the
    /// hub under its lock, read by the client's task for its caps.
    pub sub_waiting: AtomicUsize,
    /// Bytes of the ids of those requests.
    pub sub_waiting_bytes: AtomicUsize,
    /// Notified whenever one of those requests is answered (a client that closed its
    /// sending side leaves once the last one is).
    pub sub_answered: Notify,
}

impl ClientRef {
    /// A client with nothing subscribed or waiting.
    pub fn new(id: u64, outbox: Outbox, kick: CancellationToken, pending_events: usize) -> Self {
        ClientRef {
            id,
            outbox,
            kick,
            pending_events,
            sub_waiting: AtomicUsize::new(0),
            sub_waiting_bytes: AtomicUsize::new(0),
            sub_answered: Notify::new(),
        }
    }

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

    /// Queues an event for the fan-out's flush ([`Outbox::queue_event`]).
    fn queue_event(&self, line: Bytes) -> Queued {
        let queued = self.outbox.queue_event(line);
        if !queued.taken {
            tracing::warn!(
                client = self.id,
                "disconnecting a client that does not read its events (slow_client = disconnect)"
            );
            self.kick.cancel();
        }
        queued
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

    /// Answers a request: a reply when it had an id, an `/error` event when it failed
    /// without one, nothing when it succeeded without one.
    pub fn answer(&self, id: Option<&Id>, op: Op, path: Option<&str>, outcome: &Outcome) {
        match id {
            Some(id) => self.push_notice(reply_line(id, outcome)),
            None if outcome.code == code::OK => {}
            None => self.push_notice(error_event(Some(op.as_str()), path, outcome)),
        }
    }
}

/// One `on`/`one` request waiting for the server's answer.
#[derive(Debug)]
struct Request {
    /// Unique per hub; names the request in its client's deadline index.
    serial: u64,
    id: Option<Id>,
    op: Op,
    deadline: Instant,
}

impl Request {
    fn id_bytes(&self) -> usize {
        self.id.as_ref().map_or(0, |id| id.as_json().len())
    }
}

/// A client holding a confirmed subscription.
#[derive(Debug)]
struct Holder {
    client: Arc<ClientRef>,
    /// Held through `one` only: it ends with the next event.
    once: bool,
}

/// A client whose `on`/`one` for the path waits for the server.
#[derive(Debug)]
struct Waiter {
    client: Arc<ClientRef>,
    /// Every waiting request of this client for the path; never empty.
    requests: Vec<Request>,
    /// Events that arrived meanwhile, delivered right after the replies so none is
    /// missed; bounded by the client's `pending_events`.
    held: VecDeque<Bytes>,
    /// An `off` came meanwhile: the requests still get their answer, but the client
    /// will not hold the subscription.
    cancelled: bool,
}

impl Waiter {
    fn once(&self) -> bool {
        self.requests.iter().all(|r| r.op == Op::One)
    }
}

/// The upstream state of a path as the session last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// Wanted, not (or no longer) confirmed: asked, or waiting for a connection.
    Pending,
    /// Confirmed by the server on the current connection.
    Active,
}

/// Everything about one path; exists while it has holders or waiters.
#[derive(Debug)]
struct PathSubs {
    /// The generation of the session's want for the path; answers for others are stale.
    gen: u64,
    upstream: Upstream,
    holders: Vec<Holder>,
    waiters: Vec<Waiter>,
}

impl PathSubs {
    fn is_unused(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }
}

/// What the hub knows per client: the paths it holds or waits for, and the deadlines
/// of its waiting requests.
#[derive(Debug, Default)]
struct ClientSubs {
    paths: HashSet<String>,
    deadlines: BTreeMap<(Instant, u64), String>,
}

/// Server callback requests handed to clients, so only a client that received one can
/// answer it. Bounded: the oldest entries go first. Whether a handle's connection is still
/// open is for the session to judge, when the answer reaches it.
#[derive(Debug, Default)]
struct Handles {
    allowed: HashMap<CbHandle, HashSet<u64>>,
    order: VecDeque<CbHandle>,
}

impl Handles {
    fn allow(&mut self, handle: CbHandle, client: u64, max: usize) {
        if !self.allowed.contains_key(&handle) {
            self.order.push_back(handle);
            while self.order.len() > max {
                if let Some(old) = self.order.pop_front() {
                    self.allowed.remove(&old);
                }
            }
        }
        self.allowed.entry(handle).or_default().insert(client);
    }
}

#[derive(Debug)]
struct State {
    clients: HashMap<u64, Arc<ClientRef>>,
    /// Looked up for every event: foldhash, not SipHash (seeded at random per table).
    subs: foldhash::HashMap<String, PathSubs>,
    by_client: HashMap<u64, ClientSubs>,
    handles: Handles,
    open: bool,
    /// Whether the daemon is making a connection (starting, or reconnecting after losing
    /// one) rather than waiting out the backoff after a failed attempt; told to clients
    /// in `/close` so a client can tell "about to connect" from "the server is
    /// unreachable".
    connecting: bool,
    /// The session stopped: nothing can be subscribed any more.
    stopped: bool,
    close_reason: Option<String>,
    delivered: u64,
    next_gen: u64,
    next_serial: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            clients: HashMap::new(),
            subs: foldhash::HashMap::default(),
            by_client: HashMap::new(),
            handles: Handles::default(),
            open: false,
            // The session connects as soon as it starts.
            connecting: true,
            stopped: false,
            close_reason: None,
            delivered: 0,
            next_gen: 0,
            next_serial: 0,
        }
    }
}

/// A path to switch off in the session: its generation ended with no holder or waiter.
pub type Unwant = (String, u64);

/// What [`Hub::subscribe`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Subscribed {
    /// The request was answered already (its reply is queued).
    Answered,
    /// The daemon is not connected: the client holds the path now, as state the session
    /// asks the server for when a connection opens (its 202 is queued); with `want`, the
    /// path is new and the caller must want it in the session for that generation.
    Held {
        /// The generation to pass to [`SessionHandle::want`], when the path is new.
        want: Option<u64>,
    },
    /// The request waits for the server's answer until `deadline`; with `want`, the path
    /// is new and the caller must want it in the session for that generation.
    Waiting {
        /// When the request times out.
        deadline: Instant,
        /// The generation to pass to [`SessionHandle::want`], when the path is new.
        want: Option<u64>,
    },
}

/// What a client has waiting outside the hub, for the per-client caps.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLoad {
    /// `send`/`callback` requests waiting for the server.
    pub waits: usize,
    /// Bytes of their ids.
    pub wait_bytes: usize,
}

/// The hub's counters, as `status` shows them.
#[derive(Debug)]
pub struct Counts {
    /// Local clients connected.
    pub clients: usize,
    /// Event lines handed to local clients.
    pub delivered: u64,
    /// Times the fan-out waited for its readers to catch up ([`IpcConfig::catch_up_wait`]).
    pub catch_up_waits: u64,
    /// Per path: the clients holding or waiting for it, and the clients holding it.
    pub per_path: HashMap<String, (usize, usize)>,
}

/// Shared routing state; every method takes the lock briefly and never awaits under it.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    max_handles: usize,
    request_timeout: Duration,
    catch_up_wait: Duration,
    /// Times the fan-out waited for its readers to catch up (`status`).
    catch_up_waits: AtomicU64,
}

impl State {
    /// Sends a connection event to every client; under the same lock as the state change
    /// and as [`Hub::join`], so no client misses a change or sees one twice.
    fn tell_all(&self, line: &Bytes) {
        for c in self.clients.values() {
            c.push_notice(line.clone());
        }
    }

    /// Forgets a request's deadline and its share of the client's waiting counts.
    fn forget_request(&mut self, client: &ClientRef, r: &Request) {
        client.sub_waiting.fetch_sub(1, Ordering::Relaxed);
        client
            .sub_waiting_bytes
            .fetch_sub(r.id_bytes(), Ordering::Relaxed);
        client.sub_answered.notify_one();
        if let Some(c) = self.by_client.get_mut(&client.id) {
            c.deadlines.remove(&(r.deadline, r.serial));
        }
    }

    /// The client no longer holds nor waits for `path`.
    fn forget_path(&mut self, client: u64, path: &str) {
        if let Some(c) = self.by_client.get_mut(&client) {
            c.paths.remove(path);
        }
    }

    /// Removes the path's entry when nobody holds or waits for it; returns what the
    /// session must then be told.
    fn drop_if_unused(&mut self, path: &str) -> Option<Unwant> {
        let entry = self.subs.get(path)?;
        if !entry.is_unused() {
            return None;
        }
        let gen = entry.gen;
        self.subs.remove(path);
        Some((path.to_owned(), gen))
    }

    /// The session's answer for the path's current generation.
    fn answered(&mut self, path: &str, outcome: Outcome, max_handles: usize) -> Option<Unwant> {
        let entry = self.subs.get_mut(path)?;
        if outcome.code != code::OK {
            // Refused (also when restored after a reconnect): the session wants the path
            // no more, so there is nothing to give back.
            let entry = self.subs.remove(path)?;
            for w in entry.waiters {
                for r in &w.requests {
                    self.forget_request(&w.client, r);
                    w.client.answer(r.id.as_ref(), r.op, Some(path), &outcome);
                }
                self.forget_path(w.client.id, path);
            }
            for h in entry.holders {
                let op = if h.once { "one" } else { "on" };
                h.client
                    .push_notice(error_event(Some(op), Some(path), &outcome));
                self.forget_path(h.client.id, path);
            }
            return None;
        }
        entry.upstream = Upstream::Active;
        let waiters = std::mem::take(&mut entry.waiters);
        let mut holders = Vec::new();
        for w in waiters {
            if let Some(h) = outcome.cb {
                self.handles.allow(h, w.client.id, max_handles);
            }
            // The replies go first, then what was held for the subscription.
            for r in &w.requests {
                self.forget_request(&w.client, r);
                w.client.answer(r.id.as_ref(), r.op, Some(path), &outcome);
            }
            let once = w.once();
            let got_one = !w.held.is_empty();
            for line in w.held {
                w.client.push_event(line);
            }
            if w.cancelled || (once && got_one) {
                self.forget_path(w.client.id, path);
            } else {
                holders.push(Holder {
                    client: w.client,
                    once,
                });
            }
        }
        let entry = self.subs.get_mut(path)?;
        entry.holders.extend(holders);
        self.drop_if_unused(path)
    }

    /// Makes `client` a holder of `path` while not connected; returns the generation to
    /// want when the path is new.
    fn hold_offline(&mut self, client: &Arc<ClientRef>, path: &str, once: bool) -> Option<u64> {
        self.by_client
            .entry(client.id)
            .or_default()
            .paths
            .insert(path.to_owned());
        let holder = Holder {
            client: client.clone(),
            once,
        };
        if let Some(e) = self.subs.get_mut(path) {
            e.holders.push(holder);
            return None;
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        self.subs.insert(
            path.to_owned(),
            PathSubs {
                gen,
                upstream: Upstream::Pending,
                holders: vec![holder],
                waiters: Vec::new(),
            },
        );
        Some(gen)
    }

    /// The 202 for a subscription held while not connected.
    fn held_outcome(&self) -> Outcome {
        let reason = self.close_reason.as_deref().unwrap_or("not connected yet");
        Outcome::local(
            code::PENDING,
            format!(
                "not connected to the server ({reason}); subscribed: the daemon asks the server when it connects"
            ),
        )
    }

    /// The connection is gone: requests still waiting for the server's answer get their
    /// 202 and their clients hold the path, like every other subscription that waits for
    /// the reconnect (a wait across the outage would end in a -2 that blames the server).
    /// Returns the paths this leaves without anyone (only cancelled or finished `one`s
    /// waited for them).
    fn hold_waiters(&mut self) -> Vec<Unwant> {
        let outcome = self.held_outcome();
        let mut unwants = Vec::new();
        let paths: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, e)| !e.waiters.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for path in paths {
            let Some(entry) = self.subs.get_mut(&path) else {
                continue;
            };
            let waiters = std::mem::take(&mut entry.waiters);
            let mut holders = Vec::new();
            let mut gone = Vec::new();
            for w in waiters {
                for r in &w.requests {
                    w.client.answer(r.id.as_ref(), r.op, Some(&path), &outcome);
                }
                let once = w.once();
                let got_one = !w.held.is_empty();
                for line in &w.held {
                    w.client.push_event(line.clone());
                }
                if w.cancelled || (once && got_one) {
                    gone.push(w.client.id);
                } else {
                    holders.push(Holder {
                        client: w.client.clone(),
                        once,
                    });
                }
                for r in &w.requests {
                    self.forget_request(&w.client, r);
                }
            }
            for id in gone {
                self.forget_path(id, &path);
            }
            if let Some(entry) = self.subs.get_mut(&path) {
                entry.holders.extend(holders);
            }
            unwants.extend(self.drop_if_unused(&path));
        }
        unwants
    }

    /// The `/close` line for the current state.
    fn close_line(&self, reason: &str) -> Bytes {
        let data = to_raw(&serde_json::json!({
            "reason": reason,
            "connecting": self.connecting,
        }));
        event_line(events::CLOSE, Some(&data), None)
    }

    /// The session stopped: every waiting request gets -1; holders are simply let go
    /// (the /close that follows tells them).
    fn stop_all(&mut self) {
        let subs = std::mem::take(&mut self.subs);
        for (path, entry) in subs {
            for w in entry.waiters {
                for r in &w.requests {
                    self.forget_request(&w.client, r);
                    let outcome = Outcome::disconnected();
                    w.client.answer(r.id.as_ref(), r.op, Some(&path), &outcome);
                }
            }
        }
        self.by_client.clear();
    }

    /// Removes one waiting request; the waiter goes with its last request.
    fn remove_request(
        &mut self,
        client: u64,
        path: &str,
        serial: u64,
    ) -> Option<(Request, Arc<ClientRef>)> {
        let entry = self.subs.get_mut(path)?;
        let wi = entry.waiters.iter().position(|w| w.client.id == client)?;
        let w = &mut entry.waiters[wi];
        let ri = w.requests.iter().position(|r| r.serial == serial)?;
        let r = w.requests.remove(ri);
        let c = w.client.clone();
        if w.requests.is_empty() {
            entry.waiters.swap_remove(wi);
            self.forget_path(client, path);
        }
        self.forget_request(&c, &r);
        Some((r, c))
    }
}

impl Hub {
    /// An empty hub; `request_timeout` bounds how long an `on`/`one` waits.
    pub fn new(cfg: &IpcConfig, request_timeout: Duration) -> Self {
        Hub {
            state: Mutex::new(State::default()),
            max_handles: cfg.max_handles,
            request_timeout,
            catch_up_wait: cfg.catch_up_wait,
            catch_up_waits: AtomicU64::new(0),
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
            st.close_line(reason)
        };
        client.push_notice(line);
        st.clients.insert(client.id, client);
    }

    /// Removes a client with everything it held or waited for; returns the paths to
    /// switch off in the session.
    ///
    /// Handles the client was allowed to answer stay in the bounded table until they age
    /// out; ids are never reused, so nobody else can use them.
    pub fn leave(&self, id: u64) -> Vec<Unwant> {
        let mut st = self.lock();
        st.clients.remove(&id);
        // Only this client's paths: all clients leaving at once must not cost
        // clients x paths under the lock.
        let paths = st.by_client.remove(&id).unwrap_or_default().paths;
        let mut unwants = Vec::new();
        for path in paths {
            if let Some(entry) = st.subs.get_mut(&path) {
                entry.holders.retain(|h| h.client.id != id);
                if let Some(i) = entry.waiters.iter().position(|w| w.client.id == id) {
                    let w = entry.waiters.swap_remove(i);
                    w.client.sub_waiting.store(0, Ordering::Relaxed);
                    w.client.sub_waiting_bytes.store(0, Ordering::Relaxed);
                }
            }
            unwants.extend(st.drop_if_unused(&path));
        }
        unwants
    }

    /// An `on`/`one` for the (cleaned) `path`, decided in one step: answered at once (the
    /// client holds it already, which an `on` makes lasting; or it is active upstream;
    /// or a cap is reached), or waiting for the server's answer.
    pub fn subscribe(
        &self,
        client: &Arc<ClientRef>,
        path: &str,
        id: Option<Id>,
        op: Op,
        cfg: &IpcConfig,
        load: ClientLoad,
    ) -> Subscribed {
        let mut st = self.lock();
        let refuse = |client: &ClientRef, code: i64, msg: String| {
            client.answer(id.as_ref(), op, Some(path), &Outcome::local(code, msg));
            Subscribed::Answered
        };
        if st.stopped {
            let msg = "the upstream session has stopped".to_owned();
            return refuse(client, code::DISCONNECTED, msg);
        }
        let (holding, waiting, upstream) = match st.subs.get(path) {
            Some(e) => (
                e.holders.iter().any(|h| h.client.id == client.id),
                e.waiters.iter().any(|w| w.client.id == client.id),
                Some(e.upstream),
            ),
            None => (false, false, None),
        };
        if holding {
            if op == Op::On {
                if let Some(h) = st
                    .subs
                    .get_mut(path)
                    .and_then(|e| e.holders.iter_mut().find(|h| h.client.id == client.id))
                {
                    h.once = false;
                }
            }
            client.answer(id.as_ref(), op, Some(path), &Outcome::ok());
            return Subscribed::Answered;
        }
        let max = cfg.max_subscriptions_per_client;
        let held = st.by_client.get(&client.id).map_or(0, |c| c.paths.len());
        if !waiting && held >= max {
            let msg = format!(
                "too many subscriptions for one client (max_subscriptions_per_client = {max})"
            );
            return refuse(client, code::OVERLOADED, msg);
        }
        if !st.open && !waiting {
            // Not connected: a subscription is state, restored with the others when the
            // connection opens, not a request to time out against a server never reached.
            let want = st.hold_offline(client, path, op == Op::One);
            let outcome = st.held_outcome();
            client.answer(id.as_ref(), op, Some(path), &outcome);
            return Subscribed::Held { want };
        }
        if upstream == Some(Upstream::Active) {
            if let Some(e) = st.subs.get_mut(path) {
                e.holders.push(Holder {
                    client: client.clone(),
                    once: op == Op::One,
                });
            }
            let c = st.by_client.entry(client.id).or_default();
            c.paths.insert(path.to_owned());
            client.answer(id.as_ref(), op, Some(path), &Outcome::ok());
            return Subscribed::Answered;
        }
        // It waits: that counts like any request waiting for an answer.
        let max = cfg.max_pending_per_client;
        if load.waits + client.sub_waiting.load(Ordering::Relaxed) >= max {
            let msg = format!("too many requests waiting for an answer (max_pending_per_client = {max}); read your replies");
            return refuse(client, code::OVERLOADED, msg);
        }
        let id_bytes = id.as_ref().map_or(0, |id| id.as_json().len());
        let max = cfg.max_pending_id_bytes_per_client;
        if load.wait_bytes + client.sub_waiting_bytes.load(Ordering::Relaxed) + id_bytes > max {
            let msg = format!("the ids of this client's waiting requests take too many bytes (max_pending_id_bytes_per_client = {max}); use shorter ids or read your replies");
            return refuse(client, code::OVERLOADED, msg);
        }
        let serial = st.next_serial;
        st.next_serial += 1;
        let deadline = Instant::now() + self.request_timeout;
        let request = Request {
            serial,
            id,
            op,
            deadline,
        };
        client.sub_waiting.fetch_add(1, Ordering::Relaxed);
        client
            .sub_waiting_bytes
            .fetch_add(id_bytes, Ordering::Relaxed);
        let c = st.by_client.entry(client.id).or_default();
        c.paths.insert(path.to_owned());
        c.deadlines.insert((deadline, serial), path.to_owned());
        let want = match st.subs.get_mut(path) {
            Some(e) => {
                match e.waiters.iter_mut().find(|w| w.client.id == client.id) {
                    Some(w) => {
                        w.requests.push(request);
                        w.cancelled = false;
                    }
                    None => e.waiters.push(Waiter {
                        client: client.clone(),
                        requests: vec![request],
                        held: VecDeque::new(),
                        cancelled: false,
                    }),
                }
                None
            }
            None => {
                st.next_gen += 1;
                let gen = st.next_gen;
                st.subs.insert(
                    path.to_owned(),
                    PathSubs {
                        gen,
                        upstream: Upstream::Pending,
                        holders: Vec::new(),
                        waiters: vec![Waiter {
                            client: client.clone(),
                            requests: vec![request],
                            held: VecDeque::new(),
                            cancelled: false,
                        }],
                    },
                );
                Some(gen)
            }
        };
        Subscribed::Waiting { deadline, want }
    }

    /// An `off`: the client stops holding the path; an `on`/`one` of its still waiting
    /// gets its answer but leaves it unsubscribed. Returns what to switch off.
    pub fn unsubscribe(&self, client: u64, path: &str) -> Option<Unwant> {
        let mut st = self.lock();
        let entry = st.subs.get_mut(path)?;
        if let Some(i) = entry.holders.iter().position(|h| h.client.id == client) {
            entry.holders.swap_remove(i);
            st.forget_path(client, path);
            return st.drop_if_unused(path);
        }
        if let Some(w) = entry.waiters.iter_mut().find(|w| w.client.id == client) {
            w.cancelled = true;
            w.held.clear();
        }
        None
    }

    /// Answers -2 to the client's waiting requests whose deadline passed; returns the
    /// paths to switch off and the next deadline.
    pub fn expire(&self, client: u64, now: Instant) -> (Vec<Unwant>, Option<Instant>) {
        let mut st = self.lock();
        let mut due = Vec::new();
        if let Some(c) = st.by_client.get_mut(&client) {
            while let Some(entry) = c.deadlines.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let ((_, serial), path) = entry.remove_entry();
                due.push((serial, path));
            }
        }
        let after = self.request_timeout;
        let msg = format!("the server did not confirm the subscription within {after:?}");
        let mut unwants = Vec::new();
        for (serial, path) in due {
            if let Some((r, client_ref)) = st.remove_request(client, &path, serial) {
                let outcome = Outcome::local(code::TIMEOUT, msg.clone());
                client_ref.answer(r.id.as_ref(), r.op, Some(&path), &outcome);
            }
            unwants.extend(st.drop_if_unused(&path));
        }
        let next = st
            .by_client
            .get(&client)
            .and_then(|c| c.deadlines.first_key_value())
            .map(|((at, _), _)| *at);
        (unwants, next)
    }

    /// Lets `client` answer the server's callback request `handle`.
    pub fn allow_handle(&self, handle: CbHandle, client: u64) {
        self.lock().handles.allow(handle, client, self.max_handles);
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

    /// Waits, when every client that got events in the last burst has fallen behind,
    /// until one of them catches up, for at most `catch_up_wait`; those that did not are
    /// let go (not waited for again until they catch up, and `slow_client` applies).
    ///
    /// Meanwhile the notice channel fills and the driver stops reading the server, so a
    /// flood goes at the pace of the fastest reader instead of being read only to be
    /// dropped, as a direct connection's server waits for its reader. No client waits for
    /// a slower one: a single client that keeps up means no wait at all.
    async fn pace(&self, receivers: &[Arc<ClientRef>]) {
        if receivers.is_empty() || !receivers.iter().all(|c| c.outbox.holds_up()) {
            return;
        }
        self.catch_up_waits.fetch_add(1, Ordering::Relaxed);
        let mut any: FuturesUnordered<_> = receivers.iter().map(|c| c.outbox.caught_up()).collect();
        if tokio::time::timeout(self.catch_up_wait, any.next())
            .await
            .is_err()
        {
            for c in receivers {
                c.outbox.let_go();
            }
        }
    }

    /// Local counters for `status`.
    pub fn counts(&self) -> Counts {
        let st = self.lock();
        let per_path = st
            .subs
            .iter()
            .map(|(p, e)| {
                let holders = e.holders.len();
                (p.clone(), (holders + e.waiters.len(), holders))
            })
            .collect();
        Counts {
            clients: st.clients.len(),
            delivered: st.delivered,
            catch_up_waits: self.catch_up_waits.load(Ordering::Relaxed),
            per_path,
        }
    }

    /// [`Hub::fan_out`] and the flush, for one notice.
    #[cfg(test)]
    fn dispatch(&self, notice: Notice) -> Vec<Unwant> {
        let mut burst = Burst::default();
        let unwants = self.fan_out(notice, &mut burst);
        for c in burst.clients {
            c.outbox.flush();
        }
        unwants
    }

    /// Fans out one notice from the session. Events are queued, not yet written: the
    /// clients that got one are added to the burst, for [`Outbox::flush`] after it
    /// (and outside the hub's lock).
    ///
    /// Returns the paths that just lost their last holder (a `one` that got its event),
    /// for the caller to switch off in the session (never from under the lock, never
    /// from the notice loop).
    fn fan_out(&self, notice: Notice, burst: &mut Burst) -> Vec<Unwant> {
        match notice {
            Notice::Event(ev) => {
                let cb = ev.cb.map(|h| h.to_string());
                let line = event_line(&ev.path, Some(&ev.data), cb.as_deref());
                let mut st = self.lock();
                let Some(entry) = st.subs.get_mut(&ev.path) else {
                    return Vec::new();
                };
                let mut receivers = Vec::new();
                let mut once_done = Vec::new();
                let mut delivered = 0u64;
                let mut held_up = !entry.holders.is_empty();
                for h in &entry.holders {
                    let queued = h.client.queue_event(line.clone());
                    if queued.first {
                        burst.clients.push(h.client.clone());
                    }
                    held_up &= queued.holds_up;
                    delivered += 1;
                    if h.once {
                        once_done.push(h.client.id);
                    }
                    if ev.cb.is_some() {
                        receivers.push(h.client.id);
                    }
                }
                for w in entry.waiters.iter_mut().filter(|w| !w.cancelled) {
                    // One event is all a one-shot subscriber will take.
                    if w.once() && !w.held.is_empty() {
                        continue;
                    }
                    if w.held.len() >= w.client.pending_events {
                        w.held.pop_front();
                        w.client.outbox.count_lost(1);
                    }
                    w.held.push_back(line.clone());
                    if ev.cb.is_some() {
                        receivers.push(w.client.id);
                    }
                }
                if !once_done.is_empty() {
                    entry.holders.retain(|h| !once_done.contains(&h.client.id));
                }
                st.delivered += delivered;
                burst.held_up |= held_up;
                for id in &once_done {
                    st.forget_path(*id, &ev.path);
                }
                if let Some(h) = ev.cb {
                    for id in receivers {
                        st.handles.allow(h, id, self.max_handles);
                    }
                }
                st.drop_if_unused(&ev.path).into_iter().collect()
            }
            Notice::State(state) => {
                let mut st = self.lock();
                let mut unwants = Vec::new();
                let line = match &state {
                    StateChange::Open { .. } => {
                        st.open = true;
                        st.close_reason = None;
                        Some(event_line(events::OPEN, None, None))
                    }
                    StateChange::Closed { reason } => {
                        st.open = false;
                        // The session reconnects next (at once or after its backoff).
                        st.connecting = true;
                        st.close_reason = Some(reason.clone());
                        // Every subscription waits for the reconnect to restore it.
                        for e in st.subs.values_mut() {
                            e.upstream = Upstream::Pending;
                        }
                        let line = st.close_line(reason);
                        // The /close first: the 202s that follow refer to it.
                        st.tell_all(&line);
                        unwants = st.hold_waiters();
                        None
                    }
                    StateChange::Connecting { .. } => {
                        st.connecting = true;
                        None
                    }
                    StateChange::ConnectFailed { url, reason } => {
                        st.connecting = false;
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
                        st.connecting = false;
                        st.stopped = true;
                        // Nothing will be confirmed any more: every waiting request
                        // gets -1, before the /close.
                        st.stop_all();
                        Some(st.close_line("the daemon is shutting down"))
                    }
                    StateChange::Moved { .. } | StateChange::Reconnecting { .. } => None,
                };
                if let Some(line) = line {
                    st.tell_all(&line);
                }
                unwants
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
            Notice::Subscription { path, gen, outcome } => {
                let mut st = self.lock();
                if st.subs.get(&path).is_none_or(|e| e.gen != gen) {
                    // For a generation already ended: its holders and waiters are gone.
                    return Vec::new();
                }
                let restored = st.subs.get(&path).is_some_and(|e| !e.holders.is_empty());
                if outcome.code != code::OK && restored {
                    // Its holders lose it: worth a line (a client's own refused `on` is
                    // its reply's business).
                    tracing::warn!(
                        path,
                        code = outcome.code,
                        "the server refused a restored subscription: {}",
                        outcome.err_msg.as_deref().unwrap_or("no reason given")
                    );
                }
                st.answered(&path, outcome, self.max_handles)
                    .into_iter()
                    .collect()
            }
        }
    }
}

/// The clients a burst of notices went to, for the flush after it.
#[derive(Debug, Default)]
struct Burst {
    clients: Vec<Arc<ClientRef>>,
    /// Some event's every reader has fallen behind: the burst ends there.
    held_up: bool,
}

/// Most notices fanned out before the clients they went to are flushed. Under a flood a
/// bigger burst means fewer writes, and fewer wake-ups of each reader: 256 instead of 64
/// took one reader at full speed from 1.4–1.5 M to 1.6–1.8 M events/s (BENCHMARKS.md).
/// Bursts form only from notices already waiting, so a lone event goes out at once.
const BURST: usize = 256;

/// Runs the fan-out until the session's notice channel closes; the switches it cannot
/// await run in `tasks` (the daemon's tracker), so `run` waits for them too.
pub async fn run_notices(
    hub: Arc<Hub>,
    session: SessionHandle,
    mut notices: mpsc::Receiver<Notice>,
    tasks: TaskTracker,
) {
    let mut burst = Burst::default();
    // Notices are taken from the channel a burst at a time (which gives their room back
    // in one step, not one lock per notice); those a wait for the readers left over are
    // fanned out first afterwards, so at most BURST notices are outside the channel.
    let mut taken = Vec::with_capacity(BURST);
    let mut left = VecDeque::with_capacity(BURST);
    loop {
        if left.is_empty() {
            if notices.recv_many(&mut taken, BURST).await == 0 {
                break;
            }
            left.extend(taken.drain(..));
        }
        let mut unwants = Vec::new();
        // The whole burst first, so each client gets its share in one write; but no
        // further than an event whose every reader has fallen behind (see `Hub::pace`).
        while let Some(notice) = left.pop_front() {
            unwants.extend(hub.fan_out(notice, &mut burst));
            if burst.held_up {
                break;
            }
        }
        // Written from here when the client's writer is idle and its socket has room:
        // no wake-up of another task, often on another thread, per client and event.
        let mut woken = false;
        for client in &burst.clients {
            woken |= client.outbox.flush();
        }
        if woken {
            // Some clients' writers have lines to write: let them run before the next
            // burst. On one runtime thread they would otherwise wait behind this loop
            // and the driver for as long as a flood lasts, while their queues overflow
            // (10 readers of a flood lost half its events so).
            tokio::task::yield_now().await;
        }
        if !unwants.is_empty() {
            // The session may be waiting for this very loop to take its next notice, so
            // switching paths off must not be awaited here. Arriving late is harmless:
            // the session ignores an unwant for a generation that is no longer current.
            let session = session.clone();
            tasks.spawn(async move {
                for (path, gen) in unwants {
                    session.unwant(&path, gen).await;
                }
            });
        }
        hub.pace(&burst.clients).await;
        burst.clients.clear();
        burst.held_up = false;
    }
}

/// A reply line for a request.
pub fn reply_line(id: &Id, outcome: &Outcome) -> Bytes {
    let cb = outcome.cb.map(|h| h.to_string());
    let reply = ReplyOut {
        id,
        code: outcome.code,
        data: &outcome.data,
        err_msg: outcome.err_msg.as_deref(),
        cb: cb.as_deref(),
    };
    let mut v = serde_json::to_vec(&reply).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Serializes an event line once; every receiver shares the bytes.
pub fn event_line(event: &str, data: Option<&RawValue>, cb: Option<&str>) -> Bytes {
    // Paths are clean (no byte JSON escapes) and handles are digits and dots: written as
    // they are, into a buffer of the exact size. That is the line serde_json would write
    // (a test holds them equal) without its escape scan, and an exactly filled `Vec`
    // becomes `Bytes` without a second allocation for the shared count.
    if !needs_escape(event) && !cb.is_some_and(needs_escape) {
        let data = data.map(RawValue::get);
        let size = r#"{"event":"""#.len()
            + event.len()
            + data.map_or(0, |d| r#","data":"#.len() + d.len())
            + cb.map_or(0, |c| r#","cb":"""#.len() + c.len())
            + "}\n".len();
        let mut v = Vec::with_capacity(size);
        v.extend_from_slice(br#"{"event":""#);
        v.extend_from_slice(event.as_bytes());
        v.push(b'"');
        if let Some(d) = data {
            v.extend_from_slice(br#","data":"#);
            v.extend_from_slice(d.as_bytes());
        }
        if let Some(c) = cb {
            v.extend_from_slice(br#","cb":""#);
            v.extend_from_slice(c.as_bytes());
            v.push(b'"');
        }
        v.extend_from_slice(b"}\n");
        debug_assert_eq!(v.len(), size);
        return Bytes::from(v);
    }
    // Sized for the line up front: serde_json's own first guess (128 bytes) meant a
    // reallocation for most events.
    let size = event.len() + data.map_or(4, |d| d.get().len()) + cb.map_or(0, str::len) + 32;
    let mut v = Vec::with_capacity(size);
    if serde_json::to_writer(&mut v, &EventOut { event, data, cb }).is_err() {
        v.clear();
    }
    v.push(b'\n');
    Bytes::from(v)
}

/// Whether JSON needs an escape for some byte of `s`.
fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
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

/// Serializes a value the daemon built itself (never fails for these types).
pub fn to_raw<T: serde::Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| crate::json::null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Event;

    fn client(id: u64) -> Arc<ClientRef> {
        let outbox = Outbox::new(16, 16, super::super::SlowClientPolicy::DropOldest);
        Arc::new(ClientRef::new(id, outbox, CancellationToken::new(), 4))
    }

    /// The fan-out waits only when every client of the burst has fallen behind, gives up
    /// on them after `catch_up_wait`, and waits for them again only once they caught up.
    #[tokio::test(start_paused = true)]
    async fn the_fan_out_waits_only_for_readers_that_are_all_behind() {
        let cfg = IpcConfig {
            catch_up_wait: Duration::from_secs(1),
            ..IpcConfig::default()
        };
        let hub = Hub::new(&cfg, Duration::from_secs(30));
        let small = |id| {
            let outbox = Outbox::new(4, 16, super::super::SlowClientPolicy::DropOldest);
            Arc::new(ClientRef::new(id, outbox, CancellationToken::new(), 4))
        };
        let (slow, fast) = (small(1), small(2));
        let line = || Bytes::from_static(b"{}\n");
        assert!(
            !slow.queue_event(line()).holds_up,
            "one of four is not behind"
        );
        assert!(slow.queue_event(line()).holds_up, "half of the bound is");
        let waits = || hub.catch_up_waits.load(Ordering::Relaxed);

        // A client that keeps up means no wait.
        hub.pace(&[slow.clone(), fast.clone()]).await;
        assert_eq!(waits(), 0);

        // Alone, the slow one is waited for, until `catch_up_wait`; then it is let go.
        let t0 = Instant::now();
        hub.pace(std::slice::from_ref(&slow)).await;
        assert_eq!((waits(), t0.elapsed()), (1, Duration::from_secs(1)));
        assert!(!slow.outbox.holds_up(), "let go");
        hub.pace(std::slice::from_ref(&slow)).await;
        assert_eq!(waits(), 1, "not waited for again while still behind");

        // Once it has caught up it counts again, and a writer taking its lines ends the
        // wait at once.
        slow.outbox.next_batch().await.unwrap();
        assert!(!slow.outbox.holds_up());
        slow.queue_event(line());
        assert!(slow.queue_event(line()).holds_up);
        let t0 = Instant::now();
        let wait = hub.pace(std::slice::from_ref(&slow));
        let writer = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            slow.outbox.next_batch().await.unwrap();
        };
        tokio::join!(wait, writer);
        assert_eq!((waits(), t0.elapsed()), (2, Duration::from_millis(10)));
        assert!(!slow.outbox.holds_up());
    }

    /// A client socket for [`Outbox::flush`]: one that takes everything, or one that is
    /// always full.
    #[derive(Debug)]
    struct TestSocket {
        full: bool,
    }

    impl super::super::outbox::DirectWrite for TestSocket {
        fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            if self.full {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(bufs.iter().map(|b| b.len()).sum())
        }
    }

    /// On one thread a flood must leave the clients' writers their turn: after a burst
    /// that left lines to a writer (its socket was full), the notice loop yields before
    /// the next burst. Before, it fanned out every waiting notice in one go while the
    /// writers' queues overflowed. Another task, standing in for the writer, sees the
    /// fan-out between bursts.
    #[tokio::test(flavor = "current_thread")]
    async fn the_notice_loop_lets_the_writers_it_gave_work_run_between_bursts() {
        let hub = Arc::new(offline_hub());
        let (full, free) = (client(1), client(2));
        full.outbox.attach(Arc::new(TestSocket { full: true }));
        free.outbox.attach(Arc::new(TestSocket { full: false }));
        on(&hub, &full, "/p", 1, Op::On);
        on(&hub, &free, "/p", 2, Op::On);
        let n = 4 * BURST as u64;
        let (tx, rx) = mpsc::channel(n as usize);
        for i in 0..n {
            let data = RawValue::from_string(i.to_string()).unwrap();
            let ev = Event {
                path: "/p".into(),
                data,
                cb: None,
            };
            tx.try_send(Notice::Event(ev)).unwrap();
        }
        drop(tx);
        let fan_out = tokio::spawn(run_notices(
            hub.clone(),
            SessionHandle::detached(),
            rx,
            TaskTracker::new(),
        ));
        let mut seen = Vec::new();
        loop {
            let delivered = hub.counts().delivered;
            seen.push(delivered);
            if delivered == 2 * n {
                break;
            }
            tokio::task::yield_now().await;
        }
        fan_out.await.unwrap();
        let between: Vec<_> = seen.iter().filter(|&&d| d > 0 && d < 2 * n).collect();
        assert!(
            between.len() >= 3,
            "the fan-out let others run between its bursts: {seen:?}"
        );
        assert!(
            full.outbox.lost_total() > 0,
            "the full client's queue overflowed"
        );
        assert_eq!(free.outbox.lost_total(), 0, "the free one kept up");
    }

    /// The written-out line is byte for byte what serde_json writes, and lines that need
    /// escapes still come out right.
    #[test]
    fn event_lines_match_serde_json() {
        let data = RawValue::from_string(r#"{"a":[1, "x\"y"]}"#.to_owned()).unwrap();
        let cases: [(&str, Option<&RawValue>, Option<&str>); 7] = [
            ("/news", Some(&data), None),
            ("/news", Some(&data), Some("3.17")),
            ("/open", None, None),
            ("/lost", None, Some("1.2")),
            ("/a\"b", Some(&data), None),
            ("/tab\there", None, Some("we\\ird")),
            ("/ünï", Some(&data), None),
        ];
        for (event, data, cb) in cases {
            let mut want = serde_json::to_vec(&EventOut { event, data, cb }).unwrap();
            want.push(b'\n');
            let got = event_line(event, data, cb);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "{event:?} {cb:?}"
            );
            let line: serde_json::Value = serde_json::from_slice(&got).unwrap();
            assert_eq!(line["event"], event);
        }
    }

    /// A hub whose upstream is open.
    fn hub() -> Hub {
        let hub = offline_hub();
        let url = url::Url::parse("ws://x/").unwrap();
        hub.dispatch(Notice::State(StateChange::Open { url }));
        hub
    }

    /// A hub as the daemon starts: not connected yet.
    fn offline_hub() -> Hub {
        Hub::new(&IpcConfig::default(), Duration::from_secs(30))
    }

    fn event(path: &str, n: u32) -> Notice {
        Notice::Event(Event {
            path: path.into(),
            data: RawValue::from_string(n.to_string()).unwrap(),
            cb: None,
        })
    }

    fn answer(path: &str, gen: u64, code: i64) -> Notice {
        let outcome = match code {
            200 => Outcome::ok(),
            c => Outcome::local(c, "refused"),
        };
        Notice::Subscription {
            path: path.into(),
            gen,
            outcome,
        }
    }

    fn id(n: u32) -> Option<Id> {
        let line = format!("{{\"op\":\"status\",\"id\":{n}}}");
        qio_ipc::RawRequest::parse(line.as_bytes()).unwrap().id
    }

    /// Subscribes and returns the generation to want, if any.
    fn on(hub: &Hub, c: &Arc<ClientRef>, path: &str, n: u32, op: Op) -> Option<u64> {
        let cfg = IpcConfig::default();
        match hub.subscribe(c, path, id(n), op, &cfg, ClientLoad::default()) {
            Subscribed::Waiting { want, .. } | Subscribed::Held { want } => want,
            Subscribed::Answered => None,
        }
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
        let hub = hub();
        let a = client(1);
        let gen = on(&hub, &a, "/p", 1, Op::On).expect("a new path is wanted");
        hub.dispatch(event("/p", 1));
        assert!(hub.dispatch(answer("/p", gen, 200)).is_empty());
        hub.dispatch(event("/p", 2));
        assert_eq!(
            lines(&a).await,
            [
                r#"{"id":1,"code":200,"data":null}"#,
                r#"{"event":"/p","data":1}"#,
                r#"{"event":"/p","data":2}"#
            ]
        );
        assert_eq!(hub.leave(1), [("/p".to_owned(), gen)]);
    }

    #[tokio::test]
    async fn a_one_shot_subscription_takes_one_held_event_and_ends() {
        let hub = hub();
        let a = client(1);
        let gen = on(&hub, &a, "/p", 1, Op::One).unwrap();
        hub.dispatch(event("/p", 1));
        hub.dispatch(event("/p", 2));
        assert_eq!(
            hub.dispatch(answer("/p", gen, 200)),
            [("/p".to_owned(), gen)],
            "the path is switched off at once"
        );
        hub.dispatch(event("/p", 3));
        assert_eq!(lines(&a).await.len(), 2, "the reply and one event");
        assert!(hub.leave(1).is_empty());
    }

    #[tokio::test]
    async fn an_off_while_waiting_answers_but_does_not_subscribe() {
        let hub = hub();
        let a = client(1);
        let gen = on(&hub, &a, "/p", 1, Op::On).unwrap();
        hub.dispatch(event("/p", 1));
        assert!(hub.unsubscribe(1, "/p").is_none(), "still waiting");
        assert_eq!(
            hub.dispatch(answer("/p", gen, 200)),
            [("/p".to_owned(), gen)]
        );
        hub.dispatch(event("/p", 2));
        assert_eq!(lines(&a).await, [r#"{"id":1,"code":200,"data":null}"#]);
    }

    /// Bug 1a/1b: a refusal of a restored subscription that arrives after the path was
    /// given up and wanted afresh belongs to an ended generation.
    #[tokio::test]
    async fn a_late_refusal_for_an_ended_generation_touches_nobody() {
        let hub = hub();
        let (a, b) = (client(1), client(2));
        let g1 = on(&hub, &a, "/p", 1, Op::On).unwrap();
        hub.dispatch(answer("/p", g1, 200));
        // A leaves while the refusal of the restore is still on its way...
        assert_eq!(hub.unsubscribe(1, "/p"), Some(("/p".to_owned(), g1)));
        // ...and B subscribes afresh and is confirmed.
        let g2 = on(&hub, &b, "/p", 1, Op::On).unwrap();
        assert!(g2 > g1);
        hub.dispatch(answer("/p", g2, 200));
        // The late refusal of g1: no /error for B, B still holds it.
        assert!(hub.dispatch(answer("/p", g1, 401)).is_empty());
        hub.dispatch(event("/p", 7));
        assert_eq!(hub.leave(2), [("/p".to_owned(), g2)], "B gives it back");
        assert_eq!(
            lines(&b).await,
            [
                r#"{"id":1,"code":200,"data":null}"#,
                r#"{"event":"/p","data":7}"#
            ]
        );
    }

    /// A refusal of the current generation reaches holders as /error and waiters as
    /// their reply, and nothing is left to give back.
    #[tokio::test]
    async fn a_refused_restore_tells_holders_and_waiters() {
        let hub = hub();
        let (a, b) = (client(1), client(2));
        let g = on(&hub, &a, "/p", 1, Op::On).unwrap();
        hub.dispatch(answer("/p", g, 200));
        let url = url::Url::parse("ws://x/").unwrap();
        hub.dispatch(Notice::State(StateChange::Closed { reason: "x".into() }));
        hub.dispatch(Notice::State(StateChange::Open { url }));
        assert_eq!(on(&hub, &b, "/p", 5, Op::On), None, "waits for the restore");
        assert!(hub.dispatch(answer("/p", g, 401)).is_empty());
        assert!(hub.leave(1).is_empty() && hub.leave(2).is_empty());
        let a_lines = lines(&a).await;
        assert!(
            a_lines
                .last()
                .unwrap()
                .contains(r#""op":"on","path":"/p","code":401"#),
            "{a_lines:?}"
        );
        assert_eq!(
            lines(&b).await,
            [r#"{"id":5,"code":401,"data":null,"err_msg":"refused"}"#]
        );
    }

    /// Bug 6: an `on` for a path held through `one` is decided in one step: lasting if
    /// the event has not come yet, a new subscription if it has.
    #[tokio::test]
    async fn an_on_after_a_one_is_lasting_or_new_never_a_false_200() {
        let hub = hub();
        let a = client(1);
        let g = on(&hub, &a, "/p", 1, Op::One).unwrap();
        hub.dispatch(answer("/p", g, 200));
        assert_eq!(on(&hub, &a, "/p", 2, Op::On), None, "made lasting");
        assert!(hub.dispatch(event("/p", 1)).is_empty(), "kept");
        hub.dispatch(event("/p", 2));
        let b = client(2);
        let g = on(&hub, &b, "/q", 1, Op::One).unwrap();
        hub.dispatch(answer("/q", g, 200));
        assert_eq!(hub.dispatch(event("/q", 1)), [("/q".to_owned(), g)]);
        let g2 = on(&hub, &b, "/q", 2, Op::On).expect("wanted again, not a false 200");
        assert!(g2 > g);
        assert_eq!(lines(&a).await.len(), 4, "two replies, two events");
    }

    #[tokio::test]
    async fn waiting_requests_count_against_the_clients_caps_and_time_out() {
        let hub = hub();
        let a = client(1);
        let cfg = IpcConfig {
            max_pending_per_client: 2,
            ..IpcConfig::default()
        };
        let load = ClientLoad::default();
        assert!(matches!(
            hub.subscribe(&a, "/p", id(1), Op::On, &cfg, load),
            Subscribed::Waiting { want: Some(_), .. }
        ));
        assert!(matches!(
            hub.subscribe(&a, "/p", id(2), Op::One, &cfg, load),
            Subscribed::Waiting { want: None, .. }
        ));
        assert_eq!(
            hub.subscribe(&a, "/p", id(3), Op::On, &cfg, load),
            Subscribed::Answered
        );
        assert_eq!(a.sub_waiting.load(Ordering::Relaxed), 2);
        let (unwants, next) = hub.expire(1, Instant::now() + Duration::from_secs(31));
        assert_eq!(unwants.len(), 1, "the last waiter gone: switched off");
        assert_eq!(next, None);
        assert_eq!(a.sub_waiting.load(Ordering::Relaxed), 0);
        let got = lines(&a).await;
        assert!(got[0].contains(r#""id":3,"code":-3"#), "{got:?}");
        assert!(got[1].contains(r#""id":1,"code":-2"#), "{got:?}");
        assert!(got[2].contains(r#""id":2,"code":-2"#), "{got:?}");
    }

    #[tokio::test]
    async fn a_client_joining_sees_each_state_change_once() {
        let hub = offline_hub();
        let url = url::Url::parse("ws://x/").unwrap();
        let a = client(1);
        hub.join(a.clone());
        hub.dispatch(Notice::State(StateChange::Open { url }));
        let b = client(2);
        hub.join(b.clone());
        assert_eq!(lines(&a).await.len(), 2, "/close at join, then /open");
        assert_eq!(lines(&b).await, [r#"{"event":"/open"}"#]);
    }

    /// Issue 15: an `on` while not connected is state, answered at once (202, with the
    /// reason), made upstream when the connection opens; never a -2 that blames a server
    /// that was never reached.
    #[tokio::test]
    async fn an_on_while_not_connected_is_held_at_once_and_never_times_out() {
        let hub = offline_hub();
        let (a, b) = (client(1), client(2));
        let cfg = IpcConfig::default();
        let load = ClientLoad::default();
        let Subscribed::Held { want: Some(g) } = hub.subscribe(&a, "/p", id(1), Op::On, &cfg, load)
        else {
            panic!("a new path offline is held and wanted");
        };
        assert_eq!(
            hub.subscribe(&b, "/p", id(2), Op::One, &cfg, load),
            Subscribed::Held { want: None }
        );
        assert_eq!(a.sub_waiting.load(Ordering::Relaxed), 0, "nothing waits");
        let (unwants, next) = hub.expire(1, Instant::now() + Duration::from_secs(3600));
        assert!(
            unwants.is_empty() && next.is_none(),
            "no deadline to expire"
        );
        // The connection opens, the session restores the path, the server confirms.
        let url = url::Url::parse("ws://x/").unwrap();
        hub.dispatch(Notice::State(StateChange::Open { url }));
        assert!(hub.dispatch(answer("/p", g, 200)).is_empty());
        hub.dispatch(event("/p", 1));
        assert_eq!(
            hub.dispatch(event("/p", 2)),
            Vec::<Unwant>::new(),
            "a still holds it"
        );
        let got = lines(&a).await;
        assert!(
            got[0].starts_with(r#"{"id":1,"code":202,"data":null,"err_msg":"not connected to the server (not connected yet)"#),
            "{got:?}"
        );
        assert_eq!(
            &got[1..],
            [r#"{"event":"/p","data":1}"#, r#"{"event":"/p","data":2}"#]
        );
        let got = lines(&b).await;
        assert!(got[0].contains(r#""id":2,"code":202"#), "{got:?}");
        assert_eq!(
            &got[1..],
            [r#"{"event":"/p","data":1}"#],
            "one event for a one"
        );
    }

    /// A refusal of a subscription held offline reaches its holders as `/error`, like
    /// that of a restored one.
    #[tokio::test]
    async fn a_held_subscription_refused_on_connect_is_an_error_event() {
        let hub = offline_hub();
        let a = client(1);
        let g = on(&hub, &a, "/p", 1, Op::On).unwrap();
        assert!(hub.dispatch(answer("/p", g, 404)).is_empty());
        assert!(hub.leave(1).is_empty(), "nothing left to give back");
        let got = lines(&a).await;
        assert!(got[0].contains(r#""code":202"#), "{got:?}");
        assert!(
            got[1].contains(r#""op":"on","path":"/p","code":404"#),
            "{got:?}"
        );
    }

    /// Requests still waiting when the connection drops get their 202 after the /close
    /// and are held; their deadlines go with them.
    #[tokio::test]
    async fn waiting_requests_are_held_when_the_connection_drops() {
        let hub = hub();
        let a = client(1);
        hub.join(a.clone());
        let g = on(&hub, &a, "/p", 1, Op::On).unwrap();
        assert_eq!(a.sub_waiting.load(Ordering::Relaxed), 1);
        hub.dispatch(Notice::State(StateChange::Closed {
            reason: "server went away".into(),
        }));
        assert_eq!(a.sub_waiting.load(Ordering::Relaxed), 0);
        let (unwants, next) = hub.expire(1, Instant::now() + Duration::from_secs(31));
        assert!(unwants.is_empty() && next.is_none(), "no -2 for the outage");
        hub.dispatch(Notice::State(StateChange::Open {
            url: url::Url::parse("ws://x/").unwrap(),
        }));
        hub.dispatch(answer("/p", g, 200));
        hub.dispatch(event("/p", 7));
        assert_eq!(hub.leave(1), [("/p".to_owned(), g)], "it was held");
        let got = lines(&a).await;
        assert_eq!(got[0], r#"{"event":"/open"}"#);
        assert_eq!(
            got[1],
            r#"{"event":"/close","data":{"connecting":true,"reason":"server went away"}}"#
        );
        assert!(
            got[2].starts_with(r#"{"id":1,"code":202,"data":null,"err_msg":"not connected to the server (server went away)"#),
            "{got:?}"
        );
        assert_eq!(
            &got[3..],
            [r#"{"event":"/open"}"#, r#"{"event":"/p","data":7}"#]
        );
        // A request cancelled by an `off` gets its 202 but leaves the path to nobody,
        // which the session is told.
        let b = client(2);
        let g = on(&hub, &b, "/q", 1, Op::On).unwrap();
        assert!(hub.unsubscribe(2, "/q").is_none(), "still waiting");
        let unwants = hub.dispatch(Notice::State(StateChange::Closed {
            reason: "again".into(),
        }));
        assert_eq!(unwants, [("/q".to_owned(), g)]);
        assert!(hub.leave(2).is_empty());
        assert!(lines(&b).await[0].contains(r#""id":1,"code":202"#));
    }

    /// `/close` says whether a connection is being made or the last attempt failed.
    #[tokio::test]
    async fn close_tells_whether_the_daemon_is_connecting() {
        let hub = offline_hub();
        let url = url::Url::parse("ws://x/").unwrap();
        let joined = |n| {
            let c = client(n);
            hub.join(c.clone());
            c
        };
        let starting = joined(1);
        hub.dispatch(Notice::State(StateChange::ConnectFailed {
            url: url.clone(),
            reason: "connection refused".into(),
        }));
        let failed = joined(2);
        hub.dispatch(Notice::State(StateChange::Connecting { url }));
        let retrying = joined(3);
        assert_eq!(
            lines(&starting).await[0],
            r#"{"event":"/close","data":{"connecting":true,"reason":"not connected yet"}}"#
        );
        assert_eq!(
            lines(&failed).await[0],
            r#"{"event":"/close","data":{"connecting":false,"reason":"ws://x/: connection refused"}}"#
        );
        assert!(lines(&retrying).await[0].contains(r#""connecting":true"#));
    }
}
