//! The daemon under test: the real `qiod` binary as a child process (the default), or
//! `qiod::run` on a runtime of its own inside the harness (a fallback when the binary is
//! missing; memory cannot be measured that way).

use crate::client::LineConn;
use crate::sys;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// How the daemon is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The binary if it is found, else in-process (with a warning).
    Auto,
    /// The `qiod` binary as a child process.
    Process,
    /// `qiod::run` on a dedicated runtime in this process.
    InProcess,
}

/// Where and how to start daemons, decided once per run.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The binary, when running as a process.
    pub binary: Option<PathBuf>,
    /// A command put in front of the binary (e.g. `valgrind --tool=callgrind`).
    pub prefix: Vec<String>,
    /// Extra qiod flags.
    pub extra: Vec<String>,
}

impl Launcher {
    /// Resolves the mode: finds the binary next to the harness (`target/<profile>/qiod`)
    /// unless a path is given.
    pub fn new(
        mode: Mode,
        binary: Option<PathBuf>,
        prefix: Vec<String>,
        extra: Vec<String>,
    ) -> anyhow::Result<Launcher> {
        let found = binary.or_else(default_binary).filter(|p| p.is_file());
        let binary = match (mode, found) {
            (Mode::InProcess, _) => None,
            (_, Some(path)) => {
                warn_if_stale(&path);
                Some(path)
            }
            (Mode::Process, None) => bail!(
                "the qiod binary was not found next to this executable; build it first: \
                 cargo build --release -p qiod (or pass --qiod PATH)"
            ),
            (Mode::Auto, None) => {
                eprintln!(
                    "warning: no qiod binary next to this executable (cargo build --release -p \
                     qiod); running the daemon in-process instead, and skipping `memory`"
                );
                None
            }
        };
        Ok(Launcher {
            binary,
            prefix,
            extra,
        })
    }

    /// Whether daemons run as their own process.
    pub fn is_process(&self) -> bool {
        self.binary.is_some()
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        match &self.binary {
            Some(p) if self.prefix.is_empty() => format!("process {}", p.display()),
            Some(p) => format!("process {} {}", self.prefix.join(" "), p.display()),
            None => "in-process (qiod::run on its own 2-thread runtime)".into(),
        }
    }

    /// Starts a daemon against `url` and waits until it is connected upstream (a probe
    /// client saw `/open`).
    pub async fn start(&self, url: &str) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let socket = dir.path().join("qiod.sock");
        let kind = match &self.binary {
            Some(bin) => self.spawn_process(bin, url, dir.path(), &socket)?,
            None => spawn_in_process(url, &socket)?,
        };
        let mut daemon = Daemon { kind, socket, dir };
        let timeout = if self.prefix.is_empty() { 10 } else { 120 };
        if let Err(e) = daemon.wait_open(Duration::from_secs(timeout)).await {
            let log = daemon.log();
            daemon.stop().await;
            bail!("{e:#}\nqiod's log:\n{log}");
        }
        Ok(daemon)
    }

    fn spawn_process(
        &self,
        bin: &Path,
        url: &str,
        dir: &Path,
        socket: &Path,
    ) -> anyhow::Result<Kind> {
        let log = std::fs::File::create(dir.join("qiod.log")).context("log file")?;
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        cmd.arg("--server")
            .arg(url)
            .arg("--socket")
            .arg(socket)
            .arg("--log")
            .arg("warn")
            .args(&self.extra);
        // Nothing from the environment may change the daemon's settings: no QIOD_* keys,
        // no config file, no systemd hand-over, no RUST_LOG.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("QIOD_")
                || matches!(
                    k.as_ref(),
                    "RUST_LOG" | "NOTIFY_SOCKET" | "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES"
                )
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env("XDG_CONFIG_HOME", dir)
            .env("XDG_RUNTIME_DIR", dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the daemon exited at once")?;
        Ok(Kind::Process { child, pid })
    }
}

/// `target/<profile>/qiod` next to this executable.
fn default_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("qiod"))
}

/// Warns when the binary is older than the daemon's sources: other people edit the daemon
/// while the harness rebuilds only its library.
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src");
    if let Some((newest, path)) = newest_file(&src) {
        if newest > built {
            eprintln!(
                "warning: {} is older than {}; rebuild it (cargo build --release -p qiod) \
                 to measure the current code",
                bin.display(),
                path.display()
            );
        }
    }
}

fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let cand = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok()?.modified().ok().map(|t| (t, path))
        };
        if let Some(c) = cand {
            if best.as_ref().is_none_or(|b| c.0 > b.0) {
                best = Some(c);
            }
        }
    }
    best
}

fn spawn_in_process(url: &str, socket: &Path) -> anyhow::Result<Kind> {
    let tids = Arc::new(Mutex::new(Vec::new()));
    let record = tids.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("qiod-inproc")
        .on_thread_start(move || {
            record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(sys::gettid())
        })
        .enable_all()
        .build()
        .context("daemon runtime")?;
    let servers = vec![url::Url::parse(url).context("server url")?];
    let settings = qiod::Settings {
        driver: qiod::driver::DriverConfig::new(qiod::session::SessionConfig::new(servers)),
        ipc: qiod::ipc::IpcConfig::default(),
    };
    let stop = CancellationToken::new();
    let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
    let socket = socket.to_owned();
    let token = stop.clone();
    // Bound inside the daemon's runtime so the listener uses that runtime's reactor.
    let task = rt.spawn(async move {
        let listener = tokio::net::UnixListener::bind(&socket).context("bind")?;
        qiod::run(settings, listener, token, reload_rx).await
    });
    Ok(Kind::InProcess {
        rt: Some(rt),
        tids,
        stop,
        task: Some(task),
        _reload: reload,
    })
}

enum Kind {
    Process {
        child: tokio::process::Child,
        pid: u32,
    },
    InProcess {
        rt: Option<tokio::runtime::Runtime>,
        tids: Arc<Mutex<Vec<i32>>>,
        stop: CancellationToken,
        task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
        _reload: tokio::sync::mpsc::Sender<qiod::Reload>,
    },
}

/// A running daemon.
pub struct Daemon {
    kind: Kind,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// The socket clients connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id, when it is a process.
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            Kind::Process { pid, .. } => Some(*pid),
            Kind::InProcess { .. } => None,
        }
    }

    /// CPU time used by the daemon so far (all its threads).
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        match &self.kind {
            Kind::Process { pid, .. } => sys::process_cpu(*pid),
            Kind::InProcess { tids, .. } => {
                let tids = tids.lock().unwrap_or_else(|e| e.into_inner()).clone();
                Ok(sys::threads_cpu(&tids))
            }
        }
    }

    /// Resident memory and its peak (process mode only).
    pub fn rss(&self) -> anyhow::Result<(u64, u64)> {
        match self.pid() {
            Some(pid) => sys::rss(pid),
            None => bail!("RSS needs the daemon as a process"),
        }
    }

    /// The daemon's stderr (process mode), for error reports.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("qiod.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_open(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Kind::Process { child, .. } = &mut self.kind {
                if let Some(status) = child.try_wait()? {
                    bail!("qiod exited during startup: {status}");
                }
            }
            if Instant::now() > deadline {
                bail!("qiod did not report /open within {timeout:?}");
            }
            if let Ok(mut probe) = LineConn::connect(&self.socket).await {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, probe.wait_event("/open"))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the daemon: SIGTERM (or the cancellation token) and a bounded wait.
    pub async fn stop(mut self) {
        match &mut self.kind {
            Kind::Process { child, pid } => {
                sys::signal(*pid, libc::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
            Kind::InProcess { rt, stop, task, .. } => {
                stop.cancel();
                if let Some(task) = task.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
                }
                // Dropping a runtime inside another one's context would panic.
                if let Some(rt) = rt.take() {
                    rt.shutdown_background();
                }
            }
        }
    }
}

impl Drop for Kind {
    fn drop(&mut self) {
        if let Kind::InProcess { rt, stop, .. } = self {
            stop.cancel();
            if let Some(rt) = rt.take() {
                rt.shutdown_background();
            }
        }
    }
}
