//! The daemon going away: restarts, answers to what was waiting, re-subscription.

use crate::common::*;
use qio_client::{Client, ConnectionEvent, Error};
use serde_json::{json, Value};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

/// Waits for the next connection event matching `f`, skipping others.
async fn next_matching(
    events: &mut qio_client::ConnectionEvents,
    what: &str,
    f: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    within(what, async {
        loop {
            match events.recv().await {
                Some(ev) if f(&ev) => return ev,
                Some(_) => {}
                None => panic!("the events ended while waiting for {what}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn after_a_daemon_restart_the_client_reconnects_and_keeps_its_subscriptions() {
    let Setup {
        server,
        daemon,
        dir: _dir,
    } = Setup::new().await;
    let socket = daemon.socket.clone();
    let client = Client::builder()
        .socket(&socket)
        .connect()
        .await
        .expect("connect");
    wait_open(&client).await;
    let mut news = client.on("/news").await.expect("on");
    let mut events = client.events();
    assert_eq!(events.recv().await, Some(ConnectionEvent::Open));

    daemon.stop().await;
    let gone = next_matching(&mut events, "DaemonGone", |e| {
        matches!(e, ConnectionEvent::DaemonGone { .. })
    })
    .await;
    assert!(matches!(gone, ConnectionEvent::DaemonGone { reason } if reason.contains("closed")));
    // While it is away, calls fail at once.
    assert!(matches!(
        client.send("/clienttest/echo", 1).await,
        Err(Error::Disconnected)
    ));
    assert!(matches!(
        client.emit("/x", 1).await,
        Err(Error::Disconnected)
    ));
    assert!(matches!(
        client.on("/other").await,
        Err(Error::Disconnected)
    ));

    let daemon = Daemon::start_at(&server.url(), &socket);
    let back = next_matching(&mut events, "DaemonBack", |e| {
        matches!(e, ConnectionEvent::DaemonBack { .. })
    })
    .await;
    assert!(
        matches!(
            back,
            ConnectionEvent::DaemonBack {
                resubscribed: 1,
                ..
            }
        ),
        "{back:?}"
    );
    next_matching(&mut events, "Open", |e| *e == ConnectionEvent::Open).await;
    within("the new daemon holds /news for the client", async {
        loop {
            let st = client.status().await.expect("status");
            if st["subscriptions"][0]["state"] == "active"
                && st["subscriptions"][0]["local_subscribers"] == 1
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    server.broadcast("/news", json!("after")).await;
    let ev = within("an event after the restart", news.recv())
        .await
        .expect("event");
    assert_eq!(ev.data, "after");
    let reply = client.send("/clienttest/echo", 2).await.expect("send");
    assert_eq!(reply.code, 200);
    daemon.stop().await;
}

#[tokio::test]
async fn a_daemon_stopping_answers_what_was_waiting_with_minus_one() {
    let s = Setup::new().await;
    let client = s.client().await;
    let c = client.clone();
    let send = tokio::spawn(async move { c.send("/clienttest/drop-callback", 1).await });
    let c = client.clone();
    let on = tokio::spawn(async move { c.on("/clienttest/in-progress").await });
    until("the server has both requests", || {
        let got = s.server.received();
        got.iter().any(|r| r.path == "/clienttest/drop-callback")
            && got.iter().any(|r| r.path == "/qio/on")
    })
    .await;
    let Setup { daemon, .. } = s;
    daemon.stop().await;
    let reply = within("the send", send).await.unwrap().expect("a reply");
    assert_eq!(reply.code, -1, "{reply:?}");
    match within("the on", on).await.unwrap() {
        Err(Error::Server { code: -1, .. }) => {}
        other => panic!("expected -1, got {other:?}"),
    }
}

#[tokio::test]
async fn a_subscription_the_server_refuses_to_restore_ends_and_is_reported() {
    let s = Setup::new().await;
    let client = s.client().await;
    let mut x = client.on("/x").await.expect("on");
    let mut y = client.on("/y").await.expect("on");
    let mut events = client.events();
    s.server.set_refuse_subscriptions("/x", Some(401));
    s.server.kill().await;
    s.server.restart().await.expect("restart");
    let ev = next_matching(&mut events, "the refusal", |e| {
        matches!(e, ConnectionEvent::Error { .. })
    })
    .await;
    assert_eq!(
        ev,
        ConnectionEvent::Error {
            op: Some("on".into()),
            path: Some("/x".into()),
            code: 401,
            err_msg: "subscription refused".into()
        }
    );
    assert!(within("/x ends", x.recv()).await.is_none());
    until("/y is restored", || {
        s.server.subscriptions().get("/y") == Some(&1)
    })
    .await;
    s.server.broadcast("/y", json!(1)).await;
    assert_eq!(within("/y", y.recv()).await.expect("event").data, 1);
    s.daemon.stop().await;
}

/// A scripted daemon: accepts one client, says `/open`, and lets the test read its lines.
struct Fake {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Fake {
    async fn accept(listener: &UnixListener) -> Fake {
        let (stream, _) = within("a client connects", listener.accept())
            .await
            .expect("accept");
        let (r, writer) = stream.into_split();
        let mut fake = Fake {
            lines: BufReader::new(r).lines(),
            writer,
        };
        fake.say(json!({"event": "/open"})).await;
        fake
    }

    async fn say(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).await.expect("write");
    }

    async fn read(&mut self) -> Value {
        let line = within("a request line", self.lines.next_line())
            .await
            .expect("read")
            .expect("a line");
        serde_json::from_str(&line).expect("JSON")
    }
}

async fn fake_client(socket: &Path, listener: &UnixListener) -> (Client, Fake) {
    let (client, fake) = tokio::join!(
        Client::builder().socket(socket).connect(),
        Fake::accept(listener)
    );
    (client.expect("connect"), fake)
}

#[tokio::test]
async fn every_waiting_call_resolves_when_the_daemon_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (client, mut fake) = fake_client(&socket, &listener).await;
    let mut events = client.events();
    assert_eq!(events.recv().await, Some(ConnectionEvent::Open));

    // A subscription the fake confirms, then three calls it never answers.
    let c = client.clone();
    let sub = tokio::spawn(async move { c.on("/kept").await });
    let on = fake.read().await;
    assert_eq!((&on["op"], &on["path"]), (&json!("on"), &json!("/kept")));
    fake.say(json!({"id": on["id"], "code": 200, "data": null}))
        .await;
    let mut kept = within("the subscription", sub).await.unwrap().expect("on");
    let c = client.clone();
    let send = tokio::spawn(async move { c.send("/a", 1).await });
    let c = client.clone();
    let on = tokio::spawn(async move { c.on("/b").await });
    let c = client.clone();
    let status = tokio::spawn(async move { c.status().await });
    let mut ids = Vec::new();
    for _ in 0..3 {
        let req = fake.read().await;
        ids.push(req["id"].as_u64().expect("a numeric id"));
    }
    ids.sort_unstable();
    assert_eq!(ids, [2, 3, 4], "ids count up from 1");
    fake.say(json!({"event": "/lost", "data": {"count": 5}}))
        .await;
    assert_eq!(
        next_matching(&mut events, "Lost", |e| matches!(
            e,
            ConnectionEvent::Lost { .. }
        ))
        .await,
        ConnectionEvent::Lost {
            count: 5,
            path: None
        }
    );

    drop(fake);
    assert!(matches!(
        within("send", send).await.unwrap(),
        Err(Error::Disconnected)
    ));
    assert!(matches!(
        within("on", on).await.unwrap(),
        Err(Error::Disconnected)
    ));
    assert!(matches!(
        within("status", status).await.unwrap(),
        Err(Error::Disconnected)
    ));
    next_matching(&mut events, "DaemonGone", |e| {
        matches!(e, ConnectionEvent::DaemonGone { .. })
    })
    .await;

    // The client comes back by itself and asks for /kept again; the new daemon refuses.
    let mut fake = Fake::accept(&listener).await;
    let again = fake.read().await;
    assert_eq!(
        (&again["op"], &again["path"]),
        (&json!("on"), &json!("/kept"))
    );
    assert!(matches!(
        next_matching(&mut events, "DaemonBack", |e| matches!(
            e,
            ConnectionEvent::DaemonBack { .. }
        ))
        .await,
        ConnectionEvent::DaemonBack {
            resubscribed: 1,
            ..
        }
    ));
    fake.say(json!({"id": again["id"], "code": 401, "data": null, "err_msg": "no"}))
        .await;
    assert!(within("the refused subscription ends", kept.recv())
        .await
        .is_none());
    let ev = next_matching(&mut events, "the refusal", |e| {
        matches!(e, ConnectionEvent::Error { .. })
    })
    .await;
    assert!(
        matches!(ev, ConnectionEvent::Error { code: 401, .. }),
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_subscription_dropped_while_the_daemon_is_away_is_not_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (client, mut fake) = fake_client(&socket, &listener).await;
    let mut events = client.events();
    let c = client.clone();
    let subs = tokio::spawn(async move { (c.on("/gone").await, c.on("/stays").await) });
    for _ in 0..2 {
        let on = fake.read().await;
        fake.say(json!({"id": on["id"], "code": 200, "data": null}))
            .await;
    }
    let (gone, stays) = within("subscriptions", subs).await.unwrap();
    let (gone, _stays) = (gone.expect("on"), stays.expect("on"));
    drop(fake);
    next_matching(&mut events, "DaemonGone", |e| {
        matches!(e, ConnectionEvent::DaemonGone { .. })
    })
    .await;
    drop(gone);
    // Ends locally while the daemon is away.
    client.off("/nothing").await.expect("off");
    let mut fake = Fake::accept(&listener).await;
    let again = fake.read().await;
    assert_eq!(
        (&again["op"], &again["path"]),
        (&json!("on"), &json!("/stays"))
    );
    fake.say(json!({"id": again["id"], "code": 200, "data": null}))
        .await;
    // Nothing else was asked: the next line is the status below.
    let c = client.clone();
    let st = tokio::spawn(async move { c.status().await });
    let next = fake.read().await;
    assert_eq!(next["op"], "status");
    fake.say(json!({"id": next["id"], "code": 200, "data": {"state": "open"}}))
        .await;
    assert_eq!(
        within("status", st).await.unwrap().expect("status")["state"],
        "open"
    );
}
