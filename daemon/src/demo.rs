//! `qiod --demo`: the daemon against the project's own Quick.IO test server, started in the
//! same process, so a newcomer sees events flow without setting up a server.
//!
//! The server listens on a free loopback port and a task broadcasts a counter on
//! [`TICK_PATH`] every [`TICK`], so subscribing there shows events at once.

use anyhow::Context;
use qio_testserver::{ServerConfig, TestServer};
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use url::Url;

/// Where the counter is broadcast.
pub const TICK_PATH: &str = "/demo/tick";

/// How often.
const TICK: Duration = Duration::from_millis(500);

/// The running test server and its counter.
pub struct Demo {
    server: TestServer,
    ticker: JoinHandle<()>,
    url: Url,
}

impl Demo {
    /// Starts the test server on `127.0.0.1`, port 0, and the counter.
    pub async fn start() -> anyhow::Result<Demo> {
        let server = TestServer::start(ServerConfig::default())
            .await
            .context("cannot start the demo's Quick.IO test server")?;
        let url = qiod::session::parse_server_url(&server.url())
            .map_err(|e| anyhow::anyhow!("the demo server's address: {e}"))?;
        let ticker = tokio::spawn(broadcast_ticks(server.clone()));
        Ok(Demo {
            server,
            ticker,
            url,
        })
    }

    /// The test server's address, to use as the daemon's only server.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Tells the person who ran `--demo` where things are and what to type. On stdout, like
    /// the test server's own `listening on` line, so a script can read it too.
    pub fn announce(&self, socket: Option<&Path>) {
        let (socket, hint) = match socket {
            Some(path) => {
                let path = path.display();
                let hint = format!(
                    "qiod demo: try\n    socat - UNIX-CONNECT:{path}\n    \
                     {{\"op\":\"on\",\"path\":\"{TICK_PATH}\",\"id\":1}}\n"
                );
                (path.to_string(), hint)
            }
            None => ("the socket passed by systemd".to_owned(), String::new()),
        };
        tracing::info!(server = %self.url, %socket, "demo: broadcasting {TICK_PATH} every {TICK:?}");
        let mut out = std::io::stdout().lock();
        // stdout may be closed; the log line above says the same.
        let _ = write!(
            out,
            "qiod demo: Quick.IO test server on {} broadcasts a counter on {TICK_PATH} every {} ms\n\
             qiod demo: local clients connect to {socket}\n{hint}",
            self.url,
            TICK.as_millis(),
        );
        let _ = out.flush();
    }

    /// Stops the counter and the server (after the daemon has let go of it).
    pub async fn stop(self) {
        self.ticker.abort();
        let _ = self.ticker.await;
        self.server.shutdown().await;
    }
}

/// Broadcasts 1, 2, 3, ... to every subscriber of [`TICK_PATH`] until aborted.
async fn broadcast_ticks(server: TestServer) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        server.broadcast(TICK_PATH, serde_json::json!(n)).await;
    }
}
