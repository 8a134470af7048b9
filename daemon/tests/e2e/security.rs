//! Local security of the `qiod` binary: who can reach the socket, and who may use it.
//!
//! The private default (folder 0700, socket 0600) is checked in `binary.rs`. Here a real
//! client runs as another user (`nobody`, uid and gid 65534) through `setpriv` (or
//! `runuser`), which needs root: these tests run as root here and in CI, and fail saying
//! so where that is not possible (never a silent pass). The attacks of another user on a
//! victim's daemon and clients are in `client-shim/tests/e2e/attacks.rs`.
//!
//! The async tests run multi-threaded: the in-process test server keeps serving on the
//! workers while the test's own thread blocks on the spawned processes.

use crate::common::Qiod;
use qio_testserver::{ServerConfig, TestServer};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(10);
const NOBODY: u32 = 65534;

/// The client, run as nobody: connects, prints what happens, one word per step.
/// `refused` sends a request at once; `allowed` waits for `/open`, then asks for an echo
/// and stops at its reply. Every read has a timeout, so it always ends.
const CLIENT: &str = r#"
import json, socket, sys
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(path)
except OSError as e:
    print("CONNECT-FAILED", e)
    sys.exit(0)
print("CONNECTED", flush=True)
def send(obj):
    try:
        s.sendall((json.dumps(obj) + "\n").encode())
    except OSError as e:
        print("SEND-FAILED", e, flush=True)
sent = mode == "refused"
if sent:
    send({"op": "status", "id": 1})
f = s.makefile("rb")
while True:
    try:
        line = f.readline()
    except OSError as e:
        print("READ-FAILED", e, flush=True)
        break
    if not line:
        print("EOF", flush=True)
        break
    print("LINE", line.decode().strip(), flush=True)
    msg = json.loads(line)
    if not sent and msg.get("event") == "/open":
        send({"op": "send", "path": "/clienttest/echo", "data": "from nobody", "id": 1})
        sent = True
    if msg.get("id") == 1:
        break
"#;

/// How to run a program as nobody, or why it cannot be done here.
struct AsNobody {
    /// The command and its arguments before the program.
    prefix: Vec<String>,
    /// A Python 3 that nobody can run.
    python: String,
}

impl AsNobody {
    fn find() -> Result<AsNobody, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root, so no client can run as another user".into());
        }
        let runners = [
            vec![
                "setpriv".to_owned(),
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".to_owned(),
            ],
            vec![
                "runuser".to_owned(),
                "-u".to_owned(),
                "nobody".to_owned(),
                "--".to_owned(),
            ],
        ];
        let pythons = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"];
        let mut why = Vec::new();
        for prefix in runners {
            for python in pythons.iter().filter(|p| Path::new(p).exists()) {
                let probe = AsNobody {
                    prefix: prefix.clone(),
                    python: python.to_string(),
                };
                let check = "import os, sys; sys.exit(0 if os.getuid() == 65534 else 3)";
                match probe.command(&["-c", check]).output() {
                    Ok(out) if out.status.success() => return Ok(probe),
                    Ok(out) => why.push(format!(
                        "{} {python}: {} {}",
                        prefix[0],
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => why.push(format!("{}: {e}", prefix[0])),
                }
            }
        }
        Err(format!(
            "cannot run python3 as uid {NOBODY} with setpriv or runuser ({})",
            why.join("; ")
        ))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.prefix[0]);
        cmd.args(&self.prefix[1..])
            .arg(&self.python)
            .args(args)
            .stdin(Stdio::null())
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        cmd
    }

    /// Runs the client against `socket`; its output, one step per line.
    fn run_client(&self, socket: &Path, mode: &str) -> String {
        let socket = socket.to_str().expect("utf-8 path");
        let child = self
            .command(&["-c", CLIENT, socket, mode])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the client starts");
        let out = wait_output(child);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client failed: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// Waits for a child's output, killing it past the deadline.
fn wait_output(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the client did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// The runner, or a failure saying why there is none: a test that cannot run as another
/// user has tested nothing and must not pass.
fn as_nobody() -> AsNobody {
    match AsNobody::find() {
        Ok(runner) => runner,
        Err(why) => panic!("this test needs root, to run a client as another user: {why}"),
    }
}

/// A temp dir that nobody can enter (tempdirs are 0700), with the socket's path inside.
fn shared_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.path().join("run").join("qiod.sock");
    let config = dir.path().join("qiod.toml");
    (dir, socket, config)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn wait_socket(socket: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(start.elapsed() < DEADLINE, "qiod never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines the daemon wrote to the client.
fn client_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| l.strip_prefix("LINE "))
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_another_user_cannot_even_reach_the_socket() {
    let nobody = as_nobody();
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let (_dir, socket, config) = shared_dir();
    let qiod = Qiod::spawn(&["--server", &server.url()], &socket, &config);
    wait_socket(&socket);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);

    let out = nobody.run_client(&socket, "refused");
    assert!(out.starts_with("CONNECT-FAILED"), "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    drop(qiod);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_allowed_groups_a_user_outside_them_is_refused_and_logged() {
    let nobody = as_nobody();
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let (_dir, socket, config) = shared_dir();
    // Group 0: nobody is not in it, but the socket must now be reachable by others.
    let qiod = Qiod::spawn(
        &["--server", &server.url(), "--allowed-groups", "0"],
        &socket,
        &config,
    );
    wait_socket(&socket);
    qiod.wait_open();
    assert_eq!(
        mode(socket.parent().unwrap()),
        0o711,
        "enterable, not listable"
    );
    assert_eq!(mode(&socket), 0o666, "the credential check is the gate");

    // It reaches the socket, is disconnected without a line, and the daemon says why.
    let out = nobody.run_client(&socket, "refused");
    assert!(out.starts_with("CONNECTED"), "{out}");
    assert!(client_lines(&out).is_empty(), "{out}");
    assert!(
        out.contains("EOF") || out.contains("reset"),
        "closed, not left hanging: {out}"
    );
    let line = qiod.wait_log(&["refused a local client", "uid 65534"]);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("allowed_groups"), "{line}");
    assert!(
        !server
            .received()
            .iter()
            .any(|r| r.path == "/clienttest/echo"),
        "nothing went upstream"
    );

    // The daemon's own user is still served.
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut first = String::new();
    BufReader::new(stream)
        .read_line(&mut first)
        .expect("a line for the daemon's own user");
    assert!(first.contains("\"event\":\"/open\""), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_allowed_groups_a_member_is_served() {
    let nobody = as_nobody();
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let (_dir, socket, config) = shared_dir();
    let gid = NOBODY.to_string();
    let qiod = Qiod::spawn(
        &["--server", &server.url(), "--allowed-groups", &gid],
        &socket,
        &config,
    );
    wait_socket(&socket);
    qiod.wait_open();

    let out = nobody.run_client(&socket, "allowed");
    let lines = client_lines(&out);
    assert_eq!(
        lines.first().map(|l| &l["event"]),
        Some(&"/open".into()),
        "{out}"
    );
    let reply = lines.last().expect("a reply");
    assert_eq!(reply["id"], 1, "{out}");
    assert_eq!(reply["code"], 200, "{out}");
    assert_eq!(reply["data"], "from nobody", "{out}");
    assert!(
        !qiod.log_text().contains("refused a local client"),
        "{}",
        qiod.log_text()
    );
}

#[test]
fn a_bad_ca_file_exits_2_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("none.toml");
    std::fs::write(&config, "").unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (ca, expect) in [
        (dir.path().join("missing.pem"), "cannot read"),
        (empty, "holds no certificate"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
            .args(["--server", "wss://localhost:1/", "--ca-file"])
            .arg(&ca)
            .arg("--socket")
            .arg(dir.path().join("qiod.sock"))
            .env("QIOD_CONFIG", &config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("qiod: ca_file (from --ca-file): "), "{err}");
        assert!(err.contains(ca.to_str().unwrap()), "{err}");
        assert!(err.contains(expect), "{err}");
        assert!(
            !dir.path().join("qiod.sock").exists(),
            "refused before binding"
        );
    }
}
