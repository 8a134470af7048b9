//! The line-JSON protocol between `qiod` and local programs.
//!
//! One JSON object per line. Requests carry an `op`; everything the daemon sends is either
//! a reply (it has the request's `id`) or an event (it has `event`). The full contract,
//! with examples, is in PROTOCOL.md beside this crate. This crate is serde only, so any
//! client (sync or async, any runtime) can use it. Where the socket is and how the two sides
//! check each other is in `qio-platform`.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// Codes in replies: Quick.IO's own plus the daemon's local ones (negative).
pub mod code {
    /// Success.
    pub const OK: i64 = 200;
    /// The server has the request but not the final answer yet.
    pub const PENDING: i64 = 202;
    /// The request was malformed (locally or according to the server).
    pub const BAD_REQUEST: i64 = 400;
    /// The server refused: not authorized.
    pub const UNAUTHORIZED: i64 = 401;
    /// The server does not know the path.
    pub const NOT_FOUND: i64 = 404;
    /// The server says: too many requests or subscriptions.
    pub const ENHANCE_YOUR_CALM: i64 = 420;
    /// The server failed.
    pub const SERVER_ERROR: i64 = 500;
    /// The connection that carried the request is gone; its answer can never arrive.
    pub const DISCONNECTED: i64 = -1;
    /// No answer arrived within the daemon's request timeout.
    pub const TIMEOUT: i64 = -2;
    /// A bound was reached (offline queue, pending requests, subscriptions); retry later.
    pub const OVERLOADED: i64 = -3;
}

/// Connection events the daemon sends besides the server's events.
pub mod events {
    /// The upstream connection is open.
    pub const OPEN: &str = "/open";
    /// The upstream connection is closed (data: `{"reason": ...}`).
    pub const CLOSE: &str = "/close";
    /// Something failed that no reply could report (data: [`super::ErrorData`]).
    pub const ERROR: &str = "/error";
    /// Events were dropped because this client read too slowly (data: `{"count": N}`).
    pub const LOST: &str = "/lost";
}

/// A request id: any JSON number or string, echoed back exactly as it came.
///
/// It is kept as its JSON text, so a number too big for 64 bits comes back unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(String);

impl Id {
    /// The id's JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    fn from_raw(raw: &RawValue) -> Option<Id> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => Some(Id(text.to_owned())),
            _ => None,
        }
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id(n.to_string())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id(serde_json::Value::from(s).to_string())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The text was valid JSON when it was read or built, so this cannot fail.
        let raw = RawValue::from_string(self.0.clone()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through Value rather than RawValue so an Id also works inside untagged enums.
        match serde_json::Value::deserialize(d)? {
            v @ (serde_json::Value::Number(_) | serde_json::Value::String(_)) => {
                Ok(Id(v.to_string()))
            }
            _ => Err(serde::de::Error::custom(
                "an id must be a number or a string",
            )),
        }
    }
}

/// The operations a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Send an event upstream (with `id`: ask for the server's callback).
    Send,
    /// Answer a server's callback request (`cb`).
    Callback,
    /// Subscribe to a path.
    On,
    /// Subscribe to a path for one event.
    One,
    /// Unsubscribe from a path.
    Off,
    /// The daemon's state.
    Status,
}

impl Op {
    /// Every op, for error messages.
    pub const ALL: [Op; 6] = [Op::Send, Op::Callback, Op::On, Op::One, Op::Off, Op::Status];

    /// The op's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Callback => "callback",
            Op::On => "on",
            Op::One => "one",
            Op::Off => "off",
            Op::Status => "status",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }
}

/// A request, as a client writes it. Build one and serialize it with `serde_json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// Set to get exactly one reply carrying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// The path (`send`, `on`, `one`, `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The data (`send`, `callback`; subscription data for `on` and `one`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// The callback handle being answered (`callback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cb: Option<String>,
}

/// A request line as the daemon reads it: data stays raw JSON, nothing is re-encoded.
#[derive(Debug)]
pub struct RawRequest {
    /// The operation.
    pub op: Op,
    /// The id, when one was given.
    pub id: Option<Id>,
    /// The path, when one was given.
    pub path: Option<String>,
    /// The data, raw, when given.
    pub data: Option<Box<RawValue>>,
    /// The callback handle, when given.
    pub cb: Option<String>,
}

/// Why a request line was refused; answered with code 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    /// The id, when it could be read, so the error reaches the right caller.
    pub id: Option<Id>,
    /// The op, when it could be read.
    pub op: Option<Op>,
    /// What is wrong, and what to do instead.
    pub message: String,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    path: Option<&'a RawValue>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(borrow, default)]
    cb: Option<&'a RawValue>,
}

impl RawRequest {
    /// Parses one request line (without its newline), naming the first problem found.
    ///
    /// Fields are read one by one so a request with a good `id` and a bad field still
    /// gets its error reply under that `id`. Unknown fields are ignored.
    pub fn parse(line: &[u8]) -> Result<RawRequest, BadRequest> {
        let bad = |id: Option<Id>, op: Option<Op>, message: String| BadRequest { id, op, message };
        if line.trim_ascii_start().first() != Some(&b'{') {
            return Err(bad(
                None,
                None,
                "not a JSON object; send one JSON object per line".into(),
            ));
        }
        let fields: Fields<'_> = serde_json::from_slice(line).map_err(|e| {
            bad(
                None,
                None,
                format!("not a JSON object: {e}; send one JSON object per line"),
            )
        })?;
        let id = match fields.id {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(Id::from_raw(raw).ok_or_else(|| {
                bad(
                    None,
                    None,
                    format!(
                        "\"id\" must be a number or a string, not {}",
                        short(raw.get())
                    ),
                )
            })?),
        };
        let op_name = match fields.op {
            None => {
                return Err(bad(
                    id,
                    None,
                    "missing \"op\"; one of: send, callback, on, one, off, status".into(),
                ))
            }
            Some(raw) => serde_json::from_str::<&str>(raw.get()).map_err(|_| {
                bad(
                    id.clone(),
                    None,
                    format!("\"op\" must be a string, not {}", short(raw.get())),
                )
            })?,
        };
        let op = Op::parse(op_name).ok_or_else(|| {
            bad(
                id.clone(),
                None,
                format!(
                    "unknown op {}; one of: send, callback, on, one, off, status",
                    short(&format!("{op_name:?}"))
                ),
            )
        })?;
        let string = |name: &str, raw: Option<&RawValue>| -> Result<Option<String>, BadRequest> {
            match raw {
                None => Ok(None),
                Some(raw) if raw.get() == "null" => Ok(None),
                Some(raw) => serde_json::from_str::<String>(raw.get())
                    .map(Some)
                    .map_err(|_| {
                        bad(
                            id.clone(),
                            Some(op),
                            format!("\"{name}\" must be a string, not {}", short(raw.get())),
                        )
                    }),
            }
        };
        let path = string("path", fields.path)?;
        let cb = string("cb", fields.cb)?;
        let needs = |what: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(bad(
                    id.clone(),
                    Some(op),
                    format!("op {:?} needs \"{what}\"", op.as_str()),
                ))
            }
        };
        match op {
            Op::Send | Op::On | Op::One | Op::Off => needs("path", path.is_some())?,
            Op::Callback => needs("cb", cb.is_some())?,
            Op::Status => {}
        }
        Ok(RawRequest {
            op,
            id,
            path,
            data: fields.data,
            cb,
        })
    }
}

/// Cleans a Quick.IO path the way both ends of a connection do (WIRE.md): keeps only
/// `A-Z a-z 0-9 _ - /`, collapses repeated `/`, drops a trailing `/` and makes sure the
/// path starts with `/`. An input with nothing left gives `/`.
///
/// Events come back on the cleaned path, so clients key their subscriptions by it; it
/// lives here so the daemon and every Rust client clean paths with the same code.
///
/// ```
/// assert_eq!(qio_ipc::clean_path("app/@user/(new)>>>>"), "/app/user/new");
/// assert_eq!(qio_ipc::clean_path("//news//"), "/news");
/// ```
pub fn clean_path(raw: &str) -> String {
    // Nearly every path on the wire is clean already (servers and clients clean what they
    // send): one byte scan and a copy, instead of rebuilding it char by char.
    if is_clean(raw.as_bytes()) {
        return raw.to_owned();
    }
    rebuild(raw)
}

/// The path rule itself, char by char.
fn rebuild(raw: &str) -> String {
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

/// Whether `clean_path` would give `raw` back unchanged.
fn is_clean(raw: &[u8]) -> bool {
    let [b'/', rest @ ..] = raw else {
        return false;
    };
    let mut prev = b'/';
    for &b in rest {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => {}
            b'/' if prev != b'/' => {}
            _ => return false,
        }
        prev = b;
    }
    // A lone `/` is clean; any other path must not end with one.
    raw.len() == 1 || prev != b'/'
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A reply as the daemon writes it: `{"id":1,"code":200,"data":...}`.
#[derive(Debug, Serialize)]
pub struct ReplyOut<'a> {
    /// The request's id.
    pub id: &'a Id,
    /// The code.
    pub code: i64,
    /// The data (JSON `null` when none).
    pub data: &'a RawValue,
    /// The explanation, on errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err_msg: Option<&'a str>,
    /// The handle to answer with, when the server asked for a callback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cb: Option<&'a str>,
}

/// An event as the daemon writes it: `{"event":"/news","data":...}`.
#[derive(Debug, Serialize)]
pub struct EventOut<'a> {
    /// The event's path, or a connection event (`/open`, `/close`, `/error`, `/lost`).
    pub event: &'a str,
    /// The data, when there is some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// The handle to answer with, when the server asked for a callback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cb: Option<&'a str>,
}

/// The data of an `/error` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    /// The op that failed, when the error is about a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The path concerned, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The code, as a reply would have carried it.
    pub code: i64,
    /// What went wrong.
    pub err_msg: String,
}

/// Anything the daemon sends, as a client reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Incoming {
    /// An event (it has `event`).
    Event(Event),
    /// A reply (it has `id` and `code`).
    Reply(Reply),
}

/// A reply, as a client reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reply {
    /// The request's id.
    pub id: Id,
    /// The code: 200 on success; see [`code`].
    pub code: i64,
    /// The data.
    #[serde(default)]
    pub data: serde_json::Value,
    /// The explanation, on errors.
    #[serde(default)]
    pub err_msg: Option<String>,
    /// The handle to answer with, when the server asked for a callback.
    #[serde(default)]
    pub cb: Option<String>,
}

/// An event, as a client reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// The path, or a connection event (see [`events`]).
    pub event: String,
    /// The data.
    #[serde(default)]
    pub data: serde_json::Value,
    /// The handle to answer with, when the server asked for a callback.
    #[serde(default)]
    pub cb: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RawRequest, BadRequest> {
        RawRequest::parse(s.as_bytes())
    }

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

    /// The fast path agrees with the full rule: a path is taken as clean exactly when
    /// cleaning would not change it, over every short string of the bytes that matter.
    #[test]
    fn is_clean_agrees_with_cleaning() {
        let alphabet = ["/", "a", "Z", "0", "_", "-", " ", "@", "ü", "//"];
        let mut inputs = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = inputs
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            inputs.extend(longer);
        }
        let mut clean = 0;
        for raw in &inputs {
            let slow = rebuild(raw);
            assert_eq!(is_clean(raw.as_bytes()), slow == *raw, "is_clean({raw:?})");
            assert_eq!(clean_path(raw), slow, "clean_path({raw:?})");
            clean += usize::from(slow == *raw);
        }
        assert!(clean > 100, "the table has clean paths too ({clean})");
    }

    #[test]
    fn good_requests() {
        let r = parse(r#"{"op":"send","path":"/app/login","data":{"a":[1, 2]},"id":1}"#).unwrap();
        assert_eq!(
            (r.op, r.id, r.path.as_deref()),
            (Op::Send, Some(Id::from(1)), Some("/app/login"))
        );
        assert_eq!(r.data.unwrap().get(), r#"{"a":[1, 2]}"#, "data is kept raw");
        let r = parse(r#"{"op":"callback","cb":"3.7","id":"x","extra":true}"#).unwrap();
        assert_eq!(
            (r.op, r.id, r.cb.as_deref()),
            (Op::Callback, Some(Id::from("x")), Some("3.7"))
        );
        let r = parse(r#"{"op":"status"}"#).unwrap();
        assert_eq!((r.op, r.id), (Op::Status, None));
        let big = parse(r#"{"op":"status","id":123456789012345678901234567890}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&big.id).unwrap(),
            "123456789012345678901234567890"
        );
    }

    #[test]
    fn bad_requests_name_the_problem_and_keep_the_id() {
        let cases: [(&str, Option<Id>, &str); 10] = [
            ("not json", None, "not a JSON object"),
            ("[1,2]", None, "not a JSON object"),
            (r#"{"id":1}"#, Some(Id::from(1)), "missing \"op\""),
            (
                r#"{"op":"fly","id":2}"#,
                Some(Id::from(2)),
                "unknown op \"fly\"",
            ),
            (
                r#"{"op":7,"id":3}"#,
                Some(Id::from(3)),
                "\"op\" must be a string",
            ),
            (
                r#"{"op":"send","id":4}"#,
                Some(Id::from(4)),
                "needs \"path\"",
            ),
            (
                r#"{"op":"on","path":5,"id":5}"#,
                Some(Id::from(5)),
                "\"path\" must be a string",
            ),
            (
                r#"{"op":"callback","id":6}"#,
                Some(Id::from(6)),
                "needs \"cb\"",
            ),
            (
                r#"{"op":"send","id":[1]}"#,
                None,
                "\"id\" must be a number or a string",
            ),
            (
                r#"{"op":"send","path":"/a","data":[1,"#,
                None,
                "not a JSON object",
            ),
        ];
        for (line, id, msg) in cases {
            let e = parse(line).unwrap_err();
            assert_eq!(e.id, id, "{line}");
            assert!(e.message.contains(msg), "{line}: {}", e.message);
        }
        assert!(parse("\u{0}\u{ff}").is_err());
        assert!(RawRequest::parse(&[0xff, 0xfe, b'{']).is_err());
    }

    #[test]
    fn deep_nesting_is_passed_through_raw_without_recursion() {
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep = format!("{{\"op\":\"send\",\"path\":\"/a\",\"data\":{nested}}}");
        assert_eq!(parse(&deep).unwrap().data.unwrap().get(), nested);
        let deep_id = format!("{{\"op\":\"send\",\"id\":{nested}}}");
        assert!(parse(&deep_id).is_err());
    }

    #[test]
    fn incoming_lines_are_told_apart() {
        let ev: Incoming =
            serde_json::from_str(r#"{"event":"/news","data":1,"cb":"1.2"}"#).unwrap();
        assert_eq!(
            ev,
            Incoming::Event(Event {
                event: "/news".into(),
                data: 1.into(),
                cb: Some("1.2".into())
            })
        );
        let rep: Incoming = serde_json::from_str(
            r#"{"id":1,"code":-1,"data":null,"err_msg":"disconnected","new":0}"#,
        )
        .unwrap();
        assert!(matches!(rep, Incoming::Reply(Reply { code: -1, .. })));
    }

    #[test]
    fn outgoing_lines() {
        let data = RawValue::from_string("{\"a\":1}".into()).unwrap();
        let id = Id::from(9);
        let line = serde_json::to_string(&ReplyOut {
            id: &id,
            code: 200,
            data: &data,
            err_msg: None,
            cb: Some("1.2"),
        })
        .unwrap();
        assert_eq!(line, r#"{"id":9,"code":200,"data":{"a":1},"cb":"1.2"}"#);
        let line = serde_json::to_string(&EventOut {
            event: "/open",
            data: None,
            cb: None,
        })
        .unwrap();
        assert_eq!(line, r#"{"event":"/open"}"#);
    }
}
