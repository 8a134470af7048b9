//! `qio_testserver`: a Quick.IO WebSocket server for testing clients (qiod in particular).
//!
//! It speaks the 0.2 wire dialect (`<path>:<cb>=<json>`, `quickio` subprotocol, `/qio/ohai`
//! greeting) by default, as the real 0.2.1 server was observed to speak it (HTTP/1.0 400
//! and 426 refusals, whatever arrives with `/qio/ohai` thrown away, server callback ids
//! `(slot << 16) | counter` over four slots with a 15 s expiry, close frames with the real
//! codes or none, FIN ignored, 200 for a repeated `on`), or the 2012 dialect 0.1 (`<path>:<cb>:<plain|json>=<data>`, no
//! greeting, case-sensitive HTTP header check, bare TCP drops) with
//! `ServerConfig { dialect: Dialect::V01, .. }`. It runs the server-side conformance app
//! (`/clienttest/*`), and exposes a control API
//! ([`TestServer`]) so end-to-end tests can break the server on purpose (kill, restart on the
//! same port, stall, refuse subscriptions, drop callbacks) and assert on everything clients
//! sent ([`TestServer::received`], [`TestServer::log`]). With [`ServerConfig::tls`] it serves
//! `wss://` (either dialect) with the given certificate; its URL then names `localhost`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use qio_testserver::{ServerConfig, TestServer};
//! use std::time::Duration;
//!
//! let server = TestServer::start(ServerConfig {
//!     heartbeat_interval: Duration::from_millis(50),
//!     ..ServerConfig::default()
//! })
//! .await?;
//! // ... point a client at server.url() ...
//! assert!(server.wait_until(Duration::from_secs(5), |s| s.connection_count() == 1).await);
//! # Ok(()) }
//! ```
//!
//! Layout: [`codec`] is the pure wire codec (everything dialect-specific is behind
//! [`Dialect`]); `ws` is the 0.2 server's own WebSocket framing; `handshake` holds both
//! dialects' HTTP upgrade checks and answers; `conn`
//! runs one connection; `app` is the conformance app; `server` holds the shared state and the
//! control API; [`demo`] is the `qiod-demo` binary's server (a counter and questions).

#![deny(missing_docs)]

mod app;
pub mod codec;
mod conn;
pub mod demo;
mod handshake;
mod longpoll;
pub mod proxy;
mod server;
mod ws;

pub use codec::{clean_path, Dialect, Frame, ParseError, Reply};

/// Logs to stderr for the crate's binaries: `RUST_LOG`, else `info`; colour codes only for
/// a person watching, not in a log file or a pipe.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
pub use server::{
    CallbackKind, CloseReason, LogEntry, Received, ServerConfig, TestServer, TlsIdentity,
};

#[cfg(test)]
mod wire_tests;
#[cfg(test)]
mod wire_tests_v01;
