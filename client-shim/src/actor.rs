//! The connection task: the one owner of the daemon socket.
//!
//! It takes commands from the handles' mailbox, writes request lines, reads the daemon's
//! lines, answers callers (one oneshot each), routes events to subscription queues and
//! reports connection events. When the daemon goes away it fails what was waiting,
//! reconnects with backoff and subscribes again to every path that still has a
//! subscription. It ends when every handle is gone or the client is closed.

use crate::queue::Ring;
use crate::shared::{
    Cmd, Common, LinkState, Outgoing, RawEvent, RawReply, SlotGuard, SubParts, Tx,
};
use crate::types::ConnectionEvent;
use crate::Error;
use futures_util::StreamExt;
use qio_ipc::clean_path;
use qio_ipc::{code, events, ErrorData, Id, Incoming, Op, Request};
use qio_platform::local::{self, ReadHalf as OwnedReadHalf, Stream, WriteHalf as OwnedWriteHalf};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec};

/// Longest line accepted from the daemon (its own `max_message_bytes` is 16 MiB by default).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// How long the daemon may take to send its first line (the upstream state).
pub(crate) const FIRST_LINE_WAIT: Duration = Duration::from_secs(5);
/// Unwritten bytes beyond which no new command is taken: callers then wait for room in
/// the mailbox, so a daemon that reads slowly slows its callers instead of filling memory.
const OUT_HIGH: usize = 1024 * 1024;
/// How long the last lines may take to go out once every handle is gone.
const FLUSH_AT_END: Duration = Duration::from_secs(1);
/// Written bytes kept at the front of the output buffer before it is compacted.
const COMPACT_AFTER: usize = 64 * 1024;

/// An open connection to the daemon.
///
/// Writing never blocks the task: lines go into `out` and the loop writes them while it
/// keeps reading. (The daemon stops reading a client that leaves many replies unread; a
/// client blocked in a write, and so not reading, would wait for it forever.)
pub(crate) struct Link {
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    writer: OwnedWriteHalf,
    /// Bytes to write, from `pos` on.
    out: Vec<u8>,
    pos: usize,
    /// Bytes queued and written on this link; an ack resolves once `written` reaches its end.
    queued: u64,
    written: u64,
    acks: VecDeque<(u64, Tx<()>)>,
    /// The writing side is shut down (closing).
    shut: bool,
}

impl Link {
    pub(crate) fn new(stream: Stream) -> Link {
        let (rd, writer) = local::split(stream);
        Link {
            lines: FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE)),
            writer,
            out: Vec::new(),
            pos: 0,
            queued: 0,
            written: 0,
            acks: VecDeque::new(),
            shut: false,
        }
    }

    /// Reads the daemon's first line, which tells the upstream state.
    ///
    /// A daemon at its `max_clients` sends an `/error` and closes instead: that is
    /// returned as [`Error::Server`].
    /// With the state, whether the daemon says it is making a connection (its `/close`
    /// data `connecting`).
    pub(crate) async fn first_state(&mut self) -> Result<(LinkState, bool), Error> {
        let line = tokio::time::timeout(FIRST_LINE_WAIT, self.lines.next())
            .await
            .map_err(|_| Error::Timeout {
                after: FIRST_LINE_WAIT,
            })?;
        let text = match line {
            None => return Err(Error::Disconnected),
            Some(Err(e)) => return Err(Error::Protocol(e.to_string())),
            Some(Ok(text)) => text,
        };
        match serde_json::from_str::<Incoming>(&text) {
            Ok(Incoming::Event(ev)) if ev.event == events::OPEN => Ok((LinkState::Open, false)),
            Ok(Incoming::Event(ev)) if ev.event == events::CLOSE => Ok((
                LinkState::Closed(close_reason(&ev.data)),
                close_connecting(&ev.data),
            )),
            Ok(Incoming::Event(ev)) if ev.event == events::ERROR => {
                let e = error_data(ev.data);
                Err(Error::Server {
                    code: e.code,
                    err_msg: e.err_msg,
                })
            }
            _ => Err(Error::Protocol(format!(
                "expected the state event first, got {}",
                short(&text)
            ))),
        }
    }

    fn queue(&mut self, line: &[u8]) {
        self.out.extend_from_slice(line);
        self.queued += line.len() as u64;
    }

    /// Queues a line; `done` gets `Ok` once it is written.
    fn queue_acked(&mut self, line: &[u8], done: Tx<()>) {
        self.queue(line);
        self.acks.push_back((self.queued, done));
    }

    fn unwritten(&self) -> usize {
        self.out.len() - self.pos
    }

    fn wrote(&mut self, n: usize) {
        self.pos += n;
        self.written += n as u64;
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        } else if self.pos > COMPACT_AFTER {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
        while self
            .acks
            .front()
            .is_some_and(|(end, _)| *end <= self.written)
        {
            if let Some((_, done)) = self.acks.pop_front() {
                let _ = done.send(Ok(()));
            }
        }
    }

    fn fail_acks(&mut self) {
        for (_, done) in self.acks.drain(..) {
            let _ = done.send(Err(Error::Disconnected));
        }
    }
}

/// What the loop does next.
enum Flow {
    Continue,
    /// The link broke (or the daemon closed it).
    Lost(String),
    /// Every handle is gone.
    Stop,
}

enum Pending {
    Reply(Tx<RawReply>),
    On { path: String, epoch: u64 },
    Off(Tx<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// An `on` is on its way.
    Asking,
    /// The daemon holds it for us.
    Active,
    /// The daemon does not hold it (it went away, or a restore failed for a passing
    /// reason): asked again at the next reconnect or `/open`.
    Unconfirmed,
}

struct Slot {
    id: u64,
    ring: Arc<Ring<RawEvent>>,
    once: bool,
}

struct Waiter {
    once: bool,
    reply: Tx<SubParts>,
}

/// One path's subscriptions: one daemon subscription for any number of local ones.
struct Entry {
    data: Option<Value>,
    slots: Vec<Slot>,
    waiters: Vec<Waiter>,
    state: SubState,
    /// Tells answers to an earlier `on` for the path from answers to the current one.
    epoch: u64,
}

/// Reconnect delays: 50 ms, doubling, at most 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::START }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        d
    }
}

pub(crate) struct Actor {
    common: Arc<Common>,
    rx: mpsc::Receiver<Cmd>,
    buffer: usize,
    /// Counts daemon connections; handles are valid only on theirs.
    generation: u64,
    next_id: u64,
    next_slot: u64,
    next_epoch: u64,
    pending: HashMap<u64, Pending>,
    paths: HashMap<String, Entry>,
    slot_paths: HashMap<u64, String>,
}

enum Step {
    Cmd(Option<Cmd>),
    Line(Option<Result<String, tokio_util::codec::LinesCodecError>>),
    Wrote(std::io::Result<usize>),
    Released,
    Retry,
}

impl Actor {
    pub(crate) fn new(common: Arc<Common>, rx: mpsc::Receiver<Cmd>, buffer: usize) -> Actor {
        Actor {
            common,
            rx,
            buffer: buffer.max(1),
            generation: 1,
            next_id: 0,
            next_slot: 0,
            next_epoch: 0,
            pending: HashMap::new(),
            paths: HashMap::new(),
            slot_paths: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self, link: Link) {
        let mut link = Some(link);
        let mut backoff = Backoff::new();
        let mut retry_at = Instant::now();
        let mut gone_since = Instant::now();
        let mut closing: Option<Tx<()>> = None;
        loop {
            if let Some(l) = link.as_mut() {
                // Closing: once everything is written, stop writing; the daemon answers
                // what is still waiting, then closes (a failure shows on the reading side).
                if closing.is_some() && !l.shut && l.unwritten() == 0 {
                    l.shut = true;
                    let _ = l.writer.shutdown().await;
                }
            }
            let step = match link.as_mut() {
                Some(l) => {
                    let take = closing.is_none() && l.unwritten() < OUT_HIGH;
                    let writing = l.unwritten() > 0;
                    tokio::select! {
                        cmd = self.rx.recv(), if take => Step::Cmd(cmd),
                        line = l.lines.next() => Step::Line(line),
                        res = l.writer.write(&l.out[l.pos..]), if writing => Step::Wrote(res),
                        _ = self.common.wake.notified() => Step::Released,
                    }
                }
                None => tokio::select! {
                    cmd = self.rx.recv() => Step::Cmd(cmd),
                    _ = self.common.wake.notified() => Step::Released,
                    _ = tokio::time::sleep_until(retry_at) => Step::Retry,
                },
            };
            let flow = match (step, link.as_mut()) {
                (Step::Cmd(None), _) => Flow::Stop,
                (Step::Cmd(Some(Cmd::Close { done })), Some(l)) => {
                    self.begin_close(l);
                    closing = Some(done);
                    Flow::Continue
                }
                (Step::Cmd(Some(Cmd::Close { done })), None) => {
                    let _ = done.send(Ok(()));
                    Flow::Stop
                }
                (Step::Cmd(Some(cmd)), Some(l)) => {
                    self.command(cmd, l);
                    Flow::Continue
                }
                (Step::Cmd(Some(cmd)), None) => {
                    self.command_offline(cmd);
                    Flow::Continue
                }
                (Step::Line(Some(Ok(line))), Some(l)) => {
                    self.incoming(&line, l);
                    Flow::Continue
                }
                (Step::Line(Some(Err(e))), _) => {
                    Flow::Lost(format!("reading from qiod failed: {e}"))
                }
                (Step::Line(None), _) => Flow::Lost("qiod closed the connection".into()),
                (Step::Wrote(Ok(0)), _) => Flow::Lost("qiod stopped reading".into()),
                (Step::Wrote(Ok(n)), Some(l)) => {
                    l.wrote(n);
                    Flow::Continue
                }
                (Step::Wrote(Err(e)), _) => Flow::Lost(format!("writing to qiod failed: {e}")),
                (Step::Released, l) => {
                    self.released(l);
                    Flow::Continue
                }
                (Step::Retry, _) => {
                    match crate::connect::connect_verified(&self.common.socket, &self.common.rules)
                        .await
                    {
                        Ok(stream) => {
                            let mut l = Link::new(stream);
                            self.relink(&mut l, gone_since.elapsed());
                            link = Some(l);
                            backoff = Backoff::new();
                            Flow::Continue
                        }
                        Err(e) => {
                            // Never a word to a stand-in, but the program hears of it.
                            if let Error::Untrusted { .. } = e {
                                self.common.publish(ConnectionEvent::Untrusted {
                                    reason: e.to_string(),
                                });
                            }
                            retry_at = Instant::now() + backoff.next_delay();
                            Flow::Continue
                        }
                    }
                }
                // Lines and writes come only from a link.
                (Step::Line(Some(Ok(_))) | Step::Wrote(Ok(_)), None) => Flow::Continue,
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => {
                    // Lines of callers that did not wait (an emit whose future was
                    // dropped) still go out, briefly.
                    if let Some(l) = link.as_mut() {
                        let rest = &l.out[l.pos..];
                        let _ = tokio::time::timeout(FLUSH_AT_END, l.writer.write_all(rest)).await;
                    }
                    break;
                }
                Flow::Lost(reason) => {
                    if let Some(mut l) = link.take() {
                        l.fail_acks();
                    }
                    if let Some(done) = closing.take() {
                        let _ = done.send(Ok(()));
                        break;
                    }
                    self.link_lost(reason);
                    gone_since = Instant::now();
                    retry_at = gone_since + backoff.next_delay();
                }
            }
        }
        self.finish();
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues a request line with a fresh id, its answer going to `pending`.
    fn request(&mut self, l: &mut Link, msg: Outgoing, pending: Pending) {
        let id = self.id();
        match encode(msg, Some(id)) {
            Ok(line) => {
                l.queue(&line);
                self.pending.insert(id, pending);
            }
            Err(e) => match pending {
                Pending::On { path, epoch } => {
                    self.on_answer(&path, epoch, code::BAD_REQUEST, Some(e.to_string()))
                }
                other => other.fail(e),
            },
        }
    }

    fn command(&mut self, cmd: Cmd, l: &mut Link) {
        match cmd {
            Cmd::Request { msg, reply } => {
                if self.handle_is_current(&msg) {
                    self.request(l, msg, Pending::Reply(reply));
                } else {
                    let _ = reply.send(Err(Error::Disconnected));
                }
            }
            Cmd::Forget { msg, done } => {
                if !self.handle_is_current(&msg) {
                    let _ = done.send(Err(Error::Disconnected));
                    return;
                }
                match encode(msg, None) {
                    Ok(line) => l.queue_acked(&line, done),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Cmd::On {
                path,
                data,
                once,
                reply,
            } => self.on(l, path, data, once, reply),
            Cmd::Off { path, reply } => {
                let why = path.clone();
                self.drop_path(&path, || Error::Unsubscribed { path: why.clone() });
                self.request(l, off(path), Pending::Off(reply));
            }
            // Taken care of by the loop.
            Cmd::Close { done } => {
                let _ = done.send(Ok(()));
            }
        }
    }

    /// Whether a callback answer's handle belongs to the current daemon connection.
    fn handle_is_current(&self, msg: &Outgoing) -> bool {
        msg.cb
            .as_ref()
            .is_none_or(|(_, generation)| *generation == self.generation)
    }

    /// While the daemon is away: nothing can be asked; an `off` needs no daemon.
    fn command_offline(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Request { reply, .. } => {
                let _ = reply.send(Err(Error::Disconnected));
            }
            Cmd::Forget { done, .. } => {
                let _ = done.send(Err(Error::Disconnected));
            }
            Cmd::On { reply, .. } => {
                let _ = reply.send(Err(Error::Disconnected));
            }
            Cmd::Off { path, reply } => {
                let why = path.clone();
                self.drop_path(&path, || Error::Unsubscribed { path: why.clone() });
                let _ = reply.send(Ok(()));
            }
            Cmd::Close { done } => {
                let _ = done.send(Ok(()));
            }
        }
    }

    fn on(
        &mut self,
        l: &mut Link,
        path: String,
        data: Option<Value>,
        once: bool,
        reply: Tx<SubParts>,
    ) {
        let waiter = Waiter { once, reply };
        match self.paths.get_mut(&path) {
            Some(e) if e.state == SubState::Active => {
                let parts = self.new_slot(&path, once);
                // If the caller gave up, the parts are dropped here and the slot released.
                let _ = waiter.reply.send(Ok(parts));
            }
            Some(e) => {
                e.waiters.push(waiter);
                if e.state == SubState::Unconfirmed {
                    self.ask(l, &path);
                }
            }
            None => {
                self.paths.insert(
                    path.clone(),
                    Entry {
                        data,
                        slots: Vec::new(),
                        waiters: vec![waiter],
                        state: SubState::Unconfirmed,
                        epoch: 0,
                    },
                );
                self.ask(l, &path);
            }
        }
    }

    /// Sends an `on` for the path's entry.
    fn ask(&mut self, l: &mut Link, path: &str) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let Some(entry) = self.paths.get_mut(path) else {
            return;
        };
        entry.state = SubState::Asking;
        entry.epoch = epoch;
        let msg = Outgoing {
            op: Op::On,
            path: Some(path.to_owned()),
            data: entry.data.clone(),
            cb: None,
        };
        let path = path.to_owned();
        self.request(l, msg, Pending::On { path, epoch });
    }

    fn new_slot(&mut self, path: &str, once: bool) -> SubParts {
        self.next_slot += 1;
        let id = self.next_slot;
        let ring = Arc::new(Ring::new(self.buffer));
        if let Some(entry) = self.paths.get_mut(path) {
            entry.slots.push(Slot {
                id,
                ring: ring.clone(),
                once,
            });
            self.slot_paths.insert(id, path.to_owned());
        }
        SubParts {
            ring,
            slot: SlotGuard {
                common: self.common.clone(),
                id,
            },
        }
    }

    /// Ends every subscription on the path locally; waiting callers get `why`.
    fn drop_path(&mut self, path: &str, why: impl Fn() -> Error) {
        let Some(entry) = self.paths.remove(path) else {
            return;
        };
        for s in entry.slots {
            s.ring.close();
            self.slot_paths.remove(&s.id);
        }
        for w in entry.waiters {
            let _ = w.reply.send(Err(why()));
        }
    }

    fn incoming(&mut self, line: &str, l: &mut Link) {
        match serde_json::from_str::<Incoming>(line) {
            Ok(Incoming::Reply(r)) => {
                let pending = r.id.as_json().parse::<u64>().ok();
                if let Some(p) = pending.and_then(|id| self.pending.remove(&id)) {
                    self.answer(p, r);
                }
            }
            Ok(Incoming::Event(ev)) => match ev.event.as_str() {
                events::OPEN => {
                    self.common.publish(ConnectionEvent::Open);
                    self.ask_unconfirmed(l);
                }
                events::CLOSE => {
                    self.common
                        .set_upstream_connecting(close_connecting(&ev.data));
                    let reason = close_reason(&ev.data);
                    self.common.publish(ConnectionEvent::Close { reason });
                }
                events::ERROR => {
                    let e = error_data(ev.data);
                    if e.op.is_none() && e.code == code::DISCONNECTED {
                        // A connection attempt failed: the daemon waits before the next.
                        self.common.set_upstream_connecting(false);
                    }
                    // The daemon dropped a subscription the server refused to restore.
                    if let (Some("on" | "one"), Some(path)) = (e.op.as_deref(), e.path.as_deref()) {
                        let path = clean_path(path);
                        if self.paths.get(&path).map(|e| e.state) == Some(SubState::Active) {
                            self.drop_path(&path, || Error::Disconnected);
                        }
                    }
                    self.common.publish(ConnectionEvent::Error {
                        op: e.op,
                        path: e.path,
                        code: e.code,
                        err_msg: e.err_msg,
                    });
                }
                events::LOST => {
                    let count = ev.data.get("count").and_then(Value::as_u64).unwrap_or(0);
                    self.common
                        .publish(ConnectionEvent::Lost { count, path: None });
                }
                _ => self.deliver(ev, l),
            },
            Err(e) => self.common.publish(ConnectionEvent::Error {
                op: None,
                path: None,
                code: code::BAD_REQUEST,
                err_msg: format!("unreadable line from qiod ({e}), skipped: {}", short(line)),
            }),
        }
    }

    /// A reply to one of this client's requests.
    fn answer(&mut self, p: Pending, r: qio_ipc::Reply) {
        match p {
            Pending::Reply(tx) => {
                let _ = tx.send(Ok(RawReply {
                    code: r.code,
                    data: r.data,
                    err_msg: r.err_msg,
                    cb: r.cb,
                    generation: self.generation,
                }));
            }
            Pending::Off(tx) => {
                let _ = tx.send(if r.code == code::OK {
                    Ok(())
                } else {
                    Err(Error::Server {
                        code: r.code,
                        err_msg: r.err_msg.unwrap_or_default(),
                    })
                });
            }
            Pending::On { path, epoch } => self.on_answer(&path, epoch, r.code, r.err_msg),
        }
    }

    fn on_answer(&mut self, path: &str, epoch: u64, status: i64, err_msg: Option<String>) {
        let Some(entry) = self.paths.get_mut(path) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        let waiters = std::mem::take(&mut entry.waiters);
        // 202: the daemon is not connected and holds the subscription for us, to be made
        // when it connects (a refusal then comes as an `/error`, as for a restore).
        if status == code::OK || status == code::PENDING {
            entry.state = SubState::Active;
            for w in waiters {
                let parts = self.new_slot(path, w.once);
                let _ = w.reply.send(Ok(parts));
            }
            return;
        }
        let err_msg = err_msg.unwrap_or_default();
        for w in waiters {
            let _ = w.reply.send(Err(Error::Server {
                code: status,
                err_msg: err_msg.clone(),
            }));
        }
        if entry.slots.is_empty() {
            self.paths.remove(path);
            return;
        }
        // A subscription being restored after a reconnect.
        if status > 0 {
            // The server said no: the subscription is over.
            self.drop_path(path, || Error::Disconnected);
        } else {
            // A passing failure (daemon timeout, bound): ask again at the next /open.
            entry.state = SubState::Unconfirmed;
        }
        self.refused(path, status, err_msg);
    }

    fn refused(&mut self, path: &str, status: i64, err_msg: String) {
        self.common.publish(ConnectionEvent::Error {
            op: Some("on".into()),
            path: Some(path.to_owned()),
            code: status,
            err_msg,
        });
    }

    fn ask_unconfirmed(&mut self, l: &mut Link) {
        let paths: Vec<String> = self
            .paths
            .iter()
            .filter(|(_, e)| e.state == SubState::Unconfirmed)
            .map(|(p, _)| p.clone())
            .collect();
        for path in paths {
            self.ask(l, &path);
        }
    }

    fn deliver(&mut self, ev: qio_ipc::Event, l: &mut Link) {
        let Some(entry) = self.paths.get_mut(&ev.event) else {
            return;
        };
        let raw = RawEvent {
            path: Arc::from(ev.event.as_str()),
            data: ev.data,
            cb: ev.cb,
            generation: self.generation,
        };
        let mut ended = Vec::new();
        entry.slots.retain(|s| {
            s.ring.push(raw.clone());
            if s.once {
                s.ring.close();
                ended.push(s.id);
            }
            !s.once
        });
        if ended.is_empty() {
            return;
        }
        for id in &ended {
            self.slot_paths.remove(id);
        }
        self.give_back_if_unused(&ev.event, Some(l));
    }

    /// Gives the daemon subscription back when nobody here uses it any more.
    fn give_back_if_unused(&mut self, path: &str, l: Option<&mut Link>) {
        let unused = self
            .paths
            .get(path)
            .is_some_and(|e| e.slots.is_empty() && e.waiters.is_empty());
        if !unused {
            return;
        }
        let held = self
            .paths
            .remove(path)
            .is_some_and(|e| e.state != SubState::Unconfirmed);
        if let (Some(l), true) = (l, held) {
            if let Ok(line) = encode(off(path.to_owned()), None) {
                l.queue(&line);
            }
        }
    }

    /// Takes back the slots of dropped subscriptions.
    fn released(&mut self, mut l: Option<&mut Link>) {
        for id in self.common.take_released() {
            let Some(path) = self.slot_paths.remove(&id) else {
                continue;
            };
            if let Some(entry) = self.paths.get_mut(&path) {
                entry.slots.retain(|s| s.id != id);
            }
            self.give_back_if_unused(&path, l.as_deref_mut());
        }
    }

    /// Closing: ends every subscription, giving it back to the daemon. The loop then
    /// writes what is queued, shuts the writing side and reads until the daemon has
    /// answered everything and closed.
    fn begin_close(&mut self, l: &mut Link) {
        let paths: Vec<String> = self.paths.keys().cloned().collect();
        for path in paths {
            let held = self
                .paths
                .get(&path)
                .is_some_and(|e| e.state != SubState::Unconfirmed);
            self.drop_path(&path, || Error::Closed);
            if held {
                if let Ok(line) = encode(off(path), None) {
                    l.queue(&line);
                }
            }
        }
    }

    /// The daemon is gone: every waiting call fails, subscriptions wait for the next daemon.
    fn link_lost(&mut self, reason: String) {
        for (_, p) in self.pending.drain() {
            p.fail(Error::Disconnected);
        }
        self.paths.retain(|_, e| {
            for w in e.waiters.drain(..) {
                let _ = w.reply.send(Err(Error::Disconnected));
            }
            e.state = SubState::Unconfirmed;
            !e.slots.is_empty()
        });
        self.common.publish(ConnectionEvent::DaemonGone { reason });
    }

    /// Connected again: new handles generation, report the gap, subscribe again.
    fn relink(&mut self, l: &mut Link, after: Duration) {
        self.generation += 1;
        self.common.publish(ConnectionEvent::DaemonBack {
            after,
            resubscribed: self.paths.len(),
        });
        self.ask_unconfirmed(l);
    }

    /// The client is done: everything still waiting is answered, every stream ends.
    fn finish(&mut self) {
        for (_, p) in self.pending.drain() {
            p.fail(Error::Closed);
        }
        let paths: Vec<String> = self.paths.keys().cloned().collect();
        for path in paths {
            self.drop_path(&path, || Error::Closed);
        }
        self.common.end_streams();
    }
}

impl Pending {
    /// Answers a request that will get no reply. An `off` needs none: the daemon that held
    /// the subscription is gone. An `on`'s waiters are answered through its path's entry.
    fn fail(self, e: Error) {
        match self {
            Pending::Reply(tx) => {
                let _ = tx.send(Err(e));
            }
            Pending::Off(tx) => {
                let _ = tx.send(Ok(()));
            }
            Pending::On { .. } => {}
        }
    }
}

fn off(path: String) -> Outgoing {
    Outgoing {
        op: Op::Off,
        path: Some(path),
        data: None,
        cb: None,
    }
}

/// One request line, newline included.
fn encode(msg: Outgoing, id: Option<u64>) -> Result<Vec<u8>, Error> {
    let req = Request {
        op: msg.op,
        id: id.map(Id::from),
        path: msg.path,
        data: msg.data,
        cb: msg.cb.map(|(cb, _)| cb),
    };
    let mut line = serde_json::to_vec(&req)
        .map_err(|e| Error::Protocol(format!("cannot encode the request: {e}")))?;
    line.push(b'\n');
    Ok(line)
}

fn close_reason(data: &Value) -> String {
    data.get("reason")
        .and_then(Value::as_str)
        .unwrap_or("closed")
        .to_owned()
}

/// A daemon that does not say (an older one) is taken as not connecting.
fn close_connecting(data: &Value) -> bool {
    data.get("connecting")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn error_data(data: Value) -> ErrorData {
    let text = data.to_string();
    serde_json::from_value(data).unwrap_or(ErrorData {
        op: None,
        path: None,
        code: code::SERVER_ERROR,
        err_msg: format!("unreadable error from qiod: {}", short(&text)),
    })
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_50ms_doubles_and_stops_at_5s() {
        let mut b = Backoff::new();
        let delays: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(
            delays,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
    }

    #[test]
    fn request_lines() {
        let msg = Outgoing {
            op: Op::Send,
            path: Some("/a".into()),
            data: Some(serde_json::json!({"x": 1})),
            cb: None,
        };
        assert_eq!(
            encode(msg, Some(7)).unwrap(),
            b"{\"op\":\"send\",\"id\":7,\"path\":\"/a\",\"data\":{\"x\":1}}\n"
        );
        let msg = Outgoing {
            op: Op::Callback,
            path: None,
            data: Some(Value::Null),
            cb: Some(("2.5".into(), 1)),
        };
        assert_eq!(
            encode(msg, None).unwrap(),
            b"{\"op\":\"callback\",\"data\":null,\"cb\":\"2.5\"}\n"
        );
    }
}
