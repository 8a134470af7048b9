//! The local socket on Windows: interprocess's named pipes under the Unix module's names.

use interprocess::local_socket::tokio::{Listener as IpListener, Stream as IpStream};
use interprocess::local_socket::traits::tokio::{Listener as _, Stream as _};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use std::io;
use std::path::Path;

/// The daemon's listening pipe.
pub type Listener = IpListener;
/// One connection.
pub type Stream = IpStream;
/// The reading half of a [`Stream`] after [`split`].
pub type ReadHalf = tokio::io::ReadHalf<Stream>;
/// The writing half of a [`Stream`] after [`split`].
pub type WriteHalf = tokio::io::WriteHalf<Stream>;

/// Creates the pipe `path` (`\\.\pipe\...`).
pub fn listen(path: &Path) -> io::Result<Listener> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    ListenerOptions::new().name(name).create_tokio()
}

/// Accepts the next connection.
pub async fn accept(listener: &Listener) -> io::Result<Stream> {
    listener.accept().await
}

/// Connects to the pipe `path`.
pub async fn connect(path: &Path) -> io::Result<Stream> {
    Stream::connect(path.to_fs_name::<GenericFilePath>()?).await
}

/// Splits a stream. A pipe has no half-close: a client that is done disconnects.
pub fn split(stream: Stream) -> (ReadHalf, WriteHalf) {
    tokio::io::split(stream)
}

/// The process at the other end: not known on Windows yet.
pub fn peer(_stream: &Stream) -> io::Result<Peer> {
    Err(super::unsupported(
        "checking who is at the other end of a pipe",
    ))
}

/// The process at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its pid, when known.
    pub pid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // On Windows a pipe; where the Unix tests compile this module, the same calls make a
    // Unix socket, which at least runs the code.
    #[tokio::test]
    async fn listen_accept_connect_and_talk() {
        let tmp = tempfile::tempdir().unwrap();
        let path = if cfg!(windows) {
            std::path::PathBuf::from(format!(r"\\.\pipe\qiod-test-{}", std::process::id()))
        } else {
            tmp.path().join("s.sock")
        };
        let listener = listen(&path).unwrap();
        let (server, client) = tokio::join!(accept(&listener), connect(&path));
        let (mut srd, _swr) = split(server.unwrap());
        let (_crd, mut cwr) = split(client.unwrap());
        cwr.write_all(b"hi\n").await.unwrap();
        let mut got = [0u8; 3];
        srd.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi\n");
    }
}
