//! The qiod binary: configuration, logging, signals and the socket around [`qiod::run`].
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration error (one line on
//! stderr), 1 for anything else that stops the daemon.
//!
//! Under systemd (`Type=notify`, see `systemd/`) it reports readiness, status and watchdog
//! keep-alives ([`notify`]). The demo (qiod with its own Quick.IO server) is the test server
//! crate's `qiod-demo` binary, so this one links no server.

mod assets;
mod notify;

use anyhow::Context;
use clap::CommandFactory;
use qio_platform::process::{Request, Signals};
use qiod::config::{self, Args, Config};
use qiod::socket::{self, SocketGuard};
use std::io::IsTerminal;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::process::ExitCode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    if let Some(dir) = assets::requested() {
        return match assets::write(Args::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qiod: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match Args::from_command_line(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => match config::invalid_value(&e) {
            Some(bad) => {
                eprintln!("qiod: {bad}");
                return ExitCode::from(2);
            }
            // Help, version, or a usage error: clap prints it and exits 0 or 2.
            None => e.exit(),
        },
    };
    let config = match config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("qiod: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(bad) = check_tls(&config) {
        eprintln!("qiod: {bad}");
        return ExitCode::from(2);
    }
    let filter = match log_filter(&config.log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("qiod: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = init_tracing(filter);
    match start(config, filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stderr rather than tracing: the log filter may hide errors, this must show.
            eprintln!("qiod: {e:#}");
            notify::failed(&e);
            ExitCode::FAILURE
        }
    }
}

/// Builds the TLS client settings once, as the session will: a `ca_file` that cannot be
/// read or holds no usable certificate is then a configuration error (exit 2, naming the
/// key, where it was set and the file) rather than a failure after binding the socket.
fn check_tls(config: &Config) -> Result<(), config::Invalid> {
    let Some(path) = &config.settings.driver.ca_file else {
        return Ok(());
    };
    match qiod::tls::client_config(Some(path)) {
        Ok(_) => Ok(()),
        Err(e) => Err(config::Invalid {
            key: "ca_file".into(),
            origin: config.origin("ca_file"),
            message: e.to_string(),
        }),
    }
}

/// The filter to log with: `RUST_LOG` when set (a developer's override), else `log`.
fn log_filter(configured: &str) -> Result<EnvFilter, String> {
    match rust_log() {
        Some(v) => EnvFilter::builder()
            .parse(&v)
            .map_err(|e| format!("RUST_LOG: {v:?} is not a log filter: {e}")),
        // Checked when the configuration was loaded.
        None => EnvFilter::builder()
            .parse(configured)
            .map_err(|e| format!("log: {configured:?} is not a log filter: {e}")),
    }
}

fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty())
}

fn init_tracing(filter: EnvFilter) -> FilterHandle {
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // Only fails if a subscriber is already set, which nothing here does.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    handle
}

/// Sets up the process (fd limit, socket, runtime) and serves until shut down.
fn start(config: Config, filter: FilterHandle) -> anyhow::Result<()> {
    // Before the runtime starts threads: taking the systemd socket edits the environment.
    let (listener, guard) = listen(&config)?;
    // After the socket, so that a daemon that cannot start says only why.
    let limit = qio_platform::process::raise_nofile_limit();
    let clients = u64::try_from(config.settings.ipc.max_clients).unwrap_or(u64::MAX);
    if clients > limit {
        tracing::warn!(
            "max_clients ({clients}) is above the open-file limit ({limit}); \
             connections beyond the limit will fail"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(config, listener, guard.as_ref(), filter));
    drop(runtime);
    drop(guard);
    result
}

/// The socket to serve on: systemd's, else one bound at the configured path. Called
/// before the runtime starts its threads.
fn listen(config: &Config) -> anyhow::Result<(StdUnixListener, Option<SocketGuard>)> {
    // SAFETY: `start` calls this before building the runtime, and nothing before it
    // starts a thread (logging writes from the calling thread), so no thread can read
    // the environment while the LISTEN_* variables are removed.
    if let Some(listener) = unsafe { qio_platform::activation::from_systemd() } {
        tracing::info!("listening on the socket passed by systemd");
        return Ok((listener, None));
    }
    let path = &config.socket;
    let shared = !config.settings.ipc.allowed_gids.is_empty();
    let listener = socket::bind_with(path, &socket::BindOptions::from_env(shared))?;
    let guard = SocketGuard::new(path);
    tracing::info!("listening on {}", path.display());
    Ok((listener, Some(guard)))
}

/// Runs the daemon on `listener`; `guard` is its socket file when we bound it ourselves
/// (not when systemd passed it).
async fn serve(
    config: Config,
    listener: StdUnixListener,
    guard: Option<&SocketGuard>,
    filter: FilterHandle,
) -> anyhow::Result<()> {
    // interprocess's listener, non-blocking and registered with this runtime.
    let listener = qio_platform::local::listener_from_std(listener)
        .context("cannot register the socket with the runtime")?;
    // Registered before serving so that no signal arrives to the default (fatal) action.
    let signals = Signals::new()?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(4);

    let servers: Vec<&str> = config
        .settings
        .driver
        .session
        .servers
        .iter()
        .map(|u| u.as_str())
        .collect();
    match &config.config_file {
        Some(file) => tracing::info!(?servers, config = %file.display(), "qiod starting"),
        None => tracing::info!(?servers, "qiod starting (no config file)"),
    }

    let (observer, notify_task) = if notify::enabled() {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (states_tx, states_rx) = mpsc::channel(STATE_BACKLOG);
        let watchdog = notify::watchdog_period();
        if let Some(period) = watchdog {
            tracing::info!("systemd watchdog: a keep-alive every {:?}", period / 2);
        }
        let task = tokio::spawn(notify::supervise(
            ready_rx,
            states_rx,
            watchdog,
            shutdown.clone(),
        ));
        let observer = qiod::Observer {
            ready: Some(ready_tx),
            states: Some(states_tx),
        };
        (observer, Some(task))
    } else {
        (qiod::Observer::default(), None)
    };

    let settings = config.settings.clone();
    let check_every = settings.ipc.socket_check_interval;
    let signal_task = tokio::spawn(handle_signals(
        signals,
        config,
        filter,
        shutdown.clone(),
        reload_tx,
    ));
    let run = qiod::run_with(settings, listener, shutdown.clone(), reload_rx, observer);
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        why = watch_socket(guard, check_every) => {
            tracing::error!("{why}; stopping (start qiod again to listen on it)");
            shutdown.cancel();
            let _ = run.await;
            Err(anyhow::anyhow!(why))
        }
    };
    shutdown.cancel();
    signal_task.abort();
    if let Some(task) = notify_task {
        // It sends STOPPING=1 on the cancellation above and ends.
        let _ = task.await;
    }
    match &result {
        Ok(()) => tracing::info!("stopped"),
        Err(e) => tracing::error!("stopped: {e:#}"),
    }
    result
}

/// Resolves when the socket file we bound is deleted or replaced, with what happened.
///
/// Nobody could reach this daemon any more, and a second one could start on the path
/// and open a second upstream connection, so the caller stops with an error: a
/// supervisor (systemd's `Restart=on-failure`, or the next auto-starting client) starts
/// a daemon that binds the path anew. A socket systemd passed is systemd's: never watched.
async fn watch_socket(guard: Option<&SocketGuard>, every: std::time::Duration) -> String {
    let Some(check) = guard.map(SocketGuard::checker) else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let check = check.clone();
        match tokio::task::spawn_blocking(move || check()).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return why,
            Err(e) => return format!("cannot check the socket file: {e}"),
        }
    }
}

/// State changes the systemd status line may lag behind by; beyond, changes are skipped
/// (the line shows a later one soon enough).
const STATE_BACKLOG: usize = 64;

/// SIGTERM/SIGINT stop the daemon (a second one during shutdown exits at once);
/// SIGHUP reloads the configuration.
async fn handle_signals(
    mut signals: Signals,
    running: Config,
    filter: FilterHandle,
    shutdown: CancellationToken,
    reload_tx: mpsc::Sender<qiod::Reload>,
) {
    loop {
        let name = match signals.next().await {
            Request::Stop(name) => name,
            Request::Reload => {
                notify::reloading();
                reload(&running, &filter, &reload_tx).await;
                notify::reloaded();
                continue;
            }
        };
        if shutdown.is_cancelled() {
            tracing::warn!("{name} again: exiting without waiting for a clean shutdown");
            std::process::exit(1);
        }
        tracing::info!("{name}: shutting down");
        shutdown.cancel();
    }
}

/// Applies what a reload can change while running (servers, log filter) and says which
/// other changes wait for a restart. A bad configuration keeps the running one.
async fn reload(running: &Config, filter: &FilterHandle, reload_tx: &mpsc::Sender<qiod::Reload>) {
    tracing::info!("SIGHUP: reloading the configuration");
    let current = running.clone();
    // Group names may be resolved over the network (NSS) and the CA file is read, so off
    // the async threads.
    let reloaded = move || {
        let new = current.reload().map_err(|e| e.to_string())?;
        check_tls(&new).map_err(|e| e.to_string())?;
        Ok::<_, String>(new)
    };
    let new = match tokio::task::spawn_blocking(reloaded).await {
        Ok(Ok(new)) => new,
        Ok(Err(e)) => {
            tracing::error!("reload failed, keeping the running configuration: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("reload failed, keeping the running configuration: {e}");
            return;
        }
    };
    if rust_log().is_some() {
        tracing::debug!("RUST_LOG is set and wins over log");
    } else {
        match EnvFilter::builder().parse(&new.log) {
            Ok(f) => {
                if let Err(e) = filter.reload(f) {
                    tracing::warn!("cannot change the log filter: {e}");
                }
            }
            Err(e) => tracing::warn!("log: {:?} is not a log filter: {e}", new.log),
        }
    }
    let restart = running.needs_restart(&new);
    if !restart.is_empty() {
        tracing::warn!(
            "changes to {} take effect at the next start",
            restart.join(", ")
        );
    }
    let servers = new.settings.driver.session.servers.clone();
    tracing::info!(
        servers = ?servers.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
        log = %new.log,
        "configuration reloaded"
    );
    if reload_tx.send(qiod::Reload { servers }).await.is_err() {
        tracing::debug!("the daemon is stopping; reload not applied");
    }
}
