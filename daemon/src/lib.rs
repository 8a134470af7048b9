//! qiod: one persistent Quick.IO connection, shared by every local process.
//!
//! The layers, from the wire up: [`codec`] (pure frame encoding), [`session`] (the pure
//! protocol state machine), [`driver`] (the tokio task that owns the WebSocket), [`ipc`]
//! (the local socket server). [`run`] wires them together.
#![deny(missing_docs)]

pub mod codec;
pub mod config;
pub mod driver;
pub mod ipc;
pub mod json;
pub mod longpoll;
mod repeats;
pub mod session;
pub mod socket;
pub mod tls;

use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything [`run`] needs besides its listener.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The upstream side.
    pub driver: driver::DriverConfig,
    /// The local side.
    pub ipc: ipc::IpcConfig,
}

/// Settings that a reload (SIGHUP) can change while running.
#[derive(Debug, Clone)]
pub struct Reload {
    /// The new server addresses; a change of the current one reconnects.
    pub servers: Vec<url::Url>,
}

/// Runs the daemon on an already bound listener until `shutdown` is cancelled.
///
/// Taking the listener (rather than a path) lets tests run the daemon in-process and lets
/// systemd hand over a socket. On shutdown it stops accepting, answers every waiting
/// request with -1, closes the upstream connection and lets each client read its last
/// lines; removing the socket file is the caller's business.
pub async fn run(
    settings: Settings,
    listener: impl socket::IntoListener,
    shutdown: CancellationToken,
    reload: mpsc::Receiver<Reload>,
) -> anyhow::Result<()> {
    run_with(settings, listener, shutdown, reload, Observer::default()).await
}

/// What a supervisor (the binary's systemd integration) may watch of a running daemon.
///
/// Both are pushed by the daemon, so the watcher never polls for readiness or state, and
/// both are optional, so [`run`] (tests, embedders) pays nothing for them.
#[derive(Debug, Default)]
pub struct Observer {
    /// Gets a handle to the session once the session runs and the local server accepts
    /// clients: that moment is the daemon's readiness, and the handle lets the watcher ask
    /// the session loop whether it still answers ([`driver::SessionHandle::status`]).
    pub ready: Option<oneshot::Sender<driver::SessionHandle>>,
    /// Gets a copy of every upstream state change, in order. They are offered with
    /// `try_send`: a watcher that falls behind misses changes rather than slowing the
    /// delivery of events to clients.
    pub states: Option<mpsc::Sender<session::StateChange>>,
    /// Test hook: makes one essential task fail on demand.
    #[cfg(test)]
    fault: Option<fault::Fault>,
}

/// [`run`], telling `observer` when the daemon is ready and how the upstream connection
/// fares.
///
/// Every task of the daemon runs in one [`TaskTracker`], so this returns only when all of
/// them have ended. The driver, the notice loop and the accept loop are
/// essential: should one of them panic or end before the shutdown, the daemon would keep
/// answering `status` while delivering nothing, so it shuts down instead and returns an
/// error naming the task (the binary then exits non-zero and its service manager starts
/// it again). Restarting the task in place was not chosen: the notice loop's tables and the
/// driver's session are the only record of who holds what, and a fresh process rebuilds
/// both consistently.
pub async fn run_with(
    settings: Settings,
    listener: impl socket::IntoListener,
    shutdown: CancellationToken,
    mut reload: mpsc::Receiver<Reload>,
    observer: Observer,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = listener
        .into_listener()
        .context("cannot register the socket with the runtime")?;
    settings
        .ipc
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid local settings: {e}"))?;
    let request_timeout = settings.driver.session.request_timeout;
    let ping_timeout = settings.driver.session.ping_timeout;
    let tasks = TaskTracker::new();
    let (died_tx, mut died) = mpsc::channel(ESSENTIAL_TASKS);
    #[cfg(test)]
    let fault = observer.fault;
    let essential = |task: Task, fut: TaskFuture| {
        #[cfg(test)]
        let fut = fault::inject(task, fut, fault.clone());
        tasks.spawn(watch(task, fut, died_tx.clone()))
    };
    let upstream_stop = CancellationToken::new();
    let (session, notices, driver) =
        driver::prepare(settings.driver, upstream_stop.clone(), observer.states)
            .map_err(|e| anyhow::anyhow!("cannot start the upstream session: {e}"))?;
    let driver_task = essential(Task::Driver, Box::pin(driver));
    // The server is not read while the fan-out waits for its readers, so neither is a
    // ping's answer: the wait stays well inside the ping timeout.
    let ipc = ipc::IpcConfig {
        catch_up_wait: settings.ipc.catch_up_wait.min(ping_timeout / 2),
        ..settings.ipc.clone()
    };
    let hub = Arc::new(ipc::Hub::new(&ipc, request_timeout));
    let notice_task = essential(
        Task::Notices,
        Box::pin(ipc::run_notices(
            hub.clone(),
            session.clone(),
            notices,
            tasks.clone(),
        )),
    );
    let clients_stop = CancellationToken::new();
    let accepting_stop = CancellationToken::new();
    let server = essential(
        Task::Accept,
        Box::pin(ipc::serve(
            listener,
            settings.ipc,
            session.clone(),
            hub,
            accepting_stop.clone(),
            clients_stop.clone(),
            tasks.clone(),
        )),
    );
    if let Some(ready) = observer.ready {
        // The watcher may be gone already (it stopped first); nothing to tell then.
        let _ = ready.send(session.clone());
    }
    let failure = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            Some(r) = reload.recv() => session.set_servers(r.servers).await,
            Some(death) = died.recv() => break Some(death),
        }
    };
    match &failure {
        None => tracing::info!("shutting down"),
        Some(death) => tracing::error!("{death}; shutting down"),
    }
    // Order matters: the session answers every waiting request with -1 first, then the
    // clients get those answers and the final /close before they are let go.
    accepting_stop.cancel();
    upstream_stop.cancel();
    drop(session);
    let _ = driver_task.await;
    let _ = notice_task.await;
    clients_stop.cancel();
    let _ = server.await;
    tasks.close();
    tasks.wait().await;
    // A panic during the shutdown is a failure too; an essential task ending then is not.
    let failure =
        failure.or_else(|| std::iter::from_fn(|| died.try_recv().ok()).find(|d| d.panic.is_some()));
    match failure {
        None => Ok(()),
        Some(death) => Err(anyhow::anyhow!(
            "{death}: the daemon stopped rather than go on without it; restart it (systemd \
             does so by itself)"
        )),
    }
}

/// The essential tasks, named for the error that reports their end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Driver,
    Notices,
    Accept,
}

/// How many essential tasks there are: every one reports its end once, so a channel this
/// big never refuses a report.
const ESSENTIAL_TASKS: usize = 3;

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Driver => "the upstream session (driver task)",
            Task::Notices => "the notice loop (hub)",
            Task::Accept => "the local accept loop",
        })
    }
}

/// An essential task's work.
type TaskFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// An essential task that ended, and its panic message if it panicked.
#[derive(Debug)]
struct Death {
    task: Task,
    panic: Option<String>,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(msg) => write!(f, "{} panicked: {msg}", self.task),
            None => write!(f, "{} ended unexpectedly", self.task),
        }
    }
}

/// Runs an essential task and reports its end, a panic included, on `died`.
async fn watch(task: Task, fut: TaskFuture, died: mpsc::Sender<Death>) {
    use futures_util::FutureExt;
    let panic = std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .err()
        .map(|p| {
            p.downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned())
        });
    let _ = died.try_send(Death { task, panic });
}

/// The test hook of [`run_with`]: one essential task fails when a token is cancelled.
#[cfg(test)]
mod fault {
    use super::{Task, TaskFuture};
    use tokio_util::sync::CancellationToken;

    /// Which task fails, how, and when.
    #[derive(Debug, Clone)]
    pub(crate) struct Fault {
        pub task: Task,
        pub panic: bool,
        pub now: CancellationToken,
    }

    /// `fut`, made to panic or end when `fault` says so if it is the task `fault` names.
    pub(crate) fn inject(task: Task, fut: TaskFuture, fault: Option<Fault>) -> TaskFuture {
        match fault {
            Some(f) if f.task == task => Box::pin(async move {
                tokio::select! {
                    () = fut => {}
                    () = f.now.cancelled() => {
                        if f.panic {
                            panic!("injected fault");
                        }
                    }
                }
            }),
            _ => fut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// A daemon whose essential task `task` fails (panics or just ends) while it serves
    /// must not go on as a zombie: `run_with` ends by itself, with an error naming the
    /// task, although nobody asked it to stop.
    #[tokio::test]
    async fn an_essential_task_that_fails_stops_the_daemon_with_an_error() {
        let server = qio_testserver::TestServer::start(Default::default())
            .await
            .unwrap();
        let url = url::Url::parse(&server.url()).unwrap();
        for (task, panic) in [
            (Task::Notices, true),
            (Task::Notices, false),
            (Task::Driver, true),
            (Task::Driver, false),
            (Task::Accept, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let listener = tokio::net::UnixListener::bind(dir.path().join("qiod.sock")).unwrap();
            let settings = Settings {
                driver: driver::DriverConfig::new(session::SessionConfig::new(vec![url.clone()])),
                ipc: ipc::IpcConfig::default(),
            };
            let (ready_tx, ready_rx) = oneshot::channel();
            let (states_tx, _states_rx) = mpsc::channel(64);
            let now = CancellationToken::new();
            let observer = Observer {
                ready: Some(ready_tx),
                states: Some(states_tx),
                fault: Some(fault::Fault {
                    task,
                    panic,
                    now: now.clone(),
                }),
            };
            let shutdown = CancellationToken::new();
            let (_reload_tx, reload_rx) = mpsc::channel(1);
            let run = tokio::spawn(run_with(
                settings,
                listener,
                shutdown.clone(),
                reload_rx,
                observer,
            ));
            let session = ready_rx.await.expect("the daemon gets ready");
            assert!(session.status().await.is_some(), "it serves at first");
            now.cancel();
            let result = tokio::time::timeout(DEADLINE, run)
                .await
                .unwrap_or_else(|_| panic!("{task} failed ({panic}) and the daemon went on"))
                .expect("run_with itself does not panic");
            let err = result
                .expect_err("a failed essential task is an error")
                .to_string();
            let how = if panic {
                "panicked: injected fault"
            } else {
                "ended unexpectedly"
            };
            assert!(err.starts_with(&format!("{task} {how}")), "{err}");
            assert!(err.contains("restart it"), "{err}");
            assert!(!shutdown.is_cancelled());
        }
    }
}
