//! `rate`: N subscribers of one path while the server sends events at a fixed, moderate
//! rate, each event carrying the time it was sent; latency from the server's send to each
//! subscriber's read, and the CPU the process in the middle (qiod, websocat) spends per
//! delivery. Direct connections have nothing in the middle.

use crate::middle::{Middle, Sub};
use crate::report::{median, num, percentile, si, Table};
use crate::{sys, Check, Ctx, Section, Variant};
use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The broadcast path.
const PATH: &str = "/bench/rate";
/// Subscribers are spread over this many tokio tasks (fewer when there are fewer).
const GROUPS: usize = 4;
/// The data of the end marker (events carry a time, which is never negative).
const END: i64 = -1;

/// The harness's clock: events carry nanoseconds since this instant.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    /// Round number.
    pub round: usize,
    /// Which side.
    pub variant: Variant,
    /// Subscribers.
    pub subscribers: usize,
    /// Events per second the server sent.
    pub rate: u64,
    /// Events sent.
    pub events: u64,
    /// Events received by all subscribers together.
    pub delivered: u64,
    /// Latency percentiles over all deliveries, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// The middle process's CPU time during the run, seconds (none for direct).
    pub middle_cpu: Option<f64>,
    /// The harness's CPU time (server, sender, subscribers), seconds.
    pub harness_cpu: f64,
    /// The rate the server really kept (events / sending time).
    pub sent_rate: f64,
}

impl RateRun {
    fn middle_us(&self) -> f64 {
        self.middle_cpu
            .map_or(f64::NAN, |c| c * 1e6 / self.delivered.max(1) as f64)
    }

    fn harness_us(&self) -> f64 {
        self.harness_cpu * 1e6 / self.delivered.max(1) as f64
    }

    fn lost_pct(&self) -> f64 {
        let want = self.events * self.subscribers as u64;
        want.saturating_sub(self.delivered) as f64 / want.max(1) as f64 * 100.0
    }
}

/// The number after `=` (raw frames) or `"data":` (qiod's lines).
fn timestamp(rest: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(rest).ok()?;
    let end = text
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(text.len(), |(i, _)| i);
    text[..end].parse().ok()
}

/// Reads one subscriber until the end marker; returns the latencies (ns).
async fn consume(sub: &mut Sub, events: u64) -> anyhow::Result<Vec<u64>> {
    let mut lat = Vec::with_capacity(events as usize);
    let mut seen = 0u64;
    let local_prefix = format!(r#"{{"event":"{PATH}","data":"#);
    let raw_prefix = format!("{PATH}:0=");
    loop {
        let ts = match sub {
            Sub::Local(conn) => {
                let line = conn.r.next_line().await?.context("qiod closed")?;
                match line.strip_prefix(local_prefix.as_bytes()) {
                    Some(rest) => timestamp(rest),
                    None => {
                        let msg = crate::client::Msg::parse(line)?;
                        match msg.event.as_deref() {
                            Some("/close") => bail!("qiod lost the server"),
                            // Counted as not delivered.
                            Some("/lost") => None,
                            _ => None,
                        }
                    }
                }
            }
            Sub::Raw(conn) => {
                let line = conn.r.next_line().await?.context("websocat closed")?;
                line.strip_prefix(raw_prefix.as_bytes()).and_then(timestamp)
            }
            Sub::Direct(ws) => match ws.ws.next().await {
                Some(Ok(Message::Text(t))) => t
                    .as_str()
                    .strip_prefix(raw_prefix.as_str())
                    .and_then(|r| timestamp(r.as_bytes())),
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the connection"),
                Some(Ok(_)) => None,
                Some(Err(e)) => return Err(e).context("websocket read"),
            },
        };
        let now = now_ns();
        match ts {
            Some(END) => return Ok(lat),
            Some(t) if t >= 0 => {
                lat.push(now.saturating_sub(t as u64));
                seen += 1;
                // Everything came: no need to wait for the marker.
                if seen == events {
                    return Ok(lat);
                }
            }
            _ => {}
        }
    }
}

async fn consume_group(mut group: Vec<Sub>, events: u64) -> anyhow::Result<(Vec<u64>, Vec<Sub>)> {
    let mut all = Vec::new();
    {
        let mut futs: FuturesUnordered<_> = group.iter_mut().map(|s| consume(s, events)).collect();
        while let Some(res) = futs.next().await {
            all.extend(res?);
        }
    }
    Ok((all, group))
}

/// Runs one variant once at `rate` events/s for `secs`.
async fn run_rate(
    ctx: &Ctx,
    round: usize,
    variant: Variant,
    n: usize,
    rate: u64,
    secs: f64,
) -> anyhow::Result<RateRun> {
    let server = TestServer::start(ServerConfig::default()).await?;
    let middle = match Middle::start(ctx, variant, &server.url()).await {
        Ok(m) => m,
        Err(e) => {
            server.shutdown().await;
            return Err(e);
        }
    };
    let events = ((rate as f64 * secs) as u64).max(1);
    let res =
        tokio::time::timeout(ctx.run_timeout, measure(&server, &middle, n, rate, events)).await;
    let log = middle.log();
    middle.stop().await;
    server.shutdown().await;
    let (mut lat, middle_cpu, harness_cpu, sent_rate) = match res {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => bail!("{variant} rate={rate}: {e:#}\n{log}"),
        Err(_) => bail!(
            "{variant} rate={rate}: not done within {:?} (raise --timeout)\n{log}",
            ctx.run_timeout
        ),
    };
    lat.sort_unstable();
    Ok(RateRun {
        round,
        variant,
        subscribers: n,
        rate,
        events,
        delivered: lat.len() as u64,
        p50_us: percentile(&lat, 50.0) as f64 / 1000.0,
        p99_us: percentile(&lat, 99.0) as f64 / 1000.0,
        middle_cpu,
        harness_cpu,
        sent_rate,
    })
}

async fn measure(
    server: &TestServer,
    middle: &Middle,
    n: usize,
    rate: u64,
    events: u64,
) -> anyhow::Result<(Vec<u64>, Option<f64>, f64, f64)> {
    base();
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
    let cpu0 = middle.cpu()?;
    let self0 = sys::self_cpu();
    let tasks: Vec<_> = per
        .into_iter()
        .map(|g| tokio::spawn(consume_group(g, events)))
        .collect();
    // The sender is a thread of its own that sleeps to each event's due time: tokio's
    // timers have a 1 ms resolution, which would send 2,000/s as pairs.
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let srv = server.clone();
    let handle = tokio::runtime::Handle::current();
    let sender = std::thread::spawn(move || {
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let t0 = Instant::now();
        for i in 0..events {
            let due = t0 + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            handle.block_on(srv.broadcast(PATH, json!(now_ns())));
        }
        let sent = events as f64 / t0.elapsed().as_secs_f64();
        // Whatever websocat dropped, one of these gets through once its queues drain.
        while !stop.load(Ordering::Relaxed) {
            handle.block_on(srv.broadcast(PATH, json!(END)));
            std::thread::sleep(Duration::from_millis(5));
        }
        sent
    });
    let mut lat = Vec::new();
    let mut groups_done = Vec::new();
    let mut failed = None;
    for t in tasks {
        match t.await.context("subscriber task") {
            Ok(Ok((l, g))) => {
                lat.extend(l);
                groups_done.push(g);
            }
            Ok(Err(e)) | Err(e) => failed = Some(e),
        }
    }
    let cpu1 = middle.cpu()?;
    let self1 = sys::self_cpu();
    done.store(true, Ordering::Relaxed);
    let sent_rate = tokio::task::spawn_blocking(move || sender.join())
        .await
        .context("sender")?
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let middle_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    let mut harness = (self1 - self0).as_secs_f64();
    if middle.in_harness() {
        harness -= middle_cpu.unwrap_or(0.0);
    }
    drop(groups_done);
    Ok((lat, middle_cpu, harness, sent_rate))
}

/// The `rate` scenario.
pub async fn rate(ctx: &Ctx) -> anyhow::Result<Section> {
    let n = ctx
        .subscribers
        .as_ref()
        .and_then(|s| s.first().copied())
        .unwrap_or(if ctx.smoke { 10 } else { 100 });
    let rates = ctx.rate.clone().unwrap_or_else(|| {
        if ctx.smoke {
            vec![500]
        } else {
            vec![500, 2000]
        }
    });
    let secs = ctx.secs.unwrap_or(if ctx.smoke { 0.2 } else { 2.0 });
    let mut runs: Vec<RateRun> = Vec::new();
    let mut errors = Vec::new();
    for &r in &rates {
        for round in 0..ctx.rounds {
            for &v in &ctx.variants {
                eprintln!("rate: {r}/s {v} round {}/{}", round + 1, ctx.rounds);
                match run_rate(ctx, round, v, n, r.max(1), secs).await {
                    Ok(run) => runs.push(run),
                    Err(e) => {
                        eprintln!("rate: {e:#}");
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let mut table = Table::new(
        &format!(
            "rate: {n} subscribers of one path, events at a fixed rate for {secs} s, \
             the send time in each (median of {} rounds)",
            ctx.rounds
        ),
        &[
            "events/s",
            "variant",
            "deliveries",
            "lost",
            "p50 µs",
            "p99 µs",
            "p50 / qiod",
            "p99 / qiod",
            "middle CPU µs/delivery",
            "/ qiod",
            "harness CPU µs/delivery",
        ],
    );
    let mut checks = Vec::new();
    for &r in &rates {
        let of = |v: Variant| -> Vec<&RateRun> {
            runs.iter()
                .filter(|x| x.rate == r && x.variant == v)
                .collect()
        };
        let m = |rs: &[&RateRun], f: &dyn Fn(&RateRun) -> f64| {
            median(&rs.iter().map(|x| f(x)).collect::<Vec<_>>())
        };
        let q = of(Variant::Qiod);
        let (q50, q99, qcpu) = (
            m(&q, &|x| x.p50_us),
            m(&q, &|x| x.p99_us),
            m(&q, &|x| x.middle_us()),
        );
        for &v in &ctx.variants {
            let rs = of(v);
            if rs.is_empty() {
                table.row(vec![r.to_string(), v.to_string(), "failed".into()]);
                continue;
            }
            let (p50, p99, cpu) = (
                m(&rs, &|x| x.p50_us),
                m(&rs, &|x| x.p99_us),
                m(&rs, &|x| x.middle_us()),
            );
            table.row(vec![
                r.to_string(),
                v.to_string(),
                si(m(&rs, &|x| x.delivered as f64)),
                format!("{}%", num(m(&rs, &|x| x.lost_pct()), 2)),
                num(p50, 1),
                num(p99, 1),
                num(p50 / q50, 2),
                num(p99 / q99, 2),
                num(cpu, 3),
                num(cpu / qcpu, 2),
                num(m(&rs, &|x| x.harness_us()), 3),
            ]);
            if v == Variant::Websocat {
                checks.push(Check::at_most(
                    &format!("{n} subscribers at {r}/s: qiod CPU per delivery / websocat's"),
                    qcpu / cpu,
                    1.0,
                    format!(
                        "{} ({} vs {} µs)",
                        num(qcpu / cpu, 2),
                        num(qcpu, 3),
                        num(cpu, 3)
                    ),
                ));
                checks.push(Check::at_most(
                    &format!("{n} subscribers at {r}/s: qiod p50 latency / websocat's"),
                    q50 / p50,
                    1.0,
                    format!(
                        "{} ({} vs {} µs)",
                        num(q50 / p50, 2),
                        num(q50, 1),
                        num(p50, 1)
                    ),
                ));
                checks.push(Check::at_most(
                    &format!("{n} subscribers at {r}/s: qiod p99 latency / websocat's"),
                    q99 / p99,
                    1.0,
                    format!(
                        "{} ({} vs {} µs)",
                        num(q99 / p99, 2),
                        num(q99, 1),
                        num(p99, 1)
                    ),
                ));
            }
        }
    }
    table.notes.push(
        "Each run: a fresh server and middle process, the subscribers connected and \
         subscribed, then the server broadcasts events at the rate (a sender thread sleeping \
         to each event's due time), each event's data the harness clock when it was sent; \
         latency = a subscriber's read minus that time, over all deliveries of the run. \
         lost: deliveries that never came (websocat drops without telling; qiod says \
         /lost). Middle CPU: schedstat of qiod's or websocat's threads during the run, per \
         delivery; direct has no middle process (its cost is in the server, inside the \
         harness: see the harness column, which also holds the readers)."
            .into(),
    );
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "rate",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_from_either_kind_of_line() {
        assert_eq!(timestamp(b"12345}"), Some(12345));
        assert_eq!(timestamp(b"-1"), Some(-1));
        assert_eq!(timestamp(b"7"), Some(7));
        assert_eq!(timestamp(b"x"), None);
    }
}
