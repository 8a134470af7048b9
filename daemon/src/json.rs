//! JSON values the daemon builds itself, shared by the wire codec, the session and the IPC
//! layer: a `null` means "no data" on the wire (a ping, an `on` without data) and in the
//! local protocol (a `send` without `data`) alike, so neither layer owns it.

use serde_json::value::RawValue;

/// The JSON `null`, for a frame, request or answer that carries no data.
pub fn null() -> Box<RawValue> {
    // A literal that is valid JSON by construction.
    RawValue::from_string("null".to_owned()).expect("null is valid JSON")
}

/// Wraps a string as a JSON string value.
pub fn string(s: &str) -> Box<RawValue> {
    serde_json::value::to_raw_value(s).expect("a string always serializes")
}
