//! The end-to-end tests, one test binary for the whole crate (linking the daemon, the test
//! server and their dependencies once rather than once per file). Each module is a topic;
//! `common` holds the fixtures they share. Run one topic with its module path as the
//! filter: `cargo test -p qio-testserver --test e2e chaos::`.

mod common;

mod bridge;
mod chaos;
mod delivery;
mod dialects;
mod driver;
mod examples;
mod hostile;
mod limits;
mod longpoll;
mod real_server;
mod session;
mod slow_client;
mod subscriptions;
mod testserver_binary;
mod tls;
