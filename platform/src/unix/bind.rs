//! The daemon's socket file: binding it safely, and noticing when it goes.
//!
//! Binding is careful because the socket is the daemon's only access control besides the
//! peer check: the folder is created private and checked without following symlinks, a
//! live daemon is never displaced, a stale socket left by a crash is replaced, nothing that
//! is not a socket is ever deleted, and a socket deleted or replaced while the daemon runs
//! is noticed ([`SocketGuard::check`]).

//! interprocess cannot express this (it binds by path; there is no binding through an
//! opened folder, no probe of a stale socket, no mode), so the socket is made here as a
//! std listener and converted into interprocess's by [`crate::local::listener_from_std`].

use crate::trust::{self, Rules, TrustError};
use std::io;
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
/// folder 0711 (enterable, not listable); the daemon's peer check is then what keeps others out.
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
/// The folder is walked from `/` without following symlinks ([`crate::trust`]): every
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

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
}
