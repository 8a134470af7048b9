//! Auto-start with the real `qiod` binary: two clients racing start exactly one daemon.

use crate::common::*;
use qio_client::Client;
use rustix::process::{kill_process, Pid, Signal};

fn terminate(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a daemon's pid");
    kill_process(pid, Signal::TERM).expect("SIGTERM to the daemon the client started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_racing_start_one_daemon() {
    let qiod = qiod_binary();
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    // A folder that does not exist yet: the starter creates it, private.
    let socket = dir.path().join("run").join("qiod.sock");
    let builder = || {
        Client::builder()
            .socket(&socket)
            .auto_start(true)
            .qiod_path(&qiod)
            .auto_start_args(["--server", server.url().as_str(), "--log", "warn"])
    };
    let (a, b) = within("both clients connect", async {
        tokio::join!(builder().connect(), builder().connect())
    })
    .await;
    let (a, b) = (a.expect("a connects"), b.expect("b connects"));
    let started: Vec<u32> = [a.started_daemon(), b.started_daemon()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(started.len(), 1, "exactly one client started a daemon");
    let pid = started[0];

    wait_open(&a).await;
    let reply = a.send("/clienttest/echo", "from a").await.expect("send");
    assert_eq!((reply.code, reply.data.as_str()), (200, Some("from a")));
    let st = b.status().await.expect("status");
    assert_eq!(st["clients"], 2, "both talk to the same daemon: {st}");
    // A third client finds the daemon and starts nothing.
    let c = builder().connect().await.expect("c connects");
    assert_eq!(c.started_daemon(), None);

    terminate(pid);
    until("the daemon removed its socket", || !socket.exists()).await;
}
