//! The Quick.IO wire codec: frame parsing and encoding, callback answers, path cleaning.
//!
//! This module is pure (no I/O, no state) so it can be unit tested exhaustively and reused by
//! raw test clients. Everything that differs between the Quick.IO wire dialects (frame syntax,
//! handshake strings, callback envelope, subscribe event names, which features exist) lives
//! behind [`Dialect`], so the connection handler stays dialect-agnostic.

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
    /// The event's data. 0.2: the JSON value (`null` when empty). 0.1: a `plain` payload is a
    /// JSON string holding the raw text (`""` when empty), a `json` payload is the parsed value.
    pub data: Value,
}

/// Why a text frame is not a valid Quick.IO event. The real servers end the connection on any
/// of these (0.2 with a close frame, 0.1 with a bare TCP drop), so the test server does the same
/// and records the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No `:` separating the path from the callback id.
    MissingColon,
    /// No `=` before the data (0.2: after the callback id; 0.1: after the data type).
    MissingEquals,
    /// 0.1 only: no `:` separating the callback id from the data type.
    MissingType,
    /// 0.1 only: the data type is neither `plain` nor `json` (its start).
    BadType(String),
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
            ParseError::MissingEquals => f.write_str("missing '=' before the data"),
            ParseError::MissingType => f.write_str("missing ':<type>' after the callback id"),
            ParseError::BadType(t) => write!(f, "unknown data type {t:?} (plain or json)"),
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

/// A Quick.IO wire dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// The 2012-2013 line: `<path>:<cb>:<plain|json>=<data>`, no subprotocol, no greeting (open
    /// right after the HTTP 101, which the server answers only for paths containing `/qio` and
    /// canonically spelled headers), callback data passed through with `qio_error` as the only
    /// error, `/qio/sub` and `/qio/unsub`, a global heartbeat timer, no challenges, and bare TCP
    /// drops instead of close frames.
    V01,
    /// The final (2014) line: `<path>:<cb>=<json>`, `quickio` subprotocol, `/qio/ohai`
    /// greeting, `{"code":..,"data":..}` callback envelope, `/qio/on` and `/qio/off`.
    #[default]
    V02,
}

/// The `data` of a 0.1 error callback (`/qio/callback/<id>:0:plain=qio_error`), the only error
/// 0.1 has.
pub const QIO_ERROR: &str = "qio_error";

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::V01 => "0.1",
            Dialect::V02 => "0.2",
        })
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;

    /// `0.1` or `0.2` (also with a leading `v`), as the binary's `--dialect` takes it.
    fn from_str(s: &str) -> Result<Dialect, String> {
        match s.trim().trim_start_matches(['v', 'V']) {
            "0.1" => Ok(Dialect::V01),
            "0.2" => Ok(Dialect::V02),
            other => Err(format!("unknown Quick.IO dialect {other:?} (0.1 or 0.2)")),
        }
    }
}

impl Dialect {
    /// The `Sec-WebSocket-Protocol` value the server echoes when a client requests it; `None`
    /// if the dialect has none (0.1 ignores the header and never echoes one).
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Dialect::V01 => None,
            Dialect::V02 => Some("quickio"),
        }
    }

    /// The text frame a client must send first, and that the server answers with the same
    /// text; `None` if the dialect has no application-level greeting.
    pub fn greeting(self) -> Option<&'static str> {
        match self {
            Dialect::V01 => None,
            Dialect::V02 => Some("/qio/ohai"),
        }
    }

    /// The path part of the server's WebSocket URL: 0.1 only upgrades request paths that
    /// contain `/qio`.
    pub fn url_path(self) -> &'static str {
        match self {
            Dialect::V01 => "/qio",
            Dialect::V02 => "/",
        }
    }

    /// The largest WebSocket payload a client may send when the config does not say: 0.1's
    /// 1024 bytes; `None` for 0.2 (tungstenite's own limits apply).
    pub fn default_max_frame_bytes(self) -> Option<usize> {
        match self {
            Dialect::V01 => Some(1024),
            Dialect::V02 => None,
        }
    }

    /// Whether the server ends connections with WebSocket close frames (and answers a client's
    /// close frame with one). 0.1 never sends any: every end is a bare TCP drop.
    pub fn close_frames(self) -> bool {
        matches!(self, Dialect::V02)
    }

    /// Whether heartbeats come from one server-wide timer, to every client whatever else was
    /// sent (0.1), rather than per connection after a quiet period (0.2).
    pub fn global_heartbeat(self) -> bool {
        matches!(self, Dialect::V01)
    }

    /// Whether the server sends heartbeat challenges (`/qio/heartbeat` requesting a callback).
    pub fn heartbeat_challenges(self) -> bool {
        matches!(self, Dialect::V02)
    }

    /// Whether a subscription can carry data (`["/path", <json>]`).
    pub fn subscription_data(self) -> bool {
        matches!(self, Dialect::V02)
    }

    /// Whether subscriptions can be approved later, with 202 "pending" answers meanwhile.
    pub fn pending_subscriptions(self) -> bool {
        matches!(self, Dialect::V02)
    }

    /// Whether `/qio/hostname` exists.
    pub fn has_hostname(self) -> bool {
        matches!(self, Dialect::V02)
    }

    /// The data of the answer to `/qio/ping`: 0.2 answers `null`, 0.1 passes the data back.
    pub fn ping_answer(self, data: &Value) -> Value {
        match self {
            Dialect::V01 => data.clone(),
            Dialect::V02 => Value::Null,
        }
    }

    /// The event path a client uses to subscribe.
    pub fn subscribe_event(self) -> &'static str {
        match self {
            Dialect::V01 => "/qio/sub",
            Dialect::V02 => "/qio/on",
        }
    }

    /// The event path a client uses to unsubscribe.
    pub fn unsubscribe_event(self) -> &'static str {
        match self {
            Dialect::V01 => "/qio/unsub",
            Dialect::V02 => "/qio/off",
        }
    }

    /// Parses one text frame into an event. Never panics, whatever the input.
    pub fn parse(self, text: &str) -> Result<Frame, ParseError> {
        match self {
            Dialect::V01 => parse_v01(text),
            Dialect::V02 => parse_v02(text),
        }
    }

    /// Encodes an event; `cb > 0` asks the peer for a callback. 0.1: a JSON string goes out
    /// as `plain` with its raw text, `null` as an empty `plain`, anything else as `json`.
    pub fn encode(self, path: &str, cb: u64, data: &Value) -> String {
        match self {
            Dialect::V01 => match data {
                Value::String(text) => format!("{path}:{cb}:plain={text}"),
                Value::Null => format!("{path}:{cb}:plain="),
                other => format!("{path}:{cb}:json={other}"),
            },
            Dialect::V02 => format!("{path}:{cb}={data}"),
        }
    }

    /// Encodes the answer to the peer's callback request `id`; `server_cb > 0` asks the peer
    /// to answer this answer in turn (a callback chain). 0.1 has no envelope: a 200 answer is
    /// its data as is, any other code is `plain=qio_error` (code, data and message are lost).
    pub fn encode_reply(self, id: u64, server_cb: u64, reply: &Reply) -> String {
        match self {
            Dialect::V01 => {
                let path = format!("{CALLBACK_PREFIX}{id}");
                if reply.code == 200 {
                    self.encode(&path, server_cb, &reply.data)
                } else {
                    format!("{path}:{server_cb}:plain={QIO_ERROR}")
                }
            }
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
    /// (0.2: `"/path"` or `["/path", <json>]`; 0.1: the path as text, never data); `None` if
    /// the data has none of these shapes.
    pub fn parse_subscription(self, data: &Value) -> Option<(String, Option<Value>)> {
        match self {
            Dialect::V01 => match data {
                Value::String(p) => Some((clean_path(p), None)),
                _ => None,
            },
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

    /// Extracts the cleaned path from an unsubscribe event's data (`"/path"`; in 0.1 the
    /// path as text).
    pub fn parse_unsubscription(self, data: &Value) -> Option<String> {
        match data {
            Value::String(p) => Some(clean_path(p)),
            _ => None,
        }
    }
}

/// Checks a callback id: unsigned decimal digits that fit in a `u64`.
fn parse_cb(cb: &str) -> Result<u64, ParseError> {
    if cb.is_empty() || !cb.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadCallbackId(snippet(cb, 32)));
    }
    cb.parse()
        .map_err(|_| ParseError::BadCallbackId(snippet(cb, 32)))
}

/// `<path>:<cb>:<type>=<data>`: the path ends at the first `:`, the callback id at the next
/// `:`, the type at the first `=` after that; the rest is the data, raw text for `plain`, one
/// complete JSON value for `json`.
fn parse_v01(text: &str) -> Result<Frame, ParseError> {
    let (raw_path, rest) = text.split_once(':').ok_or(ParseError::MissingColon)?;
    let (cb, rest) = rest.split_once(':').ok_or(ParseError::MissingType)?;
    let (kind, payload) = rest.split_once('=').ok_or(ParseError::MissingEquals)?;
    if raw_path.is_empty() {
        return Err(ParseError::EmptyPath);
    }
    let cb = parse_cb(cb)?;
    let data = match kind {
        "plain" => Value::String(payload.to_owned()),
        "json" => serde_json::from_str(payload).map_err(|e| ParseError::BadJson(e.to_string()))?,
        other => return Err(ParseError::BadType(snippet(other, 32))),
    };
    Ok(Frame {
        path: clean_path(raw_path),
        raw_path: raw_path.to_owned(),
        cb,
        data,
    })
}

/// `<path>:<cb>=<json>`: the path ends at the first `:`, the callback id at the first `=`
/// after it, and the rest must be one complete JSON value.
fn parse_v02(text: &str) -> Result<Frame, ParseError> {
    let (raw_path, rest) = text.split_once(':').ok_or(ParseError::MissingColon)?;
    let (cb, json) = rest.split_once('=').ok_or(ParseError::MissingEquals)?;
    if raw_path.is_empty() {
        return Err(ParseError::EmptyPath);
    }
    let cb = parse_cb(cb)?;
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
    fn v01_parse_valid_frames() {
        let d = Dialect::V01;
        let cases: Vec<(&str, &str, &str, u64, Value)> = vec![
            (
                "/qio/ping:1:plain=test",
                "/qio/ping",
                "/qio/ping",
                1,
                json!("test"),
            ),
            (
                "/qio/heartbeat:0:plain=",
                "/qio/heartbeat",
                "/qio/heartbeat",
                0,
                json!(""),
            ),
            (
                "/qio/sub:4:plain=/a/b",
                "/qio/sub",
                "/qio/sub",
                4,
                json!("/a/b"),
            ),
            (
                "/app/login:7:json={\"session_id\":\"1234abcd\"}",
                "/app/login",
                "/app/login",
                7,
                json!({"session_id": "1234abcd"}),
            ),
            // Plain data is raw text: separators, quotes and JSON-looking text stay as they are.
            ("/a:2:plain=x:y=z", "/a", "/a", 2, json!("x:y=z")),
            ("/a:2:plain=null", "/a", "/a", 2, json!("null")),
            ("/a:2:plain=\"q\"", "/a", "/a", 2, json!("\"q\"")),
            ("/a:2:plain= sp ", "/a", "/a", 2, json!(" sp ")),
            ("/a:2:plain=é\n", "/a", "/a", 2, json!("é\n")),
            ("/a:3:json=null", "/a", "/a", 3, json!(null)),
            ("/a:3:json= [1, 2] ", "/a", "/a", 3, json!([1, 2])),
            ("/a:3:json=\"s\"", "/a", "/a", 3, json!("s")),
            (
                "/qio/callback/12:0:json=42",
                "/qio/callback/12",
                "/qio/callback/12",
                0,
                json!(42),
            ),
            (
                "/app/@user/(new)>>>>:0:plain=",
                "/app/user/new",
                "/app/@user/(new)>>>>",
                0,
                json!(""),
            ),
            ("/a=b:5:plain=c", "/ab", "/a=b", 5, json!("c")),
            (
                "/a:18446744073709551615:plain=",
                "/a",
                "/a",
                u64::MAX,
                json!(""),
            ),
            ("/a:00012:json=true", "/a", "/a", 12, json!(true)),
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
    fn v01_parse_rejects_hostile_input() {
        let d = Dialect::V01;
        let long_type = format!("/a:1:{}=x", "p".repeat(1000));
        let long_cb = format!("/a:{}:plain=x", "9".repeat(1000));
        let deep = format!("/a:1:json={}{}", "[".repeat(10_000), "]".repeat(10_000));
        let cases: Vec<(&str, ParseError)> = vec![
            ("", ParseError::MissingColon),
            ("no colon here", ParseError::MissingColon),
            ("/qio/ohai", ParseError::MissingColon),
            // The 0.2 syntax is not 0.1.
            ("/qio/ping:1=null", ParseError::MissingType),
            ("/qio/ping:1", ParseError::MissingType),
            (
                "unicorns, ponies, princesses, and magic!:good times",
                ParseError::MissingType,
            ),
            ("/a:1:plain", ParseError::MissingEquals),
            ("/a:1:", ParseError::MissingEquals),
            (":1:plain=x", ParseError::EmptyPath),
            ("/a::plain=x", ParseError::BadCallbackId(String::new())),
            ("/a:x:plain=1", ParseError::BadCallbackId("x".into())),
            ("/a:-1:plain=x", ParseError::BadCallbackId("-1".into())),
            ("/a:+1:plain=x", ParseError::BadCallbackId("+1".into())),
            ("/a: 1:plain=x", ParseError::BadCallbackId(" 1".into())),
            ("/a:1=x:plain=y", ParseError::BadCallbackId("1=x".into())),
            (
                "/a:18446744073709551616:plain=",
                ParseError::BadCallbackId("18446744073709551616".into()),
            ),
            ("/a:1:text=x", ParseError::BadType("text".into())),
            ("/a:1:Plain=x", ParseError::BadType("Plain".into())),
            ("/a:1:JSON=1", ParseError::BadType("JSON".into())),
            ("/a:1:=x", ParseError::BadType(String::new())),
            ("/a:1: plain=x", ParseError::BadType(" plain".into())),
            ("/a:1:pl:ain=x", ParseError::BadType("pl:ain".into())),
        ];
        for (text, want) in cases {
            assert_eq!(d.parse(text), Err(want), "{text:?}");
        }
        for text in [
            "/a:1:json=",
            "/a:1:json=nul",
            "/a:1:json=test",
            "/a:1:json={\"a\":1",
            "/a:1:json=null null",
            "/a:1:json='x'",
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
        assert!(matches!(
            d.parse(&long_type),
            Err(ParseError::BadType(s)) if s.len() < 40
        ));
        // 0.1 frames are not 0.2 frames either.
        assert!(Dialect::V02.parse("/qio/ping:1:plain=test").is_err());
        assert!(Dialect::V02.parse("/a:1:json=1").is_err());
    }

    #[test]
    fn v01_encode_table() {
        let d = Dialect::V01;
        let cases = [
            ("/qio/heartbeat", 0, json!(null), "/qio/heartbeat:0:plain="),
            (
                "/qio/move",
                0,
                json!("ws://h:1/qio"),
                "/qio/move:0:plain=ws://h:1/qio",
            ),
            ("/a", 3, json!(""), "/a:3:plain="),
            (
                "/a",
                0,
                json!("x:y=z \"q\"\né"),
                "/a:0:plain=x:y=z \"q\"\né",
            ),
            ("/a", 0, json!(42), "/a:0:json=42"),
            ("/a", 0, json!(true), "/a:0:json=true"),
            (
                "/a",
                9,
                json!({"k": [1, null]}),
                r#"/a:9:json={"k":[1,null]}"#,
            ),
            ("/a", 0, json!(["/x"]), r#"/a:0:json=["/x"]"#),
        ];
        for (path, cb, data, want) in cases {
            let text = d.encode(path, cb, &data);
            assert_eq!(text, want, "{data}");
            // Every encoding parses back; null comes back as the empty text.
            let f = d.parse(&text).unwrap();
            let back = if data.is_null() { json!("") } else { data };
            assert_eq!((f.path.as_str(), f.cb, f.data), (path, cb, back));
        }
    }

    #[test]
    fn v01_encode_replies() {
        let d = Dialect::V01;
        let cases = [
            (
                1,
                0,
                Reply::ok(json!("test")),
                "/qio/callback/1:0:plain=test",
            ),
            (4, 0, Reply::ok(json!(null)), "/qio/callback/4:0:plain="),
            (
                5,
                2,
                Reply::ok(json!({"a": 1})),
                r#"/qio/callback/5:2:json={"a":1}"#,
            ),
            (
                6,
                0,
                Reply::error(400, "already subscribed"),
                "/qio/callback/6:0:plain=qio_error",
            ),
            (
                7,
                0,
                Reply {
                    code: 404,
                    data: json!(null),
                    err_msg: None,
                },
                "/qio/callback/7:0:plain=qio_error",
            ),
            (
                8,
                0,
                Reply {
                    code: 418,
                    data: json!("you requested an error?"),
                    err_msg: Some("418s are fun!".into()),
                },
                "/qio/callback/8:0:plain=qio_error",
            ),
            // No codes in 0.1: "pending" is an error like any other.
            (
                9,
                3,
                Reply::error(202, "subscription pending"),
                "/qio/callback/9:3:plain=qio_error",
            ),
        ];
        for (id, scb, reply, want) in cases {
            let text = d.encode_reply(id, scb, &reply);
            assert_eq!(text, want);
            let f = d.parse(&text).unwrap();
            assert_eq!(callback_id(&f.path), Some(id));
            assert_eq!(f.cb, scb);
        }
    }

    #[test]
    fn v01_subscriptions_and_traits() {
        let d = Dialect::V01;
        assert_eq!(
            (d.subscribe_event(), d.unsubscribe_event()),
            ("/qio/sub", "/qio/unsub")
        );
        let sub = d.parse("/qio/sub:1:plain=//a/@b/").unwrap();
        assert_eq!(d.parse_subscription(&sub.data), Some(("/a/b".into(), None)));
        // No subscription data in 0.1: a JSON array is not a subscription.
        for bad in [json!(null), json!(1), json!(["/a", 123987]), json!(["/a"])] {
            assert_eq!(d.parse_subscription(&bad), None, "{bad}");
        }
        assert_eq!(d.parse_unsubscription(&json!("/x//")), Some("/x".into()));
        assert_eq!(d.parse_unsubscription(&json!(1)), None);
        assert_eq!(d.subprotocol(), None);
        assert_eq!(d.greeting(), None);
        assert_eq!(d.url_path(), "/qio");
        assert_eq!(d.default_max_frame_bytes(), Some(1024));
        assert_eq!(Dialect::V02.default_max_frame_bytes(), None);
        assert_eq!(d.ping_answer(&json!("test")), json!("test"));
        assert_eq!(Dialect::V02.ping_answer(&json!("test")), json!(null));
        assert_eq!(Dialect::default(), Dialect::V02);
        for (text, want) in [
            ("0.1", Ok(Dialect::V01)),
            ("v0.1", Ok(Dialect::V01)),
            ("0.2", Ok(Dialect::V02)),
            (" 0.2 ", Ok(Dialect::V02)),
        ] {
            assert_eq!(text.parse::<Dialect>(), want, "{text:?}");
        }
        for bad in ["", "0.3", "1", "v", "0.10"] {
            assert!(bad.parse::<Dialect>().is_err(), "{bad:?}");
        }
        assert_eq!(Dialect::V01.to_string(), "0.1");
        assert_eq!(Dialect::V02.to_string(), "0.2");
    }

    #[test]
    fn snippet_is_char_safe() {
        assert_eq!(snippet("ééé", 2), "éé...");
        assert_eq!(snippet("ab", 2), "ab");
    }
}
