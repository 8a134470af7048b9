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

/// Reads until the connection ends; returns the close frame if the server sent one.
async fn expect_closed(ws: &mut Ws) -> Option<CloseFrame> {
    let mut close = None;
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("connection not closed in time")
        {
            Some(Ok(Message::Close(f))) => close = f,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return close,
        }
    }
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

#[tokio::test]
async fn no_subprotocol_echo_unless_requested_and_greeting_required() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, resp) = connect_raw(&server, false).await;
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    send(&mut ws, "/qio/ping:1=null").await;
    let close = expect_closed(&mut ws).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Protocol);
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
    assert_eq!(
        call(&mut ws, r#"/qio/on:2="/clienttest/broadcast""#).await,
        r#"/qio/callback/2:0={"code":400,"data":null,"err_msg":"already subscribed"}"#
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
        r#"/qio/callback/6:0={"code":400,"data":null,"err_msg":"invalid subscription"}"#
    );
    // Closing the connection removes its subscriptions.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        expect_closed(&mut ws).await.map(|f| f.code),
        Some(CloseCode::Normal)
    );
    assert!(closed_with(&server, conn, CloseReason::ClientClose { code: Some(1000) }).await);
    assert!(server.subscriptions().is_empty());
}

#[tokio::test]
async fn in_progress_sequence() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, _) = connect(&server).await;
    send(&mut ws, r#"/qio/on:1="/clienttest/in-progress""#).await;
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
        call(&mut ws, r#"/clienttest/in-progress:4="go""#).await,
        ok(1, "null")
    );
    assert_eq!(recv(&mut ws).await, ok(4, "null"));
    assert_eq!(
        server.subscriptions(),
        BTreeMap::from([("/clienttest/in-progress".to_string(), 1)])
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:5="/clienttest/in-progress""#).await,
        r#"/qio/callback/5:0={"code":400,"data":null,"err_msg":"already subscribed"}"#
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
    assert_eq!(recv(&mut ws).await, ok(1, "null"));
    send(&mut ws, "/qio/callback/1:0=null").await;
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
        r#"/clienttest/unsubscribed-path:0="you should not see this""#
    );
    assert_eq!(recv(&mut ws).await, ok(6, "null"));
    assert_eq!(
        call(&mut ws, r#"/qio/on:7=["/clienttest/on-data",1]"#).await,
        r#"/qio/callback/7:0={"code":401,"data":null,"err_msg":"subscription data must be 123987"}"#
    );
    assert_eq!(
        call(&mut ws, r#"/qio/on:8=["/clienttest/on-data",123987]"#).await,
        ok(8, "null")
    );
    assert_eq!(call(&mut ws, "/app/thing:9=[1,2]").await, ok(9, "[1,2]"));
    assert_eq!(
        call(&mut ws, "/qio/callback/999:10=null").await,
        r#"/qio/callback/10:0={"code":404,"data":null,"err_msg":"unknown callback"}"#
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

    assert_eq!(
        call(&mut ws, "/clienttest/send-invalid:15=null").await,
        ok(15, "null")
    );
    assert_eq!(
        recv(&mut ws).await,
        "unicorns, ponies, princesses, and magic!:good times"
    );
    assert!(server.bytes_sent() > 500);
    assert!(server.closes().is_empty());
}

#[tokio::test]
async fn close_and_move() {
    let server = TestServer::start(cfg()).await.unwrap();
    let (mut ws, conn) = connect(&server).await;
    send(&mut ws, "/clienttest/close:1=null").await;
    let close = expect_closed(&mut ws).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Normal);
    assert!(closed_with(&server, conn, CloseReason::ServerClose).await);

    let (mut ws, conn) = connect(&server).await;
    let to = r#""ws://127.0.0.1:1/""#;
    assert_eq!(
        call(&mut ws, &format!("/clienttest/move:0={to}")).await,
        format!("/qio/move:0={to}")
    );
    assert_eq!(
        expect_closed(&mut ws).await.map(|f| f.code),
        Some(CloseCode::Normal)
    );
    assert!(closed_with(&server, conn, CloseReason::Moved).await);
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
}

#[tokio::test]
async fn bad_frames_close_the_connection() {
    let server = TestServer::start(cfg()).await.unwrap();
    let cases: Vec<(Message, CloseCode)> = vec![
        (Message::text("no colon here"), CloseCode::Protocol),
        (Message::text("/a:x=null"), CloseCode::Protocol),
        (Message::text("/a:1={"), CloseCode::Protocol),
        (Message::binary(vec![1u8, 2, 3]), CloseCode::Unsupported),
        (Message::Ping(vec![1u8].into()), CloseCode::Unsupported),
        (Message::Pong(vec![1u8].into()), CloseCode::Unsupported),
    ];
    for (msg, code) in cases {
        let (mut ws, conn) = connect(&server).await;
        ws.send(msg.clone()).await.unwrap();
        let close = expect_closed(&mut ws).await;
        assert_eq!(close.map(|f| f.code), Some(code), "{msg:?}");
        assert!(
            server
                .wait_until(T, |s| s.closes().iter().any(|(c, _)| *c == conn))
                .await
        );
    }
    let reasons: Vec<CloseReason> = server.closes().into_iter().map(|(_, r)| r).collect();
    assert!(matches!(&reasons[0], CloseReason::Malformed { text, .. } if text == "no colon here"));
    assert!(matches!(&reasons[1], CloseReason::Malformed { .. }));
    assert!(matches!(&reasons[2], CloseReason::Malformed { .. }));
    assert_eq!(
        reasons[3..],
        [
            CloseReason::BinaryFrame,
            CloseReason::PingFrame,
            CloseReason::PongFrame
        ]
    );
    assert!(server.wait_until(T, |s| s.connection_count() == 0).await);
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
    let pending = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await });
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
