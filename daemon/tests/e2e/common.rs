//! What the modules share: the one helper that starts a `qiod` process, isolated from the
//! machine's own configuration and from a service manager the tests may run under.

use rustix::process::{Pid, Signal};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// What systemd puts in a service's environment; removed from every child so that a test
/// run under systemd (a CI service) does not leak its own into the daemon. Every `QIOD_*`
/// variable goes too (see [`Qiod::isolate_with`]).
const MANAGER_VARS: [&str; 7] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "RUST_LOG",
];

/// A running qiod whose log (stderr) is collected as it comes, and shown when the test
/// fails. Killed when dropped.
pub struct Qiod {
    pub child: Child,
    log: Arc<Log>,
}

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    /// Set when stderr has ended (the process and whatever it forked have exited).
    ended: AtomicBool,
}

impl Log {
    fn lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Qiod {
    /// Starts `qiod args --socket socket` with `config` as its config file (written empty
    /// unless the test wrote one).
    pub fn spawn(args: &[&str], socket: &Path, config: &Path) -> Qiod {
        let mut cmd = Qiod::isolate_with(Command::new(env!("CARGO_BIN_EXE_qiod")), config);
        cmd.args(args).arg("--socket").arg(socket);
        Qiod::start(cmd)
    }

    /// A `qiod` command with `dir/qiod.toml` as its config file (written empty unless the
    /// test wrote one), to adjust and [`Qiod::start`].
    pub fn command(dir: &Path) -> Command {
        Qiod::isolate(Command::new(env!("CARGO_BIN_EXE_qiod")), dir)
    }

    /// Gives `cmd` (qiod, or what execs it) the isolation of [`Qiod::command`].
    pub fn isolate(cmd: Command, dir: &Path) -> Command {
        Qiod::isolate_with(cmd, &dir.join("qiod.toml"))
    }

    /// A clean environment (no manager variables, no `QIOD_*`, no `RUST_LOG`), `config` as
    /// the config file, no stdin or stdout, stderr piped for the log.
    fn isolate_with(mut cmd: Command, config: &Path) -> Command {
        if !config.exists() {
            std::fs::write(config, "").expect("write config");
        }
        for var in MANAGER_VARS {
            cmd.env_remove(var);
        }
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("QIOD_") {
                cmd.env_remove(var);
            }
        }
        cmd.env("QIOD_CONFIG", config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a command made by [`Qiod::command`] or [`Qiod::isolate`].
    pub fn start(mut cmd: Command) -> Qiod {
        let mut child = cmd.spawn().expect("qiod starts");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines().push(line);
            }
            sink.ended.store(true, Ordering::Release);
        });
        Qiod { child, log }
    }

    /// Sends `sig` to the process, as a service manager or an operator would.
    pub fn signal(&self, sig: Signal) {
        rustix::process::kill_process(Pid::from_child(&self.child), sig)
            .unwrap_or_else(|e| panic!("signal {sig:?} to qiod: {e}"));
    }

    /// Waits for the process to exit, blocking the thread.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(start.elapsed() < DEADLINE, "qiod did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit while the test's runtime (and a test server on it)
    /// keeps running.
    pub async fn wait_exit_async(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(start.elapsed() < DEADLINE, "qiod did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything qiod wrote to stderr so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.lines().join("\n")
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let found = self
                .log
                .lines()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no log line with {needles:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a log line contains `needle` (Ok) or stderr ends (Err); either way with
    /// all the lines up to there, each ending in a newline.
    pub fn stderr_until(&self, needle: &str) -> Result<String, String> {
        let start = Instant::now();
        loop {
            // Read before looking at the lines, so that no line is missed at the end.
            let ended = self.log.ended.load(Ordering::Acquire);
            let lines = self.log.lines();
            let mut seen = String::new();
            for line in lines.iter() {
                seen.push_str(line);
                seen.push('\n');
                if line.contains(needle) {
                    return Ok(seen);
                }
            }
            if ended {
                return Err(seen);
            }
            drop(lines);
            assert!(
                start.elapsed() < DEADLINE,
                "no stderr line with {needle:?}:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the daemon's upstream session is open (it serves then).
    pub fn wait_open(&self) {
        self.wait_log(&["INFO", " open url="]);
    }
}

impl Drop for Qiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- qiod's log ---\n{}\n---", self.log_text());
        }
    }
}
