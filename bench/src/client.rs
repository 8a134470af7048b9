//! The two kinds of client the benchmarks compare: a raw line-JSON client of qiod's Unix
//! socket (what any language would write: read bytes, split at `\n`, look at the line), and
//! a direct Quick.IO 0.2 WebSocket client of the test server.

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Splits a byte stream into lines without allocating per line.
pub struct LineReader<R> {
    rd: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// A reader with an initial buffer of `cap` bytes (it grows for longer lines).
    pub fn new(rd: R, cap: usize) -> Self {
        LineReader {
            rd,
            buf: vec![0; cap.max(64)],
            start: 0,
            end: 0,
        }
    }

    /// The next line without its `\n`; `None` at the end of the stream.
    pub async fn next_line(&mut self) -> std::io::Result<Option<&[u8]>> {
        let mut scanned = 0;
        loop {
            let window = &self.buf[self.start + scanned..self.end];
            if let Some(i) = window.iter().position(|&b| b == b'\n') {
                let s = self.start;
                let e = s + scanned + i;
                self.start = e + 1;
                return Ok(Some(&self.buf[s..e]));
            }
            scanned = self.end - self.start;
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            }
            let n = self.rd.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }
}

/// A line of qiod's, as far as the harness needs to look at it.
#[derive(Debug, Deserialize)]
pub struct Msg<'a> {
    /// Set on events.
    #[serde(borrow)]
    pub event: Option<Cow<'a, str>>,
    /// Set on replies (the harness only sends numeric ids).
    pub id: Option<u64>,
    /// Set on replies.
    pub code: Option<i64>,
    /// The data, unparsed.
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
    /// The daemon's error text.
    #[serde(borrow)]
    pub err_msg: Option<Cow<'a, str>>,
}

impl<'a> Msg<'a> {
    /// Parses a line; a line that is not JSON is an error (the daemon writes only JSON).
    pub fn parse(line: &'a [u8]) -> anyhow::Result<Msg<'a>> {
        serde_json::from_slice(line)
            .with_context(|| format!("not a qiod line: {:?}", String::from_utf8_lossy(line)))
    }
}

/// A local client of qiod.
pub struct LineConn {
    /// The reading side.
    pub r: LineReader<OwnedReadHalf>,
    /// The writing side.
    pub w: OwnedWriteHalf,
}

impl LineConn {
    /// Connects (retrying while the listen backlog is full) with a small read buffer.
    pub async fn connect(path: &Path) -> anyhow::Result<LineConn> {
        LineConn::connect_with(path, 4096).await
    }

    /// Connects with a read buffer of `cap` bytes.
    pub async fn connect_with(path: &Path, cap: usize) -> anyhow::Result<LineConn> {
        let mut tries = 0;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                // A full backlog answers EAGAIN to a non-blocking connect.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 2000 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
            }
        };
        let (rd, w) = stream.into_split();
        Ok(LineConn {
            r: LineReader::new(rd, cap),
            w,
        })
    }

    /// Writes one line (the `\n` is added).
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.w.write_all(&buf).await.context("writing to qiod")
    }

    /// Reads lines until the event `name`.
    pub async fn wait_event(&mut self, name: &str) -> anyhow::Result<()> {
        loop {
            let line = self.r.next_line().await?.context("qiod closed")?;
            if Msg::parse(line)?.event.as_deref() == Some(name) {
                return Ok(());
            }
        }
    }

    /// Reads lines until the reply with `id`, skipping events; returns its code.
    pub async fn wait_reply(&mut self, id: u64) -> anyhow::Result<i64> {
        loop {
            let line = self.r.next_line().await?.context("qiod closed")?;
            let msg = Msg::parse(line)?;
            if msg.event.is_none() && msg.id == Some(id) {
                let code = msg.code.context("reply without code")?;
                if code != 200 {
                    bail!(
                        "request {id} answered {code}: {}",
                        msg.err_msg.as_deref().unwrap_or("")
                    );
                }
                return Ok(code);
            }
        }
    }

    /// Connects, waits for `/open`, subscribes to `path` and waits for the 200.
    pub async fn subscribed(path: &Path, cap: usize, sub: &str) -> anyhow::Result<LineConn> {
        let mut c = LineConn::connect_with(path, cap).await?;
        c.wait_event("/open").await?;
        c.send(&format!(r#"{{"op":"on","id":1,"path":{}}}"#, json_str(sub)))
            .await?;
        c.wait_reply(1).await?;
        Ok(c)
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The direct clients' tungstenite read buffer: the same as qiod's upstream connection.
const READ_BUFFER: usize = 32 * 1024;

/// A direct Quick.IO 0.2 client of the test server.
pub struct WsConn {
    /// The WebSocket.
    pub ws: Ws,
}

impl WsConn {
    /// Upgrades with the `quickio` subprotocol and completes the `/qio/ohai` greeting.
    pub async fn connect(url: &str) -> anyhow::Result<WsConn> {
        let mut req = url.into_client_request().context("ws url")?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("quickio"),
        );
        // Nagle off and a 32 KiB read buffer, as qiod has for its own upstream connection:
        // tungstenite zero-fills its read buffer before every read (128 KiB by default),
        // which at moderate rates cost each direct connection more than the event itself.
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
            .await
            .context("websocket connect")?;
        let mut c = WsConn { ws };
        c.ws.send(Message::text("/qio/ohai")).await?;
        let first = c.next_text().await?;
        if !first.starts_with("/qio/ohai") {
            bail!("the server greeted with {first:?}");
        }
        Ok(c)
    }

    /// The next text frame.
    pub async fn next_text(&mut self) -> anyhow::Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the connection"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("websocket read"),
            }
        }
    }

    /// Subscribes to `path` with callback id `cb` and waits for a 200.
    pub async fn subscribe(&mut self, path: &str, cb: u64) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(format!("/qio/on:{cb}={}", json_str(path))))
            .await?;
        loop {
            let text = self.next_text().await?;
            if let Some((got, code)) = parse_callback(&text) {
                if got == cb {
                    if code != 200 {
                        bail!("subscribing to {path}: code {code}");
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// `/qio/callback/<id>:<cb>={"code":C,...}` -> `(id, C)`.
pub fn parse_callback(text: &str) -> Option<(u64, i64)> {
    #[derive(Deserialize)]
    struct Envelope {
        code: i64,
    }
    let rest = text.strip_prefix("/qio/callback/")?;
    let (id, rest) = rest.split_once(':')?;
    let (_, json) = rest.split_once('=')?;
    let env: Envelope = serde_json::from_str(json).ok()?;
    Some((id.parse().ok()?, env.code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_split_across_reads_and_grow_the_buffer() {
        let long = "y".repeat(200);
        let text = format!("a\n\nbc\n{long}\nlast-without-newline");
        let mut r = LineReader::new(text.as_bytes(), 8);
        let mut got = Vec::new();
        while let Some(line) = r.next_line().await.expect("read") {
            got.push(String::from_utf8_lossy(line).into_owned());
        }
        assert_eq!(got, ["a", "", "bc", long.as_str()]);
    }

    #[test]
    fn callbacks_parse() {
        assert_eq!(
            parse_callback(r#"/qio/callback/12:0={"code":200,"data":"x"}"#),
            Some((12, 200))
        );
        assert_eq!(parse_callback("/bench/flow:0=1"), None);
        assert_eq!(parse_callback("/qio/callback/x:0={}"), None);
    }

    #[test]
    fn qiod_lines_parse() {
        let m = Msg::parse(br#"{"id":3,"code":404,"data":null,"err_msg":"not \"found\""}"#)
            .expect("json");
        assert_eq!((m.id, m.code), (Some(3), Some(404)));
        assert_eq!(m.err_msg.as_deref(), Some("not \"found\""));
        assert!(Msg::parse(b"nope").is_err());
    }
}
