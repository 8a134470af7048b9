//! Another local user against a victim's qiod and its clients (issue 12's six attacks).
//!
//! Each test runs the victim and the attacker as two other users, with numeric uids that
//! need no account (`setpriv --reuid/--regid --clear-groups`): the victim is uid 61001,
//! the attacker 61002, an allowed group member 61003. That needs root; CI runs as root.
//! Run elsewhere, the tests fail saying so rather than pass without testing anything.
//!
//! Every folder lives in a temp dir made enterable for them: `shared/` plays `/tmp`
//! (root's, mode 1777), `victim/` is the victim's home-like folder.

use crate::common::*;
use qio_testserver::TestServer;
use rustix::process::{Pid, Signal};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VICTIM: u32 = 61001;
const ATTACKER: u32 = 61002;
const MEMBER: u32 = 61003;
const GROUP: u32 = 61500;
/// `qio`'s exit code for a socket or daemon that is not trusted.
const UNTRUSTED: i32 = 5;

/// A fake daemon, run by the attacker: it listens at argv[1] (creating its folder 0777,
/// as a squatter would), greets like qiod, answers every request with "fake", sends an
/// invented event after an `on`, and prints every line it receives ("GOT ...").
const FAKE_DAEMON: &str = r#"
import json, os, socket, sys
path = sys.argv[1]
folder = os.path.dirname(path)
if not os.path.isdir(folder):
    os.makedirs(folder)
    os.chmod(folder, 0o777)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(64)
print("LISTENING", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(2)
        c.sendall(b'{"event":"/open"}\n')
        for line in c.makefile("rb"):
            print("GOT", line.decode().strip(), flush=True)
            msg = json.loads(line)
            if "id" in msg:
                c.sendall((json.dumps({"id": msg["id"], "code": 200, "data": "fake"}) + "\n").encode())
            if msg.get("op") == "on":
                c.sendall(b'{"event":"/news","data":"invented"}\n')
    except Exception as e:
        print("ERR", e, flush=True)
    c.close()
"#;

/// Connects `argv[2]` times to `argv[1]` as fast as it can, closing each at once.
const FLOOD: &str = r#"
import socket, sys
n = 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        n += 1
    except OSError:
        pass
    s.close()
print("CONNECTED", n, flush=True)
"#;

/// Connects to `argv[1]` and prints every line until EOF.
const READ_ALL: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
print("CONNECTED", flush=True)
for line in s.makefile("rb"):
    print("LINE", line.decode().strip(), flush=True)
print("EOF", flush=True)
"#;

/// Fails (never skips) where the two users cannot be made.
fn need_root() {
    let euid = rustix::process::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "these tests run a victim and an attacker as two other users (uids {VICTIM} and \
         {ATTACKER}) with setpriv, which needs root: run them as root (CI does)"
    );
    let ok = Command::new("setpriv")
        .args(["--reuid=61001", "--regid=61001", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests need setpriv (util-linux) to run as other users"
    );
    assert!(Path::new(PYTHON).exists(), "these tests need {PYTHON}");
}

const PYTHON: &str = "/usr/bin/python3";

/// `program` run as `uid` (group `uid`, plus `groups`), with a clean environment.
fn as_user(uid: u32, groups: &[u32], program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("--")
        .arg(program)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null());
    cmd
}

fn qio_as(uid: u32, args: &[&str]) -> Command {
    let mut cmd = as_user(uid, &[], Path::new(env!("CARGO_BIN_EXE_qio")));
    cmd.args(args);
    cmd
}

/// Runs to the end (killed past the deadline) and returns the output.
fn finish(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child)
}

fn wait_output(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{:?} did not finish in time: {}{}",
                "child",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A child whose output lines are collected as they come.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading its output; joined once it exits, so its last lines are in.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }));
        }
        Running {
            child,
            lines,
            readers,
        }
    }

    fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits for a line containing `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines_with(needle).into_iter().next() {
                return l;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no line with {needle:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks it to stop, as `systemctl stop` would.
    fn terminate(&self) {
        // setpriv execs in place, so the child is qiod itself.
        rustix::process::kill_process(Pid::from_child(&self.child), Signal::TERM)
            .expect("SIGTERM to qiod");
    }

    /// Waits for the exit, failing past the deadline.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Its output ends with it: read to the end before anyone looks at it.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "still running:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The playground: `shared/` (root, 1777, like /tmp) and `victim/` (the victim's, 0755).
struct Arena {
    dir: tempfile::TempDir,
}

impl Arena {
    fn new() -> Arena {
        need_root();
        let dir = tempfile::tempdir().expect("temp dir");
        chmod(dir.path(), 0o755);
        let arena = Arena { dir };
        std::fs::create_dir(arena.shared()).expect("mkdir");
        chmod(&arena.shared(), 0o1777);
        std::fs::create_dir(arena.victim()).expect("mkdir");
        chown(&arena.victim(), VICTIM);
        std::fs::write(arena.config(), "").expect("config");
        chmod(&arena.config(), 0o644);
        arena
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn shared(&self) -> PathBuf {
        self.path().join("shared")
    }

    fn victim(&self) -> PathBuf {
        self.path().join("victim")
    }

    fn config(&self) -> PathBuf {
        self.path().join("qiod.toml")
    }

    /// The attacker's fake daemon at `socket`; returns once it listens.
    fn fake_daemon(&self, socket: &Path) -> Running {
        let mut cmd = as_user(ATTACKER, &[], Path::new(PYTHON));
        cmd.args(["-c", FAKE_DAEMON]).arg(socket);
        let fake = Running::spawn(&mut cmd);
        fake.wait_for("LISTENING");
        fake
    }

    /// qiod run as `uid` on `socket`, with `args`.
    fn qiod(&self, uid: u32, socket: &Path, args: &[&str]) -> Running {
        self.qiod_env(uid, socket, args, &[])
    }

    /// [`Arena::qiod`] with environment variables (settings by variable, which a qiod
    /// that predates them ignores rather than refusing to start).
    fn qiod_env(&self, uid: u32, socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = as_user(uid, &[], &qiod_binary());
        cmd.arg("--socket")
            .arg(socket)
            .args(args)
            .env("QIOD_CONFIG", self.config())
            .envs(env.iter().copied());
        Running::spawn(&mut cmd)
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).expect("chown");
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn listening(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

async fn test_server() -> TestServer {
    server().await
}

/// Attack 1: where the `/tmp/qiod-<uid>` fallback is used, another user creates the
/// folder first and runs a fake daemon in it. The victim's `qio` used to send it the
/// password and print its answers; now it refuses (exit 5) and sends nothing, whether the
/// folder or only the peer gives the stand-in away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack1_a_fake_daemon_in_a_squatted_folder_gets_nothing() {
    let arena = Arena::new();
    let squatted = arena.shared().join(format!("qiod-{VICTIM}"));
    let socket = squatted.join("qiod.sock");
    let fake = arena.fake_daemon(&socket);
    let s = socket.to_str().expect("utf-8");

    for args in [
        vec![
            "--socket",
            s,
            "send",
            "--wait",
            "/app/login",
            r#"{"password":"hunter2"}"#,
        ],
        vec!["--socket", s, "sub", "/news", "--count", "1"],
        vec!["--socket", s, "status"],
        vec!["--socket", s, "raw"],
    ] {
        let out = finish(&mut qio_as(VICTIM, &args));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(UNTRUSTED), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {}",
            text(&out.stdout)
        );
        assert!(err.contains(&squatted.display().to_string()), "{err}");
        assert!(
            err.contains(&format!(
                "belongs to uid {ATTACKER}, expected uid {VICTIM} or root"
            )),
            "{err}"
        );
    }

    // The Python module refuses as well.
    let py = format!(
        "import sys; sys.path.insert(0, {:?})\nimport qio\ntry:\n    qio.QioClient({s:?})\n    print('CONNECTED')\nexcept qio.QioTrustError as e:\n    print('REFUSED', e)\n",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
    );
    let out = finish(as_user(VICTIM, &[], Path::new(PYTHON)).args(["-c", &py]));
    let said = text(&out.stdout);
    assert!(said.starts_with("REFUSED"), "{said}{}", text(&out.stderr));
    assert!(
        said.contains(&format!("belongs to uid {ATTACKER}")),
        "{said}"
    );

    // With the folder beyond reproach (root's, 0755) only the peer check is left: root
    // moves the live socket there, and the victim still refuses, naming the uid.
    let rooted = arena.path().join("rooted");
    std::fs::create_dir(&rooted).expect("mkdir");
    chmod(&rooted, 0o755);
    let moved = rooted.join("qiod.sock");
    std::fs::rename(&socket, &moved).expect("move the socket");
    let m = moved.to_str().expect("utf-8");
    let out = finish(&mut qio_as(
        VICTIM,
        &[
            "--socket",
            m,
            "send",
            "--wait",
            "/app/login",
            r#"{"password":"hunter2"}"#,
        ],
    ));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(UNTRUSTED), "{err}");
    assert!(
        err.contains(&format!(
            "the process listening on {m} runs as uid {ATTACKER}"
        )) && err.contains(&format!("expected uid {VICTIM} or root")),
        "{err}"
    );
    let out = finish(as_user(VICTIM, &[], Path::new(PYTHON)).args(["-c", &py.replace(s, m)]));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("runs as uid {ATTACKER}")),
        "{said}{}",
        text(&out.stderr)
    );

    assert!(
        fake.lines_with("GOT").is_empty(),
        "the fake daemon received: {}",
        fake.text()
    );

    // A daemon user that names no user adds nothing, and the refusal says so.
    let out = finish(
        qio_as(VICTIM, &["--socket", m, "status"]).env("QIOD_DAEMON_USER", "no-such-user-qiod"),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(UNTRUSTED), "{err}");
    assert!(
        err.contains("QIOD_DAEMON_USER=no-such-user-qiod names no user now"),
        "{err}"
    );
    assert!(
        fake.lines_with("GOT").is_empty(),
        "the fake daemon received: {}",
        fake.text()
    );

    // Trusting a daemon user is explicit: named, it is used.
    let out = finish(&mut qio_as(
        VICTIM,
        &[
            "--daemon-user",
            &ATTACKER.to_string(),
            "--socket",
            m,
            "send",
            "--wait",
            "/x",
            "1",
        ],
    ));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"code":200,"data":"fake"}"#,
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

/// Attack 2: the attacker makes `/tmp/qiod-<uid>` a symlink to a root-owned folder the
/// victim can write (the check used to follow it and pass), to repoint it later. qiod now
/// refuses the symlinked folder and binds nothing behind it; `qio` refuses it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_symlinked_socket_folder_is_refused_by_qiod_and_qio() {
    let arena = Arena::new();
    let server = test_server().await;
    let target = arena.path().join("public");
    std::fs::create_dir(&target).expect("mkdir");
    chmod(&target, 0o1777);
    let link = arena.shared().join(format!("qiod-{VICTIM}"));
    let out = finish(
        as_user(ATTACKER, &[], Path::new("/bin/ln"))
            .arg("-s")
            .arg(&target)
            .arg(&link),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let socket = link.join("qiod.sock");
    let mut qiod = arena.qiod(VICTIM, &socket, &["--server", &server.url()]);
    let status = qiod.wait_exit();
    assert!(
        !status.success(),
        "qiod started behind the symlink:\n{}",
        qiod.text()
    );
    let said = qiod.text();
    assert!(
        said.contains(&format!(
            "the socket's folder {} is a symlink",
            link.display()
        )),
        "{said}"
    );
    assert!(
        !target.join("qiod.sock").exists(),
        "a socket was bound behind the symlink"
    );

    // Repointed at the attacker's own folder with a fake daemon: qio refuses the symlink.
    let own = arena.shared().join("attacker");
    let fake = arena.fake_daemon(&own.join("qiod.sock"));
    let out = finish(
        as_user(ATTACKER, &[], Path::new("/bin/ln"))
            .arg("-sfn")
            .arg(&own)
            .arg(&link),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finish(&mut qio_as(
        VICTIM,
        &[
            "--socket",
            socket.to_str().expect("utf-8"),
            "send",
            "--wait",
            "/x",
            "1",
        ],
    ));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(UNTRUSTED), "{err}");
    assert!(err.contains("is a symlink"), "{err}");
    assert!(fake.lines_with("GOT").is_empty(), "{}", fake.text());
}

/// Attack 3: with the socket directly in a sticky shared folder, another user binds the
/// path while the victim's qiod restarts, and the victim's `qio sub` reconnected to it.
/// qiod now refuses such a folder; `qio` refuses it too; and a reconnect checks the
/// daemon again: a stand-in found on reconnect ends `qio sub` (exit 5) with nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_restart_race_in_a_shared_folder_reaches_no_stand_in() {
    let arena = Arena::new();
    let server = test_server().await;

    let shared_socket = arena.shared().join("qiod.sock");
    let mut qiod = arena.qiod(VICTIM, &shared_socket, &["--server", &server.url()]);
    assert!(!qiod.wait_exit().success(), "{}", qiod.text());
    assert!(
        qiod.text().contains("is writable by others (mode 1777)"),
        "{}",
        qiod.text()
    );
    let fake = arena.fake_daemon(&shared_socket);
    let out = finish(&mut qio_as(
        VICTIM,
        &[
            "--socket",
            shared_socket.to_str().expect("utf-8"),
            "sub",
            "/news",
        ],
    ));
    assert_eq!(out.status.code(), Some(UNTRUSTED), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("writable by others"),
        "{}",
        text(&out.stderr)
    );
    drop(fake);

    // The victim's own folder; its qiod; a `qio sub` on it.
    let run = arena.victim().join("run");
    let socket = run.join("qiod.sock");
    let s = socket.to_str().expect("utf-8");
    let qiod = arena.qiod(VICTIM, &socket, &["--server", &server.url()]);
    wait_until("qiod listens", || listening(&socket));
    let sub = Running::spawn(&mut qio_as(
        VICTIM,
        &["--socket", s, "sub", "/clienttest/broadcast"],
    ));
    sub.wait_for("\"event\":\"/clienttest/broadcast\"");

    // The daemon stops; the attacker's socket takes the path (root moves it there, as
    // winning the race would); the reconnect must find out before sending anything.
    let mut qiod = qiod;
    qiod.terminate();
    assert!(qiod.wait_exit().success(), "{}", qiod.text());
    wait_until("the socket is gone", || !socket.exists());
    let elsewhere = arena.shared().join("attacker");
    let fake = arena.fake_daemon(&elsewhere.join("qiod.sock"));
    std::fs::rename(elsewhere.join("qiod.sock"), &socket).expect("move the socket");
    let mut sub = sub;
    let status = sub.wait_exit();
    assert_eq!(status.code(), Some(UNTRUSTED), "{}", sub.text());
    assert!(
        sub.text().contains(&format!(
            "the process listening on {s} runs as uid {ATTACKER}"
        )),
        "{}",
        sub.text()
    );
    assert!(fake.lines_with("GOT").is_empty(), "{}", fake.text());
    assert!(!sub.text().contains("invented"), "{}", sub.text());
}

/// Attack 4: auto-start opened `<socket>.log` and `.lock` following symlinks, and
/// truncated and chmodded the log. In a folder the attacker made (0777), with the log
/// pointing at one of the victim's files, that file was clobbered. Now the folder is
/// refused before anything is opened, and the file is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack4_auto_start_in_a_planted_folder_clobbers_nothing() {
    // The victim's side, run in a copy of this test binary as the victim.
    if let Ok(socket) = std::env::var("QIO_ATTACK4_SOCKET") {
        let qiod = std::env::var("QIO_ATTACK4_QIOD").expect("qiod path");
        let got = qio_client::Client::builder()
            .socket(&socket)
            .auto_start(true)
            .qiod_path(qiod)
            .connect()
            .await;
        match got {
            Ok(_) => println!("RESULT connected"),
            Err(e) => println!("RESULT {e}"),
        }
        return;
    }
    let arena = Arena::new();
    let notes = arena.victim().join("notes.txt");
    std::fs::write(&notes, "precious").expect("write");
    chmod(&notes, 0o644);
    chown(&notes, VICTIM);
    let planted = arena.shared().join(format!("qiod-{VICTIM}"));
    let plant = format!(
        "mkdir -m 777 {p} && ln -s {n} {p}/qiod.sock.log && ln -s {n} {p}/qiod.sock.lock",
        p = planted.display(),
        n = notes.display()
    );
    let out = finish(as_user(ATTACKER, &[], Path::new("/bin/sh")).args(["-c", &plant]));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let me = std::env::current_exe().expect("this test binary");
    let mut victim = as_user(VICTIM, &[], &me);
    victim
        .args([
            "--exact",
            "attacks::attack4_auto_start_in_a_planted_folder_clobbers_nothing",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QIO_ATTACK4_SOCKET", planted.join("qiod.sock"))
        .env("QIO_ATTACK4_QIOD", qiod_binary());
    let out = finish(&mut victim);
    let said = text(&out.stdout);
    // The harness prints the test's name on the same line.
    let result = said
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "the victim's side said nothing: {said}{}",
                text(&out.stderr)
            )
        });
    assert_eq!(
        std::fs::read_to_string(&notes).expect("read"),
        "precious",
        "the victim's file was overwritten ({result})"
    );
    let meta = std::fs::metadata(&notes).expect("stat");
    assert_eq!(meta.mode() & 0o777, 0o644, "the victim's file changed mode");
    assert_eq!(meta.uid(), VICTIM);
    assert!(
        result.contains("refusing to use qiod")
            && result.contains(&format!(
                "belongs to uid {ATTACKER}, expected uid {VICTIM} or root"
            )),
        "{result}"
    );
}

/// Attack 5: with `allowed_groups`, a user outside them connecting in a loop cost a WARN
/// line and a database lookup per refusal, and crowded out allowed users; membership came
/// from the group database, not the process. Now refusals are logged once per uid per
/// interval with a count, an allowed user keeps getting in, and the process's own groups
/// decide (a group held but not in /etc/group lets in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack5_a_refusal_flood_is_logged_at_a_bounded_rate_and_members_get_in() {
    let arena = Arena::new();
    let server = test_server().await;
    let socket = arena.victim().join("run").join("qiod.sock");
    let s = socket.to_str().expect("utf-8");
    let qiod = arena.qiod_env(
        VICTIM,
        &socket,
        &[
            "--server",
            &server.url(),
            "--allowed-groups",
            &GROUP.to_string(),
        ],
        &[("QIOD_REFUSAL_LOG_INTERVAL_MS", "400")],
    );
    wait_until("qiod listens", || listening(&socket));

    const FLOODS: usize = 3000;
    let mut flood_cmd = as_user(ATTACKER, &[], Path::new(PYTHON));
    flood_cmd.args(["-c", FLOOD, s, &FLOODS.to_string()]);
    let flood = Running::spawn(&mut flood_cmd);

    // Meanwhile a member (by a group its process holds; no /etc/group entry) is served.
    let daemon_user = VICTIM.to_string();
    for _ in 0..20 {
        let mut cmd = as_user(MEMBER, &[GROUP], Path::new(env!("CARGO_BIN_EXE_qio")));
        // By the variable, as a client of a system daemon would be set up.
        cmd.args(["--socket", s, "status", "--json"])
            .env("QIOD_DAEMON_USER", &daemon_user);
        let out = finish(&mut cmd);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let connected = flood.wait_for("CONNECTED");
    let n: u64 = connected
        .trim_start_matches("CONNECTED ")
        .parse()
        .expect("a count");
    assert!(n > 0, "the flood never connected");

    // Every refusal of the attacker is accounted for, in a few lines.
    let mine = format!("uid {ATTACKER}");
    let counted = |line: &str| -> u64 {
        if line.contains("refused a local client") {
            1 + line
                .split('(')
                .filter_map(|p| p.split(" more refusals").next())
                .filter_map(|p| p.trim().parse::<u64>().ok())
                .sum::<u64>()
        } else if let Some(rest) = line.split("refused ").nth(1) {
            rest.split(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        } else {
            0
        }
    };
    wait_until("every refusal is counted in the log", || {
        qiod.lines_with(&mine)
            .iter()
            .map(|l| counted(l))
            .sum::<u64>()
            >= n
    });
    let lines = qiod.lines_with(&mine);
    assert_eq!(
        lines.iter().map(|l| counted(l)).sum::<u64>(),
        n,
        "{lines:#?}"
    );
    assert!(
        lines.len() < 60,
        "{} lines for {n} refusals: {lines:#?}",
        lines.len()
    );
    assert!(
        !qiod.text().contains(&format!("uid {MEMBER}")),
        "{}",
        qiod.text()
    );

    // A user the group database lists as a member, whose process dropped the group, is
    // refused: it is the process's groups that count.
    let listed = listed_member();
    let mut cmd = as_user(listed, &[], Path::new(PYTHON));
    cmd.args(["-c", READ_ALL, s]);
    let out = finish(&mut cmd);
    let said = text(&out.stdout);
    assert!(
        said.contains("CONNECTED") && said.contains("EOF"),
        "{said}{}",
        text(&out.stderr)
    );
    assert!(!said.contains("LINE"), "let in: {said}");
    qiod.wait_for(&format!("uid {listed}"));
}

/// A user whom /etc/group lists in [`GROUP`] (made once, idempotently, with groupadd and
/// useradd): `qiodsec-member`, uid 61004, in group `qiodsec` (gid 61500).
fn listed_member() -> u32 {
    const UID: u32 = 61004;
    let has = |db: &str, key: &str| {
        Command::new("getent")
            .args([db, key])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has("group", &GROUP.to_string()) {
        let ok = Command::new("groupadd")
            .args(["-g", &GROUP.to_string(), "qiodsec"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || has("group", &GROUP.to_string()),
            "groupadd qiodsec failed"
        );
    }
    if !has("passwd", &UID.to_string()) {
        let ok = Command::new("useradd")
            .args(["-M", "-N", "-u", &UID.to_string(), "-g", &GROUP.to_string()])
            .args([
                "-G",
                &GROUP.to_string(),
                "-s",
                "/usr/sbin/nologin",
                "qiodsec-member",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || has("passwd", &UID.to_string()),
            "useradd qiodsec-member failed"
        );
    }
    let out = Command::new("id")
        .args(["-G", &UID.to_string()])
        .output()
        .expect("id");
    assert!(
        text(&out.stdout)
            .split_whitespace()
            .any(|g| g == GROUP.to_string()),
        "uid {UID} is not listed in group {GROUP}: {}",
        text(&out.stdout)
    );
    UID
}

/// Attack 6: the socket file deleted while qiod ran left it unreachable and silent, and
/// a second qiod could start on the path. Now qiod notices within the check interval,
/// says so and exits non-zero; a replacement socket is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack6_a_deleted_or_replaced_socket_stops_qiod() {
    let arena = Arena::new();
    let server = test_server().await;
    let socket = arena.victim().join("run").join("qiod.sock");
    let url = server.url();
    let args = ["--server", url.as_str()];
    let check = [("QIOD_SOCKET_CHECK_MS", "50")];

    let mut qiod = arena.qiod_env(VICTIM, &socket, &args, &check);
    wait_until("qiod listens", || listening(&socket));
    std::fs::remove_file(&socket).expect("delete the socket");
    let status = qiod.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", qiod.text());
    qiod.wait_for("was deleted");
    let lines = qiod.lines_with("was deleted");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ERROR") && l.contains(&socket.display().to_string())),
        "{lines:#?}"
    );

    // One daemon on the path at a time: a new one starts and serves.
    let mut second = arena.qiod_env(VICTIM, &socket, &args, &check);
    wait_until("the second qiod listens", || listening(&socket));

    // Replaced: moved aside and another socket bound in its place.
    std::fs::rename(&socket, arena.victim().join("run").join("aside.sock")).expect("move");
    let other = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let status = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", second.text());
    second.wait_for("was replaced by another file");
    assert!(socket.exists(), "the replacement was removed");
    drop(other);
}

/// A client whose pid namespace cannot see the daemon (a container with the host's socket
/// mounted in) reads the daemon's pid as 0 in `SO_PEERCRED`. The daemon is trusted by its
/// uid, as before the move to interprocess, whose own peer credentials refuse a zero pid
/// (`qio` then said "connection reset").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_pid_the_client_cannot_see_is_still_reached() {
    need_root();
    let server = test_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o700);
    let socket = dir.path().join("qiod.sock");
    let daemon = Daemon::start_at(&server.url(), &socket);
    wait_until("the daemon listens", || listening(&socket));
    let out = finish(
        Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(env!("CARGO_BIN_EXE_qio"))
            .arg("--socket")
            .arg(&socket)
            .arg("status")
            .stdin(Stdio::null()),
    );
    assert!(
        out.status.success(),
        "qio in another pid namespace: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("state:"),
        "{}",
        text(&out.stdout)
    );
    daemon.stop().await;
}
