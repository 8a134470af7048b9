//! Hostile input, end to end: what local clients and servers can throw at the daemon, and
//! what it does about it. Each test is one row (or a few) of RELIABILITY.md's table.
//!
//! Local side: raw bytes on the Unix socket. Upstream: the test server where it can do the
//! misbehaving (invalid frames, forged callbacks, bad moves), and a small hand-made
//! WebSocket server ([`raw_server`]) for what it will not do: binary and ping frames,
//! close frames with odd codes, oversized and fragmented frames, flooding without reading,
//! never reading, moving every client away. The last tests run the codecs and the request
//! parser over a few hundred thousand generated inputs (a seeded generator, so CI runs
//! them too; the cargo-fuzz targets in `fuzz/` go further).

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use qio_ipc::clean_path;
use qiod::codec::Dialect;
use qiod::session::DialectChoice;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A local client reading lines as text (some lines here are JSON that `serde_json::Value`
/// cannot hold, such as an id of `1e400`).
struct RawClient {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl RawClient {
    async fn connect(daemon: &Daemon) -> RawClient {
        let stream = UnixStream::connect(&daemon.socket).await.expect("connect");
        let (r, w) = stream.into_split();
        RawClient {
            lines: BufReader::new(r).lines(),
            writer: w,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// The next line, `None` at the end; fails the test at the deadline.
    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
    }

    /// The next line that is not a connection event (`/open`, `/close`).
    async fn answer(&mut self) -> String {
        loop {
            let l = self.line().await.expect("the daemon closed the connection");
            if !l.starts_with("{\"event\":\"/open\"") && !l.starts_with("{\"event\":\"/close\"") {
                return l;
            }
        }
    }
}

/// Waits for the next `/close` and the `/open` after it; returns the close reason.
async fn reconnected(c: &mut LineClient) -> String {
    let close = c.event("/close").await;
    c.event("/open").await;
    close["data"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Polls `status` until the upstream state is open (or not).
async fn wait_state(c: &mut LineClient, open: bool) {
    let deadline = Instant::now() + DEADLINE;
    for id in 10_000u64.. {
        let st = c.call(json!({"op":"status"}), id).await;
        if (st["data"]["state"] == "open") == open {
            return;
        }
        assert!(Instant::now() < deadline, "never open={open}: {st}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Settings for a daemon talking to a hand-made server: 0.2 only (a hostile close during
/// the handshake must not send it looking for 0.1), short heartbeats.
fn raw_settings(url: &str) -> qiod::Settings {
    let mut s = daemon_settings(url);
    s.driver.session.dialect = DialectChoice::Fixed(Dialect::V02);
    s.driver.session.heartbeat_interval = Duration::from_millis(300);
    s.driver.session.ping_timeout = Duration::from_millis(300);
    s
}

/// CPU time this process has used (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

// ---------------------------------------------------------------------------------------
// A hand-made Quick.IO 0.2 server
// ---------------------------------------------------------------------------------------

/// One accepted connection after the Quick.IO greeting.
struct RawConn {
    ws: WebSocketStream<TcpStream>,
    /// 1 for the first connection that completed the greeting, 2 for the next...
    n: usize,
}

/// A frame as `(path, callback id, data text)`.
type Frame = (String, u64, String);

impl RawConn {
    async fn send(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text.to_owned())).await.is_ok()
    }

    /// Writes bytes on the TCP stream as they are, bypassing the WebSocket layer.
    async fn send_bytes(&mut self, bytes: &[u8]) -> bool {
        let tcp = self.ws.get_mut();
        tcp.write_all(bytes).await.is_ok() && tcp.flush().await.is_ok()
    }

    /// The next text frame, answering what any server answers on the way (`/qio/on`,
    /// `/qio/off`, `/qio/ping`, and an echo for anything else asking for a callback).
    async fn next(&mut self) -> Option<Frame> {
        loop {
            let msg = self.ws.next().await?.ok()?;
            let Message::Text(text) = msg else {
                if matches!(msg, Message::Close(_)) {
                    return None;
                }
                continue;
            };
            let text = text.as_str();
            let (path, rest) = text.split_once(':')?;
            let (cb, data) = rest.split_once('=')?;
            let cb: u64 = cb.parse().ok()?;
            if cb > 0 && !path.starts_with("/qio/callback/") {
                let answer = match path {
                    "/qio/on" | "/qio/off" | "/qio/ping" => "null",
                    _ => data,
                };
                let reply = format!("/qio/callback/{cb}:0={{\"code\":200,\"data\":{answer}}}");
                if !self.send(&reply).await {
                    return None;
                }
            }
            return Some((path.to_owned(), cb, data.to_owned()));
        }
    }

    /// Serves like a plain server until the client goes away.
    async fn serve(&mut self) {
        while self.next().await.is_some() {}
    }

    /// Serves until a frame on `path` arrives (e.g. the `/qio/on` restoring a subscription).
    async fn serve_until(&mut self, path: &str, data: &str) -> bool {
        while let Some((p, _, d)) = self.next().await {
            if p == path && d == data {
                return true;
            }
        }
        false
    }
}

/// A WebSocket frame as a server sends it (unmasked).
fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n < 65536 {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// A running hand-made server; dropping it stops it and every connection.
struct RawServer {
    addr: SocketAddr,
    /// Connections that completed the Quick.IO greeting.
    handshakes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawServer {
    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The upgrade (echoing the `quickio` subprotocol) and the greeting.
async fn greet(stream: TcpStream) -> Option<WebSocketStream<TcpStream>> {
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    fn echo_protocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
        if req.headers().contains_key("Sec-WebSocket-Protocol") {
            resp.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("quickio"),
            );
        }
        Ok(resp)
    }
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, echo_protocol)
        .await
        .ok()?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str() == "/qio/ohai" => {}
        _ => return None,
    }
    ws.send(Message::text("/qio/ohai")).await.ok()?;
    Some(ws)
}

/// Starts a hand-made server on 127.0.0.1 port 0; `behave` runs each connection after the
/// greeting.
async fn raw_server<F, Fut>(behave: F) -> RawServer
where
    F: Fn(RawConn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    let behave = Arc::new(behave);
    let task = tokio::spawn(async move {
        // Owned by this task: aborting it aborts every connection.
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (behave, count) = (behave.clone(), count.clone());
            conns.spawn(async move {
                if let Some(ws) = greet(stream).await {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    behave(RawConn { ws, n }).await;
                }
            });
            while conns.try_join_next().is_some() {}
        }
    });
    RawServer {
        addr,
        handshakes,
        task,
    }
}

// ---------------------------------------------------------------------------------------
// Local clients
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ipc_ids_beyond_any_number_type_come_back_verbatim() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = RawClient::connect(&daemon).await;
    let ids = [
        "123456789012345678901234567890",
        "-0",
        "1.50",
        "1e400",
        "-1e-400",
        "18446744073709551616",
        "\"\\u0041\"",
        "\"\"",
        "\"\u{1F600} \\n \\\"\"",
    ];
    for id in ids {
        c.write(format!("{{\"op\":\"status\",\"id\":{id}}}\n").as_bytes())
            .await;
        let line = c.answer().await;
        assert!(
            line.starts_with(&format!("{{\"id\":{id},\"code\":200,")),
            "{id}: {line}"
        );
    }
    let long = format!("\"{}\"", "i".repeat(100_000));
    c.write(format!("{{\"op\":\"status\",\"id\":{long}}}\n").as_bytes())
        .await;
    assert!(c.answer().await.starts_with(&format!("{{\"id\":{long},")));
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_huge_numbers_in_data_are_forwarded_as_written() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    // Within what the server's parser takes: passed through unchanged both ways.
    let big = "[123456789012345678901234567890,-0.000000000000000000001,1.5e300]";
    let line =
        format!("{{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"id\":1,\"data\":{big}}}\n");
    c.write_raw(line.as_bytes()).await;
    let r = c.reply(json!(1)).await;
    assert_eq!(r["code"], 200, "{r}");
    let sent = server
        .received()
        .into_iter()
        .find(|r| r.path == "/clienttest/echo")
        .expect("forwarded");
    assert_eq!(sent.data, serde_json::from_str::<Value>(big).unwrap());
    // Beyond it (the test server parses with serde_json, which refuses 1e400): the daemon
    // forwards the JSON as written, the server drops the connection, the request gets -1,
    // and the daemon reconnects. One local client can make the shared connection reconnect.
    let line = "{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"id\":2,\"data\":1e400}\n";
    c.write_raw(line.as_bytes()).await;
    let r = c.reply(json!(2)).await;
    assert_eq!(r["code"], -1, "{r}");
    c.event("/open").await;
    let r = c
        .call(
            json!({"op":"send","path":"/clienttest/echo","data":"ok"}),
            3,
        )
        .await;
    assert_eq!(r["code"], 200, "{r}");
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_deep_nesting_is_passed_through_or_refused_without_recursion() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // An id nested 100 000 deep: refused, no id to answer under.
    c.write_raw(format!("{{\"op\":\"status\",\"id\":{}}}\n", nest(100_000)).as_bytes())
        .await;
    let ev = c.next_event().await;
    assert_eq!(
        (&ev["event"], &ev["data"]["code"]),
        (&json!("/error"), &json!(400)),
        "{ev}"
    );
    // In an unknown field: ignored.
    let line = format!("{{\"op\":\"status\",\"id\":1,\"x\":{}}}\n", nest(100_000));
    c.write_raw(line.as_bytes()).await;
    assert_eq!(c.reply(json!(1)).await["code"], 200);
    // As data the server can parse (100 deep): forwarded and echoed unchanged.
    let line = format!(
        "{{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"id\":2,\"data\":{}}}\n",
        nest(100)
    );
    c.write_raw(line.as_bytes()).await;
    let r = c.reply(json!(2)).await;
    assert_eq!(r["code"], 200, "{r}");
    // As data 100 000 deep: the daemon forwards it raw (no recursion); this server's parser
    // refuses it and drops the connection; the daemon reconnects and carries on.
    let line = format!(
        "{{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"id\":3,\"data\":{}}}\n",
        nest(100_000)
    );
    c.write_raw(line.as_bytes()).await;
    let r = c.reply(json!(3)).await;
    assert!(r["code"] == -1 || r["code"] == 200, "{r}");
    let st = c.call(json!({"op":"status"}), 4).await;
    assert_eq!(st["code"], 200);
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_overlong_lines_are_skipped_without_being_buffered() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    let mut other = daemon.open_client().await;
    // 3 MiB, over the default 1 MiB limit, then a good line.
    let mut line = b"{\"op\":\"send\",\"path\":\"/a\",\"data\":\"".to_vec();
    line.extend(std::iter::repeat_n(b'x', 3 << 20));
    line.extend_from_slice(b"\"}\n{\"op\":\"status\",\"id\":1}\n");
    c.write_raw(&line).await;
    let ev = c.next_event().await;
    assert!(
        ev["data"]["err_msg"]
            .as_str()
            .unwrap_or_default()
            .contains("max_line_bytes"),
        "{ev}"
    );
    assert_eq!(c.reply(json!(1)).await["code"], 200);
    // 64 MiB without any newline, in 1 MiB writes: skipped as it streams (the daemon keeps
    // no more than the limit), and other clients are served meanwhile.
    let chunk = vec![b'y'; 1 << 20];
    for i in 0..64u64 {
        c.write_raw(&chunk).await;
        if i & 15 == 0 {
            assert_eq!(other.call(json!({"op":"status"}), i).await["code"], 200);
        }
    }
    c.write_raw(b"\n{\"op\":\"status\",\"id\":2}\n").await;
    let ev = c.next_event().await;
    assert!(
        ev["data"]["err_msg"]
            .as_str()
            .unwrap_or_default()
            .contains("max_line_bytes"),
        "one error for the whole line: {ev}"
    );
    assert_eq!(c.reply(json!(2)).await["code"], 200);
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_wrong_types_get_400_naming_the_field() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    // (line, Some(id) when a reply comes, a piece of the message)
    let cases: [(&str, Option<i64>, &str); 14] = [
        (r#"{"op":5,"id":1}"#, Some(1), "\"op\" must be a string"),
        (r#"{"op":null,"id":1}"#, Some(1), "missing \"op\""),
        (
            r#"{"op":["send"],"id":1}"#,
            Some(1),
            "\"op\" must be a string",
        ),
        (r#"{"op":"SEND","id":1}"#, Some(1), "unknown op"),
        (
            r#"{"op":"send","path":{},"id":1}"#,
            Some(1),
            "\"path\" must be a string",
        ),
        (
            r#"{"op":"send","path":true,"id":1}"#,
            Some(1),
            "\"path\" must be a string",
        ),
        (
            r#"{"op":"send","path":null,"id":1}"#,
            Some(1),
            "needs \"path\"",
        ),
        (
            r#"{"op":"callback","cb":7,"id":1}"#,
            Some(1),
            "\"cb\" must be a string",
        ),
        (
            r#"{"op":"callback","cb":"1.2.3","id":1}"#,
            Some(1),
            "not a callback handle",
        ),
        (
            r#"{"op":"callback","cb":"-1.2","id":1}"#,
            Some(1),
            "not a callback handle",
        ),
        (
            r#"{"op":"status","id":true}"#,
            None,
            "\"id\" must be a number or a string",
        ),
        (
            r#"{"op":"status","id":{"a":1}}"#,
            None,
            "\"id\" must be a number or a string",
        ),
        (
            r#"{"op":"status","id":[1]}"#,
            None,
            "\"id\" must be a number or a string",
        ),
        (
            r#"{"op":"send","path":7}"#,
            None,
            "\"path\" must be a string",
        ),
    ];
    for (line, id, msg) in cases {
        c.write_raw(format!("{line}\n").as_bytes()).await;
        let v = match id {
            Some(id) => c.reply(json!(id)).await,
            None => c.next_event().await["data"].clone(),
        };
        assert_eq!(v["code"], 400, "{line}: {v}");
        assert!(
            v["err_msg"].as_str().unwrap_or_default().contains(msg),
            "{line}: {v}"
        );
    }
    // Any JSON is fine as data.
    for data in ["true", "{}", "[]", "\"\"", "-0", "null"] {
        let line =
            format!("{{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"id\":5,\"data\":{data}}}\n");
        c.write_raw(line.as_bytes()).await;
        assert_eq!(c.reply(json!(5)).await["code"], 200, "{data}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_odd_framing() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = RawClient::connect(&daemon).await;
    // CRLF, blank and whitespace-only lines, leading spaces: fine.
    c.write(b"{\"op\":\"status\",\"id\":1}\r\n\n   \n\t\r\n   {\"op\":\"status\",\"id\":2}\n")
        .await;
    assert!(c.answer().await.starts_with("{\"id\":1,\"code\":200"));
    assert!(c.answer().await.starts_with("{\"id\":2,\"code\":200"));
    // A CR before the object is JSON whitespace.
    c.write(b"\r{\"op\":\"status\",\"id\":3}\n").await;
    assert!(c.answer().await.starts_with("{\"id\":3,\"code\":200"));
    // Each of these is one /error, and the next line still works.
    let bad: [&[u8]; 6] = [
        b"\xef\xbb\xbf{\"op\":\"status\",\"id\":3}\n", // a byte order mark
        b"{\"op\":\"status\",\"id\":3}\0\n",           // a NUL after the object
        b"{\"op\":\"status\",\"op\":\"status\",\"id\":3}\n", // a repeated key
        b"{\"op\":\"status\",\"id\":3}{\"op\":\"status\"}\n", // two objects on a line
        b"{\"op\":\"status\",\"id\":3} trailing\n",    // trailing text
        b"{\"op\":\"status\",\"id\":\"a\xffb\"}\n",    // invalid UTF-8 in a string
    ];
    for line in bad {
        c.write(line).await;
        let l = c.answer().await;
        let v: Value = serde_json::from_str(&l).expect("JSON");
        assert_eq!(
            (&v["event"], &v["data"]["code"]),
            (&json!("/error"), &json!(400)),
            "{:?}: {l}",
            String::from_utf8_lossy(line)
        );
        c.write(b"{\"op\":\"status\",\"id\":4}\n").await;
        assert!(c.answer().await.starts_with("{\"id\":4,\"code\":200"));
    }
    // An escaped NUL in a string id is just a string.
    c.write(b"{\"op\":\"status\",\"id\":\"a\\u0000b\"}\n").await;
    assert!(c
        .answer()
        .await
        .starts_with("{\"id\":\"a\\u0000b\",\"code\":200"));
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_half_a_line_then_half_close_is_still_answered() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    // A last line without its newline is still a line.
    let mut c = RawClient::connect(&daemon).await;
    c.write(b"{\"op\":\"status\",\"id\":1}").await;
    c.writer.shutdown().await.expect("shutdown");
    assert!(c.answer().await.starts_with("{\"id\":1,\"code\":200"));
    assert_eq!(c.line().await, None, "then the daemon closes");
    // Half a line: an /error, then the end.
    let mut c = RawClient::connect(&daemon).await;
    c.write(b"{\"op\":\"sta").await;
    c.writer.shutdown().await.expect("shutdown");
    let l = c.answer().await;
    assert!(l.contains("\"/error\"") && l.contains("400"), "{l}");
    assert_eq!(c.line().await, None);
    // Half a line, then gone without a half-close: nothing to answer, nothing left behind.
    let mut c = RawClient::connect(&daemon).await;
    c.write(b"{\"op\":\"on\",\"path\":\"/x\",\"id\":1").await;
    drop(c);
    let mut probe = daemon.open_client().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = probe.call(json!({"op":"status"}), 1).await;
        if st["data"]["clients"] == 1 {
            assert_eq!(st["data"]["subscriptions"], json!([]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the half-line client was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.stop().await;
}

#[tokio::test]
async fn ipc_more_clients_than_max_clients_are_told_and_closed() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.max_clients = 2;
    let daemon = Daemon::start_with(settings).await;
    let a = daemon.open_client().await;
    let _b = daemon.open_client().await;
    let mut c = RawClient::connect(&daemon).await;
    let l = c.line().await.expect("one line");
    let v: Value = serde_json::from_str(&l).expect("JSON");
    assert_eq!(
        (&v["event"], &v["data"]["code"]),
        (&json!("/error"), &json!(-3)),
        "{l}"
    );
    assert!(l.contains("max_clients"), "{l}");
    assert_eq!(c.line().await, None, "then closed");
    // A place frees up when one leaves.
    drop(a);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut d = RawClient::connect(&daemon).await;
        let l = d.line().await.expect("a line");
        if l.contains("\"/open\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no place freed: {l}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Upstream: the test server
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn callbacks_for_ids_never_issued_are_dropped_and_change_nothing() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.driver.session.request_timeout = Duration::from_millis(400);
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    c.send(json!({"op":"send","path":"/clienttest/drop-callback","id":1}))
        .await;
    until("the request reached the server", || async {
        server
            .received()
            .iter()
            .any(|r| r.path == "/clienttest/drop-callback")
    })
    .await;
    let forged = [
        "/qio/callback/424242:0={\"code\":200,\"data\":\"forged\"}",
        "/qio/callback/0:0={\"code\":200,\"data\":\"forged\"}",
        "/qio/callback/18446744073709551615:0={\"code\":200,\"data\":null}",
        "/qio/callback/abc:0={\"code\":200,\"data\":null}",
        "/qio/callback/-7:0={\"code\":200,\"data\":null}",
        "/qio/callback:0={\"code\":200,\"data\":null}",
        "/qio/callback/99999:5=\"no envelope, asks for a callback\"",
        "/qio/callback//1000//:0=[]",
    ];
    for text in forged {
        server.send_raw_to_all(text).await;
    }
    // Still the same connection, and the real request times out instead of taking a
    // forged answer.
    let r = c.reply(json!(1)).await;
    assert_eq!(r["code"], -2, "{r}");
    let st = c.call(json!({"op":"status"}), 2).await;
    assert_eq!(st["data"]["reconnects"], 0, "{st}");
    assert!(server.closes().is_empty(), "{:?}", server.closes());
    daemon.stop().await;
}

#[tokio::test]
async fn moves_to_invalid_or_dead_addresses_come_back_home() {
    let server = server().await;
    let dead = server_with(|_| {}).await;
    let dead_url = dead.url();
    dead.shutdown().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    let targets = [
        json!("not an address"),
        json!(42),
        json!(null),
        json!({"to": "ws://127.0.0.1:1/"}),
        json!("ftp://127.0.0.1/"),
        json!("ws://"),
        json!(""),
        json!("//[::1"),
        json!("ws://127.0.0.1:0/"),
        json!(dead_url),
    ];
    for (i, to) in targets.iter().enumerate() {
        let id = i as u64 + 1;
        let r = c
            .call(json!({"op":"send","path":"/clienttest/move","data":to}), id)
            .await;
        assert_eq!(r["code"], -1, "{to}: {r}");
        c.event("/open").await;
        let st = c.call(json!({"op":"status"}), 100 + id).await;
        assert_eq!(st["data"]["url"], server.url(), "{to}: {st}");
        let echo = c
            .call(
                json!({"op":"send","path":"/clienttest/echo","data":i}),
                200 + id,
            )
            .await;
        assert_eq!(echo["code"], 200, "{to}");
    }
    assert_eq!(server.connection_count(), 1);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Upstream: a hand-made server
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn binary_frames_and_invalid_utf8_close_the_connection_but_pings_do_not() {
    let server = raw_server(|mut conn| async move {
        if !conn.serve_until("/qio/on", "\"/t\"").await {
            return;
        }
        match conn.n {
            1 => {
                let _ = conn.ws.send(Message::binary(vec![1u8, 2, 3])).await;
            }
            2 => {
                conn.send_bytes(&ws_frame(true, 0x1, b"/t:0=\"\xff\xfe\""))
                    .await;
            }
            _ => {
                let _ = conn.ws.send(Message::Ping(vec![7u8; 4].into())).await;
                conn.send("/t:0=\"after the ping\"").await;
            }
        }
        conn.serve().await;
    })
    .await;
    let daemon = Daemon::start_with(raw_settings(&server.url())).await;
    let mut c = daemon.open_client().await;
    assert_eq!(c.call(json!({"op":"on","path":"/t"}), 1).await["code"], 200);
    let reason = reconnected(&mut c).await;
    assert!(reason.contains("binary"), "{reason}");
    let reason = reconnected(&mut c).await;
    assert!(reason.to_lowercase().contains("utf"), "{reason}");
    let ev = c.next_event().await;
    assert_eq!(
        ev,
        json!({"event":"/t","data":"after the ping"}),
        "no reconnect in between"
    );
    assert_eq!(server.handshakes(), 3);
    daemon.stop().await;
}

#[tokio::test]
async fn close_frames_with_odd_codes_all_lead_to_a_reconnect() {
    fn close(code: Option<u16>, reason: &[u8]) -> Vec<u8> {
        let mut p = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
        p.extend_from_slice(reason);
        ws_frame(true, 0x8, &p)
    }
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("1000 normal", close(Some(1000), b"bye")),
        ("1001 going away", close(Some(1001), b"")),
        ("1011 server error", close(Some(1011), b"oops")),
        ("3000 registered", close(Some(3000), b"")),
        ("4999 private", close(Some(4999), b"private")),
        ("1004 reserved", close(Some(1004), b"")),
        ("1005 never on the wire", close(Some(1005), b"")),
        ("1006 never on the wire", close(Some(1006), b"")),
        ("1015 never on the wire", close(Some(1015), b"")),
        ("999 out of range", close(Some(999), b"")),
        ("5000 out of range", close(Some(5000), b"")),
        ("no code", close(None, b"")),
        ("1-byte payload", ws_frame(true, 0x8, b"\x03")),
        ("reason not UTF-8", close(Some(1000), b"\xff\xfe")),
        (
            "fragmented close",
            ws_frame(false, 0x8, &1000u16.to_be_bytes()),
        ),
        ("126-byte close", close(Some(1000), &[b'r'; 124])),
        ("unknown opcode 0x3", ws_frame(true, 0x3, b"")),
        ("unknown opcode 0xB", ws_frame(true, 0xB, b"")),
        ("reserved bits set", vec![0xF1, 0x00]),
        ("continuation first", ws_frame(true, 0x0, b"x")),
        (
            "masked server frame",
            vec![0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1],
        ),
    ];
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(variants.iter().map(|v| v.1.clone()).collect());
    let server = raw_server(move |mut conn| {
        let frames = frames.clone();
        async move {
            if let Some(bytes) = frames.get(conn.n - 1) {
                conn.send_bytes(bytes).await;
            }
            conn.serve().await;
        }
    })
    .await;
    let daemon = Daemon::start_with(raw_settings(&server.url())).await;
    let mut c = daemon.open_client().await;
    let mut table = Vec::new();
    for (label, _) in &variants {
        let reason = reconnected(&mut c).await;
        table.push(format!("| {label} | {reason} |"));
    }
    println!(
        "| close frame | the daemon's /close reason |\n|---|---|\n{}",
        table.join("\n")
    );
    let st = c.call(json!({"op":"status"}), 1).await;
    assert_eq!(st["data"]["state"], "open");
    assert_eq!(server.handshakes(), variants.len() + 1);
    daemon.stop().await;
}

#[tokio::test]
async fn frames_beyond_max_message_bytes_are_refused_without_allocating_them() {
    const MAX: usize = 1024;
    let server = raw_server(|mut conn| async move {
        if conn.n > 4 || !conn.serve_until("/qio/on", "\"/big\"").await {
            return conn.serve().await;
        }
        // "/big:0=" plus a JSON string: the whole payload exactly MAX bytes.
        let at_limit = format!("/big:0=\"{}\"", "a".repeat(MAX - 9));
        assert_eq!(at_limit.len(), MAX);
        match conn.n {
            1 => {
                conn.send(&at_limit).await;
                conn.send(&format!("/big:0=\"{}\"", "b".repeat(MAX - 8)))
                    .await;
            }
            2 => {
                // One message in two fragments, each under the limit, together over it.
                let text = format!("/big:0=\"{}\"", "c".repeat(MAX));
                let (a, b) = text.as_bytes().split_at(600);
                conn.send_bytes(&ws_frame(false, 0x1, a)).await;
                conn.send_bytes(&ws_frame(true, 0x0, b)).await;
            }
            3 => {
                // A header announcing 2^62 bytes, and nothing after it.
                let mut h = vec![0x81, 127];
                h.extend_from_slice(&(1u64 << 62).to_be_bytes());
                conn.send_bytes(&h).await;
            }
            _ => {
                conn.send_bytes(&ws_frame(
                    true,
                    0x1,
                    format!("/big:0=\"{}\"", "d".repeat(MAX)).as_bytes(),
                ))
                .await;
            }
        }
        conn.serve().await;
    })
    .await;
    let mut settings = raw_settings(&server.url());
    settings.driver.max_message_bytes = MAX;
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    assert_eq!(
        c.call(json!({"op":"on","path":"/big"}), 1).await["code"],
        200
    );
    let ev = c.event("/big").await;
    assert_eq!(
        ev["data"].as_str().map(str::len),
        Some(MAX - 9),
        "at the limit: delivered"
    );
    for what in [
        "one byte over",
        "fragments over",
        "2^62 announced",
        "one frame over",
    ] {
        let reason = reconnected(&mut c).await;
        println!("{what}: {reason}");
        assert!(
            reason.contains("connection error") || reason.contains("too"),
            "{what}: {reason}"
        );
    }
    assert_eq!(
        c.call(json!({"op":"status"}), 2).await["data"]["state"],
        "open"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_server_flooding_events_does_not_starve_local_clients() {
    // The server floods until the test has had its status answers, so each answer provably
    // came while the flood was running (no timing involved).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flooded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, sent2, flooded2) = (stop.clone(), sent.clone(), flooded.clone());
    let server = raw_server(move |mut conn| {
        let (stop, sent, flooded) = (stop2.clone(), sent2.clone(), flooded2.clone());
        async move {
            if conn.n == 1 && conn.serve_until("/qio/on", "\"/flood\"").await {
                // As fast as the socket takes them, reading nothing meanwhile.
                let pad = "p".repeat(200);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if !conn
                        .send(&format!("/flood:0={{\"i\":{i},\"pad\":\"{pad}\"}}"))
                        .await
                    {
                        return;
                    }
                    i += 1;
                    sent.store(i as usize, Ordering::SeqCst);
                }
                flooded.store(true, Ordering::SeqCst);
            }
            conn.serve().await;
        }
    })
    .await;
    let mut settings = raw_settings(&server.url());
    settings.ipc.client_queue_events = 256;
    let daemon = Daemon::start_with(settings).await;
    let mut slow = daemon.open_client().await;
    let mut fast = daemon.open_client().await;
    let mut probe = daemon.open_client().await;
    assert_eq!(
        slow.call(json!({"op":"on","path":"/flood"}), 1).await["code"],
        200
    );
    // The fast one subscribes too; the flood may already be running.
    fast.send(json!({"op":"on","path":"/flood","id":1})).await;
    let mut last = -1i64;
    let mut got = 0u64;
    let mut lost = 0u64;
    let mut probes = 0u64;
    let mut next_probe = 2000;
    // Five status requests, each answered (within the common deadline) while the server
    // is still flooding: local requests do not wait until the server pauses.
    let mut total = None;
    while total.is_none_or(|n: i64| last < n - 1) {
        let v = fast.next().await;
        match v["event"].as_str() {
            Some("/flood") => {
                let i = v["data"]["i"].as_i64().expect("i");
                assert!(i > last, "in order: {last} then {i}");
                last = i;
                got += 1;
                if total.is_none() && got >= next_probe {
                    next_probe += 2000;
                    probes += 1;
                    assert_eq!(probe.call(json!({"op":"status"}), got).await["code"], 200);
                    assert!(
                        !stop.load(Ordering::SeqCst),
                        "answered while the flood runs"
                    );
                    if probes == 5 {
                        stop.store(true, Ordering::SeqCst);
                        until("the flood stops", || async {
                            flooded.load(Ordering::SeqCst)
                        })
                        .await;
                        total = Some(sent.load(Ordering::SeqCst) as i64);
                    }
                }
            }
            Some("/lost") => lost += v["data"]["count"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    let n = total.expect("the flood ran") as u64;
    println!("fast reader: {got} of {n} events, {lost} announced lost; {probes} status answers during the flood");
    // The slow one never read: it gets its newest events and one /lost for the rest.
    let mut slow_got = 0u64;
    let mut slow_lost = 0u64;
    while slow_got + slow_lost < n {
        let v = slow.next().await;
        match v["event"].as_str() {
            Some("/flood") => slow_got += 1,
            Some("/lost") => slow_lost += v["data"]["count"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    assert!(slow_lost > 0, "the slow client was told");
    assert_eq!(server.handshakes(), 1, "no reconnect");
    daemon.stop().await;
}

/// A server that stops reading (a hung process) while local clients keep sending: once
/// the kernel buffers are full, the daemon must not hang. Its heartbeat watch should call
/// the connection dead, answer waiting requests with -1 and reconnect; `status` must keep
/// answering meanwhile.
#[tokio::test]
async fn a_server_that_stops_reading_does_not_hang_the_daemon() {
    let server = raw_server(|mut conn| async move {
        if conn.n == 1 {
            // Hold the connection, read nothing, send nothing.
            std::future::pending::<()>().await;
        }
        conn.serve().await;
    })
    .await;
    let daemon = Daemon::start_with(raw_settings(&server.url())).await;
    let mut sender = daemon.open_client().await;
    let mut probe = daemon.open_client().await;
    // 32 MiB of fire-and-forget events: far beyond what loopback buffers hold.
    let payload = "z".repeat(64 * 1024);
    let line = format!("{{\"op\":\"send\",\"path\":\"/bulk\",\"data\":\"{payload}\"}}\n");
    let writer = tokio::spawn(async move {
        for _ in 0..512 {
            if sender.writer.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
        sender
    });
    // The daemon gives up on the server (a write that does not complete, or no answer to
    // its ping) and reconnects; until then, while the buffers fill, `status` keeps
    // answering and tells (its lines may have gone by already). Each status must come
    // within the common deadline, or the daemon hangs.
    let deadline = Instant::now() + DEADLINE;
    let mut reconnect = None;
    for id in 1u64.. {
        let st = tokio::time::timeout(DEADLINE, probe.call(json!({"op":"status"}), id)).await;
        let Ok(st) = st else { break };
        if st["data"]["reconnects"].as_u64().unwrap_or(0) >= 1 {
            reconnect = Some(st["data"]["last_error"].clone());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("gave up on the server: {reconnect:?}");
    writer.abort();
    if reconnect.is_none() {
        // Shutting down would wait on the stuck driver as well: do not wait for it.
        daemon.cancel();
        panic!(
            "a server that stops reading hangs the daemon: no status told of a reconnect \
             within the deadline; a driver stuck flushing to the socket gives neither \
             requests, the heartbeat watch nor shutdown a turn"
        );
    }
    daemon.stop().await;
}

/// Two servers that move every client to each other at once (or one that moves them to
/// itself): the daemon must not spin. Without a delay it would connect, greet and move as
/// fast as the loopback allows.
#[tokio::test]
async fn a_move_loop_between_two_servers_does_not_spin() {
    let targets: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let make = |me: usize| {
        let targets = targets.clone();
        move |mut conn: RawConn| {
            let to = targets.lock().expect("lock")[1 - me].clone();
            async move {
                conn.send(&format!("/qio/move:0=\"{to}\"")).await;
                let _ = conn.ws.close(None).await;
            }
        }
    };
    let a = raw_server(make(0)).await;
    let b = raw_server(make(1)).await;
    *targets.lock().expect("lock") = vec![a.url(), b.url()];
    let daemon = Daemon::start_with(raw_settings(&a.url())).await;
    let mut probe = daemon.client().await;
    let _ = probe.next().await;
    // Wait for a dozen connections (answering status all along), then look at how long
    // they took: a lower bound, which a slow machine only makes easier to meet.
    const MOVES: usize = 12;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut id = 0u64;
    while a.handshakes() + b.handshakes() < MOVES {
        id += 1;
        assert_eq!(probe.call(json!({"op":"status"}), id).await["code"], 200);
        assert!(
            t0.elapsed() < DEADLINE,
            "the move loop stopped before {MOVES} connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t0.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    println!("move loop: {MOVES} connections in {took:?}, {cpu:?} CPU");
    daemon.stop().await;
    // With the reconnect backoff (10 ms doubling to 200 ms, at most a quarter off for
    // jitter) even four of the waits add up to 0.75 * (10 + 20 + 40 + 80) ms; a daemon
    // that follows moves at once makes a dozen connections in a few milliseconds.
    let least = Duration::from_millis(112);
    assert!(
        took >= least,
        "{MOVES} connections in {took:?} ({cpu:?} CPU), less than {least:?}: the daemon \
         follows a move loop without any delay"
    );
}

// ---------------------------------------------------------------------------------------
// Generated inputs (in-process fuzzing that CI runs; see fuzz/ for cargo-fuzz)
// ---------------------------------------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

/// Pieces that make frames interesting: separators, numbers at the edges, JSON fragments,
/// multi-byte characters, line breaks.
const PIECES: [&str; 40] = [
    "/",
    "//",
    ":",
    "=",
    "/qio/",
    "/qio/callback/",
    "/qio/move",
    "/qio/heartbeat",
    "/a",
    "ü",
    "\u{1F600}",
    "\u{2028}",
    "0",
    "1",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "+1",
    "plain",
    "json",
    "null",
    "true",
    "\"",
    "\\",
    "\"x\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    "{\"code\":200,\"data\":null}",
    "1e400",
    "\n",
    "\r",
    " ",
    "\t",
    "\0",
    "@",
    "ws://h:1/",
    "x",
];

fn generated(rng: &mut XorShift) -> String {
    let n = rng.below(12);
    (0..n).map(|_| rng.pick(&PIECES)).collect()
}

/// The checks of fuzz/fuzz_targets/common.rs: a decoded frame is well formed and survives
/// its dialect's round trip.
fn check_decoded(d: Dialect, text: &str) {
    let Ok(f) = d.decode(text) else { return };
    assert!(f.path.starts_with('/') && f.path != "/", "{d:?} {text:?}");
    assert_eq!(clean_path(&f.path), f.path, "{d:?} {text:?}");
    let data = f.data.get();
    assert!(!data.contains(['\n', '\r']), "{d:?} {text:?}");
    let again = d
        .decode(&d.encode(&f.path, f.cb, &f.data))
        .expect("re-encodes");
    assert_eq!(
        (again.path.as_str(), again.cb),
        (f.path.as_str(), f.cb),
        "{d:?} {text:?}"
    );
    let want = match d {
        Dialect::V02 => data.to_owned(),
        Dialect::V01 if data == "null" => "\"\"".to_owned(),
        Dialect::V01 => match serde_json::from_str::<String>(data) {
            Ok(s) => serde_json::to_string(&s).expect("string"),
            Err(_) => data.to_owned(),
        },
    };
    assert_eq!(again.data.get(), want, "{d:?} {text:?}");
}

#[test]
fn generated_frames_through_both_codecs() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200_000 {
        let body = generated(&mut rng);
        // Half of them shaped like frames, so decoding gets past the first checks.
        let text = match rng.below(4) {
            0 => body,
            1 => format!("/p{body}:{}={body}", rng.below(5)),
            2 => format!(
                "/p:{}:{}={body}",
                rng.below(5),
                rng.pick(&["plain", "json"])
            ),
            _ => format!("{body}:{}={}", rng.next(), rng.pick(&PIECES[28..32])),
        };
        for d in [Dialect::V02, Dialect::V01] {
            match d.decode(&text) {
                Ok(_) => check_decoded(d, &text),
                Err(e) => assert!(e.to_string().len() < 512, "{text:?}"),
            }
        }
    }
}

#[test]
fn generated_requests_through_the_line_parser() {
    let fields = [
        "\"op\"", "\"id\"", "\"path\"", "\"cb\"", "\"data\"", "\"x\"",
    ];
    let values = [
        "\"send\"",
        "\"status\"",
        "\"on\"",
        "\"callback\"",
        "\"1.2\"",
        "1",
        "-1",
        "1.5",
        "1e400",
        "null",
        "true",
        "[]",
        "{}",
        "\"/a\"",
        "\"\\u0000\"",
        "\"\u{1F600}\"",
        "123456789012345678901234567890",
        "[[[[]]]]",
        "\"\\ud800\"",
    ];
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    for _ in 0..200_000 {
        let n = rng.below(6);
        let mut line = String::from("{");
        for i in 0..n {
            if i > 0 {
                line.push(',');
            }
            line.push_str(fields[rng.below(fields.len())]);
            line.push(':');
            line.push_str(values[rng.below(values.len())]);
        }
        line.push('}');
        // Sometimes break it.
        let line = match rng.below(8) {
            0 => {
                let mut cut = rng.below(line.len() + 1);
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line[..cut].to_owned()
            }
            1 => format!("{line}{}", generated(&mut rng)),
            _ => line,
        };
        match qio_ipc::RawRequest::parse(line.as_bytes()) {
            Ok(r) => {
                if let Some(id) = &r.id {
                    serde_json::from_str::<&RawValue>(id.as_json()).expect("id is JSON");
                }
                if let Some(d) = &r.data {
                    serde_json::from_str::<&RawValue>(d.get()).expect("data is JSON");
                }
            }
            Err(bad) => {
                if let Some(id) = &bad.id {
                    serde_json::from_str::<&RawValue>(id.as_json()).expect("id is JSON");
                }
                assert!(bad.message.len() < 1024, "{line:?}");
            }
        }
    }
}

/// PROTOCOL.md: fire-and-forget sends are queued while the server is unreachable and
/// flushed after the reconnect; they are lost only if the daemon stops. A hung server is
/// unreachable too, but the daemon only learns it from the heartbeat watch: what it wrote
/// meanwhile must not vanish with the dead connection.
///
/// Here the client keeps sending, an event and a request every 10 ms, until the daemon has
/// given up on the stalled server. When the server comes back it reads its backlog and
/// answers the requests in it into the socket the daemon has closed; the second answer
/// gets a broken pipe and the server drops the connection with the rest of the backlog:
/// those events are gone, though each was accepted without an `/error`. Asked here: each
/// arrives at least once, in order: the promise of `fire_and_forget = "at-least-once"` (by
/// default what was written is never sent again, and may be lost with the connection).
#[tokio::test]
async fn events_sent_to_a_hung_server_are_not_lost() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.driver.session.fire_and_forget = qiod::session::FireAndForget::AtLeastOnce;
    settings.driver.session.heartbeat_interval = Duration::from_millis(200);
    settings.driver.session.ping_timeout = Duration::from_millis(200);
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    let mut other = daemon.open_client().await;
    server.set_stalled(true);
    let mut n = 0u64;
    let deadline = Instant::now() + DEADLINE;
    loop {
        c.send(json!({"op":"send","path":"/hung","data":{"i":n}}))
            .await;
        // Another client's request between the events (answered -1 when the daemon gives
        // up): the server will answer it into the dead socket when it comes back.
        other
            .send(json!({"op":"send","path":"/clienttest/echo","id":n}))
            .await;
        n += 1;
        // Every line so far handled (accepted or queued: no /error) and the daemon's view.
        let st = c.call(json!({"op":"status"}), 100_000 + n).await;
        if st["data"]["state"] != "open" {
            break;
        }
        assert!(Instant::now() < deadline, "the stall was never detected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.set_stalled(false);
    wait_state(&mut c, true).await;
    let r = c
        .call(
            json!({"op":"send","path":"/clienttest/echo","data":"sync"}),
            1000,
        )
        .await;
    assert_eq!(r["code"], 200);
    let settled = server
        .wait_until(Duration::from_secs(2), |s| s.connection_count() == 1)
        .await;
    assert!(settled);
    let got: Vec<Value> = server
        .received()
        .into_iter()
        .filter(|r| r.path == "/hung")
        .map(|r| r.data["i"].clone())
        .collect();
    // At least once, in order of first arrival. (A fix that re-sends what the server never
    // confirmed may duplicate what it had read before the connection died: printed, not
    // asserted.)
    let mut first: Vec<u64> = Vec::new();
    for v in &got {
        let i = v.as_u64().unwrap_or(u64::MAX);
        if !first.contains(&i) {
            first.push(i);
        }
    }
    let duplicates = got.len() - first.len();
    let missing: Vec<u64> = (0..n).filter(|i| !first.contains(i)).collect();
    println!("{} of {n} arrived, {duplicates} duplicates", first.len());
    assert!(
        missing.is_empty() && first.windows(2).all(|w| w[0] < w[1]),
        "{} of {n} accepted events arrived (missing: {missing:?}; order of first arrivals: \
         {first:?}); the server saw {:?}",
        first.len(),
        server.closes()
    );
    daemon.stop().await;
}

/// Found by the `ipc_request` fuzz target (fuzz/regressions/ipc_request-unknown-op-echoed-whole):
/// every field a request gets wrong is quoted in the error cut to 40 characters, except an
/// unknown op, which is quoted whole, however long the line was (up to `max_line_bytes`).
#[tokio::test]
async fn ipc_errors_about_an_unknown_op_stay_short() {
    let op = "f".repeat(100_000);
    let line = format!("{{\"op\":\"{op}\",\"id\":1}}");
    let bad = qio_ipc::RawRequest::parse(line.as_bytes()).expect_err("unknown op");
    assert!(
        bad.message.starts_with("unknown op"),
        "{}",
        &bad.message[..60]
    );
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    c.write_raw(format!("{line}\n").as_bytes()).await;
    let r = c.reply(json!(1)).await;
    let msg = r["err_msg"].as_str().unwrap_or_default();
    assert_eq!(r["code"], 400);
    assert!(
        msg.len() < 200,
        "the error quotes the whole op: {} bytes for a {} byte op",
        msg.len(),
        op.len()
    );
    daemon.stop().await;
}
