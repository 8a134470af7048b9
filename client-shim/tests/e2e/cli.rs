//! The `qio` command: golden outputs and exit codes against the in-process daemon.

use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Output, Stdio};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn qio(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qio"));
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Output {
    within("qio to finish", cmd.output())
        .await
        .expect("qio runs")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_wait_prints_the_answer_and_exits_by_its_code() {
    let s = Setup::new().await;
    s.client().await; // the upstream connection is open
    let out = run(qio(
        s.socket(),
        &["send", "--wait", "/clienttest/echo", r#"{"a":1}"#],
    ))
    .await;
    assert_eq!(text(&out.stdout), "{\"code\":200,\"data\":{\"a\":1}}\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = run(qio(
        s.socket(),
        &["send", "--wait", "/clienttest/error/404", "null"],
    ))
    .await;
    assert_eq!(
        text(&out.stdout),
        "{\"code\":404,\"data\":\"you requested an error?\",\"err_msg\":\"404s are fun!\"}\n"
    );
    assert_eq!(out.status.code(), Some(1));

    // Data from stdin.
    let mut cmd = qio(s.socket(), &["send", "--wait", "/clienttest/echo", "-"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"[1, \"two\"]\n").await.unwrap();
    drop(stdin);
    let out = within("qio", child.wait_with_output()).await.unwrap();
    assert_eq!(text(&out.stdout), "{\"code\":200,\"data\":[1,\"two\"]}\n");

    // No answer in time: exit 3.
    let out = run(qio(
        s.socket(),
        &[
            "send",
            "--wait",
            "--timeout",
            "0.05",
            "/clienttest/drop-callback",
            "1",
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no answer within"),
        "{}",
        text(&out.stderr)
    );
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_without_wait_is_fire_and_forget_and_reports_a_refusal() {
    let s = Setup::new().await;
    s.client().await;
    let out = run(qio(s.socket(), &["send", "/ff", "[1,2]"])).await;
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), ""));
    until("the server got it", || {
        s.server
            .received()
            .iter()
            .any(|r| r.path == "/ff" && r.data == json!([1, 2]))
    })
    .await;
    let out = run(qio(s.socket(), &["send", "--string", "/ff", "hello"])).await;
    assert_eq!(out.status.code(), Some(0));
    until("the server got the string", || {
        s.server
            .received()
            .iter()
            .any(|r| r.path == "/ff" && r.data == json!("hello"))
    })
    .await;
    let out = run(qio(s.socket(), &["send", "/qio/ping"])).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("qio: the daemon refused the event (400)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    s.daemon.stop().await;
}

#[tokio::test]
async fn bad_data_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    // Checked before connecting: no daemon needed.
    let out = run(qio(&dir.path().join("none.sock"), &["send", "/x", "hello"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("qio: the data is not valid JSON"), "{err}");
    assert!(err.contains("--string"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_prints_one_line_per_event_and_stops_after_count() {
    let s = Setup::new().await;
    s.client().await;
    let child = qio(s.socket(), &["sub", "/news", "/other", "--count", "2"])
        .spawn()
        .expect("spawn");
    until("qio subscribed", || {
        let subs = s.server.subscriptions();
        subs.get("/news") == Some(&1) && subs.get("/other") == Some(&1)
    })
    .await;
    s.server.broadcast("/news", json!(1)).await;
    s.server.broadcast("/news", json!({"b": [2]})).await;
    let out = within("qio sub", child.wait_with_output()).await.unwrap();
    assert_eq!(
        text(&out.stdout),
        "{\"event\":\"/news\",\"data\":1}\n{\"event\":\"/news\",\"data\":{\"b\":[2]}}\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // /other never had an event: qio gave it back on its way out all the same.
    until("qio's subscriptions are given back", || {
        s.server.subscriptions().is_empty()
    })
    .await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_shows_the_callback_handle_and_exits_cleanly_when_its_reader_leaves() {
    let s = Setup::new().await;
    s.client().await;
    let mut child = qio(s.socket(), &["sub", "/ask"]).spawn().expect("spawn");
    until("qio subscribed", || {
        s.server.subscriptions().get("/ask") == Some(&1)
    })
    .await;
    s.server.request_from_all("/ask", json!("q")).await;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = within("a line", lines.next_line())
        .await
        .unwrap()
        .expect("line");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((&v["event"], &v["data"]), (&json!("/ask"), &json!("q")));
    assert!(v["cb"].is_string(), "{line}");
    // Like `qio sub /ask | head -1`: the reader goes away, qio exits 0 without a word.
    drop(lines);
    let status = within("qio exits", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(err, "");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_text() {
    let s = Setup::new().await;
    let client = s.client().await;
    let _sub = client.on("/news").await.expect("on");
    let out = run(qio(s.socket(), &["status", "--json"])).await;
    assert_eq!(out.status.code(), Some(0));
    let st: Value = serde_json::from_str(text(&out.stdout)).expect("one JSON document");
    assert_eq!(st["state"], "open");
    assert_eq!(st["clients"], 2, "this client and qio: {st}");
    assert_eq!(st["subscriptions"][0]["path"], "/news");

    let out = run(qio(s.socket(), &["status"])).await;
    assert_eq!(out.status.code(), Some(0));
    let report = text(&out.stdout);
    for want in [
        "state:         open\n",
        &format!("server:        {} (Quick.IO 0.2)\n", s.server.url()),
        "reconnects:    0\n",
        "last error:    none\n",
        "clients:       2\n",
        "subscriptions: 1\n",
        "  /news  refs 1  active  local subscribers 1\n",
        "pending:       0 requests waiting for the server\n",
    ] {
        assert!(report.contains(want), "{want:?} not in:\n{report}");
    }
    assert!(
        report.contains("uptime:") && report.contains("(this connection)"),
        "{report}"
    );
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_copies_lines_both_ways_and_ends_when_the_daemon_is_done() {
    let s = Setup::new().await;
    s.client().await;
    let mut cmd = qio(s.socket(), &["raw"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"op\":\"send\",\"path\":\"/clienttest/echo\",\"data\":\"hi\",\"id\":1}\n")
        .await
        .unwrap();
    drop(stdin);
    let out = within("qio raw", child.wait_with_output()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines[0], json!({"event": "/open"}));
    assert_eq!(
        (&lines[1]["id"], &lines[1]["code"], &lines[1]["data"]),
        (&json!(1), &json!(200), &json!("hi"))
    );
    assert_eq!(lines.len(), 2);
    s.daemon.stop().await;
}

#[tokio::test]
async fn no_daemon_exits_4_and_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    for args in [
        &["status"][..],
        &["sub", "/x"],
        &["send", "--wait", "/x", "1"],
        &["raw"],
    ] {
        let out = run(qio(&socket, args)).await;
        assert_eq!(out.status.code(), Some(4), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(
            err,
            format!(
                "qio: qiod is not running on {}: start it with `qiod --server ws://host:port/` \
                 (if it listens elsewhere, pass --socket or set QIOD_SOCKET)\n",
                socket.display()
            ),
            "{args:?}"
        );
    }
    // QIOD_SOCKET is honoured when --socket is not given.
    let out = Command::new(env!("CARGO_BIN_EXE_qio"))
        .arg("status")
        .env("QIOD_SOCKET", &socket)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stderr).contains(&socket.display().to_string()));
}

#[tokio::test]
async fn help_lists_the_exit_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_qio"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("4  qiod is not running"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_user_adds_to_whom_is_trusted_even_when_it_names_no_user_yet() {
    let s = Setup::new().await;
    s.client().await;
    // Our own daemon stays trusted whatever daemon user is named: a name that names no
    // user (a dynamic user whose service is not running) adds nothing and fails nothing.
    for user in ["no-such-user-qiod", "root", "4242"] {
        let out = run(qio(
            s.socket(),
            &["--daemon-user", user, "status", "--json"],
        ))
        .await;
        assert_eq!(out.status.code(), Some(0), "{user}: {}", text(&out.stderr));
    }
}

#[tokio::test]
async fn each_subcommand_help_is_complete_in_itself() {
    for sub in ["sub", "send", "status", "raw"] {
        let out = Command::new(env!("CARGO_BIN_EXE_qio"))
            .args([sub, "--help"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{sub}");
        let help = text(&out.stdout);
        assert!(help.contains(&format!("Usage: qio {sub}")), "{help}");
        // The exit codes and where the socket is, without pointing at `qio --help`.
        assert!(help.contains("Exit codes:"), "{sub}: {help}");
        assert!(help.contains("4  qiod is not running"), "{sub}: {help}");
        assert!(
            help.contains("$XDG_RUNTIME_DIR/qiod/qiod.sock"),
            "{sub}: {help}"
        );
        assert!(!help.contains("see below"), "{sub}: {help}");
    }
}

#[tokio::test]
async fn man_pages_and_completions_come_from_the_command_line_definition() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |to: std::path::PathBuf| async move {
        let out = Command::new(env!("CARGO_BIN_EXE_qio"))
            .arg("--generate-assets")
            .arg(&to)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    generate(a.clone()).await;
    generate(b.clone()).await;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let page = read(&a.join("man/qio.1"));
    assert!(page.contains(".TH qio 1"), "{page}");
    assert!(page.contains("Exit codes:"), "{page}");
    let sub = read(&a.join("man/qio-sub.1"));
    assert!(sub.contains("\\-\\-count"), "{sub}");
    let bash = read(&a.join("completions/qio.bash"));
    assert!(bash.contains("sub send status raw"), "{bash}");
    assert!(
        !bash.contains("generate-assets"),
        "the packaging hook is not offered"
    );
    assert!(a.join("completions/_qio").is_file());
    assert!(a.join("completions/qio.fish").is_file());
    // The same binary writes the same files: the package is reproducible.
    for f in [
        "man/qio.1",
        "man/qio-send.1",
        "completions/qio.bash",
        "completions/_qio",
        "completions/qio.fish",
    ] {
        assert_eq!(read(&a.join(f)), read(&b.join(f)), "{f}");
    }
}

/// Issue 15: `qio sub` while qiod cannot reach its server says so on stderr at once, with
/// qiod's reason, keeps waiting, and prints events as soon as the server is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_while_the_server_is_down_says_why_at_once_and_prints_events_once_it_is_up() {
    let s = Setup::new().await;
    let watcher = s.client().await;
    let mut events = watcher.events();
    s.server.kill().await;
    within("the daemon to lose its server", async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, qio_client::ConnectionEvent::Close { .. }) {
                break;
            }
        }
    })
    .await;
    let mut child = qio(s.socket(), &["sub", "--count", "1", "/news"])
        .spawn()
        .expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let said = within("qio to say why", stderr.next_line())
        .await
        .expect("read")
        .expect("a line");
    assert!(said.contains("not connected to its server ("), "{said}");
    s.server.restart().await.unwrap();
    until("/news is subscribed upstream", || {
        s.server.subscriptions().get("/news") == Some(&1)
    })
    .await;
    s.server.broadcast("/news", json!(7)).await;
    let out = within("qio", child.wait_with_output()).await.unwrap();
    assert_eq!(text(&out.stdout), "{\"event\":\"/news\",\"data\":7}\n");
    assert_eq!(out.status.code(), Some(0));
}

/// Issue 15: `qio send --wait` while qiod is still making its first connection waits for
/// it instead of answering -1 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_wait_right_after_the_daemon_starts_waits_for_its_connection() {
    let server = server().await;
    // The daemon's first attempt hangs in the upgrade until the server resumes.
    server.set_stalled(true);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = daemon_settings(&server.url());
    settings.driver.session.handshake_timeout = std::time::Duration::from_secs(30);
    let daemon = Daemon::start_with(settings, &dir.path().join("qiod.sock"));
    let mut child = qio(&daemon.socket, &["send", "--wait", "/clienttest/echo", "1"])
        .spawn()
        .expect("spawn");
    let watcher = qio_client::Client::builder()
        .socket(&daemon.socket)
        .connect()
        .await
        .expect("connects");
    within("qio to connect", async {
        loop {
            let st = watcher.status().await.expect("status");
            assert_eq!(st["state"], "connecting", "{st}");
            if st["clients"] == 2 || child.try_wait().expect("wait").is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.set_stalled(false);
    let out = within("qio", child.wait_with_output()).await.unwrap();
    assert_eq!(
        text(&out.stdout),
        "{\"code\":200,\"data\":1}\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    daemon.stop().await;
}

/// Issue 15: `qio send --wait` when qiod's last attempt to reach its server failed fails
/// at once with qiod's reason (exit 3), rather than waiting or answering -1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_wait_while_the_server_is_unreachable_fails_with_the_daemons_reason() {
    let s = Setup::new().await;
    let watcher = s.client().await;
    let mut events = watcher.events();
    s.server.kill().await;
    within("a failed attempt", async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, qio_client::ConnectionEvent::Error { op: None, .. }) {
                break;
            }
        }
    })
    .await;
    let out = run(qio(
        s.socket(),
        &["send", "--wait", "/clienttest/echo", "1"],
    ))
    .await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("qiod cannot reach its server"), "{err}");
    assert!(err.contains(&s.server.url()), "names the server: {err}");
    assert!(out.stdout.is_empty());
}
