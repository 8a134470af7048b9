//! systemd socket activation: taking the listening socket systemd passed, through
//! sd-notify's `listen_fds` (which follows `sd_listen_fds(3)` and sets close-on-exec).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

/// The first socket passed by systemd socket activation, if we were started that way.
///
/// The fds are ours only when `LISTEN_PID` is our pid; they start at 3. The variables
/// are removed so that children do not take the fds too. Anything but a listening Unix
/// stream socket is ignored with a warning (the daemon then binds its own).
///
/// # Safety
///
/// It removes environment variables, which races with any other thread reading or
/// writing the environment: call it before starting threads (before the tokio runtime).
pub unsafe fn from_systemd() -> Option<UnixListener> {
    // SAFETY: the caller guarantees that no other thread runs yet.
    let fds = unsafe { sd_notify::listen_fds_and_unset_env() };
    // sd-notify leaves the names; children must not see them either (the same rule as
    // above holds: no other thread yet).
    std::env::remove_var("LISTEN_FDNAMES");
    let mut fds = match fds {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!("ignoring what systemd passed: {e}");
            return None;
        }
    };
    let count = fds.len();
    let fd = fds.next()?;
    if count > 1 {
        tracing::warn!("systemd passed {count} sockets; using the first one only");
    }
    // SAFETY: systemd handed this fd to this process alone (LISTEN_PID matched), and the
    // variables are gone, so nothing else in the process takes it; it stays open for
    // the life of the process unless wrapped below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(why) = check_listening_unix(borrowed) {
        tracing::warn!("ignoring the socket systemd passed (fd {fd}): {why}");
        return None;
    }
    // SAFETY: as above: the fd is ours, open, and wrapped once.
    Some(UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether `fd` is a listening Unix stream socket (`Accept=no`), else why not.
pub(crate) fn check_listening_unix(fd: impl AsFd) -> Result<(), String> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let fd = fd.as_fd();
    let family = sockopt::socket_domain(fd).map_err(|e| format!("not a socket: {e}"))?;
    if family != AddressFamily::UNIX {
        return Err("not a Unix socket".into());
    }
    match sockopt::socket_type(fd) {
        Ok(SocketType::STREAM) => {}
        Ok(_) => return Err("not a stream socket (use ListenStream=)".into()),
        Err(e) => return Err(format!("getsockopt: {e}")),
    }
    match sockopt::socket_acceptconn(fd) {
        Ok(true) => Ok(()),
        Ok(false) => Err("not listening (use ListenStream= with Accept=no)".into()),
        Err(e) => Err(format!("getsockopt: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(tmp.path().join("s.sock")).unwrap();
        assert_eq!(check_listening_unix(&listener), Ok(()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = check_listening_unix(&a).unwrap_err();
        assert!(err.contains("not listening"), "{err}");
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let err = check_listening_unix(&dgram).unwrap_err();
        assert!(err.contains("not a stream socket"), "{err}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(check_listening_unix(&tcp).unwrap_err(), "not a Unix socket");
        let file = std::fs::File::open("/").unwrap();
        let err = check_listening_unix(&file).unwrap_err();
        assert!(err.starts_with("not a socket"), "{err}");
    }
}
