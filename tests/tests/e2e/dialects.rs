//! Both Quick.IO dialects end to end: the session's behaviours against a 0.1 and a 0.2
//! test server, auto-detection, the exact upgrade bytes, and the 0.1 frame limit.

use crate::common::*;
use qio_testserver::{Dialect as ServerDialect, LogEntry, TestServer};
use qiod::codec::Dialect;
use qiod::driver::Notice;
use qiod::session::{code, DialectChoice, SessionError, StateChange};
use serde_json::json;

const BOTH: [ServerDialect; 2] = [ServerDialect::V02, ServerDialect::V01];

async fn server_of(d: ServerDialect) -> TestServer {
    server_with(|c| c.dialect = d).await
}

#[tokio::test]
async fn subscribe_broadcast_and_unsubscribe_in_both_dialects() {
    for d in BOTH {
        let server = server_of(d).await;
        let mut up = Upstream::start(&server.url()).await;
        assert_eq!(
            up.subscribe("/clienttest/broadcast", None).await.code,
            200,
            "{d}"
        );
        up.wait_event("/clienttest/broadcast").await;
        up.unsubscribe("/clienttest/broadcast").await;
        until_unsubscribed(&server).await;
        let st = up.handle.status().await.unwrap();
        assert_eq!(st.dialect, d.to_string(), "detected dialect");
        up.stop().await;
    }
}

#[tokio::test]
async fn requests_echo_and_errors_in_both_dialects() {
    for d in BOTH {
        let server = server_of(d).await;
        let up = Upstream::start(&server.url()).await;
        let out = up
            .handle
            .request("/clienttest/echo", raw("{\"a\":1}"))
            .await;
        assert_eq!((out.code, out.data.get()), (200, "{\"a\":1}"), "{d}");
        let out = up
            .handle
            .request("/clienttest/echo", raw("\"plain text\""))
            .await;
        assert_eq!((out.code, out.data.get()), (200, "\"plain text\""), "{d}");
        let chained = up
            .handle
            .answer_deferred(out.cb.expect("chain"), raw("\"c\""))
            .await
            .await;
        assert_eq!(chained.code, 200, "{d}");
        let err = up
            .handle
            .request("/clienttest/error/404", raw("null"))
            .await;
        match d {
            ServerDialect::V02 => assert_eq!(err.code, 404),
            ServerDialect::V01 => {
                assert_eq!((err.code, err.err_msg.as_deref()), (500, Some("qio_error")))
            }
        }
        up.stop().await;
    }
}

#[tokio::test]
async fn close_drop_callback_and_invalid_frames_reconnect_in_both_dialects() {
    for d in BOTH {
        let server = server_of(d).await;
        let mut up = Upstream::start(&server.url()).await;
        let waiting = up
            .handle
            .request_deferred("/clienttest/drop-callback", raw("1"))
            .await;
        until_received(&server, "/clienttest/drop-callback").await;
        // As a request: a 0.1 server drops the connection without a close frame, so a
        // fire-and-forget close would be sent again after the reconnect (at least once).
        let closing = up
            .handle
            .request_deferred("/clienttest/close", raw("null"))
            .await;
        assert_eq!(waiting.await.code, code::DISCONNECTED, "{d}");
        assert_eq!(closing.await.code, code::DISCONNECTED, "{d}");
        up.wait_closed().await;
        up.wait_open().await;
        up.trigger("/clienttest/send-invalid", "null").await;
        let reason = up.wait_closed().await;
        assert!(reason.contains("invalid frame"), "{d}: {reason}");
        up.wait_open().await;
        up.stop().await;
    }
}

#[tokio::test]
async fn unsubscribed_events_are_dropped_in_both_dialects() {
    for d in BOTH {
        let server = server_of(d).await;
        let mut up = Upstream::start(&server.url()).await;
        up.handle
            .emit("/clienttest/send-unsubscribed", raw("null"))
            .await
            .unwrap();
        assert_eq!(
            up.handle.request("/clienttest/echo", raw("1")).await.code,
            200
        );
        up.assert_no_event_nor_close(&d.to_string());
        up.stop().await;
    }
}

#[tokio::test]
async fn moves_restarts_and_the_offline_queue_in_both_dialects() {
    for d in BOTH {
        let a = server_of(d).await;
        let b = server_of(d).await;
        let mut up = Upstream::start(&a.url()).await;
        assert_eq!(up.subscribe("/news", None).await.code, 200);
        let target = serde_json::to_string(&b.url()).unwrap();
        up.trigger("/clienttest/move", &target).await;
        let url = up.wait_open().await;
        assert_eq!(url.as_str(), b.url(), "{d}");
        until("the subscription followed the move", || async {
            b.subscriptions().get("/news") == Some(&1)
        })
        .await;
        b.kill().await;
        up.wait_closed().await;
        up.handle.emit("/queued", raw("\"one\"")).await.unwrap();
        up.handle.emit("/queued", raw("{\"two\":2}")).await.unwrap();
        b.restart().await.unwrap();
        up.wait_open().await;
        until("the queue arrived", || async {
            b.received().iter().filter(|r| r.path == "/queued").count() == 2
        })
        .await;
        let data: Vec<_> = b
            .received()
            .into_iter()
            .filter(|r| r.path == "/queued")
            .map(|r| r.data)
            .collect();
        assert_eq!(data, [json!("one"), json!({"two":2})], "{d}");
        assert_eq!(b.broadcast("/news", json!("back")).await, 1);
        assert_eq!(up.wait_event("/news").await.0, json!("back"));
        up.stop().await;
    }
}

#[tokio::test]
async fn a_stalled_server_is_detected_in_both_dialects() {
    for d in BOTH {
        let server = server_of(d).await;
        let mut cfg = fast_config(&[server.url()]);
        cfg.session.heartbeat_interval = std::time::Duration::from_millis(100);
        cfg.session.ping_timeout = std::time::Duration::from_millis(100);
        let mut up = Upstream::start_with(cfg).await;
        server.set_stalled(true);
        let reason = up.wait_closed().await;
        assert!(reason.contains("/qio/ping"), "{d}: {reason}");
        server.set_stalled(false);
        up.wait_open().await;
        up.stop().await;
    }
}

#[tokio::test]
async fn auto_detection_picks_each_servers_dialect() {
    let old = server_of(ServerDialect::V01).await;
    let new = server_of(ServerDialect::V02).await;
    for (server, want) in [(&old, Dialect::V01), (&new, Dialect::V02)] {
        let up = Upstream::start(&server.url()).await;
        assert_eq!(up.handle.status().await.unwrap().dialect, want.name());
        up.stop().await;
    }
    // A fixed 0.2 setting against a 0.1 server never opens, and says why.
    let mut cfg = fast_config(&[old.url()]);
    cfg.session.dialect = DialectChoice::Fixed(Dialect::V02);
    let mut up = Upstream::spawn(cfg);
    let reason = up
        .wait_for("a failed attempt", |n| match n {
            Notice::State(StateChange::ConnectFailed { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.to_lowercase().contains("subprotocol"), "{reason}");
    up.stop().await;
}

#[tokio::test]
async fn the_upgrade_request_uses_canonical_header_names() {
    let server = server_of(ServerDialect::V01).await;
    let up = Upstream::start(&server.url()).await;
    // Auto-detection asked with the 0.2 request first; the one that opened is the last.
    let request = server
        .log()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            LogEntry::Upgraded { request, .. } => Some(request),
            _ => None,
        })
        .expect("an upgrade was logged");
    let names: Vec<&str> = request
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n))
        .collect();
    assert!(request.starts_with("GET /qio HTTP/1.1\r\n"), "{request}");
    for name in [
        "Host",
        "Connection",
        "Upgrade",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Key",
    ] {
        assert!(names.contains(&name), "{name} missing in {request:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.eq_ignore_ascii_case("Sec-WebSocket-Protocol")),
        "no subprotocol is asked of a 0.1 server: {request:?}"
    );
    up.stop().await;
}

#[tokio::test]
async fn oversized_sends_are_refused_locally_on_a_01_server() {
    let server = server_of(ServerDialect::V01).await;
    let mut up = Upstream::start(&server.url()).await;
    let big = format!("\"{}\"", "x".repeat(2000));
    let err = up.handle.emit("/big", raw(&big)).await.unwrap_err();
    assert!(
        matches!(err, SessionError::TooLarge { max: 1024, .. }),
        "{err}"
    );
    let out = up.handle.request("/big", raw(&big)).await;
    assert_eq!(out.code, code::BAD_REQUEST);
    // The connection survived: nothing oversized reached the server.
    assert_eq!(
        up.handle.request("/clienttest/echo", raw("1")).await.code,
        200
    );
    while let Ok(n) = up.notices.try_recv() {
        assert!(
            !matches!(n, Notice::State(StateChange::Closed { .. })),
            "{n:?}"
        );
    }
    up.stop().await;
}

#[tokio::test]
async fn the_daemon_reports_the_dialect_and_maps_01_data_for_local_clients() {
    let server = server_of(ServerDialect::V01).await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    let st = c.call(json!({"op":"status"}), 1).await;
    assert_eq!(st["data"]["dialect"], "0.1");
    assert_eq!(
        c.call(json!({"op":"on","path":"/news"}), 2).await["code"],
        200
    );
    server.broadcast("/news", json!("plain words")).await;
    assert_eq!(c.event("/news").await["data"], "plain words");
    server.broadcast("/news", json!({"k":[1,2]})).await;
    assert_eq!(c.event("/news").await["data"], json!({"k":[1,2]}));
    let r = c
        .call(
            json!({"op":"send","path":"/clienttest/echo","data":{"x":1}}),
            3,
        )
        .await;
    assert_eq!(
        (r["code"].clone(), r["data"].clone()),
        (json!(200), json!({"x":1}))
    );
    let r = c
        .call(
            json!({"op":"on","path":"/clienttest/on-data","data":123987}),
            4,
        )
        .await;
    assert_eq!(r["code"], 400, "subscription data needs 0.2: {r}");
    daemon.stop().await;
}
