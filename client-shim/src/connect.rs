//! Connecting to the daemon, and making sure it is ours before a byte is sent.
//!
//! Anyone who can create the socket's path can listen on it, so a client checks, on every
//! connection (the first and each reconnect), what [`qio_platform::trust`] describes: the
//! socket's folder (no symlink, owned by us, root or the configured daemon user, not
//! writable by group or others) and, once connected, the listening process's uid
//! (`SO_PEERCRED`): ours, root, or the configured daemon user ([`Builder::daemon_user`],
//! else `QIOD_DAEMON_USER`). A mismatch is [`Error::Untrusted`]; nothing is written to that
//! socket, and no other path is tried instead.
//!
//! A daemon whose listen backlog is full (a flood of connections) answers `EAGAIN`; that
//! is retried for [`BACKLOG_WAIT`] before it counts as a failure.
//!
//! [`Builder::daemon_user`]: crate::Builder::daemon_user

use crate::Error;
use qio_platform::local::{self, Stream};
use qio_platform::trust::{self, Rules};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a connection refused for a full backlog is retried.
pub(crate) const BACKLOG_WAIT: Duration = Duration::from_secs(2);
const BACKLOG_FIRST_DELAY: Duration = Duration::from_millis(5);
const BACKLOG_MAX_DELAY: Duration = Duration::from_millis(100);

/// Whether nothing listens there (no file, or a file nobody listens on).
pub(crate) fn not_running(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Whether the daemon's listen backlog is full: worth trying again shortly.
pub(crate) fn backlog_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub(crate) fn connect_error(socket: &Path, e: io::Error) -> Error {
    if not_running(&e) {
        Error::DaemonNotRunning {
            socket: socket.to_owned(),
        }
    } else {
        Error::Connect {
            socket: socket.to_owned(),
            source: e,
        }
    }
}

fn untrusted(socket: &Path, problem: trust::TrustError) -> Error {
    Error::Untrusted {
        socket: socket.to_owned(),
        problem: Box::new(problem),
    }
}

/// The socket's folder per `rules`; blocking (a few `stat`s).
pub(crate) fn check_folder(socket: &Path, rules: &Rules) -> Result<(), Error> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match trust::open_folder(dir, rules) {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Err(Error::DaemonNotRunning {
            socket: socket.to_owned(),
        }),
        Err(trust::TrustError::Io { source, .. }) => Err(Error::Connect {
            socket: socket.to_owned(),
            source,
        }),
        Err(e) => Err(untrusted(socket, e)),
    }
}

/// The listening process behind `stream` per `rules`.
pub(crate) fn check_peer(socket: &Path, stream: &Stream, rules: &Rules) -> Result<(), Error> {
    let cred = local::peer(stream).map_err(|e| connect_error(socket, e))?;
    trust::check_peer(socket, cred.uid, cred.pid, rules).map_err(|e| untrusted(socket, e))
}

/// Connects to `socket` and checks folder and peer; nothing has been sent when it returns.
pub(crate) async fn connect_verified(socket: &Path, rules: &Rules) -> Result<Stream, Error> {
    let (path, r) = (socket.to_owned(), rules.clone());
    tokio::task::spawn_blocking(move || check_folder(&path, &r))
        .await
        .map_err(|e| Error::Connect {
            socket: socket.to_owned(),
            source: io::Error::other(e.to_string()),
        })??;
    let stream = retry_backlog(socket, BACKLOG_WAIT, |p: PathBuf| async move {
        local::connect(&p).await
    })
    .await
    .map_err(|e| connect_error(socket, e))?;
    check_peer(socket, &stream, rules)?;
    Ok(stream)
}

/// `connect(socket)`, tried again while it fails for a full backlog, for at most `wait`.
pub(crate) async fn retry_backlog<F, Fut, T>(
    socket: &Path,
    wait: Duration,
    mut connect: F,
) -> io::Result<T>
where
    F: FnMut(PathBuf) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = BACKLOG_FIRST_DELAY;
    loop {
        match connect(socket.to_owned()).await {
            Err(e) if backlog_full(&e) && tokio::time::Instant::now() + delay < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKLOG_MAX_DELAY);
            }
            other => return other,
        }
    }
}

/// The rules for a builder's `daemon_user` (else `QIOD_DAEMON_USER`).
pub(crate) fn rules_for(daemon_user: Option<&str>) -> Rules {
    trust::client_rules(daemon_user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_full_backlog_is_retried_for_a_while() {
        let tries = AtomicUsize::new(0);
        let got = retry_backlog(Path::new("/s"), BACKLOG_WAIT, |_| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(io::Error::from(io::ErrorKind::WouldBlock))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);

        // Not forever, and other errors at once.
        let tries = AtomicUsize::new(0);
        let err = retry_backlog(Path::new("/s"), Duration::from_millis(30), |_| {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock)) }
        })
        .await
        .unwrap_err();
        assert!(backlog_full(&err));
        assert!(tries.load(Ordering::SeqCst) > 1);
        let tries = AtomicUsize::new(0);
        let err = retry_backlog(Path::new("/s"), BACKLOG_WAIT, |_| {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(io::Error::from(io::ErrorKind::ConnectionRefused)) }
        })
        .await
        .unwrap_err();
        assert!(not_running(&err));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    /// A listener whose backlog is full answers `EAGAIN` to a non-blocking connect, which
    /// is what [`backlog_full`] recognises (and what interprocess's own connect would
    /// hide, taking it for a connection in progress).
    #[tokio::test]
    async fn a_real_full_backlog_is_recognised() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&fd, 0).unwrap();
        let mut held = Vec::new();
        let err = loop {
            match local::connect(&path).await {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100, "the backlog never filled");
        };
        assert!(backlog_full(&err), "{err:?}");
    }
}
