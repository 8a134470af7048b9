//! Unix (Linux first): a Unix socket, `SO_PEERCRED`, the user database, signals.

pub mod activation;
pub mod bind;
pub mod local;
pub mod paths;
pub mod process;
pub mod trust;
pub mod users;
