//! The `qiod` binary as users run it: flags, socket permissions, signals.

use crate::common::Qiod;
use qio_testserver::{ServerConfig, TestServer};
use rustix::process::{Resource, Signal};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const DEADLINE: Duration = Duration::from_secs(10);

async fn connect(
    path: &Path,
) -> (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(path).await {
            let (r, w) = s.into_split();
            return (BufReader::new(r), w);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "qiod never listened on {path:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn read_line(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Option<Value> {
    let mut line = String::new();
    let n = tokio::time::timeout(DEADLINE, r.read_line(&mut line))
        .await
        .expect("a line in time")
        .expect("read");
    (n > 0).then(|| serde_json::from_str(&line).expect("json"))
}

async fn until_open(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) {
    loop {
        let v = read_line(r).await.expect("open before eof");
        if v["event"] == "/open" {
            return;
        }
    }
}

#[tokio::test]
async fn server_and_socket_flags_are_enough_and_sigterm_answers_pending_requests() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_dir = dir.path().join("run");
    let socket = sock_dir.join("qiod.sock");
    let config = dir.path().join("qiod.toml");
    let mut qiod = Qiod::spawn(&["--server", &server.url()], &socket, &config);
    let (mut r, mut w) = connect(&socket).await;
    until_open(&mut r).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock_dir), 0o700, "socket folder");
    assert_eq!(mode(&socket), 0o600, "socket");

    // A second daemon on the same socket refuses to start.
    let mut second = Qiod::spawn(&["--server", &server.url()], &socket, &config);
    let st = second.wait_exit();
    assert!(!st.success());

    w.write_all(b"{\"op\":\"send\",\"path\":\"/clienttest/drop-callback\",\"id\":7}\n")
        .await
        .unwrap();
    let start = Instant::now();
    while !server
        .received()
        .iter()
        .any(|r| r.path == "/clienttest/drop-callback")
    {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    qiod.signal(Signal::TERM);
    let mut reply = None;
    while let Some(v) = read_line(&mut r).await {
        if v.get("id") == Some(&json!(7)) {
            reply = Some(v);
        }
    }
    assert_eq!(reply.expect("a reply before the daemon left")["code"], -1);
    assert!(qiod.wait_exit().success());
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[tokio::test]
async fn sighup_applies_a_new_server_address() {
    let a = TestServer::start(ServerConfig::default()).await.unwrap();
    let b = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    let config = socket.with_extension("toml");
    std::fs::write(&config, format!("servers = [\"{}\"]\n", a.url())).unwrap();
    let mut qiod = Qiod::spawn(&[], &socket, &config);
    let (mut r, _w) = connect(&socket).await;
    until_open(&mut r).await;
    assert_eq!(a.connection_count(), 1);
    std::fs::write(&config, format!("servers = [\"{}\"]\n", b.url())).unwrap();
    qiod.signal(Signal::HUP);
    assert!(b.wait_until(DEADLINE, |s| s.connection_count() == 1).await);
    assert!(a.wait_until(DEADLINE, |s| s.connection_count() == 0).await);
    qiod.signal(Signal::INT);
    assert!(qiod.wait_exit().success());
}

#[test]
fn a_bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
        .args([
            "--server",
            "ws://127.0.0.1:1/",
            "--max-clients",
            "many",
            "--socket",
        ])
        .arg(&socket)
        .env("QIOD_CONFIG", dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_clients"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
        .arg("--socket")
        .arg(&socket)
        .env_remove("QIOD_SERVER")
        .env("QIOD_CONFIG", dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
}

/// Issue 15: a size with a unit README's way is accepted; a unit qiod does not know is
/// refused with the key, where it came from and the accepted forms (exit 2).
#[test]
fn sizes_with_units_are_accepted_and_a_bad_unit_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    std::fs::write(dir.path().join("c.toml"), "queue_max_bytes = \"16 MB\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
        .args([
            "--server",
            "ws://127.0.0.1:1/",
            "--client-queue-bytes",
            "4 MiB",
        ])
        .arg("--socket")
        .arg(&socket)
        .env("QIOD_CONFIG", dir.path().join("c.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue_max_bytes (in "), "{err}");
    assert!(err.contains("B, KiB, MiB or GiB"), "{err}");
    assert!(!err.contains("client_queue_bytes"), "4 MiB is fine: {err}");
}

/// Issue 15: a socket folder that cannot be made is reported once, with the system's
/// answer once, and without calling it a refused folder.
#[test]
fn a_socket_folder_that_cannot_be_made_gives_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
        .args([
            "--server",
            "ws://127.0.0.1:1/",
            "--socket",
            "/proc/nope/x.sock",
        ])
        .env("QIOD_CONFIG", dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let os = "No such file or directory";
    assert_eq!(err.matches(os).count(), 1, "{err}");
    assert!(
        err.contains("qiod: cannot create directory /proc/nope: No such file or directory"),
        "{err}"
    );
    assert!(!err.contains("refusing"), "{err}");
}

#[test]
fn the_open_file_limit_is_mentioned_only_when_it_matters() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("qiod.toml");
    let hard = rustix::process::getrlimit(Resource::Nofile)
        .maximum
        .expect("a finite hard limit on open files, to ask for one more");
    let too_many = (hard + 1).to_string();

    // A daemon that cannot start says why, and nothing about file limits.
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut failed = Qiod::spawn(
        &["--server", "ws://127.0.0.1:1/", "--max-clients", &too_many],
        &not_a_dir.join("qiod.sock"),
        &config,
    );
    let st = failed.wait_exit();
    assert_eq!(st.code(), Some(1));
    let err = failed.stderr_until("\u{0}").expect_err("stderr to its end");
    assert!(err.contains("qiod: "), "{err}");
    assert!(!err.contains("open-file limit"), "{err}");

    // A running daemon warns when max_clients cannot be served.
    let socket = dir.path().join("qiod.sock");
    let qiod = Qiod::spawn(
        &["--server", "ws://127.0.0.1:1/", "--max-clients", &too_many],
        &socket,
        &config,
    );
    let seen = qiod.stderr_until("open-file limit").expect("a warning");
    assert!(seen.contains("is above the open-file limit"), "{seen}");

    // With a sane max_clients, the limit is not news: nothing about it up to the line
    // that says the daemon is starting, which comes after the limit is raised.
    let quiet = Qiod::spawn(
        &["--server", "ws://127.0.0.1:1/"],
        &dir.path().join("quiet.sock"),
        &config,
    );
    let seen = quiet.stderr_until("qiod starting").expect("qiod starts");
    assert!(!seen.contains("open-file limit"), "{seen}");
}

fn help(flag: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
        .arg(flag)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "qiod {flag}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_is_grouped_under_headings_and_h_is_a_summary() {
    let long = help("--help");
    let mut at = 0;
    // The headings in the order of the file.
    for heading in [
        "Options:",
        "Servers and dialect:",
        "Local socket and access:",
        "Logging:",
        "Timing:",
        "Bounds:",
        "Exit codes:",
    ] {
        let found = long[at..]
            .find(heading)
            .unwrap_or_else(|| panic!("{heading} missing or out of order in:\n{long}"));
        at += found;
    }
    assert!(long.contains("--ping-timeout-ms <MS>"), "{long}");
    assert!(
        long.contains("[default: 10000] [env: QIOD_PING_TIMEOUT_MS]"),
        "{long}"
    );
    assert!(long.contains("2  a configuration or usage error"), "{long}");

    let short = help("-h");
    assert!(short.lines().count() * 2 < long.lines().count(), "{short}");
    for common in ["--server <URL>", "--socket <PATH>", "Exit codes:"] {
        assert!(short.contains(common), "{common} missing in:\n{short}");
    }
    assert!(!short.contains("--ping-timeout-ms"), "{short}");
    assert!(short.contains("qiod --help lists every option"), "{short}");
    // The demo is not in this binary; the hint names the one that has it.
    assert!(!long.contains("--demo"), "{long}");
    assert!(short.contains("cargo run --bin qiod-demo"), "{short}");
}

#[test]
fn man_page_and_completions_come_from_the_command_line_definition() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |to: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_qiod"))
            .arg("--generate-assets")
            .arg(to)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    generate(&a);
    generate(&b);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let page = read(&a.join("man/qiod.1"));
    assert!(page.contains(".TH qiod 1"), "{page}");
    assert!(page.contains(".SH \"SERVERS AND DIALECT\""), "{page}");
    assert!(page.contains("\\-\\-max\\-clients"), "{page}");
    assert!(
        !page.contains("/root") && !page.contains("/home/"),
        "no builder paths"
    );
    let bash = read(&a.join("completions/qiod.bash"));
    assert!(bash.contains("--server"), "{bash}");
    assert!(
        !bash.contains("generate-assets"),
        "the packaging hook is not offered"
    );
    for f in [
        "man/qiod.1",
        "completions/qiod.bash",
        "completions/_qiod",
        "completions/qiod.fish",
    ] {
        assert_eq!(read(&a.join(f)), read(&b.join(f)), "{f}");
    }
}

/// The sample config shipped in the package (dist/config.toml) names every key, and its
/// lines, uncommented, are a valid configuration.
#[test]
fn the_sample_config_has_every_key_and_is_valid_uncommented() {
    use clap::CommandFactory;
    let sample = include_str!("../../../dist/config.toml");
    let keys: Vec<String> = qiod::config::Args::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|k| !matches!(k.as_str(), "config" | "help" | "version"))
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    let mut uncommented = String::new();
    for key in &keys {
        let line = sample
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} = ")))
            .unwrap_or_else(|| panic!("no `# {key} = ...` line in dist/config.toml"));
        // These name things of the machine (a file, a group) that a test cannot assume.
        if !matches!(key.as_str(), "ca_file" | "allowed_groups") {
            uncommented.push_str(&format!("{key} = {line}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &uncommented).unwrap();
    let args = qiod::config::Args {
        config: Some(file),
        ..Default::default()
    };
    let config = qiod::config::load(args).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(config.settings.ipc.max_clients, 16384);
}

/// Runs qiod to its end with `config` as its file, only the `QIOD_*` variables given, and
/// `args`; for configurations it refuses.
fn run_refused(args: &[&str], vars: &[(&str, &str)], config: &Path) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qiod"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("QIOD_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(args)
        .env("QIOD_CONFIG", config)
        .envs(vars.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

/// A bad value names the key, where it came from (the flag, its variable or the file)
/// and what is accepted, and exits 2; an empty variable counts as unset.
#[test]
fn a_bad_value_names_its_key_and_source_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("qiod.toml");
    std::fs::write(&config, "servers = [\"ws://127.0.0.1:1/\"]\n").unwrap();
    let err = run_refused(&[], &[("QIOD_MAX_CLIENTS", "many")], &config);
    assert_eq!(
        err.trim_end(),
        "qiod: max_clients (from QIOD_MAX_CLIENTS): expected a whole number greater than 0, got \"many\""
    );
    let err = run_refused(
        &["--max-clients", "0"],
        &[("QIOD_MAX_CLIENTS", "5")],
        &config,
    );
    assert!(
        err.starts_with("qiod: max_clients (from --max-clients): expected a whole number"),
        "the flag is read, not the variable: {err}"
    );
    let err = run_refused(&[], &[("QIOD_SERVER", "http://h:1/")], &config);
    assert!(
        err.starts_with("qiod: servers (from QIOD_SERVER): "),
        "{err}"
    );
    let err = run_refused(&[], &[("QIOD_PING_TIMEOUT_MS", "99999999999")], &config);
    assert!(
        err.contains("expected a whole number of milliseconds from 1 to 86400000"),
        "{err}"
    );

    // An empty variable is unset: the file's value (here a bad one) is used.
    std::fs::write(
        &config,
        "servers = [\"ws://127.0.0.1:1/\"]\nnotice_capacity = 0\n",
    )
    .unwrap();
    let err = run_refused(&[], &[("QIOD_NOTICE_CAPACITY", "")], &config);
    assert!(
        err.starts_with(&format!(
            "qiod: notice_capacity (in {}): expected a whole number greater than 0, got 0",
            config.display()
        )),
        "{err}"
    );

    // An unknown key is named with its line.
    std::fs::write(
        &config,
        "servers = [\"ws://127.0.0.1:1/\"]\nmax_client = 5\n",
    )
    .unwrap();
    let err = run_refused(&[], &[], &config);
    assert!(
        err.starts_with(&format!(
            "qiod: {}:2: unknown field `max_client`",
            config.display()
        )),
        "{err}"
    );
}

/// The CA file is read at start: one that cannot be used is a configuration error naming
/// the key, where it was set and the file, before the socket is bound.
#[test]
fn an_unusable_ca_file_exits_2_naming_the_key_its_source_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("qiod.toml");
    let socket = dir.path().join("qiod.sock");
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    std::fs::write(
        &config,
        format!(
            "servers = [\"wss://127.0.0.1:1/\"]\nca_file = {:?}\n",
            missing.to_str().unwrap()
        ),
    )
    .unwrap();
    let sock = socket.to_str().unwrap();
    let err = run_refused(&["--socket", sock], &[], &config);
    assert!(
        err.starts_with(&format!(
            "qiod: ca_file (in {}): cannot read {}: ",
            config.display(),
            missing.display()
        )),
        "{err}"
    );
    let err = run_refused(
        &["--socket", sock],
        &[("QIOD_CA_FILE", empty.to_str().unwrap())],
        &config,
    );
    assert!(
        err.starts_with(&format!(
            "qiod: ca_file (from QIOD_CA_FILE): {}: holds no certificate",
            empty.display()
        )),
        "{err}"
    );
    let err = run_refused(
        &["--socket", sock, "--ca-file", missing.to_str().unwrap()],
        &[("QIOD_CA_FILE", empty.to_str().unwrap())],
        &config,
    );
    assert!(
        err.starts_with("qiod: ca_file (from --ca-file): cannot read"),
        "{err}"
    );
    assert!(!socket.exists(), "refused before binding");
}

/// Which layer wins, seen from outside: the socket qiod listens on comes from the flag,
/// else the variable (unless empty), else the file.
#[tokio::test]
async fn a_flag_beats_its_variable_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("qiod.toml");
    let (file, var, flag) = (
        dir.path().join("file.sock"),
        dir.path().join("var.sock"),
        dir.path().join("flag.sock"),
    );
    std::fs::write(
        &config,
        format!(
            "servers = [\"ws://127.0.0.1:1/\"]\nsocket = {:?}\n",
            file.to_str().unwrap()
        ),
    )
    .unwrap();
    let start = |args: &[&str], var: &Path| {
        let mut cmd = Qiod::command(dir.path());
        cmd.args(args).env("QIOD_SOCKET", var);
        Qiod::start(cmd)
    };
    for (args, var_value, expect) in [
        (
            vec!["--socket", flag.to_str().unwrap()],
            var.as_path(),
            &flag,
        ),
        (vec![], var.as_path(), &var),
        (vec![], Path::new(""), &file),
    ] {
        let mut qiod = start(&args, var_value);
        // The first line (the upstream state) comes from a daemon that handles signals.
        let (mut r, _w) = connect(expect).await;
        assert!(read_line(&mut r).await.is_some());
        for other in [&flag, &var, &file] {
            assert_eq!(other.exists(), other == expect, "{other:?}");
        }
        qiod.signal(Signal::TERM);
        assert!(qiod.wait_exit().success());
    }
}

/// A reload whose CA file cannot be used is refused like any bad reload: the running
/// configuration stays and the log says why.
#[tokio::test]
async fn a_reload_with_an_unusable_ca_file_keeps_the_running_configuration() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qiod.sock");
    let config = dir.path().join("qiod.toml");
    std::fs::write(&config, format!("servers = [\"{}\"]\n", server.url())).unwrap();
    let mut qiod = Qiod::spawn(&[], &socket, &config);
    let (mut r, _w) = connect(&socket).await;
    until_open(&mut r).await;
    let missing = dir.path().join("missing.pem");
    std::fs::write(
        &config,
        format!(
            "servers = [\"{}\"]\nca_file = {:?}\n",
            server.url(),
            missing.to_str().unwrap()
        ),
    )
    .unwrap();
    qiod.signal(Signal::HUP);
    let seen = qiod
        .stderr_until("reload failed")
        .expect("the reload is refused");
    let line = seen.lines().last().unwrap_or_default();
    assert!(
        line.contains("keeping the running configuration: ca_file (in "),
        "{line}"
    );
    assert!(line.contains("missing.pem"), "{line}");
    qiod.signal(Signal::TERM);
    assert!(qiod.wait_exit().success());
}
