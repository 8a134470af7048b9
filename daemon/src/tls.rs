//! The TLS client settings for `wss://` (and long polling over `https://`): the built-in
//! web roots plus the operator's `ca_file`.
//!
//! Its own module because two places need the same answer: the driver builds the
//! settings it connects with, and the binary builds them once at start so that an unusable
//! `ca_file` is a configuration error (exit 2) before the socket is bound. Neither the
//! configuration nor the driver reads certificate files itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
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
        client_config(Some(&path)).unwrap();
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_config(Some(&missing)).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = client_config(Some(&empty)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: holds no certificate; expected PEM blocks starting with \
                 -----BEGIN CERTIFICATE-----",
                empty.display()
            )
        );
    }

    /// Moved here from the configuration's tests with the check itself: each kind of
    /// unusable file is refused with the file's name and what is wrong with it.
    #[test]
    fn every_kind_of_unusable_file_is_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let check = |path: &Path, expect: &str| {
            let msg = client_config(Some(path)).unwrap_err().to_string();
            assert!(msg.contains(path.to_str().unwrap()), "{msg}");
            assert!(msg.contains(expect), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        };
        check(&dir.path().join("missing.pem"), "cannot read");
        check(dir.path(), "cannot read");
        let key = rcgen::KeyPair::generate().unwrap();
        let key_only = dir.path().join("key.pem");
        std::fs::write(&key_only, key.serialize_pem()).unwrap();
        check(&key_only, "holds no certificate");
        let der = dir.path().join("ca.der");
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&der, cert.der()).unwrap();
        check(&der, "holds no certificate");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(&garbage, "not a valid PEM file");
        let not_a_cert = dir.path().join("not-a-cert.pem");
        std::fs::write(
            &not_a_cert,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(&not_a_cert, "certificate 1 is not a usable CA certificate");
    }
}
