//! `reconnect`: a local client holds P subscriptions through qiod; the test server is
//! killed and restarted on the same port; how long until qiod has every subscription back
//! on the server, and until an event reaches the local client again.

use crate::client::{json_str, LineConn, Msg};
use crate::report::{median, ms, num, Table};
use crate::{Check, Ctx, Section};
use anyhow::{bail, Context};
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the watcher thread looks at the server.
const POLL: Duration = Duration::from_micros(200);

/// One round; times in ms from the moment `restart` returned.
#[derive(Debug, Clone, Serialize)]
pub struct RcRun {
    /// Round number.
    pub round: usize,
    /// Subscribed paths.
    pub paths: usize,
    /// The server counts qiod's connection as open (Quick.IO handshake done).
    pub handshake: f64,
    /// The server holds all subscriptions again.
    pub restored: f64,
    /// The local client read `/open`.
    pub client_open: f64,
    /// The local client read an event on the path qiod restores last.
    pub first_event: f64,
}

/// The `reconnect` scenario.
pub async fn reconnect(ctx: &Ctx) -> anyhow::Result<Section> {
    let paths = ctx.paths.unwrap_or(if ctx.smoke { 50 } else { 1_000 });
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for round in 0..ctx.rounds {
        eprintln!("reconnect: round {}/{}", round + 1, ctx.rounds);
        match one_round(ctx, round, paths).await {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("reconnect: {e:#}");
                errors.push(format!("{e:#}"));
            }
        }
    }
    let mut table = Table::new(
        &format!(
            "reconnect: {paths} subscribed paths, server killed and restarted (ms after restart returned; median and max of {} rounds)",
            ctx.rounds
        ),
        &["step", "ms", "max ms"],
    );
    let mut checks = Vec::new();
    if !runs.is_empty() {
        let stat = |f: &dyn Fn(&RcRun) -> f64| {
            let v: Vec<f64> = runs.iter().map(f).collect();
            (median(&v), v.iter().copied().fold(f64::NAN, f64::max))
        };
        type Step<'a> = (&'a str, &'a dyn Fn(&RcRun) -> f64);
        let rows: [Step; 5] = [
            ("server: qiod's handshake done", &|r| r.handshake),
            ("server: all subscriptions restored", &|r| r.restored),
            ("handshake -> all restored", &|r| r.restored - r.handshake),
            ("client: /open read", &|r| r.client_open),
            ("client: first event read", &|r| r.first_event),
        ];
        for (name, f) in rows {
            let (med, max) = stat(f);
            table.row(vec![name.into(), num(med, 2), num(max, 2)]);
        }
        let (restore, _) = stat(&|r| r.restored - r.handshake);
        checks.push(Check::at_most(
            &format!("reconnect, {paths} paths: handshake -> restored (ms)"),
            restore,
            100.0,
            format!("{} ms", num(restore, 2)),
        ));
    }
    table.notes.push(format!(
        "qiod runs with its default backoff (first retry after ~100 ms with jitter), so the \
         time from the restart to the handshake is mostly that wait. The watcher polls the \
         server every {} µs; the first event is broadcast on the path qiod re-subscribes last.",
        POLL.as_micros()
    ));
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "reconnect",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

fn path_of(i: usize) -> String {
    format!("/bench/rc/{i:05}")
}

enum Seen {
    Closed,
    Open(Instant),
    Event(Instant),
}

async fn one_round(ctx: &Ctx, round: usize, paths: usize) -> anyhow::Result<RcRun> {
    let server = TestServer::start(ServerConfig::default()).await?;
    let daemon = ctx.launcher.start(&server.url()).await?;
    let res = tokio::time::timeout(
        ctx.run_timeout,
        measure(ctx, round, &server, daemon.socket(), paths),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("round timed out")));
    let log = daemon.log();
    daemon.stop().await;
    server.shutdown().await;
    res.map_err(|e| e.context(log))
}

async fn measure(
    ctx: &Ctx,
    round: usize,
    server: &TestServer,
    socket: &std::path::Path,
    paths: usize,
) -> anyhow::Result<RcRun> {
    let mut c = LineConn::connect_with(socket, 64 * 1024).await?;
    c.wait_event("/open").await?;
    // Pipelined: every `on` at once, then the replies.
    let mut req = String::new();
    for i in 0..paths {
        req.push_str(&format!(
            r#"{{"op":"on","id":{},"path":{}}}"#,
            i + 1,
            json_str(&path_of(i))
        ));
        req.push('\n');
    }
    tokio::io::AsyncWriteExt::write_all(&mut c.w, req.as_bytes()).await?;
    let mut ok = 0;
    while ok < paths {
        let line = c.r.next_line().await?.context("qiod closed")?;
        let msg = Msg::parse(line)?;
        if msg.event.is_none() {
            if msg.code != Some(200) {
                bail!("`on` answered {:?} {:?}", msg.code, msg.err_msg);
            }
            ok += 1;
        }
    }
    let held = server.subscriptions().len();
    if held != paths {
        bail!("the server holds {held} subscriptions, expected {paths}");
    }
    let target = path_of(paths - 1);
    // The reader reports /close, then /open and the first event on `target`.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let prefix = format!(r#"{{"event":"{target}","#);
    let reader = tokio::spawn(async move {
        let mut closed = false;
        loop {
            let Ok(Some(line)) = c.r.next_line().await else {
                return;
            };
            let now = Instant::now();
            let seen = if line.starts_with(prefix.as_bytes()) {
                Seen::Event(now)
            } else {
                match Msg::parse(line)
                    .ok()
                    .and_then(|m| m.event.map(|e| e.into_owned()))
                {
                    Some(e) if e == "/close" => Seen::Closed,
                    Some(e) if e == "/open" => Seen::Open(now),
                    _ => continue,
                }
            };
            let stop = matches!(seen, Seen::Event(_)) && closed;
            closed |= matches!(seen, Seen::Closed);
            if tx.send(seen).is_err() || stop {
                return;
            }
        }
    });
    server.kill().await;
    loop {
        match rx.recv().await.context("the client's reader stopped")? {
            Seen::Closed => break,
            _ => continue,
        }
    }
    server.restart().await.context("restart")?;
    let t0 = Instant::now();
    // A thread of its own watches the server, so the timestamps do not wait for a tokio
    // timer tick; it also broadcasts on the target path until the client saw an event.
    let seen_event = Arc::new(AtomicBool::new(false));
    let watcher = {
        let server = server.clone();
        let seen_event = seen_event.clone();
        let handle = tokio::runtime::Handle::current();
        let limit = ctx.run_timeout;
        std::thread::spawn(move || -> anyhow::Result<(Instant, Instant)> {
            let mut handshake = None;
            let mut restored = None;
            loop {
                let now = Instant::now();
                if now - t0 > limit {
                    bail!("not restored within {limit:?}");
                }
                if handshake.is_none() && server.connection_count() >= 1 {
                    handshake = Some(now);
                }
                if handshake.is_some()
                    && restored.is_none()
                    && server.subscriptions().len() == paths
                {
                    restored = Some(Instant::now());
                }
                if handshake.is_some() {
                    handle.block_on(server.broadcast(&target, json!("again")));
                }
                if let (Some(h), Some(r)) = (handshake, restored) {
                    if seen_event.load(Ordering::Relaxed) {
                        return Ok((h, r));
                    }
                }
                std::thread::sleep(POLL);
            }
        })
    };
    let mut open = None;
    let mut event = None;
    while event.is_none() {
        match rx.recv().await {
            Some(Seen::Open(t)) => open = Some(t),
            Some(Seen::Event(t)) => event = Some(t),
            Some(Seen::Closed) => {}
            None => break,
        }
    }
    seen_event.store(true, Ordering::Relaxed);
    let joined = tokio::task::spawn_blocking(move || watcher.join())
        .await
        .context("watcher")?;
    reader.abort();
    let (handshake, restored) = match joined {
        Ok(r) => r?,
        Err(_) => bail!("the watcher thread panicked"),
    };
    let since = |t: Instant| ms(t.saturating_duration_since(t0));
    Ok(RcRun {
        round,
        paths,
        handshake: since(handshake),
        restored: since(restored),
        client_open: since(open.context("no /open after the restart")?),
        first_event: since(event.context("no event after the restart")?),
    })
}
