//! qiod against what the real Quick.IO 0.2 server does that surprises implementers (WIRE.md,
//! "Observed on the real 0.2 server"), as the test server now reproduces it: server
//! callbacks that expire and ids that are not sequential, close frames without a status
//! code, 200 for a repeated `on`, and a greeting that throws away whatever came with it.

use crate::common::*;
use qio_testserver::{CloseReason, LogEntry};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The server callback ids the server logged as answered, with the data of each answer.
fn answered(server: &qio_testserver::TestServer) -> BTreeMap<u64, serde_json::Value> {
    server
        .log()
        .into_iter()
        .filter_map(|e| match e {
            LogEntry::CallbackAnswered { cb, data, .. } => Some((cb, data)),
            _ => None,
        })
        .collect()
}

/// Subscribes a fresh open client to `path` and waits until the server holds it.
async fn subscribed_client(
    daemon: &Daemon,
    server: &qio_testserver::TestServer,
    path: &str,
) -> LineClient {
    let mut c = daemon.open_client().await;
    c.subscribe(path, 1).await;
    until("the server holds the subscription", || async {
        server.subscriptions().get(path) == Some(&1)
    })
    .await;
    c
}

#[tokio::test]
async fn a_local_answer_that_reaches_the_server_after_its_expiry_gets_the_servers_404() {
    let server = server_with(|c| c.callback_timeout = Duration::from_millis(20)).await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = subscribed_client(&daemon, &server, "/ask").await;
    server.request_from_all("/ask", json!("still there?")).await;
    let ev = c.event("/ask").await;
    let cb = ev["cb"]
        .as_str()
        .expect("the server asked for an answer")
        .to_owned();
    until("the server let its callback expire", || async {
        server
            .log()
            .iter()
            .any(|e| matches!(e, LogEntry::CallbackExpired { .. }))
    })
    .await;
    let r = c
        .call(json!({"op": "callback", "cb": cb, "data": "late"}), 2)
        .await;
    assert_eq!(r["code"], 404, "{r}");
    assert_eq!(r["err_msg"], "callback doesn't exist", "{r}");
    // Nothing else suffered: same connection, requests still answered.
    let r = c
        .call(json!({"op": "send", "path": "/app/echo", "data": 1}), 3)
        .await;
    assert_eq!(
        (r["code"].clone(), r["data"].clone()),
        (json!(200), json!(1))
    );
    assert_eq!(server.closes(), []);
    daemon.stop().await;
}

#[tokio::test]
async fn server_callback_ids_that_are_not_sequential_reach_the_right_request() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = subscribed_client(&daemon, &server, "/ask").await;
    // Five outstanding requests: ids (slot << 16) | counter over four slots, the fifth
    // evicting the first.
    let mut handles = Vec::new();
    for i in 0..5 {
        server.request_from_all("/ask", json!(i)).await;
        let ev = c.event("/ask").await;
        assert_eq!(ev["data"], i);
        handles.push(ev["cb"].as_str().expect("a handle").to_owned());
    }
    // Answered in reverse order, each with its own number.
    for (i, cb) in handles.iter().enumerate().rev() {
        let id = 10 + i as u64;
        let r = c
            .call(json!({"op": "callback", "cb": cb, "data": i}), id)
            .await;
        let want = if i == 0 { 404 } else { 200 };
        assert_eq!(r["code"], want, "answer {i}: {r}");
    }
    until("the server saw every live answer", || async {
        answered(&server).len() == 4
    })
    .await;
    assert_eq!(
        answered(&server),
        BTreeMap::from([
            (5, json!(4)),
            (65538, json!(1)),
            (131075, json!(2)),
            (196612, json!(3)),
        ]),
        "each answer went to the id the server picked"
    );
    assert!(server
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::CallbackEvicted { cb: 1, .. })));
    daemon.stop().await;
}

#[tokio::test]
async fn a_close_frame_without_a_status_code_is_a_normal_reconnect() {
    let server = server().await;
    let mut up = Upstream::start(&server.url()).await;
    assert_eq!(up.subscribe("/news", None).await.code, 200);
    up.trigger("/clienttest/close", "null").await;
    assert_eq!(up.wait_closed().await, "server closed the connection");
    up.wait_open().await;
    until("the subscription is restored", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    assert_eq!(server.broadcast("/news", json!("after")).await, 1);
    assert_eq!(up.wait_event("/news").await.0, json!("after"));
    let closes: Vec<CloseReason> = server.closes().into_iter().map(|(_, r)| r).collect();
    assert_eq!(closes, [CloseReason::ServerClose]);
    up.stop().await;
}

/// The real server answers a repeated `on` with 200, so it would never reveal a client
/// that subscribes a path twice: qiod must count references itself and send one `on` per
/// path per connection, which only the wire shows.
#[tokio::test]
async fn a_repeated_on_is_answered_200_so_the_wire_must_show_one_on_per_path() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(daemon.open_client().await);
    }
    // All at once, then once more after a restart (subscriptions are restored).
    for c in &mut clients {
        c.send(json!({"op": "on", "path": "/news", "id": 1})).await;
    }
    for c in &mut clients {
        assert_eq!(c.reply(json!(1)).await["code"], 200);
    }
    server.restart().await.unwrap();
    until("the subscription is restored", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c
            .call(json!({"op": "on", "path": "/news"}), 2 + i as u64)
            .await;
        assert_eq!(r["code"], 200, "{r}");
    }
    assert_eq!(server.broadcast("/news", json!("one copy")).await, 1);
    for c in &mut clients {
        assert_eq!(c.event("/news").await["data"], "one copy");
    }
    let mut ons: BTreeMap<u64, usize> = BTreeMap::new();
    for r in server.received() {
        if r.path == "/qio/on" {
            assert_eq!(r.data, json!("/news"));
            *ons.entry(r.conn).or_default() += 1;
        }
    }
    assert_eq!(ons.len(), 2, "two connections: {ons:?}");
    assert!(
        ons.values().all(|&n| n == 1),
        "one on per connection: {ons:?}"
    );
    daemon.stop().await;
}

/// The real server throws away whatever arrives in the same read as `/qio/ohai`: qiod,
/// with a subscription and an event waiting when it connects, must send nothing before the
/// server's answer, or the `on` would never be answered.
#[tokio::test]
async fn nothing_is_sent_with_the_greeting_even_with_work_waiting() {
    let server = server().await;
    server.kill().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.client().await;
    c.send(json!({"op": "on", "path": "/news", "id": 1})).await;
    c.send(json!({"op": "send", "path": "/app/queued", "data": "offline"}))
        .await;
    // Not connected: the subscription is held at once and made when the server is up.
    assert_eq!(c.reply(json!(1)).await["code"], 202);
    server.restart().await.unwrap();
    until("the server answered the on", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    until_received(&server, "/app/queued").await;
    assert!(
        !server
            .log()
            .iter()
            .any(|e| matches!(e, LogEntry::DiscardedWithGreeting { .. })),
        "something was sent with /qio/ohai: {:?}",
        server.log()
    );
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths[0], "/qio/ohai", "{paths:?}");
    assert!(paths.contains(&"/qio/on".to_owned()), "{paths:?}");
    daemon.stop().await;
}
