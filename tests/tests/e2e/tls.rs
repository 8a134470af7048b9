//! `wss://` end to end: certificates are verified by default, `ca_file` adds trust for a
//! private CA, and a bad `ca_file` stops the session from starting.
//!
//! Each test makes its own CA and a `localhost` server certificate signed by it at run
//! time (rcgen), so nothing here expires or depends on the machine's trust store.

use crate::common::*;
use qio_testserver::{CloseReason, Dialect, LogEntry, ServerConfig, TestServer, TlsIdentity};
use qiod::driver::{self, DriverConfig, Notice};
use qiod::session::{DialectChoice, StateChange};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// A private CA and a server identity it signed.
struct Pki {
    /// The CA certificate, PEM: what `ca_file` points at.
    ca_pem: String,
    /// The server's certificate (for `names`) and key.
    server: TlsIdentity,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "qiod test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("server key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "qiod test server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    Pki {
        ca_pem,
        server: TlsIdentity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

async fn tls_server(identity: TlsIdentity, dialect: Dialect) -> TestServer {
    server_with(|c: &mut ServerConfig| {
        c.tls = Some(identity);
        c.dialect = dialect;
    })
    .await
}

/// Writes `text` to a file in `dir`.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn config_with_ca(url: &str, ca_file: Option<&Path>) -> DriverConfig {
    let mut cfg = fast_config(&[url.to_owned()]);
    cfg.ca_file = ca_file.map(Path::to_owned);
    cfg
}

/// Waits for the next failed attempt; the session must never open meanwhile.
async fn wait_refused(up: &mut Upstream) -> String {
    up.wait_for("a failed attempt", |n| match n {
        Notice::State(StateChange::Open { url }) => panic!("opened {url} despite TLS"),
        Notice::State(StateChange::ConnectFailed { reason, .. }) => Some(reason.clone()),
        _ => None,
    })
    .await
}

/// The server saw the TLS handshake fail (the client refused its certificate).
async fn server_saw_tls_refusal(server: &TestServer) {
    let refused = |s: &TestServer| {
        s.log().iter().any(|e| {
            matches!(e, LogEntry::UpgradeRejected { reason, .. } if reason.starts_with("TLS handshake"))
        }) && s.closes().iter().any(
            |(_, r)| matches!(r, CloseReason::HandshakeFailed(why) if why.starts_with("TLS handshake")),
        )
    };
    assert!(
        server.wait_until(DEADLINE, refused).await,
        "{:?}",
        server.log()
    );
    assert_eq!(server.connection_count(), 0);
    assert!(
        !server
            .log()
            .iter()
            .any(|e| matches!(e, LogEntry::Upgraded { .. })),
        "no WebSocket upgrade over a refused TLS session"
    );
}

#[tokio::test]
async fn wss_refuses_a_certificate_from_an_unknown_ca_by_default() {
    let pki = pki(&["localhost"]);
    let server = tls_server(pki.server, Dialect::V02).await;
    assert!(
        server.url().starts_with("wss://localhost:"),
        "{}",
        server.url()
    );

    let mut up = Upstream::spawn(config_with_ca(&server.url(), None));
    for _ in 0..2 {
        // Refused on every attempt, never opened: the built-in web roots do not know
        // this CA, and there is no switch to skip verification.
        let reason = wait_refused(&mut up).await;
        assert!(reason.contains("invalid peer certificate"), "{reason}");
        assert!(reason.contains("UnknownIssuer"), "{reason}");
    }
    server_saw_tls_refusal(&server).await;
    up.stop().await;
}

#[tokio::test]
async fn wss_with_ca_file_opens_and_carries_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost"]);
    let ca_file = file(&dir, "ca.pem", &pki.ca_pem);
    let server = tls_server(pki.server, Dialect::V02).await;

    let up = Upstream::start_with(config_with_ca(&server.url(), Some(&ca_file))).await;
    let out = up.handle.request("/clienttest/echo", raw("\"hi\"")).await;
    assert_eq!((out.code, out.data.get()), (200, "\"hi\""));
    assert_eq!(server.connection_count(), 1);
    up.stop().await;

    // The same through the daemon and a local client.
    let mut settings = daemon_settings(&server.url());
    settings.driver.ca_file = Some(ca_file);
    let daemon = Daemon::start_with(settings).await;
    let mut c = daemon.open_client().await;
    let reply = c
        .call(
            serde_json::json!({"op": "send", "path": "/clienttest/echo", "data": [1]}),
            1,
        )
        .await;
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["data"], serde_json::json!([1]));
    daemon.stop().await;
}

#[tokio::test]
async fn wss_checks_the_host_name_even_for_a_trusted_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost"]);
    let ca_file = file(&dir, "ca.pem", &pki.ca_pem);
    let server = tls_server(pki.server, Dialect::V02).await;
    // Same server, addressed by a name the certificate does not carry.
    let url = format!("wss://127.0.0.1:{}/", server.addr().port());

    let mut up = Upstream::spawn(config_with_ca(&url, Some(&ca_file)));
    let reason = wait_refused(&mut up).await;
    assert!(reason.contains("invalid peer certificate"), "{reason}");
    assert!(reason.contains("not valid for name"), "{reason}");
    server_saw_tls_refusal(&server).await;
    up.stop().await;
}

#[tokio::test]
async fn a_ca_file_does_not_trust_other_cas() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ours = pki(&["localhost"]);
    let theirs = pki(&["localhost"]);
    let ca_file = file(&dir, "ca.pem", &ours.ca_pem);
    let server = tls_server(theirs.server, Dialect::V02).await;

    let mut up = Upstream::spawn(config_with_ca(&server.url(), Some(&ca_file)));
    // Both CAs carry the same name, so the chain is tried against ours and its
    // signature does not verify: the name alone earns no trust.
    let reason = wait_refused(&mut up).await;
    assert!(reason.contains("invalid peer certificate"), "{reason}");
    assert!(reason.contains("BadSignature"), "{reason}");
    up.stop().await;
}

#[tokio::test]
async fn the_01_dialect_works_over_wss_and_auto_detection_finds_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost"]);
    let ca_file = file(&dir, "ca.pem", &pki.ca_pem);
    let server = tls_server(pki.server, Dialect::V01).await;
    assert!(server.url().ends_with("/qio"), "{}", server.url());

    let mut cfg = config_with_ca(&server.url(), Some(&ca_file));
    cfg.session.dialect = DialectChoice::Auto;
    let up = Upstream::start_with(cfg).await;
    assert_eq!(up.handle.status().await.expect("status").dialect, "0.1");
    let out = up
        .handle
        .request("/clienttest/echo", raw("{\"a\":1}"))
        .await;
    assert_eq!((out.code, out.data.get()), (200, "{\"a\":1}"));
    up.stop().await;
}

#[tokio::test]
async fn a_missing_empty_or_certless_ca_file_stops_the_session_from_starting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = "wss://localhost:1/";
    let key_only = file(
        &dir,
        "key.pem",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let cases = [
        (dir.path().join("missing.pem"), "cannot read"),
        (file(&dir, "empty.pem", ""), "holds no certificate"),
        (key_only, "holds no certificate"),
    ];
    for (path, expect) in cases {
        let err = driver::spawn(config_with_ca(url, Some(&path)), CancellationToken::new())
            .expect_err("a bad ca_file is refused");
        let msg = err.to_string();
        assert!(msg.starts_with("ca_file: "), "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains(expect), "{msg}");
        assert!(matches!(err, driver::SpawnError::Tls(_)), "{err:?}");
    }

    // The daemon refuses to run with it, saying why.
    let mut settings = daemon_settings(url);
    settings.driver.ca_file = Some(dir.path().join("missing.pem"));
    let socket_dir = tempfile::tempdir().expect("temp dir");
    let listener =
        tokio::net::UnixListener::bind(socket_dir.path().join("qiod.sock")).expect("bind");
    let (_reload, reload_rx) = tokio::sync::mpsc::channel(1);
    let err = qiod::run(settings, listener, CancellationToken::new(), reload_rx)
        .await
        .expect_err("run fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("ca_file"), "{msg}");
    assert!(msg.contains("missing.pem"), "{msg}");
}

/// A `wss://` server moves the session to a plain `ws://` one; returns where it opened
/// next and whether the plain server ever saw a connection.
async fn move_to_plain(allow: bool) -> (String, String, bool, Option<String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost"]);
    let ca_file = file(&dir, "ca.pem", &pki.ca_pem);
    let secure = tls_server(pki.server, Dialect::V02).await;
    let plain = server().await;
    let mut cfg = config_with_ca(&secure.url(), Some(&ca_file));
    cfg.session.allow_insecure_move = allow;
    let mut up = Upstream::start_with(cfg).await;
    up.trigger("/clienttest/move", &format!("{:?}", plain.url()))
        .await;
    up.wait_closed().await;
    let url = up.wait_open().await;
    let last_error = up.handle.status().await.and_then(|s| s.last_error);
    let plain_seen = plain
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::Accepted { .. }));
    up.stop().await;
    (url.to_string(), secure.url(), plain_seen, last_error)
}

#[tokio::test]
async fn regression_issue13_a_move_from_wss_to_ws_is_refused_unless_allowed() {
    let (url, secure, plain_seen, last_error) = move_to_plain(false).await;
    assert_eq!(url, secure, "back to the configured server");
    assert!(!plain_seen, "TLS is never dropped silently");
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("drop TLS") && last_error.contains("allow_insecure_move"),
        "{last_error}"
    );
    let (url, _, plain_seen, _) = move_to_plain(true).await;
    assert!(url.starts_with("ws://"), "{url}");
    assert!(plain_seen);
}

#[tokio::test]
async fn long_polling_over_https_verifies_like_wss() {
    let pki = pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca = file(&dir, "ca.pem", &pki.ca_pem);
    let server = tls_server(pki.server, Dialect::V02).await;
    let mut cfg = config_with_ca(&server.url(), Some(&ca));
    cfg.session.transport = driver::TransportChoice::LongPoll;
    cfg.long_poll.delay_max = std::time::Duration::from_millis(5);
    let up = Upstream::start_with(cfg).await;
    assert_eq!(
        up.handle.status().await.unwrap().transport,
        Some("long-poll")
    );
    let out = up.handle.request("/clienttest/echo", raw("\"tls\"")).await;
    assert_eq!((out.code, out.data.get()), (200, "\"tls\""));
    assert!(server
        .log()
        .iter()
        .any(|e| matches!(e, LogEntry::PollSession { .. })));
    up.stop().await;

    // Without the CA the certificate is refused, and that is no reason to fall back.
    let mut up = Upstream::spawn(config_with_ca(&server.url(), None));
    let reason = wait_refused(&mut up).await;
    assert!(!reason.contains("long polling"), "{reason}");
    up.stop().await;
}
