//! Users and groups: our own ids, and the user and group databases.
//!
//! The databases are read through the C library (nix), not from `/etc/passwd`, so NSS
//! (LDAP, systemd's dynamic users) answers as it does for every other program. Lookups
//! may block on the network: callers on async threads use `spawn_blocking`.

use nix::unistd::{Gid, Group, Uid, User};
use std::ffi::CString;
use std::io;

/// The real uid of this process.
pub fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The effective uid of this process (the one the kernel reports to peers).
pub fn own_euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether a lookup error only means "no such entry": several C libraries report a
/// missing user or group as one of these rather than as an empty answer.
fn means_missing(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::ENOENT | Errno::ESRCH | Errno::EBADF | Errno::EPERM
    )
}

/// The uid of the user `name`, `None` when there is none or it cannot be looked up.
pub fn uid_of(name: &str) -> Option<u32> {
    User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

/// The gid of the group `name`: `Ok(None)` when there is no such group, an error when the
/// database could not be read.
pub fn gid_of(name: &str) -> io::Result<Option<u32>> {
    if name.contains('\0') {
        return Ok(None);
    }
    match Group::from_name(name) {
        Ok(group) => Ok(group.map(|g| g.gid.as_raw())),
        Err(e) if means_missing(e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The name of the user `uid`, `None` when unknown.
pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// All groups of the user `uid` (primary `gid` included) per the group database, or
/// `None` if unknown.
pub fn user_groups(uid: u32, gid: u32) -> Option<Vec<u32>> {
    let name = CString::new(user_name(uid)?).ok()?;
    let groups = nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).ok()?;
    Some(groups.into_iter().map(Gid::as_raw).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_every_database() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(gid_of("root").unwrap(), Some(0));
        assert_eq!(uid_of("no-such-user-qiod"), None);
        assert_eq!(gid_of("no-such-group-qiod").unwrap(), None);
        assert_eq!(gid_of("a\0b").unwrap(), None);
    }

    #[test]
    fn group_lookup_of_root() {
        // Every system has root in passwd with primary group 0.
        let groups = user_groups(0, 0).expect("root has a passwd entry");
        assert!(groups.contains(&0), "{groups:?}");
        assert_eq!(user_groups(u32::MAX - 7, 0), None);
    }
}
