//! `roundtrip`: a request with a callback, answered by the server (it echoes any app path),
//! through qiod (`send` with an `id`) versus over a direct WebSocket; one at a time and with
//! 64 in flight.

use crate::client::{json_str, parse_callback, LineConn, Msg, WsConn};
use crate::report::{median, num, si, Lat, Table};
use crate::{Check, Ctx, Section, Variant};
use anyhow::{bail, Context};
use futures_util::SinkExt;
use qio_testserver::{ServerConfig, TestServer};
use serde::Serialize;
use serde_json::json;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Echoed by the test server without a chained callback request.
const PATH: &str = "/bench/echo";

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RtRun {
    /// Round number.
    pub round: usize,
    /// Which side.
    pub kind: Kind,
    /// Requests in flight.
    pub window: usize,
    /// Requests measured.
    pub requests: usize,
    /// Latency from writing the request to reading its reply, microseconds.
    pub lat: Lat,
    /// Requests per second.
    pub rate: f64,
    /// The daemon's CPU time per request, µs (qiod variants).
    pub daemon_us: Option<f64>,
}

/// What is measured: the two compared variants, and two floors of the qiod path that
/// explain its latency (sequential only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `send` with an id through qiod.
    Qiod,
    /// The same request on a direct WebSocket.
    Direct,
    /// The same frame through websocat's broadcast overlay (one local client).
    Websocat,
    /// qiod's `off` of a path nobody holds: answered by the client's task alone (socket,
    /// line parsing, the reply through the outbox and the writer task); no upstream.
    QiodLocal,
    /// A tokio echo server on a Unix socket, in a process of its own: one local hop, no qiod.
    UnixEcho,
    /// The same echo, but the reading task hands each line to a writing task over a
    /// channel (as qiod's client task hands replies to its writer): the cost of one hop.
    UnixEchoHop,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Qiod => "qiod",
            Kind::Direct => "direct",
            Kind::Websocat => "websocat",
            Kind::QiodLocal => "qiod, local only (`off`)",
            Kind::UnixEcho => "Unix echo (floor)",
            Kind::UnixEchoHop => "Unix echo + 1 task hop",
        }
    }
}

/// What is being timed: a local client of qiod or a direct WebSocket client.
enum Client {
    Local(LineConn),
    LocalOff(LineConn),
    Echo(LineConn),
    EchoHop(LineConn),
    Direct(Box<WsConn>),
    /// A local client of websocat: raw frames as lines.
    Raw(LineConn),
}

impl Client {
    async fn send(&mut self, id: u64, payload: &str) -> anyhow::Result<()> {
        match self {
            Client::Local(c) => {
                c.send(&format!(
                    r#"{{"op":"send","id":{id},"path":"{PATH}","data":{payload}}}"#
                ))
                .await
            }
            Client::LocalOff(c) => {
                c.send(&format!(r#"{{"op":"off","id":{id},"path":"/bench/none"}}"#))
                    .await
            }
            Client::Echo(c) | Client::EchoHop(c) => {
                c.send(&format!(r#"{{"id":{id},"code":200}}"#)).await
            }
            Client::Direct(ws) => {
                ws.ws
                    .send(Message::text(format!("{PATH}:{id}={payload}")))
                    .await?;
                Ok(())
            }
            Client::Raw(c) => c.send(&format!("{PATH}:{id}={payload}")).await,
        }
    }

    /// The next reply's id; fails on anything but 200.
    async fn reply(&mut self) -> anyhow::Result<u64> {
        match self {
            Client::Local(c) | Client::LocalOff(c) | Client::Echo(c) | Client::EchoHop(c) => loop {
                let line = c.r.next_line().await?.context("qiod closed")?;
                let msg = Msg::parse(line)?;
                if msg.event.is_some() {
                    continue;
                }
                let id = msg.id.context("reply without id")?;
                if msg.code != Some(200) {
                    bail!("request {id}: code {:?} {:?}", msg.code, msg.err_msg);
                }
                return Ok(id);
            },
            Client::Direct(ws) => loop {
                let text = ws.next_text().await?;
                if let Some((id, code)) = parse_callback(&text) {
                    if code != 200 {
                        bail!("request {id}: code {code}");
                    }
                    return Ok(id);
                }
            },
            Client::Raw(c) => loop {
                let line = c.r.next_line().await?.context("websocat closed")?;
                if let Some((id, code)) = std::str::from_utf8(line).ok().and_then(parse_callback) {
                    if code != 200 {
                        bail!("request {id}: code {code}");
                    }
                    return Ok(id);
                }
            },
        }
    }

    /// `total` requests with at most `window` in flight; ids from `*next`. Returns the
    /// latencies (ns) and the elapsed time.
    async fn run(
        &mut self,
        next: &mut u64,
        total: usize,
        window: usize,
        payload: &str,
    ) -> anyhow::Result<(Vec<u64>, f64)> {
        let base = *next;
        *next += total as u64;
        let mut sent: Vec<Instant> = Vec::with_capacity(total);
        let mut lat = Vec::with_capacity(total);
        let t0 = Instant::now();
        while sent.len() < window.min(total) {
            sent.push(Instant::now());
            self.send(base + sent.len() as u64 - 1, payload).await?;
        }
        while lat.len() < total {
            let id = self.reply().await?;
            let now = Instant::now();
            let i = id
                .checked_sub(base)
                .map(|i| i as usize)
                .filter(|&i| i < sent.len())
                .with_context(|| format!("unexpected reply id {id}"))?;
            lat.push((now - sent[i]).as_nanos() as u64);
            if sent.len() < total {
                sent.push(Instant::now());
                self.send(base + sent.len() as u64 - 1, payload).await?;
            }
        }
        Ok((lat, t0.elapsed().as_secs_f64()))
    }
}

/// The `roundtrip` scenario.
pub async fn roundtrip(ctx: &Ctx) -> anyhow::Result<Section> {
    let (seq, piped, warm) = if ctx.smoke {
        (200, 2_000, 50)
    } else {
        (5_000, 50_000, 1_000)
    };
    let payload = json_str(&"p".repeat(ctx.size.unwrap_or(64).saturating_sub(2)));
    let modes: Vec<(usize, usize)> = ctx
        .windows
        .clone()
        .unwrap_or_else(|| vec![1, 64])
        .into_iter()
        .map(|w| {
            (
                w.max(1),
                ctx.requests.unwrap_or(if w <= 1 { seq } else { piped }),
            )
        })
        .collect();
    let mut runs: Vec<RtRun> = Vec::new();
    let mut errors = Vec::new();
    for round in 0..ctx.rounds {
        eprintln!("roundtrip: round {}/{}", round + 1, ctx.rounds);
        if let Err(e) = tokio::time::timeout(
            ctx.run_timeout,
            one_round(ctx, round, &modes, warm, &payload, &mut runs),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("round timed out")))
        {
            eprintln!("roundtrip: {e:#}");
            errors.push(format!("{e:#}"));
        }
    }
    let mut table = Table::new(
        &format!(
            "roundtrip: `send` with a callback, {}-byte data (p50/p99: median of {} rounds; max: over all rounds)",
            payload.len(),
            ctx.rounds
        ),
        &[
            "in flight",
            "variant",
            "requests",
            "p50 µs",
            "p99 µs",
            "max µs",
            "requests/s",
            "middle CPU µs/request",
            "p50 / direct",
            "p99 / direct",
            "p50 / qiod",
            "p99 / qiod",
        ],
    );
    let mut checks = Vec::new();
    for &(window, _) in &modes {
        let lat_of = |k: Kind| {
            let lats: Vec<Lat> = runs
                .iter()
                .filter(|r| r.window == window && r.kind == k)
                .map(|r| r.lat)
                .collect();
            (!lats.is_empty()).then(|| Lat::combine(&lats))
        };
        let direct = lat_of(Kind::Direct);
        let qiod = lat_of(Kind::Qiod);
        for k in [
            Kind::Qiod,
            Kind::Direct,
            Kind::Websocat,
            Kind::QiodLocal,
            Kind::UnixEcho,
            Kind::UnixEchoHop,
        ] {
            let rs: Vec<&RtRun> = runs
                .iter()
                .filter(|r| r.window == window && r.kind == k)
                .collect();
            let Some(lat) = lat_of(k) else {
                continue;
            };
            let rate = median(&rs.iter().map(|r| r.rate).collect::<Vec<_>>());
            let cpu = median(
                &rs.iter()
                    .map(|r| r.daemon_us.unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            );
            let (r50, r99) = match direct {
                Some(d) if k != Kind::Direct => (lat.p50 / d.p50, lat.p99 / d.p99),
                _ => (f64::NAN, f64::NAN),
            };
            let (q50, q99) = match qiod {
                Some(q) if k != Kind::Qiod => (lat.p50 / q.p50, lat.p99 / q.p99),
                _ => (f64::NAN, f64::NAN),
            };
            let blank_nan = |x: f64| if x.is_nan() { String::new() } else { num(x, 2) };
            table.row(vec![
                window.to_string(),
                k.name().into(),
                rs[0].requests.to_string(),
                num(lat.p50, 1),
                num(lat.p99, 1),
                num(lat.max, 1),
                si(rate),
                blank_nan(cpu),
                blank_nan(r50),
                blank_nan(r99),
                blank_nan(q50),
                blank_nan(q99),
            ]);
            if k == Kind::Qiod && window == 1 {
                let d = |f: fn(&Lat) -> f64| num(direct.as_ref().map_or(f64::NAN, f), 1);
                checks.push(Check::at_most(
                    "round trip (sequential): qiod p50 / direct p50",
                    r50,
                    1.5,
                    format!(
                        "{} ({} vs {} µs)",
                        num(r50, 2),
                        num(lat.p50, 1),
                        d(|l| l.p50)
                    ),
                ));
                checks.push(Check::at_most(
                    "round trip (sequential): qiod p99 / direct p99",
                    r99,
                    2.0,
                    format!(
                        "{} ({} vs {} µs)",
                        num(r99, 2),
                        num(lat.p99, 1),
                        d(|l| l.p99)
                    ),
                ));
            }
        }
    }
    table.notes.push(format!(
        "Each round: a fresh server and daemon, the variants in turn (qiod, direct, websocat when \
         given, then the floors; websocat and the floors sequential only, as websocat drops \
         replies that do not fit its queue); {warm} warm-up requests per run are not counted; latency = \
         write of the request to read of its reply, in the client. The floors explain the \
         qiod figure: `local only` is qiod's own IPC path without the upstream hop; `Unix \
         echo` is one local socket round trip to a tokio echo process (no qiod); `+ 1 task \
         hop` the same with each reply handed to a second task, as qiod hands replies to a \
         client's writer task."
    ));
    table.notes.push(if ctx.rt_server_process {
        "The test server runs in a process of its own, as a real server would, so both \
         variants cross process boundaries (--rt-server-in-harness puts it in the harness)."
            .into()
    } else {
        "The test server runs inside the harness: the direct variant never crosses a \
         process boundary, qiod's does twice."
            .into()
    });
    for e in &errors {
        table.notes.push(format!("error: {e}"));
    }
    Ok(Section {
        name: "roundtrip",
        table,
        json: json!({ "runs": runs, "errors": errors }),
        checks,
    })
}

/// A line echo server on a Unix socket, run by `qio-bench --serve-echo PATH` in a process
/// of its own (the floor of one local hop); with `hop`, each connection's reading task
/// passes the lines to a writing task over a channel. Runs until killed.
pub async fn serve_echo(path: &std::path::Path, hop: bool) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut r = crate::client::LineReader::new(rd, 64 * 1024);
            if hop {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    while let Some(out) = rx.recv().await {
                        if wr.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                });
                while let Ok(Some(line)) = r.next_line().await {
                    let mut out = line.to_vec();
                    out.push(b'\n');
                    if tx.send(out).is_err() {
                        break;
                    }
                }
            } else {
                while let Ok(Some(line)) = r.next_line().await {
                    let mut out = line.to_vec();
                    out.push(b'\n');
                    if wr.write_all(&out).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
}

/// Starts `serve_echo` as a child process and connects to it.
async fn echo_client(
    dir: &std::path::Path,
    hop: bool,
) -> anyhow::Result<(tokio::process::Child, LineConn)> {
    let path = dir.join(if hop { "echo-hop.sock" } else { "echo.sock" });
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("--serve-echo").arg(&path);
    if hop {
        cmd.arg("--echo-hop");
    }
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the echo process")?;
    for _ in 0..500 {
        if let Ok(c) = LineConn::connect_with(&path, 64 * 1024).await {
            return Ok((child, c));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    bail!("the echo process did not listen on {}", path.display())
}

async fn one_round(
    ctx: &Ctx,
    round: usize,
    modes: &[(usize, usize)],
    warm: usize,
    payload: &str,
    runs: &mut Vec<RtRun>,
) -> anyhow::Result<()> {
    let server = Server::start(ctx.rt_server_process).await?;
    let with_qiod = ctx.variants.contains(&Variant::Qiod);
    let daemon = if with_qiod {
        Some(ctx.launcher.start(server.url()).await?)
    } else {
        None
    };
    let websocat = match (&ctx.websocat, ctx.variants.contains(&Variant::Websocat)) {
        (Some(l), true) => Some(l.start(server.url()).await?),
        _ => None,
    };
    let dir = tempfile::tempdir()?;
    let res = async {
        let mut clients: Vec<(Kind, Client)> = Vec::new();
        let mut children = Vec::new();
        for &v in &ctx.variants {
            match (v, &daemon) {
                (Variant::Qiod, Some(d)) => {
                    let mut c = LineConn::connect_with(d.socket(), 64 * 1024).await?;
                    c.wait_event("/open").await?;
                    clients.push((Kind::Qiod, Client::Local(c)));
                }
                (Variant::Qiod, None) => bail!("no daemon"),
                (Variant::Direct, _) => {
                    let ws = WsConn::connect(server.url()).await?;
                    clients.push((Kind::Direct, Client::Direct(Box::new(ws))));
                }
                (Variant::Websocat, _) => {
                    let w = websocat.as_ref().context("no websocat")?;
                    let mut c = LineConn::connect_with(w.socket(), 64 * 1024).await?;
                    c.send("/qio/ohai").await?;
                    while c.r.next_line().await?.context("websocat closed")? != b"/qio/ohai" {}
                    clients.push((Kind::Websocat, Client::Raw(c)));
                }
            }
        }
        if ctx.floors {
            if let Some(d) = &daemon {
                let mut c = LineConn::connect_with(d.socket(), 64 * 1024).await?;
                c.wait_event("/open").await?;
                clients.push((Kind::QiodLocal, Client::LocalOff(c)));
            }
            let (child, echo) = echo_client(dir.path(), false).await?;
            children.push(child);
            clients.push((Kind::UnixEcho, Client::Echo(echo)));
            let (child, echo) = echo_client(dir.path(), true).await?;
            children.push(child);
            clients.push((Kind::UnixEchoHop, Client::EchoHop(echo)));
        }
        let mut next = 1u64;
        for &(window, total) in modes {
            for (kind, client) in clients.iter_mut() {
                let floor = matches!(kind, Kind::QiodLocal | Kind::UnixEcho | Kind::UnixEchoHop);
                // websocat drops what does not fit its client's queue (--queue-len, 16 by
                // default), replies too: a dropped reply would never come.
                let lossy = *kind == Kind::Websocat;
                if (floor || lossy) && window > 1 {
                    continue;
                }
                client.run(&mut next, warm, window, payload).await?;
                let via_qiod = matches!(kind, Kind::Qiod | Kind::QiodLocal);
                let middle_cpu = || -> anyhow::Result<Option<std::time::Duration>> {
                    Ok(match (&daemon, &websocat) {
                        (Some(d), _) if via_qiod => Some(d.cpu()?),
                        (_, Some(w)) if *kind == Kind::Websocat => Some(w.cpu()?),
                        _ => None,
                    })
                };
                let cpu0 = middle_cpu()?;
                let (lat, secs) = client.run(&mut next, total, window, payload).await?;
                let daemon_us = match (middle_cpu()?, cpu0) {
                    (Some(c1), Some(c0)) => Some((c1 - c0).as_secs_f64() * 1e6 / total as f64),
                    _ => None,
                };
                runs.push(RtRun {
                    round,
                    kind: *kind,
                    window,
                    requests: total,
                    lat: Lat::of(lat),
                    rate: total as f64 / secs,
                    daemon_us,
                });
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(d) = daemon {
        d.stop().await;
    }
    if let Some(w) = websocat {
        w.stop().await;
    }
    server.shutdown().await;
    res
}

/// The test server of a round: in a process of its own (the default: both variants then
/// cross the same process boundaries a real deployment has), or in the harness.
enum Server {
    Child {
        _child: tokio::process::Child,
        url: String,
    },
    Local {
        server: TestServer,
        url: String,
    },
}

impl Server {
    async fn start(own_process: bool) -> anyhow::Result<Server> {
        if !own_process {
            let server = TestServer::start(ServerConfig::default()).await?;
            let url = server.url();
            return Ok(Server::Local { server, url });
        }
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--serve-testserver")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the test server process")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let url = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .context("the test server process did not start")??
            .context("the test server process exited")?;
        Ok(Server::Child { _child: child, url })
    }

    fn url(&self) -> &str {
        match self {
            Server::Child { url, .. } | Server::Local { url, .. } => url,
        }
    }

    async fn shutdown(self) {
        if let Server::Local { server, .. } = self {
            server.shutdown().await;
        }
    }
}

/// `qio-bench --serve-testserver`: a test server in a process of its own; prints its URL,
/// serves until its stdin closes (the harness exits or drops it).
pub async fn serve_testserver() -> anyhow::Result<()> {
    let server = TestServer::start(ServerConfig::default()).await?;
    println!("{}", server.url());
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await? > 0 {}
    server.shutdown().await;
    Ok(())
}
