//! The local socket: where it lives, binding it safely, and who may connect.
//!
//! Binding is careful because the socket is the daemon's only access control besides the
//! peer check: the folder is created private and checked without following symlinks, a
//! live daemon is never displaced, a stale socket left by a crash is replaced, nothing that
//! is not a socket is ever deleted, and a socket deleted or replaced while the daemon runs
//! is noticed ([`SocketGuard::check`]).

use qio_platform::trust::{self, Rules, TrustError};
use std::ffi::CStr;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the local socket could not be set up.
#[derive(Debug, Error)]
pub enum SocketError {
    /// A daemon answers on the path; replacing its socket would cut its clients off.
    #[error("another qiod is already listening on {}; stop it or pass --socket", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it may be someone's data.
    #[error("{} exists and is not a socket; refusing to replace it: remove it or pass --socket", .0.display())]
    NotASocket(PathBuf),
    /// The socket path names no file (it ends in `/` or `..`).
    #[error("{} does not name a file for the socket; pass --socket with a path like /tmp/qiod-<uid>/qiod.sock", .0.display())]
    NoFileName(PathBuf),
    /// The socket's folder (or one on the way to it) could let another user replace the
    /// socket: a symlink, another user's folder, or one writable by group or others.
    ///
    /// Its message includes the system's answer, which is therefore not also given as
    /// the error's source (a report of the chain would say it twice).
    #[error("{}", folder_message(.0))]
    Folder(TrustError),
    /// The folder was swapped while the socket was being bound.
    #[error("{} changed while the socket was bound in it; refusing to use it (is another user interfering?)", .0.display())]
    FolderChanged(PathBuf),
    /// A system call failed. The system's answer is part of the message, not a source.
    #[error("cannot {action} {}: {err}", .path.display())]
    Io {
        /// What we were doing, as a verb phrase ("create directory").
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's answer.
        err: io::Error,
    },
}

impl From<TrustError> for SocketError {
    fn from(e: TrustError) -> Self {
        SocketError::Folder(e)
    }
}

/// A folder that failed a check is refused; one that could not even be made or read is
/// just that failure.
fn folder_message(e: &TrustError) -> String {
    match e {
        TrustError::Io { .. } => e.to_string(),
        _ => format!("refusing to put the socket in that folder: {e}"),
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |err| SocketError::Io {
        action,
        path: path.to_owned(),
        err,
    }
}

pub use qio_platform::paths::{default_socket_path, socket_path_from};

/// Binds a listening socket at `path` that only our user (and root) can reach, creating its
/// folder (mode 0700) when missing.
///
/// An existing socket file is probed first: if a daemon answers, this refuses rather than
/// steal the path; if nobody does (a crash left it behind), it is replaced. A file that is
/// not a socket is never removed. An existing folder keeps its mode. The listener is
/// blocking; tokio callers set it non-blocking themselves. See [`bind_with`] for the
/// folder rules.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_with(path, &BindOptions::default())
}

/// Like [`bind`], but reachable by other users, for when `allowed_groups` lets some in.
///
/// Group members cannot connect through a 0600 socket in a 0700 folder, and one file group
/// cannot stand for several allowed groups, so the socket is made 0666 and a created
/// folder 0711 (enterable, not listable); [`peer_verdict`] is then what keeps others out.
pub fn bind_shared(path: &Path) -> Result<UnixListener, SocketError> {
    bind_with(
        path,
        &BindOptions {
            shared: true,
            ..BindOptions::default()
        },
    )
}

/// How [`bind_with`] sets up the socket.
#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// Reachable by other users (socket 0666, created folder 0711), for `allowed_groups`.
    pub shared: bool,
    /// Folders the service manager created for us (systemd's `$RUNTIME_DIRECTORY`): their
    /// owner and mode are its business, so they are not checked.
    pub service_dirs: Vec<PathBuf>,
}

impl BindOptions {
    /// The options for this process: `shared` as given, the service folders from
    /// `$RUNTIME_DIRECTORY` (colon-separated, as systemd sets it).
    pub fn from_env(shared: bool) -> BindOptions {
        let service_dirs = std::env::var_os("RUNTIME_DIRECTORY")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| p.is_absolute())
                    .collect()
            })
            .unwrap_or_default();
        BindOptions {
            shared,
            service_dirs,
        }
    }
}

/// Binds the socket at `path` so that no other user can stand in for it.
///
/// The folder is walked from `/` without following symlinks ([`qio_platform::trust`]): every
/// level must belong to us or root and not be writable by group or others (sticky levels
/// above, like `/tmp`, are fine); the socket's own folder must not be a symlink and must
/// not be writable by group or others even when sticky, unless it is one of
/// `service_dirs`. Missing levels are created (0700, or 0711 when shared). The socket is
/// bound inside the opened folder (through `/proc/self/fd`), so a rename or symlink swap
/// after the check cannot move it elsewhere, and the path is walked again afterwards to
/// make sure clients reach the same folder.
pub fn bind_with(path: &Path, opts: &BindOptions) -> Result<UnixListener, SocketError> {
    let (dir_mode, sock_mode) = if opts.shared {
        (0o711, 0o666)
    } else {
        (0o700, 0o600)
    };
    let name = match path.file_name() {
        Some(name) if !path.as_os_str().as_bytes().ends_with(b"/") => name,
        _ => return Err(SocketError::NoFileName(path.to_owned())),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let rules = Rules {
        trusted: vec![trust::own_uid()],
        create_mode: Some(dir_mode),
        service_dir: opts.service_dirs.iter().any(|d| d == dir),
        unresolved: None,
    };
    let folder = trust::open_folder(dir, &rules)?;
    // Everything below goes through the folder's descriptor, not the path.
    let inner = folder.inner_path(name);
    let reach = inner.as_deref().unwrap_or(path);
    match trust::entry_id(&folder, name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
        Ok((_, _, false)) => return Err(SocketError::NotASocket(path.to_owned())),
        Ok((_, _, true)) => match UnixStream::connect(reach) {
            Ok(_) => return Err(SocketError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale socket");
                match rustix::fs::unlinkat(&folder.fd, name, rustix::fs::AtFlags::empty()) {
                    Err(e) if e != rustix::io::Errno::NOENT => {
                        return Err(io_err("remove stale socket", path)(e.into()))
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(io_err("probe existing socket", path)(e)),
        },
    }
    let listener = UnixListener::bind(reach).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            // Someone bound it between our probe and our bind.
            SocketError::InUse(path.to_owned())
        } else {
            io_err("bind", path)(e)
        }
    })?;
    rustix::fs::chmodat(
        &folder.fd,
        name,
        rustix::fs::Mode::from_raw_mode(sock_mode as _),
        rustix::fs::AtFlags::empty(),
    )
    .map_err(|e| io_err("set permissions of", path)(e.into()))?;
    // The path must still lead to the folder we bound in, or clients would not find us
    // (or would find someone else).
    let again = trust::open_folder(
        dir,
        &Rules {
            create_mode: None,
            ..rules
        },
    );
    if again.map(|f| f.id).ok() != Some(folder.id) {
        let _ = rustix::fs::unlinkat(&folder.fd, name, rustix::fs::AtFlags::empty());
        return Err(SocketError::FolderChanged(dir.to_owned()));
    }
    Ok(listener)
}

/// Removes the socket file the daemon bound when dropped, so clients see "no daemon"
/// (connection refused or not found) rather than a stale file.
///
/// It remembers which file it was: if another process has since put its own socket at
/// the path, that one is left alone. Sockets passed by systemd get no guard; systemd owns
/// those files.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketGuard {
    /// Takes charge of the socket file just created by [`bind`] at `path`.
    pub fn new(path: &Path) -> SocketGuard {
        SocketGuard {
            path: path.to_owned(),
            identity: identity(path),
        }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`SocketGuard::check`] as a function another thread can run.
    pub fn checker(&self) -> std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync> {
        // Not a second guard: dropping that would remove the socket.
        let (path, then) = (self.path.clone(), self.identity);
        std::sync::Arc::new(move || check_identity(&path, then))
    }

    /// Whether the path still leads to the socket we bound (same device and inode); else
    /// what happened to it. Clients can no longer reach a daemon whose socket was deleted,
    /// and a second daemon could bind the path and open a second upstream connection.
    pub fn check(&self) -> Result<(), String> {
        check_identity(&self.path, self.identity)
    }
}

fn check_identity(path: &Path, then: Option<(u64, u64)>) -> Result<(), String> {
    match (identity(path), then) {
        (now, then) if now == then => Ok(()),
        (None, _) => Err(format!(
            "the socket {} was deleted; clients can no longer reach this qiod",
            path.display()
        )),
        (Some(_), _) => Err(format!(
            "the socket {} was replaced by another file; clients now reach that one, not this qiod",
            path.display()
        )),
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type()
        .is_socket()
        .then(|| (meta.dev(), meta.ino()))
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if self.identity.is_some() && identity(&self.path) == self.identity {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove socket: {e}");
            }
        }
    }
}

/// The first socket passed by systemd socket activation, if we were started that way.
///
/// Follows `sd_listen_fds`: the fds are ours only when `LISTEN_PID` is our pid, they start
/// at 3, and the variables are removed so children do not take them too. Call it before
/// starting threads: removing environment variables races with threads reading them.
pub fn from_systemd() -> Option<UnixListener> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    let count = listen_fds(pid.as_deref(), fds.as_deref(), std::process::id())?;
    if count > 1 {
        tracing::warn!("systemd passed {count} sockets; using the first one only");
    }
    const FD: libc::c_int = 3;
    if let Err(why) = check_listening_unix(FD) {
        tracing::warn!("ignoring the socket systemd passed (fd 3): {why}");
        return None;
    }
    // systemd passes the fds without close-on-exec.
    // SAFETY: fcntl on an fd number is always safe to call; errors are reported.
    unsafe {
        let flags = libc::fcntl(FD, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(FD, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
    // SAFETY: systemd handed fd 3 to this process alone (LISTEN_PID matched) and we just
    // removed the variables, so no second call can wrap it again.
    Some(unsafe { UnixListener::from_raw_fd(FD) })
}

/// How many fds systemd passed to `own_pid`, per the `LISTEN_*` variables.
fn listen_fds(pid: Option<&str>, fds: Option<&str>, own_pid: u32) -> Option<u32> {
    let pid: u32 = pid?.trim().parse().ok()?;
    let fds: u32 = fds?.trim().parse().ok()?;
    (pid == own_pid && fds >= 1).then_some(fds)
}

fn check_listening_unix(fd: libc::c_int) -> Result<(), String> {
    // SAFETY: the out-pointers point at properly sized locals; the calls only fail.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, (&raw mut addr).cast(), &mut len) != 0 {
            return Err(format!("not a socket: {}", io::Error::last_os_error()));
        }
        if libc::c_int::from(addr.ss_family) != libc::AF_UNIX {
            return Err("not a Unix socket".into());
        }
        let mut listening: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        ) != 0
        {
            return Err(format!("getsockopt: {}", io::Error::last_os_error()));
        }
        if listening == 0 {
            return Err("not listening (use ListenStream= with Accept=no)".into());
        }
    }
    Ok(())
}

/// What the peer check needs to decide on a connecting process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerVerdict {
    /// It may use the daemon.
    Allowed,
    /// It may not.
    Refused,
    /// Its own groups are unknown (no `SO_PEERGROUPS` here): ask the group database.
    AskDatabase,
}

/// Decides whether a connecting process may use the daemon.
///
/// The daemon speaks upstream with one identity, so anyone who can connect acts as the
/// daemon's user: by default only that user and root may; `allowed_gids` widens it to
/// processes holding one of those groups, as primary group or among `peer_groups`, the
/// supplementary groups the process really has (`SO_PEERGROUPS`), whatever the group
/// database says. Only when those are unknown is the database asked
/// ([`PeerVerdict::AskDatabase`], then [`peer_allowed_by_database`]).
pub fn peer_verdict(
    peer_uid: u32,
    peer_gid: u32,
    peer_groups: Option<&[u32]>,
    own_uid: u32,
    allowed_gids: &[u32],
) -> PeerVerdict {
    if peer_uid == own_uid || peer_uid == 0 || allowed_gids.contains(&peer_gid) {
        return PeerVerdict::Allowed;
    }
    if allowed_gids.is_empty() {
        return PeerVerdict::Refused;
    }
    match peer_groups {
        Some(groups) if groups.iter().any(|g| allowed_gids.contains(g)) => PeerVerdict::Allowed,
        Some(_) => PeerVerdict::Refused,
        None => PeerVerdict::AskDatabase,
    }
}

/// The fallback of [`peer_verdict`]: whether the group database lists the user `uid`
/// (primary group `gid`) in one of `allowed_gids`. A failed lookup denies. Blocking (NSS
/// may ask the network): call it off the async threads.
pub fn peer_allowed_by_database(uid: u32, gid: u32, allowed_gids: &[u32]) -> bool {
    user_groups(uid, gid).is_some_and(|groups| groups.iter().any(|g| allowed_gids.contains(g)))
}

/// Why a refused peer was refused, for the log.
pub fn refusal_reason(
    peer_uid: u32,
    peer_pid: Option<i32>,
    own_uid: u32,
    allowed_gids: &[u32],
) -> String {
    let who = match peer_pid {
        Some(pid) => format!("uid {peer_uid} (pid {pid})"),
        None => format!("uid {peer_uid}"),
    };
    if allowed_gids.is_empty() {
        format!("{who} is not the daemon's user (uid {own_uid}); set allowed_groups to let other users in")
    } else {
        format!("{who} is not the daemon's user (uid {own_uid}) and holds none of allowed_groups")
    }
}

/// The supplementary groups of the process at the other end of `fd` (`SO_PEERGROUPS`,
/// Linux 4.13+), as they were when it connected; `None` where the kernel cannot tell.
pub fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> Option<Vec<u32>> {
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
            // SAFETY: the buffer has room for `len` bytes; the kernel writes at most that
            // and reports what it wrote (or needs, with ERANGE) in `len`.
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

/// All groups of the user `uid` (primary `gid` included), or `None` if unknown.
fn user_groups(uid: u32, gid: u32) -> Option<Vec<u32>> {
    let name = user_name(uid)?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..8 {
        let mut n = libc::c_int::try_from(groups.len()).ok()?;
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many
        // and reports the real count in `n`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).ok()?;
        if rc >= 0 {
            groups.truncate(n);
            return Some(groups);
        }
        groups.resize(n.max(groups.len() * 2), 0);
    }
    None
}

fn user_name(uid: u32) -> Option<std::ffi::CString> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: zeroed passwd is a valid out-value (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local of the right size.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
        return Some(unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn bind_creates_private_folder_and_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/qiod.sock");
        let listener = bind(&path).unwrap();
        assert_eq!(mode(&tmp.path().join("a/b")), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket());
        // It really listens.
        UnixStream::connect(&path).unwrap();
        // Bound through the opened folder, not by walking the path again.
        if cfg!(target_os = "linux") {
            let addr = listener.local_addr().unwrap();
            let bound = addr.as_pathname().unwrap();
            assert!(bound.starts_with("/proc/self/fd/"), "{bound:?}");
        }
        drop(listener);
    }

    #[test]
    fn bind_shared_opens_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/qiod.sock");
        let _l = bind_shared(&path).unwrap();
        assert_eq!(mode(&tmp.path().join("d")), 0o711);
        assert_eq!(mode(&path), 0o666);
    }

    #[test]
    fn bind_leaves_existing_folder_mode() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let _l = bind(&tmp.path().join("s.sock")).unwrap();
        assert_eq!(mode(tmp.path()), 0o750);
    }

    #[test]
    fn bind_refuses_a_live_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qiod.sock");
        let _live = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
        assert!(err.to_string().contains("already listening"), "{err}");
        // The live one still works.
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn bind_replaces_a_stale_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qiod.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file");
        let _l = bind(&path).unwrap();
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn bind_refuses_a_regular_file_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qiod.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn bind_refuses_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "x").unwrap();
        let path = tmp.path().join("qiod.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket(_))));
        assert!(target.exists());
    }

    #[test]
    fn bind_refuses_a_file_as_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = bind(&file.join("qiod.sock")).unwrap_err();
        assert!(
            matches!(err, SocketError::Folder(TrustError::NotADirectory { .. })),
            "{err}"
        );
    }

    #[test]
    fn bind_refuses_a_symlinked_folder_and_binds_nothing_behind_it() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("qiod-1000");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = bind(&link.join("qiod.sock")).unwrap_err();
        assert!(
            matches!(err, SocketError::Folder(TrustError::Symlink { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(!real.join("qiod.sock").exists());
    }

    #[test]
    fn bind_refuses_a_shared_folder_unless_the_service_manager_made_it() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o1777, 0o777, 0o770] {
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let err = bind(&tmp.path().join("qiod.sock")).unwrap_err();
            assert!(
                matches!(err, SocketError::Folder(TrustError::Writable { .. })),
                "{mode:o}: {err}"
            );
        }
        let opts = BindOptions {
            shared: false,
            service_dirs: vec![tmp.path().to_owned()],
        };
        let _l = bind_with(&tmp.path().join("qiod.sock"), &opts).unwrap();
        assert_eq!(mode(&tmp.path().join("qiod.sock")), 0o600);
    }

    #[test]
    fn bind_refuses_a_path_without_a_file_name() {
        let err = bind(Path::new("/tmp/")).unwrap_err();
        assert!(matches!(err, SocketError::NoFileName(_)), "{err}");
    }

    #[test]
    fn guard_notices_a_deleted_or_replaced_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qiod.sock");
        let _l = bind(&path).unwrap();
        let guard = SocketGuard::new(&path);
        assert_eq!(guard.check(), Ok(()));
        std::fs::rename(&path, tmp.path().join("aside.sock")).unwrap();
        let err = guard.check().unwrap_err();
        assert!(err.contains("was deleted"), "{err}");
        let _other = UnixListener::bind(&path).unwrap();
        let err = guard.check().unwrap_err();
        assert!(err.contains("was replaced"), "{err}");
    }

    #[test]
    fn guard_removes_only_its_own_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qiod.sock");
        let l = bind(&path).unwrap();
        drop(SocketGuard::new(&path));
        assert!(!path.exists());
        drop(l);

        // A guard whose file was replaced by someone else's leaves the new one alone.
        let l = bind(&path).unwrap();
        let guard = SocketGuard::new(&path);
        drop(l);
        // Moved aside rather than removed, so the new file cannot reuse the inode.
        std::fs::rename(&path, tmp.path().join("old.sock")).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        drop(guard);
        assert!(path.exists());
    }

    #[test]
    fn listen_fds_rules() {
        assert_eq!(listen_fds(Some("42"), Some("1"), 42), Some(1));
        assert_eq!(listen_fds(Some("42"), Some("2"), 42), Some(2));
        assert_eq!(listen_fds(Some("41"), Some("1"), 42), None);
        assert_eq!(listen_fds(Some("42"), Some("0"), 42), None);
        assert_eq!(listen_fds(None, Some("1"), 42), None);
        assert_eq!(listen_fds(Some("x"), Some("1"), 42), None);
    }

    #[test]
    fn peer_rules() {
        use PeerVerdict::*;
        assert_eq!(peer_verdict(1000, 1000, None, 1000, &[]), Allowed);
        assert_eq!(peer_verdict(0, 0, None, 1000, &[]), Allowed);
        assert_eq!(peer_verdict(1001, 50, None, 1000, &[50]), Allowed);
        // No allowed groups: no lookup, refused.
        assert_eq!(peer_verdict(1001, 1001, Some(&[50]), 1000, &[]), Refused);
        assert_eq!(peer_verdict(1001, 1001, None, 1000, &[]), Refused);
        // The process's own supplementary groups decide when known.
        assert_eq!(
            peer_verdict(1001, 1001, Some(&[50, 60]), 1000, &[60]),
            Allowed
        );
        assert_eq!(
            peer_verdict(1001, 1001, Some(&[50, 60]), 1000, &[70]),
            Refused
        );
        assert_eq!(peer_verdict(1001, 1001, Some(&[]), 1000, &[70]), Refused);
        // Else the database.
        assert_eq!(peer_verdict(1001, 1001, None, 1000, &[70]), AskDatabase);
        assert!(!peer_allowed_by_database(u32::MAX - 7, 0, &[0]));
        assert!(peer_allowed_by_database(0, 0, &[0]));
        let why = refusal_reason(1001, Some(7), 1000, &[]);
        assert!(
            why.contains("uid 1001 (pid 7)") && why.contains("set allowed_groups"),
            "{why}"
        );
    }

    #[test]
    fn peer_groups_are_the_connecting_process_own() {
        let (a, _b) = UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let groups = peer_groups(a.as_fd());
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

    #[test]
    fn group_lookup_of_root() {
        // Every system has root in passwd with primary group 0.
        let groups = user_groups(0, 0).expect("root has a passwd entry");
        assert!(groups.contains(&0), "{groups:?}");
        assert_eq!(user_groups(u32::MAX - 7, 0), None);
    }
}
