//! Whom to trust on this machine: the folder a socket lives in, and the process behind it.
//!
//! The daemon and its clients must agree that nobody else can stand in for them. The
//! daemon's own peer check keeps others from using it; this module is the other direction
//! and the ground both stand on:
//!
//! - **The socket's folder** ([`open_folder`]): every directory on the way is walked with
//!   `openat(O_NOFOLLOW)` from `/`, never by following a path twice. Each must be owned by
//!   a trusted uid (ours, root, or a configured daemon user) and must not be writable by
//!   group or others unless it is sticky (`/tmp`: others can add entries but not rename
//!   ours). A symlink on the way is followed only when a trusted uid owns it, and its
//!   target is walked the same way. The last folder, the one the socket is in, must not be
//!   a symlink and must not be writable by group or others even when sticky: a socket
//!   directly in `/tmp` can be taken by anyone while its daemon restarts.
//! - **The process behind a connected socket** ([`check_peer`]): `SO_PEERCRED`, read by
//!   the caller, must be a trusted uid.
//!
//! Unix only (Linux first: `O_PATH` keeps folders that may be entered but not listed,
//! like the daemon's 0711 one, walkable).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

/// The variable naming the user the daemon runs as, for clients of a daemon that is not
/// their own (the system service's dynamic user `qiod`): a user name or a numeric uid.
pub const DAEMON_USER_ENV: &str = "QIOD_DAEMON_USER";

/// Symlinks followed in one walk before giving up (as the kernel's `ELOOP` limit).
const MAX_SYMLINKS: usize = 40;

/// Why a socket, its folder or the process behind it is not trusted.
#[derive(Debug)]
#[non_exhaustive]
pub enum TrustError {
    /// The socket's folder is a symlink, which its owner could point elsewhere later.
    Symlink {
        /// The symlink.
        path: PathBuf,
    },
    /// A folder (or a symlink on the way) belongs to a user who is not trusted.
    Owner {
        /// The folder or symlink.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The uids that would have been trusted.
        expected: Vec<u32>,
        /// A configured daemon user that names no user now.
        unresolved: Option<String>,
    },
    /// A folder is writable by group or others, who could replace the socket.
    Writable {
        /// The folder.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Whether it is the socket's own folder (where even sticky is not enough).
        last: bool,
    },
    /// Something on the way is not a directory.
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// More than 40 symlinks on the way.
    TooManySymlinks {
        /// The path being walked.
        path: PathBuf,
    },
    /// The process listening on the socket runs as a user who is not trusted.
    Peer {
        /// The socket.
        path: PathBuf,
        /// The listening process's uid.
        uid: u32,
        /// Its pid, when known.
        pid: Option<i32>,
        /// The uids that would have been trusted.
        expected: Vec<u32>,
        /// A configured daemon user that names no user now.
        unresolved: Option<String>,
    },
    /// A system call failed.
    Io {
        /// What we were doing, as a verb phrase ("inspect").
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's answer.
        source: io::Error,
    },
}

/// "uid 1000 or root", for messages.
fn describe(uids: &[u32], unresolved: &Option<String>) -> String {
    let mut named: Vec<String> = uids
        .iter()
        .filter(|&&u| u != 0)
        .map(|u| format!("uid {u}"))
        .collect();
    if uids.contains(&0) {
        named.push("root".into());
    }
    let mut text = named.join(" or ");
    if let Some(name) = unresolved {
        text.push_str(&format!(
            " ({DAEMON_USER_ENV}={name} names no user now; a systemd dynamic user exists \
             only while its service runs)"
        ));
    }
    text
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Symlink { path } => write!(
                f,
                "the socket's folder {} is a symlink, which could be pointed elsewhere; \
                 use the real folder",
                path.display()
            ),
            TrustError::Owner {
                path,
                owner,
                expected,
                unresolved,
            } => write!(
                f,
                "{} belongs to uid {owner}, expected {}: another user could replace the \
                 socket; remove it or use a socket in a folder of your own",
                path.display(),
                describe(expected, unresolved)
            ),
            TrustError::Writable { path, mode, last } => write!(
                f,
                "{} is writable by {} (mode {mode:04o}){}; use a private folder \
                 (e.g. /tmp/qiod-<uid>/, created 0700)",
                path.display(),
                if mode & 0o002 != 0 {
                    "others"
                } else {
                    "its group"
                },
                if *last {
                    ", so another user could take the socket's path"
                } else {
                    ", so another user could replace what is in it"
                }
            ),
            TrustError::NotADirectory { path } => {
                write!(f, "{} is not a directory", path.display())
            }
            TrustError::TooManySymlinks { path } => {
                write!(f, "too many symlinks on the way to {}", path.display())
            }
            TrustError::Peer {
                path,
                uid,
                pid,
                expected,
                unresolved,
            } => {
                write!(
                    f,
                    "the process listening on {} runs as uid {uid}",
                    path.display()
                )?;
                if let Some(pid) = pid {
                    write!(f, " (pid {pid})")?;
                }
                write!(
                    f,
                    ", expected {}: it is not your qiod; if it is a system daemon you \
                     mean to use, set {DAEMON_USER_ENV} to its user",
                    describe(expected, unresolved)
                )
            }
            TrustError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for TrustError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrustError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl TrustError {
    /// Whether the error only says the folder is not there (no daemon, not an attack).
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// How [`open_folder`] treats the walk.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// The uids whose folders are trusted, besides root (always trusted).
    pub trusted: Vec<u32>,
    /// Create missing folders with this mode (owned by us, so our uid must be trusted).
    pub create_mode: Option<u32>,
    /// The last folder was made for us by the service manager (systemd's
    /// `RuntimeDirectory`): its owner and mode are not checked, only that it is a real
    /// folder.
    pub service_dir: bool,
    /// A daemon user was named but names no user now (a systemd dynamic user exists only
    /// while its service runs): nothing extra is trusted, and refusals say why.
    pub unresolved: Option<String>,
}

impl Rules {
    /// Trust only our own uid (the real one) and root.
    pub fn own() -> Rules {
        Rules {
            trusted: vec![own_uid()],
            ..Rules::default()
        }
    }

    /// Every trusted uid, root included, for messages.
    pub fn expected(&self) -> Vec<u32> {
        let mut all = self.trusted.clone();
        if !all.contains(&0) {
            all.push(0);
        }
        all
    }

    fn trusts(&self, uid: u32) -> bool {
        uid == 0 || self.trusted.contains(&uid)
    }
}

/// The real uid of this process.
pub fn own_uid() -> u32 {
    crate::users::own_uid()
}

/// An opened, checked folder: the socket goes (or is) in it.
#[derive(Debug)]
pub struct Folder {
    /// The folder as a file descriptor (`O_PATH` on Linux): `*at` calls on it cannot be
    /// redirected by a rename or symlink swap after the check.
    pub fd: OwnedFd,
    /// The path it was reached by.
    pub path: PathBuf,
    /// Its device and inode, to tell later whether the path still leads to it.
    pub id: (u64, u64),
    /// Whether this walk created it.
    pub created: bool,
}

impl Folder {
    /// A path that reaches `name` inside this very folder, whatever happens to the path
    /// it was opened by (`/proc/self/fd/N/name` on Linux when `/proc` is mounted).
    pub fn inner_path(&self, name: &OsStr) -> Option<PathBuf> {
        use std::os::fd::AsRawFd;
        let proc = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        // A Unix socket path must fit sun_path (108 bytes with its NUL).
        let full = proc.join(name);
        (cfg!(target_os = "linux") && full.as_os_str().len() < 100 && proc.is_dir()).then_some(full)
    }
}

#[cfg(target_os = "linux")]
const WALK_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
#[cfg(not(target_os = "linux"))]
const WALK_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

#[allow(clippy::useless_conversion)]
fn ident(st: &Stat) -> (u64, u64) {
    (u64::from(st.st_dev), u64::from(st.st_ino))
}

// RawMode is u32 on Linux, u16 on some BSDs.
#[allow(clippy::unnecessary_cast)]
fn mode_bits(st: &Stat) -> u32 {
    Mode::from_raw_mode(st.st_mode).bits() as u32 & 0o7777
}

/// Opens the folder `dir` by walking it from `/` without following any symlink that a
/// trusted uid does not own, and checks it per the module's rules.
///
/// A relative `dir` is taken from the current directory; an empty one is the current
/// directory. A missing folder is created (each missing level with `create_mode`) when
/// the rules say so, else the error [`TrustError::is_not_found`].
pub fn open_folder(dir: &Path, rules: &Rules) -> Result<Folder, TrustError> {
    let full = if dir.is_absolute() {
        dir.to_owned()
    } else {
        let cwd = std::env::current_dir().map_err(|source| TrustError::Io {
            action: "find the current directory for",
            path: dir.to_owned(),
            source,
        })?;
        cwd.join(dir)
    };
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |e: rustix::io::Errno| TrustError::Io {
            action,
            path,
            source: e.into(),
        }
    };
    let root =
        rustix::fs::open("/", WALK_FLAGS, Mode::empty()).map_err(io_err("open", Path::new("/")))?;
    // The stack of folders walked so far, for "..": (fd, path, stat).
    let root_st = rustix::fs::fstat(&root).map_err(io_err("inspect", Path::new("/")))?;
    let mut todo: Vec<OsString> = components(&full);
    todo.reverse();
    check_level(Path::new("/"), &root_st, todo.is_empty(), rules)?;
    let mut stack: Vec<(OwnedFd, PathBuf, Stat)> = vec![(root, PathBuf::from("/"), root_st)];
    let mut links = 0usize;
    let mut created = false;
    while let Some(name) = todo.pop() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let last = todo.is_empty();
        let (cur, cur_path, _) = stack.last().expect("the root is never popped");
        let path = cur_path.join(&name);
        let st = match rustix::fs::statat(cur, &*name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(rustix::io::Errno::NOENT) if rules.create_mode.is_some() => None,
            Err(e) => return Err(io_err("inspect", &path)(e)),
        };
        let st = match st {
            Some(st) => st,
            None => {
                let mode = rules.create_mode.unwrap_or(0o700);
                match rustix::fs::mkdirat(cur, &*name, Mode::from_raw_mode(mode as _)) {
                    Ok(()) => created = last,
                    // Someone made it meanwhile: it is checked below like any other.
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err("create directory", &path)(e)),
                }
                rustix::fs::statat(cur, &*name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_err("inspect", &path))?
            }
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink if last => return Err(TrustError::Symlink { path }),
            FileType::Symlink => {
                if !rules.trusts(st.st_uid) {
                    return Err(TrustError::Owner {
                        path,
                        owner: st.st_uid,
                        expected: rules.expected(),
                        unresolved: rules.unresolved.clone(),
                    });
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(TrustError::TooManySymlinks { path: full });
                }
                let target = rustix::fs::readlinkat(cur, &*name, Vec::new())
                    .map_err(io_err("read symlink", &path))?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.truncate(1);
                }
                let mut more = components(&target);
                more.reverse();
                todo.extend(more);
                continue;
            }
            FileType::Directory => {}
            _ => return Err(TrustError::NotADirectory { path }),
        }
        let fd = rustix::fs::openat(cur, &*name, WALK_FLAGS, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                // Swapped for a symlink since the look above.
                TrustError::Symlink { path: path.clone() }
            } else {
                io_err("open", &path)(e)
            }
        })?;
        let st = rustix::fs::fstat(&fd).map_err(io_err("inspect", &path))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(TrustError::NotADirectory { path });
        }
        check_level(&path, &st, last, rules)?;
        stack.push((fd, path, st));
    }
    let (fd, path, st) = stack.pop().expect("the root is never popped");
    if created {
        // The umask may have taken bits away; make the mode exact.
        if let (Some(mode), Some((parent, _, _))) = (rules.create_mode, stack.last()) {
            let name = path.file_name().unwrap_or_default();
            rustix::fs::chmodat(
                parent,
                name,
                Mode::from_raw_mode(mode as _),
                AtFlags::empty(),
            )
            .map_err(io_err("set permissions of", &path))?;
        }
    }
    Ok(Folder {
        fd,
        path,
        id: ident(&st),
        created,
    })
}

/// Checks one folder of the walk; `last` is the socket's own folder.
fn check_level(path: &Path, st: &Stat, last: bool, rules: &Rules) -> Result<(), TrustError> {
    if last && rules.service_dir {
        return Ok(());
    }
    if !rules.trusts(st.st_uid) {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            owner: st.st_uid,
            expected: rules.expected(),
            unresolved: rules.unresolved.clone(),
        });
    }
    let mode = mode_bits(st);
    let shared = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if shared && (last || !sticky) {
        return Err(TrustError::Writable {
            path: path.to_owned(),
            mode,
            last,
        });
    }
    Ok(())
}

/// The names to walk in `path`, `..` kept (resolved against the walk, not the path).
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Checks the process behind the connected socket at `path`, by its `SO_PEERCRED` uid:
/// it must be root or one of `rules.trusted`.
pub fn check_peer(
    path: &Path,
    uid: u32,
    pid: Option<i32>,
    rules: &Rules,
) -> Result<(), TrustError> {
    if rules.trusts(uid) {
        Ok(())
    } else {
        Err(TrustError::Peer {
            path: path.to_owned(),
            uid,
            pid,
            expected: rules.expected(),
            unresolved: rules.unresolved.clone(),
        })
    }
}

/// The rules a client applies to its daemon: our own uid and root, plus the user named by
/// `daemon_user` or, when that is `None`, by [`DAEMON_USER_ENV`] (a name or a uid).
///
/// A name that names no user now adds nothing (and refusals say so) rather than failing:
/// the system service's dynamic user `qiod` exists only while the service runs, and the
/// first client of a socket-activated service must reach systemd's socket before it does.
pub fn client_rules(daemon_user: Option<&str>) -> Rules {
    let mut rules = Rules::own();
    let from_env = std::env::var(DAEMON_USER_ENV).ok();
    let named = daemon_user
        .or(from_env.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(name) = named {
        match name.parse::<u32>().ok().or_else(|| uid_of(name)) {
            Some(uid) if !rules.trusted.contains(&uid) => rules.trusted.push(uid),
            Some(_) => {}
            None => rules.unresolved = Some(name.to_owned()),
        }
    }
    rules
}

/// The uid of the user `name`, from the user database.
pub fn uid_of(name: &str) -> Option<u32> {
    crate::users::uid_of(name)
}

/// Opens (creating, 0600) `name` in `folder` for reading and writing, never through a
/// symlink, and only if what it opened is a regular file of ours with no other link: a
/// planted symlink or hard link to someone's file is refused, not truncated. The error
/// is a message naming `shown`.
pub fn open_private(folder: &Folder, name: &Path, shown: &Path) -> Result<File, String> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd =
        rustix::fs::openat(&folder.fd, name, flags, Mode::from_raw_mode(0o600)).map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                format!(
                    "{} is a symlink; refusing to open it: remove it",
                    shown.display()
                )
            } else {
                format!("cannot open {}: {}", shown.display(), io::Error::from(e))
            }
        })?;
    let st =
        rustix::fs::fstat(&fd).map_err(|e| format!("cannot inspect {}: {e}", shown.display()))?;
    let own = own_uid();
    let regular = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;
    if !regular || st.st_uid != own || st.st_nlink != 1 {
        return Err(format!(
            "{} is not a plain file of ours (owner uid {}, {} links{}); refusing to use it: \
             remove it",
            shown.display(),
            st.st_uid,
            st.st_nlink,
            if regular { "" } else { ", not a regular file" }
        ));
    }
    Ok(File::from(fd))
}

/// Empties a file [`open_private`] returned and makes it 0600, whatever the umask left.
pub fn empty_private(file: &File, shown: &Path) -> Result<(), String> {
    rustix::fs::ftruncate(file, 0).map_err(|e| format!("cannot empty {}: {e}", shown.display()))?;
    rustix::fs::fchmod(file, Mode::from_raw_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", shown.display()))
}

/// The device and inode of `name` in `folder`, not following a symlink.
pub fn entry_id(folder: &Folder, name: &OsStr) -> io::Result<(u64, u64, bool)> {
    let st = rustix::fs::statat(folder.fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)?;
    let (dev, ino) = ident(&st);
    Ok((
        dev,
        ino,
        FileType::from_raw_mode(st.st_mode) == FileType::Socket,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn own() -> Rules {
        Rules::own()
    }

    #[test]
    fn a_private_folder_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let f = open_folder(tmp.path(), &own()).unwrap();
        assert_eq!(f.path, tmp.path());
        assert!(!f.created);
    }

    #[test]
    fn missing_folders_are_created_with_the_mode_or_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let err = open_folder(&dir, &own()).unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let rules = Rules {
            create_mode: Some(0o711),
            ..own()
        };
        let f = open_folder(&dir, &rules).unwrap();
        assert!(f.created);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o711);
    }

    #[test]
    fn the_socket_folder_must_not_be_a_symlink_nor_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = open_folder(&link, &own()).unwrap_err();
        assert!(matches!(err, TrustError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("link is a symlink"), "{err}");
        // A trusted symlink higher up is followed.
        std::fs::create_dir(real.join("in")).unwrap();
        let f = open_folder(&link.join("in"), &own()).unwrap();
        assert_eq!(f.path, real.join("in"));

        chmod(&real, 0o1777);
        let err = open_folder(&real, &own()).unwrap_err();
        assert!(
            matches!(err, TrustError::Writable { last: true, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("writable by others (mode 1777)"),
            "{err}"
        );
        // Sticky is fine higher up, as /tmp is.
        open_folder(&real.join("in"), &own()).unwrap();
        chmod(&real, 0o777);
        let err = open_folder(&real.join("in"), &own()).unwrap_err();
        assert!(
            matches!(err, TrustError::Writable { last: false, .. }),
            "{err}"
        );
        chmod(&real, 0o770);
        let err = open_folder(&real, &own()).unwrap_err();
        assert!(err.to_string().contains("writable by its group"), "{err}");
        // Unless the service manager made it for us.
        let service = Rules {
            service_dir: true,
            ..own()
        };
        open_folder(&real, &service).unwrap();
    }

    #[test]
    fn a_file_is_not_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = open_folder(&file, &own()).unwrap_err();
        assert!(matches!(err, TrustError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn dot_dot_and_relative_paths_walk_like_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        let f = open_folder(&tmp.path().join("a/b/../b"), &own()).unwrap();
        assert_eq!(f.path, tmp.path().join("a/b"));
    }

    #[test]
    fn messages_name_owner_and_expectation() {
        let e = TrustError::Owner {
            path: "/tmp/qiod-1000".into(),
            owner: 1001,
            expected: vec![1000, 0],
            unresolved: None,
        };
        assert_eq!(
            e.to_string(),
            "/tmp/qiod-1000 belongs to uid 1001, expected uid 1000 or root: another user could \
             replace the socket; remove it or use a socket in a folder of your own"
        );
        let e = TrustError::Peer {
            path: "/s".into(),
            uid: 7,
            pid: Some(9),
            expected: vec![1000, 0],
            unresolved: None,
        };
        assert!(
            e.to_string().starts_with(
                "the process listening on /s runs as uid 7 (pid 9), expected uid 1000 or root"
            ),
            "{e}"
        );
        let rules = Rules::own();
        assert!(check_peer(Path::new("/s"), 0, None, &rules).is_ok());
        assert!(check_peer(Path::new("/s"), own_uid(), None, &rules).is_ok());
    }

    #[test]
    fn a_daemon_user_by_name_or_number() {
        let r = client_rules(Some("4242"));
        assert!(r.trusted.contains(&4242));
        let r = client_rules(Some("root"));
        assert_eq!(r.expected().iter().filter(|&&u| u == 0).count(), 1);
        let r = client_rules(Some("no-such-user-qiod"));
        assert_eq!(r.trusted, [own_uid()]);
        let err = check_peer(Path::new("/s"), 4242, None, &r).unwrap_err();
        assert!(
            err.to_string()
                .contains("(QIOD_DAEMON_USER=no-such-user-qiod names no user now;"),
            "{err}"
        );
    }
}
