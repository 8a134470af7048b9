//! Fire-and-forget delivery and reconnect pacing end to end (issues 11 and 13): what is sent
//! once, what is sent again, what the sender is told when an accepted event is dropped, and
//! how a server that greets and then drops the connection is retried.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use qio_testserver::{CloseReason, Dialect, ServerConfig, TestServer};
use qiod::driver::Notice;
use qiod::session::{DialectChoice, FireAndForget, StateChange};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// How many times the server received `path`.
fn received(server: &TestServer, path: &str) -> Vec<serde_json::Value> {
    server
        .received()
        .into_iter()
        .filter(|r| r.path == path)
        .map(|r| r.data)
        .collect()
}

/// Waits until everything the session wrote before now has reached the server: an echo
/// request goes after it on the same connection.
async fn sync(up: &Upstream) {
    let out = up.handle.request("/clienttest/echo", raw("\"sync\"")).await;
    assert_eq!(out.code, 200, "{out:?}");
}

#[tokio::test]
async fn regression_issue13_a_fire_and_forget_close_is_acted_on_once() {
    let server = server().await;
    let mut up = Upstream::start(&server.url()).await;
    // Sent without a callback: the server closes the connection when it reads it. Sent
    // again after the reconnect, it would close the new connection too.
    up.handle
        .emit("/clienttest/close", raw("null"))
        .await
        .unwrap();
    up.wait_closed().await;
    up.wait_open().await;
    sync(&up).await;
    assert_eq!(received(&server, "/clienttest/close").len(), 1);
    let closes: Vec<_> = server
        .closes()
        .into_iter()
        .filter(|(_, r)| !matches!(r, CloseReason::Killed))
        .collect();
    assert_eq!(closes.len(), 1, "{closes:?}");
    up.stop().await;
}

#[tokio::test]
async fn events_queued_while_offline_arrive_once_and_in_order() {
    let server = server().await;
    let mut up = Upstream::start(&server.url()).await;
    server.kill().await;
    up.wait_closed().await;
    for i in 1..=5 {
        up.handle
            .emit("/queued", raw(&i.to_string()))
            .await
            .unwrap();
    }
    server.restart().await.unwrap();
    up.wait_open().await;
    sync(&up).await;
    // A break after they were written does not send them again.
    server.kill().await;
    up.wait_closed().await;
    server.restart().await.unwrap();
    up.wait_open().await;
    sync(&up).await;
    assert_eq!(
        received(&server, "/queued"),
        [json!(1), json!(2), json!(3), json!(4), json!(5)]
    );
    up.stop().await;
}

/// Writes an event the server never reads (it is stalled), then crashes the server and
/// brings it back; returns how often the event arrived in the end.
async fn unread_event_across_a_crash(mode: FireAndForget) -> usize {
    let server = server().await;
    let mut cfg = fast_config(&[server.url()]);
    cfg.session.fire_and_forget = mode;
    let mut up = Upstream::start_with(cfg).await;
    server.set_stalled(true);
    up.handle.emit("/unread", raw("1")).await.unwrap();
    // The status answer comes after the emit was handled (one command queue, in order).
    up.handle.status().await.expect("status");
    server.kill().await;
    up.wait_closed().await;
    server.set_stalled(false);
    server.restart().await.unwrap();
    up.wait_open().await;
    sync(&up).await;
    let n = received(&server, "/unread").len();
    up.stop().await;
    n
}

#[tokio::test]
async fn at_least_once_sends_again_what_the_server_did_not_read_and_once_does_not() {
    assert_eq!(
        unread_event_across_a_crash(FireAndForget::AtLeastOnce).await,
        1
    );
    assert_eq!(unread_event_across_a_crash(FireAndForget::Once).await, 0);
}

#[tokio::test]
async fn regression_bug5_a_queued_event_too_big_for_a_01_server_is_told_to_its_sender() {
    let server = server_with(|c: &mut ServerConfig| c.dialect = Dialect::V01).await;
    let url = format!("{}qio", server.url());
    server.kill().await;
    let mut settings = daemon_settings(&url);
    settings.driver.session.dialect = DialectChoice::Auto;
    let daemon = Daemon::start_with(settings).await;
    let mut client = daemon.client().await;
    // Accepted while nobody knows the dialect: 0.2 has no frame limit.
    let big = "x".repeat(1100);
    client
        .send(json!({"op": "send", "path": "/big", "data": big}))
        .await;
    client
        .send(json!({"op": "send", "path": "/small", "data": 1}))
        .await;
    let status = client.call(json!({"op": "status"}), 1).await;
    assert_eq!(status["data"]["queued_events"], 2, "{status}");
    server.restart().await.unwrap();
    let error = loop {
        let v = client.next().await;
        if v["event"] == "/error" && v["data"]["op"] == "send" {
            break v;
        }
    };
    assert_eq!(error["data"]["path"], "/big", "{error}");
    assert_eq!(error["data"]["code"], 400, "{error}");
    let msg = error["data"]["err_msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("0.1") && msg.contains("max_frame_bytes"),
        "{msg}"
    );
    until("the small one arrived", || async {
        !received(&server, "/small").is_empty()
    })
    .await;
    assert!(received(&server, "/big").is_empty());
    let status = client.call(json!({"op": "status"}), 2).await;
    assert_eq!(status["data"]["events_dropped"], 1, "{status}");
    daemon.stop().await;
}

/// How a greeting server lets the connection go.
#[derive(Clone, Copy, Debug)]
enum Drop {
    /// A close frame right after the greeting.
    CloseFrame,
    /// A TCP reset right after the greeting.
    Reset,
    /// A frame larger than the daemon accepts after the greeting.
    HugeFrame,
}

/// Accepts the upgrade with the `quickio` subprotocol, as a 0.2 server does. The error type
/// is tungstenite's callback signature, not ours to shrink.
#[allow(clippy::result_large_err)]
fn with_quickio(_: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    resp.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("quickio"),
    );
    Ok(resp)
}

/// A 0.2 server that completes every handshake and then drops the connection; counts them.
async fn greet_and_drop(how: Drop) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/", listener.local_addr().expect("addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if matches!(how, Drop::Reset) {
                    let _ = tcp.set_zero_linger();
                }
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, with_quickio).await
                else {
                    return;
                };
                if !matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "/qio/ohai")
                {
                    return;
                }
                let _ = ws.send(Message::text("/qio/ohai")).await;
                match how {
                    Drop::CloseFrame => {
                        let _ = ws.close(None).await;
                    }
                    Drop::Reset => {}
                    Drop::HugeFrame => {
                        let huge = format!("/news:0=\"{}\"", "x".repeat(64 * 1024));
                        let _ = ws.send(Message::text(huge)).await;
                        while ws.next().await.is_some() {}
                    }
                }
            });
        }
    });
    (url, count)
}

#[tokio::test]
async fn regression_bug7_a_server_that_greets_and_drops_gets_the_growing_backoff() {
    for how in [Drop::CloseFrame, Drop::Reset, Drop::HugeFrame] {
        let (url, count) = greet_and_drop(how).await;
        let mut cfg = fast_config(&[url]);
        cfg.max_message_bytes = 16 * 1024;
        let mut up = Upstream::spawn(cfg);
        let mut delays = Vec::new();
        while delays.len() < 6 {
            let d = up
                .wait_for("reconnecting", |n| match n {
                    Notice::State(StateChange::Reconnecting { after }) => Some(*after),
                    _ => None,
                })
                .await;
            delays.push(d);
        }
        // Every handshake succeeded, yet the delay doubles (10 ms up to the 200 ms cap, a
        // quarter of jitter off at most): a greeting alone does not make a good connection.
        let bases = [10, 20, 40, 80, 160, 200];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *d <= base && *d >= base.mul_f64(0.75),
                "{how:?}: {delays:?}"
            );
        }
        assert!(count.load(Ordering::Relaxed) >= 6, "{how:?}");
        up.stop().await;
    }
}

#[tokio::test]
async fn regression_bug4_the_backoff_resets_again_after_a_move_loop() {
    let servers = [server().await, server().await];
    let mut cfg = fast_config(&[servers[0].url()]);
    cfg.session.stable_after = Duration::from_millis(50);
    let mut up = Upstream::start_with(cfg).await;
    // A move loop: each server sends the session to the other as soon as it arrives.
    for i in 0..6 {
        let to = servers[(i + 1) % 2].url();
        up.trigger("/clienttest/move", &format!("{to:?}")).await;
        up.wait_closed().await;
        up.wait_open().await;
    }
    // Then a connection that lasts, and an ordinary break: the next attempt waits the
    // initial delay again, as after any good connection.
    until("the connection is stable", || async {
        up.handle
            .status()
            .await
            .and_then(|s| s.open_for)
            .is_some_and(|d| d >= Duration::from_millis(50))
    })
    .await;
    let at = up
        .handle
        .status()
        .await
        .and_then(|s| s.url)
        .expect("a server");
    let i = servers
        .iter()
        .position(|s| s.url() == at.as_str())
        .expect("one of ours");
    servers[i].kill().await;
    let first = up
        .wait_for("reconnecting", |n| match n {
            Notice::State(StateChange::Reconnecting { after }) => Some(*after),
            _ => None,
        })
        .await;
    assert!(
        first <= Duration::from_millis(10),
        "after a move loop: {first:?}"
    );
    up.stop().await;
}
