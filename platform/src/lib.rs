//! What qiod and its clients share about the machine they run on, as opposed to the
//! protocol they speak (`qio-ipc`, serde only): where the daemon's socket is ([`paths`]),
//! computed the same way on both sides, and how each side checks the socket's folder and
//! the process at the other end ([`trust`], Unix only).
//!
//! Operating-system calls live here and in the daemon's own socket and peer modules, so a
//! port to another system (Windows named pipes) starts in these files.
#![deny(missing_docs)]

#[cfg(unix)]
pub mod paths;
#[cfg(unix)]
pub mod trust;
