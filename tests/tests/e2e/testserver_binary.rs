//! The crate's binaries as scripts run them: `qio-testserver`, whose log goes to a file or a
//! pipe, and `qiod-demo`, README's quick start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_log_written_to_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = Running(
        Command::new(env!("CARGO_BIN_EXE_qio-testserver"))
            .args(["--port", "0"])
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("qio-testserver starts"),
    );
    let mut first = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening on ws://"), "{first:?}");
    // The server logs that it listens before it prints the address.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("test server listening"), "{text:?}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in the log: {text:?}"
    );
}

/// README's quick start: `qiod-demo` alone (no server setting, no config) serves the
/// counter on the socket it names, says so on stdout, and removes the socket on Ctrl-C.
#[tokio::test]
async fn the_demo_serves_ticks_on_the_socket_it_announces_and_cleans_up() {
    use crate::common::{self, LineClient};
    use serde_json::{json, Value};
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("demo.sock");
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_qiod-demo"))
        .arg("--socket")
        .arg(&socket)
        .env_remove("QIOD_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("qiod-demo starts");
    let mut stdout = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let ready = format!("qiod demo: local clients connect to {}", socket.display());
    let mut printed = Vec::new();
    while !printed.contains(&ready) {
        let line = tokio::time::timeout(common::DEADLINE, stdout.next_line())
            .await
            .expect("qiod-demo says where it listens in time")
            .expect("read its stdout")
            .unwrap_or_else(|| panic!("qiod-demo ended its output early: {printed:?}"));
        printed.push(line);
    }
    assert!(
        printed[0].starts_with("qiod demo: Quick.IO test server on ws://127.0.0.1:"),
        "{printed:?}"
    );

    let mut client = LineClient::connect(&socket).await;
    // Subscribed before the demo's upstream is open, the answer would be 202 (README).
    client.event("/open").await;
    client
        .send(json!({"op": "on", "path": "/demo/tick", "id": 1}))
        .await;
    let answer = client.reply(json!(1)).await;
    assert_eq!(answer["code"], 200, "{answer}");
    let tick = |v: &Value| v["data"].as_u64();
    let first = client.event("/demo/tick").await;
    let second = client.event("/demo/tick").await;
    assert!(
        matches!((tick(&first), tick(&second)), (Some(a), Some(b)) if b > a),
        "a counter: {first} then {second}"
    );

    let pid = rustix::process::Pid::from_raw(demo.id().expect("running") as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = tokio::time::timeout(common::DEADLINE, demo.wait())
        .await
        .expect("qiod-demo stops on Ctrl-C in time")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket file is removed on exit");
}
