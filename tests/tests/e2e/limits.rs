//! Per-client caps end to end: a client past `max_subscriptions_per_client` or
//! `max_pending_per_client` gets -3 naming the setting, nothing of the refused request
//! goes upstream, and other clients carry on as if nothing happened.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;

const OVERLOADED: i64 = -3;

fn assert_capped(reply: &Value, setting: &str) {
    assert_eq!(reply["code"], OVERLOADED, "{reply}");
    let msg = reply["err_msg"].as_str().unwrap_or_default();
    assert!(msg.contains(setting), "{reply}");
}

#[tokio::test]
async fn max_subscriptions_per_client_caps_one_client_only() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.max_subscriptions_per_client = 2;
    let daemon = Daemon::start_with(settings).await;
    let mut a = daemon.open_client().await;
    let mut b = daemon.open_client().await;

    let on = |path: &str| json!({"op": "on", "path": path});
    assert_eq!(a.call(on("/news/a"), 1).await["code"], 200);
    assert_eq!(a.call(on("/news/b"), 2).await["code"], 200);
    let reply = a.call(on("/news/c"), 3).await;
    assert_capped(&reply, "max_subscriptions_per_client = 2");
    // `one` counts the same way; a path already held is not a new subscription.
    let reply = a.call(json!({"op": "one", "path": "/news/c"}), 4).await;
    assert_capped(&reply, "max_subscriptions_per_client");
    assert_eq!(a.call(on("/news/a"), 5).await["code"], 200);
    // Without an id the refusal is an /error event naming the op and the path.
    a.send(on("/news/d")).await;
    let ev = a.event("/error").await;
    assert_eq!(ev["data"]["op"], "on", "{ev}");
    assert_eq!(ev["data"]["path"], "/news/d", "{ev}");
    assert_capped(&ev["data"], "max_subscriptions_per_client");

    // The other client has its own allowance, on held and new paths alike.
    assert_eq!(b.call(on("/news/c"), 1).await["code"], 200);
    assert_eq!(b.call(on("/news/a"), 2).await["code"], 200);
    let reply = b.call(on("/news/d"), 3).await;
    assert_capped(&reply, "max_subscriptions_per_client");

    // Nothing refused went upstream; each path is held once.
    let held: HashSet<String> = server.subscriptions().into_keys().collect();
    let want: HashSet<String> = ["/news/a", "/news/b", "/news/c"].map(String::from).into();
    assert_eq!(held, want);

    // Both still get their events.
    server.broadcast("/news/a", json!("x")).await;
    assert_eq!(a.event("/news/a").await["data"], "x");
    assert_eq!(b.event("/news/a").await["data"], "x");

    // Giving one back frees a slot.
    assert_eq!(
        a.call(json!({"op": "off", "path": "/news/b"}), 6).await["code"],
        200
    );
    assert_eq!(a.call(on("/news/c"), 7).await["code"], 200);
    daemon.stop().await;
}

#[tokio::test]
async fn max_pending_per_client_caps_one_client_only() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.max_pending_per_client = 2;
    let daemon = Daemon::start_with(settings).await;
    let mut a = daemon.open_client().await;
    let mut b = daemon.open_client().await;

    // Two requests the server never answers fill the allowance.
    let never = |id: u64| json!({"op": "send", "path": "/clienttest/drop-callback", "id": id});
    a.send(never(1)).await;
    a.send(never(2)).await;
    let echo = |data: &str| json!({"op": "send", "path": "/clienttest/echo", "data": data});
    let reply = a.call(echo("refused"), 3).await;
    assert_capped(&reply, "max_pending_per_client = 2");
    // Subscribing with an id waits for an answer too, so it is capped the same way.
    let reply = a.call(json!({"op": "on", "path": "/news/a"}), 4).await;
    assert_capped(&reply, "max_pending_per_client");
    // Without an id nothing waits: it is sent.
    a.send(echo("no id")).await;

    // The other client is not held up.
    let reply = b.call(echo("from b"), 1).await;
    assert_eq!(
        (reply["code"].clone(), reply["data"].clone()),
        (json!(200), json!("from b"))
    );
    b.send(never(2)).await;
    let reply = b.call(echo("from b again"), 3).await;
    assert_eq!(reply["code"], 200, "{reply}");

    let sent = |s: &qio_testserver::TestServer, data: &str| {
        s.received()
            .iter()
            .any(|r| r.path == "/clienttest/echo" && r.data == json!(data))
    };
    assert!(server.wait_until(DEADLINE, |s| sent(s, "no id")).await);
    assert!(
        !sent(&server, "refused"),
        "a refused request never goes upstream"
    );
    assert!(!server.subscriptions().contains_key("/news/a"));

    // Once its requests are answered (-1: the server went away), the client may wait again.
    server.kill().await;
    let mut answered = HashSet::new();
    while answered.len() < 2 {
        let v = a.next().await;
        if let Some(id) = v.get("id").and_then(Value::as_u64) {
            assert_eq!(v["code"], -1, "{v}");
            answered.insert(id);
        }
    }
    assert_eq!(answered, HashSet::from([1, 2]));
    server.restart().await.expect("restart");
    a.event("/open").await;
    let reply = a.call(echo("after"), 5).await;
    assert_eq!(reply["code"], 200, "{reply}");
    daemon.stop().await;
}
