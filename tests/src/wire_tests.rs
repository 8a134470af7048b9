//! Drives the server over real sockets with a raw tokio-tungstenite client.
//!
//! No fixed sleeps: waiting is done with `wait_until` or timeouts on reads. The only
//! time-based assertions are negative ones ("nothing arrives within N ms"), bounded short.

use crate::{CallbackKind, CloseReason, LogEntry, ServerConfig, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound for anything that should happen; tests normally finish far below it.
pub(crate) const T: Duration = Duration::from_secs(5);
/// How long "nothing happens" is checked for.
pub(crate) const QUIET: Duration = Duration::from_millis(150);

fn cfg() -> ServerConfig {
    ServerConfig::default()
}

async fn connect_raw(server: &TestServer, subprotocol: bool) -> (Ws, Response) {
    let mut req = server.url().into_client_request().unwrap();
    if subprotocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("quickio"),
        );
    }
    tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

/// Connects and completes the Quick.IO handshake; returns the connection id (tests connect
/// one client at a time, so the newest `Opened` entry is ours).
async fn connect(server: &TestServer) -> (Ws, u64) {
    let (mut ws, _) = connect_raw(server, true).await;
    send(&mut ws, "/qio/ohai").await;
    assert_eq!(recv(&mut ws).await, "/qio/ohai");
    let id = *opened_ids(server)
        .last()
        .expect("opened before the greeting is answered");
    (ws, id)
}

fn opened_ids(s: &TestServer) -> Vec<u64> {
    s.log()
        .iter()
        .filter_map(|e| match e {
            LogEntry::Opened { conn } => Some(*conn),
            _ => None,
        })
        .collect()
}

pub(crate) async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// The next text frame (anything else is a test failure).
pub(crate) async fn recv(ws: &mut Ws) -> String {
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The next text frame that `keep` accepts, skipping the others (heartbeats, broadcasts).
pub(crate) async fn recv_where(ws: &mut Ws, keep: impl Fn(&str) -> bool) -> String {
    loop {
        let t = recv(ws).await;
        if keep(&t) {
            return t;
        }
    }
}

/// Sends `text` and returns the next frame that is not a heartbeat or broadcast.
async fn call(ws: &mut Ws, text: &str) -> String {
    send(ws, text).await;
    recv_where(ws, |t| {
        !t.starts_with("/qio/heartbeat:0=") && !t.starts_with("/clienttest/broadcast:")
    })
    .await
}

/// Reads until the connection ends: `None` if it ended without a close frame, else
/// `Some` of the close frame's code and reason (`Some(None)` for an empty payload, which the
/// client sees as 1005, no status).
async fn expect_closed(ws: &mut Ws) -> Option<Option<CloseFrame>> {
    let mut close = None;
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("connection not closed in time")
        {
            Some(Ok(Message::Close(f))) => close = Some(f),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return close,
        }
    }
}

/// The close frame's code and reason text, for comparing with one `assert_eq!`.
fn code_and_reason(f: Option<Option<CloseFrame>>) -> Option<(u16, String)> {
    f.expect("a close frame")
        .map(|f| (u16::from(f.code), f.reason.to_string()))
}

/// Asserts nothing at all arrives for [`QUIET`].
pub(crate) async fn expect_quiet(ws: &mut Ws) {
    if let Ok(msg) = tokio::time::timeout(QUIET, ws.next()).await {
        panic!("expected silence, got {msg:?}");
    }
}

pub(crate) async fn closed_with(server: &TestServer, conn: u64, want: CloseReason) -> bool {
    server
        .wait_until(T, |s| s.closes().contains(&(conn, want.clone())))
        .await
}

fn ok(cb: u64, data: &str) -> String {
    format!(r#"/qio/callback/{cb}:0={{"code":200,"data":{data}}}"#)
}

#[tokio::test]
async fn handshake_echoes_subprotocol_and_answers_ohai() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, resp) = connect_raw(&server, true).await;
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "quickio"
    );
    assert_eq!(server.connection_count(), 0, "not open before the greeting");
    send(&mut ws, "/qio/ohai").await;
    assert_eq!(recv(&mut ws).await, "/qio/ohai");
    assert!(server.wait_until(T, |s| s.connection_count() == 1).await);
    assert!(server.log().iter().any(|e| matches!(
        e,
        LogEntry::Upgraded { subprotocol_requested: true, uri, request, .. } if uri == "/"
            && request.starts_with("GET / HTTP/1.1\r\n")
            && request.contains("\r\nSec-WebSocket-Protocol: quickio\r\n")
            && request.ends_with("\r\n\r\n")
    )));
    assert_eq!(server.received()[0].path, "/qio/ohai");
}

/// Sends `head` over raw TCP and returns everything the server answers until it closes.
async fn raw_http(server: &TestServer, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out))
        .await
        .expect("the server closes after a refusal")
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// An upgrade request as qiod sends it.
const UPGRADE: &str = "GET /any/path HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                       Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Protocol: quickio\r\n\r\n";

#[tokio::test]
async fn upgrade_requires_the_subprotocol_and_answers_400_or_426_like_the_real_server() {
    let server = TestServer::start(cfg()).await.unwrap();
    let cases = [
        (
            UPGRADE.replace("Sec-WebSocket-Protocol: quickio\r\n", ""),
            "400 Bad Request",
        ),
        (UPGRADE.replace("quickio", "chat"), "400 Bad Request"),
        (
            UPGRADE.replace("Version: 13", "Version: 8"),
            "400 Bad Request",
        ),
        (
            UPGRADE.replace("Upgrade: websocket\r\n", ""),
            "426 Upgrade Required",
        ),
        (
            UPGRADE.replace("Connection: Upgrade", "Connection: keep-alive"),
            "426 Upgrade Required",
        ),
    ];
    for (head, status) in &cases {
        let answer = raw_http(&server, head).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.0 {status}\r\n")) && answer.ends_with("\r\n\r\n"),
            "{head:?}: {answer:?}"
        );
    }
    let rejected = server
        .log()
        .iter()
        .filter(|e| matches!(e, LogEntry::UpgradeRejected { reason, .. } if reason.starts_with("answered ")))
        .count();
    assert_eq!(rejected, cases.len());
    assert_eq!(server.connection_count(), 0);

    // tungstenite (qiod's WebSocket library) sees the HTTP/1.0 refusal as an error.
    let plain = tokio_tungstenite::connect_async(server.url()).await;
    assert!(plain.is_err(), "no subprotocol must be refused: {plain:?}");

    // The 101 carries the real server's headers, in its order, whatever the URL path.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(T, tcp.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        got.push(b[0]);
    }
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Access-Control-Allow-Origin: *\r\nSec-WebSocket-Protocol: quickio\r\n\
         Cache-Control: private, max-age=0\r\nExpires: -1\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
}

#[tokio::test]
async fn the_first_frame_must_be_the_greeting() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, _) = connect_raw(&server, true).await;
    send(&mut ws, "/qio/ping:1=null").await;
    assert_eq!(
        code_and_reason(expect_closed(&mut ws).await),
        Some((1002, "invalid handshake".into()))
    );
    assert!(
        closed_with(
            &server,
            1,
            CloseReason::NotGreeting("/qio/ping:1=null".into())
        )
        .await
    );
    assert_eq!(server.connection_count(), 0);
    assert!(server.received().is_empty());
}

#[tokio::test]
async fn whatever_comes_in_the_same_read_as_the_greeting_is_thrown_away() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, _) = connect_raw(&server, true).await;
    // One write: the greeting and a ping reach the server in one read.
    ws.feed(Message::text("/qio/ohai")).await.unwrap();
    ws.feed(Message::text("/qio/ping:1=null")).await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(recv(&mut ws).await, "/qio/ohai");
    expect_quiet(&mut ws).await;
    assert!(server
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::DiscardedWithGreeting { bytes, .. } if *bytes > 16)));
    // Sent after the answer, the same ping is answered.
    assert_eq!(call(&mut ws, "/qio/ping:2=null").await, ok(2, "null"));
    let paths: Vec<(String, u64)> = server
        .received()
        .into_iter()
        .map(|r| (r.path, r.cb))
        .collect();
    assert_eq!(paths, [("/qio/ohai".into(), 0), ("/qio/ping".into(), 2)]);
}

#[tokio::test]
async fn a_client_that_never_greets_is_closed_with_1008() {
    let server = TestServer::start(ServerConfig {
        client_timeout: Duration::from_millis(50),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect_raw(&server, true).await;
    assert_eq!(
        code_and_reason(expect_closed(&mut ws).await),
        Some((1008, "client timeout".into()))
    );
    assert!(closed_with(&server, 1, CloseReason::ClientTimeout).await);
}

#[tokio::test]
async fn ping_hostname_and_unknown_qio_events() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(call(&mut ws, "/qio/ping:1=null").await, ok(1, "null"));
    assert_eq!(
        call(&mut ws, "/qio/hostname:2=null").await,
        ok(2, &format!("\"{}\"", server.addr()))
    );
    assert_eq!(
        call(&mut ws, "/qio/nope:3=null").await,
        r#"/qio/callback/3:0={"code":404,"data":null,"err_msg":null}"#
    );
    // cb 0 asks for nothing: the next frame answers the ping after it.
    send(&mut ws, "/qio/nope:0=null").await;
    assert_eq!(call(&mut ws, "/qio/ping:4=\"x\"").await, ok(4, "null"));
    let got: Vec<(u64, String, u64)> = server
        .received()
        .into_iter()
        .map(|r| (r.conn, r.path, r.cb))
        .collect();
    assert_eq!(
        got,
        vec![
            (conn, "/qio/ohai".into(), 0),
            (conn, "/qio/ping".into(), 1),
            (conn, "/qio/hostname".into(), 2),
            (conn, "/qio/nope".into(), 3),
            (conn, "/qio/nope".into(), 0),
            (conn, "/qio/ping".into(), 4),
        ]
    );
    assert!(server.closes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_off_and_broadcasts() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(
        call(&mut ws, r#"/qio/on:1="/clienttest/broadcast""#).await,
        ok(1, "null")
    );
    let mut last = 0;
    for _ in 0..3 {
        let t = recv_where(&mut ws, |t| t.starts_with("/clienttest/broadcast:0=")).await;
        let n: u64 = t["/clienttest/broadcast:0=".len()..].parse().unwrap();
        assert!(n > last, "counter must increase: {n} after {last}");
        last = n;
    }
    // A repeated on is answered 200, as on the real server.
    assert_eq!(
        call(&mut ws, r#"/qio/on:2="/clienttest/broadcast""#).await,
        ok(2, "null")
    );
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/clienttest/broadcast".to_string(), 1)])
    );
    assert_eq!(
        call(&mut ws, r#"/qio/off:3="/clienttest/broadcast""#).await,
        ok(3, "null")
    );
    assert!(server.subscriptions().is_empty());

    // Any other path is subscribable; the path is cleaned.
    assert_eq!(
        call(&mut ws, r#"/qio/on:4="/app/@user/(new)>>>>""#).await,
        ok(4, "null")
    );
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/app/user/new".to_string(), 1)])
    );
    assert_eq!(server.broadcast("/app/user/new/", json!({"a": 1})).await, 1);
    assert_eq!(
        recv_where(&mut ws, |t| !t.starts_with("/clienttest/broadcast:")).await,
        r#"/app/user/new:0={"a":1}"#
    );
    assert_eq!(server.broadcast("/nobody", json!(null)).await, 0);
    assert_eq!(
        call(&mut ws, r#"/qio/on:5="/qio/ping""#).await,
        r#"/qio/callback/5:0={"code":404,"data":null,"err_msg":"not subscribable"}"#
    );
    assert_eq!(
        call(&mut ws, "/qio/on:6=42").await,
        r#"/qio/callback/6:0={"code":400,"data":null,"err_msg":"invalid json ev_path"}"#
    );
    // Off of a path never subscribed is 200 too.
    assert_eq!(call(&mut ws, r#"/qio/off:7="/never""#).await, ok(7, "null"));
    // Closing the connection removes its subscriptions.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    // The real server answers a client's close with an empty close frame.
    assert_eq!(code_and_reason(expect_closed(&mut ws).await), None);
    assert!(closed_with(&server, conn, CloseReason::ClientClose { code: Some(1000) }).await);
    assert!(server.subscriptions().is_empty());
}

#[tokio::test]
async fn in_progress_sequence() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, _) = connect(&server).await;
    send(&mut ws, r#"/qio/on:1="/clienttest/in-progress""#).await;
    expect_quiet(&mut ws).await;
    // The first on stays pending; off answers 200 but cancels nothing.
    assert_eq!(
        call(&mut ws, r#"/qio/off:2="/clienttest/in-progress""#).await,
        ok(2, "null")
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:3="/clienttest/in-progress""#).await,
        r#"/qio/callback/3:0={"code":202,"data":null,"err_msg":"subscription pending"}"#
    );
    assert!(server.subscriptions().is_empty());
    // The approving event answers the FIRST on, then its own callback.
    assert_eq!(
        call(&mut ws, "/clienttest/in-progress:4=null").await,
        ok(1, "null")
    );
    assert_eq!(recv(&mut ws).await, ok(4, "null"));
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/clienttest/in-progress".to_string(), 1)])
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:5="/clienttest/in-progress""#).await,
        ok(5, "null")
    );
    // Without a pending on, the approving event answers 500.
    assert_eq!(
        call(&mut ws, "/clienttest/in-progress:6=null").await,
        r#"/qio/callback/6:0={"code":500,"data":null,"err_msg":"no subscription in progress"}"#
    );
}

#[tokio::test]
async fn heartbeats_when_idle() {
    let server = TestServer::start(ServerConfig {
        heartbeat_interval: Duration::from_millis(30),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&server).await;
    for _ in 0..2 {
        assert_eq!(recv(&mut ws).await, "/qio/heartbeat:0=null");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_answered_keeps_client_silence_drops_it() {
    let server = TestServer::start(ServerConfig {
        challenge_after: Duration::from_millis(30),
        challenge_timeout: Duration::from_millis(150),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut silent, silent_id) = connect(&server).await;
    let (mut polite, polite_id) = connect(&server).await;

    assert_eq!(recv(&mut silent).await, "/qio/heartbeat:1=null");
    for cb in 1..=2 {
        assert_eq!(recv(&mut polite).await, format!("/qio/heartbeat:{cb}=null"));
        send(&mut polite, &format!("/qio/callback/{cb}:0=null")).await;
    }
    assert!(closed_with(&server, silent_id, CloseReason::ChallengeTimeout).await);
    assert_eq!(
        expect_closed(&mut silent).await,
        None,
        "dropped, no close frame"
    );
    let answered = server
        .log()
        .iter()
        .filter(|e| {
            matches!(e, LogEntry::CallbackAnswered { conn, kind: CallbackKind::Challenge, .. }
                if *conn == polite_id)
        })
        .count();
    assert_eq!(answered, 2);
    assert!(!server.closes().iter().any(|(c, _)| *c == polite_id));
}

#[tokio::test]
async fn heartbeat_challenge_event() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(
        call(&mut ws, "/clienttest/heartbeat-challenge:1=null").await,
        "/qio/heartbeat:1=null"
    );
    // The caller's callback is answered only once the challenge is.
    expect_quiet(&mut ws).await;
    send(&mut ws, "/qio/callback/1:0=null").await;
    assert_eq!(recv(&mut ws).await, ok(1, "null"));
    let want = LogEntry::CallbackAnswered {
        conn,
        cb: 1,
        kind: CallbackKind::Challenge,
        data: json!(null),
    };
    assert!(server.wait_until(T, |s| s.log().contains(&want)).await);
}

#[tokio::test]
async fn clienttest_events() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;

    // Echo chain: every answer requests a callback back.
    assert_eq!(
        call(&mut ws, r#"/clienttest/echo:1={"x":1}"#).await,
        r#"/qio/callback/1:1={"code":200,"data":{"x":1}}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/callback/1:2="again""#).await,
        r#"/qio/callback/2:2={"code":200,"data":"again"}"#
    );
    send(&mut ws, "/qio/callback/2:0=null").await;

    assert_eq!(
        call(&mut ws, "/clienttest/error/418:3=null").await,
        r#"/qio/callback/3:0={"code":418,"data":"you requested an error?","err_msg":"418s are fun!"}"#
    );
    send(&mut ws, "/clienttest/drop-callback:4=null").await;
    assert_eq!(call(&mut ws, "/qio/ping:5=null").await, ok(5, "null"));
    assert_eq!(
        call(&mut ws, "/clienttest/send-unsubscribed:6=null").await,
        "/you/didnt/subscribe/to/this:0=null"
    );
    assert_eq!(
        call(&mut ws, "/clienttest/error/200:61=null").await,
        r#"/qio/callback/61:0={"code":200,"data":"you requested an error?"}"#,
        "no err_msg on a 200"
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:7=["/clienttest/on-data",1]"#).await,
        r#"/qio/callback/7:0={"code":401,"data":null,"err_msg":"subscription data must be 123987"}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:71="/clienttest/on-data""#).await,
        r#"/qio/callback/71:0={"code":401,"data":null,"err_msg":"subscription data must be 123987"}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:8=["/clienttest/on-data",123987]"#).await,
        ok(8, "null")
    );
    assert_eq!(recv(&mut ws).await, "/clienttest/on-data:0=true");
    // Handlers that take no subscriptions refuse with 401; unknown paths are 404.
    assert_eq!(
        call(&mut ws, r#"/qio/on:81="/clienttest/echo""#).await,
        r#"/qio/callback/81:0={"code":401,"data":null,"err_msg":"subscriptions not allowed"}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:82="/clienttest/nothing-here""#).await,
        r#"/qio/callback/82:0={"code":404,"data":null,"err_msg":"not subscribable"}"#
    );
    assert_eq!(call(&mut ws, "/app/thing:9=[1,2]").await, ok(9, "[1,2]"));
    assert_eq!(
        call(&mut ws, "/qio/callback/999:10=null").await,
        r#"/qio/callback/10:0={"code":404,"data":null,"err_msg":"callback doesn't exist"}"#
    );

    // Control API: drop callbacks, refuse subscriptions, raw frames, requests.
    server.set_drop_callbacks(true);
    send(&mut ws, "/app/x:11=1").await;
    assert_eq!(call(&mut ws, "/qio/ping:12=null").await, ok(12, "null"));
    server.set_drop_callbacks(false);
    server.set_refuse_subscriptions("/app/r", Some(420));
    assert_eq!(
        call(&mut ws, r#"/qio/on:13="/app/r""#).await,
        r#"/qio/callback/13:0={"code":420,"data":null,"err_msg":"subscription refused"}"#
    );
    server.set_refuse_subscriptions("/app/r", None);
    assert_eq!(
        call(&mut ws, r#"/qio/on:14="/app/r""#).await,
        ok(14, "null")
    );
    server.send_raw_to_all("hello there").await;
    assert_eq!(recv(&mut ws).await, "hello there");
    server.request_from_all("/app/question", json!("?")).await;
    assert_eq!(recv(&mut ws).await, r#"/app/question:3="?""#);
    send(&mut ws, r#"/qio/callback/3:0="!""#).await;
    let want = LogEntry::CallbackAnswered {
        conn,
        cb: 3,
        kind: CallbackKind::Request,
        data: json!("!"),
    };
    assert!(server.wait_until(T, |s| s.log().contains(&want)).await);
    let echoes = server
        .log()
        .iter()
        .filter(|e| {
            matches!(
                e,
                LogEntry::CallbackAnswered {
                    kind: CallbackKind::Echo,
                    ..
                }
            )
        })
        .count();
    assert_eq!(echoes, 2);

    // No answer to the caller: only the exact invalid frame, empty data after the '='.
    assert_eq!(
        call(&mut ws, "/clienttest/send-invalid:15=null").await,
        "unicorns, ponies, princesses, and magic!:good times:0="
    );
    expect_quiet(&mut ws).await;
    assert!(server.bytes_sent() > 500);
    assert!(server.closes().is_empty());
}

#[tokio::test]
async fn close_and_move() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    send(&mut ws, "/clienttest/close:1=null").await;
    // An empty close frame (no status, 1005 for the client) and no answer to the callback.
    assert_eq!(code_and_reason(expect_closed(&mut ws).await), None);
    assert!(closed_with(&server, conn, CloseReason::ServerClose).await);

    let (mut ws, conn) = connect(&server).await;
    let to = r#""ws://127.0.0.1:1/""#;
    assert_eq!(
        call(&mut ws, &format!("/clienttest/move:0={to}")).await,
        format!("/qio/move:0={to}")
    );
    assert_eq!(code_and_reason(expect_closed(&mut ws).await), None);
    assert!(closed_with(&server, conn, CloseReason::Moved).await);
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
}

#[tokio::test]
async fn bad_frames_close_with_the_real_servers_codes() {
    let server = TestServer::start(cfg()).await.unwrap();
    let cases: Vec<(Message, (u16, &str), CloseReason)> = vec![
        (
            Message::text("no colon here"),
            (1002, "invalid event format"),
            CloseReason::Malformed {
                error: "missing ':' after the path".into(),
                text: "no colon here".into(),
            },
        ),
        (
            Message::text("/a:x=null"),
            (1002, "invalid event format"),
            CloseReason::Malformed {
                error: "bad callback id \"x\"".into(),
                text: "/a:x=null".into(),
            },
        ),
        (
            Message::text("/a:1"),
            (1002, "invalid event format"),
            CloseReason::Malformed {
                error: "missing '=' before the data".into(),
                text: "/a:1".into(),
            },
        ),
        (
            Message::binary(vec![1u8, 2, 3]),
            (1003, ""),
            CloseReason::BinaryFrame,
        ),
        (
            Message::Ping(vec![1u8].into()),
            (1003, ""),
            CloseReason::PingFrame,
        ),
        (
            Message::Pong(vec![1u8].into()),
            (1003, ""),
            CloseReason::PongFrame,
        ),
    ];
    for (msg, (code, why), reason) in cases {
        let (mut ws, conn) = connect(&server).await;
        ws.send(msg.clone()).await.unwrap();
        assert_eq!(
            code_and_reason(expect_closed(&mut ws).await),
            Some((code, why.to_owned())),
            "{msg:?}"
        );
        assert!(closed_with(&server, conn, reason).await, "{msg:?}");
    }
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
}

/// A raw TCP client past the upgrade and the greeting, for frames no WebSocket library sends.
struct RawClient {
    tcp: TcpStream,
    buf: bytes::BytesMut,
}

impl RawClient {
    async fn connect(server: &TestServer) -> RawClient {
        use tokio::io::AsyncWriteExt;
        let tcp = TcpStream::connect(server.addr()).await.unwrap();
        let mut c = RawClient {
            tcp,
            buf: bytes::BytesMut::new(),
        };
        c.tcp.write_all(UPGRADE.as_bytes()).await.unwrap();
        while crate::handshake::head_end(&c.buf).is_none() {
            c.read_more().await;
        }
        let end = crate::handshake::head_end(&c.buf).unwrap();
        assert!(c.buf.starts_with(b"HTTP/1.1 101 "));
        let _ = c.buf.split_to(end);
        c.write(0x81, b"/qio/ohai", true).await;
        assert_eq!(c.frame().await, (0x1, b"/qio/ohai".to_vec()));
        c
    }

    async fn read_more(&mut self) {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(T, self.tcp.read_buf(&mut self.buf))
            .await
            .expect("read timed out")
            .unwrap();
        assert!(n > 0, "connection closed");
    }

    /// Writes one frame with first byte `b0`, masked or not.
    async fn write(&mut self, b0: u8, payload: &[u8], masked: bool) {
        use tokio::io::AsyncWriteExt;
        self.tcp
            .write_all(&raw_frame(b0, payload, masked))
            .await
            .unwrap();
    }

    /// The next server frame: opcode and payload.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(f) = crate::ws::decode(&mut self.buf, usize::MAX).unwrap() {
                assert!(!f.masked, "servers never mask");
                return (f.opcode, f.payload.to_vec());
            }
            self.read_more().await;
        }
    }

    /// The close frame's code and reason.
    async fn close(&mut self) -> (u16, String) {
        loop {
            let (op, payload) = self.frame().await;
            if op == 0x8 {
                let code = crate::ws::close_code(&payload).expect("a coded close");
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    }
}

/// A client frame: FIN/opcode byte `b0`, the payload masked (with a fixed key) or not.
fn raw_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    crate::ws::encode(&mut out, 0, payload);
    let mut v = out.to_vec();
    v[0] = b0;
    if masked {
        let key = [0x12u8, 0x34, 0x56, 0x78];
        let at = v.len() - payload.len();
        v[1] |= 0x80;
        v.truncate(at);
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    v
}

#[tokio::test]
async fn frames_no_library_sends_close_with_the_real_servers_codes() {
    let server = TestServer::start(cfg()).await.unwrap();
    /// First byte, payload, masked, the close expected, the logged reason.
    type Case = (u8, &'static [u8], bool, (u16, &'static str), CloseReason);
    let cases: Vec<Case> = vec![
        (
            0x81,
            b"/qio/ping:1=null",
            false,
            (1002, "client must mask data"),
            CloseReason::UnmaskedFrame,
        ),
        (
            0x81,
            b"/a:0=\"\xff\"",
            true,
            (1007, ""),
            CloseReason::InvalidUtf8,
        ),
        (0x83, b"x", true, (1003, ""), CloseReason::ReservedOpcode(3)),
    ];
    for (b0, payload, masked, want, reason) in cases {
        let mut c = RawClient::connect(&server).await;
        let conn = *opened_ids(&server).last().unwrap();
        c.write(b0, payload, masked).await;
        assert_eq!(c.close().await, (want.0, want.1.to_owned()), "{payload:?}");
        assert!(closed_with(&server, conn, reason).await);
    }
}

#[tokio::test]
async fn a_fragmented_message_is_routed_whole_then_the_continuation_closes() {
    let server = TestServer::start(cfg()).await.unwrap();
    let mut c = RawClient::connect(&server).await;
    let conn = *opened_ids(&server).last().unwrap();
    // FIN clear: the server ignores it and answers the first fragment as a whole event.
    c.write(0x01, b"/qio/ping:1=null", true).await;
    assert_eq!(
        c.frame().await,
        (0x1, ok(1, "null").into_bytes()),
        "the first fragment is routed as an event"
    );
    c.write(0x80, b"", true).await;
    assert_eq!(c.close().await, (1003, String::new()));
    assert!(closed_with(&server, conn, CloseReason::ContinuationFrame).await);
}

#[tokio::test]
async fn a_half_sent_frame_is_closed_with_1008() {
    let server = TestServer::start(ServerConfig {
        client_timeout: Duration::from_millis(50),
        ..cfg()
    })
    .await
    .unwrap();
    let mut c = RawClient::connect(&server).await;
    let conn = *opened_ids(&server).last().unwrap();
    let frame = raw_frame(0x81, b"/qio/ping:1=null", true);
    {
        use tokio::io::AsyncWriteExt;
        c.tcp.write_all(&frame[..5]).await.unwrap();
    }
    assert_eq!(c.close().await, (1008, "client timeout".into()));
    assert!(closed_with(&server, conn, CloseReason::ClientTimeout).await);
}

#[tokio::test]
async fn server_callback_ids_use_four_slots_and_evict_the_oldest() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        server.request_from_all("/app/q", json!(i)).await;
        let t = recv(&mut ws).await;
        let id: u64 = t
            .strip_prefix("/app/q:")
            .and_then(|r| r.split_once('='))
            .map(|(id, _)| id.parse().unwrap())
            .unwrap();
        ids.push(id);
    }
    // (slot << 16) | counter; the fifth takes the oldest one's slot 0.
    assert_eq!(ids, [1, 65538, 131075, 196612, 5]);
    assert!(server
        .log()
        .contains(&LogEntry::CallbackEvicted { conn, cb: 1 }));
    // An evicted id and an already used one get the real server's 404.
    let gone = |cb: u64| {
        format!(
            r#"/qio/callback/{cb}:0={{"code":404,"data":null,"err_msg":"callback doesn't exist"}}"#
        )
    };
    assert_eq!(call(&mut ws, "/qio/callback/1:7=null").await, gone(7));
    assert_eq!(
        call(&mut ws, "/qio/callback/65538:8=\"a\"").await,
        ok(8, "\"a\"")
    );
    assert_eq!(call(&mut ws, "/qio/callback/65538:9=\"a\"").await, gone(9));
    // The freed slot 1 is taken next.
    server.request_from_all("/app/q", json!(5)).await;
    assert_eq!(recv(&mut ws).await, r#"/app/q:65542=5"#);
}

#[tokio::test]
async fn a_late_answer_to_a_server_callback_gets_404() {
    let server = TestServer::start(ServerConfig {
        callback_timeout: Duration::from_millis(30),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, conn) = connect(&server).await;
    server.request_from_all("/app/q", json!(1)).await;
    assert_eq!(recv(&mut ws).await, "/app/q:1=1");
    let expired = LogEntry::CallbackExpired { conn, cb: 1 };
    assert!(server.wait_until(T, |s| s.log().contains(&expired)).await);
    assert_eq!(
        call(&mut ws, "/qio/callback/1:2=null").await,
        r#"/qio/callback/2:0={"code":404,"data":null,"err_msg":"callback doesn't exist"}"#
    );
}

#[tokio::test]
async fn shutdown_closes_open_connections_with_1001() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    let (ended, ()) = tokio::join!(expect_closed(&mut ws), server.shutdown());
    assert_eq!(code_and_reason(ended), Some((1001, String::new())));
    assert!(server.closes().contains(&(conn, CloseReason::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_then_restart_on_the_same_port() {
    let server = TestServer::start(cfg()).await.unwrap();
    let addr = server.addr();
    let (mut ws, conn) = connect(&server).await;
    send(&mut ws, r#"/qio/on:1="/a""#).await;
    assert!(
        server
            .wait_until(T, |s| !s.subscriptions().is_empty())
            .await
    );

    server.kill().await;
    assert_eq!(expect_closed(&mut ws).await, None, "no close frame on kill");
    assert!(server.closes().contains(&(conn, CloseReason::Killed)));
    assert_eq!(server.connection_count(), 0);
    assert!(server.subscriptions().is_empty());
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");

    server.restart().await.unwrap();
    assert_eq!(server.addr(), addr);
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(call(&mut ws, "/qio/ping:1=null").await, ok(1, "null"));

    // Restart while running = crash and come back.
    server.restart().await.unwrap();
    assert_eq!(expect_closed(&mut ws).await, None);
    assert!(server.closes().contains(&(conn, CloseReason::Killed)));
    let (mut ws, _) = connect(&server).await;
    assert_eq!(call(&mut ws, "/qio/ping:1=null").await, ok(1, "null"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_freezes_everything_until_resumed() {
    let server = TestServer::start(ServerConfig {
        heartbeat_interval: Duration::from_millis(20),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&server).await;
    server.set_stalled(true);
    // Let a heartbeat that was already being written arrive, then expect silence.
    send(&mut ws, "/qio/ping:1=null").await;
    while tokio::time::timeout(Duration::from_millis(20), ws.next())
        .await
        .is_ok()
    {}
    expect_quiet(&mut ws).await;

    // New TCP connections are accepted, but the upgrade is not answered.
    let url = server.url();
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("quickio"),
    );
    let pending = tokio::spawn(async move { tokio_tungstenite::connect_async(req).await });
    assert!(
        server
            .wait_until(T, |s| s
                .log()
                .iter()
                .any(|e| matches!(e, LogEntry::Accepted { conn: 2, .. })))
            .await
    );
    expect_quiet(&mut ws).await;
    assert!(!pending.is_finished(), "upgrade answered while stalled");

    server.set_stalled(false);
    assert_eq!(call(&mut ws, "/qio/ping:2=null").await, ok(1, "null"));
    assert_eq!(
        recv_where(&mut ws, |t| !t.starts_with("/qio/heartbeat:0=")).await,
        ok(2, "null")
    );
    let (mut ws2, _) = tokio::time::timeout(T, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    send(&mut ws2, "/qio/ohai").await;
    assert_eq!(recv(&mut ws2).await, "/qio/ohai");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped() {
    let server = TestServer::start(ServerConfig {
        max_queued_frames: 4,
        slow_client_timeout: Duration::from_millis(100),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, conn) = connect(&server).await;
    assert_eq!(call(&mut ws, r#"/qio/on:1="/big""#).await, ok(1, "null"));
    // The client stops reading; TCP buffers fill, then the queue, then it is dropped.
    let big = json!("x".repeat(256 * 1024));
    let mut sent = 0;
    while !server.closes().contains(&(conn, CloseReason::SlowConsumer)) {
        assert!(sent < 2000, "client never considered slow");
        server.broadcast("/big", big.clone()).await;
        sent += 1;
    }
    assert_eq!(server.subscriptions().get("/big"), None);
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let server = TestServer::start(cfg()).await.unwrap();
    let addr = server.addr();
    let (mut ws, _) = connect(&server).await;
    let clone = server.clone();
    drop(server);
    assert_eq!(call(&mut ws, "/qio/ping:1=null").await, ok(1, "null"));
    drop(clone);
    assert_eq!(expect_closed(&mut ws).await, None);
    let refused = tokio::time::timeout(T, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "listener still open after drop");
}

/// The handle and its futures must be Send + Sync so tests can move them into spawned tasks.
#[test]
fn handle_and_futures_are_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = TestServer::start(cfg()).await.unwrap();
        send_sync(&server);
        send(server.kill());
        send(server.restart());
        send(server.shutdown());
        send(server.broadcast("/a", json!(1)));
        send(server.send_raw_to_all("x"));
        send(server.request_from_all("/a", json!(1)));
        send(server.wait_until(T, |s| s.connection_count() == 0));
    });
}

#[tokio::test]
async fn without_open_subscriptions_unknown_paths_are_404_as_on_the_real_server() {
    let server = TestServer::start(ServerConfig {
        open_subscriptions: false,
        ..cfg()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&server).await;
    assert_eq!(
        call(&mut ws, r#"/qio/on:1="/app/x""#).await,
        r#"/qio/callback/1:0={"code":404,"data":null,"err_msg":"not subscribable"}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:2="/clienttest/broadcast""#).await,
        ok(2, "null")
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:3="/clienttest/move""#).await,
        r#"/qio/callback/3:0={"code":401,"data":null,"err_msg":"subscriptions not allowed"}"#
    );
}
