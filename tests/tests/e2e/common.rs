//! Shared fixtures for the end-to-end tests: the test server on port 0, the upstream
//! session with millisecond timings, a daemon in a temp dir, and wait-until helpers.

use qio_testserver::{ServerConfig, TestServer};
use qiod::driver::{self, DriverConfig, Notice, SessionHandle};
use qiod::session::{SessionConfig, StateChange};
use serde_json::value::RawValue;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A test server with millisecond heartbeats.
pub async fn server() -> TestServer {
    server_with(|_| {}).await
}

/// A test server with its configuration adjusted.
pub async fn server_with(f: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let mut cfg = ServerConfig::default();
    f(&mut cfg);
    TestServer::start(cfg).await.expect("test server starts")
}

/// Session settings for tests: every interval in milliseconds.
pub fn fast_config(urls: &[String]) -> DriverConfig {
    let servers = urls.iter().map(|u| Url::parse(u).expect("url")).collect();
    let mut s = SessionConfig::new(servers);
    s.heartbeat_interval = Duration::from_secs(5);
    s.ping_timeout = Duration::from_secs(2);
    s.request_timeout = Duration::from_secs(5);
    s.handshake_timeout = Duration::from_secs(2);
    s.backoff_initial = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(200);
    let mut d = DriverConfig::new(s);
    d.seed = 42;
    d
}

/// A running upstream session with its notices.
pub struct Upstream {
    /// Talk to the session.
    pub handle: SessionHandle,
    /// What the session reports.
    pub notices: mpsc::Receiver<Notice>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The generation each path was last wanted for, as the hub would keep it.
    gens: std::collections::HashMap<String, u64>,
    next_gen: u64,
}

impl Upstream {
    /// Starts a session against one server.
    pub async fn start(url: &str) -> Upstream {
        Upstream::start_with(fast_config(&[url.to_owned()])).await
    }

    /// Starts a session with the given configuration and waits until it is open.
    pub async fn start_with(cfg: DriverConfig) -> Upstream {
        let mut up = Upstream::spawn(cfg);
        up.wait_open().await;
        up
    }

    /// Starts a session without waiting for anything.
    pub fn spawn(cfg: DriverConfig) -> Upstream {
        let stop = CancellationToken::new();
        let (handle, notices, task) = driver::spawn(cfg, stop.clone()).expect("session starts");
        Upstream {
            handle,
            notices,
            stop,
            task,
            gens: Default::default(),
            next_gen: 0,
        }
    }

    /// Waits for the next notice matching `f`, skipping others; fails the test at the deadline.
    pub async fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&Notice) -> Option<T>) -> T {
        let fut = async {
            while let Some(n) = self.notices.recv().await {
                if let Some(t) = f(&n) {
                    return Some(t);
                }
            }
            None
        };
        match tokio::time::timeout(DEADLINE, fut).await {
            Ok(Some(t)) => t,
            Ok(None) => panic!("session ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    /// Waits until the session reports open.
    pub async fn wait_open(&mut self) -> Url {
        self.wait_for("open", |n| match n {
            Notice::State(StateChange::Open { url }) => Some(url.clone()),
            _ => None,
        })
        .await
    }

    /// Waits until the session reports a closed connection; returns the reason.
    pub async fn wait_closed(&mut self) -> String {
        self.wait_for("closed", |n| match n {
            Notice::State(StateChange::Closed { reason }) => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for an event on `path`; returns its data and callback handle.
    pub async fn wait_event(
        &mut self,
        path: &str,
    ) -> (serde_json::Value, Option<qiod::session::CbHandle>) {
        self.wait_for(&format!("an event on {path}"), |n| match n {
            Notice::Event(e) if e.path == path => {
                Some((serde_json::from_str(e.data.get()).expect("json"), e.cb))
            }
            _ => None,
        })
        .await
    }

    /// Asserts that nothing reported so far is an event or a lost connection: for checks
    /// that something the server sent changed nothing.
    pub fn assert_no_event_nor_close(&mut self, what: &str) {
        while let Ok(n) = self.notices.try_recv() {
            assert!(
                !matches!(
                    n,
                    Notice::Event(_) | Notice::State(StateChange::Closed { .. })
                ),
                "{what}: {n:?}"
            );
        }
    }

    /// Sends a conformance trigger (`/clienttest/close`, `move`, `send-invalid`...) as a
    /// request whose answer nobody waits for. Not fire-and-forget: with
    /// `fire_and_forget = "at-least-once"` such events are sent again after a broken
    /// connection, and a trigger that breaks the connection would then fire twice.
    pub async fn trigger(&self, path: &str, data: &str) {
        drop(self.handle.request_deferred(path, raw(data)).await);
    }

    /// Wants `path` for a fresh generation, as the hub does for its first subscriber, and
    /// waits for the session's answer about it (skipping other notices).
    pub async fn subscribe(
        &mut self,
        path: &str,
        data: Option<Box<RawValue>>,
    ) -> qiod::session::Outcome {
        let gen = self.want(path, data).await;
        self.wait_subscription(path, gen).await
    }

    /// Wants `path` for a fresh generation without waiting; returns the generation.
    pub async fn want(&mut self, path: &str, data: Option<Box<RawValue>>) -> u64 {
        self.next_gen += 1;
        let gen = self.next_gen;
        self.gens.insert(path.to_owned(), gen);
        self.handle.want(path, data, gen).await;
        gen
    }

    /// Waits for the session's answer about `path` for generation `gen`.
    pub async fn wait_subscription(&mut self, path: &str, gen: u64) -> qiod::session::Outcome {
        self.wait_for(&format!("the answer about {path}"), |n| match n {
            Notice::Subscription {
                path: p,
                gen: g,
                outcome,
            } if p == path && *g == gen => Some(outcome.clone()),
            _ => None,
        })
        .await
    }

    /// Ends the generation `path` was last wanted for, as the hub does when its last
    /// subscriber leaves.
    pub async fn unsubscribe(&mut self, path: &str) {
        let gen = self.gens.remove(path).unwrap_or(0);
        self.handle.unwant(path, gen).await;
    }

    /// The conformance app's in-progress exchange, whatever the transport: `on` (the
    /// server holds it pending), `off` before any answer, `on` again (answered 202), then
    /// the approval, which must confirm the second `on`.
    pub async fn in_progress_on_off_on(&mut self, server: &TestServer) {
        let path = "/clienttest/in-progress";
        let first = self.want(path, None).await;
        until_received(server, "/qio/on").await;
        self.handle.unwant(path, first).await;
        until_received(server, "/qio/off").await;
        let second = self.want(path, None).await;
        until("the second on reached the server", || async {
            server
                .received()
                .iter()
                .filter(|r| r.path == "/qio/on")
                .count()
                == 2
        })
        .await;
        self.handle
            .emit(path, raw("null"))
            .await
            .expect("the approval is accepted");
        let out = self.wait_subscription(path, second).await;
        assert_eq!(out.code, 200, "the approval confirms the second on");
    }

    /// Stops the session and waits for its task.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// JSON text as the session's data type.
pub fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).expect("valid JSON")
}

/// Waits until the server has received a frame on `path`.
pub async fn until_received(server: &TestServer, path: &str) {
    until(&format!("the server received {path}"), || async {
        server.received().iter().any(|r| r.path == path)
    })
    .await;
}

/// Waits until the server holds no subscription at all.
pub async fn until_unsubscribed(server: &TestServer) {
    until("the server holds no subscription", || async {
        server.subscriptions().is_empty()
    })
    .await;
}

/// Polls `f` every few milliseconds until it is true; fails the test at the deadline.
pub async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !f().await {
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A daemon running in-process on a socket in its own temp dir.
pub struct Daemon {
    /// The socket path.
    pub socket: std::path::PathBuf,
    /// Sends reloads, as SIGHUP does.
    pub reload: mpsc::Sender<qiod::Reload>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// Daemon settings for tests around fast session timings.
pub fn daemon_settings(url: &str) -> qiod::Settings {
    qiod::Settings {
        driver: fast_config(&[url.to_owned()]),
        ipc: qiod::ipc::IpcConfig::default(),
    }
}

impl Daemon {
    /// Starts a daemon against one server.
    pub async fn start(url: &str) -> Daemon {
        Daemon::start_with(daemon_settings(url)).await
    }

    /// Starts a daemon with the given settings.
    pub async fn start_with(settings: qiod::Settings) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("qiod.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let stop = CancellationToken::new();
        let (reload, reload_rx) = mpsc::channel(4);
        let task = tokio::spawn(qiod::run(settings, listener, stop.clone(), reload_rx));
        Daemon {
            socket,
            reload,
            stop,
            task,
            _dir: dir,
        }
    }

    /// A new raw line client; waits for the daemon's first line (the state event).
    pub async fn client(&self) -> LineClient {
        LineClient::connect(&self.socket).await
    }

    /// A client that has seen `/open`.
    pub async fn open_client(&self) -> LineClient {
        let mut c = self.client().await;
        loop {
            let ev = c.next_event().await;
            if ev["event"] == "/open" {
                return c;
            }
        }
    }

    /// Stops the daemon (like SIGTERM) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let res = tokio::time::timeout(DEADLINE, self.task).await;
        res.expect("daemon stops in time")
            .expect("no panic")
            .expect("clean exit");
    }

    /// Cancels without waiting.
    pub fn cancel(&self) {
        self.stop.cancel();
    }
}

/// A local client speaking raw JSON lines, as any language would.
pub struct LineClient {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    /// The writing half, for raw bytes.
    pub writer: tokio::net::unix::OwnedWriteHalf,
}

impl LineClient {
    /// Connects to a socket.
    pub async fn connect(path: &std::path::Path) -> LineClient {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect");
        let (r, w) = stream.into_split();
        LineClient {
            lines: tokio::io::BufReader::new(r).lines(),
            writer: w,
        }
    }

    /// Writes raw bytes.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Writes one request line.
    pub async fn send(&mut self, v: serde_json::Value) {
        let mut line = serde_json::to_vec(&v).expect("json");
        line.push(b'\n');
        self.write_raw(&line).await;
    }

    /// The next line from the daemon, parsed; fails the test at the deadline.
    pub async fn next(&mut self) -> serde_json::Value {
        self.try_next()
            .await
            .expect("the daemon closed the connection")
    }

    /// The next line, or `None` when the daemon closed the connection.
    pub async fn try_next(&mut self) -> Option<serde_json::Value> {
        let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("timed out waiting for a line from the daemon")
            .expect("read");
        line.map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
    }

    /// The next event line (skipping nothing: a reply here fails the test).
    pub async fn next_event(&mut self) -> serde_json::Value {
        let v = self.next().await;
        assert!(v.get("event").is_some(), "expected an event, got {v}");
        v
    }

    /// Waits for the reply with this id, skipping events.
    pub async fn reply(&mut self, id: serde_json::Value) -> serde_json::Value {
        loop {
            let v = self.next().await;
            if v.get("id") == Some(&id) {
                return v;
            }
            assert!(
                v.get("event").is_some(),
                "unexpected reply {v} while waiting for id {id}"
            );
        }
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&mut self, mut v: serde_json::Value, id: u64) -> serde_json::Value {
        v["id"] = id.into();
        self.send(v).await;
        self.reply(id.into()).await
    }

    /// Subscribes with `on` and checks the daemon confirmed it.
    pub async fn subscribe(&mut self, path: &str, id: u64) {
        let r = self
            .call(serde_json::json!({"op": "on", "path": path}), id)
            .await;
        assert_eq!(r["code"], 200, "on {path}: {r}");
    }

    /// Unsubscribes and checks the daemon's answer.
    pub async fn unsubscribe(&mut self, path: &str, id: u64) {
        let r = self
            .call(serde_json::json!({"op": "off", "path": path}), id)
            .await;
        assert_eq!(r["code"], 200, "off {path}: {r}");
    }

    /// Waits for an event on `path`, skipping others.
    pub async fn event(&mut self, path: &str) -> serde_json::Value {
        loop {
            let v = self.next().await;
            if v["event"] == path {
                return v;
            }
        }
    }
}

/// Runs the test named `name` (its full path in this binary, `chaos::chaos_soak`) again in a
/// process of its own, this test binary run for that test alone, and returns true there
/// (the caller returns at once; the child's failure fails it). Returns false in that child,
/// where the caller does the work. For a test that checks process-wide counts (open file
/// descriptors, panics): the other tests of this binary run beside it and would change them.
/// The child's output is passed on line by line as it comes (shown with `--nocapture`).
pub fn in_own_process(name: &str) -> bool {
    const VAR: &str = "QIOD_TEST_OWN_PROCESS";
    if std::env::var_os(VAR).is_some_and(|v| v == name) {
        return false;
    }
    use std::io::BufRead;
    let me = std::env::current_exe().expect("this test binary");
    let mut child = std::process::Command::new(me)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("this test binary runs again");
    let stderr = child.stderr.take().expect("stderr piped");
    let errors = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
        }
    });
    let stdout = child.stdout.take().expect("stdout piped");
    let mut ran = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        ran |= line.starts_with("test result: ok. 1 passed");
        println!("{line}");
    }
    let _ = errors.join();
    let status = child.wait().expect("wait for the child");
    assert!(
        status.success(),
        "{name} failed in its own process: {status}"
    );
    assert!(
        ran,
        "{name} did not run in its own process (is the name right?)"
    );
    true
}
