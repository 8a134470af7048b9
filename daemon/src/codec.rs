//! The Quick.IO wire codecs: pure functions from text frames to [`Frame`]s and back.
//!
//! Two dialects exist (see WIRE.md): 0.2 frames `<path>:<cb>=<json>`, 0.1 frames
//! `<path>:<cb>:<type>=<data>` with `plain` or `json` data. Both decode to the same
//! [`Frame`] with JSON data, so nothing above this module knows which one is spoken.
//! Nothing here touches a socket, so every rule of the wire format is unit tested in
//! isolation, including hostile input.

use crate::json;
// The path rule is shared with the local protocol; its one copy is in that crate.
use qio_ipc::clean_path;
use serde_json::value::RawValue;
use thiserror::Error;

/// The text of the handshake frame, sent by the client and echoed by a 0.2 server.
pub const OHAI: &str = "/qio/ohai";

/// One Quick.IO event as it crosses the wire.
///
/// The data stays raw JSON text: the daemon forwards it without re-encoding, so an event
/// is parsed once (to validate it) and serialized never.
#[derive(Debug)]
pub struct Frame {
    /// The cleaned path, always starting with `/`.
    pub path: String,
    /// The callback id the sender asks for; 0 means no callback wanted.
    pub cb: u64,
    /// The payload, validated JSON.
    pub data: Box<RawValue>,
}

/// Why a frame from the server could not be decoded.
///
/// Each one is a protocol violation: the session closes the connection and reconnects.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame has no `:` between path and callback id.
    #[error("frame has no ':' after the path")]
    MissingColon,
    /// The frame has no `=` between callback id and data.
    #[error("frame has no '=' after the callback id")]
    MissingEquals,
    /// The callback id is not an unsigned 64-bit decimal number.
    #[error("callback id {0:?} is not an unsigned number")]
    BadCallbackId(String),
    /// The path is empty once cleaned.
    #[error("frame has an empty path")]
    EmptyPath,
    /// The data after `=` is not valid JSON.
    #[error("frame data is not valid JSON: {0}")]
    BadJson(String),
    /// A 0.1 frame's type is neither `plain` nor `json`.
    #[error("frame type {0:?} is neither plain nor json")]
    BadType(String),
}

/// The two wire dialects of Quick.IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// The 2014 release line: JSON data, `/qio/ohai` handshake, code envelopes.
    V02,
    /// The 2012-2013 line: typed `plain`/`json` data, no handshake, no codes.
    V01,
}

impl Dialect {
    /// The version as users write it.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::V02 => "0.2",
            Dialect::V01 => "0.1",
        }
    }

    /// Decodes one text frame.
    pub fn decode(self, text: &str) -> Result<Frame, DecodeError> {
        match self {
            Dialect::V02 => decode(text),
            Dialect::V01 => decode_v01(text),
        }
    }

    /// Encodes one frame; `path` must already be clean.
    ///
    /// In 0.1 a JSON string goes as `plain` with its text, `null` as an empty `plain` (what
    /// a 0.1 client sends when it has nothing to say), anything else as `json`.
    pub fn encode(self, path: &str, cb: u64, data: &RawValue) -> String {
        match self {
            Dialect::V02 => encode(path, cb, data),
            Dialect::V01 => {
                let text = data.get();
                let (kind, body) = if text == "null" {
                    ("plain", String::new())
                } else if let Ok(s) = serde_json::from_str::<String>(text) {
                    ("plain", s)
                } else {
                    ("json", text.to_owned())
                };
                format!("{path}:{cb}:{kind}={body}")
            }
        }
    }

    /// The frame that subscribes to `path`; `data` only exists in 0.2.
    pub fn subscribe(self, cb: u64, path: &str, data: Option<&RawValue>) -> String {
        match (self, data) {
            (Dialect::V02, None) => encode("/qio/on", cb, &json::string(path)),
            (Dialect::V02, Some(d)) => {
                format!("/qio/on:{cb}=[{},{}]", json::string(path).get(), d.get())
            }
            (Dialect::V01, _) => format!("/qio/sub:{cb}:plain={path}"),
        }
    }

    /// The frame that unsubscribes from `path`, asking for no callback.
    pub fn unsubscribe(self, path: &str) -> String {
        match self {
            Dialect::V02 => encode("/qio/off", 0, &json::string(path)),
            Dialect::V01 => format!("/qio/unsub:0:plain={path}"),
        }
    }
}

/// Decodes one `<path>:<cb>:<type>=<data>` text frame of the 0.1 dialect.
///
/// `plain` data becomes a JSON string, `json` data its JSON value.
fn decode_v01(text: &str) -> Result<Frame, DecodeError> {
    let (raw_path, rest) = split_at(text, b':').ok_or(DecodeError::MissingColon)?;
    let (cb, rest) = split_at(rest, b':').ok_or(DecodeError::MissingColon)?;
    let (kind, data) = split_at(rest, b'=').ok_or(DecodeError::MissingEquals)?;
    let cb = parse_cb(cb)?;
    let path = clean_path(raw_path);
    if path == "/" {
        return Err(DecodeError::EmptyPath);
    }
    let data = match kind {
        "plain" => json::string(data),
        "json" => raw_json(data)?,
        other => return Err(DecodeError::BadType(truncate(other))),
    };
    Ok(Frame { path, cb, data })
}

/// Validates JSON data and keeps it on one line.
///
/// Line breaks can only be whitespace between JSON tokens (inside strings they must be
/// escaped), so turning them into spaces keeps the value and lets every local client read
/// one event per line even when the server pretty-prints.
fn raw_json(data: &str) -> Result<Box<RawValue>, DecodeError> {
    let data = data.trim();
    // Line breaks are ASCII: memchr's word-at-a-time scan, not a loop over chars.
    let one_line = if memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_some() {
        data.replace(['\n', '\r'], " ")
    } else {
        data.to_owned()
    };
    RawValue::from_string(one_line).map_err(|e| DecodeError::BadJson(e.to_string()))
}

fn parse_cb(cb: &str) -> Result<u64, DecodeError> {
    // u64::from_str accepts a leading '+', which the wire format does not.
    if cb.is_empty() || !cb.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecodeError::BadCallbackId(truncate(cb)));
    }
    cb.parse::<u64>()
        .map_err(|_| DecodeError::BadCallbackId(truncate(cb)))
}

/// Decodes one `<path>:<cb>=<json>` text frame.
pub fn decode(text: &str) -> Result<Frame, DecodeError> {
    let (raw_path, rest) = split_at(text, b':').ok_or(DecodeError::MissingColon)?;
    let (cb, data) = split_at(rest, b'=').ok_or(DecodeError::MissingEquals)?;
    let cb = parse_cb(cb)?;
    let path = clean_path(raw_path);
    if path == "/" {
        return Err(DecodeError::EmptyPath);
    }
    let data = raw_json(data)?;
    Ok(Frame { path, cb, data })
}

/// `text` around its first `sep` (an ASCII byte, so both halves stay valid UTF-8).
fn split_at(text: &str, sep: u8) -> Option<(&str, &str)> {
    debug_assert!(sep.is_ascii());
    let i = memchr::memchr(sep, text.as_bytes())?;
    Some((&text[..i], &text[i + 1..]))
}

/// Encodes one frame; `path` must already be clean.
pub fn encode(path: &str, cb: u64, data: &RawValue) -> String {
    let data = data.get();
    let mut out = String::with_capacity(path.len() + data.len() + 24);
    out.push_str(path);
    out.push(':');
    out.push_str(&cb.to_string());
    out.push('=');
    out.push_str(data);
    out
}

/// Keeps error messages short when the server sends something huge.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_valid_frames() {
        let cases = [
            ("/qio/ping:1=null", "/qio/ping", 1, "null"),
            (
                "/app/login:7={\"session_id\":\"1234abcd\"}",
                "/app/login",
                7,
                "{\"session_id\":\"1234abcd\"}",
            ),
            (
                "/qio/callback/3:0={\"code\":404,\"data\":null,\"err_msg\":null}",
                "/qio/callback/3",
                0,
                "{\"code\":404,\"data\":null,\"err_msg\":null}",
            ),
            ("/a//b/:0=\"x:y=z\"", "/a/b", 0, "\"x:y=z\""),
            (
                "/big:18446744073709551615=1e400000",
                "/big",
                u64::MAX,
                "1e400000",
            ),
        ];
        for (text, path, cb, data) in cases {
            let f = decode(text).unwrap_or_else(|e| panic!("decode({text:?}): {e}"));
            assert_eq!(
                (f.path.as_str(), f.cb, f.data.get()),
                (path, cb, data),
                "{text}"
            );
        }
    }

    #[test]
    fn decode_rejects_hostile_input() {
        let cases: [(&str, DecodeError); 10] = [
            (
                "unicorns, ponies, princesses, and magic!:good times",
                DecodeError::MissingEquals,
            ),
            ("/qio/ohai", DecodeError::MissingColon),
            ("", DecodeError::MissingColon),
            ("/a:=null", DecodeError::BadCallbackId(String::new())),
            ("/a:+1=null", DecodeError::BadCallbackId("+1".into())),
            ("/a:-1=null", DecodeError::BadCallbackId("-1".into())),
            (
                "/a:18446744073709551616=null",
                DecodeError::BadCallbackId("18446744073709551616".into()),
            ),
            (":1=null", DecodeError::EmptyPath),
            ("@@@:1=null", DecodeError::EmptyPath),
            ("/a:1", DecodeError::MissingEquals),
        ];
        for (text, want) in cases {
            assert_eq!(decode(text).err(), Some(want), "decode({text:?})");
        }
        for text in ["/a:1=", "/a:1={", "/a:1=nul", "/a:1=[1,]", "/a:1=\"\u{0}\""] {
            assert!(
                matches!(decode(text), Err(DecodeError::BadJson(_))),
                "decode({text:?}) should be BadJson"
            );
        }
    }

    #[test]
    fn pretty_printed_data_stays_on_one_line() {
        for d in [Dialect::V02, Dialect::V01] {
            let text = match d {
                Dialect::V02 => "/a:0={\n  \"k\": \"v\\nw\",\r\n  \"n\": [1,\n2]\n}\n",
                Dialect::V01 => "/a:0:json={\n  \"k\": \"v\\nw\",\r\n  \"n\": [1,\n2]\n}\n",
            };
            let f = d.decode(text).unwrap();
            assert!(
                !f.data.get().contains(['\n', '\r']),
                "{d:?}: {}",
                f.data.get()
            );
            let v: serde_json::Value = serde_json::from_str(f.data.get()).unwrap();
            assert_eq!(v, serde_json::json!({"k": "v\nw", "n": [1, 2]}));
        }
    }

    #[test]
    fn encode_round_trips() {
        let data = RawValue::from_string("{\"a\":[1,2]}".into()).unwrap();
        let text = encode("/x/y", 42, &data);
        assert_eq!(text, "/x/y:42={\"a\":[1,2]}");
        let f = decode(&text).unwrap();
        assert_eq!(
            (f.path.as_str(), f.cb, f.data.get()),
            ("/x/y", 42, "{\"a\":[1,2]}")
        );
    }

    #[test]
    fn v01_decode_table() {
        let d = Dialect::V01;
        let cases = [
            (
                "/qio/callback/1:0:plain=test",
                "/qio/callback/1",
                0,
                "\"test\"",
            ),
            ("/qio/callback/4:0:plain=", "/qio/callback/4", 0, "\"\""),
            ("/qio/heartbeat:0:plain=", "/qio/heartbeat", 0, "\"\""),
            (
                "/qio/move:0:plain=ws://h:1/qio",
                "/qio/move",
                0,
                "\"ws://h:1/qio\"",
            ),
            ("/a/b:3:json={\"x\":[1]}", "/a/b", 3, "{\"x\":[1]}"),
            (
                "/a:0:plain=a \"quoted\" = : text",
                "/a",
                0,
                "\"a \\\"quoted\\\" = : text\"",
            ),
        ];
        for (text, path, cb, data) in cases {
            let f = d.decode(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (f.path.as_str(), f.cb, f.data.get()),
                (path, cb, data),
                "{text}"
            );
        }
        let bad: [(&str, DecodeError); 6] = [
            ("/a:1=null", DecodeError::MissingColon),
            ("/a", DecodeError::MissingColon),
            ("/a:1:plain", DecodeError::MissingEquals),
            ("/a:x:plain=1", DecodeError::BadCallbackId("x".into())),
            ("/a:1:xml=<a/>", DecodeError::BadType("xml".into())),
            (":1:plain=x", DecodeError::EmptyPath),
        ];
        for (text, want) in bad {
            assert_eq!(d.decode(text).err(), Some(want), "{text}");
        }
        assert!(matches!(
            d.decode("/a:1:json={"),
            Err(DecodeError::BadJson(_))
        ));
    }

    #[test]
    fn v01_encode_maps_json_to_types() {
        let d = Dialect::V01;
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        let cases = [
            ("\"test\"", "/qio/ping:1:plain=test"),
            ("null", "/qio/ping:1:plain="),
            ("\"a\\nb\"", "/qio/ping:1:plain=a\nb"),
            ("{\"a\":1}", "/qio/ping:1:json={\"a\":1}"),
            ("42", "/qio/ping:1:json=42"),
        ];
        for (data, want) in cases {
            assert_eq!(d.encode("/qio/ping", 1, &raw(data)), want, "{data}");
        }
        assert_eq!(d.subscribe(4, "/news", None), "/qio/sub:4:plain=/news");
        assert_eq!(d.unsubscribe("/news"), "/qio/unsub:0:plain=/news");
        assert_eq!(
            Dialect::V02.subscribe(4, "/news", Some(&raw("1"))),
            "/qio/on:4=[\"/news\",1]"
        );
        assert_eq!(Dialect::V02.unsubscribe("/news"), "/qio/off:0=\"/news\"");
        // What 0.1 encodes, 0.1 decodes back to the same JSON (strings and values).
        for data in ["\"x=y:z\"", "[1,2]", "{\"k\":\"v\"}"] {
            let f = d.decode(&d.encode("/p", 2, &raw(data))).unwrap();
            assert_eq!(f.data.get(), data);
        }
    }

    proptest::proptest! {
        #[test]
        fn v01_decode_never_panics(s in "\\PC*") {
            let _ = Dialect::V01.decode(&s);
        }

        #[test]
        fn decode_never_panics(s in "\\PC*") {
            let _ = decode(&s);
        }

        #[test]
        fn clean_path_is_idempotent(s in "\\PC*") {
            let once = clean_path(&s);
            proptest::prop_assert_eq!(clean_path(&once), once.clone());
        }

        #[test]
        fn encode_decode_round_trip(path in "(/[a-z0-9_-]{1,8}){1,4}", cb in proptest::num::u64::ANY, n in proptest::num::i64::ANY) {
            let data = RawValue::from_string(n.to_string()).unwrap();
            let f = decode(&encode(&path, cb, &data)).unwrap();
            proptest::prop_assert_eq!((f.path, f.cb, f.data.get().to_owned()), (path, cb, n.to_string()));
        }
    }
}
