//! Native HTTPS: the certificate chain and key named by `TLS_CERT_FILE` and `TLS_KEY_FILE`,
//! served with rustls (ring), swapped in without a restart on SIGHUP and when the files change
//! (a renewal), with HSTS on every response.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::http::{header, HeaderValue};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;

/// How often the files are read to notice a renewal: two small reads, so cheap.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// `Strict-Transport-Security`: browsers keep to https for a year once they have seen it.
pub const HSTS: &str = "max-age=31536000";

/// Where the certificate chain and its private key are read from (PEM files, e.g. Let's
/// Encrypt's `fullchain.pem` and `privkey.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both or neither: the values of `TLS_CERT_FILE` and `TLS_KEY_FILE`.
    ///
    /// # Errors
    /// One of the two without the other, as a configuration problem naming both.
    pub fn from_settings(
        cert: Option<String>,
        key: Option<String>,
    ) -> Result<Option<Self>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.into(),
                key: key.into(),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(
                "TLS_CERT_FILE is set but TLS_KEY_FILE is not: set both to serve HTTPS, or neither"
                    .to_owned(),
            ),
            (None, Some(_)) => Err(
                "TLS_KEY_FILE is set but TLS_CERT_FILE is not: set both to serve HTTPS, or neither"
                    .to_owned(),
            ),
        }
    }
}

/// True when the service would listen beyond loopback in plain HTTP: then something in front
/// of it must terminate TLS.
pub fn needs_proxy_in_front(listen_addr: SocketAddr, tls: Option<&TlsFiles>) -> bool {
    tls.is_none() && !listen_addr.ip().is_loopback()
}

/// Why a certificate cannot be served. Never quotes key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {variable} {}: {source}", path.display())]
    Read {
        /// `TLS_CERT_FILE` or `TLS_KEY_FILE`.
        variable: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The certificate file has no certificate in it.
    #[error("TLS_CERT_FILE {} holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The certificate file is not valid PEM.
    #[error("TLS_CERT_FILE {} is not valid PEM: {reason}", path.display())]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// The PEM parser's reason (certificates are public).
        reason: String,
    },
    /// The key file has no readable private key. The parser's reason is left out: it could
    /// quote part of the key.
    #[error("TLS_KEY_FILE {} holds no readable private key (a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// Certificate and key are both valid but do not belong together.
    #[error("the private key in TLS_KEY_FILE does not belong to the certificate in TLS_CERT_FILE")]
    KeyMismatch,
    /// rustls refuses the pair (an unsupported key type, a certificate it cannot parse, …).
    #[error("the certificate in TLS_CERT_FILE and the key in TLS_KEY_FILE cannot be used: {0}")]
    Unusable(rustls::Error),
}

/// A checked certificate, ready to serve and to be reloaded.
pub struct Tls {
    files: TlsFiles,
    /// What new connections are served; replaced on reload.
    served: Arc<RwLock<Arc<ServerConfig>>>,
    /// The files' contents (or read error) last acted on, so a change is acted on once.
    seen: Fingerprint,
}

type Fingerprint = [u8; 32];

impl Tls {
    /// Reads and checks the certificate and key.
    ///
    /// # Errors
    /// What is wrong with the files ([`TlsError`]); at start this stops the service.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let (seen, read) = read_files(&files);
        let (cert, key) = read?;
        let config = server_config(&files, &cert, &key)?;
        Ok(Self {
            files,
            served: Arc::new(RwLock::new(Arc::new(config))),
            seen,
        })
    }

    /// The files this certificate comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Serves `router` over HTTPS on `listener` with the connection `limits` of plain HTTP
    /// ([`crate::server::serve`]) until `shutdown` is cancelled, then stops accepting and waits
    /// for in-flight requests. Every response carries HSTS; the certificate follows its files
    /// meanwhile (new connections get the new one).
    ///
    /// # Errors
    /// When the server fails.
    pub async fn serve(
        self,
        listener: TcpListener,
        router: axum::Router,
        limits: crate::server::Limits,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let router = router.layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        ));
        let served = self.served.clone();
        let acceptor: crate::server::Acceptor = Arc::new(move || {
            let config = served
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            tokio_rustls::TlsAcceptor::from(config)
        });
        let reloading = tokio::spawn(self.follow_files(shutdown.clone()));
        let served = crate::server::serve(listener, router, Some(acceptor), limits, shutdown).await;
        reloading.abort();
        served
    }

    /// Reloads on SIGHUP (always) and when the files' contents change (polled), until
    /// `shutdown`.
    async fn follow_files(mut self, shutdown: CancellationToken) {
        let mut hangups = hangups();
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate, and the files were just read.
        poll.tick().await;
        loop {
            let trigger = tokio::select! {
                () = shutdown.cancelled() => return,
                () = next_hangup(&mut hangups) => Trigger::Hangup,
                _ = poll.tick() => Trigger::FileChange,
            };
            self.reload(trigger).await;
        }
    }

    /// Reads the files and, on SIGHUP or when they differ from what was last acted on, swaps
    /// the certificate for new connections. A failure keeps the one being served.
    async fn reload(&mut self, trigger: Trigger) {
        let files = self.files.clone();
        let seen = self.seen;
        let attempt = tokio::task::spawn_blocking(move || {
            let (fingerprint, read) = read_files(&files);
            if trigger == Trigger::FileChange && fingerprint == seen {
                return (fingerprint, None);
            }
            let built = read.and_then(|(cert, key)| server_config(&files, &cert, &key));
            (fingerprint, Some(built))
        })
        .await;
        let (fingerprint, built) = match attempt {
            Ok(attempt) => attempt,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the certificate files");
                return;
            }
        };
        self.seen = fingerprint;
        match built {
            None => {}
            Some(Ok(config)) => {
                *self.served.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                tracing::info!(
                    trigger = trigger.as_str(),
                    cert_file = %self.files.cert.display(),
                    "certificate reloaded"
                );
            }
            // Logged once per state of the files: the next change (or SIGHUP) tries again.
            Some(Err(err)) => tracing::warn!(
                trigger = trigger.as_str(),
                error = %err,
                "certificate not reloaded; still serving the previous one"
            ),
        }
    }
}

/// What made a reload happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Hangup,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Hangup => "SIGHUP",
            Self::FileChange => "file change",
        }
    }
}

/// The certificate file's and the key file's bytes.
type Contents = (Vec<u8>, Vec<u8>);

/// Both files' contents, and a fingerprint of them (or of why they cannot be read).
fn read_files(files: &TlsFiles) -> (Fingerprint, Result<Contents, TlsError>) {
    let read = read_file(&files.cert, "TLS_CERT_FILE")
        .and_then(|cert| Ok((cert, read_file(&files.key, "TLS_KEY_FILE")?)));
    let mut hash = Sha256::new();
    match &read {
        Ok((cert, key)) => {
            hash.update(b"read");
            hash.update((cert.len() as u64).to_be_bytes());
            hash.update(cert);
            hash.update(key);
        }
        Err(err) => {
            hash.update(b"error");
            hash.update(err.to_string());
        }
    }
    (hash.finalize().into(), read)
}

fn read_file(path: &Path, variable: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        variable,
        path: path.to_owned(),
        source,
    })
}

/// A rustls server configuration (ring) for one chain and key.
fn server_config(files: &TlsFiles, cert: &[u8], key: &[u8]) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::InvalidCertificate {
            path: files.cert.clone(),
            reason: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoKey {
        path: files.key.clone(),
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Unusable)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|err| match err {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    TlsError::KeyMismatch
                }
                other => TlsError::Unusable(other),
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; the certificate is still reloaded when its files change");
            None
        }
    }
}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) {
    match hangups {
        Some(signal) => {
            if signal.recv().await.is_none() {
                *hangups = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
type Hangups = ();

#[cfg(not(unix))]
fn hangups() -> Hangups {}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither() {
        assert_eq!(TlsFiles::from_settings(None, None), Ok(None));
        assert_eq!(
            TlsFiles::from_settings(Some("c.pem".into()), Some("k.pem".into())),
            Ok(Some(TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into()
            }))
        );
        for (cert, key) in [(Some("c.pem".into()), None), (None, Some("k.pem".into()))] {
            let problem = TlsFiles::from_settings(cert, key).expect_err("only one");
            assert!(
                problem.contains("TLS_CERT_FILE") && problem.contains("TLS_KEY_FILE"),
                "{problem}"
            );
        }
    }

    #[test]
    fn plain_http_beyond_loopback_needs_a_proxy_in_front() {
        let files = TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
        };
        let everywhere: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let everywhere_v6: SocketAddr = "[::]:8080".parse().expect("addr");
        let loopback: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let loopback_v6: SocketAddr = "[::1]:8080".parse().expect("addr");
        assert!(needs_proxy_in_front(everywhere, None));
        assert!(needs_proxy_in_front(everywhere_v6, None));
        assert!(!needs_proxy_in_front(everywhere, Some(&files)));
        assert!(!needs_proxy_in_front(loopback, None));
        assert!(!needs_proxy_in_front(loopback_v6, None));
    }

    #[test]
    fn files_that_cannot_be_served_are_refused_with_a_reason_and_no_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        let files = TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        };
        let missing = Tls::load(files.clone()).err().expect("no files");
        assert!(
            missing.to_string().starts_with("cannot read TLS_CERT_FILE"),
            "{missing}"
        );

        std::fs::write(&cert_path, "not a certificate\n").expect("write");
        std::fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IQ@@\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let no_cert = Tls::load(files.clone()).err().expect("no certificate");
        assert!(
            matches!(no_cert, TlsError::NoCertificate { .. }),
            "{no_cert}"
        );

        std::fs::write(
            &cert_path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let bad_key = Tls::load(files.clone()).err().expect("bad key");
        assert!(matches!(bad_key, TlsError::NoKey { .. }), "{bad_key}");
        let shown = bad_key.to_string();
        assert!(shown.contains("TLS_KEY_FILE"), "{shown}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");

        // Two valid halves of different pairs.
        let one = self_signed("one");
        let other = self_signed("other");
        std::fs::write(&cert_path, one.0).expect("write");
        std::fs::write(&key_path, &other.1).expect("write");
        let mismatch = Tls::load(files.clone()).err().expect("mismatch");
        assert!(matches!(mismatch, TlsError::KeyMismatch), "{mismatch}");
        std::fs::write(&key_path, one.1).expect("write");
        let tls = Tls::load(files.clone()).expect("a matching pair");
        assert_eq!(tls.files(), &files);
    }

    /// (certificate PEM, key PEM)
    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}
