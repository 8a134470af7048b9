//! `qio-testserver`: runs the Quick.IO test server (0.2, or 0.1 with `--dialect 0.1`) until
//! Ctrl-C, for poking at clients by hand or from scripts. The first stdout line is
//! `listening on URL` (`ws://ADDR:PORT/`, or `ws://ADDR:PORT/qio` for 0.1), so a script can
//! start it with `--port 0` and read the port it got.

use anyhow::Context;
use clap::Parser;
use qio_testserver::{Dialect, ServerConfig, TestServer};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A Quick.IO server with the client conformance app (`/clienttest/*`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Wire dialect: 0.2 (2014, the default) or 0.1 (2012).
    #[arg(long, default_value_t = Dialect::V02)]
    dialect: Dialect,
    /// Port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    bind: IpAddr,
    /// 0.2: send a heartbeat after this long without sending anything. 0.1: send one to every
    /// client this often (default 60000).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Largest WebSocket payload a client may send, in bytes; larger drops the connection
    /// (default 1024 for 0.1, tungstenite's limits for 0.2).
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// Challenge a client after this long without receiving anything (default 900000; 0.2
    /// only).
    #[arg(long)]
    challenge_after_ms: Option<u64>,
    /// Drop a client that leaves a challenge unanswered this long (default 60000).
    #[arg(long)]
    challenge_timeout_ms: Option<u64>,
    /// Period of /clienttest/broadcast events (default 10).
    #[arg(long)]
    broadcast_ms: Option<u64>,
    /// How long a callback the server requests stays answerable; later answers get 404
    /// (default 15000, as on the real 0.2 server).
    #[arg(long)]
    callback_timeout_ms: Option<u64>,
    /// 0.2: close a client that sends no /qio/ohai, or leaves a frame half sent, this long
    /// with 1008 (default 10000).
    #[arg(long)]
    client_timeout_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    qio_testserver::init_logging();
    let args = Args::parse();
    let mut cfg = ServerConfig {
        dialect: args.dialect,
        max_frame_bytes: args.max_frame_bytes,
        ..ServerConfig::default()
    };
    let ms = Duration::from_millis;
    if let Some(v) = args.heartbeat_ms {
        cfg.heartbeat_interval = ms(v);
    }
    if let Some(v) = args.challenge_after_ms {
        cfg.challenge_after = ms(v);
    }
    if let Some(v) = args.challenge_timeout_ms {
        cfg.challenge_timeout = ms(v);
    }
    if let Some(v) = args.broadcast_ms {
        cfg.broadcast_interval = ms(v);
    }
    if let Some(v) = args.callback_timeout_ms {
        cfg.callback_timeout = ms(v);
    }
    if let Some(v) = args.client_timeout_ms {
        cfg.client_timeout = ms(v);
    }
    let addr = SocketAddr::new(args.bind, args.port);
    let server = TestServer::bind(cfg, addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", server.url())?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.shutdown().await;
    Ok(())
}
