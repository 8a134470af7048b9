//! Slow clients: bounded in bytes as well as in events, and a disconnected one really loses
//! its socket (the daemon closes its descriptor within `client_close_grace_ms`), at
//! shutdown as well.

use crate::common::*;
use qiod::ipc::SlowClientPolicy;
use serde_json::json;
use std::io::ErrorKind;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Big enough that a few of them fill a Unix socket's buffers.
const EVENT_BYTES: usize = 64 * 1024;

/// Whether the daemon has closed its end: a write to a socket whose peer is closed fails
/// at once (EPIPE), while one whose peer is open but not reading is accepted or blocks.
async fn closed_by_daemon(c: &mut LineClient) -> bool {
    match tokio::time::timeout(Duration::from_millis(100), c.writer.write_all(b"\n")).await {
        Ok(Err(e)) => {
            assert!(
                matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
                "unexpected write error: {e}"
            );
            true
        }
        Ok(Ok(())) | Err(_) => false,
    }
}

/// Waits until the daemon has closed the client's socket; fails the test at the deadline.
async fn until_closed(c: &mut LineClient, what: &str) {
    let start = tokio::time::Instant::now();
    while !closed_by_daemon(c).await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn broadcast_big(server: &qio_testserver::TestServer, n: usize) {
    let payload = "x".repeat(EVENT_BYTES);
    for i in 0..n {
        server
            .broadcast("/feed", json!({"i": i, "p": payload}))
            .await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_its_socket_closed() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.slow_client = SlowClientPolicy::Disconnect;
    settings.ipc.client_queue_events = 8;
    settings.ipc.client_close_grace = Duration::from_millis(50);
    let daemon = Daemon::start_with(settings).await;
    let mut stalled = daemon.open_client().await;
    stalled.subscribe("/feed", 1).await;
    let mut other = daemon.open_client().await;
    // 4 MiB: more than the socket holds plus eight events, so the queue overflows.
    broadcast_big(&server, 64).await;
    until_closed(
        &mut stalled,
        "the daemon closed the stalled client's socket",
    )
    .await;
    // The daemon itself is unharmed and counts the client gone.
    let st = other.call(json!({"op": "status"}), 2).await;
    assert_eq!(st["data"]["clients"], 1, "{st}");
    daemon.stop().await;
}

#[tokio::test]
async fn at_shutdown_a_client_that_stops_reading_does_not_keep_its_socket() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    settings.ipc.client_close_grace = Duration::from_millis(50);
    // Room for every event, so the reader that reads only afterwards misses none.
    settings.ipc.client_queue_bytes = 64 * 1024 * 1024;
    let daemon = Daemon::start_with(settings).await;
    let mut stalled = daemon.open_client().await;
    stalled.subscribe("/feed", 1).await;
    let mut reader = daemon.open_client().await;
    reader.subscribe("/feed", 1).await;
    let n = 64;
    broadcast_big(&server, n).await;
    // Once the reader has every event, the stalled client's writer holds more than its
    // socket takes: it is stuck in a write (drop-oldest never disconnects it).
    for i in 0..n {
        assert_eq!(reader.event("/feed").await["data"]["i"], i);
    }
    assert!(!closed_by_daemon(&mut stalled).await, "still connected");
    daemon.stop().await;
    until_closed(
        &mut stalled,
        "the stopped daemon closed the stalled client's socket",
    )
    .await;
}

#[tokio::test]
async fn a_slow_client_is_bounded_in_bytes_not_only_in_events() {
    let server = server().await;
    let mut settings = daemon_settings(&server.url());
    // 64 events are far below the event bound; 256 KiB are four of them.
    settings.ipc.client_queue_events = 4096;
    settings.ipc.client_queue_bytes = 256 * 1024;
    let daemon = Daemon::start_with(settings).await;
    let mut slow = daemon.open_client().await;
    slow.subscribe("/feed", 1).await;
    let mut reader = daemon.open_client().await;
    reader.subscribe("/feed", 1).await;
    let n = 64;
    let payload = "x".repeat(EVENT_BYTES);
    // In lockstep with the reader, so it stays within its bound and the slow one's
    // outbox has seen every event once the loop ends.
    for i in 0..n {
        server
            .broadcast("/feed", json!({"i": i, "p": payload}))
            .await;
        assert_eq!(reader.event("/feed").await["data"]["i"], i);
    }
    let (got, lost, last) = read_feed(&mut slow, n).await;
    assert!(lost > 0, "the byte bound dropped events ({got} got)");
    assert_eq!(last, n - 1, "the newest event is kept");
    daemon.stop().await;
}

/// Reads `n` events of `/feed` (and any `/lost`) from `c`: the events got (checked to be in
/// order), the count announced lost, and the last event's number.
async fn read_feed(c: &mut LineClient, n: i64) -> (i64, i64, i64) {
    let (mut got, mut lost, mut last) = (0, 0, -1);
    while got + lost < n {
        let v = c.next().await;
        match v["event"].as_str() {
            Some("/lost") => lost += v["data"]["count"].as_i64().unwrap(),
            Some("/feed") => {
                let i = v["data"]["i"].as_i64().unwrap();
                assert!(i > last, "in order: {i} after {last}");
                last = i;
                got += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    (got, lost, last)
}

/// Asks `c`'s daemon for its status until `f` holds for it; fails the test at the deadline.
async fn until_status(c: &mut LineClient, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let start = tokio::time::Instant::now();
    loop {
        let st = c.call(json!({"op": "status"}), 99).await;
        if f(&st["data"]) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting until {what}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A flood for readers that all fall behind waits for them (`catch_up_wait_ms`) instead of
/// being read only to be dropped: a lone reader that stops reading until its queue is half
/// full, and then reads, loses nothing. With almost no wait, the same reader loses events.
#[tokio::test]
async fn a_flood_waits_for_its_readers_to_catch_up() {
    let n = 200;
    for (wait, paced) in [
        (Duration::from_secs(60), true),
        (Duration::from_millis(1), false),
    ] {
        let server = server().await;
        let mut settings = daemon_settings(&server.url());
        settings.ipc.client_queue_events = 16;
        settings.ipc.catch_up_wait = wait;
        let daemon = Daemon::start_with(settings).await;
        let mut reader = daemon.open_client().await;
        reader.subscribe("/feed", 1).await;
        let mut other = daemon.open_client().await;
        // 64 KiB events: a few fill the socket, so the reader's queue fills behind them.
        let flood = {
            let server = server.clone();
            tokio::spawn(async move { broadcast_big(&server, n as usize).await })
        };
        if paced {
            // The fan-out stops at the reader's half-full queue and waits, with most of
            // the flood not taken from the server yet.
            until_status(&mut other, "the fan-out waits for the reader", |st| {
                st["catch_up_waits"].as_u64() >= Some(1)
                    && st["events_delivered"].as_i64() < Some(n)
            })
            .await;
        } else {
            // Nothing waits for the reader: every event reaches its queue, most dropped.
            until_status(&mut other, "every event reached the reader's queue", |st| {
                st["events_delivered"].as_i64() == Some(n)
            })
            .await;
        }
        let (got, lost, _) = read_feed(&mut reader, n).await;
        if paced {
            assert_eq!((got, lost), (n, 0), "the reader caught up: nothing lost");
        } else {
            assert!(
                lost > 0,
                "without a wait the reader loses events ({got} got)"
            );
        }
        flood.await.unwrap();
        daemon.stop().await;
    }
}
