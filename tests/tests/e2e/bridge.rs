//! The bridge end to end: the daemon in-process, raw JSON-line clients, the test server.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn a_new_client_is_told_the_state_first() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.client().await;
    let first = c.next_event().await;
    assert!(
        first["event"] == "/open" || first["event"] == "/close",
        "{first}"
    );
    if first["event"] == "/close" {
        assert_eq!(c.next_event().await["event"], "/open");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn two_clients_share_one_upstream_subscription() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    let mut b = daemon.open_client().await;
    a.subscribe("/news", 1).await;
    b.subscribe("/news", 1).await;
    assert_eq!(
        server.subscriptions().get("/news"),
        Some(&1),
        "one upstream subscription"
    );
    assert_eq!(server.broadcast("/news", json!({"n":1})).await, 1);
    assert_eq!(a.event("/news").await["data"], json!({"n":1}));
    assert_eq!(b.event("/news").await["data"], json!({"n":1}));
    a.unsubscribe("/news", 2).await;
    // b still holds it: a later check must still see it upstream.
    assert_eq!(b.call(json!({"op":"status"}), 2).await["code"], 200);
    assert_eq!(server.subscriptions().get("/news"), Some(&1));
    b.unsubscribe("/news", 3).await;
    until_unsubscribed(&server).await;
    daemon.stop().await;
}

#[tokio::test]
async fn the_last_subscriber_disconnecting_unsubscribes_upstream() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    a.subscribe("/news", 1).await;
    // It also leaves a request pending: crashing mid-request must leak nothing.
    a.send(json!({"op":"send","path":"/clienttest/drop-callback","id":2}))
        .await;
    until_received(&server, "/clienttest/drop-callback").await;
    // ...and disconnects in the middle of a line.
    a.write_raw(b"{\"op\":\"on\",\"pa").await;
    drop(a);
    until_unsubscribed(&server).await;
    let mut b = daemon.open_client().await;
    let st = b.call(json!({"op":"status"}), 1).await;
    assert_eq!(st["data"]["clients"], 1, "{st}");
    assert_eq!(st["data"]["subscriptions"], json!([]), "{st}");
    daemon.stop().await;
}

#[tokio::test]
async fn callbacks_are_routed_to_the_client_that_asked() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    let mut b = daemon.open_client().await;
    a.send(json!({"op":"send","path":"/clienttest/echo","data":"for a","id":"x"}))
        .await;
    b.send(json!({"op":"send","path":"/clienttest/echo","data":"for b","id":"x"}))
        .await;
    let ra = a.reply(json!("x")).await;
    let rb = b.reply(json!("x")).await;
    assert_eq!(
        (ra["code"].clone(), ra["data"].clone()),
        (json!(200), json!("for a"))
    );
    assert_eq!(
        (rb["code"].clone(), rb["data"].clone()),
        (json!(200), json!("for b"))
    );
    // The echo asks for a callback: only the client that received the handle may answer.
    let handle = ra["cb"].as_str().expect("a cb handle").to_owned();
    let stolen = b
        .call(json!({"op":"callback","cb":handle,"data":1}), 5)
        .await;
    assert_eq!(stolen["code"], 400, "{stolen}");
    let answered = a
        .call(json!({"op":"callback","cb":handle,"data":"chain"}), 6)
        .await;
    assert_eq!(
        (answered["code"].clone(), answered["data"].clone()),
        (json!(200), json!("chain"))
    );
    let again = a
        .call(json!({"op":"callback","cb":handle,"data":2}), 7)
        .await;
    assert_eq!(again["code"], 400, "a handle is answered once: {again}");
    daemon.stop().await;
}

#[tokio::test]
async fn server_requests_are_answered_by_a_client() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    a.subscribe("/ask", 1).await;
    server.request_from_all("/ask", json!("question")).await;
    let ev = a.event("/ask").await;
    assert_eq!(ev["data"], "question");
    let cb = ev["cb"].as_str().expect("cb").to_owned();
    a.send(json!({"op":"callback","cb":cb,"data":"answer"}))
        .await;
    until("the server got the answer", || async {
        server.log().iter().any(|e| {
            matches!(e,
            qio_testserver::LogEntry::CallbackAnswered { data, .. } if data == &json!("answer"))
        })
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn repeated_ons_from_one_client_hold_one_reference_and_share_the_answer() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    for id in 1..=3 {
        a.send(json!({"op":"on","path":"/dup","id":id})).await;
    }
    for id in 1..=3 {
        assert_eq!(a.reply(json!(id)).await["code"], 200);
    }
    let st = a.call(json!({"op":"status"}), 4).await;
    assert_eq!(st["data"]["subscriptions"][0]["refs"], 1, "{st}");
    a.unsubscribe("/dup", 5).await;
    until_unsubscribed(&server).await;
    daemon.stop().await;
}

#[tokio::test]
async fn one_gets_a_single_event() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    assert_eq!(
        a.call(json!({"op":"one","path":"/once"}), 1).await["code"],
        200
    );
    server.broadcast("/once", json!(1)).await;
    assert_eq!(a.event("/once").await["data"], 1);
    until_unsubscribed(&server).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_refused_subscription_is_reported_and_not_held() {
    let server = server().await;
    server.set_refuse_subscriptions("/secret", Some(401));
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    let r = a.call(json!({"op":"on","path":"/secret"}), 1).await;
    assert_eq!(r["code"], 401, "{r}");
    let st = a.call(json!({"op":"status"}), 2).await;
    assert_eq!(st["data"]["subscriptions"], json!([]));
    daemon.stop().await;
}

#[tokio::test]
async fn a_subscription_refused_after_a_reconnect_is_reported_to_its_clients() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    a.subscribe("/x", 1).await;
    a.subscribe("/y", 2).await;
    server.set_refuse_subscriptions("/x", Some(401));
    server.kill().await;
    server.restart().await.unwrap();
    let ev = a.event("/error").await;
    assert_eq!(
        (&ev["data"]["op"], &ev["data"]["path"], &ev["data"]["code"]),
        (&json!("on"), &json!("/x"), &json!(401)),
        "{ev}"
    );
    until("/y is restored", || async {
        server.subscriptions().get("/y") == Some(&1)
    })
    .await;
    let st = a.call(json!({"op":"status"}), 3).await;
    let paths: Vec<_> = st["data"]["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].clone())
        .collect();
    assert_eq!(paths, [json!("/y")], "the refused one is gone: {st}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_slow_client_does_not_slow_a_fast_one_and_is_told_what_it_lost() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.client_queue_events = 16;
    let daemon = Daemon::start_with(settings).await;
    let mut slow = daemon.open_client().await;
    let mut fast = daemon.open_client().await;
    slow.subscribe("/feed", 1).await;
    fast.subscribe("/feed", 1).await;
    let payload = "x".repeat(4096);
    let n = 1000;
    // In lockstep with the fast reader: were the slow client holding up the daemon, the
    // fast one would stall here as soon as the slow one's socket buffer filled.
    for i in 0..n {
        server
            .broadcast("/feed", json!({"i": i, "p": payload}))
            .await;
        let ev = fast.event("/feed").await;
        assert_eq!(
            ev["data"]["i"], i,
            "the fast client gets every event, in order"
        );
    }
    // Now the slow one reads: some events were dropped and it was told how many.
    let mut got = 0u64;
    let mut lost = 0u64;
    while got + lost < n {
        let v = slow.next().await;
        match v["event"].as_str() {
            Some("/lost") => lost += v["data"]["count"].as_u64().unwrap(),
            Some("/feed") => got += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(lost > 0, "the slow client lost events ({got} got)");
    assert_eq!(got + lost, n);
    daemon.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_400_and_the_connection_stays_usable() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.max_line_bytes = 1024;
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    let with_id: [(&str, &str); 8] = [
        (r#"{"op":"on","path":"/open","id":1}"#, "reserved"),
        (r#"{"id":1}"#, "missing \"op\""),
        (r#"{"op":"fly","id":1}"#, "unknown op"),
        (r#"{"op":"send","id":1}"#, "needs \"path\""),
        (r#"{"op":"on","path":7,"id":1}"#, "must be a string"),
        (
            r#"{"op":"callback","cb":"nope","id":1}"#,
            "not a callback handle",
        ),
        (r#"{"op":"send","path":"/qio/ping","id":1}"#, "reserved"),
        (r#"{"op":"on","path":"@@@","id":1}"#, "empty once cleaned"),
    ];
    for (line, msg) in with_id {
        c.write_raw(format!("{line}\n").as_bytes()).await;
        let r = c.reply(json!(1)).await;
        assert_eq!(r["code"], 400, "{line}: {r}");
        assert!(r["err_msg"].as_str().unwrap().contains(msg), "{line}: {r}");
    }
    let without_id: [&[u8]; 5] = [
        b"not json\n",
        b"[1,2,3]\n",
        b"\xff\xfe\xfd\n",
        b"{\"op\":\"send\"}\n",
        b"{\"op\":\"send\",\"path\":\"/a\",\"data\":[1,\n",
    ];
    for bytes in without_id {
        c.write_raw(bytes).await;
        let ev = c.next_event().await;
        assert_eq!(
            (ev["event"].clone(), ev["data"]["code"].clone()),
            (json!("/error"), json!(400)),
            "{ev}"
        );
    }
    let long = format!(
        "{{\"op\":\"send\",\"path\":\"/a\",\"data\":\"{}\"}}\n",
        "x".repeat(5000)
    );
    c.write_raw(long.as_bytes()).await;
    let ev = c.next_event().await;
    assert!(
        ev["data"]["err_msg"]
            .as_str()
            .unwrap()
            .contains("max_line_bytes"),
        "{ev}"
    );
    // Still usable, and other clients never noticed.
    assert_eq!(c.call(json!({"op":"status"}), 9).await["code"], 200);
    daemon.stop().await;
}

#[tokio::test]
async fn fire_and_forget_sends_reach_the_server_in_order_and_overflow_is_reported() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.driver.session.queue_max_events = 3;
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    // As many as the bound allows in flight (sent, not yet confirmed by the server).
    for i in 0..3 {
        c.send(json!({"op":"send","path":"/ff","data":i})).await;
    }
    until("all three arrived", || async {
        server.received().iter().filter(|r| r.path == "/ff").count() == 3
    })
    .await;
    let order: Vec<_> = server
        .received()
        .into_iter()
        .filter(|r| r.path == "/ff")
        .map(|r| r.data)
        .collect();
    assert_eq!(order, [json!(0), json!(1), json!(2)]);
    // An answered request proves the server read the events sent before it; unconfirmed
    // ones would be sent again after the reconnect (at-least-once) and fill the queue.
    let r = c
        .call(json!({"op":"send","path":"/clienttest/echo","data":1}), 2)
        .await;
    assert_eq!(r["code"], 200);
    server.kill().await;
    assert_eq!(c.event("/close").await["event"], "/close");
    for i in 0..4 {
        c.send(json!({"op":"send","path":"/offline","data":i}))
            .await;
    }
    let ev = c.event("/error").await;
    assert_eq!(
        (ev["data"]["code"].clone(), ev["data"]["op"].clone()),
        (json!(-3), json!("send")),
        "{ev}"
    );
    let r = c
        .call(json!({"op":"send","path":"/clienttest/echo","data":1}), 3)
        .await;
    assert_eq!(r["code"], -1, "requests are not queued offline: {r}");
    server.restart().await.unwrap();
    c.event("/open").await;
    until("the three queued arrived", || async {
        server
            .received()
            .iter()
            .filter(|r| r.path == "/offline")
            .count()
            == 3
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn shutdown_answers_pending_requests_with_disconnected() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    c.send(json!({"op":"send","path":"/clienttest/drop-callback","id":42}))
        .await;
    until_received(&server, "/clienttest/drop-callback").await;
    daemon.cancel();
    let r = c.reply(json!(42)).await;
    assert_eq!(r["code"], -1, "{r}");
    let mut saw_close = false;
    while let Some(v) = c.try_next().await {
        saw_close |= v["event"] == "/close";
    }
    assert!(saw_close, "clients are told the daemon is going");
    daemon.stop().await;
}

#[tokio::test]
async fn status_reports_the_daemon_state() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.open_client().await;
    c.call(json!({"op":"on","path":"/s"}), 1).await;
    let st = c.call(json!({"op":"status"}), 2).await["data"].clone();
    assert_eq!(st["state"], "open");
    assert_eq!(st["url"], server.url());
    assert_eq!(st["dialect"], "0.2");
    assert_eq!(st["clients"], 1);
    assert_eq!(
        st["subscriptions"],
        json!([{"path":"/s","refs":1,"state":"active","local_subscribers":1}])
    );
    for key in [
        "reconnects",
        "queued_events",
        "pending_callbacks",
        "events_in",
        "events_out",
        "connected_since_ms",
    ] {
        assert!(st.get(key).is_some(), "{key} in {st}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn a_reload_with_a_new_address_reconnects_there() {
    let a = server().await;
    let b = server().await;
    let daemon = Daemon::start(&a.url()).await;
    let mut c = daemon.open_client().await;
    c.subscribe("/news", 1).await;
    daemon
        .reload
        .send(qiod::Reload {
            servers: vec![url::Url::parse(&b.url()).unwrap()],
        })
        .await
        .unwrap();
    until("the daemon moved to b", || async {
        b.subscriptions().get("/news") == Some(&1) && a.connection_count() == 0
    })
    .await;
    // The subscription works there.
    assert_eq!(b.broadcast("/news", json!("from b")).await, 1);
    assert_eq!(c.event("/news").await["data"], "from b");
    daemon.stop().await;
}

#[tokio::test]
async fn closing_the_sending_side_answers_what_was_asked_then_ends_the_session() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut a = daemon.open_client().await;
    a.subscribe("/news", 1).await;
    a.send(json!({"op":"send","path":"/clienttest/echo","data":"last","id":2}))
        .await;
    use tokio::io::AsyncWriteExt;
    a.writer.shutdown().await.unwrap();
    assert_eq!(a.reply(json!(2)).await["data"], "last", "still answered");
    while a.try_next().await.is_some() {}
    until_unsubscribed(&server).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_client_flooding_requests_without_reading_gets_every_reply_and_disturbs_nobody() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.max_pending_per_client = 8;
    let daemon = Daemon::start_with(settings).await;
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (rd, mut writer) = stream.into_split();
    let mut flood = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(rd));
    let mut other = daemon.open_client().await;
    let n = 3000u64;
    let mut lines = Vec::new();
    for id in 0..n {
        lines.extend_from_slice(format!("{{\"op\":\"status\",\"id\":{id}}}\n").as_bytes());
    }
    let pusher = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        writer.write_all(&lines).await.unwrap();
        writer
    });
    // The daemon stops reading the flood while its replies wait; others are served.
    for i in 0..5 {
        assert_eq!(other.call(json!({"op":"status"}), i).await["code"], 200);
    }
    let mut seen = 0;
    while seen < n {
        let line = tokio::time::timeout(DEADLINE, flood.next_line())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the daemon kept the connection");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("id").is_some() {
            assert_eq!(v["id"], seen, "replies in order, none lost");
            seen += 1;
        }
    }
    let _ = pusher.await.unwrap();
    daemon.stop().await;
}

/// Issue 15: an `on` while the daemon cannot reach its server is state: answered at once
/// (202, with the daemon's reason) instead of a -2 that blames a server never reached,
/// and made upstream, with its events, as soon as the server is up.
#[tokio::test]
async fn an_on_while_the_server_is_down_is_held_and_made_when_it_comes() {
    let server = server().await;
    server.kill().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut c = daemon.client().await;
    let first = c.next_event().await;
    assert_eq!(first["event"], "/close", "{first}");
    assert_eq!(first["data"]["connecting"], true, "it is starting: {first}");
    // A failed attempt: the daemon now says why, and that it waits before the next.
    let failed = c.event("/error").await;
    assert_eq!(failed["data"]["code"], -1, "{failed}");
    let r = c.call(json!({"op":"on","path":"/news"}), 1).await;
    assert_eq!(r["code"], 202, "{r}");
    let why = r["err_msg"].as_str().unwrap_or_default();
    assert!(why.starts_with("not connected to the server ("), "{r}");
    let late = daemon.client().await.next_event().await;
    assert_eq!(late["event"], "/close");
    assert_eq!(late["data"]["connecting"], false, "{late}");
    assert!(
        late["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&server.url()),
        "the reason names the server: {late}"
    );
    // A bad path is still refused at once, offline too.
    let bad = c.call(json!({"op":"on","path":"/qio/x"}), 2).await;
    assert_eq!(bad["code"], 400, "{bad}");
    server.restart().await.unwrap();
    c.event("/open").await;
    until("/news is subscribed upstream", || async {
        server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    server.broadcast("/news", json!("hello")).await;
    let ev = c.event("/news").await;
    assert_eq!(ev["data"], "hello", "{ev}");
    let st = c.call(json!({"op":"status"}), 3).await;
    assert_eq!(
        st["data"]["subscriptions"][0]["local_subscribers"], 1,
        "{st}"
    );
    daemon.stop().await;
}
