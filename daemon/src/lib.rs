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
    mut reload: tokio::sync::mpsc::Receiver<Reload>,
) -> anyhow::Result<()> {
    let upstream_stop = CancellationToken::new();
    let (session, notices, driver_task) = driver::spawn(settings.driver, upstream_stop.clone())
        .map_err(|e| anyhow::anyhow!("cannot start the upstream session: {e}"))?;
    let hub = Arc::new(ipc::Hub::new(MAX_HANDLES));
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

/// How many server callback requests handed to local clients are remembered.
const MAX_HANDLES: usize = 65_536;
