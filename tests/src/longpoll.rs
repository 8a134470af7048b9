//! HTTP long polling, served on the WebSocket's port as the real 0.2.1 server serves it
//! (`/work/shared/quickio/LONGPOLL.md`).
//!
//! Two halves meet here. A *socket* task runs each TCP connection whose first request is
//! not an upgrade: it reads requests (`Content-Length` bodies only), finds their session by
//! `sid=`, hands each body to the session and writes the answer it gets back, always with an
//! `HTTP/1.0` status line and the real server's head. A *session* is a connection in the
//! server's sense (subscriptions, server callbacks, the conformance app) that outlives any
//! socket: it runs the same [`crate::conn`] loop as a WebSocket connection, over
//! [`HttpSession`] instead of a socket, which holds at most one poll and answers it the real
//! server's way (section 5): with the next event made outside a request, with everything
//! buffered when a newer request arrives, empty after [`ServerConfig::poll_hold`], or 403
//! when the session ends.
//!
//! A socket that closes (or times out) while a request's body is still being read ends
//! that request's session, as on the real server.
//!
//! Not modelled: pipelined requests on one socket (bytes that arrive while a request waits
//! are kept and read after its answer), the `/iframe` page.
//!
//! [`ServerConfig::poll_hold`]: crate::ServerConfig::poll_hold

use crate::codec::snippet;
use crate::handshake::{head_end, head_text, Io, MAX_HEAD};
use crate::server::{CloseReason, Inner, LogEntry};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The largest request body read (the stand-in event library's read buffer): beyond, 413
/// and the socket is closed.
const MAX_BODY: usize = 4 << 20;
/// An idle keep-alive socket (no request in flight) is closed after this (51-61 s on the
/// real server).
const IDLE_SOCKET: Duration = Duration::from_secs(60);
/// Requests waiting for one session at once; socket tasks wait beyond.
pub(crate) const SESSION_REQUESTS: usize = 16;

/// What a socket hands to a session.
pub(crate) enum Request {
    /// A request body, and where its answer goes.
    Body {
        body: String,
        answer: oneshot::Sender<Answer>,
    },
    /// A request for the session whose socket closed (or timed out) before its body was
    /// read: the session ends, as on the real server.
    Abort,
}

/// What a socket writes back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Answer {
    fn ok(body: String) -> Answer {
        Answer { status: 200, body }
    }

    fn forbidden() -> Answer {
        Answer {
            status: 403,
            body: String::new(),
        }
    }
}

/// The long-poll side of one session: requests in, events out.
pub(crate) struct HttpSession {
    reqs: mpsc::Receiver<Request>,
    /// Lines of the request being handled, not yet taken.
    lines: VecDeque<String>,
    /// The request whose body is being handled.
    current: Option<oneshot::Sender<Answer>>,
    /// The held poll and since when.
    held: Option<(oneshot::Sender<Answer>, Instant)>,
    /// Events waiting for the next request.
    buffer: String,
    /// Since when no poll has been held and nothing sent (the session expires after
    /// `timeout`).
    idle_since: Option<Instant>,
    hold: Duration,
    timeout: Duration,
    /// The socket of a poll answered without anyone listening is gone: the session ends.
    broken: bool,
}

impl HttpSession {
    pub(crate) fn new(reqs: mpsc::Receiver<Request>, hold: Duration, timeout: Duration) -> Self {
        HttpSession {
            reqs,
            lines: VecDeque::new(),
            current: None,
            held: None,
            buffer: String::new(),
            idle_since: Some(Instant::now()),
            hold,
            timeout,
            broken: false,
        }
    }

    /// The next event line a request carried. Cancel-safe: everything it waits on is.
    pub(crate) async fn next(&mut self) -> Result<String, CloseReason> {
        loop {
            if self.broken {
                return Err(CloseReason::ClientGone);
            }
            if let Some(line) = self.lines.pop_front() {
                // Blank lines (and the LF after the last event) are skipped, as strtok_r does.
                if line.is_empty() {
                    continue;
                }
                return Ok(line);
            }
            if let Some(current) = self.current.take() {
                self.settle(current);
                continue;
            }
            let now = Instant::now();
            let hold_until = self.held.as_ref().map(|(_, since)| *since + self.hold);
            let expire_at = match &self.held {
                None => self.idle_since.map(|t| t + self.timeout),
                Some(_) => None,
            };
            let far = now + Duration::from_secs(86400);
            tokio::select! {
                req = self.reqs.recv() => match req {
                    Some(Request::Body { body, answer }) => {
                        self.lines = body.split('\n').map(str::to_owned).collect();
                        self.current = Some(answer);
                    }
                    Some(Request::Abort) => return Err(CloseReason::ClientGone),
                    None => return Err(CloseReason::Killed),
                },
                _ = async { self.held.as_mut().expect("guarded").0.closed().await }, if self.held.is_some() => {
                    // Closing the socket of the held poll ends the session at once.
                    return Err(CloseReason::ClientGone);
                }
                _ = tokio::time::sleep_until(hold_until.unwrap_or(far)), if hold_until.is_some() => {
                    if let Some((held, _)) = self.held.take() {
                        let _ = held.send(Answer::ok(String::new()));
                    }
                    self.idle_since = Some(Instant::now());
                }
                _ = tokio::time::sleep_until(expire_at.unwrap_or(far)), if expire_at.is_some() => {
                    return Err(CloseReason::PollTimeout);
                }
            }
        }
    }

    /// The current request's body is handled: a held poll gets what is buffered and the
    /// request is held in its place; with none held, the request is answered at once when
    /// something waits, else held.
    fn settle(&mut self, current: oneshot::Sender<Answer>) {
        let now = Instant::now();
        match self.held.take() {
            Some((held, _)) => {
                let body = std::mem::take(&mut self.buffer);
                if held.send(Answer::ok(body)).is_err() {
                    self.broken = true;
                }
                self.held = Some((current, now));
            }
            None if !self.buffer.is_empty() => {
                let body = std::mem::take(&mut self.buffer);
                if current.send(Answer::ok(body)).is_err() {
                    self.broken = true;
                }
                self.idle_since = Some(now);
            }
            None => self.held = Some((current, now)),
        }
    }

    /// One event for the client: an event made outside a request answers the held poll
    /// alone; everything else waits in the buffer.
    pub(crate) fn feed(&mut self, text: &str) {
        if self.current.is_none() && self.buffer.is_empty() {
            if let Some((held, _)) = self.held.take() {
                if held.send(Answer::ok(format!("{text}\n"))).is_err() {
                    self.broken = true;
                }
                self.idle_since = Some(Instant::now());
                return;
            }
        }
        self.buffer.push_str(text);
        self.buffer.push('\n');
        // Any event sent to the session counts as a send, even one only buffered.
        if self.held.is_none() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// The session ends: the real server's answers to what it still holds. A move's event
    /// goes out on the held poll (or the request that asked for it); a bad body line gets
    /// 400; everything else still held gets 403. A killed or shut-down server answers
    /// nothing (the sockets just close).
    pub(crate) fn finish(mut self, reason: &CloseReason) {
        if matches!(reason, CloseReason::Killed | CloseReason::Shutdown) {
            return;
        }
        let mut current = self.current.take();
        let mut held = self.held.take().map(|(h, _)| h);
        if matches!(reason, CloseReason::Moved) && !self.buffer.is_empty() {
            let body = std::mem::take(&mut self.buffer);
            if let Some(h) = held.take().or_else(|| current.take()) {
                let _ = h.send(Answer::ok(body));
            }
        }
        if let Some(c) = current {
            let answer = match reason {
                CloseReason::Malformed { .. } => Answer {
                    status: 400,
                    body: String::new(),
                },
                _ => Answer::forbidden(),
            };
            let _ = c.send(answer);
        }
        if let Some(h) = held {
            let _ = h.send(Answer::forbidden());
        }
    }
}

/// The parts of a request head the server reads.
struct Head {
    method: String,
    target: String,
    keep_alive: bool,
    upgrade: bool,
    content_length: Option<String>,
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn parse_head(head: &str) -> Option<Head> {
    let line = head.split("\r\n").next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !target.starts_with('/') || !version.starts_with("HTTP/") {
        return None;
    }
    let connection = header(head, "Connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let keep_alive = if version == "HTTP/1.0" {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        keep_alive,
        upgrade: header(head, "Sec-WebSocket-Key").is_some(),
        content_length: header(head, "Content-Length").map(str::to_owned),
    })
}

/// Whether a first request head is long polling: an HTTP request without
/// `Sec-WebSocket-Key` (with one, it is an upgrade).
pub(crate) fn is_long_poll(head: &str) -> bool {
    const METHODS: [&str; 6] = [
        "GET /",
        "POST /",
        "OPTIONS /",
        "PUT /",
        "HEAD /",
        "DELETE /",
    ];
    METHODS.iter().any(|m| head.starts_with(m)) && header(head, "Sec-WebSocket-Key").is_none()
}

/// The session id: the 32 hex digits after the first `sid=` (either case, more ignored),
/// lower-cased; `None` when there are fewer.
fn sid(target: &str) -> Option<String> {
    let at = target.find("sid=")? + 4;
    let digits = target.get(at..at + 32)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| digits.to_ascii_lowercase())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Request Entity Too Large",
        501 => "Not Implemented",
        _ => "Error",
    }
}

/// The real server's response: always `HTTP/1.0`, always `Connection: Keep-Alive`.
fn response(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.0 {status} {}\r\nCache-Control: private, max-age=0\r\nExpires: -1\r\n\
         Connection: Keep-Alive\r\nKeep-Alive: timeout=60\r\nContent-Length: {}\r\n\
         Content-Type: text/plain\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
}

const NOT_IMPLEMENTED: &str = "<html><head><title>501 Not Implemented</title></head>\
<body><h1>501 Not Implemented</h1></body></html>";

/// Runs one long-poll socket to its end; `buf` holds what was read of its first request.
pub(crate) async fn serve_socket(inner: Arc<Inner>, id: u64, io: Io, buf: Vec<u8>) -> CloseReason {
    let mut socket = Socket { inner, id, io, buf };
    socket.serve().await
}

struct Socket {
    inner: Arc<Inner>,
    id: u64,
    io: Io,
    buf: Vec<u8>,
}

impl Socket {
    async fn serve(&mut self) -> CloseReason {
        loop {
            let end = match self.read_head().await {
                Ok(end) => end,
                Err(reason) => return reason,
            };
            let text = head_text(&self.buf[..end]);
            let Some(head) = parse_head(&text) else {
                let _ = self.answer(None, 400, "").await;
                return CloseReason::HandshakeFailed(format!(
                    "not an HTTP request head: {:?}",
                    snippet(&text, 64)
                ));
            };
            if head.upgrade {
                let _ = self.answer(None, 400, "").await;
                return CloseReason::HandshakeFailed(
                    "an upgrade on a socket used for long polling".into(),
                );
            }
            let Some(length) = head.content_length.as_deref() else {
                let _ = self.answer(None, 411, "").await;
                return CloseReason::HandshakeFailed("POST without Content-Length".into());
            };
            let Ok(length) = length.parse::<usize>() else {
                let _ = self.answer(None, 400, "").await;
                return CloseReason::HandshakeFailed(format!("bad Content-Length: {length:?}"));
            };
            if length > MAX_BODY {
                let _ = self.answer(None, 413, "").await;
                return CloseReason::FrameTooLarge {
                    size: length,
                    max: MAX_BODY,
                };
            }
            if let Err(reason) = self.read_body(end + length).await {
                // The socket was already the session's once its head was read.
                if let Some(tx) = sid(&head.target).and_then(|s| self.inner.poll_session(&s, false))
                {
                    let _ = tx.try_send(Request::Abort);
                }
                return reason;
            }
            let body = String::from_utf8_lossy(&self.buf[end..end + length]).into_owned();
            self.buf.drain(..end + length);
            let sid = sid(&head.target);
            let (status, answer) = if !self.inner.cfg.long_poll {
                (501, NOT_IMPLEMENTED.to_owned())
            } else if head.method != "POST" {
                (405, String::new())
            } else {
                match self.route(sid.as_deref(), &head.target, body).await {
                    Ok(a) => (a.status, a.body),
                    Err(reason) => return reason,
                }
            };
            if let Err(reason) = self.answer(sid, status, &answer).await {
                return reason;
            }
            if !head.keep_alive {
                let _ = self.io.shutdown().await;
                return CloseReason::ClientGone;
            }
        }
    }

    /// Hands the body to its session and waits for the answer, watching the socket: a
    /// client that closes it meanwhile ends the wait (and, for a held poll, the session).
    async fn route(
        &mut self,
        sid: Option<&str>,
        target: &str,
        body: String,
    ) -> Result<Answer, CloseReason> {
        let Some(sid) = sid else {
            return Ok(Answer::forbidden());
        };
        let connect = target.contains("connect=true");
        let Some(tx) = self.inner.poll_session(sid, connect) else {
            return Ok(Answer::forbidden());
        };
        let (answer, rx) = oneshot::channel();
        if tx.send(Request::Body { body, answer }).await.is_err() {
            return Ok(Answer::forbidden());
        }
        tokio::pin!(rx);
        let mut chunk = [0u8; 4096];
        loop {
            tokio::select! {
                res = &mut rx => return match res {
                    Ok(a) => Ok(a),
                    // The session's task is gone without an answer (killed): no response.
                    Err(_) => Err(CloseReason::Killed),
                },
                read = self.io.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => return Err(CloseReason::ClientGone),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }

    async fn answer(
        &mut self,
        sid: Option<String>,
        status: u16,
        body: &str,
    ) -> Result<(), CloseReason> {
        self.inner.push_log(LogEntry::PollAnswered {
            socket: self.id,
            sid,
            status,
            body: body.to_owned(),
        });
        let text = response(status, body);
        self.inner.add_bytes_sent(text.len());
        match tokio::time::timeout(self.inner.cfg.client_timeout, async {
            self.io.write_all(text.as_bytes()).await?;
            self.io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::ClientGone),
            Err(_) => Err(CloseReason::ClientTimeout),
        }
    }

    /// Reads until `buf` holds a whole head; an idle socket may wait [`IDLE_SOCKET`], a
    /// started head only `client_timeout`.
    async fn read_head(&mut self) -> Result<usize, CloseReason> {
        loop {
            if let Some(end) = head_end(&self.buf) {
                return Ok(end);
            }
            if self.buf.len() >= MAX_HEAD {
                let _ = self.answer(None, 400, "").await;
                return Err(CloseReason::HandshakeFailed(format!(
                    "request head larger than {MAX_HEAD} bytes"
                )));
            }
            let limit = if self.buf.is_empty() {
                IDLE_SOCKET
            } else {
                self.inner.cfg.client_timeout
            };
            self.read_more(limit).await?;
        }
    }

    async fn read_body(&mut self, until: usize) -> Result<(), CloseReason> {
        while self.buf.len() < until {
            self.read_more(self.inner.cfg.client_timeout).await?;
        }
        Ok(())
    }

    async fn read_more(&mut self, limit: Duration) -> Result<(), CloseReason> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(limit, self.io.read(&mut chunk)).await {
            Err(_) => Err(CloseReason::ClientTimeout),
            Ok(Ok(0)) | Ok(Err(_)) => Err(CloseReason::ClientGone),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_are_32_hex_digits_found_anywhere() {
        let s = "16a0dd9a4e554a9f94520c8bfa59e1b9";
        assert_eq!(sid(&format!("/?sid={s}&connect=true")).as_deref(), Some(s));
        assert_eq!(
            sid(&format!("/x?connect=true&sid={}", s.to_uppercase())).as_deref(),
            Some(s)
        );
        assert_eq!(sid(&format!("/?sid={s}0000")).as_deref(), Some(s));
        assert_eq!(sid("/?sid=16a0dd9a-4e55-4a9f-9452-0c8bfa59e1b9"), None);
        assert_eq!(sid("/?sid=abc"), None);
        assert_eq!(sid("/"), None);
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let h = |s: &str| parse_head(s).unwrap().keep_alive;
        assert!(h("POST / HTTP/1.1\r\n\r\n"));
        assert!(!h("POST / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!h("POST / HTTP/1.0\r\n\r\n"));
        assert!(h("POST / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(is_long_poll("POST /?sid=x HTTP/1.1\r\n\r\n"));
        assert!(!is_long_poll(
            "GET / HTTP/1.1\r\nSec-WebSocket-Key: abcd\r\n\r\n"
        ));
    }

    #[test]
    fn responses_are_http_1_0_with_the_real_head() {
        let r = response(200, "/qio/ping:0=null\n");
        assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 17\r\n"), "{r}");
        assert!(r.contains("\r\nConnection: Keep-Alive\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n/qio/ping:0=null\n"), "{r}");
    }
}
