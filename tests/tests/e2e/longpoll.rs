//! HTTP long polling end to end: every conformance event over long polling, the fallback
//! through an upgrade-mangling proxy for each of its ten rules, WebSocket first again on
//! the next reconnect, moves and restarts, and the exactly-once reply promise when the
//! held poll breaks.

use crate::common::*;
use qio_testserver::proxy::{After, ManglingProxy, Mode, Rule};
use qio_testserver::{CallbackKind, LogEntry, ServerConfig, TestServer};
use qiod::driver::{DriverConfig, Notice, TransportChoice};
use qiod::session::{code, StateChange};
use serde_json::json;
use std::time::Duration;

/// A test server whose held polls are answered empty after 200 ms.
async fn lp_server() -> TestServer {
    server_with(lp_timings).await
}

fn lp_timings(cfg: &mut ServerConfig) {
    cfg.poll_hold = Duration::from_millis(200);
    cfg.poll_session_timeout = Duration::from_secs(2);
}

/// Fast session settings with millisecond polls.
fn lp_config(url: &str, transport: TransportChoice) -> DriverConfig {
    let mut cfg = fast_config(&[url.to_owned()]);
    cfg.session.transport = transport;
    cfg.long_poll.delay_max = Duration::from_millis(5);
    cfg.long_poll.request_timeout = Duration::from_secs(2);
    cfg
}

async fn long_poll(server: &TestServer) -> Upstream {
    Upstream::start_with(lp_config(&server.url(), TransportChoice::LongPoll)).await
}

fn sessions(server: &TestServer) -> usize {
    server
        .log()
        .iter()
        .filter(|e| matches!(e, LogEntry::PollSession { .. }))
        .count()
}

fn upgrades(server: &TestServer) -> usize {
    server
        .log()
        .iter()
        .filter(|e| matches!(e, LogEntry::Upgraded { .. }))
        .count()
}

#[tokio::test]
async fn the_handshake_names_the_host_and_polls_are_held() {
    let server = lp_server().await;
    let up = long_poll(&server).await;
    let st = up.handle.status().await.unwrap();
    assert_eq!((st.state, st.transport), ("open", Some("long-poll")));
    assert_eq!(st.upgrade_error, None);
    assert_eq!((sessions(&server), upgrades(&server)), (1, 0));
    // Held polls are answered empty after poll_hold; the session stays open.
    until("two empty answers", || async {
        server
            .log()
            .iter()
            .filter(|e| matches!(e, LogEntry::PollAnswered { status: 200, body, .. } if body.is_empty()))
            .count()
            >= 2
    })
    .await;
    let out = up.handle.request("/clienttest/echo", raw("\"x\"")).await;
    assert_eq!((out.code, out.data.get()), (200, "\"x\""));
    assert_eq!(server.connection_count(), 1);
    // Every answer is HTTP/1.0 200 (no refusals on the way).
    assert!(server
        .log()
        .iter()
        .all(|e| !matches!(e, LogEntry::PollAnswered { status, .. } if *status != 200)));
    up.stop().await;
}

#[tokio::test]
async fn long_poll_conformance_broadcast_and_unsubscribe() {
    let server = lp_server().await;
    let mut up = long_poll(&server).await;
    assert_eq!(up.subscribe("/clienttest/broadcast", None).await.code, 200);
    let (first, _) = up.wait_event("/clienttest/broadcast").await;
    let (second, _) = up.wait_event("/clienttest/broadcast").await;
    assert!(second.as_u64() > first.as_u64(), "{first} then {second}");
    up.unsubscribe("/clienttest/broadcast").await;
    until_unsubscribed(&server).await;
    up.stop().await;
}

#[tokio::test]
async fn long_poll_conformance_echo_chain_errors_on_data_and_challenge() {
    let server = lp_server().await;
    let mut up = long_poll(&server).await;
    let out = up
        .handle
        .request("/clienttest/echo", raw("{\"a\":1}"))
        .await;
    assert_eq!((out.code, out.data.get()), (200, "{\"a\":1}"));
    let out2 = up
        .handle
        .answer_deferred(out.cb.expect("a chain"), raw("\"link\""))
        .await
        .await;
    assert_eq!((out2.code, out2.data.get()), (200, "\"link\""));
    up.handle
        .answer(out2.cb.expect("the chain goes on"), raw("\"end\""))
        .await
        .unwrap();
    for c in [400, 401, 404, 420, 500] {
        let out = up
            .handle
            .request(&format!("/clienttest/error/{c}"), raw("null"))
            .await;
        assert_eq!((out.code, out.err_msg), (c, Some(format!("{c}s are fun!"))));
    }
    let out = up.subscribe("/clienttest/on-data", Some(raw("1"))).await;
    assert_eq!(out.code, 401);
    let out = up
        .subscribe("/clienttest/on-data", Some(raw("123987")))
        .await;
    assert_eq!(out.code, 200);
    up.handle
        .emit("/clienttest/heartbeat-challenge", raw("null"))
        .await
        .unwrap();
    until("the echo chain and the challenge are answered", || async {
        let log = server.log();
        let count = |k: CallbackKind| {
            log.iter()
                .filter(|e| matches!(e, LogEntry::CallbackAnswered { kind, .. } if *kind == k))
                .count()
        };
        count(CallbackKind::Echo) == 2 && count(CallbackKind::Challenge) == 1
    })
    .await;
    up.stop().await;
}

#[tokio::test]
async fn long_poll_conformance_in_progress_and_unsubscribed() {
    let server = lp_server().await;
    let cfg = lp_config(&server.url(), TransportChoice::LongPoll);
    let mut up = Upstream::start_with(cfg).await;
    up.in_progress_on_off_on(&server).await;
    up.handle
        .emit("/clienttest/send-unsubscribed", raw("null"))
        .await
        .unwrap();
    let out = up.handle.request("/clienttest/echo", raw("1")).await;
    assert_eq!(out.code, 200);
    up.assert_no_event_nor_close("nothing may come of an unsubscribed event");
    up.stop().await;
}

#[tokio::test]
async fn long_poll_conformance_close_drop_callback_and_send_invalid_reconnect() {
    let server = lp_server().await;
    let mut up = long_poll(&server).await;
    assert_eq!(up.subscribe("/news", None).await.code, 200);
    let waiting = up
        .handle
        .request_deferred("/clienttest/drop-callback", raw("1"))
        .await;
    until_received(&server, "/clienttest/drop-callback").await;
    up.trigger("/clienttest/close", "null").await;
    let reason = up.wait_closed().await;
    assert!(reason.contains("403"), "{reason}");
    let out = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("resolves");
    assert_eq!(out.code, code::DISCONNECTED);
    up.wait_open().await;
    until("the subscription is restored", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    assert_eq!(server.broadcast("/news", json!("after")).await, 1);
    assert_eq!(up.wait_event("/news").await.0, json!("after"));
    up.trigger("/clienttest/send-invalid", "null").await;
    let reason = up.wait_closed().await;
    assert!(reason.contains("invalid frame"), "{reason}");
    up.wait_open().await;
    // Every reconnect was a new session.
    assert_eq!(sessions(&server), 3);
    up.stop().await;
}

/// Through the proxy with one rule forced, qiod opens over long polling and says why.
async fn falls_back(rule: Rule) {
    let server = lp_server().await;
    let proxy = ManglingProxy::start(server.addr(), Mode::Forced(rule))
        .await
        .unwrap();
    let cfg = lp_config(&proxy.url(), TransportChoice::Auto);
    let up = Upstream::start_with(cfg).await;
    let st = up.handle.status().await.unwrap();
    assert_eq!(st.transport, Some("long-poll"), "{rule:?}");
    let why = st.upgrade_error.unwrap_or_default();
    assert!(!why.is_empty(), "{rule:?}: the reason is shown");
    assert_eq!(
        proxy.broken(),
        [rule],
        "one upgrade tried, then long polling"
    );
    assert!(proxy.plain_connections() >= 1, "{rule:?}");
    let out = up.handle.request("/clienttest/echo", raw("\"hi\"")).await;
    assert_eq!((out.code, out.data.get()), (200, "\"hi\""), "{rule:?}");
    assert_eq!(server.connection_count(), 1, "{rule:?}");
    up.stop().await;
}

#[tokio::test]
async fn falls_back_on_every_rule_of_the_mangling_proxy() {
    for rule in Rule::ALL {
        falls_back(rule).await;
    }
}

/// `transport = "auto"` with a short handshake deadline (a silent WebSocket or upgrade
/// waits it out) and a long backoff (falling back must not wait for it).
fn fallback_config(url: &str) -> DriverConfig {
    let mut cfg = lp_config(url, TransportChoice::Auto);
    cfg.session.handshake_timeout = Duration::from_millis(300);
    cfg.session.backoff_initial = Duration::from_secs(600);
    cfg.session.backoff_max = Duration::from_secs(600);
    cfg
}

/// Through the proxy with the upgrade passed and the WebSocket broken right after it, qiod
/// opens over long polling on the same address at once, and says why.
async fn falls_back_after_the_upgrade(after: After) {
    let server = lp_server().await;
    let proxy = ManglingProxy::start(server.addr(), Mode::AfterUpgrade(after))
        .await
        .unwrap();
    let up = Upstream::start_with(fallback_config(&proxy.url())).await;
    let st = up.handle.status().await.unwrap();
    assert_eq!(st.transport, Some("long-poll"), "{after:?}");
    assert!(st.upgrade_error.is_some(), "{after:?}: the reason is shown");
    assert_eq!(
        proxy.broken_after(),
        [after],
        "{after:?}: one WebSocket tried"
    );
    assert_eq!(upgrades(&server), 1, "{after:?}");
    let out = up.handle.request("/clienttest/echo", raw("\"hi\"")).await;
    assert_eq!((out.code, out.data.get()), (200, "\"hi\""), "{after:?}");
    up.stop().await;
}

#[tokio::test]
async fn falls_back_when_the_websocket_breaks_after_its_upgrade() {
    for after in After::ALL {
        falls_back_after_the_upgrade(after).await;
    }
}

#[tokio::test]
async fn falls_back_when_the_upgrade_gets_no_answer() {
    let server = lp_server().await;
    let proxy = ManglingProxy::start(server.addr(), Mode::Unanswered)
        .await
        .unwrap();
    let up = Upstream::start_with(fallback_config(&proxy.url())).await;
    let st = up.handle.status().await.unwrap();
    assert_eq!(st.transport, Some("long-poll"));
    let why = st.upgrade_error.unwrap_or_default();
    assert!(why.contains("timed out"), "{why}");
    assert_eq!(proxy.unanswered(), 1);
    assert_eq!(upgrades(&server), 0);
    up.stop().await;
}

#[tokio::test]
async fn a_refused_connect_is_network_trouble_not_a_reason_to_fall_back() {
    let server = lp_server().await;
    let url = server.url();
    server.kill().await;
    let mut up = Upstream::spawn(lp_config(&url, TransportChoice::Auto));
    let reason = up
        .wait_for("a failed attempt", |n| match n {
            Notice::State(StateChange::ConnectFailed { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(!reason.contains("long polling"), "{reason}");
    server.restart().await.unwrap();
    up.wait_open().await;
    let st = up.handle.status().await.unwrap();
    assert_eq!(st.transport, Some("websocket"));
    up.stop().await;
}

#[tokio::test]
async fn websocket_first_again_on_the_next_reconnect_once_the_proxy_is_gone() {
    let server = lp_server().await;
    let proxy = ManglingProxy::start(server.addr(), Mode::Random(7))
        .await
        .unwrap();
    let mut up = Upstream::start_with(lp_config(&proxy.url(), TransportChoice::Auto)).await;
    assert_eq!(
        up.handle.status().await.unwrap().transport,
        Some("long-poll")
    );
    assert_eq!(up.subscribe("/news", None).await.code, 200);
    let before = upgrades(&server);
    proxy.set_mode(Mode::PassThrough);
    up.trigger("/clienttest/close", "null").await;
    up.wait_closed().await;
    up.wait_open().await;
    let st = up.handle.status().await.unwrap();
    assert_eq!((st.transport, st.upgrade_error), (Some("websocket"), None));
    assert_eq!(upgrades(&server), before + 1);
    until("the subscription is restored", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    assert_eq!(server.broadcast("/news", json!(1)).await, 1);
    up.wait_event("/news").await;
    up.stop().await;
}

#[tokio::test]
async fn a_move_and_a_restart_during_long_polling_keep_every_subscription() {
    let a = lp_server().await;
    let b = lp_server().await;
    let pa = ManglingProxy::start(a.addr(), Mode::Forced(Rule::ReqKey))
        .await
        .unwrap();
    let pb = ManglingProxy::start(b.addr(), Mode::Forced(Rule::RespAccept))
        .await
        .unwrap();
    let mut up = Upstream::start_with(lp_config(&pa.url(), TransportChoice::Auto)).await;
    for p in ["/news", "/sport"] {
        assert_eq!(up.subscribe(p, None).await.code, 200);
    }
    let target = serde_json::to_string(&pb.url()).unwrap();
    up.trigger("/clienttest/move", &target).await;
    up.wait_for("moved", |n| {
        matches!(n, Notice::State(StateChange::Moved { .. })).then_some(())
    })
    .await;
    up.wait_open().await;
    // WebSocket was tried first at the new address.
    assert_eq!(pb.broken(), [Rule::RespAccept]);
    assert_eq!(
        up.handle.status().await.unwrap().transport,
        Some("long-poll")
    );
    until("both subscriptions followed the move", || async {
        let subs = b.subscriptions();
        subs.get("/news") == Some(&1) && subs.get("/sport") == Some(&1)
    })
    .await;
    b.restart().await.unwrap();
    up.wait_closed().await;
    up.wait_open().await;
    until("both subscriptions are restored", || async {
        let subs = b.subscriptions();
        subs.get("/news") == Some(&1) && subs.get("/sport") == Some(&1)
    })
    .await;
    for p in ["/news", "/sport"] {
        assert_eq!(b.broadcast(p, json!(p)).await, 1);
        assert_eq!(up.wait_event(p).await.0, json!(p));
    }
    up.stop().await;
}

#[tokio::test]
async fn a_reply_lost_with_the_held_poll_fires_once_with_disconnected() {
    let server = lp_server().await;
    let mut up = long_poll(&server).await;
    // The server never answers this one; its answer could only have come on the held poll.
    let waiting = up
        .handle
        .request_deferred("/clienttest/drop-callback", raw("1"))
        .await;
    until_received(&server, "/clienttest/drop-callback").await;
    server.kill().await;
    let out = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("resolves");
    assert_eq!(
        (out.code, out.err_msg.as_deref()),
        (code::DISCONNECTED, Some("disconnected")),
        "at once, not after the request timeout"
    );
    up.wait_closed().await;
    assert_eq!(up.handle.status().await.unwrap().pending_callbacks, 0);
    server.clear_received();
    server.restart().await.unwrap();
    up.wait_open().await;
    let out = up.handle.request("/clienttest/echo", raw("2")).await;
    assert_eq!(out.code, 200);
    assert!(
        !server
            .received()
            .iter()
            .any(|r| r.path == "/clienttest/drop-callback"),
        "a request is never sent twice"
    );
    up.stop().await;
}

#[tokio::test]
async fn a_server_without_long_polling_answers_501_and_the_attempt_fails() {
    let server = server_with(|c| {
        lp_timings(c);
        c.long_poll = false;
    })
    .await;
    let mut up = Upstream::spawn(lp_config(&server.url(), TransportChoice::LongPoll));
    let reason = up
        .wait_for("a failed attempt", |n| match n {
            Notice::State(StateChange::ConnectFailed { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("501"), "{reason}");
    up.stop().await;
}

#[tokio::test]
async fn the_status_op_shows_the_transport_and_the_failed_upgrade() {
    let server = lp_server().await;
    let proxy = ManglingProxy::start(server.addr(), Mode::Forced(Rule::ReqVersion))
        .await
        .unwrap();
    let mut settings = daemon_settings(&proxy.url());
    settings.driver = lp_config(&proxy.url(), TransportChoice::Auto);
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    let st = c.call(json!({"op":"status"}), 1).await;
    assert_eq!(st["data"]["transport"], "long-poll", "{st}");
    let why = st["data"]["upgrade_error"].as_str().unwrap_or_default();
    assert!(why.contains("HTTP version"), "{st}");
    c.subscribe("/news", 2).await;
    assert_eq!(server.broadcast("/news", json!(5)).await, 1);
    assert_eq!(c.event("/news").await["data"], 5);
    daemon.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_ends_its_session_on_the_server_even_with_no_poll_held() {
    let server = lp_server().await;
    let mut up = long_poll(&server).await;
    // A busy subscription keeps a session that holds no poll alive on the server.
    assert_eq!(up.subscribe("/clienttest/broadcast", None).await.code, 200);
    up.wait_event("/clienttest/broadcast").await;
    // The invalid frame comes as the answer to the held poll: when qiod drops the
    // connection for it, no poll of its is held on the server.
    up.trigger("/clienttest/send-invalid", "null").await;
    up.wait_closed().await;
    up.wait_open().await;
    until("the old session is gone", || async {
        server.connection_count() == 1
    })
    .await;
    until("only the new session is subscribed", || async {
        server.subscriptions().get("/clienttest/broadcast") == Some(&1)
    })
    .await;
    up.stop().await;
}
