//! Starting `qiod` when no daemon answers, once even when many clients race.
//!
//! The socket's folder is checked (and created, 0700) as the daemon would
//! ([`qio_platform::trust`]): another user's folder, a symlink or a folder writable by others is
//! refused before anything is created in it. The lock and log files are opened with
//! `O_NOFOLLOW` and used only if they are regular files of ours with a single link, so a
//! planted symlink or hard link cannot make this client truncate someone's file.
//!
//! Under an exclusive `flock` on `<socket>.lock`, a client checks again whether a daemon
//! answers (another client may have started one while it waited for the lock), and only if
//! none does starts `qiod --socket <socket> <args>`, detached in its own process group with
//! stdin and stdout on `/dev/null` and stderr in `<socket>.log`, then waits (at most
//! [`WAIT`]) until the socket answers. The lock is released when the function returns, so
//! the next client finds the daemon running.

use crate::Error;
use qio_platform::process::Detach as _;
use qio_platform::trust::{self, Rules, TrustError};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started daemon may take to answer on its socket.
pub(crate) const WAIT: Duration = Duration::from_secs(5);
/// How often the lock and the socket are tried while waiting.
const POLL: Duration = Duration::from_millis(10);

/// What the builder says about starting the daemon.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub qiod: Option<PathBuf>,
    pub args: Vec<OsString>,
}

fn answers(socket: &Path) -> bool {
    qio_platform::local::answers(socket)
}

fn with_suffix(socket: &Path, suffix: &str) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn fail(reason: impl Into<String>) -> Error {
    Error::AutoStart {
        reason: reason.into(),
    }
}

/// Makes sure a daemon answers on `socket`, starting one if needed. Blocking.
///
/// Returns the pid of the daemon this call started, or `None` when one was already there.
pub(crate) fn ensure_daemon(socket: &Path, opts: &Options) -> Result<Option<u32>, Error> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = socket
        .file_name()
        .ok_or_else(|| fail(format!("{} names no socket file", socket.display())))?;
    // The daemon wants its folder private, and would refuse another user's: check it the
    // same way before creating anything in it.
    let rules = Rules {
        create_mode: Some(0o700),
        ..Rules::own()
    };
    let folder = trust::open_folder(dir, &rules).map_err(|e| match e {
        TrustError::Io { .. } => fail(e.to_string()),
        e => Error::Untrusted {
            socket: socket.to_owned(),
            problem: Box::new(e),
        },
    })?;
    let lock_path = with_suffix(socket, ".lock");
    let lock = open_private(&folder, &with_suffix(Path::new(name), ".lock"), &lock_path)?;
    // Whoever holds the lock may take up to WAIT to start the daemon.
    lock_exclusive(&lock, Instant::now() + 2 * WAIT)
        .map_err(|e| fail(format!("cannot lock {}: {e}", lock_path.display())))?;
    if answers(socket) {
        return Ok(None);
    }
    let qiod = find_qiod(opts.qiod.as_deref())?;
    let log_path = with_suffix(socket, ".log");
    let log = open_private(&folder, &with_suffix(Path::new(name), ".log"), &log_path)?;
    // Only now that it is known to be our own file: empty it, and keep it private.
    trust::empty_private(&log, &log_path).map_err(fail)?;
    let log_out = log
        .try_clone()
        .map_err(|e| fail(format!("cannot use {}: {e}", log_path.display())))?;
    let mut child = Command::new(&qiod)
        .arg("--socket")
        .arg(socket)
        .args(&opts.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_out)
        .detached()
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", qiod.display())))?;
    let pid = child.id();
    let deadline = Instant::now() + WAIT;
    let result = loop {
        if answers(socket) {
            break Ok(Some(pid));
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                break Err(fail(format!(
                    "{} exited ({status}) before answering on {}: {}",
                    qiod.display(),
                    socket.display(),
                    last_line(log).unwrap_or_else(|| "it said nothing".into())
                )))
            }
            Ok(None) => {}
            Err(e) => break Err(fail(format!("cannot watch the started qiod: {e}"))),
        }
        if Instant::now() >= deadline {
            break Err(fail(format!(
                "{} (pid {pid}) did not answer on {} within {WAIT:?}; see {}",
                qiod.display(),
                socket.display(),
                log_path.display()
            )));
        }
        std::thread::sleep(POLL);
    };
    // Reap the daemon whenever it exits, so it never lingers as a zombie of this process.
    let _ = std::thread::Builder::new()
        .name("qiod-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    result
}

/// [`trust::open_private`], its refusal as this module's error.
fn open_private(folder: &trust::Folder, name: &Path, shown: &Path) -> Result<File, Error> {
    trust::open_private(folder, name, shown).map_err(fail)
}

fn lock_exclusive(file: &File, deadline: Instant) -> io::Result<()> {
    qio_platform::process::lock_exclusive(file, deadline, POLL)
}

/// `qiod_path`, else `qiod` on `PATH`, else `qiod` beside the current executable.
fn find_qiod(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("qiod"));
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("qiod")));
    on_path
        .chain(beside)
        .find(|p| is_executable(p))
        .ok_or_else(|| fail("cannot find qiod: not on PATH nor beside this program; set qiod_path"))
}

fn is_executable(p: &Path) -> bool {
    qio_platform::process::is_executable(p)
}

/// The last non-empty line of the log, for the error message.
fn last_line(mut log: File) -> Option<String> {
    let len = log.seek(SeekFrom::End(0)).ok()?;
    log.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = String::new();
    log.take(4096).read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_qiod_that_fails_at_once_is_reported_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qiod");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"qiod: no server address\" >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("sub").join("qiod.sock");
        let opts = Options {
            qiod: Some(fake),
            args: Vec::new(),
        };
        let err = ensure_daemon(&socket, &opts).unwrap_err().to_string();
        assert!(err.contains("no server address"), "{err}");
        assert!(err.contains("exit status: 2"), "{err}");
        let mode = std::fs::metadata(socket.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    fn fake_qiod(dir: &Path) -> Options {
        let fake = dir.join("fake-qiod");
        std::fs::write(&fake, "#!/bin/sh\necho started >&2\nexit 2\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        Options {
            qiod: Some(fake),
            args: Vec::new(),
        }
    }

    #[test]
    fn a_planted_log_symlink_or_hard_link_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let opts = fake_qiod(dir.path());
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = run.join("qiod.sock");
        std::os::unix::fs::symlink(&victim, run.join("qiod.sock.log")).unwrap();
        let err = ensure_daemon(&socket, &opts).unwrap_err().to_string();
        assert!(err.contains("qiod.sock.log is a symlink"), "{err}");
        std::fs::remove_file(run.join("qiod.sock.log")).unwrap();
        std::fs::hard_link(&victim, run.join("qiod.sock.log")).unwrap();
        let err = ensure_daemon(&socket, &opts).unwrap_err().to_string();
        assert!(err.contains("2 links"), "{err}");
        std::fs::remove_file(run.join("qiod.sock.lock")).unwrap();
        std::os::unix::fs::symlink(&victim, run.join("qiod.sock.lock")).unwrap();
        let err = ensure_daemon(&socket, &opts).unwrap_err().to_string();
        assert!(err.contains("qiod.sock.lock is a symlink"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_folder_others_can_write_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let opts = fake_qiod(dir.path());
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_daemon(&run.join("qiod.sock"), &opts).unwrap_err();
        assert!(matches!(err, Error::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert!(!run.join("qiod.sock.lock").exists());
        assert!(!run.join("qiod.sock.log").exists());
    }

    #[test]
    fn a_missing_qiod_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            qiod: Some(dir.path().join("nope")),
            args: Vec::new(),
        };
        let err = ensure_daemon(&dir.path().join("s.sock"), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot run") && err.contains("nope"), "{err}");
    }
}
