//! qiod: one persistent Quick.IO connection, shared by every local process.
//!
//! The layers, from the wire up: [`codec`] (pure frame encoding), [`session`] (the pure
//! protocol state machine), [`driver`] (the tokio task that owns the WebSocket).
#![deny(missing_docs)]

pub mod codec;
pub mod driver;
pub mod session;
