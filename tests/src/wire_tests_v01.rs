//! Drives a 0.1 server over real sockets: tokio-tungstenite's default client, and raw TCP with
//! hand-written requests and frames where the exact bytes matter.
//!
//! No fixed sleeps for waiting: `wait_until` or timeouts on reads. Negative checks ("nothing
//! arrives") are bounded short.

use crate::{CallbackKind, CloseReason, Dialect, LogEntry, Received, ServerConfig, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// The raw-client helpers are the 0.2 tests' own: the transport is the same.
use crate::wire_tests::{closed_with, expect_quiet, recv, recv_where, send, Ws, T};

/// The example key of RFC 6455 and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const HEARTBEAT: &str = "/qio/heartbeat:0:plain=";
const QIO_ERROR: &str = "plain=qio_error";

fn cfg() -> ServerConfig {
    ServerConfig {
        dialect: Dialect::V01,
        ..ServerConfig::default()
    }
}

async fn start() -> TestServer {
    TestServer::start(cfg()).await.unwrap()
}

/// Connects with tokio-tungstenite's default request to `server.url()`; returns the
/// connection id (tests connect one client at a time, so the newest `Opened` is ours).
async fn connect(server: &TestServer) -> (Ws, u64) {
    let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::connect_async(server.url()))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    let id = server
        .log()
        .iter()
        .rev()
        .find_map(|e| match e {
            LogEntry::Opened { conn } => Some(*conn),
            _ => None,
        })
        .expect("open right after the 101");
    (ws, id)
}

/// Sends `text` and returns the next frame that is not a heartbeat or a broadcast.
async fn call(ws: &mut Ws, text: &str) -> String {
    send(ws, text).await;
    recv_where(ws, |t| {
        t != HEARTBEAT && !t.starts_with("/clienttest/broadcast:")
    })
    .await
}

fn cb_ok(cb: u64, data: &str) -> String {
    format!("/qio/callback/{cb}:0:{data}")
}

fn cb_err(cb: u64) -> String {
    format!("/qio/callback/{cb}:0:{QIO_ERROR}")
}

/// Reads until the connection ends and asserts it was a bare TCP drop: no close frame (and no
/// pong) came, the stream just ended. Returns the frames received before the end.
async fn expect_dropped(ws: &mut Ws) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("connection not dropped in time")
        {
            Some(Ok(msg)) => {
                assert!(
                    !matches!(msg, Message::Close(_) | Message::Pong(_)),
                    "0.1 sends no close frame and no pong, got {msg:?}"
                );
                got.push(msg);
            }
            Some(Err(_)) | None => return got,
        }
    }
}

async fn close_reason(server: &TestServer, conn: u64) -> CloseReason {
    assert!(
        server
            .wait_until(T, |s| s.closes().iter().any(|(c, _)| *c == conn))
            .await,
        "connection {conn} never closed"
    );
    server
        .closes()
        .into_iter()
        .find_map(|(c, r)| (c == conn).then_some(r))
        .unwrap()
}

/// A canonical hand-written upgrade request for `path`.
fn request(server: &TestServer, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n",
        server.addr()
    )
}

/// A client frame (final, masked unless said otherwise) with any opcode and payload.
fn client_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Opens TCP, writes `bytes` and returns the stream.
async fn raw(server: &TestServer, bytes: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// Reads the HTTP response head, byte by byte so nothing after it is consumed.
async fn read_response_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(T, tcp.read_u8())
            .await
            .expect("response timed out")
            .expect("connection ended before the response head");
        head.push(b);
    }
    String::from_utf8(head).unwrap()
}

/// Reads everything until the server ends the connection; a reset counts as an end.
async fn read_to_end(tcp: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, tcp.read_to_end(&mut got))
        .await
        .expect("the server did not end the connection");
    got
}

fn upgraded(server: &TestServer, conn: u64) -> (String, bool, String) {
    server
        .log()
        .into_iter()
        .find_map(|e| match e {
            LogEntry::Upgraded {
                conn: c,
                uri,
                subprotocol_requested,
                request,
            } if c == conn => Some((uri, subprotocol_requested, request)),
            _ => None,
        })
        .expect("no Upgraded entry")
}

#[tokio::test]
async fn default_client_request_is_accepted_and_open_at_once() {
    let server = start().await;
    let url = server.url();
    assert_eq!(url, format!("ws://{}/qio", server.addr()));
    assert_eq!(server.dialect(), Dialect::V01);
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(server.connection_count(), 1, "open without any greeting");
    let (uri, sub, req) = upgraded(&server, conn);
    assert_eq!(uri, "/qio");
    assert!(!sub);
    // The exact bytes tokio-tungstenite sent: canonical header names.
    assert!(req.starts_with("GET /qio HTTP/1.1\r\n"), "{req:?}");
    for line in [
        format!("\r\nHost: {}\r\n", server.addr()),
        "\r\nConnection: Upgrade\r\n".into(),
        "\r\nUpgrade: websocket\r\n".into(),
        "\r\nSec-WebSocket-Version: 13\r\n".into(),
        "\r\nSec-WebSocket-Key: ".into(),
    ] {
        assert!(req.contains(&line), "{line:?} not in {req:?}");
    }
    assert!(req.ends_with("\r\n\r\n"));

    assert_eq!(
        call(&mut ws, "/qio/ping:1:plain=test").await,
        "/qio/callback/1:0:plain=test"
    );
    assert_eq!(
        server.received(),
        vec![Received {
            conn,
            path: "/qio/ping".into(),
            raw_path: "/qio/ping".into(),
            cb: 1,
            data: json!("test"),
        }]
    );
    assert!(server.closes().is_empty());
}

#[tokio::test]
async fn requesting_quickio_fails_the_client_upgrade() {
    let server = start().await;
    let mut req = server.url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("quickio"),
    );
    let err = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect_err("tungstenite wants its subprotocol echoed");
    assert!(
        err.to_string()
            .contains("SubProtocol error: Server sent no subprotocol"),
        "{err}"
    );
    // The server did answer 101 (and ignored the header); the client then hung up.
    let (_, sub, req) = upgraded(&server, 1);
    assert!(sub);
    assert!(
        req.contains("\r\nSec-WebSocket-Protocol: quickio\r\n"),
        "{req:?}"
    );
    assert!(closed_with(&server, 1, CloseReason::ClientGone).await);
}

#[tokio::test]
async fn hand_written_requests_are_checked_case_sensitively() {
    let probe = start().await;
    let good = request(&probe, "/qio");
    drop(probe);
    let big = good.replacen(
        "\r\n\r\n",
        &format!("\r\nX-Pad: {}\r\n\r\n", "p".repeat(9000)),
        1,
    );
    let cases: Vec<(String, &str)> = vec![
        (
            good.replacen("Sec-WebSocket-Key:", "sec-websocket-key:", 1),
            "lower-case header name: sec-websocket-key",
        ),
        (
            good.replacen("Sec-WebSocket-Version:", "sec-websocket-version:", 1),
            "lower-case header name: sec-websocket-version",
        ),
        (
            good.replacen("Host:", "host:", 1),
            "lower-case header name: host",
        ),
        (
            good.replacen("Upgrade: websocket", "upgrade: websocket", 1),
            "lower-case header name: upgrade",
        ),
        (
            good.replacen("Connection:", "connection:", 1),
            "lower-case header name: connection",
        ),
        (
            good.replacen("Sec-WebSocket-Key:", "Sec-Websocket-Key:", 1),
            "non-canonical header name: Sec-Websocket-Key",
        ),
        (
            good.replacen("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", 1),
            "unsupported Sec-WebSocket-Version: \"8\"",
        ),
        (
            good.replacen("GET /qio ", "GET / ", 1),
            "path without /qio: \"/\"",
        ),
        (
            good.replacen("GET /qio ", "GET /chat ", 1),
            "path without /qio: \"/chat\"",
        ),
        (
            good.replacen("GET ", "POST ", 1),
            "method is not GET: \"POST\"",
        ),
        (big, "request head larger than 8192 bytes"),
        (
            "GET /qio HTTP/1.1\r\nHost: x\r\n".into(),
            "connection closed before the end of the request head",
        ),
    ];
    for (head, reason) in cases {
        let server = start().await;
        let mut tcp = raw(&server, head.as_bytes()).await;
        if reason.starts_with("connection closed") {
            tcp.shutdown().await.unwrap();
        }
        assert!(
            read_to_end(&mut tcp).await.is_empty(),
            "no HTTP answer at all: {reason}"
        );
        assert_eq!(
            close_reason(&server, 1).await,
            CloseReason::HandshakeFailed(reason.into())
        );
        let rejected = server.log().into_iter().find_map(|e| match e {
            LogEntry::UpgradeRejected {
                conn: 1,
                request,
                reason,
            } => Some((request, reason)),
            _ => None,
        });
        let (logged, why) = rejected.expect("UpgradeRejected logged");
        assert_eq!(why, reason);
        if head.len() <= 8192 {
            assert_eq!(logged, head, "the raw request is logged");
        } else {
            assert_eq!(logged.len(), 8192);
            assert!(head.starts_with(&logged));
        }
        assert_eq!(server.connection_count(), 0);
        assert!(server.received().is_empty());
    }
}

#[tokio::test]
async fn hand_written_request_gets_the_exact_101_and_pipelined_frames_count() {
    let server = start().await;
    let head = request(&server, "/qio?x=1");
    // The first frame rides in the same segment as the request.
    let mut bytes = head.clone().into_bytes();
    bytes.extend(client_frame(1, b"/qio/ping:1:plain=early", true));
    let mut tcp = raw(&server, &bytes).await;
    assert_eq!(
        read_response_head(&mut tcp).await,
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
    );
    let (uri, sub, logged) = upgraded(&server, 1);
    assert_eq!((uri.as_str(), sub, logged), ("/qio?x=1", false, head));
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "/qio/callback/1:0:plain=early"),
        other => panic!("expected the ping answer, got {other:?}"),
    }
}

#[tokio::test]
async fn unmasked_frame_is_dropped() {
    let server = start().await;
    let mut bytes = request(&server, "/qio").into_bytes();
    bytes.extend(client_frame(1, b"/qio/ping:1:plain=x", false));
    let mut tcp = raw(&server, &bytes).await;
    read_response_head(&mut tcp).await;
    assert!(
        read_to_end(&mut tcp).await.is_empty(),
        "no answer, no close frame"
    );
    assert!(matches!(
        close_reason(&server, 1).await,
        CloseReason::Transport(e) if e.contains("unmasked")
    ));
}

#[tokio::test]
async fn url_without_qio_is_dropped() {
    let server = start().await;
    let url = format!("ws://{}/", server.addr());
    let res = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out");
    assert!(res.is_err());
    assert_eq!(
        close_reason(&server, 1).await,
        CloseReason::HandshakeFailed("path without /qio: \"/\"".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_unsub_broadcasts_and_qio_error() {
    let server = start().await;
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(
        call(&mut ws, "/qio/sub:1:plain=/clienttest/broadcast").await,
        cb_ok(1, "plain=")
    );
    let mut last = 0;
    for _ in 0..3 {
        let t = recv_where(&mut ws, |t| t.starts_with("/clienttest/broadcast:")).await;
        let n: u64 = t
            .strip_prefix("/clienttest/broadcast:0:json=")
            .unwrap_or_else(|| panic!("{t:?}"))
            .parse()
            .unwrap();
        assert!(n > last, "counter must increase: {n} after {last}");
        last = n;
    }
    // Already subscribed.
    assert_eq!(
        call(&mut ws, "/qio/sub:2:plain=/clienttest/broadcast").await,
        cb_err(2)
    );
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/clienttest/broadcast".to_string(), 1)])
    );
    assert_eq!(
        call(&mut ws, "/qio/unsub:3:plain=/clienttest/broadcast").await,
        cb_ok(3, "plain=")
    );
    assert!(server.subscriptions().is_empty());

    // Any other path, cleaned; broadcasts pick plain or json from the data.
    assert_eq!(
        call(&mut ws, "/qio/sub:4:plain=/app/@user/(new)>>>>").await,
        cb_ok(4, "plain=")
    );
    let want_sub = LogEntry::Subscribed {
        conn,
        path: "/app/user/new".into(),
    };
    assert!(server.log().contains(&want_sub));
    for (data, want) in [
        (json!("hi there"), "/app/user/new:0:plain=hi there"),
        (json!(null), "/app/user/new:0:plain="),
        (json!({"a": 1}), r#"/app/user/new:0:json={"a":1}"#),
        (json!(7), "/app/user/new:0:json=7"),
    ] {
        assert_eq!(server.broadcast("/app/user/new/", data).await, 1);
        assert_eq!(
            recv_where(&mut ws, |t| !t.starts_with("/clienttest/broadcast:")).await,
            want
        );
    }

    // Every failure is qio_error.
    server.set_refuse_subscriptions("/app/r", Some(420));
    for (i, text) in [
        "/qio/sub:{}:plain=/app/r",
        "/qio/sub:{}:plain=/qio/ping",
        "/qio/sub:{}:json=42",
        "/qio/sub:{}:json=[\"/clienttest/on-data\",123987]",
        "/qio/sub:{}:plain=/clienttest/on-data",
        "/qio/sub:{}:plain=/clienttest/in-progress",
        "/qio/nope:{}:plain=",
        "/qio/on:{}:plain=/app/x",
        "/qio/hostname:{}:plain=",
    ]
    .iter()
    .enumerate()
    {
        let cb = 10 + i as u64;
        assert_eq!(
            call(&mut ws, &text.replace("{}", &cb.to_string())).await,
            cb_err(cb),
            "{text}"
        );
    }
    server.set_refuse_subscriptions("/app/r", None);
    assert_eq!(
        call(&mut ws, "/qio/sub:30:plain=/app/r").await,
        cb_ok(30, "plain=")
    );
    // Unsubscribing is always fine; cb 0 asks for nothing.
    assert_eq!(
        call(&mut ws, "/qio/unsub:31:plain=/never").await,
        cb_ok(31, "plain=")
    );
    send(&mut ws, "/qio/nope:0:plain=").await;
    assert_eq!(
        call(&mut ws, "/qio/ping:32:plain=").await,
        cb_ok(32, "plain=")
    );
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/app/r".to_string(), 1), ("/app/user/new".to_string(), 1)])
    );
    assert!(server.closes().is_empty());
    // The connection going away removes its subscriptions.
    drop(ws);
    assert!(closed_with(&server, conn, CloseReason::ClientGone).await);
    assert!(server.subscriptions().is_empty());
}

#[tokio::test]
async fn closed_subscriptions_answer_qio_error() {
    let server = TestServer::start(ServerConfig {
        open_subscriptions: false,
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&server).await;
    assert_eq!(call(&mut ws, "/qio/sub:1:plain=/app/x").await, cb_err(1));
    assert_eq!(
        call(&mut ws, "/qio/sub:2:plain=/clienttest/broadcast").await,
        cb_ok(2, "plain=")
    );
}

#[tokio::test]
async fn ping_passes_data_through() {
    let server = start().await;
    let (mut ws, _) = connect(&server).await;
    let cases = [
        ("/qio/ping:1:plain=test", "/qio/callback/1:0:plain=test"),
        ("/qio/ping:2:plain=", "/qio/callback/2:0:plain="),
        ("/qio/ping:3:plain=a:b=c", "/qio/callback/3:0:plain=a:b=c"),
        (
            r#"/qio/ping:4:json={"a":[1,null]}"#,
            r#"/qio/callback/4:0:json={"a":[1,null]}"#,
        ),
        // A JSON string goes back as plain text, null as the empty text.
        (r#"/qio/ping:5:json="s""#, "/qio/callback/5:0:plain=s"),
        ("/qio/ping:6:json=null", "/qio/callback/6:0:plain="),
        ("/qio//@ping/:7:plain=x", "/qio/callback/7:0:plain=x"),
    ];
    for (text, want) in cases {
        assert_eq!(call(&mut ws, text).await, want, "{text}");
    }
    send(&mut ws, "/qio/ping:0:plain=nothing back").await;
    assert_eq!(
        call(&mut ws, "/qio/ping:8:plain=").await,
        cb_ok(8, "plain=")
    );
    let data: Vec<_> = server.received().into_iter().map(|r| r.data).collect();
    assert_eq!(
        data[..4],
        [
            json!("test"),
            json!(""),
            json!("a:b=c"),
            json!({"a": [1, null]})
        ]
    );
}

#[tokio::test]
async fn oversized_frames_are_dropped_without_close_frame() {
    let server = start().await;
    let ping = "/qio/ping:1:plain=";
    // Exactly the limit passes (and the longer answer is fine: the limit is on clients).
    let (mut ws, _) = connect(&server).await;
    let fits = format!("{ping}{}", "x".repeat(1024 - ping.len()));
    assert_eq!(fits.len(), 1024);
    assert_eq!(
        call(&mut ws, &fits).await,
        format!("/qio/callback/1:0:plain={}", "x".repeat(1024 - ping.len()))
    );
    // One more byte is a drop.
    let (mut ws, conn) = connect(&server).await;
    send(&mut ws, &format!("{fits}x")).await;
    assert!(expect_dropped(&mut ws).await.is_empty());
    assert!(
        closed_with(
            &server,
            conn,
            CloseReason::FrameTooLarge {
                size: 1025,
                max: 1024
            }
        )
        .await
    );
    // Fragments count together.
    let (mut ws, conn) = connect(&server).await;
    let part = "y".repeat(600);
    ws.send(Message::Frame(WsFrame::message(
        format!("{ping}{part}"),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(WsFrame::message(
        part,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert!(expect_dropped(&mut ws).await.is_empty());
    assert!(matches!(
        close_reason(&server, conn).await,
        CloseReason::FrameTooLarge { max: 1024, .. }
    ));

    // The limit is configurable.
    let server = TestServer::start(ServerConfig {
        max_frame_bytes: Some(40),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, conn) = connect(&server).await;
    let fits = format!("{ping}{}", "z".repeat(40 - ping.len()));
    assert_eq!(
        call(&mut ws, &fits).await,
        cb_ok(1, &format!("plain={}", "z".repeat(40 - ping.len())))
    );
    send(&mut ws, &format!("{fits}z")).await;
    assert!(expect_dropped(&mut ws).await.is_empty());
    assert!(
        closed_with(
            &server,
            conn,
            CloseReason::FrameTooLarge { size: 41, max: 40 }
        )
        .await
    );
}

#[tokio::test]
async fn malformed_frames_and_other_opcodes_are_dropped() {
    let server = start().await;
    let malformed = |text: &str| CloseReason::Malformed {
        error: Dialect::V01.parse(text).unwrap_err().to_string(),
        text: text.into(),
    };
    let cases: Vec<(Message, CloseReason)> = vec![
        (Message::text("no colon here"), malformed("no colon here")),
        (Message::text("/a:x:plain=1"), malformed("/a:x:plain=1")),
        (Message::text("/a:1:text=x"), malformed("/a:1:text=x")),
        (Message::text("/a:1:plain"), malformed("/a:1:plain")),
        (Message::text("/a:1:json={"), malformed("/a:1:json={")),
        // The 0.2 syntax is malformed for 0.1.
        (
            Message::text("/qio/ping:1=null"),
            malformed("/qio/ping:1=null"),
        ),
        (Message::text("/qio/ohai"), malformed("/qio/ohai")),
        (Message::binary(vec![1u8, 2, 3]), CloseReason::BinaryFrame),
        (Message::Ping(vec![1u8].into()), CloseReason::PingFrame),
        (Message::Pong(vec![1u8].into()), CloseReason::PongFrame),
    ];
    for (msg, want) in cases {
        let (mut ws, conn) = connect(&server).await;
        ws.send(msg.clone()).await.unwrap();
        assert!(expect_dropped(&mut ws).await.is_empty(), "{msg:?}");
        assert_eq!(close_reason(&server, conn).await, want, "{msg:?}");
    }
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
}

#[tokio::test]
async fn client_close_frame_is_answered_by_a_bare_drop() {
    let server = start().await;
    let (mut ws, conn) = connect(&server).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    assert!(expect_dropped(&mut ws).await.is_empty());
    assert!(closed_with(&server, conn, CloseReason::ClientClose { code: Some(1000) }).await);
}

#[tokio::test]
async fn conformance_events_and_control_api() {
    let server = start().await;
    let (mut ws, conn) = connect(&server).await;

    // Echo chain: every answer requests a callback back; data passes through as sent.
    assert_eq!(
        call(&mut ws, "/clienttest/echo:1:plain=x").await,
        "/qio/callback/1:1:plain=x"
    );
    assert_eq!(
        call(&mut ws, r#"/qio/callback/1:2:json={"y":2}"#).await,
        r#"/qio/callback/2:2:json={"y":2}"#
    );
    send(&mut ws, "/qio/callback/2:0:plain=").await;
    let want = LogEntry::CallbackAnswered {
        conn,
        cb: 2,
        kind: CallbackKind::Echo,
        data: json!(""),
    };
    assert!(server.wait_until(T, |s| s.log().contains(&want)).await);

    assert_eq!(
        call(&mut ws, "/clienttest/error/418:3:plain=").await,
        cb_err(3)
    );
    send(&mut ws, "/clienttest/drop-callback:4:plain=").await;
    assert_eq!(
        call(&mut ws, "/qio/ping:5:plain=").await,
        cb_ok(5, "plain=")
    );
    assert_eq!(
        call(&mut ws, "/clienttest/send-unsubscribed:6:plain=").await,
        "/you/didnt/subscribe/to/this:0:plain="
    );
    // 0.2-only conformance events.
    assert_eq!(
        call(&mut ws, "/clienttest/heartbeat-challenge:7:plain=").await,
        cb_err(7)
    );
    assert_eq!(
        call(&mut ws, "/clienttest/in-progress:8:plain=").await,
        cb_err(8)
    );
    assert_eq!(
        call(&mut ws, "/clienttest/on-data:9:json=123987").await,
        cb_err(9)
    );
    send(&mut ws, "/clienttest/heartbeat-challenge:0:plain=").await;
    assert_eq!(
        call(&mut ws, "/qio/ping:10:plain=").await,
        cb_ok(10, "plain=")
    );
    // Other application events echo; unknown callbacks are errors.
    assert_eq!(
        call(&mut ws, "/app/thing:11:json=[1,2]").await,
        cb_ok(11, "json=[1,2]")
    );
    assert_eq!(
        call(&mut ws, "/app/thing:12:plain=[1,2]").await,
        cb_ok(12, "plain=[1,2]")
    );
    assert_eq!(
        call(&mut ws, "/qio/callback/999:13:plain=").await,
        cb_err(13)
    );

    // Control API.
    server.set_drop_callbacks(true);
    send(&mut ws, "/app/x:14:plain=1").await;
    assert_eq!(
        call(&mut ws, "/qio/ping:15:plain=").await,
        cb_ok(15, "plain=")
    );
    server.set_drop_callbacks(false);
    server.send_raw_to_all("hello there").await;
    assert_eq!(recv(&mut ws).await, "hello there");
    server.request_from_all("/app/question", json!("?")).await;
    assert_eq!(recv(&mut ws).await, "/app/question:3:plain=?");
    server
        .request_from_all("/app/question", json!({"q": 1}))
        .await;
    assert_eq!(recv(&mut ws).await, r#"/app/question:4:json={"q":1}"#);
    send(&mut ws, "/qio/callback/3:0:plain=!").await;
    send(&mut ws, "/qio/callback/4:0:json=[true]").await;
    for (cb, data) in [(3, json!("!")), (4, json!([true]))] {
        let want = LogEntry::CallbackAnswered {
            conn,
            cb,
            kind: CallbackKind::Request,
            data,
        };
        assert!(server.wait_until(T, |s| s.log().contains(&want)).await);
    }
    assert!(!server
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::ChallengeSent { .. })));

    assert_eq!(
        call(&mut ws, "/clienttest/send-invalid:16:plain=").await,
        "unicorns, ponies, princesses, and magic!:good times:0="
    );
    let got: Vec<(String, u64, serde_json::Value)> = server
        .received()
        .into_iter()
        .map(|r| (r.path, r.cb, r.data))
        .take(3)
        .collect();
    assert_eq!(
        got,
        vec![
            ("/clienttest/echo".into(), 1, json!("x")),
            ("/qio/callback/1".into(), 2, json!({"y": 2})),
            ("/qio/callback/2".into(), 0, json!("")),
        ]
    );
    assert!(server.closes().is_empty());
}

#[tokio::test]
async fn close_and_move_are_bare_drops() {
    let server = start().await;
    let (mut ws, conn) = connect(&server).await;
    send(&mut ws, "/clienttest/close:1:plain=").await;
    assert!(expect_dropped(&mut ws).await.is_empty());
    assert!(closed_with(&server, conn, CloseReason::ServerClose).await);

    let (mut ws, conn) = connect(&server).await;
    let to = "ws://127.0.0.1:1/qio";
    send(&mut ws, &format!("/clienttest/move:0:plain={to}")).await;
    let got = expect_dropped(&mut ws).await;
    assert_eq!(got, vec![Message::text(format!("/qio/move:0:plain={to}"))]);
    assert!(closed_with(&server, conn, CloseReason::Moved).await);
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_on_a_global_timer_and_no_challenges() {
    let server = TestServer::start(ServerConfig {
        heartbeat_interval: Duration::from_millis(40),
        challenge_after: Duration::from_millis(5),
        challenge_timeout: Duration::from_millis(5),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut busy, _) = connect(&server).await;
    let (mut idle, idle_id) = connect(&server).await;
    // A connection that is sent something all the time still gets its heartbeats.
    let mut heartbeats = 0;
    let mut cb = 0;
    while heartbeats < 3 {
        cb += 1;
        assert!(cb < 500, "no heartbeats while busy");
        send(&mut busy, &format!("/qio/ping:{cb}:plain=")).await;
        loop {
            let t = recv(&mut busy).await;
            if t == HEARTBEAT {
                heartbeats += 1;
            } else {
                assert_eq!(t, cb_ok(cb, "plain="));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..3 {
        assert_eq!(recv(&mut idle).await, HEARTBEAT);
    }
    // Silent for far longer than challenge_after + challenge_timeout, and still there.
    assert!(!server.closes().iter().any(|(c, _)| *c == idle_id));
    assert!(!server
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::ChallengeSent { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_restart_and_stall() {
    let server = TestServer::start(ServerConfig {
        heartbeat_interval: Duration::from_millis(20),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(
        call(&mut ws, "/qio/sub:1:plain=/a").await,
        cb_ok(1, "plain=")
    );
    server.kill().await;
    assert!(expect_dropped(&mut ws)
        .await
        .iter()
        .all(|m| *m == Message::text(HEARTBEAT)));
    assert!(server.closes().contains(&(conn, CloseReason::Killed)));
    assert!(server.subscriptions().is_empty());

    server.restart().await.unwrap();
    let (mut ws, _) = connect(&server).await;
    assert_eq!(
        call(&mut ws, "/qio/ping:1:plain=back").await,
        cb_ok(1, "plain=back")
    );

    server.set_stalled(true);
    send(&mut ws, "/qio/ping:2:plain=").await;
    // Let a heartbeat already on its way arrive, then expect silence.
    while tokio::time::timeout(Duration::from_millis(30), ws.next())
        .await
        .is_ok()
    {}
    expect_quiet(&mut ws).await;
    server.set_stalled(false);
    assert_eq!(
        recv_where(&mut ws, |t| t != HEARTBEAT).await,
        cb_ok(2, "plain=")
    );
    assert_eq!(recv_where(&mut ws, |t| t == HEARTBEAT).await, HEARTBEAT);
}
