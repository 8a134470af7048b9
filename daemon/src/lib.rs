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
pub mod session;
pub mod socket;

use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
    listener: UnixListener,
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
}

/// [`run`], telling `observer` when the daemon is ready and how the upstream connection
/// fares.
pub async fn run_with(
    settings: Settings,
    listener: UnixListener,
    shutdown: CancellationToken,
    mut reload: mpsc::Receiver<Reload>,
    observer: Observer,
) -> anyhow::Result<()> {
    settings
        .ipc
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid local settings: {e}"))?;
    let request_timeout = settings.driver.session.request_timeout;
    let upstream_stop = CancellationToken::new();
    let (session, notices, driver_task) = driver::spawn(settings.driver, upstream_stop.clone())
        .map_err(|e| anyhow::anyhow!("cannot start the upstream session: {e}"))?;
    let notices = match observer.states {
        Some(states) => tap_states(notices, states),
        None => notices,
    };
    let hub = Arc::new(ipc::Hub::new(&settings.ipc, request_timeout));
    let notice_task = tokio::spawn(ipc::run_notices(hub.clone(), session.clone(), notices));
    let clients_stop = CancellationToken::new();
    let server = tokio::spawn(ipc::serve(
        listener,
        settings.ipc,
        session.clone(),
        hub,
        shutdown.clone(),
        clients_stop.clone(),
    ));
    if let Some(ready) = observer.ready {
        // The watcher may be gone already (it stopped first); nothing to tell then.
        let _ = ready.send(session.clone());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(r) = reload.recv() => session.set_servers(r.servers).await,
        }
    }
    tracing::info!("shutting down");
    // Order matters: the session answers every waiting request with -1 first, then the
    // clients get those answers and the final /close before they are let go.
    upstream_stop.cancel();
    drop(session);
    let _ = driver_task.await;
    let _ = notice_task.await;
    clients_stop.cancel();
    let _ = server.await;
    Ok(())
}

/// Puts a step between the session and the hub that copies state changes to `states`.
///
/// The step only ever waits on the hub's channel, exactly as the session would, so the
/// backpressure and the hub's invariant (it never awaits the session) are unchanged; the
/// copy is a `try_send`, so a slow watcher cannot hold events up. It ends when the session
/// closes its side, which then closes the hub's.
fn tap_states(
    mut from: mpsc::Receiver<driver::Notice>,
    states: mpsc::Sender<session::StateChange>,
) -> mpsc::Receiver<driver::Notice> {
    let (to, rx) = mpsc::channel(TAP_CAPACITY);
    tokio::spawn(async move {
        while let Some(notice) = from.recv().await {
            if let driver::Notice::State(state) = &notice {
                let _ = states.try_send(state.clone());
            }
            if to.send(notice).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Notices in flight between the state tap and the hub. Small: the session's own notice
/// channel is the real buffer, this one only decouples the two tasks.
const TAP_CAPACITY: usize = 64;
