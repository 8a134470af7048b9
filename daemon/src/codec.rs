//! The Quick.IO 0.2 wire codec: pure functions from text frames to [`Frame`]s and back.
//!
//! Nothing here touches a socket, so every rule of the wire format is unit tested in
//! isolation, including hostile input.

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
}

/// Cleans a path the way both ends of a Quick.IO connection do.
///
/// Keeps only `A-Z a-z 0-9 _ - /`, collapses repeated `/`, drops a trailing `/` and makes
/// sure the path starts with `/`. An input with nothing left gives `/`.
pub fn clean_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    out.push('/');
    for c in raw.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' => out.push(c),
            '/' if !out.ends_with('/') => out.push('/'),
            _ => {}
        }
    }
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// Decodes one `<path>:<cb>=<json>` text frame.
pub fn decode(text: &str) -> Result<Frame, DecodeError> {
    let (raw_path, rest) = text.split_once(':').ok_or(DecodeError::MissingColon)?;
    let (cb, data) = rest.split_once('=').ok_or(DecodeError::MissingEquals)?;
    // u64::from_str accepts a leading '+', which the wire format does not.
    if cb.is_empty() || !cb.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecodeError::BadCallbackId(truncate(cb)));
    }
    let cb = cb
        .parse::<u64>()
        .map_err(|_| DecodeError::BadCallbackId(truncate(cb)))?;
    let path = clean_path(raw_path);
    if path == "/" {
        return Err(DecodeError::EmptyPath);
    }
    let data = RawValue::from_string(data.trim().to_owned())
        .map_err(|e| DecodeError::BadJson(e.to_string()))?;
    Ok(Frame { path, cb, data })
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

/// The JSON `null`, used where a frame carries no data.
pub fn null() -> Box<RawValue> {
    // A literal that is valid JSON by construction.
    RawValue::from_string("null".to_owned()).expect("null is valid JSON")
}

/// Wraps a string as a JSON string value.
pub fn json_string(s: &str) -> Box<RawValue> {
    serde_json::value::to_raw_value(s).expect("a string always serializes")
}

/// Keeps error messages short when the server sends something huge.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_table() {
        let cases = [
            ("/app/user/new", "/app/user/new"),
            ("/app/@user/(new)>>>>", "/app/user/new"),
            ("//a//b/", "/a/b"),
            ("a/b", "/a/b"),
            ("", "/"),
            ("///", "/"),
            ("/qio/callback/12", "/qio/callback/12"),
            ("/ünï/çödé", "/n/d"),
            ("/with space/and-dash_1", "/withspace/and-dash_1"),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_path(raw), want, "clean_path({raw:?})");
        }
    }

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

    proptest::proptest! {
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
