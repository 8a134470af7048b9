//! The local socket as interprocess's types: a Unix socket here, a named pipe on Windows.
//!
//! The daemon accepts on a [`Listener`] and serves [`Stream`]s; clients connect with
//! [`connect`]. Both are interprocess's tokio local-socket types, so code above this
//! module names no Unix type. Four things interprocess cannot express are done with the
//! socket underneath (each says so where it happens):
//!
//! - binding: the socket is bound through its opened folder ([`crate::bind`]) or passed
//!   by systemd, then converted with [`listener_from_std`];
//! - connecting: interprocess counts `EAGAIN` (the daemon's backlog is full) as "in
//!   progress", but the client must see it to retry ([`connect`]);
//! - half-closing: interprocess's stream halves are deprecated and its `shutdown` does
//!   nothing, while the daemon and `qio` half-close to say "no more requests" ([`split`]);
//! - peer credentials: interprocess refuses a peer whose pid we cannot see ([`peer`]).

use interprocess::local_socket::tokio::{Listener as IpListener, Stream as IpStream};
use interprocess::os::unix::uds_local_socket::tokio as uds;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

pub use interprocess::local_socket::traits::tokio::Listener as ListenerExt;

/// The daemon's listening local socket (interprocess's tokio listener).
pub type Listener = IpListener;
/// One connection over the local socket (interprocess's tokio stream).
pub type Stream = IpStream;
/// The reading half of a [`Stream`] after [`split`].
pub type ReadHalf = tokio::net::unix::OwnedReadHalf;
/// The writing half of a [`Stream`] after [`split`]; its `shutdown` half-closes.
pub type WriteHalf = tokio::net::unix::OwnedWriteHalf;

/// Makes interprocess's listener from a listening std socket, non-blocking and registered
/// with the current tokio runtime (call it inside one).
///
/// interprocess cannot bind through an opened folder nor adopt systemd's socket by
/// itself; both are made as std listeners and converted here, through their descriptor.
/// The listener removes no file when dropped: the socket file is [`crate::bind::SocketGuard`]'s
/// business (and systemd's for a passed socket).
pub fn listener_from_std(listener: std::os::unix::net::UnixListener) -> io::Result<Listener> {
    let uds = uds::Listener::try_from(OwnedFd::from(listener))?;
    Ok(Listener::from(uds))
}

/// Accepts the next connection.
pub async fn accept(listener: &Listener) -> io::Result<Stream> {
    ListenerExt::accept(listener).await
}

/// Connects to the socket at `path`.
///
/// tokio's connect, converted into interprocess's stream: interprocess's own connect
/// takes `EAGAIN` (a full listen backlog) for a connection in progress, while the client
/// must see it as [`io::ErrorKind::WouldBlock`] to try again shortly.
pub async fn connect(path: &Path) -> io::Result<Stream> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    Ok(Stream::from(uds::Stream::from(stream)))
}

/// Two connected streams, as if one had connected to the other (tests, in-process use).
pub fn pair() -> io::Result<(Stream, Stream)> {
    let (a, b) = tokio::net::UnixStream::pair()?;
    Ok((
        Stream::from(uds::Stream::from(a)),
        Stream::from(uds::Stream::from(b)),
    ))
}

/// Whether something accepts connections at `path` right now (a blocking connect that
/// is closed at once).
pub fn answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Splits a stream into owned halves whose writing half's `shutdown` really half-closes
/// (`shutdown(SHUT_WR)`): interprocess's halves cannot.
pub fn split(stream: Stream) -> (ReadHalf, WriteHalf) {
    let Stream::UdSocket(uds) = stream;
    tokio::net::UnixStream::from(uds).into_split()
}

/// The process at the other end of a local connection, as the kernel saw it connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its effective uid.
    pub uid: u32,
    /// Its effective (primary) gid.
    pub gid: u32,
    /// Its pid, when known.
    pub pid: Option<i32>,
}

/// The credentials of the peer of `stream` (`SO_PEERCRED` on Linux).
///
/// Read by tokio on the socket interprocess wraps, not by interprocess's `peer_creds`:
/// that one refuses a zero pid, which is what the kernel reports for a peer in a pid
/// namespace we cannot see (a client in a container reaching the host's daemon), whose
/// uid is still right.
pub fn peer(stream: &Stream) -> io::Result<Peer> {
    let Stream::UdSocket(uds) = stream;
    let cred = uds.inner().peer_cred()?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid().filter(|&pid| pid != 0),
    })
}

/// The descriptor of `stream`, for the Unix-only checks ([`peer_groups`]).
pub fn fd(stream: &Stream) -> BorrowedFd<'_> {
    let Stream::UdSocket(uds) = stream;
    uds.as_fd()
}

/// The supplementary groups of the process at the other end of `stream`
/// (`SO_PEERGROUPS`, Linux 4.13+), as they were when it connected; `None` where the
/// kernel cannot tell.
pub fn peer_groups(stream: &Stream) -> Option<Vec<u32>> {
    peer_groups_of(fd(stream))
}

/// [`peer_groups`] of any connected Unix socket.
pub fn peer_groups_of(fd: BorrowedFd<'_>) -> Option<Vec<u32>> {
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86",
            target_arch = "x86_64",
            target_arch = "arm",
            target_arch = "aarch64",
            target_arch = "riscv64",
            target_arch = "powerpc64",
            target_arch = "loongarch64",
            target_arch = "s390x"
        )
    ))]
    {
        use std::os::fd::AsRawFd;
        // Not in libc's exports for these targets; the asm-generic value.
        const SO_PEERGROUPS: libc::c_int = 59;
        let mut groups: Vec<libc::gid_t> = vec![0; 64];
        for _ in 0..8 {
            let mut len =
                libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
                    .ok()?;
            // SAFETY: no crate wraps SO_PEERGROUPS (rustix, nix and interprocess read only
            // SO_PEERCRED), so it is a raw getsockopt. The buffer has room for `len`
            // bytes; the kernel writes at most that and reports what it wrote (or needs,
            // with ERANGE) in `len`.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let n = usize::try_from(len).ok()? / std::mem::size_of::<libc::gid_t>();
            if rc == 0 {
                groups.truncate(n);
                return Some(groups);
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
                return None;
            }
            groups.resize(n.max(groups.len() * 2), 0);
        }
        None
    }
    #[cfg(not(all(
        target_os = "linux",
        any(
            target_arch = "x86",
            target_arch = "x86_64",
            target_arch = "arm",
            target_arch = "aarch64",
            target_arch = "riscv64",
            target_arch = "powerpc64",
            target_arch = "loongarch64",
            target_arch = "s390x"
        )
    )))]
    {
        let _ = fd;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_bound_socket_serves_interprocess_streams_that_half_close() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.sock");
        let listener = listener_from_std(crate::bind::bind(&path).unwrap()).unwrap();
        let (server, client) = tokio::join!(accept(&listener), connect(&path));
        let (server, client) = (server.unwrap(), client.unwrap());
        let me = peer(&server).unwrap();
        assert_eq!(me.uid, crate::users::own_euid());
        assert_eq!(me.pid, Some(std::process::id() as i32));
        // The client's end of input reaches the daemon as end of file, and the daemon
        // can still answer.
        let (mut crd, mut cwr) = split(client);
        cwr.write_all(b"hi\n").await.unwrap();
        cwr.shutdown().await.unwrap();
        let (mut srd, mut swr) = split(server);
        let mut got = Vec::new();
        srd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi\n");
        swr.write_all(b"bye\n").await.unwrap();
        drop(swr);
        let mut got = Vec::new();
        crd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye\n");
    }

    #[test]
    fn peer_groups_are_the_connecting_process_own() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let groups = peer_groups_of(a.as_fd());
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            let mut own: Vec<u32> = rustix::process::getgroups()
                .unwrap()
                .into_iter()
                .map(|g| g.as_raw())
                .collect();
            let mut got = groups.expect("SO_PEERGROUPS works on Linux");
            own.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, own);
        }
    }
}
