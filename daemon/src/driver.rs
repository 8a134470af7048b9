//! The driver: the one tokio task that owns the upstream WebSocket.
//!
//! It runs the pure [`Session`] against a real socket and a real (or paused) clock.
//! Everything else talks to it through [`SessionHandle`], whose calls travel over a
//! bounded channel and come back on oneshot channels, so a flood of callers waits
//! instead of growing a queue without limit.

use crate::codec::Dialect;
use crate::session::{
    CbHandle, Event, Outcome, Output, Session, SessionConfig, SessionError, SessionStatus,
    StateChange,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = Result<Ws, ConnectError>> + Send>>;

/// Why an upgrade failed, and whether the failure points at the other dialect.
struct ConnectError {
    reason: String,
    wrong_dialect: bool,
}

/// Settings of the driver around the session's own.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The protocol settings.
    pub session: SessionConfig,
    /// Seed for backoff jitter and server order (fixed in tests, random in production).
    pub seed: u64,
    /// Capacity of the command channel from callers to the driver.
    pub command_capacity: usize,
    /// Capacity of the notice channel from the driver to the layer above.
    pub notice_capacity: usize,
    /// Largest WebSocket message accepted from the server, in bytes.
    pub max_message_bytes: usize,
    /// A PEM file of CA certificates that `wss://` servers may chain to, trusted in
    /// addition to the built-in web roots (`webpki-roots`). Read once, by [`spawn`].
    pub ca_file: Option<PathBuf>,
}

impl DriverConfig {
    /// Defaults around a session configuration.
    pub fn new(session: SessionConfig) -> Self {
        DriverConfig {
            session,
            seed: rand::random(),
            command_capacity: 1024,
            notice_capacity: 4096,
            max_message_bytes: 16 * 1024 * 1024,
            ca_file: None,
        }
    }
}

/// What the layer above hears from the session, in order.
#[derive(Debug)]
pub enum Notice {
    /// An event on a subscribed path.
    Event(Event),
    /// The connection's state changed.
    State(StateChange),
    /// The answer about a path wanted with [`SessionHandle::want`] (see
    /// [`Output::Subscription`]): on this stream, so it keeps its place among the events.
    Subscription {
        /// The path.
        path: String,
        /// The generation of the want it answers.
        gen: u64,
        /// 200 (active upstream), or the refusal (no longer wanted).
        outcome: Outcome,
    },
}

/// Where an answer goes.
#[derive(Debug)]
enum Reply {
    Plain(oneshot::Sender<Outcome>),
}

enum Command {
    Emit {
        path: String,
        data: Box<RawValue>,
        done: oneshot::Sender<Result<(), SessionError>>,
    },
    Request {
        path: String,
        data: Box<RawValue>,
        reply: Reply,
    },
    Answer {
        handle: CbHandle,
        data: Box<RawValue>,
        reply: Option<Reply>,
        done: oneshot::Sender<Result<(), SessionError>>,
    },
    Want {
        path: String,
        data: Option<Box<RawValue>>,
        gen: u64,
    },
    Unwant {
        path: String,
        gen: u64,
    },
    Status {
        reply: oneshot::Sender<SessionStatus>,
    },
    SetServers {
        servers: Vec<Url>,
    },
}

/// A cheap, cloneable way to talk to the driver task.
///
/// Every call resolves exactly once; when the driver is gone, with the disconnected
/// outcome or error.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl SessionHandle {
    /// Sends an event without a callback (queued while offline).
    pub async fn emit(&self, path: &str, data: Box<RawValue>) -> Result<(), SessionError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Emit {
            path: path.to_owned(),
            data,
            done,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(SessionError::Stopped);
        }
        rx.await.unwrap_or(Err(SessionError::Stopped))
    }

    /// Sends an event and waits for the server's callback.
    pub async fn request(&self, path: &str, data: Box<RawValue>) -> Outcome {
        self.request_deferred(path, data).await.await
    }

    /// Hands the request to the session (in call order) and returns the wait for its
    /// answer, so a caller can pipeline many requests.
    pub async fn request_deferred(
        &self,
        path: &str,
        data: Box<RawValue>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Request {
            path: path.to_owned(),
            data,
            reply: Reply::Plain(tx),
        };
        self.deferred(cmd, rx).await
    }

    /// Answers a server's callback request without asking for one back.
    pub async fn answer(&self, handle: CbHandle, data: Box<RawValue>) -> Result<(), SessionError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Answer {
            handle,
            data,
            reply: None,
            done,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(SessionError::Stopped);
        }
        rx.await.unwrap_or(Err(SessionError::Stopped))
    }

    /// Answers a server's callback request; the returned wait ends with the server's
    /// callback to the answer.
    pub async fn answer_deferred(
        &self,
        handle: CbHandle,
        data: Box<RawValue>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let (done, _) = oneshot::channel();
        let cmd = Command::Answer {
            handle,
            data,
            reply: Some(Reply::Plain(tx)),
            done,
        };
        self.deferred(cmd, rx).await
    }

    /// Wants a path upstream for generation `gen`; see [`Session::want`]. The answer comes
    /// as a [`Notice::Subscription`].
    pub async fn want(&self, path: &str, data: Option<Box<RawValue>>, gen: u64) {
        let cmd = Command::Want {
            path: path.to_owned(),
            data,
            gen,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Ends generation `gen` of a wanted path; see [`Session::unwant`].
    pub async fn unwant(&self, path: &str, gen: u64) {
        let cmd = Command::Unwant {
            path: path.to_owned(),
            gen,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Replaces the configured server addresses (a reload); see [`Session::set_servers`].
    pub async fn set_servers(&self, servers: Vec<Url>) {
        let _ = self.tx.send(Command::SetServers { servers }).await;
    }

    /// A snapshot of the session, or `None` when the driver is gone.
    pub async fn status(&self) -> Option<SessionStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    async fn deferred(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<Outcome>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let sent = self.tx.send(cmd).await.is_ok();
        async move {
            if !sent {
                return Outcome::disconnected();
            }
            rx.await.unwrap_or_else(|_| Outcome::disconnected())
        }
    }
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The session settings are unusable.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The TLS settings are unusable (`ca_file`).
    #[error("ca_file: {0}")]
    Tls(#[from] TlsError),
}

/// Why the TLS client settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's answer.
        source: std::io::Error,
    },
    /// The CA file holds no certificate, or one that cannot be a trust anchor.
    #[error("{}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the protocol settings (a build without TLS 1.2 and 1.3).
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The TLS client settings for `wss://`: the built-in web roots plus, when `ca_file` is
/// given, every PEM certificate in it. Certificates and host names are always verified;
/// there is no way to turn that off.
///
/// The ring provider is named here rather than taken from the process default, because
/// nothing installs one (a default lookup would panic in the connecting task).
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The trust anchors: the built-in web roots, then every certificate of `ca_file`.
fn root_store(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for (i, cert) in read_ca_file(path)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::Invalid {
                path: path.to_owned(),
                reason: format!("certificate {} is not a usable CA certificate: {e}", i + 1),
            })?;
        }
    }
    Ok(roots)
}

/// The certificates of a PEM file; other PEM sections (a key, say) are skipped, a file
/// with no certificate at all is an error.
fn read_ca_file(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::io::Read;
    // A CA bundle is a few hundred KiB; the cap keeps a wrong path (a device, a huge
    // file) from eating memory at start.
    const MAX_BYTES: u64 = 16 * 1024 * 1024;
    let read_err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "larger than {MAX_BYTES} bytes; expected a PEM file of CA certificates"
            ),
        });
    }
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: format!("not a valid PEM file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            reason: "holds no certificate; expected PEM blocks starting with \
                     -----BEGIN CERTIFICATE-----"
                .into(),
        });
    }
    Ok(certs)
}

/// Starts the driver task; it runs until `shutdown` is cancelled or every handle is
/// dropped, and answers every waiting caller with -1 on its way out.
///
/// Fails when the session settings are unusable or `ca_file` cannot be read or holds no
/// usable certificate; the error names the file.
pub fn spawn(
    cfg: DriverConfig,
    shutdown: CancellationToken,
) -> Result<
    (
        SessionHandle,
        mpsc::Receiver<Notice>,
        tokio::task::JoinHandle<()>,
    ),
    SpawnError,
> {
    let session = Session::new(cfg.session.clone(), cfg.seed, Instant::now().into_std())?;
    let tls = tls_config(cfg.ca_file.as_deref())?;
    if let Some(path) = &cfg.ca_file {
        tracing::info!(
            path = %path.display(),
            "trusting the CA certificates of ca_file besides the built-in roots"
        );
    }
    let (tx, rx) = mpsc::channel(cfg.command_capacity);
    let (notice_tx, notice_rx) = mpsc::channel(cfg.notice_capacity);
    let driver = Driver {
        write_timeout: cfg.session.ping_timeout,
        session,
        ws: None,
        connecting: None,
        notices: notice_tx,
        tls,
        // tungstenite zero-fills its whole read buffer before every read (128 KiB by
        // default): 32 KiB took a request's cost from 281 k to 70 k instructions.
        ws_config: WebSocketConfig::default()
            .read_buffer_size(32 * 1024)
            .max_message_size(Some(cfg.max_message_bytes))
            .max_frame_size(Some(cfg.max_message_bytes)),
    };
    let task = tokio::spawn(driver.run(rx, shutdown));
    Ok((SessionHandle { tx }, notice_rx, task))
}

struct Driver {
    session: Session<Reply>,
    /// How long one write to the server may take. A server that stops reading would
    /// otherwise block this loop (and with it heartbeats, timeouts and every caller);
    /// one that takes no bytes for a ping timeout is as dead as one that answers no ping.
    write_timeout: Duration,
    ws: Option<Ws>,
    connecting: Option<Connecting>,
    notices: mpsc::Sender<Notice>,
    tls: Arc<rustls::ClientConfig>,
    ws_config: WebSocketConfig,
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let stopped = shutdown.cancelled();
        tokio::pin!(stopped);
        // One timer for the task's life, moved only when the next deadline comes earlier:
        // registering a fresh one on every pass cost 12% of the daemon's CPU under load. A
        // deadline that moved later just makes it fire early once; then it is re-armed.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<std::time::Instant> = None;
        loop {
            self.carry_out().await;
            match (self.session.poll_timeout(), armed) {
                (Some(next), Some(at)) if next >= at => {}
                (Some(next), _) => {
                    timer.as_mut().reset(Instant::from_std(next));
                    armed = Some(next);
                }
                (None, _) => armed = None,
            }
            // Not biased: a server flooding events must not starve callers, nor callers
            // the server; select! picks fairly among what is ready.
            tokio::select! {
                _ = &mut stopped => break,
                res = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    self.connecting = None;
                    match res {
                        Ok(ws) => {
                            self.ws = Some(ws);
                            self.session.handle_connected(now());
                        }
                        Err(e) if e.wrong_dialect => self.session.handle_wrong_dialect(now(), &e.reason),
                        Err(e) => self.session.handle_connect_failed(now(), &e.reason),
                    }
                }
                msg = async { self.ws.as_mut().expect("guarded").next().await }, if self.ws.is_some() => {
                    self.on_message(msg);
                }
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.session.handle_timeout(now());
                }
            }
        }
        self.session.shutdown();
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            self.on_command(cmd);
        }
        self.carry_out().await;
    }

    fn on_message(&mut self, msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) {
        match msg {
            Some(Ok(Message::Text(text))) => self.session.handle_frame(now(), text.as_str()),
            Some(Ok(Message::Binary(_))) => {
                // Quick.IO never sends binary frames: treat one like any invalid frame.
                self.session
                    .handle_frame(now(), "(a binary WebSocket frame)");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(frame))) => {
                self.ws = None;
                let reason = match frame {
                    Some(f) if !f.reason.is_empty() => {
                        format!("server closed the connection ({}: {})", f.code, f.reason)
                    }
                    Some(f) => format!("server closed the connection ({})", f.code),
                    None => "server closed the connection".to_owned(),
                };
                self.session.handle_closed(now(), &reason);
            }
            Some(Err(e)) => {
                self.ws = None;
                self.session
                    .handle_closed(now(), &format!("connection error: {e}"));
            }
            None => {
                self.ws = None;
                self.session
                    .handle_closed(now(), "connection closed without a close frame");
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let now = now();
        match cmd {
            Command::Emit { path, data, done } => {
                let _ = done.send(self.session.emit(now, &path, &data));
            }
            Command::Request { path, data, reply } => {
                self.session.request(now, &path, &data, reply)
            }
            Command::Answer {
                handle,
                data,
                reply,
                done,
            } => {
                let _ = done.send(self.session.answer(now, handle, &data, reply));
            }
            Command::Want { path, data, gen } => self.session.want(&path, data.as_deref(), gen),
            Command::Unwant { path, gen } => self.session.unwant(&path, gen),
            Command::Status { reply } => {
                let _ = reply.send(self.session.status(now));
            }
            Command::SetServers { servers } => self.session.set_servers(now, servers),
        }
    }

    /// Carries out the session's instructions; frames are fed in a batch and flushed once.
    async fn carry_out(&mut self) {
        loop {
            let mut unflushed = false;
            while let Some(out) = self.session.poll_output() {
                match out {
                    Output::Connect { url, dialect } => {
                        self.drop_connection();
                        let tls = self.tls.clone();
                        self.connecting =
                            Some(Box::pin(connect(url, dialect, self.ws_config, tls)));
                    }
                    Output::Send(text) => {
                        if let Some(ws) = self.ws.as_mut() {
                            let sent = within(self.write_timeout, ws.feed(Message::text(text)));
                            match sent.await {
                                Ok(()) => unflushed = true,
                                Err(reason) => {
                                    self.ws = None;
                                    unflushed = false;
                                    self.session.handle_closed(now(), &reason);
                                }
                            }
                        }
                    }
                    Output::Close => self.drop_connection(),
                    Output::Reply(Reply::Plain(tx), outcome) => {
                        let _ = tx.send(outcome);
                    }
                    Output::Event(ev) => notify(&self.notices, Notice::Event(ev)).await,
                    Output::State(state) => {
                        log_state(&state);
                        notify(&self.notices, Notice::State(state)).await
                    }
                    Output::Subscription { path, gen, outcome } => {
                        let notice = Notice::Subscription { path, gen, outcome };
                        notify(&self.notices, notice).await
                    }
                }
            }
            let Some(ws) = self.ws.as_mut().filter(|_| unflushed) else {
                return;
            };
            let Err(reason) = within(self.write_timeout, ws.flush()).await else {
                return;
            };
            // The failure produces more instructions (fail callbacks, back off): go again.
            self.ws = None;
            self.session.handle_closed(now(), &reason);
        }
    }

    fn drop_connection(&mut self) {
        self.connecting = None;
        if let Some(mut ws) = self.ws.take() {
            // Say goodbye politely without holding up the loop on a stalled server.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            });
        }
    }
}

/// Runs one write with a deadline, turning both failure kinds into a close reason.
async fn within<E: std::fmt::Display>(
    limit: Duration,
    write: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending failed: {e}")),
        Err(_) => Err(format!(
            "the server stopped reading: a write did not complete within {limit:?}"
        )),
    }
}

/// Hands a notice up, waiting while the layer above is behind (that is the backpressure).
async fn notify(notices: &mpsc::Sender<Notice>, notice: Notice) {
    // Nobody listening is fine: a session may run without a layer above (tests).
    let _ = notices.send(notice).await;
}

fn log_state(state: &StateChange) {
    match state {
        StateChange::Connecting { url } => tracing::info!(%url, "connecting"),
        StateChange::Open { url } => tracing::info!(%url, "open"),
        StateChange::ConnectFailed { url, reason } => {
            tracing::warn!(%url, "connection attempt failed: {reason}")
        }
        StateChange::Closed { reason } => tracing::warn!("connection closed: {reason}"),
        StateChange::Moved { from, to } => tracing::info!(%from, %to, "moved by the server"),
        StateChange::Reconnecting { after } => tracing::info!("reconnecting in {after:.1?}"),
        StateChange::Stopped => tracing::info!("session stopped"),
    }
}

/// Opens the WebSocket; 0.2 asks for the `quickio` subprotocol, 0.1 must not (a 0.1
/// server never echoes one, and the upgrade would then fail).
///
/// tungstenite writes the canonical header spellings (`Host`, `Connection`, `Upgrade`,
/// `Sec-WebSocket-Version`, `Sec-WebSocket-Key`) that the 0.1 server insists on; the
/// end-to-end tests check the exact bytes.
///
/// `wss://` goes through `tls` ([`tls_config`]): an untrusted certificate or a name
/// mismatch fails the attempt like any other connection error. `ws://` ignores it.
async fn connect(
    url: Url,
    dialect: Dialect,
    config: WebSocketConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Ws, ConnectError> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError {
            reason: format!("bad address {url}: {e}"),
            wrong_dialect: false,
        })?;
    if dialect == Dialect::V02 {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("quickio"),
        );
    }
    let connector = Some(Connector::Rustls(tls));
    match tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector)
        .await
    {
        Ok((ws, _response)) => Ok(ws),
        Err(e) => Err(ConnectError {
            wrong_dialect: matches!(
                e,
                WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(_))
            ),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ca_file_adds_to_the_web_roots() {
        let web = webpki_roots::TLS_SERVER_ROOTS.len();
        assert!(web > 50, "the built-in roots are there: {web}");
        assert_eq!(root_store(None).unwrap().len(), web);

        // Every certificate of the file counts, whatever else the file holds.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let text = format!("# ours\n{}{key}{}", ca_pem("one"), ca_pem("two"));
        std::fs::write(&path, text).unwrap();
        assert_eq!(root_store(Some(&path)).unwrap().len(), web + 2);
        tls_config(Some(&path)).unwrap();
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = tls_config(Some(&missing)).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = tls_config(Some(&empty)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: holds no certificate; expected PEM blocks starting with \
                 -----BEGIN CERTIFICATE-----",
                empty.display()
            )
        );
        let spawn_err = SpawnError::from(err).to_string();
        assert!(spawn_err.starts_with("ca_file: "), "{spawn_err}");
    }
}
