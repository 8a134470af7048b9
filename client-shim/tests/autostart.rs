//! Auto-start with the real `qiod` binary: two clients racing start exactly one daemon.

mod common;

use common::*;
use qio_client::Client;
use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/qiod`, beside this test's `deps` folder; built when missing
/// (`cargo test --workspace` has built it already, for the daemon's own tests).
fn qiod_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("qiod");
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "qiod", "--bin", "qiod", "--target-dir"]);
        build.arg(profile_dir.parent().expect("target dir"));
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p qiod failed");
    }
    assert!(bin.exists(), "no qiod at {}", bin.display());
    bin
}

fn terminate(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: a signal to the process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
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
