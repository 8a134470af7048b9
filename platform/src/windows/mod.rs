//! Windows: a sketch that has never been built for Windows (no Windows target can be
//! fetched for this toolchain here; README, "Platforms"). Its code is OS-neutral
//! interprocess and tokio API, so the Unix tests compile and run it (over a Unix socket).
//!
//! The daemon and the clients also need, on Windows, what the Unix module's `bind`,
//! `trust`, `users`, `activation` and `process` do; none exists yet, so neither builds
//! there. What is here is the part that decides the wire: the pipe's name, and
//! interprocess's named-pipe listener and streams under the same names as on Unix.

pub mod local;
pub mod paths;

/// The error for what has no Windows implementation yet.
pub fn unsupported(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("{what} is not supported on Windows yet"),
    )
}
