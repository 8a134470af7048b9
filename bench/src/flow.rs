//! `fanout` and `ingest`: the test server broadcasts events on one path as fast as it can;
//! subscribers count them. Through qiod (one upstream subscription, N raw line readers on
//! the Unix socket) or directly (N WebSocket connections, each subscribed).

use crate::client::Msg;
use crate::middle::{Middle, Sub};
use crate::report::{bytes, median, num, si, Table};
use crate::{sys, Check, Ctx, Section, Variant};
use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The broadcast path.
const PATH: &str = "/bench/flow";
/// Subscribers are spread over this many tokio tasks (fewer when there are fewer).
const GROUPS: usize = 4;

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRun {
    /// Round number.
    pub round: usize,
    /// Which side.
    pub variant: Variant,
    /// Subscribers.
    pub subscribers: usize,
    /// Events broadcast.
    pub events: u64,
    /// Data bytes per event (the JSON text).
    pub size: usize,
    /// From the first broadcast to the last subscriber's last event.
    pub secs: f64,
    /// Events received by all subscribers together.
    pub delivered: u64,
    /// Events qiod dropped for slow readers (announced by `/lost`).
    pub lost: u64,
    /// The daemon's CPU time during the run (qiod only).
    pub daemon_cpu: Option<f64>,
    /// The harness's CPU time (test server, broadcaster, subscribers).
    pub harness_cpu: f64,
    /// Payload bytes the server wrote to its WebSocket clients.
    pub server_bytes: u64,
}

impl FlowRun {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }

    /// Daemon CPU microseconds per delivered event.
    fn daemon_us(&self) -> f64 {
        self.daemon_cpu
            .map_or(f64::NAN, |c| c * 1e6 / self.delivered.max(1) as f64)
    }

    /// Daemon plus harness CPU microseconds per delivered event.
    fn total_us(&self) -> f64 {
        (self.daemon_cpu.unwrap_or(0.0) + self.harness_cpu) * 1e6 / self.delivered.max(1) as f64
    }
}

/// The data of the end marker the server sends after the events when subscribers cannot
/// count on getting every event (websocat drops events without saying so).
const END: &str = "end";

/// Runs one variant once: a fresh server (and daemon or websocat), `n` subscribers,
/// `events` events.
pub async fn run_flow(
    ctx: &Ctx,
    round: usize,
    variant: Variant,
    n: usize,
    events: u64,
    size: usize,
) -> anyhow::Result<FlowRun> {
    let server = TestServer::start(ServerConfig::default()).await?;
    let middle = match Middle::start(ctx, variant, &server.url()).await {
        Ok(m) => m,
        Err(e) => {
            server.shutdown().await;
            return Err(e);
        }
    };
    let res =
        tokio::time::timeout(ctx.run_timeout, measure(&server, &middle, n, events, size)).await;
    let log = middle.log();
    middle.stop().await;
    server.shutdown().await;
    let (secs, delivered, lost, daemon_cpu, harness_cpu, server_bytes) = match res {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => bail!("{variant} n={n}: {e:#}\n{log}"),
        Err(_) => bail!(
            "{variant} n={n}: not done within {:?} (raise --timeout)\n{log}",
            ctx.run_timeout
        ),
    };
    Ok(FlowRun {
        round,
        variant,
        subscribers: n,
        events,
        size,
        secs,
        delivered,
        lost,
        daemon_cpu,
        harness_cpu,
        server_bytes,
    })
}

type Measured = (f64, u64, u64, Option<f64>, f64, u64);

async fn measure(
    server: &TestServer,
    middle: &Middle,
    n: usize,
    events: u64,
    size: usize,
) -> anyhow::Result<Measured> {
    let subs = middle.subscribers(&server.url(), n, PATH).await?;
    let upstream = server.subscriptions().get(PATH).copied().unwrap_or(0);
    let want = middle.upstream_subscriptions(n);
    if upstream != want {
        bail!("the server has {upstream} subscriptions to {PATH}, expected {want}");
    }
    let groups = n.clamp(1, GROUPS);
    let mut per: Vec<Vec<Sub>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, s) in subs.into_iter().enumerate() {
        per[i % groups].push(s);
    }
    let markers = matches!(middle, Middle::Websocat(_));
    let cpu0 = middle.cpu()?;
    let self0 = sys::self_cpu();
    let bytes0 = server.bytes_sent();
    let tasks: Vec<_> = per
        .into_iter()
        .map(|g| tokio::spawn(consume_group(g, events)))
        .collect();
    let t0 = Instant::now();
    let srv = server.clone();
    let data = serde_json::Value::String("x".repeat(size.saturating_sub(2)));
    let done = CancellationToken::new();
    let stop_markers = done.clone();
    let producer = tokio::spawn(async move {
        for _ in 0..events {
            srv.broadcast(PATH, data.clone()).await;
        }
        // Whatever websocat dropped, one of these gets through once its queues drain.
        while markers && !stop_markers.is_cancelled() {
            srv.broadcast(PATH, serde_json::Value::from(END)).await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let mut delivered = 0;
    let mut lost = 0;
    let mut end = t0;
    let mut finished = Vec::new();
    for t in tasks {
        let (d, l, last, group) = t.await.context("subscriber task")??;
        delivered += d;
        lost += l;
        end = end.max(last);
        // Kept open until measured: a subscriber leaving costs the daemon work that is
        // not delivery.
        finished.push(group);
    }
    let secs = (end - t0).as_secs_f64();
    let cpu1 = middle.cpu()?;
    let self1 = sys::self_cpu();
    let server_bytes = server.bytes_sent() - bytes0;
    done.cancel();
    producer.await.context("broadcaster")?;
    let daemon_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    let mut harness = (self1 - self0).as_secs_f64();
    if middle.in_harness() {
        harness -= daemon_cpu.unwrap_or(0.0);
    }
    drop(finished);
    Ok((secs, delivered, lost, daemon_cpu, harness, server_bytes))
}

/// Reads every subscriber of a group until each has its `events`; returns the counts, when
/// the last one was done, and the connections (still open).
async fn consume_group(
    mut group: Vec<Sub>,
    events: u64,
) -> anyhow::Result<(u64, u64, Instant, Vec<Sub>)> {
    let mut delivered = 0;
    let mut lost = 0;
    let mut last = Instant::now();
    {
        let mut futs: FuturesUnordered<_> =
            group.iter_mut().map(|s| consume_one(s, events)).collect();
        while let Some(res) = futs.next().await {
            let (d, l, t) = res?;
            delivered += d;
            lost += l;
            last = last.max(t);
        }
    }
    Ok((delivered, lost, last, group))
}

async fn consume_one(sub: &mut Sub, events: u64) -> anyhow::Result<(u64, u64, Instant)> {
    let mut got = 0u64;
    let mut lost = 0u64;
    let mut last = Instant::now();
    match sub {
        Sub::Local(conn) => {
            let prefix = format!(r#"{{"event":"{PATH}","#);
            let prefix = prefix.as_bytes();
            while got + lost < events {
                let line = conn
                    .r
                    .next_line()
                    .await?
                    .context("qiod closed the connection")?;
                // The fast path: qiod writes `event` first. Anything else is parsed.
                if line.starts_with(prefix) {
                    got += 1;
                    continue;
                }
                let msg = Msg::parse(line)?;
                match msg.event.as_deref() {
                    Some(PATH) => got += 1,
                    Some("/lost") => {
                        #[derive(serde::Deserialize)]
                        struct Count {
                            count: u64,
                        }
                        let data = msg.data.context("/lost without data")?;
                        let c: Count = serde_json::from_str(data.get())?;
                        lost += c.count;
                    }
                    Some("/close") => {
                        bail!("qiod lost the server: {}", String::from_utf8_lossy(line))
                    }
                    _ => {}
                }
            }
            last = Instant::now();
        }
        Sub::Direct(ws) => {
            let prefix = format!("{PATH}:");
            while got < events {
                match ws.ws.next().await {
                    Some(Ok(Message::Text(t))) if t.as_str().starts_with(&prefix) => got += 1,
                    Some(Ok(Message::Close(_))) | None => bail!("the server closed the connection"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e).context("websocket read"),
                }
            }
            last = Instant::now();
        }
        Sub::Raw(conn) => {
            let prefix = format!("{PATH}:0=");
            let end = format!("\"{END}\"");
            while got < events {
                let line = conn
                    .r
                    .next_line()
                    .await?
                    .context("websocat closed the connection")?;
                let Some(data) = line.strip_prefix(prefix.as_bytes()) else {
                    continue;
                };
                if data == end.as_bytes() {
                    break;
                }
                got += 1;
                last = Instant::now();
            }
            lost = events - got;
        }
    }
    Ok((got, lost, last))
}

/// Events per run for `n` subscribers: about `total` deliveries, within bounds.
fn events_for(ctx: &Ctx, n: usize) -> u64 {
    if let Some(e) = ctx.events {
        return e;
    }
    if ctx.smoke {
        return 300;
    }
    (4_000_000 / n as u64).clamp(4_000, 300_000)
}

/// The `fanout` scenario.
pub async fn fanout(ctx: &Ctx) -> anyhow::Result<Section> {
    let ns = ctx.subscribers.clone().unwrap_or_else(|| {
        if ctx.smoke {
            vec![1, 10]
        } else {
            vec![1, 10, 100, 1000]
        }
    });
    let size = ctx.size.unwrap_or(128);
    let mut runs: Vec<FlowRun> = Vec::new();
    let mut errors = Vec::new();
    for &n in &ns {
        let events = events_for(ctx, n);
        for round in 0..ctx.rounds {
            for &v in &ctx.variants {
                eprintln!("fanout: n={n} {v} round {}/{}", round + 1, ctx.rounds);
                match run_flow(ctx, round, v, n, events, size).await {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        eprintln!("fanout: {e:#}");
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let mut table = Table::new(
        &format!(
            "fanout: {size}-byte events on one path, N subscribers (median of {} rounds)",
            ctx.rounds
        ),
        &[
            "N",
            "variant",
            "events",
            "deliveries/s",
            "/ qiod",
            "lost",
            "middle CPU µs/delivery",
            "all CPU µs/delivery",
            "server bytes sent",
            "secs",
        ],
    );
    let mut checks = Vec::new();
    for &n in &ns {
        let qiod_rate = median(
            &runs
                .iter()
                .filter(|r| r.subscribers == n && r.variant == Variant::Qiod)
                .map(FlowRun::rate)
                .collect::<Vec<_>>(),
        );
        for &v in &ctx.variants {
            let rs: Vec<&FlowRun> = runs
                .iter()
                .filter(|r| r.subscribers == n && r.variant == v)
                .collect();
            if rs.is_empty() {
                table.row(vec![n.to_string(), v.to_string(), "failed".into()]);
                continue;
            }
            let m =
                |f: &dyn Fn(&FlowRun) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let rate = m(&|r| r.rate());
            let daemon_us = m(&|r| r.daemon_us());
            let lost = m(&|r| r.lost as f64 / (r.lost + r.delivered).max(1) as f64 * 100.0);
            table.row(vec![
                n.to_string(),
                v.to_string(),
                rs[0].events.to_string(),
                si(rate),
                num(rate / qiod_rate, 2),
                format!("{}%", num(lost, 2)),
                num(daemon_us, 3),
                num(m(&|r| r.total_us()), 3),
                bytes(m(&|r| r.server_bytes as f64)),
                num(m(&|r| r.secs), 3),
            ]);
            if n == 100 && v == Variant::Qiod {
                checks.push(Check::at_least(
                    "fan-out, 100 subscribers: deliveries/s",
                    rate,
                    1_000_000.0,
                    si(rate),
                ));
                checks.push(Check::at_most(
                    "fan-out, 100 subscribers: daemon CPU µs per delivery",
                    daemon_us,
                    1.0,
                    num(daemon_us, 3),
                ));
            }
        }
    }
    table.notes.push(
        "deliveries/s: events received by all subscribers / time from the first broadcast to \
         the last subscriber's last event. lost: events qiod dropped (drop-oldest, announced \
         by /lost) for subscribers that fell more than client_queue_events (4096) behind; \
         the readers share the 2 CPUs with the server and qiod; websocat drops events \
         for a client whose queue is full without telling it (lost = events not \
         received). / qiod: deliveries/s against qiod's in the same run. Middle CPU: \
         schedstat of qiod's (or websocat's) threads, per delivered event; `all` adds the \
         harness process (server, broadcaster, subscribers)."
            .into(),
    );
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "fanout",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

/// The `ingest` scenario: one subscriber, the server broadcasting in a tight loop.
pub async fn ingest(ctx: &Ctx) -> anyhow::Result<Section> {
    let events = ctx
        .events
        .unwrap_or(if ctx.smoke { 2_000 } else { 500_000 });
    let size = ctx.size.unwrap_or(64);
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for round in 0..ctx.rounds {
        for &v in &ctx.variants {
            eprintln!("ingest: {v} round {}/{}", round + 1, ctx.rounds);
            match run_flow(ctx, round, v, 1, events, size).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    eprintln!("ingest: {e:#}");
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    let mut table = Table::new(
        &format!(
            "ingest: one subscriber, {events} events of {size} bytes in a tight loop (median of {} rounds)",
            ctx.rounds
        ),
        &[
            "variant",
            "delivered events/s",
            "/ qiod",
            "lost",
            "events/s into qiod",
            "middle CPU µs/event in",
            "all CPU µs/event in",
            "secs",
        ],
    );
    let mut checks = Vec::new();
    let qiod_rate = median(
        &runs
            .iter()
            .filter(|r| r.variant == Variant::Qiod)
            .map(FlowRun::rate)
            .collect::<Vec<_>>(),
    );
    let direct_rate = median(
        &runs
            .iter()
            .filter(|r| r.variant == Variant::Direct)
            .map(FlowRun::rate)
            .collect::<Vec<_>>(),
    );
    for &v in &ctx.variants {
        let rs: Vec<&FlowRun> = runs.iter().filter(|r| r.variant == v).collect();
        if rs.is_empty() {
            table.row(vec![v.to_string(), "failed".into()]);
            continue;
        }
        let m = |f: &dyn Fn(&FlowRun) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let rate = m(&|r| r.rate());
        table.row(vec![
            v.to_string(),
            si(rate),
            num(rate / qiod_rate, 2),
            format!(
                "{}%",
                num(m(&|r| r.lost as f64 / r.events as f64 * 100.0), 2)
            ),
            if v == Variant::Qiod {
                si(m(&|r| r.events as f64 / r.secs))
            } else {
                String::new()
            },
            num(
                m(&|r| r.daemon_cpu.map_or(f64::NAN, |c| c * 1e6 / r.events as f64)),
                3,
            ),
            num(
                m(&|r| (r.daemon_cpu.unwrap_or(0.0) + r.harness_cpu) * 1e6 / r.events as f64),
                3,
            ),
            num(m(&|r| r.secs), 3),
        ]);
        if v == Variant::Qiod {
            checks.push(Check::at_least(
                "ingest: events/s through qiod (delivered)",
                rate,
                200_000.0,
                si(rate),
            ));
            checks.push(Check::at_least(
                "one subscriber, full speed: qiod deliveries/s / direct's",
                rate / direct_rate,
                0.8,
                num(rate / direct_rate, 2),
            ));
        }
    }
    table.notes.push(
        "delivered: events the subscriber read / time from the first broadcast to its last \
         event. lost: events qiod dropped for it (drop-oldest, announced by /lost) because the \
         reader, which shares the 2 CPUs with the server and qiod, fell behind by more than \
         client_queue_events (4096); into qiod: all events / the same time. direct: the same \
         subscriber on its own WebSocket, i.e. what the test server and tungstenite manage \
         without qiod in between; websocat: the subscriber behind websocat's broadcast \
         overlay. / qiod: delivered events/s against qiod's in the same run."
            .into(),
    );
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "ingest",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}
