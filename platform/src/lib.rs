//! Everything qiod and its clients ask of the operating system, one module per system,
//! as opposed to the protocol they speak (`qio-ipc`, serde only).
//!
//! The same names on every system, so the daemon and the clients above them name no
//! system type:
//!
//! - [`local`]: the local socket as interprocess's tokio types (a Unix socket; a named
//!   pipe on Windows), connecting, and who is at the other end;
//! - [`paths`]: where the daemon's socket is, computed the same way on both sides.
//!
//! Unix only, for now (Windows has no counterpart yet, see `windows`):
//!
//! - [`bind`]: binding the socket file safely, and noticing when it goes;
//! - [`trust`]: how each side checks the socket's folder and the process at the other end;
//! - [`users`]: our ids, and the user and group databases;
//! - [`activation`]: the socket passed by systemd;
//! - [`process`]: the open-file limit, file locks, standard output, signals.
//!
//! Only Linux is built and tested; the Windows module is a sketch that has never been
//! built for Windows (README, "Platforms").
#![deny(missing_docs)]

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::{activation, bind, local, paths, process, trust, users};

// Its code is OS-neutral interprocess and tokio API, so the Unix tests compile it too:
// the closest to a Windows build that this machine can do.
#[cfg(any(windows, all(test, unix)))]
#[cfg_attr(not(windows), allow(dead_code, unused_imports))]
mod windows;
#[cfg(windows)]
pub use windows::{local, paths};
