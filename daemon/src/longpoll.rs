//! HTTP long polling, the transport Quick.IO clients fall back to when a proxy or firewall
//! breaks the WebSocket upgrade (`LONGPOLL.md` beside the wire notes has the facts).
//!
//! To the session it is one more way of moving frames: [`LongPoll::send`] takes a frame,
//! [`LongPoll::recv`] gives the next one the server sent. Underneath, a session on the
//! server is named by a random sid and fed by HTTP POSTs whose bodies are LF-separated
//! events; the server holds one poll and answers it with whatever it has for us. So:
//!
//! - The handshake is `POST ?sid=..&connect=true` with `/qio/hostname:1=null`
//!   ([`connect`]); it proves a Quick.IO 0.2 server, as `/qio/ohai` does on WebSocket. The
//!   session's own `/qio/ohai` is therefore answered here, at once, and not sent. Later
//!   requests go to the host the server names, keeping the configured scheme and port
//!   (the server answers a bare host).
//! - Exactly one request carrying events is in flight until it is taken (its own answer,
//!   or the answer of an older request, which the server gives when the newer one
//!   arrives); frames written meanwhile are gathered into the next body.
//! - Answers are taken in the order their requests were sent, whichever is read first:
//!   the server produces them in that order (the held poll's answer, with the events so
//!   far, when the newer request arrives), so a short newer answer read before a long
//!   older one must wait for it, or events would overtake each other.
//! - After an answer that leaves no request in flight, the next poll goes out after a
//!   random delay of up to `delay_max` (the documents' 0-2000 ms), or at once with events.
//!   A new poll after an answer that leaves one in flight would only make the server
//!   answer that one empty, forever.
//! - An empty 200 stands in for `/qio/heartbeat` (the server sends none over HTTP): it
//!   comes out of [`LongPoll::recv`] as `/qio/heartbeat:0=null`.
//! - A request without an answer within `request_timeout`, a socket error or any status
//!   but 200 ends the connection. Dropping the [`LongPoll`] closes every socket, the held
//!   poll's included, which ends the session on the server.
//!
//! Nothing here waits outside the driver's `select!`: requests are futures polled by
//! [`LongPoll::recv`]; only each HTTP connection's hyper driver runs as a task, aborted
//! when its connection is dropped.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio_tungstenite::MaybeTlsStream;
use url::Url;

/// What the session gets for an empty answer: the server's HTTP heartbeat.
pub const HEARTBEAT: &str = "/qio/heartbeat:0=null";

/// Settings of the long-poll transport.
#[derive(Debug, Clone)]
pub struct LongPollConfig {
    /// Longest random wait before the next poll (2 s, as the documents ask; the server
    /// ends a session that holds no poll for its timeout, so stay well inside it).
    pub delay_max: Duration,
    /// A request without an answer within this ends the connection (60 s; the server
    /// answers a held poll within 45-55 s).
    pub request_timeout: Duration,
    /// Largest answer body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Bytes of frames that may wait for the next request; beyond, the connection is
    /// closed as one that stopped reading.
    pub queue_bytes: usize,
    /// How long after a request's bytes went out the next request waits. Two requests on
    /// two sockets reach the server's processing in either order when they go out close
    /// together; the server answers in the order it processes them, and events then
    /// overtake each other. 50 ms, next to the documents' 0-2000 ms between polls.
    pub order_gap: Duration,
}

impl Default for LongPollConfig {
    fn default() -> Self {
        LongPollConfig {
            delay_max: Duration::from_millis(2000),
            request_timeout: Duration::from_secs(60),
            max_body_bytes: 16 * 1024 * 1024,
            queue_bytes: 32 * 1024 * 1024,
            order_gap: Duration::from_millis(50),
        }
    }
}

/// `ws://` and `wss://` addresses as `http://` and `https://` ones.
pub fn http_url(url: &Url) -> Url {
    let mut http = url.clone();
    let scheme = if url.scheme() == "wss" {
        "https"
    } else {
        "http"
    };
    // Both are special schemes, so the change is always accepted.
    let _ = http.set_scheme(scheme);
    http
}

/// Where requests go.
struct Endpoint {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    /// `path?sid=SID`.
    target: String,
}

/// One HTTP/1.1 connection; dropping it closes the socket.
struct Conn {
    sender: http1::SendRequest<Body>,
    driver: AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn open(ep: &Endpoint) -> Result<Conn, String> {
    let stream = connect_stream(ep).await?;
    // Canonical header spellings: the 2012 server matched names case-sensitively, and the
    // 0.2 event library's habit is unknown.
    let (sender, conn) = http1::Builder::new()
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    })
    .abort_handle();
    Ok(Conn { sender, driver })
}

/// The TCP connect and, for `https://`, the TLS handshake, verified as for `wss://`.
async fn connect_stream(ep: &Endpoint) -> Result<MaybeTlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("connecting to {}:{}: {e}", ep.host, ep.port))?;
    let _ = tcp.set_nodelay(true);
    let stream = match &ep.tls {
        None => MaybeTlsStream::Plain(tcp),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("{}: not a TLS server name: {e}", ep.host))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {}: {e}", ep.host))?;
            MaybeTlsStream::Rustls(tls)
        }
    };
    Ok(stream)
}

/// Ends the session on the server when no poll of ours may be held there: a request head
/// that promises a body byte, then the socket closed before it. The server ends a session
/// whose request socket closes while the request is still being read; without this, a
/// session left with no poll held lives on as long as anything is sent to it (a busy
/// subscription). Only a head is written, so no HTTP client is needed for it.
async fn abandon(ep: &Endpoint) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut stream = connect_stream(ep).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\n",
        ep.target,
        host_header(ep)
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    write.await.map_err(|e| e.to_string())
}

fn host_header(ep: &Endpoint) -> String {
    match ep.host.contains(':') {
        true => format!("[{}]:{}", ep.host, ep.port),
        false => format!("{}:{}", ep.host, ep.port),
    }
}

/// One POST on `conn` (or a new connection), with its whole answer.
/// A request body that says when the connection took it, which is when its bytes go
/// out (the connection writes and flushes what it took in the same step). Dropped
/// untaken, it says so too (its sender's end closes).
struct Body {
    data: Option<Bytes>,
    len: u64,
    taken: Option<oneshot::Sender<()>>,
}

impl Body {
    fn new(text: String, taken: Option<oneshot::Sender<()>>) -> Body {
        Body {
            len: text.len() as u64,
            data: Some(Bytes::from(text)),
            taken,
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(taken) = self.taken.take() {
            let _ = taken.send(());
        }
        Poll::Ready(
            self.data
                .take()
                .filter(|d| !d.is_empty())
                .map(|d| Ok(Frame::data(d))),
        )
    }

    fn is_end_stream(&self) -> bool {
        // Not before it was polled once, so that an empty body says when it was taken too.
        self.taken.is_none() && self.data.as_ref().is_none_or(|d| d.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

async fn post(
    ep: &Endpoint,
    conn: Option<Conn>,
    query_extra: &str,
    body: String,
    max_body: usize,
    taken: Option<oneshot::Sender<()>>,
) -> Result<(u16, Bytes, Conn), String> {
    let mut conn = match conn {
        Some(c) if !c.sender.is_closed() => c,
        _ => open(ep).await?,
    };
    conn.sender
        .ready()
        .await
        .map_err(|e| format!("HTTP connection: {e}"))?;
    let host = host_header(ep);
    let request = hyper::Request::post(format!("{}{query_extra}", ep.target))
        .header("Host", host)
        .header("Content-Type", "text/plain")
        .header("Content-Length", body.len())
        .body(Body::new(body, taken))
        .map_err(|e| format!("building the request: {e}"))?;
    let response = conn
        .sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP request: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the answer (at most {max_body} bytes): {e}"))?
        .to_bytes();
    Ok((status, body, conn))
}

/// Opens a long-poll session at `url` (`ws://` or `wss://`, mapped to HTTP): a new sid,
/// then the `/qio/hostname` handshake. Fails when the answer is anything but a 200
/// carrying the host.
pub async fn connect(
    url: &Url,
    tls: Arc<rustls::ClientConfig>,
    cfg: LongPollConfig,
) -> Result<LongPoll, String> {
    let host = url
        .host_str()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("{url}: no port"))?;
    // Fresh for every connection, never from the driver's (fixed in tests) seed: a sid
    // that is still alive on the server would join the old session.
    let sid = format!("{:032x}", rand::random::<u128>());
    let rng = StdRng::from_entropy();
    let tls = (url.scheme() == "wss" || url.scheme() == "https").then_some(tls);
    let mut ep = Endpoint {
        tls,
        host,
        port,
        target: format!("{}?sid={sid}", url.path()),
    };
    let ask = tokio::time::timeout(
        cfg.request_timeout,
        post(
            &ep,
            None,
            "&connect=true",
            "/qio/hostname:1=null".to_owned(),
            cfg.max_body_bytes,
            None,
        ),
    )
    .await
    .map_err(|_| {
        format!(
            "no answer to the long-poll handshake within {:?}",
            cfg.request_timeout
        )
    })??;
    let (status, body, conn) = ask;
    if status != 200 {
        return Err(format!(
            "the server answered {status} to the long-poll handshake{}",
            if status == 501 {
                " (long polling is off on that server: it has no public address)"
            } else {
                ""
            }
        ));
    }
    let text = String::from_utf8_lossy(&body);
    let named = hostname_answer(&text).ok_or_else(|| {
        let shown: String = text.chars().take(80).collect();
        format!("the long-poll handshake was answered {shown:?}, not with the server's address")
    })?;
    // The server names a bare host; the scheme and port stay ours. The socket of the
    // handshake is kept only when the host stays the same.
    let idle = if named == ep.host {
        vec![conn]
    } else {
        ep.host = named;
        Vec::new()
    };
    Ok(LongPoll {
        ep: Arc::new(ep),
        cfg,
        idle,
        inflight: FuturesOrdered::new(),
        next_seq: 0,
        untaken: None,
        sending: None,
        answered_before_sent: false,
        gap: None,
        proof: Vec::new(),
        proven: false,
        outbox: String::new(),
        poll_due: true,
        poll_at: None,
        incoming: VecDeque::new(),
        greeted: false,
        ended: None,
        over: false,
        rng,
    })
}

/// The host in `/qio/callback/1:0={"code":200,"data":"<host>"}`.
fn hostname_answer(body: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        code: i64,
        data: String,
    }
    let line = body
        .split('\n')
        .find_map(|l| l.strip_prefix("/qio/callback/1:"))?;
    let (_, json) = line.split_once('=')?;
    let env: Envelope = serde_json::from_str(json).ok()?;
    let host = env.data.trim();
    (env.code == 200 && !host.is_empty() && !host.contains(['/', ' '])).then(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    })
}

struct Done {
    seq: u64,
    res: Result<(u16, Bytes, Conn), String>,
}

/// An open long-poll connection (see the module documentation).
pub struct LongPoll {
    ep: Arc<Endpoint>,
    cfg: LongPollConfig,
    /// Connections with no request on them.
    idle: Vec<Conn>,
    /// Requests in flight, whose answers are taken in the order the requests were sent:
    /// the server answers the poll it holds when a newer request arrives, so an older
    /// request's answer always carries older events, even when a newer answer (shorter,
    /// on another socket) is read first.
    inflight: FuturesOrdered<BoxFuture<'static, Done>>,
    next_seq: u64,
    /// The event-carrying request not yet known to be taken.
    untaken: Option<u64>,
    /// The newest request until its connection took it (it is on its way then). No other
    /// request starts before: requests on different sockets must reach the server in the
    /// order they were made, because it answers them in the order they arrive, and
    /// answers are taken in the order requests were made.
    sending: Option<(u64, oneshot::Receiver<()>)>,
    /// An older request was answered while the event request was still `sending`.
    answered_before_sent: bool,
    /// Until when no request starts while the last one is in flight: `order_gap` after
    /// it went out, unless the server has been seen to process it (`proven`).
    gap: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The callback ids the newest request asks for: an answer carrying one of them shows
    /// the server has processed that request, so the next one cannot overtake it.
    proof: Vec<u64>,
    /// One of `proof` came back.
    proven: bool,
    /// Frames for the next request, each followed by LF.
    outbox: String,
    /// A poll is to go out as soon as nothing else is in flight.
    poll_due: bool,
    poll_at: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Frames received and not yet taken.
    incoming: VecDeque<String>,
    /// The session's `/qio/ohai` was answered.
    greeted: bool,
    ended: Option<String>,
    /// The server said the session is over (a non-200 answer).
    over: bool,
    rng: StdRng,
}

impl LongPoll {
    /// Closes every socket now and returns what ends the server's session for sure (see
    /// [`abandon`]), unless the server already said it is over. The driver runs it as a
    /// goodbye of its own, bounded in time.
    pub fn goodbye(self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let ep = self.ep.clone();
        let over = self.over;
        // Dropping the requests and connections closes their sockets, the held poll's
        // included.
        drop(self);
        if over {
            return None;
        }
        Some(async move {
            if let Err(e) = abandon(&ep).await {
                tracing::debug!("could not end the long-poll session: {e}");
            }
        })
    }

    /// Queues a frame for the next request. Fails when `queue_bytes` would be exceeded.
    pub fn send(&mut self, text: String) -> Result<(), String> {
        if !self.greeted && text == crate::codec::OHAI {
            // The hostname handshake already showed a 0.2 server.
            self.greeted = true;
            self.incoming.push_back(crate::codec::OHAI.to_owned());
            return Ok(());
        }
        if !self.outbox.is_empty() && self.outbox.len() + text.len() + 1 > self.cfg.queue_bytes {
            return Err(format!(
                "the server stopped reading: more than {} bytes of events wait for the next \
                 long-poll request (write_queue_bytes)",
                self.cfg.queue_bytes
            ));
        }
        self.outbox.push_str(&text);
        self.outbox.push('\n');
        Ok(())
    }

    /// The next frame from the server, or why the connection ended. Cancel-safe: all
    /// state lives in `self`.
    pub fn recv(&mut self) -> impl Future<Output = Result<String, String>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<String, String>> {
        loop {
            if let Some(line) = self.incoming.pop_front() {
                return Poll::Ready(Ok(line));
            }
            if let Some(reason) = self.ended.take() {
                return Poll::Ready(Err(reason));
            }
            if let Some((seq, sent)) = self.sending.as_mut() {
                if sent.poll_unpin(cx).is_ready() {
                    let seq = *seq;
                    self.sending = None;
                    self.gap = Some(Box::pin(tokio::time::sleep(self.cfg.order_gap)));
                    if self.untaken == Some(seq) && std::mem::take(&mut self.answered_before_sent) {
                        self.untaken = None;
                    }
                }
            }
            if let Some(gap) = self.gap.as_mut() {
                if gap.as_mut().poll(cx).is_ready() {
                    self.gap = None;
                }
            }
            self.start_requests();
            if let Poll::Ready(Some(done)) = self.inflight.poll_next_unpin(cx) {
                self.on_done(done);
                continue;
            }
            if let Some(sleep) = self.poll_at.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    self.poll_at = None;
                    self.poll_due = true;
                    continue;
                }
            }
            return Poll::Pending;
        }
    }

    fn start_requests(&mut self) {
        // Nothing in flight: nothing to overtake.
        if self.sending.is_some()
            || (self.gap.is_some() && !self.proven && !self.inflight.is_empty())
        {
            return;
        }
        if !self.outbox.is_empty() && self.untaken.is_none() {
            let body = std::mem::take(&mut self.outbox);
            let seq = self.start(body);
            self.untaken = Some(seq);
            self.answered_before_sent = false;
            // It is a poll too.
            self.poll_due = false;
            self.poll_at = None;
        } else if self.poll_due && self.inflight.is_empty() {
            self.poll_due = false;
            self.start(String::new());
        }
    }

    fn start(&mut self, body: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.gap = None;
        self.proven = false;
        self.proof = body.lines().filter_map(asked_callback).collect();
        let (sent, told) = oneshot::channel();
        self.sending = Some((seq, told));
        let sent = Some(sent);
        let ep = self.ep.clone();
        let conn = self.idle.pop();
        let limit = self.cfg.request_timeout;
        let max = self.cfg.max_body_bytes;
        let fut = async move {
            let res = match tokio::time::timeout(limit, post(&ep, conn, "", body, max, sent)).await
            {
                Ok(res) => res,
                Err(_) => Err(format!("no answer to a long poll within {limit:?}")),
            };
            Done { seq, res }
        };
        self.inflight.push_back(fut.boxed());
        seq
    }

    fn on_done(&mut self, done: Done) {
        // An answer to the event request means its events were taken. So does an answer
        // to an older one, which the server gives when the newer one arrives, but also for
        // an event of its own: then the event request may still be on its way, and the
        // next one, on another socket, could overtake it. So an older answer counts only
        // once the event request's bytes are out; the next request's go out after them.
        match self.untaken {
            Some(e) if done.seq == e => self.untaken = None,
            Some(e) if done.seq < e => {
                if self.sending.as_ref().is_some_and(|(s, _)| *s == e) {
                    self.answered_before_sent = true;
                } else {
                    self.untaken = None;
                }
            }
            _ => {}
        }
        // An answer also shows its request was taken, should the body not have said so.
        if self.sending.as_ref().is_some_and(|(s, _)| *s == done.seq) {
            self.sending = None;
        }
        match done.res {
            Err(e) => self.ended = Some(format!("long polling failed: {e}")),
            Ok((200, body, conn)) => {
                self.idle.push(conn);
                if body.is_empty() {
                    self.incoming.push_back(HEARTBEAT.to_owned());
                } else {
                    let text = String::from_utf8_lossy(&body);
                    for line in text.split('\n').filter(|l| !l.is_empty()) {
                        if !self.proven
                            && answered_callback(line).is_some_and(|id| self.proof.contains(&id))
                        {
                            self.proven = true;
                            // Processed, so its events were taken.
                            if self.untaken == Some(self.next_seq - 1) {
                                self.untaken = None;
                            }
                        }
                        self.incoming.push_back(line.to_owned());
                    }
                }
                if self.inflight.is_empty() {
                    let max = self.cfg.delay_max.as_millis() as u64;
                    let delay = Duration::from_millis(self.rng.gen_range(0..=max));
                    self.poll_at = Some(Box::pin(tokio::time::sleep(delay)));
                }
            }
            Ok((status, _, _)) => {
                self.over = true;
                self.ended = Some(format!(
                    "the server answered {status} to a long poll: the session is over"
                ))
            }
        }
    }
}

/// The callback id a frame we send asks for (`<path>:<id>=<json>`, 0: none).
fn asked_callback(frame: &str) -> Option<u64> {
    let (_, rest) = frame.split_once(':')?;
    let (id, _) = rest.split_once('=')?;
    id.parse().ok().filter(|&id| id > 0)
}

/// The id of a callback the server answers (`/qio/callback/<id>:0=<json>`).
fn answered_callback(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix("/qio/callback/")?;
    let (id, _) = rest.split_once(':')?;
    id.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_asked_and_answered_are_recognised() {
        assert_eq!(asked_callback("/app/x:7={\"a\":\"b:c=d\"}"), Some(7));
        assert_eq!(asked_callback("/app/x:0=null"), None);
        assert_eq!(asked_callback("/qio/ping:12=null"), Some(12));
        assert_eq!(
            answered_callback("/qio/callback/12:0={\"code\":200}"),
            Some(12)
        );
        assert_eq!(answered_callback("/app/x:0=null"), None);
    }

    #[test]
    fn the_hostname_answer_is_a_bare_host() {
        let ok = |b: &str| hostname_answer(b);
        assert_eq!(
            ok("/qio/callback/1:0={\"code\":200,\"data\":\"127.0.0.1\"}\n").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            ok("/qio/callback/1:0={\"code\":200,\"data\":\"[::1]\"}\n").as_deref(),
            Some("::1")
        );
        assert_eq!(
            ok("/qio/callback/1:0={\"code\":404,\"data\":\"x\"}\n"),
            None
        );
        assert_eq!(ok("/qio/callback/1:0={\"code\":200,\"data\":null}\n"), None);
        assert_eq!(
            ok("/qio/callback/1:0={\"code\":200,\"data\":\"http://x/\"}\n"),
            None
        );
        assert_eq!(ok(""), None);
    }

    #[test]
    fn websocket_addresses_map_to_http() {
        let u = |s: &str| http_url(&Url::parse(s).unwrap()).to_string();
        assert_eq!(u("ws://h:1/x"), "http://h:1/x");
        assert_eq!(u("wss://h/"), "https://h/");
    }
}
