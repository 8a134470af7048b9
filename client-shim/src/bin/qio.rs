//! `qio`: subscribe, send, look at the daemon's state, or type protocol lines, from a shell.
//!
//! Exit codes are listed in `EXIT_CODES` (shown by `qio --help`) and in the crate README.

#[path = "qio/assets.rs"]
mod assets;

use clap::{CommandFactory, Parser, Subcommand};
use futures_util::StreamExt;
use qio_client::{Client, ConnectionEvent, Error};
use serde::Serialize;
use serde_json::Value;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OK: u8 = 0;
const FAILED: u8 = 1;
const USAGE: u8 = 2;
const NO_ANSWER: u8 = 3;
const NOT_RUNNING: u8 = 4;
const UNTRUSTED: u8 = 5;

const EXIT_CODES: &str = "\
Exit codes:
  0  success; for send --wait, the answer's code was 200
  1  the answer's code was not 200 (the server or the daemon refused), or another failure
  2  bad usage, or data that is not valid JSON
  3  no answer: the connection was lost (code -1 or the daemon went away) or it timed out
     (code -2, or --timeout)
  4  qiod is not running, or its socket cannot be reached
  5  the socket is not trusted: its folder could be another user's (a symlink, owned by
     someone else, writable by group or others) or the process listening on it is not
     your qiod; nothing was sent. For the system service, pass --daemon-user qiod

See also: qiod(1), the daemon; man qio.";

/// Talk to qiod, the daemon that shares one Quick.IO connection.
#[derive(Parser, Debug)]
#[command(name = "qio", version, after_long_help = EXIT_CODES)]
struct Cli {
    /// The daemon's socket [default: $QIOD_SOCKET, else $XDG_RUNTIME_DIR/qiod/qiod.sock,
    /// else /run/qiod/qiod.sock for root, else /tmp/qiod-<uid>/qiod.sock: where qiod
    /// listens by default]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The user qiod runs as, when it is not you (the system service's is qiod); trusted
    /// besides you and root [default: $QIOD_DAEMON_USER]
    #[arg(long, global = true, value_name = "USER")]
    daemon_user: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Subscribe, and print one JSON line per event: {"event":PATH,"data":...}, plus "cb"
    /// when the server asked for an answer. Stops on Ctrl-C, after --count events, or
    /// when stdout is closed (all exit 0). While qiod is not connected to its server, says
    /// so on stderr at once with qiod's reason and keeps waiting: qiod holds the
    /// subscriptions and makes them when it connects.
    #[command(after_long_help = EXIT_CODES)]
    Sub {
        /// The paths to subscribe to.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
        /// Stop after this many events (all paths together).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Send an event. Without --wait, fire-and-forget: exits once the daemon has taken it
    /// (1 if the daemon refused it). With --wait, prints the server's answer as one JSON
    /// line, {"code":...,"data":...} plus "err_msg" on errors; while qiod is still
    /// connecting to its server it waits for that connection first, and it fails at once
    /// (exit 3) with qiod's reason when qiod's last attempt to reach the server failed.
    #[command(after_long_help = EXIT_CODES)]
    Send {
        /// Wait for the server's answer and print it.
        #[arg(long)]
        wait: bool,
        /// Send DATA (or stdin) as a JSON string, as is.
        #[arg(long)]
        string: bool,
        /// Give up waiting after this many seconds, the wait for the connection included
        /// (exit 3).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// The event's path.
        path: String,
        /// The data, as JSON ('{"a":1}', '"text"', 42, null). `-` or absent: read it from
        /// stdin when stdin is not a terminal (empty stdin sends null); else null. A bare
        /// word like hello is not JSON: quote it ('"hello"') or pass --string.
        data: Option<String>,
    },
    /// Print the daemon's state: upstream, uptime, clients, subscriptions, queue, pending.
    #[command(after_long_help = EXIT_CODES)]
    Status {
        /// Print the daemon's status data as one JSON line instead.
        #[arg(long)]
        json: bool,
    },
    /// Connect stdin and stdout to the socket to type protocol lines by hand, e.g.
    /// {"op":"send","path":"/clienttest/echo","data":1,"id":1}. After stdin ends, keeps
    /// printing until the daemon closes the connection or 1 s passes without a line.
    #[command(after_long_help = EXIT_CODES)]
    Raw,
}

/// Why the command stops with a non-zero code: printed as `qio: <msg>`.
#[derive(Debug)]
struct Failure {
    code: u8,
    msg: String,
}

fn failure(code: u8, msg: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
    }
}

type Outcome = Result<u8, Failure>;

fn main() -> ExitCode {
    if let Some(dir) = assets::requested() {
        return match assets::write(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qio: {e:#}");
                ExitCode::from(FAILED)
            }
        };
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qio: cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("qio: {}", f.msg);
            f.code
        }
    };
    // A thread may still be blocked reading stdin: do not wait for it.
    rt.shutdown_background();
    ExitCode::from(code)
}

async fn run(cli: Cli) -> Outcome {
    let socket = Target {
        path: cli
            .socket
            .unwrap_or_else(qio_platform::paths::default_socket_path),
        daemon_user: cli.daemon_user,
    };
    let socket = &socket;
    match cli.cmd {
        Cmd::Sub { paths, count } => sub(socket, &paths, count).await,
        Cmd::Send {
            wait,
            string,
            timeout,
            path,
            data,
        } => {
            let data = read_data(data.as_deref(), string)?;
            let timeout = match timeout {
                None => None,
                Some(s) => Some(Duration::try_from_secs_f64(s).map_err(|_| {
                    failure(USAGE, format!("--timeout {s}: not a number of seconds"))
                })?),
            };
            send(socket, &path, data, wait, timeout).await
        }
        Cmd::Status { json } => status(socket, json).await,
        Cmd::Raw => raw(socket).await,
    }
}

/// The daemon to talk to: its socket and whom to trust behind it.
struct Target {
    path: PathBuf,
    daemon_user: Option<String>,
}

impl Target {
    fn builder(&self) -> qio_client::Builder {
        let b = Client::builder().socket(&self.path);
        match &self.daemon_user {
            Some(user) => b.daemon_user(user),
            None => b,
        }
    }
}

fn not_running_msg(socket: &Path) -> String {
    format!(
        "qiod is not running on {}: start it with `qiod --server ws://host:port/` \
         (if it listens elsewhere, pass --socket or set QIOD_SOCKET)",
        socket.display()
    )
}

/// The exit code and message for a library error.
fn lib_failure(e: Error) -> Failure {
    let code = match &e {
        Error::DaemonNotRunning { socket } => return failure(NOT_RUNNING, not_running_msg(socket)),
        Error::Connect { .. } => NOT_RUNNING,
        Error::Untrusted { .. } => UNTRUSTED,
        Error::Disconnected | Error::Timeout { .. } | Error::Upstream { .. } => NO_ANSWER,
        Error::Server { code, .. } => answer_exit_code(*code),
        _ => FAILED,
    };
    failure(code, e.to_string())
}

/// The exit code for an answer's code.
fn answer_exit_code(code: i64) -> u8 {
    match code {
        qio_client::code::OK => OK,
        qio_client::code::DISCONNECTED | qio_client::code::TIMEOUT => NO_ANSWER,
        _ => FAILED,
    }
}

async fn connect(socket: &Target, timeout: Option<Duration>) -> Result<Client, Failure> {
    let mut b = socket.builder();
    if let Some(t) = timeout {
        b = b.request_timeout(t);
    }
    b.connect().await.map_err(lib_failure)
}

/// Writes one line to stdout; `Ok(false)` when stdout is closed (a reader like `head` left).
fn print_line(line: &[u8]) -> Result<bool, Failure> {
    let mut out = std::io::stdout().lock();
    let res = out
        .write_all(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(failure(FAILED, format!("cannot write to stdout: {e}"))),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(v).map_err(|e| failure(FAILED, format!("cannot encode JSON: {e}")))
}

#[derive(Serialize)]
struct EventLine<'a> {
    event: &'a str,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    cb: Option<&'a str>,
}

#[derive(Serialize)]
struct ReplyLine<'a> {
    code: i64,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    err_msg: Option<&'a str>,
}

async fn sub(socket: &Target, paths: &[String], count: Option<u64>) -> Outcome {
    let client = connect(socket, None).await?;
    let mut events = client.events();
    // The current state: worth telling only when the upstream is not open, at once, so
    // a wait for the server is never silent. The daemon holds subscriptions made
    // meanwhile and makes them when it connects.
    match events.try_recv() {
        Some(ConnectionEvent::Close { reason }) => eprintln!(
            "qio: qiod is not connected to its server ({reason}); waiting: events follow once it connects"
        ),
        Some(ConnectionEvent::DaemonGone { reason }) => {
            eprintln!("qio: lost qiod ({reason}); reconnecting")
        }
        _ => {}
    }
    let mut subs = Vec::with_capacity(paths.len());
    for path in paths {
        let sub = client.on(path).await.map_err(|e| {
            let f = lib_failure(e);
            failure(f.code, format!("cannot subscribe to {path}: {}", f.msg))
        })?;
        subs.push(sub);
    }
    let mut all = futures_util::stream::select_all(subs);
    let mut stdout_gone = std::pin::pin!(stdout_closed());
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut seen = 0u64;
    let mut events_open = true;
    loop {
        if count.is_some_and(|n| seen >= n) {
            break Ok(OK);
        }
        tokio::select! {
            ev = all.next() => {
                let Some(ev) = ev else {
                    break Err(failure(FAILED, "every subscription has ended"));
                };
                let printed = to_json(&EventLine {
                    event: &ev.path,
                    data: &ev.data,
                    cb: ev.cb.as_ref().map(|h| h.id()),
                })
                .and_then(|line| print_line(&line));
                match printed {
                    Ok(true) => seen += 1,
                    Ok(false) => break Ok(OK),
                    Err(f) => break Err(f),
                }
            }
            ev = events.recv(), if events_open => match ev {
                // A reconnect found a stand-in: stop rather than wait beside it.
                Some(ConnectionEvent::Untrusted { reason }) => {
                    break Err(failure(UNTRUSTED, reason));
                }
                Some(ev) => tell(&ev),
                None => events_open = false,
            },
            _ = &mut ctrl_c => break Ok(OK),
            _ = &mut stdout_gone => break Ok(OK),
        }
    }
}

/// Tells a connection event on stderr, so stdout stays one event per line.
fn tell(ev: &ConnectionEvent) {
    match ev {
        ConnectionEvent::Open => eprintln!("qio: the upstream connection is open"),
        ConnectionEvent::Close { reason } => {
            eprintln!("qio: the upstream connection is closed: {reason}")
        }
        ConnectionEvent::Error {
            op,
            path,
            code,
            err_msg,
        } => eprintln!(
            "qio: error {code}{}{}: {err_msg}",
            op.as_deref()
                .map(|o| format!(" on {o}"))
                .unwrap_or_default(),
            path.as_deref().map(|p| format!(" {p}")).unwrap_or_default(),
        ),
        ConnectionEvent::Lost { count, path } => match path {
            Some(p) => eprintln!("qio: {count} events on {p} were dropped (read too slowly)"),
            None => eprintln!("qio: the daemon dropped {count} events (read too slowly)"),
        },
        ConnectionEvent::DaemonGone { reason } => {
            eprintln!("qio: lost qiod ({reason}); reconnecting")
        }
        ConnectionEvent::DaemonBack {
            after,
            resubscribed,
        } => eprintln!(
            "qio: qiod is back after {} ms; subscribed again to {resubscribed} path(s)",
            after.as_millis()
        ),
        other => eprintln!("qio: {other:?}"),
    }
}

/// Resolves when stdout is a pipe or socket whose reader has gone (`qio sub | head -1`),
/// so `sub` stops at once rather than at its next event; never for a file or terminal.
async fn stdout_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let watched = std::thread::Builder::new()
        .name("stdout-watch".into())
        .spawn(move || {
            if !qio_platform::process::stdout_is_pipe() {
                return;
            }
            if qio_platform::process::wait_stdout_closed().is_ok() {
                let _ = tx.send(());
            }
        });
    if watched.is_err() || rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The data to send, from the argument or stdin.
fn read_data(arg: Option<&str>, string: bool) -> Result<Value, Failure> {
    let stdin_text = || -> Result<String, Failure> {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| failure(USAGE, format!("cannot read the data from stdin: {e}")))?;
        Ok(text)
    };
    let text = match arg {
        Some("-") => stdin_text()?,
        Some(text) => text.to_owned(),
        None if !std::io::stdin().is_terminal() => {
            let text = stdin_text()?;
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            text
        }
        None => return Ok(Value::Null),
    };
    if string {
        let text = match arg {
            Some(t) if t != "-" => t.to_owned(),
            // Like `$(...)`, drop the newline that ends the input.
            _ => text.strip_suffix('\n').unwrap_or(&text).to_owned(),
        };
        return Ok(Value::String(text));
    }
    serde_json::from_str(&text).map_err(|e| {
        let mut shown: String = text.trim().chars().take(40).collect();
        if shown.len() < text.trim().len() {
            shown.push('…');
        }
        failure(
            USAGE,
            format!(
                "the data is not valid JSON ({e}): {shown:?}; to send a string, quote it \
                 ('\"hello\"') or pass --string"
            ),
        )
    })
}

async fn send(
    socket: &Target,
    path: &str,
    data: Value,
    wait: bool,
    timeout: Option<Duration>,
) -> Outcome {
    if wait {
        // One budget for waiting for the connection the daemon is making and for the
        // answer: a send right after the daemon started must not get -1 at once.
        let client = connect(socket, None).await?;
        let asked = async {
            client.wait_open().await?;
            client.send(path, data).await
        };
        let reply = match timeout {
            Some(after) => tokio::time::timeout(after, asked)
                .await
                .unwrap_or(Err(Error::Timeout { after })),
            None => asked.await,
        }
        .map_err(lib_failure)?;
        let line = to_json(&ReplyLine {
            code: reply.code,
            data: &reply.data,
            err_msg: reply.err_msg.as_deref(),
        })?;
        print_line(&line)?;
        return Ok(answer_exit_code(reply.code));
    }
    let client = connect(socket, timeout).await?;
    let mut events = client.events();
    client.emit(path, data).await.map_err(lib_failure)?;
    // Closing waits for the daemon to finish with this connection, so a refusal of the
    // event (bad path, full offline queue) has arrived by then.
    client.close().await.map_err(lib_failure)?;
    while let Some(ev) = events.try_recv() {
        if let ConnectionEvent::Error { code, err_msg, .. } = ev {
            return Err(failure(
                answer_exit_code(code).max(FAILED),
                format!("the daemon refused the event ({code}): {err_msg}"),
            ));
        }
    }
    Ok(OK)
}

async fn status(socket: &Target, json: bool) -> Outcome {
    let client = connect(socket, None).await?;
    let st = client.status().await.map_err(lib_failure)?;
    let text = if json {
        String::from_utf8_lossy(&to_json(&st)?).into_owned()
    } else {
        describe_status(&st, &socket.path)
    };
    print_line(text.trim_end().as_bytes())?;
    Ok(OK)
}

/// The status data as a short report; missing fields show as `?`.
fn describe_status(st: &Value, socket: &Path) -> String {
    let num = |k: &str| st[k].as_u64().map_or("?".to_owned(), |n| n.to_string());
    let mut out = String::new();
    let mut row = |label: &str, value: String| {
        out.push_str(&format!("{:<15}{value}\n", format!("{label}:")));
    };
    row("qiod", socket.display().to_string());
    row("state", st["state"].as_str().unwrap_or("?").to_owned());
    row(
        "server",
        match st["url"].as_str() {
            Some(url) => format!("{url} (Quick.IO {})", st["dialect"].as_str().unwrap_or("?")),
            None => "none yet".into(),
        },
    );
    row(
        "uptime",
        match st["open_for_ms"].as_u64() {
            Some(ms) => format!("{} (this connection)", human_duration(ms)),
            None => "not connected".into(),
        },
    );
    row(
        "transport",
        match (st["transport"].as_str(), st["upgrade_error"].as_str()) {
            (Some(t), Some(why)) => format!("{t} (the WebSocket upgrade failed: {why})"),
            (Some(t), None) => t.to_owned(),
            (None, _) => "none yet".into(),
        },
    );
    row("reconnects", num("reconnects"));
    row(
        "last error",
        st["last_error"].as_str().unwrap_or("none").to_owned(),
    );
    row("clients", num("clients"));
    let subs = st["subscriptions"].as_array().cloned().unwrap_or_default();
    row("subscriptions", subs.len().to_string());
    let width = subs
        .iter()
        .filter_map(|s| s["path"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for s in &subs {
        let path = s["path"].as_str().unwrap_or("?");
        out.push_str(&format!(
            "  {path:<width$}  refs {}  {}  local subscribers {}\n",
            s["refs"].as_u64().map_or("?".into(), |n| n.to_string()),
            s["state"].as_str().unwrap_or("?"),
            s["local_subscribers"]
                .as_u64()
                .map_or("?".into(), |n| n.to_string()),
        ));
    }
    let mut row = |label: &str, value: String| {
        out.push_str(&format!("{:<15}{value}\n", format!("{label}:")));
    };
    row(
        "queue",
        format!(
            "{} events, {} bytes (held while the server is unreachable)",
            num("queued_events"),
            num("queued_bytes")
        ),
    );
    row(
        "pending",
        format!(
            "{} requests waiting for the server",
            num("pending_callbacks")
        ),
    );
    row(
        "events",
        format!(
            "{} in, {} out, {} delivered",
            num("events_in"),
            num("events_out"),
            num("events_delivered")
        ),
    );
    out
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}.{:01}s", ms % 1000 / 100),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// How long `raw` keeps printing after stdin ended, once the daemon is quiet.
const RAW_QUIET: Duration = Duration::from_secs(1);

async fn raw(socket: &Target) -> Outcome {
    let stream = socket.builder().connect_raw().await.map_err(lib_failure)?;
    let (mut rd, mut wr) = qio_platform::local::split(stream);
    // stdin on a thread of its own: a blocking read must not hold up the exit.
    let (tx, mut input) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdin_open = true;
    let mut quiet_until = tokio::time::Instant::now();
    loop {
        tokio::select! {
            chunk = input.recv(), if stdin_open => match chunk {
                Some(bytes) => {
                    if let Err(e) = wr.write_all(&bytes).await {
                        return Err(failure(NO_ANSWER, format!("qiod closed the connection: {e}")));
                    }
                }
                None => {
                    stdin_open = false;
                    let _ = wr.shutdown().await;
                    quiet_until = tokio::time::Instant::now() + RAW_QUIET;
                }
            },
            n = rd.read(&mut buf) => match n {
                Ok(0) => return Ok(OK),
                Ok(n) => {
                    let mut out = std::io::stdout().lock();
                    match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(OK),
                        Err(e) => return Err(failure(FAILED, format!("cannot write to stdout: {e}"))),
                    }
                    quiet_until = tokio::time::Instant::now() + RAW_QUIET;
                }
                Err(e) => return Err(failure(NO_ANSWER, format!("reading from qiod failed: {e}"))),
            },
            _ = tokio::time::sleep_until(quiet_until), if !stdin_open => return Ok(OK),
            _ = &mut ctrl_c => return Ok(OK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_arguments() {
        assert_eq!(
            read_data(Some(r#"{"a":1}"#), false).unwrap(),
            serde_json::json!({"a":1})
        );
        assert_eq!(read_data(Some("42"), false).unwrap(), 42);
        assert_eq!(read_data(Some("hello"), true).unwrap(), "hello");
        let bad = read_data(Some("hello"), false).unwrap_err();
        assert_eq!(bad.code, USAGE);
        assert!(bad.msg.contains("--string"), "{}", bad.msg);
    }

    #[test]
    fn exit_codes_follow_the_answer() {
        assert_eq!(answer_exit_code(200), OK);
        assert_eq!(answer_exit_code(404), FAILED);
        assert_eq!(answer_exit_code(-3), FAILED);
        assert_eq!(answer_exit_code(-1), NO_ANSWER);
        assert_eq!(answer_exit_code(-2), NO_ANSWER);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(1_234), "1.2s");
        assert_eq!(human_duration(125_000), "2m 05s");
        assert_eq!(human_duration(3_725_000), "1h 02m 05s");
        assert_eq!(human_duration(90_000_000), "1d 01h 00m");
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
