//! One local client: reads its request lines, runs one handler per op, writes its lines.

use super::hub::{
    error_event, event_line, reply_line, to_raw, ClientLoad, ClientRef, Hub, Subscribed, Unwant,
};
use super::lines::{Line, LineDecoder};
use super::outbox::{DirectWrite, Outbox};
use super::IpcConfig;
use crate::driver::SessionHandle;
use crate::json;
use crate::session::{code, CbHandle, Outcome};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use qio_ipc::{clean_path, events, Id, Op, RawRequest};
use qio_platform::local::{self, Stream, WriteHalf as OwnedWriteHalf};
use std::io::IoSlice;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// Paths a client may not subscribe to: their events would look like the daemon's own.
const RESERVED: [&str; 4] = [events::OPEN, events::CLOSE, events::ERROR, events::LOST];

/// An answer that arrived for one of the client's `send`/`callback` requests.
/// (Subscriptions wait in the hub, which owns them.)
struct Done {
    id: Option<Id>,
    op: Op,
    path: Option<String>,
    outcome: Outcome,
}

struct Conn {
    client: Arc<ClientRef>,
    hub: Arc<Hub>,
    session: SessionHandle,
    cfg: Arc<IpcConfig>,
    waits: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Bytes of the ids held by `waits`.
    wait_bytes: usize,
    /// When the hub may have a waiting `on`/`one` of this client to time out (possibly
    /// earlier than the real next deadline: a confirmation removes deadlines without
    /// telling this task, which then just asks the hub again).
    sub_deadline: Option<tokio::time::Instant>,
}

/// Serves one client until it leaves, is kicked, or the daemon stops.
pub async fn serve_client(
    stream: Stream,
    id: u64,
    hub: Arc<Hub>,
    session: SessionHandle,
    cfg: Arc<IpcConfig>,
    stop: CancellationToken,
) {
    let (rd, wr) = local::split(stream);
    let grace = cfg.client_close_grace;
    let client = Arc::new(ClientRef::new(
        id,
        Outbox::new(
            cfg.client_queue_events,
            cfg.max_pending_per_client,
            cfg.slow_client,
        )
        .with_max_bytes(cfg.client_queue_bytes),
        stop.child_token(),
        cfg.client_queue_events,
    ));
    hub.join(client.clone());
    let abort_writer = CancellationToken::new();
    let mut writer = tokio::spawn(write_loop(wr, client.clone(), abort_writer.clone()));
    // A small first buffer: 8 KiB per idle client was most of the daemon's memory.
    let mut lines = FramedRead::with_capacity(rd, LineDecoder::new(cfg.max_line_bytes), 512);
    let mut conn = Conn {
        client: client.clone(),
        hub: hub.clone(),
        session: session.clone(),
        cfg,
        waits: FuturesUnordered::new(),
        wait_bytes: 0,
        sub_deadline: None,
    };
    let mut reading = true;
    loop {
        // Closing the sending side ends the session: what was asked is still answered,
        // then the client goes (a half-closed socket cannot be told from a closed one).
        // Its `on`/`one` requests wait in the hub, which says when one is answered.
        let subs_waiting = client
            .sub_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        if !reading && conn.waits.is_empty() && !subs_waiting {
            break;
        }
        // A client that does not read its replies stops being read: backpressure, not
        // an ever-growing buffer.
        let room = client.outbox.has_room();
        let sub_deadline = conn.sub_deadline;
        tokio::select! {
            _ = client.kick.cancelled() => break,
            Some(done) = conn.waits.next(), if !conn.waits.is_empty() => conn.finish(done),
            _ = tokio::time::sleep_until(sub_deadline.unwrap_or_else(tokio::time::Instant::now)), if sub_deadline.is_some() => {
                conn.expire().await;
            }
            _ = client.sub_answered.notified(), if !reading => {}
            _ = client.outbox.room(), if !room => {}
            line = lines.next(), if reading && room => match line {
                Some(Ok(line)) => conn.handle_line(line).await,
                Some(Err(e)) => {
                    tracing::debug!(client = id, "read error: {e}");
                    break;
                }
                None => reading = false,
            },
        }
    }
    // Answers that are already there (at shutdown, every one is) still reach the client.
    while let Some(Some(done)) = conn.waits.next().now_or_never() {
        conn.finish(done);
    }
    drop(conn);
    // The hub forgets what the client held or waited for, and says which paths that
    // leaves without anyone.
    unwant(&session, hub.leave(id)).await;
    client.outbox.close();
    // What is queued gets a bounded time to go out; then the writer is stopped and the
    // socket closed, so a client that stopped reading neither holds up shutdown nor keeps
    // its descriptor, its task and its last batch.
    if tokio::time::timeout(grace, &mut writer).await.is_err() {
        tracing::debug!(
            client = id,
            "writer did not finish within {grace:?}; closing"
        );
        abort_writer.cancel();
        let _ = writer.await;
    }
    tracing::debug!(client = id, "client left");
}

/// Writes the client's lines until its outbox is closed and empty, or `abort`.
///
/// The client's socket is released when this returns: `wr` is dropped with it, and the
/// reading half with `serve_client`, so a writer stuck on a client that stopped reading
/// must be aborted, not left behind.
async fn write_loop(wr: OwnedWriteHalf, client: Arc<ClientRef>, abort: CancellationToken) {
    // Shared with the outbox, which writes into it itself while this task is idle.
    let wr = Arc::new(Socket(wr));
    client.outbox.attach(wr.clone());
    let done = tokio::select! {
        _ = abort.cancelled() => {
            tracing::debug!(client = client.id, "writer aborted at the end of the grace period");
            false
        }
        res = write_batches(&wr.0, &client) => match res {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(client = client.id, "write failed: {e}");
                client.kick.cancel();
                false
            }
        },
    };
    // After this the outbox holds no reference to the socket: it closes with `wr`.
    client.outbox.detach();
    if done {
        if let Ok(Socket(mut wr)) = Arc::try_unwrap(wr) {
            let _ = wr.shutdown().await;
        }
    }
}

/// A client's writing half, as the outbox writes into it.
#[derive(Debug)]
struct Socket(OwnedWriteHalf);

impl DirectWrite for Socket {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
}

/// Lines shorter than this are copied together into one buffer (up to [`CHUNK`] bytes)
/// rather than written one slice each: for small events the copy costs less than the
/// slices, and it stays small. Longer lines are written from the shared bytes themselves:
/// a copy of each batch of big events per client was most of the daemon's memory.
const COPY_BELOW: usize = 2048;

/// Largest buffer small lines are copied into.
const CHUNK: usize = 64 * 1024;

/// Most slices given to one `writev` (Linux's `IOV_MAX`).
const MAX_IOV: usize = 1024;

async fn write_batches(wr: &OwnedWriteHalf, client: &ClientRef) -> std::io::Result<()> {
    while let Some(batch) = client.outbox.next_batch().await {
        let lost = (batch.lost > 0).then(|| {
            let data = to_raw(&serde_json::json!({ "count": batch.lost }));
            event_line(events::LOST, Some(&data), None)
        });
        let segments = coalesce(lost.into_iter().chain(batch.lines));
        write_all_vectored(wr, &segments).await?;
        client.outbox.batch_written();
    }
    Ok(())
}

/// The lines as few segments: runs of small lines copied together, long lines as they are.
fn coalesce(lines: impl Iterator<Item = Bytes>) -> Vec<Bytes> {
    fn flush(run: &mut Vec<Bytes>, run_bytes: &mut usize, out: &mut Vec<Bytes>) {
        if run.len() == 1 {
            out.append(run);
        } else if !run.is_empty() {
            let mut buf = Vec::with_capacity(*run_bytes);
            for line in run.drain(..) {
                buf.extend_from_slice(&line);
            }
            out.push(Bytes::from(buf));
        }
        *run_bytes = 0;
    }
    let mut out = Vec::new();
    let mut run = Vec::new();
    let mut run_bytes = 0;
    for line in lines {
        if line.len() >= COPY_BELOW {
            flush(&mut run, &mut run_bytes, &mut out);
            out.push(line);
            continue;
        }
        if run_bytes + line.len() > CHUNK {
            flush(&mut run, &mut run_bytes, &mut out);
        }
        run_bytes += line.len();
        run.push(line);
    }
    flush(&mut run, &mut run_bytes, &mut out);
    out
}

/// Writes every segment in order, in as few `writev` calls as the socket allows.
async fn write_all_vectored(wr: &OwnedWriteHalf, segments: &[Bytes]) -> std::io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < segments.len() {
        if off == segments[i].len() {
            (i, off) = (i + 1, 0);
            continue;
        }
        let mut slices = Vec::with_capacity((segments.len() - i).min(MAX_IOV));
        slices.push(IoSlice::new(&segments[i][off..]));
        slices.extend(
            segments[i + 1..]
                .iter()
                .take(MAX_IOV - 1)
                .map(|l| IoSlice::new(l)),
        );
        let mut n = write_vectored(wr, &slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < segments.len() {
            let left = segments[i].len() - off;
            if n < left {
                off += n;
                n = 0;
            } else {
                n -= left;
                (i, off) = (i + 1, 0);
            }
        }
    }
    Ok(())
}

/// One `writev` once the socket has room (by shared reference: the outbox writes into the
/// same socket while this task is idle).
async fn write_vectored(wr: &OwnedWriteHalf, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
    loop {
        wr.writable().await?;
        match wr.try_write_vectored(slices) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            res => return res,
        }
    }
}

impl Conn {
    async fn handle_line(&mut self, line: Line) {
        let text = match line {
            Line::Text(t) => t,
            Line::TooLong => {
                let max = self.cfg.max_line_bytes;
                let msg =
                    format!("request line longer than max_line_bytes ({max}); it was skipped");
                return self.fail(None, None, None, code::BAD_REQUEST, msg);
            }
            Line::NotUtf8 => {
                let msg = "request line is not UTF-8; it was skipped".to_owned();
                return self.fail(None, None, None, code::BAD_REQUEST, msg);
            }
        };
        if text.trim().is_empty() {
            return;
        }
        let req = match RawRequest::parse(text.as_bytes()) {
            Ok(req) => req,
            Err(bad) => {
                return self.fail(bad.id, bad.op, None, code::BAD_REQUEST, bad.message);
            }
        };
        // One handler per op, and no wildcard: a new op does not compile until handled.
        match req.op {
            Op::Send => self.op_send(req).await,
            Op::Callback => self.op_callback(req).await,
            Op::On | Op::One => self.op_on(req).await,
            Op::Off => self.op_off(req).await,
            Op::Status => self.op_status(req).await,
        }
    }

    async fn op_send(&mut self, req: RawRequest) {
        let path = req.path.unwrap_or_default();
        let data = req.data.unwrap_or_else(json::null);
        match req.id {
            Some(id) => {
                if !self.may_wait(&id, Op::Send, &path) {
                    return;
                }
                let wait = self.session.request_deferred(&path, data).await;
                self.wait_bytes += id.as_json().len();
                self.waits.push(Box::pin(wait.map(move |outcome| Done {
                    id: Some(id),
                    op: Op::Send,
                    path: Some(path),
                    outcome,
                })));
            }
            None => {
                if let Err(e) = self.session.emit_from(self.client.id, &path, data).await {
                    let path = clean_path(&path);
                    self.fail(None, Some(Op::Send), Some(&path), e.code(), e.to_string());
                }
            }
        }
    }

    async fn op_callback(&mut self, req: RawRequest) {
        let raw = req.cb.unwrap_or_default();
        let data = req.data.unwrap_or_else(json::null);
        let handle: CbHandle = match raw.parse() {
            Ok(h) => h,
            Err(msg) => return self.fail(req.id, Some(Op::Callback), None, code::BAD_REQUEST, msg),
        };
        // Whether the handle's connection is still open is for the session to judge (it
        // owns the connection generation): it answers -1 itself.
        // The cap first: a refused request must not use up the handle.
        if let Some(id) = &req.id {
            if !self.may_wait(id, Op::Callback, "") {
                return;
            }
        }
        if !self.hub.take_handle(handle, self.client.id) {
            let msg = format!(
                "callback handle {raw} was not given to this client, or was already answered"
            );
            return self.fail(req.id, Some(Op::Callback), None, code::BAD_REQUEST, msg);
        }
        match req.id {
            Some(id) => {
                let wait = self.session.answer_deferred(handle, data).await;
                self.wait_bytes += id.as_json().len();
                self.waits.push(Box::pin(wait.map(move |outcome| Done {
                    id: Some(id),
                    op: Op::Callback,
                    path: None,
                    outcome,
                })));
            }
            None => {
                if let Err(e) = self.session.answer(handle, data).await {
                    self.fail(None, Some(Op::Callback), None, e.code(), e.to_string());
                }
            }
        }
    }

    async fn op_on(&mut self, req: RawRequest) {
        let op = req.op;
        let path = clean_path(&req.path.unwrap_or_default());
        if RESERVED.contains(&path.as_str()) {
            let msg = format!("{path} is reserved for the daemon's own connection events");
            return self.fail(req.id, Some(op), Some(&path), code::BAD_REQUEST, msg);
        }
        // Checked here, not only by the session: a subscription held while not connected
        // is answered before the session sees it.
        if let Err(e) = crate::session::check_path(&path) {
            return self.fail(req.id, Some(op), Some(&path), e.code(), e.to_string());
        }
        let load = ClientLoad {
            waits: self.waits.len(),
            wait_bytes: self.wait_bytes,
        };
        let decided = self
            .hub
            .subscribe(&self.client, &path, req.id, op, &self.cfg, load);
        let want = match decided {
            Subscribed::Answered => None,
            Subscribed::Held { want } => want,
            Subscribed::Waiting { deadline, want } => {
                if self.sub_deadline.is_none_or(|d| deadline < d) {
                    self.sub_deadline = Some(deadline);
                }
                want
            }
        };
        if let Some(gen) = want {
            // The first holder or waiter of the path: switch it on upstream. Its answer
            // comes to the hub on the notice stream.
            self.session.want(&path, req.data, gen).await;
        }
    }

    async fn op_off(&mut self, req: RawRequest) {
        let path = clean_path(&req.path.unwrap_or_default());
        if let Some(off) = self.hub.unsubscribe(self.client.id, &path) {
            unwant(&self.session, vec![off]).await;
        }
        self.answer(req.id, Op::Off, Some(&path), Outcome::ok());
    }

    /// Times out the client's waiting subscriptions whose deadline passed.
    async fn expire(&mut self) {
        let (unwants, next) = self.hub.expire(self.client.id, tokio::time::Instant::now());
        self.sub_deadline = next;
        unwant(&self.session, unwants).await;
    }

    async fn op_status(&mut self, req: RawRequest) {
        let Some(st) = self.session.status().await else {
            let msg = "the upstream session has stopped".to_owned();
            return self.fail(req.id, Some(Op::Status), None, code::DISCONNECTED, msg);
        };
        let counts = self.hub.counts();
        let subscriptions: Vec<_> = st
            .subscriptions
            .iter()
            .map(|s| {
                let (refs, holders) = counts.per_path.get(&s.path).copied().unwrap_or((0, 0));
                serde_json::json!({
                    "path": s.path,
                    "refs": refs,
                    "state": s.state,
                    "local_subscribers": holders,
                })
            })
            .collect();
        let connected_since = st.open_for.and_then(|d| {
            let since = std::time::SystemTime::now().checked_sub(d)?;
            since
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64)
        });
        let data = serde_json::json!({
            "state": st.state,
            "url": st.url.as_ref().map(|u| u.as_str()),
            "dialect": st.dialect,
            "transport": st.transport,
            "upgrade_error": st.upgrade_error,
            "connected_since_ms": connected_since,
            "open_for_ms": st.open_for.map(|d| d.as_millis() as u64),
            "reconnects": st.reconnects,
            "last_error": st.last_error,
            "clients": counts.clients,
            "subscriptions": subscriptions,
            "queued_events": st.queued_events,
            "queued_bytes": st.queued_bytes,
            "pending_callbacks": st.pending_callbacks,
            "events_in": st.events_in,
            "events_out": st.events_out,
            "events_dropped": st.events_dropped,
            "events_delivered": counts.delivered,
            "catch_up_waits": counts.catch_up_waits,
            "events_lost": self.client.outbox.lost_total(),
        });
        let outcome = Outcome {
            data: to_raw(&data),
            ..Outcome::ok()
        };
        self.answer(req.id, Op::Status, None, outcome);
    }

    fn finish(&mut self, done: Done) {
        let Done {
            id,
            op,
            path,
            outcome,
        } = done;
        if let Some(id) = &id {
            self.wait_bytes -= id.as_json().len();
        }
        if let Some(h) = outcome.cb {
            self.hub.allow_handle(h, self.client.id);
        }
        self.answer(id, op, path.as_deref(), outcome);
    }

    /// Checks the per-client cap on requests waiting for an answer.
    /// Counts the client's subscriptions waiting in the hub too (each request, and the
    /// bytes of their ids).
    fn may_wait(&mut self, id: &Id, op: Op, path: &str) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let max = self.cfg.max_pending_per_client;
        let path = (!path.is_empty()).then_some(path);
        if self.waits.len() + self.client.sub_waiting.load(Relaxed) >= max {
            let msg = format!("too many requests waiting for an answer (max_pending_per_client = {max}); read your replies");
            self.fail(Some(id.clone()), Some(op), path, code::OVERLOADED, msg);
            return false;
        }
        let max = self.cfg.max_pending_id_bytes_per_client;
        let bytes = self.wait_bytes + self.client.sub_waiting_bytes.load(Relaxed);
        if bytes + id.as_json().len() > max {
            let msg = format!("the ids of this client's waiting requests take too many bytes (max_pending_id_bytes_per_client = {max}); use shorter ids or read your replies");
            self.fail(Some(id.clone()), Some(op), path, code::OVERLOADED, msg);
            return false;
        }
        true
    }

    fn fail(&self, id: Option<Id>, op: Option<Op>, path: Option<&str>, code: i64, msg: String) {
        let outcome = Outcome::local(code, msg);
        match id {
            Some(id) => self.client.push_notice(reply_line(&id, &outcome)),
            None => {
                let line = error_event(op.map(Op::as_str), path, &outcome);
                self.client.push_notice(line);
            }
        }
    }

    /// Answers a request; see [`ClientRef::answer`].
    fn answer(&self, id: Option<Id>, op: Op, path: Option<&str>, outcome: Outcome) {
        self.client.answer(id.as_ref(), op, path, &outcome);
    }
}

/// Switches paths off in the session that the hub says nobody holds or waits for any
/// more.
async fn unwant(session: &SessionHandle, unwants: Vec<Unwant>) {
    for (path, gen) in unwants {
        session.unwant(&path, gen).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_lines_are_copied_together_and_long_ones_kept_as_they_are() {
        let small = |c: u8| Bytes::from(vec![c; 100]);
        let long = Bytes::from(vec![b'L'; COPY_BELOW]);
        let out = coalesce(
            [
                small(b'a'),
                small(b'b'),
                long.clone(),
                small(b'c'),
                long.clone(),
            ]
            .into_iter(),
        );
        let joined: Vec<u8> = [vec![b'a'; 100], vec![b'b'; 100]].concat();
        assert_eq!(
            out,
            [Bytes::from(joined), long.clone(), small(b'c'), long.clone()]
        );
        // The long line is the very same memory, not a copy.
        assert_eq!(out[1].as_ptr(), long.as_ptr());
        let many = coalesce((0..1000).map(|_| small(b'x')));
        assert!(many.iter().all(|s| s.len() <= CHUNK), "copies stay small");
        assert_eq!(many.iter().map(Bytes::len).sum::<usize>(), 100_000);
    }

    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        let (a, b) = local::pair().unwrap();
        let (_ra, wa) = local::split(a);
        let segments: Vec<Bytes> = (0..3000u32)
            .map(|i| Bytes::from(format!("{i:0>3000}\n")))
            .collect();
        let want: Vec<u8> = segments.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut b = b;
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .unwrap();
            got
        });
        write_all_vectored(&wa, &segments).await.unwrap();
        drop((_ra, wa));
        assert_eq!(reader.await.unwrap(), want);
    }
}
