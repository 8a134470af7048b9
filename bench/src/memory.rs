//! `memory`: the daemon's resident memory idle and with many idle local clients, each
//! holding one subscription of its own; then every client sends one request at once (the
//! "served" check), and all leave at once.

use crate::client::LineConn;
use crate::report::{bytes, median, ms, num, Table};
use crate::{Check, Ctx, Section};
use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Connections being set up at once.
const CONNECT_PARALLEL: usize = 256;

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct MemRun {
    /// Round number.
    pub round: usize,
    /// VmRSS with no local client, bytes.
    pub idle_rss: u64,
    /// (clients, VmRSS) after each step.
    pub steps: Vec<(usize, u64)>,
    /// VmHWM at the end.
    pub peak_rss: u64,
    /// Time to connect and subscribe all clients of the last step, ms.
    pub join_ms: f64,
    /// Every client sent a request at once: time until the last reply, ms.
    pub served_ms: f64,
    /// Clients that got their reply.
    pub served: usize,
    /// All clients closed at once: time until the server saw every subscription go, ms.
    pub leave_ms: f64,
    /// Daemon CPU spent on those departures, ms.
    pub leave_cpu_ms: f64,
}

/// The `memory` scenario (needs the daemon as a process).
pub async fn memory(ctx: &Ctx) -> anyhow::Result<Section> {
    let steps = ctx.clients.clone().unwrap_or_else(|| {
        if ctx.smoke {
            vec![20, 100]
        } else {
            vec![1_000, 10_000]
        }
    });
    let mut table = Table::new(
        &format!(
            "memory: qiod's VmRSS, idle and with idle local clients holding one subscription each (median of {} rounds)",
            ctx.rounds
        ),
        &["clients", "VmRSS", "per client", "notes"],
    );
    if !ctx.launcher.is_process() {
        table.notes.push(
            "skipped: needs the qiod binary (cargo build --release -p qiod), not in-process".into(),
        );
        return Ok(Section {
            name: "memory",
            table,
            json: json!({ "skipped": "no qiod binary" }),
            checks: Vec::new(),
        });
    }
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for round in 0..ctx.rounds {
        eprintln!("memory: round {}/{}", round + 1, ctx.rounds);
        match one_round(ctx, round, &steps).await {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("memory: {e:#}");
                errors.push(format!("{e:#}"));
            }
        }
    }
    let mut checks = Vec::new();
    if !runs.is_empty() {
        let m = |f: &dyn Fn(&MemRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let idle = m(&|r| r.idle_rss as f64);
        table.row(vec![
            "0 (connected upstream)".into(),
            bytes(idle),
            "".into(),
            "".into(),
        ]);
        checks.push(Check::at_most(
            "idle RSS (MiB)",
            idle / 1048576.0,
            10.0,
            bytes(idle),
        ));
        for (i, &n) in steps.iter().enumerate() {
            let rss = m(&|r| r.steps[i].1 as f64);
            let per = m(&|r| (r.steps[i].1 as f64 - r.idle_rss as f64) / n as f64);
            let last = i + 1 == steps.len();
            let notes = if last {
                format!(
                    "joined in {} ms; one request from each at once: {} answered in {} ms; all left in {} ms ({} ms daemon CPU); peak {}",
                    num(m(&|r| r.join_ms), 0),
                    m(&|r| r.served as f64),
                    num(m(&|r| r.served_ms), 0),
                    num(m(&|r| r.leave_ms), 0),
                    num(m(&|r| r.leave_cpu_ms), 0),
                    bytes(m(&|r| r.peak_rss as f64)),
                )
            } else {
                String::new()
            };
            table.row(vec![n.to_string(), bytes(rss), bytes(per), notes]);
            if last {
                checks.push(Check::at_most(
                    &format!("bytes per idle local client ({n} clients, KiB)"),
                    per / 1024.0,
                    16.0,
                    bytes(per),
                ));
                let served = m(&|r| r.served as f64);
                checks.push(Check {
                    target: format!("{n} concurrent local clients served"),
                    measured: format!("{served} of {n} answered"),
                    pass: Some(served >= n as f64),
                });
            }
        }
    }
    table.notes.push(
        "Each client: connect, read /open, `on` a path of its own, wait for the 200; then \
         idle. VmRSS read 300 ms after the last 200. Per client = (VmRSS - idle) / clients."
            .into(),
    );
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "memory",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

async fn one_round(ctx: &Ctx, round: usize, steps: &[usize]) -> anyhow::Result<MemRun> {
    let server = TestServer::start(ServerConfig::default()).await?;
    let daemon = ctx.launcher.start(&server.url()).await?;
    let res = tokio::time::timeout(
        ctx.run_timeout,
        measure(ctx, round, steps, &server, &daemon),
    )
    .await;
    let log = daemon.log();
    daemon.stop().await;
    server.shutdown().await;
    match res {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.context(log)),
        Err(_) => bail!("round timed out\n{log}"),
    }
}

async fn measure(
    ctx: &Ctx,
    round: usize,
    steps: &[usize],
    server: &TestServer,
    daemon: &crate::daemon::Daemon,
) -> anyhow::Result<MemRun> {
    let settle = if ctx.smoke {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(300)
    };
    tokio::time::sleep(settle * 2).await;
    let (idle_rss, _) = daemon.rss()?;
    let mut clients: Vec<LineConn> = Vec::new();
    let mut out = Vec::new();
    let mut join_ms = 0.0;
    for &n in steps {
        let t = Instant::now();
        join(daemon.socket(), &mut clients, n).await?;
        join_ms = ms(t.elapsed());
        let subs = server.subscriptions().len();
        if subs != n {
            bail!("the server has {subs} subscriptions, expected {n}");
        }
        tokio::time::sleep(settle).await;
        out.push((n, daemon.rss()?.0));
    }
    // Served: every client asks at once; all replies must come.
    let t = Instant::now();
    let served = serve_all(&mut clients).await?;
    let served_ms = ms(t.elapsed());
    let (_, peak_rss) = daemon.rss()?;
    // Everybody leaves at once.
    let cpu0 = daemon.cpu()?;
    let t = Instant::now();
    drop(clients);
    let gone = server
        .wait_until(ctx.run_timeout, |s| s.subscriptions().is_empty())
        .await;
    let leave_ms = ms(t.elapsed());
    let leave_cpu_ms = ms(daemon.cpu()? - cpu0);
    if !gone {
        bail!("subscriptions still held after every client left");
    }
    Ok(MemRun {
        round,
        idle_rss,
        steps: out,
        peak_rss,
        join_ms,
        served_ms,
        served,
        leave_ms,
        leave_cpu_ms,
    })
}

/// Connects clients until there are `n`, each subscribed to a path of its own.
async fn join(socket: &Path, clients: &mut Vec<LineConn>, n: usize) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    let mut next = clients.len();
    while clients.len() < n {
        while next < n && pending.len() < CONNECT_PARALLEL {
            let path = format!("/bench/mem/{next}");
            next += 1;
            pending.push(async move { LineConn::subscribed(socket, 512, &path).await });
        }
        match pending.next().await {
            Some(res) => clients.push(res.context("a client could not subscribe")?),
            None => break,
        }
    }
    Ok(())
}

/// Each client sends one `send` with an id at once; returns how many got a 200.
async fn serve_all(clients: &mut [LineConn]) -> anyhow::Result<usize> {
    let mut futs: FuturesUnordered<_> = clients
        .iter_mut()
        .map(|c| async move {
            c.send(r#"{"op":"send","id":2,"path":"/bench/ping","data":null}"#)
                .await?;
            c.wait_reply(2).await
        })
        .collect();
    let mut ok = 0;
    while let Some(res) = futs.next().await {
        if res.is_ok() {
            ok += 1;
        }
    }
    Ok(ok)
}
