//! `qio-testserver`: runs the Quick.IO 0.2 test server until Ctrl-C, for poking at clients by
//! hand or from scripts. The first stdout line is `listening on ws://ADDR:PORT/`, so a script
//! can start it with `--port 0` and read the port it got.

use anyhow::Context;
use clap::Parser;
use qio_testserver::{ServerConfig, TestServer};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A Quick.IO 0.2 server with the client conformance app (`/clienttest/*`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    bind: IpAddr,
    /// Send a heartbeat after this long without sending anything (default 60000).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Challenge a client after this long without receiving anything (default 900000).
    #[arg(long)]
    challenge_after_ms: Option<u64>,
    /// Drop a client that leaves a challenge unanswered this long (default 60000).
    #[arg(long)]
    challenge_timeout_ms: Option<u64>,
    /// Period of /clienttest/broadcast events (default 10).
    #[arg(long)]
    broadcast_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = ServerConfig::default();
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
