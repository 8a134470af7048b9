//! Checks shared by the codec targets: what a decoded frame must look like, and what a
//! decode of an encoded frame must give back in each dialect.
#![allow(dead_code)]

use qio_ipc::clean_path;
use qiod::codec::{Dialect, Frame};
use serde_json::value::RawValue;

/// Whatever the input, a decoded frame has a clean, non-empty path and one-line JSON data.
pub fn check_frame(f: &Frame) {
    assert!(
        f.path.starts_with('/') && f.path != "/",
        "path {:?}",
        f.path
    );
    assert_eq!(clean_path(&f.path), f.path, "path is clean");
    let text = f.data.get();
    assert!(!text.contains(['\n', '\r']), "data on one line: {text:?}");
    serde_json::from_str::<&RawValue>(text).expect("data is valid JSON");
}

/// An error message stays short whatever the server sent (it ends up in logs and status).
pub fn check_error(e: &dyn std::fmt::Display) {
    let msg = e.to_string();
    assert!(msg.len() < 512, "error message of {} bytes", msg.len());
}

/// The data a decode gives for data `text` that was sent as JSON: trimmed, line breaks
/// turned into spaces.
pub fn one_line(text: &str) -> String {
    text.trim().replace(['\n', '\r'], " ")
}

/// What a 0.1 round trip gives back for JSON data: `null` goes as an empty `plain` (so it
/// comes back as `""`), a string as `plain` (canonical escaping), anything else as `json`.
pub fn v01_expected(text: &str) -> String {
    if text.trim() == "null" {
        "\"\"".to_owned()
    } else if let Ok(s) = serde_json::from_str::<String>(text) {
        serde_json::to_string(&s).expect("a string serializes")
    } else {
        one_line(text)
    }
}

/// decode(encode(path, cb, data)) in `dialect` gives the same path and cb, and the data as
/// the dialect's rules say.
pub fn check_round_trip(dialect: Dialect, path: &str, cb: u64, data: &RawValue) {
    let text = dialect.encode(path, cb, data);
    let f = dialect
        .decode(&text)
        .unwrap_or_else(|e| panic!("{dialect:?}: {text:?} does not decode: {e}"));
    check_frame(&f);
    assert_eq!((f.path.as_str(), f.cb), (path, cb), "{dialect:?}: {text:?}");
    let want = match dialect {
        Dialect::V02 => one_line(data.get()),
        Dialect::V01 => v01_expected(data.get()),
    };
    assert_eq!(f.data.get(), want, "{dialect:?}: {text:?}");
}
