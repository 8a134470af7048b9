//! The Quick.IO wire codec: frame parsing and encoding, callback answers, path cleaning.
//!
//! This module is pure (no I/O, no state) so it can be unit tested exhaustively and reused by
//! raw test clients. Everything that differs between the Quick.IO wire dialects (frame syntax,
//! handshake strings, callback envelope, subscribe event names) lives behind [`Dialect`], so the
//! connection handler stays dialect-agnostic and the 2012 dialect (0.1) can be added later as a
//! new variant without touching the rest of the server.

use serde_json::Value;
use std::fmt;

/// Cleans a Quick.IO path the way both sides of the wire do.
///
/// Keeps only `A-Z a-z 0-9 _ - /`, collapses repeated `/`, drops a trailing `/` and makes sure
/// the path starts with `/`. `/app/@user/(new)>>>>` and `/app/user/new` are the same event, so
/// the server must compare cleaned paths only. The result is never empty (at least `/`).
pub fn clean_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    out.push('/');
    for c in raw.chars() {
        match c {
            '/' if out.ends_with('/') => {}
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' | '/' => out.push(c),
            _ => {}
        }
    }
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// One decoded Quick.IO event as received from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The cleaned path (see [`clean_path`]); this is what the server routes on.
    pub path: String,
    /// The path exactly as it appeared on the wire, so tests can check what a client really
    /// sent (e.g. that it cleans paths itself).
    pub raw_path: String,
    /// The callback id the sender asked for; 0 means "no callback wanted".
    pub cb: u64,
    /// The event's data (JSON; `null` when empty).
    pub data: Value,
}

/// Why a text frame is not a valid Quick.IO event. The 0.2 server closes the connection on any
/// of these, so the test server does the same and records the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No `:` separating the path from the callback id.
    MissingColon,
    /// No `=` separating the callback id from the data.
    MissingEquals,
    /// The path before `:` is empty.
    EmptyPath,
    /// The callback id is not an unsigned decimal integer that fits in a `u64`.
    BadCallbackId(String),
    /// The data after `=` is not valid JSON (the error text from the JSON parser).
    BadJson(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::MissingColon => f.write_str("missing ':' after the path"),
            ParseError::MissingEquals => f.write_str("missing '=' after the callback id"),
            ParseError::EmptyPath => f.write_str("empty path"),
            ParseError::BadCallbackId(id) => write!(f, "bad callback id {id:?}"),
            ParseError::BadJson(e) => write!(f, "invalid JSON data: {e}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// A callback answer from the server, before the dialect encodes it.
///
/// Keeping the answer semantic (code, data, message) rather than pre-formatted lets each
/// dialect encode it its own way (0.2 uses a JSON envelope; 0.1 had only `qio_error`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The status code: 200 ok, 202 pending, 400, 401, 404, 420, 500, or anything a test asks for.
    pub code: i64,
    /// The payload handed to the client's callback.
    pub data: Value,
    /// The error message; `None` on a non-200 code is encoded as `"err_msg":null`.
    pub err_msg: Option<String>,
}

impl Reply {
    /// A successful (200) answer carrying `data`.
    pub fn ok(data: Value) -> Reply {
        Reply {
            code: 200,
            data,
            err_msg: None,
        }
    }

    /// An error answer with `data: null` and the given message.
    pub fn error(code: i64, err_msg: impl Into<String>) -> Reply {
        Reply {
            code,
            data: Value::Null,
            err_msg: Some(err_msg.into()),
        }
    }
}

/// The event path prefix for callbacks: a callback is delivered as an event on
/// `/qio/callback/<id>` in every dialect.
pub const CALLBACK_PREFIX: &str = "/qio/callback/";

/// Returns the callback id if `path` (cleaned) is `/qio/callback/<id>`.
pub fn callback_id(path: &str) -> Option<u64> {
    let id = path.strip_prefix(CALLBACK_PREFIX)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// A Quick.IO wire dialect. Only 0.2 exists for now; 0.1 will be added as another variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// The final (2014) line: `<path>:<cb>=<json>`, `quickio` subprotocol, `/qio/ohai`
    /// greeting, `{"code":..,"data":..}` callback envelope, `/qio/on` and `/qio/off`.
    #[default]
    V02,
}

impl Dialect {
    /// The `Sec-WebSocket-Protocol` value the server echoes when a client requests it.
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Dialect::V02 => Some("quickio"),
        }
    }

    /// The text frame a client must send first, and that the server answers with the same
    /// text; `None` if the dialect has no application-level greeting.
    pub fn greeting(self) -> Option<&'static str> {
        match self {
            Dialect::V02 => Some("/qio/ohai"),
        }
    }

    /// The event path a client uses to subscribe.
    pub fn subscribe_event(self) -> &'static str {
        match self {
            Dialect::V02 => "/qio/on",
        }
    }

    /// The event path a client uses to unsubscribe.
    pub fn unsubscribe_event(self) -> &'static str {
        match self {
            Dialect::V02 => "/qio/off",
        }
    }

    /// Parses one text frame into an event. Never panics, whatever the input.
    pub fn parse(self, text: &str) -> Result<Frame, ParseError> {
        match self {
            Dialect::V02 => parse_v02(text),
        }
    }

    /// Encodes an event; `cb > 0` asks the peer for a callback.
    pub fn encode(self, path: &str, cb: u64, data: &Value) -> String {
        match self {
            Dialect::V02 => format!("{path}:{cb}={data}"),
        }
    }

    /// Encodes the answer to the peer's callback request `id`; `server_cb > 0` asks the peer
    /// to answer this answer in turn (a callback chain).
    pub fn encode_reply(self, id: u64, server_cb: u64, reply: &Reply) -> String {
        match self {
            Dialect::V02 => {
                let mut env = format!("{{\"code\":{},\"data\":{}", reply.code, reply.data);
                match &reply.err_msg {
                    Some(msg) => {
                        env.push_str(",\"err_msg\":");
                        env.push_str(&Value::String(msg.clone()).to_string());
                    }
                    None if reply.code != 200 => env.push_str(",\"err_msg\":null"),
                    None => {}
                }
                env.push('}');
                format!("{CALLBACK_PREFIX}{id}:{server_cb}={env}")
            }
        }
    }

    /// Extracts the cleaned path and optional subscription data from a subscribe event's data
    /// (`"/path"` or `["/path", <json>]`); `None` if the data has neither shape.
    pub fn parse_subscription(self, data: &Value) -> Option<(String, Option<Value>)> {
        match self {
            Dialect::V02 => match data {
                Value::String(p) => Some((clean_path(p), None)),
                Value::Array(items) if (1..=2).contains(&items.len()) => match &items[0] {
                    Value::String(p) => Some((clean_path(p), items.get(1).cloned())),
                    _ => None,
                },
                _ => None,
            },
        }
    }

    /// Extracts the cleaned path from an unsubscribe event's data (`"/path"`).
    pub fn parse_unsubscription(self, data: &Value) -> Option<String> {
        match self {
            Dialect::V02 => match data {
                Value::String(p) => Some(clean_path(p)),
                _ => None,
            },
        }
    }
}

/// `<path>:<cb>=<json>`: the path ends at the first `:`, the callback id at the first `=`
/// after it, and the rest must be one complete JSON value.
fn parse_v02(text: &str) -> Result<Frame, ParseError> {
    let (raw_path, rest) = text.split_once(':').ok_or(ParseError::MissingColon)?;
    let (cb, json) = rest.split_once('=').ok_or(ParseError::MissingEquals)?;
    if raw_path.is_empty() {
        return Err(ParseError::EmptyPath);
    }
    if cb.is_empty() || !cb.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadCallbackId(snippet(cb, 32)));
    }
    let cb: u64 = cb
        .parse()
        .map_err(|_| ParseError::BadCallbackId(snippet(cb, 32)))?;
    let data: Value = serde_json::from_str(json).map_err(|e| ParseError::BadJson(e.to_string()))?;
    Ok(Frame {
        path: clean_path(raw_path),
        raw_path: raw_path.to_owned(),
        cb,
        data,
    })
}

/// The first `max` characters of `s` (char-boundary safe), for logging hostile input without
/// storing megabytes of it.
pub(crate) fn snippet(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_cleaning_table() {
        let cases = [
            ("/app/user/new", "/app/user/new"),
            ("/app/@user/(new)>>>>", "/app/user/new"),
            ("//a//b/", "/a/b"),
            ("a/b", "/a/b"),
            ("", "/"),
            ("/", "/"),
            ("////", "/"),
            ("@#$%", "/"),
            ("/a/@/b", "/a/b"),
            ("/A-z_09/x", "/A-z_09/x"),
            ("/ünï/cödé", "/n/cd"),
            ("/with space/and\ttab\n", "/withspace/andtab"),
            ("/qio/callback/12", "/qio/callback/12"),
            ("/a:b=c", "/abc"),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_path(raw), want, "clean_path({raw:?})");
            // Cleaning is idempotent: a cleaned path is its own cleaning.
            assert_eq!(clean_path(want), want, "idempotent on {want:?}");
        }
    }

    #[test]
    fn parse_valid_frames() {
        let d = Dialect::V02;
        let cases: Vec<(&str, &str, &str, u64, Value)> = vec![
            ("/qio/ping:1=null", "/qio/ping", "/qio/ping", 1, json!(null)),
            (
                "/app/login:7={\"session_id\":\"1234abcd\"}",
                "/app/login",
                "/app/login",
                7,
                json!({"session_id": "1234abcd"}),
            ),
            (
                "/qio/on:3=[\"/a\",123987]",
                "/qio/on",
                "/qio/on",
                3,
                json!(["/a", 123987]),
            ),
            (
                "/app/@user/(new)>>>>:0=\"x:y=z\"",
                "/app/user/new",
                "/app/@user/(new)>>>>",
                0,
                json!("x:y=z"),
            ),
            ("/a:18446744073709551615=1", "/a", "/a", u64::MAX, json!(1)),
            ("/a:0= [1, 2] ", "/a", "/a", 0, json!([1, 2])),
            ("/a:00012=true", "/a", "/a", 12, json!(true)),
            ("@@:1=null", "/", "@@", 1, json!(null)),
        ];
        for (text, path, raw, cb, data) in cases {
            let f = d.parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(f.path, path, "{text:?}");
            assert_eq!(f.raw_path, raw, "{text:?}");
            assert_eq!(f.cb, cb, "{text:?}");
            assert_eq!(f.data, data, "{text:?}");
        }
    }

    #[test]
    fn parse_rejects_hostile_input() {
        let d = Dialect::V02;
        let deep = format!("/a:1={}{}", "[".repeat(10_000), "]".repeat(10_000));
        let long_cb = format!("/a:{}=null", "9".repeat(1000));
        let cases: Vec<(&str, ParseError)> = vec![
            ("", ParseError::MissingColon),
            ("/qio/ohai", ParseError::MissingColon),
            (
                "unicorns, ponies, princesses, and magic!:good times",
                ParseError::MissingEquals,
            ),
            ("/a:1", ParseError::MissingEquals),
            (":1=null", ParseError::EmptyPath),
            ("/a:=null", ParseError::BadCallbackId(String::new())),
            ("/a:-1=null", ParseError::BadCallbackId("-1".into())),
            ("/a:+1=null", ParseError::BadCallbackId("+1".into())),
            ("/a: 1=null", ParseError::BadCallbackId(" 1".into())),
            ("/a:1x=null", ParseError::BadCallbackId("1x".into())),
            (
                "/a:18446744073709551616=null",
                ParseError::BadCallbackId("18446744073709551616".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(d.parse(text), Err(want), "{text:?}");
        }
        for text in [
            "/a:1=",
            "/a:1=nul",
            "/a:1={\"a\":1",
            "/a:1=null null",
            "/a:1=undefined",
            "/a:1='x'",
            deep.as_str(),
        ] {
            assert!(
                matches!(d.parse(text), Err(ParseError::BadJson(_))),
                "{text:?}"
            );
        }
        assert!(matches!(
            d.parse(&long_cb),
            Err(ParseError::BadCallbackId(s)) if s.len() < 40
        ));
    }

    #[test]
    fn encode_roundtrip() {
        let d = Dialect::V02;
        for (path, cb, data) in [
            ("/qio/heartbeat", 0, json!(null)),
            ("/clienttest/broadcast", 0, json!(42)),
            ("/a/b", 9, json!({"k": ["v", 1, null, "é\"\n"]})),
        ] {
            let text = d.encode(path, cb, &data);
            let f = d.parse(&text).unwrap();
            assert_eq!((f.path.as_str(), f.cb, f.data), (path, cb, data));
        }
        assert_eq!(
            d.encode("/qio/heartbeat", 0, &json!(null)),
            "/qio/heartbeat:0=null"
        );
    }

    #[test]
    fn encode_replies() {
        let d = Dialect::V02;
        let cases = [
            (
                1,
                0,
                Reply::ok(json!(null)),
                r#"/qio/callback/1:0={"code":200,"data":null}"#,
            ),
            (
                3,
                0,
                Reply {
                    code: 404,
                    data: json!(null),
                    err_msg: None,
                },
                r#"/qio/callback/3:0={"code":404,"data":null,"err_msg":null}"#,
            ),
            (
                4,
                2,
                Reply::ok(json!({"a": 1})),
                r#"/qio/callback/4:2={"code":200,"data":{"a":1}}"#,
            ),
            (
                5,
                0,
                Reply::error(202, "subscription pending"),
                r#"/qio/callback/5:0={"code":202,"data":null,"err_msg":"subscription pending"}"#,
            ),
            (
                6,
                0,
                Reply {
                    code: 500,
                    data: json!("you requested an error?"),
                    err_msg: Some("500s are \"fun\"!".into()),
                },
                r#"/qio/callback/6:0={"code":500,"data":"you requested an error?","err_msg":"500s are \"fun\"!"}"#,
            ),
        ];
        for (id, scb, reply, want) in cases {
            let text = d.encode_reply(id, scb, &reply);
            assert_eq!(text, want);
            // Every answer is itself a valid frame.
            let f = d.parse(&text).unwrap();
            assert_eq!(callback_id(&f.path), Some(id));
            assert_eq!(f.cb, scb);
        }
    }

    #[test]
    fn callback_ids() {
        assert_eq!(callback_id("/qio/callback/1"), Some(1));
        assert_eq!(callback_id("/qio/callback/0"), Some(0));
        assert_eq!(callback_id("/qio/callback/"), None);
        assert_eq!(callback_id("/qio/callback/x1"), None);
        assert_eq!(callback_id("/qio/callback/1/2"), None);
        assert_eq!(callback_id("/qio/callback/99999999999999999999999"), None);
        assert_eq!(callback_id("/qio/callbacks/1"), None);
    }

    #[test]
    fn subscription_data() {
        let d = Dialect::V02;
        assert_eq!(
            d.parse_subscription(&json!("/a/")),
            Some(("/a".into(), None))
        );
        assert_eq!(
            d.parse_subscription(&json!(["//a", 123987])),
            Some(("/a".into(), Some(json!(123987))))
        );
        assert_eq!(
            d.parse_subscription(&json!(["/a"])),
            Some(("/a".into(), None))
        );
        for bad in [
            json!(null),
            json!(1),
            json!([]),
            json!([1, 2]),
            json!(["/a", 1, 2]),
        ] {
            assert_eq!(d.parse_subscription(&bad), None, "{bad}");
        }
        assert_eq!(d.parse_unsubscription(&json!("/x//")), Some("/x".into()));
        assert_eq!(d.parse_unsubscription(&json!(["/x"])), None);
    }

    #[test]
    fn snippet_is_char_safe() {
        assert_eq!(snippet("ééé", 2), "éé...");
        assert_eq!(snippet("ab", 2), "ab");
    }
}
