//! `slow-readers`: slow readers of big events. N local subscribers read, but slower than
//! the stream of 16 KiB events the server sends at a fixed rate; one more subscriber reads
//! as fast as it can. Measures the daemon's peak memory (what its per-client bounds let
//! the slow ones hold) and the fast client's latency (whether the slow ones hurt it).

use crate::client::{LineConn, Msg};
use crate::report::{bytes, median, num, si, Lat, Table};
use crate::{Check, Ctx, Section};
use anyhow::{bail, Context};
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The broadcast path.
const PATH: &str = "/bench/slow";
/// What a slow reader takes before it pauses.
const SLOW_CHUNK: usize = 64 * 1024;
/// How long it pauses: 64 KiB per 20 ms is 3.2 MB/s, a fifth of the default stream.
const SLOW_PAUSE: Duration = Duration::from_millis(20);

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct SlowRun {
    /// Round number.
    pub round: usize,
    /// Slow subscribers.
    pub slow: usize,
    /// Events broadcast.
    pub events: u64,
    /// Bytes of event data.
    pub size: usize,
    /// Events per second the server was asked to send.
    pub rate: u64,
    /// From the first broadcast to the fast client's last event.
    pub secs: f64,
    /// The daemon's VmHWM at the end, bytes.
    pub peak_rss: u64,
    /// The daemon's VmRSS at the end, bytes.
    pub end_rss: u64,
    /// The fast client's latency from broadcast to read.
    pub fast: Lat,
    /// Events the fast client got.
    pub fast_got: u64,
    /// Events dropped for the fast client (announced by `/lost`).
    pub fast_lost: u64,
    /// Events all slow clients got.
    pub slow_got: u64,
    /// Events dropped for the slow clients.
    pub slow_lost: u64,
    /// The daemon's CPU time during the run.
    pub daemon_cpu: f64,
}

#[derive(serde::Deserialize)]
struct Stamp {
    t: u64,
}

/// The `slow-readers` scenario (needs the daemon as a process, for its memory).
pub async fn slow_readers(ctx: &Ctx) -> anyhow::Result<Section> {
    let slow = ctx
        .subscribers
        .as_ref()
        .and_then(|s| s.first().copied())
        .unwrap_or(if ctx.smoke { 4 } else { 40 });
    let size = ctx.size.unwrap_or(16 * 1024);
    let rate = ctx
        .rate
        .as_ref()
        .and_then(|r| r.first().copied())
        .unwrap_or(1000)
        .max(1);
    let events = ctx
        .events
        .unwrap_or(if ctx.smoke { 300 } else { rate * 10 });
    let title = format!(
        "slow-readers: {slow} subscribers reading 3.2 MB/s and one reading at full speed, \
         {events} events of {} at {rate}/s (median of {} rounds)",
        bytes(size as f64),
        ctx.rounds
    );
    let mut table = Table::new(
        &title,
        &[
            "daemon peak RSS",
            "RSS at end",
            "fast p50 ms",
            "fast p99 ms",
            "fast max ms",
            "fast lost",
            "slow lost",
            "daemon CPU s",
            "secs",
        ],
    );
    if !ctx.launcher.is_process() {
        table.notes.push(
            "skipped: needs the qiod binary (cargo build --release -p qiod), not in-process".into(),
        );
        return Ok(Section {
            name: "slow_readers",
            table,
            json: json!({ "skipped": "no qiod binary" }),
            checks: Vec::new(),
        });
    }
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for round in 0..ctx.rounds {
        eprintln!("slow-readers: round {}/{}", round + 1, ctx.rounds);
        match one_round(ctx, round, slow, events, size, rate).await {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("slow-readers: {e:#}");
                errors.push(format!("{e:#}"));
            }
        }
    }
    let mut checks = Vec::new();
    if !runs.is_empty() {
        let m = |f: &dyn Fn(&SlowRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let lat = Lat::combine(&runs.iter().map(|r| r.fast).collect::<Vec<_>>());
        let peak = m(&|r| r.peak_rss as f64);
        let pct = |lost: u64, got: u64| lost as f64 / (lost + got).max(1) as f64 * 100.0;
        table.row(vec![
            bytes(peak),
            bytes(m(&|r| r.end_rss as f64)),
            num(lat.p50 / 1000.0, 2),
            num(lat.p99 / 1000.0, 2),
            num(lat.max / 1000.0, 2),
            format!("{}%", num(m(&|r| pct(r.fast_lost, r.fast_got)), 2)),
            format!("{}%", num(m(&|r| pct(r.slow_lost, r.slow_got)), 1)),
            num(m(&|r| r.daemon_cpu), 2),
            num(m(&|r| r.secs), 2),
        ]);
        checks.push(Check::at_most(
            &format!(
                "slow readers ({slow} x {}): daemon peak RSS (MiB)",
                bytes(size as f64)
            ),
            peak / 1048576.0,
            512.0,
            bytes(peak),
        ));
        checks.push(Check::at_most(
            "slow readers: fast client's p99 (ms)",
            lat.p99 / 1000.0,
            250.0,
            format!("{} ms", num(lat.p99 / 1000.0, 2)),
        ));
        table.notes.push(format!(
            "fast client: {} events/s read",
            si(m(&|r| r.fast_got as f64 / r.secs))
        ));
    }
    table.notes.push(
        "The server sends at a fixed rate; each slow subscriber reads 64 KiB, then pauses 20 ms. \
         Latency: broadcast (in the harness) to the fast client's read of the line. Peak RSS: \
         VmHWM of the qiod process at the end of the run, start-up included. lost: events qiod \
         dropped (drop-oldest, announced by /lost) past client_queue_events or \
         client_queue_bytes, as a share of all events."
            .into(),
    );
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "slow_readers",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

async fn one_round(
    ctx: &Ctx,
    round: usize,
    slow: usize,
    events: u64,
    size: usize,
    rate: u64,
) -> anyhow::Result<SlowRun> {
    let server = TestServer::start(ServerConfig::default()).await?;
    let daemon = ctx.launcher.start(&server.url()).await?;
    let res = tokio::time::timeout(
        ctx.run_timeout,
        measure(round, slow, events, size, rate, &server, &daemon),
    )
    .await;
    let log = daemon.log();
    daemon.stop().await;
    server.shutdown().await;
    match res {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.context(log)),
        Err(_) => bail!(
            "round not done within {:?} (raise --timeout)\n{log}",
            ctx.run_timeout
        ),
    }
}

async fn measure(
    round: usize,
    slow: usize,
    events: u64,
    size: usize,
    rate: u64,
    server: &TestServer,
    daemon: &crate::daemon::Daemon,
) -> anyhow::Result<SlowRun> {
    let mut slow_conns = Vec::with_capacity(slow);
    for _ in 0..slow {
        slow_conns.push(LineConn::subscribed(daemon.socket(), SLOW_CHUNK, PATH).await?);
    }
    let fast = LineConn::subscribed(daemon.socket(), 256 * 1024, PATH).await?;
    let upstream = server.subscriptions().get(PATH).copied().unwrap_or(0);
    if upstream != 1 {
        bail!("the server has {upstream} subscriptions to {PATH}, expected 1");
    }
    let stop = CancellationToken::new();
    let readers: Vec<_> = slow_conns
        .into_iter()
        .map(|c| tokio::spawn(read_slowly(c, stop.clone())))
        .collect();
    let epoch = Instant::now();
    let cpu0 = daemon.cpu()?;
    let fast_task = tokio::spawn(read_fast(fast, events, epoch));
    let srv = server.clone();
    let padding = "x".repeat(size.saturating_sub(40));
    let producer = tokio::spawn(async move {
        for i in 0..events {
            let due = epoch + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
            let t = epoch.elapsed().as_micros() as u64;
            srv.broadcast(PATH, json!({ "t": t, "p": padding })).await;
        }
    });
    let (fast_lat, fast_got, fast_lost, last) = fast_task.await.context("fast reader")??;
    producer.await.context("broadcaster")?;
    let secs = (last - epoch).as_secs_f64();
    let daemon_cpu = (daemon.cpu()? - cpu0).as_secs_f64();
    let (end_rss, peak_rss) = daemon.rss()?;
    stop.cancel();
    let mut slow_got = 0;
    let mut slow_lost = 0;
    for r in readers {
        let (got, lost) = r.await.context("slow reader")??;
        slow_got += got;
        slow_lost += lost;
    }
    Ok(SlowRun {
        round,
        slow,
        events,
        size,
        rate,
        secs,
        peak_rss,
        end_rss,
        fast: Lat::of(fast_lat),
        fast_got,
        fast_lost,
        slow_got,
        slow_lost,
        daemon_cpu,
    })
}

/// Counts a `/lost` line's events; other lines that are not events of `PATH` count nothing.
fn lost_count(msg: &Msg) -> anyhow::Result<u64> {
    #[derive(serde::Deserialize)]
    struct Count {
        count: u64,
    }
    match msg.event.as_deref() {
        Some("/lost") => {
            let data = msg.data.context("/lost without data")?;
            Ok(serde_json::from_str::<Count>(data.get())?.count)
        }
        Some("/close") => bail!("qiod lost the server"),
        _ => Ok(0),
    }
}

/// Reads every event as it comes; returns the latencies (ns), counts and when it was done.
async fn read_fast(
    mut c: LineConn,
    events: u64,
    epoch: Instant,
) -> anyhow::Result<(Vec<u64>, u64, u64, Instant)> {
    let mut lat = Vec::with_capacity(events as usize);
    let (mut got, mut lost) = (0u64, 0u64);
    while got + lost < events {
        let line =
            c.r.next_line()
                .await?
                .context("qiod closed the fast client's connection")?;
        let now = epoch.elapsed().as_micros() as u64;
        let msg = Msg::parse(line)?;
        if msg.event.as_deref() == Some(PATH) {
            let data = msg.data.context("event without data")?;
            let stamp: Stamp = serde_json::from_str(data.get())?;
            lat.push(now.saturating_sub(stamp.t) * 1000);
            got += 1;
        } else {
            lost += lost_count(&msg)?;
        }
    }
    Ok((lat, got, lost, Instant::now()))
}

/// Reads 64 KiB at a time with a pause after each, until `stop`.
async fn read_slowly(mut c: LineConn, stop: CancellationToken) -> anyhow::Result<(u64, u64)> {
    let prefix = format!(r#"{{"event":"{PATH}","#);
    let (mut got, mut lost) = (0u64, 0u64);
    let mut taken = 0;
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return Ok((got, lost)),
            line = c.r.next_line() => line?.context("qiod closed a slow client's connection")?,
        };
        taken += line.len() + 1;
        if line.starts_with(prefix.as_bytes()) {
            got += 1;
        } else {
            lost += lost_count(&Msg::parse(line)?)?;
        }
        if taken >= SLOW_CHUNK {
            taken = 0;
            tokio::select! {
                _ = stop.cancelled() => return Ok((got, lost)),
                _ = tokio::time::sleep(SLOW_PAUSE) => {}
            }
        }
    }
}
