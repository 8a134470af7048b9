//! `qio-bench`: qiod against direct WebSocket connections (and, given a websocat binary,
//! websocat's `broadcast:` overlay), on loopback.
//!
//! ```text
//! cargo build --release -p qiod
//! cargo run --release -p qio-bench -- all [--smoke] [--json PATH]
//! ```
//!
//! Every scenario starts its own Quick.IO test server (in this process, on 127.0.0.1 port 0)
//! and its own daemon (the `qiod` binary next to this executable, with a socket in a temp
//! dir), runs the compared variants alternately (qiod, direct, qiod, direct...) for a number
//! of rounds and prints medians. See BENCHMARKS.md for the method and the figures.

mod client;
mod daemon;
mod flow;
mod memory;
mod middle;
mod rate;
mod reconnect;
mod report;
mod roundtrip;
mod slow;
mod sys;
mod websocat;

use anyhow::Context;
use clap::Parser;
use report::Table;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Broadcast to N subscribers through qiod versus N direct WebSockets.
    Fanout,
    /// Request/callback latency through qiod versus a direct WebSocket.
    Roundtrip,
    /// One subscriber, the server sending as fast as it can.
    Ingest,
    /// N subscribers at a fixed, moderate event rate: latency and CPU per delivery.
    Rate,
    /// qiod's memory idle and with many idle clients.
    Memory,
    /// Kill and restart the server; time until subscriptions are restored.
    Reconnect,
    /// Slow readers of big events: N slow subscribers and a fast one; qiod's peak memory
    /// and the fast one's latency.
    SlowReaders,
    /// All of the above, in that order.
    All,
}

/// Which side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Through the daemon.
    Qiod,
    /// Straight to the test server over WebSocket.
    Direct,
    /// Through websocat's `broadcast:` overlay (opt-in: `--websocat PATH`).
    Websocat,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Qiod => "qiod",
            Variant::Direct => "direct",
            Variant::Websocat => "websocat",
        })
    }
}

/// Benchmarks of qiod (see BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which scenario to run.
    #[arg(value_enum, required_unless_present_any = ["serve_echo", "serve_testserver"])]
    scenario: Option<Scenario>,
    /// Internal: serve the roundtrip scenario's echo floor on this Unix socket.
    #[arg(long, hide = true, value_name = "PATH")]
    serve_echo: Option<PathBuf>,
    /// Internal: with --serve-echo, hand each line to a second task before writing it.
    #[arg(long, hide = true)]
    echo_hop: bool,
    /// Internal: run a test server in this process, print its URL, serve until stdin closes.
    #[arg(long, hide = true)]
    serve_testserver: bool,
    /// Tiny sizes and 2 rounds: finishes in seconds (CI).
    #[arg(long)]
    smoke: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Rounds per scenario (default 5, smoke 2).
    #[arg(long)]
    rounds: Option<usize>,
    /// How to run the daemon.
    #[arg(long, value_enum, default_value_t = daemon::Mode::Auto)]
    daemon: daemon::Mode,
    /// The qiod binary (default: `qiod` next to this executable).
    #[arg(long, value_name = "PATH")]
    qiod: Option<PathBuf>,
    /// A command to run the qiod binary under, split at spaces (e.g. for profiling:
    /// "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p").
    #[arg(long, value_name = "CMD", allow_hyphen_values = true)]
    qiod_prefix: Option<String>,
    /// Extra qiod flags, split at spaces.
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    qiod_args: Option<String>,
    /// A websocat binary (1.x): adds the `websocat` variant to fanout, ingest, rate and
    /// roundtrip (e.g. `cargo install websocat --locked --root /opt/websocat`).
    #[arg(long, value_name = "PATH")]
    websocat: Option<PathBuf>,
    /// websocat's `--queue-len` (its per-client broadcast queue, in messages; default:
    /// websocat's own).
    #[arg(long, value_name = "N")]
    websocat_queue: Option<usize>,
    /// Only these variants (default qiod and direct, and websocat when --websocat is given).
    #[arg(long, value_enum, value_delimiter = ',')]
    variants: Option<Vec<Variant>>,
    /// fanout: subscriber counts (default 1,10,100,1000; smoke 1,10). slow-readers: the
    /// first is the number of slow subscribers (default 40; smoke 4).
    #[arg(long, value_delimiter = ',')]
    subscribers: Option<Vec<usize>>,
    /// fanout/ingest/slow-readers: events per run (default: fanout ~4M deliveries, ingest
    /// 500000, slow-readers 10 s worth).
    #[arg(long)]
    events: Option<u64>,
    /// Bytes of event data (fanout 128, ingest 64, slow-readers 16384) or request data
    /// (roundtrip 64).
    #[arg(long)]
    size: Option<usize>,
    /// roundtrip: requests in flight, one run each (default 1,64).
    #[arg(long, value_delimiter = ',')]
    windows: Option<Vec<usize>>,
    /// roundtrip: requests per run (default 5000 one at a time, 50000 pipelined).
    #[arg(long)]
    requests: Option<usize>,
    /// roundtrip: run the test server inside the harness instead of in a process of its own
    /// (then the direct variant never crosses a process boundary).
    #[arg(long)]
    rt_server_in_harness: bool,
    /// roundtrip: skip the floors (qiod's local-only path, the Unix echo); for
    /// profiling the qiod variant alone.
    #[arg(long)]
    no_floors: bool,
    /// memory: client counts (default 1000,10000; smoke 20,100).
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// reconnect: subscribed paths (default 1000; smoke 50).
    #[arg(long)]
    paths: Option<usize>,
    /// slow-readers: events per second the server sends (default 1000). rate: the rates,
    /// one run each (default 500,2000; smoke 500).
    #[arg(long, value_delimiter = ',')]
    rate: Option<Vec<u64>>,
    /// rate: seconds of events per run (default 2; smoke 0.2).
    #[arg(long)]
    secs: Option<f64>,
    /// Longest a single run may take, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Settings shared by the scenarios.
pub struct Ctx {
    launcher: daemon::Launcher,
    rounds: usize,
    smoke: bool,
    run_timeout: Duration,
    variants: Vec<Variant>,
    subscribers: Option<Vec<usize>>,
    events: Option<u64>,
    size: Option<usize>,
    clients: Option<Vec<usize>>,
    paths: Option<usize>,
    rate: Option<Vec<u64>>,
    secs: Option<f64>,
    websocat: Option<websocat::Launcher>,
    windows: Option<Vec<usize>>,
    requests: Option<usize>,
    floors: bool,
    rt_server_process: bool,
}

/// A target and how the run fared against it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    target: String,
    measured: String,
    /// `None`: not measured.
    pass: Option<bool>,
}

impl Check {
    fn at_least(what: &str, value: f64, bound: f64, shown: String) -> Check {
        Check {
            target: format!("{what} ≥ {}", report::si(bound)),
            measured: shown,
            pass: (!value.is_nan()).then_some(value >= bound),
        }
    }

    fn at_most(what: &str, value: f64, bound: f64, shown: String) -> Check {
        Check {
            target: format!("{what} ≤ {bound}"),
            measured: shown,
            pass: (!value.is_nan()).then_some(value <= bound),
        }
    }
}

/// What a scenario hands back.
pub struct Section {
    name: &'static str,
    table: Table,
    json: serde_json::Value,
    checks: Vec<Check>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.serve_echo {
        // A process of its own, like qiod, so the floor pays the same wake-ups.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(roundtrip::serve_echo(path, args.echo_hop));
    }
    if args.serve_testserver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(roundtrip::serve_testserver());
    }
    let scenario = args.scenario.context("a scenario is required")?;
    let nofile = sys::raise_nofile().unwrap_or_else(|e| {
        eprintln!("warning: cannot raise the open-file limit: {e}");
        0
    });
    let split = |s: &Option<String>| -> Vec<String> {
        s.as_deref()
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let launcher = daemon::Launcher::new(
        args.daemon,
        args.qiod.clone(),
        split(&args.qiod_prefix),
        split(&args.qiod_args),
    )?;
    let ctx = Ctx {
        launcher,
        rounds: args.rounds.unwrap_or(if args.smoke { 2 } else { 5 }).max(1),
        smoke: args.smoke,
        run_timeout: Duration::from_secs(args.timeout.max(1)),
        variants: args.variants.clone().unwrap_or_else(|| {
            let mut v = vec![Variant::Qiod, Variant::Direct];
            if args.websocat.is_some() {
                v.push(Variant::Websocat);
            }
            v
        }),
        subscribers: args.subscribers.clone(),
        events: args.events,
        size: args.size,
        clients: args.clients.clone(),
        paths: args.paths,
        rate: args.rate.clone(),
        secs: args.secs,
        websocat: args
            .websocat
            .clone()
            .map(|bin| websocat::Launcher::new(bin, args.websocat_queue))
            .transpose()?,
        windows: args.windows.clone(),
        requests: args.requests,
        floors: !args.no_floors,
        rt_server_process: !args.rt_server_in_harness,
    };
    if ctx.variants.contains(&Variant::Websocat) && ctx.websocat.is_none() {
        anyhow::bail!("the websocat variant needs a websocat binary: --websocat PATH");
    }
    let machine = sys::Machine::read(nofile);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let started = Instant::now();
    println!(
        "qio-bench: {} | {} CPUs ({}) | {} RAM | load {} | daemon: {} | rounds: {}{}",
        format_args!("{:?}", scenario).to_string().to_lowercase(),
        machine.nproc,
        machine.cpu,
        report::bytes(machine.mem_total as f64),
        machine.loadavg,
        ctx.launcher.describe(),
        ctx.rounds,
        if ctx.smoke { " | smoke" } else { "" },
    );
    let sections = runtime.block_on(run(&ctx, scenario))?;
    // Everything the scenarios started is stopped; do not wait for stray tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));

    let mut targets = Table::new("targets", &["target", "measured", "met"]);
    let mut checks = Vec::new();
    for s in &sections {
        for c in &s.checks {
            let met = match c.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            targets.row(vec![c.target.clone(), c.measured.clone(), met.into()]);
            checks.push(c.clone());
        }
    }
    if !checks.is_empty() {
        print!("{}", targets.render());
    }
    let elapsed = started.elapsed();
    println!(
        "\ndone in {:.1} s (load average now {})",
        elapsed.as_secs_f64(),
        sys::loadavg()
    );
    if let Some(path) = &args.json {
        let mut scenarios = serde_json::Map::new();
        for s in &sections {
            scenarios.insert(s.name.into(), s.json.clone());
        }
        let doc = serde_json::json!({
            "machine": machine,
            "daemon": ctx.launcher.describe(),
            "smoke": ctx.smoke,
            "rounds": ctx.rounds,
            "elapsed_secs": elapsed.as_secs_f64(),
            "loadavg_end": sys::loadavg(),
            "scenarios": scenarios,
            "targets": checks,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = sections.iter().any(|s| {
        s.json
            .get("errors")
            .and_then(|e| e.as_array())
            .is_some_and(|e| !e.is_empty())
    });
    if failed {
        anyhow::bail!("some runs failed (see the errors above)");
    }
    Ok(())
}

async fn run(ctx: &Ctx, scenario: Scenario) -> anyhow::Result<Vec<Section>> {
    let all = [
        Scenario::Fanout,
        Scenario::Roundtrip,
        Scenario::Ingest,
        Scenario::Rate,
        Scenario::Memory,
        Scenario::Reconnect,
        Scenario::SlowReaders,
    ];
    let list: Vec<Scenario> = if scenario == Scenario::All {
        all.to_vec()
    } else {
        vec![scenario]
    };
    let mut sections = Vec::new();
    for s in list {
        let section = match s {
            Scenario::Fanout => flow::fanout(ctx).await?,
            Scenario::Roundtrip => roundtrip::roundtrip(ctx).await?,
            Scenario::Ingest => flow::ingest(ctx).await?,
            Scenario::Rate => rate::rate(ctx).await?,
            Scenario::Memory => memory::memory(ctx).await?,
            Scenario::Reconnect => reconnect::reconnect(ctx).await?,
            Scenario::SlowReaders => slow::slow_readers(ctx).await?,
            Scenario::All => unreachable!("expanded above"),
        };
        print!("{}", section.table.render());
        sections.push(section);
    }
    Ok(sections)
}
