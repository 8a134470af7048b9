//! The local socket's policy: who may connect. The socket itself (binding it, the file's
//! guard, socket activation, the stream types) is the platform's ([`qio_platform`]).

pub use qio_platform::bind::{bind, bind_shared, bind_with, BindOptions, SocketError, SocketGuard};
pub use qio_platform::paths::{default_socket_path, socket_path_from};

/// What [`crate::run`] can serve on: interprocess's local-socket listener, or a std or
/// tokio Unix listener (tests and embedders bind those), converted to it.
pub trait IntoListener {
    /// The listener, registered with the current tokio runtime.
    fn into_listener(self) -> std::io::Result<qio_platform::local::Listener>;
}

impl IntoListener for qio_platform::local::Listener {
    fn into_listener(self) -> std::io::Result<qio_platform::local::Listener> {
        Ok(self)
    }
}

impl IntoListener for std::os::unix::net::UnixListener {
    fn into_listener(self) -> std::io::Result<qio_platform::local::Listener> {
        qio_platform::local::listener_from_std(self)
    }
}

impl IntoListener for tokio::net::UnixListener {
    fn into_listener(self) -> std::io::Result<qio_platform::local::Listener> {
        qio_platform::local::listener_from_std(self.into_std()?)
    }
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

/// The fallback of [`peer_verdict`]: whether the group database lists the user `uid`
/// (primary group `gid`) in one of `allowed_gids`. A failed lookup denies. Blocking (NSS
/// may ask the network): call it off the async threads.
pub fn peer_allowed_by_database(uid: u32, gid: u32, allowed_gids: &[u32]) -> bool {
    qio_platform::users::user_groups(uid, gid)
        .is_some_and(|groups| groups.iter().any(|g| allowed_gids.contains(g)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
