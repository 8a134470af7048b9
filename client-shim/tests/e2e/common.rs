//! Fixtures: the test server on port 0, the real daemon in-process on a socket in a temp
//! dir (restartable on the same path), and a wait-until helper. A few lines taken from the
//! workspace's end-to-end fixtures (`tests/tests/e2e/common.rs`).

use qio_testserver::{ServerConfig, TestServer};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A test server on 127.0.0.1, port 0.
pub async fn server() -> TestServer {
    TestServer::start(ServerConfig::default())
        .await
        .expect("test server starts")
}

/// Daemon settings with millisecond session timings.
pub fn daemon_settings(url: &str) -> qiod::Settings {
    let url = qiod::session::parse_server_url(url).expect("url");
    let mut s = qiod::session::SessionConfig::new(vec![url]);
    s.heartbeat_interval = Duration::from_secs(5);
    s.ping_timeout = Duration::from_secs(2);
    s.request_timeout = Duration::from_secs(5);
    s.handshake_timeout = Duration::from_secs(2);
    s.backoff_initial = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(200);
    let mut driver = qiod::driver::DriverConfig::new(s);
    driver.seed = 42;
    qiod::Settings {
        driver,
        ipc: qiod::ipc::IpcConfig::default(),
    }
}

/// A daemon running in-process (`qiod::run`) on a socket path.
pub struct Daemon {
    pub socket: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Starts a daemon against `url` listening on `socket` (a stale socket file is replaced).
    pub fn start_at(url: &str, socket: &Path) -> Daemon {
        Daemon::start_with(daemon_settings(url), socket)
    }

    /// Starts a daemon with the given settings.
    pub fn start_with(settings: qiod::Settings, socket: &Path) -> Daemon {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        let stop = CancellationToken::new();
        let (_reload, reload_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(qiod::run(settings, listener, stop.clone(), reload_rx));
        Daemon {
            socket: socket.to_owned(),
            stop,
            task,
        }
    }

    /// Stops the daemon (as SIGTERM does) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("daemon stops in time")
            .expect("no panic")
            .expect("clean exit");
    }
}

/// A test server and a daemon on a socket in a temp dir.
pub struct Setup {
    pub server: TestServer,
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub async fn new() -> Setup {
        Setup::with(|_| {}).await
    }

    /// A setup whose daemon settings are adjusted first.
    pub async fn with(f: impl FnOnce(&mut qiod::Settings)) -> Setup {
        let server = server().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = daemon_settings(&server.url());
        f(&mut settings);
        let daemon = Daemon::start_with(settings, &dir.path().join("qiod.sock"));
        Setup {
            server,
            daemon,
            dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.daemon.socket
    }

    /// A client of the daemon, once the daemon's upstream connection is open.
    pub async fn client(&self) -> qio_client::Client {
        self.client_with(|b| b).await
    }

    /// A client built from an adjusted builder, once the upstream connection is open.
    pub async fn client_with(
        &self,
        f: impl FnOnce(qio_client::Builder) -> qio_client::Builder,
    ) -> qio_client::Client {
        let client = f(qio_client::Client::builder().socket(self.socket()))
            .connect()
            .await
            .expect("client connects");
        wait_open(&client).await;
        client
    }
}

/// Waits until the client reports the daemon's upstream connection open.
pub async fn wait_open(client: &qio_client::Client) {
    let mut events = client.events();
    within("the upstream connection opens", async {
        while let Some(ev) = events.recv().await {
            if ev == qio_client::ConnectionEvent::Open {
                return;
            }
        }
        panic!("the client ended");
    })
    .await;
}

/// Awaits `fut`, failing the test at the deadline.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `f` every few milliseconds until it is true; fails the test at the deadline.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `target/<profile>/qiod`, beside this test's `deps` folder; built when missing
/// (`cargo test --workspace` has built it already, for the daemon's own tests).
pub fn qiod_binary() -> PathBuf {
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
