//! The `websocat` variant: what a user might run instead of qiod to share one upstream
//! connection between local clients, websocat 1.x's `broadcast:` overlay on a Unix socket:
//!
//! ```text
//! websocat -E -t -q --linemode-strip-newlines --protocol quickio [--queue-len N] \
//!     unix-l:SOCKET broadcast:ws://HOST:PORT/
//! ```
//!
//! Every local client reads the server's raw frames as lines (`/path:0=data`); one of them
//! (the leader) greets the server with `/qio/ohai` and sends the `/qio/on` frame, which
//! the one upstream connection shares with all. Nothing tells a client about frames
//! websocat dropped for it: the scenarios count them by what did not arrive.

use crate::client::{json_str, LineConn};
use crate::sys;
use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How to start websocat, decided once per run.
#[derive(Debug, Clone)]
pub struct Launcher {
    binary: PathBuf,
    queue_len: Option<usize>,
}

impl Launcher {
    /// Checks that the binary is there.
    pub fn new(binary: PathBuf, queue_len: Option<usize>) -> anyhow::Result<Launcher> {
        if !binary.is_file() {
            bail!(
                "websocat binary {} not found; install it with: cargo install websocat --locked",
                binary.display()
            );
        }
        Ok(Launcher { binary, queue_len })
    }

    /// Starts websocat in front of the server at `url` and waits until it listens.
    pub async fn start(&self, url: &str) -> anyhow::Result<Websocat> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let socket = dir.path().join("websocat.sock");
        let log = std::fs::File::create(dir.path().join("websocat.log")).context("log file")?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(["-E", "-t", "-q", "--linemode-strip-newlines"])
            .args(["--protocol", "quickio"]);
        if let Some(n) = self.queue_len {
            cmd.arg("--queue-len").arg(n.to_string());
        }
        // websocat wants the URL with its path (the test server serves `/`).
        let ws_url = if url.ends_with('/') {
            url.to_owned()
        } else {
            format!("{url}/")
        };
        cmd.arg(format!("unix-l:{}", socket.display()))
            .arg(format!("broadcast:{ws_url}"))
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child.id().context("websocat exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                bail!("websocat exited during startup: {status}");
            }
            if Instant::now() > deadline {
                bail!(
                    "websocat did not listen on {} within 10 s",
                    socket.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Websocat {
            child,
            pid,
            socket,
            dir,
        })
    }
}

/// A running websocat.
pub struct Websocat {
    child: tokio::process::Child,
    pid: u32,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Websocat {
    /// The socket its local clients connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// CPU time used so far (all its threads).
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        sys::process_cpu(self.pid)
    }

    /// Its stderr, for error reports.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("websocat.log")).unwrap_or_default()
    }

    /// Stops it: SIGTERM and a bounded wait.
    pub async fn stop(mut self) {
        sys::signal(self.pid, libc::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Connects `n` local clients; the first greets the server and subscribes to `path` for
/// all. Returns when every client has read a callback frame (so websocat broadcasts to
/// each of them) and the subscription was answered 200.
pub async fn subscribers(ws: &Websocat, n: usize, path: &str) -> anyhow::Result<Vec<LineConn>> {
    let mut conns = Vec::with_capacity(n);
    let mut leader = LineConn::connect_with(ws.socket(), 16 * 1024).await?;
    leader.send("/qio/ohai").await?;
    loop {
        let line = leader
            .r
            .next_line()
            .await?
            .context("websocat closed the connection before the greeting")?;
        if line == b"/qio/ohai" {
            break;
        }
    }
    conns.push(leader);
    // Only now the others: websocat 1.14 panics ("invalid key" in its broadcast peer), or
    // opens an upstream connection for each, when clients come while the shared upstream
    // connection is still being made.
    for _ in 1..n.max(1) {
        conns.push(LineConn::connect_with(ws.socket(), 16 * 1024).await?);
    }
    // After the echoed greeting: the server drops whatever arrives in the same read as it.
    let leader = &mut conns[0];
    leader
        .send(&format!("/qio/on:1={}", json_str(path)))
        .await?;
    let (first, rest) = conns.split_at_mut(1);
    let LineConn { r, w } = &mut first[0];
    let mut ready: FuturesUnordered<_> = std::iter::once(r)
        .chain(rest.iter_mut().map(|c| &mut c.r))
        .map(|r| async move {
            loop {
                let line = r
                    .next_line()
                    .await?
                    .context("websocat closed a connection while subscribing")?;
                if let Some((id, code)) = std::str::from_utf8(line)
                    .ok()
                    .and_then(crate::client::parse_callback)
                {
                    if id == 1 && code != 200 {
                        bail!("subscribing to {path} through websocat: code {code}");
                    }
                    return anyhow::Ok(());
                }
            }
        })
        .collect();
    // A client whose connection websocat had not taken yet missed the `on`'s answer:
    // echo requests until every client has read one.
    let mut probe = tokio::time::interval(Duration::from_millis(50));
    probe.tick().await;
    let mut next_probe = 2u64;
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    while !ready.is_empty() {
        tokio::select! {
            res = ready.next() => {
                if let Some(res) = res {
                    res?;
                }
            }
            _ = probe.tick() => {
                let line = format!("/bench/echo:{next_probe}=null\n");
                next_probe += 1;
                w.write_all(line.as_bytes()).await.context("writing to websocat")?;
            }
            _ = &mut deadline => bail!("{} websocat clients saw no callback within 30 s", ready.len()),
        }
    }
    drop(ready);
    Ok(conns)
}
