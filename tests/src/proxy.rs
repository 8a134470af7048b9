//! A proxy that breaks every WebSocket upgrade in one of the ten ways of the Quick.IO
//! conformance kit's proxy (LONGPOLL.md sections 1 and 12) and passes plain HTTP requests
//! (long polling) through untouched.
//!
//! For each TCP connection it reads the client's first chunk. A chunk with a
//! `Sec-WebSocket-Key` is an upgrade: one rule rewrites it (a request rule) or the server's
//! first chunk (a response rule), line by line, a line containing the rule's word
//! (case-insensitively) replaced whole. The two "upgrade" rules close both sockets without
//! forwarding, which is what the original's failed string join did. Every later byte, and
//! every byte of a connection that is not an upgrade, passes untouched.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One way of breaking an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The request's `Connection` becomes `keep-alive` (the server answers 426).
    ReqConnection,
    /// The request's upgrade lines are deleted: both sockets close, nothing forwarded.
    ReqUpgrade,
    /// The request's `Sec-WebSocket-Protocol` becomes empty (400).
    ReqProtocol,
    /// The request's key becomes `abcd` (the 101's accept key then does not match).
    ReqKey,
    /// The request's `Sec-WebSocket-Version` becomes 9 (400).
    ReqVersion,
    /// The 101's status line becomes `HTTP/1.1 200 OK`.
    RespStatus,
    /// The 101's `Connection` becomes `keep-alive`.
    RespConnection,
    /// The 101's upgrade lines are deleted: both sockets close, nothing forwarded.
    RespUpgrade,
    /// The 101's `Sec-WebSocket-Protocol` becomes empty.
    RespProtocol,
    /// The 101's `Sec-WebSocket-Accept` becomes `abcd`.
    RespAccept,
}

impl Rule {
    /// All ten.
    pub const ALL: [Rule; 10] = [
        Rule::ReqConnection,
        Rule::ReqUpgrade,
        Rule::ReqProtocol,
        Rule::ReqKey,
        Rule::ReqVersion,
        Rule::RespStatus,
        Rule::RespConnection,
        Rule::RespUpgrade,
        Rule::RespProtocol,
        Rule::RespAccept,
    ];

    fn on_request(self) -> bool {
        matches!(
            self,
            Rule::ReqConnection
                | Rule::ReqUpgrade
                | Rule::ReqProtocol
                | Rule::ReqKey
                | Rule::ReqVersion
        )
    }

    /// The word a line must contain, and what replaces it (`None`: the connection is
    /// closed instead).
    fn edit(self) -> (&'static str, Option<&'static str>) {
        match self {
            Rule::ReqConnection | Rule::RespConnection => {
                ("connection", Some("Connection: keep-alive"))
            }
            Rule::ReqUpgrade | Rule::RespUpgrade => ("upgrade", None),
            Rule::ReqProtocol | Rule::RespProtocol => {
                ("sec-websocket-protocol", Some("Sec-WebSocket-Protocol: "))
            }
            Rule::ReqKey => ("sec-websocket-key", Some("Sec-WebSocket-Key: abcd")),
            Rule::ReqVersion => ("sec-websocket-version", Some("Sec-WebSocket-Version: 9")),
            Rule::RespStatus => ("101 switching", Some("HTTP/1.1 200 OK")),
            Rule::RespAccept => ("sec-websocket-accept", Some("Sec-WebSocket-Accept: abcd")),
        }
    }

    /// The chunk with the rule applied, or `None` when the rule drops the connection.
    fn apply(self, chunk: &[u8]) -> Option<Vec<u8>> {
        let (word, with) = self.edit();
        let text = String::from_utf8_lossy(chunk);
        let sep = if text.contains("\r\n") { "\r\n" } else { "\n" };
        let mut hit = false;
        let lines: Vec<String> = text
            .split(sep)
            .map(|line| {
                if line.to_ascii_lowercase().contains(word) {
                    hit = true;
                    with.unwrap_or_default().to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect();
        if hit && with.is_none() {
            return None;
        }
        Some(lines.join("\r\n").into_bytes())
    }
}

/// What the proxy does to a WebSocket after passing its upgrade through untouched: the
/// breakages that only show as a missing `/qio/ohai`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Both sockets close right after the 101.
    Close,
    /// The client's socket is reset (RST) right after the 101.
    Reset,
    /// The client gets a text frame that is not `/qio/ohai`; the server is cut off.
    NotOhai,
    /// Nothing more reaches the client, and nothing the client sends reaches the server.
    Silent,
}

impl After {
    /// All four.
    pub const ALL: [After; 4] = [After::Close, After::Reset, After::NotOhai, After::Silent];
}

/// Which rule each upgrade gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The upgrade passes, then the WebSocket is broken this way.
    AfterUpgrade(After),
    /// Upgrade requests never get an answer (the proxy holds them until the client gives
    /// up); they are counted in [`ManglingProxy::unanswered`].
    Unanswered,
    /// One of the ten, chosen at random per connection (from a seed: reproducible).
    Random(u64),
    /// Always this one.
    Forced(Rule),
    /// No rule: upgrades pass untouched (the proxy is as good as gone).
    PassThrough,
}

struct State {
    mode: Mode,
    rng: u64,
    /// The rule of every upgrade broken so far, in order.
    broken: Vec<Rule>,
    /// Connections that were not upgrades (passed through).
    plain: usize,
    /// The breakage of every WebSocket broken after its upgrade, in order.
    after: Vec<After>,
    /// Upgrade requests held without an answer.
    unanswered: usize,
}

/// A running mangling proxy in front of one server. Dropping it stops it (connections in
/// progress included).
pub struct ManglingProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for ManglingProxy {
    fn drop(&mut self) {
        self.task.abort();
        for t in lock(&self.conns).drain(..) {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ManglingProxy {
    /// Listens on `127.0.0.1`, a free port, and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, mode: Mode) -> std::io::Result<ManglingProxy> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let addr = listener.local_addr()?;
        let rng = match mode {
            Mode::Random(seed) => seed | 1,
            _ => 1,
        };
        let state = Arc::new(Mutex::new(State {
            mode,
            rng,
            broken: Vec::new(),
            plain: 0,
            after: Vec::new(),
            unanswered: 0,
        }));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept(listener, upstream, state.clone(), conns.clone()));
        Ok(ManglingProxy {
            addr,
            state,
            task,
            conns,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://` URL of the proxy (path `/`).
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Changes the rule for connections from now on.
    pub fn set_mode(&self, mode: Mode) {
        lock(&self.state).mode = mode;
    }

    /// The rule of every upgrade broken so far, in order.
    pub fn broken(&self) -> Vec<Rule> {
        lock(&self.state).broken.clone()
    }

    /// The breakage of every WebSocket broken after its upgrade so far, in order.
    pub fn broken_after(&self) -> Vec<After> {
        lock(&self.state).after.clone()
    }

    /// How many upgrade requests were held without an answer.
    pub fn unanswered(&self) -> usize {
        lock(&self.state).unanswered
    }

    /// How many connections were passed through untouched because they were not upgrades.
    pub fn plain_connections(&self) -> usize {
        lock(&self.state).plain
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let task = tokio::spawn(relay(client, upstream, state.clone()));
        let mut list = lock(&conns);
        list.retain(|t| !t.is_finished());
        list.push(task);
    }
}

/// The rule for the next upgrade, if any (xorshift, so a seed replays the same choices).
fn pick(state: &Arc<Mutex<State>>) -> Option<Rule> {
    let mut st = lock(state);
    let rule = match st.mode {
        Mode::PassThrough | Mode::AfterUpgrade(_) | Mode::Unanswered => return None,
        Mode::Forced(rule) => rule,
        Mode::Random(_) => {
            let mut x = st.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            st.rng = x;
            Rule::ALL[(x % 10) as usize]
        }
    };
    st.broken.push(rule);
    Some(rule)
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    let _ = client.set_nodelay(true);
    let mut first = vec![0u8; 4096];
    let n = match client.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    first.truncate(n);
    let upgrade = String::from_utf8_lossy(&first)
        .to_ascii_lowercase()
        .contains("sec-websocket-key");
    let rule = if upgrade { pick(&state) } else { None };
    let mode = lock(&state).mode;
    if upgrade && mode == Mode::Unanswered {
        lock(&state).unanswered += 1;
        let _ = tokio::io::copy(&mut client, &mut tokio::io::sink()).await;
        return;
    }
    let after = match mode {
        Mode::AfterUpgrade(after) if upgrade => Some(after),
        _ => None,
    };
    if !upgrade {
        lock(&state).plain += 1;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let first = match rule {
        Some(r) if r.on_request() => match r.apply(&first) {
            Some(c) => c,
            None => return,
        },
        _ => first,
    };
    if server.write_all(&first).await.is_err() {
        return;
    }
    if let Some(r) = rule.filter(|r| !r.on_request()) {
        let mut reply = vec![0u8; 4096];
        let n = match server.read(&mut reply).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Some(reply) = r.apply(&reply[..n]) else {
            return;
        };
        if client.write_all(&reply).await.is_err() {
            return;
        }
    }
    if let Some(after) = after {
        let mut reply = vec![0u8; 4096];
        let n = match server.read(&mut reply).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if client.write_all(&reply[..n]).await.is_err() {
            return;
        }
        lock(&state).after.push(after);
        match after {
            After::Close => {}
            After::Reset => {
                let _ = client.set_zero_linger();
            }
            After::NotOhai | After::Silent => {
                drop(server);
                if after == After::NotOhai {
                    // An unmasked text frame, as a server sends it.
                    let text = b"/qio/nope:0=null";
                    let mut frame = vec![0x81, text.len() as u8];
                    frame.extend_from_slice(text);
                    if client.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                // Swallow whatever the client sends until it gives up.
                let _ = tokio::io::copy(&mut client, &mut tokio::io::sink()).await;
            }
        }
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Protocol: quickio\r\n\
        Sec-WebSocket-Accept: xyz=\r\n\r\n";

    #[test]
    fn rules_replace_whole_lines() {
        let out = String::from_utf8(Rule::RespAccept.apply(RESPONSE.as_bytes()).unwrap()).unwrap();
        assert!(
            out.contains("\r\nSec-WebSocket-Accept: abcd\r\n\r\n"),
            "{out}"
        );
        let out = String::from_utf8(Rule::RespStatus.apply(RESPONSE.as_bytes()).unwrap()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\nUpgrade: websocket\r\n"),
            "{out}"
        );
        let out =
            String::from_utf8(Rule::RespConnection.apply(RESPONSE.as_bytes()).unwrap()).unwrap();
        assert!(out.contains("\r\nConnection: keep-alive\r\n"), "{out}");
        assert_eq!(Rule::RespUpgrade.apply(RESPONSE.as_bytes()), None);
    }
}
