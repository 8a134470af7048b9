//! The `qiod` binary under a service manager, as systemd runs it: socket activation,
//! `sd_notify` readiness, status, watchdog and stopping.
//!
//! No systemd is needed: each test plays its part (passes the socket, listens on the
//! notification socket) the way `sd_listen_fds(3)` and `sd_notify(3)` describe it.

use crate::common::Qiod;
use qio_testserver::{ServerConfig, TestServer};
use rustix::io::FdFlags;
use rustix::process::Signal;
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixDatagram, UnixStream};

const DEADLINE: Duration = Duration::from_secs(10);

struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Client {
    async fn connect(path: &Path) -> Client {
        let start = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(path).await {
                let (r, w) = s.into_split();
                return Client {
                    r: BufReader::new(r),
                    w,
                };
            }
            assert!(
                start.elapsed() < DEADLINE,
                "qiod never listened on {path:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn send(&mut self, line: Value) {
        let mut text = line.to_string();
        text.push('\n');
        self.w.write_all(text.as_bytes()).await.expect("write");
    }

    async fn read(&mut self, limit: Duration) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(limit, self.r.read_line(&mut line))
            .await
            .expect("a line in time")
            .expect("read");
        (n > 0).then(|| serde_json::from_str(&line).expect("json"))
    }

    async fn until(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.until_within(what, DEADLINE, f).await
    }

    /// [`Client::until`] with each line allowed `limit`.
    async fn until_within(
        &mut self,
        what: &str,
        limit: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        loop {
            let v = self
                .read(limit)
                .await
                .unwrap_or_else(|| panic!("end of stream before {what}"));
            if f(&v) {
                return v;
            }
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn socket_activation_serves_the_passed_socket_and_leaves_its_file() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // What systemd's qiod.socket does: bind and listen, then hand the fd over.
    let activated = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&activated).unwrap();
    // The child's copy to hand over; the test keeps `listener`, as systemd keeps its own.
    let handed = OwnedFd::from(listener.try_clone().unwrap());
    // The daemon's own socket setting, which a passed socket overrides.
    let configured = dir.path().join("own").join("qiod.sock");

    // sd_listen_fds(3) takes the fds only when LISTEN_PID is the process's own pid, which
    // is unknown until the fork. Setting it in pre_exec would need setenv, which may
    // allocate, and allocating between fork and exec of a multithreaded process (this test
    // runtime) can deadlock on a lock another thread held at the fork. So a shell sets it:
    // `$$` is the shell's pid, and `exec` keeps that pid for qiod. pre_exec only does dup2
    // and fcntl, which are async-signal-safe.
    let mut cmd = Qiod::isolate(Command::new("/bin/sh"), dir.path());
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_qiod"))
        .args(["--server", &server.url(), "--socket"])
        .arg(&configured)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "qiod.socket");
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // calls (dup2, fcntl) on fds it owns in the child.
    unsafe {
        cmd.pre_exec(move || {
            const LISTEN_FDS_START: RawFd = 3;
            if handed.as_raw_fd() == LISTEN_FDS_START {
                // dup2 onto itself would keep close-on-exec: clear it by hand.
                let flags = rustix::io::fcntl_getfd(&handed)?;
                rustix::io::fcntl_setfd(&handed, flags - FdFlags::CLOEXEC)?;
            } else {
                // rustix's dup2 takes the target as an OwnedFd, which fd 3 may not be here;
                // nix's dup2_raw takes a number. SAFETY: after the fork nothing in the child
                // closes fd 3 (whatever held it is close-on-exec and never dropped before
                // the exec), and the new fd is released at once so that it stays open for
                // qiod.
                let passed = nix::unistd::dup2_raw(&handed, LISTEN_FDS_START)?;
                let _ = passed.into_raw_fd();
            }
            Ok(())
        });
    }
    let mut qiod = Qiod::start(cmd);

    let mut client = Client::connect(&activated).await;
    client.until("/open", |v| v["event"] == "/open").await;
    client
        .send(json!({"op": "send", "path": "/clienttest/echo", "data": "hi", "id": 1}))
        .await;
    let answer = client.until("the echo", |v| v["id"] == 1).await;
    assert_eq!(answer["code"], 200, "{answer}");
    assert_eq!(answer["data"], "hi", "{answer}");
    assert!(
        !configured.exists() && !configured.parent().unwrap().exists(),
        "with a passed socket, qiod binds nothing of its own"
    );

    qiod.signal(Signal::TERM);
    client.until("/close", |v| v["event"] == "/close").await;
    assert!(qiod.wait_exit_async().await.success());
    assert!(
        is_socket(&activated),
        "the socket file belongs to systemd and stays after qiod exits"
    );
    // And it still listens (systemd keeps it to start qiod again on the next client).
    std::os::unix::net::UnixStream::connect(&activated).expect("still listening");
    drop(listener);
}

/// The notifications a daemon sent, line by line, in order.
struct Notes {
    socket: UnixDatagram,
    lines: Vec<String>,
    /// Lines before this one were matched by an earlier expectation.
    cursor: usize,
}

impl Notes {
    fn bind(path: &Path) -> Notes {
        Notes {
            socket: UnixDatagram::bind(path).expect("bind the notification socket"),
            lines: Vec::new(),
            cursor: 0,
        }
    }

    /// Waits for a line after the last matched one that satisfies `f`, and returns it.
    async fn expect(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.lines[self.cursor..].iter().position(|l| f(l)) {
                self.cursor += i + 1;
                return self.lines[self.cursor - 1].clone();
            }
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(n) => n.expect("recv"),
                Err(_) => panic!("{what}: not in time; got {:#?}", self.lines),
            };
            let text = String::from_utf8(buf[..n].to_vec()).expect("utf-8");
            self.lines
                .extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        }
    }
}

#[tokio::test]
async fn tells_systemd_ready_status_watchdog_and_stopping() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let mut notes = Notes::bind(&notify_path);
    let socket = dir.path().join("qiod.sock");

    let mut cmd = Qiod::command(dir.path());
    cmd.args(["--server", &server.url(), "--socket"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        // 200 ms: a keep-alive every 100 ms. WATCHDOG_PID stays unset, which sd-notify
        // (like libsystemd) reads as "meant for whoever reads it".
        .env("WATCHDOG_USEC", "200000");
    let mut qiod = Qiod::start(cmd);

    notes.expect("READY=1", |l| l == "READY=1").await;
    // Ready means the socket accepts clients.
    drop(Client::connect(&socket).await);
    notes
        .expect("the open status", |l| {
            l.starts_with("STATUS=open ws://127.0.0.1:")
        })
        .await;
    notes.expect("a keep-alive", |l| l == "WATCHDOG=1").await;
    notes
        .expect("a second keep-alive", |l| l == "WATCHDOG=1")
        .await;

    // Upstream trouble shows in the status, and the keep-alives go on: the daemon itself
    // is healthy, and restarting it would not bring the server back.
    server.kill().await;
    let status = notes
        .expect("a reconnecting status", |l| {
            l.starts_with("STATUS=") && l.contains("connecting")
        })
        .await;
    assert!(!status.contains("open ws://"), "{status}");
    notes
        .expect("a keep-alive while reconnecting", |l| l == "WATCHDOG=1")
        .await;

    qiod.signal(Signal::TERM);
    notes.expect("STOPPING=1", |l| l == "STOPPING=1").await;
    assert!(qiod.wait_exit_async().await.success());
}

/// The watchdog follows the session loop answering, so a loop that waited on the server
/// would get qiod killed for an upstream stall. Here the server stops reading while a
/// client pushes 48 MiB at it, far beyond what loopback buffers hold: the writer is stuck
/// on the socket, and the keep-alives must go on all the same.
#[tokio::test]
async fn a_stalled_server_does_not_starve_the_watchdog() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let mut notes = Notes::bind(&notify_path);
    let socket = dir.path().join("qiod.sock");
    let mut cmd = Qiod::command(dir.path());
    cmd.args(["--server", &server.url(), "--socket"])
        .arg(&socket)
        // Nothing may give up on the stalled server during the test: no heartbeat, a
        // write deadline of a minute, room for every event.
        .args([
            "--heartbeat-interval-ms",
            "600000",
            "--ping-timeout-ms",
            "60000",
        ])
        .args([
            "--queue-max-bytes",
            "268435456",
            "--queue-max-events",
            "100000",
        ])
        .args(["--write-queue-bytes", "268435456"])
        .env("NOTIFY_SOCKET", &notify_path)
        // A keep-alive every 100 ms, each probe allowed 50 ms.
        .env("WATCHDOG_USEC", "200000");
    let mut qiod = Qiod::start(cmd);
    notes.expect("READY=1", |l| l == "READY=1").await;
    let mut client = Client::connect(&socket).await;
    client.until("/open", |v| v["event"] == "/open").await;
    notes.expect("a keep-alive", |l| l == "WATCHDOG=1").await;

    server.set_stalled(true);
    const EVENTS: u64 = 768;
    let line = json!({"op": "send", "path": "/flood", "data": "x".repeat(64 * 1024)});
    let mut text = line.to_string();
    text.push('\n');
    let flood = tokio::spawn(async move {
        for _ in 0..EVENTS {
            client.w.write_all(text.as_bytes()).await.expect("write");
        }
        client
    });
    // Every event has gone to the writer once `status` counts it; `status` itself takes
    // the path of the watchdog's probe (the session loop).
    let mut probe = Client::connect(&socket).await;
    let deadline = Instant::now() + DEADLINE;
    for id in 1u64.. {
        probe.send(json!({"op": "status", "id": id})).await;
        let st = tokio::time::timeout_at(
            deadline.into(),
            probe.until("the status", |v| v["id"] == id),
        )
        .await
        .expect("status answers while the server does not read");
        assert_eq!(st["data"]["state"], "open", "{st}");
        if st["data"]["events_out"].as_u64() == Some(EVENTS) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The writer is stuck now; keep-alives go on.
    for n in 0..5 {
        notes
            .expect(&format!("keep-alive {n} during the stall"), |l| {
                l == "WATCHDOG=1"
            })
            .await;
    }
    let log = qiod.log_text();
    assert!(
        !log.contains("withholding"),
        "a probe went unanswered:\n{log}"
    );

    server.set_stalled(false);
    let mut client = flood.await.unwrap();
    client
        .send(json!({"op": "send", "path": "/clienttest/echo", "data": 1, "id": 1}))
        .await;
    // The server first works through the 48 MiB held back during the stall (the debug
    // build, on a shared machine: seconds), so the echo gets longer than one deadline.
    let echo = client
        .until_within("the echo", 12 * DEADLINE, |v| v["id"] == 1)
        .await;
    assert_eq!(echo["code"], 200, "{echo}");
    qiod.signal(Signal::TERM);
    notes.expect("STOPPING=1", |l| l == "STOPPING=1").await;
    assert!(qiod.wait_exit_async().await.success());
}
