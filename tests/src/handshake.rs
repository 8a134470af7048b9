//! The HTTP side of the WebSocket upgrade: both dialects' hand-made upgrades (pure checks and
//! answers, unit tested here) and [`Io`] (a plain or TLS socket).
//!
//! Neither dialect can use tungstenite's server handshake: it lower-cases header names, while
//! the real 0.1 server matches them case-sensitively and drops clients that spell them
//! differently; and it cannot answer as the real 0.2 server does (HTTP/1.0 400 and 426
//! refusals, its own 101 headers). Both record the raw request head for the log.

use crate::codec::snippet;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The largest request head accepted (and recorded), blank line included.
pub(crate) const MAX_HEAD: usize = 8192;

/// The request headers the 0.1 server requires, spelled exactly so.
const REQUIRED: [&str; 5] = [
    "Host",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
];

/// Where the request head ends in `buf`: the index just past the first `\r\n\r\n`.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The request head as text, for the log: `buf` up to the end of the head (all of it if the
/// head is incomplete), invalid UTF-8 replaced.
pub(crate) fn head_text(buf: &[u8]) -> String {
    let end = head_end(buf).unwrap_or(buf.len()).min(MAX_HEAD);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// What the server needs from an accepted 0.1 upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V01Request {
    /// The request target (path and query), e.g. `/qio`.
    pub(crate) uri: String,
    /// The `Sec-WebSocket-Key` value.
    pub(crate) key: String,
    /// Whether `Sec-WebSocket-Protocol` lists `quickio` (ignored, never echoed, but logged).
    pub(crate) subprotocol_requested: bool,
}

/// Checks a 0.1 upgrade request head (through the blank line) the way the real 0.1 server does:
/// `GET <target> HTTP/1.1` with `/qio` somewhere in the target, and the headers `Host`,
/// `Upgrade: websocket`, `Connection: Upgrade` (among other tokens), `Sec-WebSocket-Key` and
/// `Sec-WebSocket-Version: 13`, with names spelled exactly so. Header values are compared
/// case-insensitively. The error says why, for the log.
pub(crate) fn check_v01(head: &str) -> Result<V01Request, String> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(format!("bad request line: {:?}", snippet(request_line, 64))),
    };
    if method != "GET" {
        return Err(format!("method is not GET: {:?}", snippet(method, 16)));
    }
    if version != "HTTP/1.1" {
        return Err(format!("not HTTP/1.1: {:?}", snippet(version, 16)));
    }
    if !target.contains("/qio") {
        return Err(format!("path without /qio: {:?}", snippet(target, 64)));
    }
    let mut found: [Option<&str>; REQUIRED.len()] = [None; REQUIRED.len()];
    let mut subprotocol_requested = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line: {:?}", snippet(line, 64)));
        };
        let value = value.trim();
        if let Some(i) = REQUIRED.iter().position(|r| r.eq_ignore_ascii_case(name)) {
            if name != REQUIRED[i] {
                return Err(if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    format!("non-canonical header name: {name}")
                } else {
                    format!("lower-case header name: {name}")
                });
            }
            found[i].get_or_insert(value);
        } else if name.eq_ignore_ascii_case("Sec-WebSocket-Protocol") {
            subprotocol_requested |= value.split(',').any(|p| p.trim() == "quickio");
        }
    }
    let [host, upgrade, connection, key, ws_version] = found;
    let missing = |name: &str| format!("missing header: {name}");
    host.filter(|h| !h.is_empty())
        .ok_or_else(|| missing("Host"))?;
    let upgrade = upgrade.ok_or_else(|| missing("Upgrade"))?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(format!(
            "Upgrade is not websocket: {:?}",
            snippet(upgrade, 32)
        ));
    }
    let connection = connection.ok_or_else(|| missing("Connection"))?;
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err(format!(
            "Connection does not include Upgrade: {:?}",
            snippet(connection, 32)
        ));
    }
    let key = key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| missing("Sec-WebSocket-Key"))?;
    let ws_version = ws_version.ok_or_else(|| missing("Sec-WebSocket-Version"))?;
    if ws_version != "13" {
        return Err(format!(
            "unsupported Sec-WebSocket-Version: {:?}",
            snippet(ws_version, 16)
        ));
    }
    Ok(V01Request {
        uri: target.to_owned(),
        key: key.to_owned(),
        subprotocol_requested,
    })
}

/// The 0.1 server's answer to an accepted upgrade (no `Sec-WebSocket-Protocol`, ever).
pub(crate) fn response_101(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

/// What the server needs from an accepted 0.2 upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V02Request {
    /// The request target (any path works).
    pub(crate) uri: String,
    /// The `Sec-WebSocket-Key` value.
    pub(crate) key: String,
}

/// Why a 0.2 upgrade request is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum V02Refusal {
    /// Answer with this HTTP/1.0 status (`"400 Bad Request"`, `"426 Upgrade Required"`) and
    /// an empty body, as the real server does; the reason is for the log.
    Status(&'static str, String),
    /// Not something the test server answers at all (not an HTTP request, or a long-poll
    /// request, which the test server does not serve): drop the connection.
    Drop(String),
}

/// The value of header `name` (matched case-insensitively, as the real 0.2 server's event
/// library does), the first one if repeated.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Checks a 0.2 upgrade request head the way the real 0.2 server does: a request with a
/// `Sec-WebSocket-Key` is an upgrade (without one it would be long polling); missing
/// `Upgrade` or `Connection` headers, or a `Connection` without `Upgrade`, answer 426; a
/// `Sec-WebSocket-Protocol` other than exactly `quickio` (absent included) or a
/// `Sec-WebSocket-Version` other than exactly `13` answer 400. Any URL path works.
pub(crate) fn check_v02(head: &str) -> Result<V02Request, V02Refusal> {
    let request_line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(t), Some(v), None) if t.starts_with('/') && v.starts_with("HTTP/") => (t, v),
        _ => {
            return Err(V02Refusal::Drop(format!(
                "bad request line: {:?}",
                snippet(request_line, 64)
            )))
        }
    };
    let _ = version;
    let Some(key) = header(head, "Sec-WebSocket-Key").filter(|k| !k.is_empty()) else {
        return Err(V02Refusal::Drop(
            "no Sec-WebSocket-Key: a long-poll request, which the test server does not serve"
                .into(),
        ));
    };
    let upgrade_required = |why: String| V02Refusal::Status("426 Upgrade Required", why);
    if header(head, "Upgrade").is_none() {
        return Err(upgrade_required("missing header: Upgrade".into()));
    }
    let connection = header(head, "Connection")
        .ok_or_else(|| upgrade_required("missing header: Connection".into()))?;
    if !connection.to_ascii_lowercase().contains("upgrade") {
        return Err(upgrade_required(format!(
            "Connection does not include Upgrade: {:?}",
            snippet(connection, 32)
        )));
    }
    let bad_request = |why: String| V02Refusal::Status("400 Bad Request", why);
    match header(head, "Sec-WebSocket-Protocol") {
        Some("quickio") => {}
        Some(other) => {
            return Err(bad_request(format!(
                "Sec-WebSocket-Protocol is not quickio: {:?}",
                snippet(other, 32)
            )))
        }
        None => return Err(bad_request("missing header: Sec-WebSocket-Protocol".into())),
    }
    match header(head, "Sec-WebSocket-Version") {
        Some("13") => {}
        other => {
            return Err(bad_request(format!(
                "unsupported Sec-WebSocket-Version: {:?}",
                other.map(|v| snippet(v, 16)).unwrap_or_default()
            )))
        }
    }
    Ok(V02Request {
        uri: target.to_owned(),
        key: key.to_owned(),
    })
}

/// The real 0.2 server's 101, headers in its order.
pub(crate) fn response_101_v02(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Access-Control-Allow-Origin: *\r\nSec-WebSocket-Protocol: quickio\r\n\
         Cache-Control: private, max-age=0\r\nExpires: -1\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

/// The real 0.2 server's refusal of an upgrade: an HTTP/1.0 status line, its common head
/// and an empty body.
pub(crate) fn refusal_v02(status: &str) -> String {
    format!(
        "HTTP/1.0 {status}\r\nCache-Control: private, max-age=0\r\nExpires: -1\r\n\
         Connection: Keep-Alive\r\nKeep-Alive: timeout=60\r\nContent-Length: 0\r\n\
         Content-Type: text/plain\r\n\r\n"
    )
}

/// An accepted connection: plain TCP, or TLS over it once the TLS handshake is done. Both
/// dialects' upgrades run on top of either.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request like tokio-tungstenite 0.30's default client request.
    const GOOD: &str = "GET /qio HTTP/1.1\r\nHost: qio.test:1234\r\nConnection: Upgrade\r\n\
                        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from:?}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn accepts_canonical_requests() {
        let cases = [
            (GOOD.to_owned(), "/qio", false),
            (with("GET /qio ", "GET /qio/ws?x=1 "), "/qio/ws?x=1", false),
            (with("GET /qio ", "GET /app/qio "), "/app/qio", false),
            (
                with("Connection: Upgrade", "Connection: keep-alive, upgrade"),
                "/qio",
                false,
            ),
            (
                with("Upgrade: websocket", "Upgrade: WebSocket"),
                "/qio",
                false,
            ),
            (
                with(
                    "\r\n\r\n",
                    "\r\nSec-WebSocket-Protocol: chat, quickio\r\n\r\n",
                ),
                "/qio",
                true,
            ),
            // The ignored subprotocol header may be spelled anyhow, other headers too.
            (
                with(
                    "\r\n\r\n",
                    "\r\nsec-websocket-protocol: quickio\r\nx-any: 1\r\n\r\n",
                ),
                "/qio",
                true,
            ),
            (with("Host: qio.test:1234", "Host:qio.test"), "/qio", false),
        ];
        for (head, uri, sub) in cases {
            let req = check_v01(&head).unwrap_or_else(|e| panic!("{head:?}: {e}"));
            assert_eq!(req.uri, uri, "{head:?}");
            assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(req.subprotocol_requested, sub, "{head:?}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let cases = [
            (
                with("Sec-WebSocket-Key:", "sec-websocket-key:"),
                "lower-case header name: sec-websocket-key",
            ),
            (
                with("Sec-WebSocket-Version:", "sec-websocket-version:"),
                "lower-case header name: sec-websocket-version",
            ),
            (with("Host:", "host:"), "lower-case header name: host"),
            (
                with("Upgrade:", "upgrade:"),
                "lower-case header name: upgrade",
            ),
            (
                with("Connection:", "connection:"),
                "lower-case header name: connection",
            ),
            (
                with("Sec-WebSocket-Key:", "SEC-WEBSOCKET-KEY:"),
                "non-canonical header name: SEC-WEBSOCKET-KEY",
            ),
            (
                with("Sec-WebSocket-Key:", "Sec-Websocket-Key:"),
                "non-canonical header name: Sec-Websocket-Key",
            ),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                "missing header: Sec-WebSocket-Key",
            ),
            (
                with(
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Key: ",
                ),
                "missing header: Sec-WebSocket-Key",
            ),
            (with("Host: qio.test:1234\r\n", ""), "missing header: Host"),
            (
                with("Upgrade: websocket\r\n", ""),
                "missing header: Upgrade",
            ),
            (
                with("Connection: Upgrade\r\n", ""),
                "missing header: Connection",
            ),
            (
                with("Sec-WebSocket-Version: 13\r\n", ""),
                "missing header: Sec-WebSocket-Version",
            ),
            (
                with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                "unsupported Sec-WebSocket-Version: \"8\"",
            ),
            (
                with("Upgrade: websocket", "Upgrade: h2c"),
                "Upgrade is not websocket: \"h2c\"",
            ),
            (
                with("Connection: Upgrade", "Connection: keep-alive"),
                "Connection does not include Upgrade: \"keep-alive\"",
            ),
            (with("GET /qio ", "GET / "), "path without /qio: \"/\""),
            (
                with("GET /qio ", "GET /QIO "),
                "path without /qio: \"/QIO\"",
            ),
            (
                with("GET /qio ", "GET /q-io "),
                "path without /qio: \"/q-io\"",
            ),
            (with("GET ", "POST "), "method is not GET: \"POST\""),
            (with("GET ", "get "), "method is not GET: \"get\""),
            (
                with("HTTP/1.1\r\n", "HTTP/1.0\r\n"),
                "not HTTP/1.1: \"HTTP/1.0\"",
            ),
            (
                with("GET /qio HTTP/1.1", "GET  /qio HTTP/1.1"),
                "bad request line: \"GET  /qio HTTP/1.1\"",
            ),
            (
                with("GET /qio HTTP/1.1", "GET /qio"),
                "bad request line: \"GET /qio\"",
            ),
            (
                with("Upgrade: websocket", "Upgrade websocket"),
                "malformed header line: \"Upgrade websocket\"",
            ),
            ("\r\n\r\n".to_owned(), "bad request line: \"\""),
        ];
        for (head, want) in cases {
            assert_eq!(check_v01(&head), Err(want.to_owned()), "{head:?}");
        }
    }

    /// A request like qiod's (tokio-tungstenite 0.30 with the subprotocol added).
    const GOOD_V02: &str = "GET /any/path?x=1 HTTP/1.1\r\nHost: h:1\r\nconnection: Upgrade\r\n\
                            upgrade: websocket\r\nsec-websocket-version: 13\r\n\
                            sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                            sec-websocket-protocol: quickio\r\n\r\n";

    #[test]
    fn v02_upgrade_checks() {
        let req = check_v02(GOOD_V02).unwrap();
        assert_eq!(req.uri, "/any/path?x=1");
        assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
        let with = |from: &str, to: &str| {
            assert!(GOOD_V02.contains(from), "{from:?}");
            GOOD_V02.replacen(from, to, 1)
        };
        let status = |head: String| match check_v02(&head) {
            Err(V02Refusal::Status(s, _)) => s,
            other => panic!("{head:?}: {other:?}"),
        };
        assert_eq!(
            status(with("upgrade: websocket\r\n", "")),
            "426 Upgrade Required"
        );
        assert_eq!(
            status(with("connection: Upgrade\r\n", "")),
            "426 Upgrade Required"
        );
        assert_eq!(
            status(with("connection: Upgrade", "Connection: keep-alive")),
            "426 Upgrade Required"
        );
        assert_eq!(
            status(with("sec-websocket-protocol: quickio\r\n", "")),
            "400 Bad Request"
        );
        assert_eq!(
            status(with(
                "sec-websocket-protocol: quickio",
                "Sec-WebSocket-Protocol: chat, quickio"
            )),
            "400 Bad Request"
        );
        assert_eq!(
            status(with(
                "sec-websocket-protocol: quickio",
                "Sec-WebSocket-Protocol: "
            )),
            "400 Bad Request"
        );
        assert_eq!(
            status(with(
                "sec-websocket-version: 13",
                "Sec-WebSocket-Version: 9"
            )),
            "400 Bad Request"
        );
        // Upgrade checks come first: a request wrong in both ways gets 426.
        assert_eq!(
            status(with("connection: Upgrade\r\n", "").replace("quickio", "x")),
            "426 Upgrade Required"
        );
        for head in [
            with("sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            "\r\n\r\n".to_owned(),
            with("GET /any/path?x=1 HTTP/1.1", "hello"),
        ] {
            assert!(
                matches!(check_v02(&head), Err(V02Refusal::Drop(_))),
                "{head:?}"
            );
        }
        assert_eq!(
            response_101_v02("dGhlIHNhbXBsZSBub25jZQ=="),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Access-Control-Allow-Origin: *\r\nSec-WebSocket-Protocol: quickio\r\n\
             Cache-Control: private, max-age=0\r\nExpires: -1\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        assert!(refusal_v02("400 Bad Request").starts_with("HTTP/1.0 400 Bad Request\r\n"));
    }

    #[test]
    fn answer_and_head_helpers() {
        // The example from RFC 6455, section 1.3.
        assert_eq!(
            response_101("dGhlIHNhbXBsZSBub25jZQ=="),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r"), None);
        assert_eq!(head_end(b""), None);
        assert_eq!(head_text(b"A\r\n\r\n\x81\x85"), "A\r\n\r\n");
        assert_eq!(head_text(b"partial\xff"), "partial\u{fffd}");
    }
}
