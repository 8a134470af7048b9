//! `qiod-demo`: qiod and a Quick.IO test server in one process, so a newcomer sees events
//! flow with one command and no server of their own (README's quick start).
//!
//! The test server ([`qio_testserver::demo`]) listens on a free loopback port, broadcasts a
//! counter and asks questions; the daemon ([`qiod::run`], the library entry the `qiod`
//! binary uses too) listens on the usual socket with its default settings and that server as
//! its only one. It lives in the test server's crate so that the shipped `qiod` carries no
//! WebSocket server and no server-side TLS. Ctrl-C (or SIGTERM) stops both.

use anyhow::Context;
use clap::Parser;
use qio_testserver::demo::Demo;
use qiod::session::SessionConfig;
use qiod::socket::{self, SocketGuard};
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Runs qiod against its own Quick.IO test server: a counter on /demo/tick every 500 ms and
/// a question to the subscribers of /demo/question every 2 s.
#[derive(Debug, Parser)]
#[command(version, after_help = "Then, in another terminal: qio sub /demo/tick")]
struct Args {
    /// Unix socket for local clients (default: where qiod and qio look,
    /// $XDG_RUNTIME_DIR/qiod/qiod.sock or /tmp/qiod-<uid>/qiod.sock)
    #[arg(long, env = "QIOD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    qio_testserver::init_logging();
    let args = Args::parse();
    let path = args
        .socket
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(socket::default_socket_path);
    // Registered before anything runs so that no signal meets the default (fatal) action,
    // which would leave the socket file behind.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let demo = Demo::start()
        .await
        .context("cannot start the demo's Quick.IO test server")?;
    let server = qiod::session::parse_server_url(&demo.url())
        .map_err(|e| anyhow::anyhow!("the demo server's address: {e}"))?;
    let listener = socket::bind(&path)?;
    let guard = SocketGuard::new(&path);
    listener
        .set_nonblocking(true)
        .context("cannot make the socket non-blocking")?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .context("cannot register the socket with the runtime")?;
    demo.announce(&path);

    let settings = qiod::Settings {
        driver: qiod::driver::DriverConfig::new(SessionConfig::new(vec![server])),
        ipc: qiod::ipc::IpcConfig::default(),
    };
    let shutdown = CancellationToken::new();
    // Nothing reloads the demo; the sender is kept so the daemon never sees it closed.
    let (_reload, reload_rx) = tokio::sync::mpsc::channel(1);
    let run = qiod::run(settings, listener, shutdown.clone(), reload_rx);
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        _ = term.recv() => { shutdown.cancel(); run.await }
        _ = int.recv() => { shutdown.cancel(); run.await }
    };
    drop(guard);
    demo.stop().await;
    result
}
