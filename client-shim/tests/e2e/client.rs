//! Every client function against the real daemon (in-process) and the test server.

use crate::common::*;
use futures_util::StreamExt;
use qio_client::{Client, ConnectionEvent, Error};
use qio_testserver::{CallbackKind, LogEntry};
use serde_json::json;
use std::time::Duration;

fn answered(
    server: &qio_testserver::TestServer,
    kind: CallbackKind,
    data: &serde_json::Value,
) -> bool {
    server.log().iter().any(|e| {
        matches!(e, LogEntry::CallbackAnswered { kind: k, data: d, .. } if *k == kind && d == data)
    })
}

#[tokio::test]
async fn on_delivers_events_and_send_returns_the_servers_answer() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut news = client.on("news/").await.expect("on");
    assert_eq!(news.path(), "/news");
    assert_eq!(s.server.subscriptions().get("/news"), Some(&1));
    s.server.broadcast("/news", json!({"n": 1})).await;
    let ev = within("an event", news.next()).await.expect("event");
    assert_eq!((ev.path.as_str(), &ev.data), ("/news", &json!({"n": 1})));
    assert!(ev.cb.is_none(), "broadcasts ask for no answer");

    let reply = client
        .send("/clienttest/echo", json!({"a": 1}))
        .await
        .expect("send");
    assert_eq!((reply.code, &reply.data), (200, &json!({"a": 1})));
    assert!(reply.is_ok() && reply.err_msg.is_none());
    assert!(reply.handle.is_some(), "the echo asks for an answer back");
    s.daemon.stop().await;
}

#[tokio::test]
async fn the_echo_chain_goes_on_through_reply_handles() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut reply = client.send("/clienttest/echo", 1).await.expect("send");
    for n in 2..=4 {
        let next = reply.answer_and_wait(n).await.expect("answer_and_wait");
        assert_eq!((next.code, &next.data), (200, &json!(n)));
        reply = next;
    }
    assert!(answered(&s.server, CallbackKind::Echo, &json!(4)));
    // The last link: fire-and-forget, then the handle is spent.
    reply.answer("done").await.expect("answer");
    assert!(matches!(reply.answer(1).await, Err(Error::NoHandle)));
    until("the server got the last answer", || {
        answered(&s.server, CallbackKind::Echo, &json!("done"))
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test]
async fn a_server_error_code_is_a_reply_not_an_error() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut reply = client
        .send("/clienttest/error/404", serde_json::Value::Null)
        .await
        .expect("a reply");
    assert_eq!(reply.code, 404);
    assert_eq!(reply.err_msg.as_deref(), Some("404s are fun!"));
    assert!(!reply.is_ok());
    assert!(matches!(reply.answer(1).await, Err(Error::NoHandle)));
    s.daemon.stop().await;
}

#[tokio::test]
async fn a_server_request_is_answered_through_the_events_handle() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut ask = client.on("/ask").await.expect("on");
    s.server.request_from_all("/ask", json!("question")).await;
    let mut ev = within("the request", ask.recv()).await.expect("event");
    assert_eq!(ev.data, "question");
    assert!(ev.cb.is_some());
    ev.answer("answer").await.expect("answer");
    assert!(matches!(ev.answer(1).await, Err(Error::NoHandle)));
    until("the server got the answer", || {
        answered(&s.server, CallbackKind::Request, &json!("answer"))
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test]
async fn emit_reaches_the_server_and_a_refusal_comes_as_a_connection_event() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut events = client.events();
    assert_eq!(
        events.recv().await,
        Some(ConnectionEvent::Open),
        "the state comes first"
    );
    for i in 0..3 {
        client.emit("/ff", i).await.expect("emit");
    }
    until("the three events arrived", || {
        s.server
            .received()
            .iter()
            .filter(|r| r.path == "/ff")
            .count()
            == 3
    })
    .await;
    let order: Vec<_> = s
        .server
        .received()
        .into_iter()
        .filter(|r| r.path == "/ff")
        .map(|r| r.data)
        .collect();
    assert_eq!(order, [json!(0), json!(1), json!(2)]);
    client
        .emit("/qio/ping", ())
        .await
        .expect("the daemon takes the line");
    let ev = within("the refusal", events.recv()).await.expect("event");
    match ev {
        ConnectionEvent::Error {
            op, code, err_msg, ..
        } => {
            assert_eq!((op.as_deref(), code), (Some("send"), 400));
            assert!(err_msg.contains("reserved"), "{err_msg}");
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    s.daemon.stop().await;
}

#[tokio::test]
async fn dropping_the_last_subscription_of_a_path_unsubscribes() {
    let s = Setup::new().await;
    let client = s.client().await;
    let a = client.on("/news").await.expect("on");
    let mut b = client.on("/news").await.expect("second on");
    let st = client.status().await.expect("status");
    assert_eq!(
        st["subscriptions"][0]["refs"], 1,
        "one daemon reference: {st}"
    );
    drop(a);
    // b still holds the path: it still gets events.
    s.server.broadcast("/news", json!(1)).await;
    assert_eq!(within("an event", b.recv()).await.expect("event").data, 1);
    assert_eq!(s.server.subscriptions().get("/news"), Some(&1));
    drop(b);
    until("the subscription is given back upstream", || {
        s.server.subscriptions().is_empty()
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test]
async fn dropping_the_whole_client_gives_its_subscriptions_back() {
    let s = Setup::new().await;
    let client = s.client().await;
    let sub = client.on("/quiet").await.expect("on");
    assert_eq!(s.server.subscriptions().get("/quiet"), Some(&1));
    drop(client);
    drop(sub);
    until("the path is given back upstream", || {
        s.server.subscriptions().is_empty()
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test]
async fn one_yields_one_event_then_ends_and_gives_the_path_back() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut once = client.one("/once").await.expect("one");
    s.server.broadcast("/once", json!(1)).await;
    s.server.broadcast("/once", json!(2)).await;
    assert_eq!(
        within("the event", once.recv()).await.expect("event").data,
        1
    );
    assert!(once.recv().await.is_none(), "one event only");
    until("the path is given back", || {
        s.server.subscriptions().is_empty()
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test]
async fn off_ends_every_subscription_on_the_path() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut a = client.on("/a").await.expect("on");
    let mut b = client.on("/a").await.expect("on");
    let keep = client.on("/b").await.expect("on");
    client.off("/a").await.expect("off");
    assert!(within("a ends", a.recv()).await.is_none());
    assert!(within("b ends", b.recv()).await.is_none());
    until("/a is given back", || {
        !s.server.subscriptions().contains_key("/a")
    })
    .await;
    assert_eq!(s.server.subscriptions().get("/b"), Some(&1));
    drop(keep);
    s.daemon.stop().await;
}

#[tokio::test]
async fn subscription_data_and_refusals() {
    let s = Setup::new().await;
    let client = s.client().await;
    match client.on_with_data("/clienttest/on-data", 1).await {
        Err(Error::Server { code: 401, .. }) => {}
        other => panic!("expected a 401, got {other:?}"),
    }
    client
        .on_with_data("/clienttest/on-data", 123987)
        .await
        .expect("the right data is accepted");
    s.server.set_refuse_subscriptions("/secret", Some(403));
    match client.on("/secret").await {
        Err(Error::Server { code: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    match client.on("@@@").await {
        Err(Error::Server { code: 400, err_msg }) => {
            assert!(err_msg.contains("empty"), "{err_msg}")
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    s.daemon.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_loses_its_oldest_events_and_is_told() {
    let s = Setup::new().await;
    let client = s.client_with(|b| b.subscription_buffer(2)).await;
    let mut events = client.events();
    let mut feed = client.on("/feed").await.expect("on");
    let mut fence = client.on("/fence").await.expect("on");
    for i in 0..10 {
        s.server.broadcast("/feed", json!(i)).await;
    }
    // Events reach the client in the order the server sent them: once the fence is
    // here, so are the ten.
    s.server.broadcast("/fence", json!(0)).await;
    within("the fence", fence.recv()).await.expect("fence");
    assert_eq!(feed.recv().await.expect("event").data, 8);
    assert_eq!(feed.recv().await.expect("event").data, 9);
    assert_eq!(feed.lost(), 8);
    let lost = within("the loss report", async {
        loop {
            match events.recv().await {
                Some(ConnectionEvent::Lost { count, path }) => return (count, path),
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await;
    assert_eq!(lost, (8, Some("/feed".to_owned())));
    s.daemon.stop().await;
}

#[tokio::test]
async fn the_request_timeout_bounds_a_call() {
    let s = Setup::new().await;
    let client = s
        .client_with(|b| b.request_timeout(Duration::from_millis(100)))
        .await;
    match client.send("/clienttest/drop-callback", 1).await {
        Err(Error::Timeout { after }) => assert_eq!(after, Duration::from_millis(100)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The client is still usable.
    let reply = client.send("/clienttest/echo", 2).await.expect("send");
    assert_eq!(reply.code, 200);
    s.daemon.stop().await;
}

#[tokio::test]
async fn close_ends_subscriptions_streams_and_calls() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut sub = client.on("/news").await.expect("on");
    let mut events = client.events();
    let other = client.clone();
    client.close().await.expect("close");
    assert!(within("the stream ends", sub.recv()).await.is_none());
    assert!(matches!(
        other.send("/clienttest/echo", 1).await,
        Err(Error::Closed)
    ));
    within("the events end", async {
        while events.recv().await.is_some() {}
    })
    .await;
    until("the path is given back", || {
        s.server.subscriptions().is_empty()
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_big_requests_all_resolve_while_the_daemon_pushes_back() {
    // The daemon stops reading a client that leaves 8 replies unwritten; 64 KiB replies
    // fill the socket at once. The client must keep reading while it writes.
    let s = Setup::with(|st| st.ipc.max_pending_per_client = 8).await;
    let client = s.client().await;
    let big = "x".repeat(64 * 1024);
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (c, big) = (client.clone(), big.clone());
            tokio::spawn(async move { c.send("/clienttest/echo", json!([i, big])).await })
        })
        .collect();
    let mut answered = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let reply = within("every call resolves", call)
            .await
            .unwrap()
            .expect("a reply");
        match reply.code {
            // Each answer is its own request's echo, whole.
            200 => {
                assert_eq!(reply.data, json!([i, big]), "the answer to call {i}");
                answered += 1;
            }
            -3 => {
                let msg = reply.err_msg.unwrap_or_default();
                assert!(msg.contains("max_pending_per_client"), "call {i}: {msg}");
            }
            other => panic!("call {i}: unexpected code {other}: {:?}", reply.err_msg),
        }
    }
    // The cap lets 8 wait at once, so at least the first 8 cannot have been refused.
    assert!(answered >= 8, "only {answered} of 40 answered");
    s.daemon.stop().await;
}

#[tokio::test]
async fn status_reports_the_daemons_state() {
    let s = Setup::new().await;
    let client = s.client().await;
    let _sub = client.on("/news").await.expect("on");
    let st = client.status().await.expect("status");
    assert_eq!(st["state"], "open");
    assert_eq!(st["clients"], 1);
    assert_eq!(st["subscriptions"][0]["path"], "/news");
    s.daemon.stop().await;
}

#[tokio::test]
async fn no_daemon_is_a_typed_error_that_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    let err = Client::builder()
        .socket(&socket)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DaemonNotRunning { socket: s } if *s == socket),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("qiod --server ws://host:port/"), "{msg}");
    assert!(msg.contains("auto_start"), "{msg}");
    // A stale socket file (a daemon that died) is the same.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let err = Client::builder()
        .socket(&socket)
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DaemonNotRunning { .. }), "{err:?}");
}
