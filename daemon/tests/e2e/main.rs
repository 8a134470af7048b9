//! The `qiod` binary's tests, one test binary for the crate (the stack is linked once, not
//! once per file). Each module is a topic; `common` holds what they share, among it the one
//! helper that starts a qiod process. Run one topic with its module path as the filter:
//! `cargo test -p qiod --test e2e systemd::`.

mod common;

mod binary;
mod protocol_doc;
mod security;
mod systemd;
