//! The programs in examples/ run as a user would run them, as subprocesses, against a
//! daemon in-process and the test server. Needs python3, bash and socat: a missing one
//! fails the test with a message saying so (CI installs them).

use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// examples/, where every example runs from.
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Fails the test with a clear message when a program the examples need is missing.
fn require(program: &str) {
    let version_flag = if program == "socat" {
        "-V"
    } else {
        "--version"
    };
    match std::process::Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(st) if st.success() => {}
        Ok(st) => {
            panic!("`{program} {version_flag}` failed ({st}); the examples tests need {program}")
        }
        Err(e) => panic!(
            "{program} is not installed ({e}); the examples tests need it \
             (apt-get install python3 socat)"
        ),
    }
}

/// One example running as a subprocess; killed when dropped, so a failing test leaves
/// nothing behind (the socat of a killed shell example ends with the daemon's connection).
struct Example {
    what: String,
    child: Child,
}

impl Example {
    /// Starts `program args...` in examples/ with the daemon's socket in `QIOD_SOCKET`.
    fn start(daemon: &Daemon, program: &str, args: &[&str]) -> Example {
        Example::start_with(daemon, program, args, &[])
    }

    /// [`Example::start`] with more environment variables.
    fn start_with(daemon: &Daemon, program: &str, args: &[&str], env: &[(&str, &str)]) -> Example {
        require(program);
        let what = format!("{program} {}", args.join(" "));
        let child = Command::new(program)
            .args(args)
            .current_dir(examples_dir())
            .env("QIOD_SOCKET", &daemon.socket)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Example { what, child }
    }

    /// Waits for the example to exit and returns what it printed.
    async fn finish(self) -> Output {
        let what = self.what;
        // On timeout the child is dropped with the future, which kills it.
        tokio::time::timeout(DEADLINE, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish in time"))
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    /// Fails the test, with what the example printed, if it has already exited.
    async fn assert_running(&mut self) {
        use tokio::io::AsyncReadExt;
        let Ok(Some(status)) = self.child.try_wait() else {
            return;
        };
        let mut out = Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        let read = async {
            if let Some(mut pipe) = self.child.stdout.take() {
                let _ = pipe.read_to_end(&mut out.stdout).await;
            }
            if let Some(mut pipe) = self.child.stderr.take() {
                let _ = pipe.read_to_end(&mut out.stderr).await;
            }
        };
        let _ = tokio::time::timeout(DEADLINE, read).await;
        panic!("{} exited early: {}", self.what, describe(&out));
    }
}

/// Exit status, stdout and stderr, for failure messages.
fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The example's stdout, one JSON value per line.
fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}\n{}", describe(out)))
        })
        .collect()
}

/// Waits until `n` local clients are subscribed to `path` (the daemon's own count, so
/// an event broadcast now reaches them), while checking the examples are still running.
async fn wait_subscribed(daemon: &Daemon, path: &str, n: u64, examples: &mut [&mut Example]) {
    let mut c = daemon.client().await;
    let start = tokio::time::Instant::now();
    for id in 1.. {
        for ex in examples.iter_mut() {
            ex.assert_running().await;
        }
        let st = c.call(json!({"op":"status"}), id).await;
        let subscribed = st["data"]["subscriptions"]
            .as_array()
            .expect("a subscription list")
            .iter()
            .any(|s| s["path"] == path && s["local_subscribers"].as_u64() >= Some(n));
        if subscribed {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {n} subscriber(s) to {path}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the server's log has an answer to one of its requests with this data.
fn answered_with(server: &qio_testserver::TestServer, want: &Value) -> bool {
    server.log().iter().any(
        |e| matches!(e, qio_testserver::LogEntry::CallbackAnswered { data, .. } if data == want),
    )
}

#[tokio::test]
async fn python_subscribe_prints_one_line_per_event() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut ex = Example::start(
        &daemon,
        "python3",
        &["python/subscribe.py", "/news", "--count", "2"],
    );
    wait_subscribed(&daemon, "/news", 1, &mut [&mut ex]).await;
    assert_eq!(server.subscriptions().get("/news"), Some(&1));
    for n in 1..=3 {
        server.broadcast("/news", json!({ "n": n })).await;
    }
    let out = ex.finish().await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        json_lines(&out),
        [
            json!({"event":"/news","data":{"n":1}}),
            json!({"event":"/news","data":{"n":2}})
        ],
        "{}",
        describe(&out)
    );
    until("the script leaving gives the subscription back", || async {
        server.subscriptions().is_empty()
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn python_request_prints_the_reply_and_exits_by_its_code() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    // request.py waits for /open itself; no need to wait here.
    let ok = Example::start(
        &daemon,
        "python3",
        &["python/request.py", "/clienttest/echo", r#"{"a":[1,"b"]}"#],
    )
    .finish()
    .await;
    assert!(ok.status.success(), "{}", describe(&ok));
    let lines = json_lines(&ok);
    assert_eq!(lines.len(), 1, "{}", describe(&ok));
    assert_eq!(lines[0]["code"], 200, "{}", describe(&ok));
    assert_eq!(lines[0]["data"], json!({"a":[1,"b"]}), "{}", describe(&ok));

    let err = Example::start(
        &daemon,
        "python3",
        &["python/request.py", "/clienttest/error/404"],
    )
    .finish()
    .await;
    assert_eq!(err.status.code(), Some(1), "{}", describe(&err));
    assert_eq!(json_lines(&err)[0]["code"], 404, "{}", describe(&err));
    daemon.stop().await;
}

#[tokio::test]
async fn python_answer_requests_answers_the_server() {
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    let mut ex = Example::start(
        &daemon,
        "python3",
        &["python/answer_requests.py", "/ask", "--count", "1"],
    );
    wait_subscribed(&daemon, "/ask", 1, &mut [&mut ex]).await;
    server.request_from_all("/ask", json!({"q":1})).await;
    let out = ex.finish().await;
    assert!(out.status.success(), "{}", describe(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{}", describe(&out));
    assert_eq!(
        (&lines[0]["event"], &lines[0]["data"]),
        (&json!("/ask"), &json!({"q":1}))
    );
    assert!(lines[0]["cb"].is_string(), "{}", describe(&out));
    let want = json!({"answered":{"q":1}});
    until("the server got the answer", || async {
        answered_with(&server, &want)
    })
    .await;
    daemon.stop().await;
}

/// README and examples/README show answer_requests.py against `qiod-demo`: the demo's
/// server asks the subscribers of /demo/question, the script answers, the server gets it.
#[tokio::test]
async fn python_answer_requests_answers_the_demo_question() {
    use qio_testserver::demo::{Demo, Timing, QUESTION_PATH};
    let timing = Timing {
        tick: Duration::from_secs(3600),
        question: Duration::from_millis(20),
    };
    let demo = Demo::start_with(timing).await.expect("the demo starts");
    let daemon = Daemon::start(&demo.url()).await;
    let ex = Example::start(
        &daemon,
        "python3",
        &["python/answer_requests.py", QUESTION_PATH, "--count", "1"],
    );
    // No waiting for the subscription: the demo asks again every 20 ms until a question
    // reaches someone, and the script may get one, answer it and exit before a status
    // poll would see it subscribed.
    let out = ex.finish().await;
    assert!(out.status.success(), "{}", describe(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{}", describe(&out));
    let question = json!({"n": 1, "question": "what is 1 + 1?"});
    assert_eq!(
        (&lines[0]["event"], &lines[0]["data"]),
        (&json!(QUESTION_PATH), &question),
        "{}",
        describe(&out)
    );
    let want = json!({ "answered": question });
    until("the demo's server got the answer", || async {
        answered_with(demo.server(), &want)
    })
    .await;
    daemon.stop().await;
    demo.stop().await;
}

#[tokio::test]
async fn python_module_computes_the_socket_path_like_the_daemon() {
    require("python3");
    let uid = {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::metadata(dir.path()).expect("metadata").uid()
    };
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[
            ("QIOD_SOCKET", "/x/y.sock"),
            ("XDG_RUNTIME_DIR", "/run/user/7"),
        ],
        &[("XDG_RUNTIME_DIR", "/run/user/7/")],
        &[("XDG_RUNTIME_DIR", "relative")],
        &[("QIOD_SOCKET", ""), ("XDG_RUNTIME_DIR", "")],
    ];
    for env in cases {
        let expected = qio_platform::paths::socket_path_from(
            &|k| {
                env.iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            },
            uid,
        );
        let scripts = [
            (
                "python3",
                "import qio; print(qio.default_socket_path())",
                "python",
            ),
            ("bash", ". ./qiod.sh; qiod_socket", "shell"),
        ];
        for (program, code, dir) in scripts {
            require(program);
            let run = Command::new(program)
                .arg("-c")
                .arg(code)
                .current_dir(examples_dir().join(dir))
                .env_remove("QIOD_SOCKET")
                .env_remove("XDG_RUNTIME_DIR")
                .envs(env.iter().copied())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(DEADLINE, run)
                .await
                .unwrap_or_else(|_| panic!("{program} -c {code:?} did not finish in time"))
                .expect("runs");
            assert!(out.status.success(), "{program}: {}", describe(&out));
            assert_eq!(
                Path::new(String::from_utf8_lossy(&out.stdout).trim_end()),
                expected,
                "{program} with {env:?}"
            );
        }
    }
}

#[tokio::test]
async fn shell_request_prints_the_reply_and_exits_by_its_code() {
    require("socat");
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    // request.sh does not wait for the connection: requests sent offline fail with -1.
    let _open = daemon.open_client().await;
    let ok = Example::start(
        &daemon,
        "bash",
        &["shell/request.sh", "/clienttest/echo", "\"hi\""],
    )
    .finish()
    .await;
    assert!(ok.status.success(), "{}", describe(&ok));
    let lines = json_lines(&ok);
    assert_eq!(lines.len(), 1, "{}", describe(&ok));
    assert_eq!(
        (&lines[0]["id"], &lines[0]["code"], &lines[0]["data"]),
        (&json!(1), &json!(200), &json!("hi")),
        "{}",
        describe(&ok)
    );

    let err = Example::start(
        &daemon,
        "bash",
        &["shell/request.sh", "/clienttest/error/404"],
    )
    .finish()
    .await;
    assert_eq!(err.status.code(), Some(1), "{}", describe(&err));
    assert_eq!(json_lines(&err)[0]["code"], 404, "{}", describe(&err));
    daemon.stop().await;
}

#[tokio::test]
async fn shell_subscribe_prints_events_until_the_count() {
    require("socat");
    let server = server().await;
    let daemon = Daemon::start(&server.url()).await;
    // The count as an argument, and as COUNT in the environment.
    let mut by_arg = Example::start(&daemon, "bash", &["shell/subscribe.sh", "/news", "2"]);
    let mut by_env = Example::start_with(
        &daemon,
        "bash",
        &["shell/subscribe.sh", "news/"],
        &[("COUNT", "2")],
    );
    wait_subscribed(&daemon, "/news", 2, &mut [&mut by_arg, &mut by_env]).await;
    assert_eq!(server.subscriptions().get("/news"), Some(&1));
    for n in 1..=3 {
        server.broadcast("/news", json!({ "n": n })).await;
    }
    for ex in [by_arg, by_env] {
        let out = ex.finish().await;
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(
            json_lines(&out),
            [
                json!({"event":"/news","data":{"n":1}}),
                json!({"event":"/news","data":{"n":2}})
            ],
            "{}",
            describe(&out)
        );
    }
    // Each script stops its socat, which gives the subscription back.
    until("the scripts leaving give the subscription back", || async {
        server.subscriptions().is_empty()
    })
    .await;
    daemon.stop().await;
}
