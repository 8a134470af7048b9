//! This process and its surroundings: the open-file limit, file locks, standard output,
//! and the signals that stop or reload the daemon.

use rustix::process::{Resource, Rlimit};
use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

/// The open-file limits: the soft one in force and the hard one it may be raised to
/// (`u64::MAX` for unlimited).
fn nofile() -> (u64, u64) {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    )
}

/// Raises the soft open-file limit to the hard one, since every client is an fd; returns
/// the limit in force. Only a limit that cannot be raised is worth a warning.
pub fn raise_nofile_limit() -> u64 {
    let (old, max) = nofile();
    if old >= max {
        tracing::debug!("open-file limit: {old}");
        return old;
    }
    let new = Rlimit {
        current: Some(max).filter(|&m| m != u64::MAX),
        maximum: Some(max).filter(|&m| m != u64::MAX),
    };
    if let Err(e) = rustix::process::setrlimit(Resource::Nofile, new) {
        tracing::warn!(
            "cannot raise the open-file limit from {old}: {}",
            io::Error::from(e)
        );
        return old;
    }
    tracing::debug!("open-file limit raised from {old} to {max}");
    max
}

/// Takes an exclusive `flock` on `file`, trying every `poll` until `deadline`. The lock
/// lasts until the file is closed.
pub fn lock_exclusive(file: &File, deadline: Instant, poll: Duration) -> io::Result<()> {
    use rustix::fs::FlockOperation;
    loop {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(poll)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "another client held it too long",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether standard output is a pipe or a socket (which a reader can close), not a file
/// or a terminal.
pub fn stdout_is_pipe() -> bool {
    use rustix::fs::FileType;
    match rustix::fs::fstat(rustix::stdio::stdout()) {
        Ok(st) => matches!(
            FileType::from_raw_mode(st.st_mode),
            FileType::Fifo | FileType::Socket
        ),
        Err(_) => false,
    }
}

/// Blocks until the reader of standard output goes away (`POLLERR`/`POLLHUP`); returns
/// at once with an error when that cannot be watched.
pub fn wait_stdout_closed() -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let stdout = rustix::stdio::stdout();
    loop {
        let mut fds = [PollFd::from_borrowed_fd(stdout, PollFlags::empty())];
        match rustix::event::poll(&mut fds, None) {
            Ok(n) if n > 0 && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) => {
                return Ok(())
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Starting the daemon from a client.
pub trait Detach {
    /// Runs the child in its own process group: a Ctrl-C meant for the client does not
    /// stop the daemon it started.
    fn detached(&mut self) -> &mut Self;
}

impl Detach for std::process::Command {
    fn detached(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.process_group(0)
    }
}

/// Whether `p` is a file someone may execute.
pub fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop (SIGTERM, SIGINT); the name is for the log.
    Stop(&'static str),
    /// Reload the configuration (SIGHUP).
    Reload,
}

/// The daemon's signal handlers: registered when made, so that no signal after that
/// reaches its default (fatal) action.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers (inside a tokio runtime).
    pub fn new() -> io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let with = |kind, name: &str| {
            signal(kind).map_err(|e| io::Error::new(e.kind(), format!("cannot handle {name}: {e}")))
        };
        Ok(Signals {
            term: with(SignalKind::terminate(), "SIGTERM")?,
            int: with(SignalKind::interrupt(), "SIGINT")?,
            hup: with(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next request.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let limit = raise_nofile_limit();
        assert_eq!(nofile(), (limit, limit));
    }

    #[test]
    fn a_held_lock_times_out_and_a_free_one_is_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("l");
        let a = File::create(&path).unwrap();
        let b = File::open(&path).unwrap();
        let poll = Duration::from_millis(1);
        lock_exclusive(&a, Instant::now(), poll).unwrap();
        let err = lock_exclusive(&b, Instant::now() + poll, poll).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        drop(a);
        lock_exclusive(&b, Instant::now(), poll).unwrap();
    }
}
