//! The client library's and the `qio` CLI's tests against a real daemon and test server,
//! one test binary for the crate (the stack is linked once, not once per file). Each module
//! is a topic; `common` holds the fixtures they share. Run one topic with its module path
//! as the filter: `cargo test -p qio-client --test e2e attacks::`.

mod common;

mod attacks;
mod autostart;
mod cli;
mod client;
mod reconnect;
