//! The driver never waits: a server that stops reading, or a layer above that stops taking
//! notices, stops neither the callers nor the timers.

use crate::common::*;
use qiod::driver::Notice;
use qiod::session::{code, StateChange};
use serde_json::json;
use std::time::Duration;

/// A session against a server that reads nothing: writes can only pile up, so only the
/// bounds chosen here end the connection.
fn stalled_config(url: &str) -> qiod::driver::DriverConfig {
    let mut cfg = fast_config(&[url.to_owned()]);
    // Neither the heartbeat watch nor the write deadline may end the test's connection.
    cfg.session.heartbeat_interval = Duration::from_secs(600);
    cfg.session.ping_timeout = Duration::from_secs(600);
    cfg.session.request_timeout = Duration::from_millis(200);
    cfg.session.queue_max_bytes = 256 * 1024 * 1024;
    cfg.session.queue_max_events = 100_000;
    cfg.write_queue_bytes = 256 * 1024 * 1024;
    cfg
}

/// 48 MiB of fire-and-forget events to a stalled server is far beyond what loopback
/// buffers hold, so the writer is stuck; the driver must still take every event, answer
/// `status` and run its timers (a request times out with -2 on time, not once the write
/// deadline gives up on the server).
#[tokio::test]
async fn a_server_that_stops_reading_stops_neither_commands_nor_timers() {
    let server = server().await;
    let mut up = Upstream::start_with(stalled_config(&server.url())).await;
    server.set_stalled(true);
    let big = raw(&format!("\"{}\"", "x".repeat(64 * 1024)));
    let flood = tokio::time::timeout(DEADLINE, async {
        for _ in 0..768 {
            up.handle.emit("/flood", big.clone()).await.expect("taken");
        }
    });
    assert!(
        flood.await.is_ok(),
        "the driver stopped taking events while the server does not read"
    );
    let status = tokio::time::timeout(DEADLINE, up.handle.status())
        .await
        .expect("status answers while the writer is stuck")
        .expect("the driver runs");
    assert_eq!(status.state, "open", "{status:?}");
    let out = tokio::time::timeout(DEADLINE, up.handle.request("/clienttest/echo", raw("1")))
        .await
        .expect("the request's timer fires while the writer is stuck");
    assert_eq!(out.code, code::TIMEOUT, "{out:?}");
    up.assert_no_event_nor_close("the connection stays up meanwhile");
    // Once the server reads again, everything arrives.
    server.set_stalled(false);
    until("the server received the flood", || async {
        server
            .received()
            .iter()
            .filter(|r| r.path == "/flood")
            .count()
            == 768
    })
    .await;
    up.stop().await;
}

/// Frames beyond `write_queue_bytes` close the connection as one whose server stopped
/// reading; the driver answers meanwhile and reconnects once the server is back.
#[tokio::test]
async fn frames_beyond_the_write_queue_bound_close_the_connection() {
    let server = server().await;
    let mut cfg = stalled_config(&server.url());
    cfg.write_queue_bytes = 1024 * 1024;
    let mut up = Upstream::start_with(cfg).await;
    server.set_stalled(true);
    let big = raw(&format!("\"{}\"", "x".repeat(64 * 1024)));
    let flood = {
        let handle = up.handle.clone();
        tokio::spawn(async move {
            for _ in 0..768 {
                if handle.emit("/flood", big.clone()).await.is_err() {
                    break;
                }
            }
        })
    };
    let reason = up.wait_closed().await;
    assert!(
        reason.contains("stopped reading") && reason.contains("write_queue_bytes"),
        "{reason}"
    );
    assert!(up.handle.status().await.is_some());
    server.set_stalled(false);
    up.wait_open().await;
    flood.await.unwrap();
    up.stop().await;
}

/// A layer above that takes no notices: the driver stops reading from the server (the
/// backpressure) but keeps answering callers, and once notices are taken again they come
/// complete and in order.
#[tokio::test]
async fn notices_nobody_takes_pause_reading_but_not_commands() {
    let server = server().await;
    let mut cfg = fast_config(&[server.url()]);
    cfg.notice_capacity = 4;
    let mut up = Upstream::start_with(cfg).await;
    assert_eq!(up.subscribe("/news", None).await.code, 200);
    const EVENTS: u64 = 200;
    for i in 0..EVENTS {
        assert_eq!(server.broadcast("/news", json!(i)).await, 1);
    }
    // Nobody reads the notices: callers are answered all the same, and the driver reads
    // from the server only what it can hand on (4 in the channel, 1 held).
    for _ in 0..20 {
        let status = tokio::time::timeout(DEADLINE, up.handle.status())
            .await
            .expect("status answers while the notices are not taken")
            .expect("the driver runs");
        assert!(status.events_in <= 5, "read beyond the bound: {status:?}");
        assert_eq!(status.state, "open", "{status:?}");
    }
    let mut seen = Vec::new();
    while seen.len() < EVENTS as usize {
        let (data, _) = up.wait_event("/news").await;
        seen.push(data.as_u64().expect("a number"));
    }
    assert_eq!(
        seen,
        (0..EVENTS).collect::<Vec<_>>(),
        "complete and in order"
    );
    // States keep their place among the events: a close after the events comes after them.
    up.trigger("/clienttest/close", "null").await;
    let closed = up
        .wait_for("closed", |n| match n {
            Notice::State(StateChange::Closed { .. }) => Some(true),
            Notice::Event(_) => Some(false),
            _ => None,
        })
        .await;
    assert!(closed, "no event after the last one");
    up.stop().await;
}
